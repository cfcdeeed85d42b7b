"""Micro-batches by token budget (--max_tokens_per_batch) instead of a fixed number of rows.

With a fixed row count, a micro-batch of short rows leaves the device idle and one of long rows may not fit; a
token budget keeps each micro-batch's work (and activation memory) near the same size. Each epoch the rows are
shuffled with the epoch's seed, then cut into consecutive micro-batches: a row joins the current micro-batch
while its cost stays within the budget, and a row over the budget alone makes a micro-batch of its own.

The cost of a micro-batch is what the forward computes: packed (--packing, where it applies) the sum of its
rows' real tokens; padded, rows x the longest row. A pair (step 2, DPO) counts both of its sequences.

Every rank computes the same list of micro-batches from the same seed and takes every world-size-th one, the
list being topped up with its own first micro-batches to a multiple of the world size (as DistributedSampler
repeats rows), so all ranks run the same number of micro-batches (a rank that ran out first would leave the
others waiting in the gradient all-reduce). The number of micro-batches differs from epoch to epoch;
`epoch_lengths` gives them in advance for the learning-rate schedule and the progress bar.
"""
from typing import List, Sequence

import numpy as np
import torch


def budget_batches(order: Sequence[int], tokens: np.ndarray, max_tokens: int, padded: bool) -> List[List[int]]:
    """Cut `order` (row indices) into consecutive micro-batches of cost <= max_tokens (a row costing more alone).
    tokens[i]: row i's cost (row_costs). padded: a micro-batch costs len(batch) x its largest tokens[i] (every row
    padded to the longest); else the sum of its tokens[i]."""
    batches, current, total, widest = [], [], 0, 0
    for i in order:
        n = int(tokens[i])
        cost = (len(current) + 1) * max(widest, n) if padded else total + n
        if current and cost > max_tokens:
            batches.append(current)
            current, total, widest = [], 0, 0
        current.append(int(i))
        total, widest = total + n, max(widest, n)
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """A DataLoader batch_sampler: this rank's micro-batches of the epoch set by set_epoch (see the module doc)."""

    def __init__(self, tokens: np.ndarray, max_tokens: int, padded: bool, shuffle: bool, seed: int,
                 num_replicas: int = 1, rank: int = 0):
        self.tokens, self.max_tokens, self.padded = np.asarray(tokens), max_tokens, padded
        self.shuffle, self.seed, self.num_replicas, self.rank = shuffle, seed, num_replicas, rank
        self.epoch = 0
        self._cached = (None, None)  # (epoch, its batches): len() and iter() of one epoch cut the rows once

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def all_batches(self, epoch: int) -> List[List[int]]:
        """Every rank's micro-batches of `epoch`, topped up to a multiple of the world size."""
        if self._cached[0] != epoch:
            self._cached = (epoch, self._cut(epoch))
        return self._cached[1]

    def _cut(self, epoch: int) -> List[List[int]]:
        n = len(self.tokens)
        if self.shuffle:  # a generator of its own: the global RNG (restored by a resume) is not touched
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = range(n)
        batches = budget_batches(order, self.tokens, self.max_tokens, self.padded)
        short = -len(batches) % self.num_replicas
        return batches + (batches * self.num_replicas)[:short]

    def __iter__(self):
        return iter(self.all_batches(self.epoch)[self.rank::self.num_replicas])

    def __len__(self):
        return len(self.all_batches(self.epoch)) // self.num_replicas

    def epoch_lengths(self, epochs: int) -> List[int]:
        """This rank's number of micro-batches in each of the first `epochs` epochs."""
        return [len(self.all_batches(e)) // self.num_replicas for e in range(epochs)]


def row_costs(dataset, padded: bool) -> np.ndarray:
    """budget_batches' tokens[i] from a TokenizedDataset's offsets, without reading any token: step 1's row
    length, or a pair's chosen + rejected lengths (padded: twice the longer one, as both pad to the longest)."""
    lengths = {name: np.diff(offsets) for name, (_, offsets) in dataset.fields.items()}
    if "chosen_ids" not in lengths:
        return lengths["input_ids"]
    chosen, rejected = lengths["chosen_ids"], lengths["rejected_ids"]
    return 2 * np.maximum(chosen, rejected) if padded else chosen + rejected
