"""Fixed-size crops in millimetres around a patient point, sampled through a stack's geometry.

Stage 2 of the two-stage model grades each level from a small window (a few slices, a field of
tens of millimetres) around the point stage 1 found. Sampling that window in patient coordinates
rather than in pixels makes it the same physical size whatever the matrix, pixel spacing or
obliquity of the series, and lets a right-sided finding be mirrored onto the left through the
patient's sagittal plane (x -> -x), so that one network grades both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from lsdc.preprocessing.geometry import StackGeometry

SAGITTAL_MIRROR = np.diag([-1.0, 1.0, 1.0])
"""Reflection through the patient's sagittal plane (LPS: x is the left-right axis)."""


@dataclass(frozen=True)
class CropSpec:
    """The shape of a crop: ``n_slices`` planes of ``size`` x ``size`` pixels over ``field_mm``.

    Attributes:
        field_mm: side of the square in-plane field, in mm.
        size: pixels per side of the output.
        n_slices: planes sampled along the stack normal, centred on the point.
        slice_step_mm: distance between planes; None takes the stack's own slice spacing, so that
            a crop centred on a slice samples real slices rather than interpolating between them.
    """

    field_mm: float = 50.0
    size: int = 32
    n_slices: int = 5
    slice_step_mm: float | None = None

    def __post_init__(self) -> None:
        if self.field_mm <= 0 or self.size < 1 or self.n_slices < 1:
            raise ValueError(f"invalid crop spec {self}")
        if self.slice_step_mm is not None and self.slice_step_mm <= 0:
            raise ValueError(f"slice_step_mm must be positive, got {self.slice_step_mm}")


def crop_points(
    geometry: StackGeometry,
    center_mm: np.ndarray,
    spec: CropSpec,
    mirror: bool = False,
    rotation_deg: float = 0.0,
) -> np.ndarray:
    """Patient coordinates of every sample of a crop, shape ``(n_slices, size, size, 3)``.

    The crop's axes are the stack's own: columns along ``row_direction``, rows along
    ``column_direction``, planes along ``normal``, so a crop looks like the series it comes from.
    With ``mirror`` the offsets from the centre are reflected through the sagittal plane, which
    turns a right-sided structure into the image of a left-sided one (reversed columns on an axial
    series, reversed planes on a sagittal one).
    """
    step = spec.slice_step_mm if spec.slice_step_mm is not None else geometry.slice_spacing
    pixel = spec.field_mm / spec.size
    plane = (np.arange(spec.n_slices) - (spec.n_slices - 1) / 2.0) * step
    inplane = (np.arange(spec.size) - (spec.size - 1) / 2.0) * pixel
    angle = np.deg2rad(rotation_deg)
    row = np.asarray(geometry.row_direction, dtype=np.float64)
    col = np.asarray(geometry.column_direction, dtype=np.float64)
    axes = np.stack(
        [
            np.asarray(geometry.normal, dtype=np.float64),
            np.cos(angle) * col - np.sin(angle) * row,
            np.cos(angle) * row + np.sin(angle) * col,
        ]
    )
    if mirror:
        axes = axes @ SAGITTAL_MIRROR
    k, i, j = np.meshgrid(plane, inplane, inplane, indexing="ij")
    offsets = np.stack([k, i, j], axis=-1) @ axes
    return np.asarray(center_mm, dtype=np.float64).reshape(1, 1, 1, 3) + offsets


def extract_crop(
    array: np.ndarray,
    geometry: StackGeometry,
    center_mm: np.ndarray,
    spec: CropSpec,
    mirror: bool = False,
    rotation_deg: float = 0.0,
) -> np.ndarray:
    """Resample ``array`` (slices, rows, cols) on the crop around ``center_mm``.

    Linear interpolation; samples outside the stack read 0, so a point near the edge of the field
    of view still gives a full-size crop.

    Returns:
        float32 array ``(n_slices, size, size)``.
    """
    points = crop_points(geometry, center_mm, spec, mirror=mirror, rotation_deg=rotation_deg)
    voxels = geometry.patient_to_voxel(points.reshape(-1, 3))
    coordinates = np.ascontiguousarray(voxels.T)
    block, corner = _covering_block(array, coordinates)
    coordinates -= corner[:, None]
    values = map_coordinates(block, coordinates, order=1, mode="constant", cval=0.0)
    return values.reshape(spec.n_slices, spec.size, spec.size).astype(np.float32, copy=False)


def _covering_block(array: np.ndarray, coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``array`` that linear interpolation at ``coordinates`` (3, N) reads, as
    float32, and its corner index: a crop reads (and pages in, from a memory map) only its own
    neighbourhood, not the whole stack.

    The block reaches one voxel beyond the samples on every side and stops at the array's own
    edges, so sampling it gives exactly what sampling the whole array gives (``mode="constant"``
    treats the array's edges, and only those, as edges). Samples that all lie beyond one edge
    read 0, as they would from the whole array.
    """
    shape = np.asarray(array.shape)
    low, high = coordinates.min(axis=1), coordinates.max(axis=1)
    nothing = np.zeros((1, 1, 1), dtype=np.float32), np.zeros(3)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return nothing
    lo = np.clip(np.floor(low).astype(np.int64) - 1, 0, shape)
    hi = np.clip(np.floor(high).astype(np.int64) + 3, 0, shape)
    if np.any(hi <= lo):
        return nothing
    block = array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return np.asarray(block, dtype=np.float32), lo.astype(np.float64)


def locate_in_stacks(
    point_mm: np.ndarray, geometries: list[StackGeometry], shapes: list[tuple[int, int, int]]
) -> tuple[int, np.ndarray]:
    """The stack that best contains a patient point, and the point's voxel index in it.

    A study's axial series often holds several short stacks, each tilted to one disc, so a level
    point must be looked up in all of them: a stack holds the point if its fractional slice index
    lies within half a slice of the stack and its row/column inside the image. Among holders the
    one whose nearest slice passes closest to the point (in mm) wins; when none holds it, the one
    the point is nearest to (in mm, outside its extent), so a caller always gets an answer.

    Args:
        point_mm: (3,) patient point.
        geometries: one geometry per candidate stack.
        shapes: ``(n_slices, rows, cols)`` of each stack's array.

    Returns:
        (index into ``geometries``, fractional voxel ``(slice, row, col)`` in that stack).
    """
    if not geometries or len(geometries) != len(shapes):
        raise ValueError("need one shape per geometry and at least one stack")
    candidates = []
    for geometry, shape in zip(geometries, shapes, strict=True):
        voxel = geometry.patient_to_voxel(np.asarray(point_mm, dtype=np.float64)[None])[0]
        spacing = np.asarray(geometry.spacing)
        beyond = np.maximum(0.0, np.maximum(-0.5 - voxel, voxel - (np.asarray(shape) - 0.5)))
        outside_mm = float(np.linalg.norm(beyond * spacing))
        nearest_slice = np.clip(np.round(voxel[0]), 0, shape[0] - 1)
        to_slice_mm = float(abs(voxel[0] - nearest_slice) * spacing[0])
        candidates.append(((outside_mm, to_slice_mm), voxel))
    k = min(range(len(candidates)), key=lambda i: candidates[i][0])
    return k, candidates[k][1]
