"""``lsdc export --with-deps``: an export that installs with no index into an environment that has
only torch and torchvision (as a Kaggle GPU image has), and predicts from there."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from packaging.utils import canonicalize_name, parse_wheel_filename

from lsdc.cli import main
from lsdc.contract import PRED_COLUMNS
from lsdc.inference import export as export_module
from lsdc.inference.export import TORCH_DISTRIBUTIONS, dependency_pins, installed_closure

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without pip's configuration (no index, no find-links, no
    constraints) and without a PYTHONPATH that could show the source tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lsdc export --with-deps`` of a copy of the tiny run, fetched once for the module."""
    work = tmp_path_factory.mktemp("bundle")
    probe = [*PIP, "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest"]
    tqdm = f"tqdm=={importlib.metadata.version('tqdm')}"
    done = subprocess.run([*probe, str(work / "probe"), tqdm], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        pytest.skip(f"pip cannot fetch wheels here (no index, no network): {last}")
    run = work / "tiny"
    shutil.copytree(tiny_run, run)
    out = work / "export"
    assert main(["export", "--run", str(run), "--out", str(out), "--with-deps"]) == 0
    return out


def _torch_only_site(dest: Path) -> Path:
    """A folder of symlinks to torch, torchvision and every distribution they need (found from
    their installed metadata), and nothing else of this environment."""
    dest.mkdir()
    for name in installed_closure(TORCH_DISTRIBUTIONS):
        dist = importlib.metadata.distribution(name)
        site = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            if not top.endswith(".pth") and (site / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(site / top)
    return dest


def test_the_bundle_installs_with_no_index_beside_torch_and_predicts(
    bundle: Path, synth_root: Path, tmp_path: Path
) -> None:
    wheels = {
        canonicalize_name(parse_wheel_filename(w.name)[0]): str(parse_wheel_filename(w.name)[1])
        for w in (bundle / "wheels").glob("*.whl")
    }
    expected = {name: version for name, version in (p.split("==") for p in dependency_pins())}
    assert {n: v for n, v in wheels.items() if n != "lsdc"} == expected
    assert "lsdc" in wheels and "timm" in wheels and "monai" in wheels
    assert not {"torch", "torchvision", "triton", "nvidia-cudnn-cu13"} & set(wheels)

    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    torch_site = _torch_only_site(tmp_path / "torch_site")
    (Path(purelib) / "torch_site.pth").write_text(f"{torch_site}\n")

    install = [*PIP, "--python", str(python), "install", "--no-index", "--no-compile", "--quiet"]
    install += ["--find-links", str(bundle / "wheels"), "lsdc"]
    done = subprocess.run(install, capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = {p.name.split("-")[0] for p in Path(purelib).glob("*.dist-info")}
    assert {"lsdc", "timm", "monai", "pandas"} <= installed and "torch" not in installed

    out, here = (tmp_path / name / "submission.csv" for name in ("bundled", "here"))
    argv = ["predict", "--data", str(synth_root), "--run", str(bundle / "tiny")]
    argv += ["--cache", str(tmp_path / "cache"), "--device", "cpu", "--quiet"]
    lsdc = fresh / "bin" / "lsdc"
    done = subprocess.run(
        [lsdc, *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert lsdc.read_text().startswith(f"#!{python}")
    report = pd.read_csv(out.parent / "predict_report.csv")
    assert (report["source"] != "prior").all(), "the model must predict, or equality is trivial"

    assert main([*argv, "--out", str(here)]) == 0
    bundled, source = pd.read_csv(out), pd.read_csv(here)
    assert list(bundled["row_id"]) == list(source["row_id"])
    np.testing.assert_allclose(
        bundled[list(PRED_COLUMNS)].to_numpy(), source[list(PRED_COLUMNS)].to_numpy(), atol=1e-6
    )


def test_the_readme_names_what_the_bundle_expects_installed_and_the_command(bundle: Path) -> None:
    readme = (bundle / "README.md").read_text()
    torch, vision = (f"{n}=={importlib.metadata.version(n)}" for n in TORCH_DISTRIBUTIONS)
    assert f"It expects {torch} and {vision} to be installed" in readme
    assert "pip install --no-index --find-links $EXPORT/wheels lsdc==" in readme
    assert "--with-torch" in readme and f"timm=={importlib.metadata.version('timm')}" in readme


def test_with_torch_bundles_torch_and_what_only_it_needs(tiny_run, tmp_path, monkeypatch, capsys):
    without = {p.split("==")[0] for p in dependency_pins()}
    fetched: list[str] = []

    def fake_download(pins, dest):
        fetched.extend(pins)
        dest.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(export_module, "download_wheels", fake_download)
    out = tmp_path / "export"
    assert (
        main(["export", "--run", str(tiny_run), "--out", str(out), "--with-torch", "--no-wheel"])
        == 0
    )
    names = {p.split("==")[0] for p in fetched}
    assert {"torch", "torchvision", "triton", "sympy", "nvidia-cudnn-cu13"} <= names
    assert without < names and "pytest" not in names and "lsdc" not in names
    assert f"torch=={importlib.metadata.version('torch')}" in fetched
    readme = (out / "README.md").read_text()
    assert "It expects" not in readme and f"torch=={importlib.metadata.version('torch')}" in readme
    assert f", {len(fetched)} dependency wheels to {out}" in capsys.readouterr().out


def test_a_pip_failure_is_one_line_naming_the_package_and_leaves_nothing(
    tiny_run, tmp_path, monkeypatch, capsys
):
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    out = tmp_path / "export"
    argv = ["export", "--run", str(tiny_run), "--out", str(out), "--with-deps", "--no-wheel"]
    assert main(argv) == 2
    *progress, err = capsys.readouterr().err.strip().splitlines()
    assert progress == [f"fetching {len(dependency_pins())} dependency wheels with pip download"]
    assert err.startswith("lsdc export: error: pip download of "), err
    named = [pin for pin in dependency_pins() if f"pip download of {pin} failed" in err]
    assert len(named) == 1 and f"No matching distribution found for {named[0]}" in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".export.*")), "no staging folder left behind"


def _dist_info(site: Path, name: str, requires: list[str]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_the_walk_follows_requested_extras_and_applicable_markers_only(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _dist_info(
        site, "alpha", ["beta[fast]>=1", 'gamma; python_version < "3"', 'delta; extra == "dev"']
    )
    _dist_info(site, "beta", ['epsilon; extra == "fast"', 'zeta; extra == "other"', "eta"])
    for name in ("gamma", "delta", "epsilon", "zeta", "eta"):
        _dist_info(site, name, [])
    monkeypatch.syspath_prepend(str(site))
    assert installed_closure(["alpha"]) == {
        "alpha": "1.0",
        "beta": "1.0",
        "epsilon": "1.0",
        "eta": "1.0",
    }
    assert installed_closure(["alpha"], stop=["Beta"]) == {"alpha": "1.0"}
    _dist_info(site, "theta", ["missing-thing==2"])
    with pytest.raises(
        export_module.UserError, match=r"missing-thing==2 \(needed by theta 1.0\) is not installed"
    ):
        installed_closure(["theta"])
