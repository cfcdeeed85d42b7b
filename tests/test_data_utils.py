"""Data pipeline: seeded disjoint splits, label masking, truncation, the tokenized cache, collators."""
import os

import numpy as np
import pytest
import torch

from alpaca_rlhf.deepspeed_chat.training.utils.data import data_utils as du
from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import load_chat_format
from alpaca_rlhf.deepspeed_chat.training.utils.data.raw_datasets import Example
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError

from conftest import DEMO_DATA

RM_STATIC = os.path.join(DEMO_DATA, "Dahoas", "rm-static")
ALPACA = os.path.join(DEMO_DATA, "MultiTurnAlpaca")
EXAMPLE = Example(prompt="\n\nHuman: What is 3 plus 4?\n\nAssistant:", chosen=" 3 plus 4 is 7.", rejected=" no")


def test_split_is_disjoint_complete_deterministic_and_proportional():
    parts = [du.split_indices(1000, "2,4,4", phase, seed=7) for phase in (1, 2, 3)]
    assert [len(p) for p in parts] == [200, 400, 400]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert np.array_equal(parts[1], du.split_indices(1000, "2,4,4", 2, seed=7))
    assert not np.array_equal(parts[1], du.split_indices(1000, "2,4,4", 2, seed=8))
    assert len(du.split_indices(10, "10,0,0", 1, 0)) == 10 and len(du.split_indices(10, "10,0,0", 2, 0)) == 0


@pytest.mark.parametrize("bad", ["2,4", "a,b,c", "-1,1,1", "0,0,0"])
def test_bad_data_split_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="--data_split"):
        du.parse_data_split(bad)


def alpaca(tokenizer):
    return load_chat_format("alpaca", tokenizer)


def test_sft_labels_cover_answer_and_eos_only(tokenizer):
    row = du.tokenize_sft(EXAMPLE, alpaca(tokenizer), max_seq_len=512)
    ids, labels = row["input_ids"], row["labels"]
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(EXAMPLE.prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(EXAMPLE.chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt_ids + answer_ids
    assert labels == [-100] * len(prompt_ids) + answer_ids
    assert tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True) == EXAMPLE.chosen.strip()


def test_too_long_examples_keep_their_last_tokens(tokenizer):
    full = du.tokenize_sft(EXAMPLE, alpaca(tokenizer), max_seq_len=512)
    short = du.tokenize_sft(EXAMPLE, alpaca(tokenizer), max_seq_len=8)
    assert short["input_ids"] == full["input_ids"][-8:] and short["labels"] == full["labels"][-8:]
    assert short["input_ids"][-1] == tokenizer.eos_token_id
    pair = du.tokenize_pair(EXAMPLE, alpaca(tokenizer), max_seq_len=6)
    assert len(pair["chosen_ids"]) == 6 and pair["prompt_len"][0] == 0  # the whole prompt was cut
    prompt = du.tokenize_prompt(EXAMPLE, alpaca(tokenizer), max_prompt_len=4)["prompt_ids"]
    assert prompt == tokenizer(EXAMPLE.prompt)["input_ids"][-4:]


def test_empty_rejected_answer_becomes_just_eos(tokenizer):
    pair = du.tokenize_pair(Example(EXAMPLE.prompt, EXAMPLE.chosen, ""), alpaca(tokenizer), 512)
    plen = pair["prompt_len"][1]
    assert pair["rejected_ids"][plen:] == [tokenizer.eos_token_id]


def test_tokenized_dataset_round_trips_without_pickles(tmp_path):
    rows = [{"a": [1, 2, 3], "b": [4]}, {"a": [], "b": [5, 6]}]
    ds = du.TokenizedDataset.from_rows(rows, ["a", "b"])
    ds.save(str(tmp_path / "x.npz"))
    back = du.TokenizedDataset.load(str(tmp_path / "x.npz"))  # np.load(allow_pickle=False) inside
    assert len(back) == 2 and back[0]["a"].tolist() == [1, 2, 3] and back[1]["b"].tolist() == [5, 6]
    assert back[1]["a"].numel() == 0 and len(back.subset(1)) == 1


def test_demo_data_builds_every_phase_and_cache_is_reused(tmp_path, tokenizer, monkeypatch):
    out = str(tmp_path / "cache")
    sizes = {}
    for phase in (1, 2, 3):
        train, evaluation = du.create_prompt_dataset(-1, [RM_STATIC], "2,4,4", out, phase, 1234, tokenizer, 128,
                                                     sft_only_data_path=[ALPACA])
        assert len(train) > 0 and len(evaluation) > 0
        sizes[phase] = len(train)
    assert sizes[1] > sizes[2] > 0  # step 1 also gets the SFT-only data, whole
    assert set(train[0]) == {"prompt_ids"} and train[0]["prompt_ids"][0].item() == tokenizer.bos_token_id

    def must_not_rebuild(*a, **k):
        raise AssertionError("cache was not reused")
    monkeypatch.setattr(du, "build_phase_data", must_not_rebuild)
    again, _ = du.create_prompt_dataset(-1, [RM_STATIC], "2,4,4", out, 3, 1234, tokenizer, 128, [ALPACA])
    assert len(again) == len(train)
    with pytest.raises(AssertionError, match="not reused"):  # another max_seq_len is another cache entry
        du.create_prompt_dataset(-1, [RM_STATIC], "2,4,4", out, 3, 1234, tokenizer, 64, [ALPACA])


def test_phase_2_refuses_sft_only_data():
    with pytest.raises(ConfigError, match="sft_only_data_path"):
        du.collect_examples([ALPACA], [], "2,4,4", 2, 1234)


def test_collators_pad_as_each_step_needs():
    sft = du.DataCollatorSFT(0)([{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
                                 {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])}])
    assert sft["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert sft["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert sft["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    rm = du.DataCollatorReward(0)([{"chosen_ids": torch.tensor([1, 2]), "rejected_ids": torch.tensor([1, 3, 4]),
                                    "prompt_len": torch.tensor([1, 1])}])
    assert rm["input_ids"].tolist() == [[1, 2, 0], [1, 3, 4]] and rm["prompt_lens"].tolist() == [1, 1]
    rl = du.DataCollatorRLHF(4, 0)([{"prompt_ids": torch.tensor([1, 9])}, {"prompt_ids": torch.tensor([1, 8, 7, 6, 5])}])
    assert rl["prompt"].tolist() == [[0, 0, 1, 9], [8, 7, 6, 5]]
    assert rl["prompt_att_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
