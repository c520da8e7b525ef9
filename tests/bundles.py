"""Small model bundles shared by the prediction, service, out-of-distribution and browser tests."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from cxrkit.config import to_container
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.inference.bundle import Bundle
from cxrkit.inference.export import add_onnx
from cxrkit.models.config import ModelConfig
from cxrkit.models.factory import create_model

LABELS = ["Effusion", "Infiltration", "Atelectasis"]
#: Effusion is always flagged, Atelectasis never: findings do not depend on random weights.
THRESHOLDS = {"Effusion": 0.0, "Infiltration": 0.5, "Atelectasis": 1.0}


def tiny_bundle(
    onnx: bool = True,
    policy: str = "letterbox",
    model_id: str = "tiny",
    version: str = "1.0",
    intensity: str = "none",
    thresholds: dict[str, float] | None = None,
    sample: np.ndarray | None = None,
) -> Bundle:
    """A random-weight resnet18 bundle at 80 px (model input 64 px); ``onnx`` adds its graph, checked
    against PyTorch on ``sample`` cache images (default: noise)."""
    config = OmegaConf.structured(ModelConfig(arch="resnet18"))
    config.pretrained.source = "none"
    spec = PreprocessSpec(80, policy, 64, intensity=intensity)
    return _bundle(config, spec, onnx, model_id, version, thresholds, sample)


def pretrained_bundle() -> Bundle:
    """An EfficientNet-Lite0 bundle with the offline ImageNet weights at 128 px (model input 112 px), with
    its ONNX graph: features that tell a radiograph from a photo, as the out-of-distribution flag needs."""
    config = OmegaConf.structured(ModelConfig(arch="tf_efficientnet_lite0", channel_adapt="sum"))
    config.pretrained.source = "efficientnet-lite"
    return _bundle(config, PreprocessSpec(128, "letterbox", 112), True, "lite0", "1.0", None, None)


def _bundle(
    config: ModelConfig,
    spec: PreprocessSpec,
    onnx: bool,
    model_id: str,
    version: str,
    thresholds: dict[str, float] | None,
    sample: np.ndarray | None,
) -> Bundle:
    torch.manual_seed(0)
    model = create_model(config, len(LABELS)).eval()
    bundle = Bundle(
        model_id,
        version,
        LABELS,
        THRESHOLDS if thresholds is None else thresholds,
        "test",
        "sigmoid",
        spec,
        to_container(config),
        {},
        model.state_dict(),
    )
    if onnx:
        add_onnx(bundle, model, sample=sample)
    return bundle
