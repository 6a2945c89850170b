"""Recipes shared by training and inference: a task = dataset + model + loss + how outputs become
25 x 3 probabilities; and the loop that runs a model over a loader."""

from lsdc.datasets.loader import make_loader
from lsdc.tasks.base import TrainingTask, build_registered_model, create_task, register_task
from lsdc.tasks.predict_loop import predict_loader, predictions_frame

__all__ = [
    "TrainingTask",
    "build_registered_model",
    "create_task",
    "make_loader",
    "predict_loader",
    "predictions_frame",
    "register_task",
]
