"""Step 3's flags: DeepSpeed-Chat's names and meanings (plus the alpaca-rlhf aliases), and the PPO
hyperparameters, each with the default from the literature. Checked right after parsing."""
import argparse
import json
import math
import os
from typing import Optional

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_math import CRITIC_FREE, LOSS_AGGREGATIONS
from alpaca_rlhf.deepspeed_chat.training.utils import args as cli
from alpaca_rlhf.deepspeed_chat.training.utils.ds_utils import on_cpu
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.utils import print_rank_0

REWARD_SOURCES = ["reward_model", "classifier", "function", "remote"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Step 3: RLHF with PPO.")
    cli.add_data_args(p, with_sft_only=False)
    d = p.add_argument_group("PTX (pre-training mix)")
    d.add_argument("--unsupervised_dataset_name", type=str, default=None,
                   help="Supervised data mixed into the actor loss (InstructGPT's PTX): a dataset name or local path "
                        "this project reads (e.g. MultiTurnAlpaca). Off by default.")
    d.add_argument("--unsupervised_dataset_config_name", type=str, default=None,
                   help="Accepted for DeepSpeed-Chat compatibility (hub dataset configs are not used).")
    d.add_argument("--unsup_coef", type=float, default=27.8,
                   help="PTX loss coefficient (InstructGPT: 27.8, reported unstable; try 1 or less).")
    cli.add_packing_args(d)  # (the PTX batches)

    cli.add_model_args(p, "actor_", required=True)
    cli.add_model_args(p, "critic_", required=False)
    cli.add_tokenizer_args(p)
    cli.add_nonfinite_args(p)
    m = p.add_argument_group("reward")
    m.add_argument("--num_padding_at_beginning", type=int, default=0, help="OPT: 1, LLaMA: 0 (see step 2).")
    m.add_argument("--reward_model_type", nargs="+", choices=REWARD_SOURCES + ["model"], default=["reward_model"],
                   metavar="SOURCE",
                   help="Where rewards come from, one or more of: reward_model (or model): a step-2 model's end "
                        "score; classifier: a sequence classifier's logit; function: --reward_function's score of "
                        "each answer (a verifiable reward); remote: a reward server at --reward_url. Several sources "
                        "are summed with --reward_weights. Default reward_model.")
    m.add_argument("--reward_weights", nargs="+", type=float, default=None, metavar="W",
                   help="One weight per --reward_model_type source: the score trained on is the weighted sum of the "
                        "sources' scores (a reward model's normalised with its reward_stats first). Default 1 each.")
    m.add_argument("--reward_url", type=str, default=None,
                   help="With --reward_model_type remote: http://HOST:PORT/score of `python -m "
                        "alpaca_rlhf.tools.reward_server --model DIR` (its reward_stats normalise the scores).")
    m.add_argument("--reward_timeout", type=float, default=60.0,
                   help="Seconds to wait for the reward server's answer to one request. Default 60.")
    m.add_argument("--reward_retries", type=int, default=3,
                   help="Tries after the first when the reward server does not answer (pauses of 1, 2, 4 ... s); "
                        "then the run stops with the reason. Default 3.")
    m.add_argument("--reward_function", type=str, default=None,
                   help="With --reward_model_type function: path/to/file.py:name or package.module:name, called as "
                        "name(prompts, answers) -> one float per answer (e.g. alpaca_rlhf.tools.demo_task:reward).")
    m.add_argument("--eval_reward_function", type=str, default=None,
                   help="Same form: a ground-truth score that is logged (reward/ground_truth, eval/ground_truth), "
                        "never trained on (e.g. the demo's grader).")
    m.add_argument("--reward_model_name_or_path", type=str, default=None,
                   help="The frozen reward model (default: --critic_model_name_or_path, the step-2 model; with "
                        "--only_optimize_lora the critic's base with LoRA off, no copy). Naming it loads a separate copy.")
    m.add_argument("--reference_model_name_or_path", type=str, default=None,
                   help="The frozen reference policy (default: the actor's starting point; with --only_optimize_lora "
                        "that is the actor with LoRA off, no copy). Naming it loads a separate copy.")
    m.add_argument("--reward_label", type=str, default="POSITIVE", help="Classifier label whose logit is the reward.")
    m.add_argument("--reward_stats", type=str, default=None,
                   help="reward_stats.json to normalise rewards with (default: the one step 2 wrote next to the model).")
    m.add_argument("--no_reward_normalization", action="store_true", help="Use raw reward-model scores.")
    m.add_argument("--reward_clip", type=float, default=5.0, help="Clip normalised scores to +-this. Default 5.")
    m.add_argument("--no_eos_penalty", type=float, default=0.0,
                   help="Subtracted from the score of answers that never emit EOS (0 = off).")

    b = p.add_argument_group("batches")
    b.add_argument("--per_device_generation_batch_size", "--per_device_train_batch_size", type=int, default=16,
                   dest="per_device_generation_batch_size",
                   help="Prompts per rank per generation batch (older name: --per_device_train_batch_size). Default 16.")
    b.add_argument("--per_device_training_batch_size", "--per_device_mini_train_batch_size", type=int, default=16,
                   dest="per_device_training_batch_size",
                   help="PPO mini-batch per rank, in answers (older name: --per_device_mini_train_batch_size). "
                        "Default 16.")
    b.add_argument("--generation_batches", type=int, default=1, help="Generation batches per PPO iteration. Default 1.")
    b.add_argument("--ppo_epochs", type=int, default=1, help="Passes over each iteration's experience. Default 1.")
    b.add_argument("--separate_experience_passes", action="store_true",
                   help="Always run the actor and critic experience passes, even with one epoch and one mini-batch "
                        "per iteration, where the first training forward gives the same pi_old and V_old "
                        "(reused by default).")
    b.add_argument("--recompute_actor_forward", action="store_true",
                   help="Run the actor's first training forward in full. By default, when that forward is reused "
                        "as above, it replays the outputs of the actor's linear maps recorded during generation "
                        "(same weights, same positions) instead of recomputing them.")
    b.add_argument("--max_prompt_seq_len", type=int, default=256, help="Prompt tokens (left-padded to this). Default 256.")
    b.add_argument("--max_answer_seq_len", type=int, default=256, help="Generated tokens at most. Default 256.")

    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature. Default 1.0.")
    g.add_argument("--top_k", type=int, default=0, help="Top-k sampling (0 = off, the literature's default).")
    g.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling (1.0 = off, the literature's default).")
    g.add_argument("--ignore_eos", action="store_true",
                   help="Treat EOS as an ordinary token: every answer is exactly --max_answer_seq_len tokens "
                        "(fixed-length benchmarks, as in DeepSpeed-Chat's). Off by default.")

    c = p.add_argument_group("critic-free RL (GRPO, RLOO, REINFORCE++)")
    c.add_argument("--advantage_estimator", choices=["gae", *CRITIC_FREE], default="gae",
                   help="gae: PPO with a critic (default). Without a critic: reinforce (REINFORCE++), rloo "
                        "(leave-one-out baseline), reinforce_baseline (group mean baseline, batch-whitened), "
                        "group_norm (GRPO: (r - mean) / std in each group), dr_grpo (Dr. GRPO: no std, length "
                        "normalised loss). OpenRLHF's names and meanings.")
    c.add_argument("--n_samples_per_prompt", type=int, default=1,
                   help="Answers sampled per prompt; a group stays on one rank. GRPO/RLOO need >= 2 (GRPO paper: "
                        "64, OpenRLHF examples: 4-8). Default 1.")
    c.add_argument("--kl_loss_coef", type=float, default=0.0,
                   help="KL(actor || reference) as a loss term with this weight (GRPO: 0.04; then usually "
                        "--kl_coef 0, no KL in the reward). Default 0: off.")
    c.add_argument("--kl_loss_estimator", choices=["k1", "k3"], default="k3",
                   help="Estimator of the KL loss term (GRPO: k3). Default k3.")
    c.add_argument("--loss_agg", choices=list(LOSS_AGGREGATIONS), default=None,
                   help="How per-token policy losses become one: token_mean (default; DeepSpeed-Chat, OpenRLHF), "
                        "seq_mean_token_mean (GRPO paper), seq_mean_token_sum_norm (Dr. GRPO; the default with "
                        "--advantage_estimator dr_grpo).")

    o = p.add_argument_group("PPO")
    o.add_argument("--kl_coef", type=float, default=0.05,
                   help="Per-token KL penalty coefficient (forks used 0.02-0.1; initial value with --kl_target).")
    o.add_argument("--kl_estimator", choices=["k1", "k3"], default="k1",
                   help="KL estimator: k1 = log ratio (unbiased), k3 = never negative. Default k1.")
    o.add_argument("--kl_target", type=float, default=None,
                   help="Target KL per answer for the adaptive controller (Ziegler et al.: 6). Off: fixed --kl_coef.")
    o.add_argument("--kl_horizon", type=int, default=10000, help="Adaptive KL horizon in samples (Ziegler et al.: 10000).")
    o.add_argument("--gamma", type=float, default=1.0, help="Discount (1.0 in InstructGPT-style RLHF).")
    o.add_argument("--lam", type=float, default=0.95, help="GAE lambda. Default 0.95.")
    o.add_argument("--cliprange", type=float, default=0.2, help="Policy ratio clip (PPO paper: 0.2).")
    o.add_argument("--cliprange_value", type=float, default=0.2, help="Value clip around the rollout's values. Default 0.2.")
    o.add_argument("--whiten_advantages", type=cli.str2bool, default=True,
                   help="Whiten advantages per mini-batch (true/false). Default true.")
    o.add_argument("--whiten_rewards", action="store_true", help="Whiten per-token rewards per rollout. Default off.")

    cli.add_optimization_args(p, "actor_", learning_rate=9.65e-6, weight_decay=0.0)
    cli.add_optimization_args(p, "critic_", learning_rate=5e-6, weight_decay=0.0)
    cli.add_schedule_args(p)
    cli.add_lora_args(p, "actor_")
    cli.add_lora_args(p, "critic_")
    cli.add_only_optimize_lora(p)
    cli.add_deepspeed_args(p, prefixes=("actor_", "critic_"))

    e = p.add_argument_group("engines")
    e.add_argument("--enable_hybrid_engine", action="store_true",
                   help="DeepSpeed's hybrid engine generates the actor's rollouts with its inference kernels (GPU only; "
                        "the actor only; not with --actor_lora_dim, whose adapters it would not fuse).")
    e.add_argument("--unpin_actor_parameters", action="store_true",
                   help="Hybrid engine: do not pin the actor's gathered parameters between rollouts (saves memory).")
    e.add_argument("--release_inference_cache", action="store_true",
                   help="Hybrid engine: free the inference workspace after each rollout (saves memory).")
    e.add_argument("--inference_tp_size", type=int, default=1,
                   help="Hybrid engine: tensor-parallel degree of generation (GPU only). Default 1.")
    e.add_argument("--tp_gather_partition_size", type=int, default=8,
                   help="Hybrid engine: layers gathered at a time for tensor-parallel generation. Default 8.")
    e.add_argument("--offload_reference_model", action="store_true", help="Reference parameters in CPU memory (ZeRO-3).")
    e.add_argument("--offload_reward_model", action="store_true", help="Reward parameters in CPU memory (ZeRO-3).")
    e.add_argument("--enable_ema", action="store_true", help="Keep an EMA of the actor, exported as actor_ema.")
    e.add_argument("--ema_decay", type=float, default=0.992, help="EMA decay per optimizer step. Default 0.992.")
    e.add_argument("--enable_mixed_precision_lora", action="store_true",
                   help="ZeRO-3 + LoRA actor: keep its frozen base weights quantized for communication (DeepSpeed's "
                        "zero_quantized_nontrainable_weights, ZeRO++). GPU only.")
    e.add_argument("--align_overflow", action="store_true",
                   help="Not supported (refused with a message): each engine skips its own step on an fp16 "
                        "overflow. Accepted by DeepSpeed-Chat's command line.")

    cli.add_output_args(p)
    cli.add_checkpoint_args(p, "PPO iterations")
    r = p.add_argument_group("evaluation, test mode")
    r.add_argument("--eval_interval", type=int, default=0, help="Evaluate every N iterations (0: start and end only).")
    r.add_argument("--eval_batches", type=int, default=4, help="Held-out prompt batches per evaluation. Default 4.")
    r.add_argument("--eval_samples", type=int, default=8, help="Answers kept for the before/after table. Default 8.")
    r.add_argument("--print_answers", action="store_true", help="Print a sample prompt and answer now and then.")
    r.add_argument("--print_answers_interval", type=int, default=1, help="... every N iterations. Default 1.")
    r.add_argument("--enable_test_mode", action="store_true", help="Stop after --test_stop_step iterations.")
    r.add_argument("--test_stop_step", type=int, default=0, help="Iterations to run in test mode.")
    args = p.parse_args(argv)
    check(args)
    return args


def check(args):
    """Fail early, naming the flags, on settings that cannot work."""
    gen, train = args.per_device_generation_batch_size, args.per_device_training_batch_size
    if gen < 1 or train < 1 or args.generation_batches < 1 or args.ppo_epochs < 1:
        raise ConfigError("--per_device_generation_batch_size, --per_device_training_batch_size, "
                          "--generation_batches and --ppo_epochs must be at least 1")
    answers = gen * args.n_samples_per_prompt  # rows of one rollout
    if answers % train:
        raise ConfigError(f"--per_device_training_batch_size ({train}) must divide the answers of a rollout, "
                          f"--per_device_generation_batch_size x --n_samples_per_prompt ({answers}): mini-batches "
                          f"are cut from each rollout")
    check_estimator_args(args)
    if args.enable_test_mode and args.test_stop_step < 1:
        raise ConfigError("--enable_test_mode needs --test_stop_step N (N >= 1)")
    if args.kl_target is not None and args.kl_target <= 0:
        raise ConfigError(f"--kl_target must be positive, got {args.kl_target}")
    if args.enable_hybrid_engine and args.actor_lora_dim > 0:
        raise ConfigError("--enable_hybrid_engine with --actor_lora_dim: DeepSpeed's hybrid engine fuses only its own "
                          "LoRA layers, so rollouts would come from the base weights; drop --enable_hybrid_engine "
                          "(LoRA is fused for generation without it)")
    if args.enable_mixed_precision_lora and (args.actor_lora_dim <= 0 or args.actor_zero_stage != 3):
        raise ConfigError("--enable_mixed_precision_lora quantizes the frozen base of a LoRA actor under ZeRO-3: "
                          "it needs --actor_lora_dim > 0 and --actor_zero_stage 3")
    if args.align_overflow:
        raise ConfigError("--align_overflow is not supported: each engine skips its own optimizer step on an fp16 "
                          "overflow; use --dtype bf16 (no loss scaling) to avoid overflows")
    if on_cpu():
        gpu_only = [flag for flag, on in (("--enable_hybrid_engine", args.enable_hybrid_engine),
                                          ("--inference_tp_size > 1", args.inference_tp_size > 1),
                                          ("--enable_mixed_precision_lora", args.enable_mixed_precision_lora)) if on]
        if gpu_only:
            raise ConfigError(f"{', '.join(gpu_only)} need{'s' if len(gpu_only) == 1 else ''} a GPU "
                              "(DeepSpeed's inference kernels); this machine has the CPU accelerator only")


def check_estimator_args(args):
    """The critic (only GAE has one), the reward source and the group size fit the estimator."""
    estimator, k = args.advantage_estimator, args.n_samples_per_prompt
    if estimator == "gae" and not args.critic_model_name_or_path:
        raise ConfigError("--advantage_estimator gae (PPO) trains a critic: give --critic_model_name_or_path "
                          "(the step-2 model), or pick a critic-free estimator (group_norm, rloo, ...)")
    if estimator in ("rloo", "group_norm", "dr_grpo", "reinforce_baseline") and k < 2:
        raise ConfigError(f"--advantage_estimator {estimator} compares the answers to one prompt: it needs "
                          f"--n_samples_per_prompt of at least 2, got {k}")
    if args.loss_agg is None:
        args.loss_agg = "seq_mean_token_sum_norm" if estimator == "dr_grpo" else "token_mean"
    check_reward_sources(args)


def check_reward_sources(args):
    """Each --reward_model_type source once, with what it needs, and one weight per source."""
    sources = ["reward_model" if s == "model" else s for s in args.reward_model_type]
    if len(set(sources)) < len(sources):
        raise ConfigError(f"--reward_model_type {' '.join(args.reward_model_type)}: name each source once")
    args.reward_model_type = sources
    weights = args.reward_weights or [1.0] * len(sources)
    if len(weights) != len(sources) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"--reward_weights: expected {len(sources)} finite number(s), one per --reward_model_type "
                          f"source ({' '.join(sources)}), got {' '.join(map(str, weights))}")
    args.reward_weights = weights
    needs = {"function": ("reward_function", "--reward_function path/to/file.py:name"),
             "remote": ("reward_url", "--reward_url http://HOST:PORT/score"),
             "classifier": ("reward_model_name_or_path", "--reward_model_name_or_path DIR")}
    for source, (attr, flag) in needs.items():
        if source in sources and not getattr(args, attr):
            raise ConfigError(f"--reward_model_type {source} needs {flag}")
    for attr, source in (("reward_function", "function"), ("reward_url", "remote")):
        if getattr(args, attr) and source not in sources:
            raise ConfigError(f"--{attr} is used with --reward_model_type {source}")
    if "reward_model" in sources and not (args.reward_model_name_or_path or args.critic_model_name_or_path):
        raise ConfigError("the reward model: give --reward_model_name_or_path (or --critic_model_name_or_path)")
    if "remote" in sources and (args.chat_template != "alpaca" or args.system_prompt):
        raise ConfigError("--reward_model_type remote sends prompts as text in the default format (alpaca, no "
                          "system prompt); with --chat_template or --system_prompt score with a local reward model")
    if args.reward_timeout <= 0 or args.reward_retries < 0:
        raise ConfigError("--reward_timeout must be positive and --reward_retries at least 0")


def optimizer_steps(args, iterations_per_epoch: int) -> int:
    """Optimizer steps of each engine over the run, for the learning-rate schedules."""
    answers = args.per_device_generation_batch_size * args.n_samples_per_prompt
    minibatches = args.generation_batches * (answers // args.per_device_training_batch_size)
    per_iteration = math.ceil(minibatches * args.ppo_epochs / args.gradient_accumulation_steps)
    iterations = iterations_per_epoch * args.num_train_epochs
    if args.enable_test_mode:
        iterations = min(iterations, args.test_stop_step)
    return max(1, per_iteration * iterations)


def reward_stats(args, source: str = "reward_model", served: Optional[dict] = None):
    """{'mean', 'std'} to normalise a source's scores with, or None (raw scores). A reward model's: --reward_stats,
    else step 2's reward_stats.json next to it (a warning without one). A reward server's: --reward_stats when no
    local reward model claims it, else `served`, what the server sent (its model's reward_stats.json)."""
    if args.no_reward_normalization or source in ("classifier", "function"):
        return None
    if source == "remote" and not (args.reward_stats and "reward_model" not in args.reward_model_type):
        if served is None:
            print_rank_0(f"warning: the reward server at {args.reward_url} has no reward_stats; its scores are not "
                         f"normalised")
        return served
    path = args.reward_stats or os.path.join(args.reward_model_name_or_path or args.critic_model_name_or_path,
                                             "reward_stats.json")
    if not os.path.exists(path):
        if args.reward_stats:
            raise ConfigError(f"--reward_stats {path} does not exist")
        print_rank_0(f"warning: no {path}; rewards are not normalised (pass --reward_stats or --no_reward_normalization)")
        return None
    stats = json.load(open(path))
    try:
        mean, std = float(stats["chosen_mean"]), float(stats["chosen_std"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: expected numbers chosen_mean and chosen_std (written by step 2)")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ConfigError(f"{path}: chosen_mean {mean} and chosen_std {std} cannot normalise rewards (a finite mean "
                          f"and a positive std are needed; re-run step 2 with an eval split, or pass "
                          f"--no_reward_normalization)")
    return {"mean": mean, "std": std}
