"""One name -> one constructor (timm's habit), per role: a new model is one function with
``@register_model`` (or ``@register_model(role=...)``) and one import line in
``lsdc/models/__init__.py``; nothing else branches on model names.

A role is the job a network does in a task, and each role has its own names, so one architecture
can serve two roles under the same name (``segresnet`` is a whole-series classifier and a stage-1
localizer): ``whole_study`` (the whole_study task's model), ``localizer`` (stage 1 of two_stage:
25 heatmaps) and ``grader`` (stage 2 of two_stage: 25 crops -> 25 x 3 logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

import torch.nn as nn

from lsdc.errors import UserError

ROLES: tuple[str, ...] = ("whole_study", "localizer", "grader")

Constructor = Callable[..., nn.Module]

_MODELS: dict[str, dict[str, Constructor]] = {role: {} for role in ROLES}


@overload
def register_model(fn: Constructor) -> Constructor: ...


@overload
def register_model(*, role: str) -> Callable[[Constructor], Constructor]: ...


def register_model(
    fn: Constructor | None = None, *, role: str = "whole_study"
) -> Constructor | Callable[[Constructor], Constructor]:
    """Register ``fn`` under its own name in ``role``; the name must be new in that role.

    ``@register_model`` registers a whole-study model; ``@register_model(role="localizer")``
    one of another role.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {list(ROLES)}")

    def register(constructor: Constructor) -> Constructor:
        name = constructor.__name__
        if name in _MODELS[role]:
            raise ValueError(f"model {name!r} is registered twice as {role}")
        _MODELS[role][name] = constructor
        return constructor

    return register if fn is None else register(fn)


def model_roles(name: str) -> list[str]:
    """The roles ``name`` is registered in (empty: not registered)."""
    return [role for role in ROLES if name in _MODELS[role]]


def get_model_constructor(name: str, role: str | None = None) -> Constructor:
    """The constructor registered as ``name`` in ``role`` (e.g. to check config keys against its
    signature); ``role`` may be left out when ``name`` has only one.

    Raises:
        UserError: ``name`` is not registered in ``role``, or has several roles and none was given;
            the message lists the names of the role and the roles of the name.
    """
    roles = model_roles(name)
    if role is None:
        if len(roles) != 1:
            known = f"it is registered as {roles}" if roles else f"registered: {list_models()}"
            raise UserError(f"model {name!r}: say which role; {known}")
        role = roles[0]
    if role not in ROLES:
        raise UserError(f"unknown model role {role!r}; roles: {list(ROLES)}")
    if name not in _MODELS[role]:
        elsewhere = f"; {name!r} is a {' and a '.join(roles)} model" if roles else ""
        raise UserError(
            f"unknown {role} model {name!r}; {role} models: {list_models(role)}{elsewhere}"
        )
    return _MODELS[role][name]


def create_model(name: str, role: str | None = None, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` in ``role`` with keyword arguments from the config."""
    return get_model_constructor(name, role)(**kwargs)


def list_models(role: str | None = None) -> list[str]:
    """Names of the models of ``role`` (None: of every role, each name once), sorted."""
    if role is None:
        return sorted({name for models in _MODELS.values() for name in models})
    if role not in ROLES:
        raise UserError(f"unknown model role {role!r}; roles: {list(ROLES)}")
    return sorted(_MODELS[role])
