"""The two-stage model against the whole-series model on one synthetic split: official test
scores (beside the class prior and the oracle), training seconds, and stage 1's OOF localisation.

Usage::

    python benchmarks/two_stage_vs_whole.py --out /tmp/lsdc-evidence \\
        [--data ROOT --cache DIR] [--train-studies 1000] [--test-studies 100] [--seed 0] \\
        [--whole-config whole_baseline] [--two-stage-config two_stage_demo] \\
        [--whole KEY=VALUE] [--two-stage KEY=VALUE] [key=value ...]

Both models train with ``lsdc train`` on the same cache and the same folds (``key=value``
overrides apply to both, e.g. ``folds.n_folds=3 folds.fold=0``; ``--whole`` and ``--two-stage``
(repeatable) to one of them, e.g. ``--whole optim.epochs=24`` to give the whole-series model the two-stage
model's training time), are served by ``lsdc predict`` (flip TTA, no calibration, so neither gets
help the other lacks) on the same test split, and are scored by the official metric against
``solution_test.csv``. The oracle is the generator's true class probabilities; "gap closed" is
(prior - model) / (prior - oracle). The default split is the demo's (``lsdc synth`` defaults,
1,000 + 100 studies); ``--data ROOT --cache DIR`` reuses a root and its caches (``DIR/train``,
``DIR/test``: the layout ``lsdc demo`` leaves). The synthetic root and caches are reused when
``--out`` already holds them; trained runs too with ``--reuse`` (a run whose training was stopped
early is served from the best epoch it reached).
Training seconds are the engine's (``RUN/metrics.csv``: every epoch, validation included).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from common import prepare_root, run_verb

from lsdc.contract import (
    labels_to_solution,
    load_solution,
    load_train_labels,
    parse_row_id,
)
from lsdc.evaluation.localization import localization_oof, summarize_localization
from lsdc.evaluation.metric import official_score
from lsdc.inference.predict import prior_submission
from lsdc.tasks.served import ServedRun
from lsdc.utils import write_json_atomic


def _oof_score(root: Path, run: Path) -> float:
    """Official score of the run's best-epoch validation predictions (every trained fold)."""
    oof = pd.concat([pd.read_csv(p) for p in sorted(run.glob("fold*/oof.csv"))])
    solution = labels_to_solution(load_train_labels(root / "train.csv"))
    return official_score(solution[solution["row_id"].isin(oof["row_id"])], oof).score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (reused)")
    parser.add_argument("--data", type=Path, help="an existing synthetic root (skips synth)")
    parser.add_argument(
        "--cache", type=Path, help="with --data: its caches, DIR/train and DIR/test"
    )
    parser.add_argument("--train-studies", type=int, default=1000)
    parser.add_argument("--test-studies", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--whole-config", default="whole_baseline", help="the whole-series config")
    parser.add_argument("--two-stage-config", default="two_stage_demo")
    parser.add_argument(
        "--whole", action="append", default=[], metavar="KEY=VALUE", help="a whole-series override"
    )
    parser.add_argument(
        "--two-stage", action="append", default=[], metavar="KEY=VALUE", help="a two-stage override"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep finished runs in --out instead of retraining"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for both trainings")
    args = parser.parse_args()

    out: Path = args.out
    root, train_cache, test_cache = prepare_root(
        out, args.data, args.cache, args.seed, args.train_studies, args.test_studies, ()
    )

    solution = load_solution(root / "solution_test.csv")
    scores: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    runs = {
        "two-stage": (args.two_stage_config, out / "run_two_stage"),
        "whole-series": (args.whole_config, out / "run_whole"),
    }
    own_overrides = {"two-stage": args.two_stage, "whole-series": args.whole}
    for name, (config, run) in runs.items():
        if not (args.reuse and any(run.glob("fold*/best.pt"))):
            shutil.rmtree(run, ignore_errors=True)
            run_verb(
                [
                    "train",
                    "--config",
                    config,
                    "--data",
                    str(root),
                    "--cache",
                    str(train_cache),
                    "--out",
                    str(run),
                    "--no-progress",
                    *args.overrides,
                    *own_overrides[name],
                ]
            )
        metrics = pd.concat([pd.read_csv(p) for p in sorted(run.glob("fold*/metrics.csv"))])
        seconds[name] = float(metrics["seconds"].sum())
        submission = out / f"submission_{run.name}.csv"
        run_verb(
            [
                "predict",
                "--data",
                str(root),
                "--run",
                str(run),
                "--cache",
                str(test_cache),
                "--out",
                str(submission),
                "--tta",
                "flip",
                "--no-calibration",
                "--quiet",
            ]
        )
        scores[name] = official_score(solution, pd.read_csv(submission)).as_dict()
    both = out / "submission_ensemble.csv"
    run_verb(
        [
            "predict",
            "--data",
            str(root),
            "--run",
            *(str(r) for _, r in runs.values()),
            "--cache",
            str(test_cache),
            "--out",
            str(both),
            "--tta",
            "flip",
            "--no-calibration",
            "--quiet",
        ]
    )
    scores["ensemble (both runs)"] = official_score(solution, pd.read_csv(both)).as_dict()
    scores["class prior"] = official_score(
        solution, prior_submission(runs["two-stage"][1], solution["row_id"])
    ).as_dict()
    scores["oracle"] = official_score(solution, pd.read_csv(root / "oracle_test.csv")).as_dict()

    prior, oracle = scores["class prior"]["score"], scores["oracle"]["score"]
    table = pd.DataFrame(scores).T
    table["gap_closed"] = (prior - table["score"]) / (prior - oracle)
    table["train_seconds"] = pd.Series(seconds)
    table["oof_score"] = pd.Series({name: _oof_score(root, run) for name, (_, run) in runs.items()})
    table["epochs"] = pd.Series(
        {
            name: sum(len(pd.read_csv(p)) for p in run.glob("fold*/metrics.csv"))
            for name, (_, run) in runs.items()
        }
    )
    pd.set_option("display.width", 140)
    n_train = len(load_train_labels(root / "train.csv"))
    n_test = solution["row_id"].map(lambda r: parse_row_id(r)[0]).nunique()
    print(
        f"\nSynthetic split {root}: {n_train} train studies, {n_test} scored test studies, "
        f"{len(solution)} scored rows; overrides {args.overrides or 'none'}, whole-series "
        f"{args.whole or 'none'}, two-stage {args.two_stage or 'none'}"
    )
    print(table.round(4).to_string())

    errors = localization_oof(ServedRun(runs["two-stage"][1], train_cache, "cpu"), root)
    summary = summarize_localization(errors)
    print("\nStage 1 out-of-fold localisation (fused point vs labelled centre):")
    print(summary.round(3).to_string(index=False))

    figures = {
        "scores": table.to_dict(orient="index"),
        "localization": summary.to_dict(orient="records"),
        "argv": vars(args),
    }
    write_json_atomic(figures, out / "figures.json")
    print(f"\nfigures: {out / 'figures.json'}")
    if not np.isfinite(table["score"]).all():
        raise SystemExit("a score is not finite")


if __name__ == "__main__":
    main()
