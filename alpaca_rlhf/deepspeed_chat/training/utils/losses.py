"""Losses and log-probability helpers shared by the reward model, DPO and PPO, as small pure functions.

Shapes: B = batch, T = sequence length, V = vocabulary. Masks are 1 for real tokens, 0 for padding.
"""
import torch
import torch.nn.functional as F


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _GatherLogProbs(torch.autograd.Function):
    """log softmax(logits)[labels] with a hand-written backward. Autograd's version of the two-line formula
    (gather, logsumexp) allocates and zero-fills a (B, T, V) gradient for the gather, another for the
    logsumexp, and adds them: about seven passes over the largest tensor of a training step. This backward
    makes three: softmax, scale by -grad, add grad at the labels (d/dz_j [z_y - lse(z)] = [j = y] - p_j)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = logits.to(_at_least_fp32(logits.dtype))
        out = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)  # (B, T)
        ctx.save_for_backward(logits, labels)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels = ctx.saved_tensors
        dtype = _at_least_fp32(logits.dtype)
        g = grad.to(dtype).unsqueeze(-1)                                 # (B, T, 1)
        dz = torch.softmax(logits.to(dtype), dim=-1)                     # (B, T, V), a new tensor
        dz.mul_(-g).scatter_add_(-1, labels.unsqueeze(-1), g)
        return dz.to(logits.dtype), None


def gather_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] in float32 without materialising the full (B, T, V) log-softmax:
    logit of the label minus logsumexp over the vocabulary. logits (B, T, V), labels (B, T) -> (B, T)."""
    return _GatherLogProbs.apply(logits, labels)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding). mask (B, T) -> (B,)."""
    T = mask.size(-1)
    return T - 1 - torch.argmax(mask.flip(-1).to(torch.int64), dim=-1)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... over the real tokens of each row (padding gets 0): with left padding the first
    real token is still position 0, as it was during generation. (B, T) -> (B, T)"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def end_scores(values: torch.Tensor, mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The value at the last real token (the EOS of a finished answer): the sequence's reward. values (B, T - start)
    of positions start .. T - 1 (a forward from a position on), mask (B, T) -> (B,)."""
    return values.gather(-1, (last_token_index(mask) - start).unsqueeze(-1)).squeeze(-1)


def _align_left(x: torch.Tensor, mask: torch.Tensor, fill, clamp_to_end: bool) -> torch.Tensor:
    """Shift each row so that its first real token is at column 0. Columns past the row's end hold
    `fill`, or, with clamp_to_end, repeat the value at the row's last real token."""
    B, T = mask.shape
    first = torch.argmax(mask.to(torch.int64), dim=-1)                 # (B,)
    length = mask.sum(-1).to(torch.int64)                              # (B,)
    k = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)     # (B, T) relative position
    src = first.unsqueeze(1) + torch.minimum(k, (length - 1).clamp(min=0).unsqueeze(1))
    out = x.gather(1, src.clamp(max=T - 1))
    if not clamp_to_end:
        out = torch.where(k < length.unsqueeze(1), out, torch.full_like(out, fill))
    return out


def divergence_span(chosen_ids, rejected_ids, chosen_mask, rejected_mask):
    """The positions the pairwise reward loss averages over (DeepSpeed-Chat's rule), per pair, counted
    from each row's first real token: from the first position where the two sequences differ to the end
    of the longer one. An identical pair uses its last token only. Returns a (B, T) 0/1 mask."""
    B, T = chosen_ids.shape
    c = _align_left(chosen_ids, chosen_mask, -1, clamp_to_end=False)   # -1 past the end: differs from any id
    r = _align_left(rejected_ids, rejected_mask, -1, clamp_to_end=False)
    c_len, r_len = chosen_mask.sum(-1).long(), rejected_mask.sum(-1).long()
    end = torch.maximum(c_len, r_len)                                  # (B,)
    k = torch.arange(T, device=chosen_ids.device).unsqueeze(0)
    differs = (c != r) & (k < end.unsqueeze(1))
    has_diff = differs.any(-1)
    first_diff = torch.where(has_diff, torch.argmax(differs.to(torch.int64), -1), end - 1)
    return ((k >= first_diff.unsqueeze(1)) & (k < end.unsqueeze(1))).to(chosen_mask.dtype)


def pairwise_reward_loss(chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask,
                         loss_type: str = "span"):
    """Bradley-Terry loss of a reward model, -log sigmoid(r_chosen - r_rejected).

    span (DeepSpeed-Chat / alpaca-rlhf): averaged over the per-token values of `divergence_span`; past
    the end of the shorter answer its end score stands in (DeepSpeed-Chat read the values at padding
    positions there, which depend on the padding). last_token: the end scores only.
    values/ids/masks are (B, T). Returns (loss, chosen end scores (B,), rejected end scores (B,)).
    """
    chosen_end, rejected_end = end_scores(chosen_values, chosen_mask), end_scores(rejected_values, rejected_mask)
    if loss_type == "last_token":
        return -F.logsigmoid(chosen_end - rejected_end).mean(), chosen_end, rejected_end
    if loss_type != "span":
        raise ValueError(f"loss_type must be 'span' or 'last_token', got {loss_type!r}")
    span = divergence_span(chosen_ids, rejected_ids, chosen_mask, rejected_mask)
    c = _align_left(chosen_values, chosen_mask, 0.0, clamp_to_end=True)
    r = _align_left(rejected_values, rejected_mask, 0.0, clamp_to_end=True)
    per_pair = masked_mean(-F.logsigmoid(c - r), span, dim=-1)        # (B,)
    return per_pair.mean(), chosen_end, rejected_end


def sequence_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log pi(token) over the response tokens of each sequence.

    logits (B, T, V) from input_ids (B, T); response_mask (B, T) marks answer tokens (EOS included).
    Token t is predicted by position t-1, so logits[:, :-1] score input_ids[:, 1:] under response_mask[:, 1:].
    """
    logp = gather_log_probs(logits[:, :-1], input_ids[:, 1:])
    return (logp * response_mask[:, 1:].to(logp.dtype)).sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0):
    """Direct Preference Optimization (Rafailov et al. 2023), with conservative label smoothing (cDPO):

        logits = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        loss   = -(1 - eps) * log sigmoid(logits) - eps * log sigmoid(-logits)

    Inputs are (B,) sequence log-probs. Returns (per-pair losses (B,), chosen rewards, rejected rewards),
    the implicit rewards being beta * (pi - ref), detached.
    """
    logits = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
