"""Step 1 end to end through run.sh on two CPU ranks: full fine-tuning under ZeRO-3, then the seed command's
LoRA setting (q_proj,k_proj, --only_optimize_lora, ZeRO-2, with --compile_elementwise and token-budget
micro-batches) on top of it."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ALPACA, REPO, STEP1, common_args, run_launcher

pytestmark = pytest.mark.slow


def step1_args(model, out, data_cache, *extra):
    return common_args(model, out, data_cache, "--sft_only_data_path", ALPACA, "--per_device_train_batch_size", 8,
                       "--per_device_eval_batch_size", 16, "--num_train_epochs", 1, *extra)


def perplexities(out):
    history = json.load(open(os.path.join(out, "eval_history.json")))
    return history[0]["eval/perplexity"], history[-1]["eval/perplexity"]


def assert_loads_and_generates(out):
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("\n\nHuman: What is 3 plus 4?\n\nAssistant:", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "the fine-tuned model produced an empty answer"
    return answer


def test_full_finetuning_zero3_two_ranks(sft_run, micro_model_dir):
    _, out, proc = sft_run
    before, after = perplexities(out)
    assert after < before / 20, (before, after)  # from ~vocab-size perplexity to a model of the task
    assert "[step1 sft] rank 0 " in proc.stdout and "[step1 sft] rank 1 " in proc.stdout  # both ranks trained
    config = json.load(open(os.path.join(out, "training_args.json")))
    assert config["world_size"] == 2 and config["zero_stage"] == 3
    assert_loads_and_generates(out)
    base = load_file(os.path.join(micro_model_dir, "model.safetensors"))
    tuned = load_file(os.path.join(out, "model.safetensors"))
    assert base.keys() == tuned.keys()
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], tuned["model.layers.0.mlp.up_proj.weight"])


def test_lora_zero2_seed_command(sft_run):
    root, base_dir, _ = sft_run
    out = str(root / "actor_lora")
    proc = run_launcher(STEP1, step1_args(base_dir, out, str(root / "data"), "--zero_stage", 2, "--lora_dim", 8,
                                          "--lora_module_name", "q_proj,k_proj", "--only_optimize_lora",
                                          "--learning_rate", 1e-2, "--gradient_accumulation_steps", 2,
                                          "--max_train_steps", 40, "--compile_elementwise",
                                          "--max_tokens_per_batch", 384))
    before, after = perplexities(out)
    assert after < before, (before, after)
    # the fused elementwise kernels ran (the frozen down projection takes the backward without its weight)
    assert "fused with torch.compile" in proc.stdout and "runs eagerly" not in proc.stderr
    # token-budget micro-batches: both ranks ran the same number (a rank with fewer would have hung the other)
    assert "global batch about 1536 tokens" in proc.stdout
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    tuned = load_file(os.path.join(out, "model.safetensors"))
    assert base.keys() == tuned.keys(), "LoRA must be merged into the exported weights"
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(("q_proj" in k or "k_proj" in k) for k in changed), changed
    assert_loads_and_generates(out)


def test_bad_data_path_is_one_line_error_without_traceback(micro_model_dir, tmp_path):
    cmd = [sys.executable, STEP1, "--data_path", str(tmp_path / "nowhere" / "Dahoas" / "rm-static"),
           "--model_name_or_path", micro_model_dir, "--output_dir", str(tmp_path / "out"),
           "--data_output_path", str(tmp_path / "data")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nowhere/Dahoas/rm-static" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
