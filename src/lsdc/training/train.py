"""Train a config into a run folder (docs/ARCHITECTURE.md, "Run folder").

The same call trains on one process or, under ``torchrun --nproc_per_node N``, on N processes
with DistributedDataParallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lsdc.config import TrainConfig, load_config
from lsdc.distributed import init_distributed, set_torch_threads, shutdown_distributed
from lsdc.errors import UserError
from lsdc.tasks.base import create_task
from lsdc.training.engine import FoldResult, train_run
from lsdc.utils import check_input_dir


def train(
    config: str | Path | TrainConfig,
    data_root: str | Path,
    cache_dir: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> list[FoldResult]:
    """Train the configured folds of ``config`` into the run folder ``out_dir``.

    Args:
        config: a shipped config name (``two_stage_demo``), a YAML path, or a loaded config.
        data_root: competition root (``train.csv``, ``train_label_coordinates.csv``).
        cache_dir: the train split's cache (``lsdc preprocess``).
        out_dir: the run folder.
        overrides: dotted ``key=value`` overrides applied over ``config``.
        resume: continue each fold from its last checkpoint.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        progress: show progress bars (one summary line per epoch stays).

    Returns:
        One result per fold trained by this call.
    """
    if isinstance(config, TrainConfig):
        if overrides:
            raise UserError("overrides apply to a config name or file, not to a loaded config")
    else:
        config = load_config(config, list(overrides))
    for flag, folder in (("`data_root`", data_root), ("`cache_dir`", cache_dir)):
        check_input_dir(folder, flag)
    set_torch_threads(config.data.threads, config.data.num_workers)
    ctx = init_distributed(None if device == "auto" else device)
    try:
        task = create_task(config, Path(cache_dir), Path(data_root))
        return train_run(task, config, Path(out_dir), ctx, resume=resume, progress=progress)
    finally:
        shutdown_distributed()
