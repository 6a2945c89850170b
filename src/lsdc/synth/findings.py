"""How each finding's latent severity changes the anatomy, as radiologists grade it.

Every function here maps one finding's latent severity ``s`` (0..1) to the geometric change it
makes at its own level and side, continuously and monotonically; the breakpoints sit at the label
model's thresholds (:data:`lsdc.synth.labels.THRESHOLDS`: ``t0`` Normal/Mild | Moderate,
``t1`` Moderate | Severe), so the picture at ``s = t0`` is what a reader calls the start of
Moderate and at ``s = t1`` the start of Severe (``anatomical_phantom.md``, "What each grade looks
like"):

- spinal canal (Lee 2011): the disc bulge and the thickened ligamentum flavum shorten the sac's AP
  depth; at ``t0`` the anterior CSF is gone (the bulge meets the roots lying at the back), at
  ``t1`` the roots are clumped with no CSF left between them.
- neural foramen (Lee 2010): the fat around the exiting root is lost front-back first (gone at
  ``t0``), then up-down (gone at ``t1``); above ``t1`` the root is flattened.
- subarticular zone (Bartynski 2003): the facet and ligament grow medially into the lateral
  recess; the descending root is contacted at ``t0`` and pushed medially, the recess obliterated
  and the root flattened at ``t1``.
"""

from __future__ import annotations

import numpy as np

from lsdc.synth.labels import THRESHOLDS

ONSET = 0.25
"""Latent severity below which a finding leaves its anatomy as drawn (normal variation only)."""


def _ramp(s: np.ndarray | float, lo: float, hi: float) -> np.ndarray:
    return np.clip((np.asarray(s, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def canal_narrowing(s: np.ndarray | float) -> np.ndarray:
    """Share of the sac's AP depth lost at the disc: 0 below ONSET, ~0.5 at t0 (anterior CSF gone
    down to the roots), ~0.72 at t1 (roots clumped), 0.85 at s = 1."""
    t0, t1 = THRESHOLDS["spinal_canal_stenosis"]
    s = np.asarray(s, dtype=np.float64)
    return 0.5 * _ramp(s, ONSET, t0) + 0.22 * _ramp(s, t0, t1) + 0.13 * _ramp(s, t1, 1.0)


def root_clumping(s: np.ndarray | float) -> np.ndarray:
    """0..1: how far the cauda equina roots at the disc have merged into one bundle (from midway
    between t0 and t1 to t1)."""
    t0, t1 = THRESHOLDS["spinal_canal_stenosis"]
    return _ramp(s, 0.5 * (t0 + t1), t1 + 0.05)


def foraminal_fat(s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(front-back fat kept, up-down fat kept, root AP flattening), each 0..1: the fat around the
    exiting root goes front-back between ONSET and t0, up-down between t0 and t1; above t1 the
    root flattens (up to 45% of its AP size)."""
    t0, t1 = THRESHOLDS["neural_foraminal_narrowing"]
    front_back = 1.0 - _ramp(s, ONSET, t0)
    up_down = 1.0 - _ramp(s, t0, t1)
    flatten = 0.45 * _ramp(s, t1, 1.0)
    return front_back, up_down, flatten


def recess_intrusion(s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(share of the lateral recess filled by facet and ligament, root flattening): the recess
    fills to the descending root's edge at t0 (contact), to the sac's wall at t1 (obliterated),
    and the root is flattened by up to 50% above t1."""
    t0, t1 = THRESHOLDS["subarticular_stenosis"]
    s = np.asarray(s, dtype=np.float64)
    fill = 0.55 * _ramp(s, ONSET, t0) + 0.45 * _ramp(s, t0, t1)
    return fill, 0.5 * _ramp(s, t1 - 0.03, 1.0)
