"""Configuration of training: loss, optimiser, schedule, stages, precision, devices and logging.

Choice fields are ``Literal`` types (OmegaConf rejects other values when the config loads);
:func:`check_train` adds ranges and the stage/epoch rules, and :func:`settle_epochs` fills in
``max_epochs`` so that the saved config says how long the run lasts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

LossName = Literal["bce", "weighted_bce", "focal", "ce"]
OptimizerName = Literal["adam", "adamw", "sgd", "rmsprop"]
SchedulerName = Literal["plateau", "cosine", "onecycle", "none"]
Precision = Literal["auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"]
LoggerName = Literal["csv", "mlflow", "tensorboard", "wandb"]
#: ``train.max_epochs`` without stages when the config leaves it empty.
DEFAULT_MAX_EPOCHS = 10


@dataclass
class LossConfig:
    """``bce``, ``weighted_bce`` (weights from training label frequencies), ``focal`` or ``ce``.
    ``label_smoothing``: targets pulled towards uniform by this fraction (0: off; Szegedy et al. 2016)."""

    name: LossName = "bce"
    gamma: float = 2.0
    alpha: float | None = None
    label_smoothing: float = 0.0


@dataclass
class OptimizerConfig:
    name: OptimizerName = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedulerConfig:
    """``plateau`` (reduce on plateau of the monitored metric), ``cosine`` (with linear warm-up),
    ``onecycle`` or ``none``."""

    name: SchedulerName = "plateau"
    warmup_epochs: float = 0.0
    factor: float = 0.1
    patience: int = 1
    min_lr: float = 0.0


@dataclass
class StageConfig:
    """One stage of staged fine-tuning: which parameters train (fnmatch patterns on parameter names,
    ``*`` = all), at what learning rate, for how many epochs, with which loss (None = ``train.loss``).
    ``freeze_bn_stats`` keeps BatchNorm layers whose parameters are all frozen in eval mode (running
    statistics unchanged). See :mod:`cxrkit.training.stages`."""

    name: str = "all"
    trainable: list[str] = field(default_factory=lambda: ["*"])
    epochs: int = 1
    lr: float | None = None
    loss: LossConfig | None = None
    freeze_bn_stats: bool = True


@dataclass
class TrainConfig:
    """``max_epochs``: the run's length; with ``stages`` it is their total (leave it empty, or give that
    total: another value is an error, shorten the stages instead). ``limit_train_batches`` /
    ``limit_val_batches``: an integer is a number of batches per epoch (``1``: one batch), a float a
    fraction of them (``1.0``: all, ``0.25``: a quarter)."""

    max_epochs: int | None = None
    stages: list[StageConfig] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    ema_decay: float = 0.0
    precision: Precision = "auto"
    channels_last: bool = False
    compile: bool = False
    monitor: str = "val/auroc_mean"
    early_stopping_patience: int = 0
    deterministic: bool = True
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    tta: bool = False
    loggers: list[LoggerName] = field(default_factory=lambda: ["csv", "mlflow"])
    tracking_uri: str = ""
    log_every_n_steps: int = 10


def stage_epochs(train: Any) -> int:
    """Epochs the stages add up to (0 without stages)."""
    return sum(int(stage.epochs) for stage in train.stages)


def settle_epochs(train: Any) -> None:
    """Fill an empty ``max_epochs``: the stages' total, else :data:`DEFAULT_MAX_EPOCHS`."""
    if train.max_epochs is None:
        train.max_epochs = stage_epochs(train) if train.stages else DEFAULT_MAX_EPOCHS


def check_train(train: Any) -> list[str]:
    """What is wrong with ``train`` beyond its types (one message per problem, naming the field)."""
    problems = []
    if train.stages:
        total = stage_epochs(train)
        if train.max_epochs is not None and train.max_epochs != total:
            epochs = "+".join(str(stage.epochs) for stage in train.stages)
            problems.append(
                f"train.max_epochs={train.max_epochs} conflicts with train.stages "
                f"({epochs} = {total} epochs), which decide the run's length; drop train.max_epochs or "
                "change the stages' epochs (e.g. train.stages.0.epochs=1)"
            )
    elif train.max_epochs is not None and train.max_epochs < 1:
        problems.append(f"train.max_epochs must be >= 1, got {train.max_epochs}")
    for index, stage in enumerate(train.stages):
        if stage.epochs < 1:
            problems.append(f"train.stages.{index}.epochs must be >= 1, got {stage.epochs}")
        if not stage.trainable:
            problems.append(f"train.stages.{index}.trainable is empty: list at least one pattern")
        if stage.lr is not None and stage.lr <= 0:
            problems.append(f"train.stages.{index}.lr must be positive, got {stage.lr}")
    optimizer = train.optimizer
    if optimizer.lr <= 0:
        problems.append(f"train.optimizer.lr must be positive, got {optimizer.lr}")
    if optimizer.weight_decay < 0:
        problems.append(f"train.optimizer.weight_decay must be >= 0, got {optimizer.weight_decay}")
    if not 0 <= optimizer.momentum < 1:
        problems.append(f"train.optimizer.momentum must be in [0, 1), got {optimizer.momentum}")
    if not all(0 <= beta < 1 for beta in optimizer.betas):
        problems.append(f"train.optimizer.betas must be in [0, 1), got {list(optimizer.betas)}")
    scheduler = train.scheduler
    if scheduler.warmup_epochs < 0:
        problems.append(f"train.scheduler.warmup_epochs must be >= 0, got {scheduler.warmup_epochs}")
    if not 0 < scheduler.factor < 1:
        problems.append(f"train.scheduler.factor must be in (0, 1), got {scheduler.factor}")
    if scheduler.patience < 0 or scheduler.min_lr < 0:
        problems.append("train.scheduler.patience and train.scheduler.min_lr must be >= 0")
    if train.loss.gamma < 0:
        problems.append(f"train.loss.gamma must be >= 0, got {train.loss.gamma}")
    if train.loss.alpha is not None and not 0 <= train.loss.alpha <= 1:
        problems.append(f"train.loss.alpha must be in [0, 1] (or null), got {train.loss.alpha}")
    if not 0 <= train.loss.label_smoothing < 1:
        problems.append(f"train.loss.label_smoothing must be in [0, 1), got {train.loss.label_smoothing}")
    if not 0 <= train.ema_decay < 1:
        problems.append(f"train.ema_decay must be in [0, 1), got {train.ema_decay}")
    for name in ("accumulate_grad_batches", "num_nodes", "log_every_n_steps"):
        if train[name] < 1:
            problems.append(f"train.{name} must be >= 1, got {train[name]}")
    for name in ("gradient_clip_val", "early_stopping_patience"):
        if train[name] < 0:
            problems.append(f"train.{name} must be >= 0, got {train[name]}")
    for name in ("limit_train_batches", "limit_val_batches"):
        problems += _check_limit(name, train[name])
    if not train.monitor.startswith("val/"):
        problems.append(f"train.monitor must be a validation metric (val/...), got {train.monitor!r}")
    return problems


def _check_limit(name: str, value: int | float) -> list[str]:
    if isinstance(value, int):
        return [] if value >= 0 else [f"train.{name} must be >= 0 batches, got {value}"]
    if not 0 <= value <= 1:
        return [
            f"train.{name}={value}: a float is a fraction of the epoch's batches in [0, 1]; "
            f"give a number of batches as an integer (e.g. {round(value)})"
        ]
    return []
