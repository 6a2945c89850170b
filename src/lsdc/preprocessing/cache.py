"""`lsdc preprocess`: decode every series once into a memory-mappable cache, and read it back.

Decoding DICOM inside a training loop starves a GPU, so each series is read once
(:func:`lsdc.preprocessing.dicom.read_series`), optionally resampled to a target spacing, and written as
one ``.npy`` per stack plus a JSON sidecar with its geometry. Training and inference then read a
memory map. docs/cache.md documents the layout; docs/ARCHITECTURE.md states the API.

Entries are atomic per series: a series is written into a hidden temporary folder beside its
final place and renamed into place only when complete (every file its record lists present, with
the size recorded), so a kill at any moment leaves either the whole series or nothing (plus a
temporary folder that the next run deletes). One run at a time writes a cache (an advisory lock,
``preprocess.lock``); a rerun checks every entry against its record, redoes the broken ones and
the missing ones, and ends with a cache identical to an uninterrupted run. docs/reliability.md
lists these promises and the tests that hold them.
"""

from __future__ import annotations

import contextlib
import logging
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
from lsdc.errors import MachineError, UserError
from lsdc.preprocessing.cachedir import (
    INDEX_COLUMNS,
    REPORT_COLUMNS,
    SERIES_RECORD,
    TMP_PREFIX,
    CacheDir,
    stack_file_names,
)
from lsdc.preprocessing.dicom import SeriesReadError, Volume, read_series
from lsdc.preprocessing.geometry import StackGeometry, canonical_in_plane
from lsdc.utils import (
    FolderBusyError,
    atomic_path,
    disk_errors,
    init_worker,
    is_machine_failure,
    keep_freed_memory,
    read_json,
    worker_context,
    write_json_atomic,
    writer_lock,
)

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the cache layout: 2 puts every stack in the canonical in-plane orientation and
resamples (``--spacing``) over the full extent; a cache of another format is refused."""


@dataclass
class CachedStack:
    """One cached stack, as training and inference see it.

    Attributes:
        array: (n_slices, rows, cols), a read-only memory map unless loaded with ``mmap=False``.
        geometry: geometry of ``array``: in the canonical in-plane orientation (see
            :func:`lsdc.preprocessing.geometry.canonical_flips`), after any resampling.
        source_geometry: geometry as read from the DICOM (rows and columns as stored); the
            pixel coordinates of the CSVs (instance_number, x, y) live here.
        meta: series_description, slice_thickness, spacing_between_slices, pixel_spacing, rows,
            columns (of the DICOM), manufacturer, field_strength, photometric_interpretation,
            transfer_syntax, slice_spacing.
    """

    array: np.ndarray
    geometry: StackGeometry
    source_geometry: StackGeometry
    meta: dict[str, Any]


# ------------------------------------------------------------------------------------ reading
def load_stack(
    cache_dir: str | Path, study_id: int, series_id: int, stack: int = 0, mmap: bool = True
) -> CachedStack:
    """Read one cached stack (a memory map by default: no copy until pixels are touched).

    Raises:
        UserError: the entry is missing or its sidecar is unreadable (names the file).
    """
    cache = CacheDir(cache_dir)
    npy, sidecar = cache.stack(study_id, series_id, stack)
    if not npy.is_file() or not sidecar.is_file():
        raise UserError(
            f"{npy}: no cached stack {stack} for study {study_id} series {series_id}; "
            f"run lsdc preprocess (see {cache.report})"
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
    """The cached stacks of a cache folder: one row per stack (INDEX_COLUMNS;
    :meth:`CacheDir.read_index`).

    Raises:
        UserError: the folder has no index.
    """
    return CacheDir(cache_dir).read_index()


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


# ----------------------------------------------------------------------------- derived files
def stack_fingerprint(cache_dir: str | Path, keys: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``(len(keys), 4)`` int64: series_id, stack, byte size and modification time (ns) of each
    ``(study_id, series_id, stack)`` array; a stack cached again, or another set of stacks,
    gives another fingerprint."""
    cache = CacheDir(cache_dir)
    rows = []
    for study_id, series_id, stack in keys:
        info = cache.stack(study_id, series_id, stack)[0].stat()
        rows.append((series_id, stack, info.st_size, info.st_mtime_ns))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def read_derived(path: Path, fingerprint: np.ndarray) -> dict[str, np.ndarray] | None:
    """The arrays of a derived file; None when it is missing, unreadable, or was made from
    other stacks than ``fingerprint`` says (the caller computes it again)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError):
        return None
    made_from = arrays.pop("fingerprint", None)
    if made_from is None or not np.array_equal(made_from, fingerprint):
        return None
    return arrays


def write_derived(path: Path, fingerprint: np.ndarray, **arrays: np.ndarray) -> bool:
    """Write a derived file atomically (with the fingerprint of the stacks it was made from).

    Returns:
        False, having written nothing, where the cache cannot be written (a read-only cache is
        served by computing again on every read).
    """
    try:
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.savez(handle, fingerprint=fingerprint, **arrays)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------- resampling
def resample_stack(
    array: np.ndarray, geometry: StackGeometry, spacing: Sequence[float]
) -> tuple[np.ndarray, StackGeometry]:
    """Linearly resample a stack to ``spacing`` = (slice, row, col) mm (the original project's
    ``enable_spatial_scaling``), returning the new array and its exact geometry.

    The slice axis follows the actual slice offsets, so uneven gaps are resampled correctly.
    Integer stacks stay in their dtype (rounded). The extent starts at voxel (0, 0, 0) and keeps
    the whole source: along each axis the last sample lies at or (by less than one step) beyond
    the last source voxel, and such overhanging samples take the edge value, so a crop near the
    stack's far edge reads the same image as on the source grid, never planes of zeros.
    """
    s_mm, r_mm, c_mm = (float(x) for x in spacing)
    offsets = geometry.slice_offsets
    along = 1.0 if offsets[-1] >= 0 else -1.0
    targets = geometry.positions[0] + np.outer(
        along * _samples(abs(offsets[-1]), s_mm), geometry.normal
    )
    slice_coords = geometry.patient_to_voxel(targets)[:, 0]
    row_coords = _samples((array.shape[1] - 1) * geometry.pixel_spacing[0], r_mm)
    col_coords = _samples((array.shape[2] - 1) * geometry.pixel_spacing[1], c_mm)
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


def _samples(extent_mm: float, step_mm: float) -> np.ndarray:
    """Sample positions 0, step, 2 step, ... up to the first at or beyond ``extent_mm``."""
    return np.arange(int(np.ceil(extent_mm / step_mm - 1e-6)) + 1) * step_mm


def _lerp_axis(a: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Sample ``a`` at fractional indices ``coords`` along one axis (linear interpolation;
    indices outside the axis take its edge value)."""
    n = a.shape[axis]
    if n == 1:
        return np.repeat(a, len(coords), axis=axis)
    coords = np.clip(coords, 0, n - 1)  # beyond the source: the edge value
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

    Series already cached (an entry whose files match its record) are skipped, so an interrupted
    run resumes where it stopped; a broken entry is redone. One bad series never stops the run:
    it becomes an ``error`` row of the report. The run holds the cache's lock from start to end.

    Returns:
        The report of the series asked for (REPORT_COLUMNS): one row per stack or failed series.

    Raises:
        UserError: bad arguments, a missing CSV or image folder, a cache folder that cannot be
            written, a cache built with other settings or being written by another run, or not a
            single series readable.
    """
    data_root, cache_dir = Path(data_root), Path(cache_dir)
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if workers < 1:
        raise UserError(f"`workers` must be at least 1, got {workers}")
    if spacing is not None:
        spacing = [float(x) for x in spacing]
        if len(spacing) != 3 or not all(np.isfinite(x) and x > 0 for x in spacing):
            raise UserError(f"`spacing` needs three positive millimetre values, got {spacing}")
    series = load_series_descriptions(data_root / f"{split}_series_descriptions.csv")
    images = data_root / f"{split}_images"
    if not images.is_dir():
        raise UserError(f"{images}: image folder not found")
    wanted = series
    if study_ids is not None:
        wanted = series[series["study_id"].isin([int(s) for s in study_ids])]

    cache = CacheDir(cache_dir)
    with cache_lock(cache_dir):
        _claim_cache(cache_dir, split, spacing)
        _remove_partial_entries(cache_dir)
        _remove_broken_entries(cache_dir, series)
        todo = [
            (images, cache_dir, int(r.study_id), int(r.series_id), r.series_description, spacing)
            for r in wanted.itertuples(index=False)
            if not cache.record(r.study_id, r.series_id).is_file()
        ]
        written = _cache_all(todo, workers, progress, f"preprocess {split}")
        all_rows = _collect_rows(cache_dir, series, written)
        report = pd.DataFrame(all_rows, columns=INDEX_COLUMNS)
        write_csv_atomic(report[REPORT_COLUMNS], cache.report)
        write_csv_atomic(report[report["status"] != "error"], cache.index)
    key = set(zip(wanted["study_id"], wanted["series_id"], strict=True))
    asked = report[[k in key for k in zip(report["study_id"], report["series_id"], strict=True)]]
    if len(asked) and (asked["status"] == "error").all():
        raise UserError(f"no series could be read ({len(asked)} failed); see {cache.report}")
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

    Runs in a worker process. Any failure of this one series' files, expected (bad files) or
    not, becomes an error row, so the run goes on. A failure of the machine (a full disk, no
    memory, a permission, :func:`lsdc.utils.is_machine_failure`) is raised instead and nothing
    is published: it says nothing about the series, and a rerun redoes it.
    """
    folder = images / str(study_id) / str(series_id)
    final = CacheDir(cache_dir).entry(study_id, series_id)
    with disk_errors(final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{series_id}-", dir=final.parent))
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
        except MemoryError:
            raise MachineError(
                f"{folder}: out of memory while reading this series (nothing recorded; rerun "
                "with fewer `workers` or on a machine with more memory)"
            ) from None
        except Exception as exc:  # one series' surprise must not stop a 6,000-series run
            if is_machine_failure(exc):
                raise  # the machine's failure is no verdict on the series: a rerun redoes it
            for leftover in tmp.iterdir():
                leftover.unlink()
            rows = [_error_row(base, f"{folder}: unexpected {type(exc).__name__}: {exc}")]
        _publish_entry(tmp, final, rows)
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
    """Write one stack, put in the canonical in-plane orientation (a series stored with rows or
    columns reversed is flipped, its geometry moved with it) and then resampled to ``spacing``;
    ``source_geometry`` stays the stored one, where the CSVs' pixel coordinates live."""
    array, geometry, (flip_rows, flip_columns) = canonical_in_plane(volume.array, volume.geometry)
    if spacing is not None:
        array, geometry = resample_stack(array, geometry, spacing)
    npy, sidecar_name = stack_file_names(stack)
    with disk_errors(folder.parent, array.nbytes):
        np.save(folder / npy, array, allow_pickle=False)
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
        "flipped": {"rows": flip_rows, "columns": flip_columns},
        "meta": meta,
    }
    write_json_atomic(sidecar, folder / sidecar_name)
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


class CacheBusyError(FolderBusyError):
    """Another run holds the cache's writer lock."""


def check_cache_settings(
    cache_dir: str | Path, split: str, spacing: Sequence[float] | None = None
) -> None:
    """Refuse a cache folder built with other settings (another split, spacing or format): a
    resumed run must not mix two in one folder. Reads only (``lsdc predict`` asks first).

    Raises:
        UserError: ``cache.json`` says otherwise, or cannot be read.
    """
    settings = _cache_settings(split, spacing)
    path = CacheDir(cache_dir).settings
    if path.is_file():
        try:
            existing = read_json(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable ({exc}); use a new `cache_dir` folder") from exc
        if existing != settings:
            raise UserError(
                f"{path}: this cache was built with {existing}; this run asks for {settings}. "
                "Use a new `cache_dir` folder."
            )


def _cache_settings(split: str, spacing: Sequence[float] | None) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "split": split,
        "spacing": None if spacing is None else [float(x) for x in spacing],
    }


def _claim_cache(cache_dir: Path, split: str, spacing: list[float] | None) -> None:
    """Write cache.json, or check that an existing cache was built with the same settings."""
    check_cache_settings(cache_dir, split, spacing)
    settings = CacheDir(cache_dir).settings
    if not settings.is_file():
        write_json_atomic(_cache_settings(split, spacing), settings)


def _remove_partial_entries(cache_dir: Path) -> None:
    """Delete the temporary folders a killed run left behind (safe: this run holds the lock, so
    no other run is writing one)."""
    for partial in CacheDir(cache_dir).partial_entries():
        shutil.rmtree(partial, ignore_errors=True)


def cache_lock(cache_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the cache's writer lock (``preprocess.lock``, :func:`lsdc.utils.writer_lock`) for the
    block: a second run refuses at once, naming the holder's pid, instead of deleting that run's
    temporary entries.

    Raises:
        UserError: the cache path is a file or cannot be written.
        CacheBusyError: another run holds the lock.
    """
    busy = (
        "another lsdc preprocess (pid {pid}) is writing this cache; "
        "wait for it to end, or use another `cache_dir`"
    )
    return writer_lock(
        cache_dir, CacheDir(cache_dir).lock_name, "`cache_dir`", busy, CacheBusyError
    )


def _cache_all(
    todo: list[tuple[Any, ...]], workers: int, progress: bool, desc: str
) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Run :func:`cache_series` over ``todo``, in this process or in a pool of ``workers``,
    each with a heap that reuses freed buffers (:func:`lsdc.utils.keep_freed_memory`; in this
    process too, for the rest of its life). Returns each series' report rows, by
    ``(study_id, series_id)``: what its record says, so the report need not read it back.

    Pool workers die with this process (:func:`lsdc.utils.init_worker`); on any exit from
    here (an error, Ctrl-C) the series not started are cancelled and the running ones waited
    for, so no worker writes into the cache once this returns or raises (and the lock is let go).
    The pool starts by :func:`lsdc.utils.worker_context` (forked where that is safe).
    """
    rows: dict[tuple[int, int], list[dict[str, Any]]] = {}
    if workers == 1 or len(todo) <= 1:
        keep_freed_memory()
        with tqdm(total=len(todo), disable=not progress, unit="series", desc=desc) as bar:
            for task in todo:
                rows[task[2], task[3]] = cache_series(*task)
                bar.update()
        return rows
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(todo)),
        mp_context=worker_context(),
        initializer=_init_cache_worker,
        initargs=(os.getpid(),),
    )
    try:
        futures = {pool.submit(cache_series, *task): (task[2], task[3]) for task in todo}
        with tqdm(total=len(todo), disable=not progress, unit="series", desc=desc) as bar:
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


def _init_cache_worker(parent_pid: int) -> None:
    init_worker(parent_pid)
    keep_freed_memory()


def _publish_entry(tmp: Path, final: Path, rows: list[dict[str, Any]]) -> None:
    """Record the entry's files with their sizes in ``SERIES_RECORD`` and rename the folder into
    place, only if every file its rows need is there.

    Raises:
        UserError: a file of the entry vanished while it was written (something else deletes in
            this cache); nothing is published.
    """
    files = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
    missing = [name for name in _needed_files(rows) if name not in files]
    if missing:
        raise UserError(
            f"{tmp}: {', '.join(missing)} vanished while the entry was written; is another "
            "program deleting files in this cache?"
        )
    write_json_atomic({"rows": rows, "files": files}, tmp / SERIES_RECORD)
    os.replace(tmp, final)


def _needed_files(rows: list[dict[str, Any]]) -> list[str]:
    """The files an entry must hold: the array and sidecar of every stack its rows report."""
    return [
        name for row in rows if row["status"] != "error" for name in stack_file_names(row["stack"])
    ]


def entry_problem(entry: Path) -> str | None:
    """What is wrong with a published series entry, or None when it is whole: its record must be
    readable and every file it lists present with the recorded size (entries written before
    sizes were recorded: every stack's array and sidecar present)."""
    record_path = entry / SERIES_RECORD
    if not record_path.is_file():
        return f"{SERIES_RECORD} missing"
    try:
        record = read_json(record_path)
        rows = record["rows"]
        files = record.get("files") or dict.fromkeys(_needed_files(rows))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{SERIES_RECORD} unreadable ({type(exc).__name__}: {exc})"
    for name, size in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its record says {size}"
    return None


def _remove_broken_entries(cache_dir: Path, series: pd.DataFrame) -> None:
    """Delete every entry of ``series`` that :func:`entry_problem` finds broken (logging a
    warning), so that this run writes it again."""
    cache = CacheDir(cache_dir)
    for r in series.itertuples(index=False):
        entry = cache.entry(r.study_id, r.series_id)
        if not entry.is_dir():
            continue
        problem = entry_problem(entry)
        if problem is not None:
            log.warning("%s: broken cache entry (%s); redoing it", entry, problem)
            shutil.rmtree(entry)


def _collect_rows(
    cache_dir: Path, series: pd.DataFrame, written: dict[tuple[int, int], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Every series' report rows in (study_id, series_id) order: those of the series this run
    wrote as :func:`cache_series` returned them (``written``), the others from their records."""
    cache = CacheDir(cache_dir)
    rows: list[dict[str, Any]] = []
    for r in series.sort_values(["study_id", "series_id"]).itertuples(index=False):
        key = (int(r.study_id), int(r.series_id))
        record = cache.record(r.study_id, r.series_id)
        if key in written:
            rows.extend(written[key])
        elif record.is_file():
            rows.extend(read_json(record)["rows"])
    return rows
