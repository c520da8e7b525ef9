"""Losses for chest X-ray classification; every multi-label loss ignores unknown (NaN) targets.

Targets are float ``[B, L]`` rows with 1 = present, 0 = absent and NaN = not annotated (see
:mod:`cxrkit.data.labels`). Multi-label losses compute an element-wise loss, drop the NaN entries and average
over the known ones only; a batch without a single known entry gives a loss of 0 that still carries a gradient
(so every rank in distributed training runs the same backward pass).

* ``bce``: binary cross-entropy on logits.
* ``weighted_bce``: the class-balanced BCE of CheXNet (Rajpurkar et al. 2017), a normalised form of the
  W-CEL of Wang et al. 2017. For label ``c`` with positive fraction ``p_c = P_c / (P_c + N_c)`` among the
  *known* training targets::

      loss = -[ w_pos_c * y * log σ(x) + w_neg_c * (1 - y) * log(1 - σ(x)) ]
      w_pos_c = N_c / (P_c + N_c) = 1 - p_c,      w_neg_c = P_c / (P_c + N_c) = p_c

  Wang et al. use ``(P + N) / P`` and ``(P + N) / N``; the ratio ``w_pos / w_neg = N / P`` is the same, only
  the overall scale differs. ``p_c`` is clipped to ``[FREQUENCY_EPSILON, 1 - FREQUENCY_EPSILON]`` so a label
  with no positives (or no negatives) in the training set keeps a non-zero weight on both classes; a label
  never annotated in the training set (``p_c`` NaN; all its targets are masked anyway) gets ``p_c = 0.5``.
* ``focal``: sigmoid focal loss of Lin et al. 2017 (``torchvision.ops.sigmoid_focal_loss``),
  ``-α_t (1 - p_t)^γ log p_t``; ``alpha: null`` means no α balancing, and ``gamma: 0`` with no α is BCE.
* ``ce``: softmax cross-entropy for single-label tasks (pediatric pneumonia: NORMAL vs PNEUMONIA). Targets
  are class indices ``[B]`` (negative = unknown) or one-hot / soft rows ``[B, C]`` (rows holding NaN or
  summing to 0 are unknown).

``label_smoothing: ε`` (every loss) trains on targets pulled towards the uniform ones (Szegedy et al. 2016):
``y (1 - ε) + ε / 2`` per binary label, ``y (1 - ε) + ε / C`` over ``C`` classes; unknown targets stay so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

LOSS_NAMES: tuple[str, ...] = ("bce", "weighted_bce", "focal", "ce")
FREQUENCY_EPSILON = 1e-3


def masked_mean(values: Tensor, known: Tensor) -> Tensor:
    """Mean of ``values`` over the entries where ``known`` is True; 0 (with a gradient) when none is known."""
    count = known.sum()
    total = torch.where(known, values, torch.zeros_like(values)).sum()
    return total / count.clamp(min=1)


def _known_and_filled(targets: Tensor) -> tuple[Tensor, Tensor]:
    known = ~torch.isnan(targets)
    return known, torch.nan_to_num(targets, nan=0.0)


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE on logits over the known targets, with optional per-label positive and negative weights."""

    def __init__(self, pos_weight: Tensor | None = None, neg_weight: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)
        self.register_buffer("neg_weight", neg_weight, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        known, filled = _known_and_filled(targets)
        losses = F.binary_cross_entropy_with_logits(logits.float(), filled.float(), reduction="none")
        if self.pos_weight is not None:
            losses = losses * (filled * self.pos_weight + (1 - filled) * self.neg_weight)
        return masked_mean(losses, known)


class MaskedFocalLoss(nn.Module):
    """Sigmoid focal loss over the known targets."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"train.loss.gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"train.loss.alpha must be in [0, 1] or null, got {alpha}")
        self.gamma = float(gamma)
        self.alpha = -1.0 if alpha is None else float(alpha)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        known, filled = _known_and_filled(targets)
        losses = sigmoid_focal_loss(logits.float(), filled.float(), alpha=self.alpha, gamma=self.gamma)
        return masked_mean(losses, known)


class MaskedCrossEntropyLoss(nn.Module):
    """Softmax cross-entropy for single-label tasks; unknown rows are ignored."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        if targets.ndim == 1:
            known = targets >= 0
            indices = torch.where(known, targets, torch.zeros_like(targets)).long()
            losses = F.cross_entropy(logits, indices, reduction="none", label_smoothing=self.label_smoothing)
        else:
            totals = targets.sum(dim=1)
            known = ~torch.isnan(totals) & (totals > 0)
            soft = torch.where(known[:, None], targets, torch.ones_like(targets))
            soft = soft / soft.sum(dim=1, keepdim=True)
            losses = F.cross_entropy(
                logits, soft.float(), reduction="none", label_smoothing=self.label_smoothing
            )
        return masked_mean(losses, known)


def class_balance_weights(label_frequencies: Sequence[float] | np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
    """``(w_pos, w_neg) = (1 - p, p)`` per label from positive fractions ``p`` (see module docstring)."""
    frequencies = torch.as_tensor(np.asarray(label_frequencies, dtype=np.float32))
    if frequencies.ndim != 1:
        raise ValueError(
            f"label frequencies must be 1-D (one per label), got shape {tuple(frequencies.shape)}"
        )
    frequencies = torch.nan_to_num(frequencies, nan=0.5)
    if ((frequencies < 0) | (frequencies > 1)).any():
        raise ValueError(f"label frequencies must lie in [0, 1], got {frequencies.tolist()}")
    frequencies = frequencies.clamp(FREQUENCY_EPSILON, 1 - FREQUENCY_EPSILON)
    return 1 - frequencies, frequencies


class BinaryLabelSmoothing(nn.Module):
    """``loss`` on binary targets smoothed by ``epsilon``: ``y (1 - ε) + ε / 2`` (NaN stays unknown)."""

    def __init__(self, loss: nn.Module, epsilon: float) -> None:
        super().__init__()
        self.loss, self.epsilon = loss, epsilon

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.loss(logits, targets * (1 - self.epsilon) + self.epsilon / 2)


def build_loss(loss_cfg, label_frequencies: Sequence[float] | np.ndarray | Tensor | None = None) -> nn.Module:
    """The loss named by ``loss_cfg.name``, with ``loss_cfg.label_smoothing``; ``weighted_bce`` needs the
    positive fraction of each label."""
    epsilon = float(loss_cfg.label_smoothing)
    if loss_cfg.name == "ce":
        return MaskedCrossEntropyLoss(label_smoothing=epsilon)
    loss = _base_loss(loss_cfg, label_frequencies)
    return BinaryLabelSmoothing(loss, epsilon) if epsilon else loss


def _base_loss(loss_cfg, label_frequencies) -> nn.Module:
    name = loss_cfg.name
    if name == "bce":
        return MaskedBCEWithLogitsLoss()
    if name == "weighted_bce":
        if label_frequencies is None:
            raise ValueError("train.loss.name=weighted_bce needs the training-set label frequencies")
        return MaskedBCEWithLogitsLoss(*class_balance_weights(label_frequencies))
    if name == "focal":
        return MaskedFocalLoss(gamma=loss_cfg.gamma, alpha=loss_cfg.alpha)
    raise ValueError(f"train.loss.name must be one of {list(LOSS_NAMES)}, got {name!r}")
