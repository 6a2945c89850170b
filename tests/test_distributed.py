"""`lsdc train` under torchrun with two CPU processes (gloo): the same code path as one process,
DistributedDataParallel, metrics reduced across ranks, files written by rank 0 only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsdc.contract import PRED_COLUMNS, labels_to_solution, load_train_labels


def test_two_process_run_matches_the_one_process_layout(
    synth_root: Path, synth_cache: Path, tiny_run: Path, tmp_path: Path
) -> None:
    if not shutil.which("torchrun", path=str(Path(sys.executable).parent)):
        pytest.skip("torchrun is not installed beside this Python")
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--standalone",  # a free local port: parallel CI jobs must not collide
        "-m",
        "lsdc.cli",
        "train",
        "--config",
        "tiny",
        "--data",
        str(synth_root),
        "--cache",
        str(synth_cache),
        "--out",
        str(run),
        "--no-progress",
    ]
    # a new session, so that a hang kills torchrun *and* its workers, not just torchrun
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("two-process training did not finish in 300 s")
    assert proc.returncode == 0, stderr[-3000:]

    labels = load_train_labels(synth_root / "train.csv")
    oof = pd.read_csv(run / "oof.csv")
    assert sorted(oof["row_id"]) == sorted(labels_to_solution(labels)["row_id"])
    assert np.allclose(oof[list(PRED_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == len(pd.read_csv(tiny_run / "metrics.csv"))
    assert metrics[["train_loss", "val_loss", "val_score"]].notna().all().all()
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "folds.csv"), pd.read_csv(tiny_run / "folds.csv")
    )
    leftovers = [p.name for p in run.rglob(".*.tmp")]
    assert not leftovers, f"half-written files left behind: {leftovers}"
