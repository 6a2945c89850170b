"""lsdc synth --workers: a process pool that writes the same bytes and cleans up as one process does."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsdc.cli import main
from lsdc.errors import UserError
from lsdc.synth.generator import SynthConfig, synthesize

TINY = SynthConfig(train_studies=3, test_studies=2, seed=7, image_size=32, slices=8)


@dataclasses.dataclass
class UndrawableConfig(SynthConfig):
    """Passes validation but every study fails while it is drawn (in whichever process draws it).

    Module-level so that spawned workers can unpickle it.
    """

    def validate(self) -> None:
        """Skip the check of ``n_axial_slices``, which is what fails."""

    @property
    def n_axial_slices(self) -> int:
        raise UserError("axial slices: undrawable on purpose")


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_two_workers_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    one = synthesize(tmp_path / "one", TINY, progress=False, workers=1)
    two = synthesize(tmp_path / "two", TINY, progress=False, workers=2)
    hashes = _tree_hashes(one)
    assert len([name for name in hashes if name.endswith(".dcm")]) > 5 * 3 * 8
    assert _tree_hashes(two) == hashes


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("out_exists", [False, True])
def test_a_failing_study_raises_its_own_error_and_leaves_no_root(
    tmp_path: Path, workers: int, out_exists: bool
) -> None:
    out = tmp_path / "root"
    if out_exists:
        out.mkdir()
    config = UndrawableConfig(**dataclasses.asdict(TINY))
    with pytest.raises(UserError, match="^axial slices: undrawable on purpose$") as raised:
        synthesize(out, config, progress=False, workers=workers)
    # From a worker, the error carries the worker's traceback as its cause.
    assert ("n_axial_slices" in str(raised.value.__cause__)) == (workers > 1)
    if out_exists:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()


def test_refuses_fewer_than_one_worker(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="`workers` must be at least 1, got 0"):
        synthesize(tmp_path / "root", TINY, progress=False, workers=0)
    assert not (tmp_path / "root").exists()


def test_cli_takes_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "--out", str(tmp_path / "cli"), "--train-studies", "2", "--test-studies", "1",
            "--seed", "7", "--image-size", "32", "--slices", "8", "--quiet"]  # fmt: skip
    assert main([*argv, "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
    assert main([*argv, "--workers", "2"]) == 0
    small = dataclasses.replace(TINY, train_studies=2, test_studies=1)
    assert _tree_hashes(tmp_path / "cli") == _tree_hashes(
        synthesize(tmp_path / "api", small, progress=False)
    )


def _take_sigint_as_a_terminal_does() -> None:
    """Give the child SIGINT's default disposition, whatever the test runner inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_pool_run_leaves_no_root_and_no_process(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, once studies are
    being written: the command exits 130, the root is gone and no worker outlives it."""
    out = tmp_path / "root"
    command = [sys.executable, "-m", "lsdc.cli", "synth", "--out", str(out), "--train-studies",
               "200", "--test-studies", "0", "--image-size", "32", "--slices", "8", "--workers",
               "2", "--quiet"]  # fmt: skip
    # A shell without job control starts background commands (`nohup pytest &`) with SIGINT
    # ignored, and a child inherits that; a terminal's Ctrl-C reaches a command that has it.
    process = subprocess.Popen(
        command,
        start_new_session=True,
        preexec_fn=_take_sigint_as_a_terminal_does,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "train_images").is_dir() and process.poll() is None:
            assert time.monotonic() < deadline, "no study was written within 60 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    deadline = time.monotonic() + 30  # multiprocessing's resource tracker exits just after
    while _group_alive(process.pid):
        assert time.monotonic() < deadline, "a process of the command outlived it by 30 s"
        time.sleep(0.1)
    assert not out.exists()  # checked once nothing can write any more


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
