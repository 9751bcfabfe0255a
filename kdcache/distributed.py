"""Process-group plumbing shared by both jobs: who am I under torchrun, and a barrier.

Both jobs run unchanged as a single process or under `torchrun --nproc-per-node N`; torchrun sets
RANK / WORLD_SIZE / LOCAL_RANK, a plain `python`/`kdcache` call sets none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def topology() -> Topology:
    """Rank, world size and local rank from torchrun's environment (0, 1, 0 without torchrun)."""
    return Topology(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_process_group(topo: Topology, backend: str) -> None:
    """Join the process group when running under torchrun (a single process has none)."""
    if topo.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str, topo: Topology) -> torch.device:
    """`auto` picks this rank's GPU when there is one, else the CPU."""
    if device == "auto":
        device = f"cuda:{topo.local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and topo.world_size > 1:
        device = f"cuda:{topo.local_rank}"
    return torch.device(device)

