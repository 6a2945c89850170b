"""``lsdc export``: a slim copy of trained runs that ``lsdc predict`` serves unchanged, with the
lsdc wheel, the pinned requirements and a README for the offline notebook."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lsdc.cli import main
from lsdc.contract import CONDITIONS, PRED_COLUMNS
from lsdc.evaluation.calibration import Calibration, save_calibration
from lsdc.inference import export as export_module
from lsdc.inference.export import SERVED_KEYS, folder_bytes
from lsdc.rundir import RunDir


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (every fold), calibrated so that calibration matters."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy)
    temperatures = dict(zip(CONDITIONS, (0.5, 2.0, 1.5, 0.8, 1.2), strict=True))
    save_calibration(Calibration(temperatures), copy)
    return copy


def _predict(root: Path, run_dir: Path, out: Path, cache: Path) -> pd.DataFrame:
    argv = ["predict", "--data", str(root), "--run", str(run_dir), "--out", str(out)]
    assert main([*argv, "--cache", str(cache), "--device", "cpu", "--quiet"]) == 0
    report = pd.read_csv(out.parent / "predict_report.csv")
    assert (report["source"] != "prior").all(), "the model must predict, or equality is trivial"
    return pd.read_csv(out)


def test_export_predicts_what_the_run_predicts_and_is_smaller(run, synth_root, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out), "--no-wheel"]) == 0
    print(capsys.readouterr().out)
    exported = RunDir(out / run.name)
    run_bytes, export_bytes = folder_bytes(run), folder_bytes(exported.root)
    print(f"run folder {run_bytes / 1e3:.0f} kB, its export {export_bytes / 1e3:.0f} kB")
    assert export_bytes < 0.5 * run_bytes

    folds = exported.fold_dirs()
    assert [f.fold for f in folds] == [f.fold for f in RunDir(run).fold_dirs()]
    for fold in folds:
        assert sorted(p.name for p in fold.root.iterdir()) == ["best.json", "best.pt"]
        served = torch.load(fold.best, weights_only=False)
        assert sorted(served) == sorted(SERVED_KEYS)
        original = torch.load(RunDir(run).fold(fold.fold).best, weights_only=False)
        for name, tensor in original["model"].items():
            assert torch.equal(served["model"][name], tensor), name
    for kept in (exported.config, exported.class_prior, exported.calibration):
        assert kept.read_bytes() == (run / kept.name).read_bytes()
    assert not (exported.root / "oof.csv").exists() and not (out / "wheels").exists()

    cache = tmp_path / "cache"
    original = _predict(synth_root, run, tmp_path / "a" / "submission.csv", cache)
    from_export = _predict(synth_root, exported.root, tmp_path / "b" / "submission.csv", cache)
    assert list(from_export["row_id"]) == list(original["row_id"])
    np.testing.assert_allclose(
        from_export[list(PRED_COLUMNS)].to_numpy(),
        original[list(PRED_COLUMNS)].to_numpy(),
        atol=1e-6,
    )
    uncalibrated = tmp_path / "c" / "submission.csv"
    argv = ["predict", "--data", str(synth_root), "--run", str(exported.root), "--no-calibration"]
    assert main([*argv, "--out", str(uncalibrated), "--cache", str(cache), "--quiet"]) == 0
    raw = pd.read_csv(uncalibrated)[list(PRED_COLUMNS)].to_numpy()
    assert not np.allclose(raw, from_export[list(PRED_COLUMNS)].to_numpy(), atol=1e-3)

    requirements = (out / "requirements.txt").read_text().splitlines()
    assert "torch==" in "\n".join(requirements) and not any("pytest" in r for r in requirements)
    readme = (out / "README.md").read_text()
    assert f"--run $EXPORT/{run.name}" in readme and "--no-wheel" in readme


def test_a_fold_without_weights_is_refused_in_one_line(run, tmp_path, capsys):
    (run / "fold1" / "best.pt").unlink()
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out), "--no-wheel"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "fold1/best.pt: missing, so fold 1 has no weights to serve" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".export.*")), "no staging folder left behind"


def test_bad_destinations_and_clashing_names_are_refused(run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", "--run", str(run), "--out", str(busy), "--no-wheel"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    twin = tmp_path / "other" / run.name
    shutil.copytree(run, twin)
    assert main(["export", "--run", str(run), str(twin), "--out", str(tmp_path / "x")]) == 2
    assert "share a folder name" in capsys.readouterr().err


def test_the_wheel_is_built_offline_and_installs(run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    (wheel,) = (out / "wheels").glob("lsdc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lsdc/configs/two_stage.yaml" in names and "lsdc/inference/export.py" in names
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet"]
    install += ["--find-links", str(out / "wheels"), "--target", str(target), "lsdc"]
    subprocess.run(install, check=True, capture_output=True, timeout=120)
    probe = "import lsdc.config as c; print(c.__file__); print(c.load_config('two_stage').task)"
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": ""},
        timeout=120,
    ).stdout.split()
    assert shown[0].startswith(str(target)) and shown[1] == "two_stage"
    assert "--no-index --find-links $EXPORT/wheels lsdc" in (out / "README.md").read_text()


def test_without_a_source_checkout_the_wheel_step_says_what_to_do(monkeypatch, tmp_path):
    import re

    monkeypatch.setattr(export_module, "_NAME_LINE", re.compile(r"^no such name$"))
    with pytest.raises(export_module.UserError, match="pass `wheel=False`"):
        export_module.build_wheel(tmp_path)
