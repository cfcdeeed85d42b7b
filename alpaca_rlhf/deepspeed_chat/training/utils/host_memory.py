"""Host-memory allocator settings for runs on the CPU accelerator.

Why: a training iteration frees and re-allocates the same few hundred megabytes of activations every step.
glibc's malloc hands large blocks back to the kernel (blocks above its mmap threshold are unmapped on free, the
top of the heap is trimmed), so the next step touches fresh pages, and the kernel zeroes every 4 KiB page on
its first touch. Measured on the `small` PPO benchmark (bench/ppo_throughput.py, 2 cores): 45-50 thousand page
faults per iteration and about 6% of its time. Keeping freed memory in the process (the largest mmap
threshold glibc allows, no trimming) brings that to none; the peak resident memory stays where it was, since
the same blocks are reused. On GPUs the activations live on the device, so nothing is changed there.
"""
import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit systems; larger blocks are always mapped
NEVER_TRIM = -1                # `man mallopt`: -1 disables trimming completely


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel. Returns True when set;
    False on another C library, or when the user already chose (MALLOC_* variables, a preloaded allocator)."""
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
