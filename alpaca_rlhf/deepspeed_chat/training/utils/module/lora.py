"""Hand-written LoRA (Hu et al. 2021) for nn.Linear layers, usable under DeepSpeed ZeRO 0/2/3.

    y = x W^T + b + scaling * dropout(x) A^T B^T,      A: (r, in) kaiming-uniform, B: (out, r) zeros,
    scaling = lora_scaling / r   (lora_scaling 1 and r 8 as in the alpaca-rlhf / DeepSpeed-Chat defaults)

B starts at zero, so a freshly converted model computes exactly what the base model did. transformers'
`Conv1D` layers (GPT-2's c_attn, c_proj, c_fc), whose weight is stored transposed (in, out), are wrapped the
same way (`fan_in_fan_out`, PEFT's name for it); A and B keep their (r, in) and (out, r) shapes.
`fuse` folds scaling * B A into W for fast generation; `unfuse` restores W bit for bit (from a copy kept while
fused: W + d - d is not W in floating point, least of all in bf16/fp16, and the frozen base doubles as the
reference model, so it must not drift by a rounding every rollout). `lora_disabled`
switches the adapters off, which turns the trained policy back into its starting point: PPO and DPO use
that as the frozen reference model instead of keeping a second copy of the weights in memory.
"""
import contextlib
import math
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers without GPT-2's layer
    Conv1D = None


def _is_wrappable(module: nn.Module) -> bool:
    """A linear map LoRA can wrap: nn.Linear, or transformers' Conv1D (GPT-2)."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


class _LoRALinearFunction(torch.autograd.Function):
    """y = x (W + s B A)^T + b as one matmul with the update folded into the weight (a (out, in) sum, cheap next to
    the matmul), and a backward that computes what the two-branch form's autograd does with fewer passes over
    the activations: dx = g (W + s B A), dA = s (g B)^T x, dB = s g^T (x A^T) (and dW, db when trainable).
    The forward equals the fused generation weights exactly (`LoRALinear.fuse` adds the same s B A to W).
    Measured with bench/lora_layer.py (a frozen 512 x 512 projection, rank 8, (16, 127, 512) input): forward
    without grad 4.00 -> 3.43 ms, forward + backward 9.84 -> 8.81 ms. tests/test_lora.py checks values and
    gradients against the two-branch form."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, output=None):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        if output is not None:  # the result is already known (the rollout's fused forward, forward_replay.py)
            return output
        return F.linear(x, weight + (lora_b @ lora_a) * scaling, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g2, x2 = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))   # (N, out), (N, in)
        d_x = d_w = d_bias = d_a = d_b = None
        if need_x:
            d_x = grad @ (weight + (lora_b @ lora_a) * s)                      # (..., in)
        if need_w:
            d_w = g2.t() @ x2
        if need_b and ctx.has_bias:
            d_bias = g2.sum(0)
        if need_a:
            d_a = (g2 @ lora_b).t() @ x2 * s                                   # (r, in)
        if need_bb:
            d_b = g2.t() @ (x2 @ lora_a.t()) * s                               # (out, r)
        return d_x, d_w, d_bias, d_a, d_b, None, None


def lora_linear(module: "LoRALinear", x: torch.Tensor, output: Optional[torch.Tensor] = None) -> torch.Tensor:
    """module's forward through the folded function; `output` given: that value, with the same backward."""
    return _LoRALinearFunction.apply(x, module.linear_weight(), module.bias, module.lora_A, module.lora_B,
                                     module.scaling, output)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update. Keeps the wrapped layer's parameter names
    (`weight`, `bias`) so checkpoints and `state_dict` keys of the base model stay valid."""

    def __init__(self, base: nn.Module, lora_dim: int, lora_scaling: float = 1.0, lora_dropout: float = 0.0):
        super().__init__()
        if lora_dim <= 0:
            raise ConfigError(f"--lora_dim must be positive to add LoRA, got {lora_dim}")
        # Conv1D stores its weight (in, out) and computes x W + b; nn.Linear stores (out, in), x W^T + b.
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = (base.nx, base.nf) if self.fan_in_fan_out else \
            (base.in_features, base.out_features)
        self.weight = base.weight  # (out, in), or (in, out) for Conv1D; frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(lora_dim, self.in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora_dim, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dim = lora_dim
        self.scaling = lora_scaling / lora_dim
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.fused = False
        self.enabled = True
        self._weight_before_fuse = None  # W as it was, while fused

    def linear_weight(self) -> torch.Tensor:
        """The base weight as nn.Linear holds it, (out, in) (a transposed view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape (out, in): what fusing adds to the (out, in) weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds():
            return lora_linear(self, x)
        out = F.linear(x, self.linear_weight(), self.bias)
        if self.fused:
            # W already holds the update; with adapters off it must be taken out again.
            if not self.enabled:
                out = out - F.linear(x, self.delta_weight())
            return out
        if self.enabled:
            out = out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return out

    def can_fold(self) -> bool:
        """Whether this layer's update can be folded into its weight at all: no LoRA dropout (it applies to the
        adapters' input only), weights not partitioned by ZeRO-3."""
        return isinstance(self.lora_dropout, nn.Identity) and not hasattr(self.weight, "ds_id")

    def folds(self) -> bool:
        """Whether forward folds the update into the weight now: foldable, adapters on, not fused already."""
        return self.enabled and not self.fused and self.can_fold()

    @torch.no_grad()
    def fuse(self, keep_original: bool = True):
        """W += s B A. keep_original: keep a copy of W so that `unfuse` restores it exactly (this layer's weight
        once more while fused, in host memory when W is on an accelerator: with LoRA on every projection of a
        7B model that is 13 GB, which belongs in host memory rather than next to the rollout's KV cache);
        False for a permanent merge."""
        if not self.fused:
            self._weight_before_fuse = self.weight.detach().to("cpu", copy=True) if keep_original else None
            delta = self.delta_weight().to(self.weight.dtype)
            self.weight.add_(delta.t() if self.fan_in_fan_out else delta)
            self.fused = True

    @torch.no_grad()
    def unfuse(self):
        if self.fused:
            if self._weight_before_fuse is None:
                raise RuntimeError("this LoRA layer was merged permanently (fuse(keep_original=False))")
            self.weight.copy_(self._weight_before_fuse)
            self._weight_before_fuse = None
            self.fused = False

    def extra_repr(self) -> str:
        conv = ", fan_in_fan_out" if self.fan_in_fan_out else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_dim}, scaling={self.scaling:g}{conv}"


def parse_module_names(names) -> List[str]:
    """'q_proj,k_proj' (or a list) -> ['q_proj', 'k_proj']."""
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n and n.strip()]


def convert_linear_layer_to_lora(model: nn.Module, part_module_name, lora_dim: int = 0,
                                 lora_scaling: float = 1.0, lora_droppout: float = 0.0) -> nn.Module:
    """Wrap every nn.Linear (or GPT-2 Conv1D) whose qualified name contains one of the comma-separated
    substrings (q_proj,k_proj for LLaMA/Qwen2/Mistral/OPT, c_attn for GPT-2, W_pack for Baichuan).

    (`lora_droppout` keeps DeepSpeed-Chat's spelling so existing callers work.) A list that matches nothing
    is an error: a typo would otherwise train nothing at all.
    """
    patterns = parse_module_names(part_module_name)
    if not patterns:
        raise ConfigError("--lora_module_name is empty; give substrings of module names such as q_proj,k_proj")
    targets = [name for name, m in model.named_modules() if _is_wrappable(m) and any(p in name for p in patterns)]
    if not targets:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_wrappable(m)})
        raise ConfigError(f"--lora_module_name {','.join(patterns)!r} matches no linear layer; "
                          f"linear layers are named {', '.join(linear_names)}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), lora_dim, lora_scaling, lora_droppout))
    return model


def lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def is_lora_parameter(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name or name.startswith(("lora_A", "lora_B"))


def only_optimize_lora_parameters(model: nn.Module, force_optimize_params: Sequence[str] = ()) -> nn.Module:
    """Freeze everything but the LoRA matrices and the parameters whose names contain one of
    `force_optimize_params` (the reward model's value head, for instance)."""
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_parameter(name) or any(f in name for f in force_optimize_params)
    return model


def _gathered(params: Iterable[nn.Parameter], modifier_rank: Optional[int] = 0):
    """Under ZeRO-3 parameters are partitioned across ranks; gather them for in-place edits."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def fuse_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model):
        with _gathered([m.weight, m.lora_A, m.lora_B]):
            m.fuse()
    return model


def unfuse_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model):
        with _gathered([m.weight, m.lora_A, m.lora_B]):
            m.unfuse()
    return model


@contextlib.contextmanager
def lora_fused(model: nn.Module):
    """Generation at plain-model speed: W' = W + sBA for the duration of the block."""
    fuse_lora(model)
    try:
        yield model
    finally:
        unfuse_lora(model)


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model (adapters switched off) for the duration of the block: the frozen reference."""
    modules = list(lora_modules(model))
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.enabled = was


def convert_lora_to_linear_layer(model: nn.Module) -> nn.Module:
    """Merge the adapters into plain nn.Linear layers (in place), e.g. before exporting to HF format."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        with _gathered([m.weight, m.lora_A, m.lora_B]):
            m.fuse(keep_original=False)
        if m.fan_in_fan_out:
            linear = Conv1D(m.out_features, m.in_features)
        else:
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model


def merge_lora_state_dict(state_dict: dict, model: nn.Module) -> dict:
    """A full state dict (as gathered for saving) with each LoRA update folded into its weight and the
    lora_A / lora_B entries dropped, so the result loads into the plain base architecture."""
    merged = dict(state_dict)
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        prefix = name + "." if name else ""
        a, b = merged.pop(prefix + "lora_A"), merged.pop(prefix + "lora_B")
        w = merged[prefix + "weight"]
        delta = (b.float() @ a.float()) * m.scaling                     # (out, in)
        merged[prefix + "weight"] = (w.float() + (delta.t() if m.fan_in_fan_out else delta)).to(w.dtype)
    return merged
