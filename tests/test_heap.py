"""heap.release_freed_memory: glibc keeps in its heap what a streamed pass frees between layers (the prefix scan's
resident set grew by 28 MB per SmolLM2 layer, about 220 MB per LLaMA-3-8B-wide one); malloc_trim gives it back once
the heap holds more than a threshold free."""

import platform

import pytest
import torch

from spikecompile import heap
from spikecompile.heap import heap_free_bytes, release_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
pytestmark = pytest.mark.skipif(not GLIBC, reason="malloc_trim and mallinfo2 are glibc's")
HOLES, HOLE_ELEMENTS = 800, 16_384  # 64 KiB each: below glibc's mmap threshold, so they come from the heap


def _anon_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


def _holes() -> list[torch.Tensor]:
    """HOLES 64 KiB tensors freed between kept ones (returned: the kept), all filled first so that their pages are
    resident (freed one by one instead, each would be reused by the next)."""
    tensors = [torch.ones(HOLE_ELEMENTS) for _ in range(2 * HOLES)]
    return tensors[1::2]


def test_freed_memory_is_returned_above_the_threshold(monkeypatch):
    monkeypatch.setattr(heap, "_kept_free_bytes", 0)  # as if no test before had switched keep_large_allocations on
    kept = _holes()
    assert heap_free_bytes() >= HOLES * HOLE_ELEMENTS * 4 * 0.9  # the holes stay in the heap, free
    resident = _anon_mb()
    assert release_freed_memory(keep_bytes=0)
    assert _anon_mb() <= resident - 0.6 * HOLES * HOLE_ELEMENTS * 4 / 2**20  # their pages went back
    assert all(float(tensor.sum()) == HOLE_ELEMENTS for tensor in kept)  # the live tensors are untouched


def test_free_memory_within_the_threshold_is_kept(monkeypatch):
    monkeypatch.setattr(heap, "_kept_free_bytes", 0)
    kept = _holes()
    free = heap_free_bytes()
    assert not release_freed_memory(keep_bytes=free + 1)
    assert heap_free_bytes() >= free - HOLE_ELEMENTS * 4  # nothing was trimmed (another thread may allocate a little)
    del kept


def test_a_process_that_keeps_freed_memory_keeps_its_gibibyte(monkeypatch):
    """After keep_large_allocations (the simulator's: freed memory kept for its next large tensor), the streamed
    passes trim only beyond the 1 GiB it chose to keep."""
    monkeypatch.setattr(heap, "_kept_free_bytes", heap._KEEP_FREED_BYTES)
    kept = _holes()
    assert heap_free_bytes() < heap._KEEP_FREED_BYTES
    assert not release_freed_memory(keep_bytes=0)
    del kept
