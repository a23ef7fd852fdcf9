"""Keep freed memory mapped in glibc's heap, so training steps on CPU stop page-faulting their buffers back in.

By default glibc serves every large allocation (from 128 KiB, growing to 32 MiB) with fresh pages from ``mmap``,
unmaps it when freed and trims the heap back to the system. A training step frees and reallocates the same
activations and gradients every time, so each step page-faults them in again: in MoE training at small batch the
kernel time was larger than the arithmetic (benchmarks/moe.py measures both settings). Keeping freed memory costs
no more peak memory than the step already needed, so ``planer`` turns it on when it starts, unless the user has
chosen glibc settings through its own environment variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # return free heap memory only above 1 GiB
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep it, on glibc; whether the settings were applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
