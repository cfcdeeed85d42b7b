"""Sampling with the KV cache for rollouts: left-padded prompts, top-k / top-p / temperature, EOS banned as
the first token, finished rows padded, and non-finite logits reported instead of crashing in multinomial."""
import torch
import torch.distributed as dist

from ..losses import position_ids_from_mask
from .decoder import prefill
from .llama_decoder import LlamaDecoder


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top_k largest logits (0 = all) and the smallest set whose probability reaches top_p; the rest
    become -inf. logits (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from softmax(logits) (B, V) -> (B,), by the inverse of the cumulative distribution:
    one uniform number per row. (torch.multinomial draws an exponential number per vocabulary entry, which
    took a tenth of a CPU rollout.) Tokens of probability 0 (filtered to -inf) are never drawn."""
    probs = torch.softmax(logits.double(), dim=-1)                    # float64: no rounding gap at the top
    cdf = probs.cumsum(-1)                                            # (B, V)
    u = torch.rand(logits.size(0), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)        # first index with cdf > u
    # cdf[token - 1] <= u < cdf[token], so the token's probability is > 0. Only where u rounds up to the total
    # does the search run past the end; then the last token that can be drawn is taken. (Checked per step
    # rather than computed: that lookup was 90-105 us of a 165-240 us draw, 16 x 4000-8000 logits, CPU.)
    past_end = token >= logits.size(-1)
    if past_end.any():
        last = logits.size(-1) - 1 - (probs > 0).flip(-1).int().argmax(-1)
        token = torch.where(past_end, last, token)
    return token


def _all_ranks_done(done: bool, device, synced: bool) -> bool:
    """Under ZeRO-3 every rank must run the same number of forward passes (parameters are gathered
    collectively), so a rank keeps stepping until every rank has finished."""
    if not synced or not dist.is_initialized() or dist.get_world_size() == 1:
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           suppress_eos_first: bool = True, synced: bool = False, lean_decode: bool = True, recording=None):
    """Generate up to max_new_tokens after left-padded prompts (B, P).

    With lean_decode, where the model qualifies, the prompt goes through decoder.prefill once and the tokens after
    it through `LlamaDecoder` (in-place KV buffers, no per-token mask rebuild); otherwise both go through the
    model's forward with its cache.

    recording: a forward_replay.ForwardRecording to fill with every linear map's output at every position fed
    (the prompt and all sampled tokens but the last); marked complete when the lean decoder ran every step.

    Returns (sequences (B, P + n) with n <= max_new_tokens, after a row's EOS its positions hold pad_token_id;
    nonfinite: True when the policy produced NaN/inf logits). Rows with non-finite logits continue with a
    uniform draw instead of crashing the sampler; the caller drops the batch (on every rank alike).
    """
    B, P = input_ids.shape
    device = input_ids.device
    # which positions each row attends to: the prompt's real tokens, then every answer token up to its EOS
    attend = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    attend[:, :P] = attention_mask.bool()
    positions = position_ids_from_mask(attention_mask)          # left padding: real tokens count from 0
    decoder = LlamaDecoder.for_model(model, B, P + max_new_tokens) if lean_decode else None
    cache = None
    if decoder is not None:
        logits, keys_values = prefill(model, input_ids, attention_mask, positions, record=recording)
        decoder.load_prefill(keys_values, max_new_tokens)
        decoder.recording = recording
    else:
        # only the last prompt position's logits are needed: the LM head over the whole prompt would be wasted work
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = positions[:, -1:] + 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    generated, nonfinite = [], False
    for step in range(max_new_tokens):
        logits = logits.float()
        # one reduction decides whether to look further (a NaN or an infinity anywhere makes the sum non-finite);
        # the per-row test was five small operators on every step
        if not torch.isfinite(logits.sum()):
            bad_rows = ~torch.isfinite(logits).all(-1)
            if bad_rows.any():
                nonfinite = True
                logits = torch.where(bad_rows.unsqueeze(-1), torch.zeros_like(logits), logits)
        if step == 0 and suppress_eos_first:
            logits[:, eos_token_id] = float("-inf")
        if do_sample:
            if temperature != 1.0:
                logits = logits / max(temperature, 1e-6)
            logits = filter_logits(logits, top_k, top_p)
            token = sample_from_logits(logits)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, pad_token_id)
        generated.append(token)
        is_eos = token == eos_token_id
        finished |= is_eos
        if _all_ranks_done(bool(finished.all()), device, synced) or step == max_new_tokens - 1:
            break
        attend[:, P + step] = ~finished | is_eos  # the EOS itself is seen, the padding after it not
        seen = attend[:, :P + step + 1]
        if decoder is not None:
            logits = decoder.step(token, next_pos, seen)
        else:
            out = model(input_ids=token.unsqueeze(1), attention_mask=seen.long(), position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = next_pos + 1
    if recording is not None:
        recording.complete = decoder is not None
        recording.trim(P + len(generated) - 1)
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1), nonfinite
