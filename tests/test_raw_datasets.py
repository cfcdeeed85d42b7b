"""Dataset adapters: each reads a tiny fixture in its real on-disk layout and yields canonical Examples."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alpaca_rlhf.deepspeed_chat.training.utils.data.raw_datasets import (
    DATASET_NAMES,
    Example,
    FullHhRlhf,
    LocalJsonFile,
    MultiTurnAlpaca,
    RmStatic,
    StanfordnlpSHP,
    SyntheticInstructGptjPairwise,
    WebGptComparisons,
    YitingxieRlhfRewardDatasets,
    get_raw_dataset,
)
from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import collect_examples
from alpaca_rlhf.deepspeed_chat.training.utils.errors import DataError


def write_parquet(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hh_row(q, chosen, rejected):
    return {"prompt": f"\n\nHuman: {q}\n\nAssistant:", "response": chosen, "chosen": chosen, "rejected": rejected}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Any accidental hub lookup fails at once instead of touching the network.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------- adapters


def test_rm_static_reads_train_and_test_parquet(tmp_path):
    root = tmp_path / "Dahoas" / "rm-static"
    multi = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    write_parquet(root / "data" / "train-00000-of-00001-2a1df75c6bce91ab.parquet", [
        {"prompt": multi, "response": " Fine.", "chosen": " Fine, thanks. ", "rejected": " Go away."},
        hh_row("Say nothing", " Sure.", ""),  # empty rejected is valid data
    ])
    write_parquet(root / "data" / "test-00000-of-00001-8c7c51afc6d45980.parquet", [hh_row("Test q", "answer", " bad")])

    ds = get_raw_dataset(str(root), seed=1)
    assert isinstance(ds, RmStatic) and ds.name == "Dahoas/rm-static" and not ds.sft_only
    assert ds.train_examples() == [
        Example(multi, " Fine, thanks.", " Go away."),
        Example("\n\nHuman: Say nothing\n\nAssistant:", " Sure.", ""),
    ]
    assert ds.eval_examples() == [Example("\n\nHuman: Test q\n\nAssistant:", " answer", " bad")]
    assert sum(ds.skipped.values()) == 0


def test_unusable_rows_are_skipped_and_counted(tmp_path):
    root = tmp_path / "Dahoas" / "full-hh-rlhf"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [
        hh_row("ok", " good", " bad"),
        {"prompt": "", "response": "", "chosen": " a", "rejected": " b"},
        hh_row("no answer", "   ", " b"),
        hh_row("same", " same answer", "same answer "),
        hh_row("null rejected", " fine", None),
    ])
    write_parquet(root / "data" / "test-00000-of-00001.parquet", [hh_row("t", " a", " b")])

    ds = get_raw_dataset(str(root), seed=0)
    assert isinstance(ds, FullHhRlhf)
    assert ds.train_examples() == [
        Example("\n\nHuman: ok\n\nAssistant:", " good", " bad"),
        Example("\n\nHuman: null rejected\n\nAssistant:", " fine", ""),
    ]
    assert ds.skipped == {"empty prompt": 1, "empty chosen": 1, "identical chosen and rejected": 1}


def test_synthetic_wraps_prompt_and_holds_out_ten_percent(tmp_path):
    root = tmp_path / "Dahoas" / "synthetic-instruct-gptj-pairwise"
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i}", "rejected": f"Bad {i}"} for i in range(30)]
    write_parquet(root / "data" / "train-00000-of-00001-1e5d57b93c448e7a.parquet", rows)

    ds = get_raw_dataset(str(root), seed=42)
    assert isinstance(ds, SyntheticInstructGptjPairwise)
    train, held_out = ds.train_examples(), ds.eval_examples()
    assert len(held_out) == 3 and len(train) == 27
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == {
        Example(f"\n\nHuman: Question {i}?\n\nAssistant:", f" Good {i}", f" Bad {i}") for i in range(30)
    }
    again = get_raw_dataset(str(root), seed=42)
    assert again.train_examples() == train and again.eval_examples() == held_out
    other_seeds = [set(get_raw_dataset(str(root), seed=s).eval_examples()) for s in range(1, 6)]
    assert any(s != set(held_out) for s in other_seeds)


def test_yitingxie_prompt_is_normalised(tmp_path):
    root = tmp_path / "yitingxie" / "rlhf-reward-datasets"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [
        {"prompt": " Human: Hi there Assistant: Hello! Human: Tell me a joke ",
         "chosen": " Assistant: Why did the chicken cross the road?", "rejected": " Assistant: No."},
    ])
    write_parquet(root / "data" / "test-00000-of-00001.parquet", [
        {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": "4", "rejected": "5"},
    ])

    ds = get_raw_dataset(str(root), seed=0)
    assert isinstance(ds, YitingxieRlhfRewardDatasets)
    assert ds.train_examples() == [Example(
        "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:",
        " Why did the chicken cross the road?", " No.")]
    assert ds.eval_examples() == [Example("\n\nHuman: What is 2+2?\n\nAssistant:", " 4", " 5")]


def webgpt_row(i, score_0, answer_0="Answer zero [1].", answer_1="Answer one [1, 2] and more[3]."):
    return {
        "question": {"dataset": "eli5", "id": f"q{i}", "full_text": f"Why {i}?"},
        "quotes_0": {"title": ["t"], "extract": ["e"]}, "answer_0": answer_0,
        "tokens_0": {"prefix": [1], "completion": [2]}, "score_0": score_0,
        "quotes_1": {"title": ["t"], "extract": ["e"]}, "answer_1": answer_1,
        "tokens_1": {"prefix": [1], "completion": [2]}, "score_1": -score_0,
    }


def test_webgpt_picks_higher_score_strips_citations_skips_ties(tmp_path):
    root = tmp_path / "openai" / "webgpt_comparisons"
    rows = [webgpt_row(i, 1.0 if i % 2 else -0.5) for i in range(20)] + [webgpt_row(20, 0.0)]
    write_parquet(root / "data" / "train-00000-of-00001.parquet", rows)

    ds = get_raw_dataset(str(root), seed=3)
    assert isinstance(ds, WebGptComparisons)
    assert ds.skipped == {"tied scores": 1}
    train, held_out = ds.train_examples(), ds.eval_examples()
    assert len(train) == 18 and len(held_out) == 2 and not set(train) & set(held_out)
    by_prompt = {e.prompt: e for e in train + held_out}
    assert by_prompt["\n\nHuman: Why 1?\n\nAssistant:"] == Example(
        "\n\nHuman: Why 1?\n\nAssistant:", " Answer zero.", " Answer one and more.")
    assert by_prompt["\n\nHuman: Why 2?\n\nAssistant:"] == Example(
        "\n\nHuman: Why 2?\n\nAssistant:", " Answer one and more.", " Answer zero.")


def test_webgpt_reads_original_comparisons_jsonl(tmp_path):
    root = tmp_path / "openai" / "webgpt_comparisons"
    write_lines(root / "comparisons.jsonl", [webgpt_row(0, 0.5), webgpt_row(1, -1.0)])
    (root / "webgpt_comparisons.py").write_text("# loading script\n")
    ds = get_raw_dataset(str(root), seed=0)
    examples = ds.train_examples() + ds.eval_examples()
    assert sorted(e.chosen for e in examples) == [" Answer one and more.", " Answer zero."]


def shp_row(history, a, b, label):
    return {"post_id": "p", "domain": "askculinary_train", "upvote_ratio": 0.9, "history": history,
            "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2,
            "score_A": 10, "score_B": 3, "human_ref_A": a, "human_ref_B": b, "labels": label,
            "seconds_difference": 1.0, "score_ratio": 3.3}


def test_shp_reads_subreddit_folders(tmp_path):
    root = tmp_path / "stanfordnlp" / "SHP"
    write_lines(root / "askculinary" / "train.json",
                [shp_row("How long to boil an egg?", "Ten minutes.", "Forever.", 1)])
    write_lines(root / "askphysics" / "train.json",
                [shp_row("Why is the sky blue?", "Dunno", "Rayleigh scattering.", 0)])
    write_lines(root / "askculinary" / "validation.json", [shp_row("Salt pasta water?", "Yes.", "No.", 1)])
    write_lines(root / "askculinary" / "test.json", [shp_row("unused", "x", "y", 1)])

    ds = get_raw_dataset(str(root), seed=0)
    assert isinstance(ds, StanfordnlpSHP)
    assert ds.train_examples() == [
        Example("\n\nHuman: How long to boil an egg?\n\nAssistant:", " Ten minutes.", " Forever."),
        Example("\n\nHuman: Why is the sky blue?\n\nAssistant:", " Rayleigh scattering.", " Dunno"),
    ]
    assert ds.eval_examples() == [Example("\n\nHuman: Salt pasta water?\n\nAssistant:", " Yes.", " No.")]


def test_multiturn_alpaca_converts_history_to_canonical(tmp_path):
    root = tmp_path / "data" / "demo" / "MultiTurnAlpaca"
    write_lines(root / "training_data.txt.train", [
        {"instruction": "Human: Hi Assistant: Hello! How can I help? Human: Translate this Assistant: ",
         "input": "bonjour", "output": "Hello"},
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": " Eat well. "},
        {"instruction": "Human: Anything? Assistant: ", "input": "", "output": ""},
    ])
    write_lines(root / "training_data.txt.test",
                [{"instruction": "Human: Name a color Assistant: ", "input": "", "output": "Red"}])

    ds = get_raw_dataset(str(root), seed=0)
    assert isinstance(ds, MultiTurnAlpaca) and ds.sft_only
    assert ds.train_examples() == [
        Example("\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Translate this\nbonjour\n\nAssistant:",
                " Hello", None),
        Example("\n\nHuman: Give three tips for staying healthy.\n\nAssistant:", " Eat well.", None),
    ]
    assert ds.skipped == {"empty chosen": 1}
    assert ds.eval_examples() == [Example("\n\nHuman: Name a color\n\nAssistant:", " Red", None)]


def test_local_jsonfile_pairs_messages_and_ranked_rows(tmp_path):
    root = tmp_path / "local" / "jsonfile"
    root.mkdir(parents=True)
    train = [
        {"prompt": "What is up?", "chosen": "The sky.", "rejected": ""},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Bye"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "Joke?"}],
         "chosen": [{"role": "user", "content": "Joke?"}, {"role": "assistant", "content": "Knock knock."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": "Rank", "answers": ["a", "b", "c"], "scores": [1, 3, 1]},
        {"prompt": "Order", "answers": ["x", "y", "z"], "ranking": [2, 0, 1]},
    ]
    (root / "train.json").write_text(json.dumps(train), encoding="utf-8")  # JSON array
    write_lines(root / "eval.json", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])  # JSON lines

    ds = get_raw_dataset(str(root), seed=0)
    assert isinstance(ds, LocalJsonFile)
    rank, order = "\n\nHuman: Rank\n\nAssistant:", "\n\nHuman: Order\n\nAssistant:"
    assert ds.train_examples() == [
        Example("\n\nHuman: What is up?\n\nAssistant:", " The sky.", ""),
        Example("\n\nHuman: Hi\n\nAssistant:", " Hello", " Bye"),
        Example("\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Joke?\n\nAssistant:", " Knock knock.", " No.",
                messages=(("user", "Hi"), ("assistant", "Hey"), ("user", "Joke?"))),  # kept for chat templates
        Example(rank, " b", " a"), Example(rank, " b", " c"),  # a and c tie: skipped
        Example(order, " z", " x"), Example(order, " z", " y"), Example(order, " x", " y"),
    ]
    assert ds.skipped == {"tied scores": 1}
    assert ds.eval_examples() == [Example("\n\nHuman: Q\n\nAssistant:", " A", " B")]


def test_local_jsonfile_conversational_formats(tmp_path):
    """Conversational SFT (messages; prompt/completion), preference with an implicit prompt (TRL's message lists
    and hh-rlhf's transcripts), a system message, and prompt-only rows, in their on-disk layout."""
    root = tmp_path / "local" / "jsonfile"
    root.mkdir(parents=True)
    system = {"role": "system", "content": "Be brief."}
    user, hi = {"role": "user", "content": "Name a color"}, {"role": "user", "content": "Hi"}
    train = [
        {"messages": [system, hi, {"role": "assistant", "content": "Hello"}, user,
                      {"role": "assistant", "content": "Red"}]},
        {"prompt": [user], "completion": [{"role": "assistant", "content": "Blue"}]},
        {"prompt": "Say yes", "completion": "Yes"},
        {"chosen": [system, user, {"role": "assistant", "content": "Green"}],
         "rejected": [system, user, {"role": "assistant", "content": "Maybe"}]},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sum 1 2\n\nAssistant: 3",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sum 1 2\n\nAssistant: 4"},
        {"prompt": [system, user]},
        {"prompt": ""},
    ]
    write_lines(root / "train.json", train)
    write_lines(root / "eval.json", [{"prompt": "Q", "completion": "A"}])
    ds = get_raw_dataset(str(root), seed=0)
    color = "\n\nHuman: Name a color\n\nAssistant:"
    sys_user = (("system", "Be brief."), ("user", "Name a color"))
    assert ds.train_examples() == [
        Example("\n\nHuman: Hi\n\nAssistant: Hello" + color, " Red", None,
                (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Name a color"))),
        Example(color, " Blue", None, (("user", "Name a color"),)),
        Example("\n\nHuman: Say yes\n\nAssistant:", " Yes", None),
        Example(color, " Green", " Maybe", sys_user),
        Example("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sum 1 2\n\nAssistant:", " 3", " 4",
                (("user", "Hi"), ("assistant", "Hello"), ("user", "Sum 1 2"))),
        Example(color, "", None, sys_user),                            # prompt only
    ]
    assert ds.skipped == {"empty prompt": 1}
    # prompt-only rows reach step 3 only
    assert len(collect_examples([str(root)], [], "0,0,1", 3, 0)[0]) == 6
    sft, _, skipped = collect_examples([str(root)], [], "1,0,0", 1, 0)
    assert len(sft) == 5 and skipped["prompt only (no answer)"] == 1


@pytest.mark.parametrize("row,message", [
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "share no prompt"),
    ({"messages": [{"role": "user", "content": "a"}]}, "should end with an assistant turn"),
    ({"messages": [{"role": "narrator", "content": "a"}]}, "each message needs a role"),
    ({"completion": "x"}, "expected columns"),
])
def test_local_jsonfile_bad_conversational_rows_name_the_row(tmp_path, row, message):
    root = tmp_path / "local" / "jsonfile"
    root.mkdir(parents=True)
    write_lines(root / "train.json", [{"prompt": "Q", "completion": "A"}, row])
    write_lines(root / "eval.json", [{"prompt": "Q", "completion": "A"}])
    with pytest.raises(DataError, match=f"train.json: row 2: .*{message}"):
        get_raw_dataset(str(root), seed=0)


def test_local_textfile_prompts_render_raw_under_none(tmp_path, tokenizer):
    from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import load_chat_format
    from alpaca_rlhf.deepspeed_chat.training.utils.data.data_utils import tokenize_prompt
    root = tmp_path / "local" / "textfile"
    root.mkdir(parents=True)
    (root / "train.txt").write_text("This movie was\n\nI watched it and\n", encoding="utf-8")
    (root / "eval.txt").write_text("The plot\n", encoding="utf-8")
    ds = get_raw_dataset(str(root), seed=0)
    assert [e.messages for e in ds.train_examples()] == [(("user", "This movie was"),), (("user", "I watched it and"),)]
    assert len(collect_examples([str(root)], [], "0,0,1", 3, 0)[0]) == 2
    ids = tokenize_prompt(ds.train_examples()[0], load_chat_format("none", tokenizer), 64)["prompt_ids"]
    assert ids == [tokenizer.bos_token_id] + tokenizer("This movie was", add_special_tokens=False)["input_ids"]
    (root / "eval.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="eval.txt: line 1: not UTF-8"):
        get_raw_dataset(str(root), seed=0)


def test_anthropic_hh_rlhf_as_it_ships(tmp_path):
    """<subset>/{train,test}.jsonl.gz of whole transcripts; the shared start is the prompt; red-team files are
    not pairs and are left alone; rows that part before their last turn are skipped and counted."""
    import gzip
    root = tmp_path / "Anthropic" / "hh-rlhf"
    convo = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sum 1 2\n\nAssistant:"
    rows = {"train": [{"chosen": convo + " 3", "rejected": convo + " 4"},
                      {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                       "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d"}],
            "test": [{"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}]}
    for subset in ("helpful-base", "red-team-attempts"):
        (root / subset).mkdir(parents=True)
    for split, data in rows.items():
        with gzip.open(root / "helpful-base" / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    with gzip.open(root / "red-team-attempts" / "red_team_attempts.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"transcript": "x"}) + "\n")
    ds = get_raw_dataset(str(root), seed=0)
    assert ds.name == "Anthropic/hh-rlhf"
    assert ds.train_examples() == [Example(convo, " 3", " 4")]
    assert ds.skipped == {"chosen and rejected differ before their last turn": 1}
    assert ds.eval_examples() == [Example("\n\nHuman: Q\n\nAssistant:", " A", " B")]


def test_stack_exchange_paired_as_it_ships(tmp_path):
    root = tmp_path / "lvwerra" / "stack-exchange-paired"
    for subset, rows in (("reward", [("How do I sort?", "Use sorted().", "Write a loop."),
                                     ("Empty?", "", "x")]),
                         ("evaluation", [("What is git?", "A version control system.", "A car.")])):
        (root / "data" / subset).mkdir(parents=True)
        table = pa.table({"qid": list(range(len(rows))), "question": [r[0] for r in rows],
                          "response_j": [r[1] for r in rows], "response_k": [r[2] for r in rows]})
        pq.write_table(table, root / "data" / subset / "train-00000-of-00001.parquet")
    ds = get_raw_dataset(str(root), seed=0)
    assert ds.name == "lvwerra/stack-exchange-paired"
    assert ds.train_examples() == [Example("\n\nHuman: How do I sort?\n\nAssistant:", " Use sorted().",
                                           " Write a loop.")]
    assert ds.skipped == {"empty chosen": 1}
    assert ds.eval_examples() == [Example("\n\nHuman: What is git?\n\nAssistant:", " A version control system.",
                                          " A car.")]


# ------------------------------------------------------------------------- picking the adapter


def test_adapter_is_picked_by_the_most_specific_name(tmp_path):
    assert DATASET_NAMES == [
        "Anthropic/hh-rlhf", "lvwerra/stack-exchange-paired", "Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
        "yitingxie/rlhf-reward-datasets", "openai/webgpt_comparisons", "stanfordnlp/SHP", "MultiTurnAlpaca",
        "local/jsonfile", "local/textfile",
    ]
    # A folder whose path contains two names is read by the longer (more specific) one.
    root = tmp_path / "MultiTurnAlpaca" / "Dahoas" / "rm-static"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [hh_row("q", " a", " b")])
    write_parquet(root / "data" / "test-00000-of-00001.parquet", [hh_row("q", " a", " b")])
    assert isinstance(get_raw_dataset(str(root), seed=0), RmStatic)


def test_unknown_name_lists_supported_names():
    with pytest.raises(DataError) as err:
        get_raw_dataset("someone/unknown-data", seed=0)
    message = str(err.value)
    assert "someone/unknown-data" in message and "\n" not in message
    assert all(name in message for name in DATASET_NAMES)


# ------------------------------------------------------------------------- bad data


def test_missing_path_is_neither_local_nor_on_hub(tmp_path):
    missing = str(tmp_path / "nowhere" / "Dahoas" / "rm-static")
    with pytest.raises(DataError) as err:
        get_raw_dataset(missing, seed=0)
    assert missing in str(err.value)
    assert "neither a local directory nor loadable from the Hugging Face hub" in str(err.value)
    with pytest.raises(DataError, match="neither a local directory nor loadable"):
        get_raw_dataset("Dahoas/rm-static", seed=0)  # offline: fails at once


def test_local_only_dataset_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not a local directory"):
        get_raw_dataset(str(tmp_path / "MultiTurnAlpaca"), seed=0)


def test_missing_split_file(tmp_path):
    root = tmp_path / "Dahoas" / "rm-static"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [hh_row("q", " a", " b")])
    with pytest.raises(DataError, match=r"rm-static: no test split found \(expected data/test-00000-of-00001.parquet"):
        get_raw_dataset(str(root), seed=0)


def test_missing_json_file(tmp_path):
    root = tmp_path / "MultiTurnAlpaca"
    write_lines(root / "training_data.txt.train", [{"instruction": "q", "input": "", "output": "a"}])
    with pytest.raises(DataError, match=r"training_data.txt.test: file not found"):
        get_raw_dataset(str(root), seed=0)


def test_missing_column_names_the_file(tmp_path):
    root = tmp_path / "Dahoas" / "rm-static"
    bad = write_parquet(root / "data" / "train-00000-of-00001.parquet", [{"prompt": "p", "chosen": " a"}])
    write_parquet(root / "data" / "test-00000-of-00001.parquet", [hh_row("q", " a", " b")])
    with pytest.raises(DataError) as err:
        get_raw_dataset(str(root), seed=0)
    assert str(err.value).startswith(f"{bad}: missing column rejected")


def test_missing_key_in_json_line_names_file_and_line(tmp_path):
    root = tmp_path / "stanfordnlp" / "SHP"
    train = write_lines(root / "askculinary" / "train.json", [
        shp_row("q", "a", "b", 1), {"history": "q", "human_ref_A": "a", "human_ref_B": "b"}])
    write_lines(root / "askculinary" / "validation.json", [shp_row("q", "a", "b", 1)])
    with pytest.raises(DataError) as err:
        get_raw_dataset(str(root), seed=0)
    assert str(err.value).startswith(f"{train}: line 2: missing column labels")


def test_empty_files(tmp_path):
    root = tmp_path / "Dahoas" / "rm-static"
    schema = pa.schema([(c, pa.string()) for c in ("prompt", "response", "chosen", "rejected")])
    empty = write_parquet(root / "data" / "train-00000-of-00001.parquet", [], schema=schema)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", [hh_row("q", " a", " b")])
    with pytest.raises(DataError, match=rf"^{empty}: empty file"):
        get_raw_dataset(str(root), seed=0)

    local = tmp_path / "local" / "jsonfile"
    local.mkdir(parents=True)
    (local / "train.json").write_text("\n\n", encoding="utf-8")
    write_lines(local / "eval.json", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(DataError, match=r"train.json: empty file"):
        get_raw_dataset(str(local), seed=0)


def test_malformed_json_line_names_file_and_line(tmp_path):
    root = tmp_path / "MultiTurnAlpaca"
    train = root / "training_data.txt.train"
    root.mkdir()
    train.write_text('{"instruction": "q", "input": "", "output": "a"}\n{"instruction": "q", oops}\n')
    write_lines(root / "training_data.txt.test", [{"instruction": "q", "input": "", "output": "a"}])
    with pytest.raises(DataError) as err:
        get_raw_dataset(str(root), seed=0)
    message = str(err.value)
    assert message.startswith(f"{train}: line 2: malformed JSON") and "\n" not in message


def test_bad_row_values_name_file_and_row(tmp_path):
    root = tmp_path / "local" / "jsonfile"
    root.mkdir(parents=True)
    (root / "train.json").write_text(json.dumps([
        {"prompt": "ok", "chosen": "a", "rejected": "b"},
        {"prompt": "ranked", "answers": ["a", "b"], "ranking": [0, 5]},
    ]))
    write_lines(root / "eval.json", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(DataError, match=r"train.json: row 2: ranking should list distinct answer indices"):
        get_raw_dataset(str(root), seed=0)

    (root / "train.json").write_text(json.dumps([{"prompt": "p", "chosen": "a"}]))
    with pytest.raises(DataError, match=r"train.json: row 1: missing key rejected"):
        get_raw_dataset(str(root), seed=0)

    webgpt = tmp_path / "openai" / "webgpt_comparisons"
    path = write_parquet(webgpt / "data" / "train-00000-of-00001.parquet",
                         [webgpt_row(0, 1.0), {**webgpt_row(1, 1.0), "score_0": None}])
    with pytest.raises(DataError, match=rf"^{path}: row 2: column score_0 should be a number"):
        get_raw_dataset(str(webgpt), seed=0)
