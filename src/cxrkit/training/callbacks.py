"""Lightning callbacks and plugins of a cxrkit training run.

* :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file next to the target, fsynced and
  renamed over it, so a kill during a save leaves the previous ``last.ckpt`` intact.
* :class:`EpochSeed`: re-seeds Python, NumPy and torch (CPU and CUDA) at the start of every training epoch
  from ``(seed, epoch, rank)``, and gives the training DataLoader its own per-epoch generator when it has none
  (so creating the epoch's iterator draws nothing from the global generator). Data order, augmentation and
  dropout of an epoch then depend on nothing else, which makes ``--resume`` continue exactly like an
  uninterrupted run.
* :class:`LastCheckpoint`: writes ``last.ckpt`` at the start of every epoch after the first (the previous
  epoch, its validation and all its logs complete, loggers flushed) and when training ends; Lightning resumes
  such a checkpoint by re-entering the epoch from its start.
* :class:`Throughput`: images per second in the progress bar and the logs (``train/images_per_s``).
* :class:`TrainingCurves`: redraws ``training_curves.png`` from ``metrics.csv`` after every epoch.
* :func:`build_callbacks`: the callbacks a run uses (checkpoints, early stopping, EMA, the ones above).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from cxrkit.files import write_atomic
from cxrkit.reporting.plots import save_training_curves

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best"
LAST_NAME = "last"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (:func:`cxrkit.files.write_atomic`): never a truncated ``last.ckpt``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda handle: torch.save(checkpoint, handle))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed that depends only on (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


class EpochSeed(Callback):
    """Re-seed every random number generator at the start of each training epoch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank)
        seed_all(seed)
        for loader in _train_dataloaders(trainer):
            if loader.generator is None:
                loader.generator = torch.Generator().manual_seed(seed)


def _train_dataloaders(trainer: Trainer) -> list[DataLoader]:
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, list | tuple):
        loaders = [loaders]
    return [loader for loader in loaders if isinstance(loader, DataLoader)]


class LastCheckpoint(Callback):
    """Save ``last.ckpt`` at the start of every epoch after the first and at the end of training.

    Lightning counts an epoch as "ready" just before ``on_train_epoch_start``; the checkpoint is written with
    that count taken back, i.e. in exactly the state the loop had when the previous epoch completed, so
    resuming it starts the epoch afresh (hooks, data, seeds) instead of treating it as already under way.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 0:
            return
        progress = trainer.fit_loop.epoch_progress
        progress.total.ready -= 1
        progress.current.ready -= 1
        try:
            self._save(trainer)
        finally:
            progress.total.ready += 1
            progress.current.ready += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(self.path, weights_only=False)


class Throughput(Callback):
    """Training images per second (all ranks together), shown in the progress bar and logged per step."""

    def __init__(self) -> None:
        self._start = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch[0]) * trainer.world_size
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            pl_module.log(
                "train/images_per_s", self._images / elapsed, on_step=True, on_epoch=False, prog_bar=True
            )


class TrainingCurves(Callback):
    """Keep ``training_curves.png`` up to date with ``metrics.csv`` (rank zero)."""

    def __init__(self, metrics_csv: Path, out_png: Path) -> None:
        self.metrics_csv = Path(metrics_csv)
        self.out_png = Path(out_png)

    @rank_zero_only
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch > 0 and self.metrics_csv.exists():
            save_training_curves(self.metrics_csv, self.out_png)


def monitor_mode(monitor: str) -> str:
    """``min`` for losses, ``max`` for every other metric (AUROC, accuracy, F1)."""
    return "min" if "loss" in monitor.rsplit("/", 1)[-1] else "max"


def build_callbacks(train_cfg: Any, run_dir: Path, seed: int, validate: bool) -> list[Callback]:
    """Checkpoints (``best.ckpt`` by ``train.monitor`` and ``last.ckpt`` every epoch), early stopping, EMA,
    per-epoch seeding, throughput and training curves."""
    monitor = train_cfg.monitor if validate else None
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / CHECKPOINT_DIR,
            filename=BEST_NAME,
            monitor=monitor,
            mode=monitor_mode(train_cfg.monitor),
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        ),
        LastCheckpoint(run_dir / CHECKPOINT_DIR / f"{LAST_NAME}.ckpt"),
        EpochSeed(seed),
        Throughput(),
        TrainingCurves(run_dir / "metrics.csv", run_dir / "training_curves.png"),
    ]
    if train_cfg.early_stopping_patience > 0 and validate:
        callbacks.append(
            EarlyStopping(
                monitor=train_cfg.monitor,
                mode=monitor_mode(train_cfg.monitor),
                patience=train_cfg.early_stopping_patience,
                check_finite=False,
            )
        )
    if train_cfg.ema_decay > 0:  # in [0, 1): checked when the config loads
        callbacks.append(EMAWeightAveraging(decay=train_cfg.ema_decay))
    return callbacks
