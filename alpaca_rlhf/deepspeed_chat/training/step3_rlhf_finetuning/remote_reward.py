"""A reward model behind HTTP (`--reward_model_type remote --reward_url http://HOST:PORT/score`), so that the
reward model can live on other devices or nodes (`python -m alpaca_rlhf.tools.reward_server --model DIR`).

The protocol is JSON in and out:

    POST /score   {"prompts": [str], "answers": [str], "ended": [bool]}  ->  {"scores": [float]}
    GET  /health  ->  {"model": str, "reward_stats": {"mean", "std"} or null, "max_rows": int}

Prompts are sent as the policy saw them (decoded, special tokens skipped), answers likewise, and `ended` says
whether each answer emitted its EOS (the reward model was trained on answers that end with one). A request that
gets no answer (connection refused, timeout, a 5xx or a full queue) is tried again --reward_retries times with
growing pauses; then, or at once on a 4xx (the server's own message), the run stops with one line naming the URL.
"""
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional, Sequence

import torch

from ..utils.errors import UserError


class RemoteRewardError(UserError):
    """The reward server could not be reached, or it refused a request."""


class RemoteReward:
    """Scores (prompt, answer) pairs on a reward server; returns float32 tensors (B,)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RemoteRewardError(f"--reward_url {url!r}: expected http://HOST:PORT/score")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.health_url = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, "/health", "", ""))
        self.info = self._request(self.health_url, None)  # also: fail now, not at the first rollout
        self.max_rows = int(self.info.get("max_rows") or 256)

    @property
    def reward_stats(self) -> Optional[dict]:
        """The served model's {'mean', 'std'} (step 2's reward_stats.json), or None."""
        return self.info.get("reward_stats")

    def __call__(self, prompts: Sequence[str], answers: Sequence[str], ended: Sequence[bool]) -> torch.Tensor:
        scores = []
        for start in range(0, len(answers), self.max_rows):  # the server's bound on rows per request
            rows = slice(start, start + self.max_rows)
            reply = self._request(self.url, {"prompts": list(prompts[rows]), "answers": list(answers[rows]),
                                             "ended": [bool(e) for e in ended[rows]]})
            got = reply.get("scores")
            if not isinstance(got, list) or len(got) != len(answers[rows]):
                raise RemoteRewardError(f"--reward_url {self.url}: expected {len(answers[rows])} scores, got "
                                        f"{str(got)[:80]}")
            scores.extend(got)
        return torch.tensor([float("nan") if s is None else float(s) for s in scores], dtype=torch.float32)

    def _request(self, url: str, payload: Optional[dict]) -> dict:
        """One JSON exchange (GET without a payload), tried again on what may pass: no connection, a timeout,
        a 5xx or a 503 (queue full)."""
        data = None if payload is None else json.dumps(payload).encode()
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code < 500:  # the request itself is wrong: asking again gives the same answer
                    raise RemoteRewardError(f"--reward_url {url} refused the request (HTTP {e.code}): {message}") \
                        from None
                reason = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                reason = str(getattr(e, "reason", e))
            except json.JSONDecodeError:
                raise RemoteRewardError(f"--reward_url {url} answered with something other than JSON") from None
        raise RemoteRewardError(f"--reward_url {url}: no answer after {self.retries + 1} tries ({reason}); is the "
                                f"reward server running? (python -m alpaca_rlhf.tools.reward_server --model DIR)")


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read()).get("error", error.reason))
    except (ValueError, AttributeError, OSError):
        return str(error.reason)
