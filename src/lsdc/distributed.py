"""DistributedDataParallel plumbing: one process per device, started by ``torchrun``.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op, so the
same code path trains on one process and on many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        """Only the primary rank writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on CUDA).

    Args:
        device: ``cpu``, ``cuda`` or None (CUDA when available).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return DistContext(rank, world_size, torch.device("cuda", local_rank))
    return DistContext(rank, world_size, torch.device("cpu"))


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_across_ranks(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over ranks (e.g. loss sums and sample counts)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if ctx.distributed:
        dist.barrier()
