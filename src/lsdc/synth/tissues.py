"""Tissue relaxation parameters, acquisition protocols and the MR signal equations.

Each tissue gets T1, T2 (ms) and proton density (percent) drawn per study from the ranges of
``anatomical_phantom.md`` (1.5 T; at 3 T T1 lengthens and T2 shortens a little); each series
gets TR, TE (and TI) from its protocol's range; the signal of a tissue on a series is the
spin-echo or the inversion-recovery equation. Vertebral marrow is a fat-water mixture (its fat
fraction drawn per study), so it is bright on T1 and dark on STIR for the reason it is in life.
Nothing here depends on a label.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lsdc.synth import anatomy as an

# (T1 range, T2 range, PD range) at 1.5 T.
TISSUES: dict[int, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    an.AIR: ((1.0, 1.0), (1.0, 1.0), (0.0, 0.0)),
    an.SKIN: ((500.0, 700.0), (35.0, 50.0), (60.0, 75.0)),
    an.FAT: ((250.0, 300.0), (100.0, 135.0), (95.0, 100.0)),
    an.MUSCLE: ((860.0, 1230.0), (35.0, 45.0), (65.0, 75.0)),
    an.CORTEX: ((200.0, 300.0), (0.5, 1.0), (5.0, 10.0)),
    an.ANNULUS: ((700.0, 900.0), (40.0, 60.0), (55.0, 70.0)),
    an.CSF: ((4000.0, 4500.0), (1400.0, 1800.0), (98.0, 100.0)),
    an.NERVE: ((750.0, 1000.0), (75.0, 100.0), (55.0, 65.0)),
    an.LIGAMENT: ((500.0, 700.0), (8.0, 15.0), (30.0, 45.0)),
    an.JOINT: ((2500.0, 3500.0), (400.0, 800.0), (90.0, 98.0)),
    an.VESSEL: ((1200.0, 1400.0), (50.0, 100.0), (2.0, 5.0)),  # flow void
    an.BOWEL: ((500.0, 1500.0), (40.0, 250.0), (60.0, 95.0)),
    an.KIDNEY: ((950.0, 1200.0), (80.0, 100.0), (80.0, 90.0)),
    an.VISCERA: ((700.0, 1100.0), (45.0, 90.0), (65.0, 85.0)),
}
"""T1, T2, PD ranges per tissue code (nucleus and marrow: NUCLEUS_* and MARROW_WATER)."""
MARROW_WATER = ((650.0, 750.0), (40.0, 60.0), (88.0, 92.0))
"""The water compartment of vertebral marrow; its fat compartment is FAT's."""
NUCLEUS_HEALTHY = ((1100.0, 1200.0), (120.0, 210.0), (78.0, 82.0))
NUCLEUS_DEGENERATED = ((550.0, 720.0), (50.0, 85.0), (50.0, 60.0))
"""A disc nucleus interpolates between these by its degeneration (Pfirrmann I-II to IV)."""
T1_AT_3T = {an.CSF: (1.0, 1.05), an.FAT: (1.25, 1.35)}
"""Factor on T1 at 3 T per tissue (others: DEFAULT_T1_AT_3T)."""
DEFAULT_T1_AT_3T = (1.15, 1.35)
T2_AT_3T = (0.85, 0.95)

TEXTURE = {
    an.MARROW: 0.09,
    an.FAT: 0.03,
    an.MUSCLE: 0.06,
    an.BOWEL: 0.12,
    an.KIDNEY: 0.05,
    an.VISCERA: 0.12,
}
"""Amplitude of each tissue's smooth random texture (others: DEFAULT_TEXTURE)."""
DEFAULT_TEXTURE = 0.025


@dataclass(frozen=True)
class Protocol:
    """What a series' sequence is and the ranges its timings are drawn from (ms)."""

    sequence: str  # T1, T2 or STIR
    repetition: tuple[float, float]
    echo: tuple[float, float]
    inversion_1p5t: tuple[float, float] | None = None
    inversion_3t: tuple[float, float] | None = None
    echo_train: tuple[int, int] = (3, 5)
    flip_deg: tuple[float, float] | None = None  # a spoiled gradient echo (None: spin echo)


PROTOCOLS: dict[str, Protocol] = {
    "sagittal_t1": Protocol("T1", (400.0, 800.0), (7.0, 15.0), echo_train=(3, 5)),
    "sagittal_t2": Protocol("T2", (3000.0, 5000.0), (85.0, 120.0), echo_train=(15, 25)),
    "sagittal_stir": Protocol(
        "STIR", (2500.0, 5000.0), (30.0, 70.0), (140.0, 180.0), (180.0, 230.0), (9, 15)
    ),
    "axial_t2": Protocol("T2", (3000.0, 5500.0), (85.0, 120.0), echo_train=(15, 25)),
    "coronal_t2": Protocol("T2", (3000.0, 5000.0), (85.0, 120.0), echo_train=(15, 25)),
    "localizer": Protocol("T1", (7.0, 10.0), (2.5, 5.0), echo_train=(1, 1), flip_deg=(20.0, 40.0)),
}
"""The protocol table of anatomical_phantom.md, and the series of a PACS export no model reads
(a coronal T2 as the sagittal one; a 3-plane localizer as the fast T1-weighted gradient echo
scanners use)."""


@dataclass(frozen=True)
class Timing:
    """One series' drawn acquisition: the tags its DICOM files carry."""

    protocol: str
    repetition_time: float
    echo_time: float
    inversion_time: float | None
    echo_train_length: int
    flip_angle: float | None = None  # degrees, gradient echo only


def draw_timing(rng: np.random.Generator, protocol: str, field_strength: float) -> Timing:
    """TR, TE (and TI for STIR, by field strength) drawn from the protocol's ranges."""
    p = PROTOCOLS[protocol]
    ti = None
    if p.inversion_1p5t is not None:
        ti = round(
            float(rng.uniform(*(p.inversion_1p5t if field_strength < 2 else p.inversion_3t)))
        )
    timing = Timing(
        protocol=protocol,
        repetition_time=round(float(rng.uniform(*p.repetition))),
        echo_time=round(float(rng.uniform(*p.echo)), 1),
        inversion_time=ti,
        echo_train_length=int(rng.integers(p.echo_train[0], p.echo_train[1] + 1)),
    )
    if p.flip_deg is None:
        return timing
    return replace(timing, flip_angle=round(float(rng.uniform(*p.flip_deg))))


@dataclass(frozen=True)
class TissueTable:
    """One study's T1, T2, PD per tissue code (N_TISSUES,) and the marrow's mixture."""

    t1: np.ndarray
    t2: np.ndarray
    pd: np.ndarray
    marrow_water: tuple[float, float, float]
    marrow_fat: float
    texture: np.ndarray


def draw_tissues(rng: np.random.Generator, spine: an.Spine, field_strength: float) -> TissueTable:
    """Per-study tissue parameters: uniform within each range, then the field's T1/T2 shift."""
    n = an.N_TISSUES
    t1, t2, pd = np.ones(n), np.ones(n), np.zeros(n)
    high = field_strength > 2

    def draw(ranges, code=None):
        (a1, b1), (a2, b2), (a3, b3) = ranges
        v1, v2, v3 = rng.uniform(a1, b1), rng.uniform(a2, b2), rng.uniform(a3, b3)
        if high:
            v1 *= rng.uniform(*T1_AT_3T.get(code, DEFAULT_T1_AT_3T))
            v2 *= rng.uniform(*T2_AT_3T)
        return v1, v2, v3

    for code, ranges in TISSUES.items():
        t1[code], t2[code], pd[code] = draw(ranges, code)
    for d in range(an.N_DISCS):
        g = float(spine.degeneration[d + 1])
        healthy, degenerated = draw(NUCLEUS_HEALTHY), draw(NUCLEUS_DEGENERATED)
        t1[an.NUCLEUS + d], t2[an.NUCLEUS + d], pd[an.NUCLEUS + d] = (
            (1 - g) * h + g * e for h, e in zip(healthy, degenerated, strict=True)
        )
    water = draw(MARROW_WATER)
    texture = np.full(n, DEFAULT_TEXTURE)
    for code, amp in TEXTURE.items():
        texture[code] = amp
    texture[an.AIR] = 0.0
    return TissueTable(t1, t2, pd, water, spine.marrow_fat, texture.astype(np.float32))


def spin_echo(pd, t1, t2, tr: float, te: float):
    """S = PD (1 - exp(-TR/T1)) exp(-TE/T2)."""
    return pd * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(pd, t1, t2, tr: float, te: float, ti: float):
    """S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2) (magnitude STIR)."""
    return pd * np.abs(1 - 2 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def spoiled_gradient_echo(pd, t1, t2, tr: float, te: float, flip_deg: float):
    """S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2), E1 = exp(-TR/T1) (T2 for T2*)."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr / t1)
    return pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te / t2)


def signal_table(tissues: TissueTable, timing: Timing) -> np.ndarray:
    """Signal of every tissue code on one series (float32, PD units: CSF's PD ~ 100)."""
    tr, te, ti = timing.repetition_time, timing.echo_time, timing.inversion_time

    def signal(pd, t1, t2):
        if timing.flip_angle is not None:
            return spoiled_gradient_echo(pd, t1, t2, tr, te, timing.flip_angle)
        if ti is None:
            return spin_echo(pd, t1, t2, tr, te)
        return inversion_recovery(pd, t1, t2, tr, te, ti)

    table = signal(tissues.pd, tissues.t1, tissues.t2)
    fat = table[an.FAT] / tissues.pd[an.FAT]  # per unit PD
    water = signal(tissues.marrow_water[2], tissues.marrow_water[0], tissues.marrow_water[1])
    ff = tissues.marrow_fat
    table[an.MARROW] = ff * fat * tissues.pd[an.FAT] * 0.9 + (1 - ff) * water
    table[an.AIR] = 0.0
    return table.astype(np.float32)
