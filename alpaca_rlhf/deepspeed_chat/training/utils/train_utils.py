"""Turning a loaded model into a DeepSpeed training engine: LoRA, parameter groups, optimizer, scheduler.
Shared by step 1, step 2, DPO and both trained models of step 3."""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import get_scheduler

from .data.data_utils import epoch_lengths
from .ds_utils import get_train_ds_config, on_cpu
from .errors import ConfigError
from .module.lora import convert_linear_layer_to_lora, is_lora_parameter, only_optimize_lora_parameters
from .utils import print_rank_0

NO_DECAY = ("bias", "norm.weight", "layernorm.weight", "layer_norm.weight", "ln_f.weight")


@dataclass
class EngineSpec:
    """What one trained model needs: the flags of its group (prefix 'actor_'/'critic_' in step 3)."""
    learning_rate: float
    weight_decay: float
    zero_stage: int
    lora_dim: int = 0
    lora_module_name: str = ""
    lora_scaling: float = 1.0
    lora_dropout: float = 0.0
    lora_learning_rate: Optional[float] = None
    only_optimize_lora: bool = False
    gradient_checkpointing: bool = False

    @classmethod
    def from_args(cls, args, prefix: str = "", learning_rate_flag: str = "learning_rate"):
        get = lambda name, default=None: getattr(args, prefix + name, default)  # noqa: E731
        return cls(learning_rate=get(learning_rate_flag), weight_decay=get("weight_decay", 0.0),
                   zero_stage=get("zero_stage", 0), lora_dim=get("lora_dim", 0),
                   lora_module_name=get("lora_module_name", ""), lora_scaling=get("lora_scaling", 1.0),
                   lora_dropout=get("lora_dropout", 0.0), lora_learning_rate=get("lora_learning_rate"),
                   only_optimize_lora=getattr(args, "only_optimize_lora", False),
                   gradient_checkpointing=get("gradient_checkpointing", False))


def shares_base(spec: EngineSpec) -> bool:
    """Frozen base weights + LoRA: switching the adapters off gives back the starting model exactly, so the
    frozen reference (or reward) model needs no copy of its own."""
    return spec.lora_dim > 0 and spec.only_optimize_lora


def apply_lora(model: torch.nn.Module, spec: EngineSpec, force_optimize_params: Sequence[str] = ()):
    """Add LoRA where asked and freeze the rest under --only_optimize_lora."""
    if spec.lora_dim > 0:
        convert_linear_layer_to_lora(model, spec.lora_module_name, spec.lora_dim, spec.lora_scaling,
                                     spec.lora_dropout)
        if spec.only_optimize_lora:
            only_optimize_lora_parameters(model, force_optimize_params)
    elif spec.only_optimize_lora:
        raise ConfigError("--only_optimize_lora needs a positive --lora_dim (otherwise nothing would be trained)")
    if spec.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA), no input-grad hooks needed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def optimizer_grouped_parameters(model: torch.nn.Module, weight_decay: float, learning_rate: float,
                                 lora_learning_rate: Optional[float] = None):
    """Three groups: decayed weights, non-decayed biases/norms, LoRA matrices (own learning rate)."""
    groups = {"decay": [], "no_decay": [], "lora": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_lora_parameter(name):
            groups["lora"].append(p)
        elif any(nd in name.lower() for nd in NO_DECAY):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    result = [{"params": groups["decay"], "weight_decay": weight_decay, "lr": learning_rate},
              {"params": groups["no_decay"], "weight_decay": 0.0, "lr": learning_rate},
              {"params": groups["lora"], "weight_decay": 0.0, "lr": lora_learning_rate or learning_rate}]
    result = [g for g in result if g["params"]]
    if not result:
        raise ConfigError("the model has no trainable parameters (check --lora_module_name / --only_optimize_lora)")
    return result


def create_optimizer(param_groups, choice: str, offload: bool, learning_rate: float, betas=(0.9, 0.95)):
    """auto: DeepSpeedCPUAdam when optimizer states live on the CPU (--offload), FusedAdam on GPUs, plain
    torch AdamW on the CPU accelerator (no JIT-compiled op needed)."""
    if choice == "auto":
        choice = "cpu_adam" if offload else ("torch_adamw" if on_cpu() else "fused_adam")
    if choice == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(param_groups, lr=learning_rate, betas=tuple(betas))
    if choice == "fused_adam":
        if on_cpu():
            raise ConfigError("--optimizer fused_adam needs a GPU; use torch_adamw or cpu_adam on CPU")
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(param_groups, lr=learning_rate, betas=tuple(betas))
    if offload:
        raise ConfigError("--offload keeps optimizer states on the CPU and needs --optimizer cpu_adam (or auto)")
    # fused: one kernel reads and writes each parameter, gradient and state once (torch >= 2.4 has it for the
    # CPU too; 3.2x faster than foreach on the 30M parameters of the small benchmark model: 19 vs 62 ms per
    # step). foreach (one multi-tensor update instead of a Python loop) where fused is not available.
    try:
        return torch.optim.AdamW(param_groups, lr=learning_rate, betas=tuple(betas), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(param_groups, lr=learning_rate, betas=tuple(betas), foreach=True)


def num_update_steps(batches_per_epoch: Sequence[int], gradient_accumulation_steps: int,
                     max_train_steps: int = 0) -> int:
    """Optimizer steps of a run whose epochs have these numbers of micro-batches (at most --max_train_steps)."""
    steps = sum(math.ceil(n / gradient_accumulation_steps) for n in batches_per_epoch)
    return min(steps, max_train_steps) if max_train_steps > 0 else steps


def train_ds_config(spec: EngineSpec, args, micro_batch_size: int, gradient_accumulation_steps: int,
                    generates: bool = False) -> dict:
    """The DeepSpeed config of one trained model; also passed to model loading (ZeRO-3 partitions on load).
    generates: this is step 3's actor, the model the hybrid engine (when asked for) generates with."""
    hybrid = generates and getattr(args, "enable_hybrid_engine", False)
    config = get_train_ds_config(
        micro_batch_size, gradient_accumulation_steps, args.world_size, stage=spec.zero_stage, offload=args.offload,
        dtype=args.dtype, enable_hybrid_engine=hybrid,
        inference_tp_size=getattr(args, "inference_tp_size", 1),
        release_inference_cache=getattr(args, "release_inference_cache", False),
        pin_parameters=not getattr(args, "unpin_actor_parameters", False),
        tp_gather_partition_size=getattr(args, "tp_gather_partition_size", 8),
        max_out_tokens=getattr(args, "max_prompt_seq_len", 0) + getattr(args, "max_answer_seq_len", 0))
    if generates and getattr(args, "enable_mixed_precision_lora", False):
        config["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
    if getattr(args, "node_local_checkpoints", False):  # every node writes (and later reads) all it needs
        config["checkpoint"] = {"use_node_local_storage": True}
    return config


def init_engine(model, spec: EngineSpec, args, ds_config: dict, total_steps: int):
    """deepspeed.initialize with our optimizer and learning-rate schedule; returns the engine."""
    groups = optimizer_grouped_parameters(model, spec.weight_decay, spec.learning_rate, spec.lora_learning_rate)
    optimizer = create_optimizer(groups, args.optimizer, args.offload, spec.learning_rate, args.adam_betas)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.num_warmup_steps, num_training_steps=max(total_steps, 1))
    # Counted before initialize: ZeRO-3 partitions the parameters (ds_numel is the full size).
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, dist_init_required=False)
    if spec.zero_stage == 0 and engine.dp_world_size == 1:
        # Nothing to average over one data-parallel rank, but without ZeRO DeepSpeed still flattens every
        # gradient into a buffer, all-reduces it with itself and copies it back after each backward
        # (measured: 0.4 s of a 6.8 s single-process PPO iteration on the `small` benchmark model).
        engine.enable_backward_allreduce = False
    print_rank_0(f"engine ready: ZeRO-{spec.zero_stage}, {args.dtype}, {type(optimizer).__name__}, "
                 f"{trainable / 1e6:.3f}M trainable parameters, {total_steps} optimizer steps, "
                 f"device {get_accelerator().device_name()}")
    return engine


def init_frozen_engine(model, args, zero_stage: int, offload: bool = False, micro_batch_size: int = 1):
    """A frozen model (reference policy, reward model) as a DeepSpeed inference-only engine: ZeRO-3
    partitions it like the trained models (and --offload_reference_model / --offload_reward_model
    put its parameters in CPU memory); below ZeRO-3 it is simply placed on the device."""
    from .ds_utils import get_eval_ds_config
    for p in model.parameters():
        p.requires_grad_(False)
    config = get_eval_ds_config(micro_batch_size, args.world_size, stage=zero_stage if zero_stage == 3 else 0,
                                offload=offload and zero_stage == 3, dtype=args.dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine


def prepare_model(args, load, force_optimize_params: Sequence[str] = ()):
    """(spec, ds_config, model) for steps 1, 2 and DPO: `load(ds_config)` builds the model (ZeRO-3 partitions
    while loading, so it needs the config), then LoRA / freezing / checkpointing are applied."""
    spec = EngineSpec.from_args(args)
    ds_config = train_ds_config(spec, args, args.per_device_train_batch_size, args.gradient_accumulation_steps)
    model = load(ds_config)
    apply_lora(model, spec, force_optimize_params)
    return spec, ds_config, model


def init_engine_for_loader(model, spec: EngineSpec, args, ds_config: dict, train_loader):
    """init_engine with the schedule length derived from the loader, epochs and --max_train_steps."""
    total_steps = num_update_steps(epoch_lengths(train_loader, args.num_train_epochs),
                                   args.gradient_accumulation_steps, args.max_train_steps)
    return init_engine(model, spec, args, ds_config, total_steps)
