"""The anatomical phantom: local findings, physics, label-free nuisances, switches, evidence."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from lsdc.contract import LABEL_COLUMNS, LEVELS
from lsdc.synth import SynthConfig, findings, render, synthesize, tissues
from lsdc.synth import anatomy as an
from lsdc.synth.canvas import Canvas
from lsdc.synth.labels import THRESHOLDS

EVIDENCE = Path(__file__).parents[1] / "benchmarks" / "synth_evidence.py"


def _evidence():
    spec = importlib.util.spec_from_file_location("synth_evidence", EVIDENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _label_grid(spine: an.Spine, step: float = 2.0) -> tuple[Canvas, np.ndarray]:
    """Tissue codes on a regular grid around the lumbar spine (one sub-sample per point)."""
    lower = spine.centre + np.array([-45.0, -40.0, -120.0])
    shape = (int(90 / step), int(110 / step), int(240 / step), 1)
    steps = np.array([[step, 0, 0], [0, step, 0], [0, 0, step], [0, 0, 1.0]])
    canvas = render.label_stack(spine, lower, steps, shape)
    points = np.stack(canvas.mid_points, axis=-1)
    return canvas, points


def test_each_finding_changes_the_label_map_only_around_itself_and_grows_with_severity() -> None:
    base = np.full(25, 0.1)
    spine = an.draw_spine(np.random.default_rng(0), base)
    reference, points = _label_grid(spine)
    for k, column in enumerate(LABEL_COLUMNS):
        condition, level = column[: -len("_l1_l2")], LEVELS.index(column[-len("l1_l2") :])
        changed = {}
        for s in (0.55, 0.95):
            severity = base.copy()
            severity[k] = s
            grid, _ = _label_grid(dataclasses.replace(spine, severity=severity))
            changed[s] = (grid.codes != reference.codes)[..., 0]
        where = points[changed[0.95]]
        distance = np.linalg.norm(where - spine.finding_centre(condition, level), axis=1)
        assert distance.max() < 35.0, (column, distance.max())
        # Nearer its own level than any other level's same finding: it stays at its disc.
        for other in range(len(LEVELS)):
            if other != level:
                elsewhere = np.linalg.norm(where - spine.finding_centre(condition, other), axis=1)
                assert np.mean(distance < elsewhere) > 0.9, (column, other)
        assert changed[0.95].sum() > 1.1 * changed[0.55].sum() > 0, column


def test_findings_break_at_the_label_thresholds() -> None:
    t0, t1 = THRESHOLDS["spinal_canal_stenosis"]
    assert findings.canal_narrowing(0.1) == 0 < findings.canal_narrowing(t0 - 0.1)
    assert findings.canal_narrowing(t0) == pytest.approx(0.5)
    assert findings.root_clumping(t0) == 0 < findings.root_clumping(t1)
    f0, f1 = THRESHOLDS["neural_foraminal_narrowing"]
    front_back, up_down, flatten = findings.foraminal_fat(f0)
    assert front_back == 0 and up_down == 1 and flatten == 0  # fat lost front-back at Moderate
    front_back, up_down, flatten = findings.foraminal_fat(f1)
    assert up_down == 0 and flatten == 0  # ... and up-down at Severe
    assert findings.foraminal_fat(1.0)[2] > 0  # the root deforms beyond
    s0, s1 = THRESHOLDS["subarticular_stenosis"]
    assert findings.recess_intrusion(s0)[0] < findings.recess_intrusion(s1)[0] == 1.0


def test_spin_echo_and_stir_give_the_spec_contrast() -> None:
    spine = an.draw_spine(np.random.default_rng(1), np.full(25, 0.2))
    for field in (1.5, 3.0):
        table = tissues.draw_tissues(np.random.default_rng(2), spine, field)
        rng = np.random.default_rng(3)
        t1 = tissues.signal_table(table, tissues.draw_timing(rng, "sagittal_t1", field))
        t2 = tissues.signal_table(table, tissues.draw_timing(rng, "sagittal_t2", field))
        stir = tissues.signal_table(table, tissues.draw_timing(rng, "sagittal_stir", field))
        assert t1[an.FAT] > t1[an.MARROW] > t1[an.CSF] and t1[an.CSF] < t1[an.MUSCLE]
        assert t2[an.CSF] > t2[an.FAT] > t2[an.MUSCLE] > t2[an.CORTEX]
        assert stir[an.CSF] > stir[an.MARROW] and stir[an.FAT] < 0.3 * t2[an.FAT]


def test_measured_tissue_signal_keeps_the_contrast_order() -> None:
    """The cheap version of ``synth_evidence.py tissues`` (2 studies instead of 8)."""
    evidence = _evidence()
    table = evidence.tissue_table(studies=2, seed=0)
    assert evidence.contrast_holds(table) == []


@pytest.fixture(scope="module")
def evidence_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SynthConfig(train_studies=24, test_studies=0, seed=2, image_size=64, slices=10)
    return synthesize(tmp_path_factory.mktemp("evidence") / "root", config, progress=False)


def test_local_measurements_fall_with_the_grade(evidence_root: Path) -> None:
    """The cheap version of ``synth_evidence.py visibility`` (24 studies at 64 px)."""
    evidence = _evidence()
    table = evidence.visibility_check(evidence_root)
    assert evidence.monotone(table) == [], table


def test_global_series_statistics_do_not_beat_the_prior(evidence_root: Path) -> None:
    """The cheap version of ``synth_evidence.py shortcut``: too few studies for a verdict on
    the phantom, but the check runs end to end on the official metric."""
    result = _evidence().shortcut_check(evidence_root, folds=3)
    assert result["studies"] == 24 and result["prior"] > 0
    assert result["gain"] <= 0.01


# ------------------------------------------------------------------------------------- switches
TINY = SynthConfig(train_studies=3, test_studies=1, seed=9, image_size=24, slices=5,
                   label_error_rate=0.0, coordinate_error_rate=0.0, motion_ghost_rate=0.0,
                   wrap_rate=0.0)  # fmt: skip


def _files(root: Path, suffix: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(f"*{suffix}"))}


def test_label_errors_move_grades_one_step_and_nothing_else(tmp_path: Path) -> None:
    plain = synthesize(tmp_path / "plain", TINY, progress=False)
    noisy = synthesize(tmp_path / "noisy", dataclasses.replace(TINY, label_error_rate=0.3),
                       progress=False)  # fmt: skip
    assert _files(plain, ".dcm") == _files(noisy, ".dcm")
    for name in ("oracle_train.csv", "train_label_coordinates.csv", "oracle_test.csv"):
        assert (plain / name).read_bytes() == (noisy / name).read_bytes()
    order = {"Normal/Mild": 0, "Moderate": 1, "Severe": 2}
    a = pd.read_csv(plain / "train.csv").set_index("study_id")
    b = pd.read_csv(noisy / "train.csv").set_index("study_id")
    steps = (a.stack().map(order) - b.stack().map(order)).abs()
    assert set(steps.unique()) == {0, 1} and 0.15 < (steps == 1).mean() < 0.45


def test_coordinate_errors_move_points_and_nothing_else(tmp_path: Path) -> None:
    plain = synthesize(tmp_path / "plain", TINY, progress=False)
    off = synthesize(tmp_path / "off", dataclasses.replace(TINY, coordinate_error_rate=0.5),
                     progress=False)  # fmt: skip
    assert _files(plain, ".dcm") == _files(off, ".dcm")
    assert (plain / "train.csv").read_bytes() == (off / "train.csv").read_bytes()
    a = pd.read_csv(plain / "train_label_coordinates.csv")
    b = pd.read_csv(off / "train_label_coordinates.csv")
    assert len(a) == len(b)
    moved = (a[["x", "y"]] - b[["x", "y"]]).abs().max(axis=1) > 1e-6
    assert 0.3 < moved.mean() < 0.7


def test_ghosts_and_wrap_change_pixels_only(tmp_path: Path) -> None:
    plain = synthesize(tmp_path / "plain", TINY, progress=False)
    artefacts = dataclasses.replace(TINY, motion_ghost_rate=1.0, wrap_rate=1.0)
    ghosted = synthesize(tmp_path / "ghosted", artefacts, progress=False)
    assert _files(plain, ".csv") == _files(ghosted, ".csv")
    differ = [
        not np.array_equal(pydicom.dcmread(plain / name).pixel_array,
                           pydicom.dcmread(ghosted / name).pixel_array)
        for name in _files(plain, ".dcm")
    ]  # fmt: skip
    assert all(differ)


def test_simple_phantom_stays_reachable(tmp_path: Path) -> None:
    root = synthesize(tmp_path / "simple", dataclasses.replace(TINY, phantom="simple"), False)
    some = next(root.rglob("*.dcm"))
    ds = pydicom.dcmread(some)
    assert "RepetitionTime" not in ds and ds.SeriesDescription in (
        "Sagittal T1",
        "Sagittal T2/STIR",
        "Axial T2",
    )
