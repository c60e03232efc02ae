"""Data parallelism over the calibration windows: `torchrun --nproc-per-node N -m spikecompile convert ...`.

torchrun starts N processes and tells each its rank in the environment (RANK, LOCAL_RANK, WORLD_SIZE and the
rendezvous address); torch.distributed joins them, with NCCL between GPUs (one per process: LOCAL_RANK's) and gloo
between CPU processes. Every rank builds each decoder layer and runs its own contiguous share of the windows (and
of the prefix scans) through it; what the fit needs is gathered in rank order, which is window order, so the
result is the one process's bit for bit (tests/test_parallel.py). Rank 0 writes the checkpoint and model.pt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import SpikecompileError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the conversion's processes: rank in 0..world-1 (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous block of `count` items (the first count % world ranks take one more)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def gather(self, value) -> list:
        """Every rank's `value` (a picklable object; tensors on the CPU), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def launched_world_size() -> int:
    """How many processes torchrun started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among them (torchrun's RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched_ranks(device: str) -> Ranks:
    """The Ranks torchrun's environment gives (one process when WORLD_SIZE is absent or 1), with the process group
    joined: NCCL on CUDA, where this process takes GPU LOCAL_RANK, else gloo. SpikecompileError (one line) when the
    environment is incomplete or the node has fewer GPUs than processes."""
    world = launched_world_size()
    if world == 1:
        return Ranks()
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise SpikecompileError(f"WORLD_SIZE={world} without {', '.join(missing)} in the environment: start the "
                                f"processes with torchrun --nproc-per-node N -m spikecompile convert ...")
    import torch
    import torch.distributed as dist

    rank, local_rank = launched_rank(), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SpikecompileError(f"torchrun process {local_rank} on this node: only {torch.cuda.device_count()} "
                                    f"CUDA devices; give --nproc-per-node at most that")
        torch.cuda.set_device(local_rank)  # "cuda" in every placement is now this process's GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Ranks(rank, world)
