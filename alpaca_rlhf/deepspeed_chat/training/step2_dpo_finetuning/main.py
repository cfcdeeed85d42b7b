#!/usr/bin/env python
"""DPO, an alternative to steps 2 + 3: Direct Preference Optimization (Rafailov et al. 2023) of the step-1
model on the same preference pairs, against the frozen step-1 model as the reference.

    sh run.sh --num_gpus 2 alpaca_rlhf/deepspeed_chat/training/step2_dpo_finetuning/main.py \\
        --model_name_or_path output/actor --output_dir output/dpo --beta 0.1 ...

With LoRA the reference is the same weights with the adapters switched off: no second copy in memory.
The export is a chat-ready HF-format causal LM.
"""
import argparse
import contextlib
import os
import sys

if __package__ in (None, ""):  # started as a script: make the repository importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4)))

import alpaca_rlhf  # noqa: F401,E402  (before torch: MKL's kernel choice, alpaca_rlhf/cpu_blas.py)
import torch

from alpaca_rlhf.deepspeed_chat.training.utils import args as cli
from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import DataCollatorReward, supervised_loaders
from alpaca_rlhf.deepspeed_chat.training.utils.entry import resolved_config, run_cli, start_run
from alpaca_rlhf.deepspeed_chat.training.utils.losses import dpo_loss
from alpaca_rlhf.deepspeed_chat.training.utils.loop import train_loop
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import (causal_lm_loader, save_hf_format,
                                                                        tokenizer_from_args)
from alpaca_rlhf.deepspeed_chat.training.utils.model.token_log_probs import runs_lean, scored_token_log_probs
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import lora_disabled
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import (init_engine_for_loader, init_frozen_engine,
                                                                   prepare_model, shares_base)
from alpaca_rlhf.deepspeed_chat.training.utils.utils import get_all_reduce_mean, print_rank_0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DPO: preference optimization without a reward model.")
    cli.add_data_args(parser, with_sft_only=False)
    cli.add_model_args(parser)
    cli.add_tokenizer_args(parser)
    parser.add_argument("--beta", type=float, default=0.1,
                        help="Strength of the implicit KL constraint to the reference (DPO paper: 0.1).")
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help="Assumed fraction of flipped preference labels (conservative DPO). Default 0.")
    parser.add_argument("--reference_model_name_or_path", type=str, default=None,
                        help="Frozen reference policy (default: --model_name_or_path, the step-1 model).")
    parser.add_argument("--offload_reference_model", action="store_true",
                        help="Keep a separate reference copy's parameters in CPU memory (ZeRO-3).")
    cli.add_supervised_training_args(parser, "pairs", train_batch=8, eval_batch=16, learning_rate=5e-6,
                                     weight_decay=0.0)
    return parser.parse_args(argv)


def response_mask(batch) -> torch.Tensor:
    """1 on answer tokens (EOS included): at or after the prompt length, and not padding. (2B, T)"""
    positions = torch.arange(batch["input_ids"].size(1), device=batch["input_ids"].device)
    return (positions.unsqueeze(0) >= batch["prompt_lens"].unsqueeze(1)).long() * batch["attention_mask"]


def pair_accuracy(chosen, rejected):
    """1 where the chosen answer has the higher implicit reward, 0.5 for a tie (before any training)."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def main():
    args = parse_args()
    start_run(args)

    tokenizer = tokenizer_from_args(args, args.model_name_or_path)
    spec, ds_config, model = prepare_model(args, causal_lm_loader(args, tokenizer))

    train_loader, eval_loader = supervised_loaders(args, tokenizer, 2, DataCollatorReward(tokenizer.pad_token_id),
                                                   packed=args.packing and runs_lean(model, args.max_seq_len))

    engine = init_engine_for_loader(model, spec, args, ds_config, train_loader)
    if shares_base(spec) and args.reference_model_name_or_path is None:
        reference, reference_ctx = engine, lambda: lora_disabled(engine.module)
        print_rank_0("reference policy: the trained model with LoRA switched off (no second copy)")
    else:
        ref_model = causal_lm_loader(args, tokenizer, args.reference_model_name_or_path)(ds_config)
        reference = init_frozen_engine(ref_model, args, spec.zero_stage, args.offload_reference_model)
        reference_ctx = contextlib.nullcontext

    def dpo_terms(batch):
        """Per-pair DPO losses and implicit rewards for a batch of 2B rows (chosen first, then rejected)."""
        ids, mask, scored = batch["input_ids"], batch["attention_mask"], response_mask(batch)
        logps = scored_token_log_probs(engine, ids, mask, scored, args.packing, args.logits_chunk).sum(-1)  # (2B,)
        with torch.no_grad(), reference_ctx():
            ref_logps = scored_token_log_probs(reference, ids, mask, scored, args.packing, args.logits_chunk).sum(-1)
        B = batch["input_ids"].size(0) // 2
        return dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], args.beta, args.label_smoothing)

    def train_step(batch):
        losses, chosen, rejected = dpo_terms(batch)
        return losses.mean(), {"rewards/accuracy": pair_accuracy(chosen, rejected).mean().item(),
                               "rewards/margin": (chosen - rejected).mean().item()}

    @torch.no_grad()
    def evaluate():
        sums = torch.zeros(5, device=engine.device)  # loss, accuracy, chosen, rejected, count
        for i, batch in enumerate(eval_loader):
            if args.eval_iters and i >= args.eval_iters:
                break
            losses, chosen, rejected = dpo_terms({k: v.to(engine.device) for k, v in batch.items()})
            sums += torch.stack([losses.sum(), pair_accuracy(chosen, rejected).sum(), chosen.sum(), rejected.sum(),
                                 torch.tensor(float(len(losses)), device=engine.device)])
        total = get_all_reduce_mean(sums)
        loss, acc, chosen, rejected = (total[:4] / total[4].clamp(min=1)).tolist()
        return {"eval/loss": loss, "eval/reward_accuracy": acc, "eval/chosen_reward": chosen,
                "eval/rejected_reward": rejected, "eval/margin": chosen - rejected}

    history = train_loop(engine, train_loader, train_step, evaluate, args, desc="dpo", run_name="step2_dpo",
                         eval_interval=args.eval_interval)
    save_hf_format(engine, tokenizer, args.output_dir, spec.zero_stage, resolved_config(args),
                   base_model_name_or_path=args.model_name_or_path, extra_files={"eval_history.json": history})
    print_rank_0(f"done: eval reward accuracy {history[0]['eval/reward_accuracy']:.3f} -> "
                 f"{history[-1]['eval/reward_accuracy']:.3f}; model in {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
