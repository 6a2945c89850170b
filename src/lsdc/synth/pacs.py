"""``lsdc synth --pacs flat|by-series``: the test studies once more, as a PACS would export them.

``lsdc predict --dicom`` must find the Sagittal T1, Sagittal T2/STIR and Axial T2 of a study in a
folder where nothing says which is which, so the synthetic root can hold its test split a second
time in ``test_pacs/``:

- the same images (the files of ``test_images/``, pixel for pixel), re-tagged as a scanner tags
  them: a vendor's description (:data:`VENDOR_DESCRIPTIONS`, by the study's Manufacturer); the
  sequence tags (RepetitionTime, EchoTime, InversionTime, ScanningSequence, SequenceVariant,
  MagneticFieldStrength) are the ones the anatomical phantom drew per study and rendered the
  images with; the simple phantom, which has one contrast per sequence, gets the fixed values
  of :data:`SEQUENCE_TAGS`;
- series a study has that no model reads, rendered from the study's own phantom (the anatomical
  one: the same spine, tissues, bias and texture, with TR/TE drawn from
  :data:`lsdc.synth.tissues.PROTOCOLS`): a 3-plane localizer (series 1: three slices in each
  plane, a spoiled gradient echo), a coronal T2 and a shorter repeat of the Sagittal T2/STIR (its
  outermost slices left out, so the choice rule "the most images" keeps the original; the same
  timings);
- files named as exports name them: ``flat``: every file in one folder, named by its
  SOPInstanceUID; ``by-series``: ``{PatientID}/S{SeriesNumber:03d}/I{n:04d}``; no extension;
- a ``DICOMDIR`` and a ``README.TXT`` at the top, as on an exported CD;
- ``test_pacs_study_ids.csv`` beside the folder: StudyInstanceUID -> study_id, for
  ``lsdc predict --dicom DIR/test_pacs --study-id DIR/test_pacs_study_ids.csv``, whose rows are
  then those of ``solution_test.csv``.

The study's own series are numbered 2, 3, ... in the order of their competition series_id: where
two series of one role have as many slices, the models take the lower series_id, and
``lsdc predict --dicom`` the lower SeriesNumber, so both layouts predict the same. The extras draw
from a random stream of their own: the competition files are the same bytes with or without
``--pacs``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from lsdc.contract import write_csv_atomic
from lsdc.utils import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from lsdc.synth.anatomy import Spine
    from lsdc.synth.config import SynthConfig
    from lsdc.synth.generator import Series
    from lsdc.synth.phantom import Anatomy

PACS_DIR = "test_pacs"
STUDY_IDS_NAME = "test_pacs_study_ids.csv"

VENDOR_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "SIEMENS": {
        "Sagittal T1": "t1_tse_sag",
        "T2": "t2_tse_sag_384",
        "STIR": "t2_tirm_sag",
        "Axial T2": "t2_tse_tra_p2",
        "localizer": "localizer",
        "coronal": "t2_tse_cor",
    },
    "GE MEDICAL SYSTEMS": {
        "Sagittal T1": "SAG T1 FSE",
        "T2": "SAG T2 FSE",
        "STIR": "STIR SAG",
        "Axial T2": "AX T2 FSE",
        "localizer": "3-PL LOC",
        "coronal": "COR T2 FSE",
    },
    "Philips Medical Systems": {
        "Sagittal T1": "T1W_TSE SAG",
        "T2": "T2W_TSE SAG",
        "STIR": "STIR SAG",
        "Axial T2": "T2W_TSE TRA",
        "localizer": "Survey",
        "coronal": "T2W_TSE COR",
    },
}
"""Series descriptions as each manufacturer's protocols spell them (by role; the sagittal
T2/STIR by its sequence)."""

SEQUENCE_TAGS: dict[str, dict[str, object]] = {
    "T1": {"RepetitionTime": 600, "EchoTime": 11, "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"]},
    "T2": {"RepetitionTime": 3500, "EchoTime": 100, "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"]},
    "STIR": {
        "RepetitionTime": 4000, "EchoTime": 55, "InversionTime": 160,
        "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"],
    },
    "localizer": {"RepetitionTime": 8.6, "EchoTime": 4, "ScanningSequence": "GR", "SequenceVariant": "SP"},
}  # fmt: skip
"""Typical sequence tags (ms) of each sequence of the simple phantom (its contrast is fixed);
STIR's inversion time at 1.5 T (x 1.3 at 3 T)."""

LOCALIZER_FOV_MM = 300.0
CORONAL_SLICES = 12
CORONAL_STEP_MM = 3.5


RenderExtras = Callable[[np.random.Generator, list["Series"]], list[list[np.ndarray]]]
"""Pixels of every stack of the series given, from the study's own phantom."""


def export_study(
    pacs_root: Path,
    study_folder: Path,
    study_id: int,
    body: Anatomy | Spine,
    render: RenderExtras,
    series: Sequence[Series],
    config: SynthConfig,
    rng: np.random.Generator,
) -> None:
    """Write one study's PACS copy into ``pacs_root``: its series from ``study_folder`` (the
    competition files) re-tagged, and the extras placed on ``body`` and drawn by ``render``.

    Args:
        series: the study's series, as written into ``study_folder``.
        rng: the study's own stream for the extras (not the one its competition files drew on).
    """
    from lsdc.synth import generator

    if not series:
        return
    names = VENDOR_DESCRIPTIONS.get(series[0].manufacturer, VENDOR_DESCRIPTIONS["SIEMENS"])
    field_strength = series[0].field_strength
    pacs_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pacs-", dir=pacs_root) as tmp:
        plan = []
        for number, s in enumerate(sorted(series, key=lambda s: s.series_id), start=2):
            kind = s.sequence if s.description == "Sagittal T2/STIR" else s.description
            plan.append((study_folder / str(s.series_id), number, names[kind], s.sequence))
        for k, (parts, kind, number) in enumerate(_extras(rng, config, body, series)):
            pixels = [stack for part in parts for stack in render(rng, [part])[0]]
            whole = dataclasses.replace(parts[0], stacks=[st for p in parts for st in p.stacks])
            counts = [len(st.positions) for st in whole.stacks]
            whole.instance_numbers = np.split(np.arange(1, sum(counts) + 1), np.cumsum(counts)[:-1])
            folder = Path(tmp) / str(k)
            generator._write_series(folder, study_id, whole, pixels, config.seed, number)
            sequence = "localizer" if kind == "localizer" else whole.sequence
            plan.append((folder, number, names[kind], sequence))
        for folder, number, description, sequence in plan:
            if series[0].timing is not None:  # the files carry the timings they were drawn with
                _retag_series(pacs_root, folder, study_id, number, description, {}, config.pacs)
                continue
            tags = dict(SEQUENCE_TAGS[sequence])
            if "InversionTime" in tags and field_strength > 2:
                tags["InversionTime"] = round(float(tags["InversionTime"]) * 1.3)
            _retag_series(pacs_root, folder, study_id, number, description, tags, config.pacs)


def _extras(
    rng: np.random.Generator, config: SynthConfig, anatomy: Anatomy | Spine,
    series: Sequence[Series],
) -> list[tuple[list[Series], str, int]]:  # fmt: skip
    """The series no model reads, as ``(parts, kind, SeriesNumber)``; each part is one plane,
    rendered alone (a localizer's three planes on one grid would cost a cube of voxels). With
    the study's series timed (the anatomical phantom), each extra gets its protocol and timing."""
    from lsdc.synth import generator, tissues

    matrix = config.image_size if config.profile == "default" else 256
    mid_z = float(np.mean(anatomy.disc_z[1:]))
    centre = np.array([anatomy.centre[0], float(anatomy.canal_y(mid_z)), mid_z])
    coronal_axes = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]))

    def stack(axes, offsets, fov):
        return generator.make_stack(rng, centre, axes, offsets, matrix, fov, np.eye(3), True)

    three = np.array([-12.0, 0.0, 12.0])
    localizer = [
        generator.Series(1, "localizer", "T1", [stack(axes, three, LOCALIZER_FOV_MM)])
        for axes in (generator._SAGITTAL, coronal_axes, generator._AXIAL)
    ]
    offsets = (np.arange(CORONAL_SLICES) - (CORONAL_SLICES - 1) / 2) * CORONAL_STEP_MM
    coronal = generator.Series(
        2, "coronal", "T2", [stack(coronal_axes, offsets, generator.DEFAULT_FOV_MM["sagittal"][1])]
    )
    extras = [(localizer, "localizer", 1), ([coronal], "coronal", 80)]
    sagittal = next((s for s in series if s.description == "Sagittal T2/STIR"), None)
    if sagittal is not None and len(sagittal.stacks[0].positions) > 4:
        original = sagittal.stacks[0]
        shorter = dataclasses.replace(original, positions=original.positions[1:-1])
        repeat = generator.Series(3, sagittal.description, sagittal.sequence, [shorter])
        extras.append(([repeat], sagittal.sequence, 81))
    first = series[0]
    for parts, kind, _ in extras:
        timing = None
        if first.timing is not None:
            protocol = {"localizer": "localizer", "coronal": "coronal_t2"}.get(kind)
            if protocol is None:  # the repeat: the original's protocol, as re-run
                protocol, timing = sagittal.protocol, sagittal.timing
            else:
                timing = tissues.draw_timing(rng, protocol, first.field_strength)
        for part in parts:
            part.manufacturer, part.field_strength = first.manufacturer, first.field_strength
            if timing is not None:
                part.protocol, part.timing = protocol, timing
    return extras


def _retag_series(
    pacs_root: Path,
    folder: Path,
    study_id: int,
    number: int,
    description: str,
    tags: dict[str, object],
    layout: str,
) -> None:
    """Copy a series folder's files into ``pacs_root`` with the PACS's number, description,
    sequence tags and file names."""
    files = sorted(folder.iterdir(), key=lambda p: int(p.stem))
    for k, path in enumerate(files, start=1):
        ds = pydicom.dcmread(path)
        ds.SeriesNumber = number
        ds.SeriesDescription = description
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.MRAcquisitionType = "2D"
        if layout == "flat":
            target = pacs_root / str(ds.SOPInstanceUID)
        else:
            target = pacs_root / str(study_id) / f"S{number:03d}" / f"I{k:04d}"
        with atomic_path(target) as tmp:
            ds.save_as(tmp, enforce_file_format=True)


def finish_export(root: Path, study_ids: Sequence[int], seed: int) -> None:
    """Write the export's DICOMDIR and README.TXT, and ``test_pacs_study_ids.csv`` beside it."""
    pacs_root = root / PACS_DIR
    pacs_root.mkdir(exist_ok=True)
    uids = []
    for study_id in study_ids:
        first = next((root / "test_images" / str(study_id)).rglob("*.dcm"))
        uids.append(str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID))
    write_csv_atomic(
        pd.DataFrame({"StudyInstanceUID": uids, "study_id": list(study_ids)}),
        root / STUDY_IDS_NAME,
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(seed), "DICOMDIR"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    index.FileSetID = "LSDC SYNTH"
    with atomic_path(pacs_root / "DICOMDIR") as tmp:
        index.save_as(tmp, enforce_file_format=True)
    write_text_atomic(
        "Synthetic PACS export written by lsdc synth --pacs; the images are DICOM files without "
        "an extension.\n",
        pacs_root / "README.TXT",
    )
