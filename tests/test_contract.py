"""The data contract: labels, row ids, left/right permutation and CSV loaders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lsdc import contract as c


def _labels(n: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.choice([*c.SEVERITIES, np.nan], size=(n, c.N_LABELS), p=[0.6, 0.2, 0.1, 0.1])
    df = pd.DataFrame(values, columns=list(c.LABEL_COLUMNS)).replace("nan", np.nan)
    df.insert(0, "study_id", [1000 + i for i in range(n)])
    return df


def test_twenty_five_labels_condition_major() -> None:
    assert len(c.LABEL_COLUMNS) == 25
    assert c.LABEL_COLUMNS[0] == "spinal_canal_stenosis_l1_l2"
    assert c.LABEL_COLUMNS[6] == "left_neural_foraminal_narrowing_l2_l3"
    assert c.label_index("right_subarticular_stenosis", "l5_s1") == 24


def test_row_id_round_trip() -> None:
    rid = c.make_row_id(44036939, "left_neural_foraminal_narrowing", "l1_l2")
    assert rid == "44036939_left_neural_foraminal_narrowing_l1_l2"
    assert c.parse_row_id(rid) == (44036939, "left_neural_foraminal_narrowing", "l1_l2")
    assert c.study_row_ids(7)[24] == "7_right_subarticular_stenosis_l5_s1"
    for bad in (
        "abc_spinal_canal_stenosis_l1_l2",
        "7_spinal_canal_l1_l2",
        "7_spinal_canal_stenosis_l6_s1",
    ):
        with pytest.raises(ValueError, match="malformed row_id"):
            c.parse_row_id(bad)


def test_left_right_permutation_swaps_twins_and_is_an_involution() -> None:
    perm = c.LEFT_RIGHT_PERMUTATION
    assert sorted(perm.tolist()) == list(range(25))
    np.testing.assert_array_equal(perm[perm], np.arange(25))
    left = c.label_index("left_subarticular_stenosis", "l4_l5")
    right = c.label_index("right_subarticular_stenosis", "l4_l5")
    assert perm[left] == right and perm[right] == left
    spinal = c.label_index("spinal_canal_stenosis", "l3_l4")
    assert perm[spinal] == spinal


def test_wide_long_round_trip_keeps_unlabelled_as_unlabelled() -> None:
    wide = _labels(4)
    long = c.labels_to_long(wide)
    assert len(long) == int(wide[list(c.LABEL_COLUMNS)].notna().to_numpy().sum())
    back = c.long_to_wide(long)
    pd.testing.assert_frame_equal(
        back.set_index("study_id").sort_index(),
        wide.set_index("study_id").sort_index(),
        check_dtype=False,
    )
    idx = c.labels_to_indices(wide)
    assert ((idx == c.IGNORE_INDEX) == wide[list(c.LABEL_COLUMNS)].isna().to_numpy()).all()


def test_solution_is_one_hot_with_class_weights() -> None:
    wide = _labels(2)
    sol = c.labels_to_solution(wide)
    assert list(sol.columns) == ["row_id", *c.PRED_COLUMNS, "sample_weight"]
    onehot = sol[list(c.PRED_COLUMNS)].to_numpy()
    np.testing.assert_array_equal(onehot.sum(axis=1), 1)
    np.testing.assert_array_equal(
        sol["sample_weight"], np.array(c.CLASS_WEIGHTS)[onehot.argmax(axis=1)]
    )


def test_load_train_labels_accepts_good_file(tmp_path) -> None:
    path = tmp_path / "train.csv"
    _labels(3).to_csv(path, index=False)
    df = c.load_train_labels(path)
    assert df.shape == (3, 26)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop(columns=["spinal_canal_stenosis_l4_l5"]), "missing column"),
        (
            lambda df: df.assign(spinal_canal_stenosis_l1_l2="Mild"),
            "row 2: column 'spinal_canal_stenosis_l1_l2' has unknown severity 'Mild'",
        ),
        (lambda df: pd.concat([df, df.iloc[[0]]]), "row 5: duplicate study"),
        (lambda df: df.assign(study_id="x"), "must be an integer"),
    ],
)
def test_load_train_labels_names_file_row_and_problem(tmp_path, mutate, message) -> None:
    path = tmp_path / "train.csv"
    mutate(_labels(3)).to_csv(path, index=False)
    with pytest.raises(c.DataContractError, match="train.csv") as err:
        c.load_train_labels(path)
    assert message in str(err.value)


def test_load_label_coordinates_checks_spellings(tmp_path) -> None:
    path = tmp_path / "train_label_coordinates.csv"
    good = pd.DataFrame(
        {
            "study_id": [1, 1],
            "series_id": [10, 11],
            "instance_number": [3, 7],
            "condition": ["Spinal Canal Stenosis", "Left Neural Foraminal Narrowing"],
            "level": ["L1/L2", "L5/S1"],
            "x": [10.5, 20.0],
            "y": [30.0, 40.25],
        }
    )
    good.to_csv(path, index=False)
    df = c.load_label_coordinates(path)
    assert df["condition_key"].tolist() == [
        "spinal_canal_stenosis",
        "left_neural_foraminal_narrowing",
    ]
    assert df["level_key"].tolist() == ["l1_l2", "l5_s1"]
    good.assign(level=["L1-L2", "L5/S1"]).to_csv(path, index=False)
    with pytest.raises(c.DataContractError, match=r"row 2: unknown level 'L1-L2'"):
        c.load_label_coordinates(path)
    good.assign(condition=["spinal canal stenosis", "Left Neural Foraminal Narrowing"]).to_csv(
        path, index=False
    )
    with pytest.raises(c.DataContractError, match="unknown condition 'spinal canal stenosis'"):
        c.load_label_coordinates(path)


def test_load_series_descriptions(tmp_path) -> None:
    path = tmp_path / "test_series_descriptions.csv"
    df = pd.DataFrame(
        {"study_id": [1, 1], "series_id": [2, 3], "series_description": ["Axial T2", "Sagittal T1"]}
    )
    df.to_csv(path, index=False)
    assert len(c.load_series_descriptions(path)) == 2
    df.assign(series_description=["Axial T2", "Coronal T2"]).to_csv(path, index=False)
    with pytest.raises(c.DataContractError, match="row 3: unknown series_description 'Coronal T2'"):
        c.load_series_descriptions(path)
    with pytest.raises(c.DataContractError, match="file not found"):
        c.load_series_descriptions(tmp_path / "absent.csv")


def test_load_sample_submission_checks_row_ids(tmp_path) -> None:
    path = tmp_path / "sample_submission.csv"
    rows = c.study_row_ids(5)
    pd.DataFrame({"row_id": rows, "normal_mild": 1 / 3, "moderate": 1 / 3, "severe": 1 / 3}).to_csv(
        path, index=False
    )
    assert len(c.load_sample_submission(path)) == 25
    pd.DataFrame({"row_id": ["5_foo_l1_l2"], "normal_mild": 1, "moderate": 0, "severe": 0}).to_csv(
        path, index=False
    )
    with pytest.raises(c.DataContractError, match="malformed row_id"):
        c.load_sample_submission(path)


def test_write_csv_atomic_leaves_no_temp_files(tmp_path) -> None:
    path = tmp_path / "out" / "x.csv"
    c.write_csv_atomic(pd.DataFrame({"a": [1, 2]}), path)
    assert path.read_text() == "a\n1\n2\n"
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]
