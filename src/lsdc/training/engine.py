"""The one training engine: folds, AdamW, schedules, AMP, clipping, EMA, checkpoints with exact
resume, DDP, early stopping on the official score, out-of-fold predictions and metrics.

It drives a :class:`~lsdc.tasks.base.TrainingTask` and never branches on a model or task
name, so every model family trains, resumes and is scored the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from lsdc.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from lsdc.config import TrainConfig, write_config
from lsdc.contract import (
    LABEL_COLUMNS,
    PRED_COLUMNS,
    labels_to_indices,
    labels_to_solution,
    write_csv_atomic,
)
from lsdc.distributed import (
    DistContext,
    barrier,
    sum_across_ranks,
)
from lsdc.errors import UserError
from lsdc.evaluation.metric import official_score
from lsdc.rundir import RunDir
from lsdc.tasks.base import TrainingTask
from lsdc.tasks.predict_loop import (
    autocast_context,
    make_loader,
    predict_loader,
    predictions_frame,
    to_device,
)
from lsdc.training.folds import make_folds
from lsdc.utils import write_json_atomic

METRIC_COLUMNS = ("fold", "epoch", "train_loss", "val_loss", "val_score", "lr", "seconds")


@dataclass
class FoldResult:
    """What one trained fold leaves behind."""

    fold: int
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]


# ------------------------------------------------------------------------------- small helpers
def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The configured schedule and whether it steps per optimiser step (True) or per epoch.

    Exponential decay is a per-epoch schedule (stepping it per batch makes the learning rate
    vanish within an epoch or two); cosine with linear warmup steps per optimiser step.
    """
    o = config.optim
    if o.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=o.gamma), False
    total = max(1, o.epochs * steps_per_epoch)
    warmup = min(total - 1, round(o.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def class_prior(labels: pd.DataFrame) -> pd.DataFrame:
    """Class frequencies per label column (the fallback prediction), add-one smoothed so that
    no class gets probability zero."""
    idx = labels_to_indices(labels)
    counts = np.stack([(idx == k).sum(axis=0) for k in range(len(PRED_COLUMNS))], axis=1) + 1.0
    prior = counts / counts.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(prior, columns=list(PRED_COLUMNS))
    frame.insert(0, "label_column", list(LABEL_COLUMNS))
    return frame


# ------------------------------------------------------------------------------------- the run
def train_fold(
    task: TrainingTask,
    config: TrainConfig,
    labels: pd.DataFrame,
    folds: pd.DataFrame,
    fold: int,
    run_dir: Path,
    ctx: DistContext,
    resume: bool,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> FoldResult:
    """Train one fold; checkpoint every epoch; keep the best epoch by the official score.

    Args:
        stop_after_epoch: end the call after this (0-based) epoch, as a kill would (for tests of
            exact resume); the fold is not marked finished.
    """
    fold_dir = RunDir(run_dir).fold(fold)
    last_path = fold_dir.last
    train_ids = folds.loc[folds["fold"] != fold, "study_id"].to_numpy()
    val_ids = folds.loc[folds["fold"] == fold, "study_id"].to_numpy()
    val_labels = labels[labels["study_id"].isin(val_ids)]
    solution = labels_to_solution(val_labels)

    state = task.fit_state(train_ids)
    train_ds = task.build_dataset(train_ids, state, train=True)
    val_ds = task.build_dataset(val_ids, state, train=False)

    torch.manual_seed(config.seed * 1000 + fold)
    model = task.build_model(state).to(ctx.device)
    ema = (
        AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=True
        )
        if config.optim.ema_decay > 0
        else None
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    steps_per_epoch = len(make_loader(train_ds, config, ctx, True, 0, fold))
    scheduler, per_step = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(
        ctx.device.type, enabled=config.optim.amp == "fp16" and ctx.device.type == "cuda"
    )

    start_epoch, best_score, best_epoch, since_best = 0, math.inf, -1, 0
    history: list[dict[str, float]] = []
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path, map_location=ctx.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        set_rng_states(ckpt["rng"])
        start_epoch = ckpt["epoch"] + 1
        best_score, best_epoch, since_best = (
            ckpt["best_score"],
            ckpt["best_epoch"],
            ckpt["since_best"],
        )
        history = ckpt["history"]
        if ckpt["finished"]:
            return FoldResult(fold, best_epoch, best_score, history)
    elif last_path.is_file():
        raise UserError(
            f"{last_path} exists: pass --resume to continue this run, or pick a new --out"
        )

    net: nn.Module = (
        DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
        if ctx.distributed
        else model
    )
    show = progress and ctx.is_primary
    for epoch in range(start_epoch, config.optim.epochs):
        started = time.perf_counter()
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        net.train()
        loss_sum, count = 0.0, 0.0
        loader = make_loader(train_ds, config, ctx, True, epoch, fold)
        bar = tqdm(loader, desc=f"fold {fold} epoch {epoch}", leave=False, disable=not show)
        for batch in bar:
            batch = to_device(batch, ctx.device)
            with autocast_context(config.optim.amp, ctx.device):
                outputs = task.forward(net, batch)
                loss = task.loss(outputs, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            if per_step:
                scheduler.step()
            loss_sum += float(loss.detach()) * len(batch["study_id"])
            count += len(batch["study_id"])
            bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}")
        lr = optimizer.param_groups[0]["lr"]
        if not per_step:
            scheduler.step()
        loss_sum, count = sum_across_ranks([loss_sum, count], ctx)

        served = ema.module if ema is not None else model
        val_loader = make_loader(val_ds, config, ctx, False, epoch, fold)
        studies, probs, val_loss_sum, val_count = predict_loader(
            task, served, val_loader, ctx, config.optim.amp
        )
        oof = predictions_frame(studies, probs)
        score = official_score(solution, oof).score
        row = {
            "fold": fold,
            "epoch": epoch,
            "train_loss": loss_sum / max(count, 1),
            "val_loss": val_loss_sum / max(val_count, 1),
            "val_score": score,
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        improved = score < best_score
        if improved:
            best_score, best_epoch, since_best = score, epoch, 0
        else:
            since_best += 1
        finished = epoch + 1 == config.optim.epochs or (
            config.optim.patience > 0 and since_best >= config.optim.patience
        )
        if ctx.is_primary:
            if improved:
                _write_best(fold_dir, served, state, config, fold, epoch, score, oof, solution)
            write_csv_atomic(pd.DataFrame(history, columns=list(METRIC_COLUMNS)), fold_dir.metrics)
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "rng": rng_states(),
                    "epoch": epoch,
                    "config": config.to_dict(),
                    "task_state": state,
                    "metric": score,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "since_best": since_best,
                    "history": history,
                    "finished": finished,
                },
                last_path,
            )
        if ctx.is_primary:
            tqdm.write(
                f"fold {fold} epoch {epoch}: train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} val_score {score:.4f} ({row['seconds']:.1f} s)"
            )
        barrier(ctx)
        if finished or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break
    return FoldResult(fold, best_epoch, best_score, history)


def _write_best(
    fold_dir: Path,
    served: nn.Module,
    state: dict[str, Any],
    config: TrainConfig,
    fold: int,
    epoch: int,
    score: float,
    oof: pd.DataFrame,
    solution: pd.DataFrame,
) -> None:
    """The weights to serve, their sidecar and the fold's OOF rows (labelled rows only)."""
    save_checkpoint(
        {
            "model": _unwrap(served).state_dict(),
            "config": config.to_dict(),
            "task_state": state,
            "epoch": epoch,
            "metric": score,
        },
        fold_dir.best,
    )
    write_json_atomic(
        {"fold": fold, "seed": config.seed, "epoch": epoch, "score": score}, fold_dir.best_info
    )
    labelled = oof[oof["row_id"].isin(solution["row_id"])]
    write_csv_atomic(labelled, fold_dir.oof)


def collect_run_outputs(run_dir: Path, n_folds: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gather every trained fold's OOF rows and metrics into ``RUN/oof.csv`` and
    ``RUN/metrics.csv`` (folds trained by separate calls accumulate)."""
    run = RunDir(run_dir)
    oofs, metrics = [], []
    for k in range(n_folds):
        if run.fold(k).oof.is_file():
            oofs.append(pd.read_csv(run.fold(k).oof))
        if run.fold(k).metrics.is_file():
            metrics.append(pd.read_csv(run.fold(k).metrics))
    oof = (
        pd.concat(oofs, ignore_index=True)
        if oofs
        else pd.DataFrame(columns=["row_id", *PRED_COLUMNS])
    )
    metric = (
        pd.concat(metrics, ignore_index=True)
        if metrics
        else pd.DataFrame(columns=list(METRIC_COLUMNS))
    )
    write_csv_atomic(oof, run.oof)
    write_csv_atomic(metric, run.metrics)
    return oof, metric


def _prepare_run_dir(
    run_dir: Path, config: TrainConfig, labels: pd.DataFrame, ctx: DistContext
) -> pd.DataFrame:
    """Write config.yaml, folds.csv and class_prior.csv (rank 0), or check them on resume."""
    run = RunDir(run_dir)
    folds_path = run.folds
    folds = make_folds(labels, config.folds.n_folds, config.seed)
    if folds_path.is_file():
        previous = pd.read_csv(folds_path)
        same = (
            previous.sort_values("study_id")
            .reset_index(drop=True)
            .equals(folds.sort_values("study_id").reset_index(drop=True))
        )
        if not same:
            raise UserError(
                f"{folds_path}: this run's folds differ from the ones the config and data give now "
                "(different seed, n_folds or studies); use a new --out"
            )
    if ctx.is_primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, run.config)
        write_csv_atomic(folds, folds_path)
        write_csv_atomic(class_prior(labels), run.class_prior)
    barrier(ctx)
    return folds


def train_run(
    task: TrainingTask,
    config: TrainConfig,
    run_dir: Path,
    ctx: DistContext,
    resume: bool = False,
    progress: bool = True,
) -> list[FoldResult]:
    """Train the configured folds (all, or ``folds.fold``) into ``run_dir``.

    Returns:
        One result per trained fold. ``RUN/oof.csv`` and ``RUN/metrics.csv`` then hold every
        fold trained in this run folder so far.
    """
    run_dir = Path(run_dir)
    autocast_context(config.optim.amp, ctx.device)  # refuse fp16 on CPU before any work
    labels = task.study_labels()
    folds = _prepare_run_dir(run_dir, config, labels, ctx)
    todo = range(config.folds.n_folds) if config.folds.fold is None else [config.folds.fold]
    results = [
        train_fold(task, config, labels, folds, k, run_dir, ctx, resume, progress) for k in todo
    ]
    if ctx.is_primary:
        oof, _ = collect_run_outputs(run_dir, config.folds.n_folds)
        if len(oof):
            scored = labels_to_solution(labels)
            scored = scored[scored["row_id"].isin(oof["row_id"])]
            score = official_score(scored, oof)
            write_json_atomic(score.as_dict(), run_dir / "oof_score.json")
            if progress:
                tqdm.write(f"OOF official score: {score.score:.4f} over {len(oof)} rows")
    barrier(ctx)
    return results
