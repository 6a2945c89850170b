"""One reading per study: the 25 grades a clinician can scan in ten seconds.

A submission is 25 rows of three probabilities; nobody reads a study from it. ``reading.md``
puts the same numbers in a radiologist's order: what is moderate or severe first, then one
table (a row per level; canal, both foramina, both lateral recesses), each grade with its
probability, a grade flagged *unsure* where its probability is below ``UNSURE_BELOW``, grades
whose series the study lacks marked *not read* (their value is the training frequencies, not a
reading), the series read, and the ``lsdc show`` command that draws the study as the model saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.contract import (
    CONDITIONS,
    GRADING_SERIES,
    LEVEL_NAMES,
    LEVELS,
    N_CLASSES,
    N_LABELS,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
    label_index,
)
from lsdc.utils import write_text_atomic

UNSURE_BELOW = 0.6
"""A grade whose probability (the top class's) is below this is flagged unsure: with three
classes, 0.6 leaves at least 0.4 to the other two, i.e. the model is far from one answer."""

FINDING_NAMES: dict[str, str] = {
    "spinal_canal_stenosis": "spinal canal",
    "left_neural_foraminal_narrowing": "left foramen",
    "right_neural_foraminal_narrowing": "right foramen",
    "left_subarticular_stenosis": "left lateral recess",
    "right_subarticular_stenosis": "right lateral recess",
}
"""How the reading names each condition (narrowing of the canal, the foramina, the recesses)."""

GRADE_NAMES: tuple[str, ...] = ("Normal/mild", "Moderate", "Severe")
"""The grades in class-index order (SEVERITIES, in sentence case)."""
assert len(GRADE_NAMES) == len(SEVERITIES)


@dataclass(frozen=True)
class StudyReading:
    """What one study's reading says, besides its probabilities."""

    name: str
    """The study's own id (the submission's)."""
    probabilities: np.ndarray
    """(25, 3) in LABEL_COLUMNS order."""
    source: str
    """predict_report.csv's ``source``: model, model_partial or prior."""
    not_read: tuple[str, ...]
    """Series descriptions the study lacks (or that could not be read)."""
    series_read: tuple[str, ...]
    """One line per role: which series filled it."""
    message: str
    show_command: str
    page: str
    """The file name of the ``lsdc show`` page the command writes (beside the reading)."""
    header: str = ""
    """Study date and description, where the headers give them."""


@dataclass(frozen=True)
class Grade:
    """One finding's top class: its name, probability and whether it is unsure."""

    index: int
    probability: float

    @classmethod
    def of(cls, probabilities: np.ndarray) -> Grade:
        k = int(np.argmax(probabilities))
        return cls(k, float(probabilities[k]))

    @property
    def name(self) -> str:
        return GRADE_NAMES[self.index]

    @property
    def percent(self) -> str:
        return f"{100 * self.probability:.0f} %"

    @property
    def unsure(self) -> bool:
        return self.probability < UNSURE_BELOW

    @property
    def abnormal(self) -> bool:
        """Moderate or severe."""
        return self.index > 0


def study_reading(reading: StudyReading) -> str:
    """The reading of one study as Markdown."""
    probs = np.asarray(reading.probabilities, dtype=np.float64)
    if probs.shape != (N_LABELS, N_CLASSES):
        raise ValueError(f"probabilities of shape {probs.shape}, expected (25, 3)")
    all_prior = reading.source == "prior"
    unread = {c for c in CONDITIONS if all_prior or GRADING_SERIES[c] in reading.not_read}
    lines = [f"# Lumbar spine MRI, study {reading.name}: model reading", ""]
    if reading.header:
        lines += [reading.header, ""]
    lines += [
        f"Research model output (lsdc), not a diagnosis. *Unsure*: the grade's probability is "
        f"below {100 * UNSURE_BELOW:.0f} %.",
        "",
    ]
    findings, unsure, n_read = [], [], 0
    for j, level in enumerate(LEVELS):
        for condition in CONDITIONS:
            if condition in unread:
                continue
            n_read += 1
            grade = Grade.of(probs[label_index(condition, level)])
            where = f"{LEVEL_NAMES[j]} {FINDING_NAMES[condition]}"
            if grade.unsure:
                unsure.append(f"{where} ({grade.name.lower()} {grade.percent})")
            elif grade.abnormal:
                findings.append(f"- {where}: **{grade.name}** ({grade.percent})")
    if all_prior:
        lines += [f"**No reading**: nothing in this study could be read ({reading.message}).", ""]
    else:
        lines += [f"**Moderate or severe**{':' if findings else ': none.'}", ""]
        lines += findings + ([""] if findings else [])
        lines += [
            f"**Unsure**: {len(unsure)} of {n_read} grades"
            + (f": {'; '.join(unsure)}." if unsure else "."),
            "",
        ]
    if unread and not all_prior:
        missing = ", ".join(sorted({GRADING_SERIES[c] for c in unread}))
        names = ", ".join(FINDING_NAMES[c] for c in CONDITIONS if c in unread)
        lines += [f"**Not read**: {names} at every level (no {missing} series).", ""]

    header = ["Level", *[FINDING_NAMES[c].capitalize() for c in CONDITIONS]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j, level in enumerate(LEVELS):
        cells = [LEVEL_NAMES[j]]
        for condition in CONDITIONS:
            if condition in unread:
                cells.append("not read")
                continue
            grade = Grade.of(probs[label_index(condition, level)])
            text = f"{grade.name} {grade.percent}"
            text = f"**{text}**" if grade.abnormal else text
            cells.append(text + (" (unsure)" if grade.unsure else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Series read:", ""]
    lines += [f"- {line}" for line in reading.series_read] or ["- none"]
    if reading.message and not all_prior:
        lines += ["", f"Notes: {reading.message}"]
    lines += [
        "",
        f"Pictures (the slices and crops the model graded): [{reading.page}]({reading.page}), "
        "made by",
        "",
        f"    {reading.show_command}",
        "",
    ]
    return "\n".join(lines)


def series_read_lines(roles: pd.DataFrame) -> tuple[str, ...]:
    """One line per role from a study's rows of series_roles.csv (``used`` series, or none)."""
    lines = []
    for role in sorted(set(roles["role"]) & set(SERIES_DESCRIPTIONS), key=_role_order):
        used = roles[(roles["role"] == role) & roles["used"].astype(bool)]
        if used.empty:
            lines.append(f"{role}: none (its grades are not read)")
            continue
        parts = [
            f'series {r.series_number} "{r.series_description}" ({r.n_images} images)'
            for r in used.itertuples()
        ]
        lines.append(f"{role}: " + "; ".join(parts))
    return tuple(lines)


def _role_order(role: str) -> int:
    return SERIES_DESCRIPTIONS.index(role)


def write_readings(folder: str | Path, readings: Sequence[StudyReading]) -> list[Path]:
    """Write ``folder/{name}.md`` per reading (the folder is created); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_text_atomic(study_reading(r), folder / f"{r.name}.md") for r in readings]
