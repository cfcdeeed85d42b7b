"""The supervised training loop shared by step 1, step 2 and DPO: they differ only in the loss and the
evaluation they plug in. Evaluates before training, every --eval_interval steps and after each epoch; saves a
resumable checkpoint every --save_interval steps and resumes from the newest one."""
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from tqdm import tqdm

from .checkpoint import RunCheckpoints
from .data.data_utils import epoch_lengths, set_epoch, skip_batches
from .entry import resolved_config
from .errors import NonFiniteError
from .metrics import MetricsLogger
from .utils import any_rank, get_all_reduce_mean, is_rank_0, print_rank_0, to_device

LossFn = Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, float]]]


def progress_bar(total: int, desc: str, disable: bool = False):
    """tqdm on a terminal; in a log file (not a TTY) one line every 30 s instead of hundreds of redraws."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, mininterval=0.1 if interactive else 30)


def _format(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class NonFiniteGuard:
    """Counts micro-batches skipped for a non-finite value and stops the run after `limit` of them in a row."""

    def __init__(self, limit: int, desc: str):
        self.limit, self.desc = limit, desc
        self.skipped = 0    # in the whole run (a metric)
        self.in_a_row = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict):
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]

    def ok(self, value: torch.Tensor, step: int, what: str = "loss") -> bool:
        """True to go on with this micro-batch; False to skip it (on every rank); raises after `limit` in a row."""
        if not any_rank(not bool(torch.isfinite(value.detach()).all()), value.device):  # the same on every rank
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"[{self.desc}] step {step}: the {what} was NaN or infinite on some rank for "
                                 f"{self.in_a_row} micro-batches in a row (--max_nonfinite_steps {self.limit}); "
                                 f"stopped without exporting")
        print_rank_0(f"warning: [{self.desc}] step {step}: non-finite {what}; micro-batch skipped on every rank "
                     f"({self.skipped} so far)")
        return False


def train_loop(engine, train_loader, compute_loss: LossFn, evaluate: Callable[[], Dict[str, float]], args,
               desc: str, run_name: str, eval_interval: int = 0) -> List[Dict[str, float]]:
    """Run all epochs (or --max_train_steps optimizer steps); returns the list of evaluation results. A micro-batch
    whose loss is not finite on some rank is skipped on every rank (no backward, no step: NonFiniteGuard).

    Resumable: a run restarted with the same --output_dir continues from the newest checkpoint (written every
    --save_interval optimizer steps, after that step's evaluation) with the same data order, RNG, optimizer and
    schedule, so it logs the metrics an uninterrupted run would have."""
    device = engine.device
    checkpoints = RunCheckpoints(args, {"model": engine}, resolved_config(args))
    state = checkpoints.resume()  # None: from step 0
    logger = MetricsLogger(args.output_dir, args.enable_tensorboard, args.tensorboard_path, run_name,
                           append=state is not None)
    history = list(state["history"]) if state else []
    guard = NonFiniteGuard(args.max_nonfinite_steps, desc)
    if state:
        guard.load_state_dict(state["nonfinite"])

    def run_eval(step: int, when: str):
        engine.eval()
        result = evaluate()
        engine.train()
        history.append({"step": step, **result})
        logger.log(step, result)
        print_rank_0(f"[{desc}] eval {when} (step {step}): {_format(result)}")

    def reached_limit() -> bool:
        return bool(args.max_train_steps) and engine.global_steps >= args.max_train_steps

    if state is None:
        run_eval(0, "before training")
    first_epoch, first_batch = (state["epoch"], state["batch"]) if state else (0, 0)
    lengths = epoch_lengths(train_loader, args.num_train_epochs)  # micro-batches per epoch
    bar = progress_bar(sum(lengths), desc, disable=not is_rank_0() or args.disable_progress_bar)
    bar.update(sum(lengths[:first_epoch]) + first_batch)
    start = time.time()
    for epoch in range(first_epoch, args.num_train_epochs):
        set_epoch(train_loader, epoch)
        skip = first_batch if epoch == first_epoch else 0  # micro-batches trained on before the checkpoint
        engine.train()
        done = reached_limit()
        for i, batch in enumerate(skip_batches(train_loader, skip) if not done else [], start=skip):
            loss, metrics = compute_loss(to_device(batch, device))
            if not guard.ok(loss, engine.global_steps):
                bar.update(1)
                continue
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            bar.update(1)
            if args.print_loss:
                print(f"[{desc}] rank {torch.distributed.get_rank()} epoch {epoch} step {engine.global_steps} "
                      f"loss {loss.item():.4f}", flush=True)
            if not boundary:
                continue
            step = engine.global_steps
            mean_loss = get_all_reduce_mean(loss).item()
            lr = engine.get_lr()[0]
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            logger.log(step, {"loss/train": mean_loss, "train/lr": lr, "train/epoch": epoch,
                              "train/nonfinite_skipped": guard.skipped, **metrics})
            if eval_interval and step % eval_interval == 0:
                run_eval(step, f"at step {step}")
            checkpoints.maybe_save(step, {"epoch": epoch, "batch": i + 1, "history": history,
                                          "nonfinite": guard.state_dict()})
            if reached_limit():
                done = True
                break
        if not history or history[-1]["step"] != engine.global_steps:  # (--eval_interval may have just evaluated)
            run_eval(engine.global_steps, f"after epoch {epoch + 1}")
        if done:
            break
    bar.close()
    logger.close()
    print_rank_0(f"[{desc}] trained to optimizer step {engine.global_steps} in {time.time() - start:.1f}s")
    return history
