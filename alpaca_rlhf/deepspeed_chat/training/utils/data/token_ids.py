"""How every part of the pipeline turns text into ids: training data, rollouts, evaluation and chat.

A prompt is `bos_ids + text_ids(prompt)`, an answer `text_ids(answer)` (tokenized apart from its prompt, as
rollouts generate it). Families without a BOS token (Qwen2) start with the text itself; LLaMA/Mistral/OPT/
GPT-2 tokenizers name one and get it prepended here, whatever their `add_bos_token` setting says.
"""
from typing import List


def bos_ids(tokenizer) -> List[int]:
    """[bos_token_id], or [] for a tokenizer without a BOS token."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def text_ids(tokenizer, text: str) -> List[int]:
    """The ids of `text` without any special token added ([] for the empty string)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
