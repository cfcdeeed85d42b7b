"""Step 3's engine flags: the hybrid engine only for the actor and never with LoRA adapters it would not fuse,
its settings reaching DeepSpeed's config, and flags that cannot work refused with one line."""
import pytest

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning import step3_args
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import EngineSpec, train_ds_config

BASE = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--output_dir", "o"]


def refusal(*flags, gpu=False, monkeypatch=None):
    if gpu:
        monkeypatch.setattr(step3_args, "on_cpu", lambda: False)
    with pytest.raises(ConfigError) as error:
        step3_args.parse_args(BASE + list(flags))
    return str(error.value)


def test_hybrid_engine_with_lora_is_refused_even_on_a_gpu(monkeypatch):
    message = refusal("--enable_hybrid_engine", "--actor_lora_dim", "8", gpu=True, monkeypatch=monkeypatch)
    assert "--enable_hybrid_engine with --actor_lora_dim" in message and "\n" not in message


def test_gpu_only_flags_are_refused_on_the_cpu():
    assert "need a GPU" in refusal("--enable_hybrid_engine", "--inference_tp_size", "2")


def test_mixed_precision_lora_needs_a_zero3_lora_actor_and_align_overflow_is_refused(monkeypatch):
    assert "--actor_zero_stage 3" in refusal("--enable_mixed_precision_lora", "--actor_lora_dim", "8",
                                             gpu=True, monkeypatch=monkeypatch)
    assert "--align_overflow is not supported" in refusal("--align_overflow")


def test_hybrid_engine_settings_reach_the_actors_config_only(monkeypatch):
    monkeypatch.setattr(step3_args, "on_cpu", lambda: False)
    args = step3_args.parse_args(BASE + ["--enable_hybrid_engine", "--inference_tp_size", "2",
                                         "--release_inference_cache", "--unpin_actor_parameters",
                                         "--tp_gather_partition_size", "4", "--max_prompt_seq_len", "64",
                                         "--max_answer_seq_len", "32", "--actor_zero_stage", "3",
                                         "--actor_lora_dim", "0"])
    args.world_size, args.dtype = 1, "bf16"
    actor = train_ds_config(EngineSpec.from_args(args, "actor_"), args, 2, 1, generates=True)
    critic = train_ds_config(EngineSpec.from_args(args, "critic_"), args, 2, 1)
    assert actor["hybrid_engine"] == {"enabled": True, "max_out_tokens": 96, "inference_tp_size": 2,
                                      "release_inference_cache": True, "pin_parameters": False,
                                      "tp_gather_partition_size": 4}
    assert "hybrid_engine" not in critic
    assert actor["bf16"]["enabled"] and actor["zero_optimization"]["stage"] == 3


def test_mixed_precision_lora_quantizes_the_actors_frozen_weights(monkeypatch):
    monkeypatch.setattr(step3_args, "on_cpu", lambda: False)
    args = step3_args.parse_args(BASE + ["--enable_mixed_precision_lora", "--actor_lora_dim", "8",
                                         "--actor_zero_stage", "3"])
    args.world_size, args.dtype = 1, "fp16"
    actor = train_ds_config(EngineSpec.from_args(args, "actor_"), args, 2, 1, generates=True)
    critic = train_ds_config(EngineSpec.from_args(args, "critic_"), args, 2, 1)
    assert actor["zero_optimization"]["zero_quantized_nontrainable_weights"] is True
    assert "zero_quantized_nontrainable_weights" not in critic["zero_optimization"]


def test_fp16_is_refused_on_the_cpu_with_one_line():
    """Every step resolves --dtype through resolve_dtype at start-up (entry.start_run); the chats through
    resolve_torch_dtype. On the CPU accelerator fp16 is one line naming the flag, bf16 and fp32 pass."""
    from alpaca_rlhf.deepspeed_chat.training.utils.ds_utils import resolve_dtype
    from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError
    from alpaca_rlhf.inference.chat_core import resolve_torch_dtype
    with pytest.raises(ConfigError) as error:
        resolve_dtype("fp16")
    assert "--dtype fp16 needs a GPU" in str(error.value) and "\n" not in str(error.value)
    assert resolve_dtype("bf16") == "bf16" and resolve_dtype("auto") == "fp32"
    with pytest.raises(UserError, match="--dtype fp16 needs a GPU"):
        resolve_torch_dtype("fp16", "cpu")


def test_critic_free_estimators_need_groups_and_no_critic():
    no_critic = ["--actor_model_name_or_path", "a", "--output_dir", "o"]
    args = step3_args.parse_args(no_critic + ["--advantage_estimator", "group_norm", "--n_samples_per_prompt", "4",
                                              "--reward_model_type", "function", "--reward_function", "f.py:r",
                                              "--per_device_generation_batch_size", "4",
                                              "--per_device_training_batch_size", "8"])
    assert args.critic_model_name_or_path is None and args.loss_agg == "token_mean"
    assert step3_args.optimizer_steps(args, 10) == 20  # 16 answers per rollout, mini-batches of 8
    dr = step3_args.parse_args(BASE + ["--advantage_estimator", "dr_grpo", "--n_samples_per_prompt", "2"])
    assert dr.loss_agg == "seq_mean_token_sum_norm"  # Dr. GRPO's length normalisation by default
    with pytest.raises(ConfigError, match="trains a critic: give --critic_model_name_or_path"):
        step3_args.parse_args(no_critic)
    assert "needs --n_samples_per_prompt of at least 2, got 1" in refusal("--advantage_estimator", "rloo")
    assert "needs --reward_function" in refusal("--advantage_estimator", "reinforce", "--reward_model_type",
                                                "function")
    assert "must divide the answers of a rollout" in refusal(
        "--n_samples_per_prompt", "3", "--per_device_generation_batch_size", "2",
        "--per_device_training_batch_size", "4")


def test_reward_sources_are_checked_and_weighted_one_each():
    args = step3_args.parse_args(BASE + ["--reward_model_type", "model", "function", "--reward_function", "f.py:r",
                                         "--reward_weights", "1", "0.5"])
    assert args.reward_model_type == ["reward_model", "function"] and args.reward_weights == [1.0, 0.5]
    assert step3_args.parse_args(BASE).reward_weights == [1.0]
    assert "name each source once" in refusal("--reward_model_type", "model", "reward_model")
    assert "expected 2 finite number(s)" in refusal("--reward_model_type", "reward_model", "function",
                                                    "--reward_function", "f.py:r", "--reward_weights", "1")
    assert "needs --reward_url" in refusal("--reward_model_type", "remote")
    assert "--reward_url is used with --reward_model_type remote" in refusal("--reward_url", "http://h:1/score")
    assert "needs --reward_model_name_or_path" in refusal("--reward_model_type", "classifier")
    assert "default format" in refusal("--reward_model_type", "remote", "--reward_url", "http://h:1/score",
                                       "--chat_template", "model")


def test_reward_stats_for_each_source(tmp_path):
    import json
    (tmp_path / "reward_stats.json").write_text(json.dumps({"chosen_mean": 2.0, "chosen_std": 0.5}))
    served = {"mean": 1.0, "std": 3.0}
    args = step3_args.parse_args(["--actor_model_name_or_path", "a", "--critic_model_name_or_path", str(tmp_path),
                                  "--output_dir", "o", "--reward_model_type", "reward_model", "remote", "function",
                                  "--reward_url", "http://h:1/score", "--reward_function", "f.py:r"])
    assert [step3_args.reward_stats(args, s, served) for s in args.reward_model_type] == [
        {"mean": 2.0, "std": 0.5}, served, None]
    alone = step3_args.parse_args(BASE + ["--reward_model_type", "remote", "--reward_url", "http://h:1/score",
                                          "--reward_stats", str(tmp_path / "reward_stats.json")])
    assert step3_args.reward_stats(alone, "remote", served) == {"mean": 2.0, "std": 0.5}  # the flag wins
