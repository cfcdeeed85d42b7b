"""Chat logic shared by the gradio chatbot and the terminal chat, free of any UI.

    history + message --build_chat_prompt--> bos + prompt ids (oldest turns trimmed to fit the context)
    prompt ids --stream_answer--> the answer so far, again and again (cut at EOS, the template's end of turn or,
                                  in the alpaca format, the next "Human:" turn)

The prompt is built with the format the model was trained in (--chat_template and --system_prompt, read from the
model directory's training_args.json unless given: utils/data/chat_template.py) and tokenized the way step 1
and step 3 tokenize prompts, so a model sees at inference time exactly what it was trained on. Only utils are
imported, never a training script.
"""
import os
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import AlpacaFormat, ChatFormat, format_for_model
from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import HUMAN, TURN_SEPARATOR, build_prompt
from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError
from alpaca_rlhf.deepspeed_chat.training.utils.model.model_utils import load_tokenizer

History = Sequence[Tuple[str, str]]
DTYPES = ("auto", "fp32", "bf16", "fp16")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The text that opens the next human turn: the model has finished its answer when it writes it.
NEXT_TURN = TURN_SEPARATOR + HUMAN
# How many trailing tokens the stop check decodes: more than the marker can take, even byte by byte.
_MARKER_WINDOW_TOKENS = 24


# ----------------------------------------------------------------------------------------------- prompt
def _render(tokenizer, fmt: Optional[ChatFormat], history: History, message: str) -> Tuple[str, List[int]]:
    """(prompt text, ids) in the format, as step 1 and step 3 tokenize prompts (the canonical text for alpaca)."""
    fmt = fmt or AlpacaFormat(tokenizer)
    if fmt.keeps_text:
        text = build_prompt(history, message)
        return text, fmt.prompt_ids_for(text)
    messages = []
    for human, assistant in history:
        messages += [{"role": "user", "content": human}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": message})
    return fmt.prompt_text(fmt.with_system(messages)), fmt.prompt_ids(messages)


def build_chat_prompt(tokenizer, history: History, message: str, max_prompt_tokens: int,
                      fmt: Optional[ChatFormat] = None) -> Tuple[str, List[int], int]:
    """(prompt text, prompt ids, number of oldest turns dropped) for `message` after `history`, in the chat
    format `fmt` (None: alpaca).

    When the prompt is longer than `max_prompt_tokens` (the context minus the tokens the answer may take),
    whole turns are dropped from the oldest on: the model still sees the latest exchanges intact. The current
    message is never cut; if it does not fit on its own a ValueError says so.

    The prompt only shrinks as more turns are dropped, so the fewest drops that fit are found by bisection:
    about log2(turns) renderings of the prompt instead of one per dropped turn (a client-sent history of 2000
    short turns took 74 s of CPU when each drop re-rendered and re-tokenized the rest).
    """
    history = list(history)
    text, ids = _render(tokenizer, fmt, [], message)                   # every turn dropped: the message alone
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"message too long: {len(ids)} tokens, at most {max_prompt_tokens} "
                         f"(shorten it, or lower max_new_tokens to leave more room)")
    best, low, high = (text, ids, len(history)), 0, len(history)       # the answer lies in [low, high]
    while low < high:
        mid = (low + high) // 2
        text, ids = _render(tokenizer, fmt, history[mid:], message)
        if len(ids) <= max_prompt_tokens:
            best, high = (text, ids, mid), mid
        else:
            low = mid + 1
    return best


# ----------------------------------------------------------------------------------------------- answer text
def cut_at_next_turn(text: str) -> Tuple[str, bool]:
    """(text before the first "Human:" marker, whether there was one). A marker counts at the start or after
    whitespace, as `prompt_format` parses turns, so a word like "NonHuman:" does not end the answer."""
    start = 0
    while True:
        i = text.find(HUMAN, start)
        if i < 0:
            return text, False
        if i == 0 or text[i - 1].isspace():
            return text[:i], True
        start = i + 1


def _hold_back_partial_marker(text: str) -> str:
    """While streaming, hide a tail that may be the beginning of the next-turn marker ("\\n\\nHum"), so the
    reader never sees a marker flash up and disappear once it is complete."""
    for k in range(min(len(NEXT_TURN), len(text)), 0, -1):
        if NEXT_TURN.startswith(text[-k:]):
            return text[:-k]
    return text


def visible_answer(text: str, final: bool = False) -> str:
    """The answer to show for the generated text so far: cut at the next turn, stripped (answers start with
    a space in the training format). Not final: a possible partial marker at the end is held back too."""
    answer, stopped = cut_at_next_turn(text)
    if not final and not stopped:
        answer = _hold_back_partial_marker(answer)
    return answer.strip()


class StopGeneration(StoppingCriteria):
    """Ends generation when the answer contains the next "Human:" marker (the model starts writing the
    user's turn) or when `cancel()` is called (the reader went away: no point finishing the answer)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = [self.cancelled.is_set() or self._has_marker(row) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _has_marker(self, row: torch.Tensor) -> bool:
        # Only the answer's last tokens: the prompt itself is full of markers.
        start = max(self.prompt_len, row.shape[0] - _MARKER_WINDOW_TOKENS)
        tail = self.tokenizer.decode(row[start:].tolist(), skip_special_tokens=True)
        return cut_at_next_turn(tail)[1]


# ----------------------------------------------------------------------------------------------- generation
@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0

    def validate(self) -> "GenerationSettings":
        """Raise ValueError naming the first setting out of range (values may come from an API call)."""
        checks = [
            (int(self.max_new_tokens) >= 1, "max_new_tokens must be at least 1"),
            (not self.do_sample or self.temperature > 0, "temperature must be > 0 when sampling"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (int(self.top_k) >= 0, "top_k must be >= 0 (0 = off)"),
            (int(self.num_beams) >= 1, "num_beams must be at least 1"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def generate_kwargs(self, tokenizer, stop_token_id: Optional[int] = None) -> dict:
        """generate()'s arguments; stop_token_id: the chat template's end of turn, which ends answers too."""
        stops = sorted({tokenizer.eos_token_id, stop_token_id} - {None})
        kwargs = dict(max_new_tokens=int(self.max_new_tokens), num_beams=int(self.num_beams),
                      repetition_penalty=float(self.repetition_penalty), do_sample=bool(self.do_sample),
                      eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tokenizer.pad_token_id)
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
        else:
            # Greedy / beam search: unset the sampling knobs a model's generation_config may carry, which
            # transformers would otherwise warn about on every message.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def stream_answer(model, tokenizer, prompt_ids: Sequence[int], settings: GenerationSettings,
                  stop_token_id: Optional[int] = None) -> Iterator[str]:
    """Yield the answer so far (stripped, cut at the next "Human:" turn) while it is generated; the last value
    is the whole answer. Generation ends at EOS, at stop_token_id (a chat template's end of turn), at the marker
    or after max_new_tokens. With beam search the answer is only known at the end, so it is yielded once."""
    settings.validate()
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    kwargs = dict(settings.generate_kwargs(tokenizer, stop_token_id), input_ids=input_ids,
                  attention_mask=torch.ones_like(input_ids))
    if settings.num_beams > 1:
        yield _beam_answer(model, tokenizer, kwargs)
        return
    yield from _streamed_answer(model, tokenizer, kwargs)


def _beam_answer(model, tokenizer, kwargs: dict) -> str:
    prompt_len = kwargs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**kwargs)
    return visible_answer(tokenizer.decode(out[0, prompt_len:].tolist(), skip_special_tokens=True), final=True)


def _streamed_answer(model, tokenizer, kwargs: dict) -> Iterator[str]:
    """generate() runs in a thread and pushes decoded text into a TextIteratorStreamer, read here."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = StopGeneration(tokenizer, kwargs["input_ids"].shape[1])
    failure: List[BaseException] = []

    def generate():
        try:
            with torch.inference_mode():
                model.generate(**kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]))
        except BaseException as e:  # re-raised in the reader's thread, where someone can report it
            failure.append(e)
            streamer.end()  # unblock the reader

    thread = threading.Thread(target=generate, name="chat-generate", daemon=True)
    thread.start()
    text, shown = "", None
    try:
        for piece in streamer:
            text += piece
            answer = visible_answer(text)
            if cut_at_next_turn(text)[1]:
                break
            if answer and answer != shown:  # nothing new to show for a lone space or a held-back marker
                shown = answer
                yield answer
    finally:
        # Also reached when the reader stops early (a closed browser tab): stop the thread's work soon.
        stop.cancel()
        thread.join()
    if failure:
        raise failure[0]
    answer = visible_answer(text, final=True)
    if answer != shown:  # the whole answer, unless it was the last thing yielded already
        yield answer


# ----------------------------------------------------------------------------------------------- models
def resolve_device(device: Optional[str] = None) -> str:
    """The accelerator DeepSpeed detects (cuda:N, xpu:N, npu:N, cpu, ...) unless one is named."""
    if device:
        return device
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().current_device_name()


def resolve_torch_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: fp32 on CPU; on an accelerator bf16 where supported (no fp16 overflow), else fp16."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    on_cpu = device.split(":")[0] == "cpu"
    if dtype == "auto":
        if on_cpu:
            return torch.float32
        from deepspeed.accelerator import get_accelerator
        return torch.bfloat16 if get_accelerator().is_bf16_supported() else torch.float16
    if dtype == "fp16" and on_cpu:
        raise UserError("--dtype fp16 needs a GPU (fp16 matmuls are not supported on CPU); use fp32 or bf16")
    return _TORCH_DTYPES[dtype]


def check_model_dir(path: str):
    """Fail early, with the reason, on a path that cannot be a causal LM exported by the steps."""
    if not os.path.isdir(path):
        raise UserError(f"model directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise UserError(f"{path} has no .safetensors weights (the steps export safetensors; "
                        f"re-save a .bin checkpoint with save_pretrained(..., safe_serialization=True))")


def _check_causal_lm(path: str):
    import json
    with open(os.path.join(path, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{path} is a reward model ({architectures[0]}), not a model that writes answers; "
                        f"give the actor (step 1 output or step 3's actor)")


@dataclass
class ChatModel:
    """A loaded model with what the chat needs to know about it."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    context_length: int
    chat_format: Optional[ChatFormat] = None  # None: alpaca

    @property
    def stop_token_id(self) -> Optional[int]:
        return None if self.chat_format is None else self.chat_format.stop_token_id

    def max_prompt_tokens(self, max_new_tokens: int) -> int:
        """Room left for the prompt once the answer's tokens are set aside."""
        if int(max_new_tokens) >= self.context_length:
            raise ValueError(f"max_new_tokens must be below the context length of {self.name} "
                             f"({self.context_length} tokens), got {int(max_new_tokens)}")
        return self.context_length - int(max_new_tokens)


def context_length(model, tokenizer) -> int:
    """Tokens the model can attend to: the position limit, or the tokenizer's if the config has none."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit or min(tokenizer.model_max_length, 2048))


def load_chat_model(path: str, dtype: str = "auto", device: Optional[str] = None, name: Optional[str] = None,
                    chat_template: Optional[str] = None, system_prompt: Optional[str] = None) -> ChatModel:
    """Tokenizer and causal LM from an exported directory (safetensors, no remote code), on `device`.
    chat_template / system_prompt: None takes what the model was trained with (trained_chat_format)."""
    from transformers import AutoModelForCausalLM
    check_model_dir(path)
    _check_causal_lm(path)
    device = resolve_device(device)
    torch_dtype = resolve_torch_dtype(dtype, device)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=False)
        # Straight onto the device: a 7B model is not first materialised in CPU memory.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True,
                                                     trust_remote_code=False, device_map=device)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model in {path}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no eos token; answers end with it")
    fmt = format_for_model(path, tokenizer, chat_template, system_prompt)
    model.eval()
    return ChatModel(name or path, model, tokenizer, context_length(model, tokenizer), fmt)


# ----------------------------------------------------------------------------------------------- CLI pieces
def add_generation_args(parser, max_new_tokens: int = 128):
    """The generation flags both chat front ends accept (their defaults are the UI's initial values)."""
    d = GenerationSettings(max_new_tokens=max_new_tokens)
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights precision (auto: fp32 on CPU, bf16 or fp16 on a GPU)")
    parser.add_argument("--chat_template", default=None,
                        help="alpaca, model, none or a Jinja file (default: what the model was trained with, from "
                             "its training_args.json; alpaca without one)")
    parser.add_argument("--system_prompt", default=None,
                        help="system message before the conversation (default: the one the model was trained with)")
    parser.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help="answer length limit")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    parser.add_argument("--top_p", type=float, default=d.top_p, help="nucleus sampling mass")
    parser.add_argument("--top_k", type=int, default=d.top_k, help="sample among the k best tokens (0 = off)")
    parser.add_argument("--num_beams", type=int, default=d.num_beams, help="beam search (> 1: no streaming)")
    parser.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty,
                        help="> 1 discourages repeating tokens")


def settings_from_args(args) -> GenerationSettings:
    """The generation flags as checked settings; a value out of range is a UserError naming the flag."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  num_beams=args.num_beams, repetition_penalty=args.repetition_penalty)
    try:
        return settings.validate()
    except ValueError as e:
        raise UserError(f"--{e}") from e


def check_room_for_prompt(models: Sequence[ChatModel], max_new_tokens: int):
    """--max_new_tokens must leave room for a prompt in every model's context."""
    for model in models:
        try:
            model.max_prompt_tokens(max_new_tokens)
        except ValueError as e:
            raise UserError(f"--{e}") from e
