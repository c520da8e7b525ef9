"""Losses: NaN masking, agreement with torch on fully known targets, class weights, focal, cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cxrkit.config import ConfigError, load_config
from cxrkit.training.losses import (
    FREQUENCY_EPSILON,
    MaskedBCEWithLogitsLoss,
    MaskedCrossEntropyLoss,
    MaskedFocalLoss,
    build_loss,
    class_balance_weights,
)

NAN = float("nan")


def _batch(seed: int = 0, shape: tuple[int, int] = (8, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=generator, requires_grad=True)
    targets = (torch.rand(*shape, generator=generator) < 0.4).float()
    return logits, targets


def _loss_cfg(**fields):
    return OmegaConf.merge(load_config().train.loss, fields)


def test_bce_equals_torch_on_fully_known_targets():
    logits, targets = _batch()
    ours = build_loss(_loss_cfg(name="bce"))(logits, targets)
    assert torch.allclose(ours, F.binary_cross_entropy_with_logits(logits, targets))


@pytest.mark.parametrize("name", ["bce", "weighted_bce", "focal"])
def test_unknown_targets_are_ignored(name):
    logits, targets = _batch(1)
    unknown = torch.zeros_like(targets, dtype=torch.bool)
    unknown[::2, 1] = True
    unknown[3, :] = True
    loss_fn = build_loss(_loss_cfg(name=name), label_frequencies=[0.1, 0.2, 0.3, 0.4, 0.5])

    masked = loss_fn(logits, targets.masked_fill(unknown, NAN))
    assert torch.isfinite(masked)
    # the value does not depend on what the unknown entries hold, and equals the mean over known entries
    flipped = loss_fn(logits, torch.where(unknown, 1 - targets, targets).masked_fill(unknown, NAN))
    assert torch.equal(masked, flipped)
    if name == "bce":
        known = ~unknown
        expected = F.binary_cross_entropy_with_logits(logits[known], targets[known])
        assert torch.allclose(masked, expected)
    masked.backward()
    assert torch.all(logits.grad[unknown] == 0) and torch.any(logits.grad[~unknown] != 0)


@pytest.mark.parametrize("name", ["bce", "weighted_bce", "focal"])
def test_batch_without_known_targets_gives_zero_with_grad(name):
    logits = torch.randn(4, 3, requires_grad=True)
    loss = build_loss(_loss_cfg(name=name), label_frequencies=[0.2, 0.5, 0.9])(
        logits, torch.full((4, 3), NAN)
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_class_weights_from_frequencies():
    w_pos, w_neg = class_balance_weights([0.1, 0.5, 0.0, NAN])
    assert torch.allclose(w_pos, torch.tensor([0.9, 0.5, 1 - FREQUENCY_EPSILON, 0.5]))
    assert torch.allclose(w_neg, torch.tensor([0.1, 0.5, FREQUENCY_EPSILON, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_balance_weights([1.5])
    with pytest.raises(ValueError, match="weighted_bce"):
        build_loss(_loss_cfg(name="weighted_bce"))


def test_weighted_bce_matches_the_chexnet_formula():
    logits, targets = _batch(2, (6, 2))
    frequencies = np.array([0.2, 0.7])
    loss = build_loss(_loss_cfg(name="weighted_bce"), frequencies)(logits, targets)
    p = torch.sigmoid(logits)
    w_pos, w_neg = torch.tensor(1 - frequencies).float(), torch.tensor(frequencies).float()
    expected = -(w_pos * targets * torch.log(p) + w_neg * (1 - targets) * torch.log(1 - p)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    # rare positives weigh more than the common negatives: a missed positive costs more than a false alarm
    rare = MaskedBCEWithLogitsLoss(*class_balance_weights([0.1]))
    miss = rare(torch.tensor([[-2.0]]), torch.tensor([[1.0]]))
    false_alarm = rare(torch.tensor([[2.0]]), torch.tensor([[0.0]]))
    assert miss > 5 * false_alarm


def test_focal_reduces_to_bce_and_down_weights_easy_examples():
    logits, targets = _batch(3)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(MaskedFocalLoss(gamma=0.0, alpha=None)(logits, targets), bce, atol=1e-6)
    easy = MaskedFocalLoss(gamma=2.0)(torch.tensor([[4.0]]), torch.tensor([[1.0]]))
    easy_bce = F.binary_cross_entropy_with_logits(torch.tensor([[4.0]]), torch.tensor([[1.0]]))
    assert easy < 0.01 * easy_bce
    alpha = MaskedFocalLoss(gamma=0.0, alpha=0.25)
    positive = alpha(torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    negative = alpha(torch.tensor([[0.0]]), torch.tensor([[0.0]]))
    assert torch.allclose(positive / negative, torch.tensor(0.25 / 0.75))
    with pytest.raises(ValueError, match="alpha"):
        MaskedFocalLoss(alpha=1.5)


def test_cross_entropy_with_indices_and_one_hot():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3, generator=generator)
    indices = torch.tensor([0, 2, 1, 1, 0, 2])
    loss_fn = build_loss(_loss_cfg(name="ce"))
    expected = F.cross_entropy(logits, indices)
    assert torch.allclose(loss_fn(logits, indices), expected)
    assert torch.allclose(loss_fn(logits, F.one_hot(indices, 3).float()), expected)

    unknown_index = torch.tensor([0, 2, -1, 1, 0, -1])
    one_hot = F.one_hot(indices, 3).float()
    one_hot[2] = NAN
    one_hot[5] = 0.0
    known = torch.tensor([True, True, False, True, True, False])
    expected_known = F.cross_entropy(logits[known], indices[known])
    assert torch.allclose(loss_fn(logits, unknown_index), expected_known)
    assert torch.allclose(loss_fn(logits, one_hot), expected_known)
    assert isinstance(loss_fn, MaskedCrossEntropyLoss)
    assert loss_fn(logits, torch.full((6,), -1)).item() == 0.0


def test_unknown_loss_name_is_an_error():
    with pytest.raises(ValueError, match=r"train\.loss\.name"):
        build_loss(_loss_cfg(name="dice"))


def test_losses_accept_half_precision_logits():
    logits, targets = _batch(5)
    loss = build_loss(_loss_cfg(name="bce"))(logits.detach().bfloat16(), targets)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


@pytest.mark.parametrize("name", ["bce", "focal"])
def test_label_smoothing_pulls_binary_targets_to_one_half_and_keeps_unknowns_unknown(name):
    logits, targets = _batch(3)
    targets[0, 0] = NAN
    smoothed = build_loss(_loss_cfg(name=name, label_smoothing=0.2))(logits, targets)
    expected = build_loss(_loss_cfg(name=name))(logits, targets * 0.8 + 0.1)
    assert torch.isfinite(smoothed) and torch.allclose(smoothed, expected)
    assert not torch.allclose(smoothed, build_loss(_loss_cfg(name=name))(logits, targets))


def test_label_smoothing_of_cross_entropy_equals_torch():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    indices = torch.tensor([0, 2, 1, 1, 0, 2])
    ours = build_loss(_loss_cfg(name="ce", label_smoothing=0.1))(logits, indices)
    assert torch.allclose(ours, F.cross_entropy(logits, indices, label_smoothing=0.1))


@pytest.mark.parametrize("epsilon", [-0.1, 1.0])
def test_label_smoothing_out_of_range_is_refused_by_name(epsilon):
    """Refused when the config is read, before any data is touched."""
    with pytest.raises(
        ConfigError, match=rf"train\.loss\.label_smoothing must be in \[0, 1\), got {epsilon}"
    ):
        load_config(overrides=[f"train.loss.label_smoothing={epsilon}"])
