"""Reward model (step 2) and critic (step 3): a decoder with a scalar value head.

On disk it is an ordinary `*ForSequenceClassification` checkpoint with one label (decoder weights under
`model.`, the head as `score.weight`), so `AutoModelForSequenceClassification.from_pretrained` and other
tools load it, safetensors and sharded checkpoints included. A plain causal-LM directory (the step-1 actor
or a base model) also loads: the head then starts at zero.
"""
import copy
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.utils import logging as hf_logging

from ..losses import end_scores, pairwise_reward_loss, position_ids_from_mask
from ..utils import all_gather_cat
from ..data.packing import pack_pairs, suffix_positions, unpack
from .decoder import body_hidden_states, decoder_forward, runs, suffix_start
from .model_utils import create_hf_model

HEAD_KEY = "score.weight"


class ValueHead(nn.Linear):
    """hidden -> one scalar per position, no bias, computed in float32 whatever the model's dtype:
    (B, T, H) -> (B, T). In bf16 a score carries 8 bits of mantissa, too coarse for the pairwise margins,
    whitened rewards and value targets made from it; the product is one dot per position. (A module, not a
    function on its weight: ZeRO-3 gathers a module's parameters when the module itself is called.)"""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1, bias=False)
        nn.init.zeros_(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight.float()).squeeze(-1)


class RewardModel(nn.Module):
    """`rwtransformer` (the decoder, no LM head) + `v_head` (hidden -> 1, no bias)."""

    def __init__(self, base_model: nn.Module, num_padding_at_beginning: int = 0, compute_fp32_loss: bool = False,
                 loss_type: str = "span"):
        super().__init__()
        self.config = base_model.config
        self.rwtransformer = base_model
        hidden = getattr(self.config, "word_embed_proj_dim", None) or self.config.hidden_size
        self.v_head = ValueHead(hidden)
        # Kept for DeepSpeed-Chat command-line compatibility: sequence ends are found from the attention
        # mask, so leading pad tokens (OPT's one) never need counting.
        self.num_padding_at_beginning = num_padding_at_beginning
        self.compute_fp32_loss = compute_fp32_loss  # kept for callers; values are always float32 (ValueHead)
        self.loss_type = loss_type

    def gradient_checkpointing_enable(self, **kwargs):
        self.rwtransformer.gradient_checkpointing_enable(**kwargs)

    def hidden_states(self, input_ids, attention_mask, from_position: int = 0) -> torch.Tensor:
        """The decoder's last hidden states at positions S .. T - 1, (B, T - S, H), S = from_position (see
        decoder.suffix_start): the positions before S are computed in every layer but the last only as keys and
        values. Positions count real tokens, so left-padded rollouts (step 3) see the same positions as the
        right-padded pairs the model was trained on."""
        return body_hidden_states(self.rwtransformer, input_ids, attention_mask,
                                  position_ids_from_mask(attention_mask), from_position=from_position)

    def values(self, input_ids, attention_mask, from_position: int = 0) -> torch.Tensor:
        """Per-token scalar values in float32, (B, T - S)."""
        return self.v_head(self.hidden_states(input_ids, attention_mask, from_position))

    def packed_pair_values(self, input_ids, attention_mask) -> torch.Tensor:
        """The values the pairwise loss reads of a pair batch (rows [0, B) chosen, [B, 2B) rejected), computed
        packed without padding, each pair's common prefix once (utils/data/packing.pack_pairs): (2B, T). The last
        layer and the value head run only from each pair's first differing token (or its shorter row's last one)
        on; the loss reads no earlier position, which holds 0 here, as padding does."""
        packed = pack_pairs(input_ids, attention_mask)
        hidden = decoder_forward(self.rwtransformer, packed.input_ids, None, packed.position_ids,
                                 segments=packed.blocks, last_layer_from=packed.read_from)  # (1, R, H)
        computed = suffix_positions(packed.blocks, packed.read_from, hidden.device)   # (R,)
        return unpack(self.v_head(hidden), packed, positions=computed)

    def packs(self, packing: bool, length: int) -> bool:
        """Whether forward(packing=packing) runs pairs of up to `length` tokens packed."""
        return packing and runs(self.rwtransformer, length)

    def forward(self, input_ids, attention_mask, packing: bool = False, **unused):
        """input_ids (2B, T): rows [0, B) chosen, [B, 2B) rejected (same prompts). Pairwise loss + end scores.
        packing: the pairs in one packed sequence, no padding, each pair's common prefix computed once (where
        decoder_forward runs); the loss reads no padding position, so it is the same."""
        if self.packs(packing, input_ids.size(1)):
            values = self.packed_pair_values(input_ids, attention_mask)
        else:
            values = self.values(input_ids, attention_mask)
        B = input_ids.size(0) // 2
        loss, chosen, rejected = pairwise_reward_loss(values[:B], values[B:], input_ids[:B], input_ids[B:],
                                                      attention_mask[:B], attention_mask[B:], self.loss_type)
        return {"loss": loss, "chosen_mean_scores": chosen, "rejected_mean_scores": rejected}

    def forward_value(self, input_ids, attention_mask, return_value_only: bool = False, prompt_length: int = 0,
                      from_position: int = 0):
        """Per-token values (B, T - S) of positions S .. T - 1 (critic), or with the end score of each sequence
        (reward; from_position at most the earliest last real token)."""
        values = self.values(input_ids, attention_mask, from_position)
        if return_value_only:
            return values
        start = suffix_start(from_position, input_ids.size(1))
        return {"values": values, "chosen_end_scores": end_scores(values, attention_mask, start)}

    # ----------------------------------------------------------------------------------- export / load
    def hf_export(self, state_dict: dict):
        """(config, state dict) of the equivalent *ForSequenceClassification checkpoint."""
        config = copy.deepcopy(self.config)
        config.num_labels = 1
        arch = self.rwtransformer.__class__.__name__.replace("Model", "ForSequenceClassification")
        config.architectures = [arch]
        prefix = getattr(self.rwtransformer, "base_model_prefix", "model") or "model"
        out = {}
        for k, v in state_dict.items():
            if k.startswith("rwtransformer."):
                out[f"{prefix}.{k[len('rwtransformer.'):]}"] = v
            elif k == "v_head.weight":
                out[HEAD_KEY] = v
        return config, out


def _read_head(model_dir: str) -> Optional[torch.Tensor]:
    """score.weight of a sequence-classification checkpoint (single or sharded safetensors), if present."""
    from safetensors import safe_open
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        shard = json.load(open(index))["weight_map"].get(HEAD_KEY)
        files = [shard] if shard else []
    else:
        files = ["model.safetensors"] if os.path.exists(os.path.join(model_dir, "model.safetensors")) else []
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            if HEAD_KEY in f.keys():
                return f.get_tensor(HEAD_KEY)
    return None


def _snapshot_dir(name_or_path: str) -> str:
    """The directory holding a model's files: the path itself, or for a hub name the cached snapshot that
    from_pretrained has just read (where the checkpoint's score.weight sits too)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from transformers.utils import cached_file
    return os.path.dirname(cached_file(name_or_path, "config.json"))


def create_critic_model(model_name_or_path: str, tokenizer=None, ds_config: Optional[dict] = None,
                        num_padding_at_beginning: int = 0, dropout: Optional[float] = None,
                        compute_fp32_loss: bool = False, loss_type: str = "span",
                        trust_remote_code: bool = False, dtype: Optional[str] = None) -> RewardModel:
    """A RewardModel from a step-2 export (head restored) or from any causal-LM / base directory (head zero)."""
    # Loading the decoder alone leaves the checkpoint's head (score.weight or lm_head.weight) unused, which
    # transformers reports as a warning table; that is expected here, the head is read separately below.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        base = create_hf_model(AutoModel, model_name_or_path, tokenizer, ds_config, dropout, trust_remote_code, dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = RewardModel(base, num_padding_at_beginning, compute_fp32_loss, loss_type)
    model.v_head.to(next(base.parameters()).dtype)  # the decoder's (loading) dtype; it computes in float32 anyway
    head = _read_head(_snapshot_dir(model_name_or_path))
    if head is not None:
        with torch.no_grad():
            model.v_head.weight.copy_(head.reshape_as(model.v_head.weight).to(model.v_head.weight.dtype))
    return model


SHORT_ANSWER_TOKENS = 3  # "empty or very short": at most this many answer tokens, EOS included


@torch.no_grad()
def evaluate_pairs(model, loader, eval_iters: int = 0, packing: bool = False):
    """Pairwise accuracy, mean chosen/rejected end scores and margin over all ranks, plus the accuracy on
    pairs whose rejected answer is empty or very short (a reward model that likes those makes PPO collapse).
    Returns (metrics, chosen scores, rejected scores) with the score tensors gathered from every rank."""
    device = next(model.parameters()).device
    chosen, rejected, short = [], [], []
    for i, batch in enumerate(loader):
        if eval_iters and i >= eval_iters:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch["input_ids"], batch["attention_mask"], packing=packing)
        B = batch["input_ids"].size(0) // 2
        answer_len = batch["attention_mask"][B:].sum(-1) - batch["prompt_lens"][B:]
        chosen.append(out["chosen_mean_scores"].float())
        rejected.append(out["rejected_mean_scores"].float())
        short.append(answer_len <= SHORT_ANSWER_TOKENS)
    chosen, rejected, short = (all_gather_cat(torch.cat(x) if x else torch.zeros(0, device=device))
                               for x in (chosen, rejected, short))
    correct = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()  # a tie is a coin flip
    metrics = {
        "eval/accuracy": correct.mean().item() if len(correct) else float("nan"),
        "eval/chosen_score": chosen.mean().item() if len(chosen) else float("nan"),
        "eval/rejected_score": rejected.mean().item() if len(rejected) else float("nan"),
        "eval/margin": (chosen - rejected).mean().item() if len(chosen) else float("nan"),
        "eval/accuracy_short_rejected": correct[short.bool()].mean().item() if short.any() else float("nan"),
        "eval/pairs": float(len(chosen)),
    }
    return metrics, chosen.cpu(), rejected.cpu()


def reward_statistics(chosen: torch.Tensor, rejected: torch.Tensor, source: dict) -> dict:
    """What step 3 needs to normalise rewards, (score - mean) / std, instead of hard-coded constants."""
    return {
        "chosen_mean": chosen.mean().item(), "chosen_std": chosen.std(unbiased=False).item(),
        "rejected_mean": rejected.mean().item(), "rejected_std": rejected.std(unbiased=False).item(),
        "accuracy": (chosen > rejected).float().mean().item(), "num_pairs": int(chosen.numel()),
        "source": source,
    }
