"""``lsdc demo``: the whole chain on synthetic data, so a newcomer sees it work before any GPU hour.

synth (small) -> preprocess -> train (``configs/two_stage_demo.yaml``, the two-stage model:
localise the findings, grade a crop around each) -> evaluate the out-of-fold
predictions (fit the calibration; ``run/evaluation/report.html`` shows a gallery of the worst
studies with their points and crops) -> predict the synthetic test split -> evaluate the
submission, ending with one table: the official test score of the class prior, of the model and of
the oracle (the synthetic generator's true class probabilities, the best any model can do).
Every stage prints when it starts, how long it took and where its artefacts are.

``DIR`` keeps ``data/`` (the competition root), ``cache/`` (preprocessed volumes), ``run/``
(usable by ``lsdc predict --run``), ``submission.csv``, ``predict_report.csv``, ``report.html``
and ``metrics.json`` (the test evaluation). A rerun into the same ``DIR`` regenerates the data and
retrains from scratch.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lsdc.contract import (
    all_row_ids,
    load_solution,
    load_submission,
    parse_row_id,
)
from lsdc.errors import UserError
from lsdc.evaluation.metric import official_score
from lsdc.rundir import RunDir

DEMO_CONFIG = "two_stage_demo"
"""The training config of the demo (``configs/two_stage_demo.yaml``): lsdc's strongest model,
sized for 2 CPU cores. ``--config whole_baseline`` runs the chain with the whole-series baseline instead."""

DEMO_TRAIN_STUDIES = 700
DEMO_TEST_STUDIES = 100
"""Synthetic study counts: enough training studies for the localizer to find every finding within
a few millimetres (with 120 it misses the foramina by centimetres), and enough test studies for a
stable test score, within ten minutes on 2 CPU cores (1,000 training studies took longer:
docs/results.md, "The demo")."""

DEMO_TRAIN_OVERRIDES: tuple[str, ...] = ("folds.fold=0", "optim.val_every=5")
"""Train one fold only. On 2 CPU cores, one model on two thirds of the studies learns more than
three models in the same minutes; that fold's out-of-fold rows still fit the calibration.
Validate after the config's fifth and last epoch only: each pass over the fold cost a fifth of an
epoch, and the schedule's last epoch was the best one (docs/results.md, "The demo").
Overrides given on the command line come after these (``folds.fold=null`` trains every fold)."""


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
    from lsdc import api
    from lsdc.evaluation.report import REPORT_FILE, summary_lines
    from lsdc.inference.predict import prior_submission
    from lsdc.preprocessing.cachedir import CacheDir

    out = Path(out_dir)
    data, cache, run = out / "data", out / "cache", out / "run"
    _prepare_out_dir(out, (data, cache, run))
    clock = time.perf_counter()

    with _stage("synth: a small synthetic competition root with a known answer", clock) as artefact:
        api.synthesize(data, workers=workers, seed=seed, **(synth_overrides or {}))
        artefact("competition root", data)
        artefact("test solution", data / "solution_test.csv")

    with _stage("preprocess: DICOM -> cached volumes (train split)", clock) as artefact:
        api.preprocess(data, cache / "train", "train", workers=workers)
        artefact("cache", cache / "train")
        artefact("report", CacheDir(cache / "train").report)

    with _stage(f"train: config {config}", clock) as artefact:
        api.train(
            config,
            data,
            cache / "train",
            run,
            overrides=[*DEMO_TRAIN_OVERRIDES, *(train_overrides or [])],
        )
        artefact("run", run)
        artefact("out-of-fold predictions", RunDir(run).oof)

    with _stage("evaluate: out-of-fold predictions; fit the calibration", clock):
        metrics = api.evaluate(run_dir=run, data_root=data, cache_dir=cache / "train")
        print("\n".join(summary_lines(metrics)))

    with _stage("predict: the synthetic test split, as on Kaggle", clock) as artefact:
        result = api.predict(
            data, [run], out / "submission.csv", cache_dir=cache / "test", workers=workers
        )
        artefact("submission", result.submission_path)
        artefact("report", result.report_path)

    with _stage("evaluate: the test submission against the synthetic solution", clock) as artefact:
        api.evaluate(out / "submission.csv", solution=data / "solution_test.csv", out_dir=out)
        solution = load_solution(data / "solution_test.csv")
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
    gallery = Path(metrics["out_dir"]) / REPORT_FILE
    print(f"\nwhere the model looked, worst studies first: {gallery}")
    print(
        f"any study: lsdc show --data {data} --cache {cache / 'test'} --run {run} --study "
        f"{study_ids[0]} --out study.html"
    )
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
