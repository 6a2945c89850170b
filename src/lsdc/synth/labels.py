"""The generative label model of ``lsdc synth``: latent severities, graded labels, the oracle.

Each of a study's 25 findings has a latent severity ``s`` in (0, 1). The phantom draws ``s`` into
the image (a narrowing at that finding's level and side); the label is then drawn from an ordinal
model, ``P(y <= k | s) = sigmoid((t_k - s) / tau)``, so two readers of the same image can disagree
near a threshold. Those class probabilities are the oracle: the best any model of the image can
do. The constants below were tuned (``benchmarks/synth_labels.py`` prints the check) so that class
frequencies match the competition's table and the oracle scores about 0.4 of the class prior.
docs/synthetic.md states the model in full.
"""

from __future__ import annotations

import numpy as np

from lsdc.contract import CONDITIONS, LEVELS, N_LABELS, label_index

THRESHOLDS: dict[str, tuple[float, float]] = {
    "spinal_canal_stenosis": (0.5, 0.689),
    "neural_foraminal_narrowing": (0.5, 0.716),
    "subarticular_stenosis": (0.5, 0.73),
}
"""Latent severities t_0 < t_1 per condition family at which Normal/Mild | Moderate and
Moderate | Severe are equally likely."""

TAU: float = 0.055
"""Temperature of the ordinal model: the width (in s) of the band where readers disagree."""

LEVEL_PROFILE: np.ndarray = np.array([-1.2, -0.75, -0.2, 0.55, 0.45])
"""Offset of the latent logit per level (L1/L2..L5/S1): most degeneration at L4/L5 and L5/S1."""

CONDITION_MEAN: dict[str, float] = {
    "spinal_canal_stenosis": -1.678,
    "neural_foraminal_narrowing": -0.6,
    "subarticular_stenosis": -0.552,
}
"""Mean latent logit per condition family (before the level profile)."""

CONDITION_SPREAD: dict[str, float] = {
    "spinal_canal_stenosis": 1.422,
    "neural_foraminal_narrowing": 0.639,
    "subarticular_stenosis": 1.11,
}
"""Standard deviation of the latent logit per condition family."""

STUDY_WEIGHT, LEVEL_WEIGHT, PAIR_WEIGHT = 0.35, 0.55, 0.4
"""Shares of the latent noise: one per study (age), one per level (AR(1) along the spine, shared by
the five conditions of a level), one per left/right pair; the rest is independent per finding."""

LEVEL_CORRELATION: float = 0.5
"""AR(1) correlation of the level factor between neighbouring levels."""

UNLABELLED_STUDY_RATE: float = 0.1
"""Share of studies with some unlabelled (NaN) findings (real data: about 193 of 1,974)."""


def _family(condition: str) -> str:
    return condition.removeprefix("left_").removeprefix("right_")


_MEAN = np.array(
    [CONDITION_MEAN[_family(c)] + LEVEL_PROFILE[j] for c in CONDITIONS for j in range(5)]
)
_SPREAD = np.array([CONDITION_SPREAD[_family(c)] for c in CONDITIONS for _ in LEVELS])
_THRESHOLDS = np.array([THRESHOLDS[_family(c)] for c in CONDITIONS for _ in LEVELS])


def draw_latent_severity(rng: np.random.Generator) -> np.ndarray:
    """Draw one study's 25 latent severities in (0, 1), in LABEL_COLUMNS order.

    The latent logit of each finding is its condition/level mean plus correlated Gaussian noise:
    a study factor, a per-level factor (AR(1) along the spine), a left/right pair factor and an
    independent term, scaled to unit variance, times the condition's spread.
    """
    n_levels = len(LEVELS)
    study = rng.standard_normal()
    level = np.empty(n_levels)
    level[0] = rng.standard_normal()
    for j in range(1, n_levels):
        level[j] = (
            LEVEL_CORRELATION * level[j - 1]
            + np.sqrt(1 - LEVEL_CORRELATION**2) * rng.standard_normal()
        )
    pair = rng.standard_normal((2, n_levels))  # foraminal, subarticular
    own = rng.standard_normal((len(CONDITIONS), n_levels))
    rest = np.sqrt(1 - STUDY_WEIGHT**2 - LEVEL_WEIGHT**2)
    own_weight = np.sqrt(1 - PAIR_WEIGHT**2)
    noise = np.empty((len(CONDITIONS), n_levels))
    for i, condition in enumerate(CONDITIONS):
        if "foraminal" in condition or "subarticular" in condition:
            shared = pair[0 if "foraminal" in condition else 1]
            indep = PAIR_WEIGHT * shared + own_weight * own[i]
        else:
            indep = own[i]
        noise[i] = STUDY_WEIGHT * study + LEVEL_WEIGHT * level + rest * indep
    logit = _MEAN + _SPREAD * noise.reshape(-1)
    return 1.0 / (1.0 + np.exp(-logit))


def class_probabilities(severity: np.ndarray) -> np.ndarray:
    """The oracle: P(Normal/Mild, Moderate, Severe | s) for latent severities of shape (..., 25)
    in LABEL_COLUMNS order (each finding uses its condition's thresholds).

    Returns:
        Array of shape ``severity.shape + (3,)``, rows summing to 1.
    """
    s = np.asarray(severity, dtype=np.float64)[..., None]
    cumulative = 1.0 / (1.0 + np.exp(-(_THRESHOLDS - s) / TAU))
    upper = np.concatenate([cumulative, np.ones_like(s)], axis=-1)
    lower = np.concatenate([np.zeros_like(s), cumulative], axis=-1)
    return upper - lower


def draw_classes(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
    """Draw one class index per row of ``probabilities`` (shape (..., 3))."""
    cumulative = np.cumsum(probabilities, axis=-1)
    u = rng.random(probabilities.shape[:-1] + (1,))
    return np.minimum((u > cumulative).sum(axis=-1), 2).astype(np.int64)


def draw_unlabelled(rng: np.random.Generator, rate: float = UNLABELLED_STUDY_RATE) -> np.ndarray:
    """Which of a study's 25 findings carry no label (True = NaN in train.csv).

    With probability ``rate`` a study has gaps: usually the subarticular L1/L2 pair (the most
    frequent gap of the real data), otherwise one to three random findings.
    """
    mask = np.zeros(N_LABELS, dtype=bool)
    if rng.random() >= rate:
        return mask
    if rng.random() < 0.7:
        for side in ("left", "right"):
            if rng.random() < 0.85:
                mask[label_index(f"{side}_subarticular_stenosis", "l1_l2")] = True
        if not mask.any():
            mask[label_index("left_subarticular_stenosis", "l1_l2")] = True
    else:
        mask[rng.choice(N_LABELS, size=int(rng.integers(1, 4)), replace=False)] = True
    return mask


def misgrade(rng: np.random.Generator, rate: float, labels: np.ndarray) -> np.ndarray:
    """Labels with, at ``rate``, a labelled finding graded one step off (Normal/Mild <->
    Moderate <-> Severe; a Moderate goes either way): an outright error of a careless read, on
    top of the reader disagreement that ``TAU`` models. The oracle stays the true class
    probabilities, so these errors lower its score."""
    out = labels.copy()
    flip = rng.random(labels.shape) < rate
    up = rng.random(labels.shape) < 0.5
    for k in np.flatnonzero(flip & (labels >= 0)):
        if labels[k] == 0 or labels[k] == 2:
            out[k] = 1
        else:
            out[k] = 2 if up[k] else 0
    return out
