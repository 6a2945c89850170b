"""Temperature calibration: the scaling formula, the fit, and the run's calibration.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from lsdc.contract import CLASS_WEIGHTS, CONDITIONS, LABEL_COLUMNS, PRED_COLUMNS, all_row_ids
from lsdc.errors import UserError
from lsdc.evaluation.calibration import (
    Calibration,
    fit_temperatures,
    load_calibration,
    save_calibration,
    temperature_scale,
)
from lsdc.evaluation.metric import weighted_log_loss


def test_temperature_scale_is_softmax_of_logits_over_t() -> None:
    logits = np.random.default_rng(0).normal(size=(7, 3))
    p = softmax(logits, axis=-1)
    for t in (0.5, 1.0, 2.5):
        np.testing.assert_allclose(
            temperature_scale(p, t), softmax(logits / t, axis=-1), atol=1e-12
        )
    powered = p ** (1 / 2.5)
    np.testing.assert_allclose(temperature_scale(p, 2.5), powered / powered.sum(1, keepdims=True))


def test_temperature_scale_keeps_zero_probability_rows_finite() -> None:
    out = temperature_scale(np.array([[1.0, 0.0, 0.0]]), 3.0)
    assert np.isfinite(out).all() and out.sum() == pytest.approx(1.0)


def _sample(rng: np.random.Generator, n: int, sharpness: float) -> tuple:
    """Rows whose true class follows softmax(z); the predictions are softmax(sharpness * z)."""
    z = rng.normal(scale=2.0, size=(n, 3))
    target = np.array([rng.choice(3, p=q) for q in softmax(z, axis=1)])
    return target, softmax(sharpness * z, axis=1)


def test_fit_recovers_the_temperature_that_undoes_overconfidence() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    conditions = np.repeat(CONDITIONS, n // len(CONDITIONS))
    target, probs = _sample(rng, n, sharpness=3.0)  # 3x overconfident: T should be near 3
    weights = np.ones(n)  # unweighted so the true answer is T = 3 exactly in expectation
    temps = fit_temperatures(conditions, target, probs, weights)
    assert set(temps) == set(CONDITIONS)
    for t in temps.values():
        assert 2.4 < t < 3.6
    onehot = np.eye(3)[target]
    calibrated = Calibration(temps).apply_to_frame(
        pd.DataFrame(probs, columns=list(PRED_COLUMNS)).assign(
            row_id=[f"1_{c}_l1_l2" for c in conditions]
        )
    )
    after = weighted_log_loss(onehot, calibrated[list(PRED_COLUMNS)].to_numpy(), weights)
    assert after < weighted_log_loss(onehot, probs, weights) - 0.1


def test_fit_never_worsens_the_weighted_loss_and_ignores_absent_conditions() -> None:
    rng = np.random.default_rng(2)
    target, probs = _sample(rng, 400, sharpness=1.0)
    weights = np.asarray(CLASS_WEIGHTS)[target]
    conditions = np.array(["spinal_canal_stenosis"] * 400)
    temps = fit_temperatures(conditions, target, probs, weights)
    assert temps["left_subarticular_stenosis"] == 1.0
    onehot = np.eye(3)[target]
    before = weighted_log_loss(onehot, probs, weights)
    after = weighted_log_loss(
        onehot, temperature_scale(probs, temps["spinal_canal_stenosis"]), weights
    )
    assert after <= before + 1e-9


def test_array_and_frame_application_agree_per_condition() -> None:
    temps = {c: 0.5 + i for i, c in enumerate(CONDITIONS)}
    cal = Calibration(temps)
    probs = softmax(np.random.default_rng(3).normal(size=(2, 25, 3)), axis=-1)
    frame = pd.DataFrame(probs.reshape(-1, 3), columns=list(PRED_COLUMNS))
    frame.insert(0, "row_id", all_row_ids([10, 11]))
    from_frame = cal.apply_to_frame(frame)[list(PRED_COLUMNS)].to_numpy().reshape(2, 25, 3)
    np.testing.assert_allclose(cal.apply_to_array(probs), from_frame, atol=1e-12)
    foraminal = LABEL_COLUMNS.index("left_neural_foraminal_narrowing_l3_l4")
    np.testing.assert_allclose(
        cal.apply_to_array(probs)[:, foraminal], temperature_scale(probs[:, foraminal], 1.5)
    )


def test_calibration_json_round_trip_and_absence(tmp_path) -> None:
    assert load_calibration(tmp_path) is None
    cal = Calibration({c: 1.25 for c in CONDITIONS}, {"fitted_on": "oof.csv"})
    path = save_calibration(cal, tmp_path)
    assert json.loads(path.read_text())["temperatures"]["spinal_canal_stenosis"] == 1.25
    loaded = load_calibration(tmp_path)
    assert loaded.temperatures == cal.temperatures
    assert loaded.info == {"fitted_on": "oof.csv"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"temperatures": {"spinal_canal_stenosis": -1}}', "positive number"),
        ('{"temperatures": {"knee": 1.0}}', "unknown condition"),
        ('{"format": 1}', "no 'temperatures'"),
    ],
)
def test_bad_calibration_file_is_a_user_error_naming_it(tmp_path, content, message) -> None:
    (tmp_path / "calibration.json").write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_calibration(tmp_path)
    assert "calibration.json" in str(info.value)
