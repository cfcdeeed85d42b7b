"""--max_tokens_per_batch: micro-batches cut by token budget, the same number on every rank, resumable."""
import argparse

import numpy as np
import pytest
import torch

from alpaca_rlhf.deepspeed_chat.training.utils.args import check_batch_args
from alpaca_rlhf.deepspeed_chat.training.utils.data import data_utils as du
from alpaca_rlhf.deepspeed_chat.training.utils.data.token_budget import (TokenBudgetBatchSampler, budget_batches,
                                                                         row_costs)
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.train_utils import num_update_steps


def cost(batch, tokens, padded):
    return len(batch) * max(tokens[i] for i in batch) if padded else sum(tokens[i] for i in batch)


@pytest.mark.parametrize("padded", [False, True])
def test_budget_batches_are_consecutive_within_budget_and_full(padded):
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 100, size=300)
    order = rng.permutation(300).tolist()
    batches = budget_batches(order, tokens, 400, padded)
    assert [i for b in batches for i in b] == order  # every row once, in the given order
    for b, nxt in zip(batches, batches[1:]):
        assert cost(b, tokens, padded) <= 400
        assert cost(b + [nxt[0]], tokens, padded) > 400  # it was closed only because the next row did not fit
    assert cost(batches[-1], tokens, padded) <= 400


def test_a_row_over_the_budget_is_a_micro_batch_of_its_own():
    tokens = np.array([10, 500, 10, 10])
    assert budget_batches(range(4), tokens, 100, padded=False) == [[0], [1], [2, 3]]
    # padded, the cost is rows x the longest: 3 rows of 40 make 120
    assert budget_batches(range(3), np.array([40, 40, 40]), 100, padded=True) == [[0, 1], [2]]


def test_every_rank_gets_the_same_number_of_micro_batches_and_all_rows():
    tokens = np.random.default_rng(1).integers(5, 120, size=257)
    for world in (1, 2, 3):
        samplers = [TokenBudgetBatchSampler(tokens, 500, False, True, seed=3, num_replicas=world, rank=r)
                    for r in range(world)]
        for epoch in range(3):
            for s in samplers:
                s.set_epoch(epoch)
            per_rank = [list(s) for s in samplers]
            assert len({len(b) for b in per_rank}) == 1 and all(len(b) == len(s) for b, s in zip(per_rank, samplers))
            rows = [i for batches in per_rank for b in batches for i in b]
            assert set(rows) == set(range(257))
            assert len(rows) - 257 <= max(len(b) for batches in per_rank for b in batches) * (world - 1)
            assert all(cost(b, tokens, False) <= 500 for batches in per_rank for b in batches)
        assert samplers[0].epoch_lengths(3) == [len(samplers[0].all_batches(e)) // world for e in range(3)]
    a = TokenBudgetBatchSampler(tokens, 500, False, True, seed=3)
    b = TokenBudgetBatchSampler(tokens, 500, False, True, seed=3)
    b.set_epoch(1)
    assert list(a) == list(TokenBudgetBatchSampler(tokens, 500, False, True, seed=3)) != list(b)


def sft_dataset(n=50, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, size=n).tolist()
    rows = [{"input_ids": list(range(1, k + 1)), "labels": list(range(1, k + 1))} for k in lengths]
    return du.TokenizedDataset.from_rows(rows, ["input_ids", "labels"])


def test_row_costs_read_lengths_from_the_offsets():
    data = sft_dataset(10)
    assert row_costs(data, padded=False).tolist() == [len(data[i]["input_ids"]) for i in range(10)]
    pairs = du.TokenizedDataset.from_rows([{"chosen_ids": [1] * 5, "rejected_ids": [1] * 9, "prompt_len": [2, 2]},
                                           {"chosen_ids": [1] * 7, "rejected_ids": [1] * 3, "prompt_len": [2, 2]}],
                                          ["chosen_ids", "rejected_ids", "prompt_len"])
    assert row_costs(pairs, padded=False).tolist() == [14, 10]
    assert row_costs(pairs, padded=True).tolist() == [18, 14]


def test_budget_loader_resumes_at_the_same_micro_batch_and_schedules_every_epoch():
    data = sft_dataset(80)
    loader = du.budget_dataloader(data, du.DataCollatorSFT(0), max_tokens=120, packed=True, seed=5)
    du.set_epoch(loader, 2)
    full = [b["input_ids"] for b in loader]
    assert all(int(b.ne(0).sum()) <= 120 for b in full) and len(full) > 80 * 21 // 120  # (0: padding)
    du.set_epoch(loader, 2)
    rest = [b["input_ids"] for b in du.skip_batches(loader, 3)]
    assert len(rest) == len(full) - 3 and all(torch.equal(x, y) for x, y in zip(rest, full[3:]))
    lengths = du.epoch_lengths(loader, 3)
    assert lengths[2] == len(full) and sum(lengths) > 0
    assert num_update_steps(lengths, 4) == sum(-(-n // 4) for n in lengths)
    assert num_update_steps(lengths, 4, max_train_steps=2) == 2


def test_a_budget_below_max_seq_len_is_refused():
    args = argparse.Namespace(max_seq_len=512, max_tokens_per_batch=100, per_device_train_batch_size=8,
                              gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="--max_tokens_per_batch"):
        check_batch_args(args, 1)
    args.max_tokens_per_batch = 512
    assert check_batch_args(args, 1).world_size == 1
