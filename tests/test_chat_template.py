"""--chat_template (utils/data/chat_template.py): the round trip render -> tokenize -> labels -> decode the labelled
tokens == the assistant texts plus the end of turn, for alpaca, ChatML, a Llama-3-style and a Mistral-style template,
multi-turn and with a system message; the stop token of each; the alpaca path byte for byte as before; and the
data layer's use of it (messages, all turns, prompt ids for rollouts)."""
import pytest

from alpaca_rlhf.deepspeed_chat.training.utils.data import data_utils as du
from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import IGNORE_INDEX, load_chat_format
from alpaca_rlhf.deepspeed_chat.training.utils.data.raw_datasets import Example
from alpaca_rlhf.deepspeed_chat.training.utils.errors import ConfigError
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import load_tokenizer

CONVERSATION = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."},
                {"role": "user", "content": "And the color of a hen?"},
                {"role": "assistant", "content": "A hen is brown."}]
ANSWERS = ["2 plus 2 is 4.", "A hen is brown."]

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% else %}{{ m['content'] }}\n\n"
           "{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from alpaca_rlhf.tools.make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("chat_tokenizers")
    out = {arch: load_tokenizer(make_tiny_model(str(root / arch), preset="micro", arch=arch))
           for arch in ("qwen2", "llama")}
    llama3 = load_tokenizer(str(root / "qwen2"))  # byte-level BPE with Llama-3's header tokens added
    llama3.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens":
                               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    out["llama3"] = llama3
    return out


def _labelled_text(tokenizer, ids, labels):
    """The labelled tokens decoded run by run (each run is one answer and its end of turn)."""
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("case", ["alpaca", "chatml", "llama3", "mistral"])
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_round_trip_labels_cover_exactly_the_answers_and_their_end_of_turn(tokenizers, case, system, tmp_path):
    tokenizer, spec, end = {
        "alpaca": (tokenizers["llama"], "alpaca", None),
        "chatml": (tokenizers["qwen2"], "model", "<|im_end|>"),
        "llama3": (tokenizers["llama3"], "llama3", "<|eot_id|>"),
        "mistral": (tokenizers["llama"], "mistral", None)}[case]
    if spec in ("llama3", "mistral"):  # a template file, as users pass one
        path = tmp_path / f"{spec}.jinja"
        path.write_text(LLAMA3 if spec == "llama3" else MISTRAL)
        spec = str(path)
    fmt = load_chat_format(spec, tokenizer, system)
    eos = tokenizer.eos_token
    # the end of turn: the template's own token, else EOS (alpaca; Mistral's template ends answers with </s>)
    end = end or eos
    assert fmt.stop_token_id == tokenizer.convert_tokens_to_ids(end)
    for all_turns in (False, True):
        ids, labels = fmt.sequence(CONVERSATION, all_turns)
        assert len(ids) == len(labels)
        runs = _labelled_text(tokenizer, ids, labels)
        answers = ANSWERS if all_turns else ANSWERS[-1:]
        assert len(runs) == len(answers)
        for run, answer, last in zip(runs, answers, [False] * (len(answers) - 1) + [True]):
            if case == "alpaca" and not last:
                assert run.strip() == answer  # alpaca's earlier answers end where the next "Human:" starts
            else:
                assert run.strip() == answer + end, (run, answer)
        # the sequence ends with the last answer's end of turn (where a rollout stops and a reward is read)
        assert ids[-1] == fmt.stop_token_id and labels[-1] == ids[-1]
        if system:
            assert system in tokenizer.decode(ids)
    # a rollout's prompt is exactly the sequence before the last answer
    prompt = fmt.prompt_ids(CONVERSATION[:3])
    ids, labels = fmt.sequence(CONVERSATION)
    assert ids[:len(prompt)] == prompt and all(label == IGNORE_INDEX for label in labels[:len(prompt)])
    assert labels[len(prompt)] != IGNORE_INDEX


def test_chatml_text_and_bos_handling(tokenizers, tmp_path):
    fmt = load_chat_format("model", tokenizers["qwen2"], "Be brief.")
    text = tokenizers["qwen2"].decode(fmt.sequence(CONVERSATION[:2])[0])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n"
                    "<|im_start|>assistant\n2 plus 2 is 4.<|im_end|>")
    # a template that writes BOS itself gets no second one; alpaca on a BOS tokenizer gets one
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3)
    llama3 = load_chat_format(str(path), tokenizers["llama3"])
    ids = llama3.prompt_ids(CONVERSATION[:1])
    assert ids.count(tokenizers["llama3"].bos_token_id) == 1
    alpaca = load_chat_format("alpaca", tokenizers["llama"])
    assert alpaca.prompt_ids(CONVERSATION[:1])[0] == tokenizers["llama"].bos_token_id


def test_none_is_raw_continuation(tokenizers):
    fmt = load_chat_format("none", tokenizers["qwen2"])
    ids, labels = fmt.sequence([{"role": "user", "content": "This movie was"},
                                {"role": "assistant", "content": " really good"}])
    tok = tokenizers["qwen2"]
    assert tok.decode(ids) == "This movie was really good" + tok.eos_token
    assert _labelled_text(tok, ids, labels) == [" really good" + tok.eos_token]


def test_bad_template_choices_are_one_line_errors(tokenizers, tmp_path):
    with pytest.raises(ConfigError, match="has no chat template"):
        load_chat_format("model", tokenizers["llama"])
    with pytest.raises(ConfigError, match="expected alpaca, model, none or a Jinja template file"):
        load_chat_format(str(tmp_path / "missing.jinja"), tokenizers["llama"])


def test_the_alpaca_path_is_unchanged_and_messages_render_the_same(tokenizers):
    """Canonical text examples tokenize as they always did (bos + prompt + answer + eos, prompt and answer apart);
    the same conversation given as messages renders to the same ids."""
    tok = tokenizers["llama"]
    fmt = load_chat_format("alpaca", tok)
    example = Example("\n\nHuman: What is 2 plus 2?\n\nAssistant:", " 2 plus 2 is 4.", " 5.")
    row = du.tokenize_sft(example, fmt, 512)
    prompt_ids = [tok.bos_token_id] + tok(example.prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(example.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == prompt_ids + answer_ids
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    as_messages = Example(example.prompt, example.chosen, example.rejected,
                          messages=(("user", "What is 2 plus 2?"),))
    assert du.tokenize_sft(as_messages, fmt, 512) == row
    pair = du.tokenize_pair(as_messages, fmt, 512)
    assert pair["prompt_len"] == [len(prompt_ids)] * 2
    assert du.tokenize_prompt(as_messages, fmt, 512)["prompt_ids"] == prompt_ids


def test_all_turns_and_truncation_through_the_data_layer(tokenizers):
    tok = tokenizers["qwen2"]
    fmt = load_chat_format("model", tok)
    example = Example("", " A hen is brown.", None,
                      messages=tuple((m["role"], m["content"]) for m in CONVERSATION[:3]))
    last = du.tokenize_sft(example, fmt, 512)
    every = du.tokenize_sft(example, fmt, 512, all_turns=True)
    assert last["input_ids"] == every["input_ids"]
    assert _labelled_text(tok, last["input_ids"], last["labels"]) == ["A hen is brown.<|im_end|>"]
    assert _labelled_text(tok, every["input_ids"], every["labels"]) == ["2 plus 2 is 4.<|im_end|>",
                                                                        "A hen is brown.<|im_end|>"]
    short = du.tokenize_sft(example, fmt, 12)                          # the start of the history is cut
    assert short["input_ids"] == last["input_ids"][-12:] and short["labels"] == last["labels"][-12:]
    pair = du.tokenize_pair(Example("", " A hen is brown.", " A hen is blue.", example.messages), fmt, 512)
    prompt = fmt.prompt_ids(CONVERSATION[:3])
    assert pair["prompt_len"] == [len(prompt)] * 2 and pair["chosen_ids"][:len(prompt)] == prompt


def test_the_exported_tokenizer_records_the_format(tokenizers, tmp_path):
    """A model directory without training_args.json still tells the chat how to talk to it: the tokenizer config
    the steps export records --chat_template and --system_prompt (a template file as `model`, its text saved as
    the tokenizer's own template)."""
    import argparse

    from transformers import AutoTokenizer

    from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import format_for_model, format_from_args
    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3)
    for tok, spec, system, expected in ((tokenizers["qwen2"], "none", None, "none"),
                                        (tokenizers["llama3"], str(template), "Be brief.", "model")):
        format_from_args(argparse.Namespace(chat_template=spec, system_prompt=system), tok)
        out = tmp_path / f"export-{expected}"
        tok.save_pretrained(str(out))
        fmt = format_for_model(str(out), AutoTokenizer.from_pretrained(str(out)))
        assert (fmt.name, fmt.system_prompt) == (expected, system)
    assert fmt.stop_token_id == tokenizers["llama3"].convert_tokens_to_ids("<|eot_id|>")
