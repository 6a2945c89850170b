"""A label map evaluated only where the images sample it.

A dense tissue volume at 1 mm over the trunk costs more than a study's whole time budget, so the
anatomical phantom never builds one: every stack is a regular grid of sample points (slice x row x
column x a few sub-samples along the slice normal for partial volume), and each anatomical
structure is an implicit shape evaluated only on the block of that grid that its bounding box
covers. :class:`Canvas` holds one such grid, its (elastically deformed) patient coordinates and
the tissue code painted at every point; structures paint in painter's order (later ones win).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Box = tuple[slice, slice, slice, slice]


class Canvas:
    """Sample points of one block of slices and the tissue code painted at each.

    Args:
        origin: (3,) patient position of index (0, 0, 0, 0).
        steps: (4, 3) patient displacement of one step along each index axis (slice, row,
            column, sub-sample).
        shape: (slices, rows, columns, sub-samples).
        deform: maps undeformed (x, y, z) arrays to deformed ones (smooth, bounded by ``pad``).
            It is evaluated at the middle sub-sample and shifts the others alike.
        pad: the most (mm) ``deform`` moves a point: bounding boxes grow by it.
    """

    def __init__(
        self,
        origin: np.ndarray,
        steps: np.ndarray,
        shape: tuple[int, int, int, int],
        deform: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple] | None = None,
        pad: float = 0.0,
    ) -> None:
        self.origin = np.asarray(origin, dtype=np.float64)
        self.steps = np.asarray(steps, dtype=np.float64)
        self.shape = shape
        self.pad = float(pad)
        mid = shape[3] // 2
        # Coordinates of the middle sub-sample (slice, row, column); the others are offsets
        # along the normal. The warp is smooth over tens of mm: its displacement at the middle
        # sub-sample serves the whole slice thickness.
        index = [np.arange(n, dtype=np.float32) for n in shape[:3]]
        centre = self.origin + mid * self.steps[3]
        plane = []
        for axis in range(3):
            value = np.float32(centre[axis])
            for k in range(3):
                shape_k = [1, 1, 1]
                shape_k[k] = shape[k]
                value = value + (index[k] * np.float32(self.steps[k, axis])).reshape(shape_k)
            plane.append(np.ascontiguousarray(np.broadcast_to(value, shape[:3])))
        if deform is not None:
            plane = list(deform(*plane))
        self.mid_points = tuple(plane)
        self.offsets = ((np.arange(shape[3]) - mid)[:, None] * self.steps[3]).astype(np.float32)
        """(sub-samples, 3) patient offsets of each sub-sample from the middle one."""
        self.half_thickness = float(np.abs(self.offsets).sum(axis=1).max())
        """The farthest (mm, per axis summed) a sub-sample lies from the middle one."""
        self.codes = np.zeros(shape, dtype=np.uint8)
        basis = self.steps[:3].T  # columns: slice, row, column steps
        self._inverse = np.linalg.inv(basis)
        self._sub_extent = float(np.linalg.norm(self.steps[3]) * (shape[3] - 1))

    def box(self, lower: np.ndarray, upper: np.ndarray) -> Box | None:
        """Index block holding every point whose patient position lies in [lower, upper] (grown
        by the deformation bound), or None when no point can."""
        lower = np.asarray(lower, dtype=np.float64) - self.pad - self._sub_extent
        upper = np.asarray(upper, dtype=np.float64) + self.pad + self._sub_extent
        corners = np.array(
            [[(lower, upper)[i][0], (lower, upper)[j][1], (lower, upper)[k][2]]
             for i in (0, 1) for j in (0, 1) for k in (0, 1)]
        )  # fmt: skip
        index = (corners - self.origin) @ self._inverse.T
        lo = np.floor(index.min(axis=0)).astype(int)
        hi = np.ceil(index.max(axis=0)).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape[:3])
        if np.any(hi <= lo):
            return None
        return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]), slice(None))

    def points(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Deformed patient coordinates (x, y, z) of a block, shaped like ``codes[box]``."""
        return tuple(
            plane[box[:3]][..., None] + self.offsets[box[3], axis]
            for axis, plane in enumerate(self.mid_points)
        )

    def write(self, box: Box, index: np.ndarray, codes: np.ndarray) -> None:
        """Set the block's points at flat ``index`` to ``codes`` where those are non-zero."""
        block = self.codes[box].copy()
        flat = block.reshape(-1)
        keep = codes > 0
        flat[index[keep]] = codes[keep]
        self.codes[box] = block
