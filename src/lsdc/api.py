"""The Python API: one function per pipeline stage, each taking plain arguments and returning
what it wrote. The CLI (``lsdc VERB``) and ``lsdc demo`` are thin callers of these.

Each function imports its stage when called, so ``import lsdc`` stays cheap (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from lsdc.config import TrainConfig
    from lsdc.inference.dicom_input import DicomPredictResult
    from lsdc.inference.export import ExportResult
    from lsdc.inference.predict import PredictResult
    from lsdc.synth.config import SynthConfig


def synthesize(
    out_dir: str | Path,
    config: SynthConfig | None = None,
    workers: int = 1,
    progress: bool = True,
    **fields: Any,
) -> Path:
    """Write a synthetic competition root with a known answer (``docs/synthetic.md``).

    Args:
        out_dir: a new or empty folder.
        config: what to write; default ``SynthConfig()``.
        workers: processes rendering studies (the bytes do not depend on it).
        progress: show a progress bar.
        **fields: ``SynthConfig`` fields replaced over ``config`` (e.g. ``train_studies=20``,
            ``profile="competition"`` for the real data's sizes).

    Returns:
        The competition root.
    """
    import dataclasses

    from lsdc.synth.config import SynthConfig
    from lsdc.synth.generator import synthesize as _synthesize

    config = dataclasses.replace(config or SynthConfig(), **fields)
    return _synthesize(out_dir, config, progress=progress, workers=workers)


def preprocess(
    data_root: str | Path,
    cache_dir: str | Path,
    split: str,
    workers: int = 1,
    spacing: Sequence[float] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Cache every series of a split (resumable); returns the report rows it wrote to
    ``CACHE/preprocess_report.csv`` (one per stack or failed series)."""
    from lsdc.preprocessing.cache import preprocess_split

    return preprocess_split(
        data_root, cache_dir, split, workers=workers, spacing=spacing, progress=progress
    )


def train(
    config: str | Path | TrainConfig,
    data_root: str | Path,
    cache_dir: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train ``config`` (a shipped name, a YAML path or a loaded config, plus ``key=value``
    overrides) into the run folder ``out_dir``; returns the run folder."""
    from lsdc.training.train import train as _train

    _train(config, data_root, cache_dir, out_dir, overrides, resume, device, progress)
    return Path(out_dir)


def evaluate(
    predictions: str | Path | None = None,
    data_root: str | Path | None = None,
    solution: str | Path | None = None,
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tta: str | None = None,
) -> dict[str, Any]:
    """Score predictions against ``data_root/train.csv`` (out-of-fold rows) or a ``solution``
    file, write ``report.html`` and ``metrics.json`` to ``out_dir``; with ``run_dir``, also fit
    the run's calibration, and with ``cache_dir`` too, add the study gallery. With ``tta``
    (``none`` or ``flip``, as ``predict`` will serve), the run's out-of-fold predictions are
    re-made by the serving code on ``cache_dir`` (the training cache) and calibrated instead of
    ``RUN/oof.csv``. Returns the metrics written."""
    from lsdc.evaluation.report import evaluate_files

    return evaluate_files(predictions, data_root, solution, run_dir, out_dir, cache_dir, tta)


def show(
    data_root: str | Path,
    cache_dir: str | Path,
    run_dir: str | Path,
    study_id: int,
    out_path: str | Path | None = None,
) -> Path:
    """Draw one study as ``run_dir``'s model sees it (slices with the predicted and labelled
    points, the 25 rows, the crops) into ``out_path`` (.html or .png; default
    ``study_ID.html``); returns the path written."""
    from lsdc.evaluation.viewer import show_study

    return show_study(data_root, cache_dir, run_dir, study_id, out_path)


def export(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    wheel: bool = True,
    allow_unfinished: bool = False,
) -> ExportResult:
    """Write a slim copy of trained runs for an offline notebook to ``out_dir``: each fold's
    served weights, config, class prior and calibration, the lsdc wheel (unless ``wheel`` is
    False), ``requirements.txt`` and a ``README.md``; ``lsdc predict --run OUT/<run>`` reads it.
    A run still training is refused; an unfinished run too, unless ``allow_unfinished``."""
    from lsdc.inference.export import export_runs

    return export_runs(run_dirs, out_dir, wheel=wheel, allow_unfinished=allow_unfinished)


def predict(
    data_root: str | Path,
    run_dirs: Sequence[str | Path],
    out_path: str | Path = "submission.csv",
    split: str = "test",
    tta_flip: bool = False,
    calibrate: bool = True,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    device: str | None = None,
    threads: int = 0,
    progress: bool = True,
    allow_fallback: bool = False,
    check_descriptions: bool = False,
) -> PredictResult:
    """Write a submission for ``split`` from one or more runs, and ``predict_report.csv``
    beside it; returns both as frames with their paths. A fold that cannot load, folds of
    different configs, a missing device, a bad worker count or an unusable cache are refused,
    unless ``allow_fallback`` gives the studies concerned the class prior instead. ``threads``:
    torch threads of the model, 0 for the usable CPUs less the run's loader workers. With
    ``check_descriptions``, each listed series' description is compared with the role its DICOM
    headers give (a warning per disagreement, ``series_roles.csv`` beside the submission)."""
    from lsdc.inference.predict import predict_split

    return predict_split(
        data_root,
        [Path(r) for r in run_dirs],
        out_path,
        split=split,
        tta_flip=tta_flip,
        calibrate=calibrate,
        cache_dir=cache_dir,
        workers=workers,
        device=device,
        threads=threads,
        progress=progress,
        allow_fallback=allow_fallback,
        check_descriptions=check_descriptions,
    )


def predict_dicom(
    dicom_dir: str | Path,
    run_dirs: Sequence[str | Path],
    out_path: str | Path = "submission.csv",
    study_ids: str | Path | None = None,
    tta_flip: bool = False,
    calibrate: bool = True,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    device: str | None = None,
    threads: int = 0,
    progress: bool = True,
    allow_fallback: bool = False,
) -> DicomPredictResult:
    """Predict every study of any folder tree of DICOM files (a PACS export, a CD): series are
    given their roles from their headers, rows use each study's StudyInstanceUID (or the id a
    ``study_ids`` CSV maps it to: columns StudyInstanceUID, study_id). Writes the submission,
    ``predict_report.csv``, ``series_roles.csv``, ``readings/{study}.md`` and
    ``competition_layout/`` (the chosen series as a competition root, for ``lsdc show``) beside
    ``out_path``; the other arguments are :func:`predict`'s."""
    from lsdc.inference.dicom_input import predict_dicom as _predict_dicom

    return _predict_dicom(
        dicom_dir,
        [Path(r) for r in run_dirs],
        out_path,
        study_names=study_ids,
        tta_flip=tta_flip,
        calibrate=calibrate,
        cache_dir=cache_dir,
        workers=workers,
        device=device,
        threads=threads,
        progress=progress,
        allow_fallback=allow_fallback,
    )


__all__ = [
    "evaluate",
    "export",
    "predict",
    "predict_dicom",
    "preprocess",
    "show",
    "synthesize",
    "train",
]
