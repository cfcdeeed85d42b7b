#!/usr/bin/env python
"""A LoRA layer's folded forward (utils/module/lora.py) against the two-branch x W^T + s (x A^T) B^T it
replaces, interleaved in one process, on the `small` reference model's shapes (16 x 127 tokens, a frozen
512 x 512 projection, rank 8), fp32, 2 threads: forward without grad, and forward + backward.

    .venv/bin/python bench/lora_layer.py [--rounds 7]

Prints the median milliseconds of each form and their ratio (above 1: the lean one is faster).
"""
import argparse
import os
import statistics
import sys
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)

import alpaca_rlhf  # noqa: F401,E402  (before torch: MKL's kernel choice, alpaca_rlhf/cpu_blas.py)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from alpaca_rlhf.deepspeed_chat.training.utils.host_memory import keep_freed_host_memory  # noqa: E402
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import LoRALinear  # noqa: E402

B, T = 16, 127


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
