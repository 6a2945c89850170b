"""Where every voxel of a stack sits in the patient, so points can move between series.

Labels are given as pixel coordinates on one series (e.g. a sagittal slice), while the models
need them on others (e.g. which axial slice crosses that disc). Both are placed in one patient
frame (DICOM LPS, millimetres) by their ImagePositionPatient / ImageOrientationPatient /
PixelSpacing tags; :class:`StackGeometry` keeps exactly those tags per array slice and maps
voxel indices ``(slice, row, col)`` to patient millimetres and back.

Slice positions are kept one per slice rather than as one affine, so stacks with uneven gaps
(a skipped unreadable file, a missing instance) still map exactly; between and beyond slices the
position is interpolated / extrapolated linearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class StackGeometry:
    """Geometry of one stack of parallel slices (the array's slice axis is axis 0).

    Attributes:
        positions: (n_slices, 3) ImagePositionPatient (centre of pixel (0, 0)) of each slice, mm.
        row_direction: (3,) unit vector of increasing column index (ImageOrientationPatient[:3]).
        column_direction: (3,) unit vector of increasing row index (ImageOrientationPatient[3:]).
        pixel_spacing: (between rows, between columns) in mm, as DICOM PixelSpacing.
        instance_numbers: instance number of each array slice. For a resampled stack, the
            instance number of the source slice nearest to each array slice (for reference only:
            CSV pixel coordinates belong to the source geometry).
    """

    positions: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    instance_numbers: tuple[int, ...]

    def __post_init__(self) -> None:
        positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        row = _unit(self.row_direction)
        col = _unit(self.column_direction)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "row_direction", row)
        object.__setattr__(self, "column_direction", col)
        object.__setattr__(
            self, "pixel_spacing", (float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))
        )
        object.__setattr__(self, "instance_numbers", tuple(int(i) for i in self.instance_numbers))
        if len(self.instance_numbers) != len(positions):
            raise ValueError(
                f"{len(positions)} slice positions but {len(self.instance_numbers)} instance numbers"
            )
        if len(positions) == 0:
            raise ValueError("a stack needs at least one slice")
        if np.linalg.norm(np.cross(row, col)) < 1e-6:
            raise ValueError(
                f"row {row.tolist()} and column {col.tolist()} directions are parallel"
            )
        for a in (positions, row, col):
            a.setflags(write=False)

    # ----------------------------------------------------------------------------- derived
    @cached_property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row_direction x column_direction (DICOM convention), normalised
        because rounded ImageOrientationPatient values are not exactly orthogonal."""
        n = np.cross(self.row_direction, self.column_direction)
        return n / np.linalg.norm(n)

    @property
    def n_slices(self) -> int:
        return len(self.positions)

    @cached_property
    def slice_offsets(self) -> np.ndarray:
        """Distance of each slice from slice 0 along the normal, mm (monotonic for a sorted stack)."""
        return (self.positions - self.positions[0]) @ self.normal

    @cached_property
    def slice_spacing(self) -> float:
        """Median distance between neighbouring slices along the normal (1.0 for one slice)."""
        if self.n_slices < 2:
            return 1.0
        return float(np.median(np.abs(np.diff(self.slice_offsets))))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (slice, row, col) in mm."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel (slice, row, col, 1) -> patient mm, exact for evenly spaced slices.

        Built from the first and last slice, so for uneven stacks it is the best single affine;
        :meth:`voxel_to_patient` stays exact in every case.
        """
        a = np.eye(4)
        if self.n_slices > 1:
            a[:3, 0] = (self.positions[-1] - self.positions[0]) / (self.n_slices - 1)
        else:
            a[:3, 0] = self.normal * self.slice_spacing
        a[:3, 1] = self.column_direction * self.pixel_spacing[0]
        a[:3, 2] = self.row_direction * self.pixel_spacing[1]
        a[:3, 3] = self.positions[0]
        return a

    # ------------------------------------------------------------------------ mappings
    def _slice_origin(self, slice_index: np.ndarray) -> np.ndarray:
        """Position of pixel (0, 0) at fractional slice indices: linear between slices,
        extrapolated from the end steps beyond them."""
        s = np.asarray(slice_index, dtype=np.float64)
        n = self.n_slices
        if n == 1:
            return self.positions[0] + s[:, None] * self.normal * self.slice_spacing
        lo = np.clip(np.floor(s).astype(np.int64), 0, n - 2)
        w = (s - lo)[:, None]
        return self.positions[lo] * (1.0 - w) + self.positions[lo + 1] * w

    def voxel_to_patient(self, voxels: np.ndarray) -> np.ndarray:
        """Map voxel indices (N, 3) ``(slice, row, col)``, fractional allowed, to patient mm (N, 3)."""
        v = np.atleast_2d(np.asarray(voxels, dtype=np.float64))
        origin = self._slice_origin(v[:, 0])
        return (
            origin
            + v[:, 1:2] * self.pixel_spacing[0] * self.column_direction
            + v[:, 2:3] * self.pixel_spacing[1] * self.row_direction
        )

    def patient_to_voxel(self, points: np.ndarray) -> np.ndarray:
        """Map patient points (N, 3) mm to fractional voxel indices (N, 3) ``(slice, row, col)``.

        The slice index comes from the distance along the normal (interpolated between the
        actual slice offsets); row and column from the in-plane offset to that slice's origin.
        Points off the stack get indices outside ``[0, n)``: callers decide what to clip.
        """
        p = np.atleast_2d(np.asarray(points, dtype=np.float64))
        offsets = self.slice_offsets
        d = (p - self.positions[0]) @ self.normal
        if self.n_slices == 1:
            s = d / self.slice_spacing
        else:
            s = _interp_extrapolate(d, offsets, np.arange(self.n_slices, dtype=np.float64))
        rel = p - self._slice_origin(s)
        row = rel @ self.column_direction / self.pixel_spacing[0]
        col = rel @ self.row_direction / self.pixel_spacing[1]
        return np.stack([s, row, col], axis=1)

    def slice_index(self, instance_number: int) -> int:
        """Array slice index of a DICOM instance number.

        Raises:
            KeyError: the instance is not a slice of this stack (another stack, or skipped).
        """
        try:
            return self.instance_numbers.index(int(instance_number))
        except ValueError:
            raise KeyError(
                f"instance_number {instance_number} is not in this stack "
                f"(instances {min(self.instance_numbers)}..{max(self.instance_numbers)})"
            ) from None

    def pixel_to_voxel(self, instance_number: int, x: float, y: float) -> np.ndarray:
        """Voxel index (3,) ``(slice, row, col)`` of pixel ``x`` (column), ``y`` (row) of one
        instance, as the CSVs give it."""
        return np.array([self.slice_index(instance_number), y, x], dtype=np.float64)

    def voxel_to_pixel(self, voxel: np.ndarray) -> tuple[int, float, float]:
        """Back to the CSVs' terms: (instance_number of the nearest slice, x = col, y = row)."""
        s, row, col = np.asarray(voxel, dtype=np.float64).reshape(3)
        nearest = int(np.clip(np.floor(s + 0.5), 0, self.n_slices - 1))
        return self.instance_numbers[nearest], float(col), float(row)

    def pixel_to_patient(self, instance_number: int, x: float, y: float) -> np.ndarray:
        """Patient mm (3,) of pixel ``x`` (column), ``y`` (row) of one instance, as in the CSVs."""
        return self.voxel_to_patient(self.pixel_to_voxel(instance_number, x, y)[None])[0]

    def flipped_in_plane(
        self, flip_rows: bool, flip_columns: bool, shape: tuple[int, int, int]
    ) -> StackGeometry:
        """The exact geometry of the array ``array[:, ::-1]`` (``flip_rows``) and/or
        ``array[:, :, ::-1]`` (``flip_columns``) of a stack of ``shape``: each flipped axis
        points the other way and pixel (0, 0) moves to the opposite edge, so every voxel keeps its
        patient position."""
        positions = self.positions.copy()
        row, col = self.row_direction, self.column_direction
        if flip_rows:
            positions += (shape[1] - 1) * self.pixel_spacing[0] * col
            col = -col
        if flip_columns:
            positions += (shape[2] - 1) * self.pixel_spacing[1] * row
            row = -row
        return StackGeometry(positions, row, col, self.pixel_spacing, self.instance_numbers)

    # ----------------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; :meth:`from_dict` restores an equal geometry."""
        return {
            "positions": self.positions.tolist(),
            "row_direction": self.row_direction.tolist(),
            "column_direction": self.column_direction.tolist(),
            "pixel_spacing": list(self.pixel_spacing),
            "instance_numbers": list(self.instance_numbers),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackGeometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            positions=np.asarray(d["positions"], dtype=np.float64),
            row_direction=np.asarray(d["row_direction"], dtype=np.float64),
            column_direction=np.asarray(d["column_direction"], dtype=np.float64),
            pixel_spacing=tuple(d["pixel_spacing"]),
            instance_numbers=tuple(d["instance_numbers"]),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StackGeometry):
            return NotImplemented
        return (
            self.instance_numbers == other.instance_numbers
            and self.pixel_spacing == other.pixel_spacing
            and np.array_equal(self.positions, other.positions)
            and np.array_equal(self.row_direction, other.row_direction)
            and np.array_equal(self.column_direction, other.column_direction)
        )

    __hash__ = None  # type: ignore[assignment]


CANONICAL_SIGN: np.ndarray = np.array([1.0, 1.0, -1.0])
"""Where increasing row and column indices point in a canonical stack, per dominant patient axis
(LPS): towards the patient's left (+x), posterior (+y), inferior (-z). The usual sagittal (row
(0, 1, 0), column (0, 0, -1)), axial (row (1, 0, 0), column (0, 1, 0)) and coronal orientations
are canonical already."""


def canonical_flips(geometry: StackGeometry) -> tuple[bool, bool]:
    """(flip rows, flip columns) that put a stack in the canonical in-plane orientation.

    A series may legally be stored with its rows or columns reversed (the tags say so); a network
    that reads pixels, not tags, would see it mirrored. Each in-plane axis is flipped when it
    points against :data:`CANONICAL_SIGN` along its dominant patient axis.
    """

    def against(direction: np.ndarray) -> bool:
        axis = int(np.argmax(np.abs(direction)))
        return bool(np.sign(direction[axis]) != CANONICAL_SIGN[axis])

    return against(geometry.column_direction), against(geometry.row_direction)


def canonical_in_plane(
    array: np.ndarray, geometry: StackGeometry
) -> tuple[np.ndarray, StackGeometry, tuple[bool, bool]]:
    """A stack in the canonical in-plane orientation: the (contiguous) array, its exact geometry
    and the (rows, columns) flips applied; unchanged arrays are returned as they are."""
    flip_rows, flip_columns = canonical_flips(geometry)
    if not (flip_rows or flip_columns):
        return array, geometry, (False, False)
    flipped = array[:, ::-1] if flip_rows else array
    flipped = flipped[:, :, ::-1] if flip_columns else flipped
    new_geometry = geometry.flipped_in_plane(flip_rows, flip_columns, array.shape)
    return np.ascontiguousarray(flipped), new_geometry, (flip_rows, flip_columns)


def project_point(
    src: StackGeometry, instance_number: int, x: float, y: float, dst: StackGeometry
) -> np.ndarray:
    """Project pixel (x = column, y = row) of ``src``'s instance into ``dst``: (slice, row, col).

    This is how a level point annotated on a sagittal slice finds its axial slice: both series
    share the study's patient frame, so the point goes to patient mm and back.
    """
    return dst.patient_to_voxel(src.pixel_to_patient(instance_number, x, y)[None])[0]


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(3)
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"direction {v.tolist()} has no length")
    return v / norm


def _interp_extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp for increasing or decreasing ``xp`` that extrapolates linearly past both ends."""
    if xp[-1] < xp[0]:
        xp, fp = xp[::-1], fp[::-1]
    out = np.interp(x, xp, fp)
    below, above = x < xp[0], x > xp[-1]
    slope_lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
    slope_hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    out[below] = fp[0] + (x[below] - xp[0]) * slope_lo
    out[above] = fp[-1] + (x[above] - xp[-1]) * slope_hi
    return out
