"""From raw datasets to tokenized, cached, split training data for the three steps.

    raw adapters (raw_datasets.py) -> canonical Examples -> seeded --data_split slice for the phase
      -> tokenized arrays (cached under --data_output_path, no pickles) -> TokenizedDataset -> collators

Phase 1 (SFT): bos + prompt + answer + end of turn, loss only on the answer and its end (the rest labelled -100;
with --train_on_all_turns on every assistant turn of the conversation).
Phase 2 (reward / DPO): the same sequence for the chosen and for the rejected answer, plus the prompt length.
Phase 3 (PPO): bos + prompt only; the answers are generated.
The text is rendered by the --chat_template format (chat_template.py); the default, alpaca, is
"\n\nHuman: q\n\nAssistant:" + " a" + EOS.
Sequences longer than --max_seq_len keep their LAST tokens: the answer and its EOS (where the reward is
read and the SFT loss is taken) survive; the start of a long conversation history is what gets cut.
"""
import hashlib
import itertools
import json
import os
import uuid
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..errors import ConfigError
from ..utils import barrier, is_local_rank_0, is_rank_0, print_rank_0
from .chat_template import IGNORE_INDEX, ChatFormat, JinjaFormat, format_from_args, load_chat_format
from .prompt_format import parse_conversation
from .raw_datasets import Example, get_raw_dataset
from .token_budget import TokenBudgetBatchSampler, row_costs
from .token_ids import bos_ids, text_ids

CACHE_FORMAT_VERSION = 2


# ----------------------------------------------------------------------------------------------- splitting
def parse_data_split(data_split: str) -> List[float]:
    try:
        shares = [float(s) for s in str(data_split).split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ConfigError(f"--data_split must be three non-negative numbers like 2,4,4, got {data_split!r}")
    return [s / sum(shares) for s in shares]


def split_indices(n: int, data_split: str, phase: int, seed: int) -> np.ndarray:
    """Indices of the rows that belong to `phase` (1, 2 or 3): one seeded permutation cut into consecutive
    slices, so the three phases never share a row and the same seed always gives the same slices."""
    shares = parse_data_split(data_split)
    bounds = np.round(np.cumsum([0.0] + shares) * n).astype(int)
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[bounds[phase - 1]:bounds[phase]])


# ----------------------------------------------------------------------------------------------- tokenizing
def _keep_last(ids: List[int], max_len: int) -> Tuple[List[int], int]:
    """(ids[-max_len:], number of tokens cut from the front)."""
    cut = max(0, len(ids) - max_len)
    return ids[cut:], cut


def source_messages(example: Example) -> Optional[List[dict]]:
    """The messages the example's source gave for its prompt, or None (the prompt came as text)."""
    if example.messages is None:
        return None
    return [{"role": role, "content": content} for role, content in example.messages]


def prompt_messages(example: Example) -> List[dict]:
    """The conversation before the answer: the example's own messages, or those of its canonical prompt text."""
    messages = source_messages(example)
    return messages if messages is not None else parse_conversation(example.prompt)


def _sequence(fmt: ChatFormat, example: Example, answer: str, max_seq_len: int,
              all_turns: bool = False) -> Tuple[List[int], List[int], int]:
    """(ids, labels, prompt length) of the conversation ending with `answer`, truncated to its last max_seq_len
    tokens. Prompt and answer are tokenized apart: that is how rollouts and the chatbot see them. The prompt
    length counts the tokens before the final answer (BOS, where due, included)."""
    tokenizer = fmt.tokenizer
    if fmt.keeps_text and example.messages is None and not all_turns:  # byte for byte as before chat templates
        prompt_ids = bos_ids(tokenizer) + text_ids(tokenizer, example.prompt)
        answer_ids = text_ids(tokenizer, answer + fmt.answer_suffix) + [tokenizer.eos_token_id]
        ids, labels = prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    else:
        ids, labels = fmt.sequence(prompt_messages(example) + [{"role": "assistant", "content": answer}], all_turns)
    answer_len = len(labels) - _last_label_run_start(labels)
    ids, cut = _keep_last(ids, max_seq_len)
    return ids, labels[cut:], max(0, len(ids) - answer_len)


def _last_label_run_start(labels: List[int]) -> int:
    """Where the final run of labelled tokens (the last answer and its end of turn) starts."""
    i = len(labels)
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i


def tokenize_sft(example: Example, fmt: ChatFormat, max_seq_len: int, all_turns: bool = False) -> Dict[str, List[int]]:
    ids, labels, _ = _sequence(fmt, example, example.chosen, max_seq_len, all_turns)
    return {"input_ids": ids, "labels": labels}


def tokenize_pair(example: Example, fmt: ChatFormat, max_seq_len: int) -> Dict[str, List[int]]:
    chosen, _, chosen_prompt_len = _sequence(fmt, example, example.chosen, max_seq_len)
    rejected, _, rejected_prompt_len = _sequence(fmt, example, example.rejected, max_seq_len)
    return {"chosen_ids": chosen, "rejected_ids": rejected,
            "prompt_len": [chosen_prompt_len, rejected_prompt_len]}


def tokenize_prompt(example: Example, fmt: ChatFormat, max_prompt_len: int) -> Dict[str, List[int]]:
    ids, _ = _keep_last(fmt.prompt_ids_for(example.prompt, source_messages(example)), max_prompt_len)
    return {"prompt_ids": ids}


# ----------------------------------------------------------------------------------------------- storage
class TokenizedDataset(Dataset):
    """Ragged int arrays stored flat with offsets: example i of field f is flat[f][offsets[f][i]:offsets[f][i+1]].
    Saved with np.savez (no pickles), memory-light, and quick to load on every rank."""

    def __init__(self, fields: Dict[str, Tuple[np.ndarray, np.ndarray]]):
        self.fields = fields
        lengths = {len(off) - 1 for _, off in fields.values()}
        if len(lengths) > 1:
            raise ValueError(f"fields disagree on the number of examples: {lengths}")
        self.n = lengths.pop() if lengths else 0

    @classmethod
    def from_rows(cls, rows: Sequence[Dict[str, List[int]]], names: Sequence[str]):
        fields = {}
        for name in names:
            seqs = [r[name] for r in rows]
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(s) for s in seqs])
            flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
            fields[name] = (flat, offsets)
        return cls(fields)

    def save(self, path: str):
        arrays = {}
        for name, (flat, offsets) in self.fields.items():
            arrays[f"{name}.flat"], arrays[f"{name}.offsets"] = flat, offsets
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}.npz"  # unique across nodes sharing a filesystem
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str):
        with np.load(path, allow_pickle=False) as z:
            names = sorted({k.rsplit(".", 1)[0] for k in z.files})
            return cls({n: (z[f"{n}.flat"], z[f"{n}.offsets"]) for n in names})

    def subset(self, n: int) -> "TokenizedDataset":
        if n <= 0 or n >= self.n:
            return self
        return TokenizedDataset({k: (flat[:off[n]], off[:n + 1]) for k, (flat, off) in self.fields.items()})

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {name: torch.from_numpy(flat[off[i]:off[i + 1]].copy()) for name, (flat, off) in self.fields.items()}


# ----------------------------------------------------------------------------------------------- building
PHASE_FIELDS = {1: ("input_ids", "labels"), 2: ("chosen_ids", "rejected_ids", "prompt_len"), 3: ("prompt_ids",)}


def _tokenize(example: Example, phase: int, fmt: ChatFormat, max_seq_len: int, all_turns: bool):
    if phase == 1:
        return tokenize_sft(example, fmt, max_seq_len, all_turns)
    if phase == 2:
        return tokenize_pair(example, fmt, max_seq_len)
    return tokenize_prompt(example, fmt, max_seq_len)


def format_fingerprint(fmt: ChatFormat, all_turns: bool) -> list:
    """What of the chat format changes the tokenized data."""
    return [fmt.name, getattr(fmt, "template", None) if isinstance(fmt, JinjaFormat) else None, fmt.system_prompt,
            fmt.answer_suffix, bool(all_turns)]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([type(tokenizer).__name__, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer("\n\nHuman: a b\n\nAssistant: 12", add_special_tokens=False)["input_ids"]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def source_fingerprint(path_or_name: str) -> list:
    """Name plus (file, size, mtime) of every file of a local dataset: edited data rebuilds the cache."""
    if not os.path.isdir(path_or_name):
        return [path_or_name]
    files = []
    for root, _, names in os.walk(path_or_name):
        for name in sorted(names):
            full = os.path.join(root, name)
            st = os.stat(full)
            files.append([os.path.relpath(full, path_or_name), st.st_size, int(st.st_mtime)])
    return [os.path.abspath(path_or_name), sorted(files)]


def cache_key(sources, sft_only, data_split, phase, seed, tokenizer, max_seq_len, chat_format) -> str:
    payload = json.dumps({"v": CACHE_FORMAT_VERSION, "sources": [source_fingerprint(s) for s in sources],
                          "sft_only": [source_fingerprint(s) for s in sft_only], "split": data_split,
                          "phase": phase, "seed": seed, "tokenizer": tokenizer_fingerprint(tokenizer),
                          "max_seq_len": max_seq_len, "chat_format": chat_format}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def collect_examples(data_path: Sequence[str], sft_only_data_path: Sequence[str], data_split: str, phase: int,
                     seed: int) -> Tuple[List[Example], List[Example], Counter]:
    """Canonical train/eval examples for a phase, with the reasons rows were skipped (counted per reason)."""
    train, evaluation, skipped = [], [], Counter()
    for path in data_path:
        raw = get_raw_dataset(path, seed)
        if raw.sft_only:
            raise ConfigError(f"{path} holds SFT-only data; pass it with --sft_only_data_path")
        for split, out in ((raw.train_examples(), train), (raw.eval_examples(), evaluation)):
            out.extend(split[i] for i in split_indices(len(split), data_split, phase, seed))
        skipped.update({f"{raw.name}: {k}": v for k, v in raw.skipped.items()})
    if phase == 1:
        for path in sft_only_data_path:
            raw = get_raw_dataset(path, seed)
            train.extend(raw.train_examples())
            evaluation.extend(raw.eval_examples())
            skipped.update({f"{raw.name}: {k}": v for k, v in raw.skipped.items()})
    if phase in (1, 2):  # prompt-only rows (no answer) serve step 3 alone
        for split in (train, evaluation):
            prompt_only = sum(1 for e in split if not e.chosen)
            if prompt_only:
                split[:] = [e for e in split if e.chosen]
                skipped["prompt only (no answer)"] += prompt_only
    if phase == 2:
        for split in (train, evaluation):
            missing = [e for e in split if e.rejected is None]
            if missing:
                raise ConfigError("step 2 needs preference pairs, but some data has no rejected answers")
    return train, evaluation, skipped


def build_phase_data(data_path, sft_only_data_path, data_split, phase, seed, fmt: ChatFormat, max_seq_len,
                     all_turns: bool = False):
    train, evaluation, skipped = collect_examples(data_path, sft_only_data_path, data_split, phase, seed)
    if skipped:
        print_rank_0("skipped rows: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    if not train:
        raise ConfigError(f"no training examples for step {phase} from --data_path {' '.join(data_path)} "
                          f"with --data_split {data_split}")
    datasets = []
    for name, examples in (("train", train), ("eval", evaluation)):
        rows = [_tokenize(e, phase, fmt, max_seq_len, all_turns)
                for e in tqdm(examples, desc=f"tokenizing {name} (step {phase})", disable=not is_rank_0(),
                              leave=False)]
        datasets.append(TokenizedDataset.from_rows(rows, PHASE_FIELDS[phase]))
    return datasets[0], datasets[1]


def create_prompt_dataset(local_rank, data_path, data_split, output_path, train_phase, seed, tokenizer,
                          max_seq_len, sft_only_data_path=(), end_of_conversation_token: Optional[str] = None,
                          chat_format: Optional[ChatFormat] = None, train_on_all_turns: bool = False):
    """(train, eval) TokenizedDatasets for a phase. The first rank of each node builds and caches them (in a
    node-local --data_output_path as in a shared one: the build is deterministic and the files are renamed into
    place whole); the others wait and load the same files, so every rank trains on identical data. (Signature follows DeepSpeed-Chat's; chat_format
    defaults to alpaca with end_of_conversation_token after each answer.)"""
    fmt = chat_format or load_chat_format(None, tokenizer, answer_suffix=end_of_conversation_token or "")
    key = cache_key(data_path, sft_only_data_path if train_phase == 1 else [], data_split, train_phase, seed,
                    tokenizer, max_seq_len, format_fingerprint(fmt, train_on_all_turns and train_phase == 1))
    os.makedirs(output_path, exist_ok=True)
    train_file = os.path.join(output_path, f"phase{train_phase}_train_{key}.npz")
    eval_file = os.path.join(output_path, f"phase{train_phase}_eval_{key}.npz")
    if is_local_rank_0() and not (os.path.exists(train_file) and os.path.exists(eval_file)):
        train, evaluation = build_phase_data(data_path, sft_only_data_path, data_split, train_phase, seed,
                                             fmt, max_seq_len, train_on_all_turns)
        evaluation.save(eval_file)
        train.save(train_file)
    barrier()
    train, evaluation = TokenizedDataset.load(train_file), TokenizedDataset.load(eval_file)
    print_rank_0(f"step {train_phase} data: {len(train)} train / {len(evaluation)} eval examples ({train_file})")
    return train, evaluation


# ----------------------------------------------------------------------------------------------- batching
def pad_right(seqs: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)


def pad_left(seqs: Sequence[torch.Tensor], value: int, length: Optional[int] = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, -len(s):] = s[-length:]
    return out


class DataCollatorSFT:
    """Right-padded input_ids / attention_mask / labels (-100 on padding)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, batch):
        ids = pad_right([b["input_ids"] for b in batch], self.pad)
        labels = pad_right([b["labels"] for b in batch], IGNORE_INDEX)
        mask = pad_right([torch.ones_like(b["input_ids"]) for b in batch], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DataCollatorReward:
    """All chosen sequences, then all rejected ones, right-padded to one length: input_ids (2B, T).
    Row i and row B + i are the two answers to the same prompt. prompt_lens (2B,) marks where answers start."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, batch):
        seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
        ids = pad_right(seqs, self.pad)
        mask = pad_right([torch.ones_like(s) for s in seqs], 0)
        prompt_lens = torch.tensor([int(b["prompt_len"][0]) for b in batch] + [int(b["prompt_len"][1]) for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "prompt_lens": prompt_lens}


class DataCollatorRLHF:
    """Prompts left-padded to a fixed length, so that every generated answer starts at the same column."""

    def __init__(self, max_prompt_len: int, pad_token_id: int):
        self.max_prompt_len, self.pad = max_prompt_len, pad_token_id

    def __call__(self, batch):
        seqs = [b["prompt_ids"] for b in batch]
        ids = pad_left(seqs, self.pad, self.max_prompt_len)
        mask = pad_left([torch.ones_like(s) for s in seqs], 0, self.max_prompt_len)
        return {"prompt": ids, "prompt_att_mask": mask}


def make_dataloader(dataset: Dataset, collator, batch_size: int, shuffle: bool, seed: int,
                    drop_last: bool = False) -> DataLoader:
    """Each rank reads its own shard (DistributedSampler); call `loader.sampler.set_epoch(e)` per epoch.
    The loader has its own generator: starting an iteration must not draw from the global RNG, or a resumed
    run (RNG restored from the checkpoint, then a new iterator) would sample differently from an uninterrupted one."""
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) \
        if torch.distributed.is_initialized() else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, drop_last=drop_last,
                      shuffle=shuffle if sampler is None else False, generator=torch.Generator().manual_seed(seed))


def budget_dataloader(dataset: Dataset, collator, max_tokens: int, packed: bool, seed: int) -> DataLoader:
    """Shuffled training micro-batches of at most `max_tokens` tokens each (token_budget.py), the same number on
    every rank; the cost counts real tokens when the rows run `packed`, else rows x the longest row."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    sampler = TokenBudgetBatchSampler(row_costs(dataset, padded=not packed), max_tokens, padded=not packed,
                                      shuffle=True, seed=seed, num_replicas=world, rank=rank)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)


def set_epoch(loader: DataLoader, epoch: int):
    """Start `loader`'s epoch `epoch` (its shuffle and, for token budgets, its micro-batches)."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def epoch_lengths(loader: DataLoader, epochs: int) -> List[int]:
    """This rank's number of micro-batches in each epoch (token budgets make them differ from epoch to epoch)."""
    if hasattr(getattr(loader, "batch_sampler", None), "epoch_lengths"):
        return loader.batch_sampler.epoch_lengths(epochs)
    return [len(loader)] * epochs


class _Skip(torch.utils.data.Sampler):
    """The items (indices, or micro-batches) of `sampler` after the first `n` (its set_epoch passed through)."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self):
        return max(len(self.sampler) - self.n, 0)

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)


def skip_batches(loader: DataLoader, batches: int) -> DataLoader:
    """The rest of `loader`'s epoch after its first `batches` batches, in the same order, without loading the
    skipped ones (a resumed run continues where the checkpoint was written). Call set_epoch on `loader` first."""
    if batches == 0:
        return loader
    if loader.batch_size is None:  # a batch_sampler's micro-batches (token budgets)
        return DataLoader(loader.dataset, batch_sampler=_Skip(loader.batch_sampler, batches),
                          collate_fn=loader.collate_fn)
    # (the loader's own generator: an iteration started without one draws from the global RNG, which a resumed
    # run has just restored from the checkpoint, and sampling would differ from the uninterrupted run)
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=_Skip(loader.sampler, batches * loader.batch_size),
                      collate_fn=loader.collate_fn, drop_last=loader.drop_last, generator=loader.generator)


def supervised_loaders(args, tokenizer, phase: int, collator, packed: bool = False):
    """(train loader, eval loader) for step 1 (phase 1) or step 2 / DPO (phase 2) from the shared data flags.
    packed: the model runs micro-batches packed (what a --max_tokens_per_batch budget counts)."""
    train, evaluation = create_prompt_dataset(
        args.local_rank, args.data_path, args.data_split, args.data_output_path, phase, args.seed, tokenizer,
        args.max_seq_len, getattr(args, "sft_only_data_path", ()) if phase == 1 else (),
        chat_format=format_from_args(args, tokenizer), train_on_all_turns=getattr(args, "train_on_all_turns", False))
    train, evaluation = train.subset(args.max_train_samples), evaluation.subset(args.max_eval_samples)
    if args.max_tokens_per_batch:
        train_loader = budget_dataloader(train, collator, args.max_tokens_per_batch, packed, args.seed)
    else:
        train_loader = make_dataloader(train, collator, args.per_device_train_batch_size, True, args.seed)
    return train_loader, make_dataloader(evaluation, collator, args.per_device_eval_batch_size, False, args.seed)
