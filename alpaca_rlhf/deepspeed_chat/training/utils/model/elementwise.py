"""The elementwise math of the lean modules (RMSNorm, the SwiGLU product, rotary), as pure functions that run
as they are or fused by torch.compile.

Why: in eager PyTorch each of these is several passes over activations of the whole batch (an RMSNorm forward
is six operators, the SwiGLU backward five), and between the matrix products of a training or scoring pass
those passes are a large share of the time on small models. `compile_elementwise()` (the steps' flag
--compile_elementwise) has inductor fuse each function into one kernel for the rest of the process (the gain per
PPO iteration, bench/ab_flags.py, is in bench/RESULTS.md). The price is compilation on the first call of each
function, seconds to tens of seconds. Off by default.

The numbers: the eager functions are the lean modules' own (tests/test_lean_modules.py checks them against
the transformers modules); the fused kernels compute the same formulas, with float rounding free to differ
(tests/test_elementwise.py: equal within fp32 tolerance). Where compilation fails (no C++ compiler for
inductor's CPU kernels, an unsupported device) the process warns once and keeps the eager functions.
"""
import warnings
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(weight * x / rms(x), 1/rms(x)): normalised in float32 and cast back, as LlamaRMSNorm does.
    x (..., H) -> (..., H), rstd (..., 1) float32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """(d x, d weight) of rms_norm_forward from the input and the saved 1/rms; the normalised input is
    recomputed rather than kept."""
    x_hat = x.float() * rstd
    # weight: sum over every token of grad * x_hat (in x_hat's cast dtype, as autograd would)
    d_weight = (grad * x_hat.to(x.dtype)).reshape(-1, x.size(-1)).sum(0).to(weight.dtype)
    g = (grad * weight).float()                                         # d loss / d x_hat
    # d x = (g - x_hat * mean(g * x_hat)) / rms   (the mean over the hidden dimension)
    d_x = g.sub_(x_hat.mul_((g * x_hat).mean(-1, keepdim=True))).mul_(rstd)
    return d_x.to(x.dtype), d_weight


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def swiglu_backward(d_product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(d gate, d up) of silu(gate) * up, silu(gate) recomputed."""
    d_gate = torch.ops.aten.silu_backward(d_product * up, gate)
    d_up = F.silu(gate).mul_(d_product)
    return d_gate, d_up


def swiglu_backward_with_product(d_product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(d gate, d up, silu(gate) * up): the backward and the product a following linear map needs for its weight
    gradient, with silu(gate) computed once."""
    silu = F.silu(gate)
    product = silu * up
    d_gate = torch.ops.aten.silu_backward(d_product * up, gate)
    return d_gate, silu.mul_(d_product), product


def rotate_halves(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotary embedding on the two halves of the last dimension: (x1 c - x2 s, x2 c + x1 s), or the inverse
    rotation (x1 c + x2 s, x2 c - x1 s). Each product is rounded before the sum, as in LLaMA's
    q * cos + rotate_half(q) * sin, so the results are bit for bit the same. The halves are written in place
    of a concatenation (one pass fewer in eager mode)."""
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty(torch.broadcast_shapes(x.shape, cos_half.shape[:-1] + (2 * h,)), dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos_half, out=o1)
    torch.mul(x2, cos_half, out=o2)
    if inverse:
        o1.add_(x2 * sin_half)
        o2.sub_(x1 * sin_half)
    else:
        o1.sub_(x2 * sin_half)
        o2.add_(x1 * sin_half)
    return out


def _rotate_halves_for_compile(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor,
                               inverse: bool) -> torch.Tensor:
    """rotate_halves as one expression: inductor fuses it into one kernel, and rejects `out=` into views of a
    fresh tensor. The same values (tests/test_elementwise.py)."""
    h = x.size(-1) // 2
    x1, x2 = x[..., :h], x[..., h:]
    if inverse:
        return torch.cat([x1 * cos_half + x2 * sin_half, x2 * cos_half - x1 * sin_half], dim=-1)
    return torch.cat([x1 * cos_half - x2 * sin_half, x2 * cos_half + x1 * sin_half], dim=-1)


_EAGER: Dict[str, Callable] = {f.__name__: f for f in (rms_norm_forward, rms_norm_backward, swiglu_forward,
                                                        swiglu_backward, swiglu_backward_with_product,
                                                        rotate_halves)}
_TO_COMPILE = dict(_EAGER, rotate_halves=_rotate_halves_for_compile)

# What the lean modules call: kernels["rms_norm_forward"](x, weight, eps), ...
kernels: Dict[str, Callable] = dict(_EAGER)


def compile_elementwise() -> None:
    """Fuse every function of `kernels` with torch.compile (dynamic shapes: one compilation serves every batch
    and sequence length) for the rest of the process. Compilation happens on each function's first call."""
    for name, fn in _TO_COMPILE.items():
        kernels[name] = _with_eager_fallback(name, torch.compile(fn, dynamic=True))


def use_eager_elementwise() -> None:
    """Back to the eager functions (the default)."""
    kernels.update(_EAGER)


def compiled() -> bool:
    return any(kernels[name] is not fn for name, fn in _EAGER.items())


def _with_eager_fallback(name: str, compiled_fn: Callable) -> Callable:
    def run(*args):
        try:
            return compiled_fn(*args)
        except Exception as e:  # noqa: BLE001 - inductor fails in many ways (no compiler, unsupported op/device)
            if kernels.get(name) is run:
                warnings.warn(f"--compile_elementwise: torch.compile could not fuse {name} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the elementwise "
                              "math runs eagerly from here on", RuntimeWarning, stacklevel=2)
                use_eager_elementwise()
            return _EAGER[name](*args)  # a genuine error in the inputs raises here again
    return run
