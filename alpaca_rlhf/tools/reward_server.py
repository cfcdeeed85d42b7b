"""Serve a step-2 reward model over HTTP, for step 3's `--reward_model_type remote --reward_url URL`: the reward
model then runs on other devices or another node, and the training ranks send it text.

    python -m alpaca_rlhf.tools.reward_server --model output/critic [--host 127.0.0.1] [--port 8000]
        [--batch_size 32] [--max_rows 256] [--max_request_bytes 8388608] [--max_queue 64]

    POST /score   {"prompts": [str], "answers": [str], "ended": [bool]}  ->  {"scores": [float]}
    GET  /health  ->  {"model": DIR, "reward_stats": {"mean", "std"} or null, "max_rows": N}

Each row is scored as evaluate_demo scores it: [bos] + prompt + answer (+ EOS when `ended`, the default),
the model's end score (the value at the last token), raw: the client normalises with `reward_stats` (step 2's
reward_stats.json next to the model). Requests are tokenized on their own threads and queued; one worker thread
takes what is waiting, up to --batch_size rows, and scores it in one forward, so the ranks of a run share
batches. A request larger than --max_request_bytes or --max_rows, or a row longer than the model's positions,
gets a 413 with the reason; a full queue a 503 (the client tries again).
"""
import argparse
import json
import queue
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from alpaca_rlhf.deepspeed_chat.training.utils.data.chat_template import format_for_model
from alpaca_rlhf.deepspeed_chat.training.utils.errors import UserError
from alpaca_rlhf.tools.evaluate_demo import (Generation, default_device, end_scores_of_ids, load_reward_model,
                                             load_reward_stats, reward_input_ids)


class RequestError(Exception):
    """A request the server refuses: (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    rows: List[List[int]]  # token ids of each (prompt, answer)
    done: threading.Event = field(default_factory=threading.Event)
    scores: Optional[List[float]] = None
    error: Optional[str] = None


class RewardScorer:
    """The model, its tokenizer and format, and the worker thread that scores queued jobs in batches."""

    def __init__(self, model_dir: str, batch_size: int = 32, max_queue: int = 64, device=None):
        self.model_dir, self.batch_size = model_dir, batch_size
        self.model, self.tokenizer = load_reward_model(model_dir, device or default_device())
        self.format = format_for_model(model_dir, self.tokenizer)
        self.stats = load_reward_stats(model_dir)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.jobs: "queue.Queue[Job]" = queue.Queue(maxsize=max_queue)
        threading.Thread(target=self._work, name="reward-scorer", daemon=True).start()

    def rows_of(self, payload) -> List[List[int]]:
        """Token ids of each row of a /score request; RequestError for what does not fit."""
        if not isinstance(payload, dict):
            raise RequestError(400, 'expected a JSON object {"prompts": [...], "answers": [...]}')
        prompts, answers, ended = payload.get("prompts"), payload.get("answers"), payload.get("ended")
        if ended is None and isinstance(answers, list):
            ended = [True] * len(answers)
        if not (isinstance(prompts, list) and isinstance(answers, list) and isinstance(ended, list)):
            raise RequestError(400, '"prompts" and "answers" (and "ended", if given) must be lists')
        if not len(prompts) == len(answers) == len(ended):
            raise RequestError(400, f"{len(prompts)} prompts, {len(answers)} answers and {len(ended)} ended flags: "
                                    f"expected one of each per row")
        rows = []
        for i, (prompt, answer, end) in enumerate(zip(prompts, answers, ended)):
            if not (isinstance(prompt, str) and isinstance(answer, str)):
                raise RequestError(400, f"row {i}: prompt and answer must be strings")
            ids = reward_input_ids(self.tokenizer, Generation(prompt, answer, [], [], bool(end)), self.format)
            if self.max_positions and len(ids) > self.max_positions:
                raise RequestError(413, f"row {i} has {len(ids)} tokens; the model takes {self.max_positions}")
            rows.append(ids)
        return rows

    def submit(self, rows: List[List[int]]) -> Job:
        job = Job(rows)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"the queue is full ({self.jobs.maxsize} requests waiting); try again") from None
        return job

    def _work(self):
        while True:
            jobs = [self.jobs.get()]
            rows = len(jobs[0].rows)
            while rows < self.batch_size:  # whatever else waits joins this batch (other ranks' requests)
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
                rows += len(jobs[-1].rows)
            try:
                scores = end_scores_of_ids(self.model, self.tokenizer.pad_token_id,
                                           [r for job in jobs for r in job.rows], self.batch_size)
                for job in jobs:
                    job.scores, scores = scores[:len(job.rows)], scores[len(job.rows):]
            except Exception as e:  # one bad batch answers its requests with the reason; the server goes on
                for job in jobs:
                    job.error = f"scoring failed: {type(e).__name__}: {e}"
            for job in jobs:
                job.done.set()


def make_handler(scorer: RewardScorer, max_rows: int, max_request_bytes: int, request_timeout: float,
                 verbose: bool = False):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.rstrip("/") != "/health":
                return self._reply(404, {"error": f"no {self.path}; GET /health or POST /score"})
            self._reply(200, {"model": scorer.model_dir, "reward_stats": scorer.stats, "max_rows": max_rows})

        def do_POST(self):
            if self.path.rstrip("/") != "/score":
                return self._reply(404, {"error": f"no {self.path}; POST /score"})
            try:
                self._reply(200, {"scores": self._score()})
            except RequestError as e:
                self._reply(e.status, {"error": str(e)})

        def _score(self) -> List[float]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > max_request_bytes:
                self.close_connection = True  # the body stays unread
                raise RequestError(413, f"{length} bytes; this server takes at most {max_request_bytes} "
                                        f"(--max_request_bytes)")
            try:
                payload = json.loads(self.rfile.read(length) or b"null")
            except (ValueError, UnicodeDecodeError):
                raise RequestError(400, "the body is not JSON") from None
            rows = scorer.rows_of(payload)
            if len(rows) > max_rows:
                raise RequestError(413, f"{len(rows)} rows; this server takes at most {max_rows} per request "
                                        f"(--max_rows)")
            if not rows:
                return []
            job = scorer.submit(rows)
            if not job.done.wait(request_timeout):
                raise RequestError(504, f"not scored within {request_timeout:g} s")
            if job.error:
                raise RequestError(500, job.error)
            return job.scores

        def _reply(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            if verbose:
                super().log_message(fmt, *args)

    return Handler


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client does not keep the process alive


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a step-2 reward model for step 3's --reward_model_type remote.")
    p.add_argument("--model", required=True, help="The reward model directory (step 2's export).")
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface, for other nodes).")
    p.add_argument("--port", type=int, default=8000, help="Port (0: any free one, printed). Default 8000.")
    p.add_argument("--batch_size", type=int, default=32, help="Rows per forward, across requests. Default 32.")
    p.add_argument("--max_rows", type=int, default=256, help="Rows one request may carry. Default 256.")
    p.add_argument("--max_request_bytes", type=int, default=8 << 20, help="Largest request body. Default 8 MiB.")
    p.add_argument("--max_queue", type=int, default=64, help="Requests waiting at most; beyond, 503. Default 64.")
    p.add_argument("--request_timeout", type=float, default=600.0,
                   help="Seconds a request may wait to be scored (504 after). Default 600.")
    p.add_argument("--verbose", action="store_true", help="Log every request.")
    args = p.parse_args(argv)
    for flag in ("batch_size", "max_rows", "max_request_bytes", "max_queue"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        scorer = RewardScorer(args.model, args.batch_size, args.max_queue)
        server = RewardServer((args.host, args.port), make_handler(scorer, args.max_rows, args.max_request_bytes,
                                                                   args.request_timeout, args.verbose))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # the port is taken, say
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr, flush=True)
        return 2
    host, port = server.server_address[:2]
    print(f"reward server: {args.model} on http://{host}:{port}/score (batch {args.batch_size}, "
          f"queue {args.max_queue}; stats {'from reward_stats.json' if scorer.stats else 'none'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
