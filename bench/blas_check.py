#!/usr/bin/env python
"""fp32 matrix-product speed on this CPU with torch's MKL as it comes and with its kernel choice corrected
(alpaca_rlhf/cpu_blas.py), interleaved in one invocation.

    .venv/bin/python bench/blas_check.py [--rounds 3] [--threads 2]

Each round starts one worker process per variant (the correction must be in place before torch loads, so
it cannot be switched within a process) and times the same products: a 2048^2 matmul, and the linear maps of
the `small` benchmark model as PPO runs them (16 x 127 tokens, width 512 -> 1536 and 1376 -> 512, forward and
the two backward products) and as a decode step runs them (16 rows). Prints GFLOP/s per product and variant,
MKL's code branch in each worker, and the corrected/stock ratio of the medians. On Intel processors both
variants are the same process setup and the ratio is ~1.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import ppo_throughput as pt  # noqa: E402  (stdlib-only at import time)

# (label, M, K, N): an (M x K) @ (K x N) product
PRODUCTS = [("matmul 2048^2", 2048, 2048, 2048),
            ("linear fwd 2032x512->1536", 2032, 512, 1536),
            ("linear dX 2032x1536->512", 2032, 1536, 512),
            ("linear dW 512x2032->1536", 512, 2032, 1536),
            ("down fwd 2032x1376->512", 2032, 1376, 512),
            ("decode 16x512->1536", 16, 512, 1536)]


def worker(stock: bool, threads: int, repeats: int) -> dict:
    pt.blas_setup(stock=stock)  # before torch loads
    import torch
    torch.set_num_threads(threads)
    out = {"status": pt.blas_status(), "gflops": {}}
    for label, m, k, n in PRODUCTS:
        reps = repeats * max(1, int(2e9 // (2 * m * k * n)))  # about the same time per product
        out["gflops"][label] = pt.product_gflops(m, k, n, reps)[1]  # the median
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="Worker pairs, alternating which goes first. Default 3.")
    p.add_argument("--threads", type=int, default=2, help="Threads per worker. Default 2.")
    p.add_argument("--repeats", type=int, default=5, help="Timed repeats per product (scaled up for small ones). Default 5.")
    p.add_argument("--_worker", choices=["stock", "corrected"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(args._worker == "stock", args.threads, args.repeats)))
        return 0
    results = {"stock": [], "corrected": []}
    for r in range(args.rounds):
        for variant in (("stock", "corrected") if r % 2 == 0 else ("corrected", "stock")):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", variant,
                                   "--threads", str(args.threads), "--repeats", str(args.repeats)],
                                  stdout=subprocess.PIPE, text=True, check=True)
            results[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for variant, runs in results.items():
        print(f"{variant:>9}: {runs[-1]['status']}")
    print(f"\n  {'product':<28} {'stock GFLOP/s':>14} {'corrected':>10} {'ratio':>6}")
    ratios = []
    for label, *_ in PRODUCTS:
        med = {v: statistics.median(run["gflops"][label] for run in runs) for v, runs in results.items()}
        ratios.append(med["corrected"] / med["stock"])
        print(f"  {label:<28} {med['stock']:>14.1f} {med['corrected']:>10.1f} {ratios[-1]:>6.2f}")
    print(f"corrected/stock matmul speed ratio (median over products): {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
