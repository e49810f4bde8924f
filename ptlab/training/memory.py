"""Device memory: the peak of one piece of work, even when a process runs several (a Hydra
multirun's jobs), and an error that says the device ran out of it (`out_of_memory_error`).

CUDA: the allocator's peak since a reset. CPU: the RSS high-water mark, which Linux resets through
`/proc/self/clear_refs` after `malloc_trim` has handed freed heap pages back; without that file
(not Linux) it is the process's lifetime peak.
"""

from __future__ import annotations

import ctypes
import resource

import torch


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """MiB: CUDA max allocated on a GPU; the RSS high-water mark (since the last reset) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return proc_status_kb("VmHWM") / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def out_of_memory_error(error: Exception) -> bool:
    """Whether `error` is the device running out of memory (CUDA's, or the CPU allocator's words)."""
    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in message or "not enough memory" in message
