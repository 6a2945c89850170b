"""Where a model fails: the official score broken down by condition, level and class.

Everything here works on two DataFrames (a solution and a prediction file) and returns plain,
JSON-ready numbers, so ``report.py`` only has to lay them out. Rows are selected exactly as the
metric selects them: a solution row with no class or a zero weight (unlabelled) is not scored,
and a prediction row the solution lacks is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score

from lsdc.contract import (
    CONDITIONS,
    LEVELS,
    PRED_COLUMNS,
    SEVERITIES,
    load_submission,
    parse_row_id,
)
from lsdc.errors import UserError
from lsdc.evaluation.metric import (
    SubmissionError,
    official_score,
    validate_submission,
    weighted_log_loss,
)

RELIABILITY_BINS = 10
"""Equal-width probability bins of the reliability diagram."""


def load_predictions(path: str | Path) -> pd.DataFrame:
    """Read a prediction CSV (a submission or a run's oof.csv) and refuse what the metric refuses.

    Raises:
        UserError: file missing or unreadable, a missing column, a duplicated row_id, a malformed
            row_id, or a NaN / infinite / negative probability; the message names the file.
    """
    path = Path(path)
    df = load_submission(path)  # refuses a malformed row_id
    try:
        validate_submission(df)
    except SubmissionError as exc:
        raise UserError(f"{path}: {exc}") from exc
    df[list(PRED_COLUMNS)] = df[list(PRED_COLUMNS)].astype(np.float64)
    return df


@dataclass(frozen=True)
class ScoredRows:
    """The rows the metric scores, aligned: one entry per labelled row_id of the solution."""

    row_id: np.ndarray  # (m,) str
    study_id: np.ndarray  # (m,) int
    condition: np.ndarray  # (m,) condition key
    level: np.ndarray  # (m,) level key
    target: np.ndarray  # (m,) class index
    probs: np.ndarray  # (m, 3) renormalised predictions
    weight: np.ndarray  # (m,) sample weight

    @property
    def onehot(self) -> np.ndarray:
        return np.eye(len(PRED_COLUMNS))[self.target]


def align(solution: pd.DataFrame, predictions: pd.DataFrame) -> ScoredRows:
    """Match predictions to the scored rows of the solution by row_id.

    Raises:
        SubmissionError: the predictions lack a scored row_id (the metric would refuse them).
    """
    onehot = solution[list(PRED_COLUMNS)].to_numpy(np.float64)
    weight = solution["sample_weight"].to_numpy(np.float64)
    sol = solution[(onehot.sum(axis=1) > 0) & (weight > 0)]
    validate_submission(predictions, pd.Index(sol["row_id"]))
    pred = predictions.set_index("row_id").loc[sol["row_id"], list(PRED_COLUMNS)]
    probs = pred.to_numpy(np.float64)
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-300, None)
    parsed = [parse_row_id(r) for r in sol["row_id"]]
    return ScoredRows(
        row_id=sol["row_id"].to_numpy(str),
        study_id=np.array([p[0] for p in parsed], dtype=np.int64),
        condition=np.array([p[1] for p in parsed]),
        level=np.array([p[2] for p in parsed]),
        target=sol[list(PRED_COLUMNS)].to_numpy(np.float64).argmax(axis=1),
        probs=probs,
        weight=sol["sample_weight"].to_numpy(np.float64),
    )


def _wll(rows: ScoredRows, mask: np.ndarray) -> float | None:
    if not mask.any():
        return None
    return weighted_log_loss(rows.onehot[mask], rows.probs[mask], rows.weight[mask])


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """One-vs-rest AUC; None when the class is absent or is the only one (AUC undefined)."""
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, score))


def reliability_bins(rows: ScoredRows, n_bins: int = RELIABILITY_BINS) -> dict[str, list[dict]]:
    """Per class: predicted probability vs observed frequency in equal-width bins.

    The observed frequency is sample-weighted (1/2/4), because that is what the official score
    rewards: its optimal prediction is the weighted class frequency, not the raw one. Scikit-learn's
    ``calibration_curve`` has no sample weights, hence the few lines here.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out: dict[str, list[dict]] = {}
    for k, name in enumerate(PRED_COLUMNS):
        p = rows.probs[:, k]
        y = (rows.target == k).astype(np.float64)
        b = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
        w_sum = np.bincount(b, weights=rows.weight, minlength=n_bins)
        p_sum = np.bincount(b, weights=rows.weight * p, minlength=n_bins)
        y_sum = np.bincount(b, weights=rows.weight * y, minlength=n_bins)
        count = np.bincount(b, minlength=n_bins)
        out[name] = [
            {
                "bin_low": float(edges[i]),
                "bin_high": float(edges[i + 1]),
                "n": int(count[i]),
                "mean_predicted": float(p_sum[i] / w_sum[i]),
                "observed": float(y_sum[i] / w_sum[i]),
            }
            for i in range(n_bins)
            if count[i] > 0
        ]
    return out


def diagnose(solution: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, Any]:
    """All diagnostics of one prediction file against one solution, as JSON-ready values.

    Returns:
        ``official`` (score + four components), ``n_studies``, ``n_rows``, ``log_loss`` per
        condition, per level and per condition x level, ``auc`` per condition and class
        (None where undefined), ``confusion`` (3x3 counts of argmax per condition, rows = truth),
        ``classification_report`` per condition (scikit-learn's dict), ``reliability`` per class.

    Raises:
        SubmissionError: the predictions lack a scored row or hold invalid values.
    """
    rows = align(solution, predictions)
    score = official_score(solution, predictions).as_dict()
    pred_class = rows.probs.argmax(axis=1)
    labels = list(range(len(PRED_COLUMNS)))

    per_condition = {c: _wll(rows, rows.condition == c) for c in CONDITIONS}
    per_level = {lv: _wll(rows, rows.level == lv) for lv in LEVELS}
    grid = {
        c: {lv: _wll(rows, (rows.condition == c) & (rows.level == lv)) for lv in LEVELS}
        for c in CONDITIONS
    }
    auc: dict[str, dict[str, float | None]] = {}
    confusion: dict[str, list[list[int]]] = {}
    report: dict[str, dict] = {}
    for c in CONDITIONS:
        m = rows.condition == c
        auc[c] = {
            name: (_auc((rows.target[m] == k).astype(int), rows.probs[m, k]) if m.any() else None)
            for k, name in enumerate(PRED_COLUMNS)
        }
        confusion[c] = confusion_matrix(rows.target[m], pred_class[m], labels=labels).tolist()
        report[c] = (
            classification_report(
                rows.target[m],
                pred_class[m],
                labels=labels,
                target_names=list(SEVERITIES),
                output_dict=True,
                zero_division=0,
            )
            if m.any()
            else {}
        )
    return {
        "official": score,
        "n_studies": int(np.unique(rows.study_id).size),
        "n_rows": int(rows.target.size),
        "log_loss": {"condition": per_condition, "level": per_level, "condition_level": grid},
        "auc": auc,
        "confusion": confusion,
        "classification_report": report,
        "reliability": reliability_bins(rows),
    }
