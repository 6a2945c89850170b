"""A registered task whose "model" answers each study with a known distribution.

Tests of what ``lsdc predict`` does around the model (listing, preprocessing, fallbacks,
calibration, ensembling, row order, the report) need predictions they can compute. A run of this
task (:func:`make_fixed_run`) is a real run folder served the one way every run is: ServedRun
reads its checkpoint, builds the task from the registry by its config's name, and the dataset,
loader and predict loop run as for a trained network. Nothing in the production code stands in
for the model.

The fold's task state says how the model answers: ``sharpness`` scales every study's logits
(a sharper run), ``raise_on`` lists studies whose batch raises (a crash on one study), and
``poison`` sets one row of a study to a value (a prediction that is no distribution).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from scipy.special import softmax

from lsdc.config import TrainConfig, write_config
from lsdc.contract import LABEL_COLUMNS, PRED_COLUMNS
from lsdc.preprocessing.cachedir import CacheDir
from lsdc.rundir import RunDir
from lsdc.tasks.base import TrainingTask, register_task

NAME = "fixed_probs"


def known_probs(study_id: int, sharpness: float = 1.0) -> np.ndarray:
    """The (25, 3) distribution a fixed run with ``sharpness`` gives ``study_id``."""
    logits = np.random.default_rng(int(study_id)).normal(size=(len(LABEL_COLUMNS), 3))
    return softmax(logits * sharpness, axis=-1)


class KnownAnswers(nn.Module):
    """No parameters: the answers follow from the study ids and the fold's task state."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__()
        self.sharpness = float(state.get("sharpness", 1.0))
        self.raise_on = {int(s) for s in state.get("raise_on", ())}
        self.poison = {int(s): (int(j), float(v)) for s, j, v in state.get("poison", ())}

    def forward(self, study_ids: torch.Tensor) -> torch.Tensor:
        ids = [int(s) for s in study_ids]
        crashing = sorted(self.raise_on.intersection(ids))
        if crashing:
            raise RuntimeError(f"CUDA out of memory (study {crashing[0]})")
        probs = np.stack([known_probs(s, self.sharpness) for s in ids])
        for i, s in enumerate(ids):
            if s in self.poison:
                row, value = self.poison[s]
                probs[i, row, :] = value
        return torch.as_tensor(probs, dtype=torch.float64)


@register_task
class FixedProbsTask(TrainingTask):
    """Serves :func:`known_probs`; refuses a study that is not in the cache (the caller must
    serve only cached studies)."""

    name = NAME

    def fit_state(self, train_study_ids: np.ndarray) -> dict[str, Any]:
        return {}

    def build_dataset(
        self, study_ids: np.ndarray, state: dict[str, Any], train: bool
    ) -> list[dict[str, torch.Tensor]]:
        cached = set(CacheDir(self.cache_dir).read_index()["study_id"].tolist())
        absent = sorted({int(s) for s in study_ids} - cached)
        if absent:
            raise AssertionError(f"studies {absent} are served but not in the cache")
        return [{"study_id": torch.tensor(int(s))} for s in study_ids]

    def build_model(self, state: dict[str, Any]) -> nn.Module:
        return KnownAnswers(state)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(batch["study_id"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return outputs.new_zeros(())

    def probabilities(
        self, outputs: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs, torch.ones(outputs.shape[:2], dtype=torch.bool, device=outputs.device)

    def flip_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch


def make_fixed_run(
    path: Path,
    prior_row: Sequence[float] = (0.7, 0.2, 0.1),
    sharpness: float = 1.0,
    raise_on: Sequence[int] = (),
    poison: Sequence[tuple[int, int, float]] = (),
) -> Path:
    """A one-fold run of the fixed task, as ``lsdc train`` leaves one for serving: config,
    class prior and ``fold0/best.pt``."""
    run = RunDir(path)
    run.fold(0).root.mkdir(parents=True)
    config = TrainConfig(task=NAME)
    write_config(config, run.config)
    state = {"sharpness": sharpness, "raise_on": list(raise_on), "poison": list(poison)}
    torch.save({"model": {}, "config": config.to_dict(), "task_state": state}, run.fold(0).best)
    prior = pd.DataFrame([list(prior_row)] * len(LABEL_COLUMNS), columns=list(PRED_COLUMNS))
    prior.insert(0, "label_column", list(LABEL_COLUMNS))
    prior.to_csv(run.class_prior, index=False)
    return path
