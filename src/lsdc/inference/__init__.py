"""Serving trained runs: submission.csv and predict_report.csv for a split. Never imports training."""

from lsdc.inference.predict import PredictResult, predict_split, prior_submission
from lsdc.inference.runs import predict_run

__all__ = ["PredictResult", "predict_run", "predict_split", "prior_submission"]
