"""Programmatic rewards for step 3 (`--reward_model_type function --reward_function SPEC`) and the logged-only
ground truth (`--eval_reward_function SPEC`).

SPEC is `path/to/file.py:name` or `package.module:name`. The function is called with the batch's prompt texts
and answer texts and returns one number per answer:

    def reward(prompts: list[str], answers: list[str], **columns) -> list[float]

(`columns` is reserved for a row's extra data columns; none are passed yet.) A function that raises, or returns
the wrong number of scores, stops the run with one line naming the function and the row; non-finite scores come
back as they are and the trainer skips that batch on every rank (like non-finite logits).
"""
import importlib
import importlib.util
import os
from typing import Callable, Sequence

import torch

from ..utils.errors import UserError


class RewardFunctionError(UserError):
    """A reward function that cannot be loaded, raised on a row, or returned the wrong number of scores."""


def load_function(spec: str, flag: str = "--reward_function") -> Callable:
    """The callable SPEC names: `file.py:name` (a file, imported from its path) or `module:name`."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise RewardFunctionError(f"{flag} {spec!r}: expected path/to/file.py:function or package.module:function")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise RewardFunctionError(f"{flag} {spec!r}: no file {target}")
        module_spec = importlib.util.spec_from_file_location(f"reward_function_{abs(hash(target))}", target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardFunctionError(f"{flag} {spec!r}: cannot import {target} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFunctionError(f"{flag} {spec!r}: {target} has no function {name}")
    return fn


class RewardFunction:
    """A loaded reward function, called on decoded prompts and answers; returns a float32 tensor (B,)."""

    def __init__(self, spec: str, flag: str = "--reward_function"):
        self.spec, self.flag = spec, flag
        self.fn = load_function(spec, flag)

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        try:
            scores = list(self.fn(list(prompts), list(answers)))
        except Exception as e:  # find the row: the first one that raises on its own
            row = self._failing_row(prompts, answers)
            where = f"row {row} (prompt {prompts[row][-80:]!r})" if row is not None else "a batch"
            raise RewardFunctionError(f"{self.flag} {self.spec} raised on {where}: {type(e).__name__}: {e}") from None
        if len(scores) != len(answers):
            raise RewardFunctionError(f"{self.flag} {self.spec} returned {len(scores)} scores for {len(answers)} "
                                      f"answers; it must return one number per answer")
        values = []
        for row, score in enumerate(scores):
            try:
                values.append(float(score))
            except (TypeError, ValueError):
                raise RewardFunctionError(f"{self.flag} {self.spec} returned {score!r} for row {row}; "
                                          f"expected a number") from None
        return torch.tensor(values, dtype=torch.float32)

    def _failing_row(self, prompts, answers):
        for i, (p, a) in enumerate(zip(prompts, answers)):
            try:
                self.fn([p], [a])
            except Exception:
                return i
        return None

