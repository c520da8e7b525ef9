"""Run a training: manifest → cache → data module → model → Lightning Trainer, one run directory per run.

Run directory (``config.output_dir``)::

    config.yaml              the resolved config; ``cxr train --resume RUN_DIR`` reloads it
    labels.json              label order of the network outputs
    checkpoints/best.ckpt    best epoch by ``train.monitor`` (EMA weights when ``train.ema_decay > 0``)
    checkpoints/last.ckpt    state at the last epoch boundary: weights, optimiser, scheduler, EMA, callbacks,
                             loop progress; written atomically (temporary file, fsync, rename)
    metrics.csv              every logged metric (CSVLogger): train/loss, val/loss, val/auroc_mean,
                             val/auroc/<label>, train/lr, train/images_per_s, ...
    training_curves.png      loss and validation AUROC per epoch
    mlflow.json              tracking URI, experiment and run id of the MLflow run (continued on resume)
    mlruns/                  the run's MLflow store (default tracking URI) and its artifacts
    test_metrics_<ckpt>.json written by ``cxr test``

MLflow (the ``[track]`` extra; skipped with a warning without it) tracks to ``train.tracking_uri`` or, by
default, the SQLite store ``<output_dir>/mlruns/mlflow.db`` inside the run directory; browse it with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns/mlflow.db``, or set ``train.tracking_uri`` to
one store shared by many runs. ``train.loggers`` may also list ``tensorboard`` (needs the tensorboard
package) and ``wandb`` (needs wandb).

Reproducibility: ``seed`` seeds weight initialisation; every training epoch re-seeds all generators from
``(seed, epoch, rank)`` (:class:`~cxrkit.training.callbacks.EpochSeed`), and ``train.deterministic`` turns on
deterministic algorithms (on GPU, ops without a deterministic kernel only warn). The same config and seed give
the same metrics on CPU; ``--resume`` continues from ``last.ckpt`` with the same weights, optimiser,
scheduler, stage, epoch, data order and augmentation as if the run had not stopped. ``precision: auto`` is
``bf16-mixed`` on GPUs that support it (``16-mixed`` on older ones) and 32-bit on CPU.

Multi-GPU and multi-node training use Lightning DDP (``train.devices``, ``train.num_nodes``,
``train.strategy``):

* one node, several GPUs: ``cxr train -c cfg.yaml train.devices=4 train.strategy=ddp`` (Lightning starts the
  other processes itself);
* torchrun: ``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500
  $(which cxr) train -c cfg.yaml train.devices=4 train.num_nodes=2 train.strategy=ddp``;
* SLURM (Lightning reads the SLURM environment): ``#SBATCH --nodes=2 --ntasks-per-node=4 --gres=gpu:4`` then
  ``srun cxr train -c cfg.yaml train.devices=4 train.num_nodes=2 train.strategy=ddp``.

With torchrun or SLURM every process starts at once, so prepare the cache first (``cxr data prepare -c
cfg.yaml``): only rank 0 builds it, the other ranks read the existing one. ``train.devices`` and the batch
size are per process; the effective batch is ``batch_size × devices × num_nodes × accumulate_grad_batches``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cxrkit.config import load_saved_config, save_config, to_container
from cxrkit.models.checkpoint import load_training_checkpoint
from cxrkit.reporting.plots import save_training_curves
from cxrkit.training.callbacks import (
    BEST_NAME,
    CHECKPOINT_DIR,
    LAST_NAME,
    AtomicCheckpointIO,
    build_callbacks,
)
from cxrkit.training.module import CHECKPOINT_METADATA_KEY, CXRClassifier
from cxrkit.training.stages import resolve_stages, total_epochs
from cxrkit.training.tracking import default_tracking_uri, local_artifact_location

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.csv"
CURVES_FILE = "training_curves.png"
MLFLOW_FILE = "mlflow.json"

ModelFactory = Callable[[int], nn.Module]


# ---- entry points ------------------------------------------------------------------------------------------
def train(
    config: DictConfig | None,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    mlflow_tags: Mapping[str, str] | None = None,
) -> Path:
    """Train from ``config``, or continue the run in ``resume`` with its saved config (``config`` is then
    ignored); return the run directory. ``callbacks`` are added to the Trainer's (e.g. Optuna pruning) and
    ``mlflow_tags`` to a new MLflow run (e.g. ``mlflow.parentRunId`` to nest it under a study's run)."""
    if resume is not None:
        run_dir = Path(resume)
        config = load_run_config(run_dir)
    elif config is None:
        raise ValueError("train() needs a config or a run directory to resume")
    else:
        run_dir = Path(config.output_dir)
    datamodule = build_datamodule(config, run_dir if resume is not None else None)
    return fit(
        config,
        datamodule,
        model_factory(config),
        run_dir,
        resume=resume is not None,
        callbacks=callbacks,
        mlflow_tags=mlflow_tags,
    )


def fit(
    config: DictConfig,
    datamodule: LightningDataModule,
    build_model: ModelFactory,
    run_dir: str | Path,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    mlflow_tags: Mapping[str, str] | None = None,
) -> Path:
    """Train ``build_model(num_labels)`` on ``datamodule`` into ``run_dir`` (from last.ckpt if ``resume``).

    ``datamodule`` yields ``(images [B,1,H,W] in [0,1], targets [B,L] with NaN = unknown)`` and exposes
    ``labels`` and ``train_label_frequencies()`` (positive fraction per label among known training targets).
    """
    run_dir = Path(run_dir)
    last = run_dir / CHECKPOINT_DIR / f"{LAST_NAME}.ckpt"
    if resume:
        if not last.exists():
            raise FileNotFoundError(f"cannot resume {run_dir}: {last} does not exist")
        _truncate_metrics(run_dir / METRICS_FILE, load_training_checkpoint(last)["epoch"])
        _remove_partial_checkpoints(run_dir / CHECKPOINT_DIR)
    elif last.exists():
        raise FileExistsError(
            f"{run_dir} already holds a trained run ({last}); continue it with "
            f"`cxr train --resume {run_dir}` or set another output_dir"
        )
    else:
        _start_fresh(run_dir)

    _setup_data(datamodule)
    labels = list(datamodule.labels)
    frequencies = datamodule.train_label_frequencies() if _needs_frequencies(config.train) else None
    seed_everything(int(config.seed), workers=True, verbose=False)
    model = build_model(len(labels))
    module = CXRClassifier(model, labels, config.train, frequencies, {"config": to_container(config)})
    _write_run_files(config, labels, run_dir, None if resume else getattr(datamodule, "cache", None))

    validate = float(config.train.limit_val_batches) > 0
    loggers = build_loggers(config, run_dir, mlflow_tags)
    trainer = build_trainer(config, run_dir, loggers, validate=validate, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        try:
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True
            )
        except SIGTERMException as stop:  # Lightning stops after the batch; uncaught it would exit with 0
            raise KeyboardInterrupt(
                f"stopped by SIGTERM; resume with `cxr train --resume {run_dir}`"
            ) from stop
        except SystemExit as stop:  # Lightning turns Ctrl-C during fit into sys.exit(1)
            raise KeyboardInterrupt(f"resume with `cxr train --resume {run_dir}`") from stop
    _finish(run_dir)
    return run_dir


def test(run_dir: str | Path, checkpoint: str = BEST_NAME) -> Path:
    """Evaluate ``checkpoints/<checkpoint>.ckpt`` of ``run_dir`` on the test split; return the JSON path."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    build_model = model_factory(config, pretrained=False)
    return evaluate_checkpoint(config, build_datamodule(config, run_dir), build_model, run_dir, checkpoint)


def evaluate_checkpoint(
    config: DictConfig,
    datamodule: LightningDataModule,
    build_model: ModelFactory,
    run_dir: str | Path,
    checkpoint: str = BEST_NAME,
) -> Path:
    """Run ``checkpoints/<checkpoint>.ckpt`` on the test split of ``datamodule``; write the metrics JSON."""
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    _setup_data(datamodule, stage="test")
    labels = list(datamodule.labels)
    saved = json.loads((run_dir / LABELS_FILE).read_text())
    if labels != saved:
        raise ValueError(
            f"the test data labels {labels} differ from the labels the run was trained on {saved}"
        )
    frequencies = datamodule.train_label_frequencies() if _needs_frequencies(config.train) else None
    module = CXRClassifier(build_model(len(labels)), labels, config.train, frequencies)
    trainer = Trainer(
        **_hardware_args(config.train),
        logger=False,
        enable_checkpointing=False,
        deterministic=_deterministic(config.train),
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        load_training_checkpoint(path)  # an unsafe file is refused in one line before Lightning reads it
        results = trainer.test(
            module, datamodule=datamodule, ckpt_path=str(path), weights_only=True, verbose=False
        )[0]
    out = run_dir / f"test_metrics_{checkpoint}.json"
    if trainer.is_global_zero:
        payload = {
            "checkpoint": str(path.relative_to(run_dir)),
            "tta": bool(config.train.tta),
            "metrics": {name: _json_number(value) for name, value in sorted(results.items())},
        }
        out.write_text(json.dumps(payload, indent=2))
    return out


# ---- building blocks ---------------------------------------------------------------------------------------
def load_run_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a cxrkit run directory: {path} is missing")
    return load_saved_config(path)


def checkpoint_path(run_dir: str | Path, checkpoint: str = BEST_NAME) -> Path:
    """``run_dir/checkpoints/<checkpoint>.ckpt`` (``best`` or ``last``), checked to exist."""
    if checkpoint not in (BEST_NAME, LAST_NAME):
        raise ValueError(f"checkpoint must be {BEST_NAME!r} or {LAST_NAME!r}, got {checkpoint!r}")
    path = Path(run_dir) / CHECKPOINT_DIR / f"{checkpoint}.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def build_datamodule(config: DictConfig, run_dir: str | Path | None = None) -> LightningDataModule:
    """Manifest → cache (rank 0 builds or reuses it) → :class:`cxrkit.data.dataset.CXRDataModule`; with
    ``run_dir``, with the splits that run stored (:func:`cxrkit.data.build.build_run_manifest`)."""
    from cxrkit.data.build import build_manifest, build_run_manifest, prepare_data
    from cxrkit.data.dataset import CXRDataModule

    if _is_first_process():
        manifest = build_run_manifest(config.data, run_dir) if run_dir else build_manifest(config.data)
        prepare_data(config.data, manifest=manifest)
    return CXRDataModule(config.data, config.data.cache.dir, seed=int(config.seed))


def model_factory(config: DictConfig, pretrained: bool = True) -> ModelFactory:
    """``num_labels -> network`` from ``config.model``. ``pretrained=False`` skips fetching initial weights,
    for a network a checkpoint then fills (it supplies every weight and the input normalisation buffers)."""
    from cxrkit.models.factory import create_model

    model_cfg = config.model
    if not pretrained:
        model_cfg = OmegaConf.merge(model_cfg, {"pretrained": {"source": "none"}})
    return lambda num_labels: create_model(model_cfg, num_labels)


def build_loggers(
    config: DictConfig, run_dir: Path, mlflow_tags: Mapping[str, str] | None = None
) -> list[Logger]:
    """CSV (always, ``metrics.csv``) plus the others named in ``train.loggers``."""
    loggers: list[Logger] = [RunCSVLogger(run_dir)]
    if "mlflow" in config.train.loggers and _mlflow_installed():
        loggers.append(_mlflow_logger(config, run_dir, mlflow_tags))
    if "tensorboard" in config.train.loggers:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""))
    if "wandb" in config.train.loggers:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(name=config.name, save_dir=str(run_dir), project="cxrkit"))
    for logger in loggers:
        logger.log_hyperparams(to_container(config))
    return loggers


def build_trainer(
    config: DictConfig,
    run_dir: Path,
    loggers: list[Logger],
    validate: bool = True,
    callbacks: Sequence[Callback] = (),
) -> Trainer:
    train_cfg = config.train
    return Trainer(
        **_hardware_args(train_cfg),
        max_epochs=total_epochs(resolve_stages(train_cfg)),
        accumulate_grad_batches=int(train_cfg.accumulate_grad_batches),
        gradient_clip_val=float(train_cfg.gradient_clip_val) or None,
        deterministic=_deterministic(train_cfg),
        limit_train_batches=train_cfg.limit_train_batches,
        limit_val_batches=train_cfg.limit_val_batches,
        log_every_n_steps=int(train_cfg.log_every_n_steps),
        logger=loggers,
        callbacks=[*build_callbacks(train_cfg, run_dir, int(config.seed), validate), *callbacks],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir,
        enable_model_summary=True,
        enable_progress_bar=log.isEnabledFor(logging.INFO),
    )


@dataclass
class TrainedModel:
    """A trained network ready for inference, with what is needed to interpret its outputs."""

    model: nn.Module
    labels: list[str]
    activation: str
    config: DictConfig


def load_trained_model(run_dir: str | Path, checkpoint: str = BEST_NAME) -> TrainedModel:
    """The network of ``run_dir`` with the weights of ``checkpoints/<checkpoint>.ckpt`` (EMA when used)."""
    path = checkpoint_path(run_dir, checkpoint)
    state = load_training_checkpoint(path)
    metadata = state[CHECKPOINT_METADATA_KEY]
    config = OmegaConf.create(metadata["config"])
    model = model_factory(config, pretrained=False)(len(metadata["labels"]))
    weights = {
        name[len("model.") :]: value
        for name, value in state["state_dict"].items()
        if name.startswith("model.")
    }
    model.load_state_dict(weights)
    return TrainedModel(model.eval(), list(metadata["labels"]), metadata["activation"], config)


# ---- loggers -----------------------------------------------------------------------------------------------
class _AppendingWriter(ExperimentWriter):
    """CSV writer that keeps an existing metrics.csv (resume) instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            self.metrics_keys = list(pd.read_csv(self.metrics_file_path, nrows=0).columns)


class RunCSVLogger(CSVLogger):
    """``run_dir/metrics.csv``, appended to on resume."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(save_dir=run_dir, name="", version="")

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _mlflow_logger(config: DictConfig, run_dir: Path, tags: Mapping[str, str] | None = None) -> MLFlowLogger:
    record_path = run_dir / MLFLOW_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    uri = record.get("tracking_uri") or config.train.tracking_uri or default_tracking_uri(run_dir)
    logger = MLFlowLogger(
        experiment_name=config.name,
        run_name=run_dir.name,
        tracking_uri=uri,
        artifact_location=local_artifact_location(uri),
        run_id=record.get("run_id"),
        tags=dict(tags) if tags else None,
    )
    if rank_zero_only.rank == 0:
        record = {"tracking_uri": uri, "experiment_id": logger.experiment_id, "run_id": logger.run_id}
        record_path.write_text(json.dumps(record, indent=2))
    return logger


def _mlflow_installed() -> bool:
    """Whether MLflow is importable; without it (no ``[track]`` extra) tracking is skipped, said once."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        log.warning("MLflow tracking skipped: it needs the [track] extra (pip install 'cxrkit[track]')")
        return False
    return True


# ---- helpers -----------------------------------------------------------------------------------------------
def _hardware_args(train_cfg: Any) -> dict[str, Any]:
    accelerator = train_cfg.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = train_cfg.precision
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    return {
        "accelerator": accelerator,
        "devices": _devices(train_cfg.devices),
        "num_nodes": int(train_cfg.num_nodes),
        "strategy": _strategy(train_cfg),
        "precision": precision,
    }


def _devices(devices: str) -> int | str | list[int]:
    """``auto``, a count (``2``) or a comma-separated list of device indices (``0,2``)."""
    text = str(devices).strip()
    if text.isdigit() or text == "-1":
        return int(text)
    if "," in text:
        return [int(index) for index in text.split(",") if index.strip()]
    return text


def _strategy(train_cfg: Any) -> str:
    """DDP must look for unused parameters when a stage freezes part of the network."""
    strategy = str(train_cfg.strategy)
    freezes = any(tuple(stage.trainable) != ("*",) for stage in resolve_stages(train_cfg))
    if freezes and strategy in ("ddp", "ddp_spawn"):
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def _deterministic(train_cfg: Any) -> bool | str:
    if not train_cfg.deterministic:
        return False
    return "warn" if torch.cuda.is_available() and train_cfg.accelerator != "cpu" else True


def _needs_frequencies(train_cfg: Any) -> bool:
    return any(stage.loss.name == "weighted_bce" for stage in resolve_stages(train_cfg))


def _setup_data(datamodule: LightningDataModule, stage: str = "fit") -> None:
    datamodule.prepare_data()
    datamodule.setup(stage)


def _is_first_process() -> bool:
    """Whether this is global rank 0 according to the launcher's environment: torchrun and SLURM set the
    global rank; Lightning's own launcher sets LOCAL_RANK for the processes it starts, the user NODE_RANK."""
    for variable in ("RANK", "SLURM_PROCID"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable]) == 0
    return all(int(os.environ.get(variable, "0") or 0) == 0 for variable in ("NODE_RANK", "LOCAL_RANK"))


def _json_number(value: Any) -> float | None:
    """A float for JSON; None (``null``) for NaN, e.g. the AUROC of a label without both classes."""
    number = float(value)
    return None if math.isnan(number) else number


@rank_zero_only
def _start_fresh(run_dir: Path) -> None:
    """Remove the logs of an earlier attempt that never reached its first checkpoint."""
    for name in (METRICS_FILE, CURVES_FILE, MLFLOW_FILE, "hparams.yaml"):
        (run_dir / name).unlink(missing_ok=True)


@rank_zero_only
def _write_run_files(config: DictConfig, labels: list[str], run_dir: Path, cache: Any = None) -> None:
    """config.yaml, labels.json and, given the cache trained on, its manifest (the run's frozen splits)."""
    from cxrkit.data.run_manifest import save_run_manifest

    run_dir.mkdir(parents=True, exist_ok=True)
    if cache is not None:
        save_run_manifest(cache.manifest, run_dir)
    save_config(config, run_dir / CONFIG_FILE)
    (run_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))


@rank_zero_only
def _remove_partial_checkpoints(checkpoint_dir: Path) -> None:
    """Temporary files of saves that a kill interrupted (the checkpoints they were replacing are intact)."""
    for partial in checkpoint_dir.glob(".*.ckpt.tmp-*"):
        partial.unlink()


@rank_zero_only
def _truncate_metrics(metrics_csv: Path, resume_epoch: int) -> None:
    """Drop rows of epochs from ``resume_epoch`` on (logged by the interrupted run after its checkpoint)."""
    if not metrics_csv.exists():
        return
    frame = pd.read_csv(metrics_csv)
    frame[frame["epoch"] < resume_epoch].to_csv(metrics_csv, index=False)


@rank_zero_only
def _finish(run_dir: Path) -> None:
    if (run_dir / METRICS_FILE).exists():
        save_training_curves(run_dir / METRICS_FILE, run_dir / CURVES_FILE)
    log.info("run finished: %s", run_dir)
