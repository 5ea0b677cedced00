"""Shared by every section: constants, interleaved timing, the machine line, the library's identity."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cagrad_clip

#: CAGrad trust-region radius used throughout the benchmark.
C = 0.4
#: Default report folder.
RESULTS = Path("results/speed")

Log = Callable[[str], None]


def median_ms(samples: list[float]) -> float:
    """Median of ``samples`` (seconds) in milliseconds."""
    return 1e3 * statistics.median(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time (ms) of each callable; they run in rounds so load drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: median_ms(v) for k, v in samples.items()}


def library_version() -> str:
    """Where ``cagrad_clip`` was imported from and its git commit (``+dirty`` if its folder has local changes)."""
    root = Path(cagrad_clip.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        return f"cagrad_clip at commit {commit}{'+dirty' if dirty else ''} ({root})"
    except (OSError, subprocess.SubprocessError):
        return f"cagrad_clip from {root} (not a git checkout)"


def machine(torchjd_note: str) -> str:
    """One line describing the machine, the threads, the peers and the load at start."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {torchjd_note}; "
        f"load average at start {load:.1f}"
    )


def keep_freed_memory() -> str:
    """Make glibc's allocator keep freed memory for reuse, as CUDA's caching allocator does.

    By default glibc hands large freed blocks back to the kernel (``mmap`` / heap trimming), so a
    method that holds more memory at once than another re-faults fresh, zeroed pages every step, a
    cost a GPU run never pays. Raising ``M_MMAP_THRESHOLD`` to its maximum (32 MiB) and
    ``M_TRIM_THRESHOLD`` keeps such blocks in the process. Returns a line for the report; raises
    ``OSError`` where the C library has no ``mallopt`` (not glibc).
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if not hasattr(libc, "mallopt") or not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise OSError("--allocator caching needs glibc's mallopt; run with --allocator system")
    return "glibc malloc keeping freed memory (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB): like a caching allocator"
