"""Does preprocessing scale with workers at the real data's size? One worker against two over a
competition-profile root, side by side, against what this machine gives any two processes;
a per-stage profile of one worker (CPU seconds and bytes a study) and an extrapolation to 1,975.

    lsdc synth --out ROOT --profile competition --train-studies 50 --test-studies 0
    python benchmarks/preprocess_scaling.py --data ROOT [--studies N] [--repeats 3] [--scratch DIR]

The 1- and 2-worker runs alternate (1, 2, 1, 2, ...) so that another job's load falls on both;
each side's best run is compared. The machine's own ceiling is the same pair of measurements on
work that shares nothing: a pure-Python loop and a copy of 25 MB buffers (what decoding and
writing a study do with its pixels), one process alone against two at once.

Stages (one process, in-line CPU timing of what :func:`lsdc.preprocessing.cache.cache_series`
does): decode (``read_series``: headers, pixels, stacking), orient (``canonical_in_plane``),
write (``np.save`` of the stack), sidecar + publish (JSON sidecar, record, rename), and the
parent's serial work (the lock, the cache's settings, the scan for broken entries, the report
and index: a rerun over the complete cache, which does exactly that and nothing else).
Target (issue 24): >= 1.8x with 2 workers; cache bytes <= DICOM bytes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import lsdc.preprocessing.cache as cache_module
from lsdc.preprocessing.cache import preprocess_split
from lsdc.preprocessing.dicom import read_series
from lsdc.preprocessing.geometry import canonical_in_plane
from lsdc.utils import init_worker, worker_context, write_json_atomic

TARGET_SPEEDUP = 1.8
REAL_STUDIES = 1975
_STUDY_BYTES = 25_000_000


@dataclass(frozen=True)
class Sample:
    """One preprocess run: wall seconds, of which outside the series' work (the parent's
    serial part), CPU seconds of this process and of its workers, and minor page faults of
    both."""

    wall: float
    serial_wall: float
    parent_cpu: float
    worker_cpu: float
    faults: int


def _usage() -> tuple[float, float, int]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        me.ru_utime + me.ru_stime,
        kids.ru_utime + kids.ru_stime,
        me.ru_minflt + kids.ru_minflt,
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _preprocess_once(root: Path, scratch: Path, workers: int, ids: list[int]) -> Sample:
    """One preprocess run into a fresh cache (removed after)."""
    cache = Path(tempfile.mkdtemp(prefix=f"cache{workers}_", dir=scratch))
    cache_all, in_pool = cache_module._cache_all, []

    def timed_cache_all(*args, **kwargs):
        started = time.perf_counter()
        written = cache_all(*args, **kwargs)
        in_pool.append(time.perf_counter() - started)
        return written

    cache_module._cache_all = timed_cache_all
    me, kids, faults = _usage()
    wall = time.perf_counter()
    try:
        preprocess_split(root, cache, "train", workers=workers, study_ids=ids, progress=False)
    finally:
        cache_module._cache_all = cache_all
    wall = time.perf_counter() - wall
    me2, kids2, faults2 = _usage()
    shutil.rmtree(cache)
    return Sample(wall, wall - sum(in_pool), me2 - me, kids2 - kids, faults2 - faults)


def _stage_profile(root: Path, scratch: Path, ids: list[int]) -> tuple[dict[str, float], int]:
    """CPU seconds of each stage over every series of ``ids``, in this process, and the bytes
    the stacks and sidecars take."""
    series = pd.read_csv(root / "train_series_descriptions.csv")
    series = series[series["study_id"].isin(ids)]
    stages = dict.fromkeys(("decode", "orient", "write", "sidecar + publish"), 0.0)
    out = Path(tempfile.mkdtemp(prefix="stages_", dir=scratch))
    clock = time.process_time
    for r in series.itertuples(index=False):
        folder = root / "train_images" / str(r.study_id) / str(r.series_id)
        t0 = clock()
        result = read_series(folder, r.series_description)
        stages["decode"] += clock() - t0
        for k, volume in enumerate(result.volumes):
            t1 = clock()
            array, geometry, _ = canonical_in_plane(volume.array, volume.geometry)
            t2 = clock()
            target = out / f"{r.series_id}_{k}"
            np.save(f"{target}.npy", array, allow_pickle=False)
            t3 = clock()
            write_json_atomic({"geometry": geometry.to_dict()}, f"{target}.json")
            os.replace(f"{target}.json", f"{target}.meta.json")
            t4 = clock()
            stages["orient"] += t2 - t1
            stages["write"] += t3 - t2
            stages["sidecar + publish"] += t4 - t3
    written = _folder_bytes(out)
    shutil.rmtree(out)
    return stages, written


def _serial_work(root: Path, scratch: Path, ids: list[int]) -> float:
    """CPU seconds of a rerun over a complete cache: the work every run does in the parent
    alone, before the first series and after the last."""
    cache = Path(tempfile.mkdtemp(prefix="serial_", dir=scratch))
    preprocess_split(root, cache, "train", workers=1, study_ids=ids, progress=False)
    started = time.process_time()
    preprocess_split(root, cache, "train", workers=1, study_ids=ids, progress=False)
    seconds = time.process_time() - started
    shutil.rmtree(cache)
    return seconds


def _pool_start(workers: int) -> float:
    """Wall seconds from creating a pool to every worker having run a task."""
    started = time.perf_counter()
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=worker_context(),
        initializer=init_worker,
        initargs=(os.getpid(),),
    ) as pool:
        list(pool.map(_import_stage, range(workers)))
    return time.perf_counter() - started


def _import_stage(_: int) -> int:
    import lsdc.preprocessing.cache  # noqa: F401 - what a worker must import before its first series

    return os.getpid()


def _python_loop(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def _memory_copy(n: int) -> int:
    src = np.ones(_STUDY_BYTES // 2, dtype=np.int16)
    for _ in range(n):
        src = src.copy()
    return int(src[0])


def _ceiling(work, amount: int) -> float:
    """Throughput of two processes doing ``work(amount)`` at once against one alone."""
    with ProcessPoolExecutor(2, mp_context=worker_context()) as pool:
        list(pool.map(work, [1, 1]))  # both started
        one = time.perf_counter()
        pool.submit(work, amount).result()
        one = time.perf_counter() - one
        two = time.perf_counter()
        list(pool.map(work, [amount, amount]))
        two = time.perf_counter() - two
    return 2 * one / two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="competition-profile root")
    parser.add_argument("--studies", type=int, help="the first N studies (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each worker count")
    parser.add_argument("--scratch", type=Path, default=None, help="where caches are written")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lsdc-scaling-", dir=args.scratch))
    listed = pd.read_csv(args.data / "train_series_descriptions.csv")
    ids = sorted(listed["study_id"].unique().tolist())[: args.studies]
    studies = len(ids)
    dicom_bytes = sum(_folder_bytes(args.data / "train_images" / str(s)) for s in ids)
    print(
        f"{studies} studies, {dicom_bytes / studies / 1e6:.1f} MB of DICOM a study; "
        f"start method {worker_context().get_start_method()}; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.2f} at the start"
    )

    ceiling = {
        "pure-Python loop": _ceiling(_python_loop, 10_000_000),
        "25 MB memory copies": _ceiling(_memory_copy, 100),
    }
    _preprocess_once(args.data, scratch, 1, ids)  # page cache warm for both sides
    runs: dict[int, list[Sample]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for workers in (1, 2):
            runs[workers].append(_preprocess_once(args.data, scratch, workers, ids))
    best = {w: min(samples, key=lambda s: s.wall) for w, samples in runs.items()}
    stages, stage_bytes = _stage_profile(args.data, scratch, ids)
    serial = _serial_work(args.data, scratch, ids)
    start = _pool_start(2)

    speedup = best[1].wall / best[2].wall
    print(
        "\n| workers | wall s (each run) | best | of which serial | parent CPU s | worker CPU s "
        "| page faults a study | speedup | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for w, s in best.items():
        walls = ", ".join(f"{r.wall:.2f}" for r in runs[w])
        verdict = (
            "-"
            if w == 1
            else (f">= {TARGET_SPEEDUP}x " + ("met" if speedup >= TARGET_SPEEDUP else "NOT met"))
        )
        print(
            f"| {w} | {walls} | {s.wall:.2f} | {s.serial_wall:.2f} | {s.parent_cpu:.2f} | "
            f"{s.worker_cpu:.2f} | "
            f"{s.faults / studies:.0f} | {best[1].wall / s.wall:.2f}x | {verdict} |"
        )
    cpu_one = best[1].parent_cpu + best[1].worker_cpu
    cpu_two = best[2].parent_cpu + best[2].worker_cpu
    print(
        f"\nCPU seconds, 2 workers against 1: {cpu_two / cpu_one:.2f}x. This machine, two "
        "processes at once against one alone (ideal 2.00x): "
        + "; ".join(f"{name} {x:.2f}x" for name, x in ceiling.items())
    )
    print(
        f"Pool start (2 workers, {worker_context().get_start_method()}, each importing the "
        f"preprocessing modules): {start:.3f} s; the parent's serial work (a rerun over the "
        f"complete cache): {serial:.3f} CPU s ({serial / best[1].wall:.1%} of one worker's run)"
    )
    print("\n| stage | CPU s a study (1 process) | share |")
    print("|---|---|---|")
    total = sum(stages.values())
    for name, seconds in stages.items():
        print(f"| {name} | {seconds / studies:.4f} | {seconds / total:.0%} |")
    print(
        f"| bytes written a study | {stage_bytes / studies / 1e6:.1f} MB (DICOM "
        f"{dicom_bytes / studies / 1e6:.1f} MB; cache/DICOM {stage_bytes / dicom_bytes:.2f}) | |"
    )
    per_study_cpu = cpu_one / studies
    efficiency = speedup / 2
    for cores in (8, 16):
        minutes = REAL_STUDIES * per_study_cpu / (cores * efficiency) / 60
        print(
            f"Extrapolation: {REAL_STUDIES} studies on {cores} workers: {minutes:.1f} min of "
            f"CPU-bound work at the measured 2-worker efficiency ({efficiency:.0%}); writing "
            f"{REAL_STUDIES * stage_bytes / studies / 1e9:.0f} GB may take the disk longer"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
