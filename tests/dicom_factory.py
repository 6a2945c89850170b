"""Build tiny DICOM series with known geometry for the preprocess tests.

Each slice's pixels encode its own true slice rank and instance number, so a test can check the
slice order of a cached array by reading the pixels alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about a patient axis, for oblique stacks."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique(orientation: Sequence[float], r: np.ndarray) -> tuple[float, ...]:
    """Rotate both vectors of an ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=float)
    return tuple(np.concatenate([r @ o[:3], r @ o[3:]]).tolist())


def slice_pixels(rank: int, instance: int, rows: int, cols: int) -> np.ndarray:
    """A recognisable slice: row 0 holds the rank, row 1 the instance number, the rest a ramp."""
    img = (np.add.outer(np.arange(rows), np.arange(cols)) % 50 + 100 * rank).astype(np.uint16)
    img[0, :] = rank
    img[1, :] = instance
    return img


def make_dataset(
    pixels: np.ndarray,
    *,
    instance: int | None,
    position: Sequence[float] | None,
    orientation: Sequence[float] | None,
    pixel_spacing: Sequence[float] | None = (0.5, 0.5),
    description: str = "Axial T2",
    series_uid: str = "1.2.3",
    transfer_syntax: str = ExplicitVRLittleEndian,
    slope: float | None = None,
    intercept: float | None = None,
    photometric: str = "MONOCHROME2",
    slice_thickness: float | None = 3.0,
) -> Dataset:
    """One MR image dataset; every geometry tag is optional so tests can leave one out."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.Manufacturer = "LSDC Test"
    ds.MagneticFieldStrength = 1.5
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(x) for x in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [round(float(x), 8) for x in orientation]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(x) for x in pixel_spacing]
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    big_endian = transfer_syntax == ExplicitVRBigEndian
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
    return ds


def write_stack(
    folder: Path,
    *,
    n_slices: int = 6,
    rows: int = 16,
    cols: int = 12,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-3.0, -4.0, 10.0),
    step: float = 4.0,
    pixel_spacing: Sequence[float] = (0.5, 0.75),
    instances: Sequence[int] | None = None,
    first_rank: int = 0,
    **kwargs,
) -> list[dict]:
    """Write one stack of parallel slices into ``folder``; return the truth, one dict per slice in
    position order (rank, instance, position, file). Files are named by instance number."""
    folder.mkdir(parents=True, exist_ok=True)
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    instances = list(instances) if instances is not None else list(range(1, n_slices + 1))
    truth = []
    for k in range(n_slices):
        position = np.asarray(origin, dtype=float) + k * step * normal
        rank = first_rank + k
        ds = make_dataset(
            slice_pixels(rank, instances[k], rows, cols),
            instance=instances[k],
            position=position,
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            **kwargs,
        )
        path = folder / f"{instances[k]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        truth.append({"rank": rank, "instance": instances[k], "position": position, "file": path})
    return truth


def write_root(root: Path, series: Sequence[tuple[int, int, str]], split: str = "train") -> Path:
    """Write ``{split}_series_descriptions.csv`` for (study_id, series_id, description) rows and
    create the image folder; the series folders are the caller's to fill."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_images").mkdir(exist_ok=True)
    pd.DataFrame(series, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / f"{split}_series_descriptions.csv", index=False
    )
    return root
