"""Which series of a study is its Sagittal T1, Sagittal T2/STIR and Axial T2, from DICOM headers.

The competition hands lsdc a CSV that names each series' role; a hospital's PACS export names
nothing: many series (localizers, coronals, post-contrast, repeats) of several studies in one
folder tree, files named by UID or number, descriptions in each vendor's spelling. This module
reads only the headers (``stop_before_pixels`` and a short tag list: a few milliseconds a file)
and decides, with rules stated here and repeated in README ("Your own studies"):

1. **Files**: every file under the folder is tried; ``DICOMDIR``, files that are not DICOM,
   DICOM objects that are not images (reports, presentation states) and files whose header
   cannot be parsed (truncated) are skipped and counted, never fatal.
2. **Series**: files are grouped by StudyInstanceUID and SeriesInstanceUID.
3. **Plane** of a file: the patient axis its slice normal (ImageOrientationPatient row x column)
   points along, when that component is at least ``PLANE_COSINE`` (the normal within ~37 degrees
   of the axis; tilted per-disc axials stay axial); else ``oblique``. A series whose files lie in
   more than one plane is ``mixed`` (a 3-plane localizer). Without the tag: the description's
   plane keyword (``sag``, ``ax``/``tra``, ``cor``).
4. **Weighting** from RepetitionTime (TR), EchoTime (TE), InversionTime (TI) and
   ScanningSequence, in ms: an inversion pulse (TI, or ``IR`` in ScanningSequence with a TI)
   with TI < 400 is STIR, 400-1500 with TE < 40 is T1 (T1 FLAIR), >= 1500 is FLAIR; otherwise
   TE < 30 with TR < 1200 is T1, TE >= 60 with TR >= 1500 is T2, TE < 30 with TR >= 1500 is PD,
   a gradient echo (``GR`` without ``SE``) is GRE. Anything else (tags missing, intermediate
   values) is undecided, and the description's keywords decide (``t1``, ``t2``, ``stir``/
   ``tirm``, ``flair``, ``pd``): the tie-break. Where headers decide, a description that says
   otherwise is noted in the reason, never obeyed.
5. **Role**: sagittal T1 -> Sagittal T1; sagittal T2 or STIR -> Sagittal T2/STIR; axial T2 ->
   Axial T2; everything else is ``other``, as is any series that is not MR, is a localizer
   (ImageType ``LOCALIZER`` or a ``loc``/``scout``/``survey``/``3-plane`` keyword), is
   post-contrast (ContrastBolusAgent, or ``+c``/``post``/``gad`` in its description: the models
   learnt from non-contrast studies), holds multi-frame files or has fewer than ``MIN_IMAGES``
   images.
6. **Choice** among a study's candidates (:func:`choose_series`): Sagittal T1 and Sagittal
   T2/STIR keep one series each, ranked by ORIGINAL before DERIVED images, then (T2/STIR) T2
   before STIR, then the most images, then the most pixels per image, then the lowest
   SeriesNumber (the first acquired), then the SeriesInstanceUID; Axial T2 keeps every candidate,
   as the competition lists them: protocols often split the levels over several axial series,
   and the models pick, for each level, the stack that holds it.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import struct
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from lsdc.contract import SERIES_DESCRIPTIONS
from lsdc.utils import init_worker

OTHER = "other"
"""The role of a series no model reads."""

ROLES: tuple[str, ...] = SERIES_DESCRIPTIONS
"""The roles a series can take: the competition's series descriptions."""

PLANE_COSINE = 0.8
"""Smallest |component| of the slice normal along a patient axis for a file to lie in that
axis' plane (cos 37 degrees)."""

MIN_IMAGES = 3
"""A series with fewer images is a scout, not a role (per-disc axial series hold 3 or more)."""

STIR_MAX_TI = 400.0
FLAIR_MIN_TI = 1500.0
T1_MAX_TE, T1_MAX_TR = 30.0, 1200.0
T2_MIN_TE, T2_MIN_TR = 60.0, 1500.0
IR_T1_MAX_TE = 40.0
"""The weighting thresholds of rule 4 (milliseconds)."""

HEADER_TAGS: tuple[str, ...] = (
    "Modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "StudyDescription",
    "StudyDate",
    "InstanceNumber",
    "ImageType",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "Rows",
    "Columns",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "ScanningSequence",
    "SequenceVariant",
    "ContrastBolusAgent",
    "MagneticFieldStrength",
    "NumberOfFrames",
    "SOPClassUID",
    "SOPInstanceUID",
)
"""The only tags read from each file."""

SKIP_KINDS: tuple[str, ...] = ("dicomdir", "not_dicom", "not_image", "unreadable")
"""Why a file was skipped: a DICOMDIR, not DICOM, a DICOM object without pixel data, a header
that cannot be parsed (e.g. truncated)."""


@dataclass(frozen=True)
class ImageHeader:
    """The tags of one DICOM image file that decide its series and role."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    series_number: int | None
    description: str
    study_description: str
    study_date: str
    instance_number: int | None
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    rows: int
    columns: int
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None
    scanning_sequence: str
    contrast: str
    frames: int


@dataclass
class FolderScan:
    """Every image header found under a folder, and the files skipped, by kind."""

    images: list[ImageHeader]
    skipped: dict[str, list[Path]] = field(default_factory=lambda: {k: [] for k in SKIP_KINDS})
    problems: list[str] = field(default_factory=list)
    """One line per ``unreadable`` file: the path and what failed."""

    def summary(self) -> str:
        """``N images; skipped: 1 dicomdir, 2 not_dicom, ...`` (the kinds that occurred)."""
        skipped = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items() if v)
        return f"{len(self.images)} DICOM images" + (f"; skipped {skipped}" if skipped else "")


@dataclass
class SeriesInfo:
    """One series as its headers describe it, with the role they give it."""

    study_uid: str
    series_uid: str
    series_number: int | None
    description: str
    files: list[Path]
    instance_numbers: list[int | None]
    """Of ``files``, in their order (by InstanceNumber)."""
    plane: str
    weighting: str
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None
    scanning_sequence: str
    rows: int
    columns: int
    derived: bool
    weighting_source: str
    """``tags`` (rule 4 decided), ``description`` (its keywords did) or ``none``."""
    study_date: str = ""
    study_description: str = ""
    role: str = OTHER
    reason: str = ""

    @property
    def n_images(self) -> int:
        return len(self.files)

    @property
    def label(self) -> str:
        """How a report names the series: its number and description."""
        number = "?" if self.series_number is None else str(self.series_number)
        return f"series {number} ({self.description or 'no description'})"


# ------------------------------------------------------------------------------------- reading
def read_header(path: Path) -> ImageHeader | tuple[str, str]:
    """The header of one file, or ``(skip kind, message)`` when it is not a usable image.

    Files without the 128-byte preamble (old exports) are read by content; such a read must
    find a StudyInstanceUID and a SeriesInstanceUID to count as DICOM.
    """
    if path.name.upper() == "DICOMDIR":
        return "dicomdir", f"{path}: DICOMDIR (an index of the export, not an image)"
    try:
        with warnings.catch_warnings(), path.open("rb") as handle:
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_SPECIFIC)
                forced = False
            except InvalidDicomError:
                handle.seek(0)
                ds = pydicom.dcmread(
                    handle, stop_before_pixels=True, specific_tags=_SPECIFIC, force=True
                )
                forced = True
            study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            if forced and not (study_uid and series_uid):
                return "not_dicom", f"{path}: not a DICOM file"
            if ds.get("file_meta") is not None and str(
                ds.file_meta.get("MediaStorageSOPClassUID", "")
            ) == str(pydicom.uid.MediaStorageDirectoryStorage):
                return "dicomdir", f"{path}: a DICOMDIR (an index of the export, not an image)"
            rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
            if not (study_uid and series_uid and rows and columns):
                if "Image Storage" in _sop_class(ds).name:  # an image whose header is cut
                    return "unreadable", f"{path}: truncated (the header lacks UIDs or matrix)"
                return "not_image", f"{path}: not an image (no UIDs or matrix: a report, a state)"
            short = _pixels_cut_short(handle, path.stat().st_size)
            if short:
                return "unreadable", f"{path}: truncated ({short})"
            return ImageHeader(
                path=path,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=_text(ds, "SOPInstanceUID"),
                modality=_text(ds, "Modality").upper(),
                series_number=_int(ds, "SeriesNumber"),
                description=_text(ds, "SeriesDescription"),
                study_description=_text(ds, "StudyDescription"),
                study_date=_text(ds, "StudyDate"),
                instance_number=_int(ds, "InstanceNumber"),
                image_type=tuple(s.upper() for s in _values(ds, "ImageType")),
                orientation=_orientation(ds),
                rows=rows,
                columns=columns,
                repetition_time=_float(ds, "RepetitionTime"),
                echo_time=_float(ds, "EchoTime"),
                inversion_time=_float(ds, "InversionTime"),
                scanning_sequence="\\".join(s.upper() for s in _values(ds, "ScanningSequence")),
                contrast=_text(ds, "ContrastBolusAgent"),
                frames=_int(ds, "NumberOfFrames") or 1,
            )
    except Exception as exc:  # a damaged file can fail anywhere inside the parser
        return "unreadable", f"{path}: header unreadable ({type(exc).__name__}: {exc})"


_SPECIFIC = list(HEADER_TAGS)


def _sop_class(ds: pydicom.Dataset) -> pydicom.uid.UID:
    meta = ds.get("file_meta")
    value = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get(
        "SOPClassUID", ""
    )
    return pydicom.uid.UID(str(value))


def _pixels_cut_short(handle: BinaryIO, size: int) -> str:
    """ "" or how a file ends before its Pixel Data element does.

    After a ``stop_before_pixels`` read, pydicom leaves the file at the Pixel Data tag: its
    element header gives the value's length (explicit VR: tag, VR, 2 reserved bytes, 4-byte
    length; implicit: tag, 4-byte length), so a cut file is found without reading its pixels.
    Encapsulated (compressed) data of undefined length is not checked here.
    """
    start = handle.tell()
    head = handle.read(12)
    if head[:4] == b"\xe0\x7f\x10\x00":
        order = "<"
    elif head[:4] == b"\x7f\xe0\x00\x10":
        order = ">"
    else:
        return ""
    explicit = head[4:6].isalpha()
    if explicit and len(head) == 12:
        (length,), header = struct.unpack(order + "I", head[8:12]), 12
    elif not explicit and len(head) >= 8:
        (length,), header = struct.unpack(order + "I", head[4:8]), 8
    else:
        return f"{size} bytes: the file ends inside the Pixel Data header"
    end = start + header + length
    if length != 0xFFFFFFFF and size < end:
        return f"{size} bytes, its Pixel Data ends at byte {end}"
    return ""


def scan_folder(root: str | Path, workers: int = 1) -> FolderScan:
    """Read the header of every file under ``root`` (any depth, any file name).

    Args:
        root: the folder tree (a PACS export, a CD, a study folder).
        workers: processes reading headers (the result does not depend on it).
    """
    paths = sorted(p for p in Path(root).rglob("*") if p.is_file())
    if workers > 1 and len(paths) > 256:
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(os.getpid(),),
        ) as pool:
            results = list(pool.map(read_header, paths, chunksize=128))
    else:
        results = [read_header(p) for p in paths]
    scan = FolderScan(images=[])
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, ImageHeader):
            scan.images.append(result)
        else:
            kind, message = result
            scan.skipped[kind].append(path)
            if kind == "unreadable":
                scan.problems.append(message)
    return scan


def _values(ds: pydicom.Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        value = [value]
    return [str(v).strip() for v in value if str(v).strip()]


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    return " ".join(_values(ds, keyword))


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    values = _values(ds, keyword)
    try:
        number = float(values[0]) if values else None
    except ValueError:
        return None
    return number if number is not None and np.isfinite(number) else None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    number = _float(ds, keyword)
    return int(number) if number is not None and float(number).is_integer() else None


def _orientation(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    try:
        values = tuple(float(v) for v in _values(ds, "ImageOrientationPatient"))
    except ValueError:
        return None
    if len(values) != 6 or not np.all(np.isfinite(values)):
        return None
    normal = np.cross(values[:3], values[3:])
    return values if np.linalg.norm(normal) > 1e-6 else None


# --------------------------------------------------------------------------------- classifying
def plane_of(orientation: Sequence[float] | None) -> str | None:
    """``sagittal``, ``coronal``, ``axial`` or ``oblique`` for an ImageOrientationPatient
    (rule 3); None without one."""
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    normal = np.abs(normal / np.linalg.norm(normal))
    axis = int(np.argmax(normal))
    if normal[axis] < PLANE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def weighting_from_tags(
    repetition_time: float | None,
    echo_time: float | None,
    inversion_time: float | None,
    scanning_sequence: str = "",
) -> str | None:
    """``T1``, ``T2``, ``STIR``, ``FLAIR``, ``PD`` or ``GRE`` from the sequence tags (rule 4);
    None when they do not decide."""
    tr, te, ti = repetition_time, echo_time, inversion_time
    parts = set(scanning_sequence.upper().split("\\")) - {""}
    if ti is not None and ti > 0:
        if ti < STIR_MAX_TI:
            return "STIR"
        if ti >= FLAIR_MIN_TI:
            return "FLAIR"
        if te is not None and te < IR_T1_MAX_TE:
            return "T1"
        return None
    if "GR" in parts and "SE" not in parts:
        return "GRE"
    if tr is None or te is None:
        return None
    if te < T1_MAX_TE and tr < T1_MAX_TR:
        return "T1"
    if te >= T2_MIN_TE and tr >= T2_MIN_TR:
        return "T2"
    if te < T1_MAX_TE and tr >= T2_MIN_TR:
        return "PD"
    return None


def _tokens(description: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9+]+", description.lower()) if t]


def plane_from_words(description: str) -> str | None:
    """The plane a description names (``sag``, ``ax``/``tra``, ``cor`` prefixes), if exactly
    one."""
    found = set()
    for token in _tokens(description):
        if token.startswith("sag"):
            found.add("sagittal")
        elif token.startswith("ax") or token in ("tra", "trans", "transverse"):
            found.add("axial")
        elif token.startswith("cor"):
            found.add("coronal")
    return found.pop() if len(found) == 1 else None


def weighting_from_words(description: str) -> str | None:
    """The weighting a description names, if any: ``flair`` -> FLAIR (T1 with a ``t1``),
    ``stir``/``tirm`` -> STIR (T1 with a ``t1``: Siemens' T1 TIRM; T2 with a ``t2``: the
    competition's ``Sagittal T2/STIR``), else a ``t1``, ``t2`` or ``pd`` prefix."""
    tokens = _tokens(description)
    t1 = any(t.startswith("t1") for t in tokens)
    t2 = any(t.startswith("t2") for t in tokens)
    if any("flair" in t for t in tokens):
        return "T1" if t1 else "FLAIR"
    if any(t.startswith(("stir", "tirm")) or t.endswith(("stir", "tirm")) for t in tokens):
        return "T1" if t1 else "T2" if t2 else "STIR"
    if t1 != t2:
        return "T1" if t1 else "T2"
    if any(t.startswith("pd") for t in tokens):
        return "PD"
    return None


_LOCALIZER = re.compile(
    r"\b(loc|locali[sz]er|scout|survey|pilot|tri-?pilot)\b|3[\s_-]*pl(ane)?\b", re.IGNORECASE
)
_CONTRAST = re.compile(r"\+\s*c\b|\bc\s*\+|\bpost\b|\bgad|\bgd\b|contrast", re.IGNORECASE)


def role_for(plane: str, weighting: str) -> str:
    """The role a (plane, weighting) pair fills (rule 5), or OTHER."""
    if plane == "sagittal" and weighting == "T1":
        return "Sagittal T1"
    if plane == "sagittal" and weighting in ("T2", "STIR"):
        return "Sagittal T2/STIR"
    if plane == "axial" and weighting == "T2":
        return "Axial T2"
    return OTHER


def describe_series(images: Sequence[ImageHeader]) -> SeriesInfo:
    """Plane, weighting and role of one series from its files' headers (rules 3-5)."""
    files = sorted(images, key=lambda h: (h.instance_number is None, h.instance_number, h.path))
    first = files[0]
    description = next((h.description for h in files if h.description), "")
    planes = {p for p in (plane_of(h.orientation) for h in files) if p is not None}
    notes: list[str] = []
    if len(planes) > 1:
        plane = "mixed"
    elif planes:
        plane = planes.pop()
    else:
        plane = plane_from_words(description) or "unknown"
        notes.append(
            "no ImageOrientationPatient: plane "
            + ("from the description" if plane != "unknown" else "unknown")
        )
    tr = _common(h.repetition_time for h in files)
    te = _common(h.echo_time for h in files)
    ti = _common(h.inversion_time for h in files)
    sequence = next((h.scanning_sequence for h in files if h.scanning_sequence), "")
    by_tags = weighting_from_tags(tr, te, ti, sequence)
    by_words = weighting_from_words(description)
    source = "tags" if by_tags is not None else "description" if by_words is not None else "none"
    if by_tags is not None:
        weighting = by_tags
        told = _sequence_text(tr, te, ti)
        if (
            by_words is not None
            and by_words != by_tags
            and not ({by_words, by_tags} <= {"T2", "STIR"})
        ):
            notes.append(f"{told} say {by_tags}; the description says {by_words}: headers win")
        else:
            notes.append(f"{told} -> {by_tags}")
    elif by_words is not None:
        weighting = by_words
        notes.append(f"sequence tags undecided; the description says {by_words}")
    else:
        weighting = "unknown"
        notes.append("neither the sequence tags nor the description say the weighting")
    image_type = set(first.image_type)
    info = SeriesInfo(
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        series_number=first.series_number,
        description=description,
        files=[h.path for h in files],
        instance_numbers=[h.instance_number for h in files],
        plane=plane,
        weighting=weighting,
        repetition_time=tr,
        echo_time=te,
        inversion_time=ti,
        scanning_sequence=sequence,
        rows=max(h.rows for h in files),
        columns=max(h.columns for h in files),
        derived="DERIVED" in image_type,
        weighting_source=source,
        study_date=first.study_date,
        study_description=first.study_description,
    )
    excluded = _excluded(files, description, image_type, plane)
    info.role = OTHER if excluded else role_for(plane, weighting)
    if excluded:
        info.reason = excluded
    elif info.role == OTHER:
        info.reason = f"{plane} {weighting}: no model reads it ({'; '.join(notes)})"
    else:
        info.reason = f"{plane}; {'; '.join(notes)}"
    return info


def _excluded(
    files: Sequence[ImageHeader], description: str, image_type: set[str], plane: str
) -> str:
    """Why a series is ``other`` whatever its weighting, or "" (rule 5)."""
    modality = files[0].modality
    if modality and modality != "MR":
        return f"modality {modality}, not MR"
    if "LOCALIZER" in image_type or _LOCALIZER.search(description.replace("_", " ")):
        return "a localizer"
    if plane == "mixed":
        return "images in several planes (a localizer)"
    if any(h.frames > 1 for h in files):
        return "multi-frame images (one slice per file is read)"
    if any(h.contrast for h in files) or _CONTRAST.search(description.replace("_", " ")):
        return "post-contrast (the models learnt from non-contrast studies)"
    if len(files) < MIN_IMAGES:
        return f"{len(files)} image(s): fewer than {MIN_IMAGES}"
    return ""


def _common(values: Iterable[float | None]) -> float | None:
    """The most frequent value (a series' TR/TE/TI; a few files may differ or lack it)."""
    present = [round(v, 3) for v in values if v is not None]
    if not present:
        return None
    numbers, counts = np.unique(present, return_counts=True)
    return float(numbers[int(np.argmax(counts))])


def _sequence_text(tr: float | None, te: float | None, ti: float | None) -> str:
    parts = [f"{name} {v:g}" for name, v in (("TR", tr), ("TE", te), ("TI", ti)) if v is not None]
    return " ".join(parts) or "the sequence tags"


def group_series(images: Iterable[ImageHeader]) -> list[SeriesInfo]:
    """One :class:`SeriesInfo` per (StudyInstanceUID, SeriesInstanceUID), classified, sorted by
    study, then SeriesNumber. A file whose SOPInstanceUID an earlier file (in path order) of its
    series has is a copy (exports often hold one image twice) and is left out, its series'
    reason saying how many."""
    groups: dict[tuple[str, str], dict[str, ImageHeader]] = {}
    copies: dict[tuple[str, str], int] = {}
    for header in sorted(images, key=lambda h: h.path):
        key = (header.study_uid, header.series_uid)
        members = groups.setdefault(key, {})
        if header.sop_uid and header.sop_uid in members:
            copies[key] = copies.get(key, 0) + 1
        else:
            members[header.sop_uid or str(header.path)] = header
    series = []
    for key, members in groups.items():
        info = describe_series(list(members.values()))
        if copies.get(key):
            info.reason += f"; {copies[key]} copies of its files (same SOPInstanceUID) left out"
        series.append(info)
    return sorted(series, key=lambda s: (s.study_uid, _number(s), s.series_uid))


def _number(series: SeriesInfo) -> int:
    return series.series_number if series.series_number is not None else 2**31


# ------------------------------------------------------------------------------------ choosing
@dataclass
class RoleChoice:
    """What one study uses for one role."""

    role: str
    used: list[SeriesInfo]
    rejected: list[tuple[SeriesInfo, str]]
    """Candidates not used, each with why."""
    why: str


def _rank(series: SeriesInfo) -> tuple:
    """Rule 6's order for one-series roles: smaller is better."""
    return (
        series.derived,
        series.weighting == "STIR",
        -series.n_images,
        -series.rows * series.columns,
        _number(series),
        series.series_uid,
    )


def _why_better(best: SeriesInfo, other: SeriesInfo) -> str:
    """The first key of rule 6 on which ``best`` beats ``other``, in words."""
    if best.derived != other.derived:
        return "original images, not derived ones"
    if (best.weighting == "STIR") != (other.weighting == "STIR"):
        return "T2, not STIR"
    if best.n_images != other.n_images:
        return f"more images ({best.n_images} vs {other.n_images})"
    if best.rows * best.columns != other.rows * other.columns:
        return f"more pixels ({best.rows}x{best.columns} vs {other.rows}x{other.columns})"
    if _number(best) != _number(other):
        return "the lower SeriesNumber (acquired first)"
    return "the lower SeriesInstanceUID"


def choose_series(series: Sequence[SeriesInfo]) -> list[RoleChoice]:
    """The series one study uses for each role (rule 6), one :class:`RoleChoice` per role in
    ROLES order (``used`` empty where no series qualifies)."""
    choices = []
    for role in ROLES:
        candidates = sorted((s for s in series if s.role == role), key=_rank)
        if not candidates:
            choices.append(RoleChoice(role, [], [], "no series qualifies"))
        elif len(candidates) == 1:
            choices.append(RoleChoice(role, candidates, [], "the only candidate"))
        elif role == "Axial T2":
            why = f"all {len(candidates)} candidates kept (each level is read where it lies)"
            choices.append(RoleChoice(role, candidates, [], why))
        else:
            best, rest = candidates[0], candidates[1:]
            rejected = [(s, _why_better(best, s)) for s in rest]
            why = f"best of {len(candidates)} candidates: {_why_better(best, rest[0])}"
            choices.append(RoleChoice(role, [best], rejected, why))
    return choices


SERIES_COLUMNS = [
    "series_number",
    "series_description",
    "orientation",
    "weighting",
    "repetition_time",
    "echo_time",
    "inversion_time",
    "scanning_sequence",
    "n_images",
    "role",
]
"""What the headers say of a series, and the role they give it (:func:`series_row`)."""

ROLE_TABLE_COLUMNS = [
    "study_instance_uid",
    "series_instance_uid",
    *SERIES_COLUMNS,
    "used",
    "why",
    "rejected",
]
"""Columns of :func:`role_table` (``series_roles.csv`` adds the study's own id in front)."""


def series_row(series: SeriesInfo) -> dict[str, object]:
    """The two UIDs and the SERIES_COLUMNS of one series."""
    return {
        "study_instance_uid": series.study_uid,
        "series_instance_uid": series.series_uid,
        "series_number": series.series_number,
        "series_description": series.description,
        "orientation": series.plane,
        "weighting": series.weighting,
        "repetition_time": series.repetition_time,
        "echo_time": series.echo_time,
        "inversion_time": series.inversion_time,
        "scanning_sequence": series.scanning_sequence,
        "n_images": series.n_images,
        "role": series.role,
    }


def role_table(series: Sequence[SeriesInfo]) -> pd.DataFrame:
    """One row per series of every study (ROLE_TABLE_COLUMNS): its headers, the role they give,
    whether it is used and why (or why not), and for a used series the candidates rejected; plus
    one row per role a study lacks (``used`` False, ``why`` saying its rows get the prior)."""
    by_study: dict[str, list[SeriesInfo]] = {}
    for s in series:
        by_study.setdefault(s.study_uid, []).append(s)
    rows = []
    for study_uid, members in by_study.items():
        decided: dict[str, tuple[bool, str, str]] = {}
        missing = []
        for choice in choose_series(members):
            best = choice.used[0] if choice.used else None
            for s in choice.used:
                rejected = "; ".join(f"{r.label}: {why}" for r, why in choice.rejected)
                decided[s.series_uid] = (True, f"{choice.role}: {choice.why}", rejected)
            for s, why in choice.rejected:
                assert best is not None
                decided[s.series_uid] = (
                    False,
                    f"rejected for {choice.role}: {best.label} chosen, {why}",
                    "",
                )
            if best is None:
                missing.append(choice.role)
        for s in members:
            used, why, rejected = decided.get(s.series_uid, (False, "", ""))
            rows.append(
                {
                    **series_row(s),
                    "used": used,
                    "why": f"{why} ({s.reason})" if why else s.reason,
                    "rejected": rejected,
                }
            )
        for role in missing:
            rows.append(
                {
                    "study_instance_uid": study_uid,
                    "series_instance_uid": "",
                    "role": role,
                    "used": False,
                    "why": f"no series qualifies as {role}: the rows it grades get the class prior",
                    "rejected": "",
                }
            )
    table = pd.DataFrame(rows, columns=ROLE_TABLE_COLUMNS)
    table["series_number"] = table["series_number"].astype("Int64")
    table["n_images"] = table["n_images"].astype("Int64")
    return table
