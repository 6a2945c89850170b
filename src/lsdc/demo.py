"""``lsdc demo``: the whole chain on synthetic data, so a newcomer sees it work before any GPU hour.

synth (small) -> preprocess -> train (``configs/two_stage_demo.yaml``, the two-stage model:
localise the findings, grade a crop around each) -> evaluate the out-of-fold
predictions (and fit the calibration) -> predict the synthetic test split -> evaluate the
submission, ending with one table: the official test score of the class prior, of the model and of
the oracle (the synthetic generator's true class probabilities, the best any model can do).
Every stage prints when it starts, how long it took and where its artefacts are.

``DIR`` keeps ``data/`` (the competition root), ``cache/`` (preprocessed volumes), ``run/``
(usable by ``lsdc predict --run``), ``submission.csv``, ``predict_report.csv``, ``report.html``
and ``metrics.json`` (the test evaluation). A rerun into the same ``DIR`` regenerates the data and
retrains from scratch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lsdc.data.contract import (
    all_row_ids,
    labels_to_solution,
    load_solution,
    load_submission,
    load_train_labels,
    parse_row_id,
)
from lsdc.errors import UserError
from lsdc.evaluation.metric import official_score

DEMO_CONFIG = "two_stage_demo"
"""The training config of the demo (``configs/two_stage_demo.yaml``): lsdc's strongest model,
sized for 2 CPU cores. ``--config demo`` runs the chain with the whole-series baseline instead."""

DEMO_TRAIN_STUDIES = 1000
DEMO_TEST_STUDIES = 100
"""Synthetic study counts: enough training studies for the localizer to find every finding within
a few millimetres (with 120 it misses the foramina by centimetres), and enough test studies for a
stable test score, within the demo's minutes on 2 CPU cores."""

DEMO_TRAIN_OVERRIDES: tuple[str, ...] = ("folds.fold=0",)
"""Train one fold only. On 2 CPU cores, one model on two thirds of the studies learns more than
three models in the same minutes; that fold's out-of-fold rows still fit the calibration.
Overrides given on the command line come after these (``folds.fold=null`` trains every fold)."""


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="folder for every artefact (default demo_out)",
    )
    parser.add_argument(
        "--config",
        default=DEMO_CONFIG,
        help="training config (default configs/two_stage_demo.yaml; 'demo' for the whole-series "
        "baseline)",
    )
    parser.add_argument(
        "--train-studies", type=int, default=DEMO_TRAIN_STUDIES, help="synthetic training studies"
    )
    parser.add_argument(
        "--test-studies", type=int, default=DEMO_TEST_STUDIES, help="synthetic test studies"
    )
    parser.add_argument("--image-size", type=int, help="synthetic matrix size (default: synth's)")
    parser.add_argument("--slices", type=int, help="synthetic sagittal slices (default: synth's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="synth and preprocessing processes (default: one per CPU core)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="training config overrides, e.g. optim.epochs=2 (as for lsdc train)",
    )


def demo_from_args(args: argparse.Namespace) -> int:
    synth_overrides = {"train_studies": args.train_studies, "test_studies": args.test_studies}
    synth_overrides |= {
        key: value
        for key, value in (("image_size", args.image_size), ("slices", args.slices))
        if value is not None
    }
    run_demo(
        args.out,
        config=args.config,
        seed=args.seed,
        workers=args.workers,
        synth_overrides=synth_overrides,
        train_overrides=list(args.overrides),
    )
    return 0


@dataclass(frozen=True)
class DemoResult:
    """The demo's final table: official test score of each predictor and the gap closed."""

    prior: float
    model: float
    oracle: float
    seconds: float

    @property
    def gap_closed(self) -> float:
        """Share of the prior -> oracle distance the model covers (1 = as good as the oracle)."""
        gap = self.prior - self.oracle
        return (self.prior - self.model) / gap if gap > 0 else float("nan")


@contextmanager
def _stage(name: str, clock: float) -> Iterator[Callable[..., None]]:
    """Print a stage's start and duration; the yielded function prints an artefact path."""
    start = time.perf_counter()
    print(f"\n[{start - clock:7.1f} s] == {name}", flush=True)

    def artefact(label: str, path: Path) -> None:
        print(f"    {label:<24s} {path}", flush=True)

    yield artefact
    print(f"    done in {time.perf_counter() - start:.1f} s", flush=True)


def run_demo(
    out_dir: str | Path,
    config: str = DEMO_CONFIG,
    seed: int = 0,
    workers: int = 1,
    synth_overrides: dict[str, int] | None = None,
    train_overrides: list[str] | None = None,
) -> DemoResult:
    """Run the chain into ``out_dir`` and print the final table.

    Raises:
        UserError: ``out_dir`` exists and is not a previous demo folder (nothing is deleted then).
    """
    from lsdc.data.cache import preprocess_split
    from lsdc.data.synth import SynthConfig, synthesize
    from lsdc.evaluation.report import evaluate, print_summary
    from lsdc.inference.predict import predict_split, prior_submission
    from lsdc.training.train import add_train_arguments, train_from_args

    out = Path(out_dir)
    data, cache, run = out / "data", out / "cache", out / "run"
    _prepare_out_dir(out, (data, cache, run))
    clock = time.perf_counter()

    with _stage("synth: a small synthetic competition root with a known answer", clock) as artefact:
        synthesize(data, SynthConfig(seed=seed, **(synth_overrides or {})), workers=workers)
        artefact("competition root", data)
        artefact("test solution", data / "solution_test.csv")

    with _stage("preprocess: DICOM -> cached volumes (train split)", clock) as artefact:
        preprocess_split(data, cache / "train", "train", workers=workers)
        artefact("cache", cache / "train")
        artefact("report", cache / "train" / "preprocess_report.csv")

    with _stage(f"train: config {config}", clock) as artefact:
        parser = argparse.ArgumentParser(prog="lsdc train")
        add_train_arguments(parser)
        train_args = parser.parse_args(
            [
                "--config",
                config,
                "--data",
                str(data),
                "--cache",
                str(cache / "train"),
                "--out",
                str(run),
            ]
            + list(DEMO_TRAIN_OVERRIDES)
            + list(train_overrides or [])
        )
        train_from_args(train_args)
        artefact("run", run)
        artefact("out-of-fold predictions", run / "oof.csv")

    with _stage("evaluate: out-of-fold predictions; fit the calibration", clock):
        labels = load_train_labels(data / "train.csv")
        metrics = evaluate(
            run / "oof.csv",
            labels_to_solution(labels),
            run / "evaluation",
            labels_name=str(data / "train.csv"),
            restrict_to_predicted_studies=True,
            calibration_run=run,
        )
        print_summary(metrics, run / "evaluation")

    with _stage("predict: the synthetic test split, as on Kaggle", clock) as artefact:
        result = predict_split(
            data, [run], out / "submission.csv", cache_dir=cache / "test", workers=workers
        )
        artefact("submission", result.submission_path)
        artefact("report", result.report_path)

    with _stage("evaluate: the test submission against the synthetic solution", clock) as artefact:
        solution = load_solution(data / "solution_test.csv")
        evaluate(out / "submission.csv", solution, out, labels_name=str(data / "solution_test.csv"))
        artefact("report", out / "report.html")
        artefact("metrics", out / "metrics.json")

    study_ids = sorted({parse_row_id(r)[0] for r in result.submission["row_id"]})
    scores = {
        "prior": official_score(solution, prior_submission(run, all_row_ids(study_ids))).score,
        "model": official_score(solution, result.submission).score,
        "oracle": official_score(solution, load_submission(data / "oracle_test.csv")).score,
    }
    demo = DemoResult(**scores, seconds=time.perf_counter() - clock)
    print_table(demo)
    return demo


def print_table(demo: DemoResult) -> None:
    """The demo's last words: the three test scores and how much of the gap the model closed."""
    print(
        f"\nofficial score on the synthetic test split (lower is better), {demo.seconds:.0f} s in all"
    )
    print(f"    {'class prior':<12s} {demo.prior:.4f}")
    print(
        f"    {'model':<12s} {demo.model:.4f}   ({100 * demo.gap_closed:.0f}% of the prior->oracle gap closed)"
    )
    print(f"    {'oracle':<12s} {demo.oracle:.4f}")
    sys.stdout.flush()


def _prepare_out_dir(out: Path, owned: tuple[Path, ...]) -> None:
    """Start from a clean slate inside ``out`` without ever deleting a folder the demo did not make.

    A folder is the demo's when it holds nothing but the demo's own artefacts.
    """
    known = {p.name for p in owned} | {
        "submission.csv",
        "predict_report.csv",
        "report.html",
        "metrics.json",
    }
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        strangers = sorted(p.name for p in out.iterdir() if p.name not in known)
        if strangers:
            raise UserError(
                f"{out}: not a demo folder (holds {strangers[:3]}); choose another --out"
            )
        for p in owned:
            if p.exists():
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
