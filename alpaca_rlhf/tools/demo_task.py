"""A tiny closed world for demonstrating alignment (SFT -> reward model -> PPO) on a CPU in minutes.

Why a closed world: a 1-6M parameter LLaMA cannot learn real language, but it can learn a few hundred words,
three kinds of short questions with one fixed answer template each, and a small fact table. Because the world
is closed, every answer can be graded by `grade` against the truth, independently of any learned reward model,
so the demo can show that PPO really improves answers (and not just the reward model's opinion of them).

The data mirrors how real RLHF data differs between stages: the SFT demonstrations are uneven (some wrong values,
rude or rambling answers) and carry a systematic habit (a closing pleasantry after most answers), while the
comparisons always prefer the plain, correct answer. PPO against a reward model trained on the comparisons has
something to fix that a short run can fix: the habit the SFT model learned.

Task kinds (the human side; several phrasings each, the assistant side has one template per kind):
  math   "What is 3 plus 4?"              -> "3 plus 4 is 7."              (numbers 0-10, results 0-10)
         follow-up "And plus 2 more?"     -> "7 plus 2 is 9."              (continues from the last result)
  word   "Spell cat backwards."           -> "The word cat backwards is tac."
         "What is the first letter of dog?" / last letter / "How many letters are in horse?" / capital letters
         follow-ups "And backwards?" (same word, new operation), "What about dog?" (same operation, new word)
  fact   "What sound does a cow make?"    -> "A cow says moo."             (colors, sounds and homes)
         follow-ups "And where does it live?" (same subject), "What about a pig?" (same question, new subject)

Public API:
  grade(prompt, answer) -> Grade(score, correct, reasons)   score_answer(prompt, answer) -> float
  reference_answer(prompt) -> str                          corpus_text(seed) -> Iterator[str]
  build_dataset(seed) -> DemoData                          (used by alpaca_rlhf.tools.make_demo_data)

Prompts are canonical (see prompt_format); everything here is pure Python and deterministic from a seed.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

from alpaca_rlhf.deepspeed_chat.training.utils.data.prompt_format import build_prompt, format_answer, split_turns

# --------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------

MAX_NUMBER = 10  # operands and results stay in 0..10: few enough sums for a 6M-parameter reward model to learn

# Animals: (sound, color, home). Homes all take the article "a" so the template stays fixed.
ANIMALS: Dict[str, Tuple[str, str, str]] = {
    "cow": ("moo", "brown", "barn"),
    "pig": ("oink", "pink", "sty"),
    "dog": ("woof", "tan", "kennel"),
    "cat": ("meow", "black", "house"),
    "sheep": ("baa", "white", "field"),
    "duck": ("quack", "yellow", "pond"),
    "horse": ("neigh", "brown", "stable"),
    "hen": ("cluck", "red", "coop"),
    "owl": ("hoot", "gray", "tree"),
    "bee": ("buzz", "yellow", "hive"),
    "snake": ("hiss", "green", "log"),
    "lion": ("roar", "tan", "den"),
    "frog": ("croak", "green", "pond"),
    "mouse": ("squeak", "gray", "hole"),
    "bird": ("tweet", "blue", "nest"),
    "wolf": ("howl", "gray", "forest"),
    "crow": ("caw", "black", "tree"),
    "goat": ("bleat", "white", "field"),
    "bear": ("growl", "brown", "cave"),
    "turkey": ("gobble", "brown", "farm"),
    "dove": ("coo", "white", "tree"),
}
# Things only have a color (asking what sound an apple makes is outside the world).
THINGS: Dict[str, str] = {
    "apple": "red",
    "banana": "yellow",
    "lemon": "yellow",
    "carrot": "orange",
    "pumpkin": "orange",
    "grape": "purple",
    "plum": "purple",
    "cherry": "red",
    "tomato": "red",
    "leaf": "green",
    "lime": "green",
    "cloud": "white",
    "coal": "black",
    "sky": "blue",
}
COLORS: Dict[str, str] = {**{n: v[1] for n, v in ANIMALS.items()}, **THINGS}
SOUNDS: Dict[str, str] = {n: v[0] for n, v in ANIMALS.items()}
HOMES: Dict[str, str] = {n: v[2] for n, v in ANIMALS.items()}
FACTS: Dict[str, Dict[str, str]] = {"sound": SOUNDS, "color": COLORS, "home": HOMES}

# Short words for the word tasks: no palindromes (their reversal would equal the question's word).
WORDS: Tuple[str, ...] = (
    "cat", "dog", "cow", "pig", "hen", "owl", "bee", "fox", "ant", "bat", "sun", "hat", "cup", "box", "pen",
    "map", "bus", "car", "bed", "frog", "duck", "lion", "bear", "goat", "crow", "bird", "fish", "tree", "book",
    "milk", "ship", "rain", "ball", "door", "king", "cake", "star", "sheep", "horse", "mouse", "snake", "apple",
    "lemon", "plum", "leaf", "grape",
)
WORD_OPS = ("reverse", "first", "last", "count", "upper")

# --------------------------------------------------------------------------------------------------------------
# Phrasings. Slots: {a} {b} {k} numbers, {w} a word, {n} a noun with its article ("a cow", "an owl").
# The same tables drive the generator and the parser, so every generated prompt is gradable.
# --------------------------------------------------------------------------------------------------------------

MATH_NEW = {
    "plus": ("What is {a} plus {b}?", "Please add {a} and {b}.", "Can you tell me what {a} plus {b} is?"),
    "minus": ("What is {a} minus {b}?", "Please take {b} away from {a}.", "Can you tell me what {a} minus {b} is?"),
}
MATH_FOLLOW = {
    "plus": ("And plus {k} more?", "Now add {k} to that."),
    "minus": ("And minus {k}?", "Now take {k} away from that."),
}
WORD_NEW = {
    "reverse": ("Spell {w} backwards.", "What is {w} spelled backwards?"),
    "first": ("What is the first letter of {w}?", "Which letter does {w} start with?"),
    "last": ("What is the last letter of {w}?", "Which letter does {w} end with?"),
    "count": ("How many letters are in {w}?", "Count the letters in {w}."),
    "upper": ("Write {w} in capital letters.", "What is {w} in capital letters?"),
}
WORD_FOLLOW_OP = {  # same word, another operation
    "reverse": ("And backwards?",),
    "first": ("And the first letter?",),
    "last": ("And the last letter?",),
    "count": ("And how many letters?",),
    "upper": ("And in capital letters?",),
}
WORD_FOLLOW_WORD = ("What about {w}?", "And {w}?")  # same operation, another word
FACT_NEW = {
    "sound": ("What sound does {n} make?", "What does {n} say?"),
    "color": ("What color is {n}?", "Tell me the color of {n}."),
    "home": ("Where does {n} live?", "Where is the home of {n}?"),
}
FACT_FOLLOW_ATTR = {  # same subject, another question
    "sound": ("And what sound does it make?",),
    "color": ("And what color is it?",),
    "home": ("And where does it live?",),
}
FACT_FOLLOW_SUBJECT = ("What about {n}?", "And {n}?")  # same question, another subject

# Good answers: one template per kind; the key value always comes last, right before the period.
MATH_ANSWER = "{x} {op} {y} is {v}."
WORD_ANSWER = {
    "reverse": "The word {w} backwards is {v}.",
    "first": "The first letter of {w} is {v}.",
    "last": "The last letter of {w} is {v}.",
    "count": "The number of letters in {w} is {v}.",
    "upper": "In capital letters, {w} is {v}.",
}
FACT_ANSWER = {"sound": "{N} says {v}.", "color": "{N} is {v}.", "home": "{N} lives in a {v}."}

# Imperfect answers. None of these phrases contains a digit, a lone lowercase letter or a world value, so they
# never change which value an answer states (the scorer looks for those).
RUDE_WORDS = frozenset({"ugh", "stupid", "dumb", "whatever", "obviously", "duh", "idiot", "boring", "lazy", "annoying"})
RUDE_WRAPS = (
    "Ugh, {low}, obviously.",
    "Whatever. {ref}",
    "{ref} Stop asking dumb questions.",
    "Duh, {low}.",
    "{ref} That was boring.",
)
RUDE_REFUSALS = ("Stupid question, figure it out yourself.", "Ugh, ask somebody else.", "Whatever, I am too lazy.")
FILLERS = (
    "I hope this helps you.",
    "Let me know if you need more help.",
    "Learning new things every day is fun.",
    "Thank you for asking me this question.",
    "Have fun and keep asking.",
    "This is one of my favorite questions.",
    "There is so much more to say about it.",
)
CLOSER = FILLERS[0]  # the demonstrators' habitual last sentence (see SFT_CLOSER_SHARE)
SHORT_ANSWERS = ("No.", "Maybe.", "Not sure.", "I forget.", "Who knows.", "Ask later.", "Okay.", "Yes.", "Hmm")

# --------------------------------------------------------------------------------------------------------------
# Tokens and parsing
# --------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_WORD_TOKEN = re.compile(r"[A-Za-z]+|\d+")
_SLOT = re.compile(r"\{(\w+)\}")


def _tokens(text: str) -> List[str]:
    """Words, numbers and punctuation marks, in order."""
    return _TOKEN.findall(text)


def _words(text: str) -> List[str]:
    """Words and numbers only (no punctuation)."""
    return _WORD_TOKEN.findall(text)


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _with_article(noun: str) -> str:
    return f"{_article(noun)} {noun}"


def _template_words() -> FrozenSet[str]:
    """Every fixed word the world uses around its values (lowercase): questions, answers, fillers, rude and short
    answers. A word outside this set in an answer to a spelling task is a candidate for the spelled word."""
    texts: List[str] = [MATH_ANSWER, *WORD_ANSWER.values(), *FACT_ANSWER.values(), *RUDE_WRAPS, *RUDE_REFUSALS,
                        *FILLERS, *SHORT_ANSWERS, *WORD_FOLLOW_WORD, *FACT_FOLLOW_SUBJECT, "plus minus a an"]
    for table in (MATH_NEW, MATH_FOLLOW, WORD_NEW, WORD_FOLLOW_OP, FACT_NEW, FACT_FOLLOW_ATTR):
        for phrasings in table.values():
            texts.extend(phrasings)
    return frozenset(w.lower() for t in texts for w in _words(_SLOT.sub(" ", t))) | RUDE_WORDS


TEMPLATE_WORDS = _template_words()


@dataclass(frozen=True)
class Task:
    """One resolved question: what the right answer is and how to find the stated value in an answer."""

    kind: str  # "math", "word:<op>" or "fact:<attr>"
    reference: str  # the correct, polite answer text
    truth: str  # the key value (last token of the reference before its period)
    value_type: str  # "number", "letter", "word", "sound", "color" or "home"
    echo: FrozenSet[str] = frozenset()  # values the question itself names (lowercase), e.g. the operands
    case_sensitive: bool = False  # only capital-letter answers care about case


@dataclass
class _Context:
    """What a follow-up can refer to: the last topic and its values."""

    topic: str = ""  # "math", "word" or "fact"
    result: int = 0
    op: str = ""
    word: str = ""
    noun: str = ""
    attr: str = ""


def _compile(template: str) -> re.Pattern:
    """A phrasing as a case-insensitive regex: slots become groups, spacing is loose, end punctuation optional."""
    slot_patterns = {"a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)", "k": r"(?P<k>\d+)", "w": r"(?P<w>[A-Za-z]+)",
                     "n": r"(?:an?\s+)?(?P<n>[A-Za-z]+)"}
    body = template.rstrip("?.!")
    parts = []
    pos = 0
    for m in _SLOT.finditer(body):
        parts.append(re.escape(body[pos:m.start()]))
        parts.append(slot_patterns[m.group(1)])
        pos = m.end()
    parts.append(re.escape(body[pos:]))
    pattern = "".join(parts).replace(r"\ ", r"\s+").replace(" ", r"\s+")
    return re.compile(r"\s*" + pattern + r"\s*[?.!]*\s*", re.IGNORECASE)


def _patterns(table: Dict[str, Sequence[str]]) -> List[Tuple[str, re.Pattern]]:
    return [(key, _compile(p)) for key, phrasings in table.items() for p in phrasings]


_MATH_NEW_RE = _patterns(MATH_NEW)
_MATH_FOLLOW_RE = _patterns(MATH_FOLLOW)
_WORD_NEW_RE = _patterns(WORD_NEW)
_WORD_FOLLOW_OP_RE = _patterns(WORD_FOLLOW_OP)
_WORD_FOLLOW_WORD_RE = [("", _compile(p)) for p in WORD_FOLLOW_WORD]
_FACT_NEW_RE = _patterns(FACT_NEW)
_FACT_FOLLOW_ATTR_RE = _patterns(FACT_FOLLOW_ATTR)
_FACT_FOLLOW_SUBJECT_RE = [("", _compile(p)) for p in FACT_FOLLOW_SUBJECT]


def _match(patterns: List[Tuple[str, re.Pattern]], text: str) -> Optional[Tuple[str, Dict[str, str]]]:
    for key, pattern in patterns:
        m = pattern.fullmatch(text)
        if m:
            return key, m.groupdict()
    return None


def _math_task(x: int, op: str, y: int, ctx: _Context) -> Task:
    value = x + y if op == "plus" else x - y
    if not 0 <= value <= 10 * MAX_NUMBER or max(x, y) > 10 * MAX_NUMBER:
        raise ValueError(f"{x} {op} {y} is outside the demo world (whole numbers 0-{10 * MAX_NUMBER})")
    ctx.topic, ctx.result, ctx.op = "math", value, op
    return Task("math", MATH_ANSWER.format(x=x, op=op, y=y, v=value), str(value), "number",
                frozenset({str(x), str(y)}))


def _word_task(op: str, word: str, ctx: _Context) -> Task:
    word = word.lower()
    if word not in WORDS:
        raise ValueError(f"unknown demo word {word!r}")
    value = {"reverse": word[::-1], "first": word[0], "last": word[-1], "count": str(len(word)),
             "upper": word.upper()}[op]
    value_type = {"first": "letter", "last": "letter", "count": "number"}.get(op, "word")
    echo = frozenset({word}) if value_type == "word" else frozenset()
    ctx.topic, ctx.op, ctx.word = "word", op, word
    return Task(f"word:{op}", WORD_ANSWER[op].format(w=word, v=value), value, value_type, echo, op == "upper")


def _fact_task(attr: str, noun: str, ctx: _Context) -> Task:
    noun = noun.lower()
    table = FACTS[attr]
    if noun not in table:
        raise ValueError(f"the demo world has no {attr} for {noun!r}")
    phrase = _with_article(noun)
    reference = FACT_ANSWER[attr].format(N=phrase[0].upper() + phrase[1:], v=table[noun])
    ctx.topic, ctx.noun, ctx.attr = "fact", noun, attr
    return Task(f"fact:{attr}", reference, table[noun], attr)


def _parse_question(text: str, ctx: _Context) -> Task:
    """Resolve one human turn given the context left by the earlier turns; ValueError if it is not a demo question.

    Follow-ups are tried first (they only apply on their own topic), so "And dog?" means the same operation on
    "dog" after a word question, and is not a question at all without one."""
    text = " ".join(text.split())
    if ctx.topic == "math" and (m := _match(_MATH_FOLLOW_RE, text)):
        return _math_task(ctx.result, m[0], int(m[1]["k"]), ctx)
    if ctx.topic == "word":
        if m := _match(_WORD_FOLLOW_OP_RE, text):
            return _word_task(m[0], ctx.word, ctx)
        if m := _match(_WORD_FOLLOW_WORD_RE, text):
            return _word_task(ctx.op, m[1]["w"], ctx)
    if ctx.topic == "fact":
        if m := _match(_FACT_FOLLOW_ATTR_RE, text):
            return _fact_task(m[0], ctx.noun, ctx)
        if m := _match(_FACT_FOLLOW_SUBJECT_RE, text):
            return _fact_task(ctx.attr, m[1]["n"], ctx)
    if m := _match(_MATH_NEW_RE, text):
        return _math_task(int(m[1]["a"]), m[0], int(m[1]["b"]), ctx)
    if m := _match(_WORD_NEW_RE, text):
        return _word_task(m[0], m[1]["w"], ctx)
    if m := _match(_FACT_NEW_RE, text):
        return _fact_task(m[0], m[1]["n"], ctx)
    raise ValueError(f"not a demo question: {text!r}")


def _resolve_questions(questions: Sequence[str]) -> List[Task]:
    """Tasks for a sequence of human turns; the truth of each follows from the questions alone."""
    ctx = _Context()
    return [_parse_question(q, ctx) for q in questions]


def parse_prompt(prompt: str) -> Task:
    """The task behind the last turn of a canonical prompt (earlier turns give the context)."""
    history, last = split_turns(prompt)
    return _resolve_questions([h for h, _ in history] + [last])[-1]


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grade:
    score: float  # in [0, 1]
    correct: bool  # the answer states the right key value (and no other)
    reasons: Tuple[str, ...]  # what cost points; empty for a perfect answer


# Points out of 10 (integers so a perfect answer sums to exactly 1.0).
POINTS_CORRECT = 6
POINTS_POLITE = 1
POINTS_TEMPLATE = 1
POINTS_PERIOD = 1
POINTS_LENGTH = 1


def _candidates(task: Task, text: str) -> List[str]:
    """Tokens of `text` that could be the answer's value, in order."""
    words = _words(text)
    if task.value_type == "number":
        return [w for w in words if w.isdigit()]
    if task.value_type == "letter":
        # Lone letters; "I" and "A" are more likely a pronoun or an article than an answer.
        return [w for w in words if len(w) == 1 and w.isalpha() and w not in ("I", "A")]
    if task.value_type == "word":
        return [w for w in words if w.isalpha() and w.lower() not in TEMPLATE_WORDS]
    values = set(FACTS[task.value_type].values())
    return [w for w in words if w.lower() in values]


def _same(task: Task, a: str, b: str) -> bool:
    return a == b if task.case_sensitive else a.lower() == b.lower()


def _sentences(text: str) -> List[str]:
    return re.split(r"(?<=[.!?])\s+", text)


def _stated_value(task: Task, answer: str) -> Optional[str]:
    """The value the answer gives, or None.

    Only the first sentence that holds any value counts (so "Whatever. 3 plus 4 is 7." states 7). Where it
    follows the template, the value is what comes after the template's words. Otherwise it is the last value
    that the question does not already name (so "4 plus 3 is 7" states 7), falling back to the last value at
    all (so "It is 5." answers "5 plus 0"). An answer that stops before the value ("3 plus 4 is") states nothing."""
    ref_tokens = [t.lower() for t in _tokens(task.reference)][:-1]  # without the final period
    ans_tokens = [t.lower() for t in _tokens(answer)]
    if len(ans_tokens) < len(ref_tokens) and ans_tokens == ref_tokens[: len(ans_tokens)]:
        return None  # truncated copy of the reference
    first = next((s for s in _sentences(answer) if _candidates(task, s)), "")
    prefix = ref_tokens[:-1]
    first_tokens = _tokens(first)
    if [t.lower() for t in first_tokens[: len(prefix)]] == prefix:
        rest = _candidates(task, " ".join(first_tokens[len(prefix):]))
        return rest[0] if rest else None
    values = _candidates(task, first)
    fresh = [v for v in values if v.lower() not in task.echo]
    if fresh:
        return fresh[-1]
    return values[-1] if values else None


def _is_correct(task: Task, answer: str) -> bool:
    """Right value stated, and no other value anywhere (a list of guesses is not an answer)."""
    value = _stated_value(task, answer)
    if value is None or not _same(task, value, task.truth):
        return False
    return all(v.lower() in task.echo or _same(task, v, task.truth) for v in _candidates(task, answer))


def _follows_template(task: Task, answer: str) -> bool:
    """Same words as the reference with any single value in the slot; the final period is checked separately."""
    ref = [t.lower() for t in _tokens(task.reference)][:-1]
    ans = [t.lower() for t in _tokens(answer)]
    if ans and ans[-1] == ".":
        ans = ans[:-1]
    return len(ans) == len(ref) and ans[:-1] == ref[:-1] and ans[-1].isalnum()


def _has_repetition(answer: str) -> bool:
    """A word said twice in a row, or any three words said twice."""
    words = [w.lower() for w in _words(answer)]
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


def grade(prompt: str, answer: str) -> Grade:
    """Grade `answer` (any text) to a demo prompt; ValueError if the prompt is not a demo prompt.

    6/10 for the right key value, 1/10 for no rude words, 1/10 for the answer template, 1/10 for ending with a
    period, 1/10 for a sensible length without repetition (between half and twice the reference's words)."""
    task = parse_prompt(prompt)
    answer = answer.strip()
    if not answer:
        return Grade(0.0, False, ("empty",))
    points, reasons = 0, []
    correct = _is_correct(task, answer)
    if correct:
        points += POINTS_CORRECT
    else:
        reasons.append("wrong value")
    if RUDE_WORDS.isdisjoint(w.lower() for w in _words(answer)):
        points += POINTS_POLITE
    else:
        reasons.append("rude")
    if _follows_template(task, answer):
        points += POINTS_TEMPLATE
    else:
        reasons.append("off template")
    if answer.endswith("."):
        points += POINTS_PERIOD
    else:
        reasons.append("no final period")
    n_words, n_ref = len(_words(answer)), len(_words(task.reference))
    if _has_repetition(answer):
        reasons.append("repetition")
    elif n_words > 2 * n_ref:
        reasons.append("too long")
    elif 2 * n_words < n_ref:
        reasons.append("too short")
    else:
        points += POINTS_LENGTH
    return Grade(points / 10, correct, tuple(reasons))


def score_answer(prompt: str, answer: str) -> float:
    return grade(prompt, answer).score


def reward(prompts: Sequence[str], answers: Sequence[str], **columns) -> List[float]:
    """The demo's grader as a step-3 reward function (`--reward_function alpaca_rlhf.tools.demo_task:reward`):
    one score in [0, 1] per answer; a prompt from outside the demo world scores 0."""
    scores = []
    for prompt, answer in zip(prompts, answers):
        try:
            scores.append(score_answer(prompt, answer))
        except ValueError:
            scores.append(0.0)
    return scores


def reference_answer(prompt: str) -> str:
    """The correct, polite answer text for a demo prompt (no leading space)."""
    return parse_prompt(prompt).reference


# --------------------------------------------------------------------------------------------------------------
# Conversation generator
# --------------------------------------------------------------------------------------------------------------

TOPIC_WEIGHTS = (("math", 35), ("word", 35), ("fact", 30))
MULTI_TURN_SHARE = 0.25  # of conversations; a third of those have three turns


def _new_math(rng: random.Random) -> str:
    op = rng.choice(("plus", "minus"))
    if op == "plus":
        a = rng.randint(0, MAX_NUMBER)
        b = rng.randint(0, MAX_NUMBER - a)
    else:
        a = rng.randint(0, MAX_NUMBER)
        b = rng.randint(0, a)
    if rng.random() < 0.5:  # the phrasings are symmetric for plus; swap so both operand orders occur
        a, b = (b, a) if op == "plus" else (a, b)
    return rng.choice(MATH_NEW[op]).format(a=a, b=b)


def _follow_math(rng: random.Random, ctx: _Context) -> str:
    r = ctx.result
    ops = [op for op, ok in (("plus", r < MAX_NUMBER), ("minus", r > 0)) if ok]
    op = rng.choice(ops)
    k = rng.randint(1, min(9, MAX_NUMBER - r if op == "plus" else r))
    return rng.choice(MATH_FOLLOW[op]).format(k=k)


def _new_word(rng: random.Random) -> str:
    return rng.choice(WORD_NEW[rng.choice(WORD_OPS)]).format(w=rng.choice(WORDS))


def _follow_word(rng: random.Random, ctx: _Context) -> str:
    if rng.random() < 0.5:
        return rng.choice(WORD_FOLLOW_OP[rng.choice([op for op in WORD_OPS if op != ctx.op])])
    word = rng.choice([w for w in WORDS if w != ctx.word])
    return rng.choice(WORD_FOLLOW_WORD).format(w=word)


def _new_fact(rng: random.Random) -> str:
    attr = rng.choice(("sound", "color", "home"))
    noun = rng.choice(sorted(FACTS[attr]))
    return rng.choice(FACT_NEW[attr]).format(n=_with_article(noun))


def _follow_fact(rng: random.Random, ctx: _Context) -> str:
    other_attrs = [a for a in ("sound", "color", "home") if a != ctx.attr and ctx.noun in FACTS[a]]
    if other_attrs and rng.random() < 0.5:
        return rng.choice(FACT_FOLLOW_ATTR[rng.choice(other_attrs)])
    noun = rng.choice([n for n in sorted(FACTS[ctx.attr]) if n != ctx.noun])
    return rng.choice(FACT_FOLLOW_SUBJECT).format(n=_with_article(noun))


_NEW = {"math": _new_math, "word": _new_word, "fact": _new_fact}
_FOLLOW: Dict[str, Callable[[random.Random, _Context], str]] = {
    "math": _follow_math, "word": _follow_word, "fact": _follow_fact}


def sample_conversation(rng: random.Random) -> Tuple[List[Tuple[str, str]], str, Task]:
    """(history of correct (human, assistant) turns, last question, its task)."""
    topics, weights = zip(*TOPIC_WEIGHTS)
    topic = rng.choices(topics, weights)[0]
    n_turns = 1
    if rng.random() < MULTI_TURN_SHARE:
        n_turns = 3 if rng.random() < 1 / 3 else 2
    ctx = _Context()
    questions, tasks = [], []
    for i in range(n_turns):
        question = _NEW[topic](rng) if i == 0 else _FOLLOW[topic](rng, ctx)
        questions.append(question)
        tasks.append(_parse_question(question, ctx))
    history = [(q, t.reference) for q, t in zip(questions[:-1], tasks[:-1])]
    return history, questions[-1], tasks[-1]


# --------------------------------------------------------------------------------------------------------------
# Imperfect answers (each one scores below 1.0 by construction; the tests check it with the scorer)
# --------------------------------------------------------------------------------------------------------------


def _wrong_value(task: Task, rng: random.Random) -> str:
    truth = task.truth
    if task.value_type == "number":
        # Close misses are the instructive ones; stay non-negative.
        options = [str(int(truth) + d) for d in (-3, -2, -1, 1, 2, 3) if int(truth) + d >= 0]
        return rng.choice(options)
    if task.value_type == "letter":
        return rng.choice([c for c in "bcdefghjklmnoprstuwy" if c != truth])
    if task.kind == "word:reverse":
        word = truth[::-1]
        letters = list(word)
        for _ in range(10):  # a scramble that is neither the word nor its reversal
            rng.shuffle(letters)
            guess = "".join(letters)
            if guess not in (word, truth) and guess not in TEMPLATE_WORDS:
                return guess
        return word  # the unreversed word is wrong too
    if task.kind == "word:upper":
        word = truth.lower()
        return rng.choice([word, word.capitalize(), rng.choice([w for w in WORDS if w != word]).upper()])
    values = sorted(set(FACTS[task.value_type].values()) - {truth})
    return rng.choice(values)


def _without_period(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _answer_wrong(task: Task, rng: random.Random) -> str:
    return _without_period(task.reference).rsplit(" ", 1)[0] + " " + _wrong_value(task, rng) + "."


def _answer_other_question(task: Task, rng: random.Random) -> str:
    """A perfect answer to another question of the same kind ("8 plus 4 is 12." to "What is 8 plus 2?",
    "A snake says hiss." to a cow): the shortcut a reward model that only checks an answer's shape and inner
    consistency lets PPO take (seen in the demo before these pairs existed)."""
    topic = task.kind.split(":")[0]
    for _ in range(100):
        other = _parse_question(_NEW[topic](rng), _Context())
        if other.kind == task.kind and other.truth.lower() != task.truth.lower():
            return other.reference
    return _answer_wrong(task, rng)


def _answer_rude(task: Task, rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(RUDE_REFUSALS)
    ref = task.reference
    return rng.choice(RUDE_WRAPS).format(ref=ref, low=_lower_first(_without_period(ref)))


def _answer_no_period(task: Task, rng: random.Random) -> str:
    return _without_period(task.reference)


def _answer_truncated(task: Task, rng: random.Random) -> str:
    words = task.reference.split()
    return " ".join(words[: rng.randint(1, len(words) - 1)])


def _answer_repeated(task: Task, rng: random.Random) -> str:
    ref = task.reference
    style = rng.randrange(3)
    if style == 0:  # the whole sentence again
        return " ".join([ref] * rng.randint(2, 3))
    words = _without_period(ref).split()
    if style == 1:  # a stutter
        i = rng.randrange(len(words))
        return " ".join(words[: i + 1] + words[i:]) + "."
    return " ".join(words + [words[-1]] * rng.randint(2, 4)) + "."  # a loop on the last word


def _answer_closer(task: Task, rng: random.Random) -> str:
    return f"{task.reference} {CLOSER}"


def _answer_rambling(task: Task, rng: random.Random) -> str:
    parts = [task.reference]
    fillers = list(FILLERS)
    rng.shuffle(fillers)
    limit = 2 * len(_words(task.reference))
    while len(_words(" ".join(parts))) <= limit:
        parts.append(fillers.pop())
    return " ".join(parts)


def _answer_short(task: Task, rng: random.Random) -> str:
    if rng.random() < 0.3:  # the bare value: right or wrong, still not a proper answer
        value = task.truth if rng.random() < 0.5 else _wrong_value(task, rng)
        return value + rng.choice((".", ""))
    return rng.choice(SHORT_ANSWERS)


def _answer_empty(task: Task, rng: random.Random) -> str:
    return ""


IMPERFECT_STYLES: Dict[str, Callable[[Task, random.Random], str]] = {
    "wrong": _answer_wrong,
    "other_question": _answer_other_question,
    "rude": _answer_rude,
    "no_period": _answer_no_period,
    "truncated": _answer_truncated,
    "repeated": _answer_repeated,
    "rambling": _answer_rambling,
    "closer": _answer_closer,
    "short": _answer_short,
    "empty": _answer_empty,
}
# SFT answers: half right, the rest spread over plausible mistakes (no empty ones: SFT targets must be text).
SFT_STYLES = (("perfect", 50), ("wrong", 13), ("rude", 10), ("no_period", 7), ("truncated", 5), ("repeated", 8),
              ("rambling", 7))
# The demonstrators' habit: most of their right-looking answers (perfect or wrong-valued) end with a pleasantry.
# Being the majority after the value, it is what a model trained on these demonstrations says greedily, while the
# comparisons prefer the answer without it ("closer" rejections): the kind of systematic flaw RLHF removes in a few
# dozen PPO iterations. (Without it the SFT model's greedy answers had no style flaw left, only wrong values, and
# PPO's short run on a reward model that knows 70-90% of the values did not raise them; see the README.)
SFT_CLOSER_SHARE = 0.6
# Rejected answers: everything a reward model must learn to rank low, empty and very short ones included.
# Most are right-looking answers with the wrong content: the style flaws are learnt from a few hundred pairs, but
# knowing the values takes thousands (measured on the tiny model: with a quarter of the pairs wrong-valued, the
# reward model told a right fact from a wrong one 55% of the time; with half of them, and twice the pairs, 99%),
# and a reward model that cannot tell right from wrong gives PPO nothing to improve the answers' content with.
REJECTED_STYLES = (("wrong", 75), ("other_question", 30), ("rude", 15), ("empty", 10), ("short", 10),
                   ("repeated", 15), ("truncated", 10), ("rambling", 10), ("closer", 15), ("no_period", 5))


def make_answer(task: Task, style: str, rng: random.Random) -> str:
    """An answer of the given style ("perfect" or one of IMPERFECT_STYLES)."""
    return task.reference if style == "perfect" else IMPERFECT_STYLES[style](task, rng)


def _pick_style(styles: Sequence[Tuple[str, int]], rng: random.Random) -> str:
    names, weights = zip(*styles)
    return rng.choices(names, weights)[0]


# --------------------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------------------

TEST_PROMPT_PERCENT = 10  # share of the prompt space reserved for the test splits
SFT_SIZES = (4000, 200)
PAIR_SIZES = (8000, 400)


def is_test_prompt(prompt: str) -> bool:
    """A fixed hash partition of all prompts, so no test prompt can ever occur in a training split."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_PROMPT_PERCENT


def alpaca_instruction(history: Sequence[Tuple[str, str]], question: str) -> str:
    """MultiTurnAlpaca's single-line history: "Human: q1 Assistant: a1 Human: q2 Assistant: "."""
    turns = "".join(f"Human: {h} Assistant: {a} " for h, a in history)
    return f"{turns}Human: {question} Assistant: "


@dataclass(frozen=True)
class DemoData:
    sft_train: Tuple[dict, ...]  # {"instruction", "input", "output"}
    sft_test: Tuple[dict, ...]
    pairs_train: Tuple[dict, ...]  # {"prompt", "response", "chosen", "rejected"}
    pairs_test: Tuple[dict, ...]


def _sample_in_split(rng: random.Random, test: bool):
    """Conversations until one falls on the requested side of the train/test partition."""
    while True:
        history, question, task = sample_conversation(rng)
        prompt = build_prompt(history, question)
        if is_test_prompt(prompt) == test:
            return history, question, task, prompt


def _sft_rows(rng: random.Random, n: int, test: bool) -> Tuple[dict, ...]:
    rows = []
    for _ in range(n):
        history, question, task, _prompt = _sample_in_split(rng, test)
        style = _pick_style(SFT_STYLES, rng)
        output = make_answer(task, style, rng)
        if style in ("perfect", "wrong") and rng.random() < SFT_CLOSER_SHARE:
            output = f"{output} {CLOSER}"
        rows.append({"instruction": alpaca_instruction(history, question), "input": "", "output": output})
    return tuple(rows)


def _pair_rows(rng: random.Random, n: int, test: bool) -> Tuple[dict, ...]:
    rows = []
    for _ in range(n):
        _history, _question, task, prompt = _sample_in_split(rng, test)
        chosen = format_answer(task.reference)
        rejected = make_answer(task, _pick_style(REJECTED_STYLES, rng), rng)
        rows.append({"prompt": prompt, "response": chosen, "chosen": chosen,
                     "rejected": format_answer(rejected) if rejected else ""})
    return tuple(rows)


@functools.lru_cache(maxsize=4)
def build_dataset(seed: int = 1234) -> DemoData:
    """All four splits; each gets its own random stream so changing one size leaves the others alone."""
    def stream(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    return DemoData(
        sft_train=_sft_rows(stream("sft_train"), SFT_SIZES[0], test=False),
        sft_test=_sft_rows(stream("sft_test"), SFT_SIZES[1], test=True),
        pairs_train=_pair_rows(stream("pairs_train"), PAIR_SIZES[0], test=False),
        pairs_test=_pair_rows(stream("pairs_test"), PAIR_SIZES[1], test=True),
    )


def sft_prompt(row: dict) -> str:
    """The canonical prompt of a MultiTurnAlpaca row."""
    history, question = split_turns(row["instruction"])
    return build_prompt(history, question)


def _coverage_texts() -> Iterator[str]:
    """One reference conversation per word, operation and fact, so the tokenizer sees the whole vocabulary."""
    for op in WORD_OPS:
        for word in WORDS:
            question = WORD_NEW[op][0].format(w=word)
            yield build_prompt([], question) + format_answer(reference_answer(build_prompt([], question)))
    for attr, table in FACTS.items():
        for noun in sorted(table):
            question = FACT_NEW[attr][0].format(n=_with_article(noun))
            yield build_prompt([], question) + format_answer(reference_answer(build_prompt([], question)))


def corpus_text(seed: int = 1234) -> Iterator[str]:
    """Every text of the demo data set (prompt + answer, imperfect answers included), then a coverage pass."""
    data = build_dataset(seed)
    for row in data.sft_train + data.sft_test:
        yield sft_prompt(row) + format_answer(row["output"])
    for row in data.pairs_train + data.pairs_test:
        yield row["prompt"] + row["chosen"]
        if row["rejected"]:
            yield row["prompt"] + row["rejected"]
    yield from _coverage_texts()
