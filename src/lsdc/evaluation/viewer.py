"""The study viewer: one study as the model sees it, on one self-contained page.

On real data the first question is "where did it look?": a localizer one level too high, an
axial stack read upside down or a crop that misses the foramen is a bad number in a table and an
obvious mistake in a picture. For one study this draws each series at its most informative slices
(mid-sagittal T2/STIR for the canal, the left and right parasagittal T1 slices through the
foramina, the axial slice nearest each level) with the points stage 1 predicts and, where labels
exist, the labelled points (their distance in mm written); the 25 predicted rows against the
truth; and the stage-2 crops the grader reads. Whole-series runs get the same slices and table
(they predict no points and read no crops); a study without labels gets the predictions alone;
a series the study lacks, or that could not be read, shows as missing.

``lsdc show`` writes one such page (or one PNG); ``lsdc evaluate --run RUN --cache CACHE`` adds
to report.html a gallery of compact panels (the studies with the largest loss and a few random
ones), each linking to its full page in ``studies/``, and stage 1's error per level and side.
Every page is self-contained (images are JPEG and PNG data URIs) and opens offline in any browser.

Torch is imported only inside the functions that run a model: importing this module is cheap.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from lsdc.contract import (
    CLASS_WEIGHTS,
    CONDITIONS,
    IGNORE_INDEX,
    LABEL_COLUMNS,
    LEVEL_NAMES,
    LEVELS,
    N_LABELS,
    PRED_COLUMNS,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
    SPLITS,
    label_index,
    labels_to_indices,
    load_label_coordinates,
    load_series_descriptions,
    load_train_labels,
    study_row_ids,
)
from lsdc.datasets.crops import locate_in_stacks
from lsdc.errors import UserError
from lsdc.evaluation import plots
from lsdc.evaluation.metric import weighted_log_loss
from lsdc.preprocessing.geometry import StackGeometry
from lsdc.utils import atomic_path, check_input_dir, write_text_atomic

PREDICTED_RGB = (255, 40, 40)
"""Stage 1's predicted points: red crosses (no pixel of a grey slice is this red)."""
LABELLED_RGB = (40, 220, 90)
"""Labelled points (train_label_coordinates.csv): green circles."""
LINK_RGB = (255, 210, 0)
"""The line from a predicted point to its labelled point."""
TEXT_RGB = (255, 255, 170)

PAGE_SIDE = 300
"""Pixels of a slice's longer side (in mm) on a full page."""
THUMB_SIDE = 120
"""Pixels of a sagittal slice's longer side in a gallery panel."""
AXIAL_THUMB_SIDE = 72
CROP_CELL = 40
"""Pixels per side of one crop plane on a full page (the demo's crops are 32 px)."""

GALLERY_WORST = 8
"""Gallery panels of the studies with the largest loss."""
GALLERY_RANDOM = 4
"""Gallery panels of studies drawn at random (seeded) from the rest: what a typical study looks like."""
STUDIES_DIR = "studies"
"""Folder beside report.html holding the gallery's full pages, ``{study_id}.html``."""

CONDITION_SHORT: dict[str, str] = {
    "spinal_canal_stenosis": "canal",
    "left_neural_foraminal_narrowing": "L foramen",
    "right_neural_foraminal_narrowing": "R foramen",
    "left_subarticular_stenosis": "L subarticular",
    "right_subarticular_stenosis": "R subarticular",
}


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
                    "(unreadable: see the cache's preprocess_report.csv)"
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
                f"study {study_id}: not in {self.store.cache_dir / 'index.csv'} nor in any "
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


# ---------------------------------------------------------------------------------- pictures
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (np.asarray(values, dtype=np.float32) - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _jpeg_tag(image: Image.Image, alt: str) -> str:
    """An inline JPEG: MR images are noisy, so PNG would be three times larger. Quality 90 with
    full-resolution colour keeps the one-pixel marks crisp."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, subsampling=0)
    return plots.img_tag(buffer.getvalue(), alt, mime="image/jpeg")


def marker_position(
    mark: Mark, shape: tuple[int, int], size: tuple[int, int]
) -> tuple[float, float]:
    """Pixel (x, y) of a mark on a slice of ``shape`` (rows, cols) drawn at ``size`` (width,
    height): voxel centres land on the centres of the pixels they are resized onto."""
    rows, cols = shape
    return (mark.col + 0.5) * size[0] / cols - 0.5, (mark.row + 0.5) * size[1] / rows - 0.5


def slice_image(view: SliceView, side: int, errors: np.ndarray | None = None) -> Image.Image:
    """A slice at its physical aspect, the longer side ``side`` pixels, with its marks drawn:
    labelled points as green circles, predicted ones as red crosses joined to their labelled
    point; with ``errors`` (full pages) each predicted point's name, distance in mm and
    distance off the slice written beside it.

    Raises:
        ValueError: the view has no image (a missing series).
    """
    if view.image is None:
        raise ValueError(f"{view.title}: no image (missing series)")
    rows, cols = view.image.shape
    low, high = np.percentile(view.image, [0.5, 99.5])
    height_mm, width_mm = rows * view.pixel_spacing[0], cols * view.pixel_spacing[1]
    scale = side / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    gray = Image.fromarray(_to_uint8(view.image, low, high)).resize(size, Image.Resampling.BILINEAR)
    image = gray.convert("RGB")
    draw = ImageDraw.Draw(image)
    r = max(3, side // 60)
    at = {(m.label, m.predicted): marker_position(m, (rows, cols), size) for m in view.marks}
    for (j, predicted), xy in at.items():
        if predicted and (j, False) in at:
            draw.line([xy, at[(j, False)]], fill=LINK_RGB, width=1)
    for m in view.marks:
        x, y = at[(m.label, m.predicted)]
        if m.predicted:
            draw.line([(x - r, y), (x + r, y)], fill=PREDICTED_RGB, width=2)
            draw.line([(x, y - r), (x, y + r)], fill=PREDICTED_RGB, width=2)
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=LABELLED_RGB, width=2)
    if errors is not None:
        _write_names(draw, view.marks, at, errors, size[0], r)
    return image


def _write_names(
    draw: ImageDraw.ImageDraw,
    marks: list[Mark],
    at: dict[tuple[int, bool], tuple[float, float]],
    errors: np.ndarray,
    width: int,
    r: int,
) -> None:
    """Beside each predicted point (each labelled one when there are none): its name, its
    distance to the labelled point and how many slices off the shown slice it lies. Points side
    by side (left and right on an axial slice) get their text on their outer sides."""
    font = _font(11)
    has_predicted = any(m.predicted for m in marks)
    named = [m for m in marks if m.predicted == has_predicted]
    xs = np.array([at[(m.label, m.predicted)][0] for m in named])
    ys = np.array([at[(m.label, m.predicted)][1] for m in named])
    side_by_side = len(named) > 1 and np.ptp(xs) > np.ptp(ys)
    for m, x, y in zip(named, xs, ys, strict=True):
        text = m.name
        if np.isfinite(errors[m.label]):
            text += f": {errors[m.label]:.1f} mm"
        if abs(m.off_slices) >= 0.5:
            text += f" ({m.off_slices:+.0f} sl)"
        length = draw.textlength(text, font=font)
        right = x >= xs.mean() if side_by_side else True
        if right and x + r + 3 + length > width:
            right = False
        elif not right and x - r - 3 - length < 0:
            right = True
        tx = x + r + 3 if right else x - r - 3 - length
        draw.text(
            (tx, y - 7), text, fill=TEXT_RGB, font=font, stroke_width=1, stroke_fill=(0, 0, 0)
        )


def _crop_window(crops: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """One intensity window for all of a study's crops (they share the grader's normalisation,
    so relative brightness between them is kept)."""
    values = crops[present] if present.any() else crops
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high)


def crop_image(crop: np.ndarray, window: tuple[float, float], cell: int) -> Image.Image:
    """One crop's planes side by side, each ``cell`` pixels square, 2 px apart."""
    planes = [
        Image.fromarray(_to_uint8(plane, *window)).resize((cell, cell), Image.Resampling.BILINEAR)
        for plane in crop
    ]
    image = Image.new("L", (len(planes) * (cell + 2) - 2, cell), 0)
    for k, plane in enumerate(planes):
        image.paste(plane, (k * (cell + 2), 0))
    return image


def crop_montage(crops: np.ndarray, present: np.ndarray, cell: int) -> Image.Image:
    """The middle plane of every crop on a 5 x 5 grid: conditions down, levels across."""
    window = _crop_window(crops, present)
    n_conditions, n_levels = len(CONDITIONS), len(LEVELS)
    image = Image.new("RGB", (n_levels * (cell + 2), n_conditions * (cell + 2)), (60, 60, 60))
    middle = crops.shape[1] // 2
    for j in range(N_LABELS):
        if not present[j]:
            continue
        plane = Image.fromarray(_to_uint8(crops[j, middle], *window))
        plane = plane.resize((cell, cell), Image.Resampling.BILINEAR).convert("RGB")
        image.paste(plane, ((j % n_levels) * (cell + 2), (j // n_levels) * (cell + 2)))
    return image


# ------------------------------------------------------------------------------------- HTML
PANEL_STYLE = (
    "figure{display:inline-block;margin:0 10px 10px 0;vertical-align:top}"
    "figcaption{font-size:12px;max-width:320px;color:#444}"
    "figure img{display:block}"
    ".missing{display:flex;align-items:center;justify-content:center;text-align:center;"
    "background:#f3f3f3;border:1px dashed #b00;color:#b00;font-size:12px;padding:6px;"
    "box-sizing:border-box}"
    ".legend{font-size:13px;color:#333}"
    ".panel{border:1px solid #ccc;border-radius:4px;padding:6px;margin:0 0 12px 0}"
    ".panel .thumbs{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start;margin-top:4px}"
    ".panel figure{margin:0}.panel figcaption{font-size:10px;max-width:130px}"
    "table.grid{margin:0}"
    "table.grid td{font-size:10px;padding:1px 3px;text-align:center;min-width:34px}"
    "table.grid th{font-size:10px;padding:1px 3px;text-align:left}"
)
"""CSS of the gallery panels, shared by a study page and report.html."""

STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}"
    "td.true{outline:2px solid #000;outline-offset:-2px;font-weight:bold}"
    "table.crops td{padding:2px}table.crops img{display:block}table.crops th{text-align:center}"
    ".pair{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}.pair p{font-size:13px}"
    + PANEL_STYLE
)

LEGEND = (
    '<p class="legend"><b style="color:rgb(255,40,40)">+</b> stage 1&rsquo;s predicted point '
    '&nbsp; <b style="color:rgb(40,180,80)">&#9675;</b> labelled point '
    "(train_label_coordinates.csv) &nbsp; a yellow line joins the two; the number beside a point "
    "is their distance in mm, and (&plusmn;k sl) says the point lies k slices off the shown slice "
    "(it is drawn where it projects onto it).</p>"
)


def _figure(view: SliceView, side: int, errors: np.ndarray | None, caption: bool = True) -> str:
    text = html.escape(view.title) + (f"<br>{html.escape(view.note)}" if caption else "")
    if view.image is None:
        why = html.escape(view.note) if caption else "missing"
        box = f'<div class="missing" style="width:{side}px;height:{side}px">{why}</div>'
        return (
            f'<figure style="width:{side}px">{box}'
            f"<figcaption>{html.escape(view.title)}</figcaption></figure>"
        )
    image = slice_image(view, side, errors)
    tag = _jpeg_tag(image, view.title)
    return f'<figure style="width:{image.size[0]}px">{tag}<figcaption>{text}</figcaption></figure>'


def _prob_cell(p: float, is_true: bool) -> str:
    if not np.isfinite(p):
        return "<td>&ndash;</td>"
    colour = "#fff" if p > 0.6 else "#000"
    cls = ' class="true"' if is_true else ""
    return f'<td{cls} style="background:rgba(31,119,180,{p:.2f});color:{colour}">{p:.3f}</td>'


def probability_table(view: StudyView) -> str:
    """The 25 rows: probabilities coloured by value (the true class outlined), the truth, the
    row's log loss coloured by size, and stage 1's point error."""
    losses, errors = view.row_losses, view.point_errors
    header = ["label", *SEVERITIES, "truth", "&minus;log p", "point error mm"]
    body = []
    for j, column in enumerate(LABEL_COLUMNS):
        truth = IGNORE_INDEX if view.truth is None else int(view.truth[j])
        name = f"{CONDITION_SHORT[CONDITIONS[j // len(LEVELS)]]} {LEVEL_NAMES[j % len(LEVELS)]}"
        cells = [f'<td title="{column}">{name}</td>']
        cells += [_prob_cell(float(view.probs[j, k]), truth == k) for k in range(3)]
        cells.append(f"<td>{SEVERITIES[truth] if truth != IGNORE_INDEX else '&ndash;'}</td>")
        loss = losses[j]
        cells.append(
            f'<td style="background:rgba(214,39,40,{min(loss / 2.5, 1.0):.2f})">{loss:.3f}</td>'
            if np.isfinite(loss)
            else "<td>&ndash;</td>"
        )
        cells.append(f"<td>{errors[j]:.1f}</td>" if np.isfinite(errors[j]) else "<td>&ndash;</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def crops_table(view: StudyView) -> str:
    """The 25 crops, every plane, as the grader reads them: conditions down, levels across."""
    if view.crops is None or view.crops_present is None:
        return "<p>This run has no stage 2: it reads whole series, not crops.</p>"
    window = _crop_window(view.crops, view.crops_present)
    head = "<th></th>" + "".join(f"<th>{name}</th>" for name in LEVEL_NAMES)
    rows = []
    for c, condition in enumerate(CONDITIONS):
        cells = [f"<td>{CONDITION_SHORT[condition]}</td>"]
        for lv in range(len(LEVELS)):
            j = c * len(LEVELS) + lv
            if not view.crops_present[j]:
                cells.append('<td class="missing">no image</td>')
                continue
            tag = _jpeg_tag(crop_image(view.crops[j], window, CROP_CELL), LABEL_COLUMNS[j])
            cells.append(f"<td>{tag}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="crops"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _summary_line(view: StudyView) -> str:
    parts = []
    loss = view.loss
    if loss is not None:
        parts.append(f"weighted log loss {loss:.3f}")
    elif view.truth is None:
        parts.append("no labels (not in train.csv)")
    errors = view.point_errors
    if np.isfinite(errors).any():
        parts.append(f"median point error {np.nanmedian(errors):.1f} mm")
    return "; ".join(parts)


def _sources(view: StudyView) -> str:
    if view.probs_from == view.points_from:
        return f"Probabilities, points and crops: {view.probs_from}."
    return f"Probabilities: {view.probs_from}. Points: {view.points_from}."


def study_page_html(view: StudyView) -> str:
    """One study on one self-contained page (what ``lsdc show`` writes)."""
    errors = view.point_errors
    missing = "".join(
        f"<li>{html.escape(d)}: {html.escape(why)}</li>" for d, why in view.missing.items()
    )
    parts = [
        f"<h1>Study {view.study_id}</h1>",
        f"<p>{html.escape(_summary_line(view))}</p>",
        f"<p>{html.escape(_sources(view))}</p>",
        f"<p><b>Missing series</b></p><ul>{missing}</ul>" if missing else "",
        LEGEND,
        "<h2>Sagittal series</h2>",
        "".join(_figure(v, PAGE_SIDE, errors) for v in view.sagittal),
        "<h2>Axial T2 nearest each level</h2>",
        "".join(_figure(v, PAGE_SIDE * 2 // 3, errors) for v in view.axial),
        '<div class="pair"><section><h2>Predictions against the truth</h2>',
        probability_table(view),
        "</section><section><h2>Stage-2 crops, as the grader reads them</h2>",
        "<p>Right-sided crops are mirrored onto the left; every plane, one intensity window.</p>",
        crops_table(view),
        "</section></div>",
    ]
    return _document(f"lsdc study {view.study_id}", "\n".join(p for p in parts if p))


def _document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"{body}\n</body></html>\n"
    )


def loss_grid(view: StudyView) -> str:
    """A 5 x 5 table (conditions x levels): the truth's initial and its predicted probability,
    red by the row's loss; hovering shows the three probabilities."""
    losses = view.row_losses
    head = "<th></th>" + "".join(f"<th>{name}</th>" for name in LEVEL_NAMES)
    rows = []
    for c, condition in enumerate(CONDITIONS):
        cells = [f"<th>{CONDITION_SHORT[condition]}</th>"]
        for lv in range(len(LEVELS)):
            j = c * len(LEVELS) + lv
            p = view.probs[j]
            tip = " / ".join(f"{x:.2f}" for x in p) if np.isfinite(p).all() else "not predicted"
            truth = IGNORE_INDEX if view.truth is None else int(view.truth[j])
            if truth == IGNORE_INDEX or not np.isfinite(losses[j]):
                cells.append(f'<td title="{tip}">&ndash;</td>')
                continue
            alpha = min(losses[j] / 2.5, 1.0)
            cells.append(
                f'<td title="{tip}" style="background:rgba(214,39,40,{alpha:.2f})">'
                f"{SEVERITIES[truth][0]} {p[truth]:.2f}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def study_panel_html(view: StudyView, href: str, why: str) -> str:
    """A compact panel of one study for the report's gallery, linking to its full page."""
    thumbs = [_figure(v, THUMB_SIDE, None, caption=False) for v in view.sagittal]
    thumbs += [_figure(v, AXIAL_THUMB_SIDE, None, caption=False) for v in view.axial]
    if view.crops is not None and view.crops_present is not None:
        montage = crop_montage(view.crops, view.crops_present, 24)
        thumbs.append(
            "<figure>"
            + _jpeg_tag(montage, "crops")
            + "<figcaption>crops (middle planes; rows = conditions)</figcaption></figure>"
        )
    missing = f" · missing: {', '.join(view.missing)}" if view.missing else ""
    summary = html.escape(_summary_line(view))
    return (
        f'<div class="panel"><a href="{html.escape(href)}"><b>study {view.study_id}</b></a> '
        f"&middot; {html.escape(why)} &middot; {summary}{html.escape(missing)}"
        f'<div class="thumbs">{"".join(thumbs)}{loss_grid(view)}</div></div>'
    )


# ---------------------------------------------------------------------------------- the PNG
def study_png(view: StudyView) -> bytes:
    """The page's content as one image: slices with their points, crops, probabilities."""
    import matplotlib.pyplot as plt

    errors = view.point_errors
    n_axial = max(len(view.axial), 1)
    fig = plt.figure(figsize=(15, 13))
    grid = fig.add_gridspec(3, 1, height_ratios=[1.25, 0.9, 1.5])
    top = grid[0].subgridspec(1, len(view.sagittal))
    middle = grid[1].subgridspec(1, n_axial)
    bottom = grid[2].subgridspec(1, 2, width_ratios=[1.3, 1])
    panels = [(view.sagittal[i], fig.add_subplot(top[i])) for i in range(len(view.sagittal))]
    panels += [(view.axial[i], fig.add_subplot(middle[i])) for i in range(len(view.axial))]
    for slice_view, ax in panels:
        ax.set_axis_off()
        ax.set_title(slice_view.title, fontsize=9)
        if slice_view.image is None:
            ax.text(0.5, 0.5, slice_view.note, ha="center", va="center", wrap=True, color="#b00")
            continue
        ax.imshow(np.asarray(slice_image(slice_view, PAGE_SIDE, errors)))
    ax = fig.add_subplot(bottom[0])
    ax.set_title("stage-2 crops (middle planes)", fontsize=9)
    if view.crops is not None and view.crops_present is not None:
        cell = 32
        ax.imshow(np.asarray(crop_montage(view.crops, view.crops_present, cell)))
        ticks = np.arange(len(LEVELS)) * (cell + 2) + cell / 2
        ax.set_xticks(ticks, LEVEL_NAMES, fontsize=8)
        ax.set_yticks(ticks, [CONDITION_SHORT[c] for c in CONDITIONS], fontsize=8)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no stage 2 (whole-series run)", ha="center", va="center")
    ax = fig.add_subplot(bottom[1])
    ax.imshow(np.nan_to_num(view.probs, nan=0.0), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(3), SEVERITIES, fontsize=8)
    ax.set_yticks(range(N_LABELS), LABEL_COLUMNS, fontsize=6)
    ax.set_title("probabilities (truth boxed red)", fontsize=9)
    for j in range(N_LABELS):
        for k in range(3):
            p = view.probs[j, k]
            if np.isfinite(p):
                colour = "white" if p > 0.6 else "black"
                ax.text(k, j, f"{p:.2f}", ha="center", va="center", fontsize=6, color=colour)
        if view.truth is not None and view.truth[j] != IGNORE_INDEX:
            ax.add_patch(
                plt.Rectangle(
                    (view.truth[j] - 0.5, j - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5
                )
            )
    fig.suptitle(f"study {view.study_id}: {_summary_line(view)}", fontsize=12)
    return plots.figure_to_png(fig)


# --------------------------------------------------------------------------- lsdc show / report
def show_study(
    data_root: str | Path,
    cache_dir: str | Path,
    run_dir: str | Path,
    study_id: int,
    out_path: str | Path | None = None,
) -> Path:
    """Write one study's page (``.html``) or picture (``.png``); returns its path.

    Raises:
        UserError: ``out_path`` is neither .html nor .png, the run or the cache is unreadable,
            or the study is in neither the cache nor the root's series CSVs.
    """
    out = Path(out_path) if out_path is not None else Path(f"study_{int(study_id)}.html")
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise UserError(f"{out}: --out must end in .html or .png")
    view = StudyViewer(run_dir, cache_dir, data_root).view(int(study_id))
    if suffix == ".png":
        with atomic_path(out) as tmp:
            tmp.write_bytes(study_png(view))
    else:
        write_text_atomic(study_page_html(view), out)
    return out


def gallery(
    viewer: StudyViewer,
    solution: pd.DataFrame,
    predictions: pd.DataFrame,
    out_dir: str | Path,
    n_worst: int = GALLERY_WORST,
    n_random: int = GALLERY_RANDOM,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], str]:
    """Write the full pages of the gallery's studies into ``out_dir/studies`` and return the
    gallery's entries (for metrics.json) and its HTML (for report.html).

    The studies are the ``n_worst`` with the largest weighted log loss, then ``n_random`` drawn
    (seeded) from the rest. Each page's table shows the prediction file's probabilities, so a
    panel's loss is the one the report counts.
    """
    from lsdc.evaluation.diagnostics import align

    rows = align(solution, predictions)
    losses = pd.Series(
        {
            int(s): weighted_log_loss(rows.onehot[m], rows.probs[m], rows.weight[m])
            for s in np.unique(rows.study_id)
            for m in [rows.study_id == s]
        }
    ).sort_values(ascending=False, kind="stable")
    worst = [int(s) for s in losses.index[:n_worst]]
    rest = np.array([int(s) for s in losses.index[n_worst:]], dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawn = sorted(rng.choice(rest, size=min(n_random, rest.size), replace=False).tolist())
    probs_by_row = predictions.set_index("row_id")[list(PRED_COLUMNS)]
    truth_by_row = _solution_truth(solution)
    entries, panels = [], []
    for study_id, why in [(s, "largest loss") for s in worst] + [(s, "random") for s in drawn]:
        row_ids = study_row_ids(study_id)
        probs = probs_by_row.reindex(row_ids).to_numpy(np.float64)
        truth = np.array([truth_by_row.get(r, IGNORE_INDEX) for r in row_ids], dtype=np.int64)
        view = viewer.view(study_id, probs=probs, truth=truth, probs_from="the evaluated file")
        href = f"{STUDIES_DIR}/{study_id}.html"
        write_text_atomic(study_page_html(view), Path(out_dir) / href)
        errors = view.point_errors
        entries.append(
            {
                "study_id": study_id,
                "why": why,
                "loss": view.loss,
                "median_point_error_mm": (
                    float(np.nanmedian(errors)) if np.isfinite(errors).any() else None
                ),
                "page": href,
            }
        )
        panels.append(study_panel_html(view, href, why))
    return entries, LEGEND + "\n".join(panels)


def _solution_truth(solution: pd.DataFrame) -> dict[str, int]:
    """row_id -> true class index of every scored row of a solution."""
    onehot = solution[list(PRED_COLUMNS)].to_numpy(np.float64)
    scored = (onehot.sum(axis=1) > 0) & (solution["sample_weight"].to_numpy(np.float64) > 0)
    return {
        str(r): int(k)
        for r, k in zip(solution["row_id"][scored], onehot[scored].argmax(axis=1), strict=True)
    }
