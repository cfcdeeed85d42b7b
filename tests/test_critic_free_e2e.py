"""Critic-free step 3 (--advantage_estimator) end to end on two CPU ranks: GRPO (group_norm) against a reward
function and RLOO against the step-2 reward model; no critic is built, trained, checkpointed or exported, and
the K answers to a prompt stay together on one rank."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import RM_STATIC, STEP3, run_launcher
from test_step3_e2e import SEED_LORA, metrics, ppo_args

pytestmark = pytest.mark.slow

K = 4
# a reward function that records what it was given (one file per rank) and prefers short answers
RECORDING_REWARD = '''
import json, os
def reward(prompts, answers, **columns):
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(os.path.dirname(__file__), f"calls_rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"prompts": prompts, "answers": answers}) + "\\n")
    return [1.0 / (1.0 + len(a.split())) for a in answers]
'''


def critic_free_args(model, out, data, *extra):
    return [*ppo_args(model, model, out, data), "--data_path", RM_STATIC, "--actor_zero_stage", 2,
            "--per_device_generation_batch_size", 2, "--per_device_training_batch_size", 4,
            "--n_samples_per_prompt", K, "--enable_test_mode", "--test_stop_step", 2, "--save_interval", 2, *extra]


def test_grpo_with_a_reward_function(micro_model_dir, tmp_path):
    (tmp_path / "my_reward.py").write_text(RECORDING_REWARD)
    out = tmp_path / "final"
    proc = run_launcher(STEP3, critic_free_args(
        micro_model_dir, out, tmp_path / "data", "--advantage_estimator", "group_norm", "--reward_model_type",
        "function", "--reward_function", f"{tmp_path / 'my_reward.py'}:reward", "--kl_coef", 0,
        "--kl_loss_coef", 0.04, "--actor_lora_dim", 8, "--actor_lora_module_name", "q_proj", "--only_optimize_lora"))
    assert "no critic: --advantage_estimator group_norm" in proc.stdout
    rows = metrics(str(out))
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert "loss/kl" in row and "loss/policy" in row and "loss/value" not in row
    assert not (out / "critic").exists() and (out / "actor" / "model.safetensors").exists()
    assert os.listdir(out / "checkpoints" / "step_2") and not (out / "checkpoints" / "step_2" / "critic").exists()
    for rank in (0, 1):  # each rollout: 2 prompts x K answers, each prompt's K answers side by side
        calls = [json.loads(line) for line in open(tmp_path / f"calls_rank{rank}.jsonl")]
        rollouts = [c for c in calls if len(c["prompts"]) == 2 * K]
        assert len(rollouts) == 2, [len(c["prompts"]) for c in calls]
        for call in rollouts:
            groups = [call["prompts"][i:i + K] for i in range(0, 2 * K, K)]
            assert all(len(set(g)) == 1 for g in groups) and groups[0][0] != groups[1][0]


def test_rloo_with_the_reward_model(reward_run, tmp_path):
    critic, actor, _ = reward_run
    out = tmp_path / "final"
    args = critic_free_args(actor, out, tmp_path / "data", "--advantage_estimator", "rloo", *SEED_LORA[:4])
    args[args.index("--critic_model_name_or_path") + 1] = critic  # the reward model (no critic is trained)
    proc = run_launcher(STEP3, [*args, "--only_optimize_lora", "--reward_model_name_or_path", critic])
    assert "no critic: --advantage_estimator rloo" in proc.stdout
    rows = metrics(str(out))
    assert sorted(rows) == [1, 2] and all("loss/value" not in r and "reward/score" in r for r in rows.values())
    assert not (out / "critic").exists()
    before = load_file(os.path.join(actor, "model.safetensors"))
    after = load_file(out / "actor" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the actor did not change"
