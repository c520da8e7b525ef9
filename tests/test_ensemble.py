"""Ensembles: one module, one bundle and one ONNX graph averaging the members' logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from omegaconf import OmegaConf

from cxrkit.cli.main import cli
from cxrkit.config import load_config, to_container
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.inference.bundle import Bundle, BundleError
from cxrkit.inference.export import add_onnx
from cxrkit.models.config import ModelConfig
from cxrkit.models.ensemble import EnsembleModel, ensemble_runs, member_weights
from cxrkit.models.factory import create_model

LABELS = ["Effusion", "Pneumonia"]


def tiny_config(size: int = 1):
    config = OmegaConf.structured(ModelConfig(arch="resnet18", ensemble_size=size))
    config.pretrained.source = "none"
    return config


def members(count: int = 2) -> list[torch.nn.Module]:
    networks = []
    for seed in range(count):
        torch.manual_seed(seed)
        networks.append(create_model(tiny_config(), len(LABELS)).eval())
    return networks


def ensemble_bundle(networks: list[torch.nn.Module]) -> Bundle:
    return Bundle(
        "tiny-ensemble",
        "1",
        LABELS,
        dict.fromkeys(LABELS, 0.5),
        "test",
        "sigmoid",
        PreprocessSpec(80, "letterbox", 64),
        to_container(tiny_config(len(networks))),
        {},
        member_weights([network.state_dict() for network in networks]),
    )


def test_the_ensemble_averages_the_members_logits() -> None:
    networks = members(3)
    images = torch.rand(4, 1, 48, 48)
    with torch.inference_mode():
        expected = torch.stack([network(images) for network in networks]).mean(dim=0)
        out = EnsembleModel(networks)(images)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, networks[0](images))
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleModel([])


def test_the_ensembles_features_are_its_members_side_by_side() -> None:
    networks = members(2)
    ensemble = EnsembleModel(networks)
    images = torch.rand(3, 1, 48, 48)
    with torch.inference_mode():
        logits, features = ensemble.forward_with_features(images)
        torch.testing.assert_close(logits, ensemble(images))
        expected = torch.cat([network.pooled_features(images) for network in networks], dim=1)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(ensemble.pooled_features(images), expected)


def test_create_model_builds_an_ensemble_that_loads_the_members_weights() -> None:
    networks = members(2)
    ensemble = create_model(tiny_config(2), len(LABELS)).eval()
    assert isinstance(ensemble, EnsembleModel) and len(ensemble.members) == 2
    ensemble.load_state_dict(member_weights([network.state_dict() for network in networks]), strict=True)
    images = torch.rand(2, 1, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(ensemble(images), (networks[0](images) + networks[1](images)) / 2)
    with pytest.raises(ValueError, match="ensemble_size"):
        load_config(overrides=["model.ensemble_size=0"])


def test_an_ensemble_bundle_round_trips_with_one_onnx_graph(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from cxrkit.inference.predictor import Predictor

    networks = members(2)
    bundle = ensemble_bundle(networks)
    add_onnx(bundle)  # checks the graph against PyTorch
    assert bundle.onnx_parity is not None and bundle.onnx_parity < 1e-4
    bundle.save(tmp_path / "ensemble.cxr")
    loaded = Bundle.load(tmp_path / "ensemble.cxr")
    assert loaded.model_config["ensemble_size"] == 2
    image = np.random.default_rng(0).integers(0, 256, (100, 90), dtype=np.uint8)
    onnx_scores = Predictor.from_bundle(tmp_path / "ensemble.cxr").predict([image])[0].probabilities
    spec = loaded.preprocess
    batch = torch.from_numpy(spec.model_input(spec.cache_image(image)[0][None]))
    with torch.inference_mode():
        logits = torch.stack([network(batch) for network in networks]).mean(dim=0)
    expected = torch.sigmoid(logits)[0].numpy()
    assert [onnx_scores[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_site_temperature_folds_into_every_members_output_layer() -> None:
    from cxrkit.evaluation.calibration import TemperatureScaler
    from cxrkit.inference.calibrate import _fold_temperature

    networks = members(2)
    bundle = ensemble_bundle(networks)
    images = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        before = bundle.build_model().eval()(images)
    _fold_temperature(bundle, TemperatureScaler(np.array([2.0, 4.0]), LABELS))
    with torch.inference_mode():
        after = bundle.build_model().eval()(images)
    torch.testing.assert_close(after, before / torch.tensor([2.0, 4.0]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ensemble_runs_exports_runs_of_one_recipe(tiny_data_root: Path, tmp_path: Path) -> None:
    """Two tiny runs (seeds 0 and 1) → one bundle whose thresholds come from the ensemble's validation
    scores; a run of another architecture is refused."""
    from cxrkit.training.run import train

    def run(name: str, seed: int, arch: str = "resnet18") -> Path:
        spec = {
            "name": name,
            "seed": seed,
            "output_dir": str(tmp_path / name),
            "data": {
                "sources": [{"adapter": "folder", "root": str(tiny_data_root / "pneumonia" / "train")}],
                "no_finding": "zeros",
                "split": {"method": "random", "val_fraction": 0.3, "test_fraction": 0.2},
                "cache": {"dir": str(tmp_path / f"cache-{arch}"), "image_size": 80},
                "augment": {"crop_size": 64},
                "loader": {"batch_size": 8},
            },
            "model": {"arch": arch, "pretrained": {"source": "none"}},
            "train": {"max_epochs": 1, "loggers": ["csv"], "limit_train_batches": 2},
        }
        (tmp_path / f"{name}.yaml").write_text(json.dumps(spec))
        return train(load_config(tmp_path / f"{name}.yaml"))

    runs = [run("s0", 0), run("s1", 1)]
    # a member's own thresholds play no part: the ensemble's are fitted on its validation scores
    (runs[1] / "thresholds.json").write_text('{"Pneumonia": 7}')
    bundle = ensemble_runs(runs, tmp_path / "ensemble.cxr")
    assert bundle.model_config["ensemble_size"] == 2 and len(bundle.provenance["members"]) == 2
    assert "validation" in bundle.threshold_source.lower() or "youden" in bundle.threshold_source.lower()
    assert Bundle.load(tmp_path / "ensemble.cxr").build_model().members[1] is not None
    assert bundle.ood is not None and bundle.ood.bank.shape[1] == 2 * 512  # both members' features

    # the command line: several runs make one ensemble bundle with one graph and the detector
    out = tmp_path / "cli.cxr"
    result = CliRunner().invoke(cli, ["export", *map(str, runs), "--out", str(out), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    exported = Bundle.load(out)
    assert exported.model_config["ensemble_size"] == 2 and exported.onnx and exported.ood is not None
    assert exported.thresholds == bundle.thresholds
    refused = CliRunner().invoke(
        cli, ["export", *map(str, runs), "--out", str(out), "--thresholds", str(runs[0] / "labels.json")]
    )
    assert refused.exit_code == 2 and "--thresholds applies to one run" in refused.output
    with pytest.raises(BundleError, match="architecture"):
        ensemble_runs([runs[0], run("other", 0, arch="resnet10t")])
