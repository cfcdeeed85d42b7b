"""Small helpers every step uses: rank-0 printing, seeding, moving batches, reductions, atomic files."""
import contextlib
import json
import os
import random
import shutil
import tempfile
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed as dist


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def is_local_rank_0() -> bool:
    """The first rank of this node (machine): the one that writes node-local files such as the data cache."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def print_rank_0(*msg, rank=None):
    if (rank is None and is_rank_0()) or rank == 0:
        print(*msg, flush=True)


def set_random_seed(seed: int):
    """Seed python, numpy and torch (all devices) so runs with the same seed repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from deepspeed.accelerator import get_accelerator
    get_accelerator().manual_seed_all(seed)


def to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def any_rank(flag: bool, device) -> bool:
    """True on every rank when it is true on one: ranks must skip batches together (collective steps)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def get_all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (the input is left untouched)."""
    value = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from all ranks, in rank order (ranks may hold different lengths)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=t.device))
    padded = torch.zeros(int(max(s.item() for s in sizes)), dtype=t.dtype, device=t.device)
    padded[:t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Open a temporary file next to `path` and move it into place only when the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the content on disk before the name points at it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_tree(directory, files=False)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def fsync_tree(path: str, files: bool = True):
    """Flush a directory (and, with files, every file below it) to disk, so that a rename that follows cannot
    survive a crash while the content it names does not."""
    if files:
        for root, _, names in os.walk(path):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str, obj: Any):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def move_dir_contents(src: str, dst: str):
    """Move every file of a finished temporary directory into `dst` (one atomic rename per file), then
    remove `src`. Files already in `dst` that `src` does not have are left alone."""
    os.makedirs(dst, exist_ok=True)
    mode = 0o666 & ~_umask()  # temp files are created 0600; exported files get the usual permissions
    for name in sorted(os.listdir(src)):
        target = os.path.join(dst, name)
        if os.path.isfile(os.path.join(src, name)):
            os.chmod(os.path.join(src, name), mode)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(src, name), target)
    shutil.rmtree(src, ignore_errors=True)
