"""`cxr evaluate` and `cxr compare` on tiny real runs trained for one epoch on NIH ChestX-ray14 images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from configs import tiny_run_config
from cxrkit.cli.main import cli
from cxrkit.config import load_config
from cxrkit.evaluation.metrics import Predictions
from cxrkit.evaluation.run import find_predictions, run_evaluation
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.training.run import train

LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule"]
#: Official-test images of the sample with an NIH box (all of them are test images).
BOXED = ["00001369_000.png", "00002578_000.png", "00004296_000.png", "00015649_000.png"]


def nih_table(nih: Path, n_test: int = 12, n_val: int = 12, n_train: int = 16) -> pd.DataFrame:
    """A small labelled table of real NIH images: official-test images (boxed ones first) as test, and a
    validation split holding a positive and a negative of every label."""
    entries = pd.read_csv(nih / "Data_Entry_2017_subset.csv").sort_values("Image Index")
    test_names = set((nih / "official_split" / "test_list.txt").read_text().split())
    findings = entries["Finding Labels"].str.split("|")
    for label in LABELS:
        entries[label] = findings.apply(lambda f, label=label: int(label in f))
    is_test = entries["Image Index"].isin(test_names)
    test = pd.concat([entries[entries["Image Index"].isin(BOXED)], entries[is_test]]).drop_duplicates()
    rest = entries[~is_test]
    val_names: list[str] = []
    for label in LABELS:
        val_names += rest[rest[label] == 1]["Image Index"].head(2).tolist()
    val_names += rest[rest[LABELS].sum(axis=1) == 0]["Image Index"].head(2).tolist()
    val = rest[rest["Image Index"].isin(val_names)].head(n_val)
    trainset = rest[~rest["Image Index"].isin(val["Image Index"])].head(n_train)
    parts = [(test.head(n_test), "test"), (val, "val"), (trainset, "train")]
    frame = pd.concat([part.assign(split=name) for part, name in parts])
    return pd.DataFrame(
        {
            "path": [str(nih / "images" / name) for name in frame["Image Index"]],
            "patient": frame["Patient ID"].astype(str).to_numpy(),
            "sex": frame["Patient Gender"].to_numpy(),
            "age": frame["Patient Age"].to_numpy(),
            "view": frame["View Position"].to_numpy(),
            "split": frame["split"].to_numpy(),
            **{label: frame[label].to_numpy() for label in LABELS},
        }
    )


def run_config(
    root: Path, table_csv: Path, name: str, seed: int, cache_dir: Path, size: int = 64, crop: int = 56
) -> dict:
    table = {
        "adapter": "table",
        "root": str(table_csv),
        "options": {
            "label_columns": LABELS,
            "patient_column": "patient",
            "split_column": "split",
            "sex_column": "sex",
            "age_column": "age",
            "view_column": "view",
        },
    }
    return tiny_run_config(
        name,
        root / name,
        [table],
        cache_dir,
        image_size=size,
        crop_size=crop,
        seed=seed,
        data={"labels": LABELS},
    )


def write_yaml(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, nih_sample) -> dict:
    """Two runs (seeds 1 and 2) on the same data and cache, trained for one epoch."""
    root = tmp_path_factory.mktemp("eval")
    table = nih_table(nih_sample)
    table_csv = root / "table.csv"
    table.to_csv(table_csv, index=False)
    out = {"root": root, "table": table, "table_csv": table_csv}
    for name, seed in (("a", 1), ("b", 2)):
        spec = run_config(root, table_csv, name, seed, root / "cache")
        out[name] = train(load_config(write_yaml(root / f"{name}.yaml", spec)))
        out[f"{name}_spec"] = spec
    return out


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def relabelled_config(runs: dict, name: str, split: str) -> Path:
    """A config over the same images with the labels of ``split`` inverted (1 <-> 0), its own cache copy."""
    root = runs["root"]
    table = runs["table"].copy()
    rows = table["split"] == split
    table.loc[rows, LABELS] = 1 - table.loc[rows, LABELS]
    table_csv = root / f"table_{name}.csv"
    table.to_csv(table_csv, index=False)
    cache_dir = root / f"cache_{name}"
    if not cache_dir.exists():
        shutil.copytree(root / "cache", cache_dir)  # same files: the shards are reused, labels re-read
    spec = run_config(root, table_csv, "a", 1, cache_dir)
    return write_yaml(root / f"{name}.yaml", spec)


# ---- tests ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.shared_data
def test_evaluate_writes_report_predictions_and_validation_thresholds(runs):
    run_dir = runs["a"]
    output = invoke("evaluate", run_dir, "--replicates", 50)
    out_dir = run_dir / "evaluation" / "test-best"
    for name in (
        "report.html",
        "report.md",
        "evaluation.json",
        "per_finding.csv",
        "thresholds.json",
        "predictions.csv",
        "predictions_val.csv",
        "roc_curves.png",
        "examples.png",
        "training_curves.png",
        "subgroups.csv",
    ):
        assert (out_dir / name).is_file(), name
    assert f"report: {out_dir / 'report.html'}" in output
    assert f"operating points for `cxr export`: {run_dir / 'thresholds.json'}" in output

    # predictions round-trip and carry the test images with their labels, patients and metadata
    test = Predictions.load(out_dir / "predictions.csv")
    table = runs["table"].set_index("path")
    expected = table[table["split"] == "test"]
    assert test.labels == LABELS and len(test) == len(expected)
    assert set(test.metadata["path"]) == set(expected.index)
    truth = table.loc[test.metadata["path"], LABELS].to_numpy(dtype=float)
    np.testing.assert_array_equal(test.y_true, truth)
    assert list(test.patient_ids) == [f"table:{p}" for p in table.loc[test.metadata["path"], "patient"]]
    assert set(test.metadata["sex"]) <= {"M", "F"} and test.metadata["age"].between(1, 100).all()
    assert ((test.y_score >= 0) & (test.y_score <= 1)).all()
    again = Predictions.load(test.save(runs["root"] / "roundtrip.csv"))
    np.testing.assert_array_equal(again.y_score, test.y_score)

    # the report's numbers are the predictions' numbers, and every finding is printed with its interval
    report = json.loads((out_dir / "evaluation.json").read_text())
    per_label = {row["label"]: row for row in report["metrics"]}
    html = (out_dir / "report.html").read_text()
    for j, label in enumerate(LABELS):
        auroc = roc_auc_score(test.y_true[:, j], test.y_score[:, j])
        assert per_label[label]["auroc"] == pytest.approx(auroc)
        line = next(line for line in output.splitlines() if line.startswith(label))
        assert f"{auroc:.3f} [" in line
        assert label in html and f"{auroc:.3f}" in html
    assert report["leakage"]["ok"] is True and report["settings"]["n_replicates"] == 50
    assert report["settings"]["split"] == "test" and report["settings"]["checkpoint"] == "best"

    # operating points: fitted on the validation predictions, saved for `cxr export`
    val = Predictions.load(out_dir / "predictions_val.csv")
    assert len(val) == (runs["table"]["split"] == "val").sum()
    saved = OperatingPoints.load(run_dir / "thresholds.json")
    assert saved.source == "val" and saved.method == "youden" and saved.n_images == len(val)
    assert saved.extra["checkpoint"] == "best"
    assert saved.thresholds == pytest.approx(OperatingPoints.fit(val, "youden").thresholds)
    assert OperatingPoints.load(out_dir / "thresholds.json").thresholds == saved.thresholds


@pytest.mark.slow
@pytest.mark.shared_data
def test_thresholds_ignore_test_labels_and_follow_validation_labels(runs):
    run_dir = runs["a"]
    options = {"n_replicates": 20, "n_examples": 0, "progress": False}
    first = run_evaluation(run_dir, out=runs["root"] / "plain", **options)
    saved = json.loads((run_dir / "thresholds.json").read_text())["thresholds"]

    flipped_test = run_evaluation(
        run_dir,
        config=relabelled_config(runs, "flip_test", "test"),
        out=runs["root"] / "flip_test",
        **options,
    )
    assert json.loads((run_dir / "thresholds.json").read_text())["thresholds"] == saved
    assert flipped_test.result.operating_points.thresholds == first.result.operating_points.thresholds
    for label in LABELS:  # the test labels were used: inverted labels invert the AUROC
        before, after = first.result.table.loc[label, "auroc"], flipped_test.result.table.loc[label, "auroc"]
        assert after == pytest.approx(1 - before)

    flipped_val = run_evaluation(
        run_dir, config=relabelled_config(runs, "flip_val", "val"), out=runs["root"] / "flip_val", **options
    )
    changed = flipped_val.result.operating_points.thresholds
    assert changed != first.result.operating_points.thresholds, "thresholds must follow the validation labels"
    assert json.loads((run_dir / "thresholds.json").read_text())["thresholds"] == saved  # -c: report only


@pytest.mark.slow
@pytest.mark.shared_data
def test_tta_scores_are_evaluated_and_plain_scores_set_the_export_thresholds(runs):
    plain = run_evaluation(runs["a"], n_replicates=20, n_examples=0, progress=False)
    tta_run = runs["root"] / "a_tta"
    shutil.copytree(runs["a"], tta_run, ignore=shutil.ignore_patterns("evaluation", "thresholds.json"))
    config = yaml.safe_load((tta_run / "config.yaml").read_text())
    config["train"]["tta"] = True
    (tta_run / "config.yaml").write_text(yaml.safe_dump(config))

    tta = run_evaluation(tta_run, n_replicates=20, n_examples=0, progress=False)
    assert tta.result.settings["tta"] is True
    tta_scores, plain_scores = tta.result.predictions.y_score, plain.result.predictions.y_score
    assert not np.allclose(tta_scores, plain_scores)  # six views averaged
    # the report's operating points come from the TTA validation scores it evaluates with ...
    tta_val = Predictions.load(tta.out_dir / "predictions_val.csv")
    assert tta.result.operating_points.thresholds == pytest.approx(OperatingPoints.fit(tta_val).thresholds)
    # ... while the exported bundle, which predicts single views, gets thresholds of the plain scores
    plain_val = Predictions.load(plain.out_dir / "predictions_val.csv")
    assert OperatingPoints.fit(plain_val).thresholds != pytest.approx(OperatingPoints.fit(tta_val).thresholds)
    saved = OperatingPoints.load(tta_run / "thresholds.json")
    assert saved.thresholds == pytest.approx(OperatingPoints.fit(plain_val).thresholds)
    assert "no test-time augmentation" in saved.extra["scores"]


@pytest.mark.slow
@pytest.mark.shared_data
def test_compare_two_runs_from_saved_predictions(runs):
    result = CliRunner().invoke(cli, ["compare", str(runs["a"]), str(runs["b"])])
    assert result.exit_code != 0 and "cxr evaluate" in result.output  # b not evaluated yet

    for name in ("a", "b"):
        invoke("evaluate", runs[name], "--replicates", 20)
    out = runs["root"] / "comparison"
    output = invoke("compare", runs["a"], runs["b"], "--replicates", 100, "--out", out)
    assert "b vs a: mean AUROC" in output and f"report: {out / 'report.html'}" in output
    table = pd.read_csv(out / "comparison.csv", index_col="label")
    assert list(table.index) == [*LABELS, "macro"]
    for name, column in (("a", "auroc_a"), ("b", "auroc_b")):
        own = pd.read_csv(runs[name] / "evaluation/test-best/per_finding.csv", index_col="label")
        np.testing.assert_allclose(table.loc[LABELS, column], own.loc[LABELS, "auroc"])
    np.testing.assert_allclose(table["difference"], table["auroc_b"] - table["auroc_a"])
    assert (table["difference_low"] <= table["difference"] + 1e-12).all()
    assert (table["difference"] <= table["difference_high"] + 1e-12).all()
    payload = json.loads((out / "comparison.json").read_text())
    assert payload["n_replicates"] == 100 and payload["names"] == ["a", "b"]
    assert find_predictions(runs["a"]) == runs["a"] / "evaluation/test-best/predictions.csv"


@pytest.mark.slow
@pytest.mark.shared_data
def test_evaluate_a_bundle_uses_its_thresholds(runs):
    from cxrkit.inference.export import export_run

    run_dir = runs["a"]
    evaluation = run_evaluation(run_dir, n_replicates=20, n_examples=0, progress=False)
    bundle_path = runs["root"] / "a.cxr"
    export_run(run_dir, bundle_path)
    output = invoke("evaluate", bundle_path, "--replicates", 20)
    out_dir = runs["root"] / "a-evaluation" / "test"
    assert f"report: {out_dir / 'report.html'}" in output
    points = json.loads((out_dir / "thresholds.json").read_text())
    assert points["thresholds"] == pytest.approx(OperatingPoints.load(run_dir / "thresholds.json").thresholds)
    scores = Predictions.load(out_dir / "predictions.csv").y_score
    np.testing.assert_allclose(scores, evaluation.result.predictions.y_score, atol=1e-5)


def test_cli_errors_name_the_problem(tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "run directory or bundle not found" in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path)])
    assert result.exit_code != 0 and "neither a cxrkit run directory" in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path), "--threshold-method", "median"])
    assert result.exit_code != 0 and "median" in result.output
    result = CliRunner().invoke(cli, ["compare", str(tmp_path), str(tmp_path)])
    assert result.exit_code != 0 and "no saved predictions" in result.output
