"""Samples of the two-stage model: localizer volumes with point targets, and level crops.

Stage 1 reads every series of a study resampled onto one voxel grid and learns where each of the
25 findings sits; its targets are the centres of ``train_label_coordinates.csv`` carried into each
series through patient millimetres (a canal point annotated on Sagittal T2 is a target on Sagittal
T1 and Axial T2 too). Stage 2 reads, for each of the 25 label columns, a crop in mm around that
finding's point in the series that grades it: canal on Sagittal T2/STIR, foramina on Sagittal T1,
lateral recesses on Axial T2 (looked up among all its stacks), right-sided crops mirrored onto the
left. One item is one study, so the engine sees the usual ``(B, 25)`` targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lsdc.contract import (
    CONDITIONS,
    GRADING_SERIES,
    IGNORE_INDEX,
    LEFT_RIGHT_PERMUTATION,
    LEVELS,
    N_LABELS,
    SERIES_DESCRIPTIONS,
    label_index,
)
from lsdc.datasets.crops import CropSpec, extract_crop, locate_in_stacks
from lsdc.datasets.grids import (
    SeriesGrid,
    StackKey,
    sample_series,
    series_grid,
    stacks_by_description,
)
from lsdc.preprocessing.cache import (
    CachedStack,
    load_stack,
    read_cache_index,
    read_derived,
    stack_fingerprint,
    write_derived,
)
from lsdc.preprocessing.cachedir import CacheDir

LOCALIZER_SERIES: tuple[str, ...] = SERIES_DESCRIPTIONS
"""The localizer's input slots, one volume per series description."""

SAGITTAL_SERIES: tuple[str, ...] = ("Sagittal T1", "Sagittal T2/STIR")
"""Series whose points are trusted first; Axial T2 points are the fallback without them."""

LABEL_SERIES: tuple[str, ...] = tuple(GRADING_SERIES[c] for c in CONDITIONS for _ in LEVELS)
"""The grading series of each label column."""

IS_RIGHT: np.ndarray = np.array([c.startswith("right_") for c in CONDITIONS for _ in LEVELS])
"""Label columns whose crops are mirrored onto the left."""

IS_SPINAL: np.ndarray = np.array([c == "spinal_canal_stenosis" for c in CONDITIONS for _ in LEVELS])
"""Label columns of the (left-right symmetric) canal, which flip augmentation may mirror."""


class StackStore:
    """The cached stacks of one split, opened on demand and kept once opened.

    Args:
        cache_dir: a cache written by ``lsdc preprocess``.
        in_memory: read every opened array into RAM (the demo's studies fit); otherwise opened
            arrays stay memory maps, paged in by the operating system as crops touch them.
    """

    def __init__(self, cache_dir: str | Path, in_memory: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        index = read_cache_index(self.cache_dir)
        self.index = index[index["status"] != "error"].reset_index(drop=True)
        # Lookups by dictionary: a study's stacks are asked for 25 times per item.
        self._by_description = stacks_by_description(self.index)
        # (study_id, description) -> the best_stacks choice: the reference of its grid
        self.best = {key: stacks[0] for key, stacks in self._by_description.items()}
        self.in_memory = in_memory
        self._stacks: dict[StackKey, CachedStack] = {}
        self._stats: dict[StackKey, tuple[float, float]] = {}
        self._grids: dict[tuple[int, str, tuple[int, ...]], SeriesGrid] = {}
        self._by_series: dict[tuple[int, int], list[StackKey]] = {}
        for r in self.index.itertuples():
            key = (int(r.study_id), int(r.series_id), int(r.stack))
            self._by_series.setdefault((key[0], key[1]), []).append(key)

    def __getstate__(self) -> dict[str, Any]:
        """The store as it travels to a loader worker started by ``spawn`` or ``forkserver``
        (macOS; Linux from Python 3.14): without the stacks it opened, which the worker opens
        again on demand. Pickled, a memory map is a full copy of its file: the stacks a training
        process opens to place the labels (every stack of every study) would otherwise be
        copied into every worker of every epoch."""
        state = self.__dict__.copy()
        state["_stacks"] = {}
        return state

    def study_ids(self) -> np.ndarray:
        """Every study with at least one usable stack."""
        return np.unique(self.index["study_id"].to_numpy(np.int64))

    def stacks(self, study_id: int, description: str) -> list[StackKey]:
        """Every stack of every series of ``description`` in the study (e.g. all axial stacks),
        the best one first."""
        return list(self._by_description.get((int(study_id), description), []))

    def series_stacks(self, study_id: int, series_id: int) -> list[StackKey]:
        """Every stack of one series, in stack order."""
        return list(self._by_series.get((int(study_id), int(series_id)), []))

    def load(self, key: StackKey) -> CachedStack:
        if key not in self._stacks:
            stack = load_stack(self.cache_dir, *key, mmap=not self.in_memory)
            self._stacks[key] = stack
        return self._stacks[key]

    def series_grid(
        self, study_id: int, description: str, shape: Sequence[int]
    ) -> SeriesGrid | None:
        """The grid of ``shape`` over every stack of ``description`` in the study (None: the
        study has none); see :mod:`lsdc.datasets.grids`."""
        memo = (int(study_id), description, tuple(int(s) for s in shape))
        if memo not in self._grids:
            loaded = [self.load(k) for k in self.stacks(study_id, description)]
            if not loaded:
                return None
            self._grids[memo] = series_grid(
                [s.geometry for s in loaded], [s.array.shape for s in loaded], shape
            )
        return self._grids[memo]

    def series_volume(
        self, study_id: int, description: str, shape: Sequence[int]
    ) -> tuple[np.ndarray, SeriesGrid] | None:
        """Every stack of ``description`` sampled on its grid and z-scored: ``shape`` float32,
        with the grid that maps it to patient mm (None: the study has no such series)."""
        grid = self.series_grid(study_id, description, shape)
        if grid is None:
            return None
        volume = sample_series(grid, [self.load(k) for k in self.stacks(study_id, description)])
        return (volume - volume.mean()) / max(float(volume.std()), 1e-6), grid

    def intensity(self, key: StackKey) -> tuple[float, float]:
        """Mean and standard deviation of a stack: crops are normalised by their whole stack, so
        a crop keeps its brightness relative to the rest of the series."""
        if key not in self._stats:
            array = np.asarray(self.load(key).array, dtype=np.float32)
            self._stats[key] = (float(array.mean()), float(array.std()) or 1.0)
        return self._stats[key]

    def stored_series_volume(
        self, study_id: int, description: str, shape: Sequence[int]
    ) -> tuple[np.ndarray, SeriesGrid] | None:
        """:meth:`series_volume`, computed once and then read from the cache.

        Sampling a series onto the localizer grid reads every voxel of its stacks (12 MB of a
        20 x 512 x 512 stack for a 2 MB grid), in every epoch and every worker. The first call
        writes the volume, with each stack's :meth:`intensity`, beside the study's entries
        (:meth:`~lsdc.preprocessing.cachedir.CacheDir.series_grid`); later calls, in any process, read
        those 2 MB back. A file made from other stacks (cached again) is recomputed.
        """
        grid = self.series_grid(study_id, description, shape)
        if grid is None:
            return None
        keys = self.stacks(study_id, description)
        path = CacheDir(self.cache_dir).series_grid(study_id, description, shape)
        fingerprint = stack_fingerprint(self.cache_dir, keys)
        stored = read_derived(path, fingerprint)
        if stored is not None and len(stored.get("intensity", ())) == len(keys):
            for key, (mean, std) in zip(keys, stored["intensity"].tolist(), strict=True):
                self._stats.setdefault(key, (mean, std))
            return stored["volume"], grid
        volume, _ = self.series_volume(study_id, description, shape)
        intensity = np.array([self.intensity(k) for k in keys], dtype=np.float64)
        write_derived(path, fingerprint, volume=volume, intensity=intensity)
        return volume, grid


# ------------------------------------------------------------------------------- label points
def label_points_mm(store: StackStore, coordinates: pd.DataFrame, study_id: int) -> np.ndarray:
    """Patient points ``(25, 3)`` of one study's labelled finding centres; NaN where none.

    Each row's (instance_number, x, y) lives in the source geometry of the stack that holds that
    instance; rows whose series is not cached are skipped; repeated rows of one label average.

    Args:
        coordinates: ``load_label_coordinates`` output (any studies; this one is selected).
    """
    points = np.full((N_LABELS, 3), np.nan)
    sums, counts = np.zeros((N_LABELS, 3)), np.zeros(N_LABELS)
    rows = coordinates[coordinates["study_id"] == study_id]
    for row in rows.itertuples():
        for key in store.series_stacks(study_id, int(row.series_id)):
            source = store.load(key).source_geometry
            if int(row.instance_number) in source.instance_numbers:
                j = label_index(row.condition_key, row.level_key)
                sums[j] += source.pixel_to_patient(int(row.instance_number), row.x, row.y)
                counts[j] += 1
                break
    found = counts > 0
    points[found] = sums[found] / counts[found, None]
    return points


def complete_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points for the crops of findings without a coordinate row, from same-side evidence only.

    A labelled finding may lack its coordinate row (the real ``train_label_coordinates.csv``
    misses some). Its crop must still show that finding: the mean of its level's other points
    would put a left foramen on the midline, and train its label on the wrong tissue. So the
    finding keeps its own offset from another finding ``o`` that has a point at this level:
    ``p[c, l] = p[o, l] + d(l)``, where ``d`` is the offset ``p[c, m] - p[o, m]`` at the levels
    ``m`` where both have points, interpolated linearly along the spine (the nearest level's
    beyond the ends); the estimates of every such ``o`` are averaged. The side and depth come
    from the finding itself, the level from the others. A finding with no point at any level,
    or with no other finding to anchor it, stays unknown: NaN, so it gets no crop and its label
    is masked.

    Returns:
        The completed points ``(25, 3)`` and a ``(25,)`` bool of the labels that have a point
        (labelled or completed).
    """
    by_level = points.reshape(len(CONDITIONS), len(LEVELS), 3)
    has = ~np.isnan(by_level[..., 0])
    filled = by_level.copy()
    for c, lv in zip(*np.nonzero(~has), strict=True):
        estimates = []
        for other in np.flatnonzero(has[:, lv]):
            shared = np.flatnonzero(has[c] & has[other])
            if len(shared):
                offsets = by_level[c, shared] - by_level[other, shared]
                offset = [np.interp(lv, shared, offsets[:, axis]) for axis in range(3)]
                estimates.append(by_level[other, lv] + offset)
        if estimates:
            filled[c, lv] = np.mean(estimates, axis=0)
    filled = filled.reshape(N_LABELS, 3)
    return filled, ~np.isnan(filled[:, 0])


# --------------------------------------------------------------------------- localizer inputs
def localizer_inputs(
    store: StackStore, study_id: int, grid: Sequence[int], points_mm: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The localizer's view of a study: one grid volume per series slot plus point targets.

    Each slot's volume holds every stack of that series description (:mod:`lsdc.datasets.grids`),
    so an Axial T2 split into upper and lower series or stacks shows all its levels.

    Returns:
        ``volumes`` (3, 1, *grid) float32 (zeros for a missing series), ``volume_present`` (3,)
        bool, ``point_targets`` (3, 25, 3) grid indices and ``point_mask`` (3, 25) bool: True
        where the label's point is known and falls inside that series' grid.
    """
    volumes = np.zeros((len(LOCALIZER_SERIES), 1, *grid), dtype=np.float32)
    present = np.zeros(len(LOCALIZER_SERIES), dtype=bool)
    targets = np.zeros((len(LOCALIZER_SERIES), N_LABELS, 3), dtype=np.float32)
    mask = np.zeros((len(LOCALIZER_SERIES), N_LABELS), dtype=bool)
    for slot, description in enumerate(LOCALIZER_SERIES):
        sampled = store.stored_series_volume(study_id, description, grid)
        if sampled is None:
            continue
        volumes[slot, 0], mapping = sampled
        present[slot] = True
        if points_mm is None:
            continue
        known = ~np.isnan(points_mm[:, 0])
        if not known.any():
            continue
        on_grid = mapping.to_grid(points_mm[known])
        targets[slot, known] = on_grid
        mask[slot, np.flatnonzero(known)[mapping.contains(on_grid)]] = True
    return {
        "volumes": volumes,
        "volume_present": present,
        "point_targets": targets,
        "point_mask": mask,
    }


def fuse_points(
    store: StackStore, study_id: int, grid_points: np.ndarray, grid: Sequence[int]
) -> np.ndarray:
    """Localizer outputs ``(3, 25, 3)`` (grid indices per series slot) -> patient points (25, 3).

    Each label's point is the mean over the sagittal series the study has; only without any
    sagittal series does the Axial T2 localizer decide (the learned fallback). NaN when the study
    has none of the three.
    """
    per_slot = np.full((len(LOCALIZER_SERIES), N_LABELS, 3), np.nan)
    for slot, description in enumerate(LOCALIZER_SERIES):
        mapping = store.series_grid(study_id, description, grid)
        if mapping is not None:
            per_slot[slot] = mapping.to_patient(grid_points[slot])
    sagittal = [LOCALIZER_SERIES.index(d) for d in SAGITTAL_SERIES]
    if not np.isnan(per_slot[sagittal, 0, 0]).all():
        return np.nanmean(per_slot[sagittal], axis=0)
    return per_slot[LOCALIZER_SERIES.index("Axial T2")]


# ------------------------------------------------------------------------------------- crops
@dataclass(frozen=True)
class CropAugment:
    """Random changes to training crops, drawn once per (study, label).

    Attributes:
        jitter_mm: standard deviation (per patient axis) of the crop centre's offset: the size of
            stage 1's errors, so stage 2 learns to grade off-centre crops as it will be served.
        rotate_degrees / scale / affine_prob: in-plane rotation and field zoom of the crop.
        flip_prob: mirror of canal crops (left-right symmetric), matching flip TTA.
        noise_prob / noise_std, shift_prob / intensity_shift: intensity changes.
    """

    jitter_mm: float = 0.0
    affine_prob: float = 0.0
    rotate_degrees: float = 0.0
    scale: float = 0.0
    flip_prob: float = 0.0
    noise_prob: float = 0.0
    noise_std: float = 0.0
    shift_prob: float = 0.0
    intensity_shift: float = 0.0


def study_crops(
    store: StackStore,
    study_id: int,
    points_mm: np.ndarray,
    spec: CropSpec,
    flipped: bool = False,
    augment: CropAugment | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The 25 crops of one study around ``points_mm`` (25, 3), in LABEL_COLUMNS order.

    Label j's crop is taken in its grading series, in whichever of that series' stacks holds the
    point (all stacks of all series of that description are searched), and mirrored when the
    label is right-sided. With ``flipped`` the study is served as its own mirror image (flip TTA):
    slot j holds the crop of j's left/right twin with the opposite mirroring, so the caller's
    LEFT_RIGHT_PERMUTATION of the outputs restores the label order.

    Returns:
        crops ``(25, n_slices, size, size)`` float32 (zeros where no point or no series) and a
        ``(25,)`` bool of the crops that hold image data.
    """
    crops = np.zeros((N_LABELS, spec.n_slices, spec.size, spec.size), dtype=np.float32)
    present = np.zeros(N_LABELS, dtype=bool)
    stacks_of = {d: store.stacks(int(study_id), d) for d in set(LABEL_SERIES)}
    for slot in range(N_LABELS):
        source = int(LEFT_RIGHT_PERMUTATION[slot]) if flipped else slot
        mirror = not IS_RIGHT[slot] if flipped else bool(IS_RIGHT[slot])
        point = np.asarray(points_mm[source], dtype=np.float64)
        keys = stacks_of[LABEL_SERIES[source]]
        if np.isnan(point).any() or not keys:
            continue
        loaded = [store.load(k) for k in keys]
        k, _ = locate_in_stacks(
            point, [s.geometry for s in loaded], [s.array.shape for s in loaded]
        )
        crop_spec, rotation = spec, 0.0
        if augment is not None and rng is not None:
            point = point + rng.normal(0.0, augment.jitter_mm, size=3)
            if rng.random() < augment.affine_prob:
                rotation = rng.uniform(-augment.rotate_degrees, augment.rotate_degrees)
                zoom = 1.0 + rng.uniform(-augment.scale, augment.scale)
                crop_spec = replace(spec, field_mm=spec.field_mm * zoom)
            if IS_SPINAL[source] and rng.random() < augment.flip_prob:
                mirror = not mirror
        mean, std = store.intensity(keys[k])
        crop = extract_crop(loaded[k].array, loaded[k].geometry, point, crop_spec, mirror, rotation)
        crops[slot] = (crop - mean) / std
        present[slot] = True
        if augment is not None and rng is not None:
            if rng.random() < augment.noise_prob:
                crops[slot] += rng.normal(0.0, augment.noise_std, size=crops[slot].shape)
            if rng.random() < augment.shift_prob:
                crops[slot] += rng.uniform(-augment.intensity_shift, augment.intensity_shift)
    return crops, present


# ------------------------------------------------------------------------------------ dataset
class TwoStageDataset(Dataset):
    """One item per study: localizer volumes and targets, labels, and (for training) crops.

    Training items carry crops around the labelled points (completed by :func:`complete_points`
    and jittered); validation and inference items carry no crops, because those are cut around
    the points the localizer predicts, which only exist once the model has run.

    Args:
        store: the split's cached stacks.
        study_ids: studies, in item order.
        grid: the localizer's (slices, rows, cols).
        spec: the crop shape.
        targets: ``(n, 25)`` class indices (IGNORE_INDEX unlabelled), or None at inference.
        points_mm: study_id -> ``(25, 3)`` labelled points (NaN unknown), or None at inference.
        augment: training augmentation; None for validation and inference.
        seed: with the epoch and the item index, fixes every random draw (exact resume).
    """

    def __init__(
        self,
        store: StackStore,
        study_ids: Sequence[int],
        grid: Sequence[int],
        spec: CropSpec,
        targets: np.ndarray | None = None,
        points_mm: dict[int, np.ndarray] | None = None,
        augment: CropAugment | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.study_ids = np.asarray(study_ids, dtype=np.int64)
        self.grid = tuple(int(g) for g in grid)
        self.spec = spec
        self.targets = targets
        self.points_mm = points_mm
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        if augment is not None and (targets is None or points_mm is None):
            raise ValueError("training items need targets and labelled points")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        study_id = int(self.study_ids[i])
        points = None if self.points_mm is None else self.points_mm.get(study_id)
        item: dict[str, Any] = {"study_id": torch.tensor(study_id, dtype=torch.int64)}
        for key, value in localizer_inputs(self.store, study_id, self.grid, points).items():
            item[key] = torch.from_numpy(value)
        if self.targets is not None:
            item["target"] = torch.as_tensor(self.targets[i], dtype=torch.int64)
        if self.augment is not None and points is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            filled, known = complete_points(points)
            crops, present = study_crops(
                self.store, study_id, filled, self.spec, augment=self.augment, rng=rng
            )
            item["crops"] = torch.from_numpy(crops)
            if "target" in item:
                item["target"] = item["target"].masked_fill(
                    torch.from_numpy(~(present & known)), IGNORE_INDEX
                )
        return item
