"""The loop that turns a task's batches into per-study probabilities, shared by training
(validation) and inference (serving); the loader both use is :mod:`lsdc.datasets.loader`."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lsdc.config import ConfigError
from lsdc.contract import LABEL_COLUMNS, LEFT_RIGHT_PERMUTATION, PRED_COLUMNS, all_row_ids
from lsdc.distributed import DistContext, gather_objects, sum_across_ranks
from lsdc.tasks.base import TrainingTask


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for ``amp`` (``bf16``/``fp16``) on ``device``, or a null context for ``none``.

    Raises:
        ConfigError: fp16 on CPU (CPU autocast supports bf16 only).
    """
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'optim.amp': fp16 needs CUDA; use bf16 or none on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to ``device``; other values stay."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def predictions_frame(study_ids: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """(n, 25, 3) probabilities -> submission rows (row_id, normal_mild, moderate, severe)."""
    frame = pd.DataFrame(probs.reshape(-1, len(PRED_COLUMNS)), columns=list(PRED_COLUMNS))
    frame.insert(0, "row_id", all_row_ids(study_ids))
    return frame


@torch.no_grad()
def predict_loader(
    task: TrainingTask,
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    amp: str,
    tta_flip: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Run ``model`` over ``loader`` on every rank and average predictions per study.

    Returns:
        study ids (sorted), probabilities (n, 25, 3) averaged over each study's samples (and the
        flipped pass when ``tta_flip``), and the summed loss and sample count of labelled batches
        (both summed over ranks).
    """
    model.eval()
    ids, probs, masks = [], [], []
    loss_sum, count = 0.0, 0.0
    for batch in tqdm(loader, desc="predict", leave=False, disable=not progress):
        batch = to_device(batch, ctx.device)
        with autocast_context(amp, ctx.device):
            outputs = task.forward(model, batch)
        if "target" in batch:
            loss_sum += float(task.loss(outputs, batch)) * len(batch["study_id"])
            count += len(batch["study_id"])
        p, m = task.probabilities(outputs, batch)
        p, m = p.float(), m.float()
        if tta_flip:
            flipped = task.flip_batch(batch)
            with autocast_context(amp, ctx.device):
                fp, fm = task.probabilities(task.forward(model, flipped), flipped)
            perm = torch.as_tensor(LEFT_RIGHT_PERMUTATION, device=fp.device)
            fm = fm[:, perm].float()
            p = p * m[..., None] + fp.float()[:, perm] * fm[..., None]
            m = m + fm
            p = p / m.clamp(min=1)[..., None]
            m = (m > 0).float()
        ids.append(batch["study_id"].cpu().numpy())
        probs.append((p * m[..., None]).cpu().numpy())
        masks.append(m.cpu().numpy())
    local = (
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate(probs) if probs else np.zeros((0, len(LABEL_COLUMNS), 3)),
        np.concatenate(masks) if masks else np.zeros((0, len(LABEL_COLUMNS))),
    )
    gathered = gather_objects(local, ctx)
    all_ids = np.concatenate([g[0] for g in gathered]).astype(np.int64)
    all_probs = np.concatenate([g[1] for g in gathered])
    all_masks = np.concatenate([g[2] for g in gathered])
    studies, inverse = np.unique(all_ids, return_inverse=True)
    summed = np.zeros((len(studies), *all_probs.shape[1:]))
    weight = np.zeros((len(studies), all_masks.shape[1]))
    np.add.at(summed, inverse, all_probs)
    np.add.at(weight, inverse, all_masks)
    if (weight == 0).any():
        raise RuntimeError("some (study, label) entries received no prediction from the task")
    loss_sum, count = sum_across_ranks([loss_sum, count], ctx)
    return studies, summed / weight[..., None], loss_sum, count
