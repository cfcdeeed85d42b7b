"""The elementwise math of the lean modules (utils/model/elementwise.py): the eager functions against autograd,
the compile-ready rotary against the eager one bit for bit, the kernels fused by torch.compile against the eager
ones through a model's forward and backward, and the fallback when compilation fails."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from alpaca_rlhf.deepspeed_chat.training.utils.model import elementwise
from alpaca_rlhf.deepspeed_chat.training.utils.model.elementwise import (
    _rotate_halves_for_compile, compile_elementwise, compiled, rms_norm_backward, rms_norm_forward, rotate_halves,
    swiglu_backward, swiglu_backward_with_product, swiglu_forward, use_eager_elementwise)
from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import LEAN_CAUSAL_LM
from alpaca_rlhf.deepspeed_chat.training.utils.model.lean_modules import rms_norm, swiglu_down


@pytest.fixture
def eager_afterwards():
    """Whatever a test switches on, the process goes back to the eager functions (the default)."""
    yield
    use_eager_elementwise()


def test_swiglu_backward_forms_equal_autograd():
    torch.manual_seed(0)
    gate, up, d_product = torch.randn(3, 7, 40), torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    (F.silu(g) * u * d_product).sum().backward()
    d_gate, d_up = swiglu_backward(d_product, gate, up)
    torch.testing.assert_close(d_gate, g.grad)
    torch.testing.assert_close(d_up, u.grad)
    # the form that also returns the product: the same gradients, and the product equals the forward's
    d_gate2, d_up2, product = swiglu_backward_with_product(d_product, gate, up)
    assert torch.equal(d_gate2, d_gate) and torch.equal(d_up2, d_up)
    assert torch.equal(product, swiglu_forward(gate, up))


def test_rms_norm_forward_and_backward_equal_autograd_in_float64():
    torch.manual_seed(0)
    x, weight, grad = torch.randn(4, 6, 32), torch.randn(32) * 0.3 + 1, torch.randn(4, 6, 32)
    xr, wr = x.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = wr * xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6)
    (ref * grad.double()).sum().backward()
    y, rstd = rms_norm_forward(x, weight, 1e-6)
    assert rstd.shape == (4, 6, 1)
    torch.testing.assert_close(y, ref.float().detach())
    d_x, d_weight = rms_norm_backward(grad, x, weight, rstd)
    torch.testing.assert_close(d_x, xr.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_weight, wr.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inverse", [False, True])
def test_compile_ready_rotary_equals_the_eager_one_bit_for_bit(inverse):
    torch.manual_seed(0)
    # q as LLaMA attention lays it out: (B, T, heads * D) viewed (B, heads, T, D), strided; cos/sin (B, 1, T, D/2)
    q = torch.randn(2, 9, 4 * 16).view(2, 9, 4, 16).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 9, 8), torch.randn(2, 1, 9, 8)
    assert torch.equal(_rotate_halves_for_compile(q, cos, sin, inverse), rotate_halves(q, cos, sin, inverse))


def test_frozen_down_projection_gets_no_weight_gradient_and_the_rest_is_unchanged():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, hidden_act="silu"))
    mlp.down_proj.weight.requires_grad_(False)  # LoRA's --only_optimize_lora freezes it
    lean = copy.deepcopy(mlp)
    x = torch.randn(2, 5, 16)
    (mlp(x) * torch.arange(16.0)).sum().backward()
    out = swiglu_down(lean.gate_proj(x), lean.up_proj(x), lean.down_proj.weight, lean.down_proj.bias)
    (out * torch.arange(16.0)).sum().backward()
    assert lean.down_proj.weight.grad is None
    for name in ("gate_proj", "up_proj"):
        torch.testing.assert_close(getattr(lean, name).weight.grad, getattr(mlp, name).weight.grad)


def _forward_backward(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits * torch.linspace(-1, 1, logits.size(-1))).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_kernels_match_the_eager_ones_through_a_model(eager_afterwards):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LEAN_CAUSAL_LM["llama"](config)
    for length in (7, 12):  # dynamic shapes: one compilation serves both lengths
        ids = torch.randint(0, 64, (3, length))
        use_eager_elementwise()
        want_logits, want_grads = _forward_backward(model, ids)
        compile_elementwise()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would fail the test
            got_logits, got_grads = _forward_backward(model, ids)
        assert compiled()
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_failed_compilation_warns_once_and_runs_eagerly(monkeypatch, eager_afterwards):
    def compile_without_a_compiler(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(elementwise.torch, "compile", compile_without_a_compiler)
    compile_elementwise()
    assert compiled()
    x, weight = torch.randn(2, 3, 8, requires_grad=True), torch.ones(8, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="could not fuse rms_norm_forward .*no working C\\+\\+ compiler") as caught:
        y = rms_norm(x, weight, 1e-6)
        y.sum().backward()  # the backward already finds the eager functions back in place
    assert len(caught) == 1 and not compiled()
    torch.testing.assert_close(y, rms_norm_forward(x.detach(), weight.detach(), 1e-6)[0])
