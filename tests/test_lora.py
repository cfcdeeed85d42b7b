"""LoRA: exact start, fuse/unfuse equivalence, what gets trained, merge on export, and errors."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.module.lora import (
    LoRALinear, convert_linear_layer_to_lora, convert_lora_to_linear_layer, lora_disabled, lora_fused,
    merge_lora_state_dict, only_optimize_lora_parameters)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)


IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 41]])


def test_zero_b_gives_identical_outputs():
    model = tiny_llama()
    before = model(IDS).logits
    convert_linear_layer_to_lora(model, "q_proj,k_proj", lora_dim=8)
    assert torch.equal(model(IDS).logits, before)
    n_lora = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert n_lora == 4  # 2 layers x (q_proj, k_proj)


def test_lora_forward_matches_dense_formula():
    layer = torch.nn.Linear(6, 5)
    lora = LoRALinear(layer, lora_dim=2, lora_scaling=1.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 6)
    expected = x @ layer.weight.T + layer.bias + (x @ lora.lora_A.T @ lora.lora_B.T) * 0.5  # scaling 1/2
    torch.testing.assert_close(lora(x), expected)


@pytest.mark.parametrize("trainable_base", [False, True])
def test_folded_forward_and_backward_equal_the_two_branch_form(trainable_base):
    """LoRALinear folds s B A into W for its forward; values and every gradient must equal the textbook
    two-branch form x W^T + b + s (x A^T) B^T under autograd (float64, 3-D input)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10).double()
    lora = LoRALinear(layer, lora_dim=3, lora_scaling=2.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    lora.weight.requires_grad_(trainable_base)
    lora.bias.requires_grad_(trainable_base)
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 5, 10, dtype=torch.float64)
    params = [x, lora.lora_A, lora.lora_B] + ([lora.weight, lora.bias] if trainable_base else [])
    assert lora.folds()
    folded = lora(x)
    got = torch.autograd.grad(folded, params, g)
    reference = (x @ lora.weight.T + lora.bias + (x @ lora.lora_A.T @ lora.lora_B.T) * lora.scaling)
    expected = torch.autograd.grad(reference, params, g)
    torch.testing.assert_close(folded, reference)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_fused_equals_unfused_and_unfuse_restores_weights():
    model = tiny_llama()
    convert_linear_layer_to_lora(model, "q_proj,k_proj", lora_dim=4)
    randomize_lora(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unfused = model(IDS).logits
    with lora_fused(model):
        torch.testing.assert_close(model(IDS).logits, unfused, rtol=1e-5, atol=1e-5)
        with lora_disabled(model):  # adapters off while fused: the base model again
            fused_base = model(IDS).logits
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    with lora_disabled(model):
        torch.testing.assert_close(model(IDS).logits, fused_base, rtol=1e-5, atol=1e-5)


def test_disabled_lora_is_the_base_model():
    model = tiny_llama()
    base = model(IDS).logits
    convert_linear_layer_to_lora(model, "q_proj", lora_dim=4)
    randomize_lora(model)
    assert not torch.allclose(model(IDS).logits, base)
    with lora_disabled(model):
        assert torch.equal(model(IDS).logits, base)
    assert not torch.allclose(model(IDS).logits, base)  # switched back on


def test_only_lora_and_forced_parameters_require_grad():
    model = tiny_llama()
    convert_linear_layer_to_lora(model, "q_proj,k_proj", lora_dim=4)
    only_optimize_lora_parameters(model, force_optimize_params=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n} | {"lm_head.weight"}
    assert all(("q_proj" in n or "k_proj" in n or n == "lm_head.weight") for n in trainable)


def test_unmatched_module_names_are_an_error():
    with pytest.raises(ConfigError, match="matches no linear layer"):
        convert_linear_layer_to_lora(tiny_llama(), "query_key_value", lora_dim=4)
    with pytest.raises(ConfigError):
        convert_linear_layer_to_lora(tiny_llama(), " , ", lora_dim=4)


def test_merged_state_dict_loads_into_plain_model_with_same_outputs():
    model = tiny_llama()
    convert_linear_layer_to_lora(model, "q_proj,k_proj", lora_dim=4)
    randomize_lora(model)
    expected = model(IDS).logits
    merged = merge_lora_state_dict(model.state_dict(), model)
    assert not any("lora_" in k for k in merged)
    plain = tiny_llama(seed=5)
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_convert_back_to_linear_keeps_outputs():
    model = tiny_llama()
    convert_linear_layer_to_lora(model, "q_proj", lora_dim=4)
    randomize_lora(model)
    expected = model(IDS).logits
    convert_lora_to_linear_layer(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_moves_only_lora_weights():
    model = tiny_llama()
    convert_linear_layer_to_lora(model, "q_proj,k_proj", lora_dim=4)
    only_optimize_lora_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # B is zero at first, so A only gets a gradient from the second step on
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def test_conv1d_lora_equals_the_dense_formula_and_merges():
    """GPT-2's c_attn is a Conv1D (weight (in, out)): the wrapped layer computes x W + b + s (x A^T) B^T, folded
    and unfolded, fused and unfused, and its merged state dict loads into the plain GPT-2 with the same logits."""
    model = tiny_gpt2()
    before = model(IDS).logits
    convert_linear_layer_to_lora(model, "c_attn", lora_dim=4)
    assert torch.equal(model(IDS).logits, before)  # B = 0
    randomize_lora(model)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    x = torch.randn(2, 3, 32)
    expected = x @ layer.weight + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected)
    lora_logits = model(IDS).logits
    assert not torch.allclose(lora_logits, before)
    with lora_fused(model):
        torch.testing.assert_close(model(IDS).logits, lora_logits, rtol=1e-5, atol=1e-5)
    plain = tiny_gpt2(seed=5)
    plain.load_state_dict(merge_lora_state_dict(model.state_dict(), model))
    torch.testing.assert_close(plain(IDS).logits, lora_logits, rtol=1e-5, atol=1e-5)
    convert_lora_to_linear_layer(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(model(IDS).logits, lora_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfuse_restores_the_base_weights_bit_for_bit(dtype):
    """W + d - d is not W in floating point (in bf16 it is off by a rounding almost everywhere); the base doubles
    as the reference model, so three fuse/unfuse rounds (three rollouts) must leave it exactly as it was."""
    model = tiny_llama().to(dtype)
    convert_linear_layer_to_lora(model, "q_proj,k_proj", lora_dim=8)
    randomize_lora(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    for _ in range(3):
        with lora_fused(model):
            assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                                   base["model.layers.0.self_attn.q_proj.weight"])
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k]), k


def test_baichuan_style_packed_projection_is_wrapped_by_substring():
    """Baichuan packs q, k and v into one linear named W_pack: --lora_module_name W_pack wraps exactly those, the
    merged export equals the dense formula, and the output does not change while B is zero."""
    torch.manual_seed(0)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_pack = nn.Linear(8, 24, bias=False)
            self.o_proj = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            q, k, v = self.W_pack(x).chunk(3, dim=-1)
            return self.o_proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)

    model = nn.Sequential(Attention(), Attention())
    x = torch.randn(2, 5, 8)
    before = model(x)
    convert_linear_layer_to_lora(model, "W_pack", lora_dim=4)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["0.W_pack", "1.W_pack"]
    torch.testing.assert_close(model(x), before)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.3)
    after = model(x)
    state = merge_lora_state_dict({k: v.clone() for k, v in model.state_dict().items()}, model)
    plain = nn.Sequential(Attention(), Attention())
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), after, rtol=1e-5, atol=1e-6)
