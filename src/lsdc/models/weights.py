"""Initial weights from a local file: the user brings pretrained weights, nothing is downloaded.

``model.weights: PATH`` loads a state dict into the registered model right after it is built
(:func:`lsdc.tasks.base.build_registered_model`), before training starts, so it works for every
registered model. ``model.weights_module`` names the submodule the file's tensors belong to
(e.g. ``encoder.net``, level_grader's slice encoder, for a timm or MONAI ResNet checkpoint);
empty means the whole registered model (e.g. the ``best.pt`` of an earlier run, to fine-tune).

The rules, so that a wrong file fails loudly instead of training from scratch unnoticed: every
tensor whose name matches must have the model's shape (else a one-line error naming the
parameter and both shapes); at least one name must match; tensors of the model the file lacks
keep their initialisation (a new head) and tensors of the file the model lacks are skipped (a
classifier the model does not have); :class:`LoadedWeights` counts both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lsdc.errors import UserError

_NESTED_KEYS = ("model", "state_dict")
"""Entries a checkpoint may nest its state dict under (an lsdc ``best.pt``; many published files)."""


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_weights` did: tensors loaded, skipped from the file, kept from the model."""

    path: Path
    target: str
    loaded: int
    skipped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the training log."""
        line = f"model.weights: loaded {self.loaded} tensors of {self.path} into {self.target}"
        if self.skipped:
            line += f"; skipped {len(self.skipped)} the model lacks ({_examples(self.skipped)})"
        if self.kept:
            line += f"; {len(self.kept)} of the model keep their initialisation ({_examples(self.kept)})"
        return line


def _examples(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a saved ``state_dict``, or a checkpoint holding one under
    ``model`` or ``state_dict``. Read with ``weights_only=True``: a file that needs arbitrary
    unpickling is refused rather than executed.

    Raises:
        UserError: the file is missing, unreadable, or holds no tensors by name.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model.weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged, foreign or unsafe file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {first_line})"
        ) from exc
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors by name; expected a model's state_dict()")
    return tensors


def load_weights(
    model: nn.Module, path: str | Path, module: str = "", model_name: str = "model"
) -> LoadedWeights:
    """Copy the tensors of ``path`` into ``model`` (or its submodule ``module``) in place.

    Args:
        model: the freshly built registered model.
        path: the weights file (see :func:`read_state_dict`).
        module: dotted name of the submodule the file's tensors belong to; empty: ``model``.
        model_name: the registered name, for messages.

    Raises:
        UserError: no such submodule, no tensor name in common, or a shape that differs.
    """
    path = Path(path)
    target_name = f"{model_name}.{module}" if module else model_name
    try:
        target = model.get_submodule(module) if module else model
    except AttributeError as exc:
        children = sorted(name for name, _ in model.named_children())
        raise UserError(
            f"config key 'model.weights_module': {model_name!r} has no submodule {module!r} "
            f"(its children: {children})"
        ) from exc
    own = target.state_dict()
    given = read_state_dict(path)
    common = [k for k in given if k in own]
    if not common:
        raise UserError(
            f"{path}: none of its {len(given)} tensor names is in {target_name} (file: "
            f"{_examples(list(given))}; model: {_examples(list(own))}); set "
            "model.weights_module to the submodule the file belongs to"
        )
    for key in common:
        if given[key].shape != own[key].shape:
            raise UserError(
                f"{path}: parameter {key!r} has shape {tuple(given[key].shape)} in the file but "
                f"{tuple(own[key].shape)} in {target_name}"
            )
    target.load_state_dict({k: given[k] for k in common}, strict=False)
    return LoadedWeights(
        path=path,
        target=target_name,
        loaded=len(common),
        skipped=[k for k in given if k not in own],
        kept=[k for k in own if k not in given],
    )
