"""DistributedDataParallel plumbing: one process per device, started by ``torchrun``.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op, so the
same code path trains on one process and on many.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lsdc.errors import UserError
from lsdc.utils import usable_cpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device
    joined: bool = False
    """A process group was joined (torchrun), even of one process: the model is wrapped in DDP
    and batches are sharded, so ``torchrun --nproc_per_node 1`` runs the DDP/NCCL path."""

    @property
    def is_primary(self) -> bool:
        """Only the primary rank writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.joined


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The torch device ``name`` asks for (None or ``auto``: CUDA when available, else CPU).

    Raises:
        UserError: not a device name, or a CUDA device this machine does not have (a run that
            silently fell back to the CPU, or to nothing, would hide it).
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"`device={name}`: not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"`device={name}`: no CUDA device on this machine; use `device=cpu`")
        if device.index is not None and device.index >= count:
            raise UserError(f"`device={name}`: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"`device={name}`: lsdc runs on cpu or cuda")
    return device


def choose_threads(requested: int, loader_workers: int) -> int:
    """Torch threads for this process: ``requested`` if > 0, else ``OMP_NUM_THREADS`` if set
    (the user's choice), else the usable CPUs shared among torchrun's local processes, less
    this process's loader workers (each of which takes a core while it decodes), at least 1.

    Torch's default (every core of the machine, in every process) oversubscribes as soon as
    loader workers or other ranks run beside it, and threads that wait at each operator's
    barrier for a thread that has no core cost far more than a fair share (docs/results.md,
    "A busy machine").
    """
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, usable_cpus() // local_ranks - loader_workers)


def set_torch_threads(requested: int, loader_workers: int) -> int:
    """Set torch's intra-op and inter-op threads to :func:`choose_threads`; returns the count.

    The inter-op pool can be sized only before its first use; a process that already used it
    (a second training in one Python session) keeps its size, logged.
    """
    n = choose_threads(requested, loader_workers)
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:
            log.debug(
                "torch inter-op threads stay %d (already in use)", torch.get_num_interop_threads()
            )
    log.debug(
        "torch threads: %d (usable CPUs %d, loader workers %d)", n, usable_cpus(), loader_workers
    )
    return n


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on CUDA).

    torchrun sets ``MASTER_ADDR`` and ``WORLD_SIZE`` for every worker; the group is joined then
    even for one process, so a one-GPU machine can check the NCCL/DDP path.

    Args:
        device: ``cpu``, ``cuda`` or None (CUDA when available).
    """
    use_cuda = resolve_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = world_size > 1 or {"MASTER_ADDR", "WORLD_SIZE"} <= os.environ.keys()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    joined = dist.is_initialized()
    if use_cuda:
        return DistContext(rank, world_size, torch.device("cuda", local_rank), joined)
    return DistContext(rank, world_size, torch.device("cpu"), joined)


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
