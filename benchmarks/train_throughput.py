"""Training throughput per whole-series architecture, and the data loader's throughput alone.

For each whole-series architecture config (``WHOLE_SERIES_CONFIGS``; the two-stage roles:
benchmarks/architectures.py), times optimiser steps on random batches of
the config's volume size and reports samples/s and peak memory (CUDA: peak allocated; CPU: the
peak resident set of a fresh process per architecture). With --data/--cache it also times the
training DataLoader (augmentation included) over the cache once the volumes are in RAM: it must
deliver more samples/s than the model consumes, or the loader is the bottleneck.

    python benchmarks/train_throughput.py --data ROOT --cache CACHE [--device cpu] [--steps 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

WHOLE_SERIES_CONFIGS = (
    "whole_baseline",
    "whole_segresnet",
    "whole_dynunet",
    "whole_swinunetr",
    "whole_vit",
)
"""The whole-series baselines (demo: resnet3d)."""


def _time_model(name: str, steps: int, batch_size: int, device: str, queue: mp.Queue) -> None:
    import torch

    from lsdc.config import load_config
    from lsdc.datasets.whole_study import N_META
    from lsdc.tasks.base import build_registered_model

    torch.manual_seed(0)
    config = load_config(name, [f"data.batch_size={batch_size}"])
    model = build_registered_model(
        config, img_size=config.data.volume_size, n_series=3, n_meta=N_META
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    volumes = torch.randn(batch_size, 3, *config.data.volume_size, device=device)
    meta = torch.randn(batch_size, N_META, device=device)
    target = torch.randint(0, 3, (batch_size, 25), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(
            model(volumes, meta).flatten(0, 1), target.flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocation, cuDNN autotuning
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    queue.put((name, config.data.volume_size, n_params, steps * batch_size / seconds, peak_mb))


def _time_loader(data: Path, cache: Path, batch_size: int, epochs: int) -> list[tuple[int, float]]:
    import numpy as np
    import torch

    from lsdc.config import load_config
    from lsdc.datasets.loader import make_loader
    from lsdc.distributed import DistContext
    from lsdc.tasks.base import create_task

    config = load_config("whole_baseline", [f"data.batch_size={batch_size}"])
    task = create_task(config, cache, data)
    ids = task.study_labels()["study_id"].to_numpy()
    state = task.fit_state(ids)  # reads every study once (the cold pass)
    dataset = task.build_dataset(np.asarray(ids), state, train=True)
    ctx = DistContext(0, 1, torch.device("cpu"))
    rates = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        started = time.perf_counter()
        n = sum(len(b["study_id"]) for b in make_loader(dataset, config, ctx, True, epoch))
        rates.append((epoch, n / (time.perf_counter() - started)))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="competition root (for the loader timing)")
    parser.add_argument("--cache", type=Path, help="train cache (for the loader timing)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--archs", nargs="*", default=list(WHOLE_SERIES_CONFIGS))
    args = parser.parse_args()

    ctx = mp.get_context("spawn")  # a fresh process per model: its own peak memory
    print(f"{'config':>16s} {'volume':>14s} {'params':>10s} {'samples/s':>10s} {'peak MiB':>9s}")
    for name in args.archs:
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_time_model, args=(name, args.steps, args.batch_size, args.device, queue)
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"{name:>16s} failed (exit code {proc.exitcode})")
            continue
        name, size, n_params, rate, peak = queue.get()
        print(f"{name:>16s} {str(tuple(size)):>14s} {n_params:>10,d} {rate:>10.1f} {peak:>9.0f}")
    if args.data and args.cache:
        for epoch, rate in _time_loader(args.data, args.cache, args.batch_size, epochs=2):
            print(
                f"data loader (demo config, augmentation on), epoch {epoch}: {rate:.1f} samples/s"
            )


if __name__ == "__main__":
    main()
