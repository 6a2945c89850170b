"""Is the answer of an ``lsdc synth`` root in the image where a radiologist looks, and nowhere else?

For every row of train_label_coordinates.csv it takes the mean of a 5 x 5 pixel window at the
coordinate (relative to the image's 99th percentile) as a crude local feature and the whole
image's mean (same normalisation) as a global one, and prints per condition family their
correlation with the oracle's expected grade (P(moderate) + 2 P(severe)). A visible, local finding
gives a clearly negative local correlation (the bright space narrows) and a global one near 0.

Usage:
    python benchmarks/synth_visibility.py --root DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from lsdc.contract import CONDITION_GROUP, PRED_COLUMNS, load_label_coordinates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    coordinates = load_label_coordinates(args.root / "train_label_coordinates.csv")
    oracle = pd.read_csv(args.root / "oracle_train.csv").set_index("row_id")[list(PRED_COLUMNS)]
    rows = []
    for r in coordinates.itertuples():
        path = args.root / "train_images" / f"{r.study_id}/{r.series_id}/{r.instance_number}.dcm"
        image = pydicom.dcmread(path).pixel_array.astype(np.float64)
        scale = np.percentile(image, 99)
        x, y = int(round(r.x)), int(round(r.y))
        window = image[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
        p = oracle.loc[f"{r.study_id}_{r.condition_key}_{r.level_key}"].to_numpy()
        rows.append(
            (
                CONDITION_GROUP[r.condition_key],
                window.mean() / scale,
                image.mean() / scale,
                p[1] + 2 * p[2],
            )
        )
    table = pd.DataFrame(rows, columns=["group", "local", "global", "expected_grade"])
    print(f"{args.root}: {len(table)} coordinates")
    for group, g in table.groupby("group"):
        bins = pd.cut(g["expected_grade"], [-1, 0.1, 0.9, 1.5, 2.1])
        means = g.groupby(bins, observed=False)["local"].mean()
        print(
            f"{group:13s} corr(local, grade) {np.corrcoef(g['local'], g['expected_grade'])[0, 1]:+.2f}"
            f"  corr(global, grade) {np.corrcoef(g['global'], g['expected_grade'])[0, 1]:+.2f}"
            f"  local mean by expected grade <0.1 / 0.1-0.9 / 0.9-1.5 / >1.5: "
            + " / ".join(f"{v:.2f}" for v in means)
        )


if __name__ == "__main__":
    main()
