"""lsdc preprocess: cache entries, report rows, resume after kill -9, resampling, reading back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_factory import AXIAL, SAGITTAL, oblique, rotation, write_root, write_stack
from pydicom.data import get_testdata_file

from lsdc.cli import main
from lsdc.errors import UserError
from lsdc.preprocessing.cache import (
    INDEX_COLUMNS,
    REPORT_COLUMNS,
    best_stacks,
    load_stack,
    preprocess_split,
    read_cache_index,
    resample_stack,
)
from lsdc.preprocessing.dicom import read_series
from lsdc.preprocessing.geometry import StackGeometry


def build_root(root: Path) -> Path:
    """Three studies: good series, a two-stack axial, and every kind of failure."""
    write_root(
        root,
        [
            (1, 10, "Sagittal T1"),
            (1, 11, "Sagittal T2/STIR"),
            (1, 12, "Axial T2"),
            (2, 20, "Axial T2"),
            (2, 21, "Sagittal T1"),
            (2, 22, "Sagittal T2/STIR"),
            (3, 30, "Axial T2"),
        ],
    )
    images = root / "train_images"
    write_stack(images / "1" / "10", orientation=SAGITTAL, n_slices=5, origin=(10, -20, 30))
    write_stack(images / "1" / "11", orientation=SAGITTAL, n_slices=7, origin=(12, -20, 30))
    write_stack(images / "1" / "12", n_slices=3, instances=[1, 2, 3])
    tilted = oblique(AXIAL, rotation("x", 10))
    write_stack(
        images / "1" / "12",
        n_slices=4,
        instances=[4, 5, 6, 7],
        orientation=tilted,
        origin=(0, 0, 40),
    )
    write_stack(images / "2" / "20", n_slices=3)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), images / "2" / "20" / "99.dcm")
    (images / "2" / "21").mkdir(parents=True)
    shutil.copy(get_testdata_file("rtplan.dcm"), images / "2" / "21" / "1.dcm")
    (images / "2" / "22").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_root(tmp_path_factory.mktemp("root"))


@pytest.fixture(scope="module")
def cache(root, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    preprocess_split(root, cache_dir, "train", progress=False)
    return cache_dir


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_report_has_one_row_per_stack_or_failed_series(cache, root):
    report = pd.read_csv(cache / "preprocess_report.csv", keep_default_na=False)
    assert list(report.columns) == REPORT_COLUMNS
    rows = {(r.series_id, r.stack): (r.n_slices, r.status) for r in report.itertuples()}
    assert rows == {
        (10, 0): (5, "ok"),
        (11, 0): (7, "ok"),
        (12, 0): (3, "ok"),
        (12, 1): (4, "ok"),
        (20, 0): (3, "warning"),
        (21, -1): (0, "error"),
        (22, -1): (0, "error"),
        (30, -1): (0, "error"),
    }
    message = report.set_index(["series_id", "stack"])["message"]
    images = root / "train_images"
    assert (
        f"{images / '2' / '20' / '99.dcm'}: skipped: pixel data cannot be decoded" in message[20, 0]
    )
    assert f"{images / '2' / '21'}: no readable image" in message[21, -1]
    assert "no pixel data (not an image)" in message[21, -1]
    assert f"{images / '2' / '22'}: empty series folder" in message[22, -1]
    assert f"{images / '3' / '30'}: series folder not found" in message[30, -1]


def test_index_lists_cached_stacks_only(cache):
    index = read_cache_index(cache)
    assert list(index.columns) == INDEX_COLUMNS
    assert sorted(zip(index["series_id"], index["stack"], strict=True)) == [
        (10, 0),
        (11, 0),
        (12, 0),
        (12, 1),
        (20, 0),
    ]
    assert (index[["rows", "cols"]].to_numpy() == [16, 12]).all()


def test_load_stack_gives_the_series_as_read_as_a_memory_map(cache, root):
    stack = load_stack(cache, 1, 12, stack=1)
    (_, volume) = read_series(root / "train_images" / "1" / "12", "Axial T2").volumes
    assert isinstance(stack.array, np.memmap)
    assert stack.array.dtype == np.uint16  # as stored: no rescale
    np.testing.assert_array_equal(stack.array, volume.array)
    assert stack.geometry == volume.geometry == stack.source_geometry
    assert stack.geometry.instance_numbers == (4, 5, 6, 7)
    assert stack.meta["series_description"] == "Axial T2"
    assert stack.meta["pixel_spacing"] == [0.5, 0.75]
    assert not isinstance(load_stack(cache, 1, 12, stack=1, mmap=False).array, np.memmap)


def test_entries_get_ordinary_permissions(cache):
    umask = os.umask(0)
    os.umask(umask)
    assert (cache / "1" / "12").stat().st_mode & 0o777 == 0o777 & ~umask


def test_load_stack_of_a_failed_series_names_the_file(cache):
    with pytest.raises(UserError, match=r"21/0\.npy: no cached stack 0 for study 2 series 21"):
        load_stack(cache, 2, 21)


def test_best_stacks_prefers_the_most_slices(cache):
    best = best_stacks(read_cache_index(cache))
    chosen = {(r.study_id, r.series_description): (r.series_id, r.stack) for r in best.itertuples()}
    assert chosen == {
        (1, "Axial T2"): (12, 1),
        (1, "Sagittal T1"): (10, 0),
        (1, "Sagittal T2/STIR"): (11, 0),
        (2, "Axial T2"): (20, 0),
    }


def test_best_stacks_breaks_ties_by_series_then_stack():
    index = pd.DataFrame(
        {
            "study_id": [5, 5, 5, 5],
            "series_id": [9, 7, 7, 8],
            "series_description": ["Axial T2"] * 4,
            "stack": [0, 1, 0, 0],
            "n_slices": [20, 20, 20, 12],
            "rows": 1,
            "cols": 1,
            "status": ["ok", "ok", "warning", "ok"],
            "message": "",
        }
    )
    (row,) = best_stacks(index).itertuples()
    assert (row.series_id, row.stack) == (7, 0)


def test_rerun_reads_nothing_and_changes_nothing(cache, root, monkeypatch):
    before = tree(cache)

    def fail(*args, **kwargs):
        raise AssertionError("a cached series was read again")

    monkeypatch.setattr("lsdc.preprocessing.cache.read_series", fail)
    preprocess_split(root, cache, "train", progress=False)
    assert tree(cache) == before


def test_two_workers_write_the_same_cache(cache, root, tmp_path):
    preprocess_split(root, tmp_path / "c2", "train", workers=2, progress=False)
    assert tree(tmp_path / "c2") == tree(cache)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from lsdc.preprocessing.cache import preprocess_split

    real_save, calls = np.save, [0]

    def save_then_die(*args, **kwargs):
        calls[0] += 1
        real_save(*args, **kwargs)
        if calls[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)

    np.save = save_then_die
    preprocess_split(sys.argv[1], sys.argv[2], "train", progress=False)
    """
)


@pytest.mark.parametrize("die_after", [1, 3])
def test_kill_9_mid_series_then_rerun_gives_an_identical_cache(cache, root, tmp_path, die_after):
    """Die right after the 1st (series 10) or 3rd npy (stack 0 of the two-stack series 12)."""
    target = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, str(root), str(target), str(die_after)], env=env, check=False
    )
    assert done.returncode == -9
    assert not (target / "index.csv").exists()
    partial = list(target.glob("1/.tmp-*"))
    assert len(partial) == 1, "the killed series should be left only as a temporary folder"
    assert not (target / "1" / partial[0].name.split("-")[1]).exists()

    preprocess_split(root, target, "train", progress=False)
    assert tree(target) == tree(cache)


def test_resampling_writes_the_geometry_of_the_new_grid(root, tmp_path):
    preprocess_split(root, tmp_path / "c", "train", spacing=(2.0, 1.0, 1.5), progress=False)
    stack = load_stack(tmp_path / "c", 1, 10)
    assert stack.array.shape == (9, 9, 7)  # extents 16 x 7.5 x 8.25 mm, kept whole
    assert stack.geometry.spacing == pytest.approx((2.0, 1.0, 1.5))
    assert stack.source_geometry.spacing == pytest.approx((4.0, 0.5, 0.75))
    # a source voxel and its resampled twin are the same patient point
    np.testing.assert_allclose(
        stack.geometry.voxel_to_patient([[4, 2, 2]]),
        stack.source_geometry.voxel_to_patient([[2, 4, 4]]),
        atol=1e-9,
    )
    with pytest.raises(UserError, match="this cache was built with"):
        preprocess_split(root, tmp_path / "c", "train", progress=False)


def test_resample_stack_interpolates_linearly_over_uneven_gaps():
    gaps = np.array([0.0, 3.0, 6.0, 12.0])
    geometry = StackGeometry(
        positions=gaps[:, None] * np.array([0.0, 0.0, 1.0]),
        row_direction=(1, 0, 0),
        column_direction=(0, 1, 0),
        pixel_spacing=(0.5, 1.0),
        instance_numbers=(1, 2, 3, 4),
    )
    s, r, c = np.meshgrid(gaps, np.arange(6) * 0.5, np.arange(5) * 1.0, indexing="ij")
    array = (2 * s + 3 * r - c).astype(np.float32)  # linear in mm: resampling must be exact
    out, new = resample_stack(array, geometry, (1.5, 0.25, 2.0))
    assert out.shape == (9, 11, 3)
    points = new.voxel_to_patient(np.argwhere(np.ones(out.shape)))
    expected = 2 * points[:, 2] + 3 * points[:, 1] - points[:, 0]
    np.testing.assert_allclose(out.reshape(-1), expected, atol=1e-4)
    assert new.instance_numbers == (1, 2, 2, 3, 3, 3, 4, 4, 4)  # nearest, ties upward


def test_cli_runs_and_reports(root, tmp_path, capsys):
    cache_dir = tmp_path / "c"
    args = ["preprocess", "--data", str(root), "--cache", str(cache_dir), "--split", "train"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == (
        f"4 stacks ok, 1 with warnings, 3 series failed; report: {cache_dir / 'preprocess_report.csv'}"
    )
    assert len(read_cache_index(cache_dir)) == 5


def test_cli_fails_when_nothing_is_readable(tmp_path, capsys):
    root = write_root(tmp_path / "root", [(1, 2, "Axial T2")])
    (root / "train_images" / "1" / "2").mkdir(parents=True)
    code = main(
        ["preprocess", "--data", str(root), "--cache", str(tmp_path / "c"), "--split", "train"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no series could be read (1 failed)" in err
    assert str(tmp_path / "c" / "preprocess_report.csv") in err
    assert (tmp_path / "c" / "preprocess_report.csv").is_file()


def test_bad_arguments_are_user_errors(root, tmp_path):
    with pytest.raises(UserError, match="split must be one of"):
        preprocess_split(root, tmp_path / "c", "valid")
    with pytest.raises(UserError, match="`workers` must be at least 1"):
        preprocess_split(root, tmp_path / "c", "train", workers=0)
    with pytest.raises(UserError, match="three positive"):
        preprocess_split(root, tmp_path / "c", "train", spacing=(1, 0, 1))
    with pytest.raises(UserError, match="test_series_descriptions.csv: file not found"):
        preprocess_split(root, tmp_path / "c", "test")


def test_real_world_variants_are_cached_or_reported(tmp_path):
    """The issue's 'done when' root: several transfer syntaxes, big-endian, implicit VR, a truncated
    file, a two-stack axial series and a non-image file, one series each."""
    variants = {
        101: ["MR_small.dcm"],
        102: ["MR_small_RLE.dcm"],
        103: ["MR_small_jp2klossless.dcm"],
        104: ["MR_small_jpeg_ls_lossless.dcm"],
        105: ["MR_small_bigendian.dcm"],
        106: ["MR_small_implicit.dcm"],
        107: ["JPGExtended.dcm"],
        108: ["MR_small.dcm", "MR_truncated.dcm"],
        109: ["rtplan.dcm"],
    }
    root = write_root(
        tmp_path / "root", [(7, s, "Axial T2") for s in [*variants, 110]], split="test"
    )
    for series_id, names in variants.items():
        folder = root / "test_images" / "7" / str(series_id)
        folder.mkdir(parents=True)
        for k, name in enumerate(names, start=1):
            shutil.copy(get_testdata_file(name), folder / f"{k}.dcm")
    folder = root / "test_images" / "7" / "110"
    write_stack(folder, n_slices=3, instances=[1, 2, 3])
    write_stack(folder, n_slices=3, instances=[4, 5, 6], origin=(0, 0, 60))

    report = preprocess_split(root, tmp_path / "c", "test", progress=False)
    status = {(r.series_id, r.stack): r.status for r in report.itertuples()}
    assert status == {
        **{(s, 0): "ok" for s in range(101, 107)},
        (107, 0): "warning",  # no geometry tags: defaults
        (108, 0): "warning",
        (109, -1): "error",
        (110, 0): "ok",
        (110, 1): "ok",
    }
    reference = load_stack(tmp_path / "c", 7, 101).array
    for series_id in range(102, 107):
        np.testing.assert_array_equal(load_stack(tmp_path / "c", 7, series_id).array, reference)


def test_synthetic_labels_land_on_cached_slices_and_project_across_series(tmp_path):
    """On a synthetic root (truth known): every labelled instance is a slice of a cached stack,
    and each level's spinal canal point (sagittal T2) projects onto the axial slice where the
    same level's subarticular point was annotated."""
    from lsdc.preprocessing.geometry import project_point
    from lsdc.synth.generator import SynthConfig, synthesize

    config = SynthConfig(train_studies=2, test_studies=0, seed=3, image_size=32, slices=6)
    root = synthesize(tmp_path / "root", config, progress=False)
    preprocess_split(root, tmp_path / "c", "train", progress=False)
    index = read_cache_index(tmp_path / "c")

    def stack_holding(row):
        for entry in index[index["series_id"] == row.series_id].itertuples():
            stack = load_stack(tmp_path / "c", row.study_id, row.series_id, entry.stack)
            if row.instance_number in stack.geometry.instance_numbers:
                return stack
        raise AssertionError(f"instance {row.instance_number} of {row.series_id} not cached")

    coordinates = pd.read_csv(root / "train_label_coordinates.csv")
    pairs = 0
    for _, level in coordinates.groupby(["study_id", "level"]):
        canal = level[level["condition"] == "Spinal Canal Stenosis"]
        recess = level[level["condition"].str.endswith("Subarticular Stenosis")]
        for row in level.itertuples():
            stack_holding(row)
        if len(canal) and len(recess):
            a, b = next(canal.itertuples()), next(recess.itertuples())
            axial = stack_holding(b)
            projected = project_point(
                stack_holding(a).geometry, a.instance_number, a.x, a.y, axial.geometry
            )
            assert abs(projected[0] - axial.geometry.slice_index(b.instance_number)) <= 1.0
            pairs += 1
    assert pairs >= 5


def test_an_unexpected_failure_in_one_series_becomes_its_error_row(root, tmp_path, monkeypatch):
    real = read_series

    def flaky(folder, description=None):
        if Path(folder).name == "11":
            raise RuntimeError("simulated decoder crash")
        return real(folder, description)

    monkeypatch.setattr("lsdc.preprocessing.cache.read_series", flaky)
    report = preprocess_split(root, tmp_path / "c", "train", study_ids=[1], progress=False)
    assert report["series_id"].tolist() == [10, 11, 12, 12]
    failed = report[report["series_id"] == 11].iloc[0]
    assert failed["status"] == "error"
    assert failed["message"].endswith("1/11: unexpected RuntimeError: simulated decoder crash")
    assert not list((tmp_path / "c" / "1" / "11").glob("*.npy"))
    assert len(read_cache_index(tmp_path / "c")) == 3
