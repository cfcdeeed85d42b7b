#!/usr/bin/env python
"""Our PPO iteration with two sets of step-3 flags, interleaved in one invocation: how much one change buys.

    .venv/bin/python bench/ab_flags.py --preset small [--lora] --a="--recompute_actor_forward" [--b="..."] [--iterations 6]
    git worktree add /tmp/before COMMIT && .venv/bin/python bench/ab_flags.py --preset small --a_checkout /tmp/before

Two bench/ppo_throughput.py workers (reference setting, plus --trainer_args A or B) run in lock-step like
compare_trl.py's: one iteration at a time, alternating which goes first, so both see the same machine drift.
The last line is the median over the measured pairs of A seconds / B seconds: `B/A speed ratio: X.XX`
(above 1: B is faster). With --a_checkout, A runs another checkout's trainer (an earlier commit's, say):
the gain of a whole series of changes, measured the same way.
"""
import argparse
import os
import statistics
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import compare_trl  # noqa: E402  (the lock-step driver)
import ppo_throughput as pt  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--lora", action="store_true", help="LoRA rank 8 on q_proj,k_proj for actor and critic.")
    p.add_argument("--a", default="", help="Step-3 flags of run A (quoted). Default none.")
    p.add_argument("--b", default="", help="Step-3 flags of run B (quoted). Default none.")
    p.add_argument("--iterations", type=int, default=6, help="Measured iterations per run. Default 6.")
    p.add_argument("--warmup", type=int, default=2, help="Uncounted iterations first. Default 2.")
    p.add_argument("--threads", type=int, default=pt.THREADS)
    p.add_argument("--a_checkout", default=None, metavar="DIR",
                   help="Run A with the bench/ppo_throughput.py (and so the trainer) of this repository checkout.")
    p.add_argument("--a_stock_blas", action="store_true",
                   help="Run A on torch's MKL as it comes (ppo_throughput.py --stock_blas): what the correction of "
                        "MKL's kernel choice on AMD processors buys (alpaca_rlhf/cpu_blas.py).")
    args = p.parse_args(argv)
    actor_dir, critic_dir = pt.prepare_models(args.preset)
    work = tempfile.mkdtemp(prefix="ab-flags-")
    common = ["--preset", args.preset, "--model", actor_dir, "--critic_model", critic_dir,
              "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads),
              "--quiet", "--no_matmul", *(["--lora"] if args.lora else [])]
    scripts = {"A": os.path.join(os.path.abspath(args.a_checkout or os.path.dirname(BENCH_DIR)), "bench",
                                 "ppo_throughput.py"), "B": os.path.join(BENCH_DIR, "ppo_throughput.py")}
    if not os.path.exists(scripts["A"]):
        p.error(f"--a_checkout: {scripts['A']} does not exist")
    print(f"A: {args.a or '(reference setting)'}{' from ' + args.a_checkout if args.a_checkout else ''}"
          f"{' on stock MKL' if args.a_stock_blas else ''}\n"
          f"B: {args.b or '(reference setting)'}\nlogs in {work}", flush=True)
    cmds = {}
    for name, flags in (("A", args.a), ("B", args.b)):
        cmd = [sys.executable, scripts[name], *common, "--output_json", os.path.join(work, f"{name}.json")]
        if flags:  # (an older checkout's script may not know the flag)
            cmd.append(f"--trainer_args={flags}")
        if name == "A" and args.a_stock_blas:
            cmd.append("--stock_blas")
        cmds[name] = (cmd, os.path.join(work, f"{name}.log"))

    def describe(i, times, warm):
        tag = " (warm-up)" if warm else f"  B/A {times['A'][-1] / times['B'][-1]:.3f}"
        return f"  iteration {i}: A {times['A'][-1]:.3f} s, B {times['B'][-1]:.3f} s{tag}"
    times = compare_trl.lockstep(cmds, args.warmup + args.iterations, args.warmup, describe)
    pairs = list(zip(times["A"], times["B"]))[args.warmup:]
    ratios = [a / b for a, b in pairs]
    med = {k: statistics.median(v[args.warmup:]) for k, v in times.items()}
    print(f"median s/iteration: A {med['A']:.3f}, B {med['B']:.3f}; pair ratios "
          f"{', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"B/A speed ratio: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
