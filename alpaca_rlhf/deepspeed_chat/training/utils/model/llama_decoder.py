"""A lean single-token decode step for LLaMA rollouts.

Why: a rollout is dozens of one-token forwards over a small batch. Through `LlamaForCausalLM.forward` each of
them rebuilds the 4-D attention mask, concatenates every layer's growing KV cache (a copy of the whole cache per
token) and goes through a dozen module calls with keyword dispatch per layer. This step reads the same weights,
keeps keys and values in buffers allocated once per rollout, writes the new position in place and runs each
layer as few tensor operations: four matmuls (q, k, v stacked; o; gate and up stacked; down), one rotary pass
over q and k together with cos/sin from a table built once per rollout, the fused attention and RMSNorm kernels.
The prompt itself goes through `decoder.prefill` (decoder_forward, one call), whose keys and values fill the
buffers. Token for token the same samples as the transformers forward (tests/test_generation.py); the speed-up
and where the rest of a step's time goes are in bench/RESULTS.md (bench/decode_speed.py).

The LLaMA-like families qualify: LLaMA, Mistral and Qwen2 (the same layer: RMSNorm, rotary, SwiGLU; Qwen2 adds
q/k/v biases) with their own attention and MLP classes, LoRA fused or absent, weights not partitioned by ZeRO-3,
and no sliding window shorter than the rollout (the step attends to every cached position). Everything else keeps
the transformers path (`LlamaDecoder.for_model` returns None).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..module.lora import LoRALinear
from .families import family_of, partitioned, plain_layers


def _weight(linear: nn.Module) -> Optional[torch.Tensor]:
    """The weight a projection applies now, or None when it is not a plain linear map (unfused LoRA)."""
    if type(linear) is nn.Linear:
        return linear.weight
    if isinstance(linear, LoRALinear) and linear.fused and linear.enabled:
        return linear.weight  # W + sBA while fused
    return None


def layer_projections(layer: nn.Module):
    """(name, module) of a decoder layer's seven linear maps."""
    attn, mlp = layer.self_attn, layer.mlp
    return [("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
            ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)]


# The decode step's four matmuls per layer: q, k, v as one and gate, up as one (each concatenated along the
# output dimension), so a step makes four small-input calls per layer instead of seven.
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gateup": ("gate", "up"), "down": ("down",)}


def group_slices(layer: nn.Module):
    """{projection name: (group, first column, last column + 1)}: where each linear map's output sits in its
    group's output."""
    modules = dict(layer_projections(layer))
    where = {}
    for group, names in GROUPS.items():
        start = 0
        for name in names:
            width = modules[name].out_features
            where[name] = (group, start, start + width)
            start += width
    return where


class _Projection:
    """y = x W^T + b for the few rows of a decode step, with W laid out once per rollout for that case (CPU only).
    On the CPU, F.linear on a (16, in) input runs far below the matmul rate of x @ (W^T contiguous), and MKL's
    packed format (what torch.compile uses for frozen CPU weights) streams the weights faster still (figures in
    bench/RESULTS.md, "Decode-step weight layouts"). Packing is an internal torch op: fp32 CPU weights only, else
    the transposed copy.
    Each layout is a copy of the weights for the rollout, worth it for MKL's small-row products only: on other
    devices (a GPU's GEMM takes W as it is stored) the weight is used in place, no copy."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int, relayout: bool):
        self.weight, self.bias, self.rows = weight, bias, rows
        self.packed = self.transposed = None
        if not relayout:
            return
        pack = getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None)
        if pack is not None and torch.backends.mkl.is_available() and weight.dtype == torch.float32:
            try:
                self.packed = pack(weight, rows)
            except RuntimeError:
                self.packed = None
        if self.packed is None:
            self.transposed = weight.t().contiguous()                   # (in, out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        if self.transposed is None:
            return F.linear(x, self.weight, self.bias)
        y = x @ self.transposed
        return y if self.bias is None else y + self.bias


class _StackedOutputs:
    """Linear maps that read the same input, applied one by one and their outputs concatenated: what stacking
    their weights computes, without a stacked copy of the weights (off the CPU)."""

    def __init__(self, projections: List[_Projection]):
        self.projections = projections

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.projections], dim=-1)


def _group_projection(modules, rows: int, relayout: bool):
    """One projection for linear maps that read the same input: with `relayout` (CPU) their weights (and biases)
    stacked into one product, else the maps applied in place (`_StackedOutputs`)."""
    weights = [_weight(m) for m in modules]
    if len(modules) == 1:
        return _Projection(weights[0], modules[0].bias, rows, relayout)
    if not relayout:
        return _StackedOutputs([_Projection(w, m.bias, rows, relayout) for w, m in zip(weights, modules)])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else w.new_zeros(w.size(0)) for m, w in zip(modules, weights)])
    return _Projection(torch.cat(weights), bias, rows, relayout)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, so that x.roll(D / 2) * signed sin == rotate_half(x) * sin bit for bit (the
    same products with the sign moved from one factor to the other): one roll instead of LLaMA's neg and cat."""
    h = sin.size(-1) // 2
    return torch.cat([-sin[..., :h], sin[..., h:]], dim=-1)


class LlamaDecoder:
    """KV buffers (B, H_kv, P + N, D) per layer for one rollout, and `step` for the next token's logits."""

    @staticmethod
    def qualifies(model: nn.Module, max_length: Optional[int] = None) -> bool:
        """Whether the lean step can run `model` as it is now (LLaMA, Mistral or Qwen2, LoRA fused or absent, not
        ZeRO-3) for sequences of up to `max_length` positions (None: any length, so no sliding window at all)."""
        family = family_of(model)
        if family is None or not isinstance(model, family.causal_lm) or partitioned(model):
            return False
        if not plain_layers(model.model, family, max_length):
            return False
        return (all(_weight(m) is not None for layer in model.model.layers for _, m in layer_projections(layer))
                and _weight(model.lm_head) is not None)

    @classmethod
    def for_model(cls, model: nn.Module, rows: int, max_length: Optional[int] = None) -> Optional["LlamaDecoder"]:
        """A decoder for `rows` sequences of up to `max_length` positions, or None when the model does not
        qualify."""
        return cls(model, rows) if cls.qualifies(model, max_length) else None

    def __init__(self, model: nn.Module, rows: int, relayout: Optional[bool] = None):
        """relayout: lay the weights out for small-row products (stacked groups, MKL-packed or transposed
        copies, see _Projection); default on the CPU only."""
        self.model = model
        self.rows = rows
        if relayout is None:
            relayout = model.lm_head.weight.device.type == "cpu"
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # every projection group laid out for `rows`-row inputs once per rollout (the weights change between
        # rollouts)
        self.projections = [{group: _group_projection([dict(layer_projections(layer))[n] for n in names], rows,
                                                      relayout)
                             for group, names in GROUPS.items()} for layer in model.model.layers]
        self.lm_head = _Projection(_weight(model.lm_head), model.lm_head.bias, rows, relayout)
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self.length = 0  # positions filled in the buffers
        self.rope: Optional[torch.Tensor] = None  # (positions, 2, D): cos and signed sin, see load_prefill
        self.recording = None  # a forward_replay.ForwardRecording that keeps every projection's output

    def load_prefill(self, keys_values: List[Tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int) -> None:
        """Copy the prompt's keys and values (per layer, (B, H_kv, P, D) each, from decoder.prefill) into buffers
        with room for max_new_tokens more positions."""
        self.keys, self.values = [], []
        for k, v in keys_values:
            B, H, P, D = k.shape
            kb = k.new_empty(B, H, P + max_new_tokens, D)
            vb = v.new_empty(B, H, P + max_new_tokens, D)
            kb[:, :, :P] = k
            vb[:, :, :P] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.length = P
        self.rope = self._rotary_table(P + max_new_tokens, kb)

    def _rotary_table(self, positions: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """(positions, 2, D): the model's rotary cos and signed sin (`_signed_sin`) for positions 0 .. positions - 1,
        computed once per rollout instead of by the model's rotary module in every step (~8 small operators).
        None where the rotary frequencies depend on the length reached so far (dynamic NTK, LongRoPE): those
        keep the module per step."""
        rope_type = getattr(self.model.model.rotary_emb, "rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            return None
        ids = torch.arange(positions, device=like.device).unsqueeze(0)                # (1, positions)
        cos, sin = self.model.model.rotary_emb(like, ids)                              # (1, positions, D) each
        return torch.stack([cos[0], _signed_sin(sin[0])], dim=1).contiguous()

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm as one fused op in fp32 (its own forward is seven ops per call, at a few microseconds each
        on a 16-row step); other dtypes keep the module, which normalises in fp32 and casts back."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), norm.weight, norm.variance_epsilon)
        return norm(x)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """One decode step. tokens (B,) the newest tokens, positions (B, 1) their position ids (below the prompt
        length + max_new_tokens given to load_prefill), attend (B, T) bool with T = filled length + 1: which cached
        positions (and the new one, last) each row may see. Returns logits (B, V) for the token after."""
        model, t = self.model.model, self.length
        B = tokens.size(0)
        nh, nkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x = model.embed_tokens(tokens.unsqueeze(1))                      # (B, 1, H)
        if self.rope is not None:
            rope = self.rope.index_select(0, positions.view(-1))         # (B, 2, D): cos, signed sin per row
            cos, sin = rope[:, None, 0:1], rope[:, None, 1:2]            # (B, 1, 1, D): broadcast over heads
        else:
            cos, sin = model.rotary_emb(x, positions)                    # (B, 1, D) each
            cos, sin = cos.unsqueeze(1), _signed_sin(sin).unsqueeze(1)
        mask = attend[:, None, None, :]                                  # (B, 1, 1, T)
        rec = self.recording
        for i, layer in enumerate(model.layers):
            w, attn = self.projections[i], layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            qkv = w["qkv"](h)                                            # (B, 1, (nh + 2 nkv) D)
            # q and k sit side by side in qkv: one rotary pass over both, (B, nh + nkv, 1, D)
            qk = qkv[..., :(nh + nkv) * D].view(B, nh + nkv, 1, D)
            qk = qk * cos + qk.roll(D // 2, -1) * sin                    # = qk cos + rotate_half(qk) sin, exactly
            self.keys[i][:, :, t:t + 1] = qk[:, nh:]                     # write position t in place
            self.values[i][:, :, t:t + 1] = qkv[..., (nh + nkv) * D:].view(B, nkv, 1, D)
            # grouped-query heads read their shared key/value head without the copy repeat_kv makes
            a = F.scaled_dot_product_attention(qk[:, :nh], self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1],
                                               attn_mask=mask, scale=attn.scaling, enable_gqa=nkv != nh)
            o = w["o"](a.view(B, 1, nh * D))
            x = x + o
            h = self._norm(layer.post_attention_layernorm, x)
            gateup = w["gateup"](h)                                      # (B, 1, 2 I)
            gate, up = gateup.chunk(2, dim=-1)
            down = w["down"](layer.mlp.act_fn(gate) * up)
            if rec is not None:
                rec.put(i, "qkv", t, qkv), rec.put(i, "o", t, o), rec.put(i, "gateup", t, gateup)
                rec.put(i, "down", t, down)
            x = x + down
        self.length = t + 1
        x = self._norm(model.norm, x)
        logits = self.lm_head(x[:, -1, :])                               # (B, V)
        if rec is not None:
            rec.put_logits(t, logits)
        return logits
