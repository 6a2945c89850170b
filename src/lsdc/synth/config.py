"""What ``lsdc synth`` writes: a plain dataclass, cheap to import (the CLI reads its defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lsdc.errors import UserError
from lsdc.synth import labels as synth_labels

REALISM_RATES: dict[str, str] = {
    "missing_series_rate": "share of studies that lack one of their three series",
    "two_axial_series_rate": "share of studies whose Axial T2 is split into two series",
    "multi_stack_axial_rate": "share of studies whose one Axial T2 series holds two tilted stacks",
    "instance_gap_rate": "share of series whose instance numbers have gaps and do not start at 1",
    "unordered_instances_rate": "share of series whose instance numbers do not follow slice order",
    "oblique_rate": "share of series with a small in-plane rotation and slightly oblique planes",
    "matrix_variation_rate": "share of series whose matrix differs from --image-size",
    "missing_spacing_rate": "share of series without the SpacingBetweenSlices tag",
    "unlabelled_rate": "share of studies with some unlabelled (NaN) findings",
    "missing_coordinates_rate": "share of labelled findings with no coordinate row",
    "reversed_storage_rate": "share of series stored with rows and/or columns reversed "
    "(tags consistent)",
    "label_error_rate": "share of labelled findings graded one step off (a careless read)",
    "coordinate_error_rate": "share of coordinate rows a few mm off (a fifth of them one level off)",
    "motion_ghost_rate": "share of series with motion ghosts along the phase direction "
    "(anatomical phantom)",
    "wrap_rate": "share of series with wrap-around along the phase direction (anatomical phantom)",
}
"""Realism switches: each is a rate; 0 turns the feature off."""

PHANTOMS: dict[str, str] = {
    "anatomical": "a label map of lumbar anatomy imaged by MR physics per protocol (the default)",
    "simple": "the first phantom of boxes and ovals, kept for comparison",
}
"""Phantoms of ``lsdc synth --phantom``; docs/synthetic.md describes both."""

PROFILES: dict[str, str] = {
    "default": "every series at --image-size with --slices sagittal slices (small, fast: the demo)",
    "competition": "sizes drawn per study like the real set (320-1024 px, 15-22 sagittal slices, "
    "1-3 axial stacks of 15-60 slices, slice-thickness blur; ~75 files a study)",
}
"""Size profiles of ``lsdc synth --profile``; docs/synthetic.md describes the competition one."""

PACS_LAYOUTS: dict[str, str] = {
    "none": "no PACS copy",
    "flat": "test_pacs/{SOPInstanceUID}, every file in one folder",
    "by-series": "test_pacs/{study_id}/S{SeriesNumber:03d}/I{n:04d}, nested by series number",
}
"""Values of ``lsdc synth --pacs`` (:mod:`lsdc.synth.pacs` writes the copy)."""


@dataclass
class SynthConfig:
    """What ``lsdc synth`` writes.

    Attributes:
        train_studies / test_studies: number of studies per split.
        seed: the one source of randomness; the same seed gives the same bytes.
        image_size: default matrix (rows = columns) of every series. Pixel spacing is field of
            view / matrix, so the anatomy keeps its size in mm whatever the matrix.
        slices: sagittal slice count per series (spread to cover both foramina).
        axial_slices: Axial T2 slice count of a study (split between stacks/series when there are
            several); None means twice ``slices``.
        The ``*_rate`` fields are the realism switches of REALISM_RATES (0 = off).
        phantom: a key of PHANTOMS (``simple`` writes the old phantom, for comparison; its
            DICOM files carry no protocol tags and it ignores the motion and wrap switches).
        profile: a key of PROFILES. ``competition`` draws every size per study (matrix, pixel
            spacing, slice counts), so ``image_size``, ``slices`` and ``axial_slices`` must stay
            at their defaults there.
        pacs: a key of PACS_LAYOUTS: besides ``test_images/``, write the
            test studies as a PACS export in that layout (``none``: not at all).
    """

    train_studies: int = 8
    test_studies: int = 4
    seed: int = 0
    image_size: int = 96
    slices: int = 15
    axial_slices: int | None = None
    missing_series_rate: float = 0.03
    two_axial_series_rate: float = 0.15
    multi_stack_axial_rate: float = 0.1
    instance_gap_rate: float = 0.15
    unordered_instances_rate: float = 0.3
    oblique_rate: float = 0.5
    matrix_variation_rate: float = 0.3
    missing_spacing_rate: float = 0.1
    unlabelled_rate: float = synth_labels.UNLABELLED_STUDY_RATE
    missing_coordinates_rate: float = 0.01
    reversed_storage_rate: float = 0.02
    label_error_rate: float = 0.02
    coordinate_error_rate: float = 0.02
    motion_ghost_rate: float = 0.1
    wrap_rate: float = 0.05
    profile: str = "default"
    phantom: str = "anatomical"
    pacs: str = "none"

    def without_realism(self) -> SynthConfig:
        """The same config with every realism switch off (clean, regular series)."""
        return dataclasses.replace(self, **{name: 0.0 for name in REALISM_RATES})

    @property
    def n_axial_slices(self) -> int:
        """Axial T2 slices per study: ``axial_slices`` or, when None, twice ``slices``."""
        return self.axial_slices if self.axial_slices is not None else 2 * self.slices

    def validate(self) -> None:
        """Raise UserError on a value no study could be drawn with."""
        if self.phantom not in PHANTOMS:
            raise UserError(f"`phantom` must be one of {list(PHANTOMS)}, got {self.phantom!r}")
        if self.profile not in PROFILES:
            raise UserError(f"`profile` must be one of {list(PROFILES)}, got {self.profile!r}")
        if self.pacs not in PACS_LAYOUTS:
            raise UserError(f"`pacs` must be one of {list(PACS_LAYOUTS)}, got {self.pacs!r}")
        if self.profile != "default":
            fixed = [
                f"`{f.name}`"
                for f in dataclasses.fields(self)
                if f.name in ("image_size", "slices", "axial_slices")
                and getattr(self, f.name) != f.default
            ]
            if fixed:
                raise UserError(
                    f"{', '.join(fixed)}: the {self.profile} profile draws its own sizes per "
                    "study; leave these out or use `profile=default`"
                )
        if self.train_studies < 0 or self.test_studies < 0:
            raise UserError("study counts must be >= 0")
        if self.train_studies + self.test_studies == 0:
            raise UserError("nothing to write: `train_studies` and `test_studies` are both 0")
        if self.image_size < 16:
            raise UserError(f"`image_size` must be >= 16 pixels, got {self.image_size}")
        if self.slices < 3:
            raise UserError(f"`slices` must be >= 3, got {self.slices}")
        if self.n_axial_slices < 6:
            raise UserError(f"`axial_slices` must be >= 6, got {self.n_axial_slices}")
        for name in REALISM_RATES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"`{name}` must be within [0, 1], got {value}")
