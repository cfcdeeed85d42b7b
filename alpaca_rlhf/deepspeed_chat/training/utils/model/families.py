"""The LLaMA-like model families whose decoder layer our own code computes (decoder.py's forward, the lean decode
step of llama_decoder.py): LLaMA, Mistral and Qwen2. One layer shape for all three: RMSNorm, rotary, attention with
grouped-query heads, SwiGLU; Qwen2 adds q/k/v biases, Mistral and Qwen2 may have a sliding window. Every other
family (GPT-2, OPT, Baichuan, remote code) keeps the transformers forward.
"""
import importlib
from typing import NamedTuple, Optional

from torch import nn


class Family(NamedTuple):
    model_type: str      # config.model_type
    causal_lm: type      # *ForCausalLM
    body: type           # *Model, the decoder without the LM head
    attention: type
    mlp: type


def _family(model_type: str, prefix: str) -> Optional[Family]:
    """The classes of one family, or None where this transformers lacks it."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        return Family(model_type, *(getattr(module, prefix + name) for name in ("ForCausalLM", "Model", "Attention",
                                                                                 "MLP")))
    except (ImportError, AttributeError):  # pragma: no cover - an older transformers
        return None


# the class names are stable across transformers 4.4x and 5.x
LLAMA = _family("llama", "Llama")
FAMILIES = [f for f in (LLAMA, _family("mistral", "Mistral"), _family("qwen2", "Qwen2")) if f is not None]


def family_of(model: nn.Module) -> Optional[Family]:
    """The family of a causal LM or of its decoder body, or None."""
    return next((f for f in FAMILIES if isinstance(model, (f.causal_lm, f.body))), None)


def plain_layers(body: nn.Module, family: Family, max_length: Optional[int]) -> bool:
    """Whether every decoder layer of `body` is the family's own attention and MLP, with no sliding window shorter
    than `max_length` positions (None: any length, so no window at all)."""
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not family.attention or type(mlp) is not family.mlp:
            return False
        # Qwen2 names the window per layer (None on full-attention layers), Mistral in the config
        window = getattr(attn, "sliding_window", getattr(body.config, "sliding_window", None))
        if window is not None and (max_length is None or window < max_length):
            return False
    return getattr(body.config, "pretraining_tp", 1) == 1


def partitioned(model: nn.Module) -> bool:
    """ZeRO-3 leaves each rank an empty placeholder per parameter outside a gather (it partitions every parameter
    of a model it manages, so the first tells: this runs on every forward)."""
    return hasattr(next(model.parameters(), None), "ds_id")
