"""Scoring and reports: the official metric, diagnostics, calibration and report.html.

Importing this package loads no torch: ``lsdc score`` stays fast.
"""

from lsdc.evaluation.calibration import Calibration, fit_temperatures, load_calibration
from lsdc.evaluation.metric import Score, SubmissionError, official_score
from lsdc.evaluation.report import evaluate, evaluate_files

__all__ = [
    "Calibration",
    "Score",
    "SubmissionError",
    "evaluate",
    "evaluate_files",
    "fit_temperatures",
    "load_calibration",
    "official_score",
]
