"""Images of the anatomical phantom: label map -> MR signal -> the scanner's nuisances.

For each stack, the label map (:mod:`lsdc.synth.anatomy`) is evaluated at every pixel centre and
at SUB_SAMPLES points across the slice thickness (partial volume); each tissue's signal comes from
its protocol's equation (:mod:`lsdc.synth.tissues`); then, independent of the labels: per-tissue
texture, a multiplicative bias field, a random gamma, the in-plane point-spread blur, motion
ghosts and wrap-around (rate switches with their own random streams), Rician noise at a
per-series SNR and a per-vendor intensity scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lsdc.synth import anatomy as an
from lsdc.synth import tissues as ti
from lsdc.synth.canvas import Canvas

SUB_SAMPLES = 3
"""Label-map samples across a slice's thickness (at -1/3, 0, +1/3 of it)."""
MAX_POINTS = 1_500_000
"""Sample points per canvas: stacks with more are rendered a block of slices at a time."""
VENDOR_GAIN = {
    "SIEMENS": (8.0, 20.0),
    "GE MEDICAL SYSTEMS": (15.0, 60.0),
    "Philips Medical Systems": (3.0, 12.0),
}
"""Stored value per PD unit of signal, per vendor (vendors store very different ranges)."""
SIGNAL_REFERENCE = 50.0
"""Signal (PD units) the gamma and the noise level are referred to."""


@dataclass(frozen=True)
class Nuisance:
    """One series' label-free degradations."""

    gain: float
    gamma: float
    snr: float
    blur: float  # in-plane PSF sigma, render pixels
    ghost: float  # ghost amplitude (0: none)
    ghost_period: int
    wrap: float  # share of the phase field folded back (0: none)


def draw_nuisance(
    rng: np.random.Generator,
    manufacturer: str,
    ghost_rng: np.random.Generator,
    ghost_rate: float,
    wrap_rng: np.random.Generator,
    wrap_rate: float,
) -> Nuisance:
    """A series' nuisances; ghosting and wrap from their own streams, so their rates move
    nothing else."""
    ghost = float(ghost_rng.uniform(0.03, 0.1)) if ghost_rng.random() < ghost_rate else 0.0
    period = int(ghost_rng.integers(2, 5))
    wrap = float(wrap_rng.uniform(0.08, 0.2)) if wrap_rng.random() < wrap_rate else 0.0
    return Nuisance(
        gain=float(rng.uniform(*VENDOR_GAIN.get(manufacturer, (8.0, 20.0)))),
        gamma=float(np.exp(rng.uniform(-0.3, 0.3))),
        snr=float(rng.uniform(14.0, 40.0)),
        blur=float(rng.uniform(0.3, 0.6)),
        ghost=ghost,
        ghost_period=period,
        wrap=wrap,
    )


def bias_field(rng: np.random.Generator, centre: np.ndarray):
    """A smooth multiplicative coil-sensitivity field (a factor of about 0.8-1.2 over the
    field of view)."""
    coef = rng.normal(0.0, 0.12, 3).astype(np.float32)
    quad = rng.normal(0.0, 0.08, 3).astype(np.float32)
    centre = np.asarray(centre, dtype=np.float32)

    def field(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        t = [(v - centre[k]) / np.float32(150.0) for k, v in enumerate((x, y, z))]
        expo = sum(coef[k] * t[k] + quad[k] * t[k] * t[k] for k in range(3))
        return np.exp(expo)

    return field


TEXTURE_CELL_MM = 4.0
"""Cell of the texture's random lattice (value noise, trilinear between lattice points)."""


def texture_field(rng: np.random.Generator, centre: np.ndarray, half_mm: float = 170.0):
    """A smooth random field (unit variance before interpolation) over patient space: Gaussian
    values on a TEXTURE_CELL_MM lattice around ``centre``, interpolated trilinearly."""
    n = int(np.ceil(2 * half_mm / TEXTURE_CELL_MM)) + 1
    lattice = rng.standard_normal((n, n, n), dtype=np.float32)
    origin = np.asarray(centre, dtype=np.float64) - half_mm

    def field(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        index = [(v.reshape(-1) - np.float32(origin[k])) * np.float32(1 / TEXTURE_CELL_MM)
                 for k, v in enumerate((x, y, z))]  # fmt: skip
        values = ndimage.map_coordinates(lattice, index, order=1, mode="nearest")
        return values.reshape(x.shape) * np.float32(1.4)

    return field


def label_stack(
    spine: an.Spine, origin: np.ndarray, steps: np.ndarray, shape: tuple[int, int, int, int]
) -> Canvas:
    """The label map of one block of slices (every structure, in painter's order)."""
    canvas = Canvas(origin, steps, shape, spine.deform, spine.deformation_bound)
    an.paint_trunk(canvas, spine)
    an.paint_canal(canvas, spine)
    an.paint_spine(canvas, spine)
    return canvas


def stack_grid(stack, size: int | None, band: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Origin, (4, 3) steps and shape of a stack's sample grid: ``size`` x ``size`` over its
    field (None: its own matrix), ``band`` extra pixels on each side of the phase axis (for
    wrap-around), SUB_SAMPLES across each slice's thickness."""
    n = len(stack.positions)
    rows, columns = (stack.rows, stack.columns) if size is None else (size, size)
    step_r = (stack.rows - 1) * stack.pixel_spacing / max(rows - 1, 1)
    step_c = (stack.columns - 1) * stack.pixel_spacing / max(columns - 1, 1)
    normal = stack.normal
    if n > 1:
        slice_step = (stack.positions[-1] - stack.positions[0]) / (n - 1)
    else:
        slice_step = normal * stack.slice_thickness
    sub = normal * stack.slice_thickness / SUB_SAMPLES
    steps = np.array(
        [slice_step, stack.column_direction * step_r, stack.row_direction * step_c, sub]
    )
    origin = stack.positions[0] - sub * (SUB_SAMPLES - 1) / 2
    phase = phase_axis(stack)
    extra = [0, 0]
    extra[phase - 1] = band
    origin = origin - band * steps[phase]
    shape = (n, rows + 2 * extra[0], columns + 2 * extra[1], SUB_SAMPLES)
    return origin, steps, shape


def phase_axis(stack) -> int:
    """Image axis (1 = rows, 2 = columns) closest to the patient's AP axis: the phase-encoding
    direction, along which ghosts and wrap-around run."""
    along_rows = abs(float(stack.column_direction[1]))
    along_columns = abs(float(stack.row_direction[1]))
    return 1 if along_rows >= along_columns else 2


def render_stack(
    spine: an.Spine,
    table: np.ndarray,
    tissues: ti.TissueTable,
    stack,
    size: int | None,
    nuisance: Nuisance,
    bias,
    texture,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """Float32 stored values (n, rows, columns) of one stack (``size`` x ``size`` when rendered
    coarser than its matrix)."""
    rows = stack.rows if size is None else size
    columns = stack.columns if size is None else size
    phase = phase_axis(stack)
    extent = rows if phase == 1 else columns
    band = int(round(nuisance.wrap * extent))
    origin, steps, shape = stack_grid(stack, size, band)
    n = shape[0]
    per_slice = shape[1] * shape[2] * shape[3]
    chunk = max(1, MAX_POINTS // per_slice)
    out = np.empty(shape[:3], dtype=np.float32)
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        canvas = label_stack(spine, origin + k0 * steps[0], steps, (k1 - k0, *shape[1:]))
        codes = canvas.codes
        signal = table[codes[..., 0]]
        for k in range(1, SUB_SAMPLES):
            signal += table[codes[..., k]]
        signal *= np.float32(1 / SUB_SAMPLES)
        # Texture and bias are smooth: evaluated on every other pixel, interpolated between.
        x, y, z = (v[:, ::2, ::2] for v in canvas.mid_points)
        amp = tissues.texture[canvas.codes[..., SUB_SAMPLES // 2]]
        smooth = resize_planes(texture(x, y, z), *signal.shape[1:])
        signal *= (1 + amp * smooth) * resize_planes(bias(x, y, z), *signal.shape[1:])
        out[k0:k1] = signal
    ref = np.float32(SIGNAL_REFERENCE)
    out = ref * (np.maximum(out, 0) / ref) ** np.float32(nuisance.gamma)
    out = ndimage.gaussian_filter(out, (0, nuisance.blur, nuisance.blur), mode="nearest")
    if band:
        out = _fold(out, band, phase)
    if nuisance.ghost:
        shift = out.shape[phase] // nuisance.ghost_period
        ghost = np.roll(out, shift, axis=phase) + np.roll(out, -shift, axis=phase)
        out = out + np.float32(nuisance.ghost) * ghost
    sigma = np.float32(SIGNAL_REFERENCE / nuisance.snr)
    noisy = np.hypot(out + sigma * noise_rng.standard_normal(out.shape, dtype=np.float32),
                     sigma * noise_rng.standard_normal(out.shape, dtype=np.float32))  # fmt: skip
    return noisy * np.float32(nuisance.gain)


def _fold(values: np.ndarray, band: int, axis: int) -> np.ndarray:
    """Wrap-around: what lies ``band`` pixels beyond each edge of the phase axis appears at the
    opposite edge."""
    core = np.take(values, np.arange(band, values.shape[axis] - band), axis=axis).copy()
    n = core.shape[axis]
    before = np.take(values, np.arange(band), axis=axis)
    after = np.take(values, np.arange(values.shape[axis] - band, values.shape[axis]), axis=axis)
    index_end = [slice(None)] * 3
    index_end[axis] = slice(n - band, n)
    index_start = [slice(None)] * 3
    index_start[axis] = slice(0, band)
    core[tuple(index_end)] += before
    core[tuple(index_start)] += after
    return core


def resize_planes(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Bilinear resize of (n, r, c) planes to (n, rows, columns), corner pixels aligned
    (separable: one linear interpolation per axis), float32."""
    out = values.astype(np.float32, copy=False)
    for axis, size in ((1, rows), (2, columns)):
        n = out.shape[axis]
        if n == size:
            continue
        coords = np.linspace(0.0, n - 1, size)
        lo = np.minimum(coords.astype(np.int64), n - 2)
        shape = [1, 1, 1]
        shape[axis] = size
        w = (coords - lo).astype(np.float32).reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, lo + 1, axis=axis) * w
    return out
