"""Process-wide settings that the finescope command line applies at start.

glibc's malloc serves every allocation above a threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back
with ``munmap`` when freed, and it trims the top of its heap when enough memory there is free. A CPU step
allocates and frees the same large tensors every time (activations, the crop source, the image batch), so the
kernel maps them again and the first write to every 4 KiB page faults: a resnet18 fusion inference step of 16
BreakHis images took about 340 000 page faults per step. :func:`tune_allocator` turns both off for the process,
so freed memory stays in the heap and the next step reuses it. Resident memory then stays at its peak instead of
shrinking between steps (``benchmarks/malloc_cost.py`` measures the time, the faults and the peak both ways).

Allocators that tools such as PyTorch's CPU launcher preload (jemalloc, tcmalloc) cache memory on their own and
do not read these settings; neither do other C libraries (musl, macOS), where nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
ENV = "FINESCOPE_MALLOC"  # "default" leaves glibc's malloc as it is


def tune_allocator() -> bool:
    """Keep freed memory for reuse in glibc's malloc: no ``mmap`` for large blocks, no trimming of the heap.

    Does nothing (and returns False) where the C library is not glibc, or when the environment variable
    ``FINESCOPE_MALLOC`` is ``default``. Children forked afterwards (DataLoader workers) inherit the setting.

    Returns:
        Whether the setting was applied.
    """
    if os.environ.get(ENV, "").strip().lower() == "default":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


__all__ = ["ENV", "tune_allocator"]
