"""Peak memory of ``lsdc preprocess`` against its largest series, with and without a hostile file.

Usage:
    python benchmarks/preprocess_memory.py [--root /tmp/lsdc-bench-memory/root] [--studies 3]
        [--workers 1]

A synthetic root at the competition's sizes (``--profile competition``: 320-1024 px, up to 60
axial slices a stack) is generated once into ``--root``. Each measurement runs in a fresh
process and reads its own peak resident memory (``ru_maxrss``):

- ``baseline``: the process with lsdc imported, nothing preprocessed;
- ``clean``: ``preprocess_split`` of the root into a new cache;
- ``hostile``: the same root with one more file in the first series: a few-KB RLE file whose
  header declares 40000 x 40000 pixels (3.2 GB), which must be refused before it is decoded.

The issue's target, printed beside the figures: the peak above the baseline stays within a small
multiple (4x) of the largest series' decoded size, the hostile file included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
from pydicom.uid import RLELossless

from lsdc.synth.generator import SynthConfig, synthesize

TARGET = 4.0
"""Peak memory above the baseline, in multiples of the largest series' decoded bytes."""

CHILD = """
import json, resource, sys, time
from pathlib import Path
started = time.perf_counter()
if sys.argv[1] != "baseline":
    from lsdc.preprocessing.cache import preprocess_split
    preprocess_split(Path(sys.argv[2]), Path(sys.argv[3]), "train", workers=int(sys.argv[4]),
                     progress=False)
else:
    import lsdc.preprocessing.cache  # noqa: F401
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"peak_kb": max(own, children), "seconds": time.perf_counter() - started}))
"""


def measure(kind: str, root: Path, cache: Path, workers: int) -> dict:
    """Peak resident memory (kB; the largest of the process and its workers) and wall seconds."""
    argv = [sys.executable, "-c", CHILD, kind, str(root), str(cache), str(workers)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_series_bytes(cache: Path) -> int:
    """The decoded size of the largest cached series (all its stacks' arrays)."""
    return max(sum(p.stat().st_size for p in s.glob("*.npy")) for s in cache.glob("*/*"))


def add_hostile_file(root: Path) -> Path:
    """A copy of the first series' first file, RLE-compressed, declaring 40000 x 40000 pixels."""
    first = sorted((root / "train_images").glob("*/*/*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.compress(RLELossless, ds.pixel_array)
    ds.Rows = ds.Columns = 40000
    ds.InstanceNumber = 9999
    hostile = first.parent / "9999.dcm"
    ds.save_as(hostile)
    return hostile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/lsdc-bench-memory/root"))
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if not (args.root / "train.csv").is_file():
        config = SynthConfig(
            train_studies=args.studies, test_studies=1, seed=0, profile="competition"
        )
        synthesize(args.root, config, progress=False)
    with tempfile.TemporaryDirectory(prefix="lsdc-bench-memory-") as tmp:
        hostile_root = Path(tmp) / "hostile_root"
        shutil.copytree(args.root, hostile_root)
        hostile_bytes = add_hostile_file(hostile_root).stat().st_size
        baseline = measure("baseline", args.root, Path(tmp) / "unused", args.workers)
        clean = measure("clean", args.root, Path(tmp) / "clean", args.workers)
        attacked = measure("hostile", hostile_root, Path(tmp) / "hostile", args.workers)
        largest = largest_series_bytes(Path(tmp) / "clean")
        report = (Path(tmp) / "hostile" / "preprocess_report.csv").read_text()
    print(
        f"largest series: {largest / 2**20:.1f} MB decoded; hostile file: "
        f"{hostile_bytes} bytes declaring 40000 x 40000 x 2 bytes (3052 MB)"
    )
    print(f"baseline (lsdc imported): {baseline['peak_kb'] / 1024:.0f} MB")
    for name, run in (("clean", clean), ("hostile", attacked)):
        above = run["peak_kb"] * 1024 - baseline["peak_kb"] * 1024
        ratio = above / largest
        verdict = "ok" if ratio <= TARGET else "OVER"
        print(
            f"{name:8s} peak {run['peak_kb'] / 1024:.0f} MB, {above / 2**20:.0f} MB above "
            f"the baseline = {ratio:.1f}x the largest series (target <= {TARGET:.0f}x: "
            f"{verdict}); {run['seconds']:.1f} s"
        )
    refused = [line for line in report.splitlines() if "refused before decoding" in line]
    print(f"report lines naming the refusal: {len(refused)}")
    for line in refused:
        print("  " + line[:200])


if __name__ == "__main__":
    main()
