"""Two "nodes" on one machine: two DeepSpeed launchers (`--num_nodes 2 --node_rank 0|1 --no_ssh`), one rank
each, each with its own data cache and output directory, as on machines without a shared filesystem. Each
node's first rank builds its own data cache, each node keeps the checkpoint files its ranks need, and step 1
(ZeRO-2, gradient accumulation) rewound to an earlier checkpoint on both nodes resumes to the same losses,
evaluations and exported weights as the run that was not interrupted (train_loop's resume: steps 1, 2 and DPO;
step 3's is killed and resumed in test_step3_e2e)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA, REPO, RM_STATIC, STEP1, STEP3, free_port
from test_step3_e2e import ppo_args

pytestmark = pytest.mark.slow


def launch_two_nodes(tmp_path, script, node_args):
    """Run `script` on two one-rank "nodes"; node_args(node) gives each node's flags. Returns both logs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    procs = []
    for node in (0, 1):
        cmd = ["sh", "run.sh", "--hostfile", str(hostfile), "--num_nodes", "2", "--node_rank", str(node), "--no_ssh",
               "--master_addr", "127.0.0.1", "--master_port", port, script, *map(str, node_args(node))]
        # (each node's output to a file: two pipes read one after the other could fill up and stall a node)
        log = open(tmp_path / f"node{node}.log", "w+")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
    logs = []
    for proc, log in procs:
        proc.wait(timeout=400)
        log.seek(0)
        logs.append(log.read())
        log.close()
        assert proc.returncode == 0, logs[-1][-4000:]
    return logs


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


def sft_args(tmp_path, model):
    return lambda node: ["--data_path", RM_STATIC, "--sft_only_data_path", ALPACA, "--data_output_path",
                         tmp_path / f"data{node}", "--model_name_or_path", model, "--max_seq_len", 128, "--output_dir",
                         tmp_path / f"out{node}", "--max_eval_samples", 16, "--disable_progress_bar", "--deepspeed",
                         "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--zero_stage", 2,
                         "--max_train_steps", 4, "--save_interval", 2, "--save_total_limit", 0]


def test_step1_on_two_nodes_without_a_shared_filesystem(micro_model_dir, tmp_path):
    logs = launch_two_nodes(tmp_path, STEP1, sft_args(tmp_path, micro_model_dir))
    assert "is not shared by the nodes: each keeps its own checkpoints" in logs[0]
    for node in (0, 1):
        assert list((tmp_path / f"data{node}").glob("phase1_train_*.npz")), f"node {node} built no data cache"
        step = tmp_path / f"out{node}" / "checkpoints" / "step_4"
        assert (step / "trainer_state.json").exists() and (step / "model" / "state").is_dir(), node
        assert (step / "model" / "state" / "mp_rank_00_model_states.pt").exists(), node  # node-local storage
        assert (step / f"rng_rank{node}.json").exists()
    assert (tmp_path / "out0" / "model.safetensors").exists()  # the export: global rank 0's node
    finished = str(tmp_path / "finished")
    shutil.copytree(tmp_path / "out0", finished)

    for node in (0, 1):  # rewind both nodes to step 2, as if killed right after it
        root = tmp_path / f"out{node}" / "checkpoints"
        shutil.rmtree(root / "step_4")
        (root / "latest").write_text("step_2")
    logs = launch_two_nodes(tmp_path, STEP1, sft_args(tmp_path, micro_model_dir))
    assert f"resumed from {tmp_path / 'out0' / 'checkpoints' / 'step_2'}: step 2" in logs[0]
    # the same losses (averaged over both nodes' ranks), learning rates, evaluations and exported weights as
    # the run that was not interrupted
    assert_same_run(str(tmp_path / "out0"), finished, from_step=2)


def test_step3_on_two_nodes_without_a_shared_filesystem(micro_model_dir, tmp_path):
    """A few PPO iterations (the micro model as actor and critic), checkpointed on each node."""
    logs = launch_two_nodes(tmp_path, STEP3, lambda node: [
        *ppo_args(micro_model_dir, micro_model_dir, tmp_path / f"out{node}", tmp_path / f"data{node}"),
        "--data_path", RM_STATIC, "--actor_zero_stage", 2, "--critic_zero_stage", 2, "--enable_test_mode",
        "--test_stop_step", 2, "--save_interval", 1])
    assert "is not shared by the nodes" in logs[0] and "step 3 data:" in logs[0]
    for node in (0, 1):
        assert list((tmp_path / f"data{node}").glob("phase3_train_*.npz")), f"node {node} built no data cache"
        step = tmp_path / f"out{node}" / "checkpoints" / "step_2"
        assert (step / "trainer_state.json").exists() and (step / f"rng_rank{node}.json").exists(), node
        for engine in ("actor", "critic"):
            assert (step / engine / "state" / "mp_rank_00_model_states.pt").exists(), (node, engine)
    assert (tmp_path / "out0" / "actor" / "model.safetensors").exists()
