"""The offline tiny models: LLaMA special tokens, exact round trip of our prompt format for every family's
tokenizer, each family's conventions, loadable with Auto*."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import build_prompt, format_answer
from alpaca_rlhf.deepspeed_chat.training.utils.data.token_ids import bos_ids, text_ids
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import load_tokenizer
from alpaca_rlhf.tools.make_tiny_model import ARCHS, PRESETS, build_model, make_tiny_model

CONVERSATION = build_prompt([("What is 3 plus 4?", "3 plus 4 is 7."),
                             ("Reverse the word  cat.\nThen say it twice.", "tac tac")], "héllo 日本\tx?")
ANSWER = format_answer("The answer is: 42.\n\nDone!")


def test_llama_special_tokens(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0


def test_prompt_format_round_trips_exactly(micro_model_dir):
    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    for text in (CONVERSATION, CONVERSATION + ANSWER, "\n\nHuman: a\n\n\n  b  \n\nAssistant:"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_prompt_and_answer_tokenized_apart_decode_to_the_conversation(tokenizer):
    prompt_ids = tokenizer(CONVERSATION, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompt_ids + answer_ids) == CONVERSATION + ANSWER
    assert tokenizer.convert_ids_to_tokens(prompt_ids[:2]) == ["\n", "\n"]


def test_saved_model_loads_and_generates(micro_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    assert model.config.vocab_size >= len(tokenizer)
    ids = tokenizer(CONVERSATION, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 5)


def test_benchmark_presets_have_the_reference_sizes(tokenizer):
    # The benchmark reference architectures: tiny ~6.2M and small ~33.5M parameters.
    tiny = sum(p.numel() for p in build_model(tokenizer, "tiny", 0, 512).parameters())
    assert abs(tiny - 6.2e6) < 0.1e6
    assert PRESETS["small"]["hidden_size"] == 512 and PRESETS["small"]["num_hidden_layers"] == 8
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------- every family
@pytest.fixture(scope="module", params=ARCHS)
def family_dir(request, tmp_path_factory):
    return request.param, make_tiny_model(str(tmp_path_factory.mktemp(request.param)), preset="micro",
                                          arch=request.param)


# family -> (BOS prepended by our data code, the class AutoTokenizer must pick, a LoRA target it must offer)
FAMILY_CONVENTIONS = {
    "llama": (True, "LlamaForCausalLM", "q_proj"), "mistral": (True, "MistralForCausalLM", "q_proj"),
    "qwen2": (False, "Qwen2ForCausalLM", "q_proj"), "opt": (True, "OPTForCausalLM", "q_proj"),
    "gpt2": (True, "GPT2LMHeadModel", "c_attn"),
}


def test_every_family_round_trips_our_prompt_format_exactly(family_dir):
    """What the data code builds (bos where the family has one + prompt ids + answer ids, tokenized apart)
    decodes to exactly the conversation text, newlines and non-ASCII included, for each tokenizer kind."""
    arch, path = family_dir
    tok = load_tokenizer(path)
    has_bos, _, _ = FAMILY_CONVENTIONS[arch]
    assert (tok.bos_token_id is not None) == has_bos
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    for prompt, answer in ((CONVERSATION, ANSWER), ("\n\nHuman: a\n\n\n  b  \n\nAssistant:", " x")):
        prompt_ids = bos_ids(tok) + text_ids(tok, prompt)
        answer_ids = text_ids(tok, answer)
        assert None not in prompt_ids
        assert tok.decode(prompt_ids + answer_ids, skip_special_tokens=True) == prompt + answer
        # alone, an answer keeps its text (SentencePiece drops the leading space of a decode's first piece)
        assert tok.decode(answer_ids).strip() == answer.strip()


def test_every_family_has_its_conventions(family_dir):
    arch, path = family_dir
    _, model_class, lora_target = FAMILY_CONVENTIONS[arch]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == model_class and model.config.vocab_size >= len(tok)
    assert any(name.endswith(lora_target) for name, _ in model.named_modules())
    if arch == "qwen2":  # ChatML: its own end-of-turn token and a chat template
        assert tok.bos_token is None and tok.eos_token == "<|endoftext|>"
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    if arch == "opt":  # DeepSpeed-Chat's OPT: </s> (id 2) opens every sequence, <pad> is 1
        assert (tok.bos_token, tok.bos_token_id, tok.pad_token_id) == ("</s>", 2, 1)
    if arch == "gpt2":  # one <|endoftext|>, the last id, for everything; no pad of its own (we pad with it)
        assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == len(tok) - 1 and tok.pad_token is None
        assert load_tokenizer(path).pad_token_id == tok.eos_token_id


def test_presets_build_for_every_family(tokenizer):
    """tiny and small exist for every family (built here from the micro tokenizer: shapes only)."""
    for arch in ARCHS:
        for preset in ("tiny", "small"):
            config = build_model(tokenizer, preset, 0, 64, arch, config_only=True)
            assert config.num_hidden_layers == PRESETS[preset]["num_hidden_layers"], (arch, preset)


def test_hub_names_go_to_from_pretrained_and_missing_local_paths_are_one_line(tmp_path):
    """`org/model` is not a local path: it reaches transformers (offline here: its error, on one line, naming
    the model); a local path that does not exist is our one-line error."""
    from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError
    from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import check_model_path, create_hf_model
    check_model_path("Qwen/Qwen2-0.5B")
    check_model_path("gpt2")
    with pytest.raises(UserError) as error:
        create_hf_model(AutoModelForCausalLM, "no-such-org/no-such-model")
    assert "'no-such-org/no-such-model'" in str(error.value) and "\n" not in str(error.value)
    for local in (str(tmp_path / "missing"), "./missing", "runs/x/missing"):
        with pytest.raises(UserError, match="does not exist"):
            check_model_path(local)
