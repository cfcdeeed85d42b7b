"""A gradio chatbot for models exported by the steps: multi-turn, streamed, one or several models side by side.

    sh run_inference.sh 0 alpaca_rlhf/inference/llama_chatbot_gradio.py --path output/actor
    python -m alpaca_rlhf.inference.llama_chatbot_gradio --path output/actor --path output/final/actor --compare

Every --path gets its own chat column and its own history; a message goes to all of them (SFT vs RLHF). The
prompt is built exactly as in training (chat_core). The chat is also an API, "/chat" (and "/clear"), that
gradio_client can drive: inputs (message, history per model..., generation settings...), outputs (the
textbox's new value, history per model...). Notices (empty or too-long message, failed generation) are
shown in the chat as assistant messages with a metadata title, and are never fed back to the model.
"""
import argparse
import os
import sys
import traceback
from typing import List, Optional, Sequence

if __package__ in (None, ""):
    # Started as a file without run_inference.sh: make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a private model server

import alpaca_rlhf  # noqa: F401,E402  (before torch: MKL's kernel choice, alpaca_rlhf/cpu_blas.py)
import gradio as gr  # noqa: E402

from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError  # noqa: E402
from alpaca_rlhf.inference.chat_core import (ChatModel, GenerationSettings, add_generation_args,  # noqa: E402
                                             build_chat_prompt, check_model_dir, check_room_for_prompt,
                                             load_chat_model, settings_from_args, stream_answer)

NOTICE_TITLE = "Note"
EMPTY_MESSAGE = "Type a message first."
# Requests that may wait for a free generator. Each waits for every answer ahead of it, so a longer line only
# means longer waits (and a stuck client's requests piling up): past it, refusing at once is the clearer answer.
DEFAULT_MAX_QUEUE = 16


# ----------------------------------------------------------------------------------------------- history
def notice(text: str) -> dict:
    """A message for the user, not part of the conversation: the metadata title marks it."""
    return {"role": "assistant", "content": text, "metadata": {"title": NOTICE_TITLE}}


def is_notice(message: dict) -> bool:
    return bool((message.get("metadata") or {}).get("title"))


def message_text(content) -> str:
    """Text of a chat message's content: a string, or (as gradio hands it over) a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    return "\n".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def to_turns(messages: Sequence[dict]) -> List[tuple]:
    """(human, assistant) pairs from a chatbot's messages. Notices are skipped, and a user message whose
    answer failed (followed by a notice, or by another user message) is left out of the history."""
    turns, pending = [], None
    for m in messages or []:
        if is_notice(m):
            pending = None
        elif m.get("role") == "user":
            pending = message_text(m.get("content"))
        elif m.get("role") == "assistant" and pending is not None:
            turns.append((pending, message_text(m.get("content"))))
            pending = None
    return turns


def _plain(messages: Sequence[dict]) -> List[dict]:
    """Messages as plain dicts with text content, ready to be extended and sent back."""
    out = []
    for m in messages or []:
        msg = {"role": m.get("role", "assistant"), "content": message_text(m.get("content"))}
        if is_notice(m):
            msg["metadata"] = {"title": m["metadata"]["title"]}
        out.append(msg)
    return out


def _add_notice(messages: List[dict], text: str) -> List[dict]:
    # Pressing Enter on an empty box five times should not leave five identical notes.
    if not (messages and is_notice(messages[-1]) and messages[-1]["content"] == text):
        messages.append(notice(text))
    return messages


# ----------------------------------------------------------------------------------------------- chat
def make_chat_fn(models: Sequence[ChatModel]):
    """chat(message, *histories, *settings) -> yields (textbox value, *histories) while answers stream."""
    n = len(models)

    def chat(message, *values):
        histories = [_plain(h) for h in values[:n]]
        message = (message or "").strip()
        try:
            if not message:
                raise ValueError(EMPTY_MESSAGE)
            settings = GenerationSettings(*values[n:]).validate()
            prompts = [_prompt_for(m, h, message, settings) for m, h in zip(models, histories)]
        except ValueError as e:
            # The message stays in the box so the user can shorten it instead of typing it again.
            yield (message, *[_add_notice(h, str(e)) for h in histories])
            return
        for h in histories:
            h += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield ("", *histories)
        for model, history, prompt_ids in zip(models, histories, prompts):
            yield from _stream_into(model, history, prompt_ids, settings, histories)

    return chat


# A client may send any history; only its latest turns are read (a context holds far fewer anyway), so one request
# cannot keep a worker busy rendering a history of millions of turns.
MAX_HISTORY_TURNS = 256


def _prompt_for(model: ChatModel, history: List[dict], message: str, settings: GenerationSettings):
    turns = to_turns(history)
    if len(turns) > MAX_HISTORY_TURNS:
        gr.Info(f"{model.name}: only the latest {MAX_HISTORY_TURNS} of {len(turns)} turns are read")
        turns = turns[-MAX_HISTORY_TURNS:]
    _, ids, dropped = build_chat_prompt(model.tokenizer, turns, message,
                                        model.max_prompt_tokens(settings.max_new_tokens), model.chat_format)
    if dropped:
        gr.Info(f"{model.name}: the {dropped} oldest turn(s) no longer fit in the context and were left out")
    return ids


def _stream_into(model: ChatModel, history: List[dict], prompt_ids, settings, histories):
    """Fill the last (assistant) message of `history` as the answer streams in; a failure becomes a notice."""
    try:
        for answer in stream_answer(model.model, model.tokenizer, prompt_ids, settings, model.stop_token_id):
            history[-1]["content"] = answer
            yield ("", *histories)
    except Exception as e:  # a chat server keeps serving: report it in the chat and in the log
        traceback.print_exc()
        history[-1] = notice(f"generation failed: {type(e).__name__}: {e}")
        yield ("", *histories)


def clear_fn(n: int):
    def clear():
        return tuple([] for _ in range(n)) if n > 1 else []
    return clear


# ----------------------------------------------------------------------------------------------- UI
def _controls(defaults: GenerationSettings, max_tokens: int) -> list:
    """Generation controls, in GenerationSettings' field order (chat() builds the settings positionally)."""
    return [
        gr.Slider(1, max_tokens, value=min(defaults.max_new_tokens, max_tokens), step=1, label="max new tokens"),
        gr.Checkbox(value=defaults.do_sample, label="sampling (off: greedy or beam search)"),
        gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="temperature"),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top_p"),
        gr.Slider(0, 200, value=defaults.top_k, step=1, label="top_k (0 = off)"),
        gr.Slider(1, 8, value=defaults.num_beams, step=1, label="beams (> 1: answer shown when complete)"),
        gr.Slider(0.5, 2.0, value=defaults.repetition_penalty, step=0.05, label="repetition penalty"),
    ]


def build_demo(models: Sequence[ChatModel], defaults: Optional[GenerationSettings] = None,
               concurrency_limit: int = 1, max_queue: int = DEFAULT_MAX_QUEUE) -> gr.Blocks:
    """The app, its queue configured: at most `concurrency_limit` answers generated at once and `max_queue`
    requests waiting; a request beyond that is refused at once (gradio's "Queue is full") instead of waiting
    without end behind a growing line."""
    defaults = defaults or GenerationSettings()
    max_tokens = max(1, min(min(m.context_length for m in models) - 1, 4096))
    with gr.Blocks(title="alpaca_rlhf chat") as demo:
        gr.Markdown("### alpaca_rlhf chat" + (" — the same message goes to every model" if len(models) > 1 else ""))
        with gr.Row():
            chatbots = [gr.Chatbot(label=m.name, elem_id=f"chatbot-{i}", height=460, feedback_options=None)
                        for i, m in enumerate(models)]
        with gr.Row():
            message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                                 elem_id="message", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear = gr.Button("Clear history", scale=1, elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            controls = _controls(defaults, max_tokens)
        # One endpoint for Enter and the button, so API clients see a single stable name.
        chat_event = gr.on(triggers=[message.submit, send.click], fn=make_chat_fn(models),
                           inputs=[message, *chatbots, *controls], outputs=[message, *chatbots],
                           api_name="chat", concurrency_limit=concurrency_limit, concurrency_id="generate")
        clear.click(fn=clear_fn(len(models)), outputs=chatbots, api_name="clear", cancels=[chat_event],
                    queue=False)
    # Here rather than in main, so an app built by a test has the same bound; a later demo.queue() would replace it.
    return demo.queue(max_size=max_queue, default_concurrency_limit=concurrency_limit)


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", action="append", required=True,
                        help="model directory (HF format, safetensors); repeat to compare models side by side")
    parser.add_argument("--compare", action="store_true",
                        help="side-by-side comparison; needs at least two --path (several --path imply it)")
    parser.add_argument("--server_name", default="127.0.0.1",
                        help="address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--server_port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off)")
    parser.add_argument("--concurrency_limit", type=int, default=1,
                        help="answers generated at the same time; other users wait in the queue")
    parser.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="how many requests may wait in gradio's queue; beyond that a new request is refused "
                             "with a 'Queue is full' message instead of waiting without end")
    add_generation_args(parser)
    return parser.parse_args(argv)


def _check_args(args):
    if args.compare and len(args.path) < 2:
        raise UserError("--compare needs at least two --path (e.g. the SFT and the RLHF actor)")
    if args.concurrency_limit < 1:
        raise UserError(f"--concurrency_limit must be at least 1, got {args.concurrency_limit}")
    if args.max_queue < 1:
        raise UserError(f"--max_queue must be at least 1, got {args.max_queue}")
    for path in args.path:  # every path before loading any: a typo in the second one fails in a second
        check_model_dir(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _check_args(args)
        settings = settings_from_args(args)
        models = [load_chat_model(path, args.dtype, name=path, chat_template=args.chat_template,
                                  system_prompt=args.system_prompt) for path in args.path]
        check_room_for_prompt(models, settings.max_new_tokens)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    demo = build_demo(models, settings, args.concurrency_limit, args.max_queue)
    demo.launch(server_name=args.server_name, server_port=args.server_port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
