"""The two-stage model on data with the real data's quirks against the same data without the new
ones (issue 16): the test gap closed by each, and the calibration gain measured out of sample.

Usage::

    python benchmarks/quirks.py --out /tmp/lsdc-quirks [--train-studies 1000]
        [--test-studies 100] [--seed 0] [--config two_stage_demo] [--tta none|flip]
        [--synth KEY=VALUE] [key=value ...]

Two synthetic roots are written with one seed: ``quirks off`` (the quirks of issue 16 switched
off: missing coordinate rows, reversed storage, split axial coverage in two series or two stacks,
missing series; every other realism switch at its default) and ``quirks on`` (every
switch at its default, i.e. at the rates docs/synthetic.md states). Labels and anatomy are drawn
before any series is planned, so both roots hold the same studies with the same answers; what
follows the series layout (noise, rendering draws) may differ. Each is run the way ``lsdc demo`` runs: preprocess, ``lsdc train`` (one
fold, ``folds.fold=0``, plus any ``key=value``), ``lsdc evaluate --run`` (the calibration, its
gain cross-fitted out of sample), ``lsdc predict`` of the test split with and without the
calibration (``--tta`` as given, and the calibration refitted on out-of-fold rows made with that
TTA), all scored on ``solution_test.csv``. "gap closed" is (prior - model) / (prior - oracle).
The roots, caches and runs stay in ``--out``; a rerun reuses the roots and caches it finds
and trains again.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from common import run_verb

from lsdc.contract import (
    GRADING_SERIES,
    all_row_ids,
    load_label_coordinates,
    load_solution,
    load_train_labels,
)
from lsdc.evaluation.metric import official_score
from lsdc.inference.predict import prior_submission
from lsdc.preprocessing.cache import read_cache_index, stack_paths
from lsdc.utils import write_json_atomic

VARIANTS: dict[str, list[str]] = {
    "quirks off": [
        f"--{name}-rate=0"
        for name in (
            "missing-coordinates",
            "reversed-storage",
            "two-axial-series",
            "multi-stack-axial",
            "missing-series",
        )
    ],
    "quirks on": [],
}
"""Synth flags of each variant (on top of --synth): the quirks off, or at their default rates."""


def _quirk_counts(root: Path, cache: Path) -> dict[str, int]:
    """How often each new quirk fired in a root: labelled findings whose grading series is cached
    but which have no coordinate row, and cached stacks stored reversed."""
    labels = load_train_labels(root / "train.csv").set_index("study_id")
    rows = load_label_coordinates(root / "train_label_coordinates.csv")
    index = read_cache_index(cache)
    reversed_stacks = 0
    for r in index.itertuples():
        sidecar = json.loads(stack_paths(cache, r.study_id, r.series_id, r.stack)[1].read_text())
        reversed_stacks += bool(sidecar["flipped"]["rows"] or sidecar["flipped"]["columns"])
    cached = set(zip(index["study_id"], index["series_description"], strict=True))
    given = set(zip(rows["study_id"], rows["condition_key"] + "_" + rows["level_key"], strict=True))
    missing = 0
    for (study_id, label), _ in labels.stack().dropna().items():
        graded_on = GRADING_SERIES[label.rsplit("_", 2)[0]]
        missing += (int(study_id), graded_on) in cached and (int(study_id), label) not in given
    return {"labelled_without_row": missing, "reversed_stacks": reversed_stacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (reused)")
    parser.add_argument("--train-studies", type=int, default=1000)
    parser.add_argument("--test-studies", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="two_stage_demo")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="as served")
    parser.add_argument(
        "--synth", action="append", default=[], metavar="FLAG=VALUE",
        help="an extra lsdc synth flag for both roots, e.g. --synth image-size=32",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides")
    args = parser.parse_args()

    extra = [
        part
        for item in args.synth
        for part in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])
    ]
    table, details = {}, {}
    for name, flags in VARIANTS.items():
        base = args.out / name.replace(" ", "_")
        root, run = base / "root", base / "run"
        caches = {split: base / f"cache_{split}" for split in ("train", "test")}
        if not (root / "solution_test.csv").is_file():
            synth = ["synth", "--out", str(root), "--seed", str(args.seed), "--quiet"]
            synth += ["--train-studies", str(args.train_studies)]
            run_verb([*synth, "--test-studies", str(args.test_studies), *flags, *extra])
        for split, cache in caches.items():
            if not (cache / "index.csv").is_file():
                run_verb(
                    ["preprocess", "--data", str(root), "--cache", str(cache), "--split", split]
                )
        shutil.rmtree(run, ignore_errors=True)  # retrained on every call
        seconds = run_verb(
            [
                "train", "--config", args.config, "--data", str(root), "--cache",
                str(caches["train"]), "--out", str(run), "--no-progress", "folds.fold=0",
                *args.overrides,
            ]
        )  # fmt: skip
        evaluate = [
            "evaluate",
            "--run",
            str(run),
            "--data",
            str(root),
            "--out",
            str(run / "evaluation"),
        ]
        if args.tta == "flip":
            evaluate += ["--cache", str(caches["train"]), "--tta", "flip"]
        run_verb(evaluate)
        calibration = json.loads((run / "calibration.json").read_text())
        solution = load_solution(root / "solution_test.csv")
        scores = {}
        for label, no_cal in (("raw", ["--no-calibration"]), ("calibrated", [])):
            submission = base / f"submission_{label}.csv"
            run_verb(
                [
                    "predict", "--data", str(root), "--run", str(run), "--cache",
                    str(caches["test"]), "--out", str(submission), "--tta", args.tta, "--quiet",
                    *no_cal,
                ]
            )  # fmt: skip
            scores[label] = official_score(solution, pd.read_csv(submission)).score
        study_ids = sorted({int(r.split("_")[0]) for r in solution["row_id"]})
        prior = official_score(solution, prior_submission(run, all_row_ids(study_ids))).score
        oracle = official_score(solution, pd.read_csv(root / "oracle_test.csv")).score
        gap = prior - oracle
        table[name] = {
            "prior": prior,
            "model": scores["raw"],
            "model_calibrated": scores["calibrated"],
            "oracle": oracle,
            "gap_closed": (prior - scores["raw"]) / gap,
            "gap_closed_calibrated": (prior - scores["calibrated"]) / gap,
            "oof_before": calibration["score_before"],
            "oof_after_out_of_sample": calibration["score_after"],
            "oof_after_in_sample": calibration["score_after_in_sample"],
            "train_seconds": seconds,
        }
        details[name] = {
            **_quirk_counts(root, caches["train"]),
            "cross_fit": calibration["cross_fit"],
        }

    frame = pd.DataFrame(table).T
    pd.set_option("display.width", 160)
    print(
        f"\n{args.train_studies} train + {args.test_studies} test studies, seed {args.seed}, "
        f"config {args.config}, tta {args.tta}, overrides {args.overrides or 'none'}, "
        f"synth {args.synth or 'defaults'}"
    )
    print(frame.round(4).to_string())
    off, on = frame.loc["quirks off"], frame.loc["quirks on"]
    print(
        f"\ngap closed, quirks on - off: {100 * (on['gap_closed'] - off['gap_closed']):+.1f} points "
        f"(raw), {100 * (on['gap_closed_calibrated'] - off['gap_closed_calibrated']):+.1f} "
        "points (calibrated); target: within 3 points"
    )
    for name, row in frame.iterrows():
        print(
            f"{name}: calibration OOF gain out of sample {row['oof_before'] - row['oof_after_out_of_sample']:+.4f} "
            f"(in-sample {row['oof_before'] - row['oof_after_in_sample']:+.4f}), on the test split "
            f"{row['model'] - row['model_calibrated']:+.4f}; {details[name]}"
        )
    write_json_atomic(
        {"scores": table, "quirks": details, "argv": {k: str(v) for k, v in vars(args).items()}},
        args.out / "figures.json",
    )
    print(f"\nfigures: {args.out / 'figures.json'}")
    if not np.isfinite(frame[["model", "model_calibrated"]].to_numpy(float)).all():
        raise SystemExit("a score is not finite")


if __name__ == "__main__":
    main()
