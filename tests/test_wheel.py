"""The built wheel works on its own: the configs ship inside the package and are found by name
from an installed copy (not only from a source checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``lsdc export`` ships (built offline from a copy of the source), installed into
    a target folder that is put first on PYTHONPATH."""
    from lsdc.inference.export import build_wheel

    work = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(work / "wheels")
    target = work / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    subprocess.run([*pip, "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def _run(target: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_every_shipped_config_loads_by_name_from_the_installed_wheel(
    installed: Path, tmp_path: Path
) -> None:
    code = (
        "import lsdc, lsdc.config as c\n"
        "names = c.shipped_configs()\n"
        "for n in names: c.load_config(n)\n"
        "print(lsdc.__file__)\nprint(' '.join(names))\n"
    )
    done = _run(installed, "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    location, names = done.stdout.strip().splitlines()[-2:]
    assert Path(location).is_relative_to(installed)
    shipped = sorted(p.stem for p in (REPO / "src" / "lsdc" / "configs").glob("*.yaml"))
    assert names.split() == shipped and "two_stage_demo" in shipped


def test_installed_wheel_trains_two_stage_demo_and_shows_demo_help(
    installed: Path, synth_root: Path, synth_cache: Path, tmp_path: Path
) -> None:
    done = _run(installed, "-m", "lsdc.cli", "demo", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "--train-studies" in done.stdout
    run = tmp_path / "run"
    args = ["-m", "lsdc.cli", "train", "--config", "two_stage_demo", "--data", str(synth_root)]
    args += ["--cache", str(synth_cache), "--out", str(run), "--no-progress"]
    args += ["optim.epochs=1", "folds.n_folds=2", "folds.fold=0", "task_params.crop_size=16"]
    args += ["model.params={widths: [4, 4, 8, 8], layers: [1, 1, 1, 1]}"]
    done = _run(installed, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "fold0" / "best.pt").is_file()
