"""The Python API chains the stages with plain arguments and returns what each wrote."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import lsdc
from lsdc.contract import PRED_COLUMNS, all_row_ids
from lsdc.rundir import RunDir


def test_the_readme_chain_runs_through_the_api(tmp_path: Path) -> None:
    data = lsdc.synthesize(
        tmp_path / "data", train_studies=4, test_studies=2, image_size=32, slices=8, progress=False
    )
    assert data == tmp_path / "data" and (data / "train.csv").is_file()
    report = lsdc.preprocess(data, tmp_path / "cache", "train", progress=False)
    assert set(report["status"]) <= {"ok", "warning"} and len(report) >= 12
    run = lsdc.train("tiny", data, tmp_path / "cache", tmp_path / "run", ["optim.epochs=1"])
    assert run == tmp_path / "run" and len(RunDir(run).trained_folds()) == 2
    metrics = lsdc.evaluate(run_dir=run, data_root=data)
    assert metrics["out_dir"] == str(run / "evaluation") and RunDir(run).calibration.is_file()
    result = lsdc.predict(data, [run], tmp_path / "submission.csv", progress=False)
    submission = pd.read_csv(tmp_path / "submission.csv")
    test_ids = pd.read_csv(data / "test_series_descriptions.csv")["study_id"].unique()
    assert list(submission.columns) == ["row_id", *PRED_COLUMNS]
    assert sorted(submission["row_id"]) == sorted(all_row_ids(sorted(test_ids)))
    assert result.submission_path == tmp_path / "submission.csv"
