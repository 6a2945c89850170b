"""The one training engine: folds, AdamW, schedules, AMP, clipping, EMA, checkpoints with exact
resume, DDP, early stopping on the official score, out-of-fold predictions and metrics.

It drives a :class:`~lsdc.tasks.base.TrainingTask` and never branches on a model or task
name, so every model family trains, resumes and is scored the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from lsdc.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from lsdc.config import (
    RESUMABLE_KEYS,
    TrainConfig,
    config_differences,
    read_config_dict,
    write_config,
)
from lsdc.contract import (
    PRED_COLUMNS,
    class_prior,
    labels_to_solution,
    write_csv_atomic,
)
from lsdc.datasets.loader import make_loader
from lsdc.distributed import (
    DistContext,
    barrier,
    gather_objects,
    sum_across_ranks,
)
from lsdc.errors import UserError
from lsdc.evaluation.metric import official_score
from lsdc.rundir import FoldDir, RunDir
from lsdc.tasks.base import TrainingTask
from lsdc.tasks.predict_loop import (
    autocast_context,
    predict_loader,
    predictions_frame,
    to_device,
)
from lsdc.training.folds import make_folds
from lsdc.utils import check_output_dir, write_json_atomic, writer_lock

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("fold", "epoch", "train_loss", "val_loss", "val_score", "lr", "seconds")


@dataclass
class FoldResult:
    """What one trained fold leaves behind."""

    fold: int
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]


# ------------------------------------------------------------------------------- small helpers
def ema_update_fn(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """The EMA step for ``AveragedModel(use_buffers=True)``: floating-point parameters and
    buffers move towards the model's by ``1 - decay``; integer buffers (label and level indices,
    BatchNorm's batch counters) are copied. torch's own EMA function averages integers too, and
    rounding down turned a grader's level index 3 into 2 after two updates."""

    def update(averaged: list[Tensor], current: list[Tensor], _: Tensor) -> None:
        if averaged and (averaged[0].is_floating_point() or averaged[0].is_complex()):
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


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


# ------------------------------------------------------------------------------------- the run
class TrainingDivergedError(UserError):
    """The training loss (or the validation predictions) stopped being finite."""


@dataclass
class FoldState:
    """What one fold's training carries from epoch to epoch: what ``last.pt`` holds."""

    model: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_step: bool
    """Whether the scheduler steps per optimiser step (else per epoch)."""
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    best_score: float = math.inf
    best_epoch: int = -1
    since_best: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False

    @property
    def served(self) -> nn.Module:
        """The weights validated, kept as best and served: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model


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

    Raises:
        UserError: ``last.pt`` exists without ``resume``, or was trained with another config.
        TrainingDivergedError: a non-finite training loss or validation prediction.
    """
    fold_dir = RunDir(run_dir).fold(fold)
    train_ids = folds.loc[folds["fold"] != fold, "study_id"].to_numpy()
    val_ids = folds.loc[folds["fold"] == fold, "study_id"].to_numpy()
    solution = labels_to_solution(labels[labels["study_id"].isin(val_ids)])

    state = task.fit_state(train_ids)
    train_ds = task.build_dataset(train_ids, state, train=True)
    val_ds = task.build_dataset(val_ids, state, train=False)
    steps_per_epoch = len(make_loader(train_ds, config, ctx, True, 0, fold))
    fs = _new_fold_state(task, state, config, ctx, fold, steps_per_epoch)
    if fold_dir.last.is_file():
        if not resume:
            raise UserError(
                f"{fold_dir.last} exists: pass `resume=True` to continue this run, or pick a new `out_dir`"
            )
        _restore(fs, fold_dir.last, config, ctx)
        if fs.finished:
            return FoldResult(fold, fs.best_epoch, fs.best_score, fs.history)

    net: nn.Module = (
        DistributedDataParallel(
            fs.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
        if ctx.distributed
        else fs.model
    )
    for epoch in range(fs.start_epoch, config.optim.epochs):
        started = time.perf_counter()
        train_loss, lr = _train_epoch(
            task, net, fs, train_ds, config, ctx, fold, epoch, progress and ctx.is_primary
        )
        validated = _validates(epoch, config)
        oof, score, val_loss = (
            _validate(task, fs.served, val_ds, solution, config, ctx, fold, epoch)
            if validated
            else (None, math.nan, math.nan)
        )
        row = {
            "fold": fold,
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_score": score,
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }
        fs.history.append(row)
        improved = validated and score < fs.best_score
        if improved:
            fs.best_score, fs.best_epoch, fs.since_best = score, epoch, 0
        elif validated:
            fs.since_best += 1
        fs.finished = _is_finished(epoch, fs.since_best, config)
        if ctx.is_primary:
            if improved:
                assert oof is not None
                _write_best(fold_dir, fs.served, state, config, fold, epoch, score, oof, solution)
            _save_epoch(fs, fold_dir, state, config, epoch, score)
            validation = (
                f"val_loss {val_loss:.4f} val_score {score:.4f}" if validated else "not validated"
            )
            log.info(
                f"fold {fold} epoch {epoch}: train_loss {train_loss:.4f} {validation} "
                f"({row['seconds']:.1f} s)"
            )
        barrier(ctx)
        if fs.finished or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break
    return FoldResult(fold, fs.best_epoch, fs.best_score, fs.history)


def _new_fold_state(
    task: TrainingTask,
    state: dict[str, Any],
    config: TrainConfig,
    ctx: DistContext,
    fold: int,
    steps_per_epoch: int,
) -> FoldState:
    """A fresh model (seeded by seed and fold), its EMA, optimiser, schedule and scaler."""
    torch.manual_seed(config.seed * 1000 + fold)
    model = task.build_model(state).to(ctx.device)
    ema = (
        AveragedModel(model, multi_avg_fn=ema_update_fn(config.optim.ema_decay), use_buffers=True)
        if config.optim.ema_decay > 0
        else None
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    scheduler, per_step = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(
        ctx.device.type, enabled=config.optim.amp == "fp16" and ctx.device.type == "cuda"
    )
    return FoldState(model, ema, optimizer, scheduler, per_step, scaler)


def _restore(fs: FoldState, path: Path, config: TrainConfig, ctx: DistContext) -> None:
    """Load ``last.pt`` into ``fs`` (weights, optimiser, schedule, scaler, EMA, RNG, counters).
    A cosine schedule follows this call's ``optim.epochs`` from the step it stopped at.

    Raises:
        UserError: the checkpoint was trained with a config that differs in more than
            RESUMABLE_KEYS (its tensors would not fit, or would mean something else).
    """
    ckpt = load_checkpoint(path, map_location=ctx.device)
    changed = _changed_keys(ckpt["config"], config)
    if changed:
        raise UserError(
            f"{path}: trained with other values of {', '.join(changed)}; resume with the "
            f"config it was trained with, or train into a new `out_dir`"
        )
    fs.model.load_state_dict(ckpt["model"])
    fs.optimizer.load_state_dict(ckpt["optimizer"])
    fs.scheduler.load_state_dict(ckpt["scheduler"])
    fs.scaler.load_state_dict(ckpt["scaler"])
    if fs.ema is not None:
        fs.ema.load_state_dict(ckpt["ema"])
    set_rng_states(ckpt["rng"])
    fs.start_epoch = ckpt["epoch"] + 1
    fs.best_score, fs.best_epoch, fs.since_best = (
        ckpt["best_score"],
        ckpt["best_epoch"],
        ckpt["since_best"],
    )
    fs.history = ckpt["history"]
    fs.finished = _is_finished(ckpt["epoch"], fs.since_best, config)


def _validates(epoch: int, config: TrainConfig) -> bool:
    """Whether ``epoch`` (0-based) is validated: every ``optim.val_every``-th and the last."""
    return (epoch + 1) % config.optim.val_every == 0 or epoch + 1 >= config.optim.epochs


def _is_finished(epoch: int, since_best: int, config: TrainConfig) -> bool:
    """Whether a fold whose last epoch was ``epoch`` is done under ``config`` (judged by the
    config of this call, so that a resume with a larger ``optim.epochs`` trains on)."""
    return epoch + 1 >= config.optim.epochs or (
        config.optim.patience > 0 and since_best >= config.optim.patience
    )


def _train_epoch(
    task: TrainingTask,
    net: nn.Module,
    fs: FoldState,
    train_ds: Any,
    config: TrainConfig,
    ctx: DistContext,
    fold: int,
    epoch: int,
    show: bool,
) -> tuple[float, float]:
    """One pass over the training studies; returns the mean training loss (over ranks) and the
    learning rate the epoch used.

    Raises:
        TrainingDivergedError: a non-finite loss, before it touches the weights.
    """
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(epoch)
    net.train()
    loss_sum, count = 0.0, 0.0
    loader = make_loader(train_ds, config, ctx, True, epoch, fold)
    bar = tqdm(loader, desc=f"fold {fold} epoch {epoch}", leave=False, disable=not show)
    for step, batch in enumerate(bar):
        batch = to_device(batch, ctx.device)
        with autocast_context(config.optim.amp, ctx.device):
            outputs = task.forward(net, batch)
            loss = task.loss(outputs, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"fold {fold} epoch {epoch} step {step}: the training loss is {value}; training "
                "diverged (try a lower optim.lr); the epochs saved before it are kept"
            )
        fs.optimizer.zero_grad(set_to_none=True)
        fs.scaler.scale(loss).backward()
        if config.optim.grad_clip > 0:
            fs.scaler.unscale_(fs.optimizer)
            nn.utils.clip_grad_norm_(fs.model.parameters(), config.optim.grad_clip)
        fs.scaler.step(fs.optimizer)
        fs.scaler.update()
        if fs.ema is not None:
            fs.ema.update_parameters(fs.model)
        if fs.per_step:
            fs.scheduler.step()
        loss_sum += value * len(batch["study_id"])
        count += len(batch["study_id"])
        bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}")
    lr = fs.optimizer.param_groups[0]["lr"]
    if not fs.per_step:
        fs.scheduler.step()
    loss_sum, count = sum_across_ranks([loss_sum, count], ctx)
    return loss_sum / max(count, 1), lr


def _validate(
    task: TrainingTask,
    served: nn.Module,
    val_ds: Any,
    solution: pd.DataFrame,
    config: TrainConfig,
    ctx: DistContext,
    fold: int,
    epoch: int,
) -> tuple[pd.DataFrame, float, float]:
    """The served weights over the fold's validation studies: OOF rows, official score, loss.

    Raises:
        TrainingDivergedError: a non-finite prediction (the metric would refuse it anyway).
    """
    val_loader = make_loader(val_ds, config, ctx, False, epoch, fold)
    studies, probs, val_loss_sum, val_count = predict_loader(
        task, served, val_loader, ctx, config.optim.amp
    )
    if not np.isfinite(probs).all():
        raise TrainingDivergedError(
            f"fold {fold} epoch {epoch}: the validation predictions are not finite; training "
            "diverged (try a lower optim.lr); the epochs saved before it are kept"
        )
    oof = predictions_frame(studies, probs)
    return oof, official_score(solution, oof).score, val_loss_sum / max(val_count, 1)


def _save_epoch(
    fs: FoldState,
    fold_dir: FoldDir,
    state: dict[str, Any],
    config: TrainConfig,
    epoch: int,
    score: float,
) -> None:
    """The fold's metrics so far and ``last.pt`` (everything an exact resume needs)."""
    write_csv_atomic(pd.DataFrame(fs.history, columns=list(METRIC_COLUMNS)), fold_dir.metrics)
    save_checkpoint(
        {
            "model": fs.model.state_dict(),
            "optimizer": fs.optimizer.state_dict(),
            "scheduler": fs.scheduler.state_dict(),
            "scaler": fs.scaler.state_dict(),
            "ema": fs.ema.state_dict() if fs.ema is not None else None,
            "rng": rng_states(),
            "epoch": epoch,
            "config": config.to_dict(),
            "task_state": state,
            "metric": score,
            "best_score": fs.best_score,
            "best_epoch": fs.best_epoch,
            "since_best": fs.since_best,
            "history": fs.history,
            "finished": fs.finished,
        },
        fold_dir.last,
    )


def _write_best(
    fold_dir: FoldDir,
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


def _changed_keys(stored: dict[str, Any], config: TrainConfig) -> list[str]:
    """Keys of ``config`` that differ from a run's ``stored`` config and may not (all but
    ``folds.fold``, which names the fold a call trains, and RESUMABLE_KEYS)."""
    return config_differences(
        stored, config.to_dict(), ignore=frozenset({"folds.fold"}) | RESUMABLE_KEYS
    )


def check_run_dir(
    run_dir: Path, config: TrainConfig, labels: pd.DataFrame, resume: bool, todo: list[int]
) -> pd.DataFrame:
    """Every refusal of a run, before any file of it is written; returns the run's folds.

    An existing run is continued only as it was started: a fold with ``last.pt`` needs
    ``resume``; the config may differ from ``RUN/config.yaml`` only in RESUMABLE_KEYS (and
    ``folds.fold``), whether resuming or adding a fold; the folds and the class prior (from
    train.csv) must be the ones the run was trained with.

    Raises:
        UserError: the refusal, naming the file and the keys that differ.
    """
    check_output_dir(run_dir, "`out_dir`")
    run = RunDir(run_dir)
    if not resume:
        started = [run.fold(k).last for k in todo if run.fold(k).last.is_file()]
        if started:
            raise UserError(
                f"{started[0]} exists: pass `resume=True` to continue this run, or pick a new `out_dir`"
            )
    if run.config.is_file():
        changed = _changed_keys(read_config_dict(run.config), config)
        if changed:
            raise UserError(
                f"{run.config}: this run was trained with other values of {', '.join(changed)}; "
                f"train into a new `out_dir` (a run may change only {', '.join(sorted(RESUMABLE_KEYS))})"
            )
    folds = make_folds(labels, config.folds.n_folds, config.seed)
    if run.folds.is_file():
        previous = pd.read_csv(run.folds)
        same = (
            previous.sort_values("study_id")
            .reset_index(drop=True)
            .equals(folds.sort_values("study_id").reset_index(drop=True))
        )
        if not same:
            raise UserError(
                f"{run.folds}: this run's folds differ from the ones the config and data give now "
                "(different seed, n_folds or studies); use a new `out_dir`"
            )
    if run.class_prior.is_file():
        stored = pd.read_csv(run.class_prior)
        prior = class_prior(labels)
        if not (
            stored.shape == prior.shape
            and np.allclose(stored[list(PRED_COLUMNS)].to_numpy(), prior[list(PRED_COLUMNS)])
        ):
            raise UserError(
                f"{run.class_prior}: the labels of train.csv differ from the ones this run was "
                "trained with; use a new `out_dir`"
            )
    return folds


RUN_BUSY = (
    "another lsdc train (pid {pid}) is writing this run, or an lsdc export is reading it; "
    "wait for it to end, or use another `out_dir`"
)


@contextlib.contextmanager
def run_lock(run_dir: Path, ctx: DistContext) -> Iterator[None]:
    """Hold the run folder's writer lock (``RUN/train.lock``) for the block: one training per
    run folder, so two cannot train the same folds into it. Rank 0 holds it; every rank refuses
    together when it is taken.

    Raises:
        UserError: another training (its pid named) or an export holds the lock, or the folder
            cannot be written.
    """
    with contextlib.ExitStack() as stack:
        refusal: UserError | None = None
        if ctx.is_primary:
            try:
                stack.enter_context(
                    writer_lock(run_dir, RunDir(run_dir).lock_name, "`out_dir`", RUN_BUSY)
                )
            except UserError as exc:
                refusal = exc
        messages = [m for m in gather_objects(None if refusal is None else str(refusal), ctx) if m]
        if refusal is not None:
            raise refusal
        if messages:
            raise UserError(messages[0])
        yield


def _write_run_files(
    run_dir: Path, config: TrainConfig, labels: pd.DataFrame, folds: pd.DataFrame, ctx: DistContext
) -> None:
    """Write config.yaml, folds.csv and class_prior.csv (rank 0), once every check passed."""
    run = RunDir(run_dir)
    if ctx.is_primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, run.config)
        write_csv_atomic(folds, run.folds)
        write_csv_atomic(class_prior(labels), run.class_prior)
    barrier(ctx)


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
    todo = list(range(config.folds.n_folds)) if config.folds.fold is None else [config.folds.fold]
    with run_lock(run_dir, ctx):
        folds = check_run_dir(run_dir, config, labels, resume, todo)
        _write_run_files(run_dir, config, labels, folds, ctx)
        results = [
            train_fold(task, config, labels, folds, k, run_dir, ctx, resume, progress) for k in todo
        ]
        if ctx.is_primary:
            oof, _ = collect_run_outputs(run_dir, config.folds.n_folds)
            if len(oof):
                scored = labels_to_solution(labels)
                scored = scored[scored["row_id"].isin(oof["row_id"])]
                score = official_score(scored, oof)
                write_json_atomic(score.as_dict(), RunDir(run_dir).oof_score)
                if progress:
                    log.info(f"OOF official score: {score.score:.4f} over {len(oof)} rows")
        barrier(ctx)
    return results
