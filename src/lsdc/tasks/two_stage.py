"""The ``two_stage`` task: localise every finding, then grade a crop around each one.

One network, two parts, trained together by the one engine: a heatmap localizer
(``lsdc.models.localizer``, a ``localizer`` model named by ``task_params.localizer.name``) reads
each series on a fixed grid and is supervised by the label coordinates; a level grader
(``lsdc.models.level_grader``, a ``grader`` model named by the config's ``model.name``) grades 25
crops per study. During training the crops are cut around the *labelled* points, jittered by about
stage 1's error; at validation and inference they are cut around the points the localizer
predicts, so the OOF score is that of the served pipeline. Because both parts live in one module,
folds, AMP, EMA, checkpoints, exact resume, DDP, OOF and serving (``ServedRun``) work unchanged.

Task settings (``task_params``, every key checked): see :class:`TwoStageParams`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from lsdc.config import ConfigError, TrainConfig, build_section
from lsdc.contract import (
    LEFT_RIGHT_PERMUTATION,
    N_LABELS,
    PRED_COLUMNS,
    class_prior,
    labels_to_indices,
    load_label_coordinates,
)
from lsdc.datasets.crops import CropSpec
from lsdc.datasets.levels import (
    LABEL_SERIES,
    CropAugment,
    StackStore,
    TwoStageDataset,
    fuse_points,
    label_points_mm,
    study_crops,
)
from lsdc.models.localizer import heads_loss, soft_argmax
from lsdc.models.registry import list_models, model_roles
from lsdc.tasks.base import (
    TrainingTask,
    build_network,
    build_registered_model,
    check_network,
    register_task,
)
from lsdc.tasks.losses import severity_loss


@dataclass
class LocalizerChoice:
    """``task_params.localizer``: the stage-1 network, as ``model`` names stage 2's."""

    name: str = "basicunet"
    """A ``localizer`` model: basicunet, unet, segresnet, dynunet or swinunetr."""
    params: dict[str, Any] = field(default_factory=dict)
    """Its constructor's keyword arguments (sizes); ``n_points`` and ``grid`` come from the task."""


@dataclass
class TwoStageParams:
    """``task_params`` of the two_stage task. (Stage 2, the grader, is the config's ``model``:
    ``model.name`` a ``grader`` model, ``model.params`` its keywords.)

    Attributes:
        localizer: the stage-1 network's name and keyword arguments (:class:`LocalizerChoice`).
        localizer_weight: weight of the localisation loss beside the grading loss.
        heatmap_sigma: width of the Gaussian heatmap target, in grid voxels.
        crop_field_mm: side of each crop's square field, mm (~50 mm covers one disc level).
        crop_size: crop pixels per side.
        crop_slices: planes per crop, centred on the point.
        crop_step_mm: distance between planes; null takes each series' own slice spacing.
        jitter_mm: standard deviation per patient axis of the training crops' centre offset; set
            it to stage 1's OOF error (``benchmarks/two_stage_vs_whole.py`` prints it).
    """

    localizer: LocalizerChoice = field(default_factory=LocalizerChoice)
    localizer_weight: float = 1.0
    heatmap_sigma: float = 1.5
    crop_field_mm: float = 50.0
    crop_size: int = 32
    crop_slices: int = 5
    crop_step_mm: float | None = None
    jitter_mm: float = 3.0

    @classmethod
    def from_config(cls, config: TrainConfig) -> TwoStageParams:
        """Check ``config.task_params`` key by key and build the settings.

        Raises:
            ConfigError: an unknown key, or a value of the wrong type (checked as every config
                key is) or range.
        """
        params = build_section(cls, config.task_params, "task_params")
        checks = (
            (params.localizer_weight >= 0, "localizer_weight", "must be >= 0"),
            (params.heatmap_sigma > 0, "heatmap_sigma", "must be > 0"),
            (params.crop_field_mm > 0, "crop_field_mm", "must be > 0"),
            (params.crop_size >= 4, "crop_size", "must be >= 4"),
            (params.crop_slices >= 1, "crop_slices", "must be >= 1"),
            (
                params.crop_step_mm is None or params.crop_step_mm > 0,
                "crop_step_mm",
                "must be null or > 0",
            ),
            (params.jitter_mm >= 0, "jitter_mm", "must be >= 0"),
        )
        for ok, key, problem in checks:
            if not ok:
                raise ConfigError(f"config key 'task_params.{key}' {problem}")
        return params

    def crop_spec(self) -> CropSpec:
        return CropSpec(
            field_mm=self.crop_field_mm,
            size=self.crop_size,
            n_slices=self.crop_slices,
            slice_step_mm=self.crop_step_mm,
        )


class TwoStageNet(nn.Module):
    """The localizer and the grader as one module (one checkpoint, one EMA, one DDP wrapper).

    ``forward`` runs both on given crops (training); serving calls ``localizer`` first and cuts
    the grader's crops around its points (see :meth:`TwoStageTask.forward`).
    """

    def __init__(self, localizer: nn.Module, grader: nn.Module) -> None:
        super().__init__()
        self.localizer = localizer
        self.grader = grader

    def localize(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, V, 1, *grid)`` -> heatmap logits ``(B, V, 25, *grid)``."""
        b, v = volumes.shape[:2]
        return self.localizer(volumes.flatten(0, 1)).unflatten(0, (b, v))

    def forward(
        self, volumes: torch.Tensor, crops: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Heatmaps ``(B, V, 25, *grid)`` of every series (the output, then in training any
        deep-supervision heads') and grading logits ``(B, 25, 3)`` of the given crops."""
        b, v = volumes.shape[:2]
        heads = self.localizer.heatmaps(volumes.flatten(0, 1))
        return [h.unflatten(0, (b, v)) for h in heads], self.grader(crops)


@register_task
class TwoStageTask(TrainingTask):
    """Stage 1 (localizer) + stage 2 (level grader) trained jointly; see the module docstring."""

    name = "two_stage"

    def __init__(self, config: TrainConfig, cache_dir: Path, data_root: Path | None) -> None:
        super().__init__(config, cache_dir, data_root)
        if config.augment.elastic_prob > 0:
            raise ConfigError(
                "config key 'augment.elastic_prob': the two_stage task does not deform crops; set 0"
            )
        self.params = TwoStageParams.from_config(config)
        self.spec = self.params.crop_spec()
        self.grid = tuple(int(g) for g in config.data.volume_size)
        roles = model_roles(config.model.name)
        if "localizer" in roles and "grader" not in roles:
            raise ConfigError(
                f"config key 'model.name': {config.model.name!r} is a stage-1 network in the "
                f"two_stage task; write task_params.localizer.name: {config.model.name} "
                f"(model names the grader: {list_models('grader')})"
            )
        check_network(  # names and keys checked now, before a run folder is written
            "localizer",
            self.params.localizer.name,
            self.params.localizer.params,
            "task_params.localizer",
            **self.localizer_shape(),
        )
        check_network(
            "grader", config.model.name, config.model.params, "model", **self.crop_shape()
        )
        self.store = StackStore(self.cache_dir, in_memory=config.data.cache_in_memory)
        self._labels: pd.DataFrame | None = None
        self._points: dict[int, np.ndarray] | None = None

    # ----------------------------------------------------------------------------- data
    def training_labels(self) -> pd.DataFrame:
        if self._labels is None:
            self._labels = self.study_labels()
        return self._labels

    def labelled_points(self) -> dict[int, np.ndarray]:
        """study_id -> (25, 3) patient points of train_label_coordinates.csv (NaN unknown)."""
        if self._points is None:
            assert self.data_root is not None
            coordinates = load_label_coordinates(self.data_root / "train_label_coordinates.csv")
            by_study = dict(iter(coordinates.groupby("study_id")))
            empty = coordinates.iloc[:0]
            self._points = {
                int(s): label_points_mm(self.store, by_study.get(s, empty), int(s))
                for s in self.training_labels()["study_id"]
            }
        return self._points

    def fit_state(self, train_study_ids: np.ndarray) -> dict[str, Any]:
        """The training fold's class prior (25 x 3), the answer for a label whose grading series
        a study lacks; crops are normalised by their own stack, volumes by themselves."""
        labels = self.training_labels()
        prior = class_prior(labels[labels["study_id"].isin(train_study_ids)])
        return {"class_prior": prior[list(PRED_COLUMNS)].to_numpy().tolist()}

    def build_dataset(self, study_ids: np.ndarray, state: dict[str, Any], train: bool) -> Dataset:
        targets, points = None, None
        if self.data_root is not None:
            labels = self.training_labels().set_index("study_id").reindex(study_ids)
            targets = labels_to_indices(labels.reset_index())
            points = self.labelled_points()
        a = self.config.augment
        augment = (
            CropAugment(
                jitter_mm=self.params.jitter_mm,
                affine_prob=a.affine_prob,
                rotate_degrees=a.rotate_degrees,
                scale=a.scale,
                flip_prob=a.flip_prob,
                noise_prob=a.noise_prob,
                noise_std=a.noise_std,
                shift_prob=a.shift_prob,
                intensity_shift=a.intensity_shift,
            )
            if train
            else None
        )
        return TwoStageDataset(
            self.store,
            study_ids,
            self.grid,
            self.spec,
            targets=targets,
            points_mm=points,
            augment=augment,
            seed=self.config.seed,
        )

    def crop_shape(self) -> dict[str, tuple[int, int, int]]:
        """The grader's data-given argument: every crop's (slices, size, size)."""
        return {"crop_shape": (self.spec.n_slices, self.spec.size, self.spec.size)}

    def localizer_shape(self) -> dict[str, Any]:
        """The localizer's data-given arguments: its heatmaps and the grid they cover."""
        return {"n_points": N_LABELS, "grid": self.grid}

    def build_localizer(self) -> nn.Module:
        """Stage 1: the ``task_params.localizer`` network on the ``data.volume_size`` grid."""
        choice = self.params.localizer
        return build_network(
            "localizer",
            choice.name,
            choice.params,
            "task_params.localizer",
            **self.localizer_shape(),
        )

    def build_model(self, state: dict[str, Any]) -> nn.Module:
        localizer = self.build_localizer()  # first: the seeded initial weights depend on the order
        grader = build_registered_model(self.config, role="grader", **self.crop_shape())
        net = TwoStageNet(localizer, grader)
        if "class_prior" in state:  # checkpoints written before the fallback existed lack it
            prior = torch.tensor(state["class_prior"], dtype=torch.float32)
            net.register_buffer("class_prior", prior, persistent=False)
        return net

    # --------------------------------------------------------------------------- model
    def predicted_points(self, net: TwoStageNet, batch: dict[str, Any]) -> tuple[Any, np.ndarray]:
        """Heatmaps and the fused patient points ``(B, 25, 3)`` the localizer finds."""
        heatmaps = net.localize(batch["volumes"])
        grid_points = soft_argmax(heatmaps.flatten(1, 2)).unflatten(1, heatmaps.shape[1:3])
        grid_points = grid_points.float().cpu().numpy()
        study_ids = batch["study_id"].cpu().numpy()
        points = np.stack(
            [
                fuse_points(self.store, int(s), grid_points[i], self.grid)
                for i, s in enumerate(study_ids)
            ]
        )
        return heatmaps, points

    def locate(self, model: nn.Module, batch: dict[str, Any]) -> np.ndarray:
        """The fused patient points of stage 1 (:meth:`predicted_points`)."""
        return self.predicted_points(model, batch)[1]

    def crops_around(self, study_id: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2's 25 crops around ``points`` (:func:`lsdc.datasets.levels.study_crops`)."""
        return study_crops(self.store, int(study_id), points, self.spec)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training: both parts on the dataset's crops in one call (DDP syncs both). Serving:
        localise, cut crops around the predicted points, grade them."""
        if "crops" in batch:
            heads, logits = model(batch["volumes"], batch["crops"])
            return {"heatmaps": heads[0], "supervision_heatmaps": heads[1:], "logits": logits}
        net = model.module if isinstance(model, DistributedDataParallel) else model
        heatmaps, points = self.predicted_points(net, batch)
        flipped = bool(batch["flipped"][0]) if "flipped" in batch else False
        cut = [
            study_crops(self.store, int(s), points[i], self.spec, flipped=flipped)
            for i, s in enumerate(batch["study_id"].cpu().numpy())
        ]
        device = batch["volumes"].device
        logits = net.grader(torch.from_numpy(np.stack([c for c, _ in cut])).to(device))
        outputs = {
            "heatmaps": heatmaps,
            "logits": logits,
            "crop_present": torch.from_numpy(np.stack([p for _, p in cut])).to(device),
        }
        prior = getattr(net, "class_prior", None)
        if prior is not None:
            # slot j of a flipped study holds the crop of label LEFT_RIGHT_PERMUTATION[j]
            outputs["fallback"] = prior[LEFT_RIGHT_PERMUTATION] if flipped else prior
        return outputs

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        """The metric-shaped grading loss plus the weighted localisation loss (of every
        deep-supervision head too, when the localizer has them: DynUNet)."""
        grading = severity_loss(
            outputs["logits"], batch["target"], self.config.loss.any_severe_weight
        )
        if self.params.localizer_weight == 0:
            return grading
        heads = [outputs["heatmaps"], *outputs.get("supervision_heatmaps", [])]
        mask = batch["point_mask"] & batch["volume_present"][..., None]
        locating = heads_loss(
            [h.flatten(0, 1) for h in heads],
            batch["point_targets"].flatten(0, 1),
            mask.flatten(0, 1),
            self.params.heatmap_sigma,
        )
        return grading + self.params.localizer_weight * locating

    def probabilities(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grader's probabilities; a label without a crop (its grading series is missing,
        or the study has no series at all) gets the training fold's class prior instead of
        the grader's untrained answer to a blank crop (training always masked those)."""
        probs = outputs["logits"].float().softmax(dim=-1)
        if "fallback" in outputs:
            blank = ~outputs["crop_present"]
            probs = torch.where(blank[..., None], outputs["fallback"].to(probs)[None], probs)
        return probs, torch.ones(probs.shape[:2], dtype=torch.bool, device=probs.device)

    @classmethod
    def prior_rows(cls, descriptions: Collection[str]) -> np.ndarray:
        """The labels whose grading series the study lacks: they have no crop, so the class
        prior answers them (:meth:`probabilities`)."""
        return np.array([series not in descriptions for series in LABEL_SERIES])

    def flip_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Serve the study as its mirror image: each crop swaps with its twin (see study_crops)."""
        flipped = torch.ones(
            len(batch["study_id"]), dtype=torch.bool, device=batch["study_id"].device
        )
        return {**batch, "flipped": flipped}
