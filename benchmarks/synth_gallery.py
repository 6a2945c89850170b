"""The phantom's gallery (docs/synthetic_gallery.png): what each grade looks like, beside the old one.

Top row: one anatomical study's full fields (mid-sagittal T2, mid-sagittal STIR, parasagittal T1,
axial T2 at L4/L5). Then one row per condition at L4/L5, cropped where a radiologist looks:
canal on the mid-sagittal T2 and on the axial T2, the left foramen on the parasagittal T1, the
left subarticular zone on the axial T2, at a latent severity of Normal/Mild, Moderate and Severe
(the label model's class centres), and the simple phantom's severe finding in the same view.
Everything is rendered at 0.5 mm pixels, noise at SNR 30, from the generator's own code.

Usage:
    python benchmarks/synth_gallery.py [--out docs/synthetic_gallery.png] [--seed 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lsdc.contract import CONDITIONS  # noqa: E402
from lsdc.synth import anatomy, phantom, render, tissues  # noqa: E402
from lsdc.synth.generator import Stack  # noqa: E402
from lsdc.synth.labels import THRESHOLDS  # noqa: E402

LEVEL = 3  # L4/L5
SAGITTAL = (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))
AXIAL = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))


def stack_at(centre: np.ndarray, axes, fov: float, pixel: float = 0.5, tilt: float = 0.0) -> Stack:
    """One slice of ``fov`` mm centred on ``centre``; ``tilt`` turns an axial about +x."""
    row, col = axes
    if tilt:
        c, s = np.cos(tilt), np.sin(tilt)
        turn = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        row, col = turn @ row, turn @ col
    matrix = int(round(fov / pixel))
    corner = centre - (matrix - 1) / 2 * pixel * (row + col)
    return Stack(corner[None], row, col, matrix, matrix, pixel, 4.0, 4.0)


def grades() -> dict[str, tuple[float, float, float]]:
    """Latent severities shown per condition family: Normal/Mild, Moderate, Severe."""
    out = {}
    for family, (t0, t1) in THRESHOLDS.items():
        out[family] = (0.2, (t0 + t1) / 2, min(0.97, t1 + 0.15))
    return out


def anatomical_image(spine, table, protocol: str, stack: Stack, rng) -> np.ndarray:
    timing = tissues.draw_timing(rng, protocol, 1.5)
    signal = tissues.signal_table(table, timing)
    nuisance = render.Nuisance(1.0, 1.0, 30.0, 0.5, 0.0, 2, 0.0)
    bias = render.bias_field(np.random.default_rng(0), spine.centre)
    texture = render.texture_field(np.random.default_rng(1), spine.centre)
    return render.render_stack(spine, signal, table, stack, None, nuisance, bias, texture, rng)[0]


def crop(body, condition: str, protocol: str, tilt: float = 0.0) -> Stack:
    """The view a radiologist grades ``condition`` at LEVEL on: 70 mm of the mid-sagittal, 50 mm
    of the parasagittal through the foramen, or 60 mm of the axial at the disc."""
    if protocol == "sagittal_t2":
        return stack_at(body.finding_centre(condition, LEVEL), SAGITTAL, 70.0)
    if protocol == "sagittal_t1":
        return stack_at(body.finding_centre(condition, LEVEL), SAGITTAL, 50.0)
    centre = body.finding_centre("spinal_canal_stenosis", LEVEL) + [0, -4, 0]
    return stack_at(centre, AXIAL, 60.0, tilt=tilt)


def simple_image(severity: np.ndarray, sequence: str, where: str, protocol: str, rng):
    """The simple phantom's image of the same view (its own anatomy, same severity)."""
    body = phantom.draw_anatomy(np.random.default_rng(5), severity)
    stack = crop(body, where, protocol)
    lower, upper = phantom.spine_region(body)
    layered = phantom.LayeredPhantom(body, lower, upper)
    table = phantom.tissue_signal(rng, body)[sequence]
    return layered.sample(sequence, table, stack.pixel_points(), stack.normal, 4.0)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic_gallery.png"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    base = np.full(25, 0.15)
    spine = anatomy.draw_spine(np.random.default_rng(args.seed), base)
    table = tissues.draw_tissues(np.random.default_rng(args.seed + 1), spine, 1.5)
    canal = spine.finding_centre("spinal_canal_stenosis", LEVEL)
    foramen = spine.finding_centre("left_neural_foraminal_narrowing", LEVEL)
    tilt = spine.axial_tilt(float(canal[2]))

    overview = [
        ("mid-sagittal T2", "sagittal_t2", stack_at(canal + [0, 0, 25], SAGITTAL, 220.0, 0.8)),
        ("mid-sagittal STIR", "sagittal_stir", stack_at(canal + [0, 0, 25], SAGITTAL, 220.0, 0.8)),
        ("parasagittal T1 (left foramina)", "sagittal_t1",
         stack_at(np.array([foramen[0], canal[1], canal[2] + 25]), SAGITTAL, 220.0, 0.8)),
        ("axial T2 at L4/L5", "axial_t2", stack_at(canal + [0, 20, 0], AXIAL, 200.0, 0.8, tilt)),
    ]  # fmt: skip
    rows = [
        ("canal, mid-sagittal T2", "spinal_canal_stenosis", "sagittal_t2", "T2"),
        ("canal, axial T2", "spinal_canal_stenosis", "axial_t2", "T2"),
        ("left foramen, parasagittal T1", "left_neural_foraminal_narrowing", "sagittal_t1", "T1"),
        ("left subarticular, axial T2", "left_subarticular_stenosis", "axial_t2", "T2"),
    ]
    family_grades = grades()
    fig, axes = plt.subplots(1 + len(rows), 4, figsize=(13, 3.4 * (1 + len(rows))))
    for ax, (title, protocol, stack) in zip(axes[0], overview, strict=True):
        image = anatomical_image(spine, table, protocol, stack, rng)
        ax.imshow(image, cmap="gray", vmin=0, vmax=np.percentile(image, 99.5))
        ax.set_title(title, fontsize=9)
    for r, (title, condition, protocol, sequence) in enumerate(rows, start=1):
        family = condition.removeprefix("left_")
        k = CONDITIONS.index(condition) * 5 + LEVEL
        images = []
        for s in family_grades[family]:
            severity = base.copy()
            severity[k] = s
            sp = anatomy.draw_spine(np.random.default_rng(args.seed), severity)
            stack = crop(sp, condition, protocol, tilt)
            images.append(
                (s, anatomical_image(sp, table, protocol, stack, np.random.default_rng(9)))
            )
        top = max(np.percentile(im, 99.5) for _, im in images)
        for c, (s, image) in enumerate(images):
            grade = ("Normal/Mild", "Moderate", "Severe")[c]
            axes[r, c].imshow(image, cmap="gray", vmin=0, vmax=top)
            axes[r, c].set_title(f"{title}: {grade} (s={s:.2f})", fontsize=8)
        severity = np.full(25, 0.1)
        severity[k] = family_grades[family][2]
        old = simple_image(severity, sequence, condition, protocol, np.random.default_rng(2))
        axes[r, 3].imshow(old, cmap="gray", vmin=0, vmax=np.percentile(old, 99.5))
        axes[r, 3].set_title(f"simple phantom: Severe ({sequence})", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"lsdc synth --phantom anatomical (seed {args.seed}), findings at L4/L5", fontsize=11
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
