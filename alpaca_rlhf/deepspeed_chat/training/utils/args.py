"""Argument groups shared by the steps. Names and meanings follow DeepSpeed-Chat (and the alpaca-rlhf
commands in the README), so existing command lines keep working; each help text gives the default and,
where there is one, where it comes from.

Groups that exist once per model in step 3 (actor / critic) take a `prefix`.
"""
import argparse
import os

from .errors import ConfigError


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_data_args(parser, default_data_path=("Dahoas/rm-static",), with_sft_only=True):
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", nargs="*", default=list(default_data_path),
                   help="Datasets by name (Dahoas/rm-static, Dahoas/full-hh-rlhf, Dahoas/synthetic-instruct-gptj-pairwise, "
                        "yitingxie/rlhf-reward-datasets, openai/webgpt_comparisons, stanfordnlp/SHP, local/jsonfile) or local "
                        "directories whose path contains the name; several are concatenated. Default: Dahoas/rm-static.")
    g.add_argument("--data_split", type=str, default="2,4,4",
                   help="Comma-separated shares of each dataset for step 1, step 2 and step 3 (disjoint, seeded). Default 2,4,4.")
    if with_sft_only:
        g.add_argument("--sft_only_data_path", nargs="*", default=[],
                       help="Datasets used whole by step 1 only (e.g. MultiTurnAlpaca or a directory containing that name).")
    g.add_argument("--data_output_path", type=str, default="/tmp/data_files/",
                   help="Where the tokenized data cache is kept (keyed by a hash of everything that changes it). "
                        "Use a local, non-shared path.")
    g.add_argument("--max_train_samples", type=int, default=0,
                   help="Use at most this many training examples per step (0 = all); handy for smoke tests.")
    g.add_argument("--max_eval_samples", type=int, default=0,
                   help="Use at most this many evaluation examples (0 = all).")
    return g


def add_model_args(parser, prefix="", model_flag="model_name_or_path", required=True):
    g = parser.add_argument_group(f"{prefix}model".strip("_"))
    g.add_argument(f"--{prefix}{model_flag}", type=str, required=required,
                   help="Path to a Hugging Face format model directory (or a hub name when online).")
    g.add_argument(f"--{prefix}dropout", type=float, default=None,
                   help="Override the model's dropout probabilities (None keeps the model config's).")
    g.add_argument(f"--{prefix}gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass: less memory, about 30%% more time.")
    return g


def add_tokenizer_args(parser):
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer_name_or_path", type=str, default=None,
                   help="Tokenizer directory or name; default: the model's own.")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="Allow model/tokenizer code from the model directory to run (off by default, for safety).")
    g.add_argument("--add_eot_token", action="store_true",
                   help="Append --eot_token to every answer and add it to the tokenizer (off: EOS ends answers).")
    g.add_argument("--eot_token", type=str, default="<|endoftext|>", help="End-of-turn string for --add_eot_token.")
    g.add_argument("--chat_template", type=str, default="alpaca",
                   help="How conversations become text: alpaca (default, DeepSpeed-Chat's '\\n\\nHuman: q"
                        "\\n\\nAssistant: a' + EOS), model (the tokenizer's own chat template; its end-of-turn token "
                        "ends answers), PATH (a Jinja template file), none (raw text continuation).")
    g.add_argument("--system_prompt", type=str, default=None,
                   help="A system message before every conversation that has none (default: none).")
    g.add_argument("--train_on_all_turns", action="store_true",
                   help="Step 1: train every assistant turn of a multi-turn example (default: the last turn only).")
    return g


def add_optimization_args(parser, prefix="", learning_rate=1e-3, weight_decay=0.0):
    g = parser.add_argument_group(f"{prefix}optimization".strip("_"))
    g.add_argument(f"--{prefix}learning_rate", type=float, default=learning_rate,
                   help=f"Peak learning rate after warmup (AdamW). Default {learning_rate:g}.")
    g.add_argument(f"--{prefix}weight_decay", type=float, default=weight_decay,
                   help=f"AdamW weight decay (not applied to biases and norms). Default {weight_decay:g}.")
    return g


def add_schedule_args(parser, num_train_epochs=1):
    g = parser.add_argument_group("schedule")
    g.add_argument("--num_train_epochs", type=int, default=num_train_epochs,
                   help=f"Passes over the training data. Default {num_train_epochs}.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated per optimizer step. Default 1.")
    g.add_argument("--lr_scheduler_type", type=str, default="cosine",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help="Learning-rate schedule after warmup (transformers' get_scheduler). Default cosine.")
    g.add_argument("--num_warmup_steps", type=int, default=0, help="Linear warmup optimizer steps. Default 0.")
    g.add_argument("--max_train_steps", type=int, default=0,
                   help="Stop after this many optimizer steps (0 = run all epochs).")
    g.add_argument("--optimizer", type=str, default="auto", choices=["auto", "torch_adamw", "fused_adam", "cpu_adam"],
                   help="auto: DeepSpeedCPUAdam with --offload, FusedAdam on GPUs, torch AdamW on the CPU accelerator.")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95),
                   help="AdamW betas. Default 0.9 0.95 (DeepSpeed-Chat's).")
    return g


def add_lora_args(parser, prefix="", default_modules="decoder.layers.,layers."):
    g = parser.add_argument_group(f"{prefix}lora".strip("_"))
    g.add_argument(f"--{prefix}lora_dim", type=int, default=0,
                   help="LoRA rank; 0 trains the full model. The alpaca-rlhf commands use 8.")
    g.add_argument(f"--{prefix}lora_module_name", type=str, default=default_modules,
                   help="Comma-separated substrings of the linear layers that get LoRA, e.g. q_proj,k_proj.")
    g.add_argument(f"--{prefix}lora_scaling", type=float, default=1.0,
                   help="LoRA alpha: the update is scaled by lora_scaling / lora_dim. Default 1 (scale 1/rank).")
    g.add_argument(f"--{prefix}lora_dropout", type=float, default=0.0, help="Dropout on the LoRA input. Default 0.")
    g.add_argument(f"--{prefix}lora_learning_rate", type=float, default=None,
                   help="Learning rate of the LoRA matrices (default: the model's learning rate).")
    return g


def add_only_optimize_lora(parser):
    parser.add_argument("--only_optimize_lora", action="store_true",
                        help="Train only the LoRA matrices (and a reward/value head); the base weights stay frozen.")


def add_deepspeed_args(parser, prefixes=("",)):
    g = parser.add_argument_group("deepspeed")
    for prefix in prefixes:
        g.add_argument(f"--{prefix}zero_stage", type=int, default=0, choices=[0, 1, 2, 3],
                       help="ZeRO stage for this model's engine (0: plain data parallel). Default 0.")
    g.add_argument("--offload", action="store_true", help="Offload optimizer states (and ZeRO-3 parameters) to CPU memory.")
    g.add_argument("--dtype", type=str, default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="Training precision; auto = fp16 on GPUs (DeepSpeed-Chat's default), fp32 on CPU.")
    g.add_argument("--compute_fp32_loss", action="store_true", help="Upcast logits to fp32 before the loss (for bf16/fp16).")
    g.add_argument("--compile_elementwise", action="store_true",
                   help="Fuse the RMSNorm, SwiGLU and rotary elementwise math of the forward and backward passes "
                        "with torch.compile (utils/model/elementwise.py): 1.04-1.06x per PPO iteration on the CPU "
                        "benchmark, for ~20 s of compilation on first use (~7 s once inductor's cache is warm). "
                        "Falls back to eager with a warning where compilation fails. Default off.")
    g.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher.")
    g.add_argument("--dist_timeout", type=float, default=30,
                   help="Minutes a collective waits for the other ranks before the run fails (a rank that died, "
                        "a node that hangs). Raise it when one rank does long work alone (rank 0 tokenizing a "
                        "large dataset). Default 30 (torch's).")
    import deepspeed
    deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config
    return g


def add_output_args(parser):
    g = parser.add_argument_group("output and logging")
    g.add_argument("--output_dir", type=str, required=True, help="Where the final HF-format model is written.")
    g.add_argument("--seed", type=int, default=1234, help="Random seed (data split, init, sampling). Default 1234.")
    g.add_argument("--enable_tensorboard", action="store_true", help="Write metrics to TensorBoard (rank 0).")
    g.add_argument("--tensorboard_path", type=str, default=None,
                   help="TensorBoard directory (default: OUTPUT_DIR/tensorboard).")
    g.add_argument("--print_loss", action="store_true", help="Print the loss of every step on every rank.")
    g.add_argument("--disable_progress_bar", action="store_true", help="No tqdm progress bar (logs only).")
    return g


def add_supervised_training_args(parser, unit: str, train_batch: int, eval_batch: int, learning_rate: float,
                                 weight_decay: float, with_eval_interval: bool = True):
    """Everything steps 1, 2 and DPO share after their own flags: lengths, batches, optimizer, schedule,
    LoRA, DeepSpeed and output. `unit` names what a batch holds (examples, pairs)."""
    g = parser.add_argument_group("batches")
    g.add_argument("--max_seq_len", type=int, default=512,
                   help="Tokens per sequence; longer ones keep their last tokens. Default 512.")
    g.add_argument("--per_device_train_batch_size", type=int, default=train_batch,
                   help=f"{unit.capitalize()} per rank per micro-batch. Default {train_batch}.")
    g.add_argument("--per_device_eval_batch_size", type=int, default=eval_batch,
                   help=f"Eval {unit} per rank. Default {eval_batch}.")
    g.add_argument("--max_tokens_per_batch", type=int, default=0,
                   help=f"Training micro-batches by token budget instead of --per_device_train_batch_size: shuffled "
                        f"{unit} join a micro-batch while its tokens stay within this many (packed: real tokens; "
                        f"padded: {unit} x the longest), so every micro-batch costs about the same; the loss is the "
                        f"mean over each micro-batch as before. At least --max_seq_len. Default 0 (off: "
                        f"--per_device_train_batch_size {unit}).")
    add_packing_args(g)
    if with_eval_interval:
        g.add_argument("--eval_interval", type=int, default=0, help="Evaluate every N optimizer steps (0: per epoch).")
        g.add_argument("--eval_iters", type=int, default=0, help="Evaluate on at most N batches (0: all).")
    add_nonfinite_args(parser)
    add_optimization_args(parser, learning_rate=learning_rate, weight_decay=weight_decay)
    add_schedule_args(parser)
    add_lora_args(parser)
    add_only_optimize_lora(parser)
    add_deepspeed_args(parser)
    add_output_args(parser)
    add_checkpoint_args(parser, "optimizer steps")


def add_packing_args(group):
    """--packing and --logits_chunk (utils/data/packing.py, utils/model/token_log_probs.py): steps 1, 2, DPO and
    step 3's PTX batches."""
    group.add_argument("--packing", type=str2bool, default=True,
                       help="Run each micro-batch's rows packed into one sequence without padding (position ids "
                            "restart per row, attention stays within it): the same losses, fewer positions. Where our "
                            "decoder runs (LLaMA, Mistral, Qwen2 with SDPA/eager attention); other families pad. "
                            "Default true.")
    group.add_argument("--logits_chunk", type=int, default=1024,
                       help="The LM head and log-softmax run only at positions whose next token is scored (answers), "
                            "this many positions at a time, so the (tokens x vocab) logits never exist whole "
                            "(0: all at once). Steps 1, DPO and PTX, LLaMA-like families. Default 1024.")


def add_checkpoint_args(parser, unit: str):
    """Resumable checkpoints (OUTPUT_DIR/checkpoints, utils/checkpoint.py), the same in every step."""
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save_interval", type=int, default=0,
                   help=f"Resumable checkpoint (model, optimizer, scheduler, RNG, data position) every N {unit} "
                        "(0 = off).")
    g.add_argument("--save_total_limit", type=int, default=2, help="Keep this many newest checkpoints. Default 2.")
    g.add_argument("--resume", action="store_true", help="Continue from OUTPUT_DIR/checkpoints/latest (the default "
                                                          "whenever one exists, unless --no_auto_resume).")
    g.add_argument("--no_auto_resume", action="store_true", help="Start from step 0 even if a checkpoint exists.")
    g.add_argument("--resume_with_changes", action="store_true",
                   help="Resume a checkpoint written with other flags (learning rate, batch, ...); without it such "
                        "a resume stops with the list of differences. A different number of ranks is always refused.")
    return g


def add_nonfinite_args(parser):
    parser.add_argument("--max_nonfinite_steps", type=int, default=5,
                        help="Stop (exit code 2, nothing exported) after this many micro-batches in a row whose loss "
                             "is NaN or infinite on some rank; each such batch is skipped on every rank, no optimizer "
                             "step. Default 5.")


# flag -> (test of a value, what is expected): numeric flags with a domain, checked before any model loads
_DOMAINS = {
    "max_seq_len": (lambda v: v >= 1, "at least 1"),
    "max_prompt_seq_len": (lambda v: v >= 1, "at least 1"),
    "max_answer_seq_len": (lambda v: v >= 1, "at least 1"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "at least 0 (0: off)"),
    "temperature": (lambda v: v > 0, "above 0"),
    "kl_horizon": (lambda v: v > 0, "above 0"),
    "kl_coef": (lambda v: v >= 0, "at least 0"),
    "kl_loss_coef": (lambda v: v >= 0, "at least 0"),
    "n_samples_per_prompt": (lambda v: v >= 1, "at least 1"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "cliprange": (lambda v: v > 0, "above 0"),
    "cliprange_value": (lambda v: v > 0, "above 0"),
    "ppo_epochs": (lambda v: v >= 1, "at least 1"),
    "generation_batches": (lambda v: v >= 1, "at least 1"),
    "beta": (lambda v: v > 0, "above 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "max_nonfinite_steps": (lambda v: v >= 1, "at least 1"),
    "save_interval": (lambda v: v >= 0, "at least 0 (0: off)"),
    "save_total_limit": (lambda v: v >= 0, "at least 0 (0: keep all)"),
    "dist_timeout": (lambda v: v > 0, "above 0 (minutes)"),
    "logits_chunk": (lambda v: v >= 0, "at least 0 (0: all positions at once)"),
    "learning_rate": (lambda v: v >= 0, "at least 0"),
    "actor_learning_rate": (lambda v: v >= 0, "at least 0"),
    "critic_learning_rate": (lambda v: v >= 0, "at least 0"),
}


def check_value_args(args):
    """Fail early, naming the flag, on a numeric flag outside its domain (a --top_p of 0 would mask every token,
    a --kl_horizon of 0 divide by zero, a length of 0 end in a traceback deep inside a step)."""
    for flag, (ok, expected) in _DOMAINS.items():
        value = getattr(args, flag, None)
        if value is not None and not ok(value):
            raise ConfigError(f"--{flag} must be {expected}, got {value}")


_INPUT_MODEL_FLAGS = ("model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path",
                      "reward_model_name_or_path", "reference_model_name_or_path", "tokenizer_name_or_path")


def check_output_dir(args):
    """Refuse an --output_dir whose export would overwrite an input model (step 3 exports into OUTPUT_DIR/actor
    and OUTPUT_DIR/critic): a failed run would leave the input half replaced."""
    out = getattr(args, "output_dir", None)
    if not out:
        return
    subdirs = ("actor", "critic") if hasattr(args, "actor_model_name_or_path") else ("",)
    exports = {os.path.realpath(os.path.join(out, sub)) for sub in subdirs}
    for flag in _INPUT_MODEL_FLAGS:
        path = getattr(args, flag, None)
        if path and os.path.isdir(path) and os.path.realpath(path) in exports:
            raise ConfigError(f"--output_dir {out} would write its export over --{flag} {path}; "
                              f"give another output directory")


def check_batch_args(args, world_size: int):
    """Fail early, with the flag names, on batch settings (and any numeric flag out of its domain) that cannot
    work."""
    check_value_args(args)
    check_output_dir(args)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "per_device_generation_batch_size", "per_device_training_batch_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {value}")
    budget = getattr(args, "max_tokens_per_batch", 0)
    if budget and budget < args.max_seq_len or budget < 0:
        raise ConfigError(f"--max_tokens_per_batch must be 0 (off) or at least --max_seq_len {args.max_seq_len} "
                          f"(a micro-batch holds whole rows), got {budget}")
    if getattr(args, "num_train_epochs", 1) < 1:
        raise ConfigError(f"--num_train_epochs must be at least 1, got {args.num_train_epochs}")
    if hasattr(args, "data_split"):
        from .data.data_utils import parse_data_split
        parse_data_split(args.data_split)
    args.world_size = world_size
    micro = getattr(args, "per_device_train_batch_size", None) or getattr(args, "per_device_training_batch_size")
    args.global_train_batch_size = micro * args.gradient_accumulation_steps * world_size
    return args
