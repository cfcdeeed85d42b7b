"""The one conversation format used everywhere: training data, rollouts, evaluation and the chatbot.

It is Anthropic HH / Dahoas rm-static's format, which is what most preference data already uses:

    "\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant:"   <- prompt (ends at the marker)
    " a2"                                                                <- answer (starts with a space)

Sources in another shape (MultiTurnAlpaca's single-line "Human: q1 Assistant: a1 Human: q2 Assistant: ",
DPO message lists) are converted into it by `parse_conversation` + `build_prompt`, so a model sees one format
in step 1, 2, 3 and in the chatbot.
"""
import re
from typing import List, Sequence, Tuple

HUMAN = "Human:"
ASSISTANT = "Assistant:"
TURN_SEPARATOR = "\n\n"

# A role marker at the start of the text or after whitespace. Content between markers is a turn.
_MARKER = re.compile(r"(?:^|(?<=\s))(Human|Assistant):")
_ROLE_ALIASES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                 "system": "system"}


def format_answer(text: str) -> str:
    """An answer as it follows the prompt: one leading space, no trailing whitespace."""
    return " " + text.strip()


def build_prompt(history: Sequence[Tuple[str, str]], message: str) -> str:
    """Prompt for `message` after earlier (human, assistant) turns; ends with the Assistant marker."""
    parts = []
    for human, assistant in history:
        parts.append(f"{TURN_SEPARATOR}{HUMAN} {human.strip()}{TURN_SEPARATOR}{ASSISTANT}{format_answer(assistant)}")
    parts.append(f"{TURN_SEPARATOR}{HUMAN} {message.strip()}{TURN_SEPARATOR}{ASSISTANT}")
    return "".join(parts)


def parse_conversation(text: str) -> List[dict]:
    """Split a Human/Assistant transcript into messages [{"role": "user"|"assistant", "content": str}].

    Accepts both the canonical newline format and the single-line MultiTurnAlpaca one. Text before the first
    marker, if any, is treated as a user turn; an empty trailing assistant turn (the prompt's open marker) is dropped.
    """
    pieces = _MARKER.split(text)
    # pieces = [before, role1, content1, role2, content2, ...]
    messages = []
    if pieces[0].strip():
        messages.append({"role": "user", "content": pieces[0].strip()})
    for role, content in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def normalize_role(role: str) -> str:
    """Map the role names found in chat datasets onto "system"/"user"/"assistant"; raise ValueError otherwise."""
    key = str(role).strip().lower()
    if key not in _ROLE_ALIASES:
        raise ValueError(f"unknown message role {role!r} (expected one of {sorted(_ROLE_ALIASES)})")
    return _ROLE_ALIASES[key]


def messages_to_prompt(messages: Sequence[dict]) -> str:
    """Canonical prompt from messages that end with a user turn (consecutive same-role turns are joined; system
    messages have no place in this text and are left out: the chat formats render them, chat_template.py)."""
    merged: List[List[str]] = []
    for m in messages:
        role = normalize_role(m["role"])
        if role == "system":
            continue
        if merged and merged[-1][0] == role:
            merged[-1][1] += "\n" + str(m["content"]).strip()
        else:
            merged.append([role, str(m["content"]).strip()])
    if not merged or merged[-1][0] != "user":
        raise ValueError("a conversation prompt must end with a user (Human) turn")
    if merged[0][0] != "user":
        merged.insert(0, ["user", ""])
    history = [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]
    return build_prompt(history, merged[-1][1])


def split_turns(prompt: str) -> Tuple[List[Tuple[str, str]], str]:
    """Inverse of build_prompt: (history of (human, assistant) pairs, last human message)."""
    messages = parse_conversation(prompt)
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("prompt does not end with a Human turn")
    body, last = messages[:-1], messages[-1]["content"]
    history, pending = [], None
    for m in body:
        if m["role"] == "user":
            pending = m["content"] if pending is None else pending + "\n" + m["content"]
        else:
            history.append((pending or "", m["content"]))
            pending = None
    if pending is not None:
        last = pending + "\n" + last
    return history, last
