"""Resumable steps 1, 2 and DPO (utils/checkpoint.py through train_loop), through run.sh on two CPU ranks: a
run resumed from a checkpoint logs the same losses and evaluations and exports the same weights as a run that
was never interrupted."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA, STEP1, common_args, run_launcher

pytestmark = pytest.mark.slow


def train_rows(out):
    """{step: metrics} of the training rows; a resumed run may log a step twice: the last one counts."""
    rows = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        row = json.loads(line)
        if "loss/train" in row:
            rows[row["step"]] = row
    return rows


def assert_same_run(got_dir, expected_dir, from_step, keys=("loss/train", "train/lr")):
    got, expected = train_rows(got_dir), train_rows(expected_dir)
    assert sorted(got) == sorted(expected)
    for step in sorted(expected):
        if step > from_step:
            for key in keys:
                assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
    history = [json.load(open(os.path.join(d, "eval_history.json"))) for d in (got_dir, expected_dir)]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]]
    for a, b in zip(*history):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    weights = [load_file(os.path.join(d, "model.safetensors")) for d in (got_dir, expected_dir)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[1]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6, msg=name)


def rewind(out, step):
    """Make OUTPUT_DIR resume from checkpoint `step` as if the run had been killed right after it; returns a
    copy of the finished run to compare with."""
    finished = out + "-finished"
    shutil.copytree(out, finished)
    root = os.path.join(out, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("step_") and int(name.split("_")[1]) > step:
            shutil.rmtree(os.path.join(root, name))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step_{step}")
    return finished


def test_step1_resumed_equals_an_uninterrupted_run(micro_model_dir, tmp_path):
    """ZeRO-2, gradient accumulation, the evaluation history; the run rewound to its step-4 checkpoint
    as if killed right after it (the kill itself: test_step3_e2e's SIGKILL test, same checkpoint module).
    Step 2 and DPO run the same train_loop with other losses."""
    out = str(tmp_path / "run")
    args = common_args(micro_model_dir, out, str(tmp_path / "data"), "--sft_only_data_path", ALPACA,
                       "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--zero_stage", 2,
                       "--learning_rate", 1e-2, "--max_train_steps", 6, "--save_interval", 2,
                       "--save_total_limit", 0, "--max_eval_samples", 32)
    run_launcher(STEP1, args)
    finished = rewind(out, 4)
    resumed = run_launcher(STEP1, args)
    assert f"resumed from {os.path.join(out, 'checkpoints', 'step_4')}: step 4" in resumed.stdout
    assert_same_run(out, finished, 4)
