"""Chat with a model in the terminal, with the same prompt and stop logic as the gradio chatbot.

    python -m alpaca_rlhf.inference.chat --path output/actor
    printf 'hello\\nand then?\\n' | python -m alpaca_rlhf.inference.chat --path output/actor

One line is one message; the answer is printed as it is generated. `/clear` forgets the conversation,
`/quit` (or end of input) ends the chat.
"""
import argparse
import os
import sys

if __package__ in (None, ""):
    # Started as a file without run_inference.sh: make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError  # noqa: E402
from alpaca_rlhf.inference.chat_core import (ChatModel, GenerationSettings, add_generation_args,  # noqa: E402
                                             build_chat_prompt, check_room_for_prompt, load_chat_model,
                                             settings_from_args, stream_answer)

COMMANDS = "commands: /clear forgets the conversation, /quit ends the chat"


def print_streamed(answers, out=sys.stdout) -> str:
    """Print an answer that arrives as ever longer texts, writing only what is new; returns the answer."""
    shown = ""
    for answer in answers:
        if answer.startswith(shown):
            out.write(answer[len(shown):])
        else:  # not a continuation (should not happen): start the line over rather than garble it
            out.write("\n" + answer)
        out.flush()
        shown = answer
    out.write("\n")
    out.flush()
    return shown


def answer_message(model: ChatModel, history: list, message: str, settings: GenerationSettings,
                   out=sys.stdout) -> str:
    """Build the prompt (oldest turns left out when the context is full), stream the answer, record the turn."""
    _, ids, dropped = build_chat_prompt(model.tokenizer, history, message,
                                        model.max_prompt_tokens(settings.max_new_tokens), model.chat_format)
    if dropped:
        print(f"(the {dropped} oldest turn(s) no longer fit in the context and were left out)", file=sys.stderr)
    out.write("Assistant: ")
    answer = print_streamed(stream_answer(model.model, model.tokenizer, ids, settings, model.stop_token_id), out)
    history.append((message, answer))
    return answer


def chat_loop(model: ChatModel, settings: GenerationSettings, lines, out=sys.stdout, interactive: bool = False):
    """Read messages from `lines` until /quit or the end; `interactive` shows a prompt before each one."""
    history = []
    while True:
        if interactive:
            out.write("You: ")
            out.flush()
        line = next(lines, None)
        if line is None or line.strip() == "/quit":
            break
        message = line.strip()
        if message == "/clear":
            history.clear()
            print("(conversation cleared)", file=out)
        elif message.startswith("/"):
            print(f"unknown command {message.split()[0]}; {COMMANDS}", file=out)
        elif message:
            try:
                answer_message(model, history, message, settings, out)
            except ValueError as e:  # too long a message: say so and keep chatting
                print(f"({e})", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="model directory (HF format, safetensors)")
    add_generation_args(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        model = load_chat_model(args.path, args.dtype, chat_template=args.chat_template,
                                system_prompt=args.system_prompt)
        check_room_for_prompt([model], settings.max_new_tokens)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.path}; {COMMANDS}")
    try:
        chat_loop(model, settings, iter(sys.stdin), sys.stdout, interactive)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
