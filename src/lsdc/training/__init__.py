"""Training: one engine (folds, AMP, EMA, exact resume, DDP) driving any registered task."""

from lsdc.training.engine import FoldResult, train_run
from lsdc.training.train import train

__all__ = ["FoldResult", "train", "train_run"]
