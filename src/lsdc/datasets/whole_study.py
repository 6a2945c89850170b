"""Torch datasets over the cache: a study as its three series on a fixed grid, plus metadata.

Reading and resampling a series is the slow part, and it does not change between epochs, so
:class:`StudyVolumeStore` does it once per study and (optionally) keeps the result in RAM; the
datasets of every fold share one store.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import NormalizeIntensity
from torch.utils.data import Dataset

from lsdc.contract import IGNORE_INDEX, LABEL_COLUMNS, SERIES_DESCRIPTIONS, labels_to_indices
from lsdc.datasets.grids import sample_series, series_grid, stacks_by_description
from lsdc.datasets.transforms import sample_seed, seed_transform
from lsdc.preprocessing.cache import load_stack, read_cache_index

META_FEATURES: tuple[str, ...] = (
    "slice_thickness",
    "pixel_spacing_row",
    "pixel_spacing_col",
    "spacing_between_slices",
    "rows",
    "columns",
    "n_slices",
)
"""Continuous metadata of each series, normalised with training-fold statistics."""

N_META = len(SERIES_DESCRIPTIONS) * (len(META_FEATURES) + 1)
"""Length of the metadata vector: per series the continuous features and a missing flag."""

PATIENT_X = np.array([1.0, 0.0, 0.0])


def _series_meta(meta: dict[str, Any], n_slices: int) -> np.ndarray:
    """The raw continuous metadata of one series (NaN where a tag was absent)."""
    spacing = meta.get("pixel_spacing") or [None, None]
    between = meta.get("spacing_between_slices")
    if between is None:
        between = meta.get("slice_spacing")
    values = [
        meta.get("slice_thickness"),
        spacing[0],
        spacing[1],
        between,
        meta.get("rows"),
        meta.get("columns"),
        n_slices,
    ]
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


class StudyVolumeStore:
    """Each study's series, resampled to ``volume_size`` and z-scored per volume.

    A series description is every stack of that description in the study, on one grid
    (:mod:`lsdc.datasets.grids`): an Axial T2 split into upper and lower series or stacks shows
    every level, not only the longest stack's.

    Args:
        cache_dir: the preprocessed cache.
        volume_size: (D, H, W) every series is resized to.
        keep_in_memory: memoise loaded studies (one read per study per process).
    """

    def __init__(self, cache_dir: Any, volume_size: Sequence[int], keep_in_memory: bool = True):
        self.cache_dir = cache_dir
        self.volume_size = tuple(int(s) for s in volume_size)
        self.keep_in_memory = keep_in_memory
        self._stacks = stacks_by_description(read_cache_index(cache_dir))
        self._normalize = NormalizeIntensity(channel_wise=True)
        self._memo: dict[int, dict[str, np.ndarray]] = {}

    def load(self, study_id: int) -> dict[str, np.ndarray]:
        """``volumes`` (S, D, H, W) float32, ``meta_raw`` (S, F) float64 (NaN = unknown),
        ``missing`` (S,) float32 and ``lr_axis`` (S,) int64 for one study."""
        study_id = int(study_id)
        if study_id in self._memo:
            return self._memo[study_id]
        n_series = len(SERIES_DESCRIPTIONS)
        volumes = np.zeros((n_series, *self.volume_size), dtype=np.float32)
        meta_raw = np.full((n_series, len(META_FEATURES)), np.nan)
        missing = np.ones(n_series, dtype=np.float32)
        lr_axis = np.zeros(n_series, dtype=np.int64)
        for s, description in enumerate(SERIES_DESCRIPTIONS):
            keys = self._stacks.get((study_id, description))
            if not keys:
                continue
            stacks = [load_stack(self.cache_dir, *key) for key in keys]
            grid = series_grid(
                [st.geometry for st in stacks], [st.array.shape for st in stacks], self.volume_size
            )
            volumes[s] = np.asarray(self._normalize(sample_series(grid, stacks)[None]))[0]
            stack = stacks[0]  # the best stack: the grid's axes, its metadata
            meta_raw[s] = _series_meta(stack.meta, stack.array.shape[0])
            missing[s] = 0.0
            g = stack.geometry
            # array axes (slice, row, col) point along (normal, column_direction, row_direction)
            directions = np.stack([g.normal, g.column_direction, g.row_direction])
            lr_axis[s] = int(np.argmax(np.abs(directions @ PATIENT_X)))
        out = {"volumes": volumes, "meta_raw": meta_raw, "missing": missing, "lr_axis": lr_axis}
        if self.keep_in_memory:
            self._memo[study_id] = out
        return out


def fit_meta_normaliser(store: StudyVolumeStore, study_ids: Sequence[int]) -> dict[str, list]:
    """Mean and standard deviation of every continuous metadata feature over ``study_ids``
    (the training fold only: validation statistics must not leak into training)."""
    raw = np.stack([store.load(s)["meta_raw"] for s in study_ids]).reshape(len(study_ids), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature no training study has
        mean = np.nanmean(raw, axis=0)
        std = np.nanstd(raw, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return {"mean": mean.tolist(), "std": std.tolist()}


def meta_vector(sample: dict[str, np.ndarray], normaliser: dict[str, list]) -> np.ndarray:
    """Normalised metadata (unknown values -> 0, the training mean) followed by missing flags."""
    raw = sample["meta_raw"].reshape(-1)
    z = (raw - np.asarray(normaliser["mean"])) / np.asarray(normaliser["std"])
    z = np.where(np.isfinite(z), z, 0.0)
    return np.concatenate([z, sample["missing"]]).astype(np.float32)


class WholeStudyDataset(Dataset):
    """One item per study: ``volumes``, ``meta``, ``lr_axis``, ``study_id`` and, when labels
    are given, ``target`` (25 class indices, IGNORE_INDEX where unlabelled).

    Args:
        store: where volumes come from.
        study_ids: the studies, in item order.
        normaliser: metadata statistics from :func:`fit_meta_normaliser`.
        labels: train.csv rows (wide) covering ``study_ids``, or None (inference).
        transform: a random MONAI dictionary transform (training only), seeded per item.
        seed: base of the per-item seeds.
    """

    def __init__(
        self,
        store: StudyVolumeStore,
        study_ids: Sequence[int],
        normaliser: dict[str, list],
        labels: pd.DataFrame | None = None,
        transform: Callable | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.study_ids = [int(s) for s in study_ids]
        self.normaliser = normaliser
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.targets: dict[int, np.ndarray] | None = None
        if labels is not None:
            table = labels.set_index("study_id").reindex(self.study_ids).reset_index()
            indices = labels_to_indices(table[["study_id", *LABEL_COLUMNS]])
            self.targets = dict(zip(self.study_ids, indices, strict=True))

    def set_epoch(self, epoch: int) -> None:
        """Make this epoch's random draws differ from the last one's (and replay on resume)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study_id = self.study_ids[index]
        loaded = self.store.load(study_id)
        sample: dict[str, Any] = {
            "volumes": torch.from_numpy(loaded["volumes"].copy()),
            "lr_axis": torch.from_numpy(loaded["lr_axis"]),
            "meta": torch.from_numpy(meta_vector(loaded, self.normaliser)),
            "study_id": torch.tensor(study_id, dtype=torch.int64),
        }
        if self.targets is not None:
            target = self.targets.get(study_id)
            if target is None:
                target = np.full(len(LABEL_COLUMNS), IGNORE_INDEX, dtype=np.int64)
            sample["target"] = torch.from_numpy(np.asarray(target, dtype=np.int64))
        if self.transform is not None:
            seed_transform(self.transform, sample_seed(self.seed, self.epoch, index))
            sample = dict(self.transform(sample))
        return sample
