"""The one owner of a run folder's layout: every file name of a run is spelled here and only here.

A run folder (``lsdc train --out RUN``) holds::

    RUN/config.yaml          the resolved config (what every fold was trained with)
    RUN/folds.csv            study_id -> fold
    RUN/class_prior.csv      smoothed class frequencies per label column (the fallback)
    RUN/oof.csv              out-of-fold probabilities of every trained fold
    RUN/metrics.csv          one row per (fold, epoch)
    RUN/oof_score.json       the official score of oof.csv (every fold trained so far)
    RUN/calibration.json     per-condition temperatures (``lsdc evaluate --run RUN``)
    RUN/evaluation/          ``lsdc evaluate --run RUN``'s default output folder (report.html)
    RUN/train.lock           the writer lock of ``lsdc train`` (the holder's pid; empty when free)
    RUN/fold{k}/last.pt      the latest epoch, with optimiser state (exact resume)
    RUN/fold{k}/best.pt      the served weights of the best epoch
    RUN/fold{k}/best.json    fold, seed, epoch, score of best.pt
    RUN/fold{k}/oof.csv      fold k's out-of-fold rows
    RUN/fold{k}/metrics.csv  fold k's epochs

An export (``lsdc export``) keeps the same names, without ``last.pt`` and the lock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lsdc.errors import UserError

_FOLD_DIR = re.compile(r"fold(\d+)")


@dataclass(frozen=True)
class FoldDir:
    """The files of one fold of a run."""

    root: Path
    fold: int

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def best_info(self) -> Path:
        return self.root / "best.json"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"


@dataclass(frozen=True)
class RunDir:
    """A run folder's paths; creating one touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def class_prior(self) -> Path:
        return self.root / "class_prior.csv"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def oof_score(self) -> Path:
        return self.root / "oof_score.json"

    @property
    def evaluation(self) -> Path:
        """Where ``lsdc evaluate --run RUN`` writes its report unless told otherwise."""
        return self.root / "evaluation"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def lock_name(self) -> str:
        """The writer lock's file name (``lsdc train`` holds it, ``lsdc export`` checks it)."""
        return "train.lock"

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.root / f"fold{k}", k)

    def fold_dirs(self) -> list[FoldDir]:
        """Every ``fold{k}`` folder present, in fold order (with or without weights)."""
        found = []
        for path in self.root.glob("fold*"):
            match = _FOLD_DIR.fullmatch(path.name)
            if match and path.is_dir():
                found.append(FoldDir(path, int(match.group(1))))
        return sorted(found, key=lambda f: f.fold)

    def trained_folds(self) -> list[FoldDir]:
        """Folds whose served weights exist (``fold{k}/best.pt``), in fold order."""
        return [f for f in self.fold_dirs() if f.best.is_file()]

    def checkpoints(self) -> dict[int, Path]:
        """Fold -> ``fold{k}/best.pt`` of every trained fold, in fold order.

        Raises:
            UserError: the folder has none (the one "not a run" refusal).
        """
        paths = {f.fold: f.best for f in self.trained_folds()}
        if not paths:
            raise UserError(
                f"{self.root}: no fold*/best.pt checkpoint; is it a finished lsdc train run "
                "or an export of one?"
            )
        return paths
