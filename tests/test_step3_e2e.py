"""Step 3 (PPO) end to end through run.sh on two CPU ranks, from the micro step-1 and step-2 models:
the seed command's LoRA setting, ZeRO-3, full fine-tuning with separate frozen copies, a classifier reward,
and kill-and-resume equivalence."""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from conftest import ALPACA, REPO, RM_STATIC, STEP3, free_port, kill_after_first_checkpoint, run_launcher

pytestmark = pytest.mark.slow


def ppo_args(actor, critic, out, data_cache, *extra):
    return ["--data_path", RM_STATIC, "--data_output_path", data_cache, "--actor_model_name_or_path", actor,
            "--critic_model_name_or_path", critic, "--num_padding_at_beginning", 0,
            "--per_device_train_batch_size", 8, "--per_device_mini_train_batch_size", 4, "--ppo_epochs", 2,
            "--max_prompt_seq_len", 64, "--max_answer_seq_len", 16, "--actor_learning_rate", 5e-3,
            "--critic_learning_rate", 5e-3, "--output_dir", out, "--eval_batches", 1, "--disable_progress_bar",
            "--deepspeed", "--seed", 7, *extra]


SEED_LORA = ["--actor_lora_dim", 8, "--actor_lora_module_name", "q_proj", "--critic_lora_dim", 8,
             "--critic_lora_module_name", "q_proj,k_proj", "--only_optimize_lora"]


def metrics(out):
    rows = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        row = json.loads(line)
        if "reward/score" in row:
            rows[row["step"]] = row  # a resumed run may repeat a step: the last one counts
    return rows


def changed_keys(before_dir, after_dir):
    before = load_file(os.path.join(before_dir, "model.safetensors"))
    after = load_file(os.path.join(after_dir, "model.safetensors"))
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_ppo_seed_command_lora_zero2(reward_run, tmp_path):
    critic, actor, _ = reward_run
    out = str(tmp_path / "final")
    proc = run_launcher(STEP3, ppo_args(actor, critic, out, str(tmp_path / "data"), "--actor_zero_stage", 2,
                                        "--critic_zero_stage", 2, *SEED_LORA, "--enable_test_mode",
                                        "--test_stop_step", 3, "--print_answers", "--enable_tensorboard"))
    assert "reference policy: the actor with LoRA switched off" in proc.stdout
    assert "reward model: the critic's decoder with LoRA switched off" in proc.stdout
    rows = metrics(out)
    assert sorted(rows) == [1, 2, 3]
    for key in ("reward/score", "objective/kl", "objective/entropy", "policy/clipfrac", "policy/approxkl",
                "loss/policy", "loss/value", "val/explained_variance", "gen/response_len", "gen/response_len_min",
                "gen/empty_frac", "gen/no_eos_frac", "time/generate", "time/train"):
        assert key in rows[3], key
    assert os.listdir(os.path.join(out, "tensorboard"))
    actor_changed = changed_keys(actor, os.path.join(out, "actor"))
    assert actor_changed and all("q_proj" in k for k in actor_changed)        # LoRA merged into q_proj only
    critic_changed = changed_keys(critic, os.path.join(out, "critic"))
    assert "score.weight" in critic_changed                                   # the value head trained
    assert {k for k in critic_changed if k != "score.weight"} and all(
        "q_proj" in k or "k_proj" in k for k in critic_changed if k != "score.weight")
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor"))
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "actor"))
    ids = tok("\n\nHuman: What is 2 plus 3?\n\nAssistant:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0).shape[1] > ids.shape[1]
    assert "before / after PPO" in proc.stdout


def test_ppo_zero3_lora(reward_run, tmp_path):
    critic, actor, _ = reward_run
    out = str(tmp_path / "final")
    run_launcher(STEP3, ppo_args(actor, critic, out, str(tmp_path / "data"), "--actor_zero_stage", 3,
                                 "--critic_zero_stage", 3, *SEED_LORA, "--enable_test_mode", "--test_stop_step", 2))
    assert sorted(metrics(out)) == [1, 2]
    assert changed_keys(actor, os.path.join(out, "actor"))
    assert "score.weight" in changed_keys(critic, os.path.join(out, "critic"))


def test_ppo_full_finetuning_separate_copies_with_ema(reward_run, tmp_path):
    critic, actor, _ = reward_run
    out = str(tmp_path / "final")
    proc = run_launcher(STEP3, ppo_args(actor, critic, out, str(tmp_path / "data"), "--actor_zero_stage", 2,
                                        "--critic_zero_stage", 0, "--enable_ema", "--enable_test_mode",
                                        "--test_stop_step", 2))
    assert "shared" not in proc.stdout  # no LoRA: a separate reference and reward model were loaded
    changed = changed_keys(actor, os.path.join(out, "actor"))
    assert any("mlp" in k for k in changed)  # full fine-tuning moves every weight
    ema = load_file(os.path.join(out, "actor_ema", "model.safetensors"))
    final = load_file(os.path.join(out, "actor", "model.safetensors"))
    start = load_file(os.path.join(actor, "model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ema[k], final[k]) and not torch.equal(ema[k], start[k])


def test_classifier_reward(sft_run, tmp_path):
    root, actor, _ = sft_run
    tok = AutoTokenizer.from_pretrained(actor)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=0,
                      id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    classifier_dir = str(tmp_path / "classifier")
    LlamaForSequenceClassification(cfg).save_pretrained(classifier_dir)
    tok.save_pretrained(classifier_dir)
    out = str(tmp_path / "final")
    proc = run_launcher(STEP3, ppo_args(actor, actor, out, str(tmp_path / "data"), "--reward_model_type", "classifier",
                                        "--reward_model_name_or_path", classifier_dir, "--reward_label", "POSITIVE",
                                        "--enable_test_mode", "--test_stop_step", 1), num_gpus=1)
    assert sorted(metrics(out)) == [1]
    bad = subprocess.run(["sh", "run.sh", "--num_gpus", "1", "--master_port", str(free_port()), STEP3,
                          *map(str, ppo_args(actor, actor, str(tmp_path / "bad"), str(tmp_path / "data"),
                                             "--reward_model_type", "classifier", "--reward_model_name_or_path",
                                             classifier_dir, "--reward_label", "HAPPY"))],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--reward_label 'HAPPY' is not a label" in bad.stderr
    assert proc.returncode == 0


def test_kill_and_resume_gives_the_same_metrics(reward_run, tmp_path):
    """Killed mid-run and resumed: the same metrics as an uninterrupted run, the PTX loss (its data position is
    checkpointed) included, and the same EMA export (the EMA is checkpointed)."""
    critic, actor, _ = reward_run
    common = [*SEED_LORA, "--actor_zero_stage", 2, "--critic_zero_stage", 2, "--save_interval", 2,
              "--enable_test_mode", "--test_stop_step", 6, "--enable_ema", "--unsupervised_dataset_name", ALPACA,
              "--unsup_coef", 0.5]
    reference = str(tmp_path / "uninterrupted")
    run_launcher(STEP3, ppo_args(actor, critic, reference, str(tmp_path / "data"), *common))
    expected = metrics(reference)
    assert sorted(expected) == list(range(1, 7))

    out = str(tmp_path / "killed")
    resumed_from = kill_after_first_checkpoint(STEP3, ppo_args(actor, critic, out, str(tmp_path / "data"), *common),
                                               out)
    assert not os.path.exists(os.path.join(out, "actor")), "the run was not interrupted"

    resumed = run_launcher(STEP3, ppo_args(actor, critic, out, str(tmp_path / "data"), *common))
    assert f"resumed from {os.path.join(out, 'checkpoints', f'step_{resumed_from}')}" in resumed.stdout
    got = metrics(out)
    assert sorted(got) == list(range(1, 7))
    for step in range(resumed_from + 1, 7):
        for key in ("reward/score", "objective/kl", "loss/policy", "loss/value", "gen/response_len", "loss/ptx"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-5), (step, key)
    ema, ema_expected = (load_file(os.path.join(d, "actor_ema", "model.safetensors")) for d in (out, reference))
    assert ema.keys() == ema_expected.keys()
    for name, tensor in ema_expected.items():
        torch.testing.assert_close(ema[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_reusing_the_first_training_forward_gives_the_same_updates(reward_run, tmp_path):
    """One epoch, one mini-batch: pi_old and V_old taken from the first training forward (the default), whose
    actor part replays the rollout's own forward, must give the same iterations as separate experience passes."""
    critic, actor, _ = reward_run
    common = [*SEED_LORA, "--per_device_mini_train_batch_size", 8, "--ppo_epochs", 1, "--enable_test_mode",
              "--test_stop_step", 3]
    runs = {}
    for name, extra in (("reused", []), ("separate", ["--separate_experience_passes"])):
        out = str(tmp_path / name)
        proc = run_launcher(STEP3, ppo_args(actor, critic, out, str(tmp_path / "data"), *common, *extra))
        runs[name] = metrics(out)
        # the reused first forward is also the replayed one (forward_replay.py): generation's own outputs
        assert ("replayed from the rollout's own forward" in proc.stdout) == (name == "reused"), proc.stdout[-3000:]
    assert sorted(runs["reused"]) == sorted(runs["separate"]) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("reward/score", "objective/kl", "loss/policy", "loss/value", "policy/approxkl",
                    "val/explained_variance"):
            assert runs["reused"][step][key] == pytest.approx(runs["separate"][step][key], rel=1e-4, abs=1e-5), \
                (step, key)
    # the policy moved: the later iterations are not trivially equal to the first
    assert runs["reused"][3]["objective/kl"] != runs["reused"][1]["objective/kl"]
