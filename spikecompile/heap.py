"""glibc's heap: serve large tensors from it instead of fresh mappings (event-mode simulation is allocation-bound),
and give its freed pages back between the parts of a streamed pass.

glibc maps every allocation above its mmap threshold (at most 32 MiB) afresh and unmaps it on free, so the kernel
zero-fills each of its pages again on first touch. Event mode's [T, ...] stacks are above that ceiling (attention
scores [T, heads, S, S]: 76 MB at T = 8, S = 512), and on SmolLM2 the page faults cost more than the arithmetic
(a 76 MB cumsum: 52 ms fresh, 14 ms from the heap). M_MMAP_MAX = 0 serves the main thread's allocations from the
heap (other threads still fall back to mmap), and a 1 GiB M_TRIM_THRESHOLD keeps freed memory for the next node
rather than returning it to the system: the resident set stays near its peak until exit, and the peak can grow
by what fragmentation strands (bench/sim_smollm2.py reports it).

The streamed passes (prefix scan, calibration, sensitivity, eval) free a decoder layer and its activations after
each layer, but glibc keeps most of that freed memory in its heap: the resident set of the prefix scan grew by
28 MB per layer on SmolLM2 and about 220 MB per layer at LLaMA-3-8B width, a leak in all but name that makes the
peak grow with depth. release_freed_memory (malloc_trim) after each layer gives it back once more than 512 MiB
is free (RELEASE_ABOVE_BYTES).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_KEEP_FREED_BYTES = 1 << 30
_kept_free_bytes = 0
"""the free heap memory this process chose to keep (keep_large_allocations' trim threshold, once switched)"""


@functools.cache
def _libc():
    """The C library, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (<malloc.h>, glibc ≥ 2.33): every field a size_t."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_free_bytes() -> int | None:
    """Bytes the heap holds free (mallinfo2's fordblks: freed, not returned to the system), or None where the C
    library cannot say (not glibc, or glibc before 2.33)."""
    mallinfo2 = getattr(_libc(), "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


RELEASE_ABOVE_BYTES = 512 << 20
"""release_freed_memory's default: the free heap memory kept for reuse. Returning every freed page after each layer
made SmolLM2's prefix scan 25 % slower (the next layer touches them afresh, and the kernel zero-fills each one);
above 512 MiB the scan trims a few times, and the resident set stays within that of what it needs."""


def release_freed_memory(keep_bytes: int = RELEASE_ABOVE_BYTES) -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim(0)) when it holds more than keep_bytes
    free (always, where it cannot say how much): after a streamed pass frees a part, so that the resident set does
    not grow with what it freed. After keep_large_allocations, it keeps at least the 1 GiB that chose to keep.
    True when memory was returned; False where the C library has no malloc_trim (not glibc), which changes nothing
    but the resident set. Never changes a computed value."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    free = heap_free_bytes()
    return bool(trim(0)) if free is None or free > max(keep_bytes, _kept_free_bytes) else False


@functools.cache
def keep_large_allocations() -> bool:
    """Switch this process's malloc to reuse freed heap memory for large tensors (once; process-wide). False where
    the C library has no mallopt (not glibc), which changes nothing but speed."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    global _kept_free_bytes
    switched = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
    if switched:
        _kept_free_bytes = _KEEP_FREED_BYTES
    return switched
