"""The anatomical phantom's anatomy: one study's lumbar spine as implicit shapes in patient mm.

The spine is a chain of segments in the sagittal (y, z) plane built upward from the sacrum: each
disc and vertebral body is a wedge (front and back heights from ``anatomical_phantom.md``), so
the segmental lordosis comes from the shapes themselves. Every structure is an implicit shape in
the local frame of its segment (``u`` = patient left, ``a`` = posterior, ``w`` = along the spine,
superior) or of the canal's curved centre line, evaluated only where a stack samples it
(:class:`lsdc.synth.canvas.Canvas`). Findings change their own structure only, through the
functions of :mod:`lsdc.synth.findings`; nothing else here depends on a latent severity, except
the disc degeneration of :func:`draw_spine`, which may follow its level's severity (as in real
spines) but never carries a label by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lsdc.contract import CONDITIONS, LEVELS
from lsdc.synth import findings
from lsdc.synth.canvas import Box, Canvas

# Tissue codes. Nucleus codes come last, one per disc (its own degeneration).
(AIR, SKIN, FAT, MUSCLE, CORTEX, MARROW, ANNULUS, CSF, NERVE, LIGAMENT, JOINT, VESSEL, BOWEL,
 KIDNEY, VISCERA) = range(15)  # fmt: skip
NUCLEUS = 15  # NUCLEUS + d for disc d (0 = T12/L1, 1..5 = L1/L2..L5/S1)
N_DISCS = 6
N_TISSUES = NUCLEUS + N_DISCS

VERTEBRAE = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3")
"""Bodies of the chain, superior first; discs sit between neighbours down to L5/S1."""
SACRUM = VERTEBRAE.index("S1")
"""Index of the first fused sacral segment."""
SACRAL_TURN = (12.0, 16.0, 20.0)
"""Kyphotic turn (deg) from each sacral segment to the next: the sacrum curves forward."""
DISCS = ("T11/T12", "T12/L1", "L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
# Per vertebra (VERTEBRAE order): mid height, wedge (deg, front taller > 0), depth, width (mm).
_BODY = {
    "T11": (22, -5, 28, 36), "T12": (24, -4, 30, 40), "L1": (25, -3, 32, 42),
    "L2": (26, -1, 33, 44), "L3": (27, 0, 34, 46), "L4": (27, 1, 35, 48), "L5": (28, 5, 36, 50),
    "S1": (26, 0, 34, 46), "S2": (19, 0, 27, 36), "S3": (15, 0, 21, 28),
}  # fmt: skip
# Per disc: mid height (mm, spec) and segmental angle (deg, spec; T11/T12 and T12/L1 kyphotic).
_DISC = {
    "T11/T12": (6.0, -3.0), "T12/L1": (8.0, 0.0), "L1/L2": (10.0, 4.0), "L2/L3": (12.0, 8.0),
    "L3/L4": (12.5, 12.0), "L4/L5": (14.0, 17.0), "L5/S1": (13.0, 32.0),
}  # fmt: skip
# Per vertebra T11..S3 (the sacral canal narrowing): canal half-width, canal AP, pedicle half-width, transverse
# process length (mm).
_POSTERIOR = {
    "T11": (9.0, 16.0, 3.0, 10), "T12": (10.0, 16.5, 3.5, 8), "L1": (11.0, 17.0, 4.0, 12),
    "L2": (11.5, 17.0, 4.5, 16), "L3": (12.0, 16.5, 5.0, 22), "L4": (12.5, 16.5, 6.0, 18),
    "L5": (13.5, 16.0, 7.5, 14), "S1": (14.0, 15.0, 8.0, 0), "S2": (11.0, 10.0, 6.0, 0),
    "S3": (8.0, 7.0, 4.0, 0),
}  # fmt: skip
FACET_ANGLE = {"T12/L1": 20.0, "L1/L2": 25.0, "L2/L3": 30.0, "L3/L4": 38.0, "L4/L5": 45.0,
               "L5/S1": 50.0}  # fmt: skip
"""Angle of each facet joint from the sagittal plane (deg): sagittal above, oblique below."""


@dataclass(frozen=True)
class Segment:
    """One disc or vertebral body of the chain: its centre and frame in patient mm.

    ``alpha`` tilts the frame's superior axis anteriorly (radians); the local axes are
    ``u`` = +x, ``a`` = (0, cos, sin) (posterior), ``w`` = (0, -sin, cos) (superior).
    """

    name: str
    centre: np.ndarray
    alpha: float
    height: float
    wedge: float  # radians, front taller > 0
    depth: float
    width: float

    @property
    def posterior(self) -> np.ndarray:
        return np.array([0.0, np.cos(self.alpha), np.sin(self.alpha)])

    @property
    def superior(self) -> np.ndarray:
        return np.array([0.0, -np.sin(self.alpha), np.cos(self.alpha)])

    def to_patient(self, u: float, a: float, w: float) -> np.ndarray:
        """Patient coordinates of a point given in this segment's frame."""
        return self.centre + np.array([u, 0.0, 0.0]) + a * self.posterior + w * self.superior

    def box(self, u: tuple, a: tuple, w: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Patient-space bounding box of a local box (u, a, w ranges): each patient axis is
        linear in (u, a, w), so its extremes are the sums of its terms' extremes."""
        c, s = np.cos(self.alpha), np.sin(self.alpha)
        a_lo, a_hi = min(a), max(a)
        w_lo, w_hi = min(w), max(w)
        y = sorted((a_lo * c, a_hi * c))
        y_w = sorted((-w_lo * s, -w_hi * s))
        z = sorted((a_lo * s, a_hi * s))
        z_w = sorted((w_lo * c, w_hi * c))
        lower = self.centre + np.array([min(u), y[0] + y_w[0], z[0] + z_w[0]])
        upper = self.centre + np.array([max(u), y[1] + y_w[1], z[1] + z_w[1]])
        return lower, upper


@dataclass(frozen=True)
class Spine:
    """One study's anatomy. Sizes in mm, patient frame (LPS); every field but ``severity`` and
    ``degeneration`` is drawn independently of the labels.

    Attributes:
        centre: (3,) the L3/L4 disc centre.
        scale: the study's size factor.
        bodies / discs: the chain's segments (VERTEBRAE / DISCS order).
        posterior: per vertebra T11..S3: canal half-width, canal AP, pedicle half-width,
            transverse process length (already scaled).
        facet_angle: (6,) facet joint angles (radians) at T12/L1..L5/S1.
        severity: (25,) latent severities, LABEL_COLUMNS order.
        degeneration: (7,) disc degeneration 0..1 (nucleus T2, height), DISCS order.
        fat: subcutaneous fat thickness; trunk: (half-width, half-depth); back: skin to canal.
        organs: (n, 7) bowel loops and kidneys: centre xyz, semi-axes xyz, code.
        deformation: (3, 7) elastic field: amplitude xyz, wave vector xyz, phase.
        marrow_fat: fat fraction of the vertebral marrow.
        conus_z: height of the conus's tip.
        paraspinal: semi-axes (u, a) of the multifidus and of the erector spinae (mm).
    """

    centre: np.ndarray
    scale: float
    bodies: tuple[Segment, ...]
    discs: tuple[Segment, ...]
    posterior: np.ndarray
    facet_angle: np.ndarray
    severity: np.ndarray
    degeneration: np.ndarray
    fat: float
    trunk: tuple[float, float]
    back: float
    organs: np.ndarray
    deformation: np.ndarray
    marrow_fat: float
    conus_z: float
    paraspinal: tuple[float, float, float, float]  # multifidus, erector spinae semi-axes (u, a)
    canal_knots: np.ndarray = field(repr=False)  # (k, 4): z, y, alpha, index along the chain

    # ------------------------------------------------------------------ geometry the plans use
    @property
    def disc_z(self) -> np.ndarray:
        """z of the six disc centres T12/L1, L1/L2 .. L5/S1 (superior first)."""
        return np.array([d.centre[2] for d in self.discs[1:]])

    @property
    def foramen_x(self) -> float:
        """Largest |x - centre x| of a foramen's centre (the sagittal stack covers both)."""
        return float(np.max(self.posterior[2:7, 0] + self.posterior[2:7, 2]))

    def canal_y(self, z: np.ndarray | float) -> np.ndarray:
        """y of the canal's centre line at height z."""
        return np.interp(z, self.canal_knots[:, 0], self.canal_knots[:, 1])

    def canal_alpha(self, z: np.ndarray | float) -> np.ndarray:
        """Tilt (radians) of the canal's centre line at height z."""
        return np.interp(z, self.canal_knots[:, 0], self.canal_knots[:, 2])

    def axial_tilt(self, z: float) -> float:
        """Angle about +x that turns an axial plane parallel to the disc nearest z (radians)."""
        k = int(np.argmin(np.abs(self.disc_z - z)))
        return float(self.discs[k + 1].alpha)

    @property
    def pitch(self) -> float:
        """Mean distance between neighbouring lumbar disc centres."""
        return float(np.mean(np.linalg.norm(np.diff([d.centre for d in self.discs[1:]], axis=0),
                                            axis=1)))  # fmt: skip

    def level_posterior(self, d: int) -> np.ndarray:
        """Canal half-width, canal AP, pedicle half-width, TP length at disc ``d`` (DISCS
        index): the mean of the vertebrae above and below."""
        return 0.5 * (self.posterior[d] + self.posterior[d + 1])

    # -------------------------------------------------------------------------- finding centres
    def foramen_root(self, d: int, side: float) -> np.ndarray:
        """(u, a, w) in disc ``d``'s frame of the exiting root in that foramen."""
        disc = self.discs[d]
        canal_hw, _, pedicle_hw, _ = self.level_posterior(d)
        return np.array([side * (canal_hw + pedicle_hw), disc.depth / 2 + 4.5 * self.scale,
                         disc.height / 2 + 5.5 * self.scale])  # fmt: skip

    def recess(self, d: int, side: float) -> np.ndarray:
        """(u, a, w) in disc ``d``'s frame of the lateral recess's centre."""
        disc = self.discs[d]
        canal_hw = self.level_posterior(d)[0]
        return np.array([side * (canal_hw - 3.5 * self.scale), disc.depth / 2 + 3.5 * self.scale,
                         0.0])  # fmt: skip

    def finding_centre(self, condition: str, level: int) -> np.ndarray:
        """Patient coordinates of one finding's centre (``level`` 0..4 = L1/L2..L5/S1): the sac's
        centre at the disc; the foramen's fat keyhole (just below its exiting root); the lateral recess
        at the disc."""
        d = level + 2  # DISCS index
        disc = self.discs[d]
        side = 1.0 if condition.startswith("left_") else -1.0
        if "foraminal" in condition:  # the keyhole's centre, just below the root
            return disc.to_patient(*(self.foramen_root(d, side) - [0.0, 0.0, 4.5 * self.scale]))
        if "subarticular" in condition:
            return disc.to_patient(*self.recess(d, side))
        canal_ap = self.level_posterior(d)[1]
        return disc.to_patient(0.0, disc.depth / 2 + canal_ap / 2, 0.0)

    def finding_centres(self) -> np.ndarray:
        """(25, 3) patient coordinates of every finding's centre, in LABEL_COLUMNS order."""
        return np.array([self.finding_centre(c, j) for c in CONDITIONS for j in range(len(LEVELS))])

    def severity_of(self, condition: str, level: int) -> float:
        return float(self.severity[CONDITIONS.index(condition) * len(LEVELS) + level])

    # ------------------------------------------------------------------------- elastic warp
    def deform(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple:
        """Smoothly displaced coordinates: a few long plane waves (a few mm)."""
        dx, dy, dz = np.zeros_like(x), np.zeros_like(y), np.zeros_like(z)
        for amp_x, amp_y, amp_z, kx, ky, kz, phase in self.deformation.astype(np.float32):
            wave = np.sin(kx * x + ky * y + kz * z + phase)
            dx += amp_x * wave
            dy += amp_y * wave
            dz += amp_z * wave
        return x + dx, y + dy, z + dz

    @property
    def deformation_bound(self) -> float:
        return float(np.abs(self.deformation[:, :3]).sum(axis=0).max())


def _frame_angle(alpha: float) -> tuple[np.ndarray, np.ndarray]:
    return np.array([np.cos(alpha), np.sin(alpha)]), np.array([-np.sin(alpha), np.cos(alpha)])


def draw_spine(
    rng: np.random.Generator, severity: np.ndarray, centre: np.ndarray | None = None
) -> Spine:
    """Draw one study's anatomy: sizes, lordosis, posterior elements, trunk, organs, warp.

    Every draw is independent of ``severity`` except each disc's degeneration (nucleus T2 and
    height), which leans on its level's mean severity for a third of its spread."""
    centre = np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64)
    scale = float(rng.uniform(0.88, 1.12))
    total_lordosis = rng.uniform(55.0, 65.0)
    lumbar_discs = DISCS[2:]
    spec_total = sum(_DISC[d][1] for d in lumbar_discs) + _BODY["L5"][1]
    k_angle = (total_lordosis - _BODY["L5"][1]) / (spec_total - _BODY["L5"][1])
    sacral_slope = np.deg2rad(rng.uniform(32.0, 45.0))

    sev = np.asarray(severity, dtype=np.float64).reshape(len(CONDITIONS), len(LEVELS))
    level_mean = np.concatenate([[0.1, 0.15], sev.mean(axis=0)])  # T11/T12, T12/L1, lumbar
    degeneration = np.clip(0.65 * rng.beta(1.5, 2.5, len(DISCS)) + 0.35 * level_mean, 0, 1)

    # Build the chain in 2D (y, z) from the S1 upper endplate upward.
    def make(name, base, beta, height, wedge_rad, depth, width, up=True):
        alpha = beta - wedge_rad / 2 if up else beta
        _, sup = _frame_angle(alpha)
        mid = base + (height / 2) * sup * (1 if up else -1)
        top = base + height * sup * (1 if up else -1)
        seg = Segment(name, np.array([0.0, mid[0], mid[1]]), float(alpha), height, wedge_rad,
                      depth, width)  # fmt: skip
        return seg, top, beta - wedge_rad if up else beta

    jitter = rng.uniform(0.93, 1.07, len(VERTEBRAE))
    bodies: dict[str, Segment] = {}
    discs: dict[str, Segment] = {}
    # Sacrum downward from the S1 endplate, curving forward (kyphotic).
    base, beta = np.zeros(2), sacral_slope
    for k, name in enumerate(("S1", "S2", "S3")):
        h, _, depth, width = _BODY[name]
        h *= scale * jitter[VERTEBRAE.index(name)]
        bodies[name], base, _ = make(name, base, beta, h, 0.0, depth * scale, width * scale,
                                     up=False)  # fmt: skip
        beta = beta + np.deg2rad(SACRAL_TURN[k])
    base, beta = np.zeros(2), sacral_slope
    for d_name, v_name in zip(DISCS[::-1], VERTEBRAE[-4::-1], strict=True):
        h, angle = _DISC[d_name]
        if d_name in lumbar_discs:
            angle *= k_angle
        h = h * scale * rng.uniform(0.9, 1.1) * (1.0 - 0.3 * degeneration[DISCS.index(d_name)])
        below = bodies.get(VERTEBRAE[VERTEBRAE.index(v_name) + 1])
        depth = (below.depth if below else 34 * scale) * 0.97
        width = (below.width if below else 46 * scale) * 0.98
        discs[d_name], base, beta = make(d_name, base, beta, h, np.deg2rad(angle), depth, width)
        bh, wedge, bd, bw = _BODY[v_name]
        j = jitter[VERTEBRAE.index(v_name)]
        bodies[v_name], base, beta = make(v_name, base, beta, bh * scale * j, np.deg2rad(wedge),
                                          bd * scale * j, bw * scale * j)  # fmt: skip
    ordered_bodies = [bodies[n] for n in VERTEBRAE]
    ordered_discs = [discs[n] for n in DISCS]

    # Place the chain: L3/L4 at the centre, the L1-S1 chord along z within +-5 degrees.
    l1, s1 = bodies["L1"].centre, bodies["S1"].centre
    chord = np.arctan2(-(l1[1] - s1[1]), l1[2] - s1[2])  # the chord's anterior tilt
    turn = -chord + np.deg2rad(rng.uniform(-5.0, 5.0))
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    pivot = discs["L3/L4"].centre[1:]
    lateral = rng.normal(0.0, 2.0)

    def place(seg: Segment) -> Segment:
        yz = rot @ (seg.centre[1:] - pivot)
        z_rel = yz[1]
        x = centre[0] + lateral * (z_rel / 100.0) ** 2
        return Segment(seg.name, np.array([x, centre[1] + yz[0], centre[2] + yz[1]]),
                       seg.alpha + turn, seg.height, seg.wedge, seg.depth, seg.width)  # fmt: skip

    ordered_bodies = [place(s) for s in ordered_bodies]
    ordered_discs = [place(s) for s in ordered_discs]

    posterior = np.array([_POSTERIOR[n] for n in VERTEBRAE], dtype=np.float64)
    posterior[:, :3] *= scale * rng.uniform(0.92, 1.08, (1, 3))
    posterior[:, 3] *= scale * rng.uniform(0.8, 1.2)
    facet = np.deg2rad([FACET_ANGLE[d] + rng.uniform(-6, 6) for d in DISCS[1:]])

    # Canal centre line: behind each body and disc, T11 to S3.
    knots = []
    for k, seg in enumerate(ordered_bodies):
        ap = posterior[k, 1]
        p = seg.to_patient(0.0, seg.depth / 2 + ap / 2, 0.0)
        knots.append((p[2], p[1], seg.alpha, k))
    for k, seg in enumerate(ordered_discs):
        ap = 0.5 * (posterior[k, 1] + posterior[k + 1, 1])
        p = seg.to_patient(0.0, seg.depth / 2 + ap / 2, 0.0)
        knots.append((p[2], p[1], seg.alpha, k + 0.5))
    knots = np.array(sorted(knots))

    fat = float(rng.uniform(6.0, 35.0))
    organs = _draw_organs(rng, ordered_bodies, centre, scale)
    n_waves = 3
    direction = rng.standard_normal((n_waves, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wave = direction * (2 * np.pi / rng.uniform(90.0, 250.0, (n_waves, 1)))
    amplitude = rng.standard_normal((n_waves, 3)) * 0.8
    deformation = np.column_stack([amplitude, wave, rng.uniform(0, 2 * np.pi, n_waves)])
    conus_disc = ordered_discs[1]  # T12/L1
    return Spine(
        centre=centre,
        scale=scale,
        bodies=tuple(ordered_bodies),
        discs=tuple(ordered_discs),
        posterior=posterior,
        facet_angle=facet,
        severity=np.asarray(severity, dtype=np.float64),
        degeneration=degeneration,
        fat=fat,
        trunk=(float(rng.uniform(135.0, 175.0)) * scale, float(rng.uniform(95.0, 125.0)) * scale),
        back=float(rng.uniform(45.0, 60.0)) * scale + fat,
        organs=organs,
        deformation=deformation,
        marrow_fat=float(np.clip(rng.lognormal(np.log(0.35), 0.4), 0.08, 0.8)),
        conus_z=float(conus_disc.centre[2] + rng.uniform(-25.0, 5.0)),
        paraspinal=tuple(float(v) for v in rng.uniform(0.85, 1.15, 4) * (13.0, 16.0, 27.0, 18.0)),
        canal_knots=knots,
    )


def _draw_organs(
    rng: np.random.Generator, bodies: list[Segment], centre: np.ndarray, scale: float
) -> np.ndarray:
    """Kidneys beside T12-L2 and a few bowel loops in front of the spine."""
    rows = []
    l1 = bodies[VERTEBRAE.index("L1")]
    for side in (-1.0, 1.0):
        c = l1.to_patient(side * rng.uniform(55, 70) * scale, -rng.uniform(0, 10), 0.0)
        c[2] += rng.uniform(-25, 10) + (10 if side < 0 else 0)  # the right kidney sits lower
        rows.append([*c, 22 * scale, 18 * scale, rng.uniform(45, 60) * scale, KIDNEY])
    l3 = bodies[VERTEBRAE.index("L3")]
    for _ in range(int(rng.integers(4, 9))):
        c = l3.to_patient(rng.uniform(-80, 80), -rng.uniform(45, 100), rng.uniform(-90, 90))
        rows.append([*c, *rng.uniform(10, 28, 3), BOWEL])
    return np.array(rows)


# ------------------------------------------------------------------------------------- painting
def _seg_box(canvas: Canvas, seg: Segment, u: tuple, a: tuple, w: tuple) -> Box | None:
    return canvas.box(*seg.box(u, a, w))


def _select(canvas: Canvas, seg: Segment, u_lim: tuple, a_lim: tuple, w_lim: tuple):
    """The points within a local box of ``seg``'s frame: (block, flat index, u, a, w), or None.

    Candidates are found on the block's middle sub-samples (bounds grown by half the slice
    thickness), and only theirs are expanded across the thickness and tested again, so a
    shape's own tests run on its points alone."""
    box = _seg_box(canvas, seg, u_lim, a_lim, w_lim)
    if box is None:
        return None
    c, s = np.float32(np.cos(seg.alpha)), np.float32(np.sin(seg.alpha))
    cx, cy, cz = (np.float32(v) for v in seg.centre)
    x, y, z = (plane[box[:3]] for plane in canvas.mid_points)
    pad = np.float32(canvas.half_thickness)
    u = x - cx
    keep = (u >= u_lim[0] - pad) & (u <= u_lim[1] + pad)
    dy, dz = y - cy, z - cz
    a = dy * c + dz * s
    keep &= (a >= a_lim[0] - pad) & (a <= a_lim[1] + pad)
    w = dz * c - dy * s
    keep &= (w >= w_lim[0] - pad) & (w <= w_lim[1] + pad)
    index = np.flatnonzero(keep)
    if index.size == 0:
        return None
    offsets = canvas.offsets  # (S, 3)
    n_sub = len(offsets)
    ox, oy, oz = (offsets[:, k][None, :] for k in range(3))
    u = (u.reshape(-1)[index][:, None] + ox).reshape(-1)
    dy = (dy.reshape(-1)[index][:, None] + oy).reshape(-1)
    dz = (dz.reshape(-1)[index][:, None] + oz).reshape(-1)
    a = dy * c + dz * s
    w = dz * c - dy * s
    inside = (u >= u_lim[0]) & (u <= u_lim[1]) & (a >= a_lim[0]) & (a <= a_lim[1])
    inside &= (w >= w_lim[0]) & (w <= w_lim[1])
    flat = (index[:, None] * n_sub + np.arange(n_sub)[None, :]).reshape(-1)
    chosen = np.flatnonzero(inside)
    if chosen.size == 0:
        return None
    return box, flat[chosen], u[chosen], a[chosen], w[chosen]


def _canal_box(spine: Spine, half_u: float, a_range: tuple):
    """Patient box around the canal line, ``half_u`` either side and ``a_range`` around it."""
    knots = spine.canal_knots
    lo_z, hi_z = knots[0, 0], knots[-1, 0]
    ys = knots[:, 1]
    cx = spine.centre[0]
    reach = max(abs(a_range[0]), abs(a_range[1])) * 1.3
    return (np.array([cx - half_u, ys.min() - reach, lo_z - 5]),
            np.array([cx + half_u, ys.max() + reach, hi_z + 5]))  # fmt: skip


def paint_trunk(canvas: Canvas, spine: Spine) -> None:
    """Skin, subcutaneous fat, the abdominal wall, viscera, retroperitoneal fat, organs, vessels
    and the muscles beside and behind the spine: large smooth structures, painted on the middle
    sub-sample only and copied to the others (they barely change over a slice's thickness).
    Each structure is tested only on the points its neighbourhood (in canal coordinates)
    holds."""
    f32 = np.float32
    mid = canvas.shape[3] // 2
    full = (slice(None), slice(None), slice(None), slice(mid, mid + 1))
    table = profiles(spine)
    zi = _zindex(canvas, spine, full).reshape(-1)
    x, y, _ = (v.reshape(-1) for v in canvas.mid_points)
    u = x - f32(spine.centre[0])
    ac = (y - table.canal_y[zi]) * table.canal_cos[zi]
    sc = spine.scale
    tx, ty = spine.trunk
    f = spine.fat
    codes = np.zeros(u.shape, dtype=np.uint8)
    # The outline in (u, a): round in front, flatter behind with the midline furrow between
    # the erector spinae; r2 (r squared) = 1 at the skin.
    a_t = ac - f32(spine.back - ty)
    un = u * f32(1 / tx)
    un2 = un * un
    an_ = a_t * f32(1 / ty)
    r2 = un2 + an_ * an_  # r squared: an ellipse in front
    behind = np.flatnonzero(a_t > 0)  # a squircle behind, with the furrow
    groove = f32(4.0 * sc / ty) / (1 + (u[behind] * f32(1 / (16.0 * sc))) ** 2) ** 2
    an2 = (an_[behind] + groove) ** 2
    r2[behind] = np.sqrt(un2[behind] ** 2 + an2 * an2)
    codes[r2 <= 1.0] = SKIN
    codes[r2 <= (1 - 2.5 / ty) ** 2] = FAT
    r_wall = 1 - f / ty
    wall = 10.0 * sc / ty
    # The peritoneal cavity's back wall: in front of the great vessels in the midline, curving
    # back in front of the psoas and quadratus lumborum to the flanks.
    lumbar_depth = np.mean([b.depth for b in spine.bodies[2:7]])
    body_a = -(lumbar_depth / 2 + 8.5 * sc)  # as Profiles.body_a, its lumbar mean
    divide = f32(body_a - 26 * sc) + f32(37 * sc) * (u * f32(1 / (62.0 * sc))) ** 2
    au = np.abs(u)
    in_cavity = r2 <= (r_wall - wall) ** 2
    # Behind the transverse processes (and the quadratus lumborum's front, curving forward
    # laterally) the back's muscles fill the fascia down to the flanks; fat planes part them
    # below. In front of that line: the retroperitoneal fat.
    back_front = f32(-4 * sc) - f32(25 * sc) * (u * f32(1 / (70.0 * sc))) ** 2
    codes[(r2 <= r_wall**2) & (ac > back_front)] = MUSCLE
    codes[(r2 <= r_wall**2) & ~in_cavity & (ac < f32(8 * sc))] = MUSCLE
    codes[in_cavity & (ac < divide)] = VISCERA

    def subset(mask: np.ndarray):
        index = np.flatnonzero(mask)
        return index, u[index], ac[index], zi[index], codes[index]

    # Near the spine: psoas, quadratus lumborum, aorta and cava in the retroperitoneal fat.
    index, su, sa, szi, sub = subset((ac < 10 * sc) & (ac > -75 * sc) & (au < 90 * sc))
    half_w, body_a, psoas_r = table.body_hw[szi], table.body_a[szi], table.psoas_r[szi]
    psoas_u = half_w + psoas_r * f32(0.55) + table.psoas_drift[szi]
    l5_z = spine.bodies[6].centre[2]
    above_l5 = table_z(table, szi) > l5_z
    for side in (-1.0, 1.0):
        s32 = f32(side)
        pu = su - s32 * psoas_u
        pa = sa - (body_a + f32(3.0 * sc))
        psoas = (pu / (psoas_r * f32(0.9) + 1)) ** 2 + (pa / (psoas_r * f32(0.75) + 1)) ** 2
        sub[(psoas <= 1.12) & (sub != SKIN)] = FAT
        sub[psoas <= 1.0] = MUSCLE
        ql = ((su - s32 * (half_w + f32(38 * sc))) / f32(17 * sc)) ** 2
        ql += ((sa + f32(4 * sc)) / f32(8 * sc)) ** 2
        sub[(ql <= 1.0) & above_l5 & (sub == FAT)] = MUSCLE
    aorta_split = spine.bodies[5].centre[2]  # L4
    split = table_z(table, szi) < aorta_split
    for side, radius, flat in ((1.0, 9.0, 1.0), (-1.0, 10.0, 0.65)):
        vu = np.where(split, np.abs(su) - f32(18 * sc), su - f32(side * 14 * sc))
        va = sa - (body_a - f32(radius * sc + 4))
        rad = np.where(split, f32(0.6 * radius * sc), f32(radius * sc))
        vessel = (vu / rad) ** 2 + (va / (rad * f32(flat))) ** 2 <= 1.0
        sub[vessel & (sub != MUSCLE)] = VESSEL
    codes[index] = sub
    # Behind the spine: the multifidus in the laminar gutter beside the spinous processes and
    # the erector spinae lateral to it (longissimus and iliocostalis), each wrapped in a thin
    # fat plane; their sizes vary per study, not with any label.
    mf_u, es_u = f32(spine.paraspinal[0] * sc), f32(spine.paraspinal[2] * sc)
    back = f32(spine.back - f - 2.0)  # the thoracolumbar fascia, under the subcutaneous fat
    mf_a = (back - f32(6 * sc)) * f32(0.5 * spine.paraspinal[1] / 16.0)
    es_a = (back + f32(4 * sc)) * f32(0.5 * spine.paraspinal[3] / 18.0)
    es_c = f32(1.6) * mf_u - f32(0.5 * sc) + es_u  # the erector spinae's centre, |u|
    reach = (ac > back - 2.2 * es_a) & (ac < back + 2) & (au < es_c + 1.1 * es_u)
    index, su, sa, _, sub = subset(reach & (codes == MUSCLE))
    au = np.abs(su)
    along_es = (sa - back + es_a) * (1 / es_a)
    lateral = (au - es_c) * (1 / es_u)
    es = lateral * lateral + along_es * along_es
    sub[(es > 1.0) & (es <= 1.05) & (along_es < 0.6)] = FAT  # not where it meets the fascia
    split_es = np.abs(lateral + f32(0.1) - f32(0.25) * along_es + f32(0.2) * along_es**2)
    sub[(es <= 0.9) & (split_es * es_u < 0.7)] = FAT
    # The multifidi meet in the midline, where the spinous processes and the interspinous
    # ligaments part them.
    along_mf = (sa - back + mf_a) * (1 / mf_a)
    mf = ((au + f32(1.0) - mf_u) * (1 / mf_u)) ** 2 + along_mf * along_mf
    sub[(mf > 1.0) & (mf <= 1.07) & (au > 3.0 * sc) & (along_mf < 0.6)] = FAT
    sub[mf <= 1.0] = MUSCLE
    codes[index] = sub
    plane = codes.reshape(canvas.shape[:3])
    for row in spine.organs:
        c, semi, code = row[:3], row[3:6], int(row[6])
        box = canvas.box(c - semi, c + semi)
        if box is None:
            continue
        ox, oy, oz = (p[box[:3]] for p in canvas.mid_points)
        inside = ((ox - f32(c[0])) / f32(semi[0])) ** 2
        inside += ((oy - f32(c[1])) / f32(semi[1])) ** 2
        inside += ((oz - f32(c[2])) / f32(semi[2])) ** 2
        part = plane[box[:3]]
        room = (part == VISCERA) | ((part == FAT) & (code == KIDNEY))
        part[(inside <= 1.0) & room] = code
    canvas.codes[...] = plane[..., None]  # the middle sub-sample's codes for all


def table_z(table: Profiles, zi: np.ndarray) -> np.ndarray:
    """Height (mm) of Profiles indices."""
    return np.float32(table.z0) + zi.astype(np.float32) * np.float32(Z_STEP)


Z_STEP = 0.5
"""Step (mm) of the per-height profiles (canal line, widths, narrowing) looked up by index."""


@dataclass(frozen=True)
class Profiles:
    """Quantities that vary along the spine only, tabulated every Z_STEP mm from ``z0``."""

    z0: float
    canal_y: np.ndarray
    canal_cos: np.ndarray
    canal_hw: np.ndarray
    canal_ha: np.ndarray
    body_hw: np.ndarray
    body_a: np.ndarray
    psoas_r: np.ndarray
    psoas_drift: np.ndarray  # lateral offset below S1 (toward the pelvic brim)
    narrow: np.ndarray
    clump: np.ndarray
    roots: list  # (side, un, an, below_conus & present) per root


def profiles(spine: Spine) -> Profiles:
    """The spine's per-height tables (built once per study and kept on the Spine)."""
    cached = spine.__dict__.get("_profiles")
    if cached is not None:
        return cached
    sc = spine.scale
    knots = spine.canal_knots
    zk = knots[:, 0]
    z0 = float(zk[0] - 150.0)
    z = np.arange(z0, zk[-1] + 150.0, Z_STEP)
    chain = knots[:, 3]
    hw = np.interp(z, zk, np.interp(chain, np.arange(len(VERTEBRAE)), spine.posterior[:, 0]))
    ha = np.interp(z, zk, np.interp(chain, np.arange(len(VERTEBRAE)), spine.posterior[:, 1]) / 2)
    zs = np.array([b.centre[2] for b in spine.bodies])
    order = np.argsort(zs)
    widths = np.array([b.width for b in spine.bodies])[order]
    depths = np.array([b.depth for b in spine.bodies])[order]
    narrow, clump = np.zeros_like(z), np.zeros_like(z)
    for j in range(len(LEVELS)):
        disc = spine.discs[j + 2]
        sev = spine.severity_of("spinal_canal_stenosis", j)
        c, k = float(findings.canal_narrowing(sev)), float(findings.root_clumping(sev))
        # Flat over the disc, gone within a few mm of its endplates (never at the next level).
        bump = np.exp(-(((z - disc.centre[2]) / (disc.height / 2 + 3.0 * sc)) ** 6))
        bump[bump < 0.02] = 0.0
        narrow = np.maximum(narrow, c * bump)
        clump = np.maximum(clump, k * bump)
    l1_z, l5_z = spine.bodies[2].centre[2], spine.bodies[6].centre[2]
    grow = np.clip((l1_z + 20 - z) / (l1_z - l5_z + 20), 0, 1)
    roots = []
    below_conus = z < spine.conus_z + 5
    for side in (-1.0, 1.0):
        for n, d in enumerate(range(1, 7)):  # roots L1..S1 leave above discs T12/L1..L5/S1
            leave = spine.discs[d].centre[2] + spine.discs[d].height / 2 + 6 * sc
            knots_z = np.array([leave - 1, leave + 14 * sc, 1e4])
            un = np.interp(z, knots_z, [0.9, 0.35 + 0.08 * n, 0.35 + 0.08 * n])
            an_ = np.interp(z, knots_z, [-0.2, 0.35 - 0.05 * n, 0.35 - 0.05 * n])
            roots.append((side * un, an_, below_conus & (z > leave - 1)))
        for n in range(3):  # sacral roots down to the sac's end
            roots.append((np.full_like(z, side * (0.1 + 0.12 * n)), np.full_like(z, 0.55 - 0.1 * n),
                          below_conus))  # fmt: skip
    f32 = np.float32
    table = Profiles(
        z0=z0,
        canal_y=np.interp(z, zk, knots[:, 1]).astype(f32),
        canal_cos=np.cos(np.interp(z, zk, knots[:, 2])).astype(f32),
        canal_hw=hw.astype(f32),
        canal_ha=ha.astype(f32),
        body_hw=np.interp(z, zs[order], widths / 2).astype(f32),
        body_a=-np.interp(z, zs[order], depths / 2 + 8.5 * sc).astype(f32),
        psoas_r=((5.0 + 17.0 * grow) * sc).astype(f32),
        psoas_drift=np.clip((spine.bodies[SACRUM].centre[2] - z) * 0.8, 0, 50).astype(f32),
        narrow=narrow.astype(f32),
        clump=clump.astype(f32),
        roots=[(a.astype(f32), b.astype(f32), c) for a, b, c in roots],
    )
    spine.__dict__["_profiles"] = table
    return table


def _zindex(canvas: Canvas, spine: Spine, box) -> np.ndarray:
    """Index of each point of a block in the spine's per-height Profiles."""
    table = profiles(spine)
    z = canvas.points(box)[2]
    zi = np.clip(((z - np.float32(table.z0)) * np.float32(1 / Z_STEP)), 0, len(table.canal_y) - 1)
    return zi.astype(np.int32)


def paint_canal(canvas: Canvas, spine: Spine) -> None:
    """Epidural fat in the bony canal, the thecal sac (CSF) narrowed at each disc by its canal
    finding, the cord down to the conus and the cauda equina roots within the sac."""
    sc = spine.scale
    box = canvas.box(*_canal_box(spine, 20 * sc, (-12, 12)))
    if box is None:
        return
    table = profiles(spine)
    x, y, z = canvas.points(box)
    zi = _zindex(canvas, spine, box)
    u = x - np.float32(spine.centre[0])
    near = np.abs(u) < np.float32(16.0 * sc)
    sel = np.flatnonzero(near)
    if sel.size == 0:
        return
    zi = zi.reshape(-1)[sel]
    u = u.reshape(-1)[sel]
    ac = (y.reshape(-1)[sel] - table.canal_y[zi]) * table.canal_cos[zi]
    z = z.reshape(-1)[sel]
    hw, ha = table.canal_hw[zi], table.canal_ha[zi]
    block = canvas.codes[box]
    codes = block.reshape(-1)[sel]
    codes[(u / hw) ** 2 + (ac / ha) ** 2 <= 1.0] = FAT
    narrow = table.narrow[zi]
    sac_end = spine.bodies[VERTEBRAE.index("S2")].centre[2]
    taper = np.sqrt(np.clip((z - np.float32(sac_end)) / np.float32(25.0 * sc), 0, 1))
    sw = hw * np.float32(0.78) * taper
    sa = np.minimum(np.float32(6.0 * sc) * taper + np.float32(0.01), ha - np.float32(1.5))
    ant = -sa + narrow * 2 * sa * np.float32(0.6)
    post = sa - narrow * 2 * sa * np.float32(0.4)
    mid_a = (ant + post) / 2 - np.float32(0.5)
    half_a = np.maximum((post - ant) / 2, np.float32(0.3))
    sw_n = sw * (1 - np.float32(0.3) * narrow) + np.float32(0.01)
    sac = (u / sw_n) ** 2 + ((ac - mid_a) / half_a) ** 2 <= 1.0
    original = (u / (sw + 1.5)) ** 2 + ((ac + 0.5) / (sa + 1.5)) ** 2 <= 1.0
    squeezed = original & ~sac & (narrow > 0.02)
    codes[squeezed & (ac < mid_a)] = ANNULUS  # disc bulge from the front
    codes[squeezed & (ac >= mid_a)] = LIGAMENT  # thickened ligamentum flavum from the back
    codes[sac] = CSF
    # Within the sac: the cord above the conus, and the cauda equina roots lying at its back
    # (supine) at sac-normalised positions, pushed by the narrowed walls, fatter when clumped.
    inner = np.flatnonzero(sac)
    if inner.size:
        zi_s, u_s, ac_s, z_s = zi[inner], u[inner], ac[inner], z[inner]
        mid_s, half_s, sw_s = mid_a[inner], half_a[inner], sw_n[inner]
        sac_codes = codes[inner]
        cord_r = np.float32(4.5 * sc) * np.clip((z_s - np.float32(spine.conus_z)) / 15.0, 0, 1)
        cord = (u_s / (cord_r + 0.01)) ** 2 + ((ac_s + 0.5) / (cord_r * 0.75 + 0.01)) ** 2 <= 1
        sac_codes[cord] = NERVE
        r0 = np.float32(1.1 * sc) * (1 + np.float32(1.3) * table.clump[zi_s])
        lo, hi = mid_s - half_s + r0, mid_s + half_s - r0
        squeezed_flat = half_s < r0
        for un, an_, present in table.roots:
            ru = un[zi_s] * sw_s
            ra = np.clip(an_[zi_s] * np.float32(6.0) - np.float32(0.5), lo, hi)
            ra = np.where(squeezed_flat, mid_s, ra)
            dot = ((u_s - ru) ** 2 + (ac_s - ra) ** 2 <= r0 * r0) & present[zi_s]
            sac_codes[dot] = NERVE
        codes[inner] = sac_codes
    flat = block.reshape(-1)
    flat[sel] = codes
    canvas.codes[box] = flat.reshape(block.shape)


def paint_spine(canvas: Canvas, spine: Spine) -> None:
    """Every structure of the spine, in painter's order: foramina (fat, root, narrowing), discs,
    bodies, pedicles, transverse processes, laminae, spinous processes, ligamentum flavum,
    facets, lateral recesses and the roots that leave the sac."""
    for d in range(1, N_DISCS + 1):
        for side in (-1.0, 1.0):
            _paint_foramen(canvas, spine, d, side)
    for d, disc in enumerate(spine.discs):
        _paint_disc(canvas, spine, d, disc)
    for k, body in enumerate(spine.bodies):
        _paint_body(canvas, spine, k)
        _paint_posterior_elements(canvas, spine, k, body)
    for d in range(1, N_DISCS + 1):
        for side in (-1.0, 1.0):
            _paint_facet(canvas, spine, d, side)
            _paint_recess_and_root(canvas, spine, d, side)


def _footprint(u, a, hw, front, back, indent):
    """Inside test of a vertebral footprint (a bean): an elliptic front, a flat back with a
    concave middle between its posterolateral corners. Arrays of half-sizes broadcast."""
    t = np.minimum(np.abs(u) / np.maximum(hw, np.float32(1e-3)), np.float32(1.0))
    t2 = t * t
    front_at = front * np.sqrt(1 - t2)
    back_at = back * np.sqrt(np.sqrt(1 - t2 * t2))
    back_at = back_at - indent * np.maximum(np.float32(1.0) - np.float32(1.56) * t2, 0)
    return (np.abs(u) <= hw) & (a >= -front_at) & (a <= back_at)


BODY_CORNER = 8
"""Exponent of a body's rounded rim: its footprint shrinks as (1 - |q|^8)^(1/8) toward the
endplates (q = -1..1 over its height), a rounded corner of about 2 mm."""


def _body_mask(
    u, a, w, hw, dd, top, bottom, caves, waist, indent, inset=0.0, inset_w=0.0,
    taper=0.0, rounded=(True, True),
):  # fmt: skip
    """A vertebral body in its own frame: the bean footprint, concave walls (``waist``: front,
    back, side, shares of the half-sizes lost at mid-height), endplates dipping ``caves`` (top,
    bottom) mm at the centre, and a rim rounded at the ends ``rounded`` says; ``taper``: share
    of the half-sizes lost from top to bottom (a sacral segment); ``inset`` / ``inset_w``
    shrink it (the marrow inside the cortex)."""
    f32 = np.float32
    rim = 1 - np.minimum((u / f32(hw)) ** 2 + (a / f32(dd)) ** 2, f32(1.0))
    hi = top - f32(caves[0]) * rim - f32(inset_w)
    lo = bottom + f32(caves[1]) * rim + f32(inset_w)
    mid, half = (hi + lo) * f32(0.5), np.maximum((hi - lo) * f32(0.5), f32(0.1))
    rel = (w - mid) / half
    q = np.minimum(np.abs(rel), f32(1.0))
    pinch = 1 - q * q
    q4 = q * q * q * q
    round_ = (1 - q4 * q4) ** f32(1 / BODY_CORNER)
    if not rounded[0]:
        round_ = np.where(rel > 0, f32(1.0), round_)
    if not rounded[1]:
        round_ = np.where(rel < 0, f32(1.0), round_)
    if taper:
        round_ = round_ * (1 - f32(taper / 2) * (1 - np.clip(rel, -1, 1)))
    front = (f32(dd) * (1 - f32(waist[0]) * pinch) - f32(inset)) * round_
    back = (f32(dd) * (1 - f32(waist[1]) * pinch) - f32(inset)) * round_
    side = (f32(hw) * (1 - f32(waist[2]) * pinch) - f32(inset)) * round_
    inside = _footprint(u, a, side, front, back, f32(indent) * round_)
    return inside & (w <= hi) & (w >= lo)


ENDPLATE_DIP = 0.075
"""Depth of an endplate's concavity at its centre, as a share of its body's height (~2 mm)."""
BODY_WAIST = (0.14, 0.05, 0.06)
"""Shares of a body's half depth (front, back) and half width lost at mid-height: the concave
anterior wall of a lumbar body in profile, gentler behind and at the sides."""


def _paint_body(canvas: Canvas, spine: Spine, k: int) -> None:
    """A vertebral body: a bean-shaped footprint (concave behind), waisted walls, endplates
    dipping toward the centre, a rounded rim, a thin cortex around marrow, and the
    basivertebral vein's notch in the posterior wall. The sacral segments S1-S3 are fused:
    each tapers to the next, flat and unrounded where they meet (the cortex of both draws
    the remnant disc's thin dark line there), S1 with its alae."""
    body = spine.bodies[k]
    sacral = k >= SACRUM
    h, dd, ww = body.height, body.depth / 2, body.width / 2
    picked = _select(canvas, body, (-ww, ww), (-dd, dd), (-h / 2 - 1 - 0.4 * dd, h / 2 + 1))
    if picked is None:
        return
    box, index, u, a, w = picked
    t = np.float32(np.tan(body.wedge / 2))
    top = np.float32(h / 2) - a * t
    bottom = -np.float32(h / 2) + a * t
    dip = ENDPLATE_DIP * h
    indent = 0.14 * dd
    if sacral and k + 1 < len(spine.bodies):  # reach down in front to the next, turned segment
        bottom = bottom - np.maximum(-a, 0) * np.float32(
            np.tan(np.deg2rad(SACRAL_TURN[k - SACRUM]))
        )
    if sacral:
        below = spine.bodies[k + 1].depth / body.depth if k + 1 < len(spine.bodies) else 0.7
        shape = dict(caves=(dip if k == SACRUM else 0.0, 0.0), waist=(0.04, 0.02, 0.03),
                     taper=1 - below, rounded=(k == SACRUM, k == len(spine.bodies) - 1))  # fmt: skip
    else:
        shape = dict(caves=(dip, dip), waist=BODY_WAIST)
    inside = _body_mask(u, a, w, ww, dd, top, bottom, indent=indent, **shape)
    marrow = inside & _body_mask(u, a, w, ww, dd, top, bottom, indent=indent, inset=1.5,
                                 inset_w=0.9, **shape)  # fmt: skip
    codes = np.zeros(u.shape, dtype=np.uint8)
    codes[inside] = CORTEX
    codes[marrow] = MARROW
    if not sacral:
        notch = (np.abs(w) < 2.2 - 0.4 * (a - dd * 0.86 + 4.5)) & (np.abs(u) < 3.0)
        notch &= (a > dd * 0.86 - 4.5) & inside
        codes[notch] = FAT
    canvas.write(box, index, codes)
    if sacral:
        _paint_ala(canvas, spine, k)


def _paint_ala(canvas: Canvas, spine: Spine, k: int) -> None:
    """The lateral masses of a sacral segment (the alae at S1), fused with its body: marrow
    continuous with the body's, a cortex on their outer surfaces only."""
    body = spine.bodies[k]
    sc = spine.scale
    f32 = np.float32
    h, dd, ww = body.height, body.depth / 2, body.width / 2
    canal_hw, canal_ap = spine.posterior[SACRUM, :2]
    reach = ww + (28.0, 20.0, 10.0)[k - SACRUM] * sc
    inner_u = 0.7 * ww
    a0, a1 = -0.4 * dd, dd + 0.75 * canal_ap
    w0, w1 = -h / 2, h / 2 - 5.0 * sc
    picked = _select(canvas, body, (-reach, reach), (a0, a1), (w0, w1))
    if picked is None:
        return
    box, index, u, a, w = picked
    au = np.abs(u)
    qa = (a - f32((a0 + a1) / 2)) / f32((a1 - a0) / 2)
    qw = (w - f32((w0 + w1) / 2)) / f32((w1 - w0) / 2)
    qu = np.maximum(au - f32(inner_u), 0) / f32(reach - inner_u)
    rho = qu**4 + qa**4 + qw**4
    rim_u, rim_a, rim_w = (1.3 / (reach - inner_u), 2.6 / (a1 - a0), 2.6 / (w1 - w0))
    qi = (np.maximum(qu - f32(rim_u), 0), qa / f32(1 - rim_a), qw / f32(1 - rim_w))
    marrow = qi[0] ** 4 + qi[1] ** 4 + qi[2] ** 4 <= 1
    codes = np.zeros(u.shape, dtype=np.uint8)
    codes[(rho <= 1) & (au > ww - 1)] = CORTEX
    codes[(rho <= 1) & marrow & (au > canal_hw + 1)] = MARROW
    canvas.write(box, index, codes)


def _paint_disc(canvas: Canvas, spine: Spine, d: int, disc: Segment) -> None:
    """A disc filling the space between its bodies' concave endplates (a wedge-shaped lens):
    the annulus bulging a little beyond the bodies' rims at mid-height, around an elliptic
    nucleus (its T2 brightness and height from its degeneration), with an intranuclear cleft
    in the older ones."""
    h, dd, ww = disc.height, disc.depth / 2, disc.width / 2
    caves = (ENDPLATE_DIP * spine.bodies[d].height, ENDPLATE_DIP * spine.bodies[d + 1].height)
    reach = h / 2 + max(caves) + 1
    picked = _select(canvas, disc, (-ww - 2, ww + 2), (-dd - 2, dd + 2), (-reach, reach))
    if picked is None:
        return
    box, index, u, a, w = picked
    f32 = np.float32
    t = f32(np.tan(disc.wedge / 2))
    rim = np.minimum((u / f32(ww)) ** 2 + (a / f32(dd)) ** 2, f32(1.0))
    half = f32(h / 2) - a * t
    top = half + f32(caves[0]) * (1 - rim)
    bottom = -half - f32(caves[1]) * (1 - rim)
    q = np.clip(w / np.maximum(half, f32(0.5)), -1, 1)
    bulge = 1 - q * q
    inside = _footprint(u, a, f32(ww) + f32(1.2) * bulge, f32(dd) + f32(1.5) * bulge,
                        f32(dd) * (1 - f32(0.05) * (1 - bulge)) + f32(0.8) * bulge,
                        f32(0.03 * dd))  # fmt: skip
    inside &= (w <= top + f32(0.8)) & (w >= bottom - f32(0.8))
    g = float(spine.degeneration[d])
    lens = (top - bottom) * f32(0.5) * f32(0.78 - 0.3 * g)
    centre_w = (top + bottom) * f32(0.5)
    nuc = (u / f32(ww * (0.66 - 0.18 * g))) ** 2
    nuc = nuc + ((a - f32(0.08 * dd)) / f32(dd * (0.62 - 0.18 * g))) ** 2
    nuc = nuc + ((w - centre_w) / np.maximum(lens, f32(0.5))) ** 2
    codes = np.zeros(u.shape, dtype=np.uint8)
    codes[inside] = ANNULUS
    nucleus = inside & (nuc <= 1.0)
    codes[nucleus] = NUCLEUS + min(d - 1, N_DISCS - 1) if d >= 1 else NUCLEUS
    if g > 0.3:
        codes[nucleus & (np.abs(w - centre_w) < f32(0.4 + 0.8 * g))] = ANNULUS
    canvas.write(box, index, codes)


def _paint_posterior_elements(canvas: Canvas, spine: Spine, k: int, body: Segment) -> None:
    """Pedicles, transverse processes, laminae, the spinous process and the interspinous
    ligament of vertebra ``k``: solid bone (a cortex around marrow). Each part is tested on
    the points of its own box only. Below S1 the sacral canal narrows, its roof the fused
    laminae and the median sacral crest's short tubercles (the alae stand for the pedicles)."""
    sc = spine.scale
    f32 = np.float32
    canal_hw, canal_ap, ped_hw, tp_len = spine.posterior[k]
    h, dd = body.height, body.depth / 2
    ped_hh = 6.5 * sc
    wp = h / 2 - 8.0 * sc
    ped_u = canal_hw + ped_hw - 1.0
    rim = f32(1.3 * sc)
    lam_t = 5.5 * sc
    sp_len = (28.0 if k < SACRUM else 16.0 if k == SACRUM else 10.0) * sc
    roof = dd + canal_ap  # the canal's roof in the midline

    def paint(u_lim: tuple, a_lim: tuple, w_lim: tuple, shapes) -> None:
        picked = _select(canvas, body, u_lim, a_lim, w_lim)
        if picked is None:
            return
        box, index, u, a, w = picked
        codes = np.zeros(u.shape, dtype=np.uint8)

        def bone(outer: np.ndarray, inner: np.ndarray) -> None:
            codes[outer] = CORTEX
            codes[outer & inner] = MARROW

        shapes(np.abs(u), a, w, codes, bone)
        canvas.write(box, index, codes)

    def pedicles(au, a, w, codes, bone) -> None:
        # Thick bars from the body's back into the articular pillar, rounded behind.
        ped_a0, ped_a1 = dd - 4, dd + 0.8 * canal_ap
        pa = (a - f32((ped_a0 + ped_a1) / 2)) / f32((ped_a1 - ped_a0) / 2)
        pa8 = pa**8
        du, dw = au - f32(ped_u), w - f32(wp)
        rho = (du / f32(ped_hw)) ** 2 + (dw / f32(ped_hh)) ** 2 + pa8
        rho_in = (du / f32(ped_hw - 1.3 * sc)) ** 2 + (dw / f32(ped_hh - 1.3 * sc)) ** 2
        bone(rho <= 1, (rho_in + pa8 * f32(1.3) <= 1))
        if tp_len > 0:  # transverse processes: outward from the pedicle, tapering
            ta = (a - f32(dd + 0.6 * canal_ap)) / f32(3.8 * sc)
            tw = (w - f32(wp)) / f32(5.5 * sc)
            tu = (au > ped_u) & (au < ped_u + ped_hw + tp_len)
            tip = 1 - 0.45 * np.clip((au - f32(ped_u + ped_hw)) / f32(tp_len), 0, 1)
            r = ta * ta + (tw / tip) ** 2
            bone((r <= 1) & tu, (r <= 0.45) & (au < ped_u + ped_hw + tp_len - 1.3))

    reach_u = ped_u + ped_hw + tp_len + 2
    if k <= SACRUM:
        paint((-reach_u, reach_u), (dd - 5, dd + 0.8 * canal_ap + 4), (wp - 7, wp + 7), pedicles)

    w_lo = -h / 2 - 10 * sc
    lam_u = canal_hw + ped_hw + 1

    def laminae(au, a, w, codes, bone) -> None:
        # A thick roof behind the canal, sloping down and back from the pedicles' level over
        # the disc below (shingles on a parasagittal image); the spinous process holds the
        # midline.
        a_roof = f32(roof) - f32(0.35 * canal_ap) * (au / f32(canal_hw)) ** 2
        la = a - a_roof - (f32(wp) - w) * f32(0.3)
        zone = (au >= 2.5 * sc) & (la >= 0) & (la <= f32(lam_t))
        inner = (la >= rim) & (la <= f32(lam_t) - rim) & (w <= wp + 5 - rim) & (w >= w_lo + rim)
        bone(zone, inner)

    lam_back = roof + 0.3 * (wp - w_lo) + lam_t + 1
    paint((-lam_u, lam_u), (dd + 0.1 * canal_ap, lam_back), (w_lo, wp + 5), laminae)

    full = sp_len + lam_t
    half_u_tip = 4.8 * sc

    def spinous(au, a, w, codes, bone) -> None:
        # The interspinous ligament: a midline sheet down to the next process (bone paints
        # over it); then the process, a paddle from the canal's roof (the laminae's junction)
        # down and back, tall at its base, rounded at its tip, a little thicker there.
        sa = a - f32(roof + lam_t - 1.5)
        s_all = np.clip(sa / f32(sp_len), 0, 1)
        below = f32(-h / 2 - 6 * sc) - f32(0.28) * sa + f32(2.5 * sc) * s_all
        codes[(au <= 0.8) & (sa > 0) & (sa < 0.9 * sp_len) & (w < below)
              & (w > below - 14 * sc)] = LIGAMENT  # fmt: skip
        sp_a = a - f32(roof + 1.0)
        s = np.clip(sp_a / f32(full), 0, None)
        centre_w = f32(-h / 2 + 5 * sc) - f32(0.28) * (sp_a - f32(lam_t))
        half_h = f32(10.5 * sc) - f32(3.0 * sc) * np.minimum(s, 1)
        half_u = f32(3.6 * sc) + f32(1.2 * sc) * np.minimum(s, 1)
        pw = (w - centre_w) / half_h
        paddle = (s**4 + pw**4 <= 1) & (sp_a >= 0) & (au <= half_u)
        s_in = np.clip((sp_a - rim * 0.3) / (f32(full) - rim), 0, None)
        pw_in = (w - centre_w) / (half_h - rim)
        bone(paddle, (s_in**4 + pw_in**4 <= 1) & (au <= half_u - rim))

    sp_w = (-h / 2 - 0.28 * full - 14 * sc - 12 * sc, -h / 2 + 5 * sc + 10.5 * sc + 3)
    paint((-half_u_tip, half_u_tip), (roof, roof + full + 2), sp_w, spinous)


def _paint_facet(canvas: Canvas, spine: Spine, d: int, side: float) -> None:
    """The facet joint at disc ``d`` on one side, and the ligamentum flavum lining the canal.

    On an axial image the lower vertebra's superior articular process lies in front and
    lateral, concave toward the upper one's inferior articular process behind and medial; the
    thin joint space (fluid) between them curves with it, its chord turned FACET_ANGLE from the
    sagittal plane (diverging backward). Both processes are solid bone (cortex around marrow)."""
    disc = spine.discs[d]
    sc = spine.scale
    f32 = np.float32
    canal_hw, canal_ap, _, _ = spine.level_posterior(d)
    dd = disc.depth / 2
    fu, fa, fw = side * (canal_hw + 4.5 * sc), dd + 0.72 * canal_ap, -1.5 * sc
    su, sa_, sw = 9.0 * sc, 9.0 * sc, 12.0 * sc
    picked = _select(
        canvas, disc, (fu - su - 6, fu + su + 6), (dd - 2, fa + sa_ + 2), (fw - sw - 6, fw + sw + 6)
    )
    if picked is None:
        return
    box, index, u, a, w = picked
    codes = np.zeros(u.shape, dtype=np.uint8)
    # Ligamentum flavum: a layer on the posterolateral canal wall at the disc level; thicker
    # when the canal finding at this level is advanced (the sac's own narrowing shows it).
    level = d - 2
    s_canal = spine.severity_of("spinal_canal_stenosis", level) if level >= 0 else 0.0
    lf_t = f32((2.5 + 3.0 * float(findings.canal_narrowing(s_canal))) * sc)
    au = np.abs(u)
    a_roof = f32(dd + canal_ap) - f32(0.35 * canal_ap) * (au / f32(canal_hw)) ** 2
    on_side = (u * f32(side)) >= 0
    lf = (a <= a_roof + 1) & (a >= a_roof - lf_t) & (au <= canal_hw) & on_side
    lf &= np.abs(w) <= f32(disc.height / 2 + 6 * sc)
    codes[lf] = LIGAMENT
    # Joint frame: t along the joint's chord (lateral and back), n across it (+: the SAP side).
    beta = float(spine.facet_angle[d - 1])
    lu, la_ = (u - f32(fu)) * f32(side), a - f32(fa)  # lateral, posterior offsets
    t = lu * f32(np.sin(beta)) + la_ * f32(np.cos(beta))
    n = lu * f32(np.cos(beta)) - la_ * f32(np.sin(beta))
    n = n + f32(0.022 / sc) * t * t  # the joint curves, concave toward the IAP
    dw = (w - f32(fw)) / f32(sw)
    half_t = f32(7.5 * sc)
    sap_t, iap_t = f32(8.0 * sc), f32(7.5 * sc)
    rim = f32(1.3 * sc)

    def process(centre_n, half_n, shift_w):
        q = (t / half_t) ** 2 + ((dw - f32(shift_w)) ** 2)
        outer = ((n - centre_n) / half_n) ** 2 + q <= 1
        inner = ((n - centre_n) / (half_n - rim)) ** 2 + q * f32(1.25) <= 1
        return outer, inner

    sap, sap_in = process(sap_t / 2 + f32(0.5), sap_t / 2, -0.15)
    iap, iap_in = process(-iap_t / 2 - f32(0.5), iap_t / 2, 0.15)
    bone = sap | iap
    codes[bone] = CORTEX
    codes[(sap & sap_in) | (iap & iap_in)] = MARROW
    joint = (np.abs(n) <= f32(0.55)) & ((t / half_t) ** 2 + dw * dw <= 0.8)
    codes[joint] = JOINT
    canvas.write(box, index, codes)


def _side_severity(spine: Spine, family: str, level: int, side: float) -> float:
    """Latent severity of a sided finding at ``level`` (0..4); 0.1 above L1/L2 (unlabelled)."""
    if level < 0:
        return 0.1
    return spine.severity_of(f"{'left' if side > 0 else 'right'}_{family}", level)


def _paint_foramen(canvas: Canvas, spine: Spine, d: int, side: float) -> None:
    """The foramen at disc ``d``: fat around the exiting root (DRG) in its upper part, lost
    front-back then up-down with the foraminal finding (lumbar levels only); what replaces the
    fat is dark (bulging disc, osteophyte, ligament). Bones paint over its walls afterwards."""
    disc = spine.discs[d]
    sc = spine.scale
    ru, ra, rw = spine.foramen_root(d, side)
    level = d - 2
    s = _side_severity(spine, "neural_foraminal_narrowing", level, side)
    front_back, up_down, flatten = (float(v) for v in findings.foraminal_fat(s))
    half_u = 7.0 * sc
    picked = _select(
        canvas, disc, (ru - half_u, ru + half_u), (ra - 12, ra + 12), (rw - 24, rw + 12)
    )
    if picked is None:
        return
    box, index, u, a, w = picked
    codes = np.zeros(u.shape, dtype=np.uint8)
    slab = np.abs(u - np.float32(ru)) <= np.float32(half_u)
    root_r = np.float32(2.6 * sc)
    # The opening the bones leave: a tall keyhole, wide at the root and narrow behind the disc.
    da, dw = a - np.float32(ra), w - np.float32(rw)
    opening = (da / np.float32(7.5 * sc)) ** 2 + (dw / np.float32(11.0 * sc)) ** 2
    opening = np.where(dw < 0, (da / np.float32(6.0 * sc)) ** 2 + (dw / np.float32(17.0 * sc)) ** 2,
                       opening)  # fmt: skip
    # Tapered along its short course (flat in the middle): an oval on an axial image.
    taper = ((u - np.float32(ru)) / np.float32(half_u)) ** 4
    opening = opening + taper
    codes[(opening <= 1.0) & slab] = LIGAMENT
    fat_a = root_r + np.float32(5.5 * sc * front_back)
    fat_up = root_r + np.float32(5.0 * sc * up_down)
    fat_down = root_r + np.float32(14.0 * sc * up_down)
    fat = (da / fat_a) ** 2 + (dw / np.where(dw > 0, fat_up, fat_down)) ** 2 + taper
    codes[(fat <= 1.0) & (opening <= 1.0) & slab] = FAT
    root_a = root_r * np.float32(1.0 - flatten)
    root = (da / root_a) ** 2 + (dw / (root_r * np.float32(1.0 + 0.5 * flatten))) ** 2
    codes[(root <= 1.0) & slab] = NERVE
    canvas.write(box, index, codes)


def _paint_recess_and_root(canvas: Canvas, spine: Spine, d: int, side: float) -> None:
    """The lateral recess at disc ``d``: the descending root (leaving the sac above this disc)
    in CSF and fat, narrowed from behind and outside by facet and ligament as the subarticular
    finding grows; the root, pushed medially once contacted, then runs on to its foramen."""
    disc = spine.discs[d]
    sc = spine.scale
    level = d - 2
    s = _side_severity(spine, "subarticular_stenosis", level, side)
    fill, flatten = (float(v) for v in findings.recess_intrusion(s))
    canal_hw, canal_ap, _, _ = spine.level_posterior(d)
    rc = spine.recess(d, side)
    corner = np.array([side * (canal_hw + 1.5 * sc), disc.depth / 2 + 0.75 * canal_ap])
    to_root = rc[:2] - corner
    reach = float(np.linalg.norm(to_root))
    direction = to_root / reach
    root_r = 1.7 * sc
    picked = _select(
        canvas,
        disc,
        (min(rc[0], corner[0]) - 8, max(rc[0], corner[0]) + 8),
        (rc[1] - 6, corner[1] + 6),
        (-disc.height / 2 - 8, disc.height / 2 + 8),
    )
    if picked is None:
        return
    box, index, u, a, w = picked
    codes = np.zeros(u.shape, dtype=np.uint8)
    pu, pa = u - np.float32(corner[0]), a - np.float32(corner[1])
    along = pu * np.float32(direction[0]) + pa * np.float32(direction[1])
    across = np.abs(pu * np.float32(-direction[1]) + pa * np.float32(direction[0]))
    band = np.abs(w) <= np.float32(disc.height / 2 + 5 * sc)
    # The recess: CSF of the root sleeve with fat laterally.
    recess = ((u - np.float32(rc[0])) / np.float32(4.0 * sc)) ** 2 + (
        (a - np.float32(rc[1])) / np.float32(3.2 * sc)
    ) ** 2
    recess = recess + (w / np.float32(disc.height / 2 + 5 * sc)) ** 2
    codes[recess <= 1.0] = CSF
    codes[(recess <= 1.0) & (along < reach - 2.5 * sc)] = FAT
    # Intrusion: facet and ligament advancing from the posterolateral corner toward the root.
    front = fill * (reach + 4.0 * sc)  # at fill = 1 it passes the root to the sac's wall
    if front > 0.5:
        # A rounded lobe of hypertrophied facet (bone, dark rim) and ligament growing from the
        # corner toward the root, tapering top and bottom.
        half = np.float32(front / 2 + 3.0)
        lobe = ((along - np.float32(front / 2 - 3.0)) / half) ** 2
        lobe = lobe + (across / np.float32(6.5 * sc)) ** 2
        lobe = lobe + (w / np.float32(disc.height / 2 + 5 * sc)) ** 2
        codes[lobe <= 1.0] = LIGAMENT
        codes[(lobe <= 0.55) & (along < front - 3.0)] = CORTEX
        codes[(lobe <= 0.3) & (along < front - 4.5)] = MARROW
    # The descending root: pushed along ``direction`` once the intrusion reaches it.
    push = max(0.0, front - (reach - root_r)) * 0.6
    cu = rc[0] + direction[0] * push
    ca = rc[1] + direction[1] * push
    du, da = u - np.float32(cu), a - np.float32(ca)
    along_r = du * np.float32(direction[0]) + da * np.float32(direction[1])
    across_r = du * np.float32(-direction[1]) + da * np.float32(direction[0])
    thin = np.float32(root_r * (1.0 - flatten))
    wide = np.float32(root_r * (1.0 + 0.6 * flatten))
    root = (along_r / thin) ** 2 + (across_r / wide) ** 2 <= 1.0
    codes[root & band] = NERVE
    canvas.write(box, index, codes)
