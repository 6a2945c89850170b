"""When the machine fails (docs/reliability.md): a disk that fills mid-run is one line naming the
folder, exit 2, for every writing verb; nothing half-written is published; a failure of the
machine (disk, memory, permission) is never recorded as a series' verdict, so a rerun after the
machine is fixed ends byte-identical to a clean run. The disk is a real small file system (a
tmpfs, which needs root); the rest needs none."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from lsdc.cli import main
from lsdc.preprocessing import cache as cache_module
from lsdc.utils import DiskError, atomic_path, disk_error, is_machine_failure

torch.set_num_threads(1)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file of a cache with its bytes (derived grids, which training adds, left out)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("grid")
    }


def cache_bytes(folder: Path) -> int:
    """The bytes of a cache's own files: the grids that training tests add to a shared cache
    fixture are left out, or the disk's size would depend on which tests ran before."""
    return sum(len(b) for b in tree(folder).values())


Resize = Callable[[int], None]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, Resize]]:
    """A tmpfs mounted at ``tmp_path/disk`` and a function that resizes it (``resize(bytes)``:
    freeing space is growing the disk)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")

    def resize(size: int) -> None:
        size = max(4096, size // 4096 * 4096)
        cmd = ["mount", "-o", f"remount,size={size}", str(disk)]
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` bytes free; the filler file is returned, to free space."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def test_preprocess_on_a_disk_that_fills_mid_run_then_a_rerun_gives_a_clean_cache(
    small_disk, synth_root, synth_cache, capsys
):
    disk, resize = small_disk
    resize(cache_bytes(synth_cache) // 2)
    cache = disk / "cache"
    argv = ["preprocess", "--data", str(synth_root), "--cache", str(cache), "--split", "train"]
    assert main([*argv, "--quiet"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no space left on the device while writing there" in err and str(cache) in err
    records = [cache_module.read_json(p) for p in cache.rglob(cache_module.SERIES_RECORD)]
    assert records, "the disk must fill mid-run, after some series were written"
    assert all(r["status"] != "error" for record in records for r in record["rows"]), (
        "a full disk is no verdict on a series"
    )
    resize(4 * cache_bytes(synth_cache) + (1 << 20))
    assert main([*argv, "--quiet"]) == 0
    assert tree(cache) == tree(synth_cache)


def test_predict_cache_on_a_full_disk_then_a_rerun_gives_the_clean_submission(
    small_disk, tiny_run, synth_root, synth_test_cache, tmp_path, capsys
):
    disk, resize = small_disk
    resize(cache_bytes(synth_test_cache) // 2)
    cache = disk / "cache"
    argv = ["predict", "--data", str(synth_root), "--run", str(tiny_run), "--quiet"]
    argv += ["--cache", str(cache), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a" / "submission.csv")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no space left on the device" in err and str(cache) in err
    resize(4 * cache_bytes(synth_test_cache) + (1 << 20))
    assert main([*argv, "--out", str(tmp_path / "b" / "submission.csv")]) == 0
    clean = ["predict", "--data", str(synth_root), "--run", str(tiny_run), "--quiet"]
    clean += ["--cache", str(tmp_path / "clean"), "--device", "cpu"]
    assert main([*clean, "--out", str(tmp_path / "c" / "submission.csv")]) == 0
    rerun = pd.read_csv(tmp_path / "b" / "predict_report.csv")
    assert (rerun["source"] == pd.read_csv(tmp_path / "c" / "predict_report.csv")["source"]).all()
    assert (tmp_path / "b" / "submission.csv").read_bytes() == (
        tmp_path / "c" / "submission.csv"
    ).read_bytes()
    assert tree(cache) == tree(tmp_path / "clean")


@pytest.mark.parametrize("verb", ["train", "predict", "export"])
def test_every_writing_verb_on_a_full_disk_is_one_line_naming_the_folder(
    small_disk, verb, tiny_run, synth_root, synth_cache, synth_test_cache, tmp_path, capsys
):
    disk, _ = small_disk
    out = disk / "out"
    if verb == "train":
        argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
        argv += ["--out", str(out), "--no-progress"]
        written, leave = out, 16 << 10
    elif verb == "predict":
        argv = ["predict", "--data", str(synth_root), "--run", str(tiny_run), "--quiet"]
        argv += ["--cache", str(synth_test_cache), "--out", str(out / "submission.csv")]
        out.mkdir()
        written, leave = out, 0
    else:
        argv = ["export", "--run", str(tiny_run), "--out", str(out), "--no-wheel"]
        written, leave = disk, 16 << 10
    filler = fill(disk, leave)
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{written}: no space left on the device" in err or (
        f"{written}/" in err and "no space left on the device" in err
    ), err
    assert str(tiny_run) not in err, "the folder written is named, not a file read"
    leftovers = [p for p in disk.rglob("*") if p.is_file() and p != filler]
    assert not [p for p in leftovers if p.name.endswith((".tmp", ".partial"))]
    assert not [p for p in leftovers if p.suffix == ".pt"], "no checkpoint is half-written"


def test_a_short_write_on_a_full_disk_is_named_and_leaves_nothing(small_disk):
    disk, _ = small_disk
    fill(disk, 8 << 10)
    refused = pytest.raises(DiskError, match=f"{disk}: no space left on the device")
    with refused, atomic_path(disk / "big.pt") as tmp:
        torch.save({"model": torch.zeros(1 << 16)}, tmp)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_disk_errors_are_named_and_machine_failures_told_from_data_failures(tmp_path):
    full = disk_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path, needed=3 << 20)
    assert full is not None and str(full).startswith(f"{tmp_path}: no space left on the device")
    assert "3.0 MB needed" in str(full)
    read_only = disk_error(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert str(read_only) == f"{tmp_path}: the file system is read-only while writing there"
    assert disk_error(OSError(errno.EDQUOT, "quota"), tmp_path) is not None
    assert disk_error(RuntimeError("unexpected pos"), tmp_path) is None, "this disk has room"
    assert disk_error(ValueError("bad"), tmp_path) is None
    for machine in (MemoryError(), PermissionError(errno.EACCES, "denied"), full):
        assert is_machine_failure(machine)
    for data in (ValueError("corrupt"), OSError(errno.EINVAL, "bad"), KeyError("PixelData")):
        assert not is_machine_failure(data)


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (MemoryError(), "out of memory while reading this series"),
        (PermissionError(errno.EACCES, "Permission denied", "x.dcm"), "Permission denied"),
    ],
)
def test_a_machine_failure_is_not_recorded_and_a_rerun_redoes_the_series(
    synth_root, synth_cache, tmp_path, monkeypatch, capsys, failure, message
):
    real, calls = cache_module.read_series, []

    def fails_on_the_third(folder, description):
        calls.append(folder)
        if len(calls) == 3:
            raise failure
        return real(folder, description)

    monkeypatch.setattr(cache_module, "read_series", fails_on_the_third)
    cache = tmp_path / "cache"
    argv = ["preprocess", "--data", str(synth_root), "--cache", str(cache), "--split", "train"]
    assert main([*argv, "--quiet"]) == 2
    assert message in one_line(capsys.readouterr().err)
    failed = cache / calls[2].parent.name / calls[2].name
    assert not failed.exists(), "the machine's failure must not be published as the verdict"
    monkeypatch.setattr(cache_module, "read_series", real)
    assert main([*argv, "--quiet"]) == 0
    assert tree(cache) == tree(synth_cache)
    shutil.rmtree(cache)
