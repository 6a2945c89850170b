"""Time ``lsdc synth``: studies per second at a given size (the README figure).

Usage:
    python benchmarks/synth_speed.py [--studies 100] [--image-size 96] [--slices 15] [--workers 1]
    python benchmarks/synth_speed.py --profile competition [--studies 10] [--workers 1]
    python benchmarks/synth_speed.py --phantom simple [--studies 100]  (the old phantom)

Writes into a temporary folder that is removed afterwards and prints one line of figures. CPU
time counts the worker processes too, so wall / CPU shows how well the workers were fed.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from lsdc.synth.generator import SynthConfig, synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SynthConfig()
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--slices", type=int, default=defaults.slices)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering studies")
    parser.add_argument("--profile", default=defaults.profile, help="size profile (PROFILES)")
    parser.add_argument("--phantom", default=defaults.phantom, help="phantom (PHANTOMS)")
    args = parser.parse_args()
    config = SynthConfig(
        train_studies=args.studies,
        test_studies=0,
        seed=args.seed,
        image_size=args.image_size,
        slices=args.slices,
        profile=args.profile,
        phantom=args.phantom,
    )
    with tempfile.TemporaryDirectory(prefix="lsdc-synth-speed-") as tmp:
        out = Path(tmp) / "root"
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        synthesize(out, config, progress=False, workers=args.workers)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        files = sum(1 for _ in (out / "train_images").rglob("*.dcm"))
        size = subprocess.run(["du", "-sm", str(out)], capture_output=True, text=True).stdout
    sizes = (
        f"image_size={args.image_size}, slices={args.slices}"
        if args.profile == "default"
        else f"profile {args.profile}"
    )
    print(
        f"{args.studies} studies, {sizes}, phantom {args.phantom}, "
        f"workers={args.workers}: "
        f"{seconds:.1f} s wall ({seconds / args.studies:.3f} s/study), {cpu:.1f} s CPU, "
        f"{files} DICOM files, "
        f"{size.split()[0]} MB"
    )


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
