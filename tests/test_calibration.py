"""Calibration: ECE, reliability tables and temperature scaling (cxrkit.evaluation.calibration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_calibration_error

from cxrkit.evaluation import calibration as cal
from cxrkit.evaluation.metrics import MACRO, MICRO, Predictions, auroc


def test_ece_on_a_hand_computed_example():
    # Two bins: [0, .5) holds .1, .15 (mean .125, observed 1/2); [.5, 1] holds .6, .7, .95 (mean .75,
    # observed 2/3). ECE = 2/5 * |.5 - .125| + 3/5 * |2/3 - .75| = .15 + .05 = .2
    y = np.array([0, 1, 1, 0, 1], dtype=float)
    p = np.array([0.1, 0.15, 0.6, 0.7, 0.95])
    assert cal.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.2)
    table = cal.reliability_table(y, p, n_bins=2)
    assert table["count"].tolist() == [2, 3]
    assert table["mean_predicted"].tolist() == pytest.approx([0.125, 0.75])
    assert table["fraction_positive"].tolist() == pytest.approx([0.5, 2 / 3])


def test_ece_matches_torchmetrics_l1_calibration_error():
    rng = np.random.default_rng(0)
    p = rng.random(2000) * 0.999
    y = (rng.random(2000) < p**1.5).astype(float)
    expected = binary_calibration_error(torch.tensor(p), torch.tensor(y).long(), n_bins=10, norm="l1")
    assert cal.expected_calibration_error(y, p, n_bins=10) == pytest.approx(float(expected), abs=1e-6)


def test_probability_one_falls_in_the_last_bin_and_unknowns_are_dropped():
    y = np.array([1, 0, np.nan, 1])
    p = np.array([1.0, 0.0, 0.99, 0.5])
    table = cal.reliability_table(y, p, n_bins=4)
    assert table["count"].tolist() == [1, 0, 1, 1]
    assert cal.expected_calibration_error(y, p, n_bins=4) == pytest.approx(0.5 / 3)


def test_perfectly_calibrated_bins_have_zero_ece():
    p = np.repeat([0.05, 0.55], 20)
    y = np.concatenate([np.r_[1, np.zeros(19)], np.r_[np.ones(11), np.zeros(9)]])
    assert cal.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.0)


def test_calibration_table_has_labels_macro_and_micro():
    pred = overconfident(200, seed=1)
    table = cal.calibration_table(pred, n_bins=10)
    assert list(table.index) == [*pred.labels, MACRO, MICRO]
    assert table.loc[MACRO, "ece"] == pytest.approx(table.loc[pred.labels, "ece"].mean())
    known = ~np.isnan(pred.y_true.ravel())
    pooled = cal.expected_calibration_error(pred.y_true.ravel()[known], pred.y_score.ravel()[known], 10)
    assert table.loc[MICRO, "ece"] == pytest.approx(pooled)


def overconfident(n: int, seed: int, temperatures=(3.0, 3.0)) -> Predictions:
    """Targets drawn from sigmoid(z); the model reports sigmoid(T * z): overconfident by T per label."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, len(temperatures)))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    y[rng.random(z.shape) < 0.05] = np.nan
    scores = 1 / (1 + np.exp(-z * np.asarray(temperatures)))
    return Predictions(y, scores, np.arange(n).astype(str), ["A", "B"][: len(temperatures)])


def test_temperature_scaling_reduces_nll_and_ece_on_held_out_data():
    val, test = overconfident(3000, seed=2), overconfident(3000, seed=3)
    scaler = cal.TemperatureScaler.fit(val)
    assert scaler.temperature.shape == (1,)
    assert scaler.temperature[0] == pytest.approx(3.0, rel=0.15)
    scaled = scaler.transform(test)
    before, after = cal.calibration_table(test), cal.calibration_table(scaled)
    assert after.loc[MICRO, "nll"] < before.loc[MICRO, "nll"] - 0.02
    assert after.loc[MICRO, "ece"] < before.loc[MICRO, "ece"] / 2
    for j in range(2):  # ranking untouched
        assert auroc(scaled.y_true[:, j], scaled.y_score[:, j]) == pytest.approx(
            auroc(test.y_true[:, j], test.y_score[:, j])
        )


def test_per_label_temperatures_recover_each_labels_miscalibration():
    val = overconfident(4000, seed=4, temperatures=(0.5, 3.0))
    scaler = cal.TemperatureScaler.fit(val, per_label=True)
    assert scaler.temperature == pytest.approx([0.5, 3.0], rel=0.15)
    restored = cal.TemperatureScaler.from_dict(scaler.to_dict(), val.labels)
    np.testing.assert_allclose(restored.temperature, scaler.temperature)
    assert scaler.to_dict()["per_label"] is True


def test_multiclass_temperature_reduces_cross_entropy():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 1.2, (3000, 3))
    truth = np.array([rng.choice(3, p=np.exp(row) / np.exp(row).sum()) for row in z])
    sharp = np.exp(3 * z) / np.exp(3 * z).sum(axis=1, keepdims=True)
    pred = Predictions(
        np.eye(3)[truth], sharp, np.arange(3000).astype(str), ["a", "b", "c"], task="multiclass"
    )
    scaler = cal.TemperatureScaler.fit(pred.subset(np.arange(1500)))
    held_out = pred.subset(np.arange(1500, 3000))
    scaled = scaler.transform(held_out)

    def cross_entropy(p: Predictions) -> float:
        return float(-np.mean(np.log(p.y_score[np.arange(len(p)), p.y_true.argmax(axis=1)])))

    assert scaler.temperature[0] == pytest.approx(3.0, rel=0.2)
    assert cross_entropy(scaled) < cross_entropy(held_out) - 0.05
    np.testing.assert_allclose(scaled.y_score.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="per-label"):
        cal.TemperatureScaler.fit(pred, per_label=True)


def test_temperature_from_dict_rejects_non_positive_values():
    with pytest.raises(ValueError, match="positive"):
        cal.TemperatureScaler.from_dict({"temperature": -1.0}, ["A"])
