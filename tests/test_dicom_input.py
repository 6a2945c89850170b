"""lsdc predict --dicom: a PACS-style folder of the synthetic test studies (UID-named files, extra
series, vendor descriptions, sequence tags, a DICOMDIR, a text file, truncated files) predicts
exactly as the same studies in the competition layout; the role table, the readings and the
report say what was used and what was missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_series_roles import CORONAL, T1_TAGS, T2_TAGS, write_series

from lsdc.cli import main
from lsdc.contract import load_series_descriptions
from lsdc.errors import UserError
from lsdc.inference.dicom_input import (
    LAYOUT_NAME,
    ROLES_NAME,
    cache_study_id,
    check_descriptions,
    load_study_names,
    predict_dicom,
)
from lsdc.inference.predict import predict_split

VENDOR = {
    "Sagittal T1": "SAG T1 TSE",
    "Sagittal T2/STIR": "t2_tse_sag_384",
    "Axial T2": "Ax T2 FSE",
}
TAGS = {"Sagittal T1": T1_TAGS, "Sagittal T2/STIR": T2_TAGS, "Axial T2": T2_TAGS}


def export_as_pacs(root: Path, split: str, out: Path, nested: bool) -> Path:
    """Copy ``root``'s ``split`` as a PACS would export it; returns the ``--study-id`` CSV.

    Files named by SOPInstanceUID, in one folder or ``{study}/{SeriesNumber}/``; vendor
    descriptions and sequence tags; SeriesNumber 2, 3, ... in the order of the competition's
    series ids (the models break ties between two series of a role by the lower id). Per study,
    extras: a 3-plane localizer (series 1), a coronal T2 and a shorter repeat of the sagittal
    T2; the first study's Sagittal T1 is described as a T2 (its tags say T1); the folder also gets a DICOMDIR, a text file, a file cut in its header and an image cut
    in its pixels.
    """
    listed = load_series_descriptions(root / f"{split}_series_descriptions.csv")
    names, own_files = {}, []
    for k, (study_id, rows) in enumerate(listed.groupby("study_id")):
        study_uid = None
        for number, r in enumerate(rows.sort_values("series_id").itertuples(), start=2):
            folder = root / f"{split}_images" / str(study_id) / str(r.series_id)
            target = out / str(study_id) / str(number) if nested else out
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir()):
                ds = pydicom.dcmread(path)
                study_uid = ds.StudyInstanceUID
                ds.SeriesNumber = number
                ds.SeriesDescription = VENDOR[r.series_description]
                if k == 0 and r.series_description == "Sagittal T1":
                    ds.SeriesDescription = "SAG T2 TSE"  # contradicts its T1 tags
                for key, value in TAGS[r.series_description].items():
                    setattr(ds, key, value)
                ds.save_as(target / ds.SOPInstanceUID, enforce_file_format=True)
                own_files.append(target / ds.SOPInstanceUID)
            if r.series_description == "Sagittal T2/STIR":
                files = sorted(folder.iterdir(), key=lambda p: int(p.stem))[1:-1]
                repeat_uid = generate_uid()
                for path in files:
                    ds = pydicom.dcmread(path)
                    ds.SeriesInstanceUID, ds.SeriesNumber = repeat_uid, 90
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                    ds.SeriesDescription = "t2_tse_sag_384"
                    for key, value in T2_TAGS.items():
                        setattr(ds, key, value)
                    ds.save_as(out / (ds.SOPInstanceUID + ".dcm"), enforce_file_format=True)
        names[study_uid] = str(study_id)
        extras = out / f"extra{study_id}"
        write_series(
            extras / "loc", study_uid, "3-Plane Loc", number=1,
            orientations=[(0, 1, 0, 0, 0, -1)] * 3 + [CORONAL] * 3 + [(1, 0, 0, 0, 1, 0)] * 3,
            n=9, tags={"RepetitionTime": 8, "EchoTime": 3, "ScanningSequence": "GR"},
        )  # fmt: skip
        write_series(extras / "cor", study_uid, "COR T2 TSE", CORONAL, number=80, tags=T2_TAGS)
    shutil.copy(next(out.rglob("*.dcm")), out / "DICOMDIR")  # a name the scan skips unread
    (out / "README.TXT").write_text("PACS export\n")
    first = own_files[0]
    (out / "cut_header").write_bytes(first.read_bytes()[:200])
    (out / "cut_pixels").write_bytes(first.read_bytes()[:-100])
    ds = pydicom.dcmread(first)  # whole file, but fewer pixels than its matrix: found on decoding
    ds.PixelData = ds.PixelData[:-100]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out / "short_pixels", enforce_file_format=True)
    mapping = out.parent / f"{out.name}_study_ids.csv"
    pd.DataFrame({"StudyInstanceUID": list(names), "study_id": list(names.values())}).to_csv(
        mapping, index=False
    )
    return mapping


@pytest.fixture(scope="module", params=["flat", "nested"])
def pacs(request, synth_root, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("pacs") / "export"
    return out, export_as_pacs(synth_root, "test", out, nested=request.param == "nested")


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index("row_id").sort_index()


@pytest.mark.parametrize("run_name", ["tiny_run", "tiny_two_stage_run"])
def test_pacs_folder_predicts_as_the_competition_layout(
    pacs, synth_root, tmp_path, request, run_name
) -> None:
    run = request.getfixturevalue(run_name)
    folder, mapping = pacs
    expected = predict_split(
        synth_root, [run], tmp_path / "comp" / "submission.csv", progress=False
    )
    result = predict_dicom(
        folder, [run], tmp_path / "dicom" / "submission.csv", study_names=mapping, progress=False
    )
    got, want = _sorted(result.predict.submission), _sorted(expected.submission)
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=1e-6)
    assert (
        result.predict.report["source"].to_numpy() == expected.report["source"].to_numpy()
    ).all()
    on_disk = pd.read_csv(tmp_path / "dicom" / "submission.csv")
    assert on_disk["row_id"].tolist() == result.predict.submission["row_id"].tolist()


def test_role_table_of_a_pacs_folder(pacs, synth_root, tiny_run, tmp_path) -> None:
    folder, mapping = pacs
    result = predict_dicom(
        folder, [tiny_run], tmp_path / "out" / "sub.csv", study_names=mapping, progress=False
    )
    assert result.scan.summary().endswith("skipped 1 dicomdir, 1 not_dicom, 2 unreadable")
    roles = pd.read_csv(tmp_path / "out" / ROLES_NAME, dtype=str, keep_default_na=False)
    listed = load_series_descriptions(synth_root / "test_series_descriptions.csv")
    used = roles[roles["used"] == "True"]
    # every listed series, and nothing else, is used, in its own role (one with short_pixels)
    assert sorted(zip(used["study"], used["role"], strict=True)) == sorted(
        (str(r.study_id), r.series_description) for r in listed.itertuples()
    )
    n_files = len(list((synth_root / "test_images").rglob("*.dcm")))
    assert used["n_images"].astype(int).sum() == n_files + 1
    other = roles[roles["role"] == "other"]
    assert set(other["series_description"]) == {"3-Plane Loc", "COR T2 TSE"}
    assert other["why"].str.contains("a localizer|coronal T2: no model reads it").all()
    contradicted = roles[roles["series_description"] == "SAG T2 TSE"]
    assert contradicted["role"].tolist() == ["Sagittal T1"]
    assert "say T1; the description says T2: headers win" in contradicted["why"].iloc[0]
    repeat = roles[roles["series_number"] == "90"]
    assert repeat["why"].str.startswith("rejected for Sagittal T2/STIR").all()
    # the study without a Sagittal T2/STIR: a row says so, and so do the report and the reading
    missing = roles[roles["series_instance_uid"] == ""]
    study = missing["study"].tolist()
    assert missing["role"].tolist() == ["Sagittal T2/STIR"]
    report = result.predict.report.set_index("study_id")
    assert report.loc[study[0], "missing_descriptions"] == "Sagittal T2/STIR"
    reading = (tmp_path / "out" / "readings" / f"{study[0]}.md").read_text()
    assert "**Not read**: spinal canal at every level (no Sagittal T2/STIR series)." in reading
    assert "| L1/L2 | not read |" in reading
    # the image with too few pixels is named by its own path in the report, not by its link
    messages = " ".join(report["message"])
    assert f"{folder / 'short_pixels'}: skipped: pixel data cannot be decoded" in messages
    assert LAYOUT_NAME not in messages
    assert (tmp_path / "out" / LAYOUT_NAME / "test_series_descriptions.csv").is_file()


def test_reading_flags_unsure_grades_and_lists_findings(tmp_path) -> None:
    from lsdc.contract import label_index
    from lsdc.inference.reading import StudyReading, study_reading

    probs = np.tile([0.9, 0.07, 0.03], (25, 1))
    probs[label_index("spinal_canal_stenosis", "l4_l5")] = [0.1, 0.2, 0.7]
    probs[label_index("left_neural_foraminal_narrowing", "l5_s1")] = [0.3, 0.45, 0.25]
    text = study_reading(
        StudyReading(
            name="PAT-1", probabilities=probs, source="model_partial", not_read=("Axial T2",),
            series_read=("Axial T2: none",), message="", show_command="lsdc show ...",
            page="PAT-1.html",
        )
    )  # fmt: skip
    assert "- L4/L5 spinal canal: **Severe** (70 %)" in text
    assert "**Unsure**: 1 of 15 grades: L5/S1 left foramen (moderate 45 %)." in text
    assert (
        "| L4/L5 | **Severe 70 %** | Normal/mild 90 % | Normal/mild 90 % | not read | not read |"
        in text
    )
    assert "left lateral recess, right lateral recess at every level (no Axial T2 series)" in text
    assert "[PAT-1.html](PAT-1.html)" in text


def test_check_descriptions_warns_where_the_csv_contradicts_the_headers(
    synth_root, tmp_path, caplog
) -> None:
    root = tmp_path / "root"
    shutil.copytree(synth_root, root, symlinks=True)
    listed = pd.read_csv(root / "test_series_descriptions.csv")
    wrong = listed.index[listed["series_description"] == "Sagittal T1"][0]
    listed.loc[wrong, "series_description"] = "Sagittal T2/STIR"
    listed = listed.drop_duplicates(["study_id", "series_description"], keep="last")
    listed.to_csv(root / "test_series_descriptions.csv", index=False)
    with caplog.at_level("WARNING", logger="lsdc"):
        table = check_descriptions(root, "test")
    assert (table["agrees"] == "no").sum() == 1
    row = table[table["agrees"] == "no"].iloc[0]
    assert (row["csv_description"], row["role"]) == ("Sagittal T2/STIR", "Sagittal T1")
    err = caplog.text
    folder = root / "test_images" / str(row["study_id"]) / str(row["series_id"])
    assert (
        f"{folder}: test_series_descriptions.csv says Sagittal T2/STIR; its headers say Sagittal T1"
        in err
    )


def test_study_id_csv_is_checked(tmp_path) -> None:
    path = tmp_path / "ids.csv"
    path.write_text("StudyInstanceUID,study_id\n1.2.3,PAT_1\n")
    with pytest.raises(UserError, match="row 2: study id 'PAT_1'"):
        load_study_names(path)
    path.write_text("StudyInstanceUID,study_id\n1.2.3,7\n1.2.4,7\n")
    with pytest.raises(UserError, match="study_id 7 twice"):
        load_study_names(path)
    path.write_text("uid,name\n")
    with pytest.raises(UserError, match="needs columns StudyInstanceUID, study_id"):
        load_study_names(path)
    assert cache_study_id("1.2.3") == cache_study_id("1.2.3") < 2**53


def test_cli_dicom_flow_and_flags_of_the_other_source(pacs, tiny_run, tmp_path, capsys) -> None:
    folder, mapping = pacs
    out = tmp_path / "out" / "sub.csv"
    argv = ["predict", "--dicom", str(folder), "--run", str(tiny_run), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{out}: 50 rows, 2 studies")
    assert "1 role(s) missing in 1 studies" in lines[1]
    ids = pd.read_csv(out)["row_id"].str.split("_").str[0].unique()
    assert all(i.startswith("1.2.") for i in ids)  # the StudyInstanceUIDs
    assert len(list((tmp_path / "out" / "readings").glob("*.md"))) == 2
    assert main([*argv, "--split", "train"]) == 2
    assert "--split goes with --data" in capsys.readouterr().err
    argv = ["predict", "--data", str(folder), "--run", str(tiny_run), "--study-id", str(mapping)]
    assert main(argv) == 2
    assert "--study-id goes with --dicom" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    argv = ["predict", "--dicom", str(empty), "--run", str(tiny_run), "--out", str(out)]
    assert main(argv) == 2
    assert (
        f"{empty}: no DICOM image found (0 DICOM images; skipped 1 not_dicom)"
        in capsys.readouterr().err
    )


# ------------------------------------------------------------------ lsdc synth --pacs (item 4)
@pytest.fixture(scope="module")
def synth_pacs_root(tmp_path_factory) -> Path:
    """``synth_root``'s config, with its test studies also written as a PACS export."""
    from conftest import TINY_SYNTH

    from lsdc.synth.config import SynthConfig
    from lsdc.synth.generator import synthesize

    config = SynthConfig(**TINY_SYNTH, pacs="by-series")
    return synthesize(tmp_path_factory.mktemp("synth_pacs") / "root", config, progress=False)


def test_synth_pacs_export_predicts_as_its_competition_copy(
    synth_pacs_root, synth_root, tiny_two_stage_run, tmp_path
) -> None:
    from lsdc.synth.pacs import PACS_DIR, STUDY_IDS_NAME

    competition = sorted(p.relative_to(synth_root) for p in synth_root.rglob("*") if p.is_file())
    assert competition == sorted(
        p.relative_to(synth_pacs_root)
        for p in synth_pacs_root.rglob("*")
        if p.is_file() and PACS_DIR not in p.parts and p.name != STUDY_IDS_NAME
    )
    for rel in competition:  # --pacs adds a copy; the competition files are the same bytes
        assert (synth_root / rel).read_bytes() == (synth_pacs_root / rel).read_bytes(), rel
    pacs = synth_pacs_root / PACS_DIR
    assert {p.name for p in pacs.iterdir() if p.is_file()} == {"DICOMDIR", "README.TXT"}
    assert all(p.parent.name.startswith("S") for p in pacs.rglob("I*"))

    result = predict_dicom(
        pacs, [tiny_two_stage_run], tmp_path / "dicom" / "submission.csv",
        study_names=synth_pacs_root / STUDY_IDS_NAME, progress=False,
    )  # fmt: skip
    expected = predict_split(synth_root, [tiny_two_stage_run], tmp_path / "c.csv", progress=False)
    got, want = _sorted(result.predict.submission), _sorted(expected.submission)
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=1e-6)

    roles = result.roles
    listed = load_series_descriptions(synth_root / "test_series_descriptions.csv")
    used = roles[roles["used"].astype(bool)]
    assert sorted(zip(used["study"], used["role"], strict=True)) == sorted(
        (str(r.study_id), r.series_description) for r in listed.itertuples()
    )
    assert used["repetition_time"].notna().all() and used["echo_time"].notna().all()
    assert (used["weighting"] != "unknown").all() and "description" not in " ".join(used["why"])
    other = roles[roles["role"] == "other"]
    assert sorted(other["orientation"]) == ["coronal", "coronal", "mixed", "mixed"]
    repeats = roles[roles["why"].str.startswith("rejected for Sagittal T2/STIR", na=False)]
    assert repeats["why"].str.contains("more images").all() and len(repeats) >= 1


def test_synth_pacs_export_carries_the_anatomical_phantoms_sequence_tags(synth_pacs_root) -> None:
    """The re-tagged series keep the TR/TE/TI and field strength their images were rendered
    with; the extras carry timings of their own protocols, one field strength per study."""
    from lsdc.synth.pacs import PACS_DIR
    from lsdc.synth.tissues import PROTOCOLS

    keys = ("RepetitionTime", "EchoTime", "InversionTime", "MagneticFieldStrength")

    def tags(path: Path) -> tuple:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return tuple(ds.get(k) for k in keys) + (ds.ScanningSequence,)

    competition = {
        (ds.StudyInstanceUID, ds.SeriesInstanceUID): tags(p)
        for p in (synth_pacs_root / "test_images").rglob("*.dcm")
        for ds in [pydicom.dcmread(p, stop_before_pixels=True)]
    }
    kinds = {"GR": "localizer", "SE": "coronal_t2"}
    for study in (p for p in (synth_pacs_root / PACS_DIR).iterdir() if p.is_dir()):
        fields = set()
        for folder in study.iterdir():
            first = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            got = tags(next(folder.iterdir()))
            fields.add(got[3])
            own = competition.get((first.StudyInstanceUID, first.SeriesInstanceUID))
            if own is not None:
                assert got == own, folder
            elif int(first.SeriesNumber) in (1, 80):  # the localizer and the coronal T2
                protocol = PROTOCOLS[kinds[str(first.ScanningSequence)]]
                assert protocol.repetition[0] <= got[0] <= protocol.repetition[1], folder
                assert protocol.echo[0] <= got[1] <= protocol.echo[1], folder
                assert got[2] is None
            else:  # the repeat: as its original was run
                assert got[:4] in {c[:4] for c in competition.values()}, folder
        assert len(fields) == 1 and fields <= {1.5, 3.0}, study
