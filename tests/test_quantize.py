"""Static int8: a QDQ graph calibrated on training images, a per-finding gate, its own thresholds, served as
judged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from bundles import LABELS, tiny_bundle
from cxrkit.data.decode import read_image
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.evaluation.metrics import Predictions
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.inference.bundle import Bundle, BundleError
from cxrkit.inference.export import ValidationData, add_int8, add_ood
from cxrkit.inference.predictor import Predictor, choose_backend
from cxrkit.inference.quantize import (
    QuantizationReport,
    accept_quantization,
    has_vnni,
    onnx_logits,
    per_finding_auroc,
    quantize_static_onnx,
)
from cxrkit.inference.runner import Runner


@pytest.mark.parametrize(
    ("int8", "accepted"),
    [
        ({"Effusion": 0.80, "Infiltration": 0.70, "Atelectasis": 0.90}, True),
        ({"Effusion": 0.795, "Infiltration": 0.6955, "Atelectasis": 0.91}, True),  # drops of exactly 0.005
        ({"Effusion": 0.81, "Infiltration": 0.694, "Atelectasis": 0.91}, False),  # one finding, mean better
        ({"Effusion": 0.80, "Infiltration": float("nan"), "Atelectasis": 0.90}, False),
    ],
)
def test_gate_needs_every_finding_within_the_limit(int8: dict[str, float], accepted: bool) -> None:
    fp32 = {"Effusion": 0.80, "Infiltration": 0.70, "Atelectasis": 0.90}
    assert accept_quantization(fp32, int8, 0.005) is accepted
    report = QuantizationReport(
        fp32, int8, 0.005, 10, 5, dict.fromkeys(LABELS, 0.5), "youden", 10.0, 20.0, {}
    )
    assert report.accepted is accepted and report.to_dict()["accepted"] is accepted
    assert report.preferred is accepted and report.speedup == 2.0
    slower = QuantizationReport(
        fp32, int8, 0.005, 10, 5, dict.fromkeys(LABELS, 0.5), "youden", 20.0, 10.0, {}
    )
    assert not slower.preferred, "int8 that is not faster is never preferred"


def test_findings_without_both_classes_are_not_gated() -> None:
    fp32 = {"Effusion": 0.8, "Infiltration": float("nan")}
    assert accept_quantization(fp32, {"Effusion": 0.8, "Infiltration": float("nan")})
    assert not accept_quantization({"Effusion": float("nan")}, {"Effusion": float("nan")})
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.25, 0.2], [0.3, 0.4]])
    values = per_finding_auroc(targets, scores, ["Effusion", "Infiltration"])
    assert values["Effusion"] == pytest.approx(0.75) and np.isnan(values["Infiltration"])
    with pytest.raises(ValueError, match="undefined"):
        per_finding_auroc(np.zeros((3, 1)), np.ones((3, 1)), ["Effusion"])


def test_vnni_detection_answers() -> None:
    assert isinstance(has_vnni(), bool)


# ------------------------------------------------------------------------------------ real images, real graph
@pytest.fixture(scope="module")
def nih(nih_sample: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """24 real NIH images as 80 px cache images, their targets and patient ids."""
    entries = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv").sort_values("Image Index").head(24)
    findings = entries["Finding Labels"].str.split("|")
    targets = np.stack([findings.apply(lambda f, label=label: float(label in f)) for label in LABELS], 1)
    spec = PreprocessSpec(80, "letterbox", 64)
    images = np.stack(
        [spec.cache_image(read_image(nih_sample / "images" / n))[0] for n in entries["Image Index"]]
    )
    return images, targets, entries["Patient ID"].astype(str).to_numpy()


@pytest.fixture(scope="module")
def bundle(nih) -> Bundle:
    return tiny_bundle(thresholds=dict.fromkeys(LABELS, 0.5), sample=nih[0][:4])


def _data(nih) -> ValidationData:
    images, targets, patients = nih
    return ValidationData(images, targets, patients, calibration=images[::2])


def test_static_int8_graph_is_qdq_with_int8_weights(bundle: Bundle, nih) -> None:
    int8, settings = quantize_static_onnx(bundle.onnx, nih[0][:8], bundle.preprocess.model_input)
    graph = onnx.load_from_string(int8).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "not a QDQ graph"
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "convolution weights are not int8"
    assert len(int8) < len(bundle.onnx) / 2
    assert settings["method"] == "static" and settings["reduce_range"] is (not has_vnni())
    logits = onnx_logits(int8, nih[0], bundle.preprocess.model_input)
    reference = onnx_logits(bundle.onnx, nih[0], bundle.preprocess.model_input)
    assert logits.shape == reference.shape and np.isfinite(logits).all()
    assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.9, "int8 logits unrelated to fp32"


@pytest.mark.parametrize("max_drop", [1.0, -1.0], ids=["gate-passes", "gate-fails"])
def test_int8_is_kept_only_when_every_finding_passes(bundle: Bundle, nih, max_drop: float) -> None:
    bundle.onnx_int8, bundle.quantization = None, None
    add_int8(bundle, _data(nih), "youden", max_drop=max_drop)
    report = bundle.quantization
    assert report["max_drop"] == max_drop and report["n_images"] == 24 and report["n_calibration"] == 12
    assert set(report["auroc_fp32"]) == set(LABELS) and set(report["drops"]) <= set(LABELS)
    assert report["images_per_s_fp32"] > 0 and report["images_per_s_int8"] > 0
    assert report["accepted"] is (max_drop > 0) and (bundle.onnx_int8 is not None) is (max_drop > 0)
    if max_drop < 0:
        assert Predictor(bundle).backend == "onnx"
        with pytest.raises(ValueError, match="no int8"):
            Predictor(bundle, backend="onnx-int8")


def test_int8_thresholds_are_chosen_on_validation_for_the_int8_graph(bundle: Bundle, nih) -> None:
    images, targets, patients = nih
    add_int8(bundle, _data(nih), "youden", max_drop=1.0)
    logits = torch.from_numpy(onnx_logits(bundle.onnx_int8, images, bundle.preprocess.model_input))
    expected = OperatingPoints.fit(Predictions(targets, logits.sigmoid().numpy(), patients, LABELS))
    assert bundle.quantization["thresholds"] == pytest.approx(expected.thresholds)
    served = Predictor(bundle, backend="onnx-int8")
    assert served.thresholds == pytest.approx(expected.thresholds)
    assert Predictor(bundle, backend="onnx").thresholds == bundle.thresholds
    result = served.predict([images[0]])[0]
    assert result.ok and result.thresholds == served.thresholds


def test_auto_serves_int8_only_when_accepted_and_measured_faster(bundle: Bundle, nih, tmp_path: Path) -> None:
    add_int8(bundle, _data(nih), "youden", max_drop=1.0)
    for faster in (True, False):
        bundle.quantization = {**bundle.quantization, "preferred": faster}
        assert choose_backend(bundle, "auto") == ("onnx-int8" if faster else "onnx")
    bundle.save(tmp_path / "q.cxr")
    loaded = Bundle.load(tmp_path / "q.cxr")
    assert loaded.quantization == bundle.quantization
    assert loaded.thresholds_for("onnx-int8") == pytest.approx(bundle.quantization["thresholds"])


def test_int8_graph_without_its_own_thresholds_is_refused(bundle: Bundle, nih) -> None:
    add_int8(bundle, _data(nih), "youden", max_drop=1.0)
    old = ("thresholds", "preferred")  # as a bundle of the dynamic-int8 days
    bundle.quantization = {key: value for key, value in bundle.quantization.items() if key not in old}
    with pytest.raises(BundleError, match="no operating thresholds of its own"):
        Predictor(bundle, backend="onnx-int8")
    assert Predictor(bundle).backend == "onnx"  # auto never picks it


def test_evaluation_scores_the_served_graph_at_its_thresholds(bundle: Bundle, nih, tmp_path: Path) -> None:
    """`cxr evaluate BUNDLE --backend ...` loads the graph that is served, with that graph's thresholds."""
    from cxrkit.config import load_config
    from cxrkit.inference.loading import load_model

    add_int8(bundle, _data(nih), "youden", max_drop=1.0)
    bundle.quantization = {**bundle.quantization, "preferred": True}
    path = bundle.save(tmp_path / "q.cxr")
    sizes = ["data.cache.image_size=80", "data.cache.resize_policy=letterbox", "data.augment.crop_size=64"]
    config = load_config(None, sizes)
    int8_thresholds = bundle.quantization["thresholds"]
    for backend, graph, thresholds in (
        ("auto", bundle.onnx_int8, int8_thresholds),
        ("onnx-int8", bundle.onnx_int8, int8_thresholds),
        ("onnx", bundle.onnx, bundle.thresholds),
        ("torch", None, bundle.thresholds),
    ):
        loaded = load_model(path, config=config, backend=backend)
        assert loaded.graph == graph and loaded.backend == (backend if backend != "auto" else "onnx-int8")
        assert loaded.operating_points.thresholds == pytest.approx(thresholds)
    served = load_model(path, config=config).runner().logits(nih[0][:4])
    expected = onnx_logits(bundle.onnx_int8, nih[0][:4], bundle.preprocess.model_input)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


def test_int8_graph_gets_its_own_out_of_distribution_threshold(bundle: Bundle, nih, tmp_path: Path) -> None:
    """The int8 graph's pooled features differ a little from fp32's: served as int8, the detector's threshold
    is the same validation quantile of the int8 graph's own scores (measured on the pneumonia recipe: the
    fp32 threshold flagged 3.7 % of held-out chest X-rays through int8 features instead of 1 %)."""
    images, targets, patients = nih
    data = ValidationData(images[12:], targets[12:], patients[12:], images[:4], ood_fit=images[:12])
    add_int8(bundle, data, "youden", max_drop=1.0)
    add_ood(bundle, bundle.build_model(), data)
    int8 = Runner.from_onnx(bundle.onnx_int8, bundle.preprocess, bundle.activation)
    features = int8.forward_with_features(int8.model_input(images[12:]))[1]
    expected = float(np.quantile(bundle.ood.score(features), bundle.ood.quantile))
    assert bundle.quantization["ood_threshold"] == pytest.approx(expected)
    assert expected != pytest.approx(bundle.ood.threshold)
    loaded = Bundle.load(bundle.save(tmp_path / "q.cxr"))
    assert Predictor(loaded, backend="onnx-int8").ood.threshold == pytest.approx(expected)
    assert Predictor(loaded, backend="onnx").ood.threshold == pytest.approx(bundle.ood.threshold)
    assert loaded.ood.threshold == pytest.approx(bundle.ood.threshold)  # the shared detector is unchanged
