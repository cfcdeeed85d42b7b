"""What every step's main() does first and last: start the world, check flags, seed, report user errors."""
import atexit
import faulthandler
import os
import sys
from typing import Callable

from alpaca_rlhf import cpu_blas

from .args import check_batch_args
from .distributed import DistInfo, init_distributed, shared_by_all_nodes
from .ds_utils import resolve_dtype
from .errors import UserError
from .export_swap import recover_interrupted_swaps
from .model.elementwise import compile_elementwise
from .utils import barrier, is_rank_0, print_rank_0, set_random_seed


def start_run(args) -> DistInfo:
    """Process group, derived batch sizes (checked right away), precision and seeds; an export that a kill
    interrupted is finished or undone before anything reads --output_dir."""
    dist = init_distributed(args.local_rank, args.dist_timeout)
    check_batch_args(args, dist.world_size)
    if is_rank_0():
        recover_interrupted_swaps(args.output_dir)
    barrier()
    args.node_local_checkpoints = not shared_by_all_nodes(args.output_dir, dist.device)
    if args.node_local_checkpoints:
        print_rank_0(f"{args.output_dir} is not shared by the nodes: each keeps its own checkpoints")
    args.dtype = resolve_dtype(args.dtype)
    set_random_seed(args.seed)
    if args.compile_elementwise:
        compile_elementwise()
        print_rank_0("elementwise math (RMSNorm, SwiGLU, rotary): fused with torch.compile, compiled on first use")
    budget = getattr(args, "max_tokens_per_batch", 0)
    batch = f"about {budget * args.gradient_accumulation_steps * dist.world_size} tokens" if budget \
        else args.global_train_batch_size
    print_rank_0(f"world size {dist.world_size}, device {dist.device}, dtype {args.dtype}, global batch {batch}")
    if dist.device.type == "cpu":
        print_rank_0(cpu_blas.describe())
    return dist


def resolved_config(args) -> dict:
    """The run's flags after defaults and derived values: saved next to every model and checkpoint."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in ("deepspeed_config",)}


def run_cli(main: Callable[[], None]):
    """Run a step's main(); a UserError becomes one line on stderr and exit code 2, with no traceback.
    Only for a step's `__main__`: a finished run ends the process (see leave_process)."""
    faulthandler.enable()  # should native code abort or crash, every thread's Python stack goes to stderr
    try:
        main()
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif not e.same_on_every_rank:  # maybe raised on this rank alone: say it here
            print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    end_world()
    leave_process(0)


def end_world():
    """Leave the process group together before the interpreter exits."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_process(code: int):
    """End a finished run without the interpreter's teardown of native libraries. Left to that teardown, a
    rank occasionally aborted after everything was saved and the process group destroyed ("terminate called
    without an active exception", which C++ prints when a still-running thread's handle is destroyed), and the
    launcher reported the whole run as failed (exit 250). It failed CI once (2 December 2026, a step-3 ZeRO-3
    test) and did not recur in 62 local repetitions of that run, so its exact source is unknown: skipping the
    native teardown removes the place it happens. Python's exit handlers (logging, TensorBoard) still run and
    the standard streams are flushed; the native destructors skipped only free what the system frees anyway."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to deliver
            pass
    os._exit(code)
