"""Reward-model and DPO maths against plain loops and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from alpaca_rlhf.deepspeed_chat.training.utils.losses import (
    divergence_span, dpo_loss, end_scores, gather_log_probs, last_token_index, pairwise_reward_loss,
    sequence_log_probs)

PAD = 0


def mask_of(rows):
    return torch.tensor([[0 if t == PAD else 1 for t in r] for r in rows])


def reference_pair_loss(c_ids, r_ids, c_vals, r_vals):
    """Plain-Python version of the rule for one pair: strip padding, find the first differing position,
    average -logsigmoid(c - r) up to the end of the longer answer (past a row's end, its end score)."""
    c_pos = [i for i, t in enumerate(c_ids) if t != PAD]
    r_pos = [i for i, t in enumerate(r_ids) if t != PAD]
    c_tok, r_tok = [c_ids[i] for i in c_pos], [r_ids[i] for i in r_pos]
    c_val = [c_vals[i] for i in c_pos]
    r_val = [r_vals[i] for i in r_pos]
    end = max(len(c_tok), len(r_tok))
    start = None
    for k in range(end):
        a = c_tok[k] if k < len(c_tok) else None
        b = r_tok[k] if k < len(r_tok) else None
        if a != b:
            start = k
            break
    if start is None:
        start = end - 1
    terms = []
    for k in range(start, end):
        cv = c_val[min(k, len(c_val) - 1)]
        rv = r_val[min(k, len(r_val) - 1)]
        terms.append(-math.log(1 / (1 + math.exp(-(cv - rv)))))
    return sum(terms) / len(terms), c_val[-1], r_val[-1]


# (chosen ids, rejected ids): same prefix, then they differ; different lengths; identical; left padding
PAIRS = [
    ([1, 5, 6, 7, 2, PAD], [1, 5, 6, 9, 9, 2]),        # right padding, diverge at 3, rejected longer
    ([1, 5, 6, 7, 8, 2], [1, 5, 6, 2, PAD, PAD]),      # chosen longer
    ([1, 5, 6, 2, PAD, PAD], [1, 5, 6, 2, PAD, PAD]),  # identical pair
    ([PAD, PAD, 1, 5, 7, 2], [PAD, 1, 5, 8, 8, 2]),    # left padding, different amounts
    ([1, 4, 2, PAD, PAD, PAD], [1, 2, PAD, PAD, PAD, PAD]),  # rejected empty answer (just EOS)
]


def test_divergence_span_on_hand_made_pairs():
    c = torch.tensor([p[0] for p in PAIRS])
    r = torch.tensor([p[1] for p in PAIRS])
    span = divergence_span(c, r, mask_of(c.tolist()), mask_of(r.tolist()))
    # positions are counted from each row's first real token
    assert span.tolist() == [
        [0, 0, 0, 1, 1, 1],   # diverge at 3, longer has 6 tokens
        [0, 0, 0, 1, 1, 1],   # diverge at 3 (7 vs EOS), chosen has 6
        [0, 0, 0, 1, 0, 0],   # identical: the last token only
        [0, 0, 1, 1, 1, 0],   # real tokens [1,5,7,2] vs [1,5,8,8,2]: diverge at 2, end 5
        [0, 1, 1, 0, 0, 0],   # [1,4,2] vs [1,2]: diverge at 1, end 3
    ]


def test_pairwise_span_loss_matches_plain_loop():
    torch.manual_seed(0)
    c = torch.tensor([p[0] for p in PAIRS])
    r = torch.tensor([p[1] for p in PAIRS])
    cv, rv = torch.randn(c.shape, dtype=torch.float64), torch.randn(r.shape, dtype=torch.float64)
    loss, c_end, r_end = pairwise_reward_loss(cv, rv, c, r, mask_of(c.tolist()), mask_of(r.tolist()))
    expected = [reference_pair_loss(p[0], p[1], cv[i].tolist(), rv[i].tolist()) for i, p in enumerate(PAIRS)]
    assert loss.item() == pytest.approx(sum(e[0] for e in expected) / len(expected), rel=1e-12)
    assert c_end.tolist() == pytest.approx([e[1] for e in expected])
    assert r_end.tolist() == pytest.approx([e[2] for e in expected])


def test_pairwise_loss_hand_computed():
    ids_c, ids_r = torch.tensor([[1, 3, 2]]), torch.tensor([[1, 4, 2]])
    mask = torch.ones(1, 3, dtype=torch.long)
    cv, rv = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    loss, c_end, r_end = pairwise_reward_loss(cv, rv, ids_c, ids_r, mask, mask)
    sp = lambda x: math.log1p(math.exp(-x))  # -log sigmoid(x)  # noqa: E731
    assert loss.item() == pytest.approx((sp(1.0) + sp(2.0)) / 2)  # positions 1 and 2
    assert (c_end.item(), r_end.item()) == (2.0, 0.0)
    last, *_ = pairwise_reward_loss(cv, rv, ids_c, ids_r, mask, mask, loss_type="last_token")
    assert last.item() == pytest.approx(sp(2.0))
    with pytest.raises(ValueError):
        pairwise_reward_loss(cv, rv, ids_c, ids_r, mask, mask, loss_type="mean")


def test_identical_pair_has_zero_gradient_not_an_error():
    ids = torch.tensor([[1, 5, 2]])
    mask = torch.ones_like(ids)
    v = torch.tensor([[0.3, -0.2, 0.7]], requires_grad=True)
    loss, *_ = pairwise_reward_loss(v, v, ids, ids, mask, mask)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2)) and torch.all(v.grad == 0)


def test_end_scores_left_and_right_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 2]
    assert end_scores(values, mask).tolist() == [2.0, 8.0, 11.0]


def test_gather_log_probs_equals_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_log_probs(logits, labels), expected)


def test_gather_log_probs_gradient_equals_autograd_of_log_softmax():
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (2, 5))
    weights = torch.randn(2, 5)  # a loss that weighs every position differently
    grads = []
    for fn in (gather_log_probs, lambda z, y: torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)):
        torch.manual_seed(1)
        logits = torch.randn(2, 6, 11, requires_grad=True)
        (fn(logits[:, :-1], labels) * weights).sum().backward()  # through a slice, as the trainers call it
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][:, -1].abs().sum() == 0  # the sliced-off position gets no gradient
    assert torch.autograd.gradcheck(gather_log_probs, (torch.randn(2, 3, 5, dtype=torch.float64,
                                                                   requires_grad=True), labels[:, :3] % 5))


def test_sequence_log_probs_sums_response_tokens_with_the_shift():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[1, 3, 5, 2]])
    response = torch.tensor([[0, 0, 1, 1]])  # tokens 5 and 2 are the answer
    lp = torch.log_softmax(logits, -1)
    expected = lp[0, 1, 5] + lp[0, 2, 2]  # position t-1 predicts token t
    assert sequence_log_probs(logits, ids, response).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -2.0])
    losses, c_rew, r_rew = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: (−1+1.5) − (−3+2.5) = 1.0 -> logits 0.1; pair 1: 0 − 1 = −1 -> logits −0.1
    expected = [-math.log(1 / (1 + math.exp(-0.1))), -math.log(1 / (1 + math.exp(0.1)))]
    assert losses.tolist() == pytest.approx(expected)
    assert c_rew.tolist() == pytest.approx([0.05, 0.0]) and r_rew.tolist() == pytest.approx([-0.05, 0.1])
    smoothed, *_ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert smoothed[0].item() == pytest.approx(0.8 * expected[0] + 0.2 * -F.logsigmoid(torch.tensor(-0.1)).item())


def test_causal_lm_loss_matches_a_plain_loop():
    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import causal_lm_loss
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 4, -100, 6], [1, 2, -100, -100, -100]])
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
             for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert causal_lm_loss(logits, labels).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-12)
    assert causal_lm_loss(logits.float(), labels, fp32=True).dtype == torch.float32
