"""One explicit forward for the LLaMA-like decoders (LLaMA, Mistral, Qwen2): `decoder_forward`.

Why our own: the passes of this pipeline need things the transformers forward does not offer, and that used to be
forwards replaced on its modules at run time. Here each one is an argument of a function we call:
- lean autograd functions for RMSNorm, rotary and SwiGLU (lean_modules.py), which keep fewer activations for the
  backward than the modules' own formulas (the same numbers);
- `from_position`: the last decoder layer computes its queries, attention output and MLP only at the positions
  whose outputs are read (the answer positions of a PPO pass, each row's last token for a reward). Every earlier
  layer must still run at every position (later positions attend to the keys and values of earlier ones); in
  the last layer, only the keys and values are needed before `from_position`.
- `replay`: the actor's first training forward after a rollout takes every linear map's output from the rollout
  (forward_replay.py), skipping its matmuls, with the linear maps' own backward;
- `record` / `keys_values`: the prompt pass of a rollout records those outputs and hands its keys and values to
  the lean decode step (llama_decoder.py);
- `segments`: a micro-batch's rows packed into one sequence without padding, attention block by block
  (utils/data/packing.py), and `target_ids`: the LM head only at the positions whose next token a loss scores
  (token_log_probs.py), for steps 1, 2 and DPO; `last_layer_from` is `from_position` per packed row (from each
  row's first scored position, or each reward pair's first differing token).

Who calls it: `LeanCausalLM.forward` (the class create_hf_model loads for these families, so steps 1, DPO, PTX and
the PPO log-prob passes reach it through the DeepSpeed engine as before), `RewardModel.hidden_states` (reward and
critic passes) and the rollout's prompt pass (generation.py). Every other family, and attention implementations
other than SDPA/eager (flash-attention kernels on GPUs), keep the transformers forward.

Shapes: B rows, T positions, S = the first position computed by the last layer, H hidden size, D head size.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data.packing import position_index, suffix_positions
from ..losses import gather_log_probs
from .families import FAMILIES, family_of, plain_layers
from .families import partitioned as is_partitioned
from .lean_modules import apply_rotary, rms_norm, swiglu, swiglu_down

_ATTENTION = ("sdpa", "eager")  # both computed by F.scaled_dot_product_attention here


def runs(model: nn.Module, length: Optional[int] = None) -> bool:
    """Whether decoder_forward computes `model` (a LLaMA-like causal LM or decoder body) for sequences of up to
    `length` positions."""
    family = family_of(model)
    if family is None:
        return False
    body = model.model if isinstance(model, family.causal_lm) else model
    if getattr(body.config, "_attn_implementation", "eager") not in _ATTENTION:
        return False
    return plain_layers(body, family, length)


def suffix_start(from_position: int, length: int) -> int:
    """The first position the last layer computes: from_position, keeping at least the last position."""
    return max(0, min(int(from_position), length - 1))


def decoder_forward(body: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    position_ids: Optional[torch.Tensor] = None, *, from_position: int = 0, replay=None, record=None,
                    keys_values: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
                    segments: Optional[Sequence[Tuple[int, int, Optional[torch.Tensor]]]] = None,
                    last_layer_from: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The final-normed hidden states (B, T - S, H) of positions S .. T - 1, S = suffix_start(from_position, T).

    body: a decoder body that `runs` (LlamaModel, MistralModel, Qwen2Model). input_ids (B, T); attention_mask
    (B, T) 1 = real token (None: no padding); position_ids (B, T) (None: 0 .. T - 1, transformers' default).
    replay: a forward_replay.ForwardRecording whose outputs every linear map returns (S >= its prompt length - 1).
    record: a ForwardRecording to write every linear map's output into (the rollout's prompt pass).
    keys_values: a list to append each layer's (keys, values) (B, H_kv, T, D), rotary applied, to.
    segments: packed rows (utils/data/packing.py): input_ids (1, T) is several rows one after the other, position
    ids restart at each, and attention stays within each (start, end, mask) block of the sequence: causal, or
    under the block's own boolean mask (a reward pair sharing its prefix). No padding, so no attention_mask, and
    from_position 0.
    last_layer_from: with segments, one position per block: the last layer computes each block's positions from
    this one to its end only (the earlier ones serve as keys and values), and the result is (1, R, H), those
    positions block after block (packing.suffix_positions): what a loss that reads no earlier position needs.
    Under ZeRO-3 every parameter is used through its module's call, which gathers it."""
    B, T = input_ids.shape
    S = suffix_start(from_position, T)
    if replay is not None and S < replay.prompt_length - 1:
        raise ValueError(f"a replayed forward starts its last layer at the prompt's last position "
                         f"({replay.prompt_length - 1}), not {S}: only that suffix was recorded there")
    if segments is not None and (attention_mask is not None or S or replay is not None or record is not None):
        raise ValueError("packed rows (segments) take no attention_mask, from_position, replay or record")
    if segments is not None:
        starts, ends = [a for a, _, _ in segments], [b for _, b, _ in segments]
        if starts[0] != 0 or ends[-1] != T or starts[1:] != ends[:-1]:
            raise ValueError("packed rows' segments must tile the sequence: 0 .. T, one after the other")
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
    partitioned = is_partitioned(body)                                  # ZeRO-3: modules gather their weights
    x = body.embed_tokens(input_ids)                                    # (B, T, H)
    cos, sin = body.rotary_emb(x, position_ids)                         # (B, T, D) each, in x's dtype
    # packed rows: attention block by block, (start, end, block mask, first query of the block)
    mask = _attention_mask(attention_mask, T, S, x.device) if segments is None else \
        [(a, b, m, a) for a, b, m in segments]
    last_mask, last_start = mask, S
    if last_layer_from is not None:
        last_mask = [(a, b, m, f) for (a, b, m, _), f in zip(mask, last_layer_from)]
        last_start = suffix_positions(segments, last_layer_from, x.device)   # (R,)
    run = _Linears(replay, record, T)
    silu = getattr(body.config, "hidden_act", None) == "silu"
    last = len(body.layers) - 1
    for i, layer in enumerate(body.layers):
        start, layer_mask = (last_start, last_mask) if i == last else (0, mask)
        if getattr(layer, "gradient_checkpointing", False) and layer.training:  # transformers' flag for the layer
            x = checkpoint(_layer, layer, i, x, cos, sin, layer_mask, start, run, silu, partitioned, None,
                           use_reentrant=False)                         # recomputed in the backward
        else:
            x = _layer(layer, i, x, cos, sin, layer_mask, start, run, silu, partitioned, keys_values)
    return _norm(body.norm, x, partitioned)


def _attention(q, k, v, mask, start, dropout: float, scale: float, gqa: bool) -> torch.Tensor:
    """SDPA of q (B, nh, Tq, D) over k, v (B, nkv, T, D): under `mask` (a boolean tensor; None: causal) with q the
    positions start .. T - 1, or, for packed rows, block by block: mask = their (start, end, block mask, first
    query) blocks and q the positions from each block's first query to its end, block after block."""
    if isinstance(mask, list):
        # The blocks tile 0 .. T one after the other: split (whose backward is one cat) rather than a slice per
        # block, whose backward would fill a zero tensor of the whole q, k, v for each block.
        sizes = [b - a for a, b, _, _ in mask]
        queries = q.split([b - f for _, b, _, f in mask], 2)
        out = []
        for qb, kb, vb, (a, b, m, f) in zip(queries, k.split(sizes, 2), v.split(sizes, 2), mask):
            if f > a:  # queries from block position f - a on: their rows of the block's (causal) mask
                m = (torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril() if m is None else m)[f - a:]
            out.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, dropout_p=dropout,
                                                      is_causal=m is None, scale=scale, enable_gqa=gqa))
        return torch.cat(out, dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, :, start:],
                                          dropout_p=dropout, is_causal=mask is None, scale=scale, enable_gqa=gqa)


def _attention_mask(attention_mask: Optional[torch.Tensor], T: int, S: int, device) -> Optional[torch.Tensor]:
    """(B or 1, 1, T, T) bool, True = may attend: causal, real keys only, as transformers masks it, so every
    position after a row's first real token gets transformers' output. A query row with no real key before it
    (left padding) sees itself instead of nothing, where some SDPA kernels give NaN: its output is never read, and
    no real token attends to it. None: plain causal attention over unpadded rows (SDPA's is_causal)."""
    if attention_mask is None and S == 0:
        return None
    pos = torch.arange(T, device=device)
    causal = pos[None, :] <= pos[:, None]                              # (T, T): query row, key column
    if attention_mask is None:
        return causal[None, None]
    allowed = causal & attention_mask.bool()[:, None, None, :]         # (B, 1, T, T)
    empty = ~allowed.any(-1, keepdim=True)                             # (B, 1, T, 1): rows before the first token
    return allowed | (empty & (pos[None, :] == pos[:, None]))


def _layer(layer: nn.Module, i: int, x: torch.Tensor, cos, sin, mask, start, run: "_Linears", silu: bool,
           partitioned: bool, keys_values) -> torch.Tensor:
    """One decoder layer: x (B, T, H) -> (B, Tq, H), the layer's output at positions start .. T - 1 (start an int)
    or at the (Tq,) positions `start` holds.
    mask: a boolean attention mask, None (causal), or packed rows' blocks (see _attention)."""
    attn = layer.self_attn
    B, T, _ = x.shape
    D = attn.head_dim
    h = _norm(layer.input_layernorm, x, partitioned)                      # (B, T, H): k and v need every position
    Tq = T - start if isinstance(start, int) else start.numel()        # the positions this layer outputs
    q = run(i, "q", attn.q_proj, _positions(h, start)).view(B, Tq, -1, D).transpose(1, 2)  # (B, nh, Tq, D)
    k = run(i, "k", attn.k_proj, h).view(B, T, -1, D).transpose(1, 2)                      # (B, nkv, T, D)
    v = run(i, "v", attn.v_proj, h).view(B, T, -1, D).transpose(1, 2)
    q = apply_rotary(q, _positions(cos, start), _positions(sin, start))
    k = apply_rotary(k, cos, sin)
    if keys_values is not None:
        keys_values.append((k, v))
    nh, nkv = q.size(1), k.size(1)
    # grouped-query heads read their shared key/value head without the copy repeat_kv makes
    a = _attention(q, k, v, mask, start, attn.attention_dropout if attn.training else 0.0, attn.scaling, nkv != nh)
    a = a.transpose(1, 2).reshape(B, Tq, nh * D)                      # (B, Tq, nh D)
    x = _positions(x, start) + run(i, "o", attn.o_proj, a)
    h = _norm(layer.post_attention_layernorm, x, partitioned)
    return x + _mlp(layer.mlp, i, h, run, silu, partitioned)


def _positions(x: torch.Tensor, start) -> torch.Tensor:
    """x (B, T, ...) at the positions a layer outputs: start .. T - 1 (an int), or the (R,) positions given."""
    return x[:, start:] if isinstance(start, int) else x.index_select(1, start)


def _norm(norm: nn.Module, x: torch.Tensor, partitioned: bool) -> torch.Tensor:
    """RMSNorm (fp32 inside, cast back) keeping only x and 1/rms for the backward; under ZeRO-3 the module itself,
    whose call gathers the weight."""
    return norm(x) if partitioned else rms_norm(x, norm.weight, norm.variance_epsilon)


def _mlp(mlp: nn.Module, i: int, h: torch.Tensor, run: "_Linears", silu: bool, partitioned: bool) -> torch.Tensor:
    """down(act(gate(h)) * up(h))."""
    gate, up = run(i, "gate", mlp.gate_proj, h), run(i, "up", mlp.up_proj, h)
    down = mlp.down_proj
    if not silu:
        return run(i, "down", down, mlp.act_fn(gate) * up)
    if type(down) is nn.Linear and not partitioned:
        # a plain linear (not LoRA-wrapped, not partitioned): its input silu(gate) * up need not be kept
        y = swiglu_down(gate, up, down.weight, down.bias, output=run.replayed(i, "down", h))
        run.put(i, "down", y)
        return y
    return run(i, "down", down, swiglu(gate, up))


class _Linears:
    """How the linear maps of one forward run: through their modules; with `replay`, returning the rollout's
    recorded outputs (with the linear's backward); with `record`, writing their outputs into a recording."""

    def __init__(self, replay, record, length: int):
        self.replay, self.record, self.length = replay, record, length

    def __call__(self, i: int, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            return self.replay.replay_linear(i, name, module, x)
        y = module(x)
        self.put(i, name, y)
        return y

    def replayed(self, i: int, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The recorded output for input x (B, t, in), or None when not replaying."""
        return None if self.replay is None else self.replay.output_for(i, name, x)

    def put(self, i: int, name: str, y: torch.Tensor):
        if self.record is not None:  # y (B, t, out) covers the last t positions (t < T in the last layer)
            self.record.put_output(i, name, self.length - y.size(1), y)


# ---------------------------------------------------------------------------------------------- causal LM classes
class LeanCausalLM:
    """The forward of a LLaMA-like *ForCausalLM through decoder_forward, for the calls it serves (training and
    scoring passes: no cache, logits only), with `from_position` and `replay` as extra arguments; any other call
    (generate's cached steps, labels, hidden states wanted) goes to the transformers forward. Mixed into each
    family's class (LEAN_CAUSAL_LM), so the weights, config, saving and loading are transformers' own."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, *, from_position: int = 0,
                replay=None, segments=None, target_positions=None, target_ids=None, logits_chunk: int = 0,
                **kwargs):
        """As transformers' forward, plus: from_position, replay and segments (see decoder_forward), and, with
        target_ids, the log-probabilities (M,) of target_ids (M,) as predicted at target_positions (M,) (flat
        indices into the B x T positions) instead of logits: the final LM head runs at those positions only,
        logits_chunk at a time (lm_head_log_probs)."""
        # (a packed sequence's rows are what a sliding window sees, not the whole)
        longest = (max(end - start for start, end, _ in segments) if segments
                   else input_ids.size(1) if input_ids is not None else None)
        ours = (input_ids is not None and inputs_embeds is None and labels is None and past_key_values is None
                and not use_cache and not logits_to_keep and not kwargs and runs(self, longest))
        if not ours and (segments is not None or target_ids is not None):
            raise ValueError("packed rows and answer-only log-probs need decoder_forward (see runs())")
        if not ours:
            if replay is not None:
                raise ValueError("a replayed forward needs decoder_forward (no cache, no labels, plain layers)")
            if from_position and input_ids is not None:
                T = input_ids.size(1)
                logits_to_keep = torch.arange(suffix_start(from_position, T), T, device=input_ids.device)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        if segments is not None and target_ids is not None:
            # packed rows: the last layer runs only from each row's first target position on
            first, index = _first_targets(segments, target_positions)
            hidden = decoder_forward(self.model, input_ids, None, position_ids, segments=segments,
                                     last_layer_from=first)              # (1, R, H)
            return lm_head_log_probs(self.lm_head, hidden[0, index], target_ids, logits_chunk)
        hidden = decoder_forward(self.model, input_ids, attention_mask, position_ids, from_position=from_position,
                                 replay=replay, segments=segments)       # (B, T - S, H)
        if target_ids is not None:
            picked = hidden.reshape(-1, hidden.size(-1))[target_positions]  # (M, H)
            return lm_head_log_probs(self.lm_head, picked, target_ids, logits_chunk)
        logits = (self.lm_head(hidden) if replay is None
                  else replay.replay_logits(self.lm_head, hidden))      # (B, T - S, V)
        return CausalLMOutputWithPast(logits=logits)


def _first_targets(segments, targets: torch.Tensor):
    """(each block's first target position, or its last position where it has none; the index of each target
    among the positions the last layer then computes) for packed rows and (M,) target positions."""
    ends = torch.tensor([end for _, end, _ in segments], device=targets.device)
    block = torch.bucketize(targets, ends, right=True)                  # (M,) the block holding each target
    first = (ends - 1).scatter_reduce(0, block, targets, "amin").tolist()  # (n_blocks,)
    computed = suffix_positions(segments, first, targets.device)        # (R,)
    return first, position_index(computed, segments[-1][1])[targets]


def lm_head_log_probs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """log softmax(lm_head(hidden))[targets] in float32, (M, H), (M,) -> (M,). With chunk > 0 and M > chunk, the
    (M, V) logits never exist whole: each chunk's are computed, reduced and dropped, and computed again in the
    backward (torch checkpoint), so at most (chunk, V) logits are alive at a time."""
    def piece(h, t):
        return gather_log_probs(lm_head(h).unsqueeze(0), t.unsqueeze(0)).squeeze(0)
    if chunk <= 0 or hidden.size(0) <= chunk:
        return piece(hidden, targets)
    return torch.cat([checkpoint(piece, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, hidden.size(0), chunk)])


def _lean_class(family) -> type:
    return type(f"Lean{family.causal_lm.__name__}", (LeanCausalLM, family.causal_lm),
                {"__doc__": f"{family.causal_lm.__name__} whose training and scoring forwards run decoder_forward."})


# config.model_type -> the causal LM class create_hf_model loads
LEAN_CAUSAL_LM = {family.model_type: _lean_class(family) for family in FAMILIES}


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: Optional[torch.Tensor] = None, *, from_position: int = 0,
                     replay=None) -> torch.Tensor:
    """Logits (B, T - S, V) of positions S .. T - 1 of any causal LM (or its DeepSpeed engine): our forward's
    `from_position` where the model has it, the transformers forward's `logits_to_keep` elsewhere."""
    if isinstance(getattr(model, "module", model), LeanCausalLM):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     from_position=from_position, replay=replay).logits
    if replay is not None:
        raise ValueError("a replayed forward needs a LLaMA-like model loaded by create_hf_model")
    T = input_ids.size(1)
    keep = torch.arange(suffix_start(from_position, T), T, device=input_ids.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=keep).logits


def body_hidden_states(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: Optional[torch.Tensor] = None, *, from_position: int = 0) -> torch.Tensor:
    """The last hidden states (B, T - S, H) of positions S .. T - 1 of any decoder body: decoder_forward where
    it runs, the transformers forward elsewhere."""
    T = input_ids.size(1)
    if runs(body, T):
        return decoder_forward(body, input_ids, attention_mask, position_ids, from_position=from_position)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)[0]
    return hidden[:, suffix_start(from_position, T):]


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            record=None):
    """The prompt pass of a rollout on a causal LM that `runs`: (logits (B, V) of the last position, each layer's
    (keys, values) (B, H_kv, P, D)); with `record`, every linear map's output (the last layer's queries, o and MLP
    at the last position only) and the last position's logits are written into it."""
    keys_values: List[Tuple[torch.Tensor, torch.Tensor]] = []
    P = input_ids.size(1)
    hidden = decoder_forward(model.model, input_ids, attention_mask, position_ids, from_position=P - 1,
                             record=record, keys_values=keys_values)    # (B, 1, H)
    logits = model.lm_head(hidden[:, -1])                               # (B, V)
    if record is not None:
        record.put_logits(P - 1, logits)
    return logits, keys_values
