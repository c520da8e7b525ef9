"""Operating points: Youden, F1-max and target sensitivity, chosen on validation only (cxrkit.evaluation)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from cxrkit.evaluation.evaluator import evaluate
from cxrkit.evaluation.metrics import Predictions, threshold_table
from cxrkit.evaluation.thresholds import (
    OperatingPoints,
    choose_thresholds,
    f1_threshold,
    sensitivity_threshold,
    youden_threshold,
)

# Hand-made: at threshold 0.8 -> TP 2, FP 0 (J 0.667, F1 0.8); at 0.35 -> TP 3, FP 1 (J 0.667, F1 0.857).
Y = np.array([0, 0, 1, 0, 1, 1], dtype=float)
S = np.array([0.1, 0.3, 0.35, 0.4, 0.8, 0.9])


def hand_predictions() -> Predictions:
    return Predictions(Y, S, np.array(list("abcdef")), ["Effusion"])


def test_youden_picks_the_highest_threshold_among_equal_j():
    assert youden_threshold(Y, S) == 0.8


def test_f1_max_threshold_on_hand_made_data():
    assert f1_threshold(Y, S) == 0.35


@pytest.mark.parametrize(("target", "expected"), [(0.9, 0.35), (0.6, 0.8), (0.3, 0.9), (1.0, 0.35)])
def test_target_sensitivity_gives_the_most_specific_threshold_reaching_it(target, expected):
    assert sensitivity_threshold(Y, S, target) == expected


def test_choosers_agree_with_brute_force_search():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    s = np.round(np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1), 2)
    candidates = np.unique(s)[::-1]  # highest first, so argmax returns the highest among ties
    predicted = s[None, :] >= candidates[:, None]
    tp = (predicted & (y == 1)).sum(axis=1)
    fp = (predicted & (y == 0)).sum(axis=1)
    sensitivity = tp / (y == 1).sum()
    j = sensitivity - fp / (y == 0).sum()
    f1 = 2 * tp / (2 * tp + fp + ((y == 1).sum() - tp))
    assert youden_threshold(y, s) == candidates[np.flatnonzero(j >= j.max() - 1e-12)[0]]
    assert f1_threshold(y, s) == candidates[np.flatnonzero(f1 >= f1.max() - 1e-12)[0]]
    assert sensitivity_threshold(y, s, 0.85) == candidates[np.flatnonzero(sensitivity >= 0.85)[0]]


def test_thresholds_reach_the_target_on_validation():
    pred = hand_predictions()
    thresholds = choose_thresholds(pred, "sensitivity", target_sensitivity=0.6)
    assert threshold_table(pred, thresholds).loc["Effusion", "sensitivity"] >= 0.6


def test_thresholds_are_plain_json_floats_and_round_trip(tmp_path):
    thresholds = choose_thresholds(hand_predictions(), "f1")
    assert json.loads(json.dumps(thresholds)) == {"Effusion": 0.35}
    assert all(type(value) is float for value in thresholds.values())
    points = OperatingPoints.fit(hand_predictions(), "sensitivity", target_sensitivity=0.9)
    loaded = OperatingPoints.load(points.save(tmp_path / "thresholds.json"))
    assert loaded == points
    assert "sensitivity >= 0.9" in loaded.describe() and "val split" in loaded.describe()
    (tmp_path / "bad.json").write_text('{"thresholds": {"X": "high"}, "method": "youden"}')
    with pytest.raises(ValueError, match=r"bad\.json"):
        OperatingPoints.load(tmp_path / "bad.json")


def test_single_class_validation_label_falls_back_with_a_warning(caplog):
    pred = Predictions(
        np.column_stack([Y, np.zeros(6)]),
        np.column_stack([S, S]),
        np.array(list("abcdef")),
        ["Effusion", "Hernia"],
    )
    with caplog.at_level(logging.WARNING):
        thresholds = choose_thresholds(pred, "youden", fixed_threshold=0.5)
    assert thresholds == {"Effusion": 0.8, "Hernia": 0.5}
    assert "Hernia" in caplog.text


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="threshold method"):
        choose_thresholds(hand_predictions(), "magic")


def _split(seed: int, n_patients: int = 80) -> Predictions:
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), 2)
    y = (rng.random((patient.size, 2)) < 0.3).astype(float)
    scores = 1 / (1 + np.exp(-(1.5 * y + rng.normal(0, 1, y.shape) - 1)))
    return Predictions(y, scores, np.array([f"s{seed}-{p}" for p in patient]), ["Mass", "Nodule"])


@pytest.mark.parametrize("method", ["youden", "f1", "sensitivity"])
def test_evaluation_takes_thresholds_from_validation_never_from_test(method):
    val, test = _split(1), _split(2)
    result = evaluate(test, val, threshold_method=method, n_replicates=20, subgroup_attributes=None)
    assert result.operating_points.thresholds == choose_thresholds(val, method)
    assert result.operating_points.source == "val"
    permuted = np.random.default_rng(3).permutation(len(test))
    shuffled = Predictions(test.y_true[permuted], test.y_score, test.patient_ids, test.labels)
    again = evaluate(shuffled, val, threshold_method=method, n_replicates=20, subgroup_attributes=None)
    assert again.operating_points.thresholds == result.operating_points.thresholds
    assert again.table.loc["Mass", "threshold"] == result.table.loc["Mass", "threshold"]


def test_without_validation_or_stored_points_the_threshold_is_fixed():
    test = _split(2)
    result = evaluate(test, n_replicates=20, subgroup_attributes=None)
    assert result.operating_points.thresholds == {"Mass": 0.5, "Nodule": 0.5}
    assert result.operating_points.source.startswith("default")
    stored = OperatingPoints({"Mass": 0.3, "Nodule": 0.7}, "youden", source="val")
    result = evaluate(test, operating_points=stored, n_replicates=20, subgroup_attributes=None)
    assert result.table.loc["Nodule", "threshold"] == 0.7
    with pytest.raises(ValueError, match="no threshold"):
        evaluate(test, operating_points=OperatingPoints({"Mass": 0.3}, "youden"), n_replicates=20)
