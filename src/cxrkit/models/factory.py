"""Build the classification network: a timm backbone, a head and the input normalisation, in one module.

``create_model(cfg.model, num_classes)`` returns a :class:`CXRModel`: float images ``[B, in_chans, H, W]``
with values in [0, 1] in, logits ``[B, num_classes]`` out. The normalisation the weights expect is stored in
the model (buffers ``input_mean``/``input_std``), so exported and served models need no preprocessing beyond
resizing and scaling to [0, 1].

Parameter names are ``backbone.<timm name>`` and ``head.<name>`` (see :mod:`cxrkit.models.heads`), so staged
fine-tuning patterns are predictable. :func:`layer_groups` and :func:`layer_group_patterns` list the
backbone's stages from input to output, e.g. for ``resnet50``: ``stem`` (``backbone.conv1.*``,
``backbone.bn1.*``), ``stage1`` … ``stage4`` (``backbone.layer1.*`` … ``backbone.layer4.*``), ``head``
(``head.*``). "Freeze up to layer3, train layer4 and the head" is
``trainable: ["backbone.layer4.*", "head.*"]``; for DenseNet-121 the last dense block is
``backbone.features.denseblock4.*`` followed by ``backbone.features.norm5.*``.

Grad-CAM: :func:`cam_target_layer` picks the layer whose activations explain the prediction (the last
convolutional stage or final norm of the backbone, the LSE head's transition layer, the last block's norm of a
ViT) and :func:`cam_reshape_transform` turns token or channels-last activations into ``[B, C, h, w]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.models import group_parameters
from torch import nn

from cxrkit.models.ensemble import create_ensemble
from cxrkit.models.heads import LSEHead, build_head
from cxrkit.models.pretrained import (
    LoadReport,
    create_hub_backbone,
    load_pretrained,
    source_input_stats,
)


class CXRModel(nn.Module):
    """Normalisation → timm backbone feature map → head. See the module docstring."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        arch: str,
        in_chans: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.arch = arch
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.backbone_in_chans = len(mean)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        self.channels_last_features = str(getattr(backbone, "output_fmt", "NCHW")).endswith("NHWC")
        self.load_report: LoadReport | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the backbone's input (gray repeated to RGB in ``repeat`` mode)."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.arch}: expected images [B, {self.in_chans}, H, W] in [0, 1], "
                f"got {tuple(images.shape)}"
            )
        if self.backbone_in_chans != self.in_chans:
            images = images.expand(-1, self.backbone_in_chans, -1, -1)
        return (images - self.input_mean) / self.input_std

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's final feature map ``[B, C, h, w]`` (ViT patch tokens laid out on their grid): what
        Grad-CAM explains and the LSE head pools."""
        return self._feature_map(self.backbone.forward_features(self.normalize(images)), images)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features ``[B, C]`` the pretrained network itself would classify: timm's
        ``forward_head(pre_logits=True)`` (its own pooling, then e.g. ConvNeXt's final LayerNorm)."""
        raw = self.backbone.forward_features(self.normalize(images))
        return self.backbone.forward_head(raw, pre_logits=True)

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, num_classes]`` and :meth:`pooled_features` ``[B, C]`` from one forward pass."""
        raw = self.backbone.forward_features(self.normalize(images))
        pooled = self.backbone.forward_head(raw, pre_logits=True)
        head_input = self._feature_map(raw, images) if self.head.takes_map else pooled
        return self.head(head_input), pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[0]

    def _feature_map(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if features.ndim == 3:
            return tokens_to_map(features, self.num_prefix_tokens, self._token_grid(images))
        if self.channels_last_features:
            return features.permute(0, 3, 1, 2)
        return features

    def _token_grid(self, images: torch.Tensor) -> tuple[int, int] | None:
        patch_embed = getattr(self.backbone, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "dynamic_feat_size"):
            return None
        return patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1]))


def tokens_to_map(
    tokens: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """``[B, prefix + h·w, C]`` transformer tokens → patch tokens as a map ``[B, C, h, w]``."""
    patches = tokens[:, num_prefix_tokens:]
    count = patches.shape[1]
    if grid is None or grid[0] * grid[1] != count:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"cannot lay {count} patch tokens on a grid: pass the grid size")
        grid = (side, side)
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


# ----------------------------------------------------------------------------------------------- building
def create_model(cfg, num_classes: int) -> CXRModel:
    """The network described by a :class:`~cxrkit.models.config.ModelConfig`, initialised from its
    pretrained source. ``model.load_report`` tells what the weights file supplied. ``ensemble_size > 1``
    gives an :class:`~cxrkit.models.ensemble.EnsembleModel` of that many such networks."""
    _validate(cfg, num_classes)
    if getattr(cfg, "ensemble_size", 1) > 1:
        return create_ensemble(cfg, num_classes)
    in_chans = int(cfg.in_chans)
    backbone_in_chans = 3 if in_chans == 1 and cfg.channel_adapt == "repeat" else in_chans
    kwargs = _plain_dict(cfg.timm_kwargs)
    kwargs.update(num_classes=0, in_chans=backbone_in_chans)  # the backbone keeps its own pooling
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = float(cfg.drop_path_rate)
    hub_report = None
    if cfg.pretrained.source == "hub":
        backbone, hub_report = create_hub_backbone(cfg.arch, **kwargs)
    else:
        backbone = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    pooled = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    features = backbone.num_features if cfg.head.type == "lse" else pooled  # LSE pools the feature map
    head = build_head(cfg.head, features, num_classes, float(cfg.drop_rate))
    mean, std = _fit_stats(*source_input_stats(cfg, backbone), backbone_in_chans)
    model = CXRModel(backbone, head, mean, std, arch=cfg.arch, in_chans=in_chans, num_classes=num_classes)
    model.load_report = load_pretrained(model, cfg) or hub_report
    return model


def _plain_dict(mapping) -> dict:
    if isinstance(mapping, DictConfig):
        return OmegaConf.to_container(mapping, resolve=True)
    return dict(mapping)


def _validate(cfg, num_classes: int) -> None:
    """The model config itself is checked when it loads (:func:`cxrkit.models.config.check_model`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _fit_stats(
    mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Statistics for ``channels`` inputs: as given when they match, averaged over channels for one."""

    def fit(values: Sequence[float]) -> tuple[float, ...]:
        values = tuple(float(v) for v in values)
        if len(values) == channels:
            return values
        return (sum(values) / len(values),) * channels

    if len(mean) != len(std):
        raise ValueError(f"normalisation mean {tuple(mean)} and std {tuple(std)} differ in length")
    return fit(mean), fit(std)


# ------------------------------------------------------------------------------------- staged fine-tuning
def layer_groups(model: CXRModel) -> dict[str, list[str]]:
    """Parameter names by depth: ``stem``, ``stage1`` … ``stageN`` (timm's coarse grouping of the backbone,
    input to output), then ``head``."""
    try:
        grouped = group_parameters(model.backbone, model.backbone.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        grouped = {0: [name for name, _ in model.backbone.named_parameters()]}
    groups: dict[str, list[str]] = {}
    for index, group_id in enumerate(sorted(grouped)):
        groups["stem" if index == 0 else f"stage{index}"] = [f"backbone.{name}" for name in grouped[group_id]]
    groups["head"] = [name for name, _ in model.head.named_parameters(prefix="head")]
    return groups


def layer_group_patterns(model: CXRModel) -> dict[str, list[str]]:
    """:func:`layer_groups` as short fnmatch patterns (``backbone.layer4.*``) matching only their group."""
    groups = layer_groups(model)
    owner = {name: group for group, names in groups.items() for name in names}
    patterns: dict[str, list[str]] = {}
    for group, names in groups.items():
        chosen: list[str] = []
        for name in names:
            if any(_matches(name, pattern) for pattern in chosen):
                continue
            chosen.append(_shortest_own_prefix(name, group, owner))
        patterns[group] = chosen
    return patterns


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1]))


def _shortest_own_prefix(name: str, group: str, owner: dict[str, str]) -> str:
    parts = name.split(".")
    for depth in range(2, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if all(g == group for other, g in owner.items() if other.startswith(prefix)):
            return prefix + "*"
    return name


# ------------------------------------------------------------------------------------------------ Grad-CAM
_CAM_LAYERS = {
    "ResNet": "layer4",
    "DenseNet": "features.norm5",
    "EfficientNet": "bn2",
    "MobileNetV3": "blocks[-1]",  # conv_head/act2 follow the pooling: they have no spatial extent
    "ConvNeXt": "stages[-1]",
    "SwinTransformer": "layers[-1]",
    "InceptionResnetV2": "conv2d_7b",
    "InceptionV3": "Mixed_7c",
    "Xception": "act4",
}


def cam_target_layer(model: CXRModel, name: str | None = None) -> nn.Module:
    """The layer Grad-CAM should hook. ``name``: a dotted module name in the model (``backbone.layer4``;
    names inside the backbone may omit ``backbone.``); default: chosen per architecture."""
    if name:
        return _submodule(model, name)
    if isinstance(model.head, LSEHead):
        return model.head.transition
    backbone = model.backbone
    if _is_token_model(backbone):
        return backbone.blocks[-1].norm1
    layer_name = _CAM_LAYERS.get(type(backbone).__name__) or backbone.feature_info[-1]["module"]
    if layer_name.endswith("[-1]"):  # the last stage of a sequence
        return backbone.get_submodule(layer_name[: -len("[-1]")])[-1]
    return backbone.get_submodule(layer_name)


def cam_reshape_transform(
    model: CXRModel, name: str | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ``reshape_transform`` for pytorch-grad-cam matching :func:`cam_target_layer` (None for CNNs)."""
    layer = cam_target_layer(model, name)
    if not any(layer is module for module in model.backbone.modules()):
        return None
    if _is_token_model(model.backbone):
        prefix = model.num_prefix_tokens
        return lambda tokens: tokens_to_map(tokens, prefix) if tokens.ndim == 3 else tokens
    if model.channels_last_features:
        return lambda features: features.permute(0, 3, 1, 2) if features.ndim == 4 else features
    return None


def _is_token_model(backbone: nn.Module) -> bool:
    """Vision transformers (ViT, DeiT, EVA...): timm gives them ``num_prefix_tokens`` and ``blocks``."""
    return hasattr(backbone, "num_prefix_tokens") and hasattr(backbone, "blocks")


def _submodule(model: CXRModel, name: str) -> nn.Module:
    for candidate in (name, f"backbone.{name}"):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(
        f"no module named {name!r} in {model.arch} (names look like backbone.<timm name> or head.*)"
    )
