"""Process-group setup shared by every step: works under the DeepSpeed launcher (any number of ranks and
nodes) and as a plain `python main.py` one-rank run, on GPUs (nccl) and on the CPU accelerator (gloo)."""
import datetime
import os
import socket
import sys
import uuid
from dataclasses import dataclass

import torch

from .host_memory import keep_freed_host_memory


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce gives every rank a 66 MB /dev/shm buffer that nothing ever deletes: each
    run left 66 MB per rank in memory until the machine rebooted (17 GB after a day of tests here). Once every
    rank has mapped every buffer (init_distributed maps them all before returning, hence the barrier), the names
    can go: the mappings stay valid until the processes exit, even when they are killed."""
    torch.distributed.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(os.getuid(), os.environ.get("MASTER_ADDR", ""),
                                                          os.environ.get("MASTER_PORT", ""),
                                                          torch.distributed.get_rank())
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass  # no shm op on this build, or another naming: nothing to clean


def local_world_size() -> int:
    """Ranks on this node, as the launcher says (torchrun: LOCAL_WORLD_SIZE, DeepSpeed's launcher: LOCAL_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def init_distributed(local_rank: int = -1, timeout_minutes: float = 30) -> DistInfo:
    """Start the process group (once) and pick this rank's device through DeepSpeed's accelerator.
    timeout_minutes: how long a collective waits for the other ranks before the run fails (--dist_timeout)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and local_rank in (-1, 0):
        # Started without a launcher: make a world of one so DeepSpeed's engines work unchanged.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank, 0)))
    # DeepSpeed JIT-builds its ops (the CPU shm all-reduce, CPU Adam) with the first `ninja` on PATH and caches
    # them in ~/.cache/torch_extensions. Two ninja versions (the environment's and the system's) discard each
    # other's build log and rebuild every time, so always prefer the one installed beside this interpreter.
    bin_dir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bin_dir, "ninja")) and not os.environ.get("PATH", "").startswith(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # Ranks on one machine share its cores: without this each rank starts one thread per core and
        # they fight over them (much slower than dividing the cores).
        local_world = local_world_size()
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // max(local_world, 1))
        torch.set_num_threads(threads)
        keep_freed_host_memory()  # no page faults on re-allocated activations every step
    else:
        accelerator.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
        if accelerator.device_name() == "cpu":
            _unlink_shm_buffer()
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), device)


def shared_by_all_nodes(path: str, device: torch.device) -> bool:
    """Whether every node sees the same `path` (a shared filesystem) or each has its own (node-local disks).
    Collective. One node: trivially shared. Rank 0 writes a uniquely named marker; the path is shared when
    every rank sees it."""
    from .utils import any_rank, barrier
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if local_world_size() >= world:
        return True
    os.makedirs(path, exist_ok=True)
    token = [uuid.uuid4().hex if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    marker = os.path.join(path, f".shared-check-{token[0]}")
    if torch.distributed.get_rank() == 0:
        open(marker, "w").close()
    barrier()
    unseen = any_rank(not os.path.exists(marker), device)
    barrier()
    if torch.distributed.get_rank() == 0:
        os.remove(marker)
    return not unseen
