"""One Optuna trial = one cxrkit training run with sampled config values, pruned from its validation curve.

The objective samples the search space into the base config, trains it into ``<study_dir>/trials/trial_NNNN``
with Optuna's Lightning pruning callback (reporting ``study.metric`` after every validation epoch) and a guard
that fails the trial on a non-finite training loss, and returns the best epoch's metric. A trial that raises
is recorded with its error message (trial attribute ``error``); its MLflow run is nested under the study's run
(tag ``mlflow.parentRunId``) and holds the sampled parameters, the trainer's per-epoch metrics, the trial's
resolved config (artifact ``config.yaml``) and its final state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from cxrkit.config import validate_config
from cxrkit.training.callbacks import monitor_mode
from cxrkit.tuning.space import SearchSpace, apply_values, resolved, sample

#: ``runner(config, callbacks, mlflow_tags) -> run_dir``: trains one trial's config into its output_dir.
Runner = Callable[[DictConfig, Sequence[Callback], Mapping[str, str] | None], Path]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
MLFLOW_FILE = "mlflow.json"
PARENT_TAG = "mlflow.parentRunId"
STUDY_KEY_TAG = "cxrkit.study_key"
_MAX_ERROR_CHARS = 2000


def train_trial(
    config: DictConfig, callbacks: Sequence[Callback], mlflow_tags: Mapping[str, str] | None
) -> Path:
    """Default runner: :func:`cxrkit.training.run.train` (manifest, cache, data module, model, Trainer)."""
    from cxrkit.training.run import train

    return train(config, callbacks=callbacks, mlflow_tags=mlflow_tags)


class FiniteLossGuard(Callback):
    """Fail the run as soon as a training loss is NaN or infinite (a diverged trial stops wasting epochs)."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            raise FloatingPointError(
                f"non-finite training loss ({float(loss):g}) at epoch {trainer.current_epoch}"
                f", batch {batch_idx}: the trial diverged"
            )


class Objective:
    """Callable for ``study.optimize``: sample, train, prune, return the best epoch's ``study.metric``."""

    def __init__(
        self,
        base: DictConfig,
        space: SearchSpace,
        trials_dir: str | Path,
        *,
        tracking: StudyTracking | None = None,
        runner: Runner = train_trial,
    ) -> None:
        check_single_device(base)
        self.base = base
        self.space = space
        self.trials_dir = Path(trials_dir)
        self.tracking = tracking
        self.runner = runner
        self.metric = space.settings.metric
        self.mode = monitor_mode(self.metric)

    def trial_config(self, trial: optuna.Trial) -> tuple[dict[str, Any], DictConfig, Path]:
        """The sampled parameters, the trial's config and its run directory."""
        params, config = sample(self.space, trial, self.base)
        run_dir = (self.trials_dir / f"trial_{trial.number:04d}").resolve()
        updates: dict[str, Any] = {"output_dir": str(run_dir)}
        if str(config.train.devices) == "auto":
            updates["train.devices"] = "1"
        if self.tracking is not None:
            updates["train.tracking_uri"] = self.tracking.uri
        return params, validate_config(apply_values(resolved(config), updates)), run_dir

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            params, config, run_dir = self.trial_config(trial)
        except Exception as exception:  # sampled values the config refuses (ranges): a failed trial
            trial.set_user_attr("error", f"{type(exception).__name__}: {exception}"[:_MAX_ERROR_CHARS])
            raise
        shutil.rmtree(run_dir, ignore_errors=True)  # left by an earlier study of the same directory
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        callbacks = [PyTorchLightningPruningCallback(trial, monitor=self.metric), FiniteLossGuard()]
        tags = self.tracking.child_tags(trial) if self.tracking is not None else None
        state, value, error = TrialState.FAIL, None, None
        try:
            self.runner(config, callbacks, tags)
            value = best_epoch_value(run_dir / METRICS_FILE, self.metric, self.mode)
            state = TrialState.COMPLETE
            return value
        except optuna.TrialPruned:
            state = TrialState.PRUNED
            raise
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (training.run.fit raises it for both)
            error = "interrupted"
            trial.set_user_attr("error", error)
            raise KeyboardInterrupt(f"trial {trial.number} interrupted") from stop
        except Exception as exception:
            error = f"{type(exception).__name__}: {exception}"[:_MAX_ERROR_CHARS]
            trial.set_user_attr("error", error)
            raise
        finally:
            trial.set_user_attr("epochs", count_epochs(run_dir / METRICS_FILE, self.metric))
            if self.tracking is not None:
                try:
                    self.tracking.record_trial(trial, run_dir, params, state, value, error)
                except Exception as problem:  # the study goes on without this trial's MLflow details
                    log.warning("trial %d: could not record it in MLflow (%s)", trial.number, problem)
            release_memory()


def check_single_device(config: DictConfig) -> None:
    """A trial trains on one device; parallelism comes from running several workers."""
    devices = str(config.train.devices).strip()
    several = (devices.isdigit() and int(devices) > 1) or "," in devices.strip(",") or devices == "-1"
    if several or int(config.train.num_nodes) > 1:
        raise ValueError(
            f"tuning trains each trial on one device (train.devices={devices}, train.num_nodes="
            f"{config.train.num_nodes}); start one `cxr tune` worker per device instead, e.g. "
            "CUDA_VISIBLE_DEVICES=1 cxr tune ... with the same --study-name and --storage"
        )


def best_epoch_value(metrics_csv: Path, metric: str, mode: str = "max") -> float:
    """The best (``max`` or ``min``) finite per-epoch value of ``metric`` in a run's metrics.csv."""
    if not metrics_csv.exists():
        raise FileNotFoundError(f"the trial wrote no {metrics_csv}")
    frame = pd.read_csv(metrics_csv)
    if metric not in frame.columns:
        logged = sorted(column for column in frame.columns if column.startswith("val/"))
        raise ValueError(f"metric {metric!r} was never logged (validation metrics: {logged})")
    values = frame[metric].dropna()
    values = values[values.map(math.isfinite)]
    if values.empty:
        raise ValueError(
            f"{metric} was NaN in every epoch (diverged, or a validation set without both classes)"
        )
    return float(values.max() if mode == "max" else values.min())


def count_epochs(metrics_csv: Path, metric: str) -> int:
    """Validation epochs a trial ran (rows of metrics.csv with ``metric``)."""
    if not metrics_csv.exists():
        return 0
    frame = pd.read_csv(metrics_csv)
    return int(frame[metric].notna().sum()) if metric in frame.columns else 0


def release_memory() -> None:
    """Give cached GPU memory back between trials (``gc_after_trial`` of ``study.optimize`` collects)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- MLflow ------------------------------------------------------------------------------------------------
_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


@dataclass
class StudyTracking:
    """The study's MLflow parent run; each trial's run is created by the trainer with :meth:`child_tags`."""

    uri: str
    experiment_id: str
    parent_run_id: str

    @cached_property
    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        study: optuna.Study,
        storage_label: str,
        known_run_id: str | None = None,
        artifact_root: str | None = None,
        description: Mapping[str, str] | None = None,
    ) -> StudyTracking:
        """Find the study's parent run (recorded id, else by study tag) or create it; mark it running.

        ``description`` (search space and settings) is logged as the parameters of a new parent run.

        Workers starting together may each create one: all then keep the earliest and delete their own.
        """
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        experiment_id = _experiment_id(client, experiment, artifact_root)
        run_id = known_run_id if known_run_id and _run_exists(client, known_run_id) else None
        if run_id is None:
            key = f"{study.study_name}@{storage_label}".replace("'", "")
            run_id = _find_parent(client, experiment_id, key)
            if run_id is None:
                created = _create_parent(client, experiment_id, key, study, storage_label, description or {})
                run_id = _find_parent(client, experiment_id, key) or created
                if run_id != created:
                    client.delete_run(created)
        client.update_run(run_id, status="RUNNING")
        tracking = cls(uri, experiment_id, run_id)
        tracking.client = client
        return tracking

    def child_tags(self, trial: optuna.Trial) -> dict[str, str]:
        return {
            PARENT_TAG: self.parent_run_id,
            "optuna.study_name": trial.study.study_name,
            "optuna.trial_number": str(trial.number),
        }

    def record_trial(
        self,
        trial: optuna.Trial,
        run_dir: Path,
        params: Mapping[str, Any],
        state: TrialState,
        value: float | None,
        error: str | None,
    ) -> None:
        """Sampled parameters, resolved config, objective value, state and error of the trial's run."""
        client = self.client
        run_id = _child_run_id(run_dir)
        if run_id is None:  # the trial failed before the trainer created its run
            run_id = client.create_run(
                self.experiment_id, run_name=run_dir.name, tags=self.child_tags(trial)
            ).info.run_id
        for path, sampled in params.items():
            client.log_param(run_id, path, json.dumps(sampled) if not isinstance(sampled, str) else sampled)
        client.set_tag(run_id, "optuna.state", state.name)
        if error:
            client.set_tag(run_id, "optuna.error", error)
        if value is not None:
            client.log_metric(run_id, "objective", value)
        if (run_dir / CONFIG_FILE).exists():
            client.log_artifact(run_id, str(run_dir / CONFIG_FILE))
        client.set_terminated(run_id, _STATUS[state])

    def finish(self, study: optuna.Study, artifacts: Sequence[Path]) -> None:
        """Log the best value, the best config and the report to the parent run; mark it finished."""
        client = self.client
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            client.log_metric(self.parent_run_id, "best_value", study.best_value, step=len(study.trials))
            client.set_tag(self.parent_run_id, "best_trial", str(study.best_trial.number))
        for path in artifacts:
            if path.is_dir():
                client.log_artifacts(self.parent_run_id, str(path), artifact_path=path.name)
            else:
                client.log_artifact(self.parent_run_id, str(path))
        client.set_terminated(self.parent_run_id, "FINISHED")


def _experiment_id(client: Any, name: str, artifact_root: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root)
    except MlflowException:  # created by another worker meanwhile
        return client.get_experiment_by_name(name).experiment_id


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _find_parent(client: Any, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{STUDY_KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    runs = sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))
    return runs[0].info.run_id if runs else None


def _create_parent(
    client: Any,
    experiment_id: str,
    key: str,
    study: optuna.Study,
    storage_label: str,
    description: Mapping[str, str],
) -> str:
    from mlflow.entities import Param

    run = client.create_run(
        experiment_id,
        run_name=f"study {study.study_name}",
        tags={
            STUDY_KEY_TAG: key,
            "optuna.study_name": study.study_name,
            "optuna.storage": storage_label,
            "cxrkit.role": "optuna-study",
        },
    )
    client.log_batch(run.info.run_id, params=[Param(name, str(value)) for name, value in description.items()])
    return run.info.run_id


def _child_run_id(run_dir: Path) -> str | None:
    record = run_dir / MLFLOW_FILE
    return json.loads(record.read_text()).get("run_id") if record.exists() else None


def trial_error(trial: FrozenTrial) -> str:
    """Why a trial failed ("" for the others); a failed trial without a message lost its worker (killed,
    out of host memory, node lost): its heartbeat stopped and another worker marked it FAIL."""
    if trial.state != TrialState.FAIL:
        return ""
    return str(trial.user_attrs.get("error", "worker stopped (no heartbeat): killed or lost"))
