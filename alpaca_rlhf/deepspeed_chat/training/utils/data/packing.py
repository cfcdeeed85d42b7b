"""Padding-free packing: the rows of a padded micro-batch, one after the other in a single sequence.

A micro-batch of B rows padded to the longest, T, costs B x T positions in every layer; on the demo's SFT rows
(36 tokens on average, 91 at most) about half of them are padding. Packed, the rows form one sequence (1, N),
N = the real tokens, position ids restart at each row, and attention stays within each row
(decoder_forward's `segments`), so every row's outputs are what the padded forward gives it, and a loss computed
from them is the same loss. Packing is done from the collated (padded) batch, so the batches, their order and the
data position of a resumed run are the same with or without it.
"""
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class PackedRows:
    input_ids: torch.Tensor     # (1, N) the real tokens of every row, row after row
    position_ids: torch.Tensor  # (1, N) 0, 1, ... within each row
    lengths: List[int]          # (B,) each row's real tokens, the packed segments
    index: torch.Tensor         # (N,) flat index b * T + t in the padded (B, T) batch of each packed token
    shape: tuple                # (B, T) of the padded batch


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
    """Pack the real tokens of a padded batch (B, T); each row's real tokens must be contiguous (left or right
    padding)."""
    mask = attention_mask.bool()
    index = mask.reshape(-1).nonzero().squeeze(-1)                      # (N,) row-major: row after row
    positions = (mask.long().cumsum(-1) - 1).reshape(-1)[index]       # (N,)
    return PackedRows(input_ids.reshape(-1)[index].unsqueeze(0), positions.unsqueeze(0),
                      mask.sum(-1).tolist(), index, tuple(input_ids.shape))


def packed_position(packed: PackedRows) -> torch.Tensor:
    """(B * T,) the packed position of each padded position, -1 for padding."""
    where = torch.full((packed.shape[0] * packed.shape[1],), -1, dtype=torch.long, device=packed.index.device)
    where[packed.index] = torch.arange(packed.index.numel(), device=packed.index.device)
    return where


def unpack(values: torch.Tensor, packed: PackedRows, fill: float = 0.0) -> torch.Tensor:
    """Per-token values of the packed sequence, (1, N) or (N,), back in the padded layout (B, T), `fill` on
    padding. Differentiable."""
    B, T = packed.shape
    out = values.new_full((B * T,), fill)
    return out.index_put((packed.index,), values.reshape(-1)).view(B, T)
