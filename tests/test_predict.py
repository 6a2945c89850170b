"""lsdc predict: a complete, ordered, normalised submission whatever the input folder holds.

The runs are of a registered test task with known answers (``fixed_task.py``), served the one
way every run is, so that these tests check the orchestration: study
listing, preprocessing, fallbacks, calibration, ensembling, row order and the report.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from dicom_factory import AXIAL, SAGITTAL, write_root, write_stack
from fixed_task import known_probs, make_fixed_run

from lsdc.cli import main
from lsdc.contract import LABEL_COLUMNS, PRED_COLUMNS, all_row_ids
from lsdc.errors import UserError
from lsdc.inference.predict import predict_split

SERIES = [
    (1, 11, "Sagittal T1"),
    (1, 12, "Sagittal T2/STIR"),
    (1, 13, "Axial T2"),
    (2, 21, "Sagittal T1"),
    (2, 22, "Sagittal T2/STIR"),
    (2, 23, "Axial T2"),  # folder deleted
    (3, 31, "Sagittal T1"),  # one corrupt file among good ones
    (3, 32, "Sagittal T2/STIR"),  # its only file is corrupt
    (3, 33, "Axial T2"),
    (4, 41, "Sagittal T1"),  # no folder at all
]
SAMPLE_ORDER = [3, 5, 1, 2, 4]  # study 5 is only in sample_submission.csv


@pytest.fixture
def root(tmp_path):
    root = write_root(tmp_path / "root", SERIES, split="test")
    images = root / "test_images"
    for study, series, description in SERIES:
        if study == 4 or series == 23:
            continue
        orientation = AXIAL if description == "Axial T2" else SAGITTAL
        write_stack(
            images / str(study) / str(series),
            n_slices=4,
            orientation=orientation,
            description=description,
        )
    (images / "3" / "31" / "2.dcm").write_bytes(b"not a dicom file")
    for f in (images / "3" / "32").iterdir():
        f.unlink()
    (images / "3" / "32" / "1.dcm").write_bytes(b"\x00" * 300)
    sample = pd.DataFrame({"row_id": all_row_ids(SAMPLE_ORDER)})
    for c in PRED_COLUMNS:
        sample[c] = 1 / 3
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


def make_run(path, prior_row=(0.7, 0.2, 0.1), sharpness=1.0, **answers):
    """A run folder as lsdc train leaves it for serving (``fixed_task.make_fixed_run``)."""
    return make_fixed_run(path, prior_row, sharpness, **answers)


def _study_probs(submission: pd.DataFrame, study_id: int) -> np.ndarray:
    rows = submission.set_index("row_id").loc[all_row_ids([study_id]), list(PRED_COLUMNS)]
    return rows.to_numpy()


def test_submission_is_complete_ordered_normalised_with_fallbacks(root, tmp_path) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / "out" / "submission.csv"
    before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))
    result = predict_split(root, [run], out, progress=False)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # read only
    sub = pd.read_csv(out)
    assert sub["row_id"].tolist() == all_row_ids(SAMPLE_ORDER)
    assert not sub["row_id"].duplicated().any()
    values = sub[list(PRED_COLUMNS)].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-12)

    report = pd.read_csv(out.parent / "predict_report.csv").set_index("study_id")
    assert result.report_path == out.parent / "predict_report.csv"
    assert set(report.index) == set(SAMPLE_ORDER)
    assert report.loc[1, "source"] == "model"
    assert report.loc[2, "source"] == "model_partial"  # deleted Axial series
    assert "Axial T2" in report.loc[2, "missing_descriptions"]
    assert "23" in report.loc[2, "message"]
    assert report.loc[3, "source"] == "model_partial"  # corrupt files
    assert report.loc[3, "n_series_read"] == 2 and "32" in report.loc[3, "message"]
    assert "31/2.dcm" in report.loc[3, "message"]  # the corrupt file among good ones
    assert report.loc[4, "source"] == "prior" and report.loc[4, "n_series_read"] == 0
    assert report.loc[5, "source"] == "prior" and "no series listed" in report.loc[5, "message"]

    for study in (1, 2, 3):
        np.testing.assert_allclose(_study_probs(sub, study), known_probs(study), atol=1e-6)
    for study in (4, 5):
        np.testing.assert_allclose(_study_probs(sub, study), [[0.7, 0.2, 0.1]] * 25)


def test_without_sample_submission_rows_follow_the_series_csv(root, tmp_path) -> None:
    (root / "sample_submission.csv").unlink()
    out = tmp_path / "submission.csv"
    predict_split(root, [make_run(tmp_path / "run")], out, progress=False)
    assert pd.read_csv(out)["row_id"].tolist() == all_row_ids([1, 2, 3, 4])


def test_calibration_is_applied_per_run_then_runs_are_averaged(root, tmp_path) -> None:
    run_a = make_run(tmp_path / "a")
    run_b = make_run(tmp_path / "b", sharpness=2.0)  # its raw predictions are sharper
    temps = {c: 2.0 for c in ("spinal_canal_stenosis", "left_neural_foraminal_narrowing")}
    (run_b / "calibration.json").write_text(json.dumps({"temperatures": temps}))
    out = tmp_path / "submission.csv"
    predict_split(root, [run_a, run_b], out, progress=False)
    got = _study_probs(pd.read_csv(out), 1)
    raw_b = known_probs(1, sharpness=2.0)
    calibrated_b = raw_b.copy()
    calibrated_b[:10] = known_probs(1)[
        :10
    ]  # T = 2 undoes the sharpening of the first two conditions
    np.testing.assert_allclose(got, (known_probs(1) + calibrated_b) / 2, atol=1e-6)

    predict_split(root, [run_a, run_b], out, calibrate=False, progress=False)
    np.testing.assert_allclose(
        _study_probs(pd.read_csv(out), 1), (known_probs(1) + raw_b) / 2, atol=1e-6
    )


@pytest.mark.parametrize("poison", [np.nan, np.inf, -0.1, 0.0])
def test_a_study_the_model_fails_on_gets_the_prior_and_a_report_line(
    root, tmp_path, poison
) -> None:
    flaky = make_run(tmp_path / "run", raise_on=[3], poison=[(2, 4, poison)])
    out = tmp_path / "submission.csv"
    result = predict_split(root, [flaky], out, progress=False)
    sub = pd.read_csv(out)
    report = result.report.set_index("study_id")
    assert report.loc[3, "source"] == "prior" and "CUDA out of memory" in report.loc[3, "message"]
    assert report.loc[2, "source"] == "prior" and "not a distribution" in report.loc[2, "message"]
    np.testing.assert_allclose(_study_probs(sub, 1), known_probs(1), atol=1e-6)
    np.testing.assert_allclose(_study_probs(sub, 3), [[0.7, 0.2, 0.1]] * 25)
    assert len(sub) == 5 * 25 and np.isfinite(sub[list(PRED_COLUMNS)].to_numpy()).all()


@pytest.mark.parametrize("damage", ["no_images", "no_series_csv", "garbage_series_csv"])
def test_a_broken_input_folder_still_gives_every_row(root, tmp_path, damage) -> None:
    import shutil

    if damage == "no_images":
        shutil.rmtree(root / "test_images")
    elif damage == "no_series_csv":
        (root / "test_series_descriptions.csv").unlink()
    else:
        (root / "test_series_descriptions.csv").write_text("study_id,series_id\n1,x\n")
    out = tmp_path / "submission.csv"
    result = predict_split(root, [make_run(tmp_path / "run")], out, progress=False)
    sub = pd.read_csv(out)
    assert sub["row_id"].tolist() == all_row_ids(SAMPLE_ORDER)
    np.testing.assert_allclose(sub[list(PRED_COLUMNS)].to_numpy(), [[0.7, 0.2, 0.1]] * len(sub))
    assert (result.report["source"] == "prior").all()


def test_nothing_to_list_is_a_user_error(root, tmp_path) -> None:
    (root / "test_series_descriptions.csv").unlink()
    (root / "sample_submission.csv").unlink()
    with pytest.raises(UserError, match="lists a study"):
        predict_split(root, [make_run(tmp_path / "run")], tmp_path / "s.csv")


def test_bad_run_is_refused_before_anything_is_written(root, tmp_path) -> None:
    out = tmp_path / "submission.csv"
    out.write_text("previous\n")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="best.pt"):
        predict_split(root, [empty], out)
    no_prior = make_run(tmp_path / "run")
    (no_prior / "class_prior.csv").unlink()
    with pytest.raises(UserError, match="class_prior.csv"):
        predict_split(root, [no_prior], out)
    assert out.read_text() == "previous\n"


def test_cli_writes_submission_and_kept_cache(root, tmp_path, capsys) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / "sub.csv"
    cache = tmp_path / "cache"
    code = main(
        [
            "predict",
            "--data",
            str(root),
            "--run",
            str(run),
            "--out",
            str(out),
            "--cache",
            str(cache),
            "--quiet",
        ]
    )
    assert code == 0
    assert len(pd.read_csv(out)) == 5 * 25
    assert (cache / "index.csv").is_file()
    out_lines = capsys.readouterr().out.strip().splitlines()
    assert "1 model, 2 model_partial, 2 prior" in out_lines[0]
    assert out_lines[-1].startswith("2 of 5 studies got the class prior; report: ")


# ----------------------------------------------- flip TTA with a real run (conftest.py: tiny_run)
def _write_split(root, split, study_ids):
    series = [
        (sid, sid * 10 + k, desc)
        for sid in study_ids
        for k, desc in enumerate(("Sagittal T1", "Sagittal T2/STIR", "Axial T2"))
    ]
    write_root(root, series, split=split)
    for sid, series_id, desc in series:
        orientation = AXIAL if desc == "Axial T2" else SAGITTAL
        write_stack(
            root / f"{split}_images" / str(sid) / str(series_id),
            n_slices=4,
            rows=16,
            cols=12,
            orientation=orientation,
            description=desc,
            first_rank=sid + series_id % 10,  # different pixels per study and series
        )


def test_flip_tta_is_left_right_consistent(tiny_run, tmp_path) -> None:
    """Study 302 is study 301 mirrored left-right. With flip TTA the prediction for the mirror
    must be the original's with every left_* and right_* label swapped, for any network: a
    left-only finding comes back on the left. Without the swap back it would come back equal."""
    from lsdc.contract import LEFT_RIGHT_PERMUTATION
    from lsdc.preprocessing.cache import load_stack, preprocess_split

    root = tmp_path / "root"
    _write_split(root, "test", [301])
    series = pd.read_csv(root / "test_series_descriptions.csv")
    mirror = series.assign(study_id=302, series_id=series["series_id"] + 10)
    pd.concat([series, mirror]).to_csv(root / "test_series_descriptions.csv", index=False)
    cache = tmp_path / "cache"
    import shutil

    for src, dst in zip(series["series_id"], mirror["series_id"], strict=True):
        shutil.copytree(
            root / "test_images" / "301" / str(src), root / "test_images" / "302" / str(dst)
        )
    preprocess_split(root, cache, "test", progress=False)
    for series_id in mirror["series_id"]:
        stack = load_stack(cache, 302, series_id, mmap=False)
        g = stack.geometry
        lr_axis = int(
            np.argmax(np.abs(np.stack([g.normal, g.column_direction, g.row_direction])[:, 0]))
        )
        np.save(cache / "302" / str(series_id) / "0.npy", np.flip(stack.array, axis=lr_axis).copy())

    out = tmp_path / "submission.csv"
    predict_split(root, [tiny_run], out, tta_flip=True, cache_dir=cache, progress=False)
    sub = pd.read_csv(out)
    original, mirrored = _study_probs(sub, 301), _study_probs(sub, 302)
    np.testing.assert_allclose(mirrored, original[LEFT_RIGHT_PERMUTATION], atol=1e-5)
    assert np.abs(original[LEFT_RIGHT_PERMUTATION] - original).max() > 1e-4  # the test can fail


def test_prior_submission_gives_each_row_its_label_prior(tmp_path) -> None:
    from lsdc.contract import PRED_COLUMNS
    from lsdc.inference.predict import prior_submission

    rng = np.random.default_rng(0)
    prior = rng.dirichlet([3, 2, 1], size=len(LABEL_COLUMNS))
    table = pd.DataFrame(prior, columns=list(PRED_COLUMNS))
    table.insert(0, "label_column", list(LABEL_COLUMNS))
    table.to_csv(tmp_path / "class_prior.csv", index=False)
    rows = ["7_right_subarticular_stenosis_l5_s1", "3_spinal_canal_stenosis_l1_l2"]
    sub = prior_submission(tmp_path, rows)
    assert sub["row_id"].tolist() == rows
    np.testing.assert_allclose(sub[list(PRED_COLUMNS)].to_numpy(), prior[[24, 0]])


def test_predict_chooses_torch_threads_like_training(root, tmp_path, monkeypatch) -> None:
    """0 threads: the usable CPUs less the run's loader workers; a count given is kept; a
    negative count is refused before anything is written."""
    set_threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_threads.append)
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    run = make_run(tmp_path / "run")
    stub = torch.load(run / "fold0" / "best.pt")
    stub["config"]["data"]["num_workers"] = 1
    torch.save(stub, run / "fold0" / "best.pt")
    out = tmp_path / "submission.csv"
    predict_split(root, [run], out, progress=False)
    predict_split(root, [run], out, threads=2, progress=False)
    assert set_threads == [7, 2]
    out.unlink()
    with pytest.raises(UserError, match="`threads` must be 0"):
        predict_split(root, [run], out, threads=-1, progress=False)
    assert not out.exists()
