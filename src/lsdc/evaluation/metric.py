"""The competition's official score, exactly as the data contract states it.

Mean (weights 1, 1, 1, ``any_severe_scalar``) of four sample-weighted log losses: ``spinal``,
``foraminal`` and ``subarticular`` 3-class rows weighted 1/2/4 by true class, and
``any_severe_spinal`` (one binary row per study). Predictions are clipped to
[eps, 1 - eps] with float64 machine epsilon and each 3-class row is renormalised before the log.
Rows that the solution does not hold (unlabelled entries) are not scored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from lsdc.contract import CONDITION_GROUP, PRED_COLUMNS, parse_row_id
from lsdc.errors import UserError

EPS = float(np.finfo(np.float64).eps)
GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")


class SubmissionError(UserError):
    """A submission the metric refuses: missing or duplicated row_id, NaN, negative or infinite value."""


@dataclass(frozen=True)
class Score:
    """The official score and its four components (lower is better)."""

    score: float
    spinal: float
    foraminal: float
    subarticular: float
    any_severe_spinal: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def weighted_log_loss(onehot: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    """Sample-weighted multi-class log loss after clipping and row renormalisation.

    Args:
        onehot: (n, k) true classes, one-hot.
        probs: (n, k) predicted probabilities (any positive scale; rows are renormalised).
        weights: (n,) sample weights.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    p = p / p.sum(axis=1, keepdims=True)
    per_row = -(np.asarray(onehot, dtype=np.float64) * np.log(p)).sum(axis=1)
    w = np.asarray(weights, dtype=np.float64)
    return float((per_row * w).sum() / w.sum())


def binary_log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    """Sample-weighted binary log loss with probabilities clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    per_row = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((per_row * w).sum() / w.sum())


def validate_submission(submission: pd.DataFrame, required_row_ids: pd.Index | None = None) -> None:
    """Refuse a submission the competition would refuse.

    Raises:
        SubmissionError: missing column, duplicated row_id, NaN / infinite / negative probability,
            or (when ``required_row_ids`` is given) a row_id it lacks.
    """
    missing_cols = [c for c in ("row_id", *PRED_COLUMNS) if c not in submission.columns]
    if missing_cols:
        raise SubmissionError(f"submission lacks column(s) {missing_cols}")
    dup = submission["row_id"].duplicated()
    if dup.any():
        examples = submission.loc[dup, "row_id"].head(3).tolist()
        raise SubmissionError(
            f"submission has {int(dup.sum())} duplicated row_id(s), e.g. {examples}"
        )
    values = (
        submission[list(PRED_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    )
    for problem, bad in (
        ("NaN or non-numeric", np.isnan(values)),
        ("infinite", np.isinf(values)),
        ("negative", values < 0),
    ):
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise SubmissionError(
                f"submission has a {problem} probability at row_id {submission['row_id'].iloc[row]!r}"
            )
    if required_row_ids is not None:
        absent = required_row_ids.difference(pd.Index(submission["row_id"]))
        if len(absent):
            raise SubmissionError(
                f"submission lacks {len(absent)} row_id(s) of the solution, e.g. {list(absent[:3])}"
            )


def official_score(
    solution: pd.DataFrame, submission: pd.DataFrame, any_severe_scalar: float = 1.0
) -> Score:
    """Score a submission against a solution, rows matched by row_id whatever their order.

    Args:
        solution: row_id, normal_mild, moderate, severe (one-hot), sample_weight. Rows with a zero
            sample weight or no class are treated as unlabelled and dropped.
        submission: row_id, normal_mild, moderate, severe. Rows the solution lacks are ignored.
        any_severe_scalar: weight of the any_severe_spinal component in the final mean.

    Returns:
        The score and its four components.

    Raises:
        SubmissionError: the submission is invalid or lacks a scored row_id.
    """
    sol = solution.copy()
    onehot = sol[list(PRED_COLUMNS)].to_numpy(np.float64)
    sol = sol[(onehot.sum(axis=1) > 0) & (sol["sample_weight"].to_numpy(np.float64) > 0)]
    sol = sol.set_index("row_id")
    validate_submission(submission, sol.index)
    sub = submission.set_index("row_id").loc[sol.index, list(PRED_COLUMNS)].astype(np.float64)

    parsed = [parse_row_id(r) for r in sol.index]
    study = np.array([p[0] for p in parsed])
    group = np.array([CONDITION_GROUP[p[1]] for p in parsed])
    y = sol[list(PRED_COLUMNS)].to_numpy(np.float64)
    w = sol["sample_weight"].to_numpy(np.float64)
    p = sub.to_numpy()

    losses = {}
    for g in GROUPS:
        m = group == g
        losses[g] = weighted_log_loss(y[m], p[m], w[m]) if m.any() else float("nan")

    spinal = group == "spinal"
    frame = pd.DataFrame(
        {"study": study[spinal], "y": y[spinal, 2], "w": w[spinal], "p": p[spinal, 2]}
    )
    per_study = frame.groupby("study").agg(y=("y", "max"), w=("w", "max"), p=("p", "max"))
    losses["any_severe_spinal"] = (
        binary_log_loss(per_study["y"], per_study["p"], per_study["w"])
        if len(per_study)
        else float("nan")
    )

    parts = np.array([losses[g] for g in GROUPS] + [losses["any_severe_spinal"]])
    weights = np.array([1.0, 1.0, 1.0, any_severe_scalar])
    present = ~np.isnan(parts)
    total = float((parts[present] * weights[present]).sum() / weights[present].sum())
    return Score(score=total, **losses)
