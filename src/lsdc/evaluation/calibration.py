"""Temperature calibration: one temperature per condition, fitted on out-of-fold predictions.

A network trained with class-weighted cross-entropy is rarely calibrated for the weighted log loss
the competition scores. One scalar per condition (``softmax(log p / T)``) fixes most of that
without any risk of reordering classes, and five numbers cannot overfit an OOF set of a few
hundred studies. The temperatures live in ``RUN/calibration.json`` beside the run they belong to,
so ``lsdc predict`` applies exactly what ``lsdc evaluate`` fitted.

The gain is measured out of sample: the temperatures are cross-fitted over the training folds
(each fold's rows calibrated by temperatures fitted on the other folds' rows), so every "after"
row was calibrated by numbers that never saw it. The temperatures served are fitted on every row.
Serving applies them to the mean over the fold models, with flip TTA when asked; out of sample
only one model per study exists (the fold that held it out), so the closest match is that model's
prediction made by the serving code, with the TTA that will be served
(:func:`served_oof_predictions`); ``RUN/oof.csv`` is that prediction without TTA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from lsdc.contract import CONDITIONS, LEVELS, PRED_COLUMNS, all_row_ids, parse_row_id
from lsdc.errors import UserError
from lsdc.evaluation.metric import EPS, weighted_log_loss
from lsdc.rundir import RunDir
from lsdc.utils import read_json, write_json_atomic

LOG_TEMPERATURE_BOUNDS: tuple[float, float] = (-3.0, 3.0)
"""Search range of log T: T in [0.05, 20] covers any sane network; beyond it something is broken."""

CROSS_FIT_GROUPS = 5
"""Study groups of the cross-fit when the predictions come from one trained fold only."""


def temperature_scale(probs: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """Return ``p ** (1 / T)`` renormalised, i.e. ``softmax(log p / T)`` over the last axis.

    Args:
        probs: (..., 3) probabilities (zeros are clipped to float64 eps before the log).
        temperature: a scalar or an array broadcastable to ``probs.shape[:-1]``.
    """
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, None))
    t = np.asarray(temperature, dtype=np.float64)[..., None]
    return softmax(logp / t, axis=-1)


@dataclass(frozen=True)
class Calibration:
    """Temperatures per condition (1.0 = unchanged) and how they were obtained."""

    temperatures: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def label_temperatures(self) -> np.ndarray:
        """(25,) temperature of every label column, in LABEL_COLUMNS order."""
        return np.repeat([self.temperatures.get(c, 1.0) for c in CONDITIONS], len(LEVELS))

    def apply_to_array(self, probs: np.ndarray) -> np.ndarray:
        """Calibrate (n_studies, 25, 3) probabilities."""
        return temperature_scale(probs, self.label_temperatures()[None, :])

    def apply_to_frame(self, predictions: pd.DataFrame) -> pd.DataFrame:
        """Calibrate a submission-like frame (row_id + PRED_COLUMNS); other columns are kept."""
        conditions = [parse_row_id(r)[1] for r in predictions["row_id"]]
        t = np.array([self.temperatures.get(c, 1.0) for c in conditions])
        out = predictions.copy()
        out[list(PRED_COLUMNS)] = temperature_scale(
            predictions[list(PRED_COLUMNS)].to_numpy(np.float64), t
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "method": "temperature",
            "temperatures": self.temperatures,
            **self.info,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration") -> Calibration:
        """Build from :meth:`to_dict`'s layout; a malformed file is the user's to fix."""
        temps = data.get("temperatures") if isinstance(data, Mapping) else None
        if not isinstance(temps, Mapping):
            raise UserError(f"{source}: no 'temperatures' mapping")
        unknown = sorted(set(temps) - set(CONDITIONS))
        if unknown:
            raise UserError(f"{source}: unknown condition(s) {unknown}; expected {CONDITIONS}")
        values = {}
        for cond, t in temps.items():
            if not isinstance(t, int | float) or not np.isfinite(t) or t <= 0:
                raise UserError(
                    f"{source}: temperature of {cond} must be a positive number, got {t!r}"
                )
            values[cond] = float(t)
        info = {k: v for k, v in data.items() if k not in ("format", "method", "temperatures")}
        return cls(values, info)


def fit_temperatures(
    conditions: Sequence[str], targets: np.ndarray, probs: np.ndarray, weights: np.ndarray
) -> dict[str, float]:
    """Fit one temperature per condition by minimising its sample-weighted log loss.

    The optimisation runs on log T (bounded, scalar), so T stays positive and the search is
    symmetric between sharpening and softening. A condition without labelled rows keeps T = 1.

    Args:
        conditions: (m,) condition key of each scored row.
        targets: (m,) true class index.
        probs: (m, 3) predicted probabilities.
        weights: (m,) sample weights (1/2/4 by true class).
    """
    conditions = np.asarray(conditions)
    onehot = np.eye(len(PRED_COLUMNS))[np.asarray(targets, dtype=np.int64)]
    temperatures: dict[str, float] = {}
    for cond in CONDITIONS:
        m = conditions == cond
        if not m.any():
            temperatures[cond] = 1.0
            continue
        y, p, w = onehot[m], np.asarray(probs)[m], np.asarray(weights)[m]
        result = minimize_scalar(
            lambda log_t, y=y, p=p, w=w: weighted_log_loss(
                y, temperature_scale(p, np.exp(log_t)), w
            ),
            bounds=LOG_TEMPERATURE_BOUNDS,
            method="bounded",
        )
        temperatures[cond] = float(np.exp(result.x))
    return temperatures


def cross_fit_groups(
    study_ids: np.ndarray, fold_of: Mapping[int, int] | None
) -> tuple[np.ndarray | None, str]:
    """Per study (of ``study_ids``, one per prediction row), the group whose temperatures must
    not see it, and how the groups were made.

    The training folds when the studies span two or more: each fold's rows come from its own
    model, so the temperatures are tested on a model they were not fitted on, as serving applies
    them to another model (the fold mean). With one trained fold (``folds.fold=k``, the demo),
    ``CROSS_FIT_GROUPS`` random groups of its studies (seeded): out of sample still, though on
    the one model. None when there are fewer than two studies (nothing can be held out).
    """
    study_ids = np.asarray(study_ids, dtype=np.int64)
    if fold_of is not None:
        folds = np.array([fold_of.get(int(s), -1) for s in study_ids])
        n = len(np.unique(folds))
        if n >= 2 and (folds >= 0).all():
            return folds, f"cross-fitted over {n} training folds"
    studies = np.unique(study_ids)
    k = min(CROSS_FIT_GROUPS, len(studies))
    if k < 2:
        return None, "not cross-fitted: fewer than two studies (the gain shown is in-sample)"
    shuffled = studies[np.random.default_rng(0).permutation(len(studies))]
    group = dict(zip(shuffled.tolist(), (np.arange(len(studies)) % k).tolist(), strict=True))
    return (
        np.array([group[int(s)] for s in study_ids]),
        f"cross-fitted over {k} random groups of studies (one trained fold)",
    )


def cross_fit(
    predictions: pd.DataFrame,
    groups: np.ndarray,
    conditions: np.ndarray,
    targets: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray,
    scored_groups: np.ndarray,
) -> tuple[pd.DataFrame, dict[int, dict[str, float]]]:
    """Out-of-sample calibrated predictions: each group's rows scaled by temperatures fitted on
    the scored rows of the other groups.

    Args:
        predictions: row_id + PRED_COLUMNS; ``groups`` (one per row) says whose they are.
        conditions, targets, probs, weights: the scored rows (as :func:`fit_temperatures`).
        scored_groups: the group of each scored row.

    Returns:
        The calibrated frame (rows in ``predictions`` order) and the temperatures of each group.
    """
    out = predictions.copy()
    fitted: dict[int, dict[str, float]] = {}
    for g in np.unique(groups):
        train = scored_groups != g
        fitted[int(g)] = fit_temperatures(
            conditions[train], targets[train], probs[train], weights[train]
        )
        held = groups == g
        out.loc[held] = Calibration(fitted[int(g)]).apply_to_frame(predictions[held])
    return out, fitted


def served_oof_predictions(
    run_dir: str | Path, cache_dir: str | Path, tta_flip: bool
) -> pd.DataFrame:
    """Out-of-fold predictions made the way serving makes them: each trained fold's served model
    (:class:`lsdc.tasks.served.ServedRun`) on its own validation studies (``RUN/folds.csv``),
    with ``tta_flip`` as ``lsdc predict`` will use it.

    Raises:
        UserError: the run has no folds.csv or no trained fold.
    """
    from lsdc.tasks.served import ServedRun

    run = RunDir(run_dir)
    if not run.folds.is_file():
        raise UserError(f"{run.folds}: not found; is {run_dir} a run folder written by lsdc train?")
    served = ServedRun(run_dir, cache_dir)
    folds = pd.read_csv(run.folds)
    frames = []
    for k in served.folds:
        ids = folds.loc[folds["fold"] == k, "study_id"].astype(np.int64).tolist()
        if not ids:
            continue
        probs = served.predict(ids, tta=tta_flip, folds=[k])
        frame = pd.DataFrame(probs.reshape(-1, len(PRED_COLUMNS)), columns=list(PRED_COLUMNS))
        frame.insert(0, "row_id", all_row_ids(ids))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def save_calibration(calibration: Calibration, run_dir: str | Path) -> Path:
    """Write ``RUN/calibration.json`` atomically."""
    return write_json_atomic(calibration.to_dict(), RunDir(run_dir).calibration)


def load_calibration(run_dir: str | Path) -> Calibration | None:
    """Read ``RUN/calibration.json``; None when the run has none (predictions stay uncalibrated)."""
    path = RunDir(run_dir).calibration
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    return Calibration.from_dict(data, source=str(path))
