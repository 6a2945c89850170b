"""The training loss, shaped like the official metric so that lowering one lowers the other.

The metric averages three groups (spinal, foraminal, subarticular) equally, each a log loss
weighted 1/2/4 by true class, plus a binary any-severe-spinal term. Plain cross-entropy over all
25 entries would weight the groups 5:10:10 instead, so the loss is computed per group too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lsdc.contract import CLASS_WEIGHTS, CONDITION_GROUP, CONDITIONS, IGNORE_INDEX, LEVELS

_GROUP_OF_LABEL = np.repeat([CONDITION_GROUP[c] for c in CONDITIONS], len(LEVELS))
GROUP_INDICES: dict[str, np.ndarray] = {
    g: np.flatnonzero(np.equal(_GROUP_OF_LABEL, g)) for g in ("spinal", "foraminal", "subarticular")
}
"""Label positions (in LABEL_COLUMNS) of each scoring group."""


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy weighted by true class (1/2/4), IGNORE_INDEX skipped, normalised by the
    summed weights exactly as the metric's weighted log loss is.

    Args:
        logits: (N, 3) class logits.
        targets: (N,) class indices or IGNORE_INDEX.

    Returns:
        A scalar; zero (with a gradient) when every target is ignored.
    """
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    weight = torch.as_tensor(CLASS_WEIGHTS, dtype=torch.float32, device=logits.device)
    return F.cross_entropy(logits.float(), targets, weight=weight, ignore_index=IGNORE_INDEX)


def any_severe_spinal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The metric's any-severe-spinal term: per study, the binary log loss of the largest
    predicted ``severe`` probability among its labelled spinal rows, weighted by the largest
    class weight among them. Studies without a labelled spinal row are skipped."""
    spinal = torch.as_tensor(GROUP_INDICES["spinal"], device=logits.device)
    probs = logits[:, spinal].float().softmax(dim=-1)[..., 2]
    target = targets[:, spinal]
    labelled = target != IGNORE_INDEX
    keep = labelled.any(dim=1)
    if not keep.any():
        return logits.sum() * 0.0
    p = probs.masked_fill(~labelled, 0.0).amax(dim=1)[keep]
    y = ((target == 2) & labelled).any(dim=1)[keep].float()
    class_weight = torch.as_tensor(CLASS_WEIGHTS, dtype=torch.float32, device=logits.device)
    w = class_weight[target.clamp(min=0)].masked_fill(~labelled, 0.0).amax(dim=1)[keep]
    eps = torch.finfo(torch.float32).eps
    bce = F.binary_cross_entropy(p.clamp(eps, 1 - eps), y, reduction="none")
    return (bce * w).sum() / w.sum()


def severity_loss(
    logits: torch.Tensor, targets: torch.Tensor, any_severe_weight: float = 0.0
) -> torch.Tensor:
    """The metric-shaped loss of (B, 25, 3) logits against (B, 25) targets.

    Mean of the three group losses and, when ``any_severe_weight`` > 0, the any-severe-spinal
    term with that weight (the metric uses 1.0).
    """
    parts = [
        weighted_cross_entropy(
            logits[:, idx].reshape(-1, logits.shape[-1]), targets[:, idx].reshape(-1)
        )
        for idx in (torch.as_tensor(i, device=logits.device) for i in GROUP_INDICES.values())
    ]
    total = torch.stack(parts).sum()
    if any_severe_weight > 0:
        total = total + any_severe_weight * any_severe_spinal_loss(logits, targets)
    return total / (len(parts) + any_severe_weight)
