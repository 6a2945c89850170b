"""Full-size rehearsal: the real pipeline on competition-sized synthetic studies, measured at
N = 25, 50 and 100 studies and extrapolated to the real training set's 1,975.

    python benchmarks/scale.py [--sizes 25 50 100] [--steps 2] [--batch-size 2] [--work DIR]
        [--gpu-rates 10 25 50 100] [--cores 8 16]

One run does, in order:

1. ``lsdc synth --profile competition``: max(sizes) train + ``--test-studies`` test studies,
   once (kept in ``--work`` and reused by a later run with the same counts and seed).
2. For each N (the first N studies of train.csv, served through a view folder of links):
   ``lsdc preprocess`` with 1 and with 2 workers (slices/s, s/study, CPU s/study, cache bytes
   against DICOM bytes), and pydicom's bare ``dcmread(f).pixel_array`` on the files of the
   smallest N (the per-worker limit the 1-worker figure is compared with).
3. For each N: ``lsdc train --config two_stage`` on CPU with ``data.cache_in_memory=false``, one
   epoch capped at ``--steps`` optimiser steps (the benchmark wraps the engine's loader; nothing
   else changes) and a validation fold of about ``--val-studies`` studies, so that the work is
   the same at every N: the training process's peak RSS must not grow with N (its loader
   workers are forked from it, so their RSS counts its pages again; step 4 measures them alone).
4. At the largest N, the loader alone (the two-stage training dataset through the engine's
   DataLoader): a first pass over every study (it writes the localizer grids into the cache),
   then ``num_workers`` 0, 1 and 2 over ``--loader-batches`` batches, against the model step alone
   (random batches of the same shapes): samples/s, and the loader's memory after the pass.
5. ``lsdc predict`` of the test studies with the largest N's run: seconds per study.
6. The extrapolation to 1,975 studies: preprocess CPU minutes on ``--cores``, cache GB, RAM, the
   loader workers a GPU stepping K samples/s needs (K = ``--gpu-rates``, until measured).

Prints the tables and writes them to ``--work``/scale.md and scale.json. Each step runs in its own
process, so each peak RSS is that step's alone. ``--sizes 3 5 --steps 1 --batch-size 1
--val-studies 3 --test-studies 1 --loader-batches 2 --model-steps 1`` checks the script end to end
in about two minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

REAL_STUDIES = 1975
"""Studies of the real training set (docs/results.md extrapolates to it)."""
TRAIN_SHARE = 0.8
"""Share of the studies a fold trains on (5 folds)."""


# ----------------------------------------------------------------------------------- helpers
def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def memory_mb() -> dict[str, float]:
    """This process's resident memory now: anonymous (its own data) and file-backed (pages of
    mapped files, the page cache's, which the kernel can drop), MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def in_child(target: Callable[..., dict[str, Any]], *args: Any, log: Path) -> dict[str, Any]:
    """Run ``target(*args)`` in a fresh (spawned) process whose output goes to ``log``; return
    its result plus its peak RSS and that of its reaped children (loader workers), MB."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(
        target=_child_main, args=(target, args, str(log), queue, mp.get_start_method())
    )
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: still working, unless it died without a word
            if not process.is_alive():
                raise RuntimeError(
                    f"{target.__name__} died (exit code {process.exitcode}); see {log}"
                ) from None
    process.join()
    if "error" in result:
        raise RuntimeError(f"{target.__name__} failed: {result['error']} (see {log})")
    return result


def _child_main(
    target: Callable[..., dict[str, Any]], args: tuple, log: str, queue: Any, start_method: str
) -> None:
    # A spawned child defaults to spawning its own children; the loader workers of the measured
    # code must start as they do when it runs from the command line (fork, on Linux).
    mp.set_start_method(start_method, force=True)
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        sys.stdout = sys.stderr = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        try:
            result = target(*args)
        except BaseException as exc:  # reported to the parent, which stops
            import traceback

            traceback.print_exc()
            queue.put({"error": f"{type(exc).__name__}: {exc}"})
            return
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        queue.put({**result, "peak_rss_mb": own, "workers_peak_rss_mb": children})


def make_view(root: Path, view: Path, n: int) -> None:
    """A competition root holding the first ``n`` training studies of ``root`` (CSV rows
    filtered, image folders linked) and all of its test split."""
    if (view / "train.csv").is_file():
        return
    tmp = view.with_name(view.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train_images").mkdir(parents=True)
    labels = pd.read_csv(root / "train.csv")
    keep = labels["study_id"].iloc[:n]
    labels.iloc[:n].to_csv(tmp / "train.csv", index=False)
    for name in ("train_label_coordinates.csv", "train_series_descriptions.csv"):
        table = pd.read_csv(root / name)
        table[table["study_id"].isin(keep)].to_csv(tmp / name, index=False)
    for study in keep:
        (tmp / "train_images" / str(study)).symlink_to(root / "train_images" / str(study))
    for name in ("test_series_descriptions.csv", "sample_submission.csv"):
        shutil.copy(root / name, tmp / name)
    (tmp / "test_images").symlink_to(root / "test_images")
    tmp.rename(view)


# ---------------------------------------------------------------------------- child targets
def synth_root(root: str, train: int, test: int, seed: int, workers: int) -> dict[str, Any]:
    import lsdc

    started, cpu = time.perf_counter(), cpu_seconds()
    lsdc.synthesize(
        root, train_studies=train, test_studies=test, seed=seed, profile="competition",
        workers=workers, progress=False,
    )  # fmt: skip
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu}


def decode_files(files: list[str]) -> dict[str, Any]:
    import pydicom

    for f in files:  # page cache: decoding is what is timed, not the disk
        Path(f).read_bytes()
    pydicom.dcmread(files[0]).pixel_array  # noqa: B018 (imports its pixel handlers: untimed)
    started, cpu = time.perf_counter(), cpu_seconds()
    for f in files:
        pydicom.dcmread(f).pixel_array  # noqa: B018
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu}


def preprocess(view: str, cache: str, split: str, workers: int) -> dict[str, Any]:
    import pydicom

    from lsdc.preprocessing.cache import preprocess_split

    files = sorted(Path(view, f"{split}_images").glob("*/*/*.dcm"))
    for f in files:  # page cache, as for decode_files
        f.read_bytes()
    pydicom.dcmread(files[0]).pixel_array  # noqa: B018 (imports its pixel handlers: untimed)
    started, cpu = time.perf_counter(), cpu_seconds()
    preprocess_split(view, cache, split, workers=workers, progress=False)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu}


class _FirstBatches:
    """The first ``steps`` batches of a loader (an epoch capped at a fixed number of steps)."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __iter__(self) -> Any:
        import itertools

        return itertools.islice(iter(self.loader), len(self))


def capped_train(argv: list[str], steps: int) -> dict[str, Any]:
    """``lsdc train`` (``argv``) with every training epoch cut to ``steps`` batches."""
    import lsdc.training.engine as engine
    from lsdc.cli import main

    full_loader = engine.make_loader

    def make_loader(dataset: Any, config: Any, ctx: Any, train: bool, *rest: Any) -> Any:
        loader = full_loader(dataset, config, ctx, train, *rest)
        return _FirstBatches(loader, steps) if train else loader

    engine.make_loader = make_loader
    started = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"lsdc train exited with {code}")
    return {"seconds": time.perf_counter() - started}


def _two_stage_task(view: str, cache: str, overrides: list[str]) -> Any:
    from lsdc.config import load_config
    from lsdc.tasks.base import create_task

    config = load_config("two_stage", ["data.cache_in_memory=false", *overrides])
    return create_task(config, Path(cache), Path(view))


def time_loader(
    view: str, cache: str, batch_size: int, workers: int, batches: int | None
) -> dict[str, Any]:
    """Samples/s of the two-stage training loader (``batches`` None: one whole pass, timed from
    the start; else ``batches`` batches after each worker's first, so start-up is left out)."""
    import numpy as np
    import torch

    from lsdc.datasets.loader import make_loader
    from lsdc.distributed import DistContext

    torch.set_num_threads(1)
    task = _two_stage_task(
        view, cache, [f"data.batch_size={batch_size}", f"data.num_workers={workers}"]
    )
    ids = task.training_labels()["study_id"].to_numpy()
    task.labelled_points()
    dataset = task.build_dataset(np.asarray(ids), {}, train=True)
    loader = make_loader(dataset, task.config, DistContext(0, 1, torch.device("cpu")), True)
    skip = 0 if batches is None else max(1, workers)  # each worker's first batch: start-up
    samples, started = 0, time.perf_counter()
    for k, batch in enumerate(loader):
        if k < skip:
            started = time.perf_counter()
            continue
        samples += len(batch["study_id"])
        if batches is not None and k >= skip + batches - 1:
            break
    seconds = time.perf_counter() - started
    return {"samples": samples, "seconds": seconds, "rate": samples / seconds, **memory_mb()}


def time_model(view: str, cache: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Samples/s of two_stage.yaml's model alone: forward, loss, backward and AdamW step on
    random batches shaped like the loader's, with the config's AMP, on CPU."""
    import torch

    from lsdc.tasks.predict_loop import autocast_context

    task = _two_stage_task(view, cache, [f"data.batch_size={batch_size}"])
    model = task.build_model({})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grid, p, b = task.grid, task.params, batch_size
    batch = {
        "study_id": torch.arange(b),
        "volumes": torch.randn(b, 3, 1, *grid),
        "volume_present": torch.ones(b, 3, dtype=torch.bool),
        "point_targets": torch.rand(b, 3, 25, 3) * (torch.tensor(grid) - 1),
        "point_mask": torch.ones(b, 3, 25, dtype=torch.bool),
        "crops": torch.randn(b, 25, p.crop_slices, p.crop_size, p.crop_size),
        "target": torch.randint(0, 3, (b, 25)),
    }

    def step() -> None:
        with autocast_context(task.config.optim.amp, torch.device("cpu")):
            loss = task.loss(task.forward(model, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    return {
        "samples": steps * b,
        "seconds": seconds,
        "rate": steps * b / seconds,
        "threads": torch.get_num_threads(),
        "amp": task.config.optim.amp,
        "parameters_m": sum(q.numel() for q in model.parameters()) / 1e6,
    }


def run_cli(argv: list[str]) -> dict[str, Any]:
    from lsdc.cli import main

    started = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"lsdc {argv[0]} exited with {code}")
    return {"seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------- report
def markdown(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A markdown table of ``rows``: ``columns`` maps each key to its header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--test-studies", type=int, default=4, help="studies lsdc predict serves")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps of each train run")
    parser.add_argument("--batch-size", type=int, default=2, help="two_stage batch on CPU")
    parser.add_argument(
        "--val-studies", type=int, default=4, help="about this many studies validate each run"
    )
    parser.add_argument("--train-workers", type=int, default=2, help="loader workers of train")
    parser.add_argument("--loader-batches", type=int, default=4, help="batches per loader rate")
    parser.add_argument("--model-steps", type=int, default=2, help="timed model-alone steps")
    parser.add_argument("--gpu-rates", type=float, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--cores", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lsdc-scale"))
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    started = time.perf_counter()
    load = [os.getloadavg()[0]]
    print(f"work folder {work}; {os.cpu_count()} CPUs; load average {load[0]:.2f}")

    def note(message: str) -> None:
        load.append(os.getloadavg()[0])
        print(
            f"[{time.perf_counter() - started:6.0f} s, load {load[-1]:.1f}] {message}", flush=True
        )

    # 1. synth (once)
    root = work / "root"
    marker = work / "root.json"
    wanted = {"train": max(sizes), "test": args.test_studies, "seed": args.seed}
    synth: dict[str, Any] = {}
    if not (marker.is_file() and json.loads(marker.read_text()).get("wanted") == wanted):
        shutil.rmtree(work, ignore_errors=True)
        logs.mkdir(parents=True)
        workers = os.cpu_count() or 1
        synth = in_child(
            synth_root, str(root), max(sizes), args.test_studies, args.seed, workers,
            log=logs / "synth.log",
        )  # fmt: skip
        n_all = max(sizes) + args.test_studies
        synth |= {"studies": n_all, "workers": workers}
        marker.write_text(json.dumps({"wanted": wanted, "synth": synth}))
    synth = json.loads(marker.read_text())["synth"]
    note(
        f"synth: {synth['studies']} studies in {synth['seconds']:.0f} s with {synth['workers']} "
        f"workers ({synth['cpu_seconds'] / synth['studies']:.2f} CPU s/study)"
    )

    # 2. preprocess, and bare decoding on the smallest N
    rows: list[dict[str, Any]] = []
    for n in sizes:
        view = work / f"n{n}" / "root"
        make_view(root, view, n)
        files = sorted((view / "train_images").glob("*/*/*.dcm"))
        dicom_bytes = sum(f.stat().st_size for f in files)
        row: dict[str, Any] = {"N": n, "slices": len(files), "dicom_mb_per_study": 0.0}
        row["dicom_mb_per_study"] = dicom_bytes / n / 2**20
        for workers in (1, 2):
            cache = work / f"n{n}" / f"cache_w{workers}"
            shutil.rmtree(cache, ignore_errors=True)
            result = in_child(
                preprocess, str(view), str(cache), "train", workers,
                log=logs / f"preprocess_n{n}_w{workers}.log",
            )  # fmt: skip
            row[f"pre{workers}_slices_s"] = len(files) / result["seconds"]
            row[f"pre{workers}_s_study"] = result["seconds"] / n
            row[f"pre{workers}_cpu_s_study"] = result["cpu_seconds"] / n
        row["cache_mb_per_study"] = folder_bytes(cache) / n / 2**20
        shutil.rmtree(work / f"n{n}" / "cache_w1")
        rows.append(row)
        note(
            f"N={n}: preprocess {row['pre1_slices_s']:.0f} slices/s (1 worker), "
            f"{row['pre2_slices_s']:.0f} (2 workers)"
        )
    smallest = work / f"n{sizes[0]}" / "root"
    decode = in_child(
        decode_files, [str(f) for f in sorted((smallest / "train_images").glob("*/*/*.dcm"))],
        log=logs / "decode.log",
    )  # fmt: skip
    decode["slices"] = rows[0]["slices"]
    decode["slices_s"] = decode["slices"] / decode["seconds"]
    decode["slices_cpu_s"] = decode["slices"] / decode["cpu_seconds"]
    first = rows[0]
    decode["preprocess_share"] = first["pre1_slices_s"] / decode["slices_s"]
    decode["preprocess_share_cpu"] = (
        first["slices"] / (first["pre1_cpu_s_study"] * first["N"]) / decode["slices_cpu_s"]
    )
    note(
        f"bare dcmread().pixel_array: {decode['slices_s']:.0f} slices/s; preprocess (1 worker) is "
        f"{decode['preprocess_share']:.0%} of it ({decode['preprocess_share_cpu']:.0%} by CPU)"
    )

    # 3. train: fixed work at every N
    for row in rows:
        n = row["N"]
        view, cache = work / f"n{n}" / "root", work / f"n{n}" / "cache_w2"
        run = work / f"n{n}" / "run"
        shutil.rmtree(run, ignore_errors=True)
        n_folds = max(2, round(n / args.val_studies))
        argv = [
            "train", "--config", "two_stage", "--data", str(view), "--cache", str(cache),
            "--out", str(run), "--device", "cpu", "--no-progress",
            "data.cache_in_memory=false", f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.train_workers}", "optim.epochs=1",
            f"folds.n_folds={n_folds}", "folds.fold=0",
        ]  # fmt: skip
        result = in_child(capped_train, argv, args.steps, log=logs / f"train_n{n}.log")
        row["train_s"] = result["seconds"]
        row["train_rss_mb"] = result["peak_rss_mb"]
        row["val_studies"] = len(pd.read_csv(run / "folds.csv").query("fold == 0"))
        note(
            f"N={n}: train {args.steps} steps x {args.batch_size} + {row['val_studies']} "
            f"validation studies in {row['train_s']:.0f} s, peak RSS {row['train_rss_mb']:.0f} MB"
        )

    # 4. loader alone vs model alone, at the largest N
    n = sizes[-1]
    view, cache = work / f"n{n}" / "root", work / f"n{n}" / "cache_w2"
    for grid_file in cache.glob("*/grid*.npz"):
        grid_file.unlink()  # the first pass below pays for every study's grids
    batch = max(1, min(8, n // (args.loader_batches + 2)))  # enough batches in one epoch
    loader: dict[str, Any] = {"N": n, "batch_size": batch}
    first_pass = in_child(
        time_loader, str(view), str(cache), batch, 2, None, log=logs / "loader_first.log"
    )
    loader["first_pass_rate_2w"] = first_pass["rate"]
    loader["first_pass_workers_rss_mb"] = first_pass["workers_peak_rss_mb"]
    loader["grid_mb_per_study"] = folder_bytes(cache, "grid*.npz") / n / 2**20
    for workers in (0, 1, 2):
        result = in_child(
            time_loader, str(view), str(cache), batch, workers, args.loader_batches,
            log=logs / f"loader_w{workers}.log",
        )  # fmt: skip
        loader[f"rate_{workers}w"] = result["rate"]
        if workers == 0:  # the loading process itself, after its batches
            loader["rss_anon_mb"], loader["rss_file_mb"] = result["RssAnon"], result["RssFile"]
        loader[f"workers_rss_mb_{workers}w"] = result["workers_peak_rss_mb"]
    model = in_child(
        time_model, str(view), str(cache), args.batch_size, args.model_steps,
        log=logs / "model.log",
    )  # fmt: skip
    loader["model_rate"] = model["rate"]
    loader["model_rss_mb"] = model["peak_rss_mb"]
    loader["ratio_2w"] = loader["rate_2w"] / model["rate"]
    note(
        f"loader {loader['rate_0w']:.2f} / {loader['rate_1w']:.2f} / {loader['rate_2w']:.2f} "
        f"samples/s at 0/1/2 workers (first pass {loader['first_pass_rate_2w']:.2f}); model "
        f"{model['rate']:.3f} samples/s ({model['threads']} threads, amp {model['amp']}); "
        f"ratio {loader['ratio_2w']:.0f}x"
    )

    # 5. predict the test studies with the largest N's run
    test_cache = work / "test_cache"
    shutil.rmtree(test_cache, ignore_errors=True)
    test_pre = in_child(
        preprocess, str(view), str(test_cache), "test", 1, log=logs / "preprocess_test.log"
    )
    predict = in_child(
        run_cli,
        ["predict", "--data", str(view), "--run", str(work / f"n{n}" / "run"),
         "--out", str(work / "submission.csv"), "--cache", str(test_cache), "--device", "cpu",
         "--quiet"],
        log=logs / "predict.log",
    )  # fmt: skip
    predict["studies"] = args.test_studies
    predict["s_study"] = predict["seconds"] / args.test_studies
    predict["preprocess_s_study"] = test_pre["seconds"] / args.test_studies
    note(
        f"predict: {predict['seconds']:.0f} s for {args.test_studies} studies "
        f"({predict['s_study']:.1f} s/study after preprocessing)"
    )

    # 6. extrapolation to the real training set
    largest = rows[-1]
    extrapolation = {
        "studies": REAL_STUDIES,
        "cache_gb": (largest["cache_mb_per_study"] + loader["grid_mb_per_study"])
        * REAL_STUDIES
        / 1024,
        "dicom_gb": largest["dicom_mb_per_study"] * REAL_STUDIES / 1024,
        "train_ram_gb_8_workers": (largest["train_rss_mb"] + 8 * loader["workers_rss_mb_1w"])
        / 1024,
        "preprocess_minutes": {
            str(c): largest["pre1_cpu_s_study"] * REAL_STUDIES / c / 60 for c in args.cores
        },
    }
    per_worker = loader["rate_1w"]
    first_per_worker = loader["first_pass_rate_2w"] / 2
    feeding = [
        {
            "K": k,
            "per_worker_8": k / 8,
            "workers": math.ceil(k / per_worker),
            "workers_first_epoch": math.ceil(k / first_per_worker),
            "epoch_min": REAL_STUDIES * TRAIN_SHARE / k / 60,
        }
        for k in args.gpu_rates
    ]
    extrapolation["feeding"] = feeding

    # report
    load_range = f"{min(load):.1f}-{max(load):.1f}"
    text = [
        f"# Scale rehearsal ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load "
        f"average {load_range}, {time.perf_counter() - started:.0f} s)",
        "",
        "```",
        "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Synth (competition profile): {synth['studies']} studies, "
        f"{synth['cpu_seconds'] / synth['studies']:.2f} CPU s/study "
        f"({synth['seconds']:.0f} s wall, {synth['workers']} workers).",
        "",
        markdown(
            rows,
            {
                "N": "N",
                "slices": "slices",
                "dicom_mb_per_study": "DICOM MB/study",
                "cache_mb_per_study": "cache MB/study",
                "pre1_slices_s": "preprocess 1 w slices/s",
                "pre1_s_study": "1 w s/study",
                "pre1_cpu_s_study": "1 w CPU s/study",
                "pre2_slices_s": "2 w slices/s",
                "pre2_s_study": "2 w s/study",
                "train_s": "train s",
                "val_studies": "val studies",
                "train_rss_mb": "train peak RSS MB",
            },
        ),
        "",
        f"Bare `dcmread(f).pixel_array` on the {decode['slices']} files of N={sizes[0]}: "
        f"{decode['slices_s']:.0f} slices/s ({decode['slices_cpu_s']:.0f} per CPU s); preprocess "
        f"with 1 worker runs at {decode['preprocess_share']:.0%} of it "
        f"({decode['preprocess_share_cpu']:.0%} by CPU time; target >= 50%).",
        "",
        f"Train: `lsdc train --config two_stage` on CPU, cache_in_memory false, "
        f"{args.steps} steps of batch {args.batch_size}, {args.train_workers} loader workers, "
        f"one validation fold per run.",
        "",
        f"Loader alone at N={n} (two-stage training items, batch {batch}), against the model step "
        f"alone ({model['parameters_m']:.1f} M parameters, batch {args.batch_size}, amp "
        f"{model['amp']}, {model['threads']} threads):",
        "",
        markdown(
            [loader],
            {
                "first_pass_rate_2w": "first pass, 2 w (samples/s)",
                "rate_0w": "0 w",
                "rate_1w": "1 w",
                "rate_2w": "2 w",
                "model_rate": "model step (samples/s)",
                "ratio_2w": "loader 2 w / model",
                "grid_mb_per_study": "grid MB/study",
                "first_pass_workers_rss_mb": "first-pass worker peak RSS MB",
                "rss_anon_mb": "loader RSS anon MB",
                "rss_file_mb": "loader RSS file MB",
                "model_rss_mb": "model peak RSS MB",
            },
        ),
        "",
        f"Predict ({args.test_studies} test studies, CPU, no TTA): "
        f"{predict['s_study']:.1f} s/study ({predict['seconds']:.0f} s with start-up; "
        f"preprocessing them first: {predict['preprocess_s_study']:.2f} s/study).",
        "",
        f"Extrapolation to {REAL_STUDIES} studies: DICOM {extrapolation['dicom_gb']:.0f} GB, "
        f"cache {extrapolation['cache_gb']:.0f} GB (stacks and localizer grids); preprocess "
        + ", ".join(
            f"{m:.1f} min on {c} cores" for c, m in extrapolation["preprocess_minutes"].items()
        )
        + " of CPU time (one worker per core; reading 35 GB and writing the cache may take the "
        "disk longer); training RAM "
        f"{extrapolation['train_ram_gb_8_workers']:.1f} GB with 8 loader workers at this batch.",
        "",
        f"Loader workers a GPU stepping K samples/s needs (measured: {per_worker:.2f} samples/s "
        f"per worker once the grids exist, {first_per_worker:.2f} in the first epoch):",
        "",
        markdown(
            feeding,
            {
                "K": "K (samples/s)",
                "per_worker_8": "per worker with 8",
                "workers": "workers needed",
                "workers_first_epoch": "first epoch",
                "epoch_min": "epoch minutes",
            },
        ),
    ]
    report = "\n".join(text) + "\n"
    print("\n" + report)
    (work / "scale.md").write_text(report)
    results = {
        "command": sys.argv,
        "load_average": load,
        "synth": synth,
        "sizes": rows,
        "decode": decode,
        "loader": loader,
        "model": model,
        "predict": predict,
        "extrapolation": extrapolation,
    }
    (work / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {work / 'scale.md'} and {work / 'scale.json'}")


if __name__ == "__main__":
    main()
