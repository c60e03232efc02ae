"""Serve large tensors from glibc's heap instead of fresh mappings (event-mode simulation is allocation-bound).

glibc maps every allocation above its mmap threshold (at most 32 MiB) afresh and unmaps it on free, so the kernel
zero-fills each of its pages again on first touch. Event mode's [T, ...] stacks are above that ceiling (attention
scores [T, heads, S, S]: 76 MB at T = 8, S = 512), and on SmolLM2 the page faults cost more than the arithmetic
(a 76 MB cumsum: 52 ms fresh, 14 ms from the heap). M_MMAP_MAX = 0 serves the main thread's allocations from the
heap (other threads still fall back to mmap), and a 1 GiB M_TRIM_THRESHOLD keeps freed memory for the next node
rather than returning it to the system: the resident set stays near its peak until exit, and the peak can grow
by what fragmentation strands (bench/sim_smollm2.py reports it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_KEEP_FREED_BYTES = 1 << 30


@functools.cache
def keep_large_allocations() -> bool:
    """Switch this process's malloc to reuse freed heap memory for large tensors (once; process-wide). False where
    the C library has no mallopt (not glibc), which changes nothing but speed."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
