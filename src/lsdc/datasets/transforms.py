"""MONAI dictionary transforms for whole-study samples.

A sample is a dict: ``volumes`` (S, D, H, W) float tensor (one channel per series), ``target``
(25,) class indices, ``lr_axis`` (S,) the array axis of each series that runs along patient
left-right. Geometric and intensity changes come from MONAI; the left-right flip is ours
because it must also swap every ``left_*`` label with its ``right_*`` twin.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Rand3DElasticd,
    RandAffined,
    RandGaussianNoised,
    RandomizableTransform,
    RandShiftIntensityd,
)

from lsdc.config import AugmentConfig
from lsdc.contract import LEFT_RIGHT_PERMUTATION


def flip_left_right(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror every series along its patient left-right axis and swap left/right labels.

    Returns a new dict; ``target`` (when present) is permuted by LEFT_RIGHT_PERMUTATION so that
    the label that described the patient's left now describes the (mirrored) right.
    """
    out = dict(sample)
    volumes = torch.as_tensor(sample["volumes"])
    axes = torch.as_tensor(sample["lr_axis"]).tolist()
    out["volumes"] = torch.stack(
        [torch.flip(volumes[s], dims=(int(axes[s]),)) for s in range(volumes.shape[0])]
    )
    if "target" in sample:
        out["target"] = torch.as_tensor(sample["target"])[torch.as_tensor(LEFT_RIGHT_PERMUTATION)]
    return out


class RandFlipLeftRightd(RandomizableTransform, MapTransform):
    """With probability ``prob``, :func:`flip_left_right` the sample (one draw per sample)."""

    def __init__(self, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys=["volumes"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize(None)
        sample = dict(data)
        return flip_left_right(sample) if self._do_transform else sample


def training_transforms(augment: AugmentConfig) -> Compose:
    """The training augmentation: left-right flip with label swap, rotation/scale, elastic
    deformation, Gaussian noise and intensity shift.

    Each random transform draws once per sample and applies that draw to the whole (S, D, H, W)
    stack, so every slice of a volume moves together. Seed it per sample with
    ``set_random_state`` for reproducible (and exactly resumable) epochs. A probability of 0
    leaves its transform out.
    """
    a = augment
    rotate = math.radians(a.rotate_degrees)
    return Compose(
        [
            RandFlipLeftRightd(prob=a.flip_prob),
            RandAffined(
                keys="volumes",
                prob=a.affine_prob,
                rotate_range=(rotate, rotate, rotate),
                scale_range=(a.scale, a.scale, a.scale),
                mode="bilinear",
                padding_mode="zeros",
            ),
            Rand3DElasticd(
                keys="volumes",
                prob=a.elastic_prob,
                sigma_range=(5.0, 7.0),
                magnitude_range=(50.0, 150.0),
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandGaussianNoised(keys="volumes", prob=a.noise_prob, std=a.noise_std),
            RandShiftIntensityd(keys="volumes", offsets=a.intensity_shift, prob=a.shift_prob),
            EnsureTyped(keys="volumes", data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def seed_transform(transform: Compose, seed: int) -> None:
    """Give every random transform in ``transform`` its own generator seeded from ``seed``."""
    transform.set_random_state(seed=int(seed) % (2**32 - 1))


def sample_seed(base: int, epoch: int, index: int) -> int:
    """A seed that depends only on (base, epoch, index): the same sample gets the same draw
    whatever the worker, rank or resume point."""
    return int(np.random.SeedSequence([base, epoch, index]).generate_state(1)[0])
