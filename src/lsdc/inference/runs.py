"""Serving a trained run: every fold's best weights over a cache, averaged."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsdc.checkpoint import load_checkpoint
from lsdc.config import (
    RESUMABLE_KEYS,
    TrainConfig,
    config_differences,
    config_from_dict,
    without_initial_weights,
)
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


def served_config(data: dict[str, Any]) -> TrainConfig:
    """A checkpoint's config for serving: without the files of initial weights of training
    (``model.weights``, every ``pretrained``), which the checkpoint already holds trained (and
    which the serving machine, an offline notebook, may not have)."""
    return without_initial_weights(config_from_dict(data))


def check_folds(run_dir: str | Path) -> None:
    """Refuse a run whose folds cannot all be served, before any minute is spent on the images:
    a fold checkpoint that cannot be read, or folds trained with configs that differ in more
    than how long they trained (:data:`lsdc.config.RESUMABLE_KEYS`), since a run's folds are
    averaged through one task built from the first fold's config.

    Raises:
        UserError: the checkpoint, or the two folds and the keys that differ.
    """
    first: tuple[Path, dict[str, Any]] | None = None
    for path in fold_checkpoints(run_dir):
        ckpt = load_checkpoint(path, map_location="cpu")
        missing = [key for key in ("config", "task_state") if key not in ckpt]
        if missing:
            raise UserError(f"{path}: not a checkpoint of lsdc train (no {', '.join(missing)})")
        if first is None:
            first = (path, ckpt["config"])
            continue
        changed = config_differences(
            first[1], ckpt["config"], ignore=frozenset({"folds.fold"}) | RESUMABLE_KEYS
        )
        if changed:
            raise UserError(
                f"{run_dir}: its folds come from different configs ({first[0]} and {path} "
                f"differ in {', '.join(changed)}); a run's folds must share one config"
            )


def predict_run(
    run_dir: str | Path,
    cache_dir: str | Path,
    study_ids: Sequence[int],
    tta_flip: bool = False,
    device: str | torch.device | None = None,
    folds: Sequence[int] | None = None,
) -> np.ndarray:
    """Uncalibrated probabilities (n, 25, 3) of ``study_ids``, in that order: the mean over the
    run's fold models (left-right flip TTA averaged in when ``tta_flip``).

    A study with no cached series still gets a row: the network sees zero volumes and
    "missing" flags, as in training.

    Args:
        folds: serve only these folds' models (e.g. one fold on its own validation studies, as
            ``lsdc evaluate --tta`` does to calibrate out of sample); default every trained fold.

    Raises:
        UserError: a fold asked for has no trained model.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = DistContext(rank=0, world_size=1, device=device)
    ids = np.asarray([int(s) for s in study_ids], dtype=np.int64)
    total = np.zeros((len(ids), 25, 3))
    paths = fold_checkpoints(run_dir)
    if folds is not None:
        chosen = [RunDir(run_dir).fold(int(k)).best for k in folds]
        untrained = [str(p) for p in chosen if p not in paths]
        if untrained:
            raise UserError(f"{', '.join(untrained)}: not found; that fold has no trained model")
        paths = chosen
    task = None
    for path in paths:
        ckpt = load_checkpoint(path, map_location=device)
        config = served_config(ckpt["config"])
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
