"""Rollout decoding speed: the lean decode step (utils/model/llama_decoder.py) against the transformers
forward with its cache, interleaved in one process, on the reference setting's shapes (16 prompts of 64 tokens,
64 sampled tokens, fp32, random weights). Both paths must draw the same tokens from the same seed.

    .venv/bin/python bench/decode_speed.py --preset small --rounds 5 [--arch llama|mistral|qwen2]

The last line reads `lean/transformers decode speed ratio: X.XX`."""
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
import transformers  # noqa: E402

from alpaca_rlhf.deepspeed_chat.training.utils.model.generation import sample  # noqa: E402
from alpaca_rlhf.tools.make_tiny_model import PRESETS  # noqa: E402  (the issue's reference shapes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "small"], default="small", help="Model shape. Default small.")
    p.add_argument("--rounds", type=int, default=5, help="Interleaved measured rounds. Default 5.")
    p.add_argument("--threads", type=int, default=2, help="torch threads. Default 2 (the reference setting).")
    p.add_argument("--arch", choices=["llama", "mistral", "qwen2"], default="llama",
                   help="LLaMA-like family (Qwen2 with its q/k/v biases). Default llama.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[args.arch]
    extra = {"sliding_window": None} if args.arch == "mistral" else {}
    config = getattr(transformers, name + "Config")(**PRESETS[args.preset], **extra)
    model = getattr(transformers, name + "ForCausalLM")(config).eval()
    prompts = torch.randint(5, model.config.vocab_size, (16, 64))
    mask = torch.ones_like(prompts)

    def run(lean: bool, new_tokens: int = 64):
        torch.manual_seed(1)
        t0 = time.perf_counter()
        seq, _ = sample(model, prompts, mask, new_tokens, eos_token_id=-1, pad_token_id=0, lean_decode=lean,
                        suppress_eos_first=False)
        return time.perf_counter() - t0, seq

    run(True, 8), run(False, 8)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for lean in (True, False):
            seconds, seq = run(lean)
            times[lean].append(seconds)
            if lean:
                lean_seq = seq
            elif not torch.equal(seq, lean_seq):
                raise SystemExit("the two paths drew different tokens from the same seed")
    for lean, name in ((False, "transformers forward"), (True, "lean decoder")):
        med = statistics.median(times[lean])
        rounds = [round(t, 3) for t in times[lean]]
        print(f"{name:22s} median {med:.3f} s ({16 * 64 / med:.0f} tokens/s), rounds {rounds}")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"lean/transformers decode speed ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
