"""Training tasks: what the one engine trains, behind one interface (docs/ARCHITECTURE.md,
"Training tasks").

A task owns everything that depends on the kind of sample (datasets, model, loss, how outputs
become (B, 25, 3) probabilities); the engine owns everything else and never branches on names.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from lsdc.config import ConfigError, TrainConfig
from lsdc.contract import N_LABELS, load_train_labels
from lsdc.errors import UserError
from lsdc.preprocessing.cache import read_cache_index

log = logging.getLogger(__name__)

_TASKS: dict[str, type[TrainingTask]] = {}

_BUILTIN_TASK_MODULES: tuple[str, ...] = (
    "lsdc.tasks.whole_study",
    "lsdc.tasks.two_stage",
)
"""Modules whose import registers a task; a new task adds its module here."""


class TrainingTask(abc.ABC):
    """One kind of training sample and model, driven by :mod:`lsdc.training.engine`.

    Args:
        config: the resolved training config.
        cache_dir: the preprocessed cache of the split.
        data_root: the competition root (CSVs); None at inference, where no labels exist.
    """

    name: ClassVar[str]

    def __init__(self, config: TrainConfig, cache_dir: Path, data_root: Path | None) -> None:
        self.config = config
        self.cache_dir = Path(cache_dir)
        self.data_root = None if data_root is None else Path(data_root)

    def study_labels(self) -> pd.DataFrame:
        """Wide train.csv rows of the studies this task can train on: those in the cache."""
        if self.data_root is None:
            raise UserError("training needs the competition root (`data_root`) for train.csv")
        labels = load_train_labels(self.data_root / "train.csv")
        cached = set(read_cache_index(self.cache_dir)["study_id"].astype(np.int64))
        labels = labels[labels["study_id"].isin(cached)].reset_index(drop=True)
        if labels.empty:
            raise UserError(
                f"{self.cache_dir}: no study of {self.data_root / 'train.csv'} is in this cache"
            )
        return labels

    @abc.abstractmethod
    def fit_state(self, train_study_ids: np.ndarray) -> dict[str, Any]:
        """Statistics of the training fold only (JSON-able), stored in every checkpoint."""

    @abc.abstractmethod
    def build_dataset(self, study_ids: np.ndarray, state: dict[str, Any], train: bool) -> Dataset:
        """Items are dicts of tensors with a ``study_id``; ``train`` turns on labels + augmentation."""

    @abc.abstractmethod
    def build_model(self, state: dict[str, Any]) -> nn.Module:
        """The network, built from the registry with sizes from the config."""

    @abc.abstractmethod
    def forward(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """Run ``model`` on a batch already on the device."""

    @abc.abstractmethod
    def loss(self, outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Scalar training loss."""

    @abc.abstractmethod
    def probabilities(
        self, outputs: Any, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 25, 3) probabilities and the (B, 25) bool mask of entries each sample predicts."""

    @abc.abstractmethod
    def flip_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch mirrored left-right (inputs only; the engine permutes the predictions)."""

    def locate(self, model: nn.Module, batch: dict[str, Any]) -> np.ndarray | None:
        """(B, 25, 3) patient points the model locates in a batch, for the viewer and the
        localisation OOF (:class:`lsdc.tasks.served.ServedRun`). Default: None, the task
        locates nothing."""
        return None

    def crops_around(
        self, study_id: int, points: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The crops the model would read around ``points`` (25, 3) of a study, with the (25,)
        bool of crops holding image data, for the viewer. Default: None, the task reads none."""
        return None

    @classmethod
    def prior_rows(cls, descriptions: Collection[str]) -> np.ndarray:
        """(25,) bool: the label columns this task answers with the class prior for a study
        whose series are ``descriptions`` (``lsdc predict`` reports them). Default: none, the
        model answers every row."""
        return np.zeros(N_LABELS, dtype=bool)


def register_task(cls: type[TrainingTask]) -> type[TrainingTask]:
    """Class decorator: make ``cls`` the task of config ``task: cls.name``."""
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls
    return cls


def _import_builtin_tasks() -> None:
    for module in _BUILTIN_TASK_MODULES:
        importlib.import_module(module)


def task_class(name: str) -> type[TrainingTask]:
    """The task class of config ``task: name``.

    Raises:
        ConfigError: no task has that name.
    """
    _import_builtin_tasks()
    if name not in _TASKS:
        raise ConfigError(f"config key 'task': unknown task {name!r}; known: {sorted(_TASKS)}")
    return _TASKS[name]


def create_task(config: TrainConfig, cache_dir: Path, data_root: Path | None) -> TrainingTask:
    """The task named by ``config.task``.

    Raises:
        ConfigError: no task has that name.
    """
    return task_class(config.task)(config, cache_dir, data_root)


def check_network(role: str, name: str, params: dict[str, Any], section: str, **fixed: Any) -> None:
    """Refuse a ``name`` that is not a ``role`` model and a parameter its constructor does not
    take (a typo in ``params`` would otherwise be a TypeError deep in the model code, or worse,
    silently ignored), without building anything.

    Args:
        role: the registry role (``whole_study``, ``localizer``, ``grader``).
        name: the registered name, from the config key ``section.name``.
        params: its keyword arguments, from ``section.params``.
        section: where name and params come from, for the error messages (e.g. ``model``).
        fixed: arguments the task derives from the data (e.g. ``img_size``, ``n_meta``).

    Raises:
        ConfigError: naming the config key.
    """
    import lsdc.models  # noqa: F401  (registers every model)
    from lsdc.models.registry import get_model_constructor

    try:
        constructor = get_model_constructor(name, role)
    except UserError as exc:
        raise ConfigError(f"config key '{section}.name': {exc}") from exc
    accepted = inspect.signature(constructor).parameters
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"config key '{section}.params.{key}': {role} model {name!r} takes no parameter "
                f"{key!r}; it takes {sorted(k for k in accepted if k not in fixed)}"
            )
        if key in fixed:
            raise ConfigError(
                f"config key '{section}.params.{key}' is set by the data ({key}={fixed[key]!r}); "
                "remove it"
            )


def build_network(
    role: str, name: str, params: dict[str, Any], section: str, **fixed: Any
) -> nn.Module:
    """``create_model(name, role, **fixed, **params)`` once :func:`check_network` passed."""
    from lsdc.models.registry import create_model

    check_network(role, name, params, section, **fixed)
    return create_model(name, role, **fixed, **params)


def build_registered_model(
    config: TrainConfig, role: str = "whole_study", **fixed: Any
) -> nn.Module:
    """The config's ``model`` (a ``role`` model) built by :func:`build_network`; then
    ``model.weights``, when set, is loaded into it (:mod:`lsdc.models.weights`).

    Args:
        config: supplies the model name and its free-form ``params``.
        role: the registry role the task's ``model`` plays.
        fixed: arguments the task derives from the data (e.g. ``img_size``, ``n_meta``).
    """
    name = config.model.name
    model = build_network(role, name, config.model.params, "model", **fixed)
    if config.model.weights is not None:
        from lsdc.models.weights import load_weights

        loaded = load_weights(model, config.model.weights, config.model.weights_module, name)
        log.info(loaded.summary())
    return model
