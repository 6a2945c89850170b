"""Serving a trained run: every fold's best weights over a cache, averaged."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lsdc.checkpoint import load_checkpoint
from lsdc.config import config_from_dict
from lsdc.distributed import DistContext
from lsdc.errors import UserError
from lsdc.rundir import RunDir
from lsdc.tasks.base import create_task
from lsdc.tasks.predict_loop import make_loader, predict_loader


def fold_checkpoints(run_dir: str | Path) -> list[Path]:
    """``fold{k}/best.pt`` of every trained fold of a run, in fold order.

    Raises:
        UserError: the run folder has none.
    """
    paths = [fold.best for fold in RunDir(run_dir).trained_folds()]
    if not paths:
        raise UserError(f"{run_dir}: no fold*/best.pt; is this an lsdc train run folder?")
    return paths


def predict_run(
    run_dir: str | Path,
    cache_dir: str | Path,
    study_ids: Sequence[int],
    tta_flip: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Uncalibrated probabilities (n, 25, 3) of ``study_ids``, in that order: the mean over the
    run's fold models (left-right flip TTA averaged in when ``tta_flip``).

    A study with no cached series still gets a row: the network sees zero volumes and
    "missing" flags, as in training.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = DistContext(rank=0, world_size=1, device=device)
    ids = np.asarray([int(s) for s in study_ids], dtype=np.int64)
    total = np.zeros((len(ids), 25, 3))
    paths = fold_checkpoints(run_dir)
    task = None
    for path in paths:
        ckpt = load_checkpoint(path, map_location=device)
        config = config_from_dict(ckpt["config"])
        if task is None:
            task = create_task(config, Path(cache_dir), data_root=None)
        state = ckpt["task_state"]
        model = task.build_model(state).to(device)
        model.load_state_dict(ckpt["model"])
        dataset = task.build_dataset(ids, state, train=False)
        loader = make_loader(dataset, config, ctx, train=False)
        studies, probs, _, _ = predict_loader(task, model, loader, ctx, config.optim.amp, tta_flip)
        order = np.searchsorted(studies, ids)
        total += probs[order]
    return total / len(paths)
