"""One name -> one constructor (timm's habit): a new model is one file with ``@register_model``
and one import line in ``lsdc/models/__init__.py``; nothing else branches on model names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from lsdc.errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; the name must be new."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments from the config."""
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    return _MODELS[name](**kwargs)


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def get_model_constructor(name: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``name`` (e.g. to check config keys against its signature)."""
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    return _MODELS[name]
