"""decoder_forward (utils/model/decoder.py), our forward of the LLaMA-like families, against the transformers
forward: the same logits and gradients for LLaMA, Mistral and Qwen2, with left and right padding, grouped-query
attention, SDPA and eager attention, gradient checkpointing and bf16; the last layer from a position on (the
positions read get the full layer's outputs, and the layer really skips the rest); the reward model's values;
and the transformers path wherever ours does not apply."""
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaModel, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from alpaca_rlhf.deepspeed_chat.training.utils.model import decoder
from alpaca_rlhf.deepspeed_chat.training.utils.model.decoder import (LEAN_CAUSAL_LM, LeanCausalLM, causal_lm_logits,
                                                                     runs)
from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import RewardModel

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _pair(family="llama", attention="sdpa", kv_heads=2, dtype=torch.float32, **extra):
    """(transformers' model, ours) with the same weights."""
    config_class, model_class = FAMILIES[family]
    config = config_class(**SIZES, num_key_value_heads=kv_heads, attn_implementation=attention, **extra)
    torch.manual_seed(0)
    theirs = model_class(config).to(dtype)
    ours = LEAN_CAUSAL_LM[family](config).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _batch(padded: bool):
    torch.manual_seed(1)
    B, P, A = 4, 9, 7
    ids = torch.randint(3, 96, (B, P + A))
    mask = torch.ones(B, P + A, dtype=torch.long)
    if padded:
        for row, (left, right) in enumerate(((0, 0), (3, 2), (1, 5), (6, 0))):  # left-padded prompts, short answers
            mask[row, :left] = 0
            if right:
                mask[row, -right:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, P


def _logits_and_grads(model, ids, mask, positions, start):
    model.zero_grad()
    logits = causal_lm_logits(model, ids, mask, positions, from_position=start)     # (B, T - start, V)
    # a loss over the real positions only (padding positions' outputs are never read), weighing each differently
    (logits.float() * torch.linspace(-1, 1, logits.size(-1)) * mask[:, start:, None]).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(theirs, ours, ids, mask, positions, start, relative=None):
    """Equal to fp32 rounding, or with `relative` (bf16): every tensor within that relative error in norm."""
    want, want_grads = _logits_and_grads(theirs, ids, mask, positions, start)
    got, got_grads = _logits_and_grads(ours, ids, mask, positions, start)
    assert got.shape == want.shape == (ids.size(0), ids.size(1) - start, SIZES["vocab_size"])
    keep = mask[:, start:].bool()
    pairs = [("logits", got[keep], want[keep])] + [(n, got_grads[n], g) for n, g in want_grads.items()]
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, g, w in pairs:
        if relative is None:
            tol = (1e-5, 1e-5) if name == "logits" else (1e-4, 1e-5)
            torch.testing.assert_close(g, w, rtol=tol[0], atol=tol[1], msg=name)
        else:
            assert g.dtype == w.dtype
            error = (g.float() - w.float()).norm() / w.float().norm()
            assert error < relative, (name, error.item())


@pytest.mark.parametrize("family,attention,padded,kv_heads", [
    ("llama", "sdpa", True, 2), ("llama", "sdpa", False, 2), ("llama", "eager", True, 4), ("llama", "eager", False, 1),
    ("mistral", "sdpa", True, 2), ("qwen2", "sdpa", True, 2), ("qwen2", "eager", False, 4)])
def test_our_forward_gives_the_transformers_logits_and_gradients(family, attention, padded, kv_heads):
    theirs, ours = _pair(family, attention, kv_heads)
    theirs.train(), ours.train()
    ids, mask, positions, P = _batch(padded)
    assert runs(ours, ids.size(1)) and not isinstance(theirs, LeanCausalLM)
    for start in (0, P - 1, ids.size(1) - 1):       # every position; the answer positions; the last one alone
        _assert_same(theirs, ours, ids, mask, positions, start)


def test_bf16_and_gradient_checkpointing_give_the_same_numbers():
    theirs, ours = _pair(dtype=torch.bfloat16)
    ids, mask, positions, P = _batch(padded=True)
    theirs.train(), ours.train()
    _assert_same(theirs, ours, ids, mask, positions, P - 1, relative=2e-2)
    theirs, ours = _pair()
    for model in (theirs, ours):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    recomputed = []
    hook = ours.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, a, out: recomputed.append(out.shape))
    _assert_same(theirs, ours, ids, mask, positions, P - 1)
    hook.remove()
    assert len(recomputed) == 2                     # the layer ran again in the backward: checkpointed


def test_the_last_layer_really_skips_the_prefix():
    """The last layer's queries, o and MLP see the suffix only (the work saved); k and v every position."""
    _, model = _pair()
    ids, mask, positions, P = _batch(padded=False)
    rows = {}
    last = model.model.layers[-1]
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: rows.__setitem__(name, out.size(1)))
             for name, module in (("q", last.self_attn.q_proj), ("k", last.self_attn.k_proj),
                                  ("gate", last.mlp.gate_proj))]
    with torch.no_grad():
        causal_lm_logits(model, ids, mask, positions, from_position=P - 1)
    for h in hooks:
        h.remove()
    T = ids.size(1)
    assert rows == {"q": T - (P - 1), "k": T, "gate": T - (P - 1)}


def test_cached_calls_go_to_the_transformers_forward():
    """generate-style calls (a cache, logits_to_keep, labels) take transformers' path with the same results."""
    theirs, ours = _pair()
    ids, mask, positions, _ = _batch(padded=True)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        got = ours(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        assert got.past_key_values is not None
        torch.testing.assert_close(got.logits, want.logits)
        loss = ours(input_ids=ids, attention_mask=mask, labels=ids).loss
        torch.testing.assert_close(loss, theirs(input_ids=ids, attention_mask=mask, labels=ids).loss)
        assert ours.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_where_ours_does_not_apply_the_transformers_forward_runs():
    """GPT-2, a sliding window shorter than the sequence, a flash-attention implementation: not ours, and
    causal_lm_logits still gives the suffix's logits."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    assert not runs(gpt2)
    ids, mask, positions, P = _batch(padded=False)
    with torch.no_grad():
        full = gpt2(input_ids=ids).logits
        torch.testing.assert_close(causal_lm_logits(gpt2, ids, mask, from_position=P - 1), full[:, P - 1:])
    _, windowed = _pair("mistral", sliding_window=8)
    assert runs(windowed, 8) and not runs(windowed, ids.size(1))
    windowed.config._attn_implementation = "flash_attention_2"
    assert not runs(windowed, 8)
    with pytest.raises(ValueError, match="replayed forward"):
        causal_lm_logits(gpt2, ids, mask, replay=object())


def test_partitioned_weights_are_used_through_their_modules(monkeypatch):
    """Under ZeRO-3 (parameters carry ds_id) the norms and the down projection are called as modules, whose
    calls gather their weights: the same numbers."""
    theirs, ours = _pair()
    ids, mask, positions, P = _batch(padded=True)
    calls = []
    norm = ours.model.layers[0].post_attention_layernorm
    hook = norm.register_forward_hook(lambda m, a, out: calls.append(1))
    monkeypatch.setattr(ours.model.embed_tokens.weight, "ds_id", 0, raising=False)
    _assert_same(theirs, ours, ids, mask, positions, P - 1)
    hook.remove()
    assert calls


def test_a_reward_models_values_from_a_position_on():
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES, num_key_value_heads=2)
    body = LlamaModel(config)
    reward = RewardModel(body).eval()
    torch.nn.init.normal_(reward.v_head.weight)
    ids, mask, positions, P = _batch(padded=True)
    with torch.no_grad():
        want = reward.v_head(body(input_ids=ids, attention_mask=mask, position_ids=positions)[0])   # (B, T)
        full = reward.values(ids, mask)
        part = reward.values(ids, mask, from_position=P)
        scores = reward.forward_value(ids, mask, from_position=P)["chosen_end_scores"]
    assert part.shape == (ids.size(0), ids.size(1) - P)
    keep = mask.bool()
    torch.testing.assert_close(full[keep], want[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part[mask[:, P:].bool()], want[:, P:][mask[:, P:].bool()], rtol=1e-5, atol=1e-5)
    last = mask.size(1) - 1 - mask.flip(-1).argmax(-1)
    torch.testing.assert_close(scores, want.gather(-1, last[:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)


def test_create_hf_model_loads_our_class_for_the_llama_like_families(tmp_path):
    from transformers import AutoModelForCausalLM

    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import create_hf_model
    for family, (config_class, model_class) in FAMILIES.items():
        path = tmp_path / family
        model_class(config_class(**SIZES, num_key_value_heads=2)).save_pretrained(path)
        model = create_hf_model(AutoModelForCausalLM, str(path))
        assert isinstance(model, LeanCausalLM) and isinstance(model, model_class), family
        assert model.config.architectures == [model_class.__name__]
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)).save_pretrained(path)
    assert type(create_hf_model(AutoModelForCausalLM, str(path))) is GPT2LMHeadModel
    assert decoder.LEAN_CAUSAL_LM["llama"].__name__ == "LeanLlamaForCausalLM"
