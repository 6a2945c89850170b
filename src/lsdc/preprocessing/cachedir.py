"""The one owner of a cache folder's layout: every file name of a cache is spelled here and only
here, and its two tables (the index and the report) are read here.

A cache folder (``lsdc preprocess --cache CACHE``, docs/cache.md) holds::

    CACHE/cache.json                  the settings it was built with (format, split, spacing)
    CACHE/index.csv                   one row per cached stack (INDEX_COLUMNS)
    CACHE/preprocess_report.csv       one row per cached stack or failed series (REPORT_COLUMNS)
    CACHE/preprocess.lock             the writer's lock (the holder's pid; empty when free)
    CACHE/{study}/{series}/series.json   the series' report rows and the size of each file
    CACHE/{study}/{series}/{k}.npy       stack k, canonical in-plane orientation
    CACHE/{study}/{series}/{k}.json      stack k's geometry and metadata
    CACHE/{study}/grid{v}-{description}-{S}x{R}x{C}.npz   a series on a grid, once computed
    CACHE/{study}/.tmp-{series}-*/    a series entry being written (deleted by the next run)

A series entry is complete exactly when its ``series.json`` is present.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.errors import UserError

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
SERIES_RECORD = "series.json"
"""Per-series record: its report rows and the size of every file of the entry; present exactly
when the series entry is complete."""
LOCK_NAME = "preprocess.lock"
"""The writer's lock file: ``flock``-ed by the run writing the cache, holding its pid (empty when
no run holds it). The kernel drops the lock when its holder dies, so a killed run leaves none."""
TMP_PREFIX = ".tmp-"
"""Name prefix of a series entry being written, beside its final place."""
DERIVED_FORMAT = 1
"""Version of what a derived file holds (part of its name): bump it when the computation that
makes one changes, so that older files are ignored rather than served."""


def stack_file_names(stack: int) -> tuple[str, str]:
    """The array's and the sidecar's file names of stack ``stack`` inside its series entry."""
    return f"{int(stack)}.npy", f"{int(stack)}.json"


@dataclass(frozen=True)
class CacheDir:
    """A cache folder's paths and tables; creating one touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def settings(self) -> Path:
        """``cache.json``: the format, split and spacing the cache was built with."""
        return self.root / "cache.json"

    @property
    def index(self) -> Path:
        return self.root / "index.csv"

    @property
    def report(self) -> Path:
        return self.root / "preprocess_report.csv"

    @property
    def lock_name(self) -> str:
        """The writer lock's file name (``lsdc preprocess`` holds it)."""
        return LOCK_NAME

    def study(self, study_id: int) -> Path:
        return self.root / str(int(study_id))

    def entry(self, study_id: int, series_id: int) -> Path:
        """The folder of one series (complete when its :meth:`record` is there)."""
        return self.study(study_id) / str(int(series_id))

    def record(self, study_id: int, series_id: int) -> Path:
        return self.entry(study_id, series_id) / SERIES_RECORD

    def stack(self, study_id: int, series_id: int, stack: int = 0) -> tuple[Path, Path]:
        """The ``.npy`` and ``.json`` paths of one cached stack."""
        entry = self.entry(study_id, series_id)
        npy, sidecar = stack_file_names(stack)
        return entry / npy, entry / sidecar

    def series_grid(self, study_id: int, description: str, shape: Sequence[int]) -> Path:
        """Where the study's ``description`` series on a ``shape`` grid is kept once computed:
        ``{study_id}/grid{DERIVED_FORMAT}-{description}-{S}x{R}x{C}.npz``, the description in
        lower case with every other character a dash (``grid1-sagittal-t2-stir-32x128x128.npz``)."""
        slug = "".join(c if c.isalnum() else "-" for c in description.lower())
        size = "x".join(str(int(n)) for n in shape)
        return self.study(study_id) / f"grid{DERIVED_FORMAT}-{slug}-{size}.npz"

    def partial_entries(self) -> Iterator[Path]:
        """The temporary folders of series entries being written (or left by a killed run)."""
        return self.root.glob(f"*/{TMP_PREFIX}*")

    def read_index(self) -> pd.DataFrame:
        """The cached stacks: one row per stack (INDEX_COLUMNS).

        Raises:
            UserError: the folder has no index, or the index lacks a column.
        """
        if not self.index.is_file():
            raise UserError(f"{self.index}: not found; run lsdc preprocess to build the cache")
        index = _read_table(self.index, INDEX_COLUMNS)
        for c in ("rows", "cols"):
            index[c] = index[c].astype(np.int64)
        return index

    def read_report(self) -> pd.DataFrame:
        """The preprocessing report (REPORT_COLUMNS): one row per cached stack or failed series;
        empty when the cache has none (nothing was preprocessed into it yet).

        Raises:
            UserError: the report lacks a column.
        """
        if not self.report.is_file():
            return pd.DataFrame(columns=REPORT_COLUMNS)
        return _read_table(self.report, REPORT_COLUMNS)


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    """A cache table with its ``columns`` (messages kept as text, ids as int64)."""
    table = pd.read_csv(path, dtype={"message": str}, keep_default_na=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}")
    for c in ("study_id", "series_id", "stack", "n_slices"):
        table[c] = table[c].astype(np.int64)
    return table[columns]
