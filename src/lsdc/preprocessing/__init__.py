"""DICOM series -> cached, oriented stacks with exact geometry (``docs/cache.md``)."""

from lsdc.preprocessing.cache import (
    CachedStack,
    best_stacks,
    load_stack,
    preprocess_split,
    read_cache_index,
)
from lsdc.preprocessing.dicom import SeriesReadError, Volume, read_series
from lsdc.preprocessing.geometry import StackGeometry, project_point

__all__ = [
    "CachedStack",
    "SeriesReadError",
    "StackGeometry",
    "Volume",
    "best_stacks",
    "load_stack",
    "preprocess_split",
    "project_point",
    "read_cache_index",
    "read_series",
]
