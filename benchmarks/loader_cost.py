"""Per-sample cost of the two-stage training items at full size, against the whole-volume reads
they replaced.

    python benchmarks/loader_cost.py --data ROOT --cache CACHE [--passes 2]

ROOT is a competition root (``lsdc synth --profile competition``) and CACHE its preprocessed
train split. In one process and one thread, it builds every training item of the cache (the
localizer's three grid volumes with their targets, and the 25 jittered level crops) once per
pass, with a fresh store per pass as each epoch's new loader workers have:

- ``whole volumes``: the reads issue 11 replaced, rebuilt here for the comparison: every item
  samples each series onto the localizer grid from all its voxels, and every crop converts its
  whole stack to float32 before interpolating;
- ``shipped, first pass``: the localizer grids do not exist yet; each is computed from the
  stacks and written into the cache (``lsdc.preprocessing.cache.series_grid_path``);
- ``shipped, later passes``: the grids are read back; crops read only their neighbourhood.

Prints ms per item and items/s for each, with the load average.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def one_pass(data: Path, cache: Path) -> tuple[int, float]:
    """Build every training item once with a fresh task (store); (items, seconds)."""
    from lsdc.config import load_config
    from lsdc.tasks.base import create_task

    config = load_config("two_stage", ["data.cache_in_memory=false"])
    task = create_task(config, cache, data)
    ids = task.training_labels()["study_id"].to_numpy()
    task.labelled_points()
    dataset = task.build_dataset(np.asarray(ids), {}, train=True)
    started = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--passes", type=int, default=2, help="timed passes of each kind")
    args = parser.parse_args()

    import torch

    import lsdc.datasets.crops as crops
    from lsdc.datasets.levels import StackStore

    torch.set_num_threads(1)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")

    def report(name: str, items: int, seconds: float) -> None:
        print(
            f"{name:28s} {1000 * seconds / items:7.0f} ms/item  {items / seconds:6.2f} items/s"
            f"   ({items} items, load {os.getloadavg()[0]:.1f})",
            flush=True,
        )

    shipped_volume, shipped_block = StackStore.stored_series_volume, crops._covering_block
    StackStore.stored_series_volume = StackStore.series_volume
    crops._covering_block = lambda array, coordinates: (
        np.asarray(array, dtype=np.float32),
        np.zeros(3),
    )
    for _ in range(args.passes):
        report("whole volumes", *one_pass(args.data, args.cache))
    StackStore.stored_series_volume, crops._covering_block = shipped_volume, shipped_block

    for grid_file in args.cache.glob("*/grid*.npz"):
        grid_file.unlink()
    report("shipped, first pass", *one_pass(args.data, args.cache))
    for _ in range(args.passes):
        report("shipped, later passes", *one_pass(args.data, args.cache))


if __name__ == "__main__":
    main()
