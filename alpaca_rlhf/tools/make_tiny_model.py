"""Build a random-weight base model of one of the families users bring, offline: a tokenizer of that family's
kind trained on the project's demo conversations, and a small randomly initialised causal LM. Both load with
AutoTokenizer / AutoModelForCausalLM.from_pretrained(DIR).

    python -m alpaca_rlhf.tools.make_tiny_model --output_dir runs/demo/base --preset tiny [--arch llama]

Families and their tokenizer conventions (what real checkpoints of that family do):
  llama, mistral  SentencePiece BPE with byte fallback; unk 0, bos <s> 1, eos </s> 2; BOS prepended; no pad
                  (we pad with unk, id 0, as the forks do)
  qwen2           byte-level BPE (the `tokenizers` library); no BOS; <|endoftext|> is eos and pad;
                  <|im_start|> / <|im_end|> and a ChatML chat template; q/k/v projections with bias
  opt             byte-level BPE; <s> 0, <pad> 1, </s> 2 (bos and eos), <unk> 3; learned positions (offset 2),
                  ReLU MLP with biases, LayerNorm; DeepSpeed-Chat runs it with --num_padding_at_beginning 1
  gpt2            byte-level BPE; one <|endoftext|> (the last id) for bos, eos and unk, no pad; Conv1D layers
                  (weights stored (in, out)), fused c_attn, GELU, LayerNorm, learned positions

Presets `tiny` and `small` are the benchmark reference shapes (for LLaMA; the other families take the same
width, depth and heads); `micro` is for fast tests. A preset's vocab_size is a floor: the embedding table is at
least as large as the tokenizer.
"""
import argparse
import io
import json
import math
import os
import sys
import tempfile

PRESETS = {
    # ~0.3M parameters: unit and end-to-end tests.
    "micro": dict(vocab_size=0, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4),
    # ~6.2M parameters with vocab 4000: the demo default and the benchmark's `tiny`.
    "tiny": dict(vocab_size=4000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4),
    # ~33.5M parameters: the benchmark's `small`.
    "small": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8),
}
ARCHS = ("llama", "qwen2", "mistral", "opt", "gpt2")

# Qwen2's ChatML template (the structure of the real one, without its tool-calling branches).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_sentencepiece(texts, vocab_size: int) -> bytes:
    """A BPE SentencePiece model that keeps text exactly as written: no normalisation, no collapsing of
    spaces, newlines kept as a piece of their own, digits split (so numbers tokenize uniformly) and
    byte fallback for anything unseen."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def train_byte_level_bpe(texts, vocab_size: int, leading_specials, trailing_specials):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2's scheme: every byte is a symbol, so any text round-trips
    exactly). `leading_specials` take the first ids (OPT's <s> <pad> </s> <unk>, Qwen2's <|endoftext|> ...),
    `trailing_specials` are appended after the merges (GPT-2's <|endoftext|> is its last id)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(leading_specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in trailing_specials])
    return tokenizer


def _write_tokenizer_class(directory: str, tokenizer_class: str, **extra):
    """Name the family's tokenizer class in tokenizer_config.json, as real checkpoints do, so AutoTokenizer
    picks that class (and its conventions) when loading the directory."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(tokenizer_class=tokenizer_class, **extra)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def build_tokenizer(directory: str, vocab_size: int, seed: int, arch: str = "llama"):
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
    from alpaca_rlhf.tools.demo_task import corpus_text
    if arch in ("llama", "mistral"):
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(train_sentencepiece(corpus_text(seed), vocab_size))
        # Converts the SentencePiece model (needs protobuf). LLaMA prepends BOS; transformers 5 does not by default.
        tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True, add_eos_token=False)
        tokenizer.save_pretrained(directory)
        return tokenizer
    if arch == "qwen2":
        backend = train_byte_level_bpe(corpus_text(seed), vocab_size,
                                       ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [])
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=None, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", unk_token=None)
        fast.chat_template = CHATML_TEMPLATE
        fast.save_pretrained(directory)
        _write_tokenizer_class(directory, "Qwen2Tokenizer", add_bos_token=False)
    elif arch == "opt":
        backend = train_byte_level_bpe(corpus_text(seed), vocab_size, ["<s>", "<pad>", "</s>", "<unk>"], [])
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
        fast.save_pretrained(directory)
        _write_tokenizer_class(directory, "GPT2Tokenizer", add_bos_token=True)
    elif arch == "gpt2":
        backend = train_byte_level_bpe(corpus_text(seed), vocab_size - 1, [], ["<|endoftext|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        fast.save_pretrained(directory)
        _write_tokenizer_class(directory, "GPT2Tokenizer", add_bos_token=False)
    else:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return AutoTokenizer.from_pretrained(directory)


def build_model(tokenizer, preset: str, seed: int, max_position_embeddings: int, arch: str = "llama",
                config_only: bool = False):
    """The randomly initialised causal LM (or with config_only, just its config)."""
    import torch
    import transformers
    shape = dict(PRESETS[preset])
    vocab = max(shape.pop("vocab_size"), 8 * math.ceil(len(tokenizer) / 8))
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if arch in ("llama", "mistral", "qwen2"):
        config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                        "qwen2": transformers.Qwen2Config}[arch]
        extra = {"sliding_window": None} if arch in ("mistral", "qwen2") else {}
        config = config_class(vocab_size=vocab, **shape, max_position_embeddings=max_position_embeddings,
                              tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.02, **extra,
                              **special)
    elif arch == "opt":
        config = transformers.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers,
                                        num_attention_heads=heads, word_embed_proj_dim=hidden,
                                        max_position_embeddings=max_position_embeddings, do_layer_norm_before=True,
                                        dropout=0.0, attention_dropout=0.0, init_std=0.02, **special)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=inter, n_layer=layers, n_head=heads,
                                         n_positions=max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, initializer_range=0.02, **special)
    else:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if config_only:
        return config
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def make_tiny_model(output_dir: str, preset: str = "tiny", vocab_size: int = 1000, seed: int = 1234,
                    max_position_embeddings: int = 1024, arch: str = "llama") -> str:
    """Write tokenizer + model into output_dir (atomically per file) and return it."""
    from alpaca_rlhf.deepspeed_chat.training.utils.utils import move_dir_contents
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tiny-model-", dir=parent)
    tokenizer = build_tokenizer(tmp, vocab_size, seed, arch)
    model = build_model(tokenizer, preset, seed, max_position_embeddings, arch)
    model.save_pretrained(tmp, safe_serialization=True)
    move_dir_contents(tmp, output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output_dir}: {arch} preset {preset}, {n_params / 1e6:.2f}M parameters, "
          f"tokenizer {len(tokenizer)} tokens, model vocab {model.config.vocab_size}")
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Directory to write the model and tokenizer into.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="Model size. Default tiny.")
    parser.add_argument("--arch", default="llama", choices=ARCHS,
                        help="Model family, with that family's kind of tokenizer (see the module docstring). "
                             "Default llama.")
    parser.add_argument("--vocab_size", type=int, default=1000,
                        help="Target tokenizer vocabulary (a soft limit for SentencePiece: the demo corpus may "
                             "yield fewer). Default 1000.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed for the corpus and the weights. Default 1234.")
    parser.add_argument("--max_position_embeddings", type=int, default=1024, help="Context length. Default 1024.")
    args = parser.parse_args(argv)
    make_tiny_model(args.output_dir, args.preset, args.vocab_size, args.seed, args.max_position_embeddings,
                    args.arch)


if __name__ == "__main__":
    sys.exit(main())
