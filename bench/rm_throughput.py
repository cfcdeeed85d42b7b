#!/usr/bin/env python
"""Step 2 (the pairwise reward model) training throughput on the demo's pairs: ours (chosen and rejected packed
into one sequence without padding, step 2's loss) against TRL's RewardTrainer (pinned in bench/requirements.txt),
interleaved. The machinery is bench/sft_throughput.py's (--task rm); see its docstring for how steps are timed.

    .venv/bin/python bench/rm_throughput.py --preset tiny --rounds 3 --steps 6 [--batch_size 8]
        [--ours_args='--packing false'] [--output_json FILE]

The last line printed is `ours/RewardTrainer tokens/s ratio: X.XX` (real tokens of both answers per second).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sft_throughput  # noqa: E402

if __name__ == "__main__":
    sft_throughput.main(["--task", "rm", "--data", "demo", *sys.argv[1:]])
