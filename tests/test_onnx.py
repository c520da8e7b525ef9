"""ONNX export (dynamic batch, opset >= 17), parity with PyTorch on real images, and the int8 gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from cxrkit.config import to_container
from cxrkit.data.decode import read_image
from cxrkit.inference.bundle import Bundle, PreprocessSpec, add_int8, add_onnx
from cxrkit.inference.onnx_export import MIN_OPSET, create_session, export_onnx, run_session
from cxrkit.inference.predictor import Predictor
from cxrkit.inference.quantize import (
    QuantizationReport,
    accept_quantization,
    evaluate_quantization,
    mean_auroc,
)
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

LABELS = ["Effusion", "Infiltration", "Atelectasis"]


def _network(arch: str) -> tuple[torch.nn.Module, dict]:
    config = OmegaConf.structured(ModelConfig(arch=arch))
    config.pretrained.source = "none"
    torch.manual_seed(0)
    return create_model(config, len(LABELS)).eval(), to_container(config)


@pytest.fixture(scope="module")
def nih_rows(nih_sample: Path) -> pd.DataFrame:
    entries = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv").sort_values("Image Index").head(24)
    for label in LABELS:
        entries[label] = (
            entries["Finding Labels"].str.split("|").apply(lambda f, label=label: float(label in f))
        )
    entries["path"] = [str(nih_sample / "images" / name) for name in entries["Image Index"]]
    return entries.reset_index(drop=True)


@pytest.fixture(scope="module")
def real_paths(nih_rows: pd.DataFrame, shared_data: Path) -> list[Path]:
    jpegs = sorted((shared_data / "pneumonia" / "train" / "NORMAL").glob("*.jpeg"))[:2]
    return (
        [Path(p) for p in nih_rows["path"][:3]]
        + jpegs
        + [shared_data / "dicom" / "siim_pneumothorax_sample.dcm"]
    )


def _model_input(spec: PreprocessSpec, paths: list[Path]) -> np.ndarray:
    return spec.model_input(np.stack([spec.cache_image(read_image(path))[0] for path in paths]))


def test_graph_has_dynamic_batch_and_a_recent_opset(tmp_path: Path) -> None:
    model, _ = _network("resnet18")
    path = export_onnx(model, tmp_path / "m.onnx", crop_size=64)
    graph = onnx.load(str(path))
    opset = next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))
    assert opset >= MIN_OPSET
    (image,), (logits,) = graph.graph.input, graph.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    assert image.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in image.type.tensor_type.shape.dim[1:]] == [1, 64, 64]
    session = create_session(path)
    for batch in (1, 5):
        assert run_session(session, np.zeros((batch, 1, 64, 64), np.float32)).shape == (batch, len(LABELS))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "old.onnx", crop_size=64, opset=13)


@pytest.mark.parametrize(
    ("arch", "size", "crop"), [("resnet18", 80, 64), ("tf_efficientnet_lite0", 128, 112)]
)
def test_onnx_runtime_matches_pytorch_on_real_images(
    arch: str, size: int, crop: int, real_paths: list[Path], tmp_path: Path
) -> None:
    model, _ = _network(arch)
    spec = PreprocessSpec(size, "letterbox", crop)
    images = _model_input(spec, real_paths)
    session = create_session(export_onnx(model, tmp_path / "m.onnx", crop_size=crop))
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert np.abs(run_session(session, images) - expected).max() < 1e-4
    single = np.concatenate([run_session(session, images[i : i + 1]) for i in range(len(images))])
    assert np.abs(single - expected).max() < 1e-4


def test_bundle_records_parity(real_paths: list[Path]) -> None:
    model, config = _network("resnet18")
    bundle = Bundle(
        "t",
        "1",
        LABELS,
        dict.fromkeys(LABELS, 0.5),
        "test",
        "sigmoid",
        PreprocessSpec(80, "crop", 64),
        config,
        {},
        model.state_dict(),
    )
    sample = np.stack([bundle.preprocess.cache_image(read_image(path))[0] for path in real_paths])
    add_onnx(bundle, model, sample=sample)
    assert bundle.onnx is not None and 0 <= bundle.onnx_parity < 1e-4


@pytest.mark.parametrize(
    ("fp32", "int8", "accepted"),
    [
        (0.80, 0.80, True),
        (0.80, 0.7951, True),
        (0.80, 0.795, False),
        (0.80, 0.70, False),
        (0.80, 0.81, True),
        (float("nan"), 0.8, False),
        (0.8, float("nan"), False),
    ],
)
def test_gate_accepts_only_drops_below_the_limit(fp32: float, int8: float, accepted: bool) -> None:
    assert accept_quantization(fp32, int8, 0.005) is accepted
    report = QuantizationReport(fp32, int8, 0.005, 10, LABELS)
    assert report.accepted is accepted
    assert report.to_dict()["accepted"] is accepted


def test_mean_auroc_skips_undefined_labels() -> None:
    targets = np.array([[1, 0, np.nan], [0, 0, 1], [1, 0, np.nan], [0, 0, 0]], dtype=float)
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.9], [0.25, 0.2, 0.1], [0.3, 0.4, 0.2]])
    value, scored = mean_auroc(targets, scores, LABELS)
    assert scored == ["Effusion", "Atelectasis"]
    assert value == pytest.approx((0.75 + 1.0) / 2)
    with pytest.raises(ValueError, match="undefined"):
        mean_auroc(np.zeros((3, 1)), np.ones((3, 1)), ["Effusion"])


@pytest.fixture(scope="module")
def quantisable(nih_rows: pd.DataFrame) -> tuple[Bundle, np.ndarray, np.ndarray]:
    model, config = _network("resnet18")
    bundle = Bundle(
        "t",
        "1",
        LABELS,
        dict.fromkeys(LABELS, 0.5),
        "test",
        "sigmoid",
        PreprocessSpec(80, "letterbox", 64),
        config,
        {},
        model.state_dict(),
    )
    add_onnx(bundle, model)
    images = np.stack([bundle.preprocess.cache_image(read_image(path))[0] for path in nih_rows["path"]])
    return bundle, images, nih_rows[LABELS].to_numpy()


def test_quantisation_is_measured_on_real_validation_images(quantisable) -> None:
    bundle, images, targets = quantisable
    from cxrkit.inference.quantize import quantize_onnx

    int8 = quantize_onnx(bundle.onnx)
    assert len(int8) < len(bundle.onnx) / 2  # weights are int8
    report = evaluate_quantization(
        bundle.onnx, int8, images, targets, LABELS, transform=bundle.preprocess.model_input
    )
    assert report.n_images == len(images) and report.labels_scored == LABELS
    assert 0 <= report.auroc_fp32 <= 1 and 0 <= report.auroc_int8 <= 1
    assert report.accepted is (report.drop < 0.005)


@pytest.mark.parametrize("max_drop", [1.0, -1.0])
def test_bundle_keeps_int8_only_when_the_gate_passes(quantisable, max_drop: float) -> None:
    bundle, images, targets = quantisable
    bundle.onnx_int8 = None
    add_int8(bundle, images, targets, max_drop=max_drop)
    assert bundle.quantization["max_drop"] == max_drop
    if max_drop > 0:
        assert bundle.quantization["accepted"] and bundle.onnx_int8 is not None
        predictor = Predictor(bundle)
        assert predictor.backend == "onnx-int8"
        assert predictor.predict([images[0]])[0].ok
    else:
        assert not bundle.quantization["accepted"] and bundle.onnx_int8 is None
        assert Predictor(bundle).backend == "onnx"
