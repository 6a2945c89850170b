"""lsdc demo end to end at the tiny size: every artefact it promises, and the final table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lsdc.cli import main
from lsdc.contract import PRED_COLUMNS, load_series_descriptions
from lsdc.errors import UserError
from lsdc.evaluation.metric import official_score

TINY = ["--train-studies", "6", "--test-studies", "2", "--image-size", "32", "--slices", "8"]


def test_tiny_demo_leaves_every_artefact_and_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--config", "tiny", *TINY, "optim.epochs=1"]) == 0
    printed = capsys.readouterr().out

    for path in ("data/train.csv", "run/oof.csv", "run/calibration.json", "run/evaluation/report.html",
                 "submission.csv", "predict_report.csv", "report.html", "metrics.json"):  # fmt: skip
        assert (out / path).is_file(), path
    for path in ("data", "run", "submission.csv", "report.html"):
        assert str(out / path) in printed, path  # the demo says where each artefact is
    assert list((out / "run").glob("fold*/best.pt"))

    test_ids = load_series_descriptions(out / "data" / "test_series_descriptions.csv")["study_id"]
    submission = pd.read_csv(out / "submission.csv")
    assert len(submission) == 25 * test_ids.nunique()
    np.testing.assert_allclose(submission[list(PRED_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)

    solution = pd.read_csv(out / "data" / "solution_test.csv")
    model = official_score(solution, submission).score
    oracle = official_score(solution, pd.read_csv(out / "data" / "oracle_test.csv")).score
    assert json.loads((out / "metrics.json").read_text())["official"]["score"] == pytest.approx(
        model
    )
    table = printed[printed.index("official score on the synthetic test split") :]
    assert f"model        {model:.4f}" in table
    assert f"oracle       {oracle:.4f}" in table
    assert "class prior" in table and "of the prior->oracle gap closed" in table
    # It ends pointing at the report whose gallery links every study's page.
    gallery = out / "run" / "evaluation"
    assert str(gallery / "report.html") in table and "lsdc show" in table
    pages = list((gallery / "studies").glob("*.html"))
    oof_studies = pd.read_csv(out / "run" / "oof.csv")["row_id"].str.split("_").str[0].nunique()
    assert len(pages) == oof_studies and all(
        f'href="studies/{p.name}"' in (gallery / "report.html").read_text() for p in pages
    )


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not a demo folder"):
        from lsdc.demo import run_demo

        run_demo(tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
