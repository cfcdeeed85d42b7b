"""PPO maths against plain loops (float64) and hand-computed values."""
import math

import pytest
import torch

from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.ppo_math import (
    AdaptiveKLController, FixedKLController, aggregate_loss, clipped_value_loss, combine_scores, compute_gae,
    compute_rewards, critic_free_advantages, cumulative_returns, cut_at_eos, explained_variance, group_shaped_scores,
    kl_penalty, masked_whiten, normalize_score, ppo_policy_loss)

MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float64)


def plain_gae(values, rewards, mask, gamma, lam):
    B, A = len(values), len(values[0])
    adv = [[0.0] * A for _ in range(B)]
    for b in range(B):
        n = int(sum(mask[b]))
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
    returns = [[adv[b][t] + (values[b][t] if mask[b][t] else 0.0) for t in range(A)] for b in range(B)]
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_compute_gae_equals_plain_loop(gamma, lam):
    torch.manual_seed(0)
    values = torch.randn(3, 6, dtype=torch.float64)
    rewards = torch.randn(3, 6, dtype=torch.float64)
    adv, ret = compute_gae(values, rewards, MASK, gamma, lam)
    exp_adv, exp_ret = plain_gae(values.tolist(), rewards.tolist(), MASK.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(exp_adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(exp_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_gae_gamma1_lambda1_is_reward_to_go_minus_value():
    values = torch.tensor([[0.5, 0.25, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, -0.1, 1.0]], dtype=torch.float64)
    adv, ret = compute_gae(values, rewards, torch.ones(1, 3, dtype=torch.float64), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.9 - 0.5, 0.9 - 0.25, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.9, 1.0]], dtype=torch.float64))


def test_masked_whiten_equals_plain_whitening_of_unmasked_values():
    torch.manual_seed(1)
    x = torch.randn(3, 6, dtype=torch.float64) * 3 + 2
    got = masked_whiten(x, MASK)
    picked = x[MASK.bool()]
    expected = (picked - picked.mean()) / torch.sqrt(picked.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(got[MASK.bool()], expected)
    assert torch.all(got[~MASK.bool()] == 0)
    kept = masked_whiten(x, MASK, shift_mean=False)
    torch.testing.assert_close(kept[MASK.bool()], expected + picked.mean())


def test_kl_estimators():
    torch.manual_seed(2)
    lp, ref = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), lp - ref)
    k3 = kl_penalty(lp, ref, "k3")
    assert torch.all(k3 >= 0)
    r = torch.exp(ref - lp)
    torch.testing.assert_close(k3, (r - 1) - torch.log(r))
    assert torch.all(kl_penalty(lp, lp, "k3") == 0)
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k2")


def test_compute_rewards_puts_score_on_last_action():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = compute_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, -0.03 + 2.0, 0.0],
                                                      [-0.05, -0.05, -0.05, -0.05 - 1.0]]))


def test_ppo_policy_loss_hand_computed():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))   # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac, approxkl = ppo_policy_loss(new, old, adv, mask, cliprange=0.2)
    # max(-A r, -A clip(r)): pos 0: max(-1.5, -1.2) = -1.2 (clipped); pos 1: max(-0.5, -0.8) = -0.5;
    # pos 2: max(2.2, 2.2) = 2.2 (ratio inside the range)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    assert approxkl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)


def test_policy_loss_ignores_masked_positions():
    loss, *_ = ppo_policy_loss(torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 100.0]]),
                               torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)


def test_clipped_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[1.0, -1.0]])
    loss, frac = clipped_value_loss(new, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    # pos 0: unclipped 0, clipped (0.2-1)^2 = 0.64 -> 0.64; pos 1: unclipped 1.21, clipped (0.1+1)^2 = 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, mask).item() == pytest.approx(0.0)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 256)            # KL twice the target: error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    adaptive.update(3.0, 256)             # half the target: error -0.2 (clipped at -0.2 exactly)
    assert adaptive.value < 0.1 * (1 + 0.2 * 256 / 10000)
    state = adaptive.state_dict()
    other = AdaptiveKLController(1.0, 6.0, 10000)
    other.load_state_dict(state)
    assert other.value == adaptive.value


def test_cut_at_eos_masks_up_to_and_including_the_first_eos():
    EOS, PAD = 2, 0
    answer = torch.tensor([[5, 6, EOS, 7, EOS], [5, 6, 7, 8, 9], [EOS, 5, 6, 7, 8]])
    cut, mask, ended = cut_at_eos(answer, EOS, PAD)
    assert cut.tolist() == [[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    # --ignore_eos: stop token -1 never occurs, every answer runs to full length
    cut, mask, ended = cut_at_eos(answer, -1, PAD)
    assert torch.equal(cut, answer) and mask.sum().item() == answer.numel() and not ended.any()


def test_normalize_score_uses_reward_stats_then_penalty_then_clip(tmp_path):
    import json
    from types import SimpleNamespace
    from alpaca_rlhf.deepspeed_chat.training.step3_rlhf_finetuning.step3_args import reward_stats
    (tmp_path / "reward_stats.json").write_text(json.dumps({"chosen_mean": 2.0, "chosen_std": 0.5}))
    args = SimpleNamespace(no_reward_normalization=False, reward_model_type="reward_model", reward_stats=None,
                           reward_model_name_or_path=None, critic_model_name_or_path=str(tmp_path))
    stats = reward_stats(args)
    assert stats == {"mean": 2.0, "std": 0.5}
    raw, ended = torch.tensor([2.0, 3.0, 10.0, 0.0]), torch.tensor([True, True, True, False])
    assert normalize_score(raw, ended, stats, clip=5.0).tolist() == [0.0, 2.0, 5.0, -4.0]
    assert normalize_score(raw, ended, stats, clip=5.0, no_eos_penalty=2.0).tolist() == [0.0, 2.0, 5.0, -5.0]
    assert normalize_score(raw, ended, None, clip=100.0).tolist() == raw.tolist()



def test_combine_scores_normalises_each_source_then_weights_and_sums():
    raw = torch.tensor([[2.0, 1.0], [3.0, 0.0], [1.0, -2.0]])              # (B=3, S=2): reward model, function
    stats = [{"mean": 2.0, "std": 0.5}, None]
    # row i: 1.0 * (rm - 2) / 0.5 + 0.25 * fn
    assert combine_scores(raw, stats, [1.0, 0.25]).tolist() == [0.25, 2.0, -2.5]
    assert torch.equal(combine_scores(raw[:, :1], stats[:1], [1.0]), (raw[:, 0] - 2.0) / 0.5)  # one source: as before

# ----------------------------------------------------------------------------- critic-free estimators

def test_group_shaped_scores_hand_computed():
    score = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 6.0])  # two prompts, K = 4
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 3, std 2
    assert torch.equal(group_shaped_scores(score, 4, "reinforce"), score)
    torch.testing.assert_close(group_shaped_scores(score, 4, "reinforce_baseline"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, -1.0, -1.0, -1.0, 3.0]))
    torch.testing.assert_close(group_shaped_scores(score, 4, "dr_grpo"),
                               group_shaped_scores(score, 4, "reinforce_baseline"))
    s3 = 3 ** 0.5
    torch.testing.assert_close(group_shaped_scores(score, 4, "group_norm"),
                               torch.tensor([0.5 * s3, -0.5 * s3, -0.5 * s3, 0.5 * s3, -0.5, -0.5, -0.5, 1.5]))
    # leave-one-out: 1 - (0+0+1)/3, 0 - (1+0+1)/3, ...; 2 - (2+2+6)/3, 6 - (2+2+2)/3
    torch.testing.assert_close(group_shaped_scores(score, 4, "rloo"),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, -4 / 3, -4 / 3, -4 / 3, 4.0]))
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        group_shaped_scores(score, 1, "rloo")
    assert torch.equal(group_shaped_scores(torch.tensor([3.0, 3.0]), 2, "group_norm"), torch.zeros(2))  # no NaN


def test_rloo_equals_a_plain_leave_one_out_loop():
    score = torch.randn(12)
    expected = []
    for g in range(3):
        group = score[4 * g:4 * g + 4].tolist()
        for i, r in enumerate(group):
            expected.append(r - sum(x for j, x in enumerate(group) if j != i) / 3)
    torch.testing.assert_close(group_shaped_scores(score, 4, "rloo"), torch.tensor(expected))


def test_cumulative_returns_equal_a_plain_loop():
    rewards, mask = torch.randn(3, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    for gamma in (1.0, 0.9):
        got = cumulative_returns(rewards, mask, gamma)
        for b in range(3):
            n = int(mask[b].sum())
            for t in range(5):
                expected = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, n)) if t < n else 0.0
                assert got[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_critic_free_advantages_put_the_shaped_score_and_the_kl_into_returns():
    score = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = critic_free_advantages(score, kl, mask, kl_coef=1.0, group_size=2, estimator="dr_grpo")
    # shaped scores +0.5 / -0.5 at the last action; rewards -kl elsewhere; returns = suffix sums
    torch.testing.assert_close(ret, torch.tensor([[0.5 - 0.6, 0.5 - 0.5, 0.5 - 0.3], [-0.5 - 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(adv, ret)  # GRPO-style estimators use the returns as they are
    adv, ret = critic_free_advantages(score, kl, mask, kl_coef=1.0, group_size=1, estimator="reinforce")
    torch.testing.assert_close(adv, masked_whiten(ret, mask))  # REINFORCE++ whitens over the batch


def test_aggregate_loss_modes_hand_computed():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(per_token, mask, "seq_mean_token_sum_norm").item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", max_len=8).item() == pytest.approx((6 + 4) / 16)
    with pytest.raises(ValueError, match="--loss_agg"):
        aggregate_loss(per_token, mask, "sum")


def test_policy_loss_aggregation_follows_loss_agg():
    logprobs = torch.zeros(2, 4)
    advantages = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # ratio 1 everywhere: the per-token loss is -advantage
    for mode, max_len, expected in (("token_mean", None, -5 / 4), ("seq_mean_token_mean", None, -1.5),
                                    ("seq_mean_token_sum_norm", 8, -(3 / 8 + 2 / 8) / 2)):
        loss, _, _ = ppo_policy_loss(logprobs, logprobs, advantages, mask, 0.2, mode, max_len)
        assert loss.item() == pytest.approx(expected)
