"""Nothing silently wrong: numeric flags outside their domain, non-finite losses, unusable reward statistics, an
empty eval split for step 2, fewer prompts than one PPO iteration and undecodable data all stop with one line
naming what was wrong, before anything is exported."""
import argparse
import json
import math
import re

import pytest
import torch

from conftest import ALPACA, RM_STATIC, STEP2, STEP3, common_args, run_launcher
from test_step3_e2e import ppo_args

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning import step3_args
from alpaca_rlhf.deepspeed_chat.training.utils.args import check_value_args
from alpaca_rlhf.deepspeed_chat.training.utils.data.raw_datasets import get_raw_dataset
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError, DataError, NonFiniteError
from alpaca_rlhf.deepspeed_chat.training.utils.loop import NonFiniteGuard, train_loop

BASE = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c", "--output_dir", "o"]


@pytest.mark.parametrize("flag,value,expected", [
    ("--top_p", "0", "in (0, 1]"), ("--max_answer_seq_len", "0", "at least 1"), ("--kl_horizon", "0", "above 0"),
    ("--top_k", "-1", "at least 0 (0: off)"), ("--max_prompt_seq_len", "0", "at least 1"), ("--temperature", "0", "above 0"),
    ("--gamma", "1.5", "in [0, 1]"), ("--max_nonfinite_steps", "0", "at least 1")])
def test_numeric_flags_outside_their_domain_are_one_line_errors(flag, value, expected):
    args = step3_args.parse_args(BASE + [flag, value])
    with pytest.raises(ConfigError) as error:
        check_value_args(args)
    assert str(error.value) == f"{flag} must be {expected}, got {type(getattr(args, flag[2:]))(value)}"
    check_value_args(step3_args.parse_args(BASE))  # the defaults pass


@pytest.mark.parametrize("stats", [{"chosen_mean": float("nan"), "chosen_std": 1.0},
                                   {"chosen_mean": 0.5, "chosen_std": 0.0}])
def test_unusable_reward_stats_are_refused(tmp_path, stats):
    path = tmp_path / "reward_stats.json"
    path.write_text(json.dumps(stats))  # json writes NaN as NaN, as step 2 did for an empty eval split
    args = step3_args.parse_args(BASE + ["--reward_stats", str(path)])
    with pytest.raises(ConfigError, match="cannot normalise rewards"):
        step3_args.reward_stats(args)


class FakeEngine:
    """What train_loop uses of a DeepSpeed engine, counting backward and step calls."""

    def __init__(self):
        self.device, self.global_steps, self.backwards = torch.device("cpu"), 0, 0

    def train(self):
        pass

    def eval(self):
        pass

    def backward(self, loss):
        self.backwards += 1

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.global_steps += 1

    def get_lr(self):
        return [0.1]


class Batches(list):
    sampler = None  # a DataLoader's attribute that train_loop reads


def _loop(losses, limit, out):
    """train_loop over one micro-batch per loss; returns the engine and the logged training rows."""
    engine = FakeEngine()
    args = argparse.Namespace(num_train_epochs=1, disable_progress_bar=True, print_loss=False, max_train_steps=0,
                              max_nonfinite_steps=limit, output_dir=str(out), enable_tensorboard=False,
                              tensorboard_path=None, save_interval=0, resume=False, no_auto_resume=True)
    batches = Batches({"x": torch.tensor([i])} for i in range(len(losses)))
    train_loop(engine, batches, lambda b: (torch.tensor(losses[int(b["x"])]), {}), lambda: {}, args, "t", "t")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return engine, [r for r in rows if "loss/train" in r]


def test_a_non_finite_loss_is_skipped_and_too_many_in_a_row_stop_the_run(tmp_path):
    nan, inf = float("nan"), float("inf")
    engine, rows = _loop([1.0, nan, 2.0, inf, nan, 3.0], limit=3, out=tmp_path / "a")
    assert engine.backwards == engine.global_steps == 3                 # only the finite micro-batches stepped
    assert [r["train/nonfinite_skipped"] for r in rows] == [0, 1, 3]
    with pytest.raises(NonFiniteError, match=r"\[t\] step 1: the loss was NaN or infinite on some rank for 3 "
                                             r"micro-batches in a row \(--max_nonfinite_steps 3\)"):
        _loop([1.0, nan, nan, nan, 2.0], limit=3, out=tmp_path / "b")
    guard = NonFiniteGuard(2, "t")
    assert guard.ok(torch.tensor([1.0, 2.0]), 0) and not guard.ok(torch.tensor([1.0, math.nan]), 0)


def test_undecodable_data_names_the_file_and_line(tmp_path):
    root = tmp_path / "local" / "jsonfile"
    root.mkdir(parents=True)
    (root / "eval.json").write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    good = json.dumps({"prompt": "Q", "completion": "A"}).encode()
    (root / "train.json").write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="train.json: line 3: not UTF-8 text"):
        get_raw_dataset(str(root), seed=0)
    (root / "train.json").write_bytes(b"[\n" + good + b",\n" + b'{"prompt": "\xff"}]\n')
    with pytest.raises(DataError, match="train.json: line 3: not UTF-8 text"):
        get_raw_dataset(str(root), seed=0)


@pytest.mark.slow
def test_step2_without_eval_pairs_and_step3_without_one_iteration_stop_before_training(micro_model_dir, tmp_path):
    data = tmp_path / "local" / "jsonfile"
    data.mkdir(parents=True)
    rows = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(16)]
    (data / "train.json").write_text("\n".join(map(json.dumps, rows)))
    (data / "eval.json").write_text(json.dumps({"prompt": "only a prompt"}))  # no pair: nothing to evaluate on
    out = tmp_path / "critic"
    proc = run_launcher(STEP2, common_args(micro_model_dir, str(out), str(tmp_path / "cache"), "--data_path",
                                           str(data), "--data_split", "0,1,0"), num_gpus=1, check=False)
    assert proc.returncode != 0 and "error: step 2 found no eval pairs" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() or not any(out.glob("*.safetensors"))
    proc = run_launcher(STEP3, ppo_args(micro_model_dir, micro_model_dir, str(tmp_path / "final"),
                                        str(tmp_path / "cache3"), "--data_path", RM_STATIC, "--max_train_samples", 4),
                        num_gpus=1, check=False)
    assert proc.returncode != 0 and "error: step 3 has 4 training prompts, fewer than one PPO iteration" in \
        proc.stderr, proc.stderr[-2000:]


def test_an_output_dir_over_an_input_model_is_refused(tmp_path):
    from alpaca_rlhf.deepspeed_chat.training.utils.args import check_output_dir
    actor = tmp_path / "run" / "actor"
    actor.mkdir(parents=True)
    args = step3_args.parse_args(["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", "c",
                                  "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match=r"would write its export over --actor_model_name_or_path"):
        check_output_dir(args)
    check_output_dir(argparse.Namespace(model_name_or_path=str(actor), output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="over --model_name_or_path"):
        check_output_dir(argparse.Namespace(model_name_or_path=str(actor), output_dir=str(actor) + "/"))


def _checkpoint_dir(root, step, complete=True):
    path = root / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    from alpaca_rlhf.deepspeed_chat.training.utils.checkpoint import latest_checkpoint
    assert latest_checkpoint(str(tmp_path)) is None
    _checkpoint_dir(tmp_path, 2)
    newest = _checkpoint_dir(tmp_path, 4)
    _checkpoint_dir(tmp_path, 6, complete=False)                      # killed while being written
    (tmp_path / "checkpoints" / "latest").write_text("step_8")       # names a directory that is gone
    assert latest_checkpoint(str(tmp_path)) == str(newest)
    assert "names no complete checkpoint" in capsys.readouterr().out
    (tmp_path / "checkpoints" / "latest").write_text("step_2")
    assert latest_checkpoint(str(tmp_path)).endswith("step_2")


def test_a_resume_with_changed_flags_is_refused_unless_allowed(tmp_path):
    from alpaca_rlhf.deepspeed_chat.training.utils.checkpoint import check_resume_config
    path = _checkpoint_dir(tmp_path, 2)
    saved = {"actor_learning_rate": 1e-5, "world_size": 2, "data_path": ["a"], "eval_interval": 0}
    (path / "config.json").write_text(json.dumps(saved))
    check_resume_config(str(path), dict(saved, eval_interval=5, resume=True), False)  # how it runs, not what
    changed = dict(saved, actor_learning_rate=2e-5, data_path=["b"])
    with pytest.raises(ConfigError) as error:
        check_resume_config(str(path), changed, False)
    assert "--actor_learning_rate 1e-05 -> 2e-05, --data_path ['a'] -> ['b']" in str(error.value)
    assert "--resume_with_changes" in str(error.value)
    check_resume_config(str(path), changed, True)
    # ZeRO's optimizer partitions and the ranks' data positions belong to one world size: never resumed
    for allowed in (False, True):
        with pytest.raises(ConfigError, match="was written by 2 ranks and this run has 4; resume it with 2 ranks"):
            check_resume_config(str(path), dict(saved, world_size=4), allowed)


NAN_ON_RANK_1 = """
import torch
from alpaca_rlhf.deepspeed_chat.training.step1_supervised_finetuning import main as step1
from alpaca_rlhf.deepspeed_chat.training.utils.entry import run_cli

real_nll, calls = step1.answer_nll, [0]

def nll(engine, batch, packing, logits_chunk):  # NaN on rank 1 in its 2nd and 3rd training micro-batches
    value, tokens = real_nll(engine, batch, packing, logits_chunk)
    if torch.is_grad_enabled():
        calls[0] += 1
        if torch.distributed.get_rank() == 1 and calls[0] in (2, 3):
            return value * float("nan"), tokens
    return value, tokens

step1.answer_nll = nll
run_cli(step1.main)
"""


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_on_every_rank(micro_model_dir, tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    out = tmp_path / "actor"
    proc = run_launcher(str(script), common_args(micro_model_dir, str(out), str(tmp_path / "data"),
                                                 "--sft_only_data_path", ALPACA, "--per_device_train_batch_size", 4,
                                                 "--max_train_steps", 5, "--max_eval_samples", 16, "--print_loss"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "loss/train" in r]
    assert [r["train/nonfinite_skipped"] for r in train] == [0, 2, 2, 2, 2]  # skipped on both ranks, counted
    assert all(math.isfinite(r["loss/train"]) for r in train)
    for rank in (0, 1):  # 7 micro-batches, 5 optimizer steps: both ranks stepped on the same 5
        steps = re.findall(rf"\[step1 sft\] rank {rank} epoch 0 step (\d+) loss", proc.stdout)
        assert steps == ["1", "2", "3", "4", "5"], (rank, steps)
    assert proc.stdout.count("non-finite loss; micro-batch skipped on every rank") == 2
    assert (out / "model.safetensors").exists()
