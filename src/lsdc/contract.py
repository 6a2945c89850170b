"""The competition's data contract: the one source of truth for labels, row ids, weights and CSVs.

Every other module takes the 25 labels, the row_id format, the class weights and the CSV layouts
from here, so a spelling or an ordering can only ever be wrong in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.errors import UserError

SPLITS: tuple[str, ...] = ("train", "test")
"""The competition's splits: ``{split}_series_descriptions.csv`` and ``{split}_images/``."""

CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
"""Condition keys as they appear in train.csv columns and row ids."""

CONDITION_NAMES: tuple[str, ...] = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
"""Condition spellings of train_label_coordinates.csv, in the order of CONDITIONS."""

LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
LEVEL_NAMES: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")

SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
"""Label values of train.csv; the class index is the position in this tuple."""

PRED_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
"""Probability columns of a submission, in class-index order."""

CLASS_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)
"""Sample weight of a row by its true class, as the official metric weights it."""

IGNORE_INDEX: int = -100
"""Class index of an unlabelled entry (PyTorch's cross-entropy ignore_index default)."""

SERIES_DESCRIPTIONS: tuple[str, ...] = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")

LABEL_COLUMNS: tuple[str, ...] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)
"""The 25 label columns of train.csv, condition-major (the order of every 25-vector in lsdc)."""

N_LABELS = len(LABEL_COLUMNS)
N_CLASSES = len(SEVERITIES)

CONDITION_GROUP: dict[str, str] = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}
"""Condition -> the metric's scoring group."""

GRADING_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": "Sagittal T2/STIR",
    "left_neural_foraminal_narrowing": "Sagittal T1",
    "right_neural_foraminal_narrowing": "Sagittal T1",
    "left_subarticular_stenosis": "Axial T2",
    "right_subarticular_stenosis": "Axial T2",
}
"""The series description on which radiologists grade (and annotate) each condition."""

_CONDITION_BY_NAME = dict(zip(CONDITION_NAMES, CONDITIONS, strict=True))
_LEVEL_BY_NAME = dict(zip(LEVEL_NAMES, LEVELS, strict=True))


def _mirror(name: str) -> str:
    if name.startswith("left_"):
        return "right_" + name[len("left_") :]
    if name.startswith("right_"):
        return "left_" + name[len("right_") :]
    return name


LEFT_RIGHT_PERMUTATION: np.ndarray = np.array(
    [LABEL_COLUMNS.index(_mirror(col)) for col in LABEL_COLUMNS], dtype=np.int64
)
"""Index permutation of the 25 labels that swaps every left_* entry with its right_* twin.

Apply it (``labels[..., LEFT_RIGHT_PERMUTATION]``) whenever an image is mirrored left-right.
"""


def label_index(condition: str, level: str) -> int:
    """Position of (condition key, level key) in LABEL_COLUMNS."""
    return CONDITIONS.index(condition) * len(LEVELS) + LEVELS.index(level)


class DataContractError(UserError):
    """A competition file breaks the contract; the message names the file, the row and the problem."""


def make_row_id(study_id: int | str, condition: str, level: str) -> str:
    """Build ``{study_id}_{condition}_{level}``, e.g. ``44036939_left_neural_foraminal_narrowing_l1_l2``."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    return f"{int(study_id)}_{condition}_{level}"


def parse_row_id(row_id: str) -> tuple[int, str, str]:
    """Split a row id into (study_id, condition, level); raise ValueError on any other shape."""
    parts = str(row_id).split("_")
    if len(parts) < 4 or not parts[0].isdigit():
        raise ValueError(f"malformed row_id {row_id!r}")
    condition, level = "_".join(parts[1:-2]), "_".join(parts[-2:])
    if condition not in CONDITIONS or level not in LEVELS:
        raise ValueError(f"malformed row_id {row_id!r}: unknown condition or level")
    return int(parts[0]), condition, level


def study_row_ids(study_id: int | str) -> list[str]:
    """The 25 row ids of one study in LABEL_COLUMNS order."""
    return [f"{int(study_id)}_{col}" for col in LABEL_COLUMNS]


def all_row_ids(study_ids: Iterable[int | str]) -> list[str]:
    """Row ids of many studies, study by study, each in LABEL_COLUMNS order."""
    return [rid for sid in study_ids for rid in study_row_ids(sid)]


_STUDY_NAME_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"
)


def check_study_name(name: object) -> str:
    """A study's own id as the study part of its row ids: a StudyInstanceUID (digits and dots)
    or a name a user maps it to. Letters, digits, dots and dashes only: the underscore separates
    the row id's parts, and a comma, quote or space would need quoting in the CSV.

    Raises:
        ValueError: an empty name or one with another character.
    """
    text = str(name).strip()
    if not text or not set(text) <= _STUDY_NAME_CHARACTERS:
        raise ValueError(
            f"study id {name!r}: use letters, digits, dots and dashes only (no underscore, "
            "space or comma: it becomes the first part of every row_id)"
        )
    return text


def rename_row_ids(row_ids: Iterable[str], names: dict[int, str]) -> list[str]:
    """Row ids keyed by integer study ids (``{study_id}_{condition}_{level}``) -> the same rows
    keyed by each study's own id (``names[study_id]``, checked by :func:`check_study_name`): the
    submission of studies from any DICOM folder, whose ids are not integers."""
    checked = {int(k): check_study_name(v) for k, v in names.items()}
    out = []
    for row_id in row_ids:
        study_id, condition, level = parse_row_id(row_id)
        out.append(f"{checked[study_id]}_{condition}_{level}")
    return out


# ---------------------------------------------------------------------------------------------
# CSV loaders


def _read_csv(path: str | Path, required: Sequence[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataContractError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataContractError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataContractError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def _file_row(index: int) -> int:
    """CSV line number of a DataFrame row (line 1 is the header)."""
    return int(index) + 2


def _check_int_column(df: pd.DataFrame, column: str, path: Path) -> None:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{path}: row {_file_row(i)}: column {column!r} must be an integer, got {df[column].iloc[i]!r}"
        )
    df[column] = values.astype(np.int64)


def _check_unique(df: pd.DataFrame, columns: list[str], path: Path, what: str) -> None:
    dup = df.duplicated(subset=columns, keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        key = ", ".join(f"{c}={df[c].iloc[i]}" for c in columns)
        raise DataContractError(f"{path}: row {_file_row(i)}: duplicate {what} ({key})")


def load_train_labels(path: str | Path) -> pd.DataFrame:
    """Read train.csv: ``study_id`` + the 25 label columns.

    Returns:
        The table with ``study_id`` as int64 and label columns as strings from SEVERITIES or NaN
        (not labelled). Use :func:`labels_to_indices` for class indices.

    Raises:
        DataContractError: missing column, unknown severity, duplicate study (naming file and row).
    """
    path = Path(path)
    df = _read_csv(path, ["study_id", *LABEL_COLUMNS])
    _check_int_column(df, "study_id", path)
    _check_unique(df, ["study_id"], path, "study")
    for col in LABEL_COLUMNS:
        values = df[col]
        bad = values.notna() & ~values.isin(SEVERITIES)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataContractError(
                f"{path}: row {_file_row(i)}: column {col!r} has unknown severity {values.iloc[i]!r}; "
                f"expected one of {SEVERITIES} or empty"
            )
    return df[["study_id", *LABEL_COLUMNS]].reset_index(drop=True)


def labels_to_indices(labels: pd.DataFrame) -> np.ndarray:
    """Wide labels (train.csv layout) -> int64 array (n_studies, 25); IGNORE_INDEX where unlabelled."""
    values = labels[list(LABEL_COLUMNS)]
    out = np.full(values.shape, IGNORE_INDEX, dtype=np.int64)
    for k, severity in enumerate(SEVERITIES):
        out[(values == severity).to_numpy()] = k
    return out


def class_prior(labels: pd.DataFrame) -> pd.DataFrame:
    """Class frequencies per label column (the fallback prediction), add-one smoothed so that
    no class gets probability zero."""
    idx = labels_to_indices(labels)
    counts = np.stack([(idx == k).sum(axis=0) for k in range(len(PRED_COLUMNS))], axis=1) + 1.0
    prior = counts / counts.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(prior, columns=list(PRED_COLUMNS))
    frame.insert(0, "label_column", list(LABEL_COLUMNS))
    return frame


def labels_to_long(labels: pd.DataFrame) -> pd.DataFrame:
    """Wide labels -> one row per labelled (study, condition, level): row_id, study_id, condition,
    level, severity (string) and target (class index). Unlabelled entries are dropped."""
    idx = labels_to_indices(labels)
    study = np.repeat(labels["study_id"].to_numpy(), N_LABELS)
    cond = np.tile(np.repeat(CONDITIONS, len(LEVELS)), len(labels))
    lev = np.tile(np.array(LEVELS * len(CONDITIONS)), len(labels))
    target = idx.reshape(-1)
    keep = target != IGNORE_INDEX
    long = pd.DataFrame(
        {
            "row_id": [
                f"{s}_{c}_{lv}" for s, c, lv in zip(study[keep], cond[keep], lev[keep], strict=True)
            ],
            "study_id": study[keep],
            "condition": cond[keep],
            "level": lev[keep],
            "target": target[keep],
        }
    )
    long["severity"] = [SEVERITIES[t] for t in long["target"]]
    return long


def long_to_wide(long: pd.DataFrame) -> pd.DataFrame:
    """Inverse of :func:`labels_to_long`: rows (study_id, condition, level, severity) -> train.csv layout."""
    key = long["condition"] + "_" + long["level"]
    wide = (
        long.assign(column=key)
        .pivot(index="study_id", columns="column", values="severity")
        .reindex(columns=list(LABEL_COLUMNS))
        .reset_index()
    )
    wide.columns.name = None
    return wide


def labels_to_solution(labels: pd.DataFrame) -> pd.DataFrame:
    """Wide labels -> Kaggle's solution format: row_id, normal_mild, moderate, severe (one-hot),
    sample_weight (CLASS_WEIGHTS by true class). Unlabelled entries get no row (they are not scored)."""
    long = labels_to_long(labels)
    onehot = np.eye(N_CLASSES)[long["target"].to_numpy()]
    sol = pd.DataFrame(onehot, columns=list(PRED_COLUMNS))
    sol.insert(0, "row_id", long["row_id"].to_numpy())
    sol["sample_weight"] = np.asarray(CLASS_WEIGHTS)[long["target"].to_numpy()]
    return sol


def load_label_coordinates(path: str | Path) -> pd.DataFrame:
    """Read train_label_coordinates.csv and add ``condition_key`` / ``level_key`` (contract keys).

    Raises:
        DataContractError: missing column, unknown condition or level spelling, non-numeric x/y.
    """
    path = Path(path)
    cols = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    df = _read_csv(path, cols)
    for c in ("study_id", "series_id", "instance_number"):
        _check_int_column(df, c, path)
    for column, table in (("condition", _CONDITION_BY_NAME), ("level", _LEVEL_BY_NAME)):
        bad = ~df[column].isin(list(table))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataContractError(
                f"{path}: row {_file_row(i)}: unknown {column} {df[column].iloc[i]!r}; "
                f"expected one of {list(table)}"
            )
    for c in ("x", "y"):
        values = pd.to_numeric(df[c], errors="coerce")
        if values.isna().any():
            i = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise DataContractError(f"{path}: row {_file_row(i)}: column {c!r} is not a number")
        df[c] = values.astype(np.float64)
    df["condition_key"] = df["condition"].map(_CONDITION_BY_NAME)
    df["level_key"] = df["level"].map(_LEVEL_BY_NAME)
    return df


def load_series_descriptions(path: str | Path) -> pd.DataFrame:
    """Read {train,test}_series_descriptions.csv: study_id, series_id, series_description.

    Raises:
        DataContractError: missing column, unknown description, duplicate series.
    """
    path = Path(path)
    df = _read_csv(path, ["study_id", "series_id", "series_description"])
    for c in ("study_id", "series_id"):
        _check_int_column(df, c, path)
    bad = ~df["series_description"].isin(SERIES_DESCRIPTIONS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{path}: row {_file_row(i)}: unknown series_description "
            f"{df['series_description'].iloc[i]!r}; expected one of {SERIES_DESCRIPTIONS}"
        )
    _check_unique(df, ["study_id", "series_id"], path, "series")
    return df[["study_id", "series_id", "series_description"]].reset_index(drop=True)


def _check_row_ids(df: pd.DataFrame, path: Path) -> None:
    for i, rid in enumerate(df["row_id"]):
        try:
            parse_row_id(rid)
        except ValueError as exc:
            raise DataContractError(f"{path}: row {_file_row(i)}: {exc}") from exc


def load_sample_submission(path: str | Path) -> pd.DataFrame:
    """Read sample_submission.csv (row_id + the three probability columns), checking every row_id."""
    path = Path(path)
    df = _read_csv(path, ["row_id", *PRED_COLUMNS])
    _check_row_ids(df, path)
    _check_unique(df, ["row_id"], path, "row_id")
    return df


def load_submission(path: str | Path) -> pd.DataFrame:
    """Read a submission (row_id + the three probability columns), checking that every row_id is
    one, without judging its values: :func:`lsdc.evaluation.metric.validate_submission` says
    what the competition would refuse.

    Raises:
        DataContractError: missing column or a malformed row_id (naming file and row).
    """
    path = Path(path)
    df = _read_csv(path, ["row_id", *PRED_COLUMNS])
    _check_row_ids(df, path)
    return df


def load_solution(path: str | Path) -> pd.DataFrame:
    """Read a solution file (row_id, normal_mild, moderate, severe, sample_weight; one-hot labels).

    Raises:
        DataContractError: missing column, duplicate or malformed row_id, labels not one-hot,
            or a sample_weight that is not a finite number >= 0 (a NaN weight would drop its
            row from the score without a word).
    """
    path = Path(path)
    df = _read_csv(path, ["row_id", *PRED_COLUMNS, "sample_weight"])
    _check_unique(df, ["row_id"], path, "row_id")
    _check_row_ids(df, path)
    weight = pd.to_numeric(df["sample_weight"], errors="coerce").to_numpy(np.float64)
    bad_weight = ~np.isfinite(weight) | (weight < 0)
    if bad_weight.any():
        i = int(np.flatnonzero(bad_weight)[0])
        raise DataContractError(
            f"{path}: row {_file_row(i)}: sample_weight must be a finite number >= 0, "
            f"got {df['sample_weight'].iloc[i]}"
        )
    df["sample_weight"] = weight
    onehot = df[list(PRED_COLUMNS)].to_numpy(dtype=float)
    ok = np.isclose(onehot.sum(axis=1), 1.0) & np.isin(onehot, (0.0, 1.0)).all(axis=1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataContractError(
            f"{path}: row {_file_row(i)}: labels must be one-hot over {PRED_COLUMNS}"
        )
    return df


def write_csv_atomic(df: pd.DataFrame, path: str | Path, **kwargs) -> Path:
    """Write a CSV through a temporary file and a rename, so a reader never sees half a file."""
    from lsdc.utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)
    return path
