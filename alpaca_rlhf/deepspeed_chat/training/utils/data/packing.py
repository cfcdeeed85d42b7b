"""Padding-free packing: the rows of a padded micro-batch, one after the other in a single sequence.

A micro-batch of B rows padded to the longest, T, costs B x T positions in every layer; on the demo's SFT rows
(36 tokens on average, 91 at most) about half of them are padding. Packed, the rows form one sequence (1, N),
N = the real tokens, position ids restart at each row, and attention stays within each row's block of the
sequence (decoder_forward's `segments`), so every row's outputs are what the padded forward gives it, and a loss
computed from them is the same loss. Packing is done from the collated (padded) batch, so the batches, their order
and the data position of a resumed run are the same with or without it.

A reward model's pair (chosen, rejected) shares its prompt, and often the first answer tokens: `pack_pairs` lays a
pair out as [common prefix | rest of chosen | rest of rejected], the rejected tokens attending to the prefix and to
themselves only, so the prefix is computed once for both rows (the outputs at a position depend on the tokens up
to it only, so they are the same for both).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# [start, end) of a block of the packed sequence, and its (end - start)^2 boolean attention mask (True: may
# attend; None: plain causal)
Block = Tuple[int, int, Optional[torch.Tensor]]


@dataclass
class PackedRows:
    input_ids: torch.Tensor     # (1, N) the real tokens, block after block
    position_ids: torch.Tensor  # (1, N) each token's position within its row
    blocks: List[Block]         # attention stays within each block
    source: torch.Tensor        # (B * T,) the packed position of each padded position, -1 for padding
    shape: tuple                # (B, T) of the padded batch
    read_from: Optional[List[int]] = None  # per block, the first position a pairwise loss reads (pack_pairs)


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
    """Pack the real tokens of a padded batch (B, T); each row's real tokens must be contiguous (left or right
    padding). One causal block per row."""
    mask = attention_mask.bool()
    index = mask.reshape(-1).nonzero().squeeze(-1)                      # (N,) row-major: row after row
    positions = (mask.long().cumsum(-1) - 1).reshape(-1)[index]       # (N,)
    source = torch.full((mask.numel(),), -1, dtype=torch.long, device=mask.device)
    source[index] = torch.arange(index.numel(), device=mask.device)
    ends = mask.sum(-1).cumsum(0).tolist()
    blocks = [(start, end, None) for start, end in zip([0] + ends[:-1], ends)]
    return PackedRows(input_ids.reshape(-1)[index].unsqueeze(0), positions.unsqueeze(0), blocks, source,
                      tuple(input_ids.shape))


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
    """Pack a reward batch, rows [0, B) chosen and [B, 2B) rejected, right-padded (B, T) each half: one block per
    pair, [common prefix | chosen's rest | rejected's rest], the rejected rest masked from the chosen rest."""
    B2, T = input_ids.shape
    B = B2 // 2
    lengths = attention_mask.sum(-1).tolist()
    rows = input_ids.tolist()
    ids, positions, blocks, read_from = [], [], [], []
    source = torch.full((B2 * T,), -1, dtype=torch.long)
    for b in range(B):
        c, r = rows[b][:lengths[b]], rows[B + b][:lengths[B + b]]
        p = 0
        while p < min(len(c), len(r)) and c[p] == r[p]:
            p += 1
        start = len(ids)
        a, z = len(c) - p, len(r) - p                                    # the two rests
        ids += c + r[p:]
        positions += list(range(len(c))) + list(range(p, len(r)))
        source[b * T:b * T + len(c)] = torch.arange(start, start + len(c))
        source[(B + b) * T:(B + b) * T + p] = torch.arange(start, start + p)
        source[(B + b) * T + p:(B + b) * T + len(r)] = torch.arange(start + p + a, start + p + a + z)
        L = p + a + z
        allowed = torch.ones(L, L, dtype=torch.bool).tril()             # causal over the block
        allowed[p + a:, p:p + a] = False                                  # rejected's rest never sees chosen's
        blocks.append((start, start + L, allowed if a and z else None))
        # The pairwise loss reads each row from the first differing token on (losses.divergence_span), and its
        # last token: both within the rests, except where a row ends inside the prefix (one answer a prefix of
        # the other, or both equal).
        read_from.append(start + min(p, len(c) - 1, len(r) - 1))
    device = input_ids.device
    return PackedRows(torch.tensor([ids], device=device), torch.tensor([positions], device=device),
                      [(s, e, m if m is None else m.to(device)) for s, e, m in blocks], source.to(device), (B2, T),
                      read_from)


def suffix_positions(blocks, firsts, device=None) -> torch.Tensor:
    """(R,) the positions from firsts[k] to the end of blocks[k], block after block: what the last layer computes
    with decoder_forward's last_layer_from=firsts, in the order of its output."""
    return torch.cat([torch.arange(f, end, device=device) for (_, end, _), f in zip(blocks, firsts)])


def position_index(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) each position's index in `positions` (R,), -1 where it is not among them."""
    index = torch.full((length,), -1, dtype=torch.long, device=positions.device)
    index[positions] = torch.arange(positions.numel(), device=positions.device)
    return index


def unpack(values: torch.Tensor, packed: PackedRows, fill: float = 0.0,
           positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token values of the packed sequence, (1, N) or (N,), in the padded layout (B, T), `fill` on padding
    (a shared prefix's values in both of its rows). Differentiable (the two rows' gradients add up).
    positions: values holds only these packed positions, (R,) (suffix_positions); `fill` everywhere else."""
    flat = values.reshape(-1)
    source = packed.source
    if positions is not None:  # packed position -> index into values, -1 where not computed
        source = torch.where(source >= 0, position_index(positions, packed.input_ids.size(1))[source.clamp(min=0)],
                             source)
    real = source >= 0
    out = flat[source.clamp(min=0)]
    return torch.where(real, out, out.new_full((), fill)).view(packed.shape)
