"""Series roles from DICOM headers: plane, weighting, vendor descriptions, the choice rule, and a
folder of everything a PACS export holds besides images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from dicom_factory import AXIAL, SAGITTAL, make_dataset, oblique, rotation, slice_pixels
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import MediaStorageDirectoryStorage, generate_uid

from lsdc.contract import check_study_name, rename_row_ids, study_row_ids
from lsdc.preprocessing.series_roles import (
    OTHER,
    choose_series,
    group_series,
    plane_from_words,
    plane_of,
    role_table,
    scan_folder,
    weighting_from_tags,
    weighting_from_words,
)

CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
T1_TAGS = {"RepetitionTime": 600, "EchoTime": 12, "ScanningSequence": "SE"}
T2_TAGS = {"RepetitionTime": 3800, "EchoTime": 98, "ScanningSequence": "SE"}
STIR_TAGS = {
    "RepetitionTime": 4200,
    "EchoTime": 60,
    "InversionTime": 160,
    "ScanningSequence": ["SE", "IR"],
}


def write_series(
    folder,
    study_uid: str,
    description: str,
    orientation=SAGITTAL,
    n: int = 6,
    number: int = 1,
    tags: dict | None = None,
    orientations=None,
    rows: int = 16,
) -> str:
    """Write ``n`` slices of one series into ``folder`` (UID-named files); returns its UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for k in range(n):
        o = orientations[k] if orientations is not None else orientation
        normal = np.cross(o[:3], o[3:])
        ds = make_dataset(
            slice_pixels(k, k + 1, rows, 12),
            instance=k + 1,
            position=k * 4.0 * normal,
            orientation=o,
            description=description,
            series_uid=series_uid,
        )
        ds.StudyInstanceUID = study_uid
        ds.SeriesNumber = number
        for key, value in (tags or {}).items():
            setattr(ds, key, value)
        ds.save_as(folder / ds.SOPInstanceUID, enforce_file_format=True)
    return series_uid


# ------------------------------------------------------------------------------- pure rules
def test_plane_from_orientation_tilted_axials_stay_axial() -> None:
    assert plane_of(SAGITTAL) == "sagittal"
    assert plane_of(AXIAL) == "axial"
    assert plane_of(CORONAL) == "coronal"
    assert plane_of(oblique(AXIAL, rotation("x", 20))) == "axial"
    assert plane_of(oblique(AXIAL, rotation("x", 45))) == "oblique"
    assert plane_of(None) is None


@pytest.mark.parametrize(
    ("tr", "te", "ti", "sequence", "weighting"),
    [
        (600, 12, None, "SE", "T1"),
        (3800, 98, None, "SE", "T2"),
        (4200, 60, 160, "SE\\IR", "STIR"),
        (2000, 9, 860, "IR", "T1"),  # T1 FLAIR
        (9000, 120, 2500, "IR", "FLAIR"),
        (3000, 15, None, "SE", "PD"),
        (300, 4, None, "GR", "GRE"),
        (1300, 40, None, "SE", None),  # intermediate: the description decides
        (None, None, None, "", None),
    ],
)
def test_weighting_from_sequence_tags(tr, te, ti, sequence, weighting) -> None:
    assert weighting_from_tags(tr, te, ti, sequence) == weighting


@pytest.mark.parametrize(
    ("description", "plane", "weighting"),
    [
        ("SAG T1 TSE", "sagittal", "T1"),
        ("t2_tse_sag_384", "sagittal", "T2"),
        ("Ax T2 FSE", "axial", "T2"),
        ("STIR SAG", "sagittal", "STIR"),
        ("t2_tirm_sag", "sagittal", "T2"),
        ("T1 FLAIR SAG", "sagittal", "T1"),
        ("t2_tse_tra_p2", "axial", "T2"),
        ("COR T2", "coronal", "T2"),
        ("Sagittal T2/STIR", "sagittal", "T2"),
        ("Axial T2", "axial", "T2"),
        ("3-Plane Loc", None, None),
    ],
)
def test_vendor_descriptions(description, plane, weighting) -> None:
    assert plane_from_words(description) == plane
    assert weighting_from_words(description) == weighting


def test_study_names_and_renamed_row_ids() -> None:
    uid = "1.2.840.113619.2.55.3.604688119"
    assert rename_row_ids(study_row_ids(7), {7: uid})[0] == f"{uid}_spinal_canal_stenosis_l1_l2"
    assert check_study_name(" PAT-01 ") == "PAT-01"
    for bad in ("a_b", "a b", "", "x,y"):
        with pytest.raises(ValueError, match="letters, digits, dots and dashes"):
            check_study_name(bad)


# ------------------------------------------------------------------------ series from headers
def test_headers_decide_over_a_contradicting_description(tmp_path) -> None:
    write_series(tmp_path / "a", "1.1", "SAG T1 TSE", tags=T2_TAGS)
    (series,) = group_series(scan_folder(tmp_path).images)
    assert (series.plane, series.weighting, series.role) == ("sagittal", "T2", "Sagittal T2/STIR")
    assert "the description says T1: headers win" in series.reason


def test_without_sequence_tags_the_description_breaks_the_tie(tmp_path) -> None:
    write_series(tmp_path / "a", "1.1", "Ax T2 FSE", orientation=AXIAL)
    (series,) = group_series(scan_folder(tmp_path).images)
    assert series.role == "Axial T2"
    assert series.weighting_source == "description"


@pytest.mark.parametrize(
    ("description", "kwargs", "why"),
    [
        (
            "3-Plane Loc",
            {"orientations": [SAGITTAL, SAGITTAL, CORONAL, CORONAL, AXIAL, AXIAL]},
            "localizer",
        ),
        ("Survey", {"tags": T2_TAGS}, "a localizer"),
        (
            "MIXED",
            {"orientations": [SAGITTAL, SAGITTAL, CORONAL, CORONAL, AXIAL, AXIAL], "tags": T2_TAGS},
            "several planes",
        ),
        ("COR T2 TSE", {"orientation": CORONAL, "tags": T2_TAGS}, "coronal T2: no model reads it"),
        ("SAG T1 +C", {"tags": T1_TAGS}, "post-contrast"),
        ("AX T1", {"orientation": AXIAL, "tags": T1_TAGS}, "axial T1"),
        ("SAG T2", {"tags": T2_TAGS, "n": 2}, "fewer than 3"),
    ],
)
def test_series_no_model_reads_are_other_and_say_why(tmp_path, description, kwargs, why) -> None:
    write_series(tmp_path / "a", "1.1", description, **kwargs)
    (series,) = group_series(scan_folder(tmp_path).images)
    assert series.role == OTHER
    assert why in series.reason


def test_one_series_per_sagittal_role_by_the_stated_rule_every_axial_kept(tmp_path) -> None:
    study = "1.2.3"
    write_series(tmp_path / "t1", study, "t1_tse_sag", number=2, tags=T1_TAGS)
    t2 = write_series(tmp_path / "t2", study, "t2_tse_sag_384", number=3, n=8, tags=T2_TAGS)
    repeat = write_series(tmp_path / "t2r", study, "t2_tse_sag_384", number=9, n=6, tags=T2_TAGS)
    stir = write_series(tmp_path / "stir", study, "t2_tirm_sag", number=4, n=10, tags=STIR_TAGS)
    ax = [
        write_series(tmp_path / f"ax{k}", study, "t2_tse_tra", AXIAL, number=5 + k, tags=T2_TAGS)
        for k in range(2)
    ]
    series = group_series(scan_folder(tmp_path).images)
    choice = {c.role: c for c in choose_series(series)}
    assert [s.series_uid for s in choice["Sagittal T2/STIR"].used] == [t2]
    rejected = dict((s.series_uid, why) for s, why in choice["Sagittal T2/STIR"].rejected)
    assert rejected == {stir: "T2, not STIR", repeat: "more images (8 vs 6)"}
    assert sorted(s.series_uid for s in choice["Axial T2"].used) == sorted(ax)
    table = role_table(series).set_index("series_instance_uid")
    assert bool(table.loc[t2, "used"]) and not bool(table.loc[repeat, "used"])
    assert "series 9 (t2_tse_sag_384): more images (8 vs 6)" in table.loc[t2, "rejected"]
    assert table.loc[repeat, "why"].startswith(
        "rejected for Sagittal T2/STIR: series 3 (t2_tse_sag_384) chosen, more images (8 vs 6)"
    )


def test_a_copy_of_an_image_is_left_out_and_counted(tmp_path) -> None:
    write_series(tmp_path / "a", "1.1", "SAG T1", tags=T1_TAGS)
    (tmp_path / "copy").mkdir()
    for path in sorted((tmp_path / "a").iterdir())[:2]:
        shutil.copy(path, tmp_path / "copy" / path.name)
    (series,) = group_series(scan_folder(tmp_path).images)
    assert series.n_images == 6
    assert series.reason.endswith("; 2 copies of its files (same SOPInstanceUID) left out")


def test_a_missing_role_has_its_row_in_the_table(tmp_path) -> None:
    write_series(tmp_path / "t1", "9.9", "SAG T1", tags=T1_TAGS)
    table = role_table(group_series(scan_folder(tmp_path).images))
    missing = table[table["series_instance_uid"] == ""]
    assert sorted(missing["role"]) == ["Axial T2", "Sagittal T2/STIR"]
    assert missing["why"].str.contains("get the class prior").all()


def test_folder_scan_skips_and_counts_what_is_not_an_image(tmp_path) -> None:
    write_series(tmp_path / "deep" / "er", "1.1", "SAG T1", tags=T1_TAGS)
    (tmp_path / "README.TXT").write_text("exported by PACS\n")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    index = Dataset()
    index.file_meta = meta
    index.FileSetID = "EXPORT"
    index.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    index.save_as(tmp_path / "INDEX", enforce_file_format=True)  # a DICOMDIR by another name
    good = next((tmp_path / "deep" / "er").iterdir())
    (tmp_path / "cut_header").write_bytes(good.read_bytes()[:300])
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "cut_pixels")
    scan = scan_folder(tmp_path)
    counts = {k: len(v) for k, v in scan.skipped.items()}
    assert counts == {"dicomdir": 2, "not_dicom": 1, "not_image": 0, "unreadable": 2}
    assert scan.problems == [
        f"{tmp_path / 'cut_header'}: truncated (the header lacks UIDs or matrix)",
        f"{tmp_path / 'cut_pixels'}: truncated (9630 bytes, its Pixel Data ends at byte 9692)",
    ]
    assert len(scan.images) == 6
    assert scan.summary() == "6 DICOM images; skipped 2 dicomdir, 1 not_dicom, 2 unreadable"
