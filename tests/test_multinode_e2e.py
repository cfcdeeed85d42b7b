"""Two "nodes" on one machine: two DeepSpeed launchers (`--num_nodes 2 --node_rank 0|1 --no_ssh`), one rank
each, each with its own data cache and output directory, as on machines without a shared filesystem. Each
node's first rank builds its own data cache, each node keeps the checkpoint files its ranks need, and a run
rewound to an earlier checkpoint on both nodes resumes to the same losses."""
import os
import shutil
import subprocess
import sys

import pytest

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
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def losses(log, rank):
    """{optimizer step: loss} printed by `rank` (--print_loss)."""
    marker = f"[step1 sft] rank {rank} "
    return {int(line.split(" step ")[1].split()[0]): float(line.rsplit("loss ", 1)[1])
            for line in log.splitlines() if line.startswith(marker)}


def sft_args(tmp_path, model):
    return lambda node: ["--data_path", RM_STATIC, "--sft_only_data_path", ALPACA, "--data_output_path",
                         tmp_path / f"data{node}", "--model_name_or_path", model, "--max_seq_len", 128, "--output_dir",
                         tmp_path / f"out{node}", "--max_eval_samples", 16, "--disable_progress_bar", "--deepspeed",
                         "--per_device_train_batch_size", 4, "--zero_stage", 2, "--max_train_steps", 4,
                         "--save_interval", 2, "--print_loss"]


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
    first = [losses(log, node) for node, log in enumerate(logs)]
    assert sorted(first[0]) == sorted(first[1]) == [1, 2, 3, 4]

    for node in (0, 1):  # rewind both nodes to step 2, as if killed after it
        root = tmp_path / f"out{node}" / "checkpoints"
        shutil.rmtree(root / "step_4")
        (root / "latest").write_text("step_2")
    logs = launch_two_nodes(tmp_path, STEP1, sft_args(tmp_path, micro_model_dir))
    assert f"resumed from {tmp_path / 'out0' / 'checkpoints' / 'step_2'}" in logs[0]
    for node, log in enumerate(logs):
        again = losses(log, node)
        assert sorted(again) == [3, 4]
        for step in again:
            assert again[step] == pytest.approx(first[node][step], rel=1e-5), (node, step)


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
