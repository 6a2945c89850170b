"""Temperature calibration: one temperature per condition, fitted on out-of-fold predictions.

A network trained with class-weighted cross-entropy is rarely calibrated for the weighted log loss
the competition scores. One scalar per condition (``softmax(log p / T)``) fixes most of that
without any risk of reordering classes, and five numbers cannot overfit an OOF set of a few
hundred studies. The temperatures live in ``RUN/calibration.json`` beside the run they belong to,
so ``lsdc predict`` applies exactly what ``lsdc evaluate`` fitted.
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

from lsdc.contract import CONDITIONS, LEVELS, PRED_COLUMNS, parse_row_id
from lsdc.errors import UserError
from lsdc.evaluation.metric import EPS, weighted_log_loss
from lsdc.rundir import RunDir
from lsdc.utils import read_json, write_json_atomic

LOG_TEMPERATURE_BOUNDS: tuple[float, float] = (-3.0, 3.0)
"""Search range of log T: T in [0.05, 20] covers any sane network; beyond it something is broken."""


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
