"""Every stack of one series description of a study on one regular grid.

The localizer and the whole-series model read a series as one fixed-size volume. A study's Axial
T2 often covers the spine in pieces (two series, upper and lower levels, or one series of several
tilted stacks), so a volume made of one stack misses the levels the others hold. A
:class:`SeriesGrid` is a regular grid in the frame of the study's best stack (the one
``best_stacks`` picks) stretched over the extent of every stack of that description; each grid
voxel reads the stack that holds it (the one whose nearest slice passes closest, as
:func:`lsdc.datasets.crops.locate_in_stacks` chooses for crops). With a single stack the grid is
exactly that stack resized, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from lsdc.preprocessing.cache import CachedStack, best_stacks
from lsdc.preprocessing.geometry import StackGeometry

StackKey = tuple[int, int, int]
"""(study_id, series_id, stack) of one cached stack."""


def stacks_by_description(index: pd.DataFrame) -> dict[tuple[int, str], list[StackKey]]:
    """Every usable stack of each (study_id, series_description): the ``best_stacks`` choice
    first (the grid's reference), then the others in index order."""
    usable = index[index["status"] != "error"]
    grouped: dict[tuple[int, str], list[StackKey]] = {}
    for r in best_stacks(usable).itertuples():
        grouped[(int(r.study_id), str(r.series_description))] = [
            (int(r.study_id), int(r.series_id), int(r.stack))
        ]
    for r in usable.itertuples():
        key = (int(r.study_id), int(r.series_id), int(r.stack))
        keys = grouped[(key[0], str(r.series_description))]
        if key not in keys:
            keys.append(key)
    return grouped


@dataclass(frozen=True)
class SeriesGrid:
    """A regular grid of ``shape`` voxels over a box of the reference stack's voxel space.

    Attributes:
        reference: geometry of the reference stack (its axes are the grid's axes).
        lower / upper: (3,) the box's outer faces in reference voxel indices (a stack's own box is
            -0.5 .. n - 0.5 on each axis: pixel centres aligned as ``F.interpolate`` with
            ``align_corners=False`` aligns them).
        shape: grid voxels (slices, rows, cols).
    """

    reference: StackGeometry
    lower: np.ndarray
    upper: np.ndarray
    shape: tuple[int, int, int]

    def _step(self) -> np.ndarray:
        return (self.upper - self.lower) / np.asarray(self.shape, dtype=np.float64)

    def to_grid(self, points_mm: np.ndarray) -> np.ndarray:
        """Patient points (N, 3) -> fractional grid indices (N, 3)."""
        voxels = self.reference.patient_to_voxel(np.asarray(points_mm, dtype=np.float64))
        return (voxels - self.lower) / self._step() - 0.5

    def to_patient(self, grid_points: np.ndarray) -> np.ndarray:
        """Fractional grid indices (N, 3) -> patient points (N, 3)."""
        g = np.atleast_2d(np.asarray(grid_points, dtype=np.float64))
        return self.reference.voxel_to_patient(self.lower + (g + 0.5) * self._step())

    def contains(self, grid_points: np.ndarray) -> np.ndarray:
        """(N,) bool: the grid indices lie within the grid's box."""
        g = np.atleast_2d(grid_points)
        return ((g >= -0.5) & (g <= np.asarray(self.shape) - 0.5)).all(axis=1)


def series_grid(
    geometries: Sequence[StackGeometry],
    shapes: Sequence[tuple[int, int, int]],
    shape: Sequence[int],
) -> SeriesGrid:
    """The grid of ``shape`` voxels over every stack (the first is the reference).

    Raises:
        ValueError: no stack, or not one shape per geometry.
    """
    if not geometries or len(geometries) != len(shapes):
        raise ValueError("need one shape per geometry and at least one stack")
    reference = geometries[0]
    lower = np.full(3, -0.5)
    upper = np.asarray(shapes[0], dtype=np.float64) - 0.5
    for geometry, stack_shape in zip(geometries[1:], shapes[1:], strict=True):
        edges = [(-0.5, n - 0.5) for n in stack_shape]
        corners = np.array(np.meshgrid(*edges, indexing="ij")).reshape(3, -1).T
        in_reference = reference.patient_to_voxel(geometry.voxel_to_patient(corners))
        lower = np.minimum(lower, in_reference.min(axis=0))
        upper = np.maximum(upper, in_reference.max(axis=0))
    return SeriesGrid(reference, lower, upper, tuple(int(s) for s in shape))


def sample_series(grid: SeriesGrid, stacks: Sequence[CachedStack]) -> np.ndarray:
    """The stacks sampled (linearly) on ``grid``: float32 of ``grid.shape``, not normalised.

    One stack: the stack resized (trilinear, ``align_corners=False``), its own values. Several:
    every stack is first put on a common scale (z-scored by its own mean and standard
    deviation: two series of one study differ in gain), then each grid voxel reads the stack
    that holds it, or whose nearest slice passes closest; a voxel outside every stack reads 0
    (the common mean).
    """
    if len(stacks) == 1:
        volume = torch.from_numpy(np.array(stacks[0].array, dtype=np.float32))[None, None]
        resized = F.interpolate(volume, size=grid.shape, mode="trilinear", align_corners=False)
        return resized[0, 0].numpy()
    indices = np.indices(grid.shape).reshape(3, -1).T
    points = grid.to_patient(indices)
    best_score = np.full(len(points), np.inf)
    values = np.zeros(len(points), dtype=np.float32)
    for stack in stacks:
        array = np.asarray(stack.array, dtype=np.float32)
        voxels = stack.geometry.patient_to_voxel(points)
        spacing = np.asarray(stack.geometry.spacing)
        extent = np.asarray(array.shape, dtype=np.float64)
        beyond = np.maximum(0.0, np.maximum(-0.5 - voxels, voxels - (extent - 0.5)))
        outside_mm = np.linalg.norm(beyond * spacing, axis=1)
        nearest = np.clip(np.round(voxels[:, 0]), 0, extent[0] - 1)
        to_slice_mm = np.abs(voxels[:, 0] - nearest) * spacing[0]
        score = np.where(outside_mm > 0, 1e6 + outside_mm, to_slice_mm)
        better = score < best_score
        if not better.any():
            continue
        sampled = map_coordinates(array, voxels[better].T, order=1, mode="nearest")
        values[better] = (sampled - array.mean()) / (array.std() or 1.0)
        values[better & (outside_mm > 0)] = 0.0
        best_score[better] = score[better]
    return values.reshape(grid.shape)
