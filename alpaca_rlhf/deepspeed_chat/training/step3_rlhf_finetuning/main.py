#!/usr/bin/env python
"""Step 3: PPO of the step-1 actor against the step-2 reward model, or critic-free RL (GRPO, RLOO,
REINFORCE++: --advantage_estimator) against a reward model, a classifier or a reward function.

    sh run.sh --num_gpus 2 alpaca_rlhf/deepspeed_chat/training/step3_rlhf_finetuning/main.py \\
        --actor_model_name_or_path output/actor --critic_model_name_or_path output/critic \\
        --actor_zero_stage 2 --critic_zero_stage 2 --output_dir output/final ...

Each iteration collects --generation_batches rollouts of --per_device_generation_batch_size prompts per rank
and trains on them for --ppo_epochs (ppo_trainer.py numbers the steps). --save_interval writes resumable
checkpoints; a run restarted with the same --output_dir (or --resume) continues from the newest one.
The exports are HF-format directories: OUTPUT_DIR/actor (chat-ready), OUTPUT_DIR/critic (PPO only),
OUTPUT_DIR/actor_ema.
"""
import json
import os
import sys

if __package__ in (None, ""):  # started as a script: make the repository importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4)))

import alpaca_rlhf  # noqa: F401,E402  (before torch: MKL's kernel choice, alpaca_rlhf/cpu_blas.py)
import torch  # noqa: E402

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning import step3_args
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.iterations import PromptIterations
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_trainer import PPOTrainer
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.reward_function import RewardFunction
from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.rlhf_engine import DeepSpeedRLHFEngine
from alpaca_rlhf.deepspeed_chat.training.utils.checkpoint import RunCheckpoints
from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import (DataCollatorRLHF, DataCollatorSFT,
                                                                      create_prompt_dataset, make_dataloader)
from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import format_from_args
from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import split_turns
from alpaca_rlhf.deepspeed_chat.training.utils.entry import resolved_config, run_cli, start_run
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.loop import progress_bar
from alpaca_rlhf.deepspeed_chat.training.utils.metrics import MetricsLogger
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import save_hf_format, tokenizer_from_args
from alpaca_rlhf.deepspeed_chat.training.utils.utils import is_rank_0, print_rank_0, write_json


def cycle(loader):
    """The PTX batches, epoch after epoch (their position is part of the trainer's state)."""
    while True:
        yield from loader


def main():
    args = step3_args.parse_args()
    dist = start_run(args)
    args.device = dist.device
    tokenizer = tokenizer_from_args(args, args.actor_model_name_or_path)
    tokenizer.padding_side = "left"
    chat_format = format_from_args(args, tokenizer)

    # prompts (the step-3 slice of --data_split) and, for PTX, supervised data
    prompt_train, prompt_eval = create_prompt_dataset(args.local_rank, args.data_path, args.data_split,
                                                      args.data_output_path, 3, args.seed, tokenizer,
                                                      args.max_prompt_seq_len, chat_format=chat_format)
    prompt_train, prompt_eval = prompt_train.subset(args.max_train_samples), prompt_eval.subset(args.max_eval_samples)
    collator = DataCollatorRLHF(args.max_prompt_seq_len, tokenizer.pad_token_id)
    prompt_loader = make_dataloader(prompt_train, collator, args.per_device_generation_batch_size, True, args.seed,
                                    drop_last=True)
    eval_loader = make_dataloader(prompt_eval, collator, args.per_device_generation_batch_size, False, args.seed)
    ptx_batches = None
    if args.unsupervised_dataset_name:
        ptx_data, _ = create_prompt_dataset(args.local_rank, [], "10,0,0", args.data_output_path, 1, args.seed,
                                            tokenizer, args.max_prompt_seq_len + args.max_answer_seq_len,
                                            sft_only_data_path=[args.unsupervised_dataset_name],
                                            chat_format=chat_format, train_on_all_turns=args.train_on_all_turns)
        ptx_batches = cycle(make_dataloader(ptx_data, DataCollatorSFT(tokenizer.pad_token_id),
                                            args.per_device_training_batch_size, True, args.seed))

    iterations = PromptIterations(prompt_loader, args.generation_batches, args.num_train_epochs)
    if len(iterations) == 0:  # nothing would train, and the unchanged actor would be exported
        raise ConfigError(f"step 3 has {len(prompt_train)} training prompts, fewer than one PPO iteration takes "
                          f"(world size {args.world_size} x --per_device_generation_batch_size "
                          f"{args.per_device_generation_batch_size} x --generation_batches {args.generation_batches})")
    engine = DeepSpeedRLHFEngine(args, tokenizer, step3_args.optimizer_steps(args, iterations.per_epoch))
    ground_truth = (RewardFunction(args.eval_reward_function, "--eval_reward_function")
                    if args.eval_reward_function else None)
    served_stats = engine.remote_reward.reward_stats if engine.remote_reward else None
    reward_stats = [step3_args.reward_stats(args, source, served_stats) for source in args.reward_model_type]
    trainer = PPOTrainer(engine, args, reward_stats, ptx_batches, ground_truth,
                         stop_token_id=chat_format.stop_token_id)

    checkpoints = RunCheckpoints(args, engine.engines, resolved_config(args))
    state = checkpoints.resume()  # None: from step 0
    if state:
        trainer.load_state_dict(state)
        iterations.load_state_dict(state)
        engine.load_ema_state(checkpoints.tensors())
    logger = MetricsLogger(args.output_dir, args.enable_tensorboard, args.tensorboard_path, "step3_ppo",
                           append=state is not None)

    def evaluate(step, when):
        result = trainer.evaluate(eval_loader, args.eval_batches, num_samples=args.eval_samples)
        samples = result.pop("samples")
        logger.log(step, result)
        print_rank_0(f"[step3 ppo] eval {when} (step {step}): " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return {"step": step, **result, "samples": samples}

    before_file = os.path.join(args.output_dir, "eval_before.json")
    if state is None:
        before = evaluate(0, "before training")
        if is_rank_0():
            write_json(before_file, before)

    step = state["step"] if state else 0
    bar = progress_bar(len(iterations), "step3 ppo", disable=not is_rank_0() or args.disable_progress_bar)
    bar.update(iterations.done())
    for batches in iterations:
        stats, rollouts = ppo_iteration(trainer, batches, dist.device)
        bar.update(1)
        if stats is None:  # every rollout of this iteration was skipped (on all ranks alike)
            continue
        step += 1
        bar.set_postfix(score=f"{stats['reward/score']:.3f}", kl=f"{stats['objective/kl']:.3f}",
                        len=f"{stats['gen/response_len']:.1f}")
        logger.log(step, stats)
        if args.print_answers and step % args.print_answers_interval == 0:
            show_answers(trainer, rollouts[-1], step, logger)
        checkpoints.maybe_save(step, {**iterations.state_dict(), **trainer.state_dict()}, tensors=engine.ema_state())
        if args.eval_interval and step % args.eval_interval == 0:
            evaluate(step, f"at step {step}")
        if args.enable_test_mode and step >= args.test_stop_step:
            break
    bar.close()

    after = evaluate(step, "after training")
    if is_rank_0() and os.path.exists(before_file):
        print_before_after(json.load(open(before_file)), after)
        write_json(os.path.join(args.output_dir, "eval_after.json"), after)
    logger.close()
    report_peak_memory()
    export(engine, tokenizer, args)


def ppo_iteration(trainer, batches, device):
    """Generate and score a rollout per prompt batch, then train on them: (stats, rollouts), or (None, [])
    when every rollout was skipped."""
    rollouts, timing = [], {}
    for batch in batches:
        rollout, timing = trainer.make_experience(batch["prompt"].to(device), batch["prompt_att_mask"].to(device))
        if rollout is not None:
            rollouts.append(rollout)
    if not rollouts:
        return None, []
    return {**trainer.step(rollouts), **timing}, rollouts


def report_peak_memory():
    """Peak memory of this rank: accelerator memory on GPUs, resident set size on the CPU accelerator."""
    from deepspeed.accelerator import get_accelerator
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        import resource
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "resident memory"
    else:
        peak, what = accel.max_memory_allocated() / 2 ** 20, "accelerator memory"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print(f"[rank {rank}] peak {what}: {peak:.0f} MiB", flush=True)


def show_answers(trainer, rollout, step, logger):
    P = rollout.prompt_length
    prompt = trainer.tokenizer.decode(rollout.seq[0, :P], skip_special_tokens=True)
    answer = trainer.tokenizer.decode(rollout.seq[0, P:], skip_special_tokens=True)
    print_rank_0(f"--- step {step} sample (score {rollout.score[0].item():.3f})\n{prompt}{answer!r}")
    logger.log_text(step, "samples", f"**prompt** {prompt}\n\n**answer** {answer}\n\n**score** {rollout.score[0].item():.3f}")


def print_before_after(before, after, rows: int = 8):
    """TRL's IMDB-style table: the same held-out prompts answered before (the reference) and after PPO."""
    print("\nbefore / after PPO on held-out prompts (greedy answers, raw reward-model scores)")
    for (prompt, old, r_old), (_, new, r_new) in list(zip(before["samples"], after["samples"]))[:rows]:
        try:
            question = split_turns(prompt)[1][:70]
        except ValueError:
            question = prompt.strip()[-70:]
        print(f"  {question}\n    before [{r_old:+.3f}] {old.strip()[:90]!r}\n    after  [{r_new:+.3f}] {new.strip()[:90]!r}")
    keys = [k for k in after if k.startswith("eval/")]
    print("  " + " | ".join(f"{k[5:]}: {before.get(k, float('nan')):.3f} -> {after[k]:.3f}" for k in keys))


def export(engine, tokenizer, args):
    config = resolved_config(args)
    save_hf_format(engine.actor, tokenizer, os.path.join(args.output_dir, "actor"), engine.actor_spec.zero_stage, config,
                   base_model_name_or_path=args.actor_model_name_or_path)
    if engine.critic is not None:
        save_hf_format(engine.critic, tokenizer, os.path.join(args.output_dir, "critic"), engine.critic_spec.zero_stage,
                       config, base_model_name_or_path=args.critic_model_name_or_path)
    if engine.ema is not None:
        save_hf_format(engine.ema, tokenizer, os.path.join(args.output_dir, "actor_ema"), 0, config)
    print_rank_0(f"done: {', '.join(f'{name} in {args.output_dir}/{name}' for name in engine.engines)}")


if __name__ == "__main__":
    run_cli(main)
