"""The one DataLoader of training, validation and serving: its order is a function of the
config's seed, the fold and the epoch alone, so a resumed run replays it exactly."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from lsdc.config import TrainConfig
from lsdc.distributed import DistContext


def make_loader(
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    ctx: DistContext,
    train: bool,
    epoch: int = 0,
    fold: int = 0,
) -> DataLoader:
    """A loader whose order depends only on (seed, fold, epoch): a resumed run replays it.
    Under DDP each rank gets its shard (for evaluation, without the padding repeats)."""
    seed = config.seed * 1000 + fold
    sampler: Iterable[int]
    if ctx.distributed and train:
        sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
    elif ctx.distributed:
        # Every sample exactly once over the ranks: DistributedSampler would pad the last shard
        # with repeats, and a repeated sample counts twice in the validation loss.
        sampler = range(ctx.rank, len(dataset), ctx.world_size)
    elif train:
        generator = torch.Generator().manual_seed(seed * 10_000 + epoch)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = range(len(dataset))
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=sampler,
        num_workers=config.data.num_workers,
        drop_last=train and len(dataset) > config.data.batch_size * ctx.world_size,
        persistent_workers=False,
        pin_memory=ctx.device.type == "cuda",
    )
