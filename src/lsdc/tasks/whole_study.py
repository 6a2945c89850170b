"""The ``whole_study`` task: the three series of a study -> one 3D network -> 25 x 3 logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from lsdc.config import ConfigError, TrainConfig
from lsdc.contract import LABEL_COLUMNS, SERIES_DESCRIPTIONS
from lsdc.datasets.transforms import flip_left_right, training_transforms
from lsdc.datasets.whole_study import (
    N_META,
    StudyVolumeStore,
    WholeStudyDataset,
    fit_meta_normaliser,
)
from lsdc.tasks.base import TrainingTask, build_registered_model, register_task
from lsdc.tasks.losses import severity_loss


@register_task
class WholeStudyTask(TrainingTask):
    """Whole series through a registered whole-study model (``resnet3d``, ``vit``, ...)."""

    name = "whole_study"

    def __init__(self, config: TrainConfig, cache_dir: Path, data_root: Path | None) -> None:
        if config.task_params:
            raise ConfigError(
                f"task whole_study takes no task_params; got {sorted(config.task_params)}"
            )
        super().__init__(config, cache_dir, data_root)
        self.store = StudyVolumeStore(
            self.cache_dir, config.data.volume_size, config.data.cache_in_memory
        )
        self._labels = None

    def _training_labels(self):
        if self._labels is None:
            self._labels = self.study_labels()
        return self._labels

    def fit_state(self, train_study_ids: np.ndarray) -> dict[str, Any]:
        return {"meta_normaliser": fit_meta_normaliser(self.store, train_study_ids)}

    def build_dataset(self, study_ids: np.ndarray, state: dict[str, Any], train: bool) -> Dataset:
        transform = training_transforms(self.config.augment) if train else None
        labels = self._training_labels() if self.data_root is not None else None
        return WholeStudyDataset(
            self.store,
            study_ids,
            state["meta_normaliser"],
            labels=labels,
            transform=transform,
            seed=self.config.seed,
        )

    def build_model(self, state: dict[str, Any]) -> nn.Module:
        return build_registered_model(
            self.config,
            img_size=tuple(self.config.data.volume_size),
            n_series=len(SERIES_DESCRIPTIONS),
            n_meta=N_META,
        )

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(batch["volumes"], batch["meta"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return severity_loss(outputs, batch["target"], self.config.loss.any_severe_weight)

    def probabilities(
        self, outputs: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = outputs.float().softmax(dim=-1)
        return probs, torch.ones(
            probs.shape[0], len(LABEL_COLUMNS), dtype=torch.bool, device=probs.device
        )

    def flip_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        flipped = dict(batch)
        flipped["volumes"] = torch.stack(
            [
                flip_left_right({"volumes": v, "lr_axis": a})["volumes"]
                for v, a in zip(batch["volumes"], batch["lr_axis"], strict=True)
            ]
        )
        return flipped
