"""The last decoder layer computed only at the positions whose outputs are read.

Why: the PPO passes read their model's output at a suffix of the sequence only: the actor's and the
reference's log-probs at positions P - 1 .. L - 2 (those predicting answer tokens), the critic's values at the
same positions, the reward model's score at each row's last real token. Every layer but the last must still
run at every position, since later positions attend to the keys and values of earlier ones; in the last layer
only the keys and values are needed there. Its query projection, attention output, o_proj and MLP at the
positions before the suffix are dead work: with 64-token prompts and 64-token answers, about half of the last
layer's FLOPs in each forward and backward (on the 4-layer `tiny` benchmark model an eighth of the whole
body's, on the 8-layer `small` one a sixteenth; the reward model, which reads one position per row, saves
nearly the whole layer bar its k and v). Measured per PPO iteration of the benchmark's reference setting
(bench/ab_flags.py against the commit before, interleaved): 1.094x faster on `tiny`, 1.042x on `small`,
1.049x on `small` with LoRA (bench/RESULTS.md). The gain is one layer in N, so it shrinks with depth.

`last_layer_from(model, start)` switches the last layer to that computation for the block: positions
>= start get exactly what the full layer gives (tests/test_last_layer.py: outputs and gradients), the positions
before pass through as the layer's input, so shapes stay the same and nothing downstream changes; only their
values are meaningless, which is why only readers of the suffix may use it.

Plain LLaMA decoder layers only (LLaMA attention and MLP, SDPA or eager attention, no KV cache, no gradient
checkpointing of that layer); for anything else the context does nothing.
"""
import contextlib
import functools

import torch
from torch import nn

from .lean_modules import apply_rotary

try:
    from transformers.models.llama import modeling_llama
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer
except ImportError:  # pragma: no cover - transformers without LLaMA
    modeling_llama = LlamaAttention = LlamaDecoderLayer = None

_ATTENTION = ("sdpa", "eager")  # implementations whose 4-D masks can be sliced by query rows


def _decoder_layers(model: nn.Module):
    """The decoder layers of a causal LM, a bare decoder or a RewardModel (DeepSpeed engines unwrapped)."""
    model = getattr(model, "module", model)
    for name in ("rwtransformer", "model"):                            # RewardModel, *ForCausalLM
        if isinstance(getattr(model, name, None), nn.Module):
            model = getattr(model, name)
            break
    return getattr(model, "layers", None)


def _last_layer(model: nn.Module):
    """The last decoder layer of `model`, or None when it has no decoder layers."""
    layers = _decoder_layers(model)
    return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None


def _prunable_layer(model: nn.Module):
    """The last decoder layer when it can run from a position on, else None."""
    layer = _last_layer(model)
    if LlamaDecoderLayer is None or type(layer) is not LlamaDecoderLayer:
        return None
    if type(layer.self_attn) is not LlamaAttention:
        return None
    if layer.gradient_checkpointing and layer.training:  # the checkpointing wrapper is the class's forward
        return None
    if getattr(layer.self_attn.config, "_attn_implementation", "eager") not in _ATTENTION:
        return None
    if "forward" in layer.__dict__:  # someone else's replacement is in place: leave it
        return None
    return layer


def _forward_from(layer: nn.Module, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                  past_key_values=None, use_cache=False, position_embeddings=None, start: int = 0, **kwargs):
    """LlamaDecoderLayer.forward computing the positions start .. T - 1 only (queries, o_proj, MLP); positions
    before start are returned as they came in. hidden_states (B, T, H)."""
    if past_key_values is not None:  # a cache wants every position's layer output for the steps after
        return LlamaDecoderLayer.forward(layer, hidden_states, attention_mask, position_ids, past_key_values,
                                         use_cache, position_embeddings, **kwargs)
    attn = layer.self_attn
    B, T, _ = hidden_states.shape
    S = min(start, T - 1)                                              # keep at least one position
    D = attn.head_dim
    h = layer.input_layernorm(hidden_states)                           # (B, T, H): k and v need every position
    q = attn.q_proj(h[:, S:]).view(B, T - S, -1, D).transpose(1, 2)    # (B, nh, T-S, D): queries of the suffix
    k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)               # (B, nkv, T, D)
    v = attn.v_proj(h).view(B, T, -1, D).transpose(1, 2)
    cos, sin = position_embeddings                                     # (B, T, D)
    q = apply_rotary(q, cos[:, S:], sin[:, S:])
    k = apply_rotary(k, cos, sin)
    if attention_mask is None:  # no padding: plain causal, query row i (position S + i) sees keys 0 .. S + i
        keys = torch.arange(T, device=h.device)
        mask = (keys[None, :] <= keys[S:, None])[None, None]           # (1, 1, T-S, T) bool, True = attend
    else:                       # the model's 4-D mask (bool or additive), (B, 1, T, T): the suffix's rows
        mask = attention_mask[:, :, S:, :]
    interface = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                     modeling_llama.eager_attention_forward)
    out, _ = interface(attn, q, k, v, mask, dropout=attn.attention_dropout if attn.training else 0.0,
                       scaling=attn.scaling, **kwargs)                 # (B, T-S, nh, D)
    x = hidden_states[:, S:] + attn.o_proj(out.reshape(B, T - S, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return torch.cat([hidden_states[:, :S], x], dim=1)                 # (B, T, H); [:, :S] not computed


@contextlib.contextmanager
def last_layer_from(model: nn.Module, start: int):
    """Inside the block, forwards of `model` compute its last decoder layer only at positions >= start (the
    earlier positions' outputs are the layer's input, not the model's output: read only the suffix). Does
    nothing where the model does not qualify (see the module docstring) or start <= 0."""
    layer = _prunable_layer(model) if start > 0 else None
    if layer is None:
        yield model
        return
    layer.forward = functools.partial(_forward_from, layer, start=int(start))
    try:
        yield model
    finally:
        layer.__dict__.pop("forward", None)


def active_start(model: nn.Module) -> int:
    """The position the last decoder layer of `model` runs from now (inside `last_layer_from`), else 0
    (for FLOP meters)."""
    layer = _last_layer(model)
    forward = layer.__dict__.get("forward") if layer is not None else None
    if isinstance(forward, functools.partial) and forward.func is _forward_from:
        return forward.keywords["start"]
    return 0
