#!/usr/bin/env python
"""Step 1: supervised fine-tuning of a causal LM on Human/Assistant conversations.

    sh run.sh --num_gpus 2 alpaca_rlhf/deepspeed_chat/training/step1_supervised_finetuning/main.py \\
        --sft_only_data_path MultiTurnAlpaca --model_name_or_path BASE --output_dir output/actor ...

The loss covers answer tokens and EOS only; perplexity on the eval split is reported before training and
after each epoch. The result is an HF-format model directory (LoRA merged) that later steps and the chatbot load.
"""
import argparse
import math
import os
import sys

if __package__ in (None, ""):  # started as a script: make the repository importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4)))

import alpaca_rlhf  # noqa: F401,E402  (before torch: MKL's kernel choice, alpaca_rlhf/cpu_blas.py)
import torch

from alpaca_rlhf.deepspeed_chat.training.utils import args as cli
from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import DataCollatorSFT, supervised_loaders
from alpaca_rlhf.deepspeed_chat.training.utils.entry import resolved_config, run_cli, start_run
from alpaca_rlhf.deepspeed_chat.training.utils.loop import train_loop
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import (causal_lm_loader, tokenizer_from_args,
                                                                        save_hf_format)
from alpaca_rlhf.deepspeed_chat.training.utils.model.token_log_probs import answer_nll, runs_lean
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import init_engine_for_loader, prepare_model
from alpaca_rlhf.deepspeed_chat.training.utils.utils import get_all_reduce_mean, print_rank_0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 1: supervised fine-tuning (SFT).")
    cli.add_data_args(parser)
    cli.add_model_args(parser)
    cli.add_tokenizer_args(parser)
    cli.add_supervised_training_args(parser, "examples", train_batch=16, eval_batch=16, learning_rate=1e-3,
                                     weight_decay=0.0, with_eval_interval=False)
    return parser.parse_args(argv)


def evaluate_perplexity(engine, loader, args):
    """Token-weighted mean loss over the eval split (all ranks) and its exponential."""
    total = torch.zeros(2, device=engine.device)  # [sum of token losses, number of tokens]
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            nll, tokens = answer_nll(engine, batch, args.packing, args.logits_chunk)
            total += torch.stack([nll, tokens.float()])
    token_loss, tokens = get_all_reduce_mean(total).tolist()
    loss = token_loss / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def main():
    args = parse_args()
    start_run(args)

    tokenizer = tokenizer_from_args(args, args.model_name_or_path)
    spec, ds_config, model = prepare_model(args, causal_lm_loader(args, tokenizer))

    train_loader, eval_loader = supervised_loaders(args, tokenizer, 1, DataCollatorSFT(tokenizer.pad_token_id),
                                                   packed=args.packing and runs_lean(model, args.max_seq_len))

    engine = init_engine_for_loader(model, spec, args, ds_config, train_loader)

    def sft_loss(batch):  # mean next-token cross entropy over the answer tokens
        nll, tokens = answer_nll(engine, batch, args.packing, args.logits_chunk)
        return nll / tokens.clamp(min=1), {}

    history = train_loop(engine, train_loader, sft_loss, lambda: evaluate_perplexity(engine, eval_loader, args),
                         args, desc="step1 sft", run_name="step1_sft")

    print_rank_0(f"saving the model to {args.output_dir}")
    save_hf_format(engine, tokenizer, args.output_dir, spec.zero_stage, resolved_config(args),
                   base_model_name_or_path=args.model_name_or_path, extra_files={"eval_history.json": history})
    print_rank_0(f"done: eval perplexity {history[0]['eval/perplexity']:.3f} -> {history[-1]['eval/perplexity']:.3f}")


if __name__ == "__main__":
    run_cli(main)
