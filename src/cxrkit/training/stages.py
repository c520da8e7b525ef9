"""Staged fine-tuning: which parameters train, at what learning rate and with which loss, epoch by epoch.

``train.stages`` is a list of stages run one after the other; the run lasts the sum of their epochs
(``train.max_epochs`` is then that sum: :func:`cxrkit.training.config.check_train` refuses another value).
The stage of an epoch is a pure function of the epoch number, so a resumed run is in the same stage, with
the same frozen parameters and loss, as the interrupted one.

``trainable`` holds fnmatch patterns on the parameter names of the network built by
:func:`cxrkit.models.factory.create_model` (``backbone.<timm name>``, ``head.*``); ``*`` matches dots too, and
every pattern must match at least one parameter (a typo is an error, not a silently frozen network).
Parameters matching no pattern are frozen (``requires_grad=False``); with ``freeze_bn_stats`` the BatchNorm
layers whose parameters are all frozen also stay in eval mode, so their running statistics keep their
pretrained values.

At the first epoch of a stage the learning rate of every parameter group becomes ``stage.lr`` (or
``train.optimizer.lr``); ``cosine`` and ``onecycle`` schedules restart within each stage (warm-up included),
and ``plateau`` restarts its patience counter.

Examples (YAML)::

    # ResNet18: freeze the stem and layer1-3, fine-tune layer4 and the classifier
    train:
      stages:
        - {name: layer4+head, trainable: ["backbone.layer4.*", "head.*"], epochs: 10, lr: 1.0e-3}

    # ResNet50, five stages of progressive unfreezing with decreasing learning rates
    train:
      stages:
        - {name: head,   trainable: ["head.*"], epochs: 2, lr: 1.0e-3}
        - {name: layer4, trainable: ["backbone.layer4.*", "head.*"], epochs: 3, lr: 5.0e-4}
        - {name: layer3, trainable: ["backbone.layer[34].*", "head.*"], epochs: 3, lr: 2.0e-4}
        - {name: layer2, trainable: ["backbone.layer[234].*", "head.*"], epochs: 4, lr: 1.0e-4}
        - {name: all,    trainable: ["*"], epochs: 8, lr: 5.0e-5, loss: {name: focal, gamma: 2.0}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cxrkit.training.config import DEFAULT_MAX_EPOCHS

ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4
ONECYCLE_DEFAULT_WARMUP_FRACTION = 0.3


@dataclass(frozen=True)
class Stage:
    """A resolved stage: its position in the run and everything it sets."""

    index: int
    name: str
    start_epoch: int
    epochs: int
    trainable: tuple[str, ...]
    lr: float
    loss: Any
    freeze_bn_stats: bool

    @property
    def end_epoch(self) -> int:
        return self.start_epoch + self.epochs


def resolve_stages(train_cfg: Any) -> list[Stage]:
    """The stages of ``train_cfg`` with start epochs, learning rates and losses filled in.

    Without ``train.stages`` the whole run is one stage training every parameter for ``max_epochs``.
    """
    base_lr = float(train_cfg.optimizer.lr)
    if not train_cfg.stages:
        epochs = DEFAULT_MAX_EPOCHS if train_cfg.max_epochs is None else int(train_cfg.max_epochs)
        return [Stage(0, "all", 0, epochs, ("*",), base_lr, train_cfg.loss, False)]
    stages, start = [], 0
    for index, stage_cfg in enumerate(train_cfg.stages):
        lr = base_lr if stage_cfg.lr is None else float(stage_cfg.lr)
        loss = train_cfg.loss if stage_cfg.loss is None else stage_cfg.loss
        freeze_bn = bool(getattr(stage_cfg, "freeze_bn_stats", True))
        stage = Stage(
            index,
            stage_cfg.name,
            start,
            int(stage_cfg.epochs),
            tuple(stage_cfg.trainable),
            lr,
            loss,
            freeze_bn,
        )
        stages.append(stage)
        start = stage.end_epoch
    return stages


def total_epochs(stages: list[Stage]) -> int:
    return stages[-1].end_epoch


def stage_at(stages: list[Stage], epoch: int) -> Stage:
    """The stage that epoch ``epoch`` (0-based) belongs to; the last one for epochs past the end."""
    for stage in stages:
        if epoch < stage.end_epoch:
            return stage
    return stages[-1]


def trainable_names(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> set[str]:
    """Names of the parameters of ``model`` matching any of ``patterns``; every pattern must match one."""
    names = [name for name, _ in model.named_parameters()]
    selected: set[str] = set()
    for pattern in patterns:
        matched = {name for name in names if fnmatchcase(name, pattern)}
        if not matched:
            examples = ", ".join(names[:3] + names[-2:])
            raise ValueError(f"stage pattern {pattern!r} matches no parameter (names look like: {examples})")
        selected |= matched
    return selected


def apply_stage(model: nn.Module, stage: Stage) -> tuple[int, int]:
    """Set ``requires_grad`` per parameter for ``stage``; return (trainable, frozen) parameter counts."""
    selected = trainable_names(model, stage.trainable)
    counts = [0, 0]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in selected)
        counts[name not in selected] += parameter.numel()
    return counts[0], counts[1]


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose parameters are all frozen (kept in eval mode when ``freeze_bn_stats``)."""
    layers = []
    for module in model.modules():
        parameters = list(module.parameters(recurse=False))
        if isinstance(module, _BatchNorm) and parameters and not any(p.requires_grad for p in parameters):
            layers.append(module)
    return layers


@dataclass
class StagedLRLambda:
    """Multiplier of ``train.optimizer.lr`` at each optimiser step (``torch.optim.lr_scheduler.LambdaLR``).

    The schedule restarts in every stage and peaks at the stage's learning rate. ``cosine``: linear warm-up
    over ``warmup_epochs`` then cosine decay to ``min_lr``. ``onecycle``: the learning-rate curve of Smith's
    1cycle policy (cosine rise from ``lr/25`` over ``warmup_epochs``, default 30 % of the stage, then cosine
    decay to ``lr/25e4``; momentum is not cycled). A plain object, so LambdaLR checkpoints its fields and a
    resumed run continues the same curve.
    """

    kind: str
    base_lr: float
    stage_lrs: list[float]
    stage_steps: list[int]
    warmup_steps: list[int]
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        index, offset = self._locate(step)
        peak, length, warmup = self.stage_lrs[index], self.stage_steps[index], self.warmup_steps[index]
        if self.kind == "cosine":
            lr = self._cosine(offset, peak, length, warmup)
        elif self.kind == "onecycle":
            lr = self._onecycle(offset, peak, length, warmup)
        else:
            raise ValueError(f"StagedLRLambda kind must be 'cosine' or 'onecycle', got {self.kind!r}")
        return lr / self.base_lr

    def _locate(self, step: int) -> tuple[int, int]:
        start = 0
        for index, length in enumerate(self.stage_steps):
            if step < start + length:
                return index, step - start
            start += length
        return len(self.stage_steps) - 1, self.stage_steps[-1] - 1

    def _cosine(self, offset: int, peak: float, length: int, warmup: int) -> float:
        if offset < warmup:
            return peak * (offset + 1) / (warmup + 1)
        progress = (offset - warmup) / max(1, length - warmup)
        floor = min(self.min_lr, peak)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    @staticmethod
    def _onecycle(offset: int, peak: float, length: int, warmup: int) -> float:
        initial = peak / ONECYCLE_DIV_FACTOR
        final = initial / ONECYCLE_FINAL_DIV_FACTOR
        rise = warmup if warmup > 0 else max(1, round(ONECYCLE_DEFAULT_WARMUP_FRACTION * length))
        if offset < rise:
            return _cosine_interpolate(initial, peak, offset / rise)
        return _cosine_interpolate(peak, final, (offset - rise) / max(1, length - rise))


def _cosine_interpolate(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))


def staged_lr_lambda(
    scheduler_cfg: Any, stages: list[Stage], base_lr: float, steps_per_epoch: int
) -> StagedLRLambda:
    """The step schedule of ``train.scheduler`` (``cosine`` or ``onecycle``) over ``stages``."""
    warmup = max(0, round(float(scheduler_cfg.warmup_epochs) * steps_per_epoch))
    stage_steps = [max(1, stage.epochs * steps_per_epoch) for stage in stages]
    return StagedLRLambda(
        kind=scheduler_cfg.name,
        base_lr=base_lr,
        stage_lrs=[stage.lr for stage in stages],
        stage_steps=stage_steps,
        warmup_steps=[min(warmup, steps - 1) for steps in stage_steps],
        min_lr=float(scheduler_cfg.min_lr),
    )
