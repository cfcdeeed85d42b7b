"""The log-probabilities steps 1 and DPO train on, computed where they are read.

`scored_token_log_probs` gives log pi(token j | tokens before j) for the tokens a loss scores (an SFT example's
answer, a DPO pair's responses). On the LLaMA-like families (decoder.runs) the rows of the micro-batch are packed
without padding (--packing, utils/data/packing.py) and the final LM head and log-softmax run only at the positions
that predict a scored token, --logits_chunk at a time (decoder.lm_head_log_probs): the (tokens x vocab) logits of
prompt and padding positions, which the loss would throw away, are never computed; the last decoder layer, whose
outputs only the LM head reads, computes each row from its first such position on. Other families (OPT, GPT-2,
flash-attention kernels) take the transformers forward over the padded batch and the full logits; the numbers are
the same either way (tests/test_packing.py).
"""
import torch

from ..data.packing import pack_rows
from ..losses import gather_log_probs
from .decoder import LeanCausalLM, runs


def runs_lean(model, length: int) -> bool:
    """Whether scored_token_log_probs computes `model` (a causal LM or its engine) with our decoder, for rows of up
    to `length` tokens: answer-only LM head, and packing where asked; else the transformers forward, padded."""
    module = getattr(model, "module", model)
    return isinstance(module, LeanCausalLM) and runs(module, length)


def scored_token_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                           packing: bool = True, logits_chunk: int = 0) -> torch.Tensor:
    """log pi(input_ids[b, j] | input_ids[b, :j]) where score_mask[b, j] is 1 (j >= 1), 0 elsewhere: (B, T).

    model: a causal LM or its DeepSpeed engine; input_ids, attention_mask, score_mask (B, T), rows right-padded."""
    B, T = input_ids.shape
    scored = score_mask.bool().clone()
    scored[:, 0] = False                                                # the first token has no prediction
    if not runs_lean(model, T):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits           # (B, T, V)
        logp = gather_log_probs(logits[:, :-1], input_ids[:, 1:])                           # (B, T-1): token j+1
        return torch.nn.functional.pad(logp, (1, 0)) * scored.to(logp.dtype)
    token = scored.reshape(-1).nonzero().squeeze(-1)                    # (M,) flat (b, j) of the scored tokens
    predictor = token - 1                                               # (b, j - 1): the position predicting it
    targets = input_ids.reshape(-1)[token]
    if packing:
        packed = pack_rows(input_ids, attention_mask)
        logp = model(input_ids=packed.input_ids, position_ids=packed.position_ids, segments=packed.blocks,
                     target_positions=packed.source[predictor], target_ids=targets,
                     logits_chunk=logits_chunk)                          # (M,)
    else:
        logp = model(input_ids=input_ids, attention_mask=attention_mask, target_positions=predictor,
                     target_ids=targets, logits_chunk=logits_chunk)      # (M,)
    out = logp.new_zeros(B * T)
    return out.index_put((token,), logp).view(B, T)


def answer_nll(model, batch, packing: bool = True, logits_chunk: int = 0):
    """(summed negative log-likelihood of a supervised batch's labelled tokens, their number): the SFT loss is
    the first over the second (step 1, step 3's PTX; step 1's perplexity sums both over the eval split).
    batch: input_ids, attention_mask, labels (-100 where no loss is taken), (B, T)."""
    scored = batch["labels"] != -100
    logp = scored_token_log_probs(model, batch["input_ids"], batch["attention_mask"], scored, packing, logits_chunk)
    return -logp.sum(), scored[:, 1:].sum()  # (the first token has no prediction)
