"""Does preprocessing scale with workers at the real data's size? One worker against two over a
competition-profile root, a per-stage profile of one worker, and an extrapolation to 1,975.

    lsdc synth --out ROOT --profile competition --train-studies 50 --test-studies 0
    python benchmarks/preprocess_scaling.py --data ROOT [--repeats 2] [--scratch DIR]

Stages (one process, in-line timing of what :func:`lsdc.preprocessing.cache.cache_series` does):
decode (``read_series``: headers, pixels, stacking), orient (``canonical_in_plane``), write
(``np.save`` of the stack), sidecar + publish (JSON sidecar, record, rename), and the worker
pool's start (an empty task through a fresh pool of the context lsdc uses). Target (issue 24):
>= 1.8x with 2 workers; cache bytes <= DICOM bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.preprocessing.cache import preprocess_split
from lsdc.preprocessing.dicom import read_series
from lsdc.preprocessing.geometry import canonical_in_plane
from lsdc.utils import init_worker, worker_context, write_json_atomic

TARGET_SPEEDUP = 1.8
REAL_STUDIES = 1975


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _time_preprocess(root: Path, scratch: Path, workers: int, repeats: int) -> tuple[float, float]:
    """Best wall seconds of ``repeats`` preprocess runs into a fresh cache, and its CPU s."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        cache = Path(tempfile.mkdtemp(prefix=f"cache{workers}_", dir=scratch))
        wall, cpu = time.perf_counter(), _cpu()
        preprocess_split(root, cache, "train", workers=workers, progress=False)
        wall, cpu = time.perf_counter() - wall, _cpu() - cpu
        shutil.rmtree(cache)
        best = min(best, (wall, cpu))
    return best


def _stage_profile(root: Path, scratch: Path) -> dict[str, float]:
    """Wall seconds of each stage over every series of the split, in this process."""
    series = pd.read_csv(root / "train_series_descriptions.csv")
    stages = dict.fromkeys(("decode", "orient", "write", "sidecar + publish"), 0.0)
    out = Path(tempfile.mkdtemp(prefix="stages_", dir=scratch))
    for r in series.itertuples(index=False):
        folder = root / "train_images" / str(r.study_id) / str(r.series_id)
        t0 = time.perf_counter()
        result = read_series(folder, r.series_description)
        t1 = time.perf_counter()
        stages["decode"] += t1 - t0
        for k, volume in enumerate(result.volumes):
            t1 = time.perf_counter()
            array, geometry, _ = canonical_in_plane(volume.array, volume.geometry)
            t2 = time.perf_counter()
            target = out / f"{r.series_id}_{k}"
            np.save(f"{target}.npy", array, allow_pickle=False)
            t3 = time.perf_counter()
            write_json_atomic({"geometry": geometry.to_dict()}, f"{target}.json")
            os.replace(f"{target}.json", f"{target}.meta.json")
            t4 = time.perf_counter()
            stages["orient"] += t2 - t1
            stages["write"] += t3 - t2
            stages["sidecar + publish"] += t4 - t3
    shutil.rmtree(out)
    return stages


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="competition-profile root")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=None, help="where caches are written")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lsdc-scaling-", dir=args.scratch))
    studies = pd.read_csv(args.data / "train_series_descriptions.csv")["study_id"].nunique()
    dicom_bytes = _folder_bytes(args.data / "train_images")
    print(
        f"{studies} studies, {dicom_bytes / studies / 1e6:.1f} MB of DICOM a study; "
        f"start method {worker_context().get_start_method()}; load {os.getloadavg()}"
    )

    _time_preprocess(args.data, scratch, 1, 1)  # page cache warm for both sides
    one_wall, one_cpu = _time_preprocess(args.data, scratch, 1, args.repeats)
    two_wall, two_cpu = _time_preprocess(args.data, scratch, 2, args.repeats)
    cache = scratch / "sized"
    preprocess_split(args.data, cache, "train", workers=1, progress=False)
    cache_bytes = _folder_bytes(cache)
    stages = _stage_profile(args.data, scratch)
    start = _pool_start(2)

    speedup = one_wall / two_wall
    print("\n| workers | wall s | CPU s | s/study | speedup | target |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 | {one_wall:.2f} | {one_cpu:.2f} | {one_wall / studies:.3f} | 1.00x | - |")
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    print(
        f"| 2 | {two_wall:.2f} | {two_cpu:.2f} | {two_wall / studies:.3f} | {speedup:.2f}x "
        f"| >= {TARGET_SPEEDUP}x {verdict} |"
    )
    print(
        f"\nPool start (2 workers, {worker_context().get_start_method()}, each importing the "
        f"preprocessing modules): {start:.2f} s"
    )
    print("\n| stage | s/study (1 process) | share |")
    print("|---|---|---|")
    total = sum(stages.values())
    for name, seconds in stages.items():
        print(f"| {name} | {seconds / studies:.4f} | {seconds / total:.0%} |")
    print(
        f"| bytes written a study | {cache_bytes / studies / 1e6:.1f} MB (DICOM "
        f"{dicom_bytes / studies / 1e6:.1f} MB; cache/DICOM {cache_bytes / dicom_bytes:.2f}) | |"
    )
    per_study_cpu = one_cpu / studies
    efficiency = speedup / 2
    for cores in (8, 16):
        minutes = REAL_STUDIES * per_study_cpu / (cores * efficiency) / 60
        print(
            f"Extrapolation: {REAL_STUDIES} studies on {cores} workers: {minutes:.1f} min of "
            f"CPU-bound work at the measured 2-worker efficiency ({efficiency:.0%}); writing "
            f"{REAL_STUDIES * cache_bytes / studies / 1e9:.0f} GB may take the disk longer"
        )
    print(f"load average at the end: {os.getloadavg()}")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
