"""Seconds per study of ``lsdc predict`` end to end (DICOM to 25 rows) at real image size, and the
share of it spent reading DICOM (preprocessing into the cache) versus running the model.

Usage (the run is the demo's, e.g. after ``lsdc demo --out demo_out``)::

    python benchmarks/predict.py --run demo_out/run [--studies 4] [--image-size 448] [--slices 20]

It synthesises ``--studies`` test studies at the given size into a scratch folder, then times
(1) preprocessing alone, (2) ``predict_run`` alone on that cache, after a one-study warm-up call
(first-call costs a process pays once; printed apart), and (3) the whole
``predict_split`` (its own temporary cache, so it reads the DICOM again), and prints the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lsdc.contract import load_series_descriptions
from lsdc.inference.predict import predict_split
from lsdc.inference.runs import predict_run
from lsdc.preprocessing.cache import preprocess_split
from lsdc.synth.generator import SynthConfig, synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run (e.g. demo_out/run)")
    parser.add_argument("--studies", type=int, default=4, help="test studies to time")
    parser.add_argument("--image-size", type=int, default=448, help="DICOM matrix (real: 384-512)")
    parser.add_argument("--slices", type=int, default=20, help="sagittal slices (real: 15-50)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lsdc-bench-predict-") as tmp:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        synthesize(
            root,
            SynthConfig(
                train_studies=2,
                test_studies=args.studies,
                image_size=args.image_size,
                slices=args.slices,
            ),
            progress=False,
        )
        print(
            f"synthesised {args.studies} test studies at {args.image_size} px, {args.slices} "
            f"sagittal slices in {time.perf_counter() - t0:.1f} s"
        )
        study_ids = sorted(
            set(load_series_descriptions(root / "test_series_descriptions.csv")["study_id"])
        )
        n_files = sum(1 for _ in (root / "test_images").rglob("*.dcm"))

        t0 = time.perf_counter()
        preprocess_split(root, Path(tmp) / "cache", "test", progress=False)
        read_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        predict_run(args.run, Path(tmp) / "cache", study_ids[:1], device=args.device)
        cold_s = time.perf_counter() - t0  # first call: checkpoint load, kernel selection

        t0 = time.perf_counter()
        predict_run(args.run, Path(tmp) / "cache", study_ids, device=args.device)
        model_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        predict_split(
            root, [args.run], Path(tmp) / "submission.csv", device=args.device, progress=False
        )
        total_s = time.perf_counter() - t0

    n = len(study_ids)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {n} studies, {n_files} DICOM files"
    )
    print(f"first model call (once per process, 1 study) {cold_s:.2f} s")
    print(f"end to end (predict_split)   {total_s / n:8.2f} s/study")
    print(f"  reading DICOM (preprocess) {read_s / n:8.2f} s/study  {100 * read_s / total_s:5.1f}%")
    print(
        f"  model (predict_run)        {model_s / n:8.2f} s/study  {100 * model_s / total_s:5.1f}%"
    )
    rest = max(total_s - read_s - model_s, 0.0)
    print(f"  rest (listing, writing)    {rest / n:8.2f} s/study  {100 * rest / total_s:5.1f}%")


if __name__ == "__main__":
    main()
