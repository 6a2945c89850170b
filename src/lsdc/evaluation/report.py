"""``lsdc evaluate``: the official score, where it is lost, calibration, and one report.html.

Two kinds of prediction file are evaluated the same way, against the labels that fit them:

* a run's ``oof.csv`` against ``ROOT/train.csv`` (``--data ROOT``; only the studies the file
  predicts are scored, since a run may train on a subset of folds). With ``--run RUN`` the
  temperatures per condition are fitted on these out-of-fold predictions and stored in
  ``RUN/calibration.json``, and the report shows the score before and after;
* a submission against a solution file such as ``solution_test.csv`` (``--solution FILE``;
  every scored row must be predicted, exactly as ``lsdc score`` demands).

The outputs are ``report.html`` (self-contained: plots embedded as base64 PNG) and
``metrics.json`` (every number of the report) in ``--out``.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
)
from lsdc.errors import UserError
from lsdc.evaluation import plots
from lsdc.evaluation.calibration import Calibration, fit_temperatures, save_calibration
from lsdc.evaluation.diagnostics import align, diagnose, load_predictions
from lsdc.evaluation.metric import SubmissionError
from lsdc.rundir import RunDir
from lsdc.utils import write_json_atomic, write_text_atomic

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
SCORE_KEYS: tuple[str, ...] = ("score", "spinal", "foraminal", "subarticular", "any_severe_spinal")


def evaluate_files(
    predictions: str | Path | None = None,
    data_root: str | Path | None = None,
    solution: str | Path | None = None,
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
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

    Returns:
        The metrics written to metrics.json.
    """
    run = Path(run_dir) if run_dir is not None else None
    if predictions is None:
        if run is None:
            raise UserError("give --pred PRED.csv, or --run RUN to evaluate RUN/oof.csv")
        predictions = RunDir(run).oof
    pred_path = Path(predictions)
    if (data_root is None) == (solution is None):
        raise UserError("give exactly one of --data ROOT (train.csv) and --solution FILE")
    if run is not None and solution is not None:
        raise UserError(
            "--run fits the calibration, which must come from out-of-fold predictions scored "
            "against train.csv (--data ROOT), never from the test solution"
        )
    if run is not None and not run.is_dir():
        raise UserError(f"{run}: run folder not found")
    out = Path(out_dir) if out_dir is not None else None
    out = out or (run / "evaluation" if run is not None else pred_path.parent / "evaluation")
    if data_root is not None:
        labels_path = Path(data_root) / "train.csv"
        labels = labels_to_solution(load_train_labels(labels_path))
    else:
        labels_path = Path(solution)
        labels = load_solution(labels_path)
    return evaluate(
        pred_path,
        labels,
        out,
        labels_name=str(labels_path),
        restrict_to_predicted_studies=data_root is not None,
        calibration_run=run,
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
    try:
        metrics: dict[str, Any] = {
            "predictions": str(pred_path),
            "labels": labels_name,
            "out_dir": str(out_dir),
            **diagnose(solution, predictions),
        }
        if calibration_run is not None:
            metrics["calibration"] = calibrate_run(
                solution, predictions, calibration_run, str(pred_path), metrics["official"]
            )
    except SubmissionError as exc:
        raise UserError(f"{pred_path}: {exc} (labels: {labels_name})") from exc
    write_json_atomic(metrics, out_dir / METRICS_FILE)
    write_text_atomic(render_html(metrics), out_dir / REPORT_FILE)
    return metrics


def calibrate_run(
    solution: pd.DataFrame,
    predictions: pd.DataFrame,
    run_dir: str | Path,
    fitted_on: str,
    before: dict[str, float],
) -> dict[str, Any]:
    """Fit temperatures on out-of-fold predictions, store them in RUN/calibration.json, and
    return the report's calibration section (the score before and after, reliability after)."""
    rows = align(solution, predictions)
    temperatures = fit_temperatures(rows.condition, rows.target, rows.probs, rows.weight)
    after = diagnose(solution, Calibration(temperatures).apply_to_frame(predictions))
    info = {
        "fitted_on": fitted_on,
        "n_rows": int(rows.target.size),
        "score_before": before["score"],
        "score_after": after["official"]["score"],
    }
    path = save_calibration(Calibration(temperatures, info), run_dir)
    return {
        "path": str(path),
        "temperatures": temperatures,
        "before": before,
        "after": after["official"],
        "reliability_after": after["reliability"],
    }


def print_summary(metrics: dict[str, Any]) -> None:
    """The score and its components on stdout, then where the report is."""
    print(
        f"{metrics['predictions']}: {metrics['n_studies']} studies, {metrics['n_rows']} scored rows"
    )
    cal = metrics.get("calibration")
    if cal is None:
        for key in SCORE_KEYS:
            print(f"{key:>18s}  {metrics['official'][key]:.6f}")
    else:
        print(f"{'':>18s}  {'before':>9s}  {'after':>9s}")
        for key in SCORE_KEYS:
            print(f"{key:>18s}  {cal['before'][key]:9.6f}  {cal['after'][key]:9.6f}")
        temps = ", ".join(f"{c}={t:.3f}" for c, t in cal["temperatures"].items())
        print(f"temperatures: {temps}")
        print(f"calibration: {cal['path']}")
    out_dir = Path(metrics["out_dir"])
    print(f"report: {out_dir / REPORT_FILE}")
    print(f"metrics: {out_dir / METRICS_FILE}")


# ---------------------------------------------------------------------------------------- HTML
def _fmt(value: float | None, digits: int = 4) -> str:
    return "&ndash;" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _label(name: str) -> str:
    return html.escape(name.replace("_", " "))


def render_html(metrics: dict[str, Any]) -> str:
    """The whole report as one HTML string with every figure inlined (opens offline, anywhere)."""
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
    style = (
        "body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 1em 1em 0;display:inline-table;vertical-align:top}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lsdc evaluation</title><style>{style}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
