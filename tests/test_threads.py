"""Torch threads are chosen from the CPUs a process may use, not torch's machine-wide default."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from lsdc.config import ConfigError, load_config
from lsdc.distributed import choose_threads, usable_cpus


def test_threads_are_the_usable_cpus_less_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(0, 0) == 8
    assert choose_threads(0, 3) == 5
    assert choose_threads(0, 8) == 1  # never 0: the training process needs one
    assert choose_threads(3, 6) == 3  # the config key wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share the 8 CPUs
    assert choose_threads(0, 1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own choice wins over the automatic one
    assert choose_threads(0, 1) == 2


def test_data_threads_is_a_checked_config_key() -> None:
    assert load_config("tiny").data.threads == 0
    assert load_config("tiny", ["data.threads=3"]).data.threads == 3
    with pytest.raises(ConfigError, match="data.threads"):
        load_config("tiny", ["data.threads=-1"])


def test_a_process_limited_by_taskset_trains_on_its_cpus_only() -> None:
    """Under ``taskset -c 0`` (one CPU of the machine) torch gets one thread, not one per core."""
    if not hasattr(os, "sched_setaffinity") or usable_cpus() < 2:
        pytest.skip("needs CPU affinity and two CPUs")
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "import torch; from lsdc.distributed import set_torch_threads;"
        "print(set_torch_threads(0, 0), torch.get_num_threads(), torch.get_num_interop_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"]


def test_train_threads_flag_is_the_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from lsdc import api, cli

    seen = {}
    monkeypatch.setattr(api, "train", lambda *a, **kw: seen.update(kw))
    argv = ["train", "--config", "tiny", "--data", "d", "--cache", "c", "--out", "o"]
    assert cli.main([*argv, "--threads", "3", "optim.epochs=1"]) == 0
    assert seen["overrides"] == ["optim.epochs=1", "data.threads=3"]


def test_importing_lsdc_bounds_openmp_spinning_unless_the_user_chose() -> None:
    code = "import os, lsdc; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1000", out.stderr
    env["GOMP_SPINCOUNT"] = "77"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "77", out.stderr


def test_predict_threads_flag_reaches_predict(monkeypatch: pytest.MonkeyPatch) -> None:
    from lsdc import api, cli

    seen = {}
    nothing = SimpleNamespace(
        report=pd.DataFrame({"source": []}),
        submission=[],
        submission_path="s",
        report_path="r",
        n_prior=0,
    )
    monkeypatch.setattr(api, "predict", lambda *a, **kw: seen.update(kw) or nothing)
    for argv, threads in ((["--threads", "3"], 3), ([], 0)):
        assert cli.main(["predict", "--data", "d", "--run", "r", *argv]) == 0
        assert seen["threads"] == threads


def test_worker_defaults_follow_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``taskset -c 0,1`` on a 64-core machine: synth and the demo start 2 processes, not 64."""
    from lsdc import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    parser = cli.build_parser()
    assert parser.parse_args(["synth", "--out", "o"]).workers == 2
    assert parser.parse_args(["demo"]).workers == 2
