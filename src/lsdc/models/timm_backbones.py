"""timm networks for both stages, with ImageNet (or any) weights from a local file.

Every timm encoder lsdc builds goes through :func:`create_timm`: ``pretrained: PATH`` (a
``.safetensors`` or ``.pth`` file the user downloaded elsewhere, e.g. a Hugging Face
``model.safetensors``) is loaded by timm's own code (``pretrained=True`` with
``pretrained_cfg_overlay=dict(file=PATH)``), so timm's per-model checkpoint filters, its
input-channel adaptation (RGB stem -> 1 or ``crop_slices`` channels) and its classifier removal
apply. Nothing is downloaded: the file must exist, else timm would fall back to the Hub.

A wrong file fails in one line naming the config key, the file and both shapes instead of timm's
multi-line ``load_state_dict`` report. The file is only an initialisation: a served or exported
run builds the network without it (:func:`lsdc.config.without_initial_weights`) and loads the
trained weights from its checkpoint.

timm (and torchvision under it) is imported here lazily, so ``import lsdc.models`` stays light.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.nn as nn

from lsdc.errors import UserError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
"""How a config names a timm model where lsdc has its own too (``backbone: timm:<name>``)."""


def timm_name(backbone: str, key: str) -> str:
    """The timm model name of ``timm:<name>``.

    Raises:
        UserError: not of that form; the message names ``key``.
    """
    if not backbone.startswith(TIMM_PREFIX) or not backbone[len(TIMM_PREFIX) :]:
        raise UserError(f"config key '{key}': {backbone!r} is not 'timm:<name>'")
    return backbone[len(TIMM_PREFIX) :]


def check_timm_name(name: str, key: str) -> None:
    """Refuse a name timm does not know, with a few similar ones (before anything is built)."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise UserError(f"config key '{key}': timm has no model {name!r} (similar: {close})")


def weights_file(pretrained: str | None, key: str) -> Path | None:
    """The local file of ``key.pretrained``, which must exist: timm given a missing file would
    fall back to downloading, and lsdc downloads nothing.

    Raises:
        UserError: the file does not exist.
    """
    if pretrained is None:
        return None
    path = Path(pretrained)
    if not path.is_file():
        raise UserError(f"config key '{key}.pretrained': {path}: file not found")
    return path


LOADING_ERRORS = (RuntimeError, KeyError, ValueError)
"""What timm's ``load_state_dict`` and its checkpoint filters raise for a file that does not fit."""


def create_timm(name: str, key: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, initialised from the local file ``pretrained``.

    Args:
        name: a timm model name (a ``.tag`` suffix allowed), from the config key ``key``.
        key: the config key that names the network, for messages (e.g. ``model.params``).
        pretrained: a local weights file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``); None:
            random initialisation.
        kwargs: timm's keywords (``in_chans``, ``num_classes``, ``features_only``, ...).

    Raises:
        UserError: timm has no such model, the file is missing, or it does not fit the model
            (another architecture, a shape that differs): one line with the key, the file and
            both shapes.
    """
    import timm

    check_timm_name(name, key)
    path = weights_file(pretrained, key)
    if path is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    except LOADING_ERRORS as exc:
        raise UserError(weights_mismatch(name, key, path, kwargs, exc)) from exc
    log.info("%s.pretrained: %s initialised from %s", key, name, path)
    return model


def weights_mismatch(
    name: str, key: str, path: Path, kwargs: dict[str, Any], exc: Exception
) -> str:
    """One line saying why ``path`` does not fit the timm model ``name`` built with ``kwargs``:
    the first tensor of both whose shape differs, else the first tensor of the model the file
    lacks, else the first line of timm's error ``exc``."""
    import timm
    from timm.models import load_state_dict

    where = f"config key '{key}.pretrained': {path}"
    try:
        given = load_state_dict(str(path))
    except Exception as read_exc:  # a damaged or foreign file: torch and safetensors raise many
        return f"{where}: not a readable weights file ({_first_line(read_exc)})"
    own = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    skip = _adapted_by_timm(name)
    for tensor, value in own.items():
        if tensor in given and tensor not in skip and given[tensor].shape != value.shape:
            return (
                f"{where}: tensor {tensor!r} has shape {tuple(given[tensor].shape)} in the file "
                f"but {tuple(value.shape)} in {name}"
            )
    missing = [t for t in own if t not in given and not t.endswith("num_batches_tracked")]
    if missing:
        shape = tuple(own[missing[0]].shape)
        file_names = ", ".join(list(given)[:3])
        return (
            f"{where}: not a {name} file: {name}'s tensor {missing[0]!r} {shape} is not in it "
            f"({len(missing)} missing; the file has {file_names}, ...)"
        )
    return f"{where}: timm could not load it into {name} ({_first_line(exc)})"


def _adapted_by_timm(name: str) -> set[str]:
    """Tensors timm adapts while loading (the first convolution's input channels)."""
    import timm

    first = timm.get_pretrained_cfg_value(name, "first_conv") or ()
    return {f"{conv}.weight" for conv in ((first,) if isinstance(first, str) else first)}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def pooled_width(net: nn.Module) -> int:
    """The width of a timm model's pooled output at ``num_classes=0`` (the pre-logits width
    where a model has a hidden head layer, e.g. ConvNeXt V2's ``head_hidden_size``)."""
    return int(getattr(net, "head_hidden_size", None) or net.num_features)
