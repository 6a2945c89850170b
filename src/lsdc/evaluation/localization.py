"""Stage 1's out-of-fold point errors: where a run that locates findings put them, against the
labelled points (``train_label_coordinates.csv``), through the one serving path
(:class:`lsdc.tasks.served.ServedRun`), so any task whose ``locate`` hook answers is measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdc.contract import (
    CONDITION_GROUP,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    label_index,
    load_label_coordinates,
)
from lsdc.datasets.levels import LABEL_SERIES, StackStore, label_points_mm
from lsdc.tasks.served import ServedRun

GROUP_OF_LABEL = np.array([CONDITION_GROUP[c] for c in CONDITIONS for _ in LEVELS])


def localization_oof(served: ServedRun, data_root: str | Path) -> pd.DataFrame:
    """Every labelled point of every validation study, against the point its fold's model finds.

    Each trained fold localises its own validation studies (``RUN/folds.csv``); the point is
    compared with the labelled centre in mm, and the slice it falls on (in the source geometry of
    the labelled series: which parasagittal T1 slice, which axial slice) with the labelled slice.

    Returns:
        One row per (study, label column) with a labelled point: study_id, label, group, series,
        error_mm, slice_true, slice_pred; empty when the run's task locates nothing or no
        validation study has a labelled point.
    """
    coordinates = load_label_coordinates(Path(data_root) / "train_label_coordinates.csv")
    store = StackStore(served.cache_dir, in_memory=False)
    rows: list[dict[str, Any]] = []
    for study_id, fold in sorted(served.fold_of.items(), key=lambda item: (item[1], item[0])):
        if fold not in served.paths:
            continue
        points = served.locate(study_id, folds=[fold])
        if points is None:
            return pd.DataFrame(rows)
        rows.extend(_point_errors(store, coordinates, study_id, points))
    return pd.DataFrame(rows)


def localization_summary(served: ServedRun, data_root: str | Path) -> dict[str, Any] | None:
    """A run's out-of-fold point errors (``localization_oof``) as JSON-ready
    numbers: the summary per scoring group and the median / p90 per label; None when the
    task locates nothing or no validation study has a labelled point."""
    errors = localization_oof(served, data_root)
    if errors.empty:
        return None
    by_label = errors.groupby("label")["error_mm"]
    per_label: dict[str, dict[str, dict[str, float] | None]] = {}
    for condition in CONDITIONS:
        per_label[condition] = {}
        for level in LEVELS:
            column = f"{condition}_{level}"
            if column not in by_label.groups:
                per_label[condition][level] = None
                continue
            values = by_label.get_group(column)
            per_label[condition][level] = {
                "n": int(values.size),
                "median_mm": float(values.median()),
                "p90_mm": float(values.quantile(0.9)),
            }
    summary = summarize_localization(errors).to_dict(orient="records")
    return {"summary": summary, "per_label": per_label}


def _point_errors(
    store: StackStore, coordinates: pd.DataFrame, study_id: int, predicted: np.ndarray
) -> list[dict[str, Any]]:
    truth = label_points_mm(store, coordinates, study_id)
    rows = []
    for row in coordinates[coordinates["study_id"] == study_id].itertuples():
        j = label_index(row.condition_key, row.level_key)
        for key in store.series_stacks(study_id, int(row.series_id)):
            source = store.load(key).source_geometry
            if int(row.instance_number) not in source.instance_numbers:
                continue
            slice_true = source.slice_index(int(row.instance_number))
            voxel = source.patient_to_voxel(predicted[j][None])[0]
            rows.append(
                {
                    "study_id": study_id,
                    "label": LABEL_COLUMNS[j],
                    "group": GROUP_OF_LABEL[j],
                    "series": LABEL_SERIES[j],
                    "error_mm": float(np.linalg.norm(predicted[j] - truth[j])),
                    "slice_true": slice_true,
                    "slice_pred": int(np.clip(np.round(voxel[0]), 0, source.n_slices - 1)),
                }
            )
            break
    return rows


def summarize_localization(errors: pd.DataFrame) -> pd.DataFrame:
    """Per scoring group and overall: median and 90th-percentile point error (mm), slice
    accuracy exact and within one slice."""

    def summary(frame: pd.DataFrame) -> dict[str, float]:
        off = (frame["slice_pred"] - frame["slice_true"]).abs()
        return {
            "points": len(frame),
            "median_mm": float(frame["error_mm"].median()),
            "p90_mm": float(frame["error_mm"].quantile(0.9)),
            "slice_exact": float((off == 0).mean()),
            "slice_within_1": float((off <= 1).mean()),
        }

    rows = [{"group": g, **summary(f)} for g, f in errors.groupby("group", sort=False)]
    rows.append({"group": "all", **summary(errors)})
    return pd.DataFrame(rows)
