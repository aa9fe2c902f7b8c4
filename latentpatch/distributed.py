"""Process-group setup for `torchrun` (one node or many) and the few rank helpers training and generation need.

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one process. A process group
the caller already initialised (tests use a file:// rendezvous) is used as it is and left open.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latentpatch.device import resolve_device


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when we initialised the process group (and so must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, resolve_device(device, local), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, resolve_device(device), owns_group=False)
    rank, local = _launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, timeout=datetime.timedelta(minutes=30), device_id=dev if dev.type == "cuda" else None
    )
    return DistInfo(rank, world, local, dev, owns_group=True)


def _launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """`DistInfo.is_main` of this process, also before or after its group exists (the CLI's report lines)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _launched_rank() == 0


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (in place on a copy); identity for one process."""
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size

