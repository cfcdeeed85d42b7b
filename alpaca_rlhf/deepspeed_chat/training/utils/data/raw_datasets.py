"""Readers for the preference / instruction datasets the pipeline trains on.

Every adapter turns its dataset into `Example`s in the one canonical conversation format (see prompt_format):
prompt "\\n\\nHuman: q\\n\\nAssistant:" and answers " a". Step 1 uses (prompt, chosen); steps 2 and 3 use
(prompt, chosen, rejected) and prompt only.

A dataset is named as in DeepSpeed-Chat ("Dahoas/rm-static", ...) or by a local folder whose path contains that
name ("/data/Dahoas/rm-static"): the name picks the adapter, the folder is read as `huggingface-cli download
--local-dir` leaves it. A name that is not a local folder is tried on the Hugging Face hub.

Data problems are reported, never hidden: a file or row that cannot be read raises DataError (one line naming
the file and row); a row that reads fine but cannot be trained on (empty prompt, empty chosen answer, chosen ==
rejected, tied scores) is skipped and counted in `RawDataset.skipped` by reason.
"""
import collections
import glob
import gzip
import json
import os
import random
import re
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from ..errors import DataError
from .prompt_format import (ASSISTANT, build_prompt, format_answer, messages_to_prompt, normalize_role,
                            parse_conversation)


@dataclass(frozen=True)
class Example:
    prompt: str  # canonical prompt, ends with "\n\nAssistant:"
    chosen: str  # canonical answer, starts with " "
    rejected: Optional[str]  # None for SFT-only data; "" is a valid (empty) rejected answer
    # the conversation before the answer as ((role, content), ...), roles system/user/assistant, where the source
    # gives messages (chat templates render these; a system message has no place in the canonical text); else None
    messages: Optional[Tuple[Tuple[str, str], ...]] = None


# One record to convert: (where it came from: a file or a hub split, its 1-based row/line number, the record).
Row = Tuple[str, int, dict]

EVAL_FRACTION = 0.1  # share held out for eval by datasets that ship a train split only


class RawDataset:
    """Base class: reading helpers, skip accounting and the seeded holdout. Subclasses implement `_read`."""

    name: str = ""
    sft_only: bool = False
    on_hub: bool = True  # False for datasets that only exist as local folders
    columns: Tuple[str, ...] = ()  # columns every row must have

    def __init__(self, path_or_name: str, seed: int):
        self.path = path_or_name
        self.seed = seed
        self.skipped: collections.Counter = collections.Counter()
        self.is_local = os.path.isdir(path_or_name)
        self._hub = None if self.is_local else self._load_from_hub()
        # Read everything now, so bad data fails at start-up and `skipped` is complete once constructed.
        self._train, self._eval = self._read()

    def train_examples(self) -> List[Example]:
        return list(self._train)

    def eval_examples(self) -> List[Example]:
        return list(self._eval)

    def _read(self) -> Tuple[List[Example], List[Example]]:
        raise NotImplementedError

    # ----------------------------------------------------------------- where rows come from

    def _load_from_hub(self):
        if os.path.exists(self.path):
            raise DataError(f"{self.path}: expected a directory holding {self.name}, found a file")
        if not self.on_hub:
            raise DataError(f"{self.path}: not a local directory ({self.name} is read from a local folder only)")
        try:
            import datasets  # imported here: only needed (and slow to import) for online use

            return datasets.load_dataset(self.path)
        except Exception as e:  # offline, unknown repo, bad id...: all mean "not available"
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"{self.path}: neither a local directory nor loadable from the Hugging Face hub as a "
                f"{self.name} dataset ({reason})"
            ) from None

    def _split_rows(self, split: str) -> Iterator[Row]:
        """Rows of a split: parquet files under the local folder, or the hub dataset's split."""
        if self._hub is not None:
            return self._hub_rows(split)
        return self._parquet_rows(self._split_files(split))

    def _split_files(self, split: str) -> List[str]:
        # `huggingface-cli download` leaves data/<split>-00000-of-00001[-hash].parquet; the hub's parquet
        # conversion branch uses default/<split>/0000.parquet. The first pattern that matches wins.
        patterns = [f"data/{split}-*.parquet", f"data/{split}.parquet", f"{split}-*.parquet",
                    f"default/{split}/*.parquet"]
        for pattern in patterns:
            files = sorted(glob.glob(os.path.join(glob.escape(self.path), pattern)))
            if files:
                return files
        raise DataError(
            f"{self.path}: no {split} split found (expected data/{split}-00000-of-00001.parquet "
            f"as `huggingface-cli download --local-dir` leaves it)"
        )

    def _parquet_rows(self, files: Sequence[str]) -> Iterator[Row]:
        import pyarrow.parquet as pq  # pyarrow directly: no datasets cache, no conversion step

        for file in files:
            try:
                table = pq.read_table(file)
            except Exception as e:
                raise DataError(f"{file}: not a readable parquet file ({e})") from None
            self._check_columns(file, table.column_names)
            if table.num_rows == 0:
                raise DataError(f"{file}: empty file (expected rows with columns {', '.join(self.columns)})")
            for number, record in enumerate(table.to_pylist(), start=1):
                yield file, number, record

    def _hub_rows(self, split: str) -> Iterator[Row]:
        where = f"hub dataset {self.path} split {split}"
        if split not in self._hub:
            raise DataError(f"{where}: no such split (found {', '.join(self._hub)})")
        data = self._hub[split]
        self._check_columns(where, data.column_names)
        for number, record in enumerate(data, start=1):
            yield where, number, record

    def _json_lines(self, file: str) -> Iterator[Row]:
        """JSON lines, one object per line; blank lines ignored; line numbers in errors are 1-based."""
        if not os.path.isfile(file):
            raise DataError(f"{file}: file not found (expected it in {self.name}'s folder)")
        found = False
        with (gzip.open if file.endswith(".gz") else open)(file, "rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, file, number)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}: line {number}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{file}: line {number}: expected a JSON object, found {type(record).__name__}")
                self._check_columns(f"{file}: line {number}", record)
                found = True
                yield file, number, record
        if not found:
            raise DataError(f"{file}: empty file (expected JSON lines with keys {', '.join(self.columns)})")

    def _json_records(self, file: str) -> Iterator[Row]:
        """A JSON array of objects, or JSON lines (told apart by the first character)."""
        if not os.path.isfile(file):
            raise DataError(f"{file}: file not found (expected it in {self.name}'s folder)")
        with open(file, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise DataError(f"{file}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.lstrip().startswith("["):
            yield from self._json_lines(file)
            return
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}: line {e.lineno}: malformed JSON ({e.msg})") from None
        if not records:
            raise DataError(f"{file}: empty file (expected a JSON array of objects)")
        for number, record in enumerate(records, start=1):
            if not isinstance(record, dict):
                raise DataError(f"{file}: row {number}: expected a JSON object, found {type(record).__name__}")
            yield file, number, record

    def _check_columns(self, where: str, present: Iterable[str]) -> None:
        missing = [c for c in self.columns if c not in present]
        if missing:
            raise DataError(f"{where}: missing column {', '.join(missing)} (expected {', '.join(self.columns)})")

    # ----------------------------------------------------------------- turning rows into examples

    def _make(self, prompt: str, chosen: str, rejected: Optional[str]) -> Optional[Example]:
        """An Example from a canonical prompt and raw answers, or None (counted) when the row is unusable."""
        if not any(m["content"] for m in parse_conversation(prompt)):
            return self._skip("empty prompt")
        if not chosen.strip():
            return self._skip("empty chosen")
        if rejected is not None and chosen.strip() == rejected.strip():
            return self._skip("identical chosen and rejected")
        # An empty rejected answer is real data (a model can answer nothing): keep it, as "".
        rejected = None if rejected is None else (format_answer(rejected) if rejected.strip() else "")
        return Example(prompt, format_answer(chosen), rejected)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        return None

    def _normalized_prompt(self, text: str) -> Optional[str]:
        """Canonical prompt from a transcript in any Human/Assistant spelling (or plain text = one human turn)."""
        messages = parse_conversation(text)
        if not any(m["content"] for m in messages):
            return ""  # counted as "empty prompt" by _make
        try:
            return messages_to_prompt(messages)
        except ValueError:  # ends with an Assistant turn: nothing for the model to answer
            return self._skip("prompt does not end with a Human turn")

    def _holdout(self, examples: List[Example]) -> Tuple[List[Example], List[Example]]:
        """Seeded split of a train-only dataset: ~10% for eval, disjoint, the same for the same seed."""
        n_eval = int(round(len(examples) * EVAL_FRACTION))
        if len(examples) >= 2:
            n_eval = max(n_eval, 1)
        order = list(range(len(examples)))
        random.Random(self.seed).shuffle(order)
        eval_ids = set(order[:n_eval])
        train = [e for i, e in enumerate(examples) if i not in eval_ids]
        held_out = [e for i, e in enumerate(examples) if i in eval_ids]
        return train, held_out


def _decode(raw: bytes, file: str, number: int) -> str:
    """One line of a text file as UTF-8; anything else is a one-line error naming the file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _text(value, where: str, number: int, column: str) -> str:
    """A text field; null reads as empty (then skipped or kept by the usual rules), other types are errors."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: row {number}: column {column} should be text, found {type(value).__name__}")
    return value


def _strip_answer_marker(text: str) -> str:
    """Drop a leading "Assistant:" some datasets keep on the answer."""
    text = text.lstrip()
    return text[len(ASSISTANT):] if text.startswith(ASSISTANT) else text


# --------------------------------------------------------------------- one adapter per dataset


class _CanonicalPairs(RawDataset):
    """Dahoas HH-style data: canonical prompt, answers with a leading space, splits train and test. `columns`
    names the prompt, chosen and rejected columns, in that order."""

    columns = ("prompt", "chosen", "rejected")
    eval_split = "test"

    def _read(self):
        return self._convert(self._split_rows("train")), self._convert(self._split_rows(self.eval_split))

    def _convert(self, rows: Iterable[Row]) -> List[Example]:
        examples = []
        prompt_column, chosen_column, rejected_column = self.columns
        for where, number, r in rows:
            prompt = self._prompt(_text(r[prompt_column], where, number, prompt_column))
            if prompt is None:
                continue
            chosen = self._answer(_text(r[chosen_column], where, number, chosen_column))
            rejected = self._answer(_text(r[rejected_column], where, number, rejected_column))
            example = self._make(prompt, chosen, rejected)
            if example:
                examples.append(example)
        return examples

    def _prompt(self, text: str) -> Optional[str]:
        # Already canonical in these datasets: keep it byte for byte; normalise anything else.
        if text.startswith("\n\nHuman:") and text.endswith("\n\nAssistant:"):
            return text
        return self._normalized_prompt(text)

    def _answer(self, text: str) -> str:
        return text


class RmStatic(_CanonicalPairs):
    name = "Dahoas/rm-static"


class FullHhRlhf(_CanonicalPairs):
    name = "Dahoas/full-hh-rlhf"


class SyntheticInstructGptjPairwise(_CanonicalPairs):
    """Bare instructions (no Human/Assistant wrapper); train split only, so 10% is held out for eval."""

    name = "Dahoas/synthetic-instruct-gptj-pairwise"

    def _read(self):
        return self._holdout(self._convert(self._split_rows("train")))

    def _prompt(self, text: str) -> Optional[str]:
        return build_prompt([], text)


class YitingxieRlhfRewardDatasets(_CanonicalPairs):
    """Prompts in " Human: ... Assistant:" spelling (sometimes without the final marker); answers may start
    with "Assistant:"."""

    name = "yitingxie/rlhf-reward-datasets"

    def _prompt(self, text: str) -> Optional[str]:
        return self._normalized_prompt(text)

    def _answer(self, text: str) -> str:
        return _strip_answer_marker(text)


# "[1]", "[1, 2]", "[3][4]" citation marks, with the space before them.
_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")


class WebGptComparisons(RawDataset):
    """Two scored answers per question; the higher score is chosen, ties skipped; train only -> 10% holdout.

    Read from parquet (data/train-*.parquet or the hub's default/train/*.parquet) or, failing that, from the
    original comparisons.jsonl that the dataset's loading script downloads.
    """

    name = "openai/webgpt_comparisons"
    columns = ("question", "answer_0", "answer_1", "score_0", "score_1")

    def _read(self):
        return self._holdout(self._convert(self._rows()))

    def _rows(self) -> Iterator[Row]:
        if self._hub is not None:
            return self._hub_rows("train")
        try:
            return self._parquet_rows(self._split_files("train"))
        except DataError:
            jsonl = sorted(glob.glob(os.path.join(glob.escape(self.path), "*.jsonl")))
            if not jsonl:
                raise DataError(
                    f"{self.path}: no train split found (expected data/train-00000-of-00001.parquet "
                    f"or comparisons.jsonl)"
                ) from None
            return (row for file in jsonl for row in self._json_lines(file))

    def _convert(self, rows: Iterable[Row]) -> List[Example]:
        examples = []
        for where, number, r in rows:
            question = r["question"]
            if isinstance(question, dict):
                if "full_text" not in question:
                    raise DataError(f"{where}: row {number}: column question has no full_text field")
                question = question["full_text"]
            question = _text(question, where, number, "question.full_text")
            scores = [self._score(r[f"score_{i}"], where, number, i) for i in (0, 1)]
            if scores[0] == scores[1]:
                self._skip("tied scores")
                continue
            best = 0 if scores[0] > scores[1] else 1
            answers = [_CITATION.sub("", _text(r[f"answer_{i}"], where, number, f"answer_{i}")) for i in (0, 1)]
            example = self._make(build_prompt([], question), answers[best], answers[1 - best])
            if example:
                examples.append(example)
        return examples

    @staticmethod
    def _score(value, where: str, number: int, i: int) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: row {number}: column score_{i} should be a number, found {value!r}")
        return float(value)


class StanfordnlpSHP(RawDataset):
    """Reddit posts and two comments; labels == 1 means comment A is preferred. JSON lines in one folder per
    subreddit (askculinary/train.json, validation.json, test.json); eval uses validation."""

    name = "stanfordnlp/SHP"
    columns = ("history", "human_ref_A", "human_ref_B", "labels")

    def _read(self):
        return self._convert(self._rows("train")), self._convert(self._rows("validation"))

    def _rows(self, split: str) -> Iterator[Row]:
        if self._hub is not None:
            return self._hub_rows(split)
        root = glob.escape(self.path)
        # All subreddit folders; a single subreddit folder given directly works too.
        files = sorted(glob.glob(os.path.join(root, "*", f"{split}.json")) +
                       glob.glob(os.path.join(root, f"{split}.json")))
        if not files:
            raise DataError(f"{self.path}: no {split}.json found "
                            f"(expected <subreddit>/{split}.json, e.g. askculinary/{split}.json)")
        return (row for file in files for row in self._json_lines(file))

    def _convert(self, rows: Iterable[Row]) -> List[Example]:
        examples = []
        for where, number, r in rows:
            if r["labels"] not in (0, 1) or isinstance(r["labels"], bool):
                raise DataError(f"{where}: row {number}: labels should be 0 or 1, found {r['labels']!r}")
            a = _text(r["human_ref_A"], where, number, "human_ref_A")
            b = _text(r["human_ref_B"], where, number, "human_ref_B")
            chosen, rejected = (a, b) if r["labels"] == 1 else (b, a)
            history = _text(r["history"], where, number, "history")
            example = self._make(build_prompt([], history), chosen, rejected)
            if example:
                examples.append(example)
        return examples


class MultiTurnAlpaca(RawDataset):
    """SFT-only conversations: JSON lines {"instruction", "input", "output"} in training_data.txt.train/.test.

    The instruction holds the whole history on one line ("Human: q1 Assistant: a1 Human: q2 Assistant: "),
    the output is the last assistant turn; both are rewritten into the canonical format.
    """

    name = "MultiTurnAlpaca"
    sft_only = True
    on_hub = False
    columns = ("instruction", "input", "output")

    def _read(self):
        train = self._convert(self._json_lines(os.path.join(self.path, "training_data.txt.train")))
        test = self._convert(self._json_lines(os.path.join(self.path, "training_data.txt.test")))
        return train, test

    def _convert(self, rows: Iterable[Row]) -> List[Example]:
        examples = []
        for where, number, r in rows:
            # parse_conversation reads text without markers as a single human turn.
            messages = parse_conversation(_text(r["instruction"], where, number, "instruction"))
            extra = _text(r["input"], where, number, "input").strip()
            if extra:  # Alpaca's "input" belongs to the question being asked: the last human turn
                users = [m for m in messages if m["role"] == "user"]
                if users:
                    users[-1]["content"] = (users[-1]["content"] + "\n" + extra).strip()
                else:
                    messages.append({"role": "user", "content": extra})
            try:
                prompt = messages_to_prompt(messages) if messages else ""
            except ValueError:
                self._skip("prompt does not end with a Human turn")
                continue
            example = self._make(prompt, _text(r["output"], where, number, "output"), None)
            if example:
                examples.append(example)
        return examples


class LocalJsonFile(RawDataset):
    """Your own data: train.json and eval.json (JSON array or JSON lines) in the folder. The columns pick the kind:

    - preference pairs {"prompt", "chosen", "rejected"}, or ranked answers {"prompt", "answers", "scores"} (higher
      is better) / {"prompt", "answers", "ranking"} (indices, best first), which expand into every (better, worse)
      pair. A prompt is text (plain, or a Human/Assistant transcript) or a list of {role, content} messages
      (system, user, assistant; ending with a user turn); an answer is text or a message list whose last
      assistant message is the answer.
    - preference with an implicit prompt (TRL's style): {"chosen", "rejected"} whole conversations (message lists,
      or Human/Assistant transcripts as Anthropic/hh-rlhf ships them); their shared beginning is the prompt.
    - conversational SFT: {"messages": [...]} ending with an assistant turn, or {"prompt", "completion"}.
    - prompt only (step 3): {"prompt"} alone; steps 1 and 2 skip such rows (counted).
    """

    name = "local/jsonfile"
    on_hub = False

    def _read(self):
        return (
            self._convert(self._json_records(os.path.join(self.path, "train.json"))),
            self._convert(self._json_records(os.path.join(self.path, "eval.json"))),
        )

    def _convert(self, rows: Iterable[Row]) -> List[Example]:
        examples = []
        for where, number, r in rows:
            if "messages" in r:
                conversation = _messages(r["messages"], where, number, "messages")
                if not conversation or conversation[-1][0] != "assistant":
                    raise DataError(f"{where}: row {number}: messages should end with an assistant turn")
                pairs, context = [(conversation[-1][1], None)], conversation[:-1]
            elif "prompt" not in r and "chosen" in r and "rejected" in r:
                context, chosen, rejected = self._implicit_prompt(r, where, number)
                pairs = [(chosen, rejected)]
            elif "prompt" in r:
                context = self._context(r["prompt"], where, number)
                pairs = self._pairs(r, where, number)
            else:
                raise DataError(f"{where}: row {number}: expected columns prompt (+ chosen, rejected | answers | "
                                f"completion), messages, or chosen and rejected conversations")
            if context is None:
                continue
            prompt = _canonical_prompt(context)
            if prompt is None:
                self._skip("prompt does not end with a Human turn")
                continue
            # a text prompt stays text (its canonical form is what it always tokenized as); messages stay messages
            messages = None if isinstance(r.get("prompt"), str) else context
            for chosen, rejected in pairs:
                if chosen is None:  # a prompt-only row: step 3 reads its prompt, steps 1 and 2 skip it
                    if any(content for _, content in context):
                        examples.append(Example(prompt, "", None, messages))
                    else:
                        self._skip("empty prompt")
                    continue
                example = self._make(prompt, chosen, rejected)
                if example:
                    examples.append(replace(example, messages=messages))
        return examples

    def _context(self, value, where: str, number: int) -> Optional[Tuple[Tuple[str, str], ...]]:
        """The conversation a prompt column holds: messages, or a transcript / plain text (one user turn)."""
        if isinstance(value, list):
            return _messages(value, where, number, "prompt")
        return tuple((m["role"], m["content"]) for m in parse_conversation(_text(value, where, number, "prompt")))

    def _implicit_prompt(self, r: dict, where: str, number: int):
        """(prompt messages, chosen answer, rejected answer) of two whole conversations sharing their start."""
        chosen, rejected = (_conversation(r[k], where, number, k) for k in ("chosen", "rejected"))
        split = split_implicit_prompt(chosen, rejected)
        if isinstance(split, str):
            raise DataError(f"{where}: row {number}: {split}")
        return split

    def _pairs(self, r: dict, where: str, number: int) -> List[Tuple[Optional[str], Optional[str]]]:
        if "completion" in r:
            return [(self._answer(r["completion"], where, number, "completion"), None)]
        if "answers" not in r and "chosen" not in r and "rejected" not in r:
            return [(None, None)]  # prompt only
        if "answers" not in r:
            for key in ("chosen", "rejected"):
                if key not in r:
                    raise DataError(f"{where}: row {number}: missing key {key} (expected prompt, chosen, rejected "
                                    f"or prompt, answers, scores|ranking)")
            return [(self._answer(r["chosen"], where, number, "chosen"),
                     self._answer(r["rejected"], where, number, "rejected"))]
        answers = r["answers"]
        if not isinstance(answers, list):
            raise DataError(f"{where}: row {number}: answers should be a list")
        answers = [self._answer(a, where, number, "answers") for a in answers]
        if "scores" in r:
            scores = r["scores"]
            numeric = isinstance(scores, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)
            if not numeric or len(scores) != len(answers):
                raise DataError(f"{where}: row {number}: scores should be a list of numbers, "
                                f"one per answer ({len(answers)})")
            pairs = []
            for i in range(len(answers)):
                for j in range(i + 1, len(answers)):
                    if scores[i] == scores[j]:
                        self._skip("tied scores")
                    elif scores[i] > scores[j]:
                        pairs.append((answers[i], answers[j]))
                    else:
                        pairs.append((answers[j], answers[i]))
            return pairs
        if "ranking" in r:
            ranking = r["ranking"]
            valid = isinstance(ranking, list) and all(
                isinstance(i, int) and 0 <= i < len(answers) for i in ranking) and len(set(ranking)) == len(ranking)
            if not valid:
                raise DataError(f"{where}: row {number}: ranking should list distinct answer indices "
                                f"0..{len(answers) - 1}, best first")
            return [(answers[ranking[a]], answers[ranking[b]])
                    for a in range(len(ranking)) for b in range(a + 1, len(ranking))]
        raise DataError(f"{where}: row {number}: answers given without scores or ranking")

    @staticmethod
    def _answer(value, where: str, number: int, key: str) -> str:
        if isinstance(value, list):  # a conversation: the answer is the last assistant message
            for m in reversed(value):
                if isinstance(m, dict) and str(m.get("role", "")).lower() in ("assistant", "gpt", "bot"):
                    return _text(m.get("content"), where, number, key)
            return ""
        return _text(value, where, number, key)


class LocalTextFile(RawDataset):
    """Prompts for step 3 as plain text: train.txt and eval.txt in the folder, one prompt per line (blank lines
    ignored), e.g. review openings to continue with --chat_template none (TRL's IMDB setting). Steps 1 and 2 find
    no answers here."""

    name = "local/textfile"
    on_hub = False

    def _read(self):
        return self._prompts("train.txt"), self._prompts("eval.txt")

    def _prompts(self, name: str) -> List[Example]:
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            raise DataError(f"{file}: file not found (expected one prompt per line)")
        with open(file, "rb") as f:
            lines = [_decode(raw, file, number).rstrip("\r\n") for number, raw in enumerate(f, start=1)]
        examples = [Example(_canonical_prompt((("user", line.strip()),)), "", None, (("user", line),))
                    for line in lines if line.strip()]
        if not examples:
            raise DataError(f"{file}: no prompts (expected one prompt per line)")
        return examples


class AnthropicHhRlhf(RawDataset):
    """Anthropic/hh-rlhf as it ships: `<subset>/{train,test}.jsonl.gz` (harmless-base, helpful-base, ...), rows
    {"chosen", "rejected"}, each a whole "\\n\\nHuman: ...\\n\\nAssistant: ..." conversation; the shared
    start is the prompt. Rows whose conversations part before their last turn are skipped and counted;
    red-team-attempts (no pairs) is not read."""

    name = "Anthropic/hh-rlhf"
    columns = ("chosen", "rejected")

    def _read(self):
        if not self.is_local:
            return self._convert(self._hub_rows("train")), self._convert(self._hub_rows("test"))
        return self._convert(self._gz_rows("train")), self._convert(self._gz_rows("test"))

    def _gz_rows(self, split: str) -> Iterator[Row]:
        files = sorted(f for f in glob.glob(os.path.join(glob.escape(self.path), "**", f"{split}.jsonl*"),
                                            recursive=True) if "red-team" not in f)
        if not files:
            raise DataError(f"{self.path}: no {split}.jsonl.gz found (expected <subset>/{split}.jsonl.gz as "
                            "`huggingface-cli download --local-dir` leaves it)")
        for file in files:
            yield from self._json_lines(file)

    def _convert(self, rows: Iterable[Row]) -> List[Example]:
        examples = []
        for where, number, r in rows:
            split = split_implicit_prompt(*(_conversation(r[k], where, number, k) for k in ("chosen", "rejected")))
            if isinstance(split, str):
                self._skip("chosen and rejected differ before their last turn")
                continue
            context, chosen, rejected = split
            prompt = _canonical_prompt(context)
            example = self._make(prompt, chosen, rejected) if prompt else self._skip("empty prompt")
            if example:
                examples.append(example)
        return examples


class StackExchangePaired(_CanonicalPairs):
    """lvwerra/stack-exchange-paired: parquet files under `data/` (finetune, reward, rl, evaluation) with
    `question`, `response_j` (preferred) and `response_k`. Point the path at the folder of the subset to read
    (e.g. `.../stack-exchange-paired/data/reward`); `evaluation` files, where present below the path, are the eval
    split, else 10% is held out."""

    name = "lvwerra/stack-exchange-paired"
    columns = ("question", "response_j", "response_k")

    def _read(self):
        if not self.is_local:
            return self._convert(self._hub_rows("train")), []
        files = sorted(glob.glob(os.path.join(glob.escape(self.path), "**", "*.parquet"), recursive=True))
        if not files:
            raise DataError(f"{self.path}: no parquet files found (expected data/<subset>/*.parquet)")
        evaluation = [f for f in files if f"{os.sep}evaluation{os.sep}" in f]
        train = [f for f in files if f not in evaluation]
        if evaluation and train:
            return self._convert(self._parquet_rows(train)), self._convert(self._parquet_rows(evaluation))
        return self._holdout(self._convert(self._parquet_rows(files)))


def split_implicit_prompt(chosen: Tuple[Tuple[str, str], ...], rejected: Tuple[Tuple[str, str], ...]):
    """(prompt messages, chosen answer, rejected answer) of two whole conversations that share their start and
    then give one assistant turn each (TRL's implicit prompt), or the reason they do not, as a string."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # the answers are the turns after the shared start (an identical final answer shares one turn more)
    while shared and chosen[shared - 1][0] == "assistant":
        shared -= 1
    if shared == 0:
        return ("chosen and rejected share no prompt (an implicit-prompt row needs both conversations to start "
                "with the same turns)")
    answers = []
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        rest = conversation[shared:]
        if len(rest) != 1 or rest[0][0] != "assistant":
            return f"{key} should continue the shared prompt with one assistant turn"
        answers.append(rest[0][1])
    return chosen[:shared], answers[0], answers[1]


def _messages(value, where: str, number: int, column: str) -> Tuple[Tuple[str, str], ...]:
    """((role, content), ...) of a message list, roles system/user/assistant."""
    if not isinstance(value, list):
        raise DataError(f"{where}: row {number}: column {column} should be a list of {{role, content}} messages")
    out = []
    for m in value:
        try:
            role = normalize_role(m["role"])
            content = m["content"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{where}: row {number}: column {column}: each message needs a role (system, user, "
                            f"assistant) and a content, found {m!r:.80}") from None
        out.append((role, _text(content, where, number, column).strip()))
    return tuple(out)


def _conversation(value, where: str, number: int, column: str) -> Tuple[Tuple[str, str], ...]:
    """A whole conversation: a message list, or a Human/Assistant transcript (hh-rlhf's strings)."""
    if isinstance(value, list):
        return _messages(value, where, number, column)
    return tuple((m["role"], m["content"]) for m in parse_conversation(_text(value, where, number, column)))


def _canonical_prompt(context: Tuple[Tuple[str, str], ...]) -> Optional[str]:
    """The canonical Human/Assistant prompt of a conversation (system messages aside), or None when it does not
    end with a user turn. An empty conversation gives "" (counted as an empty prompt)."""
    turns = [{"role": role, "content": content} for role, content in context]
    if not any(m["content"] for m in turns if m["role"] != "system"):
        return ""
    try:
        return messages_to_prompt(turns)
    except ValueError:
        return None


_ADAPTERS = [
    AnthropicHhRlhf,
    StackExchangePaired,
    RmStatic,
    FullHhRlhf,
    SyntheticInstructGptjPairwise,
    YitingxieRlhfRewardDatasets,
    WebGptComparisons,
    StanfordnlpSHP,
    MultiTurnAlpaca,
    LocalJsonFile,
    LocalTextFile,
]
DATASET_NAMES: List[str] = [a.name for a in _ADAPTERS]


def get_raw_dataset(path_or_name: str, seed: int) -> RawDataset:
    """The adapter whose name the string contains (the longest such name), reading from that string."""
    spelled = path_or_name.replace(os.sep, "/").lower()
    matches = [a for a in _ADAPTERS if a.name.lower() in spelled]
    if not matches:
        raise DataError(
            f"{path_or_name}: unknown dataset (the name or path must contain one of: {', '.join(DATASET_NAMES)})"
        )
    adapter = max(matches, key=lambda a: len(a.name))
    return adapter(path_or_name, seed)
