"""Evaluate models by what they generate: ground-truth demo score, reward-model score, KL to a reference.

    python -m alpaca_rlhf.tools.evaluate_demo --model DIR [--model DIR2 ...] [--reward_model RM_DIR]
        [--reference_model SFT_DIR] [--data data/demo/Dahoas/rm-static] [--num_prompts 200]
        [--max_new_tokens 48] [--do_sample] [--temperature 1.0] [--top_k 0] [--top_p 1.0]
        [--batch_size 32] [--seed 1234] [--output_json FILE] [--samples 8]

For each model the first N distinct prompts of the test split are answered (greedy unless --do_sample), and
the answers are scored by the demo world's grader (alpaca_rlhf.tools.demo_task), optionally by a reward model
and against a reference policy. The core is importable (step notes, the demo report and the PPO trainer use it):

    load_prompts(data, n, seed) -> [prompt]
    generate_answers(model, tokenizer, prompts, ...) -> [Generation]
    reward_scores(reward_model, tokenizer, generations) -> [float]
    kl_to_reference(model, reference_model, generations) -> [float]
    summarize(generations, rm_scores=None, rm_stats=None, kl=None) -> dict
    evaluate_model(model, tokenizer, prompts, ...) -> dict   (all of the above)
"""
import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import AlpacaFormat, ChatFormat, format_for_model
from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import format_answer
from alpaca_rlhf.deepspeed_chat.training.utils.data.token_ids import text_ids
from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError
from alpaca_rlhf.deepspeed_chat.training.utils.losses import gather_log_probs
from alpaca_rlhf.tools import demo_task

DEFAULT_DATA = os.path.join("data", "demo", "Dahoas", "rm-static")


@dataclass
class Generation:
    prompt: str
    answer: str  # decoded answer tokens (special tokens skipped)
    prompt_ids: List[int]  # [bos] + prompt tokens, as the model saw them
    answer_ids: List[int]  # generated tokens, EOS excluded
    ended_with_eos: bool


# ------------------------------------------------------------------------------------------------ helpers
def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: Sequence[List[int]], pad_id: int, left: bool):
    """(ids, mask), both (B, T), rows padded on the left or the right."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _batches(items: Sequence, size: int, desc: str, progress: bool):
    starts = range(0, len(items), max(1, size))
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield items[start:start + size]


@contextlib.contextmanager
def _eval_mode(*models):
    """eval() for the block, each model's own training flag restored afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


# ------------------------------------------------------------------------------------------------ data
def load_prompts(data: str, num_prompts: int, seed: int = 1234) -> List[str]:
    """The first `num_prompts` distinct prompts of the dataset's test (eval) split, in file order."""
    from alpaca_rlhf.deepspeed_chat.training.utils.data.raw_datasets import get_raw_dataset
    if not os.path.isdir(data):
        raise UserError(f"data directory {data} does not exist")
    prompts = list(dict.fromkeys(e.prompt for e in get_raw_dataset(data, seed).eval_examples()))
    if not prompts:
        raise UserError(f"{data}: no prompts in the test split")
    return prompts[:num_prompts]


# ------------------------------------------------------------------------------------------------ generation
def prompt_ids_for(tokenizer, prompt: str, fmt: Optional[ChatFormat] = None) -> List[int]:
    """[bos] + the canonical prompt text, or the prompt's conversation rendered by `fmt` (--chat_template)."""
    return (fmt or AlpacaFormat(tokenizer)).prompt_ids_for(prompt)


def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 32,
                     progress: bool = True, desc: str = "generate",
                     fmt: Optional[ChatFormat] = None) -> List[Generation]:
    """Answer each prompt ([bos] + prompt, left-padded in batches) with model.generate; stop at EOS (or at the
    chat format's end of turn)."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if do_sample \
        else dict(do_sample=False)
    eos = tokenizer.eos_token_id if fmt is None else fmt.stop_token_id
    pad = tokenizer.pad_token_id
    device = _device_of(model)
    out: List[Generation] = []
    with _eval_mode(model), torch.inference_mode():
        for chunk in _batches(list(prompts), batch_size, desc, progress):
            rows = [prompt_ids_for(tokenizer, p, fmt) for p in chunk]
            ids, mask = _pad(rows, pad, left=True)                                    # (B, P)
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
            new = seqs[:, ids.size(1):].tolist()                                      # (B, N) generated tokens
            for prompt, prompt_ids, tokens in zip(chunk, rows, new):
                ended = eos in tokens
                answer_ids = tokens[:tokens.index(eos)] if ended else tokens      # after EOS: padding
                text = tokenizer.decode(answer_ids, skip_special_tokens=True)
                out.append(Generation(prompt, text, prompt_ids, answer_ids, ended))
    return out


# ------------------------------------------------------------------------------------------------ scoring
def reward_input_ids(tokenizer, g: Generation, fmt: Optional[ChatFormat] = None) -> List[int]:
    """[bos] + prompt + answer (+ eos if the answer ended with EOS), prompt and answer tokenized apart, the
    answer in its canonical form (" text") as the reward model was trained on it; with a chat format, the
    prompt rendered by it and the answer ended by its end of turn."""
    fmt = fmt or AlpacaFormat(tokenizer)
    # the answer as training tokenized it: canonical (" text") after a canonical prompt, else as it stands
    answer = (format_answer(g.answer) if g.answer.strip() else "") if fmt.keeps_text else g.answer.strip()
    return prompt_ids_for(tokenizer, g.prompt, fmt) + text_ids(tokenizer, answer) + \
        ([fmt.stop_token_id] if g.ended_with_eos else [])


def reward_scores(reward_model, tokenizer, generations: Sequence[Generation], batch_size: int = 32,
                  progress: bool = False, fmt: Optional[ChatFormat] = None) -> List[float]:
    """The reward model's end score (value at the last real token) of each prompt + answer."""
    rows = [reward_input_ids(tokenizer, g, fmt) for g in generations]
    return end_scores_of_ids(reward_model, tokenizer.pad_token_id, rows, batch_size, progress)


def end_scores_of_ids(reward_model, pad_id: int, rows: Sequence[List[int]], batch_size: int = 32,
                      progress: bool = False) -> List[float]:
    """The reward model's end score of each row of token ids (right-padded in batches)."""
    device = _device_of(reward_model)
    scores: List[float] = []
    with _eval_mode(reward_model), torch.inference_mode():
        for chunk in _batches(list(rows), batch_size, "reward", progress):
            ids, mask = _pad(chunk, pad_id, left=False)
            out = reward_model.forward_value(ids.to(device), mask.to(device))
            scores.extend(out["chosen_end_scores"].float().cpu().tolist())          # (B,)
    return scores


def load_reward_stats(reward_model_dir: str) -> Optional[dict]:
    """{"mean", "std"} of the chosen scores from step 2's reward_stats.json, if present and usable."""
    path = os.path.join(reward_model_dir, "reward_stats.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        stats = json.load(f)
    mean, std = stats.get("chosen_mean"), stats.get("chosen_std")
    return {"mean": float(mean), "std": float(std)} if mean is not None and std else None


def _answer_log_probs(model, ids, mask, answer_mask) -> torch.Tensor:
    """Sum of log pi(token) over answer tokens. ids/mask/answer_mask (B, T) -> (B,)."""
    logits = model(input_ids=ids, attention_mask=mask).logits                      # (B, T, V)
    logp = gather_log_probs(logits[:, :-1], ids[:, 1:])                            # (B, T-1): token t+1
    return (logp * answer_mask[:, 1:].to(logp.dtype)).sum(-1)


def kl_to_reference(model, reference_model, generations: Sequence[Generation], eos_token_id: int,
                    pad_token_id: int = 0, batch_size: int = 32, progress: bool = False) -> List[float]:
    """Per answer: sum over its tokens (EOS included when generated) of log pi_model - log pi_ref, a
    sequence-level KL estimate on the model's own samples. Both models must share the tokenizer."""
    device = _device_of(model)
    kl: List[float] = []
    with _eval_mode(model, reference_model), torch.inference_mode():
        for chunk in _batches(list(generations), batch_size, "kl", progress):
            answers = [g.answer_ids + ([eos_token_id] if g.ended_with_eos else []) for g in chunk]
            ids, mask = _pad([g.prompt_ids + a for g, a in zip(chunk, answers)], pad_token_id, left=False)
            answer_mask = torch.zeros_like(mask)                                   # (B, T) 1 on answer tokens
            for i, (g, a) in enumerate(zip(chunk, answers)):
                answer_mask[i, len(g.prompt_ids):len(g.prompt_ids) + len(a)] = 1
            ids, mask, answer_mask = ids.to(device), mask.to(device), answer_mask.to(device)
            policy = _answer_log_probs(model, ids, mask, answer_mask)
            reference = _answer_log_probs(reference_model, ids, mask, answer_mask.to(_device_of(reference_model)))
            kl.extend((policy - reference.to(device)).cpu().tolist())
    return kl


def grade_all(generations: Sequence[Generation]) -> List[Optional[demo_task.Grade]]:
    """Ground-truth grade of each answer; None where the prompt is not a demo-world prompt."""
    grades = []
    for g in generations:
        try:
            grades.append(demo_task.grade(g.prompt, g.answer))
        except ValueError:
            grades.append(None)
    return grades


def summarize(generations: Sequence[Generation], rm_scores: Optional[Sequence[float]] = None,
              rm_stats: Optional[dict] = None, kl: Optional[Sequence[float]] = None, num_samples: int = 8) -> dict:
    """Metrics of one model's answers (None where not measured) and its first `num_samples` rows."""
    n = len(generations)
    grades = grade_all(generations)
    rm_mean = _mean(rm_scores) if rm_scores is not None else None
    result = {
        "num_prompts": n,
        "demo_score": _mean(g.score if g else None for g in grades),
        "demo_correct": _mean(float(g.correct) if g else None for g in grades),
        "rm_score": rm_mean,
        "rm_score_normalized": (rm_mean - rm_stats["mean"]) / rm_stats["std"]
        if rm_mean is not None and rm_stats else None,
        "kl_to_reference": _mean(kl) if kl is not None else None,
        "response_len": _mean(len(g.answer_ids) for g in generations),
        "empty_frac": _mean(float(not g.answer.strip()) for g in generations),
        "no_eos_frac": _mean(float(not g.ended_with_eos) for g in generations),
    }
    result["samples"] = [
        {"prompt": g.prompt, "answer": g.answer, "demo_score": grades[i].score if grades[i] else None,
         "rm_score": rm_scores[i] if rm_scores is not None else None}
        for i, g in enumerate(generations[:num_samples])]
    return result


def evaluate_model(model, tokenizer, prompts: Sequence[str], reward_model=None, reward_tokenizer=None,
                   rm_stats: Optional[dict] = None, reference_model=None, max_new_tokens: int = 48,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   batch_size: int = 32, seed: Optional[int] = 1234, num_samples: int = 8,
                   progress: bool = True, name: str = "model", fmt: Optional[ChatFormat] = None,
                   reward_fmt: Optional[ChatFormat] = None) -> dict:
    """Generate answers to `prompts` and score them (see summarize for the keys). fmt / reward_fmt: the chat
    formats of the model and of the reward model (None: the demo's canonical text)."""
    if seed is not None:
        torch.manual_seed(seed)  # every model samples from the same stream, whatever the order
    generations = generate_answers(model, tokenizer, prompts, max_new_tokens, do_sample, temperature, top_k, top_p,
                                   batch_size, progress, desc=f"generate {name}", fmt=fmt)
    rm = None
    if reward_model is not None:
        rm = reward_scores(reward_model, reward_tokenizer or tokenizer, generations, batch_size, fmt=reward_fmt)
    kl = None
    if reference_model is not None:
        stop = tokenizer.eos_token_id if fmt is None else fmt.stop_token_id
        kl = kl_to_reference(model, reference_model, generations, stop, tokenizer.pad_token_id, batch_size)
    return {"model": name, **summarize(generations, rm, rm_stats, kl, num_samples)}


# ------------------------------------------------------------------------------------------------ CLI
COLUMNS = (("demo_score", "demo"), ("demo_correct", "correct"), ("rm_score", "rm"),
           ("rm_score_normalized", "rm_norm"), ("kl_to_reference", "kl_ref"), ("response_len", "len"),
           ("empty_frac", "empty"), ("no_eos_frac", "no_eos"))


def format_table(results: Sequence[dict]) -> str:
    """One row per model; '-' where a metric was not measured."""
    width = max([len("model")] + [len(r["model"]) for r in results])
    lines = ["model".ljust(width) + "".join(f"{title:>9}" for _, title in COLUMNS)]
    for r in results:
        cells = ["-" if r[key] is None else f"{r[key]:.4f}" if abs(r[key]) < 100 else f"{r[key]:.1f}"
                 for key, _ in COLUMNS]
        lines.append(r["model"].ljust(width) + "".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def default_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().device_name())


def _load(kind: str, path: str, loader):
    """Load a model directory; a missing or unreadable one is a UserError (one line, exit code 2)."""
    if not os.path.isdir(path):
        raise UserError(f"{kind} directory {path} does not exist")
    try:
        return loader(path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {kind} from {path}: {reason}") from None


def _load_causal_lm(path: str, device):
    from transformers import AutoModelForCausalLM
    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import create_hf_model, load_tokenizer
    tokenizer = load_tokenizer(path)
    return create_hf_model(AutoModelForCausalLM, path, tokenizer).to(device).eval(), tokenizer


def load_reward_model(path: str, device):
    """(step-2 reward model in eval mode on `device`, its tokenizer); a missing directory is a UserError."""
    return _load("reward model", path, lambda p: _load_reward_model(p, device))


def _load_reward_model(path: str, device):
    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import load_tokenizer
    from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import create_critic_model
    tokenizer = load_tokenizer(path)
    return create_critic_model(path, tokenizer).to(device).eval(), tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate answers to demo test prompts and score them.")
    p.add_argument("--model", action="append", required=True, help="Model directory (repeat for several).")
    p.add_argument("--reward_model", help="Reward model directory (step 2 export): adds rm_score.")
    p.add_argument("--reference_model", help="Reference policy (e.g. the SFT model): adds kl_to_reference.")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"Dataset folder (test split). Default {DEFAULT_DATA}.")
    p.add_argument("--num_prompts", type=int, default=200, help="First N distinct test prompts. Default 200.")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0: no top-k filtering.")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output_json", help="Write all metrics and samples here (atomically).")
    p.add_argument("--samples", type=int, default=8, help="Sample rows kept per model. Default 8.")
    p.add_argument("--chat_template", default=None,
                   help="alpaca, model, none or a Jinja file (default: what each model was trained with, from its "
                        "training_args.json; alpaca without one)")
    p.add_argument("--system_prompt", default=None, help="System message (default: the one each model was trained "
                                                         "with)")
    return p.parse_args(argv)


def run(args) -> List[dict]:
    for kind, path in [("model", m) for m in args.model] + [("reward model", args.reward_model),
                                                             ("reference model", args.reference_model)]:
        if path is not None and not os.path.isdir(path):
            raise UserError(f"{kind} directory {path} does not exist")
    if args.num_prompts < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--num_prompts, --batch_size and --max_new_tokens must be at least 1")
    prompts = load_prompts(args.data, args.num_prompts, args.seed)
    device = default_device()
    rm = rm_tok = rm_stats = rm_fmt = ref = None
    if args.reward_model:
        rm, rm_tok = load_reward_model(args.reward_model, device)
        rm_stats = load_reward_stats(args.reward_model)
        rm_fmt = format_for_model(args.reward_model, rm_tok, args.chat_template, args.system_prompt)
    if args.reference_model:
        ref, _ = _load("reference model", args.reference_model, lambda p: _load_causal_lm(p, device))
    results = []
    for path in args.model:
        model, tokenizer = _load("model", path, lambda p: _load_causal_lm(p, device))
        fmt = format_for_model(path, tokenizer, args.chat_template, args.system_prompt)
        results.append(evaluate_model(
            model, tokenizer, prompts, rm, rm_tok, rm_stats, ref, args.max_new_tokens, args.do_sample,
            args.temperature, args.top_k, args.top_p, args.batch_size, args.seed, args.samples, name=path, fmt=fmt,
            reward_fmt=rm_fmt))
        del model
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{results[0]['num_prompts']} prompts from {args.data}, "
          f"{'sampled' if args.do_sample else 'greedy'}, max {args.max_new_tokens} new tokens")
    print(format_table(results))
    if args.output_json:
        from alpaca_rlhf.deepspeed_chat.training.utils.utils import write_json
        write_json(args.output_json, {"settings": vars(args), "results": results})
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
