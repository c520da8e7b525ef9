"""Configuration of training: loss, optimiser, schedule, stages, precision, devices and logging."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LossConfig:
    """``bce``, ``weighted_bce`` (weights from training label frequencies), ``focal`` or ``ce``."""

    name: str = "bce"
    gamma: float = 2.0
    alpha: float | None = None


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedulerConfig:
    """``plateau`` (reduce on plateau of the monitored metric), ``cosine`` (with linear warm-up),
    ``onecycle`` or ``none``."""

    name: str = "plateau"
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
    max_epochs: int = 10
    stages: list[StageConfig] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    ema_decay: float = 0.0
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    monitor: str = "val/auroc_mean"
    early_stopping_patience: int = 0
    deterministic: bool = True
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    tta: bool = False
    loggers: list[str] = field(default_factory=lambda: ["csv", "mlflow"])
    tracking_uri: str = ""
    log_every_n_steps: int = 10
