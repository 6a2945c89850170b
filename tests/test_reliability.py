"""Nothing lost, nothing silent (docs/reliability.md): a cache one writer owns, workers that die
with their parent, runs that refuse before they write, predictions that fall back to the prior
only when asked, one-line errors for path problems, and the loaders the score trusts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lsdc.cli import _parse, main
from lsdc.config import ConfigError, load_config
from lsdc.contract import PRED_COLUMNS, load_train_labels
from lsdc.errors import UserError
from lsdc.inference.predict import predict_split
from lsdc.preprocessing.cache import CACHE_FORMAT, preprocess_split
from lsdc.preprocessing.cachedir import DERIVED_FORMAT
from lsdc.rundir import RunDir
from lsdc.training.engine import RUN_BUSY, check_run_dir
from lsdc.utils import reader_lock, write_json_atomic, writer_lock

torch.set_num_threads(1)

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


def tree(folder: Path) -> dict[str, bytes]:
    """Every file preprocess writes, with its bytes (derived grids, which training adds to a
    cache on first use, are not preprocess's)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(f"grid{DERIVED_FORMAT}-")
    }


def stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time: equal only if nothing was rewritten (the run's
    lock file is left out: it records who held it, a refused train included)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RunDir(folder).lock_name
    }


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def pid_gone(pid: int) -> bool:
    """The process has ended (it is absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder this process may not write into: mode 0o555, and for root (whom modes do not
    stop) ``os.access`` answering as it does for any other user."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).absolute().is_relative_to(folder):
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    yield folder
    folder.chmod(0o755)


# ------------------------------------------------------------------------------------ the cache
HELD_PREPROCESS = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import lsdc.preprocessing.cache as cache

    real_read, started, go = cache.read_series, Path(sys.argv[3]), Path(sys.argv[4])

    def read_after_go(*args, **kwargs):
        if not started.exists():
            started.touch()
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return real_read(*args, **kwargs)

    cache.read_series = read_after_go
    cache.preprocess_split(sys.argv[1], sys.argv[2], "train", progress=False)
    """
)


def test_a_second_preprocess_refuses_a_busy_cache_and_the_cache_ends_correct(
    synth_root, synth_cache, tmp_path, capsys
):
    """The issue's reproduction: a second run started while the first writes the same cache.
    The second refuses, naming the first's pid, and leaves the first's entry in the making
    alone; the first completes; a rerun finds nothing to redo; the cache is a clean one."""
    cache, started, go = tmp_path / "cache", tmp_path / "started", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", HELD_PREPROCESS, str(synth_root), str(cache), str(started), str(go)],
        env=CHILD_ENV,
    )
    try:
        wait_for(started.exists)
        argv = ["preprocess", "--data", str(synth_root), "--cache", str(cache), "--split", "train"]
        assert main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"another lsdc preprocess (pid {first.pid}) is writing this cache" in err
        assert list(cache.glob("*/.tmp-*")), "the first run's entry in the making was removed"
        go.touch()
        assert first.wait(timeout=120) == 0
    finally:
        go.touch()
        first.kill()
    assert main([*argv, "--quiet"]) == 0
    assert "broken cache entry" not in capsys.readouterr().err
    assert tree(cache) == tree(synth_cache)


def test_a_rerun_redoes_the_entries_whose_files_do_not_match_their_record(
    synth_root, synth_cache, tmp_path, caplog
):
    cache = tmp_path / "cache"
    shutil.copytree(synth_cache, cache)
    entries = sorted(p.parent for p in cache.glob("*/*/series.json"))
    (entries[0] / "0.npy").unlink()  # the damage: the record says ok, the array is gone
    truncated = entries[1] / "0.npy"
    truncated.write_bytes(truncated.read_bytes()[:-64])
    (entries[2] / "series.json").write_text("{")
    with caplog.at_level("WARNING", logger="lsdc"):
        preprocess_split(synth_root, cache, "train", progress=False)
    assert tree(cache) == tree(synth_cache)
    err = caplog.text
    assert err.count("broken cache entry") == 3
    assert f"{entries[0]}: broken cache entry (0.npy missing)" in err
    assert "0.npy has" in err and "series.json unreadable" in err


SLOW_WORKERS = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import lsdc.preprocessing.cache as cache

    def read_slowly(*args, **kwargs):
        (Path(os.environ["LSDC_TEST_MARKERS"]) / str(os.getpid())).touch()
        time.sleep(120)

    cache.read_series = read_slowly  # at import: spawned workers import this file too
    if __name__ == "__main__":
        cache.preprocess_split(sys.argv[1], sys.argv[2], "train", workers=2, progress=False)
    """
)


def test_kill_9_of_preprocess_leaves_no_worker_alive(synth_root, tmp_path):
    script, markers = tmp_path / "slow_workers.py", tmp_path / "markers"
    script.write_text(SLOW_WORKERS)
    markers.mkdir()
    parent = subprocess.Popen(
        [sys.executable, str(script), str(synth_root), str(tmp_path / "cache")],
        env={**CHILD_ENV, "LSDC_TEST_MARKERS": str(markers)},
    )
    workers: list[int] = []
    try:
        wait_for(lambda: len(list(markers.iterdir())) == 2)
        workers = [int(p.name) for p in markers.iterdir()]
        assert parent.pid not in workers
        parent.send_signal(signal.SIGKILL)
        assert parent.wait(timeout=30) == -signal.SIGKILL
        wait_for(lambda: all(pid_gone(pid) for pid in workers), timeout=20)
    finally:
        parent.kill()
        for pid in workers:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)


FAILING_WORKER = textwrap.dedent(
    """
    import multiprocessing, sys, time
    import lsdc.preprocessing.cache as cache

    real_read, first = cache.read_series, sys.argv[3]

    def fail_first_then_slow(folder, description=None):
        if folder.name == first:
            raise SystemExit("a worker's own death")  # escapes cache_series' except Exception
        time.sleep(0.3)
        return real_read(folder, description)

    cache.read_series = fail_first_then_slow  # at import: spawned workers import this file too
    if __name__ == "__main__":
        try:
            cache.preprocess_split(sys.argv[1], sys.argv[2], "train", workers=2, progress=False)
        except SystemExit as exc:
            print("raised:", exc, "children:", len(multiprocessing.active_children()))
    """
)


def test_a_failing_worker_cancels_the_rest_and_nothing_writes_after_it(synth_root, tmp_path):
    series = pd.read_csv(synth_root / "train_series_descriptions.csv")
    script, cache = tmp_path / "failing_worker.py", tmp_path / "cache"
    script.write_text(FAILING_WORKER)
    first = str(series["series_id"].iloc[0])
    done = subprocess.run(
        [sys.executable, str(script), str(synth_root), str(cache), first],
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "raised: a worker's own death children: 0"
    written = sorted(cache.glob("*/*/series.json"))
    assert len(written) < len(series) - 1, "the series not started were not cancelled"
    assert not list(cache.glob("*/.tmp-*"))
    assert (cache / "preprocess.lock").read_text() == ""


# ------------------------------------------------------------------------------------- training
@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def train_argv(synth_root: Path, synth_cache: Path, out: Path) -> list[str]:
    return [
        "train",
        "--config",
        "tiny",
        "--data",
        str(synth_root),
        "--cache",
        str(synth_cache),
        "--out",
        str(out),
        "--no-progress",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "fold0/last.pt exists: pass --resume"),
        (["--resume", "optim.lr=0.5"], "trained with other values of optim.lr;"),
        (
            ["--resume", "model.params.widths=[4,8,8,16]", "optim.lr=0.5"],
            "other values of model.params.widths, optim.lr;",
        ),
    ],
)
def test_a_refused_train_touches_no_file_of_the_run(
    run_copy, synth_root, synth_cache, capsys, extra, message
):
    before = stamps(run_copy)
    assert main([*train_argv(synth_root, synth_cache, run_copy), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert stamps(run_copy) == before


def test_a_new_fold_with_another_config_is_refused(run_copy, synth_root, synth_cache, capsys):
    shutil.rmtree(run_copy / "fold1")
    before = stamps(run_copy)
    argv = [*train_argv(synth_root, synth_cache, run_copy), "folds.fold=1", "optim.lr=0.5"]
    assert main(argv) == 2
    assert "other values of optim.lr" in capsys.readouterr().err
    assert stamps(run_copy) == before


def test_resume_may_change_the_resumable_keys(run_copy, synth_root, synth_cache):
    argv = [*train_argv(synth_root, synth_cache, run_copy), "--resume", "optim.epochs=3"]
    assert main(argv) == 0
    assert torch.load(run_copy / "fold0" / "last.pt", weights_only=False)["epoch"] == 2
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["optim"]["epochs"] == 3


def test_changed_training_labels_are_refused(run_copy, synth_root) -> None:
    labels = load_train_labels(synth_root / "train.csv")
    labels.iloc[0, 1:] = "Severe"
    with pytest.raises(UserError, match="differ"):
        check_run_dir(run_copy, load_config("tiny"), labels, resume=True, todo=[0, 1])


def hold_train_lock(run: Path):
    """The run's writer lock as a running ``lsdc train`` holds it (this process is the holder:
    ``flock`` locks of two opened files conflict within one process too)."""
    return writer_lock(run, RunDir(run).lock_name, "`out_dir`", RUN_BUSY)


@pytest.mark.parametrize("extra", [[], ["--resume"]])
def test_a_second_train_into_a_run_being_trained_refuses_naming_the_pid(
    run_copy, synth_root, synth_cache, capsys, extra
):
    before = stamps(run_copy)
    started = time.perf_counter()
    with hold_train_lock(run_copy):
        assert main([*train_argv(synth_root, synth_cache, run_copy), *extra]) == 2
    assert time.perf_counter() - started < 30, "the refusal must come before any training"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"another lsdc train (pid {os.getpid()}) is writing this run" in err
    assert stamps(run_copy) == before
    assert (run_copy / RunDir(run_copy).lock_name).read_text() == "", "emptied when freed"
    with reader_lock(run_copy, RunDir(run_copy).lock_name, "{pid}"):
        assert main([*train_argv(synth_root, synth_cache, run_copy), "--resume"]) == 2
    assert "or an lsdc export is reading it" in capsys.readouterr().err


def export_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--run", str(run), "--out", str(out), "--no-wheel", *extra]


def unfinish(fold: Path) -> None:
    """Make a fold's ``last.pt`` what a training killed after its first epoch leaves."""
    state = torch.load(fold / "last.pt", weights_only=False)
    state["finished"], state["epoch"] = False, 0
    torch.save(state, fold / "last.pt")


def test_export_refuses_an_unfinished_run_naming_the_fold(run_copy, tmp_path, capsys):
    unfinish(run_copy / "fold1")
    assert main(export_argv(run_copy, tmp_path / "a")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fold 1 is not finished" in err
    assert "fold1/last.pt: 1 epoch(s) done" in err and "--allow-unfinished" in err
    assert not (tmp_path / "a").exists()

    assert main(export_argv(run_copy, tmp_path / "b", "--allow-unfinished")) == 0
    assert [f.fold for f in RunDir(tmp_path / "b" / run_copy.name).fold_dirs()] == [0, 1]

    shutil.rmtree(run_copy / "fold1")
    assert main(export_argv(run_copy, tmp_path / "c")) == 2
    assert "fold 1 is not finished" in capsys.readouterr().err
    assert main(export_argv(run_copy, tmp_path / "d", "--allow-unfinished")) == 0
    assert [f.fold for f in RunDir(tmp_path / "d" / run_copy.name).fold_dirs()] == [0]


def test_export_refuses_a_run_being_trained_even_when_unfinished_is_allowed(
    run_copy, tmp_path, capsys
):
    with hold_train_lock(run_copy):
        for extra in ([], ["--allow-unfinished"]):
            assert main(export_argv(run_copy, tmp_path / "out", *extra)) == 2
            err = capsys.readouterr().err.strip()
            assert f"lsdc train (pid {os.getpid()}) is writing this run" in err
            assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert main(export_argv(run_copy, tmp_path / "out")) == 0


def test_a_diverged_loss_stops_training_with_epoch_step_and_value(
    synth_root, synth_cache, tmp_path, monkeypatch, capsys
):
    from lsdc.tasks.whole_study import WholeStudyTask

    real_loss, calls = WholeStudyTask.loss, []

    def nan_at_the_second_step(self, outputs, batch):
        calls.append(1)
        loss = real_loss(self, outputs, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(WholeStudyTask, "loss", nan_at_the_second_step)
    run = tmp_path / "run"
    overrides = ["folds.n_folds=3", "folds.fold=0", "optim.epochs=1"]  # 2 steps of 2 studies
    assert main([*train_argv(synth_root, synth_cache, run), *overrides]) == 2
    err = capsys.readouterr().err
    assert "fold 0 epoch 0 step 1: the training loss is nan; training diverged" in err
    assert not (run / "fold0" / "best.pt").exists()


# --------------------------------------------------------------------------------------- config
def test_numbers_in_e_notation_are_numbers_in_files_and_overrides(tmp_path) -> None:
    path = tmp_path / "lr.yaml"
    path.write_text("base: tiny.yaml\noptim:\n  lr: 1e-4\n  weight_decay: 5E-2\n")
    config = load_config(path)
    assert config.optim.lr == 1e-4 and config.optim.weight_decay == 0.05
    assert load_config("tiny", ["optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="'optim.epochs' must be an integer, got 1000.0"):
        load_config("tiny", ["optim.epochs=1e3"])


def test_overrides_stand_anywhere_among_the_flags() -> None:
    args = _parse(
        ["train", "--config", "tiny", "optim.epochs=1", "--no-progress", "folds.fold=0"]
        + ["--data", "D", "--cache", "C", "--out", "O"]
    )
    assert args.overrides == ["optim.epochs=1", "folds.fold=0"]
    assert args.no_progress and args.out == Path("O")
    with pytest.raises(SystemExit):
        _parse(["train", "--config", "tiny", "--data", "D", "--cache", "C", "--out", "O", "--nope"])


# -------------------------------------------------------------------------------------- predict
def break_predict(kind: str, tiny_run: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A run (a copy of tiny_run) and predict_split arguments with one tool failure."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    kwargs: dict = {}
    best = run / "fold1" / "best.pt"
    if kind == "truncated_fold":
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif kind == "mixed_folds":
        ckpt = torch.load(best, weights_only=False)
        ckpt["config"]["optim"]["lr"] = 0.5
        torch.save(ckpt, best)
    elif kind == "missing_device":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        kwargs["device"] = "cuda"
    elif kind == "zero_workers":
        kwargs["workers"] = 0
    elif kind == "train_cache":
        cache = tmp_path / "train_cache"
        write_json_atomic(
            {"format": CACHE_FORMAT, "split": "train", "spacing": None}, cache / "cache.json"
        )
        kwargs["cache_dir"] = cache
    return run, kwargs


TOOL_FAILURES = {
    "truncated_fold": "fold1/best.pt: not a readable checkpoint",
    "mixed_folds": r"its folds come from different configs .* differ in optim\.lr",
    "missing_device": "`device=cuda`: no CUDA device on this machine",
    "zero_workers": "`workers` must be at least 1, got 0",
    "train_cache": r"this cache was built with .*'split': 'train'",
}


@pytest.mark.parametrize("kind", list(TOOL_FAILURES))
def test_predict_refuses_a_tool_failure_before_writing(kind, tiny_run, synth_root, tmp_path):
    run, kwargs = break_predict(kind, tiny_run, tmp_path)
    out = tmp_path / "out" / "submission.csv"
    with pytest.raises(UserError, match=TOOL_FAILURES[kind]) as refused:
        predict_split(synth_root, [run], out, progress=False, **kwargs)
    assert str(refused.value).endswith("(`allow_fallback=True` writes the class prior instead)")
    assert not out.parent.exists()


@pytest.mark.parametrize("kind", list(TOOL_FAILURES))
def test_an_allowed_fallback_gives_the_prior_and_says_so(kind, tiny_run, synth_root, tmp_path):
    run, kwargs = break_predict(kind, tiny_run, tmp_path)
    out = tmp_path / "out" / "submission.csv"
    result = predict_split(synth_root, [run], out, progress=False, allow_fallback=True, **kwargs)
    prior = pd.read_csv(run / "class_prior.csv")[list(PRED_COLUMNS)].to_numpy()
    assert result.n_prior == 2 == len(result.report)
    assert result.report["message"].str.contains("fallback: ").all()
    submission = pd.read_csv(out)
    np.testing.assert_allclose(submission[list(PRED_COLUMNS)].to_numpy(), np.tile(prior, (2, 1)))


def test_cli_refusal_is_one_line_and_the_fallback_is_counted_last(
    tiny_run, synth_root, tmp_path, capsys
):
    argv = ["predict", "--data", str(synth_root), "--run", str(tiny_run), "--workers", "0"]
    argv += ["--out", str(tmp_path / "submission.csv"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--workers must be at least 1" in err
    assert main([*argv, "--allow-fallback"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"2 of 2 studies got the class prior; report: {tmp_path / 'predict_report.csv'}"


def test_a_study_folder_in_neither_csv_gets_a_report_line(tiny_run, synth_root, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    listed = next((root / "test_images").iterdir())
    shutil.copytree(listed, root / "test_images" / "999999")

    out = tmp_path / "submission.csv"
    with caplog.at_level("WARNING", logger="lsdc"):
        result = predict_split(root, [tiny_run], out, progress=False)
    report = pd.read_csv(tmp_path / "predict_report.csv").set_index("study_id")
    assert report.loc[999999, "source"] == "not_listed"
    assert (
        "in neither test_series_descriptions.csv nor sample_submission.csv"
        in (report.loc[999999, "message"])
    )
    assert not result.submission["row_id"].str.startswith("999999_").any()
    assert report.drop(index=999999)["source"].str.startswith("model").all()
    assert "999999: in neither" in caplog.text


# ---------------------------------------------------------------------------------- path errors
def test_path_problems_are_one_line_errors(
    synth_root, synth_cache, tiny_run, tmp_path, read_only, capsys
):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    root, split = str(synth_root), ["--split", "train"]
    predict = ["predict", "--data", root, "--run", str(tiny_run), "--quiet"]
    cases = [
        (train_argv(synth_root, synth_cache, a_file), "--out is a file, not a folder"),
        ([*predict, "--out", str(tmp_path)], "--out is a folder; give the path of a file"),
        ([*predict, "--cache", str(a_file)], "--cache is a file, not a folder"),
        (train_argv(synth_root, a_file, tmp_path / "new_run"), "--cache is a file, not a folder"),
        (
            train_argv(synth_root, tmp_path / "none", tmp_path / "new_run"),
            "--cache folder not found",
        ),
        (
            ["predict", "--data", root, "--run", str(a_file)],
            f"{a_file}: run is a file, not a folder",
        ),
        (["preprocess", "--data", root, "--cache", str(a_file), *split], "is a file, not a"),
        (
            ["preprocess", "--data", root, "--cache", str(read_only / "c"), *split],
            f"--cache cannot be written: {read_only} is read-only",
        ),
        (
            ["evaluate", "--pred", str(tiny_run / "oof.csv"), "--data", root]
            + ["--out", str(read_only / "evaluation")],
            "--out cannot be written",
        ),
    ]
    if not torch.cuda.is_available():
        out = tmp_path / "new_run"
        cases.append(([*train_argv(synth_root, synth_cache, out), "--device", "cuda"], "no CUDA"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "new_run").exists()


# ---------------------------------------------------------------------------------------- score
def test_score_refuses_a_malformed_row_id_and_a_nan_weight(synth_root, tmp_path, capsys):
    solution = pd.read_csv(synth_root / "solution_test.csv")
    submission = pd.read_csv(synth_root / "oracle_test.csv")
    paths = {name: tmp_path / f"{name}.csv" for name in ("sol", "sub", "bad_sub", "bad_sol")}
    solution.to_csv(paths["sol"], index=False)
    submission.to_csv(paths["sub"], index=False)
    extra = submission.iloc[:1].assign(row_id="12_spinal_canal_stenosis")
    pd.concat([submission, extra]).to_csv(paths["bad_sub"], index=False)
    solution.assign(sample_weight=solution["sample_weight"].where(solution.index != 3)).to_csv(
        paths["bad_sol"], index=False
    )

    def score(sol: str, sub: str) -> int:
        return main(["score", "--solution", str(paths[sol]), "--submission", str(paths[sub])])

    assert score("sol", "sub") == 0
    capsys.readouterr()
    assert score("sol", "bad_sub") == 2
    line = len(submission) + 2
    assert f"bad_sub.csv: row {line}: malformed row_id" in capsys.readouterr().err
    assert score("bad_sol", "sub") == 2
    assert "bad_sol.csv: row 5: sample_weight must be a finite number >= 0, got nan" in (
        capsys.readouterr().err
    )
