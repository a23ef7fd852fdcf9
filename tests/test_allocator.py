"""The glibc setting that keeps freed memory: large buffers come from the heap, and the user's own settings win."""

import os
import platform
import subprocess
import sys

import pytest

# Allocates 64 MiB and prints how many bytes glibc serves through mmap afterwards (mallinfo2's hblkhd).
PROBE = """
import ctypes, sys
from planer.training.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "apply" else None
buffer = bytearray(64 << 20)
print(applied, libc.mallinfo2().hblkhd)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")


def probe(mode: str, **env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=clean | env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@glibc
def test_large_buffers_come_from_the_heap_once_applied():
    applied, mapped = probe("apply")
    assert applied == "True"
    assert mapped < 64 << 20
    _, mapped_by_default = probe("default")
    assert mapped_by_default >= 64 << 20


@glibc
def test_the_users_own_glibc_settings_are_left_alone():
    applied, mapped = probe("apply", MALLOC_MMAP_THRESHOLD_="4096")
    assert applied == "False"
    assert mapped >= 64 << 20
