"""lsdc: grading degenerative lumbar spine conditions on MRI (RSNA 2024 LSDC), DICOM to submission.

The Python API mirrors the CLI, one function per stage::

    import lsdc
    lsdc.synthesize("data", train_studies=20, test_studies=5)
    lsdc.preprocess("data", "cache/train", "train")
    run = lsdc.train("two_stage_demo", "data", "cache/train", "run", ["optim.epochs=2"])
    lsdc.evaluate(run_dir=run, data_root="data")
    lsdc.predict("data", [run], "submission.csv")
    lsdc.predict_dicom("pacs_export", [run], "out/submission.csv")  # any DICOM folder
"""

import os as _os

# Torch's OpenMP threads (libgomp on Linux) spin ~300,000 times at every barrier before they
# sleep; beside another busy process the spinning thread holds the core the late thread needs,
# and a training ran 2.5-4.4x slower instead of 2x (docs/results.md, "A busy machine"). 1,000
# spins is what libgomp itself uses once it knows the cores are oversubscribed. libgomp reads it
# once, when torch loads it: so here, before any lsdc module imports torch (a program that
# imported torch before lsdc sets it itself); a value already in the environment wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from lsdc.api import evaluate, predict, predict_dicom, preprocess, synthesize, train

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "evaluate",
    "predict",
    "predict_dicom",
    "preprocess",
    "synthesize",
    "train",
]
