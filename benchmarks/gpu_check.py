"""The GPU path in one command: synth (or a real root) -> preprocess -> ``lsdc train`` -> the same
under ``torchrun --nproc_per_node 1`` (DDP over NCCL) -> ``lsdc predict`` on the test split.

For a person with one GPU::

    python benchmarks/gpu_check.py --out gpu_check_out             # synthetic studies
    python benchmarks/gpu_check.py --out gpu_check_out --data ROOT  # a real competition root

It trains ``--config`` (default ``two_stage``) with the config's own AMP, batch size and
DataLoader workers for about ``--steps`` optimiser steps on fold 0 (whole epochs: the step count
is rounded up to them), and prints, for each training run, samples/s, peak GPU memory and the
share of step time spent waiting for data, then ``lsdc predict`` seconds per study (DICOM to 25
rows, preprocessing included), and ends with one JSON line of every figure. Any stage that fails
ends the command with exit status 1 and a JSON line saying which stage it was.

Without CUDA (or with ``--device cpu``) it runs the same chain on the CPU at tiny sizes (32 px
studies, a tiny network): ``tests/test_gpu_check.py`` runs it that way so the script cannot rot.

Synthetic studies follow ``--profile`` (GPU default ``competition``: sizes drawn like the real
set, ~57 MB a study, stored twice as DICOM and cache, so ~12 GB at the GPU defaults; CPU default:
the test suite's 32 px studies).

How the figures are taken, from outside the engine: each ``lsdc`` verb runs in a child process
(``gpu_check.py --measure FILE -- VERB ARGS``) that wraps ``lsdc.datasets.loader.make_loader``
before the engine is imported. The wrapper times every training batch: *data wait* is the time
the loop spends inside the loader's ``next()``, *step time* the time from asking for one batch
to asking for the next (CUDA synchronised, so the GPU's work is in it); the part of the wait
spent on each epoch's first batch (DataLoader workers starting) is also given apart. The first
step of the run (CUDA context, cuDNN autotuning, the first workers) is left out of samples/s and
of the wait shares, and printed apart. Peak GPU memory is ``torch.cuda.max_memory_allocated``.
The training loaders also record the process group's backend: ``nccl`` (or ``gloo`` on the CPU)
under torchrun proves the DDP path ran, not a plain single-process one.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()

GPU_SIZES = {"studies": 96, "test_studies": 8, "steps": 40}
"""CUDA defaults: ~77 training studies in fold 0 (~9 steps per epoch at two_stage's batch of 8),
sized so that the whole check takes a few minutes on one H100/H200-class machine."""

CPU_SIZES = {"studies": 6, "test_studies": 2, "steps": 2}
"""CPU defaults: the tiny chain the test runs (seconds per stage on one core)."""

TINY_SYNTH = {"image_size": 32, "slices": 8}
"""Synthetic studies of the CPU chain (the test suite's size)."""

TINY_TRAIN = [
    "data.volume_size=[16, 32, 32]",
    "data.batch_size=2",
    "data.num_workers=1",
    "model.params.widths=[4, 8, 8, 8]",
    "model.params.layers=[1, 1, 1, 1]",
    "task_params.localizer.params.features=[4, 8, 8, 8, 8, 4]",
    "task_params.crop_size=16",
    "task_params.crop_slices=3",
    "folds.n_folds=2",
]
"""Overrides that shrink two_stage to the CPU chain; AMP, EMA and the rest stay the config's."""

SYNTH_PROFILE = "competition"
"""The synthetic profile of the GPU check: sizes drawn per study like the real set
(``lsdc.synth.config.PROFILES``; ``default`` draws the demo's small series)."""


# ---------------------------------------------------------------- child: one measured lsdc verb
@dataclasses.dataclass
class LoaderTimes:
    """Training batches seen by the timing wrapper; the run's first step is kept apart."""

    steps: int = 0
    samples: int = 0
    step_s: float = 0.0
    wait_s: float = 0.0
    epoch_start_wait_s: float = 0.0
    """Of ``wait_s``: the waits for each epoch's first batch (DataLoader workers starting)."""
    first_step_s: float | None = None
    backend: str | None = None
    """The process group's backend (nccl, gloo) when training ran under DDP, else None."""

    def add(self, samples: int, step_s: float, wait_s: float, epoch_start: bool) -> None:
        if self.first_step_s is None:
            self.first_step_s = step_s
            return
        self.steps += 1
        self.samples += samples
        self.step_s += step_s
        self.wait_s += wait_s
        if epoch_start:
            self.epoch_start_wait_s += wait_s


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "study_id" in batch:
        return len(batch["study_id"])
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
    return len(first)


class TimedLoader:
    """A training DataLoader whose batches are timed into ``times``; everything else delegates."""

    def __init__(self, loader: Any, times: LoaderTimes, cuda: bool) -> None:
        self.loader, self.times, self.cuda = loader, times, cuda

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        import torch

        asked = time.perf_counter()
        iterator = iter(self.loader)
        epoch_start = True
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            got = time.perf_counter()
            yield batch
            if self.cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.add(_batch_size(batch), now - asked, got - asked, epoch_start)
            asked, epoch_start = now, False


def _measure(out_json: Path, argv: list[str]) -> int:
    """Run ``lsdc VERB ARGS`` in this process with the training loader timed; rank 0 writes
    ``out_json``."""
    import torch

    import lsdc.datasets.loader as loader_module

    original = loader_module.make_loader
    signature = inspect.signature(original)
    times = LoaderTimes()
    cuda = "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda")

    def timed_make_loader(*args: Any, **kwargs: Any) -> Any:
        loader = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        if not bound.arguments["train"]:
            return loader
        if bound.arguments["ctx"].distributed:
            times.backend = torch.distributed.get_backend()
        return TimedLoader(loader, times, cuda)

    # Patched before lsdc.training is imported, so every `from ... import make_loader` gets it.
    loader_module.make_loader = timed_make_loader
    from lsdc.cli import main

    started = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - started
    if int(os.environ.get("RANK", "0")) == 0:
        figures = {
            "rc": rc,
            "wall_s": wall,
            **dataclasses.asdict(times),
            "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }
        out_json.write_text(json.dumps(figures) + "\n")
    return rc


# ------------------------------------------------------------------------------ parent: the chain
class StageFailed(Exception):
    """A stage of the chain exited non-zero."""


def _run_measured(name: str, argv: list[str], work: Path, torchrun: bool = False) -> dict:
    out_json = work / f"{name}.json"
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd = [*launcher, str(SCRIPT), "--measure", str(out_json), "--", *argv]
    print(f"\n== {name}: lsdc {' '.join(argv)}", flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not out_json.is_file():
        raise StageFailed(f"{name} exited with status {done.returncode}")
    return json.loads(out_json.read_text())


def _synth_config(train_studies: int, test_studies: int, profile: str, tiny: bool) -> Any:
    from lsdc.synth.config import SynthConfig

    counts = {"train_studies": train_studies, "test_studies": test_studies}
    if tiny and profile == "default":
        return SynthConfig(**counts, **TINY_SYNTH)
    return SynthConfig(**counts, profile=profile)


def _epochs_for(steps: int, data_root: Path, cache: Path, config: Any) -> tuple[int, int]:
    """(epochs, steps per epoch) of fold 0 that give about ``steps`` optimiser steps or more
    (fold 0 trains on (n_folds - 1) / n_folds of the cached labelled studies, give or take the
    stratification)."""
    from lsdc.contract import load_train_labels
    from lsdc.preprocessing.cache import read_cache_index

    cached = set(read_cache_index(cache)["study_id"])
    n_labelled = int(load_train_labels(data_root / "train.csv")["study_id"].isin(cached).sum())
    n_train = n_labelled * (config.folds.n_folds - 1) // config.folds.n_folds
    batch = config.data.batch_size
    per_epoch = n_train // batch if n_train > batch else 1
    if n_train == 0:
        raise StageFailed(f"fold 0 would train on no study ({n_labelled} labelled in the cache)")
    return math.ceil(steps / per_epoch), per_epoch


def _train_figures(times: dict) -> dict[str, float | None]:
    steps, step_s = times["steps"], times["step_s"]
    return {
        "steps_timed": steps,
        "ddp_backend": times["backend"],
        "samples_per_s": times["samples"] / step_s if step_s > 0 else None,
        "data_wait_share": times["wait_s"] / step_s if step_s > 0 else None,
        "epoch_start_wait_share": times["epoch_start_wait_s"] / step_s if step_s > 0 else None,
        "first_step_s": times["first_step_s"],
        "peak_gpu_mem_mb": times["peak_gpu_mem_mb"],
        "wall_s": times["wall_s"],
    }


def _check_predictions(run_name: str, report_path: Path) -> int:
    """Studies the model failed on (they fell back to the prior): predict hides a model failure
    behind the prior by design, so the check must look."""
    import pandas as pd

    report = pd.read_csv(report_path, keep_default_na=False)
    failed = report[(report["source"] == "prior") & report["message"].str.contains(f"{run_name}:")]
    for row in failed.itertuples():
        print(f"gpu_check: study {row.study_id}: the model failed: {row.message}", file=sys.stderr)
    return len(failed)


def run_chain(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in order; returns the figures (``ok`` False and ``failed`` at a failure)."""
    import torch

    from lsdc import api
    from lsdc.config import load_config
    from lsdc.contract import load_train_labels

    cuda = args.device == "cuda"
    sizes = GPU_SIZES if cuda else CPU_SIZES
    studies = args.studies or sizes["studies"]
    test_studies = args.test_studies or sizes["test_studies"]
    steps = args.steps or sizes["steps"]
    overrides = ([] if cuda else TINY_TRAIN) + list(args.overrides)
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "ok": False,
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "config": args.config,
        "overrides": overrides,
    }
    stage = "synth"
    try:
        started = time.perf_counter()
        if args.data is None:
            profile = args.profile or (SYNTH_PROFILE if cuda else "default")
            synth = _synth_config(studies, test_studies, profile, tiny=not cuda)
            print(f"== synth: {synth}", flush=True)
            root = api.synthesize(work / "data", synth, workers=args.workers, progress=False)
            figures["data"] = f"synthetic {synth.train_studies}+{synth.test_studies} studies"
        else:
            root = args.data
            figures["data"] = str(root)
        figures["synth_s"] = time.perf_counter() - started

        stage = "preprocess"
        started = time.perf_counter()
        cache = work / "cache_train"
        ids = load_train_labels(root / "train.csv")["study_id"].tolist()[:studies]
        from lsdc.preprocessing.cache import preprocess_split

        print(f"\n== preprocess: {len(ids)} train studies", flush=True)
        preprocess_split(root, cache, "train", workers=args.workers, study_ids=ids, progress=False)
        figures["preprocess_s"] = time.perf_counter() - started
        figures["train_studies"] = len(ids)

        config = load_config(args.config, [*overrides, "folds.fold=0"])
        epochs, per_epoch = _epochs_for(steps, root, cache, config)
        figures |= {
            "amp": config.optim.amp,
            "batch_size": config.data.batch_size,
            "num_workers": config.data.num_workers,
            "epochs": epochs,
            "steps_per_epoch": per_epoch,
        }
        common = ["--config", args.config, "--data", str(root), "--cache", str(cache)]
        common += ["--device", args.device, "--no-progress", *overrides, "folds.fold=0"]
        common += [f"optim.epochs={epochs}", "optim.patience=0"]
        for stage, torchrun in (("train", False), ("train_torchrun", True)):
            out = ["--out", str(work / f"run_{stage}")]
            times = _run_measured(stage, ["train", *common, *out], work, torchrun=torchrun)
            for key, value in _train_figures(times).items():
                figures[f"{stage}_{key}"] = value

        stage = "predict"
        run = work / "run_train"
        submission = work / "submission.csv"
        argv = ["predict", "--data", str(root), "--run", str(run), "--out", str(submission)]
        argv += ["--workers", str(args.workers), "--device", args.device, "--quiet"]
        times = _run_measured(stage, argv, work)
        n_test = len(submission.read_text().splitlines()) // 25  # header + 25 rows a study
        figures["predict_studies"] = n_test
        figures["predict_s_per_study"] = times["wall_s"] / max(n_test, 1)
        figures["predict_peak_gpu_mem_mb"] = times["peak_gpu_mem_mb"]
        failed = _check_predictions(run.name, submission.parent / "predict_report.csv")
        figures["predict_model_failures"] = failed
        if failed:
            raise StageFailed(f"the model failed on {failed} test studies (see above)")
        figures["ok"] = True
    except StageFailed as exc:
        figures["failed"] = f"{stage}: {exc}"
    except Exception as exc:  # noqa: BLE001 - the JSON line must say where the chain broke
        traceback.print_exc()
        figures["failed"] = f"{stage}: {type(exc).__name__}: {exc}"
    return figures


def _print_summary(f: dict[str, Any]) -> None:
    def fmt(value: Any, unit: str = "", digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}{unit}"

    print(f"\ngpu_check on {f['device']} (torch {f['torch']}, CUDA {f['cuda']})")
    print(f"  data: {f.get('data')}; config {f['config']} amp={f.get('amp')} ", end="")
    print(f"batch={f.get('batch_size')} workers={f.get('num_workers')}")
    for stage in ("train", "train_torchrun"):
        if f"{stage}_samples_per_s" not in f:
            continue
        print(
            f"  {stage:15s} {fmt(f[f'{stage}_samples_per_s'], ' samples/s')}, "
            f"data wait {fmt(100 * (f[f'{stage}_data_wait_share'] or 0), ' %', 1)} of step time "
            f"({fmt(100 * (f[f'{stage}_epoch_start_wait_share'] or 0), ' %', 1)} at epoch "
            "starts), "
            f"peak GPU memory {fmt(f[f'{stage}_peak_gpu_mem_mb'], ' MiB', 0)}, "
            f"first step {fmt(f[f'{stage}_first_step_s'], ' s')} "
            f"({f[f'{stage}_steps_timed']} steps timed; DDP: {f[f'{stage}_ddp_backend'] or 'no'})"
        )
    if "predict_s_per_study" in f:
        print(
            f"  predict         {fmt(f['predict_s_per_study'], ' s/study')} over "
            f"{f['predict_studies']} test studies (DICOM to rows, preprocessing included)"
        )
    if not f["ok"]:
        print(f"  FAILED at {f.get('failed')}")
    print(json.dumps(f))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--measure"]:  # the child side: gpu_check.py --measure FILE -- VERB ARGS
        return _measure(Path(argv[1]), argv[3:])
    from lsdc.synth.config import PROFILES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="work folder")
    parser.add_argument("--data", type=Path, help="a real competition root (default: synthesise)")
    parser.add_argument(
        "--config",
        default="two_stage",
        help="training config (default two_stage; the CPU chain's tiny overrides are two_stage's)",
    )
    parser.add_argument(
        "--profile",
        choices=list(PROFILES),
        help="synthetic size profile (lsdc synth --profile; default: competition on the GPU, "
        "the tests' 32 px studies on the CPU)",
    )
    parser.add_argument("--studies", type=int, help="train studies (GPU 96, CPU 6)")
    parser.add_argument("--test-studies", type=int, help="synthetic test studies (GPU 8, CPU 2)")
    parser.add_argument("--steps", type=int, help="optimiser steps at least (GPU 40, CPU 2)")
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu: the tiny chain"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="synth/preprocess processes"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides")
    args = parser.parse_args(argv)
    if args.out.is_dir() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty; pick a new folder")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = run_chain(args)
    _print_summary(figures)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
