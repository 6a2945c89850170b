"""benchmarks/gpu_check.py runs its whole chain on the CPU (tiny sizes) and ends with its JSON
line, so the GPU check cannot rot between the rare runs on a GPU; and its timing arithmetic is
right (checked on a fake clock, no real timing)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_timed_loader_splits_step_time_into_data_wait_and_the_rest(monkeypatch):
    gpu_check = _load_script()
    # epoch 1: asked 0, got 1, next asked 3 | got 3.5, asked 6 | got 6, asked 7 | (end)
    # epoch 2: asked 7, got 10 (workers starting), asked 11 | got 11, asked 12 | got 12.5, asked 13
    clock = iter([0.0, 1.0, 3.0, 3.5, 6.0, 6.0, 7.0, 7.0, 10.0, 11.0, 11.0, 12.0, 12.5, 13.0])
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: next(clock))
    times = gpu_check.LoaderTimes()
    batches = [{"study_id": [1, 2]}, {"study_id": [3, 4]}, {"study_id": [5]}]
    loader = gpu_check.TimedLoader(batches, times, cuda=False)
    assert len(loader) == 3
    for _epoch in range(2):
        for _batch in loader:
            pass
    assert times.first_step_s == 3.0  # the run's first step, kept apart
    assert times.steps == 5 and times.samples == 2 + 1 + 2 + 2 + 1
    assert times.step_s == pytest.approx(3.0 + 1.0 + 4.0 + 1.0 + 1.0)
    assert times.wait_s == pytest.approx(0.5 + 0.0 + 3.0 + 0.0 + 0.5)
    assert times.epoch_start_wait_s == pytest.approx(3.0)


def test_the_cpu_chain_runs_and_ends_with_its_json_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "work"), "--workers", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(done.stdout.strip().splitlines()[-6:-1])
    assert figures["ok"] is True and figures["device"].startswith("cpu")
    assert figures["config"] == "two_stage" and figures["amp"] == "bf16"
    for stage in ("train", "train_torchrun"):
        assert figures[f"{stage}_steps_timed"] >= 1
        assert figures[f"{stage}_samples_per_s"] > 0
        assert 0 <= figures[f"{stage}_data_wait_share"] <= 1
        assert figures[f"{stage}_peak_gpu_mem_mb"] is None  # CPU: no GPU figure is made up
    assert figures["train_ddp_backend"] is None
    assert figures["train_torchrun_ddp_backend"] == "gloo"  # one process, still DDP (CPU: gloo)
    assert (tmp_path / "work" / "run_train_torchrun" / "fold0" / "best.pt").is_file()
    assert figures["predict_studies"] == 2 and figures["predict_s_per_study"] > 0
    assert figures["predict_model_failures"] == 0
