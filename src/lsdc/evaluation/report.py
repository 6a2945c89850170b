"""``lsdc evaluate``: the official score, where it is lost, calibration, and one report.html.

Two kinds of prediction file are evaluated the same way, against the labels that fit them:

* a run's ``oof.csv`` against ``ROOT/train.csv`` (``--data ROOT``; only the studies the file
  predicts are scored, since a run may train on a subset of folds). With ``--run RUN`` the
  temperatures per condition are fitted on these out-of-fold predictions and stored in
  ``RUN/calibration.json``, and the report shows the score before and after;
* a submission against a solution file such as ``solution_test.csv`` (``--solution FILE``;
  every scored row must be predicted, exactly as ``lsdc score`` demands).

The outputs are ``report.html`` (self-contained: plots embedded as base64 PNG) and
``metrics.json`` (every number of the report) in ``--out``. Given the run and its cache
(``--run RUN --cache CACHE``), the report also shows a gallery of studies (the largest loss first,
then a few random ones) drawn by :mod:`lsdc.evaluation.viewer`, each linking to its full page in
``studies/``, and stage 1's localisation error per level and side.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lsdc.contract import (
    CONDITIONS,
    LEVELS,
    PRED_COLUMNS,
    SEVERITIES,
    labels_to_solution,
    load_solution,
    load_train_labels,
    parse_row_id,
    write_csv_atomic,
)
from lsdc.errors import UserError
from lsdc.evaluation import plots
from lsdc.evaluation.calibration import (
    Calibration,
    cross_fit,
    cross_fit_groups,
    fit_temperatures,
    served_oof_predictions,
)
from lsdc.evaluation.diagnostics import align, diagnose, load_predictions
from lsdc.evaluation.metric import SubmissionError
from lsdc.rundir import RunDir
from lsdc.utils import atomic_files, check_input_dir, check_output_dir, json_text

if TYPE_CHECKING:
    from lsdc.evaluation.study_view import StudyViewer

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
SERVED_OOF_FILE = "oof_served.csv"
"""``--tta``: the out-of-fold predictions re-made as served, beside the report."""
SCORE_KEYS: tuple[str, ...] = ("score", "spinal", "foraminal", "subarticular", "any_severe_spinal")


def evaluate_files(
    predictions: str | Path | None = None,
    data_root: str | Path | None = None,
    solution: str | Path | None = None,
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tta: str | None = None,
) -> dict[str, Any]:
    """Score a prediction file named by paths (what ``lsdc evaluate`` does).

    Args:
        predictions: prediction CSV; default ``RUN/oof.csv`` when ``run_dir`` is given.
        data_root: score against ``ROOT/train.csv``, only the studies the predictions hold
            (out-of-fold rows).
        solution: score against a solution file (test predictions); every scored row must be
            predicted. Exactly one of ``data_root`` and ``solution``.
        run_dir: fit this run's calibration on the (out-of-fold) predictions; needs ``data_root``.
        out_dir: folder for report.html and metrics.json; default ``RUN/evaluation`` with a run,
            else an ``evaluation`` folder beside the predictions.
        cache_dir: the cache of the predicted studies; with ``run_dir``, the report gets the
            study gallery (pages in ``out_dir/studies``) and the localisation error.
        tta: ``none`` or ``flip``: instead of ``RUN/oof.csv``, re-make the out-of-fold
            predictions the way ``lsdc predict --tta`` serves them (each fold's model on its own
            validation studies of ``cache_dir``, through :class:`lsdc.tasks.served.ServedRun`),
            write them to
            ``out_dir/oof_served.csv``, and score and calibrate those.

    Returns:
        The metrics written to metrics.json.
    """
    run = Path(run_dir) if run_dir is not None else None
    if tta is not None and (
        run is None or cache_dir is None or data_root is None or predictions is not None
    ):
        raise UserError(
            "`tta` re-makes the run's out-of-fold predictions as served: give `run_dir=RUN`, "
            "`data_root=ROOT` and `cache_dir=CACHE` (the training cache), and no `predictions`"
        )
    if tta not in (None, "none", "flip"):
        raise UserError(f"`tta` must be none or flip, got {tta!r}")
    if predictions is None:
        if run is None:
            raise UserError("give `predictions=PRED.csv`, or `run_dir=RUN` to evaluate RUN/oof.csv")
        predictions = RunDir(run).oof
    pred_path = Path(predictions)
    if (data_root is None) == (solution is None):
        raise UserError("give exactly one of `data_root=ROOT` (train.csv) and `solution=FILE`")
    if run is not None and solution is not None:
        raise UserError(
            "`run_dir` fits the calibration, which must come from out-of-fold predictions "
            "scored against train.csv (`data_root=ROOT`), never from the test solution"
        )
    if run is not None:
        check_input_dir(run, "run")
    if cache_dir is not None and run is None:
        raise UserError("`cache_dir` draws the run's studies in the report: give `run_dir=RUN` too")
    out = Path(out_dir) if out_dir is not None else None
    out = out or (RunDir(run).evaluation if run is not None else pred_path.parent / "evaluation")
    check_output_dir(out, "`out_dir`")
    if data_root is not None:
        labels_path = Path(data_root) / "train.csv"
        labels = labels_to_solution(load_train_labels(labels_path))
    else:
        labels_path = Path(solution)
        labels = load_solution(labels_path)
    if tta is not None:
        served = served_oof_predictions(run, cache_dir, tta == "flip")
        pred_path = write_csv_atomic(served, out / SERVED_OOF_FILE)
    viewer = None
    if cache_dir is not None:
        from lsdc.evaluation.study_view import StudyViewer

        viewer = StudyViewer(run, cache_dir, data_root)
    return evaluate(
        pred_path,
        labels,
        out,
        labels_name=str(labels_path),
        restrict_to_predicted_studies=data_root is not None,
        calibration_run=run,
        viewer=viewer,
        served_tta_flip=tta == "flip",
    )


def restrict_to_studies(solution: pd.DataFrame, study_ids: set[int]) -> pd.DataFrame:
    """Keep the solution rows of the given studies (an OOF file covers only trained folds)."""
    studies = np.array([parse_row_id(r)[0] for r in solution["row_id"]])
    return solution[np.isin(studies, list(study_ids))].reset_index(drop=True)


def evaluate(
    pred_path: str | Path,
    solution: pd.DataFrame,
    out_dir: str | Path,
    labels_name: str = "solution",
    restrict_to_predicted_studies: bool = False,
    calibration_run: str | Path | None = None,
    viewer: StudyViewer | None = None,
    served_tta_flip: bool = False,
) -> dict[str, Any]:
    """Score a prediction file, write report.html and metrics.json, optionally fit calibration.

    Args:
        pred_path: prediction CSV (row_id + PRED_COLUMNS).
        solution: labels in solution format (row_id, PRED_COLUMNS one-hot, sample_weight).
        out_dir: where report.html and metrics.json go.
        labels_name: how the report names the labels' source.
        restrict_to_predicted_studies: score only the solution rows of studies the predictions
            hold (out-of-fold files); otherwise every scored row must be predicted.
        calibration_run: fit temperatures on these predictions and write RUN/calibration.json.
        served_tta_flip: the predictions were made with flip TTA (recorded in calibration.json,
            which ``lsdc predict`` checks against how it serves).
        viewer: draw the study gallery (full pages in ``out_dir/studies``) and, for a two-stage
            run with labelled points, stage 1's out-of-fold error (needs ``data_root``).

    The run's calibration.json, metrics.json and report.html are published together, or (a
    full disk) none of them; the gallery's pages are written first, each whole.

    Returns:
        The metrics written to metrics.json.

    Raises:
        UserError: unreadable files, missing predictions for a scored row, nothing to score.
    """
    pred_path, out_dir = Path(pred_path), Path(out_dir)
    predictions = load_predictions(pred_path)
    if restrict_to_predicted_studies:
        predicted = {parse_row_id(r)[0] for r in predictions["row_id"]}
        solution = restrict_to_studies(solution, predicted)
    weights = solution["sample_weight"].to_numpy(np.float64)
    if not (weights > 0).any():
        raise UserError(f"{pred_path}: no row of it is labelled in {labels_name}; nothing to score")
    calibration = None
    try:
        metrics: dict[str, Any] = {
            "predictions": str(pred_path),
            "labels": labels_name,
            "out_dir": str(out_dir),
            **diagnose(solution, predictions),
        }
        if calibration_run is not None:
            metrics["calibration"], calibration = calibrate_run(
                solution,
                predictions,
                calibration_run,
                str(pred_path),
                metrics["official"],
                tta_flip=served_tta_flip,
            )
    except SubmissionError as exc:
        raise UserError(f"{pred_path}: {exc} (labels: {labels_name})") from exc
    gallery_html = ""
    if viewer is not None:
        from lsdc.evaluation.viewer import gallery

        metrics["gallery"], gallery_html = gallery(viewer, solution, predictions, out_dir)
        metrics["localization"] = viewer.localization()
    with atomic_files() as stage:
        if calibration is not None:
            stage(RunDir(calibration_run).calibration).write_text(json_text(calibration.to_dict()))
        stage(out_dir / METRICS_FILE).write_text(json_text(metrics))
        stage(out_dir / REPORT_FILE).write_text(render_html(metrics, gallery_html))
    return metrics


def calibrate_run(
    solution: pd.DataFrame,
    predictions: pd.DataFrame,
    run_dir: str | Path,
    fitted_on: str,
    before: dict[str, float],
    tta_flip: bool = False,
) -> tuple[dict[str, Any], Calibration]:
    """Fit temperatures on out-of-fold predictions; return the report's calibration section
    and the calibration for RUN/calibration.json (stored by the caller, with the report).

    The temperatures stored are fitted on every row. The score "after" is out of sample: the
    rows of each training fold (or, for a one-fold run, of each random study group) calibrated
    by temperatures fitted without them (:func:`lsdc.evaluation.calibration.cross_fit_groups`),
    so the gain shown is what calibration does for rows it never saw. The in-sample score (every
    row calibrated by temperatures fitted on it, the old "after") is kept for reference.
    """
    rows = align(solution, predictions)
    temperatures = fit_temperatures(rows.condition, rows.target, rows.probs, rows.weight)
    in_sample = diagnose(solution, Calibration(temperatures).apply_to_frame(predictions))
    folds_path = RunDir(run_dir).folds
    fold_of = None
    if folds_path.is_file():
        folds = pd.read_csv(folds_path)
        fold_of = dict(zip(folds["study_id"].astype(int), folds["fold"].astype(int), strict=True))
    study_of_row = np.array([parse_row_id(r)[0] for r in predictions["row_id"]])
    groups, how = cross_fit_groups(study_of_row, fold_of)
    per_group: dict[int, dict[str, float]] = {}
    after = in_sample
    if groups is not None:
        group_of_study = dict(zip(study_of_row.tolist(), groups.tolist(), strict=True))
        scored_groups = np.array([group_of_study[int(s)] for s in rows.study_id])
        calibrated, per_group = cross_fit(
            predictions,
            groups,
            rows.condition,
            rows.target,
            rows.probs,
            rows.weight,
            scored_groups,
        )
        after = diagnose(solution, calibrated)
    info = {
        "fitted_on": fitted_on,
        "tta_flip": tta_flip,
        "n_rows": int(rows.target.size),
        "score_before": before["score"],
        "score_after": after["official"]["score"],
        "score_after_in_sample": in_sample["official"]["score"],
        "cross_fit": how,
    }
    section = {
        "path": str(RunDir(run_dir).calibration),
        "temperatures": temperatures,
        "tta_flip": tta_flip,
        "cross_fit": how,
        "temperatures_by_group": {str(g): t for g, t in per_group.items()},
        "before": before,
        "after": after["official"],
        "after_in_sample": in_sample["official"],
        "reliability_after": after["reliability"],
    }
    return section, Calibration(temperatures, info)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The score and its components, then where the report is: what ``lsdc evaluate`` prints."""
    lines = [
        f"{metrics['predictions']}: {metrics['n_studies']} studies, {metrics['n_rows']} scored rows"
    ]
    cal = metrics.get("calibration")
    if cal is None:
        lines += [f"{key:>18s}  {metrics['official'][key]:.6f}" for key in SCORE_KEYS]
    else:
        lines.append(f"{'':>18s}  {'before':>9s}  {'after':>9s}  {'in-sample':>9s}")
        lines += [
            f"{key:>18s}  {cal['before'][key]:9.6f}  {cal['after'][key]:9.6f}  "
            f"{cal['after_in_sample'][key]:9.6f}"
            for key in SCORE_KEYS
        ]
        lines.append(
            f"after: {cal['cross_fit']}; each row calibrated by temperatures fitted without it "
            f"(predictions {'with' if cal['tta_flip'] else 'without'} flip TTA)"
        )
        temps = ", ".join(f"{c}={t:.3f}" for c, t in cal["temperatures"].items())
        lines.append(f"temperatures (fitted on every row, served): {temps}")
        lines.append(f"calibration: {cal['path']}")
    out_dir = Path(metrics["out_dir"])
    lines.append(f"report: {out_dir / REPORT_FILE}")
    lines.append(f"metrics: {out_dir / METRICS_FILE}")
    return lines


# ---------------------------------------------------------------------------------------- HTML
def _fmt(value: float | None, digits: int = 4) -> str:
    return "&ndash;" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _img(png: bytes, alt: str) -> str:
    return plots.img_tag(png, alt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _label(name: str) -> str:
    return html.escape(name.replace("_", " "))


def render_html(metrics: dict[str, Any], gallery_html: str = "") -> str:
    """The whole report as one HTML string with every figure inlined (opens offline, anywhere).

    Args:
        gallery_html: the study gallery's panels (``viewer.gallery``), shown last.
    """
    cal = metrics.get("calibration")
    parts = [
        f"<h1>lsdc evaluation</h1><p>predictions <code>{html.escape(metrics['predictions'])}</code>"
        f" against <code>{html.escape(metrics['labels'])}</code>: {metrics['n_studies']} studies, "
        f"{metrics['n_rows']} scored rows (unlabelled rows are not scored, as in the official "
        f"metric). Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.</p>",
        "<h2>Official score (lower is better)</h2>",
    ]
    if cal is None:
        parts.append(
            _table(
                ["component", "weighted log loss"],
                [[_label(k), _fmt(metrics["official"][k])] for k in SCORE_KEYS],
            )
        )
    else:
        parts.append(
            _table(
                ["component", "uncalibrated", "calibrated"],
                [[_label(k), _fmt(cal["before"][k]), _fmt(cal["after"][k])] for k in SCORE_KEYS],
            )
        )
        parts.append(
            "<p>Temperature per condition, fitted on these predictions (softmax(log p / T)), "
            f"stored in <code>{html.escape(cal['path'])}</code>:</p>"
        )
        parts.append(
            _table(
                ["condition", "T"],
                [[_label(c), _fmt(t, 3)] for c, t in cal["temperatures"].items()],
            )
        )
    ll = metrics["log_loss"]
    parts += [
        "<h2>Weighted log loss by condition and level</h2>",
        _table(
            ["condition", "weighted log loss"],
            [[_label(c), _fmt(ll["condition"][c])] for c in CONDITIONS],
        ),
        _table(
            ["level", "weighted log loss"], [[_label(lv), _fmt(ll["level"][lv])] for lv in LEVELS]
        ),
        _img(plots.level_heatmap_png(ll["condition_level"]), "log loss per condition and level"),
        "<h2>One-vs-rest AUC-ROC</h2>",
        _table(
            ["condition", *SEVERITIES],
            [
                [_label(c), *(_fmt(metrics["auc"][c][k], 3) for k in PRED_COLUMNS)]
                for c in CONDITIONS
            ],
        ),
        "<h2>Confusion matrices (argmax; rows = truth)</h2>",
        _img(plots.confusion_matrices_png(metrics["confusion"]), "confusion matrices"),
        "<h2>Classification report (argmax)</h2>",
    ]
    for c in CONDITIONS:
        rep = metrics["classification_report"][c]
        if not rep:
            continue
        rows = [
            [
                html.escape(name),
                _fmt(rep[name]["precision"], 3),
                _fmt(rep[name]["recall"], 3),
                _fmt(rep[name]["f1-score"], 3),
                str(int(rep[name]["support"])),
            ]
            for name in (*SEVERITIES, "macro avg", "weighted avg")
        ]
        parts += [
            f"<h3>{_label(c)}</h3>",
            _table(["class", "precision", "recall", "F1", "support"], rows),
        ]
    parts += [
        "<h2>Reliability</h2><p>Observed frequency is weighted 1/2/4 by true class, as the official "
        "score weighs rows: a prediction on the diagonal is what the score rewards. Marker area "
        "grows with the number of rows in the bin.</p>",
        _img(plots.reliability_png(metrics["reliability"]), "reliability diagram"),
    ]
    if cal is not None:
        parts += [
            "<h3>After calibration</h3>",
            _img(plots.reliability_png(cal["reliability_after"]), "reliability after calibration"),
        ]
    parts += _viewer_sections(metrics, gallery_html)
    style = (
        "body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 1em 1em 0;display:inline-table;vertical-align:top}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block}"
    )
    if gallery_html:
        from lsdc.evaluation.viewer import PANEL_STYLE

        style += PANEL_STYLE
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lsdc evaluation</title><style>{style}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def _viewer_sections(metrics: dict[str, Any], gallery_html: str) -> list[str]:
    """Stage 1's localisation error and the study gallery (present with ``--cache``)."""
    parts = []
    loc = metrics.get("localization")
    if loc is not None:
        rows = [
            [
                html.escape(str(r["group"])),
                str(int(r["points"])),
                _fmt(r["median_mm"], 1),
                _fmt(r["p90_mm"], 1),
                _fmt(r["slice_exact"], 3),
                _fmt(r["slice_within_1"], 3),
            ]
            for r in loc["summary"]
        ]
        parts += [
            "<h2>Localisation (stage 1, out of fold)</h2><p>Distance between the point each "
            "fold's model predicts on its validation studies and the labelled point, and whether "
            "it falls on the labelled slice.</p>",
            _table(
                ["group", "points", "median mm", "p90 mm", "slice exact", "within 1 slice"], rows
            ),
            _img(plots.localization_error_png(loc["per_label"]), "localisation error per level"),
        ]
    if gallery_html:
        parts += [
            '<h2 id="gallery">Studies: largest loss first, then a few at random</h2><p>Each panel '
            "links to the study's full page (every slice with its points, the 25 rows, every "
            "crop plane). Grid cells: the true class's initial and its predicted probability, red "
            "by the row's loss.</p>",
            gallery_html,
        ]
    return parts
