"""glibc allocator settings for training processes.

A training step allocates and frees the same large buffers (B x B similarity blocks, GAT scratch)
every step. glibc serves blocks above its mmap threshold with fresh mmaps and returns freed heap
tops to the OS, so each step page-faults its buffers in again; on DBP15K FR-EN that was 15-25 % of
the step (benchmarks/RESULTS.md). Keeping freed memory in the heap removes it, at ~10 % more RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter ids from glibc's malloc.h
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it (process-wide; glibc only).

    Returns whether the settings took effect (False on other platforms or C libraries).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
