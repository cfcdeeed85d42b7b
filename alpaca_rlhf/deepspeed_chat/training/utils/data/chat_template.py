"""How a conversation becomes text and token ids: `--chat_template alpaca|model|none|PATH`, one rendering shared by
every step, the evaluation tools and both chats.

- alpaca (the default): "\\n\\nHuman: q\\n\\nAssistant: a" (prompt_format.py); EOS ends the answer. A system
  message is plain text before the first turn.
- model: the tokenizer's own Jinja chat template (`apply_chat_template`); PATH: a Jinja template file. The answer
  ends with the template's end-of-turn token (ChatML's <|im_end|>, Llama-3's <|eot_id|>, Mistral's </s>), found by
  rendering a probe conversation; that token is the stop token of rollouts, evaluation and chat.
- none: raw text continuation (TRL's IMDB setting): the prompt is the text, the answer continues it, EOS ends it.

Exact masks under any template: a conversation is cut into pieces by rendering it turn by turn: everything before
an assistant answer (rendered with the generation prompt), the answer up to and including its end-of-turn token,
and whatever the template puts after that (ChatML's newline). Each piece is tokenized apart, the way a rollout
tokenizes its prompt and then generates the answer, so the labelled tokens are exactly the answer's and its
end-of-turn: no search for the answer's text in the tokenized whole (which breaks where BPE merges across a
boundary). Messages are {"role": "system"|"user"|"assistant", "content": str}.
"""
import json
import os
from typing import List, Optional, Sequence, Tuple

from ..errors import ConfigError, DataError
from .prompt_format import ASSISTANT, HUMAN, TURN_SEPARATOR, format_answer, parse_conversation
from .token_ids import bos_ids, text_ids

ALPACA, MODEL, NONE = "alpaca", "model", "none"
TOKENIZER_KEY = "chat_format"  # the format a model was trained in, as its exported tokenizer_config.json records it
IGNORE_INDEX = -100
Piece = Tuple[str, bool]  # (text, is an assistant answer to train on)


class ChatFormat:
    """One way of rendering conversations, bound to a tokenizer. Subclasses give `pieces` and `prompt_text`."""

    name = ""
    appends_eos = True  # the answer's end is the EOS id appended after its text (alpaca, none)

    def __init__(self, tokenizer, system_prompt: Optional[str] = None, answer_suffix: str = ""):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        self.answer_suffix = answer_suffix  # --add_eot_token's string, after the last answer (alpaca, none)
        self.stop_token_id = tokenizer.eos_token_id

    # ------------------------------------------------------------------------------------ text
    def with_system(self, messages: Sequence[dict]) -> List[dict]:
        """The messages with --system_prompt first, unless they bring their own system message."""
        messages = [dict(m) for m in messages]
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def prompt_text(self, messages: Sequence[dict]) -> str:
        """The text of a conversation that ends with a user turn, up to where the assistant's answer starts."""
        raise NotImplementedError

    def pieces(self, messages: Sequence[dict]) -> List[Piece]:
        """A conversation that ends with an assistant turn, as consecutive pieces flagged True for each answer."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ ids
    def _start(self, text: str) -> List[int]:
        """BOS, unless the tokenizer has none or the rendered text already starts with it (Llama-3, Mistral)."""
        bos = self.tokenizer.bos_token
        return [] if bos and text.startswith(bos) else bos_ids(self.tokenizer)

    def prompt_ids(self, messages: Sequence[dict]) -> List[int]:
        """The ids a rollout or a chat starts from: BOS (where due) + the rendered prompt."""
        text = self.prompt_text(self.with_system(messages))
        return self._start(text) + text_ids(self.tokenizer, text)

    @property
    def keeps_text(self) -> bool:
        """Whether a canonical prompt text is used as it is (the alpaca format with nothing to add): the data,
        rollouts and chats of every run before chat templates, token for token."""
        return False

    def prompt_ids_for(self, text: str, messages: Optional[Sequence[dict]] = None) -> List[int]:
        """The ids a rollout, a chat or an evaluation starts from, for a prompt given as canonical text (and the
        messages it came from, where the source gave them): the text itself where the format keeps it, else the
        messages (or those of the text) rendered."""
        if self.keeps_text and messages is None:
            return bos_ids(self.tokenizer) + text_ids(self.tokenizer, text)
        return self.prompt_ids(messages if messages is not None else parse_conversation(text))

    def sequence(self, messages: Sequence[dict], all_turns: bool = False) -> Tuple[List[int], List[int]]:
        """(ids, labels) of a conversation ending with an assistant turn: labels are the ids on the answer tokens
        (the last answer, or every answer with all_turns) and their end of turn, IGNORE_INDEX elsewhere."""
        pieces = self.pieces(self.with_system(messages))
        last = max(i for i, (_, answer) in enumerate(pieces) if answer)
        if not all_turns:  # earlier answers are part of the prompt, tokenized with it as a rollout's prompt is
            pieces = _merge_prompts([(text, i == last) for i, (text, _) in enumerate(pieces)])
            last = len(pieces) - 1
        ids = self._start(pieces[0][0])
        labels = [IGNORE_INDEX] * len(ids)
        for i, (text, answer) in enumerate(pieces):
            if i == last and self.appends_eos:
                text += self.answer_suffix
            piece = text_ids(self.tokenizer, text)
            if i == last and self.appends_eos:
                piece = piece + [self.tokenizer.eos_token_id]
            ids += piece
            labels += piece if answer else [IGNORE_INDEX] * len(piece)
        return ids, labels


class AlpacaFormat(ChatFormat):
    """Today's format; for data that comes as text (Example.prompt) the text is used as it is (see data_utils)."""

    name = ALPACA

    @property
    def keeps_text(self) -> bool:
        return not self.system_prompt

    def _turns(self, messages: Sequence[dict]) -> List[Piece]:
        pieces: List[Piece] = []
        for m in messages:
            content = str(m["content"]).strip()
            if m["role"] == "system":
                pieces.append((content, False))
            elif m["role"] == "user":
                pieces.append((f"{TURN_SEPARATOR}{HUMAN} {content}{TURN_SEPARATOR}{ASSISTANT}", False))
            else:
                pieces.append((format_answer(content), True))
        return _merge_prompts(pieces)

    def prompt_text(self, messages):
        return "".join(text for text, _ in self._turns(messages))

    def pieces(self, messages):
        return self._turns(messages)


class NoTemplateFormat(ChatFormat):
    """Raw continuation: the messages' text one after the other, the answer appended as it is."""

    name = NONE

    def prompt_text(self, messages):
        return "".join(str(m["content"]) for m in messages)

    def pieces(self, messages):
        return _merge_prompts([(str(m["content"]), m["role"] == "assistant") for m in messages])


class JinjaFormat(ChatFormat):
    """A Jinja chat template (the tokenizer's own, or a file). The answer carries the template's end-of-turn
    token, which is also the stop token."""

    appends_eos = False

    def __init__(self, tokenizer, template: str, name: str, system_prompt: Optional[str] = None):
        super().__init__(tokenizer, system_prompt)
        self.template, self.name = template, name
        self.end_of_turn = self._find_end_of_turn()
        if self.end_of_turn is None:  # a template that ends answers with nothing special: EOS ends them
            self.appends_eos = True
        else:
            self.stop_token_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)

    def render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        messages = [{"role": m["role"], "content": str(m["content"]).strip()} for m in messages]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def prompt_text(self, messages):
        return self.render(messages, True)

    def _find_end_of_turn(self) -> Optional[str]:
        """The first special token the template writes after an answer's text (probe: one user, one assistant
        turn), or None."""
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
        before, full = self.render(probe[:1], True), self.render(probe, False)
        if not full.startswith(before) or "A" not in full[len(before):]:
            raise ConfigError(f"--chat_template {self.name}: the template does not render a conversation as its "
                              "prompt followed by the answer (needed for exact answer masks)")
        tail = full[len(before):]
        tail = tail[tail.index("A") + 1:]
        special = [t for t in _special_tokens(self.tokenizer) if t in tail]
        return min(special, key=tail.index) if special else None

    def pieces(self, messages):
        pieces: List[Piece] = []
        done = ""  # the text rendered so far
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, full = self.render(messages[:k], True), self.render(messages[:k + 1], False)
            if not (before.startswith(done) and full.startswith(before)):
                raise DataError(f"--chat_template {self.name}: the template renders the conversation before "
                                f"assistant turn {k} differently from what comes after it; its answer cannot be "
                                "masked exactly")
            answer = full[len(before):]
            end = answer.rfind(self.end_of_turn) + len(self.end_of_turn) if self.end_of_turn else len(answer)
            pieces += [(before[len(done):], False), (answer[:end], True), (answer[end:], False)]
            done = full
        # the sequence ends with the last answer's end of turn, where a rollout stops (and a reward is read)
        return _merge_prompts([p for p in pieces[:-1] if p[0] or p[1]])


def _special_tokens(tokenizer) -> List[str]:
    """Every special token's text: the named ones and the added tokens marked special (ChatML's)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({t for t in tokenizer.all_special_tokens if t} | {t.content for t in added.values() if t.special})


def _merge_prompts(pieces: List[Piece]) -> List[Piece]:
    """Consecutive non-answer pieces joined into one (tokenized together, as a prompt is)."""
    merged: List[Piece] = []
    for text, answer in pieces:
        if merged and not answer and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, answer))
    return merged


def load_chat_format(spec: Optional[str], tokenizer, system_prompt: Optional[str] = None,
                     answer_suffix: str = "") -> ChatFormat:
    """The ChatFormat named by --chat_template (None: alpaca)."""
    spec = spec or ALPACA
    if spec == ALPACA:
        return AlpacaFormat(tokenizer, system_prompt, answer_suffix)
    if spec == NONE:
        return NoTemplateFormat(tokenizer, system_prompt, answer_suffix)
    if spec == MODEL:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ConfigError(f"--chat_template model: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) "
                              "has no chat template; use alpaca, none or a Jinja file")
        return JinjaFormat(tokenizer, template, MODEL, system_prompt)
    if not os.path.isfile(spec):
        raise ConfigError(f"--chat_template {spec}: expected alpaca, model, none or a Jinja template file")
    with open(spec, encoding="utf-8") as f:
        return JinjaFormat(tokenizer, f.read(), spec, system_prompt)


def format_from_args(args, tokenizer) -> ChatFormat:
    """The format of a step's flags (--chat_template, --system_prompt, --add_eot_token/--eot_token). A template
    file becomes the tokenizer's own chat template, so the exported tokenizer carries it (the chat then renders
    with `model`, whatever path it was read from)."""
    suffix = args.eot_token if getattr(args, "add_eot_token", False) else ""
    fmt = load_chat_format(getattr(args, "chat_template", None), tokenizer, getattr(args, "system_prompt", None),
                           suffix)
    if isinstance(fmt, JinjaFormat):
        tokenizer.chat_template = fmt.template
    # saved into the exported tokenizer_config.json: a model directory tells how to talk to it on its own
    tokenizer.init_kwargs[TOKENIZER_KEY] = {"chat_template": fmt.name if fmt.name in (ALPACA, NONE) else MODEL,
                                            "system_prompt": fmt.system_prompt}
    return fmt


def trained_chat_format(model_dir: str, tokenizer=None) -> Tuple[str, Optional[str]]:
    """(--chat_template, --system_prompt) the model in `model_dir` was trained with: its training_args.json, else
    its tokenizer config's record (TOKENIZER_KEY), else alpaca. A template file of training became the exported
    tokenizer's own: model."""
    config_file = os.path.join(model_dir, "training_args.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    else:
        config = dict(getattr(tokenizer, "init_kwargs", {}).get(TOKENIZER_KEY) or {})
    template = config.get("chat_template") or ALPACA
    return (template if template in (ALPACA, NONE, MODEL) else MODEL), config.get("system_prompt")


def format_for_model(model_dir: str, tokenizer, chat_template: Optional[str] = None,
                     system_prompt: Optional[str] = None) -> ChatFormat:
    """The format to talk to an exported model in: the flags given, else what it was trained with."""
    trained_template, trained_system = trained_chat_format(model_dir, tokenizer)
    return load_chat_format(chat_template or trained_template, tokenizer,
                            trained_system if system_prompt is None else system_prompt)
