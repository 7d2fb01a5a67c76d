"""What the speed benchmarks share: peak memory, device sync and the machine description in their JSON."""

from __future__ import annotations

import os
import platform
import resource

import torch


def peak_mib(device: str) -> float:
    """Peak so far: tensors on CUDA (max_memory_allocated), the whole process's RSS on CPU (ru_maxrss)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_mib(device: str) -> float:
    """In use now: tensors on CUDA (memory_allocated), the process's resident set on CPU (/proc/self/statm).

    ``peak_mib(device) - current_mib(device)`` taken before a piece of work is what that work added at its peak,
    provided (on CPU) that its peak exceeds the process's earlier high-water mark; run it in a fresh process after
    a small warm-up so that it does. Without /proc (not Linux) the CPU figure falls back to ru_maxrss.
    """
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_mib(device)


def reset_peak(device: str) -> None:
    """Start a new CUDA peak (the CPU high-water mark cannot be reset: measure in a fresh process)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"processor": platform.processor(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device, "device_name": name}


def resolve_device(choice: str) -> str:
    """device=auto|cpu|cuda -> cpu or cuda; asking for CUDA where there is none is a ConfigError (one line, exit 1)."""
    from masc_llamagen.utils.devices import pick_device

    return pick_device(choice).type
