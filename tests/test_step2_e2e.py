"""Step 2 (reward model) and DPO end to end through run.sh on two CPU ranks, from the step-1 model."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import create_critic_model

from conftest import DPO, common_args, run_launcher

pytestmark = pytest.mark.slow


def test_reward_model_learns_preferences(reward_run):
    out, _, _ = reward_run
    history = json.load(open(os.path.join(out, "eval_history.json")))
    first, last = history[0], history[-1]
    assert first["eval/accuracy"] == pytest.approx(0.5)  # zero head: every pair a tie
    # Chance is 0.5. About 60% of the demo pairs differ only in content (a wrong value, or an answer to another
    # question), which the 0.2M-parameter model cannot learn in a few steps; it reaches ~0.62 on the rest.
    assert last["eval/accuracy"] >= 0.58, last
    # empty / very short answers are scored low: all but at most one of the eval split's 7 such pairs (which one
    # is in doubt moves with float rounding in the step-1 model this starts from)
    assert last["eval/accuracy_short_rejected"] >= 6 / 7 - 1e-6, last
    assert last["eval/margin"] > 0


def test_reward_stats_written_and_consistent(reward_run):
    out, _, _ = reward_run
    stats = json.load(open(os.path.join(out, "reward_stats.json")))
    assert stats["num_pairs"] >= 96 and stats["chosen_std"] > 0
    assert stats["chosen_mean"] > stats["rejected_mean"]
    assert stats["source"]["split"] == "eval"


def test_reward_model_export_loads_with_its_head(reward_run):
    out, actor, _ = reward_run
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert "score.weight" in weights and not any("lora" in k for k in weights)
    assert torch.count_nonzero(weights["score.weight"]) > 0  # the value head was trained under --only_optimize_lora
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    critic = create_critic_model(out, AutoTokenizer.from_pretrained(out)).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("\n\nHuman: What is 2 plus 2?\n\nAssistant: 2 plus 2 is 4.</s>", return_tensors="pt")["input_ids"]
    ids = torch.cat([ids[:, :-1], torch.tensor([[tok.eos_token_id]])], dim=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = critic.forward_value(ids, mask)["chosen_end_scores"]
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    base = load_file(os.path.join(actor, "model.safetensors"))
    changed = [k for k in base if k.startswith("model.") and not torch.equal(base[k], weights[k])]
    assert changed and all("q_proj" in k or "k_proj" in k for k in changed)


def test_dpo_raises_implicit_reward_accuracy(sft_run):
    root, actor, _ = sft_run
    out = str(root / "dpo")
    run_launcher(DPO, common_args(actor, out, str(root / "data"), "--per_device_train_batch_size", 8,
                                  "--per_device_eval_batch_size", 16, "--learning_rate", 5e-3, "--beta", 0.1,
                                  "--num_train_epochs", 1, "--lora_dim", 8, "--lora_module_name", "q_proj,k_proj,v_proj",
                                  "--only_optimize_lora", "--zero_stage", 2, "--max_train_steps", 40,
                                  "--max_tokens_per_batch", 1024))
    history = json.load(open(os.path.join(out, "eval_history.json")))
    first, last = history[0], history[-1]
    assert first["eval/margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before training
    # most demo pairs differ only in content, which the micro model barely learns in 40 steps (~0.58 here)
    assert last["eval/reward_accuracy"] > first["eval/reward_accuracy"] + 0.05, (first, last)
    assert last["eval/loss"] < first["eval/loss"]
    assert last["eval/margin"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("\n\nHuman: What sound does a cow make?\n\nAssistant:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).shape[1] > ids.shape[1]
