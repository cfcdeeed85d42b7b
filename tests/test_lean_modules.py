"""The lean RMSNorm / SwiGLU / rotary functions (utils/model/lean_modules.py) against the transformers modules,
and a model through our forward (decoder.py) against transformers': the same loss and gradients, fewer
activations kept."""
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import causal_lm_loss
from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import LEAN_CAUSAL_LM
from alpaca_rlhf.deepspeed_chat.training.utils.model.lean_modules import apply_rotary, rms_norm, swiglu, swiglu_down


class LeanNorm(nn.Module):
    """The norm's weight through rms_norm, as decoder_forward applies it."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return rms_norm(x, self.norm.weight, self.norm.variance_epsilon)


class LeanMLP(nn.Module):
    """The MLP through swiglu_down (a plain down projection) or swiglu, as decoder_forward applies it."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        gate, up, down = self.mlp.gate_proj(x), self.mlp.up_proj(x), self.mlp.down_proj
        if type(down) is nn.Linear:
            return swiglu_down(gate, up, down.weight, down.bias)
        return down(swiglu(gate, up))


def _lean(module):
    return LeanNorm(module) if isinstance(module, LlamaRMSNorm) else LeanMLP(module)


def _outputs_and_grads(module, x):
    x = x.clone().requires_grad_(True)
    out = module(x)
    torch.manual_seed(7)
    (out.float() * torch.randn(out.shape)).sum().backward()  # a loss that weighs every output differently
    return out, x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_and_mlp_equal_the_transformers_modules(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")
    for module in (LlamaRMSNorm(32, eps=1e-5), LlamaMLP(config)):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        module = module.to(dtype)
        lean = _lean(copy.deepcopy(module))
        x = torch.randn(3, 5, 32, dtype=dtype)
        tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        for got, want in zip(_outputs_and_grads(lean, x), _outputs_and_grads(module, x)):
            for g, w in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
                assert g.dtype == w.dtype
                torch.testing.assert_close(g, w, **tol)


def test_lean_model_trains_like_the_original_and_saves_fewer_activations():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    lean = LEAN_CAUSAL_LM["llama"](config)
    lean.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (2, 9))
    saved = {}
    for name, m in (("hf", model), ("lean", lean)):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = causal_lm_loss(m(input_ids=ids).logits, ids)
        loss.backward()
        saved[name] = (loss, sum(sizes))
    torch.testing.assert_close(saved["lean"][0], saved["hf"][0])
    for p, q in zip(model.parameters(), lean.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
    assert saved["lean"][1] < saved["hf"][1]


def test_lean_mlp_with_bias_frozen_or_lora_down_projection():
    """The down projection's weight gradient is computed by the lean MLP itself: bias, a frozen weight and a
    LoRA-wrapped projection (which keeps its own module call) must all still match."""
    from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import convert_linear_layer_to_lora
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, hidden_act="silu", mlp_bias=True)
    for variant in ("bias", "frozen", "lora"):
        mlp = LlamaMLP(config)
        if variant == "frozen":
            mlp.down_proj.weight.requires_grad_(False)
        if variant == "lora":
            convert_linear_layer_to_lora(mlp, "down_proj", lora_dim=4)
            torch.nn.init.normal_(mlp.down_proj.lora_B, std=0.3)
        lean = LeanMLP(copy.deepcopy(mlp))
        x = torch.randn(2, 3, 16)
        for got, want in zip(_outputs_and_grads(lean, x), _outputs_and_grads(mlp, x)):
            for g, w in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
                assert (g is None) == (w is None), variant
                if g is not None:
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rotary_embedding_is_bit_identical_to_llamas(dtype):
    """Forward and gradients equal q * cos + rotate_half(q) * sin exactly, on q/k laid out as LLaMA attention
    makes them (a transposed view) with left-padded position ids."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    B, T, D = 3, 7, 16
    q = torch.randn(B, T, 4, D, dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, 2, D, dtype=dtype).transpose(1, 2).requires_grad_(True)
    positions = (torch.arange(T).expand(B, T) - torch.tensor([[0], [2], [5]])).clamp(min=0)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    cos, sin = cos.to(dtype), sin.to(dtype)
    g_q, g_k = torch.randn_like(q), torch.randn_like(k)

    def grads(fn):
        out_q, out_k = fn(q, k, cos, sin)
        return (out_q, out_k) + torch.autograd.grad((out_q, out_k), (q, k), (g_q, g_k))

    def reference(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

    def lean(q, k, cos, sin):
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    for got, want in zip(grads(lean), grads(reference)):
        assert got.dtype == want.dtype and torch.equal(got, want)
