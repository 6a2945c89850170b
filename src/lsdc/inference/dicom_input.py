"""``lsdc predict --dicom DIR``: any folder of lumbar MRI studies -> the submission of its studies.

A PACS export mixes studies and series and names files by UID; the models read one cache built
from the competition layout. The flow keeps the model path exactly as ``lsdc predict --data``
runs it:

1. read every file's header and give each series a role (:mod:`lsdc.preprocessing.series_roles`);
2. lay the chosen series out as a competition root, ``competition_layout/`` beside the
   submission: ``test_series_descriptions.csv`` (the role as the description),
   ``sample_submission.csv`` (every study, so a study without any usable series still gets its
   rows: the class prior), ``test_images/{study_id}/{series_id}/{n}.dcm`` (links to the files,
   named by InstanceNumber as the competition names them) and ``studies.csv`` (which
   StudyInstanceUID each integer id is, and the study's own id);
3. :func:`lsdc.inference.predict.predict_split` on it, unchanged;
4. the rows renamed to the study's own id (its StudyInstanceUID, or the name a ``--study-id``
   CSV maps it to: :func:`lsdc.contract.rename_row_ids`), ``series_roles.csv`` and one reading
   per study (:mod:`lsdc.inference.reading`) beside the submission.

Inside, a study is keyed by an integer (the cache's folders and the datasets want one): a hash of
its StudyInstanceUID, stable across runs, so a kept ``--cache`` never serves one study's images
for another's. A series' integer starts with its SeriesNumber, so where the models break ties
between two series of one role by the lower id, they take the one acquired first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.contract import (
    PRED_COLUMNS,
    all_row_ids,
    check_study_name,
    load_series_descriptions,
    rename_row_ids,
    study_row_ids,
    write_csv_atomic,
)
from lsdc.errors import LsdcWarning, UserError
from lsdc.inference.predict import REPORT_NAME, PredictResult, check_run, predict_split
from lsdc.inference.reading import StudyReading, series_read_lines, write_readings
from lsdc.preprocessing.series_roles import (
    OTHER,
    ROLE_TABLE_COLUMNS,
    SERIES_COLUMNS,
    FolderScan,
    SeriesInfo,
    choose_series,
    describe_series,
    group_series,
    read_header,
    role_table,
    scan_folder,
    series_row,
)
from lsdc.utils import check_input_dir, check_output_file

log = logging.getLogger(__name__)

ROLES_NAME = "series_roles.csv"
"""The role table, beside the submission."""
LAYOUT_NAME = "competition_layout"
"""The chosen series as a competition root, beside the submission (``lsdc show --data``)."""
STUDIES_NAME = "studies.csv"
"""In the layout: integer study_id, study_instance_uid, the study's own id (``name``)."""
READINGS_NAME = "readings"
"""One ``{study}.md`` per study, beside the submission."""
SPLIT = "test"
"""The layout's split: what ``lsdc predict`` predicts by default."""

ROLES_COLUMNS = ["study", *ROLE_TABLE_COLUMNS, "cache_study_id", "cache_series_id"]
"""series_roles.csv of ``--dicom``: the study's own id, the role table, the integer ids the cache
and ``lsdc show`` use."""


@dataclass(frozen=True)
class DicomPredictResult:
    """What :func:`predict_dicom` wrote; ``predict`` holds the renamed submission and report."""

    predict: PredictResult
    roles: pd.DataFrame
    roles_path: Path
    layout: Path
    readings: list[Path]
    scan: FolderScan
    names: dict[int, str]
    """Integer study id -> the study's own id."""


# ------------------------------------------------------------------------------------------ ids
def cache_study_id(study_uid: str) -> int:
    """The integer a study is keyed by inside lsdc: 52 bits of the SHA-256 of its UID (below
    2**53, so even a float column holds it exactly)."""
    return int(hashlib.sha256(study_uid.encode()).hexdigest()[:13], 16)


def cache_series_id(series: SeriesInfo) -> int:
    """The integer a series is keyed by: ``SeriesNumber * 10**10`` (0-99999; none: 99999) plus
    ten digits of the SHA-256 of its UID, so the lower id is the series acquired first."""
    number = series.series_number if series.series_number is not None else 99_999
    digest = int(hashlib.sha256(series.series_uid.encode()).hexdigest()[:15], 16)
    return int(np.clip(number, 0, 99_999)) * 10**10 + digest % 10**10


def load_study_names(path: str | Path) -> dict[str, str]:
    """A ``--study-id`` CSV (columns ``StudyInstanceUID``, ``study_id``) -> UID -> own id.

    Raises:
        UserError: the file is missing or unreadable, lacks a column, repeats a UID or an id, or
            holds an id that cannot start a row_id (:func:`lsdc.contract.check_study_name`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: `study_ids` file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in ("StudyInstanceUID", "study_id") if c not in table.columns]
    if missing:
        raise UserError(f"{path}: needs columns StudyInstanceUID, study_id; lacks {missing}")
    names: dict[str, str] = {}
    for line, (uid, name) in enumerate(
        zip(table["StudyInstanceUID"], table["study_id"], strict=True), 2
    ):
        try:
            name = check_study_name(name)
        except ValueError as exc:
            raise UserError(f"{path}: row {line}: {exc}") from exc
        if uid.strip() in names:
            raise UserError(f"{path}: row {line}: StudyInstanceUID {uid} given twice")
        names[uid.strip()] = name
    repeated = pd.Series(list(names.values())).duplicated()
    if repeated.any():
        raise UserError(f"{path}: study_id {list(names.values())[int(repeated.idxmax())]} twice")
    return names


def _own_names(study_uids: Sequence[str], mapping: dict[str, str] | None) -> dict[str, str]:
    """Each study's own id: the mapping's, else its UID (warned about when a mapping is given)."""
    names = {}
    for uid in study_uids:
        if mapping is not None and uid in mapping:
            names[uid] = mapping[uid]
        else:
            if mapping is not None:
                warnings.warn(
                    f"StudyInstanceUID {uid} is not in `study_ids`; its rows use the UID",
                    LsdcWarning,
                    stacklevel=2,
                )
            names[uid] = check_study_name(uid)
    if mapping is not None:
        for uid in sorted(set(mapping) - set(study_uids)):
            warnings.warn(
                f"`study_ids` names StudyInstanceUID {uid}, which the folder does not hold",
                LsdcWarning,
                stacklevel=2,
            )
    taken = pd.Series(list(names.values()))
    if taken.duplicated().any():
        raise UserError(f"study id {taken[taken.duplicated()].iloc[0]} names two studies")
    return names


# -------------------------------------------------------------------------------------- layout
def _stage_layout(
    series: Sequence[SeriesInfo], names: dict[str, str], folder: Path
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Write the competition layout of the chosen series into ``folder``.

    Returns:
        The role table (ROLES_COLUMNS) and, for every link written, link path -> original path
        (to put the user's file names back into the report's messages).
    """
    images = folder / f"{SPLIT}_images"
    images.mkdir(parents=True)
    by_study: dict[str, list[SeriesInfo]] = {}
    for s in series:
        by_study.setdefault(s.study_uid, []).append(s)
    listed, studies, links = [], [], {}
    for uid, members in by_study.items():
        sid = cache_study_id(uid)
        studies.append(
            {
                "study_id": sid,
                "study_instance_uid": uid,
                "name": names[uid],
                "study_date": members[0].study_date,
                "study_description": members[0].study_description,
            }
        )
        for choice in choose_series(members):
            for s in choice.used:
                series_id = cache_series_id(s)
                listed.append((sid, series_id, choice.role))
                links.update(_link_series(s, images / str(sid) / str(series_id)))
    if len({s["study_id"] for s in studies}) != len(studies):
        raise AssertionError("internal error: two StudyInstanceUIDs hash to one study id")
    write_csv_atomic(
        pd.DataFrame(listed, columns=["study_id", "series_id", "series_description"]),
        folder / f"{SPLIT}_series_descriptions.csv",
    )
    sample = pd.DataFrame({"row_id": all_row_ids([s["study_id"] for s in studies])})
    for column in PRED_COLUMNS:
        sample[column] = 1.0 / len(PRED_COLUMNS)
    write_csv_atomic(sample, folder / "sample_submission.csv")
    write_csv_atomic(pd.DataFrame(studies), folder / STUDIES_NAME)

    table = role_table(series)
    by_uid = {s.series_uid: s for s in series}
    table.insert(0, "study", [names[u] for u in table["study_instance_uid"]])
    table["cache_study_id"] = [cache_study_id(u) for u in table["study_instance_uid"]]
    table["cache_series_id"] = [
        cache_series_id(by_uid[u]) if u in by_uid else pd.NA for u in table["series_instance_uid"]
    ]
    table["cache_series_id"] = table["cache_series_id"].astype("Int64")
    return table[ROLES_COLUMNS], links


def _link_series(series: SeriesInfo, folder: Path) -> dict[str, str]:
    """Link a series' files into ``folder`` as ``{InstanceNumber}.dcm`` (where every file has
    its own number; else ``{rank}.dcm``): the competition's naming, so the cache reads them as
    it reads the competition's. A file system without symbolic links gets copies."""
    folder.mkdir(parents=True)
    numbers = series.instance_numbers
    by_number = None not in numbers and len(set(numbers)) == len(numbers)
    links = {}
    for rank, (path, number) in enumerate(zip(series.files, numbers, strict=True), start=1):
        link = folder / f"{number if by_number else rank}.dcm"
        source = Path(path).resolve()
        try:
            os.symlink(source, link)
        except OSError:
            shutil.copy2(source, link)
        links[str(link)] = str(path)
    return links


def _replace_paths(message: str, links: dict[str, str], layout: Path) -> str:
    """A report message with the layout's links named by the user's files again."""
    if not message or str(layout) not in message:
        return message
    for link, original in links.items():
        if link in message:
            message = message.replace(link, original)
    return message.replace(str(layout / f"{SPLIT}_images"), "series folder")


# ------------------------------------------------------------------------------------- predict
def predict_dicom(
    dicom_dir: str | Path,
    run_dirs: Sequence[str | Path],
    out_path: str | Path,
    study_names: str | Path | None = None,
    tta_flip: bool = False,
    calibrate: bool = True,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    device: str | None = None,
    threads: int = 0,
    progress: bool = True,
    allow_fallback: bool = False,
) -> DicomPredictResult:
    """Predict every study of a DICOM folder tree; write, beside ``out_path`` (the submission),
    ``predict_report.csv``, ``series_roles.csv``, ``readings/{study}.md`` and
    ``competition_layout/``.

    Args:
        dicom_dir: any folder tree of DICOM files (read only).
        run_dirs, tta_flip, calibrate, cache_dir, workers, device, threads, progress,
            allow_fallback: as :func:`lsdc.inference.predict.predict_split` (``workers`` also
            reads the headers).
        study_names: a CSV mapping StudyInstanceUID to the study's own id (``--study-id``);
            without it, rows use the StudyInstanceUID.

    Raises:
        UserError: ``dicom_dir`` is missing or holds no DICOM image, a run is unusable, the
            ``--study-id`` CSV is bad, or any refusal of ``predict_split``. Nothing written then.
    """
    dicom_dir = check_input_dir(dicom_dir, "dicom")
    out_path = Path(out_path)
    check_output_file(out_path, "`out_path`")
    runs = [check_run(r) for r in run_dirs]
    mapping = load_study_names(study_names) if study_names is not None else None

    scan = scan_folder(dicom_dir, workers=workers if isinstance(workers, int) else 1)
    if not scan.images:
        raise UserError(f"{dicom_dir}: no DICOM image found ({scan.summary()})")
    if progress or any(scan.skipped.values()):
        log.info("%s: %s", dicom_dir, scan.summary())
    for problem in scan.problems:
        log.warning(problem)
    series = group_series(scan.images)
    study_uids = list(dict.fromkeys(s.study_uid for s in series))
    names = _own_names(study_uids, mapping)

    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lsdc-dicom-", dir=out_dir) as tmp:
        staged = Path(tmp) / LAYOUT_NAME
        roles, links = _stage_layout(series, names, staged)
        result = predict_split(
            staged,
            runs,
            Path(tmp) / "out" / out_path.name,
            split=SPLIT,
            tta_flip=tta_flip,
            calibrate=calibrate,
            cache_dir=cache_dir,
            workers=workers,
            device=device,
            threads=threads,
            progress=progress,
            allow_fallback=allow_fallback,
        )
        by_id = {cache_study_id(uid): names[uid] for uid in study_uids}
        report = result.report.copy()
        report["message"] = [_replace_paths(str(m), links, staged) for m in report["message"]]
        readings = _readings(
            result.submission, report, roles, series, by_id, runs, out_dir, cache_dir
        )
        submission = result.submission.assign(
            row_id=rename_row_ids(result.submission["row_id"], by_id)
        )
        report["study_id"] = [by_id[int(s)] for s in report["study_id"]]
        final = out_dir / LAYOUT_NAME
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        written = write_readings(out_dir / READINGS_NAME, readings)
        for stale in set((out_dir / READINGS_NAME).glob("*.md")) - set(written):
            stale.unlink()  # a study of an earlier run; its lsdc show page stays
        roles_path = write_csv_atomic(roles, out_dir / ROLES_NAME)
        report_path = write_csv_atomic(report, out_dir / REPORT_NAME)
        write_csv_atomic(submission, out_path)
    return DicomPredictResult(
        predict=PredictResult(submission, report, out_path, report_path),
        roles=roles,
        roles_path=roles_path,
        layout=out_dir / LAYOUT_NAME,
        readings=written,
        scan=scan,
        names=by_id,
    )


def _readings(
    submission: pd.DataFrame,
    report: pd.DataFrame,
    roles: pd.DataFrame,
    series: Sequence[SeriesInfo],
    names: dict[int, str],
    runs: Sequence[Path],
    out_dir: Path,
    cache_dir: str | Path | None,
) -> list[StudyReading]:
    """One :class:`StudyReading` per study of the (integer-keyed) submission and report."""
    by_row = submission.set_index("row_id")[list(PRED_COLUMNS)]
    report_of = report.set_index("study_id")
    first = {}
    for s in series:
        first.setdefault(cache_study_id(s.study_uid), s)
    readings = []
    for sid, name in names.items():
        row = report_of.loc[sid]
        not_read = tuple(d for d in str(row["missing_descriptions"]).split("; ") if d)
        page = f"{name}.html"
        cache = Path(cache_dir).resolve() if cache_dir is not None else "CACHE"
        show = (
            f"lsdc show --data {(out_dir / LAYOUT_NAME).resolve()} --cache {cache} "
            f"--run {Path(runs[0]).resolve()} --study {sid} "
            f"--out {(out_dir / READINGS_NAME / page).resolve()}"
        )
        if cache_dir is None:
            show = f"{show}   # CACHE: rerun lsdc predict --dicom with --cache CACHE to keep it"
        study = first[sid]
        header = ", ".join(
            filter(
                None,
                [
                    _date(study.study_date),
                    study.study_description,
                    f"StudyInstanceUID {study.study_uid}" if name != study.study_uid else "",
                ],
            )
        )
        readings.append(
            StudyReading(
                name=name,
                probabilities=by_row.loc[study_row_ids(sid)].to_numpy(np.float64),
                source=str(row["source"]),
                not_read=not_read,
                series_read=series_read_lines(roles[roles["cache_study_id"] == sid]),
                message=str(row["message"]),
                show_command=show,
                page=page,
                header=header,
            )
        )
    return readings


def _date(value: str) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value


# ------------------------------------------------------------------------- competition layout
CHECK_COLUMNS = ["study_id", "series_id", "csv_description", *SERIES_COLUMNS, "agrees"]
"""series_roles.csv of ``--data ... --check-descriptions``: one row per listed series, its CSV
description beside the role its headers give (``agrees``: yes, no, or ``undecided`` where the
folder gave no image header)."""


def check_descriptions(data_root: str | Path, split: str) -> pd.DataFrame:
    """Compare ``{split}_series_descriptions.csv`` with the role each listed series' headers give
    (the SeriesDescription tag, not the CSV, breaks ties); warn per series that disagrees.

    Returns:
        One row per listed series (CHECK_COLUMNS).

    Raises:
        UserError: the CSV is missing or breaks the contract.
    """
    data_root = Path(data_root)
    listed = load_series_descriptions(data_root / f"{split}_series_descriptions.csv")
    rows = []
    for r in listed.itertuples(index=False):
        folder = data_root / f"{split}_images" / str(r.study_id) / str(r.series_id)
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        headers = [h for h in map(read_header, files) if not isinstance(h, tuple)]
        base = {
            "study_id": r.study_id,
            "series_id": r.series_id,
            "csv_description": r.series_description,
        }
        if not headers:
            rows.append({**base, "role": OTHER, "agrees": "undecided"})
            continue
        info = describe_series(headers)
        agrees = "yes" if info.role == r.series_description else "no"
        row = {**base, **series_row(info), "agrees": agrees}
        rows.append(row)
        if agrees == "no":
            said = info.reason if info.role == OTHER else f"{info.role} ({info.reason})"
            log.warning(
                f"{folder}: {split}_series_descriptions.csv says {r.series_description}; "
                f"its headers say {said}"
            )
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)
