#!/usr/bin/env python
"""Step 2: reward model from preference pairs (chosen vs rejected answer to the same prompt).

    sh run.sh --num_gpus 2 alpaca_rlhf/deepspeed_chat/training/step2_reward_model_finetuning/main.py \\
        --model_name_or_path BASE --num_padding_at_beginning 0 --output_dir output/critic ...

Pairwise accuracy, mean chosen/rejected scores and margin are reported before training, every
--eval_interval steps and after each epoch. The export is a one-label *ForSequenceClassification directory
with `reward_stats.json` (mean/std of the chosen scores on the eval split), which step 3 normalises with.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # started as a script: make the repository importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4)))

import alpaca_rlhf  # noqa: F401,E402  (before torch: MKL's kernel choice, alpaca_rlhf/cpu_blas.py)
from alpaca_rlhf.deepspeed_chat.training.utils import args as cli
from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import DataCollatorReward, supervised_loaders
from alpaca_rlhf.deepspeed_chat.training.utils.entry import resolved_config, run_cli, start_run
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.loop import train_loop
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import save_hf_format, tokenizer_from_args
from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import (create_critic_model, evaluate_pairs,
                                                                         reward_statistics)
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import init_engine_for_loader, prepare_model
from alpaca_rlhf.deepspeed_chat.training.utils.utils import print_rank_0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step 2: reward model fine-tuning.")
    cli.add_data_args(parser, with_sft_only=False)
    cli.add_model_args(parser)
    cli.add_tokenizer_args(parser)
    parser.add_argument("--num_padding_at_beginning", type=int, default=0,
                        help="Pad tokens models put before the text (OPT: 1, LLaMA: 0). Accepted for DeepSpeed-Chat "
                             "compatibility; answer ends are found from the attention mask either way.")
    parser.add_argument("--loss_type", choices=["span", "last_token"], default="span",
                        help="span: -logsigmoid(r_c - r_r) averaged from the first differing token to the end of the "
                             "longer answer (DeepSpeed-Chat); last_token: on the end scores only. Default span.")
    cli.add_supervised_training_args(parser, "pairs", train_batch=16, eval_batch=16, learning_rate=5e-5,
                                     weight_decay=0.1)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    start_run(args)

    tokenizer = tokenizer_from_args(args, args.model_name_or_path)
    # the reward head is always trained, LoRA or not
    spec, ds_config, model = prepare_model(args, lambda cfg: create_critic_model(
        args.model_name_or_path, tokenizer, cfg, args.num_padding_at_beginning, args.dropout, args.compute_fp32_loss,
        args.loss_type, args.trust_remote_code, args.dtype), force_optimize_params=["v_head"])

    train_loader, eval_loader = supervised_loaders(args, tokenizer, 2, DataCollatorReward(tokenizer.pad_token_id),
                                                   packed=model.packs(args.packing, args.max_seq_len))
    if len(eval_loader.dataset) == 0:  # reward_stats.json (step 3's normalisation) comes from the eval pairs
        raise ConfigError(f"step 2 found no eval pairs (the eval split of --data_path {' '.join(args.data_path)} "
                          f"with --data_split {args.data_split}); reward_stats.json needs them")

    engine = init_engine_for_loader(model, spec, args, ds_config, train_loader)

    def reward_loss(batch):
        out = engine(batch["input_ids"], batch["attention_mask"], packing=args.packing)
        accuracy = (out["chosen_mean_scores"] > out["rejected_mean_scores"]).float().mean().item()
        return out["loss"], {"train/accuracy": accuracy}

    last_scores = {}

    def evaluate():
        # The final evaluation's scores give the reward statistics: no second pass over the eval split.
        metrics, last_scores["chosen"], last_scores["rejected"] = evaluate_pairs(engine, eval_loader,
                                                                                   args.eval_iters, args.packing)
        return metrics

    history = train_loop(engine, train_loader, reward_loss, evaluate, args, desc="step2 reward",
                         run_name="step2_reward", eval_interval=args.eval_interval)

    stats = reward_statistics(last_scores["chosen"], last_scores["rejected"], {
        "data_path": args.data_path, "data_split": args.data_split, "split": "eval", "phase": 2, "seed": args.seed,
        "eval_batches": args.eval_iters or "all"})
    print_rank_0(f"reward stats on {stats['num_pairs']} eval pairs: chosen {stats['chosen_mean']:.4f} "
                 f"+- {stats['chosen_std']:.4f}, rejected {stats['rejected_mean']:.4f}, accuracy {stats['accuracy']:.3f}")
    save_hf_format(engine, tokenizer, args.output_dir, spec.zero_stage, resolved_config(args),
                   base_model_name_or_path=args.model_name_or_path, extra_files={"eval_history.json": history, "reward_stats.json": stats})
    print_rank_0(f"done: eval accuracy {history[0]['eval/accuracy']:.3f} -> {history[-1]['eval/accuracy']:.3f}; "
                 f"model in {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
