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

import numpy as np
import pandas as pd
import pytest
import torch

from lsdc.checkpoint import load_checkpoint
from lsdc.cli import main
from lsdc.preprocessing import cache as cache_module
from lsdc.synth import generator
from lsdc.utils import DiskError, atomic_path, disk_error, is_machine_failure

torch.set_num_threads(1)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file of a cache with its bytes (derived grids, which training adds, left out)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("grid")
    }


def own_bytes(folder: Path) -> int:
    """The bytes of a folder's own files (a cache, a root, a run): the grids that training
    tests add to a shared cache fixture are left out, or the disk's size would depend on which
    tests ran before."""
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
    """The verb's error: one line, stderr's last (above it only the verb's log, such as a
    training's epochs), no traceback."""
    lines = err.strip().splitlines()
    assert [line for line in lines if ": error: " in line] == lines[-1:], lines
    assert "Traceback" not in err, err
    return lines[-1]


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
    resize(own_bytes(synth_cache) // 2)
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
    resize(4 * own_bytes(synth_cache) + (1 << 20))
    assert main([*argv, "--quiet"]) == 0
    assert tree(cache) == tree(synth_cache)


def test_predict_cache_on_a_full_disk_then_a_rerun_gives_the_clean_submission(
    small_disk, tiny_run, synth_root, synth_test_cache, tmp_path, capsys
):
    disk, resize = small_disk
    resize(own_bytes(synth_test_cache) // 2)
    cache = disk / "cache"
    argv = ["predict", "--data", str(synth_root), "--run", str(tiny_run), "--quiet"]
    argv += ["--cache", str(cache), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a" / "submission.csv")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no space left on the device" in err and str(cache) in err
    resize(4 * own_bytes(synth_test_cache) + (1 << 20))
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
def test_every_writing_verb_on_a_full_disk_is_one_line_and_a_rerun_writes_the_clean_output(
    small_disk, verb, tiny_run, synth_root, synth_cache, synth_test_cache, tmp_path, capsys
):
    disk, _ = small_disk
    out = disk / "out"

    def command(folder: Path) -> list[str]:
        if verb == "train":
            argv = ["train", "--config", "tiny", "--data", str(synth_root)]
            return [*argv, "--cache", str(synth_cache), "--out", str(folder), "--no-progress"]
        if verb == "predict":
            argv = ["predict", "--data", str(synth_root), "--run", str(tiny_run), "--quiet"]
            return [
                *argv,
                "--cache",
                str(synth_test_cache),
                "--out",
                str(folder / "submission.csv"),
            ]
        return ["export", "--run", str(tiny_run), "--out", str(folder), "--no-wheel"]

    written, leave = {"train": (out, 16 << 10), "predict": (out, 0)}.get(verb, (disk, 16 << 10))
    if verb == "predict":
        out.mkdir()
    filler = fill(disk, leave)
    assert main(command(out)) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{written}: no space left on the device" in err or (
        f"{written}/" in err and "no space left on the device" in err
    ), err
    assert str(tiny_run) not in err, "the folder written is named, not a file read"
    leftovers = [p for p in disk.rglob("*") if p.is_file() and p != filler]
    assert not [p for p in leftovers if p.name.endswith((".tmp", ".partial"))]
    assert not [p for p in leftovers if p.suffix == ".pt"], "no checkpoint is half-written"

    filler.unlink()
    assert main([*command(out), *(["--resume"] if verb == "train" else [])]) == 0
    if verb == "train":
        same_run(out, tiny_run)
    else:
        assert main(command(tmp_path / "clean")) == 0
        assert tree(out) == tree(tmp_path / "clean"), "byte for byte, checkpoints included"


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


def pages(folder: Path) -> int:
    """The bytes a folder's files take on a tmpfs (each file a whole number of 4 KB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_synth_on_a_disk_that_fills_leaves_no_root_and_a_rerun_writes_the_clean_one(
    small_disk, monkeypatch, capsys
):
    disk, resize = small_disk
    out = disk / "root"
    argv = ["synth", "--out", str(out), "--train-studies", "0", "--test-studies", "1"]
    argv += ["--image-size", "32", "--slices", "8", "--pacs", "by-series", "--workers", "1"]
    assert main([*argv, "--quiet"]) == 0
    clean, needed = tree(out), pages(out)
    shutil.rmtree(out)
    resize(needed // 2)  # fills while the images (and the PACS copy) are written
    capsys.readouterr()
    assert main([*argv, "--quiet"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{out}/" in err and "no space left on the device while writing there" in err, err
    assert not out.exists(), "a root the disk cut short is removed, not left half-written"

    resize(needed + (1 << 20))
    tables, fillers = generator._write_tables, []

    def full_at_the_tables(*args) -> None:
        fillers.append(fill(disk, 0))
        tables(*args)

    monkeypatch.setattr(generator, "_write_tables", full_at_the_tables)
    assert main([*argv, "--quiet"]) == 2  # the disk fills once every image is written
    err = one_line(capsys.readouterr().err)
    assert f"{out}: no space left on the device while writing there" in err, err
    assert not out.exists(), "a root without its CSVs is removed too"
    fillers[0].unlink()
    monkeypatch.setattr(generator, "_write_tables", tables)
    assert main([*argv, "--quiet"]) == 0
    assert tree(out) == clean


@pytest.fixture
def tiny_run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of ``tiny_run`` to evaluate (``evaluate --run`` writes calibration.json into it)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.mark.parametrize("full", ["run", "out"])
def test_evaluate_on_a_full_disk_publishes_no_calibration_and_no_report(
    small_disk, full, tiny_run_copy, synth_root, synth_cache, capsys
):
    """The run's calibration.json (a full run folder) or the gallery's pages (a full --out):
    one line naming that folder, and none of calibration.json, metrics.json, report.html."""
    disk, resize = small_disk
    run, out = tiny_run_copy, disk / "evaluation"
    if full == "run":
        resize(2 * own_bytes(run) + (1 << 20))
        run = Path(shutil.copytree(run, disk / "run"))
        out = tiny_run_copy.parent / "evaluation"
    argv = ["evaluate", "--run", str(run), "--data", str(synth_root), "--out", str(out)]
    if full == "out":
        argv += ["--cache", str(synth_cache)]
    before = tree(run)
    filler = fill(disk, 0)
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    written = run if full == "run" else out / "studies"
    assert f"{written}: no space left on the device while writing there" in err, err
    assert tree(run) == before, "no calibration.json is published without its report"
    assert not [p for p in out.rglob("*") if p.is_file()], "nothing of the evaluation is published"
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
    filler.unlink()
    assert main(argv) == 0
    assert (run / "calibration.json").is_file() and (out / "report.html").is_file()


def test_evaluate_on_a_disk_that_fills_at_the_report_keeps_the_previous_pair(
    small_disk, tiny_run, synth_root, tmp_path, capsys
):
    """metrics.json and report.html describe one evaluation: a disk that fills between them
    leaves both of the previous one."""
    disk, _ = small_disk
    out = disk / "evaluation"
    uniform = pd.read_csv(tiny_run / "oof.csv")
    uniform[["normal_mild", "moderate", "severe"]] = 1 / 3
    other = tmp_path / "uniform.csv"
    uniform.to_csv(other, index=False)
    argv = ["evaluate", "--data", str(synth_root), "--out", str(out)]
    assert main([*argv, "--pred", str(tiny_run / "oof.csv")]) == 0
    previous = tree(out)
    metrics_pages = pages(out) - -(-len(previous["report.html"]) // 4096) * 4096
    assert len(previous["report.html"]) > 2 * 4096, "the report must not fit in what is left"
    filler = fill(disk, metrics_pages + 4096)
    capsys.readouterr()
    assert main([*argv, "--pred", str(other)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{out}: no space left on the device while writing there" in err, err
    assert tree(out) == previous
    filler.unlink()
    assert main([*argv, "--pred", str(other)]) == 0
    assert str(other) in (out / "metrics.json").read_text()


@pytest.mark.parametrize("suffix", [".html", ".png"])
def test_show_on_a_full_disk_is_one_line_and_writes_nothing(
    small_disk, suffix, tiny_run, synth_root, synth_cache, capsys
):
    disk, _ = small_disk
    study = pd.read_csv(tiny_run / "folds.csv")["study_id"].iloc[0]
    argv = ["show", "--data", str(synth_root), "--cache", str(synth_cache), "--run", str(tiny_run)]
    argv += ["--study", str(study)]
    page = disk / f"study{suffix}"
    filler = fill(disk, 0)
    assert main([*argv, "--out", str(page)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{disk}: no space left on the device while writing there" in err, err
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    filler.unlink()
    assert main([*argv, "--out", str(page)]) == 0
    assert page.stat().st_size > 4096


def comparable(value: object) -> object:
    """A checkpoint's content as ``==`` compares it exactly: tensors and arrays (the RNG states)
    as dtype, shape and bytes; the seconds an epoch took (wall time) left out."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return str(value.dtype), value.shape, value.tobytes()
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    return value


def same_run(run: Path, clean: Path) -> None:
    """``run`` holds what ``clean`` holds: every file byte for byte, except what records wall
    time: last.pt (its history) compared tensor by tensor, metrics.csv without ``seconds``."""
    files = tree(run)
    assert sorted(files) == sorted(tree(clean))
    for name, data in tree(clean).items():
        if name.endswith("last.pt"):
            loaded = [comparable(load_checkpoint(folder / name)) for folder in (run, clean)]
            assert loaded[0] == loaded[1], name
        elif name.endswith("metrics.csv"):
            frames = [pd.read_csv(folder / name).drop(columns="seconds") for folder in (run, clean)]
            pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=True)
        else:
            assert files[name] == data, name


def test_train_on_a_disk_that_fills_mid_run_then_resumed_gives_the_clean_run(
    small_disk, tiny_run, synth_root, synth_cache, capsys
):
    disk, resize = small_disk
    resize(pages(tiny_run) // 2)
    out = disk / "run"
    argv = ["train", "--config", "tiny", "--data", str(synth_root), "--cache", str(synth_cache)]
    argv += ["--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{out}/" in err and "no space left on the device while writing there" in err, err
    assert list(out.glob("fold*/last.pt")), "the disk must fill mid-run, after a checkpoint"
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
    resize(4 * pages(tiny_run) + (1 << 20))
    assert main([*argv, "--resume"]) == 0
    same_run(out, tiny_run)
