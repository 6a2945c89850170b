"""One way to serve a trained run (or its export): open it, check it once, predict or explain.

Modelled on detectron2's ``DefaultPredictor``: ``lsdc predict``, ``lsdc show``, the report's
gallery, the served out-of-fold predictions of ``lsdc evaluate --tta`` and the localisation OOF
all open a run through :class:`ServedRun`, so the config -> task -> model -> weights chain and the
refusals of an unusable run exist once. What a task can show about a prediction beyond its
probabilities (points, crops) comes from the task's hooks (:meth:`TrainingTask.locate`,
:meth:`TrainingTask.crops_around`), so no caller branches on a task class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import default_collate

from lsdc.checkpoint import load_checkpoint
from lsdc.config import (
    RESUMABLE_KEYS,
    config_differences,
    config_from_dict,
    without_initial_weights,
)
from lsdc.datasets.loader import make_loader
from lsdc.distributed import DistContext
from lsdc.errors import UserError
from lsdc.rundir import RunDir
from lsdc.tasks.base import TrainingTask, create_task
from lsdc.tasks.predict_loop import predict_loader


@dataclass(frozen=True)
class StudyExplanation:
    """What a run's model(s) say about one study: probabilities and, from a task with the hooks
    (the two-stage task), the points it locates and the crops cut around them."""

    probs: np.ndarray
    """(25, 3) probabilities."""
    source: str
    """Which fold models answered, in words."""
    points: np.ndarray | None = None
    """(25, 3) patient points (NaN unknown), or None when the task locates nothing."""
    crops: np.ndarray | None = None
    crops_present: np.ndarray | None = None


class ServedRun:
    """A run's (or an export's) fold models over one cache, each built once, on first use.

    Opening reads every fold checkpoint and refuses, before any minute is spent on images, a
    folder with no trained fold, a checkpoint that is not lsdc train's, or folds trained with
    configs that differ in more than how long they trained (:data:`lsdc.config.RESUMABLE_KEYS`),
    since the folds are averaged through one task built from the first fold's config.

    Args:
        run_dir: the run folder or an export's run folder.
        cache_dir: the preprocessed cache of the studies to serve (it need not exist yet).
        device: torch device; None picks CUDA when available.

    Raises:
        UserError: naming the folder or checkpoint and the problem.
    """

    def __init__(
        self, run_dir: str | Path, cache_dir: str | Path, device: str | torch.device | None = None
    ) -> None:
        self.run_dir, self.cache_dir = Path(run_dir), Path(cache_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.paths = RunDir(self.run_dir).checkpoints()
        self._checkpoints = {k: self._read(p) for k, p in self.paths.items()}
        first_fold = min(self.paths)
        first = self._checkpoints[first_fold]["config"]
        for fold, ckpt in self._checkpoints.items():
            changed = config_differences(
                first, ckpt["config"], ignore=frozenset({"folds.fold"}) | RESUMABLE_KEYS
            )
            if changed:
                raise UserError(
                    f"{self.run_dir}: its folds come from different configs "
                    f"({self.paths[first_fold]} and {self.paths[fold]} differ in "
                    f"{', '.join(changed)}); a run's folds must share one config"
                )
        self.config = without_initial_weights(config_from_dict(first))
        run = RunDir(self.run_dir)
        self.fold_of: dict[int, int] = {}
        """study_id -> the fold whose validation set holds it (``folds.csv``; empty in an export)."""
        if run.folds.is_file():
            folds = pd.read_csv(run.folds)
            self.fold_of = {int(s): int(f) for s, f in zip(folds.study_id, folds.fold, strict=True)}
        self._task: TrainingTask | None = None
        self._models: dict[int, nn.Module] = {}

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        ckpt = load_checkpoint(path, map_location="cpu")
        missing = [key for key in ("config", "task_state") if key not in ckpt]
        if missing:
            raise UserError(f"{path}: not a checkpoint of lsdc train (no {', '.join(missing)})")
        return ckpt

    @property
    def folds(self) -> list[int]:
        """The trained folds, in order."""
        return sorted(self.paths)

    @property
    def task(self) -> TrainingTask:
        """The run's task over the cache, built from the served config (no labels)."""
        if self._task is None:
            self._task = create_task(self.config, self.cache_dir, data_root=None)
        return self._task

    def state(self, fold: int) -> dict[str, Any]:
        """The fold's task state (its training statistics)."""
        return self._checkpoints[fold]["task_state"]

    def model(self, fold: int) -> nn.Module:
        """The fold's trained network on the device, in eval mode."""
        if fold not in self._models:
            model = self.task.build_model(self.state(fold))
            model.load_state_dict(self._checkpoints[fold]["model"])
            self._models[fold] = model.to(self.device).eval()
        return self._models[fold]

    def _chosen(self, folds: Sequence[int] | None) -> list[int]:
        if folds is None:
            return self.folds
        chosen = [int(k) for k in folds]
        untrained = [str(RunDir(self.run_dir).fold(k).best) for k in chosen if k not in self.paths]
        if untrained:
            raise UserError(f"{', '.join(untrained)}: not found; that fold has no trained model")
        return chosen

    def predict(
        self, study_ids: Sequence[int], tta: bool = False, folds: Sequence[int] | None = None
    ) -> np.ndarray:
        """Uncalibrated probabilities (n, 25, 3) of ``study_ids``, in that order: the mean over
        the fold models.

        A study with no cached series still gets a row: the network sees zero volumes and
        "missing" flags, as in training.

        Args:
            tta: average in the left-right mirrored prediction (labels swapped back).
            folds: only these folds' models (e.g. one fold on its own validation studies, to
                calibrate out of sample); default every trained fold.

        Raises:
            UserError: a fold asked for has no trained model.
        """
        ctx = DistContext(rank=0, world_size=1, device=self.device)
        ids = np.asarray([int(s) for s in study_ids], dtype=np.int64)
        chosen = self._chosen(folds)
        total = np.zeros((len(ids), 25, 3))
        for fold in chosen:
            dataset = self.task.build_dataset(ids, self.state(fold), train=False)
            loader = make_loader(dataset, self.config, ctx, train=False)
            studies, probs, _, _ = predict_loader(
                self.task, self.model(fold), loader, ctx, self.config.optim.amp, tta
            )
            total += probs[np.searchsorted(studies, ids)]
        return total / len(chosen)

    def _batch(self, study_id: int, fold: int) -> dict[str, Any]:
        item = self.task.build_dataset(np.array([study_id]), self.state(fold), train=False)[0]
        batch = default_collate([item])
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.no_grad()
    def locate(self, study_id: int, folds: Sequence[int] | None = None) -> np.ndarray | None:
        """(25, 3) patient points the task's localizer finds in a study (mean over ``folds``,
        default every fold); None for a task that locates nothing."""
        found = []
        for fold in self._chosen(folds):
            points = self.task.locate(self.model(fold), self._batch(int(study_id), fold))
            if points is None:
                return None
            found.append(points[0])
        return np.mean(found, axis=0)

    @torch.no_grad()
    def explain(self, study_id: int) -> StudyExplanation:
        """Probabilities, points and crops of one study, as ``lsdc show`` draws them.

        A study in a trained fold's validation set is served by that fold's model alone (the
        model that never saw it, as in ``oof.csv``); any other by every fold, probabilities and
        points averaged (the uncalibrated mean ``lsdc predict`` starts from).
        """
        study_id = int(study_id)
        own = self.fold_of.get(study_id)
        if own in self.paths:
            folds = [own]
            source = f"fold {own} model (out of fold: the study is in its validation set)"
        else:
            folds = self.folds
            source = f"mean of the fold models {', '.join(map(str, folds))}"
        probs, points = [], []
        for fold in folds:
            model, batch = self.model(fold), self._batch(study_id, fold)
            p, _ = self.task.probabilities(self.task.forward(model, batch), batch)
            probs.append(p[0].float().cpu().numpy().astype(np.float64))
            located = self.task.locate(model, batch)
            if located is not None:
                points.append(located[0])
        mean_probs = np.mean(probs, axis=0)
        if not points:
            return StudyExplanation(mean_probs, source)
        mean_points = np.mean(points, axis=0)
        cut = self.task.crops_around(study_id, mean_points)
        crops, present = cut if cut is not None else (None, None)
        return StudyExplanation(mean_probs, source, mean_points, crops, present)
