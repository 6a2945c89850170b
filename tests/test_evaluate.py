"""lsdc evaluate: equals lsdc score, breaks the loss down correctly, calibrates, writes the report."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from lsdc.cli import main
from lsdc.contract import (
    IGNORE_INDEX,
    LABEL_COLUMNS,
    PRED_COLUMNS,
    SEVERITIES,
    all_row_ids,
    labels_to_indices,
    labels_to_solution,
)
from lsdc.evaluation.metric import weighted_log_loss

STUDIES = [101, 102, 103, 104, 105, 106]


def _labels(rng: np.random.Generator) -> pd.DataFrame:
    values = rng.choice(SEVERITIES, p=[0.7, 0.2, 0.1], size=(len(STUDIES), len(LABEL_COLUMNS)))
    labels = pd.DataFrame(values, columns=list(LABEL_COLUMNS)).astype(object)
    labels.iloc[0, LABEL_COLUMNS.index("left_subarticular_stenosis_l1_l2")] = np.nan
    labels.iloc[1, LABEL_COLUMNS.index("spinal_canal_stenosis_l5_s1")] = np.nan
    labels.insert(0, "study_id", STUDIES)
    return labels


def _predictions(rng: np.random.Generator, labels: pd.DataFrame, sharpness: float) -> pd.DataFrame:
    """Informative but overconfident predictions: true class logit +1, then scaled."""
    idx = labels_to_indices(labels)
    logits = rng.normal(size=(len(labels), len(LABEL_COLUMNS), 3))
    s, c = np.nonzero(idx != IGNORE_INDEX)
    logits[s, c, idx[s, c]] += 1.0
    probs = softmax(sharpness * logits, axis=-1).reshape(-1, 3)
    pred = pd.DataFrame(probs, columns=list(PRED_COLUMNS))
    pred.insert(0, "row_id", all_row_ids(labels["study_id"]))
    return pred


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    root.mkdir()
    labels = _labels(rng)
    labels.to_csv(root / "train.csv", index=False)
    solution_path = root / "solution.csv"
    labels_to_solution(labels).to_csv(solution_path, index=False)
    pred_path = tmp_path / "pred.csv"
    _predictions(rng, labels, sharpness=3.0).to_csv(pred_path, index=False)
    return {"root": root, "solution": solution_path, "pred": pred_path, "tmp": tmp_path}


def _score_json(solution, submission, capsys) -> dict:
    capsys.readouterr()
    assert (
        main(["score", "--solution", str(solution), "--submission", str(submission), "--json"]) == 0
    )
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _evaluate(pred: Path, labels_flag: str, labels: Path, out: Path) -> int:
    """``lsdc evaluate --pred PRED --data|--solution LABELS --out OUT``; the exit status."""
    return main(["evaluate", "--pred", str(pred), labels_flag, str(labels), "--out", str(out)])


@pytest.mark.parametrize("labels_flag", ["--data", "--solution"])
def test_evaluate_score_equals_lsdc_score(files, capsys, labels_flag) -> None:
    out = files["tmp"] / "eval"
    labels = files["root"] if labels_flag == "--data" else files["solution"]
    assert _evaluate(files["pred"], labels_flag, labels, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected = _score_json(files["solution"], files["pred"], capsys)
    assert metrics["official"] == pytest.approx(expected, abs=1e-12)
    assert metrics["n_studies"] == len(STUDIES)
    assert metrics["n_rows"] == len(STUDIES) * 25 - 2  # the two unlabelled rows are not scored


def test_breakdowns_match_direct_computation(files) -> None:
    out = files["tmp"] / "eval"
    assert _evaluate(files["pred"], "--solution", files["solution"], out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    sol = pd.read_csv(files["solution"])
    pred = pd.read_csv(files["pred"]).set_index("row_id").loc[sol["row_id"]]
    for cond in ("left_neural_foraminal_narrowing", "spinal_canal_stenosis"):
        m = sol["row_id"].str.contains(cond).to_numpy()
        expected = weighted_log_loss(
            sol.loc[m, list(PRED_COLUMNS)].to_numpy(),
            pred.loc[m, list(PRED_COLUMNS)].to_numpy(),
            sol.loc[m, "sample_weight"].to_numpy(),
        )
        assert metrics["log_loss"]["condition"][cond] == pytest.approx(expected, abs=1e-12)
    m = sol["row_id"].str.endswith("l4_l5").to_numpy()
    expected = weighted_log_loss(
        sol.loc[m, list(PRED_COLUMNS)].to_numpy(),
        pred.loc[m, list(PRED_COLUMNS)].to_numpy(),
        sol.loc[m, "sample_weight"].to_numpy(),
    )
    assert metrics["log_loss"]["level"]["l4_l5"] == pytest.approx(expected, abs=1e-12)
    confusion = np.array(metrics["confusion"]["spinal_canal_stenosis"])
    assert confusion.sum() == len(STUDIES) * 5 - 1  # one spinal row is unlabelled
    truth = sol.loc[sol["row_id"].str.contains("spinal"), list(PRED_COLUMNS)].to_numpy().sum(0)
    np.testing.assert_array_equal(confusion.sum(axis=1), truth)


def test_perfect_predictions_give_auc_one_and_a_diagonal_confusion(files) -> None:
    sol = pd.read_csv(files["solution"])
    perfect = sol[["row_id", *PRED_COLUMNS]].copy()
    perfect[list(PRED_COLUMNS)] = perfect[list(PRED_COLUMNS)] * 0.98 + 0.01
    path = files["tmp"] / "perfect.csv"
    perfect.to_csv(path, index=False)
    out = files["tmp"] / "eval"
    assert _evaluate(path, "--solution", files["solution"], out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for cond, per_class in metrics["auc"].items():
        for value in per_class.values():
            assert value is None or value == pytest.approx(1.0), cond
        cm = np.array(metrics["confusion"][cond])
        assert (cm == np.diag(np.diag(cm))).all()


def test_unlabelled_rows_do_not_count(files, capsys) -> None:
    pred = pd.read_csv(files["pred"])
    unlabelled = ["101_left_subarticular_stenosis_l1_l2", "102_spinal_canal_stenosis_l5_s1"]
    out = files["tmp"] / "eval"
    _evaluate(files["pred"], "--data", files["root"], out)
    before = json.loads((out / "metrics.json").read_text())["official"]
    pred.loc[pred["row_id"].isin(unlabelled), list(PRED_COLUMNS)] = [1.0, 0.0, 0.0]
    pred[~pred["row_id"].isin(unlabelled[:1])].to_csv(files["pred"], index=False)  # one dropped
    assert _evaluate(files["pred"], "--data", files["root"], out) == 0
    after = json.loads((out / "metrics.json").read_text())["official"]
    assert after == pytest.approx(before, abs=1e-12)


def test_oof_covering_some_studies_scores_only_those(files) -> None:
    pred = pd.read_csv(files["pred"])
    pred[pred["row_id"].str.match(r"^10[12]_")].to_csv(files["pred"], index=False)
    out = files["tmp"] / "eval"
    assert _evaluate(files["pred"], "--data", files["root"], out) == 0
    assert json.loads((out / "metrics.json").read_text())["n_studies"] == 2


def test_missing_scored_row_is_a_one_line_error_naming_the_file(files, capsys) -> None:
    pred = pd.read_csv(files["pred"])
    pred[pred["row_id"] != "103_spinal_canal_stenosis_l1_l2"].to_csv(files["pred"], index=False)
    code = _evaluate(
        str(files["pred"]), "--solution", str(files["solution"]), str(files["tmp"] / "e")
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "pred.csv" in err and "103_spinal_canal_stenosis_l1_l2" in err
    assert not (files["tmp"] / "e" / "metrics.json").exists()


def test_nan_prediction_is_refused_naming_the_file(files, capsys) -> None:
    pred = pd.read_csv(files["pred"])
    pred.loc[3, "moderate"] = np.nan
    pred.to_csv(files["pred"], index=False)
    assert main(["evaluate", "--pred", str(files["pred"]), "--data", str(files["root"])]) == 2
    err = capsys.readouterr().err
    assert "pred.csv" in err and "NaN" in err


def test_run_fits_calibration_and_reports_before_after(files) -> None:
    run = files["tmp"] / "run"
    run.mkdir()
    pd.read_csv(files["pred"]).to_csv(run / "oof.csv", index=False)
    assert main(["evaluate", "--run", str(run), "--data", str(files["root"])]) == 0
    stored = json.loads((run / "calibration.json").read_text())
    assert set(stored["temperatures"]) == {
        "spinal_canal_stenosis",
        "left_neural_foraminal_narrowing",
        "right_neural_foraminal_narrowing",
        "left_subarticular_stenosis",
        "right_subarticular_stenosis",
    }
    # predictions were 3x overconfident: every temperature softens them
    assert all(t > 1.0 for t in stored["temperatures"].values())
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["after"]["score"] < cal["before"]["score"]
    assert stored["score_after"] == pytest.approx(cal["after"]["score"])
    html = (run / "evaluation" / "report.html").read_text()
    assert "calibrated" in html and "uncalibrated" in html


def test_run_with_test_solution_is_refused(files, capsys) -> None:
    run = files["tmp"] / "run"
    run.mkdir()
    code = main(
        [
            "evaluate",
            "--pred",
            str(files["pred"]),
            "--solution",
            str(files["solution"]),
            "--run",
            str(run),
        ]
    )
    assert code == 2
    assert "out-of-fold" in capsys.readouterr().err
    assert not (run / "calibration.json").exists()


def test_report_html_is_self_contained_with_decodable_pngs(files) -> None:
    out = files["tmp"] / "eval"
    assert _evaluate(files["pred"], "--data", files["root"], out) == 0
    html = (out / "report.html").read_text()
    assert "<img" in html and 'src="http' not in html and "<script" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3  # heatmap, confusion matrices, reliability
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("AUC", "Confusion", "Reliability", "precision", "any severe spinal"):
        assert text in html


def test_predictions_of_unknown_studies_are_nothing_to_score(files, capsys) -> None:
    pred = pd.read_csv(files["pred"])
    pred["row_id"] = pred["row_id"].str.replace(r"^10(\d)_", r"90\1_", regex=True)
    pred.to_csv(files["pred"], index=False)
    assert main(["evaluate", "--pred", str(files["pred"]), "--data", str(files["root"])]) == 2
    err = capsys.readouterr().err
    assert "pred.csv" in err and "nothing to score" in err


def test_an_api_error_names_the_parameters_and_the_cli_names_its_flags(tmp_path, capsys) -> None:
    from lsdc import api
    from lsdc.errors import UserError

    with pytest.raises(UserError) as refused:
        api.evaluate(data_root=tmp_path)
    assert str(refused.value) == (
        "give `predictions=PRED.csv`, or `run_dir=RUN` to evaluate RUN/oof.csv"
    )
    assert main(["evaluate", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "lsdc evaluate: error: give --pred PRED.csv, or --run RUN to evaluate RUN/oof.csv\n"
    )
