"""Serving a trained run as one function call: :class:`lsdc.tasks.served.ServedRun` opened,
asked once, and let go (scripts and benchmarks; ``lsdc predict`` keeps the opened runs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lsdc.tasks.served import ServedRun


def predict_run(
    run_dir: str | Path,
    cache_dir: str | Path,
    study_ids: Sequence[int],
    tta_flip: bool = False,
    device: str | torch.device | None = None,
    folds: Sequence[int] | None = None,
) -> np.ndarray:
    """Uncalibrated probabilities (n, 25, 3) of ``study_ids``, in that order: the mean over the
    run's fold models (:meth:`ServedRun.predict`, with flip TTA when ``tta_flip``; only
    ``folds`` when given).

    Raises:
        UserError: the run cannot be served, or a fold asked for has no trained model.
    """
    return ServedRun(run_dir, cache_dir, device).predict(study_ids, tta=tta_flip, folds=folds)
