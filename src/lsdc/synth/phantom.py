"""An analytic lumbar-spine phantom in the DICOM patient frame, rendered into any imaging plane.

The phantom is a tissue map painted from simple primitives (elliptic tubes along the spine's
lordotic centre line, ellipsoids) on a regular millimetre grid of the patient frame (LPS: +x
patient left, +y posterior, +z superior). Every series of a study samples that one grid at the
patient coordinates of its pixels, so a point has the same anatomy in every series by
construction. The 25 findings are local narrowings painted last, each growing with its own latent
severity; nothing else in the phantom depends on a severity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lsdc.contract import CONDITIONS, LEVELS

# Tissue codes of the label grid. Nucleus codes come last, one per disc, so each disc can have its
# own (degeneration-dependent, label-independent) T2 brightness.
AIR, SOFT, FAT, CORTEX, MARROW, ANNULUS, CSF, ROOT, LIGAMENT = range(9)
ORGAN = 9  # ORGAN .. ORGAN + N_ORGANS - 1: random abdominal structures
N_ORGANS = 4
NUCLEUS = ORGAN + N_ORGANS  # NUCLEUS + d for disc d (0 = T12/L1, 1..5 = L1/L2..L5/S1)
N_DISCS = 6
N_TISSUES = NUCLEUS + N_DISCS

SEQUENCES: tuple[str, ...] = ("T1", "T2", "STIR")

# Mean signal per tissue and sequence (arbitrary units, ~0..1): T1 fat bright and CSF dark;
# T2 CSF and healthy discs bright; STIR like T2 with fat suppressed and darker marrow.
_BASE_SIGNAL: dict[str, dict[int, float]] = {
    "T1": {AIR: 0.0, SOFT: 0.38, FAT: 0.92, CORTEX: 0.06, MARROW: 0.62, ANNULUS: 0.28, CSF: 0.12,
           ROOT: 0.32, LIGAMENT: 0.14},
    "T2": {AIR: 0.0, SOFT: 0.26, FAT: 0.68, CORTEX: 0.05, MARROW: 0.42, ANNULUS: 0.2, CSF: 1.0,
           ROOT: 0.3, LIGAMENT: 0.1},
    "STIR": {AIR: 0.0, SOFT: 0.3, FAT: 0.1, CORTEX: 0.05, MARROW: 0.22, ANNULUS: 0.2, CSF: 1.0,
             ROOT: 0.32, LIGAMENT: 0.1},
}  # fmt: skip
_NUCLEUS_SIGNAL = {"T1": 0.36, "T2": 0.85, "STIR": 0.8}  # healthy disc; T2/STIR darken with age


@dataclass(frozen=True)
class Anatomy:
    """One study's spine: sizes and positions in mm (patient frame) plus latent severities.

    Attributes:
        scale: overall size factor (0.85-1.15), independent of the labels.
        centre: (x, y, z) of the L3/L4 disc centre.
        lordosis: anterior bow (mm) of the centre line at L3/L4 relative to L1 and S1.
        pitch: distance between neighbouring disc centres (body height + disc height).
        disc_heights: (6,) heights of the discs T12/L1 .. L5/S1.
        severity: (25,) latent severities in LABEL_COLUMNS order.
        nucleus_t2: (6,) T2 brightness factor of each disc nucleus (degeneration, label-free).
        fat_thickness: subcutaneous fat thickness (mm).
        organs: (N_ORGANS, 6) random abdominal ellipsoids (centre xyz, semi-axes xyz).
    """

    scale: float
    centre: np.ndarray
    lordosis: float
    pitch: float
    disc_heights: np.ndarray
    severity: np.ndarray
    nucleus_t2: np.ndarray
    fat_thickness: float
    organs: np.ndarray

    @property
    def disc_z(self) -> np.ndarray:
        """z of the six disc centres T12/L1, L1/L2 .. L5/S1 (superior first)."""
        return self.centre[2] + (3 - np.arange(N_DISCS)) * self.pitch

    def spine_y(self, z: np.ndarray | float) -> np.ndarray:
        """y of the vertebral-body centre line at height z: a lordotic (anteriorly bowed) curve."""
        t = (np.asarray(z, dtype=np.float64) - self.centre[2]) / (2.5 * self.pitch)
        return self.centre[1] - self.lordosis * (1.0 - t**2)

    @property
    def body_semi_axes(self) -> tuple[float, float]:
        """(x, y) semi-axes of a vertebral body."""
        return 22.0 * self.scale, 16.0 * self.scale

    @property
    def canal_semi_axes(self) -> tuple[float, float]:
        """(x, y) semi-axes of the thecal sac."""
        return 11.0 * self.scale, 7.5 * self.scale

    def canal_y(self, z: np.ndarray | float) -> np.ndarray:
        """y of the thecal sac's centre at height z (posterior to the bodies)."""
        return self.spine_y(z) + self.body_semi_axes[1] + 2.5 * self.scale + self.canal_semi_axes[1]

    @property
    def foramen_x(self) -> float:
        """|x| of the neural foramina (left at +x, right at -x)."""
        return 20.0 * self.scale

    @property
    def recess_x(self) -> float:
        """|x| of the subarticular zones (lateral recesses)."""
        return 9.0 * self.scale

    def finding_centre(self, condition: str, level: int) -> np.ndarray:
        """Patient coordinates of one finding's centre (``level`` 0..4 = L1/L2..L5/S1).

        Canal: the sac's centre at the disc; foramen: the foraminal fat on its side, just above
        the disc; subarticular zone: the lateral recess on its side, at the disc.
        """
        z = float(self.disc_z[level + 1])
        y = float(self.canal_y(z))
        x = float(self.centre[0])
        side = 1.0 if condition.startswith("left_") else -1.0
        if "foraminal" in condition:
            return np.array([x + side * self.foramen_x, y - 2.0 * self.scale, z + 2.0 * self.scale])
        if "subarticular" in condition:
            return np.array([x + side * self.recess_x, y - 3.0 * self.scale, z])
        return np.array([x, y, z])

    def axial_tilt(self, z: float) -> float:
        """Angle about +x that turns an axial plane parallel to the spine's axis at z (radians)."""
        t = (z - self.centre[2]) / (2.5 * self.pitch)
        slope = 2.0 * self.lordosis * t / (2.5 * self.pitch)  # d spine_y / dz
        return -np.arctan(slope)

    def finding_centres(self) -> np.ndarray:
        """(25, 3) patient coordinates of every finding's centre, in LABEL_COLUMNS order."""
        return np.array([self.finding_centre(c, j) for c in CONDITIONS for j in range(len(LEVELS))])


def draw_anatomy(
    rng: np.random.Generator, severity: np.ndarray, centre: np.ndarray | None = None
) -> Anatomy:
    """Draw one study's anatomy; every parameter is independent of ``severity``."""
    scale = float(rng.uniform(0.85, 1.15))
    if centre is None:
        centre = np.zeros(3)
    organs = np.column_stack(
        [
            rng.uniform(-70, 70, N_ORGANS),
            rng.uniform(-110, -45, N_ORGANS),
            rng.uniform(-90, 90, N_ORGANS),
            rng.uniform(12, 35, (N_ORGANS, 3)),
        ]
    )
    organs[:, :3] += centre
    return Anatomy(
        scale=scale,
        centre=np.asarray(centre, dtype=np.float64),
        lordosis=float(rng.uniform(4.0, 14.0)),
        pitch=float((28.0 + 9.0) * scale * rng.uniform(0.95, 1.05)),
        disc_heights=9.0 * scale * rng.uniform(0.8, 1.15, N_DISCS),
        severity=np.asarray(severity, dtype=np.float64),
        nucleus_t2=rng.uniform(0.35, 1.0, N_DISCS),
        fat_thickness=float(rng.uniform(8.0, 30.0)),
        organs=organs,
    )


class TissueGrid:
    """A tissue-code volume on a regular grid of the patient frame, painted primitive by primitive.

    Later primitives overwrite earlier ones (painter's order), so findings painted last narrow
    the spaces painted before them.
    """

    def __init__(self, lower: np.ndarray, upper: np.ndarray, voxel_mm: float) -> None:
        self.origin = np.asarray(lower, dtype=np.float64)
        self.voxel_mm = float(voxel_mm)
        shape = np.ceil((np.asarray(upper) - self.origin) / self.voxel_mm).astype(int) + 1
        self.codes = np.full(tuple(shape), AIR, dtype=np.uint8)
        self._axes = [self.origin[k] + self.voxel_mm * np.arange(shape[k]) for k in range(3)]

    def _box(self, lower: np.ndarray, upper: np.ndarray) -> tuple[slice, ...] | None:
        lo = np.floor((np.asarray(lower) - self.origin) / self.voxel_mm).astype(int)
        hi = np.ceil((np.asarray(upper) - self.origin) / self.voxel_mm).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.codes.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))

    def _coords(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y, z = (self._axes[k][box[k]] for k in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def ellipsoid(self, code: int, centre: np.ndarray, semi: np.ndarray) -> None:
        """Paint an axis-aligned ellipsoid."""
        centre, semi = np.asarray(centre, dtype=float), np.maximum(np.asarray(semi, float), 1e-3)
        box = self._box(centre - semi, centre + semi)
        if box is None:
            return
        x, y, z = self._coords(box)
        inside = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
        inside = inside + ((z - centre[2]) / semi[2]) ** 2 <= 1.0
        self.codes[box][inside] = code

    def tube(
        self,
        code: int,
        x_centre: float,
        y_centre: Callable[[np.ndarray], np.ndarray],
        semi: tuple[float, float],
        z_range: tuple[float, float],
    ) -> None:
        """Paint an elliptic tube along z whose centre follows ``y_centre(z)``."""
        z_lo, z_hi = min(z_range), max(z_range)
        zs = np.linspace(z_lo, z_hi, 16)
        ys = y_centre(zs)
        lower = np.array([x_centre - semi[0], ys.min() - semi[1], z_lo])
        upper = np.array([x_centre + semi[0], ys.max() + semi[1], z_hi])
        box = self._box(lower, upper)
        if box is None:
            return
        x, y, z = self._coords(box)
        inside = ((x - x_centre) / semi[0]) ** 2 + ((y - y_centre(z)) / semi[1]) ** 2 <= 1.0
        self.codes[box][inside] = code


def paint_anatomy(grid: TissueGrid, anatomy: Anatomy) -> None:
    """Paint body, spine and the 25 findings of ``anatomy`` into ``grid``."""
    a, sc = anatomy, anatomy.scale
    cx = float(a.centre[0])
    z_top, z_bottom = a.disc_z[0] + 2 * a.pitch, a.disc_z[-1] - 2 * a.pitch
    z_all = (z_bottom - 60.0, z_top + 60.0)
    back = float(a.canal_y(a.centre[2])) + 55.0 * sc  # skin of the back

    def const(v: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda z: np.full_like(z, v, dtype=float)

    # Trunk: fat envelope, muscle inside, a few abdominal organs.
    trunk_y = back - 115.0
    grid.tube(FAT, cx, const(trunk_y), (165.0, 115.0), z_all)
    f = a.fat_thickness
    grid.tube(SOFT, cx, const(trunk_y), (165.0 - f, 115.0 - f), z_all)
    for k, organ in enumerate(a.organs):
        grid.ellipsoid(ORGAN + k, organ[:3], organ[3:])
    # Paraspinal fat planes and muscles behind the canal.
    for side in (-1.0, 1.0):
        grid.tube(
            FAT, cx + side * 32 * sc, lambda z: a.canal_y(z) + 28 * sc, (4 * sc, 18 * sc), z_all
        )

    # Canal: epidural fat around the thecal sac (CSF), with two nerve roots in it.
    csx, csy = a.canal_semi_axes
    grid.tube(FAT, cx, a.canal_y, (csx + 3.5 * sc, csy + 3.0 * sc), z_all)
    grid.tube(CSF, cx, a.canal_y, (csx, csy), z_all)
    for side in (-1.0, 1.0):
        grid.tube(ROOT, cx + side * 4.0 * sc, lambda z: a.canal_y(z) + 3.0 * sc, (1.3, 1.3), z_all)

    # Vertebrae: bodies (cortex shell + marrow), pedicles, laminae and spinous processes.
    bsx, bsy = a.body_semi_axes
    for d in range(N_DISCS + 1):
        z_c = a.disc_z[0] + a.pitch / 2 - d * a.pitch  # vertebra above disc d (T12 .. L5), then S1
        half = (a.pitch - 9.0 * sc) / 2
        grid.tube(CORTEX, cx, a.spine_y, (bsx, bsy), (z_c - half, z_c + half))
        grid.tube(MARROW, cx, a.spine_y, (bsx - 2.0, bsy - 2.0), (z_c - half + 2, z_c + half - 2))
        yc = float(a.canal_y(z_c))
        for side in (-1.0, 1.0):
            pedicle = np.array([cx + side * (csx + 5 * sc), yc - 2 * sc, z_c])
            grid.ellipsoid(CORTEX, pedicle, np.array([4.5, 9.0, 7.5]) * sc)
            grid.ellipsoid(MARROW, pedicle, np.array([2.5, 7.0, 5.5]) * sc)
            lamina = np.array([cx + side * 9 * sc, yc + csy + 5 * sc, z_c])
            grid.ellipsoid(CORTEX, lamina, np.array([9.0, 4.0, 11.0]) * sc)
        grid.ellipsoid(CORTEX, (cx, yc + csy + 22 * sc, z_c - 3 * sc), np.array([4, 16, 9]) * sc)
        grid.ellipsoid(MARROW, (cx, yc + csy + 22 * sc, z_c - 3 * sc), np.array([2, 14, 7]) * sc)

    # Discs (annulus ring + nucleus) and, at each disc, facets, foramina and lateral recesses.
    for d in range(N_DISCS):
        z_d, h = a.disc_z[d], a.disc_heights[d]
        grid.tube(ANNULUS, cx, a.spine_y, (bsx, bsy), (z_d - h / 2, z_d + h / 2))
        grid.ellipsoid(NUCLEUS + d, (cx, float(a.spine_y(z_d)), z_d), (bsx - 6, bsy - 5, h / 2.5))
        yc = float(a.canal_y(z_d))
        for side in (-1.0, 1.0):
            facet = np.array([cx + side * (csx + 7 * sc), yc + csy + 1 * sc, z_d])
            grid.ellipsoid(CORTEX, facet, np.array([6, 5, 12]) * sc)
            grid.ellipsoid(MARROW, facet, np.array([4, 3, 10]) * sc)
        if d == 0:
            continue  # T12/L1 carries no label: no foramen or recess drawn
        for condition in CONDITIONS[1:3]:  # foramina: a soft-tissue rim around the fat keyhole
            rim = a.finding_centre(condition, d - 1)
            grid.ellipsoid(SOFT, rim, np.array([7, 9, 12]) * sc)
        for condition in CONDITIONS[3:]:  # lateral recesses: anterolateral pockets of the sac
            recess = a.finding_centre(condition, d - 1)
            grid.ellipsoid(CSF, recess, np.array([5.0, 3.5, 9.0]) * sc)

    paint_findings(grid, anatomy)


def paint_findings(grid: TissueGrid, anatomy: Anatomy) -> None:
    """Paint the 25 findings, each a local narrowing whose size grows with its latent severity.

    - Spinal canal: a disc bulge from the front and a thickened ligamentum flavum from the back
      close the sac's AP depth at the disc by up to ~85%, over the central 10 mm (mid-sagittal).
    - Neural foramen: the foraminal fat shrinks (to ~20% of its size at s = 1) around the root,
      seen on the parasagittal slice through that foramen.
    - Subarticular zone: the facet and ligament grow medially into the lateral recess, filling it
      at s = 1, seen on the axial slices of that disc.
    """
    a, sc = anatomy, anatomy.scale
    csx, csy = a.canal_semi_axes
    sev = a.severity.reshape(len(CONDITIONS), len(LEVELS))
    for j in range(len(LEVELS)):
        for i, condition in enumerate(CONDITIONS):
            s = float(sev[i, j])
            centre = a.finding_centre(condition, j)
            if condition == "spinal_canal_stenosis":
                close = 0.85 * s * 2 * csy
                front = centre + np.array([0.0, -csy - 1.0, 0.0])
                grid.ellipsoid(ANNULUS, front, np.array([5 * sc, 0.6 * close + 1, 4 * sc + 4 * s]))
                rear = centre + np.array([0.0, csy + 1.0, 2 * sc])
                grid.ellipsoid(LIGAMENT, rear, np.array([5 * sc, 0.4 * close + 1.0, 5 * sc]))
            elif "foraminal" in condition:
                keep = 1.0 - 0.8 * s
                grid.ellipsoid(FAT, centre, np.array([5.0, 7.0 * keep, 9.5 * keep]) * sc)
                grid.ellipsoid(ROOT, centre + np.array([0, 0, 5.5 * sc]), np.array([2, 2, 2]) * sc)
            else:
                side = 1.0 if condition.startswith("left_") else -1.0
                lateral_edge = centre[0] + side * 5.0 * sc  # the recess's lateral wall
                reach = 1.0 + 10.0 * sc * s
                bone = centre + np.array([0.0, 1.0 * sc, 0.0])
                bone[0] = lateral_edge - side * reach / 2
                grid.ellipsoid(LIGAMENT, bone, np.array([reach / 2, 5.5 * sc, 8.0 * sc]))


def tissue_signal(rng: np.random.Generator, anatomy: Anatomy) -> dict[str, np.ndarray]:
    """Per-study signal of every tissue code for each sequence (a lookup table per sequence).

    Each tissue's signal is jittered per study (scanner, patient) independently of the labels;
    each disc nucleus gets its own T2/STIR brightness; organs get random signals.
    """
    jitter = rng.uniform(0.85, 1.15, N_TISSUES)
    organ_signal = rng.uniform(0.15, 0.8, (len(SEQUENCES), N_ORGANS))
    tables = {}
    for k, seq in enumerate(SEQUENCES):
        table = np.zeros(N_TISSUES, dtype=np.float32)
        for code, value in _BASE_SIGNAL[seq].items():
            table[code] = value
        table[ORGAN : ORGAN + N_ORGANS] = organ_signal[k]
        nucleus = _NUCLEUS_SIGNAL[seq] * (anatomy.nucleus_t2 if seq != "T1" else 1.0)
        table[NUCLEUS : NUCLEUS + N_DISCS] = nucleus
        tables[seq] = table * jitter.astype(np.float32)
    return tables


def signal_volume(grid: TissueGrid, table: np.ndarray) -> np.ndarray:
    """The grid's tissue codes looked up in a per-sequence signal table (float32 volume)."""
    return table[grid.codes]


def sample(grid: TissueGrid, volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a signal volume on ``grid`` at patient points (..., 3)."""
    index = (points.reshape(-1, 3) - grid.origin) / grid.voxel_mm
    values = ndimage.map_coordinates(volume, index.T, order=1, mode="nearest")
    return values.reshape(points.shape[:-1])


def bias_field(rng: np.random.Generator, centre: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth multiplicative coil-sensitivity field over patient space (per study)."""
    coef = rng.normal(0.0, 0.25, 3)
    quad = rng.normal(0.0, 0.15, 3)

    def field(points: np.ndarray) -> np.ndarray:
        t = ((points - centre) / 150.0).astype(np.float32)
        return np.exp(t @ coef.astype(np.float32) + (t * t) @ quad.astype(np.float32))

    return field


class LayeredPhantom:
    """The phantom on two grids: a fine one over the spine, where the findings are, and a coarse
    one over the whole field (trunk, organs), so a 300 mm field at 0.3-0.9 mm pixels costs a
    spine's worth of fine voxels rather than a trunk's.

    Each sample reads the fine grid where it lies inside it and the coarse grid elsewhere. The
    signal can be averaged over a slice's thickness (a box along the grid axis nearest the slice
    normal), as an MR slice of 3-4.5 mm averages the tissue it cuts.

    Args:
        anatomy: the study's spine.
        lower / upper: (3,) corners of the region the images cover (patient mm).
        fine_mm / coarse_mm: voxel sizes of the two grids.
    """

    def __init__(
        self,
        anatomy: Anatomy,
        lower: np.ndarray,
        upper: np.ndarray,
        fine_mm: float = 0.7,
        coarse_mm: float = 2.0,
    ) -> None:
        self.coarse = TissueGrid(
            np.asarray(lower) - 2 * coarse_mm, np.asarray(upper) + 2 * coarse_mm, coarse_mm
        )
        paint_anatomy(self.coarse, anatomy)
        spine_lower, spine_upper = spine_region(anatomy)
        fine_lower = np.maximum(spine_lower, np.asarray(lower) - 2 * fine_mm)
        fine_upper = np.minimum(spine_upper, np.asarray(upper) + 2 * fine_mm)
        self.fine: TissueGrid | None = None
        if np.all(fine_upper - fine_lower > 4 * fine_mm):
            self.fine = TissueGrid(fine_lower, fine_upper, fine_mm)
            paint_anatomy(self.fine, anatomy)
        self._volumes: dict[tuple[int, str, int, int], np.ndarray] = {}

    def _volume(
        self, grid: TissueGrid, sequence: str, table: np.ndarray, axis: int, thickness_mm: float
    ) -> np.ndarray:
        """The grid's signal, box-averaged over ``thickness_mm`` along ``axis`` (an odd width
        in voxels, so the average stays centred); kept per (grid, sequence, axis, width)."""
        width = 2 * int(round((thickness_mm / grid.voxel_mm - 1) / 2)) + 1
        key = (id(grid), sequence, axis, max(width, 1))
        if key not in self._volumes:
            volume = signal_volume(grid, table)
            if width > 1:
                volume = ndimage.uniform_filter1d(volume, width, axis=axis, mode="nearest")
            self._volumes[key] = volume
        return self._volumes[key]

    def sample(
        self,
        sequence: str,
        table: np.ndarray,
        points: np.ndarray,
        normal: np.ndarray,
        thickness_mm: float,
    ) -> np.ndarray:
        """Signal (float32, ``points.shape[:-1]``) at patient points (..., 3) of slices whose
        normal is ``normal`` and thickness ``thickness_mm``."""
        axis = int(np.argmax(np.abs(normal)))
        flat = points.reshape(-1, 3)
        values = np.empty(len(flat), dtype=np.float32)
        outside = np.ones(len(flat), dtype=bool)
        if self.fine is not None:
            index = (flat - self.fine.origin) / self.fine.voxel_mm
            inside = np.all((index >= 0) & (index <= np.array(self.fine.codes.shape) - 1), axis=1)
            volume = self._volume(self.fine, sequence, table, axis, thickness_mm)
            values[inside] = ndimage.map_coordinates(volume, index[inside].T, order=1)
            outside = ~inside
        index = (flat[outside] - self.coarse.origin) / self.coarse.voxel_mm
        volume = self._volume(self.coarse, sequence, table, axis, thickness_mm)
        values[outside] = ndimage.map_coordinates(volume, index.T, order=1, mode="nearest")
        return values.reshape(points.shape[:-1])


def spine_region(anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) corners of a box around the lumbar spine and everything painted near it:
    bodies, canal, foramina, facets, laminae, spinous processes and paraspinal fat planes, from
    T12 to S1."""
    a, sc = anatomy, anatomy.scale
    z = np.linspace(a.disc_z[-1] - 1.5 * a.pitch, a.disc_z[0] + 1.5 * a.pitch, 64)
    half_x = 45.0 * sc + 5.0
    y_lo = float(np.min(a.spine_y(z))) - a.body_semi_axes[1] - 8.0
    y_hi = float(np.max(a.canal_y(z))) + 50.0 * sc
    lower = np.array([a.centre[0] - half_x, y_lo, z[0]])
    upper = np.array([a.centre[0] + half_x, y_hi, z[-1]])
    return lower, upper
