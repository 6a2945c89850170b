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
