"""``lsdc synth``: a synthetic competition root whose best possible answer is known.

It writes every file of the real competition folder (CSVs and ``{split}_images/{study_id}/
{series_id}/{instance_number}.dcm``) from a seed, plus the answer key beside them:
``oracle_train.csv`` / ``oracle_test.csv`` (the true class probabilities) and
``solution_test.csv`` (the test labels in the metric's solution format). Images come from the
phantom of :mod:`lsdc.synth.phantom`, labels from the generative model of
:mod:`lsdc.synth.labels`; docs/synthetic.md describes both.

Everything random is drawn from numpy Generators seeded by (seed, split, study index), so a seed
gives the same bytes on every run.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from lsdc.contract import (
    CONDITION_NAMES,
    CONDITIONS,
    GRADING_SERIES,
    LABEL_COLUMNS,
    LEVEL_NAMES,
    LEVELS,
    PRED_COLUMNS,
    SEVERITIES,
    SPLITS,
    all_row_ids,
    labels_to_solution,
    write_csv_atomic,
)
from lsdc.errors import UserError
from lsdc.synth import anatomy, phantom, render, tissues
from lsdc.synth import labels as synth_labels
from lsdc.synth.config import SynthConfig
from lsdc.utils import atomic_path, init_worker

ANSWER_FILES: tuple[str, ...] = ("oracle_train.csv", "oracle_test.csv", "solution_test.csv")
"""Files beside the competition files that hold the answer (no competition file has these names)."""

MANUFACTURERS: tuple[str, ...] = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips Medical Systems")

_SAGITTAL = (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))
_AXIAL = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))

COMPETITION_MATRICES: dict[str, dict[int, float]] = {
    "sagittal": {320: 0.4, 384: 0.35, 448: 0.05, 512: 0.12, 640: 0.04, 768: 0.02, 1024: 0.02},
    "axial": {320: 0.7, 384: 0.2, 448: 0.05, 512: 0.05},
}
"""The competition profile's matrices (rows = columns) and their probabilities, per plane."""
COMPETITION_PIXEL_MM = (0.3, 0.9)
"""Pixel spacing range of the competition profile: the field of view is clipped to matrix x it."""
COMPETITION_FOV_MM = {"sagittal": (220.0, 320.0), "axial": (150.0, 240.0)}
DEFAULT_FOV_MM = {"sagittal": (190.0, 230.0), "axial": (160.0, 200.0)}
ACQUISITION_MM = 0.8
"""Competition profile: images are rendered at this pixel size (or their own, if coarser) and
interpolated to their matrix, as a scanner interpolates a ~0.8 mm acquisition to 512-1024 px."""


# --------------------------------------------------------------------------------- series plans
@dataclass
class Stack:
    """One stack of parallel slices: exactly the geometry tags its DICOM files carry."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient
    row_direction: np.ndarray  # (3,) ImageOrientationPatient[:3]
    column_direction: np.ndarray  # (3,) ImageOrientationPatient[3:]
    rows: int
    columns: int
    pixel_spacing: float  # square pixels, mm
    slice_thickness: float
    spacing_between_slices: float | None  # None: the tag is left out

    @property
    def normal(self) -> np.ndarray:
        """Slice normal (row x column direction), the axis ImagePositionPatient moves along."""
        return np.cross(self.row_direction, self.column_direction)

    def pixel_points(self, size: int | None = None) -> np.ndarray:
        """(n, rows, columns, 3) patient coordinates of every pixel centre.

        With ``size``, a ``(n, size, size, 3)`` grid over the same field instead: its first and
        last pixel centres are the stack's own, so it interpolates onto the stack's pixels with
        the corners aligned.
        """
        if size is None:
            r = np.arange(self.rows)[:, None, None] * self.pixel_spacing * self.column_direction
            c = np.arange(self.columns)[None, :, None] * self.pixel_spacing * self.row_direction
            return self.positions[:, None, None, :] + (r + c)[None]
        r = np.linspace(0.0, (self.rows - 1) * self.pixel_spacing, size)[:, None, None]
        c = np.linspace(0.0, (self.columns - 1) * self.pixel_spacing, size)[None, :, None]
        offsets = r * self.column_direction + c * self.row_direction
        return self.positions[:, None, None, :] + offsets[None]

    def corners(self) -> np.ndarray:
        """(8, 3) patient coordinates of the corner pixel centres of the first and last slice."""
        r = np.array([0.0, self.rows - 1])[:, None] * self.pixel_spacing * self.column_direction
        c = np.array([0.0, self.columns - 1])[:, None] * self.pixel_spacing * self.row_direction
        ends = self.positions[[0, -1]]
        return (ends[:, None, None, :] + r[None, :, None, :] + c[None, None, :, :]).reshape(-1, 3)

    def locate(self, point: np.ndarray) -> tuple[int, float, float, float]:
        """Nearest slice to ``point`` and the point's projection on it.

        Returns:
            (slice index, x = column, y = row, distance of the point from that slice in mm).
        """
        offsets = (point - self.positions) @ self.normal
        k = int(np.argmin(np.abs(offsets)))
        d = point - self.positions[k]
        x = float(d @ self.row_direction) / self.pixel_spacing
        y = float(d @ self.column_direction) / self.pixel_spacing
        return k, x, y, float(abs(offsets[k]))


@dataclass
class Series:
    """One series of a study: its stacks, sequence and the instance number of every slice.

    A plan of geometry and tags only; :func:`_render_study` renders any series whatever its
    orientation, number of stacks or protocol. To add a series to a study (a localizer, a
    coronal T2, a duplicate), build its stacks with :func:`make_stack` (any row and column
    directions), give it a ``protocol`` of :data:`lsdc.synth.tissues.PROTOCOLS` and a
    ``timing`` from :func:`lsdc.synth.tissues.draw_timing`, append it to the list
    :func:`_plan_series` returns, and set its ``instance_numbers``: rendering, DICOM tags and
    coordinates follow.

    ``description`` is the competition's (the CSVs); ``series_tag`` the vendor-style
    SeriesDescription the DICOM files carry (None: ``description``, as the simple phantom).
    """

    series_id: int
    description: str
    sequence: str
    stacks: list[Stack]
    manufacturer: str = "SIEMENS"
    field_strength: float = 3.0
    instance_numbers: list[np.ndarray] = field(default_factory=list)  # one array per stack
    protocol: str | None = None
    timing: tissues.Timing | None = None
    series_tag: str | None = None


SERIES_TAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "SIEMENS": {
        "sagittal_t1": ("t1_tse_sag", "T1_TSE_SAG", "t1_tse_sag_384"),
        "sagittal_t2": ("t2_tse_sag", "T2_TSE_SAG", "t2_tse_sag_384"),
        "sagittal_stir": ("t2_tirm_sag", "T2_TIRM_SAG", "t2_stir_sag"),
        "axial_t2": ("t2_tse_tra", "T2_TSE_TRA", "t2_tse_tra_p2"),
    },
    "GE MEDICAL SYSTEMS": {
        "sagittal_t1": ("SAG T1 FSE", "Sag T1", "SAG T1 FLAIR"),
        "sagittal_t2": ("SAG T2 FSE", "Sag T2", "SAG T2 FRFSE"),
        "sagittal_stir": ("SAG STIR", "Sag STIR", "SAG T2 STIR"),
        "axial_t2": ("AX T2 FSE", "Ax T2", "AX T2 FRFSE"),
    },
    "Philips Medical Systems": {
        "sagittal_t1": ("T1W_TSE_SAG", "sT1W_TSE", "T1_SAG"),
        "sagittal_t2": ("T2W_TSE_SAG", "sT2W_TSE", "T2_SAG"),
        "sagittal_stir": ("STIR_SAG", "sSTIR", "T2_STIR_SAG"),
        "axial_t2": ("T2W_TSE_TRA", "sT2W_TSE_TRA", "T2_AX"),
    },
}
"""Vendor-style SeriesDescription tags: each site (vendor, style) names its series its way."""


def _protocol_of(series: Series) -> str:
    if series.description == "Sagittal T1":
        return "sagittal_t1"
    if series.description == "Axial T2":
        return "axial_t2"
    return "sagittal_stir" if series.sequence == "STIR" else "sagittal_t2"


def _assign_protocols(rng: np.random.Generator, series: list[Series]) -> None:
    """Draw each series' protocol timings (TR, TE, TI) and its site's vendor-style tag."""
    if not series:
        return
    style = int(rng.integers(3))
    for s in series:
        s.protocol = _protocol_of(s)
        s.timing = tissues.draw_timing(rng, s.protocol, s.field_strength)
        s.series_tag = SERIES_TAGS[s.manufacturer][s.protocol][style]


def _rotation(
    rng: np.random.Generator, in_plane_deg: float, tilt_deg: float, normal: np.ndarray
) -> np.ndarray:
    """A small rotation matrix: about the slice normal (in-plane), then about a random in-plane
    axis (an oblique plane)."""
    in_plane = Rotation.from_rotvec(np.deg2rad(rng.uniform(-in_plane_deg, in_plane_deg)) * normal)
    axis = np.cross(normal, rng.standard_normal(3))
    axis /= np.linalg.norm(axis)
    tilt = Rotation.from_rotvec(np.deg2rad(rng.uniform(-tilt_deg, tilt_deg)) * axis)
    return (tilt * in_plane).as_matrix()


def make_stack(
    rng: np.random.Generator,
    centre: np.ndarray,
    axes: tuple[np.ndarray, np.ndarray],
    offsets: np.ndarray,
    matrix: int,
    fov: float,
    rotation: np.ndarray,
    keep_spacing_tag: bool,
) -> Stack:
    """A stack centred on ``centre`` with slices at ``offsets`` along the (rotated) normal.

    Geometry is rounded to what the DICOM tags will hold, so the image is rendered at exactly the
    positions a reader will compute from the tags.
    """
    row, col = (np.round(rotation @ a, 6) for a in axes)
    normal = np.cross(row, col)
    spacing = round(fov / matrix, 6)
    corner = centre - (matrix - 1) / 2 * spacing * (row + col)
    positions = np.round(corner[None, :] + offsets[:, None] * normal[None, :], 4)
    step = float(np.median(np.abs(np.diff(offsets)))) if len(offsets) > 1 else 4.0
    thickness = round(step * rng.uniform(0.8, 1.0), 3)
    return Stack(
        positions=positions,
        row_direction=row,
        column_direction=col,
        rows=matrix,
        columns=matrix,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        spacing_between_slices=round(step, 4) if keep_spacing_tag else None,
    )


def _competition_matrix(rng: np.random.Generator, plane: str) -> int:
    """A matrix drawn from COMPETITION_MATRICES[plane]."""
    sizes = np.array(list(COMPETITION_MATRICES[plane]))
    weights = np.array(list(COMPETITION_MATRICES[plane].values()))
    return int(rng.choice(sizes, p=weights / weights.sum()))


def _level_tilt(rng: np.random.Generator, anatomy: phantom.Anatomy, z: float) -> np.ndarray:
    """A rotation that turns an axial plane parallel to the disc near ``z`` (normal along the
    lordotic spine's axis there, about the left-right axis), give or take 2 degrees."""
    angle = anatomy.axial_tilt(z) + np.deg2rad(rng.uniform(-2.0, 2.0))
    return Rotation.from_rotvec(angle * np.array([1.0, 0.0, 0.0])).as_matrix()


def _plan_series(
    rng: np.random.Generator, config: SynthConfig, anatomy: phantom.Anatomy, series_ids: np.ndarray
) -> list[Series]:
    """Draw the series of one study: two sagittals and one or more axials, in one patient frame.

    The default profile sizes every series from the config; the competition profile draws the
    matrix, pixel spacing and slice counts per study (docs/synthetic.md).
    """
    a = anatomy
    ids = iter(series_ids.tolist())
    competition = config.profile == "competition"
    planes = ("sagittal", "axial")
    study_matrix = {
        plane: _competition_matrix(rng, plane) if competition else config.image_size
        for plane in planes
    }
    fov_range = COMPETITION_FOV_MM if competition else DEFAULT_FOV_MM

    def matrix(plane: str) -> int:
        if rng.random() < config.matrix_variation_rate:
            if competition:
                return _competition_matrix(rng, plane)
            return int(round(config.image_size * rng.uniform(0.8, 1.3) / 2) * 2)
        return study_matrix[plane]

    def field(fov: float, size: int) -> float:
        """The field of view (mm) of a ``size`` matrix: the competition profile keeps its pixel
        spacing within COMPETITION_PIXEL_MM."""
        if competition:
            return float(np.clip(fov, *(size * np.array(COMPETITION_PIXEL_MM))))
        return fov

    def rotation(normal: np.ndarray, tilt_deg: float = 2.0) -> np.ndarray:
        if rng.random() < config.oblique_rate:
            return _rotation(rng, 5.0, tilt_deg, normal)
        return np.eye(3)

    def keep_spacing() -> bool:
        return rng.random() >= config.missing_spacing_rate

    series: list[Series] = []
    sag_normal = np.cross(*_SAGITTAL)
    mid_z = float(np.mean(a.disc_z[1:]))
    sagittal_sequence = "T2" if rng.random() < 0.6 else "STIR"
    for description, sequence in (
        ("Sagittal T1", "T1"),
        ("Sagittal T2/STIR", sagittal_sequence),
    ):
        n = int(rng.integers(15, 23)) if competition else config.slices
        cover = 2 * (a.foramen_x + 8.0)  # both foramina with a margin
        step = max(rng.uniform(3.0 if competition else 3.3, 4.5), cover / (n - 1))
        # The sagittal normal is -x: decreasing offsets run the slices from the patient's right
        # (-x) to the left (+x).
        offsets = ((n - 1) / 2 - np.arange(n)) * step
        centre = np.array(
            [
                a.centre[0] + rng.uniform(-1.5, 1.5),
                a.centre[1] + 20.0 + rng.uniform(-12, 12),
                mid_z + rng.uniform(-12, 12),
            ]
        )
        size = matrix("sagittal")
        stack = make_stack(
            rng, centre, _SAGITTAL, offsets, size, field(rng.uniform(*fov_range["sagittal"]), size),
            rotation(sag_normal), keep_spacing(),
        )  # fmt: skip
        series.append(Series(next(ids), description, sequence, [stack]))

    # Axial T2: slices from above L1/L2 to below L5/S1, as one stack, several stacks in one
    # series, or several series (upper and lower levels). The competition profile splits into
    # two or three parts, often each tilted to its discs.
    z_hi = a.disc_z[1] + 0.35 * a.pitch
    z_lo = a.disc_z[5] - 0.3 * a.pitch
    centre_xy = np.array(
        [a.centre[0] + rng.uniform(-8, 8), float(a.canal_y(mid_z)) - 10 + rng.uniform(-10, 10)]
    )
    fov = rng.uniform(*fov_range["axial"])
    n_axial = config.n_axial_slices
    layout = rng.random()
    if layout < config.two_axial_series_rate:
        parts, grouping = 2, "series"
    elif layout < config.two_axial_series_rate + config.multi_stack_axial_rate:
        parts, grouping = 2, "stacks"
    else:
        parts, grouping = 1, "series"
    level_tilt = False
    if competition and parts > 1:
        parts = 3 if rng.random() < 0.4 else 2
        level_tilt = rng.random() < 0.7
    axial_step = rng.uniform(4.0, 5.5) if competition else 0.0
    edges = np.linspace(z_lo, z_hi, parts + 1)
    overlap = 0.15 * a.pitch if parts > 1 else 0.0
    shared_matrix, shared_spacing = matrix("axial"), keep_spacing()
    axial_stacks: list[Stack] = []
    for p in range(parts):
        lo, hi = edges[p] - overlap, edges[p + 1] + overlap
        if competition:
            n = int(np.clip(round((hi - lo) / axial_step) + 1, 15, 60))
        else:
            n = max(3, int(round(n_axial / parts)))
        zs = np.linspace(lo, hi, n)
        centre = np.array([centre_xy[0], centre_xy[1], (lo + hi) / 2])
        if level_tilt:
            tilt = _level_tilt(rng, a, float(centre[2]))
        elif grouping == "stacks":
            tilt = np.eye(3) if p == 0 else _rotation(rng, 0.0, 8.0, np.array([0.0, 0.0, 1.0]))
        else:
            tilt = rotation(np.array([0.0, 0.0, 1.0]), tilt_deg=3.0)
        size = shared_matrix if grouping == "stacks" else matrix("axial")
        stack = make_stack(
            rng, centre, _AXIAL, zs - centre[2], size, field(fov, size), tilt,
            shared_spacing if grouping == "stacks" else keep_spacing(),
        )  # fmt: skip
        axial_stacks.append(stack)
    if grouping == "stacks":
        series.append(Series(next(ids), "Axial T2", "T2", axial_stacks))
    else:
        series.extend(Series(next(ids), "Axial T2", "T2", [s]) for s in axial_stacks)

    if rng.random() < config.missing_series_rate:
        drop = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")[int(rng.integers(3))]
        series = [s for s in series if s.description != drop]

    manufacturer = MANUFACTURERS[int(rng.integers(len(MANUFACTURERS)))]
    field_strength = 1.5 if rng.random() < 0.5 else 3.0
    for s in series:
        s.manufacturer, s.field_strength = manufacturer, field_strength
        s.instance_numbers = _instance_numbers(rng, config, [len(st.positions) for st in s.stacks])
    return series


def _instance_numbers(
    rng: np.random.Generator, config: SynthConfig, counts: list[int]
) -> list[np.ndarray]:
    """Instance numbers of every slice of a series (one array per stack).

    Normally 1..n in slice order; with the realism switches on, some series start higher and skip
    numbers, and some number their slices against slice order (reversed, or scrambled).
    """
    total = sum(counts)
    numbers = np.arange(1, total + 1)
    if rng.random() < config.instance_gap_rate:
        steps = 1 + (rng.random(total) < 0.15).astype(int)
        numbers = int(rng.integers(2, 40)) + np.cumsum(steps) - steps[0]
    if rng.random() < config.unordered_instances_rate:
        numbers = numbers[::-1] if rng.random() < 0.8 else rng.permutation(numbers)
    return np.split(numbers, np.cumsum(counts)[:-1])


# ------------------------------------------------------------------------------------- rendering
def _voxel_size(series: list[Series]) -> float:
    """Phantom grid step: finer than the finest pixel, within [0.6, 1.5] mm (memory bound)."""
    finest = min(st.pixel_spacing for s in series for st in s.stacks)
    return float(np.clip(0.75 * finest, 0.6, 1.5))


SignalOf = Callable[[str, np.ndarray, Stack, Callable[[np.ndarray], np.ndarray]], np.ndarray]
"""(sequence, its tissue signal table, stack, bias field) -> noiseless signal (n, rows, columns),
or (n, size, size) over the same field when rendered coarser than the matrix."""


def _grid_signal(anatomy: phantom.Anatomy, series: list[Series]) -> SignalOf:
    """The default profile: one tissue grid over every pixel, sampled at every pixel centre."""
    all_points = {id(st): st.pixel_points() for s in series for st in s.stacks}
    corners = np.concatenate(
        [p[[0, -1]][:, [0, -1]][:, :, [0, -1]].reshape(-1, 3) for p in all_points.values()]
    )
    voxel = _voxel_size(series)
    grid = phantom.TissueGrid(
        corners.min(axis=0) - 2 * voxel, corners.max(axis=0) + 2 * voxel, voxel
    )
    phantom.paint_anatomy(grid, anatomy)
    volumes: dict[str, np.ndarray] = {}

    def signal(sequence: str, table: np.ndarray, stack: Stack, bias: Callable) -> np.ndarray:
        if sequence not in volumes:
            volumes[sequence] = phantom.signal_volume(grid, table)
        p = all_points.pop(id(stack))
        return phantom.sample(grid, volumes[sequence], p) * bias(p)

    return signal


def _layered_signal(anatomy: phantom.Anatomy, series: list[Series]) -> SignalOf:
    """The competition profile: a fine grid over the spine and a coarse one around it
    (:class:`phantom.LayeredPhantom`), averaged over each slice's thickness, rendered at
    ACQUISITION_MM (or the stack's own, coarser, pixel) and interpolated to the matrix."""
    corners = np.concatenate([st.corners() for s in series for st in s.stacks])
    layered = phantom.LayeredPhantom(anatomy, corners.min(axis=0), corners.max(axis=0))

    def signal(sequence: str, table: np.ndarray, stack: Stack, bias: Callable) -> np.ndarray:
        field_mm = (stack.rows - 1) * stack.pixel_spacing
        size = min(stack.rows, int(np.ceil(field_mm / ACQUISITION_MM)) + 1)
        p = stack.pixel_points(size)
        return layered.sample(sequence, table, p, stack.normal, stack.slice_thickness) * bias(p)

    return signal


@dataclass(frozen=True)
class Look:
    """What every series of one study shares: its tissues' T1, T2, PD and its bias and texture
    fields (a PACS export's extra series are of the same patient in the same coil)."""

    table: tissues.TissueTable
    bias: Callable
    texture: Callable


def draw_look(rng: np.random.Generator, spine: anatomy.Spine, field_strength: float) -> Look:
    """One study's :class:`Look` (tissues at the study's field strength)."""
    table = tissues.draw_tissues(rng, spine, field_strength)
    bias = render.bias_field(rng, spine.centre)
    return Look(table, bias, render.texture_field(rng, spine.centre))


def render_anatomical(
    rng: np.random.Generator,
    spine: anatomy.Spine,
    look: Look,
    series: list[Series],
    config: SynthConfig,
    ghost_rng: np.random.Generator,
    wrap_rng: np.random.Generator,
) -> list[list[np.ndarray]]:
    """uint16 pixels (n, rows, columns) of every stack of every series, from the anatomical
    phantom (:mod:`lsdc.synth.render`). The competition profile renders at ACQUISITION_MM (or
    the stack's own, coarser, pixel) and interpolates to the matrix.

    Args:
        ghost_rng, wrap_rng: the streams motion ghosts and wrap-around draw from (their rates
            then move nothing else).
    """
    table, bias, texture = look.table, look.bias, look.texture
    out: list[list[np.ndarray]] = []
    for s in series:
        signal = tissues.signal_table(table, s.timing)
        nuisance = render.draw_nuisance(
            rng, s.manufacturer, ghost_rng, config.motion_ghost_rate, wrap_rng, config.wrap_rate
        )
        pixels = []
        for stack in s.stacks:
            size = None
            if config.profile == "competition":
                field_mm = (stack.rows - 1) * stack.pixel_spacing
                size = min(stack.rows, int(np.ceil(field_mm / ACQUISITION_MM)) + 1)
                size = None if size == stack.rows else size
            values = render.render_stack(
                spine, signal, table, stack, size, nuisance, bias, texture, rng
            )
            if values.shape[1:] != (stack.rows, stack.columns):
                values = render.resize_planes(values, stack.rows, stack.columns)
            pixels.append(np.clip(np.rint(values), 0, 65535).astype(np.uint16))
        out.append(pixels)
    return out


def _render_study(
    rng: np.random.Generator, anatomy: phantom.Anatomy, series: list[Series], profile: str
) -> list[list[np.ndarray]]:
    """uint16 pixels (n, rows, columns) of every stack of every series of one study (the simple
    phantom)."""
    if not any(s.stacks for s in series):
        return []
    signal_of = (_layered_signal if profile == "competition" else _grid_signal)(anatomy, series)
    tables = phantom.tissue_signal(rng, anatomy)
    bias = phantom.bias_field(rng, anatomy.centre)
    out: list[list[np.ndarray]] = []
    for s in series:
        gain = rng.uniform(600.0, 3000.0)
        offset = rng.uniform(0.0, 40.0)
        sigma = rng.uniform(0.012, 0.04)
        pixels = []
        for stack in s.stacks:
            signal = signal_of(s.sequence, tables[s.sequence], stack, bias)
            noisy = np.hypot(signal + sigma * rng.standard_normal(signal.shape),
                             sigma * rng.standard_normal(signal.shape))  # fmt: skip
            if noisy.shape[1:] != (stack.rows, stack.columns):
                # Rendered at the acquisition's pixel size: interpolated like the signal, the
                # noise gets the pixel-to-pixel correlation of a scanner's interpolated matrix.
                noisy = render.resize_planes(noisy, stack.rows, stack.columns)
            pixels.append(np.clip(np.rint(offset + gain * noisy), 0, 65535).astype(np.uint16))
        out.append(pixels)
    return out


# ----------------------------------------------------------------------------------------- DICOM
def _ds(values) -> list[str]:
    """Decimal strings short enough for DICOM DS (16 characters)."""
    return [f"{float(v):.6g}" if abs(float(v)) >= 1e-4 else "0" for v in np.ravel(values)]


_PER_SLICE = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation",
              "PixelData")  # fmt: skip
"""The elements that change from one slice of a stack to the next."""


def _encode(elements) -> bytes:
    """Explicit VR little endian bytes of data elements (pydicom's writer)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    part = Dataset()
    for element in elements:
        part.add(element)
    write_dataset(fp, part)
    return fp.getvalue()


def _template(ds: Dataset) -> list[bytes | str]:
    """A stack's dataset as encoded runs of its shared elements and the keywords of the
    per-slice ones between them: each slice then encodes five elements, not forty."""
    parts: list[bytes | str] = []
    run: list = []
    for element in ds:
        if element.keyword in _PER_SLICE:
            if run:
                parts.append(_encode(run))
                run = []
            parts.append(element.keyword)
        else:
            run.append(element)
    if run:
        parts.append(_encode(run))
    return parts


def _file_bytes(meta: FileMetaDataset, ds: Dataset, template: list[bytes | str]) -> bytes:
    """The bytes ``ds.save_as(..., enforce_file_format=True)`` writes, from the template."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    body = [p if isinstance(p, bytes) else _encode([ds[p]]) for p in template]
    return b"\0" * 128 + b"DICM" + fp.getvalue() + b"".join(body)


def _write_series(
    folder: Path, study_id: int, series: Series, pixels: list[np.ndarray], seed: int, number: int
) -> None:
    """Write one series as ``folder/{instance_number}.dcm`` (uncompressed, explicit VR LE).

    One dataset per stack carries the shared tags; only the per-slice tags change between files.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])

    for stack, numbers, stack_pixels in zip(
        series.stacks, series.instance_numbers, pixels, strict=True
    ):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.StudyInstanceUID = uid(study_id)
        ds.SeriesInstanceUID = uid(study_id, series.series_id)
        ds.FrameOfReferenceUID = uid(study_id, "frame")
        ds.Modality = "MR"
        ds.Manufacturer = series.manufacturer
        ds.MagneticFieldStrength = _ds([series.field_strength])[0]
        ds.PatientID = str(study_id)
        ds.StudyID = str(study_id)
        ds.SeriesNumber = number
        ds.SeriesDescription = series.series_tag or series.description
        if series.timing is not None:
            timing = series.timing
            inversion = timing.inversion_time is not None
            if timing.flip_angle is not None:
                ds.ScanningSequence, ds.SequenceVariant = "GR", "SP"
                ds.FlipAngle = _ds([timing.flip_angle])[0]
            else:
                ds.ScanningSequence = ["SE", "IR"] if inversion else "SE"
                ds.SequenceVariant = ["SK", "SP", "MP"] if inversion else ["SK", "SP"]
            ds.ScanOptions = "IR" if inversion else ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = _ds([timing.repetition_time])[0]
            ds.EchoTime = _ds([timing.echo_time])[0]
            if inversion:
                ds.InversionTime = _ds([timing.inversion_time])[0]
            ds.EchoTrainLength = timing.echo_train_length
            ds.ImagingFrequency = _ds([42.577478 * series.field_strength])[0]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
        ds.ImageOrientationPatient = _ds(
            np.concatenate([stack.row_direction, stack.column_direction])
        )
        ds.PixelSpacing = _ds([stack.pixel_spacing, stack.pixel_spacing])
        ds.SliceThickness = _ds([stack.slice_thickness])[0]
        if stack.spacing_between_slices is not None:
            ds.SpacingBetweenSlices = _ds([stack.spacing_between_slices])[0]
        ds.Rows, ds.Columns = stack.rows, stack.columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        template: list[bytes | str] | None = None
        for k, instance in enumerate(numbers):
            instance_uid = uid(study_id, series.series_id, int(instance))
            meta.MediaStorageSOPInstanceUID = instance_uid
            ds.SOPInstanceUID = instance_uid
            ds.InstanceNumber = int(instance)
            ds.ImagePositionPatient = _ds(stack.positions[k])
            ds.SliceLocation = _ds([stack.positions[k] @ stack.normal])[0]
            ds.PixelData = np.ascontiguousarray(stack_pixels[k]).tobytes()
            ds["PixelData"].VR = "OW"  # 16 bits allocated
            if template is None:
                template = _template(ds)
            with atomic_path(folder / f"{int(instance)}.dcm") as tmp:
                Path(tmp).write_bytes(_file_bytes(meta, ds, template))


# --------------------------------------------------------------------------------------- studies
@dataclass
class StudyRecord:
    """What one synthesized study contributes to the CSVs."""

    study_id: int
    labels: np.ndarray  # (25,) class index or IGNORE (-100)
    probabilities: np.ndarray  # (25, 3) oracle
    series: list[tuple[int, str]]  # (series_id, description)
    coordinates: list[tuple]  # rows of train_label_coordinates.csv


def _draw_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """``n`` distinct integers in [low, high) (ids that look like the real 7-10 digit ones)."""
    ids = np.unique(rng.integers(low, high, n))
    while len(ids) < n:
        ids = np.unique(np.concatenate([ids, rng.integers(low, high, n - len(ids))]))
    return rng.permutation(ids)


def _synthesize_study(
    config: SynthConfig, split: str, index: int, study_id: int, image_root: Path
) -> StudyRecord:
    """Draw, render and write one study; return its labels, oracle, series and coordinates."""
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    severity = synth_labels.draw_latent_severity(rng)
    probabilities = synth_labels.class_probabilities(severity)
    labels = synth_labels.draw_classes(rng, probabilities)
    labels[synth_labels.draw_unlabelled(rng, config.unlabelled_rate)] = -100
    labels = synth_labels.misgrade(_quirk_rng(config, split, index, 5), config.label_error_rate,
                                   labels)  # fmt: skip
    table_position = np.array([rng.uniform(-15, 15), rng.uniform(-30, 30), rng.uniform(-150, 150)])
    most_series = 5 if config.profile == "competition" else 4  # axial T2 in up to 3 or 2 series
    if config.phantom == "simple":
        body = phantom.draw_anatomy(rng, severity, centre=table_position)
        series = _plan_series(rng, config, body, _draw_ids(rng, most_series, 10**6, 4 * 10**9))
        pixels = _render_study(rng, body, series, config.profile)

        def render_extras(extra_rng, extras):
            return _render_study(extra_rng, body, extras, config.profile)
    else:
        # The spine draws from a stream of its own and the main stream skips the simple
        # phantom's draws, so both phantoms plan the same series for a seed (sizes, missing
        # series, instance numbers): a comparison between them changes the images alone.
        phantom.draw_anatomy(rng, severity, centre=table_position)
        body = anatomy.draw_spine(_quirk_rng(config, split, index, 7), severity, table_position)
        series = _plan_series(rng, config, body, _draw_ids(rng, most_series, 10**6, 4 * 10**9))
        _assign_protocols(rng, series)
        look = draw_look(rng, body, series[0].field_strength) if series else None
        pixels = []
        if look is not None:
            quirks = _quirk_rng(config, split, index, 3), _quirk_rng(config, split, index, 4)
            pixels = render_anatomical(rng, body, look, series, config, *quirks)

        def render_extras(extra_rng, extras):  # their own stream for ghosts and wrap too
            return render_anatomical(extra_rng, body, look, extras, config, extra_rng, extra_rng)

    _reverse_storage(
        _quirk_rng(config, split, index, 1), config.reversed_storage_rate, series, pixels
    )
    for number, (s, p) in enumerate(zip(series, pixels, strict=True), start=1):
        _write_series(
            image_root / str(study_id) / str(s.series_id), study_id, s, p, config.seed, number
        )
    if config.pacs != "none" and split == "test":
        from lsdc.synth import pacs

        pacs.export_study(
            image_root.parent / pacs.PACS_DIR, image_root / str(study_id), study_id, body,
            render_extras, series, config, _quirk_rng(config, split, index, 8),
        )  # fmt: skip
    return StudyRecord(
        study_id=study_id,
        labels=labels,
        probabilities=probabilities,
        series=[(s.series_id, s.description) for s in series],
        coordinates=_drop_rows(
            _quirk_rng(config, split, index, 2),
            config.missing_coordinates_rate,
            _coordinates(
                study_id,
                _misplace(
                    _quirk_rng(config, split, index, 6),
                    config.coordinate_error_rate,
                    body.finding_centres(),
                    labels,
                ),
                series,
                labels,
            ),
        ),
    )


def _quirk_rng(config: SynthConfig, split: str, index: int, quirk: int) -> np.random.Generator:
    """A random stream of its own per (study, quirk): turning a quirk on or off, or changing its
    rate, leaves every other draw of the study (and so every other byte) as it was. Streams:
    1 reversed storage, 2 missing coordinates, 3 motion ghosts, 4 wrap-around, 5 label errors,
    6 coordinate errors, 7 the anatomical phantom's spine, 8 the PACS export's extras."""
    return np.random.default_rng([config.seed, SPLITS.index(split), index, quirk])


def _reverse_storage(
    rng: np.random.Generator, rate: float, series: list[Series], pixels: list[list[np.ndarray]]
) -> None:
    """Store some series with their rows, their columns or both reversed, in place.

    A legal DICOM variant: the pixels are reversed and the tags say so (the reversed axis's
    direction negated, ImagePositionPatient moved to the opposite edge), so every pixel keeps its
    patient position and the coordinates (computed afterwards from these tags) follow.
    """
    for s, stack_pixels in zip(series, pixels, strict=True):
        if rng.random() >= rate:
            continue
        flip_rows, flip_columns = ((True, False), (False, True), (True, True))[int(rng.integers(3))]
        for k, stack in enumerate(s.stacks):
            positions, row, col = (
                stack.positions.copy(),
                stack.row_direction,
                stack.column_direction,
            )
            if flip_rows:
                positions += (stack.rows - 1) * stack.pixel_spacing * col
                col = -col
                stack_pixels[k] = stack_pixels[k][:, ::-1]
            if flip_columns:
                positions += (stack.columns - 1) * stack.pixel_spacing * row
                row = -row
                stack_pixels[k] = stack_pixels[k][:, :, ::-1]
            s.stacks[k] = replace(
                stack, positions=np.round(positions, 4), row_direction=row, column_direction=col
            )


def _drop_rows(rng: np.random.Generator, rate: float, rows: list[tuple]) -> list[tuple]:
    """Leave out each coordinate row with probability ``rate``: a labelled finding whose reader
    gave no point (its label stays in train.csv)."""
    keep = rng.random(len(rows)) >= rate
    return [row for row, kept in zip(rows, keep, strict=True) if kept]


def _misplace(
    rng: np.random.Generator, rate: float, centres: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Each labelled finding's point, a few mm off at ``rate`` (N(0, 3 mm) per axis) and, for
    a fifth of those, at the same condition's neighbouring level: the points a careless reader
    clicks. The images and labels are untouched."""
    drawn, centres = centres, centres.copy()
    n_levels = len(LEVELS)
    for k in range(len(centres)):
        if rng.random() >= rate or labels[k] < 0:
            continue
        if rng.random() < 0.2:
            level = k % n_levels
            step = 1 if level == 0 else -1 if level == n_levels - 1 else int(rng.choice([-1, 1]))
            centres[k] = drawn[k + step]
        else:
            centres[k] = drawn[k] + rng.normal(0.0, 3.0, 3)
    return centres


def _coordinates(
    study_id: int, centres: np.ndarray, series: list[Series], labels: np.ndarray
) -> list[tuple]:
    """train_label_coordinates rows: each labelled finding's centre on its grading series.

    The point is projected on the nearest slice of the grading series (of several Axial T2
    series or stacks, the one whose slice passes closest); a finding whose grading series is
    missing gets no row, as in the real data (nor, at ``missing_coordinates_rate``, some others:
    :func:`_drop_rows`).
    """
    rows = []
    for i, condition in enumerate(CONDITIONS):
        for j in range(len(LEVELS)):
            k = i * len(LEVELS) + j
            if labels[k] < 0:
                continue
            best = None
            for s in series:
                if s.description != GRADING_SERIES[condition]:
                    continue
                for stack, numbers in zip(s.stacks, s.instance_numbers, strict=True):
                    slice_index, x, y, distance = stack.locate(centres[k])
                    if best is None or distance < best[0]:
                        best = (distance, s.series_id, int(numbers[slice_index]), x, y)
            if best is not None:
                _, series_id, instance, x, y = best
                rows.append(
                    (study_id, series_id, instance, CONDITION_NAMES[i], LEVEL_NAMES[j],
                     round(x, 3), round(y, 3))
                )  # fmt: skip
    return rows


def _labels_frame(records: list[StudyRecord]) -> pd.DataFrame:
    table = {"study_id": [r.study_id for r in records]}
    for k, column in enumerate(LABEL_COLUMNS):
        table[column] = [SEVERITIES[r.labels[k]] if r.labels[k] >= 0 else np.nan for r in records]
    return pd.DataFrame(table)


def _oracle_frame(records: list[StudyRecord]) -> pd.DataFrame:
    probabilities = (
        np.concatenate([r.probabilities for r in records]) if records else np.zeros((0, 3))
    )
    frame = pd.DataFrame(probabilities, columns=list(PRED_COLUMNS))
    frame.insert(0, "row_id", all_row_ids([r.study_id for r in records]))
    return frame


def _synthesize_studies(
    config: SynthConfig,
    jobs: list[tuple[str, int, int]],
    out: Path,
    workers: int,
    bar: tqdm,
) -> list[tuple[str, StudyRecord]]:
    """Render every ``(split, index, study_id)`` job; return (split, record) in finishing order.

    With several workers, a ``spawn`` pool renders the studies: the calling process may already
    run threads (tqdm's monitor, a caller's torch or BLAS pools) whose locks a forked child could
    inherit held, and spawning costs under a second per worker. On any exception (a study's own,
    re-raised unchanged with the worker's traceback as its cause, or Ctrl-C) the studies not
    started are cancelled and the running ones are waited for, so no worker writes into the root
    after this returns or raises.
    """
    workers = min(workers, len(jobs))
    done: list[tuple[str, StudyRecord]] = []
    if workers == 1:
        for split, index, study_id in jobs:
            done.append(
                (split, _synthesize_study(config, split, index, study_id, out / f"{split}_images"))
            )
            bar.update()
        return done
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(os.getpid(),),
    ) as pool:
        try:
            futures = {
                pool.submit(
                    _synthesize_study, config, split, index, study_id, out / f"{split}_images"
                ): split
                for split, index, study_id in jobs
            }
            for future in as_completed(futures):
                done.append((futures[future], future.result()))
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return done


def synthesize(
    out_dir: str | Path, config: SynthConfig, progress: bool = True, workers: int = 1
) -> Path:
    """Write a synthetic competition root to ``out_dir`` (which must be new or empty).

    Studies are independent (each draws from its own seeded Generator), so ``workers`` processes
    can render them in any order: the records are sorted before the CSVs are written, and the
    folder is byte-identical whatever the worker count. On any error, or Ctrl-C, the root is
    removed (or emptied, if it existed) once no worker is writing to it any more.

    Args:
        out_dir: the competition root to write.
        config: what to write.
        progress: show a progress bar (one step per finished study).
        workers: processes rendering studies; 1 renders them in this process.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        UserError: ``out_dir`` is a file or a non-empty folder, ``workers`` < 1, or the config is
            invalid.
    """
    config.validate()
    if workers < 1:
        raise UserError(f"`workers` must be at least 1, got {workers}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new `out_dir`")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    counts = {"train": config.train_studies, "test": config.test_studies}
    ids = _draw_ids(
        np.random.default_rng([config.seed, 99]), sum(counts.values()), 10**6, 4 * 10**9
    )
    study_ids = {"train": ids[: counts["train"]], "test": ids[counts["train"] :]}
    jobs = [(split, i, int(sid)) for split in SPLITS for i, sid in enumerate(study_ids[split])]
    records: dict[str, list[StudyRecord]] = {split: [] for split in SPLITS}
    bar = tqdm(total=len(jobs), desc="lsdc synth", unit="study", disable=not progress)
    try:
        for split, record in _synthesize_studies(config, jobs, out, workers, bar):
            records[split].append(record)
        _write_tables(out, records, config)
    except BaseException:  # leave no half-written root behind, even on Ctrl-C or a full disk
        for path in [out] if created else list(out.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out


def _write_tables(out: Path, records: dict[str, list[StudyRecord]], config: SynthConfig) -> None:
    """The root's CSVs (and the PACS export's index), once every study is written."""
    for split in SPLITS:
        records[split].sort(key=lambda r: r.study_id)
        descriptions = pd.DataFrame(
            [(r.study_id, sid, d) for r in records[split] for sid, d in r.series],
            columns=["study_id", "series_id", "series_description"],
        )
        write_csv_atomic(descriptions, out / f"{split}_series_descriptions.csv")
        write_csv_atomic(_oracle_frame(records[split]), out / f"oracle_{split}.csv")
    train, test = records["train"], records["test"]
    write_csv_atomic(_labels_frame(train), out / "train.csv")
    coordinates = pd.DataFrame(
        [row for r in train for row in r.coordinates],
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
    )
    write_csv_atomic(coordinates, out / "train_label_coordinates.csv")
    sample = pd.DataFrame({"row_id": all_row_ids([r.study_id for r in test])})
    for column in PRED_COLUMNS:
        sample[column] = 1.0 / 3.0
    write_csv_atomic(sample, out / "sample_submission.csv")
    write_csv_atomic(labels_to_solution(_labels_frame(test)), out / "solution_test.csv")
    if config.pacs != "none":
        from lsdc.synth import pacs

        pacs.finish_export(out, [r.study_id for r in test], config.seed)
