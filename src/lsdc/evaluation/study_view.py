"""The study viewer's first concern: which slices of a study to show, and what to mark on them.

:class:`StudyViewer` opens a run through :class:`lsdc.tasks.served.ServedRun`, asks it to
explain one study (probabilities, and the points and crops the run's task can show: a task hook,
so nothing here knows a task class) and chooses each series' most informative slices: the
mid-sagittal T2/STIR for the canal, the left and right parasagittal T1 slices through the
foramina, the axial slice nearest each level, each marked with the predicted and the labelled
points. The result, a :class:`StudyView`, is plain data that ``drawing.py`` turns into pictures
and ``viewer.py`` into pages.

Torch is imported only inside the functions that run a model: importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdc.contract import (
    CLASS_WEIGHTS,
    IGNORE_INDEX,
    LEVEL_NAMES,
    LEVELS,
    N_LABELS,
    SERIES_DESCRIPTIONS,
    SPLITS,
    label_index,
    labels_to_indices,
    load_label_coordinates,
    load_series_descriptions,
    load_train_labels,
)
from lsdc.datasets.crops import locate_in_stacks
from lsdc.errors import UserError
from lsdc.evaluation.metric import weighted_log_loss
from lsdc.preprocessing.cachedir import CacheDir
from lsdc.preprocessing.geometry import StackGeometry
from lsdc.utils import check_input_dir


@dataclass(frozen=True)
class SagittalViewSpec:
    """One sagittal view: which series, which findings' points choose and mark its slice.

    Attributes:
        toward_left: without any point, the slice this far along the patient's right->left axis
            (0.5 = middle slice).
    """

    description: str
    condition: str
    title: str
    toward_left: float


SAGITTAL_VIEWS: tuple[SagittalViewSpec, ...] = (
    SagittalViewSpec("Sagittal T2/STIR", "spinal_canal_stenosis", "mid-sagittal: canal", 0.5),
    SagittalViewSpec(
        "Sagittal T1", "left_neural_foraminal_narrowing", "left parasagittal: left foramina", 0.75
    ),
    SagittalViewSpec(
        "Sagittal T1",
        "right_neural_foraminal_narrowing",
        "right parasagittal: right foramina",
        0.25,
    ),
)
AXIAL_CONDITIONS: tuple[str, str] = ("left_subarticular_stenosis", "right_subarticular_stenosis")


# ----------------------------------------------------------------------------------- the view
@dataclass(frozen=True)
class Mark:
    """One point drawn on a slice, in that slice's voxel indices.

    Attributes:
        label: its label column (index into LABEL_COLUMNS).
        name: what the page writes beside it (a level on sagittal views, a side on axial ones).
        predicted: stage 1's point (True) or the labelled one.
        off_slices: signed distance of the point from the shown slice, in slices (a point is drawn
            where it projects onto the slice along the normal).
    """

    label: int
    name: str
    predicted: bool
    row: float
    col: float
    off_slices: float


@dataclass
class SliceView:
    """One slice of one series with its marks; ``image`` None when the series is missing."""

    title: str
    image: np.ndarray | None
    pixel_spacing: tuple[float, float]
    marks: list[Mark]
    note: str


@dataclass
class StudyView:
    """Everything a page shows about one study.

    Attributes:
        probs: (25, 3) predicted probabilities (NaN where the source has no row).
        probs_from: one line saying where ``probs`` come from.
        points_from: one line saying which model predicted the points (or why there are none).
        truth: (25,) class index per label, IGNORE_INDEX where unlabelled; None for a study
            without labels.
        predicted_points / labelled_points: (25, 3) patient mm, NaN unknown; None if none.
        crops: (25, planes, size, size) stage-2 crops as the grader reads them (right-sided ones
            mirrored), with ``crops_present`` (25,); None for a run without a stage 2.
        sagittal / axial: the slices drawn.
        missing: series description -> why the study has no image of it.
    """

    study_id: int
    probs: np.ndarray
    probs_from: str
    points_from: str
    truth: np.ndarray | None
    predicted_points: np.ndarray | None
    labelled_points: np.ndarray | None
    crops: np.ndarray | None
    crops_present: np.ndarray | None
    sagittal: list[SliceView]
    axial: list[SliceView]
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def point_errors(self) -> np.ndarray:
        """(25,) distance in mm between predicted and labelled point; NaN where one is unknown."""
        if self.predicted_points is None or self.labelled_points is None:
            return np.full(N_LABELS, np.nan)
        return np.linalg.norm(self.predicted_points - self.labelled_points, axis=1)

    @property
    def row_losses(self) -> np.ndarray:
        """(25,) -log p(true class) of each labelled row (NaN unlabelled or unpredicted)."""
        losses = np.full(N_LABELS, np.nan)
        if self.truth is None:
            return losses
        for j in np.flatnonzero(self.truth != IGNORE_INDEX):
            p = self.probs[j]
            if np.isfinite(p).all():
                losses[j] = weighted_log_loss(np.eye(3)[self.truth[j]][None], p[None], np.ones(1))
        return losses

    @property
    def loss(self) -> float | None:
        """Weighted log loss of the study's labelled, predicted rows (weights 1/2/4 as scored)."""
        if self.truth is None:
            return None
        rows = np.flatnonzero((self.truth != IGNORE_INDEX) & np.isfinite(self.probs).all(axis=1))
        if rows.size == 0:
            return None
        weights = np.asarray(CLASS_WEIGHTS)[self.truth[rows]]
        return weighted_log_loss(np.eye(3)[self.truth[rows]], self.probs[rows], weights)


# --------------------------------------------------------------------------------- the viewer
class StudyViewer:
    """Draws studies of one cache with one run's models and, where the root has them, labels.

    Args:
        run_dir: the run whose models predict (and, for a two-stage run, localise and crop).
        cache_dir: the preprocessed cache holding the studies (train or test split).
        data_root: competition root: ``train.csv`` and ``train_label_coordinates.csv`` give the
            truth and the labelled points of training studies, ``{split}_series_descriptions.csv``
            tells a series the study lacks from one that could not be read.
    """

    def __init__(
        self, run_dir: str | Path, cache_dir: str | Path, data_root: str | Path | None
    ) -> None:
        from lsdc.datasets.levels import StackStore
        from lsdc.tasks.served import ServedRun

        check_input_dir(Path(run_dir), "run")
        self.store = StackStore(cache_dir, in_memory=False)
        self.served = ServedRun(run_dir, cache_dir, device="cpu")
        self.served.model(self.served.folds[0])  # a run that cannot load fails here, early
        self.data_root = None if data_root is None else Path(data_root)
        self.labels: pd.DataFrame | None = None
        self.coordinates: pd.DataFrame | None = None
        listings = []
        if data_root is not None:
            root = Path(data_root)
            if (root / "train.csv").is_file():
                self.labels = load_train_labels(root / "train.csv").set_index("study_id")
            if (root / "train_label_coordinates.csv").is_file():
                self.coordinates = load_label_coordinates(root / "train_label_coordinates.csv")
            for split in SPLITS:
                path = root / f"{split}_series_descriptions.csv"
                if path.is_file():
                    listings.append(load_series_descriptions(path).assign(listed_in=path.name))
        self.listed = pd.concat(listings, ignore_index=True) if listings else None

    def localization(self) -> dict[str, Any] | None:
        """Stage 1's out-of-fold error (:func:`lsdc.evaluation.localization.localization_summary`);
        None for a run whose task locates nothing or without the root's labelled points."""
        if self.coordinates is None or self.data_root is None:
            return None
        from lsdc.evaluation.localization import localization_summary

        return localization_summary(self.served, self.data_root)

    def truth(self, study_id: int) -> np.ndarray | None:
        """(25,) class indices of a study in train.csv; None for any other study."""
        if self.labels is None or study_id not in self.labels.index:
            return None
        return labels_to_indices(self.labels.loc[[study_id]].reset_index())[0]

    def missing_series(self, study_id: int) -> dict[str, str]:
        """Series description -> why the cache has no image of it (absent ones only)."""
        listed = (
            self.listed[self.listed["study_id"] == study_id]
            if self.listed is not None
            else pd.DataFrame(columns=["series_id", "series_description", "listed_in"])
        )
        missing = {}
        for description in SERIES_DESCRIPTIONS:
            if self.store.stacks(study_id, description):
                continue
            rows = listed[listed["series_description"] == description]
            if rows.empty:
                missing[description] = "the study has no such series"
            else:
                ids = ", ".join(str(int(s)) for s in rows["series_id"])
                missing[description] = (
                    f"series {ids} is listed in {rows['listed_in'].iloc[0]} but not in the cache "
                    f"(unreadable: see {CacheDir(self.store.cache_dir).report})"
                )
        return missing

    def view(
        self,
        study_id: int,
        probs: np.ndarray | None = None,
        truth: np.ndarray | None = None,
        probs_from: str | None = None,
    ) -> StudyView:
        """Run the model on one study and choose its slices.

        Args:
            probs: (25, 3) probabilities to show instead of the model's (e.g. a prediction file's
                rows, NaN where it has none), with ``probs_from`` saying where they come from.
            truth: (25,) class indices to score against instead of train.csv's.

        Raises:
            UserError: the study is neither in the cache nor listed in the root's series CSVs.
        """
        study_id = int(study_id)
        known = study_id in set(self.store.study_ids().tolist()) or (
            self.listed is not None and (self.listed["study_id"] == study_id).any()
        )
        if not known:
            raise UserError(
                f"study {study_id}: not in {CacheDir(self.store.cache_dir).index} nor in any "
                "{train,test}_series_descriptions.csv of the data root"
            )
        output = self.served.explain(study_id)
        labelled = None
        if self.coordinates is not None and self.truth(study_id) is not None:
            from lsdc.datasets.levels import label_points_mm

            labelled = label_points_mm(self.store, self.coordinates, study_id)
        sagittal, axial = self.slices(study_id, output.points, labelled)
        return StudyView(
            study_id=study_id,
            probs=output.probs if probs is None else np.asarray(probs, dtype=np.float64),
            probs_from=output.source if probs_from is None else probs_from,
            points_from=(
                output.source if output.points is not None else "the run has no stage 1: no points"
            ),
            truth=self.truth(study_id) if truth is None else np.asarray(truth, dtype=np.int64),
            predicted_points=output.points,
            labelled_points=labelled,
            crops=output.crops,
            crops_present=output.crops_present,
            sagittal=sagittal,
            axial=axial,
            missing=self.missing_series(study_id),
        )

    def slices(
        self, study_id: int, predicted: np.ndarray | None, labelled: np.ndarray | None
    ) -> tuple[list[SliceView], list[SliceView]]:
        """The sagittal views and the axial slices of a study, chosen by the points (predicted
        first, else labelled; by position without any) and marked with both sets.

        Args:
            predicted / labelled: (25, 3) patient points, NaN unknown, or None.
        """
        missing = self.missing_series(int(study_id))
        sagittal = [
            self._sagittal(int(study_id), spec, predicted, labelled, missing)
            for spec in SAGITTAL_VIEWS
        ]
        return sagittal, self._axial(int(study_id), predicted, labelled, missing)

    # ------------------------------------------------------------------------------ slices
    def _sagittal(
        self,
        study_id: int,
        spec: SagittalViewSpec,
        predicted: np.ndarray | None,
        labelled: np.ndarray | None,
        missing: dict[str, str],
    ) -> SliceView:
        title = f"{spec.description}, {spec.title}"
        key = self.store.best.get((study_id, spec.description))
        if key is None:
            return SliceView(title, None, (1.0, 1.0), [], f"missing: {missing[spec.description]}")
        stack = self.store.load(key)
        geometry, n = stack.geometry, stack.array.shape[0]
        labels = [label_index(spec.condition, level) for level in LEVELS]
        shown, how = None, ""
        for points, whose in ((predicted, "predicted"), (labelled, "labelled")):
            known = [] if points is None else [j for j in labels if np.isfinite(points[j]).all()]
            if known:
                slices = geometry.patient_to_voxel(points[known])[:, 0]
                shown = int(np.clip(np.round(np.median(slices)), 0, n - 1))
                how = f"median slice of the {whose} points"
                break
        if shown is None:
            toward = spec.toward_left if geometry.normal[0] >= 0 else 1.0 - spec.toward_left
            shown = int(round(toward * (n - 1)))
            how = "no points: chosen by position"
        marks = _marks(
            geometry,
            shown,
            labels,
            [LEVEL_NAMES[j % len(LEVELS)] for j in labels],
            predicted,
            labelled,
        )
        note = f"series {key[1]}, slice {shown + 1} of {n} ({how})"
        return SliceView(title, _slice(stack.array, shown), geometry.pixel_spacing, marks, note)

    def _axial(
        self,
        study_id: int,
        predicted: np.ndarray | None,
        labelled: np.ndarray | None,
        missing: dict[str, str],
    ) -> list[SliceView]:
        keys = self.store.stacks(study_id, "Axial T2")
        if not keys:
            return [SliceView("Axial T2", None, (1.0, 1.0), [], f"missing: {missing['Axial T2']}")]
        stacks = [self.store.load(k) for k in keys]
        geometries = [s.geometry for s in stacks]
        shapes = [s.array.shape for s in stacks]
        views = []
        for lv, level in enumerate(LEVELS):
            centre, whose = _level_centre(predicted, level), "predicted"
            if centre is None:
                centre, whose = _level_centre(labelled, level), "labelled"
            if centre is None:
                continue
            k, voxel = locate_in_stacks(centre, geometries, shapes)
            n = shapes[k][0]
            shown = int(np.clip(np.round(voxel[0]), 0, n - 1))
            beyond = "" if -0.5 <= voxel[0] <= n - 0.5 else "; the level lies beyond every stack"
            labels = [label_index(c, level) for c in AXIAL_CONDITIONS]
            marks = _marks(geometries[k], shown, labels, ["L", "R"], predicted, labelled)
            stack_name = f", stack {keys[k][2]}" if len(keys) > 1 else ""
            note = (
                f"series {keys[k][1]}{stack_name}, slice {shown + 1} of {n} "
                f"(nearest the {whose} level{beyond})"
            )
            views.append(
                SliceView(
                    f"Axial T2 at {LEVEL_NAMES[lv]}",
                    _slice(stacks[k].array, shown),
                    geometries[k].pixel_spacing,
                    marks,
                    note,
                )
            )
        if views:
            return views
        key = self.store.best[(study_id, "Axial T2")]
        stack = self.store.load(key)
        n = stack.array.shape[0]
        return [
            SliceView(
                f"Axial T2 slice {s + 1} of {n}",
                _slice(stack.array, s),
                stack.geometry.pixel_spacing,
                [],
                f"series {key[1]}: no points, slices evenly spaced",
            )
            for s in sorted({int(round(x)) for x in np.linspace(0, n - 1, len(LEVELS))})
        ]


def _slice(array: np.ndarray, index: int) -> np.ndarray:
    return np.asarray(array[index], dtype=np.float32)


def _level_centre(points: np.ndarray | None, level: str) -> np.ndarray | None:
    """Where a level's axial slice should pass: the mean of its subarticular points, else its
    canal point; None when the level has neither."""
    if points is None:
        return None
    for conditions in (AXIAL_CONDITIONS, ("spinal_canal_stenosis",)):
        rows = points[[label_index(c, level) for c in conditions]]
        rows = rows[np.isfinite(rows).all(axis=1)]
        if len(rows):
            return rows.mean(axis=0)
    return None


def _marks(
    geometry: StackGeometry,
    shown: int,
    labels: list[int],
    names: list[str],
    predicted: np.ndarray | None,
    labelled: np.ndarray | None,
) -> list[Mark]:
    """The points of ``labels`` in the voxel frame of the shown slice's stack."""
    marks = []
    for points, is_predicted in ((labelled, False), (predicted, True)):
        if points is None:
            continue
        for j, name in zip(labels, names, strict=True):
            if not np.isfinite(points[j]).all():
                continue
            s, row, col = geometry.patient_to_voxel(points[j][None])[0]
            marks.append(Mark(j, name, is_predicted, float(row), float(col), float(s - shown)))
    return marks
