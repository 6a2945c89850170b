"""`lsdc train`: a config file + overrides -> a run folder (docs/ARCHITECTURE.md, "Runs").

The same command trains on one process or, under ``torchrun --nproc_per_node N``, on N
processes with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lsdc.errors import UserError
from lsdc.training.config import load_config
from lsdc.training.distributed import init_distributed, shutdown_distributed
from lsdc.training.engine import train_run
from lsdc.training.tasks import create_task


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``lsdc train``."""
    parser.add_argument(
        "--config",
        required=True,
        help="YAML config: a path, or a name in the repository's configs/ (e.g. tiny, demo)",
    )
    parser.add_argument("--data", required=True, type=Path, help="competition root (train.csv)")
    parser.add_argument("--cache", required=True, type=Path, help="cache of the train split")
    parser.add_argument("--out", required=True, type=Path, help="run folder to write")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. optim.epochs=3 folds.fold=0",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from each fold's last checkpoint",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (auto: CUDA when available)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (the one-line summary of each epoch stays)",
    )


def train_from_args(args: argparse.Namespace) -> int:
    """Run ``lsdc train``; returns the exit code."""
    config = load_config(args.config, args.overrides)
    for flag, folder in (("--data", args.data), ("--cache", args.cache)):
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: {flag} folder not found")
    ctx = init_distributed(None if args.device == "auto" else args.device)
    try:
        task = create_task(config, args.cache, args.data)
        train_run(task, config, args.out, ctx, resume=args.resume, progress=not args.no_progress)
    finally:
        shutdown_distributed()
    return 0
