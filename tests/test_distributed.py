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


_REDUCTION_SCRIPT = """
import sys
from pathlib import Path

import numpy as np
import torch

from lsdc.config import load_config
from lsdc.contract import load_train_labels
from lsdc.distributed import init_distributed, shutdown_distributed
from lsdc.tasks import create_task, make_loader, predict_loader

data, cache, out = map(Path, sys.argv[1:4])
ctx = init_distributed("cpu")
config = load_config("tiny", ["data.batch_size=1"])  # per-sample losses: sums comparable
task = create_task(config, cache, data)
ids = np.sort(load_train_labels(data / "train.csv")["study_id"].to_numpy())[:5]
state = task.fit_state(ids)
torch.manual_seed(0)
model = task.build_model(state)
dataset = task.build_dataset(ids, state, train=False)
loader = make_loader(dataset, config, ctx, train=False)
studies, probs, loss_sum, count = predict_loader(task, model, loader, ctx, "none")
if ctx.is_primary:
    np.savez(out, studies=studies, probs=probs, loss=[loss_sum, count])
shutdown_distributed()
"""


def test_two_process_validation_equals_the_one_process_reference(
    synth_root: Path, synth_cache: Path, tmp_path: Path
) -> None:
    """The cross-rank reduction of validation (gathered probabilities, summed loss and count) on
    five studies split over two ranks equals one process over the same five studies."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed beside this Python")
    script = tmp_path / "reduce.py"
    script.write_text(_REDUCTION_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"reduced{nproc}.npz"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(nproc), str(script)]
        cmd += [str(synth_root), str(synth_cache), str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[nproc] = np.load(out)
    one, two = outputs[1], outputs[2]
    assert len(one["studies"]) == 5
    np.testing.assert_array_equal(one["studies"], two["studies"])
    np.testing.assert_allclose(one["probs"], two["probs"], atol=1e-5)
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-5)
