"""The official score against hand-computed values, scikit-learn, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from lsdc.cli import main
from lsdc.contract import CLASS_WEIGHTS, PRED_COLUMNS, all_row_ids
from lsdc.evaluation.metric import EPS, SubmissionError, official_score

LN2 = math.log(2.0)


def _solution(rows: dict[str, int]) -> pd.DataFrame:
    onehot = np.eye(3)[list(rows.values())]
    sol = pd.DataFrame(onehot, columns=list(PRED_COLUMNS))
    sol.insert(0, "row_id", list(rows))
    sol["sample_weight"] = np.asarray(CLASS_WEIGHTS)[list(rows.values())]
    return sol


def _submission(rows: dict[str, list[float]]) -> pd.DataFrame:
    sub = pd.DataFrame(list(rows.values()), columns=list(PRED_COLUMNS))
    sub.insert(0, "row_id", list(rows))
    return sub


HAND_SOLUTION = _solution(
    {
        "1_spinal_canal_stenosis_l1_l2": 0,
        "1_spinal_canal_stenosis_l2_l3": 2,
        "1_left_neural_foraminal_narrowing_l1_l2": 1,
        "1_right_neural_foraminal_narrowing_l1_l2": 0,
        "1_left_subarticular_stenosis_l1_l2": 0,
    }
)
HAND_SUBMISSION = _submission(
    {
        # order deliberately differs from the solution; rows are matched by row_id
        "1_left_subarticular_stenosis_l1_l2": [0.4, 0.2, 0.2],  # renormalised: 0.5
        "1_right_neural_foraminal_narrowing_l1_l2": [0.8, 0.1, 0.1],
        "1_spinal_canal_stenosis_l2_l3": [0.2, 0.3, 0.5],
        "1_left_neural_foraminal_narrowing_l1_l2": [0.25, 0.5, 0.25],
        "1_spinal_canal_stenosis_l1_l2": [0.5, 0.25, 0.25],
        "1_right_subarticular_stenosis_l5_s1": [0.1, 0.1, 0.8],  # not in the solution: ignored
    }
)


def test_hand_computed_components() -> None:
    s = official_score(HAND_SOLUTION, HAND_SUBMISSION)
    assert s.spinal == pytest.approx(LN2, abs=1e-12)  # (1*ln2 + 4*ln2) / 5
    assert s.foraminal == pytest.approx((2 * LN2 + math.log(1.25)) / 3, abs=1e-12)
    assert s.subarticular == pytest.approx(LN2, abs=1e-12)
    assert s.any_severe_spinal == pytest.approx(LN2, abs=1e-12)  # label 1, max severe 0.5
    assert s.score == pytest.approx((3 * LN2 + (2 * LN2 + math.log(1.25)) / 3) / 4, abs=1e-12)


def test_any_severe_uses_largest_spinal_severe_and_weight() -> None:
    sol = _solution({"2_spinal_canal_stenosis_l1_l2": 1, "2_spinal_canal_stenosis_l2_l3": 0})
    sub = _submission(
        {
            "2_spinal_canal_stenosis_l1_l2": [0.6, 0.3, 0.1],
            "2_spinal_canal_stenosis_l2_l3": [0.7, 0.1, 0.2],
        }
    )
    s = official_score(sol, sub)
    assert s.any_severe_spinal == pytest.approx(-math.log(1 - 0.2), abs=1e-12)


def test_zero_probability_is_clipped_to_machine_epsilon() -> None:
    sol = _solution({"3_spinal_canal_stenosis_l1_l2": 2})
    sub = _submission({"3_spinal_canal_stenosis_l1_l2": [1.0, 0.0, 0.0]})
    s = official_score(sol, sub)
    expected = -math.log(EPS / (1 - EPS + 2 * EPS))
    assert s.spinal == pytest.approx(expected, rel=1e-12)


def test_agrees_with_sklearn_log_loss_on_random_data() -> None:
    rng = np.random.default_rng(0)
    study_ids = [10 + i for i in range(30)]
    rows = all_row_ids(study_ids)
    targets = rng.choice(3, size=len(rows), p=[0.7, 0.2, 0.1])
    sol = _solution(dict(zip(rows, targets.tolist(), strict=True)))
    probs = rng.dirichlet([2, 1, 1], size=len(rows))
    sub = _submission(dict(zip(rows, probs.tolist(), strict=True)))
    s = official_score(sol, sub)
    groups = np.array(
        [
            ("spinal" if "spinal" in r else "foraminal" if "foraminal" in r else "subarticular")
            for r in rows
        ]
    )
    w = np.asarray(CLASS_WEIGHTS)[targets]
    for g in ("spinal", "foraminal", "subarticular"):
        m = groups == g
        ref = log_loss(targets[m], probs[m], sample_weight=w[m], labels=[0, 1, 2])
        assert getattr(s, g) == pytest.approx(ref, abs=1e-9)
    spinal = groups == "spinal"
    per_study = np.arange(len(rows))[spinal].reshape(30, 5)
    y = (targets[per_study] == 2).any(axis=1).astype(int)
    ww = w[per_study].max(axis=1)
    p = probs[per_study, 2].max(axis=1)
    assert s.any_severe_spinal == pytest.approx(
        log_loss(y, p, sample_weight=ww, labels=[0, 1]), abs=1e-9
    )


def test_unlabelled_rows_are_not_scored() -> None:
    sol = HAND_SOLUTION.copy()
    extra = _solution({"1_spinal_canal_stenosis_l5_s1": 0})
    extra.loc[:, ["normal_mild", "sample_weight"]] = 0.0  # no class: not labelled
    sol = pd.concat([sol, extra], ignore_index=True)
    assert (
        official_score(sol, HAND_SUBMISSION).score
        == official_score(HAND_SOLUTION, HAND_SUBMISSION).score
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.iloc[1:], "lacks 1 row_id"),
        (lambda s: pd.concat([s, s.iloc[[0]]]), "duplicated row_id"),
        (lambda s: s.assign(moderate=[np.nan] + [0.1] * (len(s) - 1)), "NaN"),
        (lambda s: s.assign(moderate=[-0.1] + [0.1] * (len(s) - 1)), "negative"),
        (lambda s: s.assign(severe=[np.inf] + [0.1] * (len(s) - 1)), "infinite"),
    ],
)
def test_bad_submissions_are_refused(mutate, message) -> None:
    bad = mutate(HAND_SUBMISSION.set_index("row_id").loc[HAND_SOLUTION["row_id"]].reset_index())
    with pytest.raises(SubmissionError, match=message):
        official_score(HAND_SOLUTION, bad)


def test_cli_prints_components_and_json(tmp_path, capsys) -> None:
    HAND_SOLUTION.to_csv(tmp_path / "solution.csv", index=False)
    HAND_SUBMISSION.to_csv(tmp_path / "sub.csv", index=False)
    rc = main(
        [
            "score",
            "--solution",
            str(tmp_path / "solution.csv"),
            "--submission",
            str(tmp_path / "sub.csv"),
            "--json",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert set(result) == {"score", "spinal", "foraminal", "subarticular", "any_severe_spinal"}
    assert result["spinal"] == pytest.approx(LN2, abs=1e-12)


def test_cli_refuses_bad_submission_with_clear_message(tmp_path, capsys) -> None:
    HAND_SOLUTION.to_csv(tmp_path / "solution.csv", index=False)
    HAND_SUBMISSION.iloc[1:].to_csv(tmp_path / "sub.csv", index=False)
    rc = main(
        [
            "score",
            "--solution",
            str(tmp_path / "solution.csv"),
            "--submission",
            str(tmp_path / "sub.csv"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "lsdc score: error: submission lacks 1 row_id" in err
    assert "Traceback" not in err
