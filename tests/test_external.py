"""Frozen run splits, external evaluation and site calibration on a tiny real pneumonia run (one epoch)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from bundles import tiny_bundle
from configs import tiny_run_config
from cxrkit.cli.main import cli
from cxrkit.config import load_config
from cxrkit.data.manifest import Manifest
from cxrkit.data.run_manifest import RUN_MANIFEST_FILE, load_run_manifest, run_manifest_hash
from cxrkit.demo import DemoResult, run_site
from cxrkit.evaluation.external import evaluate_external
from cxrkit.evaluation.metrics import Predictions
from cxrkit.evaluation.run import run_evaluation
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.inference.bundle import Bundle, BundleError
from cxrkit.inference.calibrate import cross_fitted_decisions
from cxrkit.inference.export import export_run
from cxrkit.training.run import train

CLASSES = ("NORMAL", "PNEUMONIA")


def _link(source: Path, target: Path, names: list[str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).symlink_to(source / name)


def _images(folder: Path) -> list[str]:
    return sorted(image.name for image in folder.glob("*.jpeg"))


@pytest.fixture(scope="module")
def site(tmp_path_factory, pneumonia_root: Path) -> dict:
    """A run trained one epoch on 2x20 pneumonia/train images, and a 2x8 sample of pneumonia/test."""
    root = tmp_path_factory.mktemp("site")
    for label in CLASSES:
        _link(
            pneumonia_root / "train" / label,
            root / "data" / "train" / label,
            _images(pneumonia_root / "train" / label)[:20],
        )
        _link(
            pneumonia_root / "test" / label,
            root / "site" / "test" / label,
            _images(pneumonia_root / "test" / label)[:8],
        )
    spec = tiny_run_config(
        "tiny-pneumonia",
        root / "run",
        [{"adapter": "folder", "root": str(root / "data" / "train")}],
        root / "cache",
        data={"split": {"method": "random", "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
    )
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(spec))
    return {"root": root, "run": train(load_config(config_path)), "pneumonia": pneumonia_root}


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.shared_data
def test_run_stores_its_manifest_with_patient_disjoint_splits(site):
    stored = load_run_manifest(site["run"])
    assert (site["run"] / RUN_MANIFEST_FILE).is_file() and len(stored) == 40
    assert set(stored.frame["split"]) == {"train", "val", "test"}
    assert stored.frame.groupby("patient_id")["split"].nunique().max() == 1
    assert len(run_manifest_hash(site["run"])) == 64
    tampered = stored.frame.copy()
    tampered.loc[0, "split"] = "test" if tampered.loc[0, "split"] != "test" else "train"
    Manifest(tampered, stored.labels).save(site["run"].parent / "tampered" / RUN_MANIFEST_FILE)
    (site["run"].parent / "tampered" / "data_manifest.json").write_text(
        (site["run"] / "data_manifest.json").read_text()
    )
    with pytest.raises(ValueError, match="modified after training"):
        load_run_manifest(site["run"].parent / "tampered")


@pytest.mark.slow
@pytest.mark.shared_data
def test_evaluating_after_images_changed_scores_the_original_test_set(site, caplog):
    run, data = site["run"], site["root"] / "data" / "train"
    stored = load_run_manifest(run).frame
    original_test = set(stored.loc[stored["split"] == "test", "path"])
    removed = sorted(original_test)[0]
    for label in CLASSES:  # 2x6 new images appear, one test image disappears
        _link(
            site["pneumonia"] / "train" / label,
            data / label,
            _images(site["pneumonia"] / "train" / label)[20:26],
        )
    Path(removed).unlink()
    try:
        with caplog.at_level("WARNING"):
            evaluation = run_evaluation(
                run, n_replicates=20, n_examples=0, progress=False, out=site["root"] / "eval-grown"
            )
    finally:
        Path(removed).symlink_to(site["pneumonia"] / "train" / Path(removed).parent.name / Path(removed).name)
    scored = Predictions.load(evaluation.paths["predictions"]).metadata["path"]
    assert set(scored) == original_test - {removed}
    assert "12 images appeared since the run was trained" in caplog.text
    assert "1 test images of the run are no longer in the data" in caplog.text
    assert evaluation.result.leakage.ok and "run train/test" in evaluation.result.leakage.shared


@pytest.mark.slow
@pytest.mark.shared_data
def test_external_evaluation_reports_both_sets_and_never_touches_the_run(site):
    run = site["run"]
    before = _snapshot(run)
    out = site["root"] / "external"
    ext = evaluate_external(run, site["root"] / "site" / "test", out=out, n_replicates=20, progress=False)
    assert _snapshot(run) == before  # nothing of the run written, thresholds.json included
    missing = CliRunner().invoke(cli, ["evaluate", str(run), "--data", str(site["root"] / "nowhere")])
    assert missing.exit_code != 0 and "external data not found" in missing.output
    assert ext.internal is not None and len(ext.external.predictions) == 16
    assert ext.external.labels == ["Pneumonia"]
    assert all(":test:" in str(p) for p in ext.external.predictions.patient_ids)  # ids scoped to test/
    table = pd.read_csv(out / "side_by_side.csv")
    for column in (
        "internal_auroc",
        "external_auroc_low",
        "difference_auroc_high",
        "external_sensitivity",
        "external_specificity",
        "external_ece",
    ):
        assert column in table.columns
    assert ext.internal.operating_points.thresholds == ext.external.operating_points.thresholds
    assert (out / "score_distributions.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "External evaluation" in html and "internal - external" in html
    payload = json.loads((out / "external.json").read_text())
    assert payload["data"].endswith("test") and payload["skipped"] == []


@pytest.mark.slow
@pytest.mark.shared_data
def test_export_refuses_thresholds_fitted_on_another_checkpoint(site):
    run = site["run"]
    run_evaluation(run, n_replicates=20, n_examples=0, progress=False, out=site["root"] / "eval-export")
    saved = json.loads((run / "thresholds.json").read_text())
    assert saved["extra"]["split"] == "val" and saved["extra"]["data_sha256"] == run_manifest_hash(run)
    bundle = export_run(run, site["root"] / "tiny.cxr")
    assert bundle.thresholds == pytest.approx(saved["thresholds"])
    tampered = {**saved, "extra": {**saved["extra"], "checkpoint_sha256": "0" * 64}}
    (site["root"] / "other.json").write_text(json.dumps(tampered))
    with pytest.raises(BundleError, match="another checkpoint"):
        export_run(run, thresholds_path=site["root"] / "other.json")


@pytest.mark.slow
@pytest.mark.shared_data
def test_calibrate_writes_a_site_version_that_predict_uses(site):
    bundle_path = site["root"] / "tiny.cxr"
    if not bundle_path.exists():
        export_run(site["run"], bundle_path)
    out = site["root"] / "tiny-site.cxr"
    sample = site["root"] / "site" / "test"
    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            str(bundle_path),
            "--data",
            str(sample),
            "--out",
            str(out),
            "--temperature",
            "global",
            "--replicates",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "positives are needed" in result.output  # 16 images: too few
    old, new = Bundle.load(bundle_path), Bundle.load(out)
    record = new.provenance["site_calibration"]
    assert new.version == f"{old.version}+site.site-test" and record["images"] == 16
    assert record["site"] in new.threshold_source and "16 images" in new.threshold_source
    row = record["per_label"][0]
    assert row["sensitivity_low"] <= row["sensitivity"] <= row["sensitivity_high"]
    temperature = record["temperature"]["temperature"]
    # the new bundle outputs the temperature-scaled probabilities and its thresholds are Youden's on them
    before = evaluate_external(
        bundle_path, sample, out=site["root"] / "ext-old", n_replicates=20, progress=False
    )
    after = evaluate_external(out, sample, out=site["root"] / "ext-new", n_replicates=20, progress=False)
    assert before.model.backend == after.model.backend == "torch"  # what these bundles serve
    with pytest.raises(ValueError, match="has no ONNX graph"):  # the graph asked for is the graph scored
        evaluate_external(bundle_path, sample, out=site["root"] / "ext-onnx", backend="onnx")
    old_logits, new_logits = before.external.predictions.logits(), after.external.predictions.logits()
    np.testing.assert_allclose(new_logits, old_logits / temperature, rtol=1e-3, atol=1e-3)
    refit = OperatingPoints.fit(after.external.predictions)
    assert refit.thresholds == pytest.approx(new.thresholds, abs=1e-6)
    assert after.external.table.loc["Pneumonia", "sensitivity"] == pytest.approx(row["sensitivity"])

    predicted = CliRunner().invoke(
        cli, ["predict", str(out), str(sample), "--out", str(site["root"] / "p.csv")]
    )
    assert predicted.exit_code == 0, predicted.output
    assert f"v{new.version}; thresholds: site calibration on site-test" in predicted.output
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cxrkit.serve.app import create_app

    with TestClient(create_app(out)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        shown = client.get("/v1/model").json()
    assert shown["threshold_source"] == new.threshold_source
    assert shown["provenance"]["site_calibration"]["images"] == 16


def test_cross_fitted_decisions_use_held_out_thresholds():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 1)) < 0.4
    scores = np.where(truth, 0.6 + 0.3 * rng.random((200, 1)), 0.1 + 0.3 * rng.random((200, 1)))
    pred = Predictions(truth.astype(float), scores, np.repeat(np.arange(100), 2).astype(str), ["Pneumonia"])
    decisions = cross_fitted_decisions(pred, n_folds=5)
    assert decisions.shape == (200, 1) and (decisions == truth).mean() >= 0.97  # separable classes
    lone = Predictions(truth[:2].astype(float), scores[:2], np.array(["a", "a"]), ["Pneumonia"])
    with pytest.raises(ValueError):  # one patient cannot be cut into folds
        cross_fitted_decisions(lone, n_folds=2)


@pytest.mark.slow
@pytest.mark.shared_data
def test_demo_site_stage_shows_internal_vs_external(site):
    run = site["run"]
    export_run(run, run / "tiny.cxr")
    result = DemoResult()
    run_site("tiny", run / "tiny.cxr", site["root"] / "site" / "test", result)
    assert [step.stage for step in result.steps] == ["external", "calibrate"]
    assert result.steps[0].figure.startswith("AUROC internal ") and " vs external " in result.steps[0].figure
    assert (
        result.bundles == [run / "tiny-site.cxr"]
        and Bundle.load(run / "tiny-site.cxr").provenance["site_calibration"]["images"] == 16
    )


@pytest.mark.shared_data
def test_calibrate_errors_name_the_problem(tmp_path, pneumonia_root: Path):
    bundle_path = tiny_bundle(onnx=False).save(tmp_path / "tiny.cxr")  # no training config in provenance
    site_dir = tmp_path / "site"
    for label in CLASSES:
        _link(pneumonia_root / "test" / label, site_dir / label, _images(pneumonia_root / "test" / label)[:2])

    def calibrate(*args: str) -> str:
        result = CliRunner().invoke(cli, ["calibrate", str(bundle_path), *args])
        assert result.exit_code != 0
        return result.output

    assert "--out must differ from BUNDLE" in calibrate("--data", str(site_dir), "--out", str(bundle_path))
    assert "external data not found" in calibrate("--data", str(tmp_path / "nowhere"), "--out", "x.cxr")
    wrong = calibrate("--data", str(site_dir), "--out", str(tmp_path / "new.cxr"), "--replicates", "10")
    assert "no label the model predicts (Effusion, Infiltration, Atelectasis)" in wrong
    assert not (tmp_path / "new.cxr").exists()
