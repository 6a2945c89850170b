"""`lsdc preprocess`: decode every series once into a memory-mappable cache, and read it back.

Decoding DICOM inside a training loop starves a GPU, so each series is read once
(:func:`lsdc.preprocessing.dicom.read_series`), optionally resampled to a target spacing, and written as
one ``.npy`` per stack plus a JSON sidecar with its geometry. Training and inference then read a
memory map. docs/cache.md documents the layout; docs/ARCHITECTURE.md states the API.

Entries are atomic per series: a series is written into a hidden temporary folder beside its
final place and renamed into place only when complete, so a kill at any moment leaves either the
whole series or nothing (plus a temporary folder that the next run deletes). A rerun processes
only the series that have no entry yet and ends with a cache identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from lsdc.contract import SPLITS, load_series_descriptions, write_csv_atomic
from lsdc.errors import UserError
from lsdc.preprocessing.dicom import SeriesReadError, Volume, read_series
from lsdc.preprocessing.geometry import StackGeometry
from lsdc.utils import read_json, write_json_atomic

CACHE_FORMAT = 1
SERIES_RECORD = "series.json"
"""Per-series record (its report rows); present exactly when the series entry is complete."""

REPORT_COLUMNS = [
    "study_id",
    "series_id",
    "series_description",
    "stack",
    "n_slices",
    "status",
    "message",
]
INDEX_COLUMNS = [
    "study_id",
    "series_id",
    "series_description",
    "stack",
    "n_slices",
    "rows",
    "cols",
    "status",
    "message",
]
_TMP_PREFIX = ".tmp-"


@dataclass
class CachedStack:
    """One cached stack, as training and inference see it.

    Attributes:
        array: (n_slices, rows, cols), a read-only memory map unless loaded with ``mmap=False``.
        geometry: geometry of ``array`` (after any resampling).
        source_geometry: geometry as read from the DICOM; the pixel coordinates of the CSVs
            (instance_number, x, y) live here.
        meta: series_description, slice_thickness, spacing_between_slices, pixel_spacing, rows,
            columns (of the DICOM), manufacturer, field_strength, photometric_interpretation,
            transfer_syntax, slice_spacing.
    """

    array: np.ndarray
    geometry: StackGeometry
    source_geometry: StackGeometry
    meta: dict[str, Any]


# ------------------------------------------------------------------------------------ reading
def stack_paths(
    cache_dir: str | Path, study_id: int, series_id: int, stack: int = 0
) -> tuple[Path, Path]:
    """The ``.npy`` and ``.json`` paths of one cached stack."""
    base = Path(cache_dir) / str(int(study_id)) / str(int(series_id)) / str(int(stack))
    return base.with_suffix(".npy"), base.with_suffix(".json")


def load_stack(
    cache_dir: str | Path, study_id: int, series_id: int, stack: int = 0, mmap: bool = True
) -> CachedStack:
    """Read one cached stack (a memory map by default: no copy until pixels are touched).

    Raises:
        UserError: the entry is missing or its sidecar is unreadable (names the file).
    """
    npy, sidecar = stack_paths(cache_dir, study_id, series_id, stack)
    if not npy.is_file() or not sidecar.is_file():
        raise UserError(
            f"{npy}: no cached stack {stack} for study {study_id} series {series_id}; "
            "run lsdc preprocess (see its preprocess_report.csv)"
        )
    try:
        info = read_json(sidecar)
        geometry = StackGeometry.from_dict(info["geometry"])
        source = StackGeometry.from_dict(info["source_geometry"])
        array = np.load(npy, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{sidecar}: unreadable cache entry ({exc})") from exc
    return CachedStack(array=array, geometry=geometry, source_geometry=source, meta=info["meta"])


def read_cache_index(cache_dir: str | Path) -> pd.DataFrame:
    """The cached stacks of a cache folder: one row per stack (INDEX_COLUMNS).

    Raises:
        UserError: the folder has no index.csv.
    """
    path = Path(cache_dir) / "index.csv"
    if not path.is_file():
        raise UserError(f"{path}: not found; run lsdc preprocess to build the cache")
    index = pd.read_csv(path, dtype={"message": str}, keep_default_na=False)
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}")
    for c in ("study_id", "series_id", "stack", "n_slices", "rows", "cols"):
        index[c] = index[c].astype(np.int64)
    return index[INDEX_COLUMNS]


def best_stacks(index: pd.DataFrame) -> pd.DataFrame:
    """One row per (study_id, series_description): the stack a model should read.

    Rule: among the cached stacks of every series of that description in the study, the one
    with the most slices; ties go to the lowest series_id, then the lowest stack number. A study
    with two Axial T2 series, or one split into per-disc stacks, thus gets its longest stack.
    """
    usable = index[index["status"] != "error"]
    ordered = usable.sort_values(
        ["study_id", "series_description", "n_slices", "series_id", "stack"],
        ascending=[True, True, False, True, True],
        kind="stable",
    )
    best = ordered.drop_duplicates(["study_id", "series_description"], keep="first")
    return best.reset_index(drop=True)


# ---------------------------------------------------------------------------------- resampling
def resample_stack(
    array: np.ndarray, geometry: StackGeometry, spacing: Sequence[float]
) -> tuple[np.ndarray, StackGeometry]:
    """Linearly resample a stack to ``spacing`` = (slice, row, col) mm (the original project's
    ``enable_spatial_scaling``), returning the new array and its exact geometry.

    The slice axis follows the actual slice offsets, so uneven gaps are resampled correctly.
    Integer stacks stay in their dtype (rounded); the extent starts at voxel (0, 0, 0) and ends
    at or before the last source voxel.
    """
    s_mm, r_mm, c_mm = (float(x) for x in spacing)
    distance = np.abs(geometry.slice_offsets)
    slice_coords = np.interp(
        np.arange(0.0, distance[-1] + 1e-6, s_mm), distance, np.arange(len(distance))
    )
    row_coords = np.arange(0.0, (array.shape[1] - 1) * geometry.pixel_spacing[0] + 1e-6, r_mm)
    col_coords = np.arange(0.0, (array.shape[2] - 1) * geometry.pixel_spacing[1] + 1e-6, c_mm)
    out = _lerp_axis(array.astype(np.float32, copy=False), slice_coords, 0)
    out = _lerp_axis(out, row_coords / geometry.pixel_spacing[0], 1)
    out = _lerp_axis(out, col_coords / geometry.pixel_spacing[1], 2)
    if array.dtype.kind in "iu":
        out = np.rint(out).astype(array.dtype)
    origins = geometry.voxel_to_patient(
        np.stack([slice_coords, 0 * slice_coords, 0 * slice_coords], 1)
    )
    nearest = np.clip(np.floor(slice_coords + 0.5).astype(np.int64), 0, geometry.n_slices - 1)
    resampled = StackGeometry(
        positions=origins,
        row_direction=geometry.row_direction,
        column_direction=geometry.column_direction,
        pixel_spacing=(r_mm, c_mm),
        instance_numbers=tuple(geometry.instance_numbers[i] for i in nearest),
    )
    return np.ascontiguousarray(out), resampled


def _lerp_axis(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Sample ``a`` at fractional indices ``coords`` along one axis (linear interpolation)."""
    n = a.shape[axis]
    if n == 1:
        return np.repeat(a, len(coords), axis=axis)
    lo = np.clip(np.floor(coords).astype(np.int64), 0, n - 2)
    shape = [1] * a.ndim
    shape[axis] = len(coords)
    w = (coords - lo).astype(np.float32).reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - w) + np.take(a, lo + 1, axis=axis) * w


# --------------------------------------------------------------------------------- preprocess
def preprocess_split(
    data_root: str | Path,
    cache_dir: str | Path,
    split: str,
    workers: int = 1,
    spacing: Sequence[float] | None = None,
    study_ids: Iterable[int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Cache every series of ``{split}_series_descriptions.csv`` (or of ``study_ids``).

    Series already cached are skipped, so an interrupted run resumes where it stopped. One bad
    series never stops the run: it becomes an ``error`` row of the report.

    Returns:
        The report of the series asked for (REPORT_COLUMNS): one row per stack or failed series.

    Raises:
        UserError: bad arguments, a missing CSV or image folder, a cache built with other
            settings, or not a single series readable.
    """
    data_root, cache_dir = Path(data_root), Path(cache_dir)
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if spacing is not None:
        spacing = [float(x) for x in spacing]
        if len(spacing) != 3 or not all(np.isfinite(x) and x > 0 for x in spacing):
            raise UserError(f"--spacing needs three positive millimetre values, got {spacing}")
    series = load_series_descriptions(data_root / f"{split}_series_descriptions.csv")
    images = data_root / f"{split}_images"
    if not images.is_dir():
        raise UserError(f"{images}: image folder not found")
    wanted = series
    if study_ids is not None:
        wanted = series[series["study_id"].isin([int(s) for s in study_ids])]

    _claim_cache(cache_dir, split, spacing)
    _remove_partial_entries(cache_dir)
    todo = [
        (images, cache_dir, int(r.study_id), int(r.series_id), r.series_description, spacing)
        for r in wanted.itertuples(index=False)
        if not (cache_dir / str(r.study_id) / str(r.series_id) / SERIES_RECORD).is_file()
    ]
    bar = tqdm(total=len(todo), disable=not progress, unit="series", desc=f"preprocess {split}")
    if workers == 1 or len(todo) <= 1:
        for task in todo:
            cache_series(*task)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for future in as_completed([pool.submit(cache_series, *task) for task in todo]):
                future.result()
                bar.update()
    bar.close()

    all_rows = _collect_rows(cache_dir, series)
    report = pd.DataFrame(all_rows, columns=INDEX_COLUMNS)
    write_csv_atomic(report[REPORT_COLUMNS], cache_dir / "preprocess_report.csv")
    write_csv_atomic(report[report["status"] != "error"], cache_dir / "index.csv")
    key = set(zip(wanted["study_id"], wanted["series_id"], strict=True))
    asked = report[[k in key for k in zip(report["study_id"], report["series_id"], strict=True)]]
    if len(asked) and (asked["status"] == "error").all():
        raise UserError(
            f"no series could be read ({len(asked)} failed); "
            f"see {cache_dir / 'preprocess_report.csv'}"
        )
    return asked[REPORT_COLUMNS].reset_index(drop=True)


def cache_series(
    images: Path,
    cache_dir: Path,
    study_id: int,
    series_id: int,
    description: str,
    spacing: Sequence[float] | None,
) -> list[dict[str, Any]]:
    """Read one series and write its entry atomically; return its report rows.

    Runs in a worker process. Any failure of this one series, expected (bad files) or not,
    becomes an error row, so the run goes on.
    """
    folder = images / str(study_id) / str(series_id)
    final = cache_dir / str(study_id) / str(series_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{series_id}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the entry private once renamed
    base = {"study_id": study_id, "series_id": series_id, "series_description": description}
    try:
        try:
            result = read_series(folder, description)
            rows = [
                _write_stack(tmp, k, volume, result.problems, spacing, base)
                for k, volume in enumerate(result.volumes)
            ]
        except SeriesReadError as exc:
            rows = [_error_row(base, str(exc))]
        except Exception as exc:  # one series' surprise must not stop a 6,000-series run
            for leftover in tmp.iterdir():
                leftover.unlink()
            rows = [_error_row(base, f"{folder}: unexpected {type(exc).__name__}: {exc}")]
        write_json_atomic({"rows": rows}, tmp / SERIES_RECORD)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return rows


def _write_stack(
    folder: Path,
    stack: int,
    volume: Volume,
    problems: list[str],
    spacing: Sequence[float] | None,
    base: dict[str, Any],
) -> dict[str, Any]:
    array, geometry = volume.array, volume.geometry
    if spacing is not None:
        array, geometry = resample_stack(array, geometry, spacing)
    np.save(folder / f"{stack}.npy", array, allow_pickle=False)
    meta = {**volume.meta, "series_description": base["series_description"]}
    sidecar = {
        "format": CACHE_FORMAT,
        "study_id": base["study_id"],
        "series_id": base["series_id"],
        "stack": stack,
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "geometry": geometry.to_dict(),
        "source_geometry": volume.geometry.to_dict(),
        "meta": meta,
    }
    write_json_atomic(sidecar, folder / f"{stack}.json")
    messages = [*problems, *volume.warnings]
    return {
        **base,
        "stack": stack,
        "n_slices": int(array.shape[0]),
        "rows": int(array.shape[1]),
        "cols": int(array.shape[2]),
        "status": "warning" if messages else "ok",
        "message": "; ".join(messages),
    }


def _error_row(base: dict[str, Any], message: str) -> dict[str, Any]:
    return {
        **base,
        "stack": -1,
        "n_slices": 0,
        "rows": 0,
        "cols": 0,
        "status": "error",
        "message": message,
    }


def _claim_cache(cache_dir: Path, split: str, spacing: list[float] | None) -> None:
    """Write cache.json, or check that an existing cache was built with the same settings (a
    resumed run must not mix two spacings in one folder)."""
    settings = {"format": CACHE_FORMAT, "split": split, "spacing": spacing}
    path = cache_dir / "cache.json"
    if path.is_file():
        existing = read_json(path)
        if existing != settings:
            raise UserError(
                f"{path}: this cache was built with {existing}; this run asks for {settings}. "
                "Use a new --cache folder."
            )
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings, path)


def _remove_partial_entries(cache_dir: Path) -> None:
    """Delete the temporary folders a killed run left behind."""
    for partial in cache_dir.glob(f"*/{_TMP_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def _collect_rows(cache_dir: Path, series: pd.DataFrame) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for r in series.sort_values(["study_id", "series_id"]).itertuples(index=False):
        record = cache_dir / str(r.study_id) / str(r.series_id) / SERIES_RECORD
        if record.is_file():
            rows.extend(read_json(record)["rows"])
    return rows
