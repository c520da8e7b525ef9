"""Classification heads, returning logits ``[B, num_classes]``.

``linear`` and ``mlp`` take the backbone's pooled features ``[B, C]`` (timm's own pooling, so a pretrained
network sees what it was trained on: e.g. ConvNeXt pools, then applies its final LayerNorm); ``lse``
(``takes_map``) takes the feature map ``[B, C, h, w]``.

* ``linear``: dropout, one linear layer.
* ``mlp``: dropout, ``hidden_layers`` × (linear → ReLU → dropout), linear.
* ``lse``: the unified DCNN head of Wang et al. 2017 (ChestX-ray8): a transition convolution to
  ``transition_channels``, log-sum-exp pooling with sharpness ``r`` (``r → ∞``: max pooling, ``r → 0``:
  average pooling), dropout and a linear prediction layer.

Parameter names are stable for staged fine-tuning: ``head.fc.*`` is the final layer of every head,
``head.hidden.*`` the MLP's hidden layers and ``head.transition.*`` the LSE transition layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_TYPES = ("linear", "mlp", "lse")


def lse_pool(features: torch.Tensor, r: float) -> torch.Tensor:
    """Log-sum-exp pooling ``(1/r)·log(mean(exp(r·x)))`` over the spatial positions, computed stably."""
    flat = features.flatten(2)
    return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r


class LinearHead(nn.Module):
    takes_map = False

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))


class MLPHead(nn.Module):
    takes_map = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_layers: int,
        hidden_units: int,
        dropout: float = 0.0,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_layers < 1 or hidden_units < 1:
            raise ValueError(
                f"model.head: mlp needs hidden_layers >= 1 and hidden_units >= 1, "
                f"got {hidden_layers} and {hidden_units}"
            )
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden_units
        self.drop = nn.Dropout(drop_rate)
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.drop(features)))


class LSEHead(nn.Module):
    takes_map = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        transition_channels: int,
        r: float,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"model.head.lse_r must be > 0, got {r}")
        if transition_channels < 1:
            raise ValueError(f"model.head.transition_channels must be >= 1, got {transition_channels}")
        self.r = float(r)
        self.transition = nn.Conv2d(in_features, transition_channels, kernel_size=3, padding=1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(transition_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(lse_pool(self.transition(features), self.r)))


def build_head(head_cfg, in_features: int, num_classes: int, drop_rate: float = 0.0) -> nn.Module:
    """The head named by ``head_cfg.type`` (a :class:`~cxrkit.models.config.HeadConfig`)."""
    kind = head_cfg.type
    if kind == "linear":
        return LinearHead(in_features, num_classes, drop_rate)
    if kind == "mlp":
        return MLPHead(
            in_features,
            num_classes,
            head_cfg.hidden_layers,
            head_cfg.hidden_units,
            head_cfg.dropout,
            drop_rate,
        )
    if kind == "lse":
        return LSEHead(in_features, num_classes, head_cfg.transition_channels, head_cfg.lse_r, drop_rate)
    raise ValueError(f"model.head.type must be one of {', '.join(HEAD_TYPES)}; got {kind!r}")
