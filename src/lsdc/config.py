"""Training configuration: YAML files with a ``base:`` chain and dotted ``key=value`` overrides,
loaded once into typed dataclasses and handed down as plain values.

A key that no dataclass declares is a typo, and a typo silently ignored wastes a training run,
so every unknown key raises :class:`ConfigError` naming the key and the file it came from.
``model.params`` is the one free-form mapping: it is passed to the model constructor, which
checks it against its own signature (see :func:`lsdc.tasks.base.build_registered_model`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lsdc.errors import UserError
from lsdc.utils import write_text_atomic

SHIPPED_CONFIG_DIR = Path(str(importlib.resources.files("lsdc") / "configs"))
"""The configs shipped inside the package (``lsdc/configs/*.yaml``), found the same way from a
source checkout, an editable install or an installed wheel."""


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the key and the file."""


RESUMABLE_KEYS: frozenset[str] = frozenset(
    {
        "optim.epochs",
        "optim.patience",
        "optim.val_every",
        "data.num_workers",
        "data.cache_in_memory",
        "data.threads",
    }
)
"""Keys a run may change on ``--resume`` or for a new fold: how long to train, and how the data
are loaded (loader processes, RAM cache). Any other difference from the run's stored config is
refused."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's floats: ``1e-4`` and ``3e-4`` (no dot) are numbers,
    not the strings YAML 1.1 makes of them."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    """How a study becomes tensors."""

    volume_size: tuple[int, int, int] = (16, 64, 64)
    """(slices, rows, cols) every series is resampled to."""
    batch_size: int = 4
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    cache_in_memory: bool = True
    """Keep resampled volumes in RAM after the first read, so later epochs skip the disk."""
    threads: int = 0
    """Torch threads of the training process; 0: the CPUs it may use less ``num_workers``
    (:func:`lsdc.distributed.choose_threads`)."""


@dataclass
class AugmentConfig:
    """Random augmentation of training studies (validation and inference are never augmented)."""

    flip_prob: float = 0.5
    """Probability of a left-right mirror of every series with the left/right labels swapped."""
    affine_prob: float = 0.5
    rotate_degrees: float = 10.0
    scale: float = 0.1
    """Largest relative zoom in or out of the affine transform."""
    elastic_prob: float = 0.0
    noise_prob: float = 0.3
    noise_std: float = 0.05
    shift_prob: float = 0.3
    intensity_shift: float = 0.1


@dataclass
class ModelConfig:
    """The network: a registered model name and its constructor's keyword arguments."""

    name: str = "resnet3d"
    params: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    """A local file of initial weights loaded when the model is built for training (see
    :mod:`lsdc.models.weights`); null trains from random initialisation. Nothing is downloaded."""
    weights_module: str = ""
    """The submodule of the model the weights file belongs to (e.g. ``encoder.net``); empty:
    the whole model."""


@dataclass
class OptimConfig:
    """Optimiser, schedule, precision and stopping."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-2
    scheduler: str = "cosine"
    """``cosine``: linear warmup then cosine decay, stepped per optimiser step;
    ``exponential``: multiplied by ``gamma`` once per epoch."""
    warmup_epochs: float = 1.0
    gamma: float = 0.9
    grad_clip: float = 1.0
    """Largest gradient norm; 0 turns clipping off."""
    amp: str = "none"
    """``none``, ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA only, with a GradScaler)."""
    ema_decay: float = 0.0
    """Decay of the exponential moving average of weights; 0 turns EMA off. With EMA on, the
    averaged weights are validated, checkpointed as best and served."""
    patience: int = 0
    """Stop a fold after this many epochs without a better validation score; 0 never stops early."""
    val_every: int = 1
    """Validate every this many epochs, and always after the last: a validation pass over the
    fold costs a fifth of a demo epoch on a CPU, and a cosine schedule with EMA ends at its best.
    Epochs not validated cannot become the best one; ``patience`` counts validated epochs."""


@dataclass
class LossConfig:
    """The training loss (see :mod:`lsdc.tasks.losses`)."""

    any_severe_weight: float = 0.0
    """Weight of the metric's any-severe-spinal binary term; 0 leaves it out."""


@dataclass
class FoldConfig:
    """Cross-validation split."""

    n_folds: int = 5
    fold: int | None = None
    """Train only this fold; null trains every fold."""


@dataclass
class TrainConfig:
    """The whole training configuration (what ``RUN/config.yaml`` holds)."""

    task: str = "whole_study"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    task_params: dict[str, Any] = field(default_factory=dict)
    """Settings only one task reads (e.g. ``two_stage``'s localizer and crop sizes); free-form
    here, checked key by key by that task."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the shape of a YAML config file."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


RENAMED_CONFIGS: dict[str, str] = {"demo": "whole_baseline"}
"""Shipped configs renamed -> their new names: ``demo`` was the whole-series baseline, not the
config ``lsdc demo`` trains (``two_stage_demo``)."""


def resolve_config_path(name: str | Path) -> Path:
    """Find a config file: the path as given, else the shipped ``NAME`` or ``NAME.yaml``, so
    ``--config tiny`` works from any working directory and from an installed wheel.

    Raises:
        ConfigError: no such file, or a shipped config's old name (naming the new one).
    """
    path = Path(name)
    if path.is_file():
        return path
    old = path.name.removesuffix(".yaml") if path.parent == Path(".") else ""
    if old in RENAMED_CONFIGS:
        raise ConfigError(
            f"config {name!r} is now called {RENAMED_CONFIGS[old]!r} (the whole-series "
            f"baseline); use `config={RENAMED_CONFIGS[old]}`"
        )
    for candidate in (SHIPPED_CONFIG_DIR / path, SHIPPED_CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}: config file not found (also looked in {SHIPPED_CONFIG_DIR})")


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (``--config NAME``)."""
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config file must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def _merge(
    base: dict[str, Any],
    top: dict[str, Any],
    origin: dict[str, Path],
    source: Path,
    prefix: str = "",
) -> dict[str, Any]:
    """Deep-merge ``top`` over ``base``, remembering in ``origin`` which file set each key.

    A network's ``params`` belong to its ``name``: where ``top`` names another network (``model``,
    ``task_params.localizer``), the ``params`` of the one it replaces are dropped, not merged,
    so ``model.name=vit`` over a config built for another model gets vit at its defaults.
    """
    out = dict(base)
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            below = out[key]
            if "name" in value and "params" in below and value["name"] != below.get("name"):
                below = {k: v for k, v in below.items() if k != "params"}
            out[key] = _merge(below, value, origin, source, f"{dotted}.")
        else:
            out[key] = value
            origin[dotted] = source
    return out


def _load_chain(path: Path, origin: dict[str, Path], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular base: chain {[str(p) for p in seen]}")
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base_name is not None:
        base_path = path.parent / str(base_name)
        if not base_path.is_file():
            base_path = resolve_config_path(str(base_name))
        merged = _load_chain(base_path, origin, (*seen, path))
    return _merge(merged, data, origin, path)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.001)")
    key, raw = item.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _convert(value: Any, hint: Any, key: str, origin: dict[str, Path | str]) -> Any:
    """Check and convert one YAML value to the dataclass field type ``hint``."""
    where = origin.get(key, "defaults")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r} must be a mapping, got {value!r}")
        return _build(hint, value, origin, f"{key}.")
    args = typing.get_args(hint)
    origin_type = typing.get_origin(hint)
    if origin_type in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, origin)
    if origin_type is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: key {key!r} must be a list of {len(args)}, got {value!r}")
        return tuple(_convert(v, a, key, origin) for v, a in zip(value, args, strict=True))
    if origin_type is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key {key!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key {key!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key {key!r} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], origin: dict[str, Path | str], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            where = origin.get(dotted, "override")
            raise ConfigError(
                f"{where}: unknown config key {dotted!r}; known keys here: {sorted(names)}"
            )
        kwargs[key] = _convert(value, hints[key], dotted, origin)
    return cls(**kwargs)


def build_section(cls: type, data: dict[str, Any], section: str) -> Any:
    """Check a free-form config section (e.g. a task's ``task_params``) against the dataclass
    ``cls`` with the same rules as every other key: an unknown key or a value of the wrong type
    raises :class:`ConfigError` naming ``section.key``."""
    origin: dict[str, Path | str] = {f"{section}.{key}": "config" for key in data}
    return _build(cls, data, origin, f"{section}.")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a config file (following its ``base:`` chain) and apply ``key=value`` overrides.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or a value of the wrong type; the
            message names the key and the file (or ``override``) it came from.
    """
    origin: dict[str, Path] = {}
    data = _load_chain(resolve_config_path(path), origin)
    override_source = Path("command-line override")
    for item in overrides:
        key, value = _parse_override(item)
        data = _merge(data, _nest(key, value), origin, override_source)
    config = _build(TrainConfig, data, origin)
    validate_config(config)
    return config


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from :meth:`TrainConfig.to_dict` output (a checkpoint, RUN/config.yaml)."""
    return _build(TrainConfig, data, {})


def without_initial_weights(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` that builds the network without any file of initial weights
    (``model.weights``, ``pretrained`` of the grader's and the localizer's params), for serving a
    checkpoint: the served or exported run then never needs those files or their paths."""
    data = config.to_dict()
    data["model"]["weights"], data["model"]["weights_module"] = None, ""
    data["model"]["params"].pop("pretrained", None)
    localizer = data["task_params"].get("localizer")
    if isinstance(localizer, dict) and isinstance(localizer.get("params"), dict):
        localizer["params"].pop("pretrained", None)
    return config_from_dict(data)


def validate_config(config: TrainConfig) -> None:
    """Refuse values that are the right type but cannot work."""
    checks = [
        (
            config.optim.scheduler in ("cosine", "exponential"),
            "optim.scheduler",
            "must be cosine or exponential",
        ),
        (config.optim.amp in ("none", "bf16", "fp16"), "optim.amp", "must be none, bf16 or fp16"),
        (0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)"),
        (config.optim.epochs >= 1, "optim.epochs", "must be at least 1"),
        (config.optim.val_every >= 1, "optim.val_every", "must be at least 1"),
        (config.folds.n_folds >= 2, "folds.n_folds", "must be at least 2"),
        (
            config.folds.fold is None or 0 <= config.folds.fold < config.folds.n_folds,
            "folds.fold",
            f"must be null or in [0, {config.folds.n_folds})",
        ),
        (config.data.batch_size >= 1, "data.batch_size", "must be at least 1"),
        (config.data.threads >= 0, "data.threads", "must be 0 (automatic) or more"),
        (all(s >= 1 for s in config.data.volume_size), "data.volume_size", "must be positive"),
        (
            config.model.weights is not None or not config.model.weights_module,
            "model.weights_module",
            "needs model.weights (the file whose tensors it places)",
        ),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"config key {key!r} {problem}")


def config_differences(
    old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """The dotted keys whose values differ between two configs (:meth:`TrainConfig.to_dict`
    dicts), sorted, leaving out ``ignore``: e.g. ``['model.params.hidden', 'optim.lr']``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = config_differences(a, b)
            out.extend(f"{key}.{k}" for k in inner if f"{key}.{k}" not in ignore)
        elif a != b and key not in ignore:
            out.append(key)
    return out


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """A stored config (``RUN/config.yaml``) as the plain dict :meth:`TrainConfig.to_dict` gives.

    Raises:
        ConfigError: the file is unreadable or not a config.
    """
    path = Path(path)
    try:
        return config_from_dict(_read_yaml(path)).to_dict()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the run's config ({exc.strerror})") from exc


def write_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically), loadable again by :func:`load_config`."""
    return write_text_atomic(yaml.safe_dump(config.to_dict(), sort_keys=False), path)
