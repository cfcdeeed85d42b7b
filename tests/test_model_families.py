"""Every family users bring, through every step, on two CPU ranks: Qwen2 (no BOS, byte-level BPE, q/k/v
biases; in bf16), Mistral (SentencePiece with BOS), OPT (learned positions with offset, ReLU, `</s>` as BOS,
DeepSpeed-Chat's --num_padding_at_beginning 1) and GPT-2 (Conv1D layers, LoRA on the fused c_attn, one
<|endoftext|> for BOS/EOS/pad). LLaMA runs the same steps in test_step*_e2e.py; here it adds step 3 and DPO in
bf16 from fp32 checkpoints. Each run is a few optimizer steps (ZeRO-2, one ZeRO-3 case): the exports must load
with AutoModelFor* (nothing missing) and generate, the losses must fall."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ALPACA, DPO, STEP1, STEP2, STEP3, common_args, run_launcher
from test_step3_e2e import ppo_args

from alpaca_rlhf.deepspeed_chat.training.utils.data.token_ids import bos_ids, text_ids

pytestmark = pytest.mark.slow

# family -> the LoRA targets its users name, the dtype its chain trains in, extra flags of its command lines
# (`extra` goes to step 2 and step 3, the steps of DeepSpeed-Chat's command lines that take it)
FAMILIES = {
    "qwen2": dict(lora="q_proj,k_proj", dtype="bf16", extra=[]),
    "mistral": dict(lora="q_proj,k_proj", dtype="fp32", extra=[]),
    "opt": dict(lora="q_proj,k_proj", dtype="fp32", extra=["--num_padding_at_beginning", 1]),
    "gpt2": dict(lora="c_attn", dtype="fp32", extra=[]),
}
PROMPT = "\n\nHuman: What is 3 plus 4?\n\nAssistant:"


def losses(out, key):
    return [row[key] for row in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if key in row]


def assert_falls(values, what):
    first, last = sum(values[:4]) / 4, sum(values[-4:]) / 4
    assert all(map(torch.isfinite, torch.tensor(values))) and last < first, (what, values)


def assert_eval_loss_falls(out, what):
    """DPO starts at log 2 exactly (policy = reference) and moves slowly in a dozen LoRA steps: the held-out loss
    (the mean over the eval split, not one noisy batch) must be below it after training."""
    history = json.load(open(os.path.join(out, "eval_history.json")))
    assert history[0]["eval/loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert history[-1]["eval/loss"] < history[0]["eval/loss"], (what, history)


def assert_generates(out, dtype):
    """The export loads as a causal LM with every weight present, in the dtype it was trained in, and answers."""
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([bos_ids(tok) + text_ids(tok, PROMPT)])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, spec, root, base model dir) of one family, the micro preset built offline."""
    from alpaca_rlhf.tools.make_tiny_model import make_tiny_model
    name = request.param
    root = tmp_path_factory.mktemp(f"family-{name}")
    return name, FAMILIES[name], root, make_tiny_model(str(root / "base"), preset="micro", arch=name)


def flags(spec, model, out, root, *extra):
    return common_args(model, out, str(root / "data"), "--dtype", spec["dtype"], "--max_eval_samples", 32,
                       "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16, "--zero_stage", 2,
                       *extra)


@pytest.fixture(scope="module")
def family_sft(family):
    name, spec, root, base = family
    out = str(root / "actor")
    run_launcher(STEP1, flags(spec, base, out, root, "--sft_only_data_path", ALPACA, "--learning_rate", 1e-2,
                              "--max_train_steps", 24))
    return out


@pytest.fixture(scope="module")
def family_rm(family, family_sft):
    name, spec, root, _ = family
    out = str(root / "critic")
    run_launcher(STEP2, flags(spec, family_sft, out, root, "--learning_rate", 5e-3, "--max_train_samples", 320,
                              "--lora_dim", 8, "--lora_module_name", spec["lora"], "--only_optimize_lora",
                              *spec["extra"]))
    return out


def test_step1_full_finetuning(family, family_sft):
    history = json.load(open(os.path.join(family_sft, "eval_history.json")))
    assert history[-1]["eval/perplexity"] < history[0]["eval/perplexity"] / 10, history
    assert_generates(family_sft, family[1]["dtype"])


def test_step2_lora_reward_model(family, family_rm):
    name, spec, _, _ = family
    assert_falls(losses(family_rm, "loss/train"), f"{name} reward loss")
    model, info = AutoModelForSequenceClassification.from_pretrained(family_rm, output_loading_info=True)
    assert not info["missing_keys"] and model.config.num_labels == 1, info
    adapter = json.load(open(os.path.join(family_rm, "adapter", "adapter_config.json")))
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    assert set(adapter["target_modules"]) == set(spec["lora"].split(","))
    assert adapter["fan_in_fan_out"] == (name == "gpt2")  # GPT-2's Conv1D stores its weight (in, out)


def test_dpo_lora(family, family_sft):
    name, spec, root, _ = family
    out = str(root / "dpo")
    run_launcher(DPO, flags(spec, family_sft, out, root, "--learning_rate", 1e-2, "--max_train_samples", 192,
                            "--lora_dim", 8, "--lora_module_name", spec["lora"], "--only_optimize_lora"))
    assert_eval_loss_falls(out, f"{name} DPO")
    assert_generates(out, spec["dtype"])
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))


def ppo_flags(spec, actor, critic, out, root, *extra):
    """test_step3_e2e's step-3 flags, two iterations, in the family's dtype (and its extra flags, which come later
    on the command line and so win)."""
    return ppo_args(actor, critic, out, str(root / "data3"), "--dtype", spec["dtype"], "--enable_test_mode",
                    "--test_stop_step", 2, *spec["extra"], *extra)


def assert_ppo_ran(out, dtype):
    rows = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "reward/score" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["reward/score"], r["loss/policy"], r["objective/kl"]])).all()
               for r in rows), rows
    assert_generates(os.path.join(out, "actor"), dtype)
    AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "critic"))


def test_step3_lora_shared_base_and_gpt2_full_zero3(family, family_sft, family_rm):
    """LoRA with the shared frozen base (ZeRO-2) for every family; for GPT-2 also full fine-tuning under ZeRO-3
    (its Conv1D weights partitioned, separate frozen reference and reward engines): the families' one ZeRO-3
    case, LLaMA's are in test_step3_e2e.py."""
    name, spec, root, _ = family
    out = str(root / "ppo")
    proc = run_launcher(STEP3, ppo_flags(spec, family_sft, family_rm, out, root, "--actor_zero_stage", 2,
                                         "--critic_zero_stage", 2, "--actor_lora_dim", 8, "--actor_lora_module_name",
                                         spec["lora"], "--critic_lora_dim", 8, "--critic_lora_module_name",
                                         spec["lora"], "--only_optimize_lora"))
    assert "reference policy: the actor with LoRA switched off" in proc.stdout
    assert_ppo_ran(out, spec["dtype"])
    if name == "gpt2":
        out = str(root / "ppo_zero3")
        run_launcher(STEP3, ppo_flags(spec, family_sft, family_rm, out, root, "--actor_zero_stage", 3,
                                      "--critic_zero_stage", 3))
        assert_ppo_ran(out, spec["dtype"])


def test_llama_bf16_step3_and_dpo_from_fp32_checkpoints(reward_run, tmp_path):
    """fp32 checkpoints trained in bf16: loaded in bf16, the lean decode step and the replayed forward in bf16,
    the step-2 head computing in float32 next to a bf16 critic (this failed with a dtype mismatch before)."""
    critic, actor, _ = reward_run
    spec = dict(dtype="bf16", extra=[])
    out = str(tmp_path / "ppo")
    run_launcher(STEP3, ppo_flags(spec, actor, critic, out, tmp_path, "--actor_zero_stage", 2,
                                  "--critic_zero_stage", 2, "--actor_lora_dim", 8, "--actor_lora_module_name", "q_proj",
                                  "--critic_lora_dim", 8, "--critic_lora_module_name", "q_proj,k_proj",
                                  "--only_optimize_lora", "--enable_ema"))
    assert_ppo_ran(out, "bf16")
    ema = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor_ema"))
    assert ema.dtype == torch.float32  # the EMA is kept (and exported) in float32
    dpo = str(tmp_path / "dpo")
    run_launcher(DPO, common_args(actor, dpo, str(tmp_path / "data"), "--dtype", "bf16", "--max_eval_samples", 32,
                                  "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16,
                                  "--zero_stage", 2, "--learning_rate", 1e-2, "--max_train_samples", 320,
                                  "--lora_dim", 8, "--lora_module_name", "q_proj,k_proj,v_proj",
                                  "--only_optimize_lora"))
    assert_eval_loss_falls(dpo, "llama bf16 DPO")
    assert_generates(dpo, "bf16")


def test_evaluation_and_both_chats(family, family_sft, family_rm):
    """The evaluation tool (with the family's reward model and reference), the terminal chat and the gradio
    chatbot's answer path run on each family's exports."""
    import subprocess
    import sys
    from conftest import REPO, DEMO_DATA
    from alpaca_rlhf.inference.chat_core import GenerationSettings, build_chat_prompt, load_chat_model, stream_answer
    from alpaca_rlhf.tools import evaluate_demo
    out = os.path.join(str(family[2]), "eval.json")
    assert evaluate_demo.main(["--model", family_sft, "--reward_model", family_rm, "--reference_model", family_sft,
                               "--data", os.path.join(DEMO_DATA, "Dahoas", "rm-static"), "--num_prompts", "4",
                               "--max_new_tokens", "6", "--output_json", out]) == 0
    (result,) = json.load(open(out))["results"]
    assert result["num_prompts"] == 4 and abs(result["kl_to_reference"]) < 1e-3
    assert result["rm_score"] is not None and result["rm_score"] == result["rm_score"]  # a number, not NaN
    chat = load_chat_model(family_sft, dtype="fp32")
    _, ids, _ = build_chat_prompt(chat.tokenizer, [("Hi", "Hello.")], "What is 3 plus 4?", 512)
    assert None not in ids
    answer = "".join(stream_answer(chat.model, chat.tokenizer, ids, GenerationSettings(max_new_tokens=6)))
    assert isinstance(answer, str)
    proc = subprocess.run([sys.executable, "-m", "alpaca_rlhf.inference.chat", "--path", family_sft,
                           "--max_new_tokens", "6"], input="hello\nagain\n", cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("Assistant:") for line in proc.stdout.splitlines()) == 2
