"""Metrics, patient bootstrap, paired comparison and leakage check (cxrkit.evaluation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxrkit.evaluation import bootstrap as bs
from cxrkit.evaluation import metrics
from cxrkit.evaluation.compare import compare_runs
from cxrkit.evaluation.leakage import check_patient_leakage
from cxrkit.evaluation.metrics import MACRO, MICRO, Predictions


def make_predictions(
    n_patients: int = 60,
    images_per_patient: int = 4,
    n_labels: int = 3,
    separation: float = 1.5,
    unknown: float = 0.1,
    seed: int = 0,
) -> Predictions:
    """Patients with several correlated images; scores rounded to create ties; some unknown targets."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), images_per_patient)
    n = patient.size
    y = (rng.random((n, n_labels)) < np.linspace(0.2, 0.4, n_labels)).astype(float)
    effect = rng.normal(0, 0.7, (n_patients, n_labels))[patient]
    logits = separation * y + effect + rng.normal(0, 1, (n, n_labels)) - 1
    scores = np.round(1 / (1 + np.exp(-logits)), 2)
    y[rng.random((n, n_labels)) < unknown] = np.nan
    labels = [f"L{j}" for j in range(n_labels)]
    return Predictions(y, scores, np.array([f"p{p}" for p in patient]), labels)


# ------------------------------------------------------------------------------------------ point metrics


def test_auroc_and_auprc_equal_scikit_learn_per_label_and_micro():
    pred = make_predictions()
    table = metrics.ranking_table(pred)
    for j, label in enumerate(pred.labels):
        known = ~np.isnan(pred.y_true[:, j])
        y, s = pred.y_true[known, j], pred.y_score[known, j]
        assert table.loc[label, "auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert table.loc[label, "auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert table.loc[label, "n"] == known.sum()
        assert table.loc[label, "n_pos"] == (y == 1).sum()
    known = ~np.isnan(pred.y_true.ravel())
    flat_y, flat_s = pred.y_true.ravel()[known], pred.y_score.ravel()[known]
    assert table.loc[MICRO, "auroc"] == pytest.approx(roc_auc_score(flat_y, flat_s), abs=1e-12)
    assert table.loc[MICRO, "auprc"] == pytest.approx(average_precision_score(flat_y, flat_s), abs=1e-12)
    assert table.loc[MACRO, "auroc"] == pytest.approx(table.loc[pred.labels, "auroc"].mean())


def test_unknown_targets_are_excluded_whatever_their_scores():
    pred = make_predictions(unknown=0.3)
    unknown = np.isnan(pred.y_true)
    scrambled = pred.y_score.copy()
    scrambled[unknown] = np.random.default_rng(5).random(unknown.sum())
    other = Predictions(pred.y_true, scrambled, pred.patient_ids, pred.labels)
    thresholds = {label: 0.4 for label in pred.labels}
    pd.testing.assert_frame_equal(metrics.ranking_table(pred), metrics.ranking_table(other))
    pd.testing.assert_frame_equal(
        metrics.threshold_table(pred, thresholds), metrics.threshold_table(other, thresholds)
    )
    counts = metrics.threshold_table(pred, thresholds)
    assert (counts.loc[pred.labels, ["tp", "fp", "tn", "fn"]].sum(axis=1) == (~unknown).sum(axis=0)).all()


def test_single_class_label_is_undefined_and_left_out_of_macro():
    pred = make_predictions()
    y = pred.y_true.copy()
    y[~np.isnan(y[:, 1]), 1] = 0.0  # L1 has no positive
    pred = Predictions(y, pred.y_score, pred.patient_ids, pred.labels)
    table = metrics.ranking_table(pred)
    assert np.isnan(table.loc["L1", "auroc"]) and np.isnan(table.loc["L1", "auprc"])
    assert table.loc[MACRO, "auroc"] == pytest.approx(table.loc[["L0", "L2"], "auroc"].mean())
    result = bs.bootstrap(pred, {label: 0.5 for label in pred.labels}, n_replicates=20)
    intervals = result.table()
    assert np.isnan(intervals.loc["L1", "auroc_low"]) and intervals.loc["L1", "auroc_replicates"] == 0
    assert np.isfinite(intervals.loc[MACRO, "auroc_low"])


def test_bootstrap_mean_averages_one_common_set_of_findings():
    """A rare finding undefined in some replicates makes those replicates' mean undefined; it never
    silently drops out of the average (which would mix means over different findings)."""
    pred = make_predictions(n_patients=40, images_per_patient=1, n_labels=3, unknown=0.0)
    y = pred.y_true.copy()
    y[:, 2] = 0.0
    y[:2, 2] = 1.0  # L2: two positive patients, absent from many replicates
    pred = Predictions(y, pred.y_score, pred.patient_ids, pred.labels)
    result = bs.bootstrap(pred, n_replicates=200, seed=3)
    per_label = result.per_label_samples()["auroc"]
    rare_undefined = np.isnan(per_label[:, 2])
    assert 10 < rare_undefined.sum() < 190
    mean = per_label[:, len(pred.labels)]
    assert np.isnan(mean[rare_undefined]).all()
    np.testing.assert_allclose(mean[~rare_undefined], per_label[~rare_undefined, :3].mean(axis=1))
    assert result.table().loc[MACRO, "auroc_replicates"] == (~rare_undefined).sum()


def test_no_finding_is_left_out_of_every_mean_unless_alone():
    pred = make_predictions(n_labels=3)
    pred = Predictions(pred.y_true, pred.y_score, pred.patient_ids, ["L0", "L1", "No Finding"])
    findings = ["L0", "L1"]
    table = metrics.ranking_table(pred)
    assert table.loc[MACRO, "auroc"] == pytest.approx(table.loc[findings, "auroc"].mean())
    rates = metrics.threshold_table(pred, {label: 0.4 for label in pred.labels})
    assert rates.loc[MACRO, "sensitivity"] == pytest.approx(rates.loc[findings, "sensitivity"].mean())
    samples = bs.bootstrap(pred, n_replicates=30).per_label_samples()["auroc"]
    np.testing.assert_allclose(samples[:, 3], samples[:, :2].mean(axis=1))
    same = compare_runs(pred, pred, n_replicates=30).table
    assert same.loc[MACRO, "auroc_a"] == pytest.approx(table.loc[MACRO, "auroc"])
    alone = pred.select_labels(["No Finding"])
    assert metrics.ranking_table(alone).loc[MACRO, "auroc"] == pytest.approx(
        metrics.ranking_table(alone).loc["No Finding", "auroc"]
    )
    assert metrics.mean_label_mask(["No Finding", "A"]).tolist() == [False, True]
    assert metrics.mean_label_mask(["No Finding"]).tolist() == [True]


def test_rates_at_a_threshold_equal_scikit_learn():
    pred = make_predictions(unknown=0.2)
    thresholds = {"L0": 0.3, "L1": 0.45, "L2": 0.6}
    table = metrics.threshold_table(pred, thresholds)
    for j, label in enumerate(pred.labels):
        known = ~np.isnan(pred.y_true[:, j])
        y = pred.y_true[known, j].astype(int)
        predicted = (pred.y_score[known, j] >= thresholds[label]).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
        row = table.loc[label]
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn)
        assert row["sensitivity"] == pytest.approx(recall_score(y, predicted))
        assert row["specificity"] == pytest.approx(recall_score(y, predicted, pos_label=0))
        assert row["precision"] == pytest.approx(precision_score(y, predicted))
        assert row["npv"] == pytest.approx(precision_score(y, predicted, pos_label=0))
        assert row["f1"] == pytest.approx(f1_score(y, predicted))
        assert row["accuracy"] == pytest.approx(accuracy_score(y, predicted))


def test_score_equal_to_threshold_counts_as_positive():
    pred = Predictions(np.array([1.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.2]), np.array(["a", "b", "c"]), ["X"])
    row = metrics.threshold_table(pred, {"X": 0.5}).loc["X"]
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (1, 1, 1, 0)


def test_multiclass_confusion_matrix_equals_scikit_learn():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 2 * np.eye(3)[truth]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = Predictions(np.eye(3)[truth], probs, np.arange(90).astype(str), ["A", "B", "C"], task="multiclass")
    matrix = metrics.multiclass_confusion(pred)
    np.testing.assert_array_equal(matrix.to_numpy(), confusion_matrix(truth, probs.argmax(axis=1)))
    assert list(matrix.index) == ["A", "B", "C"]


def test_binary_task_gets_two_by_two_matrix():
    pred = Predictions(
        np.array([1, 0, 1, 0.0]), np.array([0.9, 0.6, 0.4, 0.1]), np.array(list("abcd")), ["Pneumonia"]
    )
    matrix = metrics.multiclass_confusion(pred)
    assert matrix.to_numpy().tolist() == [[1, 1], [1, 1]]
    assert list(matrix.columns) == ["not Pneumonia", "Pneumonia"]


def test_predictions_reject_bad_input_and_round_trip_through_csv(tmp_path):
    with pytest.raises(ValueError, match="1, 0 or NaN"):
        Predictions(np.array([[2.0]]), np.array([[0.5]]), np.array(["a"]), ["X"])
    with pytest.raises(ValueError, match="probabilities"):
        Predictions(np.array([[1.0]]), np.array([[3.0]]), np.array(["a"]), ["X"])
    with pytest.raises(ValueError, match="patient_ids"):
        Predictions(np.array([[1.0], [0.0]]), np.array([[0.5], [0.2]]), np.array(["a"]), ["X"])
    pred = make_predictions(n_patients=5)
    metadata = pd.DataFrame({"sex": ["M", "F", "", "M"] * 5, "age": [30.0, np.nan, 70, 85] * 5})
    pred = Predictions(pred.y_true, pred.y_score, pred.patient_ids, pred.labels, metadata)
    loaded = Predictions.load(pred.save(tmp_path / "p.csv"))
    np.testing.assert_array_equal(loaded.y_true, pred.y_true)
    np.testing.assert_allclose(loaded.y_score, pred.y_score)
    assert loaded.labels == pred.labels and list(loaded.patient_ids) == list(pred.patient_ids)
    assert loaded.metadata["sex"].tolist() == metadata["sex"].tolist()
    assert np.isnan(loaded.metadata["age"][1])


# --------------------------------------------------------------------------------------------- bootstrap


def test_replicate_metrics_equal_scikit_learn_with_sample_weights():
    pred = make_predictions(n_patients=30, images_per_patient=3)
    resampler = bs.Resampler(pred.patient_ids, n_replicates=12, seed=7, chunk_size=5)
    samples = bs.run(
        resampler,
        {
            "ranking": bs.ranking_statistic(pred.y_true, pred.y_score, resampler),
            "micro": bs.micro_ranking_statistic(pred.y_true, pred.y_score, resampler),
        },
    )
    for r in range(12):
        weights = resampler.row_weights(r)
        for j in range(len(pred.labels)):
            known = ~np.isnan(pred.y_true[:, j])
            y, s, w = pred.y_true[known, j], pred.y_score[known, j], weights[known]
            assert samples["ranking"][r, j, 0] == pytest.approx(
                roc_auc_score(y, s, sample_weight=w), abs=1e-12
            )
            assert samples["ranking"][r, j, 1] == pytest.approx(
                average_precision_score(y, s, sample_weight=w), abs=1e-12
            )
        known = ~np.isnan(pred.y_true.ravel())
        y, s = pred.y_true.ravel()[known], pred.y_score.ravel()[known]
        w = np.repeat(weights, len(pred.labels))[known]
        assert samples["micro"][r, 0] == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def test_resampling_unit_is_the_patient():
    pred = make_predictions(n_patients=25, images_per_patient=4)
    resampler = bs.Resampler(pred.patient_ids, n_replicates=30, seed=1)
    for r in range(30):
        weights = resampler.row_weights(r)
        per_patient = pd.Series(weights).groupby(pred.patient_ids).agg(["min", "max"])
        assert (per_patient["min"] == per_patient["max"]).all()  # all images of a patient move together
        assert per_patient["min"].sum() == 25  # 25 patients drawn with replacement
    assert not np.array_equal(resampler.row_weights(0), resampler.row_weights(1))
    np.testing.assert_array_equal(
        resampler.row_weights(3), bs.Resampler(pred.patient_ids, 30, seed=1).row_weights(3)
    )


def test_intervals_cover_the_estimate_and_shrink_with_more_patients():
    small = make_predictions(n_patients=40, seed=2)
    large = make_predictions(n_patients=640, seed=2)
    widths = []
    for pred in (small, large):
        point = metrics.ranking_table(pred)
        table = bs.bootstrap(pred, {label: 0.5 for label in pred.labels}, n_replicates=200, seed=0).table()
        for name in ("auroc", "auprc"):
            for row in [*pred.labels, MACRO, MICRO]:
                assert table.loc[row, f"{name}_low"] <= point.loc[row, name] <= table.loc[row, f"{name}_high"]
        widths.append((table["auroc_high"] - table["auroc_low"]).loc[pred.labels].mean())
    assert widths[1] < widths[0] / 2.5  # 16x the patients: about 4x narrower


def test_duplicating_images_within_patients_does_not_narrow_patient_intervals():
    """Copies of a patient's images add no information: a patient bootstrap must not reward them, an image
    bootstrap (the wrong unit) narrows by about sqrt(copies)."""
    pred = make_predictions(n_patients=80, images_per_patient=1, n_labels=2, unknown=0.0, seed=4)
    copies = 9
    rows = np.repeat(np.arange(len(pred)), copies)
    duplicated = pred.subset(rows)

    def width(p: Predictions, unit: str) -> float:
        table = bs.bootstrap(p, n_replicates=300, seed=0, unit=unit, micro=False).table()
        return float((table["auroc_high"] - table["auroc_low"]).loc[p.labels].mean())

    patient_ratio = width(duplicated, "patient") / width(pred, "patient")
    image_ratio = width(duplicated, "image") / width(pred, "image")
    assert 0.8 < patient_ratio < 1.25
    assert image_ratio < 0.5


def test_rate_intervals_cover_the_rates_at_the_operating_point():
    pred = make_predictions(n_patients=100)
    thresholds = {label: 0.45 for label in pred.labels}
    point = metrics.threshold_table(pred, thresholds)
    table = bs.bootstrap(pred, thresholds, n_replicates=200).table()
    for name in metrics.RATE_COLUMNS:
        for row in [*pred.labels, MACRO, MICRO]:
            assert table.loc[row, f"{name}_low"] <= point.loc[row, name] <= table.loc[row, f"{name}_high"]


def test_percentile_interval_ignores_undefined_replicates():
    samples = np.array([[0.1, np.nan], [0.2, np.nan], [0.3, np.nan], [np.nan, np.nan]])
    low, high = bs.percentile_interval(samples, 0.5)
    assert low[0] == pytest.approx(0.15) and high[0] == pytest.approx(0.25)
    assert np.isnan(low[1]) and np.isnan(high[1])


# -------------------------------------------------------------------------------------------- comparison


def test_paired_comparison_of_identical_runs_contains_zero():
    pred = make_predictions(n_patients=80)
    result = compare_runs(pred, pred, n_replicates=200)
    row = result.table.loc[MACRO]
    assert row["difference"] == 0 and row["difference_low"] <= 0 <= row["difference_high"]
    assert row["p_value"] == 1.0


def test_paired_comparison_detects_a_clearly_better_run():
    weak = make_predictions(n_patients=150, separation=0.5, seed=9)
    rng = np.random.default_rng(9)
    strong_scores = np.clip(
        np.nan_to_num(weak.y_true, nan=0.5) * 0.5 + rng.random(weak.y_score.shape) * 0.6, 0, 1
    )
    strong = Predictions(weak.y_true, strong_scores, weak.patient_ids, weak.labels)
    result = compare_runs(weak, strong, names=("weak", "strong"), n_replicates=300)
    row = result.table.loc[MACRO]
    assert row["difference_low"] > 0 and row["p_value"] < 0.01
    assert "strong is better than weak" in result.summary()
    reverse = compare_runs(strong, weak, n_replicates=300).table.loc[MACRO]
    assert reverse["difference_high"] < 0


def test_paired_comparison_is_narrower_than_independent_intervals():
    a = make_predictions(n_patients=120, seed=11)
    noise = np.random.default_rng(12).normal(0, 0.02, a.y_score.shape)
    b = Predictions(a.y_true, np.clip(a.y_score + noise, 0, 1), a.patient_ids, a.labels)
    paired = compare_runs(a, b, n_replicates=300).table.loc[MACRO]
    single = bs.bootstrap(a, n_replicates=300).table().loc[MACRO]
    assert (
        paired["difference_high"] - paired["difference_low"]
        < (single["auroc_high"] - single["auroc_low"]) / 3
    )


def test_comparison_aligns_rows_by_path_and_rejects_other_test_sets():
    pred = make_predictions(n_patients=30)
    paths = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(pred))]})
    a = Predictions(pred.y_true, pred.y_score, pred.patient_ids, pred.labels, paths)
    order = np.random.default_rng(0).permutation(len(pred))
    b = a.subset(order)
    result = compare_runs(a, b, n_replicates=50)
    assert result.table.loc[MACRO, "difference"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="different"):
        compare_runs(a.subset(np.arange(10)), a, n_replicates=10)
    other_targets = Predictions(1 - np.nan_to_num(pred.y_true), pred.y_score, pred.patient_ids, pred.labels)
    with pytest.raises(ValueError, match="different targets"):
        compare_runs(pred, other_targets, n_replicates=10)


# ------------------------------------------------------------------------------------------------ leakage


def test_leakage_check_names_shared_patients():
    ids = ["p1", "p1", "p2", "p3", "p3", "p4"]
    splits = ["train", "test", "train", "val", "val", "test"]
    report = check_patient_leakage(ids, splits)
    assert not report.ok
    assert report.shared["train/test"] == ["p1"] and report.shared["train/val"] == []
    assert "1 patients in both train and test (e.g. p1)" in report.summary()
    clean = check_patient_leakage(["a", "b", "c"], ["train", "val", "test"])
    assert clean.ok and clean.summary().startswith("No patient appears in more than one split")
