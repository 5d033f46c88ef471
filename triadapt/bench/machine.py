"""The machine a benchmark runs on: description, torch threads, malloc tuning, device sync."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    from triadapt.tracking import git_sha, package_versions

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": package_versions(),
        "git_sha": git_sha(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tune_malloc(mode: str) -> str:
    """``keep``: glibc malloc keeps freed memory mapped (no trimming of the heap top, no mmap for
    large blocks), so that a step does not page-fault its activations back in. Untuned, which
    steps fault depends on the allocation history of the whole process (tens of thousands of
    minor faults per MiniLM step here, for every method, the floor included), so methods that
    share one process would be timed partly on allocator luck."""
    if mode != "keep":
        return "default"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
        return "keep: mallopt(M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB)" if ok else "default (mallopt failed)"
    except (OSError, AttributeError):
        return "default (not glibc)"


def set_threads(choice: str) -> str:
    """Apply ``--threads``; return why this number. Oversubscribed OpenMP threads wait a scheduler
    slice at every parallel region, which times the scheduler rather than the code."""
    if choice != "auto":
        if int(choice) != torch.get_num_threads():
            torch.set_num_threads(int(choice))
        return "--threads"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cpus > 1 and load >= cpus / 2:
        torch.set_num_threads(1)
        return f"auto: 1-minute load average {load:.1f} on {cpus} CPUs, so 1 thread"
    return f"auto: load average {load:.1f} on {cpus} CPUs, torch's default"
