"""PPO for language models (Ziegler et al. 2019, InstructGPT, "The N Implementation Details of RLHF with PPO")
as small pure functions. Shapes: B rollouts, A answer positions; `mask` (B, A) is 1 on answer tokens up to
and including the first EOS. Position i of an answer is the action "emit token i"; its value estimate is
the critic's output at the token before it.
"""
from typing import Optional, Sequence, Tuple

import torch

from alpaca_rlhf.deepspeed_chat.training.utils.losses import masked_mean


def cut_at_eos(answer: torch.Tensor, stop_token: int, pad_token: int):
    """Everything after an answer's first stop token becomes padding. answer (B, A) -> (answer (B, A),
    action mask (B, A) float: 1 up to and including the first stop token, ended (B,) bool)."""
    is_stop = answer == stop_token
    ended = is_stop.any(-1)
    stops_before = torch.cumsum(is_stop.long(), dim=-1) - is_stop.long()  # stop tokens strictly before i
    action_mask = (stops_before == 0).float()
    return torch.where(action_mask.bool(), answer, torch.full_like(answer, pad_token)), action_mask, ended


def normalize_score(raw: torch.Tensor, ended: torch.Tensor, stats: Optional[dict], clip: float,
                    no_eos_penalty: float = 0.0) -> torch.Tensor:
    """(raw - mean) / std with the reward model's statistics (step 2's reward_stats.json; None: raw), minus
    no_eos_penalty for answers that never ended, clipped to +-clip. raw, ended: (B,)."""
    score = standardize(raw, stats)
    if no_eos_penalty:
        score = score - no_eos_penalty * (~ended).float()
    return score.clamp(-clip, clip)


def standardize(raw: torch.Tensor, stats: Optional[dict]) -> torch.Tensor:
    """(raw - mean) / std with a reward model's statistics; raw as it is without them."""
    return raw if stats is None else (raw - stats["mean"]) / max(stats["std"], 1e-6)


def combine_scores(raw: torch.Tensor, stats: Sequence[Optional[dict]], weights: Sequence[float]) -> torch.Tensor:
    """The weighted sum over reward sources of each source's score, (raw - mean) / std where the source has
    statistics (a reward model's), raw otherwise (a function's, a classifier's). raw: (B, S) -> (B,)."""
    total = None
    for s, (source_stats, weight) in enumerate(zip(stats, weights)):
        score = standardize(raw[:, s], source_stats)
        score = score if weight == 1.0 else weight * score
        total = score if total is None else total + score
    return total


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    centred = (values - mean) ** 2
    var = masked_mean(centred, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); with shift_mean False the mean is
    added back (used for rewards, whose sign carries meaning). Masked-out entries come back as 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman's estimators):
    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = pi_ref / pi
    (unbiased, never negative, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"--kl_estimator must be k1 or k3, got {estimator!r}")


def compute_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every answer token, plus the sequence score at the last one
    (the EOS, or the last generated token of an answer that never ended). (B,), (B, A) -> (B, A)."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)                      # (B,) index of the final action
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1).to(rewards.dtype))


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over answer positions.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}, with V and r zero after
    the EOS (the episode has ended, so nothing is bootstrapped past it). Returns (advantages, returns),
    returns = advantages + values, both (B, A) and zero outside the mask.
    """
    values, rewards = values * mask, rewards * mask
    A = values.size(1)
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(A)):
        next_value = values[:, t + 1] if t + 1 < A else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------- critic-free estimators
# Scores of K answers to the same prompt sit next to each other: rows [p0 a0, p0 a1, ..., p0 aK-1, p1 a0, ...].
CRITIC_FREE = ("reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo")


def group_shaped_scores(score: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """The sequence score each critic-free estimator puts at an answer's last token. score (B,) with B a
    multiple of group_size K, groups contiguous -> (B,).
      reinforce            r                                   (REINFORCE++: no baseline)
      rloo                 r_i - mean_{j != i} r_j             (leave-one-out baseline; K >= 2)
      reinforce_baseline   r_i - mean_group r                  (REINFORCE++-baseline)
      dr_grpo              r_i - mean_group r                  (Dr. GRPO: no division by the std)
      group_norm           (r_i - mean_group r) / (std_group r + 1e-8)   (GRPO, unbiased std)"""
    if estimator == "reinforce":
        return score
    groups = score.view(-1, group_size)                                     # (B / K, K)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 answers per prompt (--n_samples_per_prompt)")
        baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
        return (groups - baseline).reshape(-1)
    centred = groups - groups.mean(-1, keepdim=True)
    if estimator in ("reinforce_baseline", "dr_grpo"):
        return centred.reshape(-1)
    if estimator == "group_norm":
        std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        return (centred / (std + 1e-8)).reshape(-1)
    raise ValueError(f"unknown critic-free estimator {estimator!r} (one of {', '.join(CRITIC_FREE)})")


def cumulative_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over answer positions, zero after the EOS. (B, A) -> (B, A)"""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def critic_free_advantages(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                           group_size: int, estimator: str, gamma: float = 1.0):
    """Advantages without a critic (OpenRLHF's --advantage_estimator): the shaped score at the last action and
    -kl_coef * KL at every action, summed to token-level returns; REINFORCE++ and REINFORCE++-baseline whiten
    them over the batch. Returns (advantages, returns), (B, A)."""
    rewards = compute_rewards(group_shaped_scores(score, group_size, estimator), kl, mask, kl_coef)
    returns = cumulative_returns(rewards, mask, gamma)
    advantages = masked_whiten(returns, mask) if estimator in ("reinforce", "reinforce_baseline") else returns
    return advantages, returns


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
                   max_len: Optional[int] = None) -> torch.Tensor:
    """One loss from per-token terms (B, A):
      token_mean               mean over every answer token of the batch (long answers weigh more)
      seq_mean_token_mean      mean over each answer's tokens, then over answers (GRPO's paper)
      seq_mean_token_sum_norm  each answer's sum divided by a constant, max_len (default A), then the mean over
                               answers (Dr. GRPO: no length bias)"""
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    per_seq_sum = (per_token * mask).sum(-1)
    if mode == "seq_mean_token_mean":
        return (per_seq_sum / mask.sum(-1).clamp(min=1)).mean()
    if mode == "seq_mean_token_sum_norm":
        return (per_seq_sum / float(max_len or per_token.size(1))).mean()
    raise ValueError(f"--loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {mode!r}")


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float = 0.2, loss_agg: str = "token_mean",
                    max_len: Optional[int] = None):
    """Clipped surrogate objective (Schulman et al. 2017), as a loss to minimise, aggregated by `loss_agg`
    (max_len: the constant of seq_mean_token_sum_norm).
    Returns (loss, clip fraction, approximate KL(old || new) = 0.5 * E[(log ratio)^2])."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, loss_agg, max_len)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approxkl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return loss, clipfrac.detach(), approxkl.detach()


def clipped_value_loss(values, old_values, returns, mask, cliprange_value: float = 0.2):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped kept within cliprange_value of the rollout's values.
    Returns (loss, fraction of positions where the clipped term was used)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int):
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: move the coefficient so that the measured KL tracks `target`,
    proportionally, by at most 20% of n_steps / horizon per update."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int):
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_steps / self.horizon
