"""Read one DICOM series folder into oriented, geometry-carrying volumes (one per stack).

A wrong slice order silently scrambles labels, so slices are ordered by their position along the
slice normal (never by file name or instance number) and a series that holds several stacks
(typical of Axial T2: one short stack per disc, each tilted its own way) is split into one
:class:`Volume` per stack. Everything a file can get wrong is turned into a warning or a skipped
file with a message naming it; one bad file never loses the rest of its series.

Rules, in order (docs/cache.md repeats them for users of the cache):

1. Every file is read with pydicom (the pylibjpeg plugins decode JPEG baseline/extended/lossless,
   JPEG-LS, JPEG 2000 and RLE). A file that is not DICOM, has no pixel data, or cannot be
   decoded is skipped and reported.
2. Pixels go through the modality rescale (slope/intercept); MONOCHROME1 is inverted over the
   stored value range so that larger always means brighter.
3. Slices are grouped into stacks by orientation (ImageOrientationPatient within 1e-3) and matrix
   (Rows x Columns; a series with several matrices is split, with a warning).
4. Within a group slices are sorted along the stack's dominant patient axis (sagittal: x, right to
   left; coronal: y; axial: z, inferior to superior). Slices at one position (within 0.01 mm)
   are duplicates: the lowest instance number is kept, the others reported. A gap wider than
   ``GAP_SPLIT_FACTOR`` times the median step starts a new stack.
5. Stacks are numbered 0, 1, ... by their lowest instance number.
6. A missing geometry tag falls back to a default, with a warning: PixelSpacing -> 1 x 1 mm;
   ImageOrientationPatient -> the canonical orientation of the series description (sagittal:
   row (0, 1, 0), column (0, 0, -1); otherwise axial: row (1, 0, 0), column (0, 1, 0));
   ImagePositionPatient -> (instance_number - 1) x slice spacing along the normal from the
   origin, where the slice spacing is SpacingBetweenSlices, else SliceThickness, else 1 mm;
   InstanceNumber -> the file name's number, else the file's rank in name order.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from lsdc.errors import UserError
from lsdc.preprocessing.geometry import StackGeometry
from lsdc.utils import is_machine_failure

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between ImageOrientationPatient components of slices of one stack."""

DUPLICATE_TOLERANCE_MM = 0.01
"""Slices closer than this along the normal are at the same position."""

GAP_SPLIT_FACTOR = 2.5
"""A gap wider than this many median slice steps splits a group into two stacks; a single
missing slice (a gap of 2 steps) does not."""

_HEADER_TAGS = [
    Tag(keyword)
    for keyword in (
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "SliceThickness",
        "SpacingBetweenSlices",
        "SeriesDescription",
        "Manufacturer",
        "MagneticFieldStrength",
    )
]
"""Tags read besides the image pixel module (group 0028) and the file meta."""

SAGITTAL_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class SeriesReadError(UserError):
    """A series folder gave no image at all (empty, or every file unreadable)."""


@dataclass
class Volume:
    """One stack of a series, sorted and ready to cache.

    Attributes:
        array: (n_slices, rows, cols) modality values (rescaled; MONOCHROME1 inverted), in the
            stored integer dtype when no rescale changed the values (uint16 or int16, 8-bit
            data as uint8), else the smallest exact dtype of :func:`compact_dtype`.
        geometry: where each voxel sits in the patient frame; holds the instance numbers.
        meta: metadata the models use: series_description, slice_thickness,
            spacing_between_slices, pixel_spacing, rows, columns, manufacturer, field_strength,
            plus photometric_interpretation, transfer_syntax and the measured slice_spacing.
        warnings: one message per rule that had to bend (names the file and the problem).
    """

    array: np.ndarray
    geometry: StackGeometry
    meta: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def instance_numbers(self) -> tuple[int, ...]:
        return self.geometry.instance_numbers

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (slice, row, col) in mm."""
        return self.geometry.spacing

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel (slice, row, col) -> patient mm."""
        return self.geometry.affine

    @property
    def series_description(self) -> str | None:
        return self.meta.get("series_description")


@dataclass
class SeriesRead:
    """Everything read from one series folder: its stacks and what went wrong at file level."""

    volumes: list[Volume]
    problems: list[str]
    """Messages for skipped files (each names the file and why)."""


@dataclass
class _Slice:
    path: Path
    pixels: np.ndarray
    instance_number: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    header: pydicom.Dataset


def read_series(folder: str | Path, description: str | None = None) -> SeriesRead:
    """Read every DICOM file of a series folder into one :class:`Volume` per stack.

    Args:
        folder: the series folder (``{study_id}/{series_id}/``).
        description: the series description from the competition CSV; wins over the
            SeriesDescription tag and picks the default orientation when the tag is missing.

    Raises:
        SeriesReadError: the folder is missing or empty, or no file in it gave an image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesReadError(f"{folder}: series folder not found")
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=_name_order)
    if not files:
        raise SeriesReadError(f"{folder}: empty series folder (no files)")

    problems: list[str] = []
    slices: list[_Slice] = []
    for rank, path in enumerate(files, start=1):
        try:
            slices.append(_read_slice(path, rank))
        except _SkipFile as exc:
            problems.append(f"{path}: skipped: {exc}")
    if not slices:
        raise SeriesReadError(f"{folder}: no readable image in {len(files)} file(s): {problems[0]}")

    header = slices[0].header
    description = description or _str_tag(header, "SeriesDescription")
    volumes = [
        _build_volume(group, description, folder) for group in _split_stacks(slices, description)
    ]
    shapes = sorted({s.pixels.shape for s in slices})
    if len(shapes) > 1:
        sizes = ", ".join(f"{r}x{c}" for r, c in shapes)
        for v in volumes:
            v.warnings.append(
                f"{folder}: slices of {len(shapes)} matrix sizes ({sizes}); "
                "split into one stack per size"
            )
    volumes.sort(key=lambda v: min(v.instance_numbers))
    return SeriesRead(volumes=volumes, problems=problems)


# ------------------------------------------------------------------------------------- reading
class _SkipFile(Exception):
    pass


def _name_order(path: Path) -> tuple[int, int | str]:
    """Numeric file names in numeric order, the rest after them by name (only for fallbacks:
    the slice order itself comes from positions)."""
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.name)


def _read_slice(path: Path, rank: int) -> _Slice:
    ds, raw = _decode(path)
    if raw.ndim != 2:
        raise _SkipFile(
            f"expected one greyscale frame, got pixel array of shape {tuple(raw.shape)}"
        )
    if "PixelData" in ds:
        del ds.PixelData  # decoded; the header alone is kept for tags
    instance = _int_tag(ds, "InstanceNumber")
    if instance is None:
        instance = int(path.stem) if path.stem.isdigit() else rank
    return _Slice(
        path=path,
        pixels=_modality_values(raw, ds),
        instance_number=instance,
        position=_float_vector(ds, "ImagePositionPatient", 3),
        orientation=_float_vector(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_pixel_spacing(ds),
        header=ds,
    )


def _decode(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """Header and pixels of one file, each file read once.

    pydicom's ``pixel_array(path, ds_out=...)`` parses only what it needs and is faster than
    ``dcmread(path).pixel_array``: uncompressed files take it. Compressed ones, and any file it
    refuses, go through the tolerant path, which checks the declared size before decoding
    (:func:`_check_declared_size`) and says precisely what is wrong with a file.
    """
    if _fast_path_is_safe(path):
        ds = pydicom.Dataset()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ds, pixel_array(path, ds_out=ds, specific_tags=_HEADER_TAGS)
        except Exception as exc:  # any refusal: the tolerant path below decides and explains
            if is_machine_failure(exc):
                raise
    ds = _read_dataset(path)
    if "PixelData" not in ds:
        raise _SkipFile("no pixel data (not an image)")
    _check_declared_size(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds, ds.pixel_array
    except Exception as exc:  # pydicom/plugins raise many types for corrupt or truncated data
        if is_machine_failure(exc):
            raise
        raise _SkipFile(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None


MAX_DECODED_BYTES = 512 * 2**20
"""The most pixel bytes one file may decode to (a real MRI slice takes 0.5 to 2 MB; a
multi-frame file of 200 such frames 100 to 400 MB)."""
MAX_EXPANSION = 256
"""The most a compressed file's pixel data may grow when decoded (RLE grows 64 times at most;
a lossless JPEG of a nearly blank image more), beyond ``_SMALL_DECODE``."""
_SMALL_DECODE = 16 * 2**20
"""Decoded sizes up to this cost little whatever the file's bytes: never refused as a lie."""
_HEAD_BYTES = 16384
_TRANSFER_SYNTAX_ELEMENT = b"\x02\x00\x10\x00UI"
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_SIZE_TAGS = {"rows": (0x0028, 0x0010), "columns": (0x0028, 0x0011), "bits": (0x0028, 0x0100)}


def _fast_path_is_safe(path: Path) -> bool:
    """Whether the file may take pydicom's fast path, sniffed from its first bytes (a full
    header parse costs half a decode): an uncompressed transfer syntax, little endian, whose
    declared Rows x Columns x bytes the file can hold. pydicom allocates the declared size
    before it looks at the data, so a lying header could otherwise cost gigabytes; every other
    file takes the tolerant path, which checks properly (:func:`_check_declared_size`)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
        size = os.fstat(f.fileno()).st_size
    if head[128:132] != b"DICM":
        return False
    at = head.find(_TRANSFER_SYNTAX_ELEMENT, 132)
    if at < 0 or at + 8 > len(head):
        return False
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    uid = head[at + 8 : at + 8 + length].rstrip(b"\0 ").decode("ascii", errors="replace")
    if uid not in _NATIVE_SYNTAXES or uid == "1.2.840.10008.1.2.2":
        return False
    values = {}
    for name, (group, element) in _SIZE_TAGS.items():
        tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
        marker = tag + (b"\x02\x00\x00\x00" if uid == _IMPLICIT_VR_LE else b"US\x02\x00")
        found = head.find(marker, at)
        if found < 0 or found + len(marker) + 2 > len(head):
            return False
        values[name] = int.from_bytes(head[found + len(marker) : found + len(marker) + 2], "little")
    declared = values["rows"] * values["columns"] * max(1, -(-values["bits"] // 8))
    return 0 < declared <= size and b"\x28\x00\x08\x00" not in head  # no NumberOfFrames


def _check_declared_size(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse, before decoding, a file whose header declares more pixels than one file may
    decode to, or than its compressed pixel data can plausibly hold: a few-KB file must not
    cost gigabytes of memory.

    Raises:
        _SkipFile: the declared size and the limit it breaks.
    """
    rows, columns = _binary_int(ds, "Rows", 0), _binary_int(ds, "Columns", 0)
    frames = max(1, _int_tag(ds, "NumberOfFrames") or 1)  # IS: text
    samples = max(1, _binary_int(ds, "SamplesPerPixel", 1))
    depth = max(1, -(-_binary_int(ds, "BitsAllocated", 16) // 8))
    declared = rows * columns * frames * samples * depth
    stored = len(ds.PixelData or b"")
    shape = f"{rows} x {columns} x {frames} frame(s) x {samples * depth} byte(s)"
    if declared > MAX_DECODED_BYTES:
        raise _SkipFile(
            f"declares {shape} = {declared / 2**20:.0f} MB of pixels, over the limit of "
            f"{MAX_DECODED_BYTES / 2**20:.0f} MB per file; refused before decoding"
        )
    if declared > _SMALL_DECODE and declared > MAX_EXPANSION * stored:
        raise _SkipFile(
            f"declares {shape} = {declared / 2**20:.0f} MB of pixels in {stored} bytes of pixel "
            f"data (more than {MAX_EXPANSION} times them); refused before decoding"
        )


def _binary_int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """A US tag's value (pydicom converts it), or ``default`` when absent or malformed."""
    try:
        value = ds.get(keyword)
        return default if value is None else int(value)
    except (TypeError, ValueError):
        return default


def _read_dataset(path: Path) -> pydicom.Dataset:
    """Read a file; one without the DICM preamble / file meta (old exports) is read by content,
    its transfer syntax taken from the encoding pydicom detected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return pydicom.dcmread(path)
            except InvalidDicomError:
                ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # a damaged header can fail anywhere inside the parser
        if is_machine_failure(exc):
            raise
        raise _SkipFile(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        raise _SkipFile("not a DICOM file (no DICM header and no pixel data)")
    implicit, little = ds.original_encoding
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta and implicit is not None:
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    return ds


def _modality_values(raw: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Rescaled values, integer when slope and intercept are integers; MONOCHROME1 inverted over
    the stored range (so the inversion is the same for every slice of a series)."""
    slope = _float_tag(ds, "RescaleSlope", 1.0)
    intercept = _float_tag(ds, "RescaleIntercept", 0.0)
    inverted = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    if slope == 1.0 and intercept == 0.0 and not inverted:
        return raw
    integral = slope.is_integer() and intercept.is_integer()
    values = raw.astype(np.int64 if integral else np.float64)
    if integral:
        slope, intercept = int(slope), int(intercept)
    values = values * slope + intercept if (slope, intercept) != (1, 0) else values
    if inverted:
        bits = int(ds.get("BitsStored", raw.dtype.itemsize * 8))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
        values = (lo + hi) - values
    return values


def compact_dtype(minimum: float, maximum: float, integral: bool) -> np.dtype:
    """Smallest dtype holding a stack exactly: int16, else uint16, else int32 for integral
    values, float32 otherwise."""
    if integral:
        for dtype in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= minimum and maximum <= info.max:
                return np.dtype(dtype)
    return np.dtype(np.float32)


# ------------------------------------------------------------------------------------ stacking
def _split_stacks(slices: list[_Slice], description: str | None) -> list[list[_Slice]]:
    """Group slices into stacks: by orientation and matrix, then by position gaps."""
    default, _ = _default_orientation(description)
    groups: list[tuple[np.ndarray, tuple[int, int], list[_Slice]]] = []
    for s in sorted(slices, key=lambda s: s.instance_number):
        orientation = s.orientation if s.orientation is not None else default
        for g_orientation, g_shape, members in groups:
            if (
                g_shape == s.pixels.shape
                and np.abs(g_orientation - orientation).max() <= ORIENTATION_TOLERANCE
            ):
                members.append(s)
                break
        else:
            groups.append((orientation, s.pixels.shape, [s]))
    return [
        part for orientation, _, members in groups for part in _split_gaps(members, orientation)
    ]


def _split_gaps(members: list[_Slice], orientation: np.ndarray) -> list[list[_Slice]]:
    """Split a group of parallel slices where the step along the normal jumps (two stacks of
    one orientation, e.g. an axial series covering two discs)."""
    if len(members) < 3 or any(s.position is None for s in members):
        return [members]
    normal = _normal(orientation)
    offsets = np.array([s.position @ normal for s in members])
    order = np.argsort(offsets, kind="stable")
    steps = np.diff(offsets[order])
    real_steps = steps[steps > DUPLICATE_TOLERANCE_MM]
    if len(real_steps) == 0:
        return [members]
    cut = np.flatnonzero(steps > GAP_SPLIT_FACTOR * np.median(real_steps)) + 1
    return [[members[i] for i in part] for part in np.split(order, cut)]


def _default_orientation(description: str | None) -> tuple[np.ndarray, str]:
    """The orientation a series of this description almost always has, and its name."""
    if "sagittal" in (description or "").lower():
        return np.asarray(SAGITTAL_ORIENTATION), "sagittal"
    return np.asarray(AXIAL_ORIENTATION), "axial"


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def _build_volume(members: list[_Slice], description: str | None, folder: Path) -> Volume:
    first = members[0]
    ds = first.header
    warns: list[str] = []
    if first.orientation is None:
        orientation, name = _default_orientation(description)
        warns.append(
            f"{first.path}: ImageOrientationPatient missing; assumed {orientation.tolist()} "
            f"({name} default)"
        )
    else:
        orientation = first.orientation
    normal = _normal(orientation)

    spacing = first.pixel_spacing
    if spacing is None:
        spacing = (1.0, 1.0)
        stored = _float_vector(first.header, "PixelSpacing", 2)
        problem = "missing" if stored is None else f"{stored.tolist()} is not positive"
        warns.append(f"{first.path}: PixelSpacing {problem}; assumed 1 x 1 mm")

    step = (
        _float_tag(ds, "SpacingBetweenSlices", 0.0) or _float_tag(ds, "SliceThickness", 0.0) or 1.0
    )
    positions = []
    missing_position = [s for s in members if s.position is None]
    if missing_position:
        warns.append(
            f"{missing_position[0].path}: ImagePositionPatient missing in "
            f"{len(missing_position)} file(s); assumed (instance_number - 1) x {step:g} mm "
            "along the slice normal"
        )
    for s in members:
        positions.append(
            s.position if s.position is not None else normal * (s.instance_number - 1) * step
        )
    positions = np.asarray(positions)

    # sort along the dominant patient axis so the slice index grows with that coordinate
    axis = int(np.argmax(np.abs(normal)))
    key = positions @ normal * np.sign(normal[axis])
    order = np.lexsort((np.array([s.instance_number for s in members]), key))
    keep = [order[0]]
    for i in order[1:]:
        if abs(key[i] - key[keep[-1]]) <= DUPLICATE_TOLERANCE_MM:
            warns.append(
                f"{members[i].path}: same position as instance "
                f"{members[keep[-1]].instance_number}; duplicate slice dropped"
            )
        else:
            keep.append(i)
    kept = [members[i] for i in keep]

    instance_numbers = [s.instance_number for s in kept]
    if len(set(instance_numbers)) != len(instance_numbers):
        warns.append(
            f"{folder}: repeated InstanceNumber values in one stack; slice_index finds the first"
        )

    array = _stack_pixels([s.pixels for s in kept])
    geometry = StackGeometry(
        positions=positions[keep],
        row_direction=orientation[:3],
        column_direction=orientation[3:],
        pixel_spacing=spacing,
        instance_numbers=tuple(instance_numbers),
    )
    meta = {
        "series_description": description,
        "slice_thickness": _float_tag(ds, "SliceThickness", None),
        "spacing_between_slices": _float_tag(ds, "SpacingBetweenSlices", None),
        "slice_spacing": geometry.slice_spacing,
        "pixel_spacing": list(geometry.pixel_spacing),
        "rows": int(array.shape[1]),
        "columns": int(array.shape[2]),
        "manufacturer": _str_tag(ds, "Manufacturer"),
        "field_strength": _float_tag(ds, "MagneticFieldStrength", None),
        "photometric_interpretation": _str_tag(ds, "PhotometricInterpretation"),
        "transfer_syntax": _transfer_syntax(ds),
    }
    return Volume(array=array, geometry=geometry, meta=meta, warnings=warns)


def _stack_pixels(planes: Sequence[np.ndarray]) -> np.ndarray:
    """Stack slices with one copy. Planes that share an integer dtype of at most 16 bits (the
    stored pixels, no rescale) keep it, which spares two passes over the data; anything else
    gets :func:`compact_dtype` of its value range."""
    dtypes = {p.dtype for p in planes}
    dtype = next(iter(dtypes))
    if len(dtypes) > 1 or dtype.kind not in "iu" or dtype.itemsize > 2:
        lo = min(float(p.min()) for p in planes)
        hi = max(float(p.max()) for p in planes)
        dtype = compact_dtype(lo, hi, all(d.kind in "iub" for d in dtypes))
    out = np.empty((len(planes), *planes[0].shape), dtype=dtype)
    for i, p in enumerate(planes):
        out[i] = p
    return out


# ---------------------------------------------------------------------------------------- tags
def _numbers(ds: pydicom.Dataset, keyword: str) -> list[float] | None:
    """Values of a numeric-string (DS/IS) tag, or None when absent or malformed.

    A still-raw element is parsed from its text directly: pydicom's own conversion (DSfloat
    objects, validation) is the largest per-file cost after decoding on 512 x 512 series.
    """
    if keyword not in ds:
        return None
    value = ds.get_item(keyword).value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, str) or not isinstance(value, Sequence):
        value = [value]
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if numbers and all(math.isfinite(v) for v in numbers) else None


def _float_vector(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray | None:
    numbers = _numbers(ds, keyword)
    if numbers is None or len(numbers) != n:
        return None
    if n == 6 and not _valid_orientation(numbers):
        return None
    return np.asarray(numbers)


def _valid_orientation(iop: list[float]) -> bool:
    """Both direction vectors have length and are not parallel (plain floats: np.cross costs
    more than the rest of a slice's tags)."""
    (a, b, c), (d, e, f) = iop[:3], iop[3:]
    cross = (b * f - c * e, c * d - a * f, a * e - b * d)
    return a * a + b * b + c * c > 1e-12 and sum(x * x for x in cross) > 1e-12


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    v = _float_vector(ds, "PixelSpacing", 2)
    if v is None or (v <= 0).any():
        return None
    return (float(v[0]), float(v[1]))


def _float_tag(ds: pydicom.Dataset, keyword: str, default: float | None) -> float | None:
    numbers = _numbers(ds, keyword)
    return numbers[0] if numbers is not None and len(numbers) == 1 else default


def _int_tag(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = _float_tag(ds, keyword, None)
    return int(value) if value is not None and float(value).is_integer() else None


def _str_tag(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    return str(value).strip() or None


def _transfer_syntax(ds: pydicom.Dataset) -> str | None:
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return str(uid) if uid else None
