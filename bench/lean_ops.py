#!/usr/bin/env python
"""Two of the lean pieces against the forms they replace, interleaved in one process, on the `small` reference
model's shapes (16 x 127 tokens, width 512, 8 heads of 64, LoRA rank 8), fp32, 2 threads:

- the rotary embedding of q and k (utils/model/lean_modules.py) against LLaMA's q * cos + rotate_half(q) * sin,
  forward + backward, and a whole small-model forward + backward with each;
- a LoRA layer's folded forward (utils/module/lora.py) against the two-branch x W^T + s (x A^T) B^T, forward
  without grad and forward + backward, base frozen.

    .venv/bin/python bench/lean_ops.py [--rounds 7]

Prints the median milliseconds of each form and their ratio (above 1: the lean one is faster).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from alpaca_rlhf.deepspeed_chat.training.utils.host_memory import keep_freed_host_memory  # noqa: E402
from alpaca_rlhf.deepspeed_chat.training.utils.model import lean_modules  # noqa: E402
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import LoRALinear  # noqa: E402
from alpaca_rlhf.tools.make_tiny_model import PRESETS  # noqa: E402

B, T, H, D = 16, 127, 8, 64


def llama_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """LLaMA's formula, written out (transformers' function is replaced once use_lean_modules has run)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = modeling_llama.rotate_half
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def timed(fn, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def compare(name: str, old, new, rounds: int, repeats: int):
    old(), new()  # warm-up
    times = {"old": [], "new": []}
    for _ in range(rounds):
        times["old"].append(timed(old, repeats))
        times["new"].append(timed(new, repeats))
    o, n = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"{name:58s} {o:9.3f} ms -> {n:9.3f} ms   {o / n:.2f}x", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="Interleaved rounds per comparison. Default 7.")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_host_memory()  # as the trainer runs
    torch.manual_seed(0)

    # rotary: q and k laid out as LLaMA attention makes them (a transposed view), positions 0 .. T-1
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_(True)
    config = LlamaConfig(**PRESETS["small"])
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(q, torch.arange(T).expand(B, T))

    def rotary_step(fn):
        def run():
            a, b = fn(q, k, cos, sin)
            torch.autograd.backward((a, b), (torch.ones_like(a), torch.ones_like(b)))
        return run
    compare("rotary q, k of one layer, forward + backward", rotary_step(llama_rotary),
            rotary_step(lean_modules.apply_rotary_pos_emb), args.rounds, 20)

    model = LlamaForCausalLM(config)
    lean_modules.use_lean_modules(model)
    ids = torch.randint(5, config.vocab_size, (B, T))

    def model_step(rotary):
        def run():
            modeling_llama.apply_rotary_pos_emb = rotary  # looked up at call time by LlamaAttention
            model(input_ids=ids, logits_to_keep=torch.arange(T // 2, T)).logits.sum().backward()
        return run
    compare("small model forward + backward, LLaMA's vs lean rotary", model_step(llama_rotary),
            model_step(lean_modules.apply_rotary_pos_emb), args.rounds, 2)
    modeling_llama.apply_rotary_pos_emb = lean_modules.apply_rotary_pos_emb

    # LoRA rank 8 on a frozen 512 x 512 projection
    lora = LoRALinear(torch.nn.Linear(512, 512, bias=False), lora_dim=8)
    torch.nn.init.normal_(lora.lora_B, std=0.02)
    x = torch.randn(B, T, 512, requires_grad=True)

    def two_branch():
        return F.linear(x, lora.weight) + F.linear(F.linear(x, lora.lora_A), lora.lora_B) * lora.scaling

    with torch.no_grad():
        compare("LoRA layer forward, no grad (two-branch vs folded)", two_branch, lambda: lora(x), args.rounds, 20)
    compare("LoRA layer forward + backward (two-branch vs folded)", lambda: two_branch().sum().backward(),
            lambda: lora(x).sum().backward(), args.rounds, 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
