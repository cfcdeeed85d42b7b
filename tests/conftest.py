"""Shared fixtures: a micro LLaMA model + tokenizer built offline once per test session, and the
committed demo data. Nothing is downloaded."""
import glob
import os
import socket
import subprocess
import sys

import pytest

import alpaca_rlhf  # noqa: F401  before any test loads torch, as the entry points do (alpaca_rlhf/cpu_blas.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(REPO, "data", "demo")
STEP1 = "alpaca_rlhf/deepspeed_chat/training/step1_supervised_finetuning/main.py"
STEP2 = "alpaca_rlhf/deepspeed_chat/training/step2_reward_model_finetuning/main.py"
DPO = "alpaca_rlhf/deepspeed_chat/training/step2_dpo_finetuning/main.py"
STEP3 = "alpaca_rlhf/deepspeed_chat/training/step3_rlhf_finetuning/main.py"
RM_STATIC = os.path.join(DEMO_DATA, "Dahoas", "rm-static")
ALPACA = os.path.join(DEMO_DATA, "MultiTurnAlpaca")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    from alpaca_rlhf.tools.make_tiny_model import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "micro"), preset="micro")


@pytest.fixture(scope="session")
def tokenizer(micro_model_dir):
    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import load_tokenizer
    return load_tokenizer(micro_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(script: str, args, num_gpus: int = 2, timeout: int = 600, check: bool = True):
    """`sh run.sh --num_gpus N --master_port P script args...` from the repo root; returns the process."""
    port = free_port()
    cmd = ["sh", "run.sh", "--num_gpus", str(num_gpus), "--master_port", str(port), script, *map(str, args)]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    # DeepSpeed's CPU all-reduce buffers (66 MB a rank) must not outlive the run (init_distributed unlinks them)
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not leaked, f"shared-memory buffers left behind by {' '.join(cmd)}: {leaked}"
    return proc


def kill_after_first_checkpoint(script: str, args, out: str, num_gpus: int = 2, timeout: int = 300) -> int:
    """Start `script` like run_launcher, SIGKILL the whole launcher tree as soon as OUTPUT_DIR/checkpoints/latest
    appears (mid-run, no cleanup), and return the step that checkpoint holds."""
    import signal
    import time
    port = free_port()
    cmd = ["sh", "run.sh", "--num_gpus", str(num_gpus), "--master_port", str(port), script, *map(str, args)]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + timeout
    while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(latest), "the run ended (or timed out) before its first checkpoint"
    # the shared-memory buffers' names are unlinked at start-up, so even a killed run leaves none behind
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return int(open(latest).read().strip().split("_")[1])


def common_args(model, out, data_cache, *extra):
    """Flags every end-to-end run shares: the demo data, short sequences, small evaluations, no progress bar."""
    return ["--data_path", RM_STATIC, "--data_output_path", data_cache, "--model_name_or_path", model,
            "--max_seq_len", 128, "--output_dir", out, "--max_eval_samples", 96, "--disable_progress_bar",
            "--deepspeed", *extra]


@pytest.fixture(scope="session")
def sft_run(micro_model_dir, tmp_path_factory):
    """Step 1 with full fine-tuning under ZeRO-3 on two ranks: the SFT model later steps start from."""
    root = tmp_path_factory.mktemp("pipeline")
    out = str(root / "actor")
    proc = run_launcher(STEP1, common_args(micro_model_dir, out, str(root / "data"),
                                           "--sft_only_data_path", ALPACA, "--per_device_train_batch_size", 8,
                                           "--per_device_eval_batch_size", 16, "--num_train_epochs", 1,
                                           "--zero_stage", 3, "--learning_rate", 1e-2, "--max_train_steps", 120,
                                           "--print_loss"))
    return root, out, proc


@pytest.fixture(scope="session")
def reward_run(sft_run):
    """Step 2 with the seed command's flags: LoRA on q_proj,k_proj, only LoRA and the head trained, ZeRO-2."""
    root, actor, _ = sft_run
    out = str(root / "critic")
    proc = run_launcher(STEP2, common_args(actor, out, str(root / "data"), "--num_padding_at_beginning", 0,
                                           "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 32,
                                           "--learning_rate", 5e-3, "--num_train_epochs", 2, "--lora_dim", 8,
                                           "--lora_module_name", "q_proj,k_proj", "--only_optimize_lora",
                                           "--zero_stage", 2, "--max_eval_samples", 120, "--max_train_samples", 1200))
    return out, actor, proc
