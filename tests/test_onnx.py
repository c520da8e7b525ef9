"""ONNX export (dynamic batch, opset >= 17) and parity with PyTorch on real images (int8: test_quantize)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from bundles import LABELS, tiny_bundle
from cxrkit.data.decode import read_image
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.inference.export import add_onnx
from cxrkit.inference.onnx_export import MIN_OPSET, create_session, export_onnx, run_session
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model


def _network(arch: str) -> torch.nn.Module:
    config = OmegaConf.structured(ModelConfig(arch=arch))
    config.pretrained.source = "none"
    torch.manual_seed(0)
    return create_model(config, len(LABELS)).eval()


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
    model = _network("resnet18")
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
    model = _network(arch)
    spec = PreprocessSpec(size, "letterbox", crop)
    images = _model_input(spec, real_paths)
    session = create_session(export_onnx(model, tmp_path / "m.onnx", crop_size=crop))
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert np.abs(run_session(session, images) - expected).max() < 1e-4
    single = np.concatenate([run_session(session, images[i : i + 1]) for i in range(len(images))])
    assert np.abs(single - expected).max() < 1e-4


def test_bundle_records_parity(real_paths: list[Path]) -> None:
    bundle = tiny_bundle(onnx=False, policy="crop")
    sample = np.stack([bundle.preprocess.cache_image(read_image(path))[0] for path in real_paths])
    add_onnx(bundle, bundle.build_model(), sample=sample)
    assert bundle.onnx is not None and 0 <= bundle.onnx_parity < 1e-4


def test_same_padding_is_exported_as_constants(tmp_path: Path) -> None:
    """tf_efficientnet_* pad "SAME" per call; at a bundle's fixed size the graph pads by constants, with no
    shape arithmetic left, and gives the same logits."""
    model = _network("tf_efficientnet_lite0")
    graph = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", crop_size=96)))
    operators = {node.op_type for node in graph.graph.node}
    assert "Pad" in operators and not operators & {"Shape", "Gather", "Ceil"}, operators
    images = np.random.default_rng(0).random((3, 1, 96, 96), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert np.abs(run_session(create_session(tmp_path / "m.onnx"), images) - expected).max() < 1e-4
