"""Evidence for the anatomical phantom: tissue contrast, no global shortcut, local visibility.

Subcommands (each prints a markdown table and a one-line verdict):

- ``tissues``: the measured signal of each tissue on each sequence (median over the pixels
  whose label map is that tissue throughout the slice thickness, relative to the image's 99th
  percentile, mean over studies) and whether the spec's contrast order holds.
- ``shortcut``: a classifier on global statistics of each series (intensity histograms, means,
  spreads, sizes, spacing and every protocol tag) against the class prior, both out of fold,
  on the official metric (``lsdc.evaluation.metric``): the classifier must not beat the prior
  by more than 1%.
- ``visibility``: one local measurement per condition around each labelled point (bright CSF
  area on the Axial T2 at the canal point, bright fat around the foraminal point on its
  Sagittal T1, bright area of the lateral recess on its Axial T2), mean by grade: each must
  fall monotonically from Normal/Mild to Severe.

Usage:
    python benchmarks/synth_evidence.py tissues [--studies 8] [--seed 0]
    python benchmarks/synth_evidence.py shortcut|visibility [--root DIR | --studies 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from lsdc.contract import (
    CONDITION_GROUP,
    LABEL_COLUMNS,
    PRED_COLUMNS,
    SEVERITIES,
    all_row_ids,
    labels_to_solution,
    load_label_coordinates,
    load_series_descriptions,
    load_train_labels,
)
from lsdc.evaluation.metric import official_score
from lsdc.synth import SynthConfig, render, synthesize, tissues
from lsdc.synth import anatomy as an

SEQUENCES = {
    "T1": "sagittal_t1",
    "T2": "sagittal_t2",
    "STIR": "sagittal_stir",
    "axial T2": "axial_t2",
}
SHOWN = {
    "fat": [an.FAT], "marrow": [an.MARROW], "disc nucleus": list(range(an.NUCLEUS, an.NUCLEUS + 6)),
    "annulus": [an.ANNULUS], "CSF": [an.CSF], "nerve roots": [an.NERVE], "muscle": [an.MUSCLE],
    "cortical bone": [an.CORTEX], "ligament": [an.LIGAMENT],
}  # fmt: skip
CONTRAST_ORDER = {
    "T1": [("fat", "marrow"), ("marrow", "disc nucleus"), ("disc nucleus", "CSF")],
    "T2": [("CSF", "disc nucleus"), ("disc nucleus", "annulus"), ("fat", "muscle")],
    "STIR": [("CSF", "marrow"), ("marrow", "fat")],
    "axial T2": [("CSF", "nerve roots"), ("CSF", "muscle")],
}
"""(brighter, darker) pairs the spec's contrast order asks for, per sequence."""


# ------------------------------------------------------------------------------------- tissues
def tissue_table(studies: int = 8, seed: int = 0) -> pd.DataFrame:
    """Relative signal (image 99th percentile = 1) of each tissue on each sequence."""
    from lsdc.synth.generator import Stack

    rows = []
    for k in range(studies):
        rng = np.random.default_rng([seed, k])
        spine = an.draw_spine(rng, np.full(25, 0.2))
        field = 1.5 if k % 2 == 0 else 3.0
        table = tissues.draw_tissues(rng, spine, field)
        canal = spine.finding_centre("spinal_canal_stenosis", 3)
        for name, protocol in SEQUENCES.items():
            if name == "axial T2":
                row, col, centre = (1.0, 0, 0), (0, 1.0, 0), canal + [0, 15, 0]
            else:
                row, col, centre = (0, 1.0, 0), (0, 0, -1.0), canal + [0, 10, 25]
            row, col = np.array(row, float), np.array(col, float)
            size, pixel = 256, 0.8
            corner = centre - (size - 1) / 2 * pixel * (row + col)
            stack = Stack(corner[None], row, col, size, size, pixel, 4.0, 4.0)
            timing = tissues.draw_timing(rng, protocol, field)
            nuisance = render.draw_nuisance(rng, "SIEMENS", rng, 0.0, rng, 0.0)
            values = render.render_stack(
                spine, tissues.signal_table(table, timing), table, stack, None, nuisance,
                render.bias_field(rng, spine.centre), render.texture_field(rng, spine.centre), rng,
            )[0]  # fmt: skip
            origin, steps, shape = render.stack_grid(stack, None)
            codes = render.label_stack(spine, origin, steps, shape).codes[0]
            pure = (codes == codes[..., :1]).all(axis=-1)
            top = np.percentile(values, 99)
            for tissue, code_list in SHOWN.items():
                mask = pure & np.isin(codes[..., 0], code_list)
                if tissue == "disc nucleus":
                    healthy = [an.NUCLEUS + d for d in range(6) if spine.degeneration[d + 1] < 0.35]
                    mask = pure & np.isin(codes[..., 0], healthy)
                if mask.sum() >= 5:
                    rows.append((name, tissue, float(np.median(values[mask]) / top)))
    frame = pd.DataFrame(rows, columns=["sequence", "tissue", "signal"])
    return frame.pivot_table(index="tissue", columns="sequence", values="signal", aggfunc="mean")


def contrast_holds(table: pd.DataFrame) -> list[str]:
    """The CONTRAST_ORDER pairs that do not hold (empty: the order holds)."""
    broken = []
    for sequence, pairs in CONTRAST_ORDER.items():
        for bright, dark in pairs:
            if not table.loc[bright, sequence] > table.loc[dark, sequence]:
                broken.append(f"{sequence}: {bright} <= {dark}")
    return broken


# ------------------------------------------------------------------------------------ shortcut
def _series_features(folder: Path) -> np.ndarray:
    """Global statistics of one series: value histogram (relative to its 99th percentile) of
    all its slices and of its middle slice, raw mean, spread and percentiles, sizes, spacing,
    slice count and every protocol tag."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    pixels = np.stack([d.pixel_array.astype(np.float32) for d in datasets if
                       d.pixel_array.shape == datasets[0].pixel_array.shape])  # fmt: skip
    top = max(float(np.percentile(pixels, 99)), 1.0)
    bins = np.linspace(0, 1.2, 17)
    whole = np.histogram(np.clip(pixels / top, 0, 1.2), bins)[0] / pixels.size
    middle = pixels[len(pixels) // 2]
    mid = np.histogram(np.clip(middle / top, 0, 1.2), bins)[0] / middle.size
    head = datasets[0]

    def tag(name: str) -> float:
        return float(getattr(head, name, 0) or 0)

    vendor = [float(head.Manufacturer == m) for m in render.VENDOR_GAIN]
    return np.concatenate([
        whole, mid, [pixels.mean(), pixels.std(), top, np.percentile(pixels, 50),
                     np.log(pixels.mean() + 1), head.Rows, head.Columns, len(datasets),
                     float(head.PixelSpacing[0]), tag("SliceThickness"), tag("RepetitionTime"),
                     tag("EchoTime"), tag("InversionTime"), tag("MagneticFieldStrength"),
                     tag("EchoTrainLength")], vendor,
    ])  # fmt: skip


def shortcut_check(root: Path, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Out-of-fold official scores of the class prior and of a classifier on global series
    statistics (one logistic regression per label, standardised features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = load_train_labels(root / "train.csv")
    series = load_series_descriptions(root / "train_series_descriptions.csv")
    features = []
    for study_id in labels["study_id"]:
        parts = []
        for description in ("Sagittal T1", "Sagittal T2/STIR", "Axial T2"):
            ids = series[(series["study_id"] == study_id)
                         & (series["series_description"] == description)]["series_id"]  # fmt: skip
            if len(ids):
                folder = root / "train_images" / str(study_id) / str(int(ids.iloc[0]))
                parts.append(np.concatenate([[1.0], _series_features(folder)]))
            else:
                parts.append(None)
        width = next(len(p) for p in parts if p is not None)
        features.append(np.concatenate([p if p is not None else np.zeros(width) for p in parts]))
    x = np.nan_to_num(np.array(features))
    y = labels[list(LABEL_COLUMNS)].to_numpy()
    classes = np.full(y.shape, -1)
    for k, name in enumerate(SEVERITIES):
        classes[y == name] = k
    n = len(x)
    prior = np.zeros((n, len(LABEL_COLUMNS), 3))
    model = np.zeros_like(prior)
    for train, valid in KFold(folds, shuffle=True, random_state=seed).split(x):
        for j in range(len(LABEL_COLUMNS)):
            known = train[classes[train, j] >= 0]
            counts = np.bincount(classes[known, j], minlength=3) + 0.5
            prior[valid, j] = counts / counts.sum()
            present = np.unique(classes[known, j])
            if len(present) < 2:
                model[valid, j] = prior[valid, j]
                continue
            fit = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=500))
            fit.fit(x[known], classes[known, j])
            p = np.full((len(valid), 3), 1e-3)
            p[:, fit.classes_] = fit.predict_proba(x[valid])
            model[valid, j] = p / p.sum(axis=1, keepdims=True)
    solution = labels_to_solution(labels)
    ids = all_row_ids(labels["study_id"].tolist())

    def score(probabilities: np.ndarray) -> float:
        frame = pd.DataFrame(probabilities.reshape(-1, 3), columns=list(PRED_COLUMNS))
        frame.insert(0, "row_id", ids)
        return float(official_score(solution, frame).score)

    prior_score, model_score = score(prior), score(model)
    return {"studies": n, "prior": prior_score, "global_statistics": model_score,
            "gain": 1.0 - model_score / prior_score}  # fmt: skip


# ---------------------------------------------------------------------------------- visibility
def _slices(folder: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]]:
    out = []
    for path in folder.glob("*.dcm"):
        d = pydicom.dcmread(path)
        orientation = np.asarray(d.ImageOrientationPatient, float)
        out.append((np.asarray(d.ImagePositionPatient, float), orientation[:3], orientation[3:],
                    float(d.PixelSpacing[0]), d.pixel_array.astype(np.float64)))  # fmt: skip
    return out


def _bright_share(image: np.ndarray, x: float, y: float, half_px: int) -> float:
    """Share of the pixels of a window around (x, y) brighter than 0.5 x the image's 99.5th
    percentile: the bright space (CSF, fat) that a finding takes away."""
    top = np.percentile(image, 99.5)
    r, c = int(round(y)), int(round(x))
    window = image[max(0, r - half_px) : r + half_px + 1, max(0, c - half_px) : c + half_px + 1]
    return float((window > 0.5 * top).mean()) if window.size else float("nan")


def visibility_check(root: Path) -> pd.DataFrame:
    """Mean local measurement by grade per condition family (rows: family, columns: grade)."""
    coordinates = load_label_coordinates(root / "train_label_coordinates.csv")
    labels = load_train_labels(root / "train.csv").set_index("study_id")
    series = load_series_descriptions(root / "train_series_descriptions.csv")
    rows = []
    cache: dict[tuple[int, int], list] = {}
    for r in coordinates.itertuples():
        grade = labels.loc[r.study_id, f"{r.condition_key}_{r.level_key}"]
        if not isinstance(grade, str):
            continue
        key = (r.study_id, r.series_id)
        if key not in cache:
            cache[key] = _slices(root / "train_images" / str(r.study_id) / str(r.series_id))
        own = pydicom.dcmread(
            root / "train_images" / f"{r.study_id}/{r.series_id}/{r.instance_number}.dcm"
        )
        family = CONDITION_GROUP[r.condition_key]
        spacing = float(own.PixelSpacing[0])
        if family == "spinal":
            # Map the mid-sagittal point to the nearest Axial T2 slice and measure there.
            o = np.asarray(own.ImageOrientationPatient, float)
            point = np.asarray(own.ImagePositionPatient, float) + spacing * (
                r.x * o[:3] + r.y * o[3:]
            )
            best = None
            for sid in series[
                (series["study_id"] == r.study_id) & (series["series_description"] == "Axial T2")
            ]["series_id"]:
                k = (r.study_id, int(sid))
                if k not in cache:
                    cache[k] = _slices(root / "train_images" / str(r.study_id) / str(int(sid)))
                for position, row, col, ps, image in cache[k]:
                    d = point - position
                    distance = abs(d @ np.cross(row, col))
                    if best is None or distance < best[0]:
                        best = (distance, image, (d @ row) / ps, (d @ col) / ps, ps)
            if best is None or best[0] > 5.0:
                continue
            _, image, x, y, ps = best
            value = _bright_share(image, x, y, int(round(8.0 / ps)))
        elif family == "foraminal":
            value = _bright_share(
                own.pixel_array.astype(float), r.x, r.y, int(round(5.0 / spacing))
            )
        else:
            value = _bright_share(
                own.pixel_array.astype(float), r.x, r.y, int(round(4.0 / spacing))
            )
        rows.append((family, grade, value))
    frame = pd.DataFrame(rows, columns=["family", "grade", "value"])
    return frame.pivot_table(index="family", columns="grade", values="value", aggfunc="mean")[
        list(SEVERITIES)
    ]


def monotone(table: pd.DataFrame) -> list[str]:
    """Families whose mean measurement does not fall from Normal/Mild to Moderate to Severe."""
    return [f for f, row in table.iterrows() if not (np.diff(row.to_numpy()) < 0).all()]


def markdown(table: pd.DataFrame) -> str:
    """A small markdown table (pandas' to_markdown needs tabulate, which lsdc does not pin)."""
    head = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name), *(f"{v:.3f}" for v in row)]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def _root(args: argparse.Namespace, tmp: str) -> Path:
    if args.root is not None:
        return args.root
    config = SynthConfig(train_studies=args.studies, test_studies=0, seed=args.seed)
    return synthesize(Path(tmp) / "root", config, progress=False, workers=args.workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["tissues", "shortcut", "visibility"])
    parser.add_argument("--root", type=Path, default=None, help="an lsdc synth root to read")
    parser.add_argument("--studies", type=int, default=None, help="studies to synthesize")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.check == "tissues":
        table = tissue_table(args.studies or 8, args.seed)
        print(markdown(table))
        broken = contrast_holds(table)
        print("contrast order holds" if not broken else f"contrast order broken: {broken}")
        return
    args.studies = args.studies or 200
    with tempfile.TemporaryDirectory(prefix="lsdc-evidence-") as tmp:
        root = _root(args, tmp)
        if args.check == "shortcut":
            result = shortcut_check(root, seed=args.seed)
            print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in result.items()))  # fmt: skip
            verdict = "holds" if result["gain"] <= 0.01 else "FAILS"
            print(f"shortcut check {verdict}: global statistics gain {100 * result['gain']:+.2f}% "
                  "over the prior (must be <= +1%)")  # fmt: skip
        else:
            table = visibility_check(root)
            print(markdown(table))
            bad = monotone(table)
            print("monotone in every family" if not bad else f"not monotone: {bad}")


if __name__ == "__main__":
    main()
