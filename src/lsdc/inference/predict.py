"""``lsdc predict``: test DICOM + trained runs -> a complete, valid ``submission.csv``.

In the competition's offline notebook one missing row or one crash costs the attempt, so this
stage is built around one promise: whatever the input folder holds, it writes exactly one finite,
normalised row per ``{study_id}_{condition}_{level}`` of every study listed, or nothing at all
(atomic write). Degradation by the data is graded, never fatal: a study with a missing, empty or
unreadable series is predicted without it; a study with nothing usable, or one the model fails
on, gets the training class prior. Every study gets a line in ``predict_report.csv`` saying which
it was (a study folder that neither CSV lists too). Failures of the tools (a fold that cannot
load, folds of different configs, a missing device, a bad worker count, an unusable cache) would
silently spend a submission on the prior, so they are refused unless ``allow_fallback`` asks for
the prior (docs/reliability.md).

The chain: list the studies (``{split}_series_descriptions.csv`` and, for the test split,
``sample_submission.csv``) -> preprocess into a temporary cache (``lsdc.preprocessing.cache``) -> for each
run, the mean over its fold checkpoints (:meth:`lsdc.tasks.served.ServedRun.predict`, optionally with
left-right flip TTA), that run's temperatures (``RUN/calibration.json``) -> mean over runs ->
prior fallback -> the file, in ``sample_submission.csv``'s row order when that file exists.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lsdc.contract import (
    LABEL_COLUMNS,
    N_CLASSES,
    N_LABELS,
    PRED_COLUMNS,
    SERIES_DESCRIPTIONS,
    all_row_ids,
    label_index,
    load_sample_submission,
    load_series_descriptions,
    parse_row_id,
    write_csv_atomic,
)
from lsdc.errors import LsdcWarning, MachineError, UserError
from lsdc.evaluation.calibration import Calibration, load_calibration
from lsdc.evaluation.metric import validate_submission
from lsdc.rundir import RunDir
from lsdc.utils import check_input_dir, check_output_dir, check_output_file

if TYPE_CHECKING:
    from lsdc.tasks.served import ServedRun

log = logging.getLogger(__name__)

REPORT_NAME = "predict_report.csv"
REPORT_COLUMNS = [
    "study_id",
    "source",
    "n_series_listed",
    "n_series_read",
    "missing_descriptions",
    "message",
]
"""predict_report.csv: ``source`` is ``model`` (every listed series read), ``model_partial``
(the model saw only some series), ``prior`` (nothing usable, every run failed, or a fallback the
user allowed) or ``not_listed`` (a study folder in neither CSV: no rows)."""


@dataclass(frozen=True)
class PredictResult:
    """What ``predict_split`` wrote."""

    submission: pd.DataFrame
    report: pd.DataFrame
    submission_path: Path
    report_path: Path

    @property
    def n_prior(self) -> int:
        """How many studies got the class prior instead of a model's prediction."""
        return int((self.report["source"] == "prior").sum())


# -------------------------------------------------------------------------------------- runs
def load_class_prior(run_dir: str | Path) -> np.ndarray:
    """``RUN/class_prior.csv`` -> (25, 3) probabilities in LABEL_COLUMNS order: the fallback.

    Raises:
        UserError: the file is missing, lacks a label, or holds a row that is not a distribution.
    """
    path = RunDir(run_dir).class_prior
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a run folder written by lsdc train?")
    try:
        table = pd.read_csv(path)
        prior = table.set_index("label_column").loc[list(LABEL_COLUMNS), list(PRED_COLUMNS)]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError) as exc:
        raise UserError(
            f"{path}: needs columns label_column, {', '.join(PRED_COLUMNS)} and one row per "
            f"label ({exc})"
        ) from exc
    values = prior.to_numpy(np.float64)
    if not (np.isfinite(values).all() and (values >= 0).all() and np.allclose(values.sum(1), 1)):
        raise UserError(f"{path}: every row must be finite, non-negative and sum to 1")
    return values


def prior_submission(run_dir: str | Path, row_ids: Sequence[str]) -> pd.DataFrame:
    """The no-image baseline: each row_id gets its label's training class frequencies.

    Returns:
        row_id, normal_mild, moderate, severe, in the order of ``row_ids``.
    """
    prior = load_class_prior(run_dir)
    index = [label_index(condition, level) for _, condition, level in map(parse_row_id, row_ids)]
    frame = pd.DataFrame(prior[index], columns=list(PRED_COLUMNS))
    frame.insert(0, "row_id", list(row_ids))
    return frame


def check_run(run_dir: str | Path) -> Path:
    """Refuse early what cannot be a run, before any minute is spent preprocessing."""
    run_dir = check_input_dir(run_dir, "run")
    RunDir(run_dir).checkpoints()
    return run_dir


# ----------------------------------------------------------------------------------- studies
def list_studies(data_root: Path, split: str) -> tuple[list[str], pd.DataFrame]:
    """The row ids to write, in order, and the series table (possibly empty).

    Studies come from ``{split}_series_descriptions.csv`` and, for the test split, from
    ``sample_submission.csv`` (whose row order comes first): a study in either gets 25 rows, so
    a damaged CSV costs model quality, never rows.

    Raises:
        UserError: neither file names a single study.
    """
    series_path = data_root / f"{split}_series_descriptions.csv"
    try:
        series = load_series_descriptions(series_path)
    except UserError as exc:
        log.warning(f"{exc}; studies without it get the class prior")
        series = pd.DataFrame(columns=["study_id", "series_id", "series_description"])
    ordered: list[str] = []
    sample_path = data_root / "sample_submission.csv"
    if split == "test" and sample_path.is_file():
        try:
            ordered = load_sample_submission(sample_path)["row_id"].tolist()
        except UserError as exc:
            log.warning(f"{exc}; row order follows {series_path.name}")
    study_ids = list(
        dict.fromkeys([parse_row_id(r)[0] for r in ordered] + [int(s) for s in series["study_id"]])
    )
    if not study_ids:
        raise UserError(
            f"{data_root}: neither {series_path.name} nor {sample_path.name} lists a study"
        )
    listed = set(ordered)
    row_ids = ordered + [r for r in all_row_ids(study_ids) if r not in listed]
    return row_ids, series


def _series_status(
    study_ids: Sequence[int], series: pd.DataFrame, cache_dir: Path, preprocess_error: str
) -> pd.DataFrame:
    """Per study: how many series were listed and read, what is missing, and why."""
    from lsdc.preprocessing.cachedir import CacheDir

    cache_report = CacheDir(cache_dir).read_report()
    read = cache_report[cache_report["status"] != "error"]
    noted = cache_report[cache_report["message"].astype(str) != ""]
    rows = []
    for sid in study_ids:
        listed = series[series["study_id"] == sid]
        ok = read[read["study_id"] == sid]
        present = set(ok["series_description"])
        messages = list(
            dict.fromkeys(
                f"series {r.series_id} ({r.status}): {r.message}"
                for r in noted[noted["study_id"] == sid].itertuples()
            )
        )
        if listed.empty:
            messages.append("no series listed")
        if preprocess_error:
            messages.append(preprocess_error)
        rows.append(
            {
                "study_id": sid,
                "n_series_listed": len(listed),
                "n_series_read": ok["series_id"].nunique(),
                "missing_descriptions": "; ".join(
                    d for d in SERIES_DESCRIPTIONS if d not in present
                ),
                "message": "; ".join(messages),
            }
        )
    return pd.DataFrame(rows)


def _prior_row_notes(runs: Sequence[Path], status: pd.DataFrame) -> dict[int, str]:
    """Per study the model predicted: the rows a run answered with its class prior because the
    study lacks their series (the two-stage grader's rule: no crop, no grade), as report text."""
    from lsdc.config import load_config
    from lsdc.tasks.base import task_class

    tasks = {}
    for run in runs:
        try:
            tasks[run.name] = task_class(load_config(RunDir(run).config).task)
        except UserError as exc:
            log.warning(f"{run}: cannot tell which rows its task answers with the prior ({exc})")
    notes = {}
    for sid, missing in zip(status["study_id"], status["missing_descriptions"], strict=True):
        present = set(SERIES_DESCRIPTIONS) - set(str(missing).split("; "))
        said = []
        for name, task in tasks.items():
            rows = task.prior_rows(present)
            if rows.any():
                said.append(
                    f"{int(rows.sum())} rows of the missing {missing}: class prior in {name}"
                )
        if said:
            notes[int(sid)] = "; ".join(said)
    return notes


# -------------------------------------------------------------------------------- prediction
def _run_predictions(
    served: ServedRun, study_ids: list[int], tta_flip: bool
) -> tuple[np.ndarray, dict[int, str]]:
    """(n, 25, 3) of one run, NaN where it failed, and the failure message per study.

    The whole batch is tried first (fast); if it raises, each study alone, so one poisoned study
    costs only itself.
    """
    run_dir = served.run_dir
    out = np.full((len(study_ids), N_LABELS, N_CLASSES), np.nan)
    failures: dict[int, str] = {}
    if not study_ids:
        return out, failures

    def call(ids: list[int]) -> np.ndarray:
        return served.predict(ids, tta=tta_flip)

    try:
        out[:] = call(study_ids)
    except Exception as exc:  # noqa: BLE001 - a crash here would cost the whole submission
        log.warning(
            f"{run_dir}: batch prediction failed ({type(exc).__name__}: {exc}); retrying study by study"
        )
        for i, sid in enumerate(study_ids):
            try:
                out[i] = call([sid])[0]
            except Exception as study_exc:  # noqa: BLE001
                failures[sid] = f"{run_dir.name}: {type(study_exc).__name__}: {study_exc}"
    with np.errstate(invalid="ignore"):
        bad = (
            ~np.isfinite(out).all(axis=(1, 2))
            | (out < 0).any(axis=(1, 2))
            | (out.sum(axis=-1) <= 0).any(axis=1)
        )
    for i in np.flatnonzero(bad):
        failures.setdefault(
            study_ids[i], f"{run_dir.name}: prediction not a distribution (NaN, negative or zero)"
        )
        out[i] = np.nan
    return out, failures


def ensemble(
    predictions: Sequence[np.ndarray], calibrations: Sequence[Calibration | None]
) -> np.ndarray:
    """Mean over runs of each run's calibrated probabilities; NaN rows (failed) are skipped.

    A study every run failed on stays NaN (the caller falls back to the prior).
    """
    stacked = []
    for probs, cal in zip(predictions, calibrations, strict=True):
        ok = np.isfinite(probs).all(axis=(1, 2))
        calibrated = probs.copy()
        if cal is not None and ok.any():
            calibrated[ok] = cal.apply_to_array(probs[ok])
        stacked.append(calibrated)
    stacked_arr = np.stack(stacked)
    valid = np.isfinite(stacked_arr).all(axis=(2, 3))  # (runs, n)
    total = np.where(valid[..., None, None], stacked_arr, 0.0).sum(axis=0)
    count = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count[:, None, None] > 0, total / count[:, None, None], np.nan)


def predict_split(
    data_root: str | Path,
    run_dirs: Sequence[str | Path],
    out_path: str | Path,
    split: str = "test",
    tta_flip: bool = False,
    calibrate: bool = True,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    device: str | None = None,
    threads: int = 0,
    progress: bool = True,
    allow_fallback: bool = False,
    check_descriptions: bool = False,
) -> PredictResult:
    """Write ``out_path`` (the submission) and ``predict_report.csv`` beside it.

    Args:
        data_root: competition root (read only).
        run_dirs: run folders; their fold checkpoints and runs are averaged.
        out_path: submission CSV to write (atomically; its folder is created).
        split: ``test`` (the submission) or ``train`` (e.g. to check a run on its training data).
        tta_flip: average with the left-right mirrored prediction (labels swapped back).
        calibrate: apply each run's ``calibration.json`` when it has one.
        cache_dir: keep the preprocessed cache here; default a temporary folder, removed after.
        workers: preprocessing processes.
        device: torch device for the model; None picks CUDA when available.
        threads: torch threads of the model; 0 chooses them as training does (the usable CPUs
            less the loader workers of the runs' configs, :func:`lsdc.distributed.choose_threads`).
        progress: show progress bars.
        allow_fallback: where the tools fail (a fold that cannot load, folds of different
            configs, a missing device, a bad worker count, an unusable cache, preprocessing that
            crashes), give the studies concerned the class prior, with a warning and a report
            line, instead of refusing.
        check_descriptions: also compare each listed series' description with the role its
            DICOM headers give, warn where they disagree and write ``series_roles.csv``
            beside the submission (:func:`lsdc.inference.dicom_input.check_descriptions`).

    Raises:
        UserError: a run folder is unusable, neither CSV lists a study, ``out_path`` cannot be
            written, ``threads`` is negative, or (without ``allow_fallback``) one of the tool
            failures above. Nothing about the images themselves raises: bad series degrade to
            the prior and a report line.
    """
    from lsdc.distributed import set_torch_threads
    from lsdc.tasks.served import ServedRun

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UserError(f"`threads` must be 0 (automatic) or more, got {threads!r}")
    data_root, out_path = Path(data_root), Path(out_path)
    check_output_file(out_path, "`out_path`")
    runs = [check_run(r) for r in run_dirs]
    priors = np.stack([load_class_prior(r) for r in runs])
    calibrations = [load_calibration(r) if calibrate else None for r in runs]
    for run, cal in zip(runs, calibrations, strict=True):
        if cal is not None and bool(cal.info.get("tta_flip", False)) != tta_flip:
            fitted = "with" if cal.info.get("tta_flip") else "without"
            warnings.warn(
                f"{RunDir(run).calibration}: fitted on predictions {fitted} flip TTA, applied "
                f"here to predictions {'with' if tta_flip else 'without'}; refit it with lsdc "
                "evaluate --run RUN --cache CACHE --tta as served",
                LsdcWarning,
                stacklevel=2,
            )
    for_all, device = _tool_problems(cache_dir, split, workers, device, allow_fallback)
    with tempfile.TemporaryDirectory(prefix="lsdc-predict-") as tmp:
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp) / "cache"
        served: dict[Path, ServedRun] = {}
        for_run: dict[Path, str] = {}
        for run in runs:
            try:
                served[run] = ServedRun(run, cache, device)
            except UserError as exc:
                for_run[run] = _refuse_or_fall_back(str(exc), allow_fallback)
        set_torch_threads(
            threads, max((s.config.data.num_workers for s in served.values()), default=0)
        )

        row_ids, series = list_studies(data_root, split)
        study_ids = list(dict.fromkeys(parse_row_id(r)[0] for r in row_ids))
        if check_descriptions:
            from lsdc.inference.dicom_input import ROLES_NAME
            from lsdc.inference.dicom_input import check_descriptions as check

            write_csv_atomic(check(data_root, split), out_path.parent / ROLES_NAME)

        listed_ids = [s for s in study_ids if s in set(series["study_id"])]
        if listed_ids and not for_all:
            problem = _preprocess(
                data_root, cache, split, workers, listed_ids, progress, allow_fallback
            )
            if problem:
                for_all.append(problem)
        status = _series_status(study_ids, series, cache, "; ".join(for_all))
        usable = status.loc[status["n_series_read"] > 0, "study_id"].tolist() if not for_all else []
        per_run, failures = [], {}
        for run in runs:
            if run in for_run:
                probs = np.full((len(usable), N_LABELS, N_CLASSES), np.nan)
                run_failures = dict.fromkeys(usable, f"{run.name}: {for_run[run]}")
            else:
                probs, run_failures = _run_predictions(served[run], usable, tta_flip)
            per_run.append(probs)
            for sid, msg in run_failures.items():
                failures[sid] = "; ".join(filter(None, [failures.get(sid, ""), msg]))
        model = ensemble(per_run, calibrations) if usable else np.empty((0, N_LABELS, N_CLASSES))

    probs = np.broadcast_to(priors.mean(axis=0), (len(study_ids), N_LABELS, N_CLASSES)).copy()
    position = {sid: i for i, sid in enumerate(study_ids)}
    from_model = np.zeros(len(study_ids), dtype=bool)
    for k, sid in enumerate(usable):
        if np.isfinite(model[k]).all():
            probs[position[sid]] = model[k]
            from_model[position[sid]] = True
    probs = probs / probs.sum(axis=-1, keepdims=True)

    complete = (status["n_series_read"] == status["n_series_listed"]) & (
        status["missing_descriptions"] == ""
    )
    status["source"] = np.where(from_model, np.where(complete, "model", "model_partial"), "prior")
    notes = _prior_row_notes(runs, status[from_model])
    status["message"] = [
        "; ".join(filter(None, [m, failures.get(sid, ""), notes.get(sid, "")]))
        for sid, m in zip(status["study_id"], status["message"], strict=True)
    ]
    report = pd.concat(
        [status[REPORT_COLUMNS], _unlisted_folders(data_root, split, set(study_ids))],
        ignore_index=True,
    )
    submission = _submission_frame(row_ids, study_ids, probs)
    report_path = out_path.parent / REPORT_NAME
    write_csv_atomic(report, report_path)
    write_csv_atomic(submission, out_path)
    return PredictResult(submission, report, out_path, report_path)


def _refuse_or_fall_back(message: str, allow_fallback: bool) -> str:
    """Raise ``message`` as a UserError; with ``allow_fallback``, warn and return it instead (the
    reason the studies concerned get the class prior)."""
    if not allow_fallback:
        raise UserError(f"{message} (`allow_fallback=True` writes the class prior instead)")
    log.warning(f"{message}; `allow_fallback=True`: the class prior instead")
    return f"fallback: {message}"


def _tool_problems(
    cache_dir: str | Path | None,
    split: str,
    workers: int,
    device: str | None,
    allow_fallback: bool,
) -> tuple[list[str], str | None]:
    """Refuse (or, with ``allow_fallback``, return as reasons for the prior) what would make
    every study fall back: a bad worker count, a missing device, an unusable cache folder.

    Returns:
        The reasons, and the device to serve on (``auto`` and None resolved to cuda or cpu).
    """
    from lsdc.distributed import resolve_device
    from lsdc.preprocessing.cache import check_cache_settings

    problems = []
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        problems.append(
            _refuse_or_fall_back(f"`workers` must be at least 1, got {workers!r}", allow_fallback)
        )
    try:
        device = str(resolve_device(device))
    except UserError as exc:
        problems.append(_refuse_or_fall_back(str(exc), allow_fallback))
    if cache_dir is not None:
        try:
            check_output_dir(cache_dir, "`cache_dir`")
            check_cache_settings(cache_dir, split)
        except UserError as exc:
            problems.append(_refuse_or_fall_back(str(exc), allow_fallback))
    return problems, device


def _preprocess(
    data_root: Path,
    cache: Path,
    split: str,
    workers: int,
    study_ids: list[int],
    progress: bool,
    allow_fallback: bool,
) -> str:
    """Cache ``study_ids``; returns why it failed ("" when it did not).

    A failure of the input data (e.g. no image folder) is reported and the studies get the
    prior; a failure of the tools (the cache busy, a crashed worker, a full disk) is refused
    unless the fallback was asked for.
    """
    from lsdc.preprocessing.cache import preprocess_split

    try:
        t0 = time.perf_counter()
        preprocess_split(
            data_root, cache, split, workers=workers, study_ids=study_ids, progress=progress
        )
        if progress:
            log.info("preprocessed %d studies in %.1f s", len(study_ids), time.perf_counter() - t0)
        return ""
    except MachineError as exc:  # the cache busy, a full disk: the tools, not the data
        return _refuse_or_fall_back(str(exc), allow_fallback)
    except UserError as exc:
        problem = f"preprocessing failed: {exc}"
        log.warning(problem)
        return problem
    except Exception as exc:  # noqa: BLE001 - the tools failed, not the data
        return _refuse_or_fall_back(
            f"preprocessing failed: {type(exc).__name__}: {exc}", allow_fallback
        )


def _unlisted_folders(data_root: Path, split: str, listed: set[int]) -> pd.DataFrame:
    """Report lines (source ``not_listed``) for the study folders of ``{split}_images`` that
    neither CSV lists: they get no rows (the submission holds the listed studies only), but
    they do not vanish without a word."""
    images = data_root / f"{split}_images"
    found = (
        sorted(int(p.name) for p in images.iterdir() if p.is_dir() and p.name.isdigit())
        if images.is_dir()
        else []
    )
    rows = [
        {
            "study_id": sid,
            "source": "not_listed",
            "n_series_listed": 0,
            "n_series_read": 0,
            "missing_descriptions": "",
            "message": f"{images / str(sid)}: in neither {split}_series_descriptions.csv nor "
            "sample_submission.csv; not predicted",
        }
        for sid in found
        if sid not in listed
    ]
    for row in rows:
        log.warning(row["message"])
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def _submission_frame(row_ids: list[str], study_ids: list[int], probs: np.ndarray) -> pd.DataFrame:
    """The submission in ``row_ids`` order, checked complete and valid before anyone writes it."""
    by_row = pd.DataFrame(probs.reshape(-1, N_CLASSES), columns=list(PRED_COLUMNS))
    by_row.insert(0, "row_id", all_row_ids(study_ids))
    submission = by_row.set_index("row_id").loc[row_ids].reset_index()
    validate_submission(submission, pd.Index(all_row_ids(study_ids)))
    sums = submission[list(PRED_COLUMNS)].sum(axis=1).to_numpy()
    if len(submission) != len(study_ids) * N_LABELS or not np.allclose(sums, 1.0):
        raise AssertionError("internal error: the submission is incomplete or not normalised")
    return submission
