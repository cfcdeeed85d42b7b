"""RMSNorm, rotary and the SwiGLU product with hand-written backwards that keep fewer activations alive.

Why: autograd keeps every intermediate its backward formulas name. In a LLaMA layer that includes the
normalised input of each RMSNorm before the weight is applied (one hidden-size tensor per norm) and
silu(gate) next to gate and up (one intermediate-size tensor). These functions keep only the inputs (and
the per-token 1/rms) and recompute the rest in the backward, one extra elementwise pass; where the MLP's down
projection is a plain linear, its input silu(gate) * up is recomputed too. The rotary embedding's backward is
the inverse rotation (no cat, neg or full-size products kept). PPO holds the actor's and the critic's activations
at once; the saved memory is measured in bench/RESULTS.md.

Same numbers as the transformers modules (tests/test_lean_modules.py: outputs and gradients, fp32 and bf16).
decoder.py's decoder_forward calls them; the elementwise math itself lives in elementwise.py, as pure functions
that --compile_elementwise fuses.
"""
import torch
import torch.nn.functional as F

from .elementwise import kernels


class _RMSNorm(torch.autograd.Function):
    """y = w * (x / rms(x)) computed in float32 and cast back, as LlamaRMSNorm does; saves x and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = kernels["rms_norm_forward"](x, weight, eps)              # rstd (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        d_x, d_weight = kernels["rms_norm_backward"](grad, x, weight, rstd)
        return d_x, d_weight, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up; saves gate and up, recomputes silu(gate) in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return kernels["swiglu_forward"](gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return kernels["swiglu_backward"](grad, gate, up)


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) for a plain linear `down`: saves gate and up only. The product, which autograd
    would keep as the linear's input for its weight gradient, is recomputed in the backward. `output`, when
    given, is that projection's result computed before (the rollout's own forward) and is returned as it is."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, output=None):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        if output is not None:  # the projection's result is already known (forward_replay.py): no matmul
            return output
        return F.linear(kernels["swiglu_forward"](gate, up), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_rows = grad.reshape(-1, grad.size(-1))                         # (tokens, out)
        d_gate = d_up = d_weight = d_bias = product = None
        if need_gate or need_up:
            d_product = grad @ weight                                       # (..., intermediate)
            if need_weight:  # the product for the weight gradient comes out of the same pass
                d_gate, d_up, product = kernels["swiglu_backward_with_product"](d_product, gate, up)
            else:
                d_gate, d_up = kernels["swiglu_backward"](d_product, gate, up)
        if need_weight:                                                     # (out, in) = grad^T @ product
            if product is None:
                product = kernels["swiglu_forward"](gate, up)
            d_weight = grad_rows.t() @ product.reshape(-1, product.size(-1))
        if need_bias and ctx.has_bias:
            d_bias = grad_rows.sum(0)
        return d_gate if need_gate else None, d_up if need_up else None, d_weight, d_bias, None


class _Rotary(torch.autograd.Function):
    """The rotary embedding with a backward that is the inverse rotation (no cat, neg or full-size products
    kept). cos/sin are LLaMA's, whose two halves are equal; only the first halves are used and saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.size(-1) // 2
        cos_half, sin_half = cos[..., :h], sin[..., :h]
        ctx.save_for_backward(cos_half, sin_half)
        return kernels["rotate_halves"](x, cos_half, sin_half, False)

    @staticmethod
    def backward(ctx, grad):
        cos_half, sin_half = ctx.saved_tensors
        return kernels["rotate_halves"](grad, cos_half, sin_half, True), None, None


def apply_rotary(x, cos, sin, unsqueeze_dim=1):
    """The rotary embedding of one tensor (B, heads, T, D) with cos/sin (B, T, D), as transformers'
    apply_rotary_pos_emb gives it for q or k (q and k may cover different positions)."""
    return _Rotary.apply(x, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias=None, output=None) -> torch.Tensor:
    """F.linear(silu(gate) * up, weight, bias), keeping only gate and up for the backward; `output`: that
    result already computed (returned as it is, with the same backward)."""
    return _SwiGLUDown.apply(gate, up, weight, bias, output)
