"""The last decoder layer computed from a position on (utils/model/last_layer.py) against the full layer: the
same outputs and gradients at the positions read, with left and right padding, grouped-query attention, SDPA
and eager attention, a reward model's body; and nothing changed where it does not apply."""
import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from alpaca_rlhf.deepspeed_chat.training.utils.model.last_layer import last_layer_from
from alpaca_rlhf.deepspeed_chat.training.utils.model.lean_modules import use_lean_modules
from alpaca_rlhf.deepspeed_chat.training.utils.model.reward_model import RewardModel


def _config(attention="sdpa", kv_heads=2):
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                       attn_implementation=attention)


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


def _logits_and_grads(model, ids, mask, positions, start, pruned):
    model.zero_grad()
    with (last_layer_from(model, start) if pruned else contextlib.nullcontext()):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    suffix = logits[:, start:]                                         # the only positions a reader may use
    (suffix * torch.linspace(-1, 1, suffix.size(-1))).sum().backward()
    return suffix.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention,padded,kv_heads,lean", [
    ("sdpa", True, 2, True), ("sdpa", False, 2, True), ("eager", True, 4, False), ("eager", False, 1, True)])
def test_the_suffix_gets_the_full_layers_outputs_and_gradients(attention, padded, kv_heads, lean):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(attention, kv_heads)).train()
    if lean:
        use_lean_modules(model)
    ids, mask, positions, P = _batch(padded)
    for start in (P - 1, ids.size(1) - 1):                             # the answer positions; the last one alone
        full, full_grads = _logits_and_grads(model, ids, mask, positions, start, pruned=False)
        part, part_grads = _logits_and_grads(model, ids, mask, positions, start, pruned=True)
        keep = mask[:, start:].bool()                                   # padded query rows attend to nothing real
        torch.testing.assert_close(part[keep], full[keep], rtol=1e-5, atol=1e-5)
        assert part_grads.keys() == full_grads.keys()
        for name, grad in full_grads.items():
            torch.testing.assert_close(part_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert "forward" not in model.model.layers[-1].__dict__             # put back after the block


def test_the_last_layer_really_skips_the_prefix():
    """The pruned layer's projections see the suffix only (that is the work saved), and the model's output at
    the prefix is then not the full model's: readers must keep to the suffix."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    ids, mask, positions, P = _batch(padded=False)
    rows = []
    hook = model.model.layers[-1].mlp.gate_proj.register_forward_hook(lambda m, args, out: rows.append(out.size(1)))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        with last_layer_from(model, P - 1):
            part = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            cached = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).logits
    hook.remove()
    assert rows == [ids.size(1), ids.size(1) - (P - 1), ids.size(1)]  # with a KV cache: the full layer
    torch.testing.assert_close(cached, full)
    assert not torch.allclose(part[:, :P - 1], full[:, :P - 1])
    torch.testing.assert_close(part[:, P - 1:], full[:, P - 1:], rtol=1e-5, atol=1e-5)


def test_a_reward_models_values_from_a_position_on():
    torch.manual_seed(0)
    reward = RewardModel(LlamaModel(_config())).eval()
    torch.nn.init.normal_(reward.v_head.weight)
    ids, mask, _, P = _batch(padded=True)
    with torch.no_grad():
        full = reward.values(ids, mask)
        with last_layer_from(reward, P):
            part = reward.values(ids, mask)
    keep = mask[:, P:].bool()
    torch.testing.assert_close(part[:, P:][keep], full[:, P:][keep], rtol=1e-5, atol=1e-5)


def test_nothing_changes_where_it_does_not_apply():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with last_layer_from(model, 5):                                     # checkpointing wraps the class's forward
        assert "forward" not in model.model.layers[-1].__dict__
    model.eval()
    with last_layer_from(model, 0):                                     # nothing before the suffix
        assert "forward" not in model.model.layers[-1].__dict__
    with last_layer_from(torch.nn.Linear(2, 2), 3):                     # not a decoder
        pass
    with pytest.raises(KeyError):                                       # an error inside still restores the layer
        with last_layer_from(model, 5):
            assert "forward" in model.model.layers[-1].__dict__
            raise KeyError("inside")
    assert "forward" not in model.model.layers[-1].__dict__
