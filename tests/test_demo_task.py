"""The embedded demo task: world, scorer, generator and the files it writes (fast, offline)."""
import json
import os
import re
import sys

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from any directory

from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import build_prompt, split_turns  # noqa: E402
from alpaca_rlhf.tools import demo_task as dt  # noqa: E402
from alpaca_rlhf.tools import make_demo_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TRAIN = os.path.join("MultiTurnAlpaca", "training_data.txt.train")
SFT_TEST = os.path.join("MultiTurnAlpaca", "training_data.txt.test")
PAIRS_TRAIN = os.path.join("Dahoas", "rm-static", "data", "train-00000-of-00001.parquet")
PAIRS_TEST = os.path.join("Dahoas", "rm-static", "data", "test-00000-of-00001.parquet")
ALL_FILES = (SFT_TRAIN, SFT_TEST, PAIRS_TRAIN, PAIRS_TEST)


def single(question):
    return build_prompt([], question)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_pairs(path):
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(["--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def loaded(written):
    return {
        "sft_train": read_jsonl(written / SFT_TRAIN),
        "sft_test": read_jsonl(written / SFT_TEST),
        "pairs_train": read_pairs(written / PAIRS_TRAIN),
        "pairs_test": read_pairs(written / PAIRS_TEST),
    }


def sft_prompt(row):
    history, question = split_turns(row["instruction"])
    return build_prompt(history, question)


# ------------------------------------------------------------------ scorer


def test_reference_scores_one_on_both_splits(loaded):
    prompts = [sft_prompt(r) for r in loaded["sft_train"][:400] + loaded["sft_test"]]
    prompts += [r["prompt"] for r in loaded["pairs_train"][:400] + loaded["pairs_test"]]
    for prompt in prompts:
        ref = dt.reference_answer(prompt)
        g = dt.grade(prompt, ref)
        assert g.score == 1.0 and g.correct and g.reasons == (), (prompt, ref, g)
        assert dt.score_answer(prompt, "  " + ref + "\n") == 1.0  # surrounding whitespace is ignored


def test_every_reference_in_the_world_scores_one():
    for op, phrasings in dt.WORD_NEW.items():
        for word in dt.WORDS:
            prompt = single(phrasings[0].format(w=word))
            assert dt.score_answer(prompt, dt.reference_answer(prompt)) == 1.0, prompt
    for attr, phrasings in dt.FACT_NEW.items():
        for noun in dt.FACTS[attr]:
            prompt = single(phrasings[1].format(n=("an " if noun[0] in "aeiou" else "a ") + noun))
            assert dt.score_answer(prompt, dt.reference_answer(prompt)) == 1.0, prompt
    for a in range(21):
        for b in range(21 - a):
            for q in (f"What is {a} plus {b}?", f"What is {a + b} minus {b}?"):
                assert dt.score_answer(single(q), dt.reference_answer(single(q))) == 1.0, q


@pytest.mark.parametrize("question, reference", [
    ("What is 3 plus 4?", "3 plus 4 is 7."),
    ("Please take 5 away from 12.", "12 minus 5 is 7."),
    ("Spell cat backwards.", "The word cat backwards is tac."),
    ("Which letter does dog end with?", "The last letter of dog is g."),
    ("How many letters are in horse?", "The number of letters in horse is 5."),
    ("Write fish in capital letters.", "In capital letters, fish is FISH."),
    ("What sound does a cow make?", "A cow says moo."),
    ("What color is an owl?", "An owl is gray."),
    ("Where does a bee live?", "A bee lives in a hive."),
])
def test_reference_answers(question, reference):
    assert dt.reference_answer(single(question)) == reference


@pytest.mark.parametrize("question, bad_answers", [
    ("What is 3 plus 4?", ["", "   ", "3 plus 4 is 8.", "Ugh, 3 plus 4 is 7, obviously.", "3 plus 4 is 7. 3 plus 4 is 7.",
                           "3 plus 4 is", "3 plus 4 is 7", "7 or 8.", "No.", "3 plus 4 is 7 7 7 7.",
                           "3 plus 4 is 7. I hope this helps you. Let me know if you need more help."]),
    ("Spell cat backwards.", ["", "The word cat backwards is cat.", "The word cat backwards is act.",
                              "Whatever. The word cat backwards is tac.", "The word cat", "tac tac tac"]),
    ("What is the first letter of apple?", ["", "The first letter of apple is b.", "The first letter of apple is",
                                            "Duh, the first letter of apple is a."]),
    ("Write dog in capital letters.", ["In capital letters, dog is dog.", "In capital letters, dog is Dog.", "DOG"]),
    ("What sound does a pig make?", ["A pig says moo.", "A pig says oink oink.", "Stupid question, figure it out yourself.",
                                     "A pig says oink or moo."]),
])
def test_imperfect_answers_score_clearly_lower(question, bad_answers):
    prompt = single(question)
    for answer in bad_answers:
        assert dt.score_answer(prompt, answer) <= 0.9, answer
    assert dt.score_answer(prompt, "") == 0.0


def test_wrong_scores_below_right_and_is_flagged():
    prompt = single("What is 9 minus 4?")
    right, wrong = dt.grade(prompt, "9 minus 4 is 5."), dt.grade(prompt, "9 minus 4 is 6.")
    assert right.correct and not wrong.correct and "wrong value" in wrong.reasons
    assert wrong.score < right.score
    # The value must be the answer, not one of several.
    assert not dt.grade(prompt, "It is 5 or 6.").correct
    assert dt.grade(prompt, "It is 5.").correct and not dt.grade(prompt, "9 minus 4 is 9.").correct


def test_value_equal_to_an_operand():
    prompt = single("What is 5 plus 0?")
    assert dt.grade(prompt, "It is 5.").correct
    assert not dt.grade(prompt, "5 plus 0").correct  # stops before the value
    assert not dt.grade(prompt, "5 plus 0 is 0.").correct


def test_multi_turn_follow_ups_use_context():
    math = build_prompt([("What is 3 plus 4?", "3 plus 4 is 7.")], "And plus 2 more?")
    assert dt.reference_answer(math) == "7 plus 2 is 9."
    assert dt.grade(math, "7 plus 2 is 9.").score == 1.0
    assert not dt.grade(math, "3 plus 2 is 5.").correct  # forgot the context
    three = build_prompt([("What is 3 plus 4?", "3 plus 4 is 7."), ("And plus 2 more?", "7 plus 2 is 9.")],
                         "Now take 5 away from that.")
    assert dt.reference_answer(three) == "9 minus 5 is 4."
    word = build_prompt([("Spell cat backwards.", "The word cat backwards is tac.")], "What about dog?")
    assert dt.reference_answer(word) == "The word dog backwards is god."
    word_op = build_prompt([("Spell cat backwards.", "The word cat backwards is tac.")], "And the first letter?")
    assert dt.reference_answer(word_op) == "The first letter of cat is c."
    fact = build_prompt([("What sound does a cow make?", "A cow says moo.")], "And where does it live?")
    assert dt.reference_answer(fact) == "A cow lives in a barn."
    fact_subject = build_prompt([("What sound does a cow make?", "A cow says moo.")], "What about a duck?")
    assert dt.reference_answer(fact_subject) == "A duck says quack."
    # The truth follows from the questions, whatever the earlier answers said.
    wrong_history = build_prompt([("What is 3 plus 4?", "3 plus 4 is 8.")], "And plus 2 more?")
    assert dt.reference_answer(wrong_history) == "7 plus 2 is 9."


def test_multiturn_alpaca_instruction_is_accepted_as_prompt():
    instruction = "Human: What is 3 plus 4? Assistant: 3 plus 4 is 7. Human: And minus 5? Assistant: "
    assert dt.reference_answer(instruction) == "7 minus 5 is 2."


@pytest.mark.parametrize("prompt", [
    single("What is the capital of France?"),
    single("And plus 2 more?"),  # a follow-up without anything to follow
    single("What sound does an apple make?"),  # things have no sound
    single("Spell zebra backwards."),  # not a demo word
    single("What is 3 minus 5?"),  # negative numbers are outside the world
    "Hello",
    "\n\nHuman: What is 3 plus 4?\n\nAssistant: 3 plus 4 is 7.",
])
def test_unrecognised_prompt_raises(prompt):
    with pytest.raises(ValueError):
        dt.grade(prompt, "7.")


@pytest.mark.parametrize("answer", ["", "#$%^", "\x00\u2603", "a " * 300, "7" * 50, "The The The", "\n\n\n",
                                    "Human: hi Assistant: hi", "I I I I"])
def test_garbage_is_graded_in_range(answer):
    for question in ("What is 3 plus 4?", "Which letter does dog start with?", "Write cat in capital letters."):
        g = dt.grade(single(question), answer)
        assert 0.0 <= g.score < 1.0 and isinstance(g.reasons, tuple)


def test_fixed_phrases_never_state_a_value():
    # Fillers, rude and short phrases must not change what value an answer states.
    values = {v for table in dt.FACTS.values() for v in table.values()}
    for phrase in dt.FILLERS + dt.RUDE_REFUSALS + dt.SHORT_ANSWERS + dt.RUDE_WRAPS:
        for word in re.findall(r"[A-Za-z]+|\d+", phrase.replace("{ref}", "").replace("{low}", "")):
            assert not word.isdigit() and word.lower() not in values and not (len(word) == 1 and word.islower())
    for word in dt.WORDS:
        assert word[::-1] != word and word[::-1] not in dt.TEMPLATE_WORDS and word not in dt.TEMPLATE_WORDS


# ------------------------------------------------------------------ generated data


def test_every_rejected_scores_below_its_chosen(loaded):
    for row in loaded["pairs_train"] + loaded["pairs_test"]:
        chosen, rejected = dt.score_answer(row["prompt"], row["chosen"]), dt.score_answer(row["prompt"], row["rejected"])
        assert chosen == 1.0 and rejected < chosen, row
        assert row["response"] == row["chosen"] and row["chosen"].startswith(" ")
        assert row["rejected"] == "" or row["rejected"].startswith(" ")


def test_rejected_mix_has_empty_and_very_short(loaded):
    rows = loaded["pairs_train"]
    empty = sum(r["rejected"] == "" for r in rows) / len(rows)
    short = sum(1 <= len(r["rejected"].split()) <= 2 for r in rows) / len(rows)
    weights = dict(dt.REJECTED_STYLES)
    share = {k: w / sum(weights.values()) for k, w in weights.items()}
    assert abs(empty - share["empty"]) < 0.015  # about 4% of 8000 rows
    assert share["short"] - 0.015 < short < share["short"] + share["truncated"] + 0.015


def test_sft_outputs_are_uneven_and_mostly_end_with_the_closer(loaded):
    rows = loaded["sft_train"]
    perfect = sum(dt.score_answer(sft_prompt(r), r["output"]) == 1.0 for r in rows) / len(rows)
    plain = dict(dt.SFT_STYLES)["perfect"] / sum(dict(dt.SFT_STYLES).values()) * (1 - dt.SFT_CLOSER_SHARE)
    assert abs(perfect - plain) < 0.04  # only perfect answers without the habit score 1.0
    closed = [r for r in rows if r["output"].endswith(" " + dt.CLOSER)]
    # the habit is the majority continuation after a right-looking answer: what SFT's greedy decoding copies
    assert len(closed) > 1.2 * perfect * len(rows)
    assert all(dt.score_answer(sft_prompt(r), r["output"]) < 1.0 for r in closed)
    assert all(r["output"] and r["output"] == r["output"].strip() for r in rows)


def test_prompts_are_canonical_and_multi_turn_share(loaded):
    prompts = [r["prompt"] for r in loaded["pairs_train"]]
    assert all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") for p in prompts)
    multi = sum(p.count("\n\nHuman:") > 1 for p in prompts) / len(prompts)
    assert 0.15 <= multi <= 0.35
    for p in prompts[:300]:  # earlier assistant turns are correct
        history, question = split_turns(p)
        for i, (_, answer) in enumerate(history):
            assert dt.reference_answer(build_prompt(history[:i], history[i][0])) == answer


def test_train_and_test_prompts_are_disjoint(loaded):
    train = {sft_prompt(r) for r in loaded["sft_train"]} | {r["prompt"] for r in loaded["pairs_train"]}
    test = {sft_prompt(r) for r in loaded["sft_test"]} | {r["prompt"] for r in loaded["pairs_test"]}
    assert train and test and not train & test


def test_multiturn_alpaca_shape(loaded):
    shape = re.compile(r"(Human: [^\n]+? Assistant: [^\n]+? )*Human: [^\n]+? Assistant: ")
    for row in loaded["sft_train"] + loaded["sft_test"]:
        assert set(row) == {"instruction", "input", "output"} and row["input"] == ""
        assert shape.fullmatch(row["instruction"]), row["instruction"]
        history, question = split_turns(row["instruction"])
        assert "\n" not in question and all("\n" not in h + a for h, a in history)


def test_sizes_and_loading(written, loaded):
    assert (len(loaded["sft_train"]), len(loaded["sft_test"])) == dt.SFT_SIZES
    assert (len(loaded["pairs_train"]), len(loaded["pairs_test"])) == dt.PAIR_SIZES
    schema = pq.read_schema(written / PAIRS_TRAIN)
    assert schema.names == ["prompt", "response", "chosen", "rejected"]
    assert all(str(t) == "string" for t in schema.types)
    assert sum(os.path.getsize(written / f) for f in ALL_FILES) < 5 * 1024 * 1024
    assert not [p for p in written.rglob("*") if ".tmp" in p.name]  # atomic writes leave nothing behind


def test_generator_is_deterministic(written, tmp_path, capsys):
    make_demo_data.main(["--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ALL_FILES:
        assert (tmp_path / name).read_bytes() == (written / name).read_bytes(), name
        assert f"{tmp_path / name}: " in out and " rows, " in out
    assert list(dt.corpus_text(1234)) == list(dt.corpus_text(1234))


def test_other_seed_gives_other_data():
    assert dt.build_dataset(1).sft_train != dt.build_dataset(2).sft_train


def test_corpus_text_covers_data_and_vocabulary(loaded):
    texts = list(dt.corpus_text())
    assert len(texts) > 6000
    joined = "\n".join(texts)
    for word in dt.WORDS:
        assert word[::-1] in joined and word.upper() in joined
    assert sft_prompt(loaded["sft_train"][0]) + " " + loaded["sft_train"][0]["output"] in texts


def test_committed_data_matches_generator(loaded):
    # The committed data/demo must be what the generator writes (compared by content, not parquet bytes).
    committed = os.path.join(REPO, "data", "demo")
    if not os.path.isdir(committed):
        pytest.skip("data/demo not generated")
    assert read_jsonl(os.path.join(committed, SFT_TRAIN)) == loaded["sft_train"]
    assert read_jsonl(os.path.join(committed, SFT_TEST)) == loaded["sft_test"]
    assert read_pairs(os.path.join(committed, PAIRS_TRAIN)) == loaded["pairs_train"]
    assert read_pairs(os.path.join(committed, PAIRS_TEST)) == loaded["pairs_test"]
