"""Model bundles: export from a run directory, load (JSON + safetensors only), thresholds, integrity."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cxrkit.cli.main import cli
from cxrkit.config import load_config, save_config
from cxrkit.data.cache import open_cache
from cxrkit.evaluation.metrics import Predictions
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.inference.bundle import MEMBERS, Bundle, BundleError
from cxrkit.inference.export import export_run
from cxrkit.models.factory import create_model
from cxrkit.training.module import CXRClassifier

LABELS = ["Effusion", "Infiltration", "Atelectasis"]


def _table(nih_sample: Path) -> pd.DataFrame:
    """A few real NIH images: a validation split holding positives and negatives of every label."""
    entries = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv").sort_values("Image Index")
    findings = entries["Finding Labels"].str.split("|")
    rows, val = [], set()
    for label in LABELS:
        positives = entries[findings.apply(lambda f, label=label: label in f)]["Image Index"].tolist()
        val.update(positives[:3])
    negatives = entries[findings.apply(lambda f: f == ["No Finding"])]["Image Index"].tolist()
    val.update(negatives[:4])
    train = [name for name in entries["Image Index"] if name not in val][:8]
    for _, entry in entries[entries["Image Index"].isin(val | set(train))].iterrows():
        labels = entry["Finding Labels"].split("|")
        rows.append(
            {
                "path": str(nih_sample / "images" / entry["Image Index"]),
                "patient": str(entry["Patient ID"]),
                "split": "val" if entry["Image Index"] in val else "train",
                **{label: int(label in labels) for label in LABELS},
            }
        )
    return pd.DataFrame(rows)


def data_section(table_csv: Path, cache_dir: Path) -> dict:
    """The ``data`` config of the NIH table at 80 px (crop 64)."""
    return {
        "sources": [
            {
                "adapter": "table",
                "root": str(table_csv),
                "options": {"split_column": "split", "patient_column": "patient"},
            }
        ],
        "labels": LABELS,
        "no_finding": "zeros",
        "cache": {"dir": str(cache_dir), "image_size": 80, "workers": 1},
        "augment": {"crop_size": 64},
    }


def make_run_dir(root: Path, table_csv: Path, *, ema: bool = False) -> tuple[Path, torch.nn.Module]:
    """A run directory as `cxr train` writes it, with a random-weight resnet18 at 80 px (crop 64)."""
    run_dir = root / "run"
    spec = {
        "name": "tiny-nih",
        "output_dir": str(run_dir),
        "data": data_section(table_csv, root / "cache"),
        "model": {"arch": "resnet18", "pretrained": {"source": "none"}},
        "train": {"loss": {"name": "bce"}, "loggers": ["csv"]},
    }
    config_yaml = root / "spec.yaml"
    config_yaml.write_text(json.dumps(spec))
    config = load_config(config_yaml)
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    (run_dir / "labels.json").write_text(json.dumps(LABELS))
    torch.manual_seed(0)
    module = CXRClassifier(create_model(config.model, len(LABELS)), LABELS, config.train)
    checkpoint = {
        "epoch": 2,
        "global_step": 12,
        "state_dict": module.state_dict(),
        "cxrkit": {"labels": LABELS, "activation": "sigmoid"},
    }
    if ema:  # Lightning's weight averaging: the average in state_dict, the live weights aside
        live = {
            key: value + 1.0 if value.is_floating_point() else value
            for key, value in module.state_dict().items()
        }
        checkpoint["current_model_state"] = live
    (run_dir / "checkpoints").mkdir()
    torch.save(checkpoint, run_dir / "checkpoints" / "best.ckpt")
    pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "step": [4, 8, 12],
            "val/auroc_mean": [0.55, 0.61, 0.58],
            "val/loss": [0.7, 0.6, 0.65],
        }
    ).to_csv(run_dir / "metrics.csv", index=False)
    return run_dir, module.model.eval()


@pytest.fixture(scope="module")
def table_csv(tmp_path_factory: pytest.TempPathFactory, nih_sample: Path) -> Path:
    path = tmp_path_factory.mktemp("table") / "nih_few.csv"
    _table(nih_sample).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, table_csv: Path) -> tuple[Path, torch.nn.Module]:
    return make_run_dir(tmp_path_factory.mktemp("runs"), table_csv)


@pytest.fixture(scope="module")
def exported(run: tuple[Path, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny.cxr"
    export_run(run[0], out, ood=False)  # a bundle without the optional OOD members (tests/test_ood_bundle.py)
    return out


def _real_batch(bundle: Bundle, paths: list[Path]) -> np.ndarray:
    from cxrkit.data.decode import read_image

    cache_images = np.stack([bundle.preprocess.cache_image(read_image(path))[0] for path in paths])
    return bundle.preprocess.model_input(cache_images)


def test_round_trip_gives_identical_logits(run, exported: Path, nih_sample: Path) -> None:
    bundle = Bundle.load(exported)
    batch = torch.from_numpy(_real_batch(bundle, sorted((nih_sample / "images").glob("*.png"))[:4]))
    with torch.no_grad():
        expected, actual = run[1](batch), bundle.build_model()(batch)
    assert torch.equal(expected, actual)
    assert bundle.labels == LABELS and bundle.activation == "sigmoid"
    assert bundle.preprocess.to_dict()["image_size"] == 80 and bundle.preprocess.crop_size == 64
    assert bundle.model_config["arch"] == "resnet18"


def test_manifest_records_provenance(run, exported: Path) -> None:
    bundle = Bundle.load(exported)
    provenance = bundle.provenance
    assert provenance["run_dir"] == str(run[0].resolve())
    assert len(provenance["config_sha256"]) == 64 and provenance["cxrkit_version"]
    assert provenance["metrics"]["validation"]["val/auroc_mean"] == pytest.approx(0.61)
    assert provenance["metrics"]["validation"]["epoch"] == 1
    assert provenance["epoch"] == 2 and provenance["ema_weights"] is False
    assert provenance["exported"][:4].isdigit()
    assert bundle.model_id == "tiny-nih" and bundle.version.count("-") == 1


def test_thresholds_are_chosen_on_the_validation_split(run, exported: Path) -> None:
    bundle = Bundle.load(exported)
    cache = open_cache(run[0].parent / "cache")
    val = np.flatnonzero(cache.manifest.frame["split"].to_numpy() == "val")
    with torch.no_grad():
        scores = torch.sigmoid(run[1](torch.from_numpy(bundle.preprocess.model_input(cache.images(val)))))
    targets = cache.manifest.with_labels(LABELS).targets[val]
    patients = cache.manifest.frame["patient_id"].to_numpy()[val]
    expected = OperatingPoints.fit(Predictions(targets, scores.double().numpy(), patients, LABELS))
    assert bundle.thresholds == pytest.approx(expected.thresholds)
    assert "val" in bundle.threshold_source and "Youden" in bundle.threshold_source


def test_given_thresholds_file_wins(run, tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"Effusion": 0.3, "Infiltration": 0.4, "Atelectasis": 0.2, "Extra": 0.9}))
    assert export_run(run[0], thresholds_path=plain).thresholds == {
        "Effusion": 0.3,
        "Infiltration": 0.4,
        "Atelectasis": 0.2,
    }
    points = OperatingPoints({"Effusion": 0.1, "Infiltration": 0.2, "Atelectasis": 0.3}, "f1")
    stored = points.save(tmp_path / "points.json")
    bundle = export_run(run[0], thresholds_path=stored)
    assert bundle.thresholds["Atelectasis"] == 0.3 and "F1" in bundle.threshold_source
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"Effusion": 0.3}))
    with pytest.raises(BundleError, match="Infiltration"):
        export_run(run[0], thresholds_path=partial)


def test_default_thresholds_only_with_a_loud_warning(
    tmp_path: Path, table_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir, _ = make_run_dir(tmp_path, table_csv)
    missing = tmp_path / "gone.csv"
    config = (run_dir / "config.yaml").read_text().replace(str(table_csv), str(missing))
    (run_dir / "config.yaml").write_text(config)
    with caplog.at_level("WARNING"):
        bundle = export_run(run_dir)
    assert bundle.thresholds == dict.fromkeys(LABELS, 0.5)
    assert bundle.threshold_source.startswith("default")
    assert "DEFAULT THRESHOLD" in caplog.text


def test_ema_weights_are_the_ones_exported(tmp_path: Path, table_csv: Path) -> None:
    run_dir, model = make_run_dir(tmp_path, table_csv, ema=True)
    bundle = export_run(run_dir, thresholds_path=_thresholds_file(tmp_path))
    assert bundle.provenance["ema_weights"] is True
    for name, value in model.state_dict().items():
        assert torch.equal(bundle.weights[name], value), name


def _thresholds_file(folder: Path) -> Path:
    path = folder / "t.json"
    path.write_text(json.dumps(dict.fromkeys(LABELS, 0.5)))
    return path


def test_zip_and_folder_bundles_are_equivalent(exported: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(exported)
    folder = bundle.save(tmp_path / "as_folder")
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "weights.safetensors"]
    again = Bundle.load(folder)
    assert again.thresholds == bundle.thresholds and again.provenance == bundle.provenance
    assert all(torch.equal(again.weights[k], v) for k, v in bundle.weights.items())


def test_loading_never_unpickles(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with zipfile.ZipFile(exported) as archive:
        names = archive.namelist()
        assert set(names) <= set(MEMBERS)
        for name in names:
            assert not archive.read(name).startswith(b"\x80"), f"{name} looks like a pickle"

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert Bundle.load(exported).build_model() is not None


def test_tampered_or_foreign_bundles_are_refused(exported: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(exported) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}

    def write(name: str, files: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as archive:
            for member, data in files.items():
                archive.writestr(member, data)
        return path

    weights = bytearray(members["weights.safetensors"])
    weights[-1] ^= 0xFF
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.load(write("flipped.cxr", {**members, "weights.safetensors": bytes(weights)}))
    with pytest.raises(BundleError, match="unexpected files"):
        Bundle.load(write("extra.cxr", {**members, "payload.pkl": pickle.dumps(object)}))
    with pytest.raises(BundleError, match=r"no bundle\.json"):
        Bundle.load(write("foreign.cxr", {"weights.safetensors": members["weights.safetensors"]}))
    (tmp_path / "text.cxr").write_text("not a zip")
    with pytest.raises(BundleError, match="neither"):
        Bundle.load(tmp_path / "text.cxr")


def test_export_with_onnx_and_quantisation_gate(run, tmp_path: Path) -> None:
    bundle = export_run(run[0], tmp_path / "q.cxr", thresholds_path=_thresholds_file(tmp_path), quantize=True)
    report = bundle.quantization
    assert bundle.onnx is not None and bundle.onnx_parity < 1e-4
    assert report["n_images"] == 12 and report["max_drop"] == 0.005
    assert set(report["auroc_fp32"]) == set(report["auroc_int8"]) == set(bundle.labels)
    drops = list(report["drops"].values())
    assert report["accepted"] is (bool(drops) and all(drop <= 0.005 + 1e-12 for drop in drops))
    assert (bundle.onnx_int8 is not None) is report["accepted"]
    stored = Bundle.load(tmp_path / "q.cxr")
    assert stored.quantization == report and stored.onnx == bundle.onnx


def test_cli_export(run, tmp_path: Path) -> None:
    out = tmp_path / "cli.cxr"
    result = CliRunner().invoke(
        cli,
        [
            "export",
            str(run[0]),
            "--out",
            str(out),
            "--thresholds",
            str(_thresholds_file(tmp_path)),
            "--model-version",
            "7",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "tiny-nih v7" in result.output
    assert Bundle.load(out).version == "7"
    missing = CliRunner().invoke(cli, ["export", str(run[0]), "--out", str(out), "--checkpoint", "nope.ckpt"])
    assert missing.exit_code != 0 and "checkpoint not found" in missing.output


@pytest.mark.slow
def test_real_training_run_exports_and_predicts_like_validation(table_csv: Path, tmp_path: Path) -> None:
    """`cxr train` (one epoch, EMA) → `cxr export --format onnx` → Predictor on the raw validation files:
    the mean AUROC must equal the one Lightning logged on the cached validation split."""
    from cxrkit.evaluation.metrics import auroc
    from cxrkit.inference.predictor import Predictor
    from cxrkit.training.run import train

    spec = {
        "name": "e2e",
        "output_dir": str(tmp_path / "run"),
        "data": {**data_section(table_csv, tmp_path / "cache"), "loader": {"batch_size": 4}},
        "model": {"arch": "resnet18", "pretrained": {"source": "none"}},
        "train": {"max_epochs": 1, "loggers": ["csv"], "ema_decay": 0.9},
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    run_dir = train(load_config(tmp_path / "spec.yaml"))
    result = CliRunner().invoke(
        cli, ["export", str(run_dir), "--out", str(tmp_path / "m.cxr"), "--format", "onnx"]
    )
    assert result.exit_code == 0, result.output
    predictor = Predictor.from_bundle(tmp_path / "m.cxr")
    assert predictor.backend == "onnx" and predictor.bundle.provenance["ema_weights"]
    table = pd.read_csv(table_csv)
    val = table[table["split"] == "val"]
    scores = [r.probabilities for r in predictor.predict(val["path"].tolist())]
    aurocs = [auroc(val[label].to_numpy(float), np.array([s[label] for s in scores])) for label in LABELS]
    logged = pd.read_csv(run_dir / "metrics.csv")["val/auroc_mean"].dropna().iloc[-1]
    assert np.mean(aurocs) == pytest.approx(logged, abs=1e-6)
