"""Optuna studies over run configs: storage, sampler, pruner, MLflow parent run, best config and report.

Study directory (``cxr tune --study-dir``, else the config's ``output_dir`` when the config file or an
override sets it, else ``runs/studies/<study_name>`` next to the default ``output_dir``)::

    study.db              the Optuna study (SQLite; default storage)
    base_config.yaml      the config the trials start from (config file + command-line overrides)
    space.yaml            the search space as run
    trials/trial_0007/    each trial's run directory (config.yaml, metrics.csv, checkpoints of the best trial)
    mlruns/mlflow.db      the study's MLflow store (default tracking URI), artifacts in mlruns/artifacts
    best_config.yaml      the best trial's resolved config, ready for ``cxr train -c`` (search shortcuts such
                          as ``train.limit_train_batches`` reset to their defaults)
    report/               report.html, report.md, trials.csv and the study's PNG plots

Storage URLs: empty = ``sqlite:///<study_dir>/study.db`` (one machine, a few workers); any SQLAlchemy URL
Optuna supports (``postgresql+psycopg2://user:pw@host/db``, ``mysql+pymysql://...``) for workers on many
machines; ``journal:///shared/fs/study.log`` for Optuna's journal file on a shared file system (no database
server). Every worker started with the same study name and storage joins the study (``load_if_exists``).
``--trials N`` is the study's target: workers stop once N trials have completed or been pruned, counted over
all workers and earlier runs (workers that finish trials at the same moment may overshoot by one each).

Interrupted studies resume: re-run the same command. A running trial records a heartbeat every
``heartbeat_interval`` seconds; one whose worker was killed stops beating and is marked FAIL by the next
worker after ``grace_period`` seconds (Optuna's ``fail_stale_trials``; the journal storage gets the same
heartbeat here). Trials that raise (out of memory, non-finite loss, bad config) are recorded as FAIL with
the error in the trial's ``error`` attribute, and the study goes on.

The sampler is re-seeded from ``(study.seed, trial number)`` at the start of every trial, so a study run by
one worker is reproducible, a resumed study draws what an uninterrupted one would, and parallel workers never
draw the same random parameters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cxrkit.config import load_config, merge_config, save_config
from cxrkit.training.callbacks import monitor_mode
from cxrkit.training.stages import resolve_stages, total_epochs
from cxrkit.training.tracking import default_tracking_uri, local_artifact_location
from cxrkit.tuning.objective import Objective, Runner, StudyTracking, check_single_device, train_trial
from cxrkit.tuning.space import SearchSpace, StudySettings, apply_values, resolved, validate_space

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
BASE_CONFIG = "base_config.yaml"
SPACE_FILE = "space.yaml"
BEST_CONFIG = "best_config.yaml"
#: Fields a study shortens its trials with; the best config gets their schema defaults back.
SEARCH_SHORTCUTS: dict[str, Any] = {"train.limit_train_batches": 1.0, "train.limit_val_batches": 1.0}
TRIALS_DIR = "trials"
REPORT_DIR = "report"
JOURNAL_PREFIX = "journal://"
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
_HEARTBEAT_ATTR = "cxrkit:heartbeat"
_SPACE_ATTR = "cxrkit.space_fingerprint"
_METRIC_ATTR = "cxrkit.metric"
_PARENT_ATTR = "cxrkit.mlflow_parent_run_id"


@dataclass
class StudyResult:
    """What :func:`run_study` leaves behind."""

    study: optuna.Study
    study_dir: Path
    best_config: Path | None
    report: Path | None
    parent_run_id: str | None


# ---- entry point -------------------------------------------------------------------------------------------
def run_study(
    config: DictConfig,
    space: SearchSpace,
    n_trials: int,
    *,
    study_name: str | None = None,
    storage: str | None = None,
    study_dir: str | Path | None = None,
    timeout: float | None = None,
    runner: Runner = train_trial,
    write_report: bool = True,
) -> StudyResult:
    """Run (or join, or continue) the study until it holds ``n_trials`` completed or pruned trials.

    ``runner(config, callbacks, mlflow_tags)`` trains one trial's config into its ``output_dir`` (default:
    :func:`cxrkit.training.run.train`). Returns the study, the best config written as YAML and the report.
    """
    validate_space(space, config)
    check_single_device(resolved(config))
    name = study_name or default_study_name(config)
    study_dir = Path(study_dir) if study_dir is not None else default_study_dir(config, name)
    study_dir.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage_url(study_dir)
    settings = space.settings
    with study_lock(study_dir):
        study = open_study(name, url, space, config)
        tracking = _start_tracking(config, space, study, study_dir, url)
        _write_study_files(config, space, study_dir)

    remaining = n_trials - count_trials(study)
    if remaining > 0 and (timeout is None or timeout > 0):
        log.info(
            "study %s: %d of %d trials done; running up to %d here (storage %s)",
            name,
            n_trials - remaining,
            n_trials,
            remaining,
            redact(url),
        )
        objective = Objective(config, space, study_dir / TRIALS_DIR, tracking=tracking, runner=runner)
        callbacks = [optuna.study.MaxTrialsCallback(n_trials, states=COUNTED_STATES), _log_trial]
        if settings.keep_checkpoints == "best":
            callbacks.append(keep_best_checkpoints)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=timeout,
                catch=(Exception,),
                callbacks=callbacks,
                gc_after_trial=True,
                show_progress_bar=True,
            )
    else:
        log.info("study %s already holds %d counted trials (target %d)", name, count_trials(study), n_trials)
    return finish_study(study, space, config, study_dir, tracking, write_report=write_report)


def finish_study(
    study: optuna.Study,
    space: SearchSpace,
    config: DictConfig,
    study_dir: Path,
    tracking: StudyTracking | None = None,
    write_report: bool = True,
) -> StudyResult:
    """Write ``best_config.yaml`` and the report; record both in the study's MLflow run."""
    from cxrkit.tuning.report import write_study_report

    best_path = None
    if best_trial(study) is not None:
        best_path = write_best_config(study, space, config, study_dir / BEST_CONFIG)
    else:
        log.warning("study %s has no completed trial yet: no best config", study.study_name)
    report = write_study_report(study, study_dir / REPORT_DIR, space=space) if write_report else None
    if tracking is not None:
        tracking.finish(study, [path for path in (best_path, report and report.parent) if path is not None])
    return StudyResult(study, study_dir, best_path, report, tracking.parent_run_id if tracking else None)


def load_base_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """The run config like :func:`cxrkit.config.load_config`, but with ``${...}`` interpolations kept, so
    that sampled values flow into them (``data.cache.dir`` follows a searched ``data.cache.image_size``)."""
    load_config(path, overrides)  # validates and raises the usual ConfigError
    return merge_config(path, overrides)


# ---- names and places --------------------------------------------------------------------------------------
def default_study_name(config: DictConfig) -> str:
    return f"{config.name}-tune"


def default_study_dir(config: DictConfig, study_name: str) -> Path:
    """``<parent of output_dir>/studies/<study_name>`` (``runs/studies/...`` for the default output_dir)."""
    return Path(config.output_dir).parent / "studies" / study_name


def default_storage_url(study_dir: Path) -> str:
    return f"sqlite:///{(Path(study_dir) / STUDY_DB).resolve()}"


def redact(url: str) -> str:
    """The storage URL with any password hidden (for logs and MLflow tags)."""
    if url.startswith(JOURNAL_PREFIX) or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """Serialise study set-up among the workers sharing ``study_dir`` (schema creation, parent run)."""
    with open(Path(study_dir) / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- storage, sampler, pruner ------------------------------------------------------------------------------
class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with trial heartbeats (kept as a trial system attribute), so stale trials of
    killed workers are failed as with :class:`optuna.storages.RDBStorage`."""

    def __init__(self, backend: Any, heartbeat_interval: int, grace_period: int) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, _HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        deadline = time.time() - self._grace_period
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(_HEARTBEAT_ATTR)
            if beat is None and trial.datetime_start is not None:
                beat = trial.datetime_start.timestamp()
            if beat is not None and beat < deadline:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None

    def get_failed_trial_callback(self) -> None:  # the name of the same hook before Optuna 4.9
        return None


def open_storage(url: str, settings: StudySettings) -> BaseStorage:
    """An Optuna storage with heartbeats for ``url`` (SQLAlchemy URL or ``journal://<path>``)."""
    heartbeat = {"heartbeat_interval": settings.heartbeat_interval, "grace_period": settings.grace_period}
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX) :])
        if not path.name:
            raise ValueError(
                f"journal storage URL needs a file path: journal:///path/to/study.log, got {url}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), **heartbeat)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():  # Optuna still labels heartbeats experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        return _retry(
            lambda: RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat), f"storage {redact(url)}"
        )


class TrialSeededTPESampler(TPESampler):
    """TPE whose random state is re-seeded from ``(seed, trial number)`` when each trial starts."""

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = trial_seed(self.base_seed, trial.number)
        self._rng.rng.seed(seed)
        self._random_sampler._rng.rng.seed(seed)
        super().before_trial(study, trial)


class TrialSeededRandomSampler(RandomSampler):
    """Random search re-seeded from ``(seed, trial number)`` when each trial starts."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self.base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._rng.rng.seed(trial_seed(self.base_seed, trial.number))
        super().before_trial(study, trial)


def trial_seed(seed: int, trial_number: int) -> int:
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


def build_sampler(settings: StudySettings) -> BaseSampler:
    if settings.sampler == "random":
        return TrialSeededRandomSampler(settings.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return TrialSeededTPESampler(
            settings.seed,
            n_startup_trials=settings.n_startup_trials,
            multivariate=True,
            group=True,
            constant_liar=True,
        )


def build_pruner(
    settings: StudySettings, config: DictConfig, space: SearchSpace
) -> optuna.pruners.BasePruner:
    """``median``, ``hyperband`` (up to the training's epochs) or ``none``; steps are epochs."""
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.pruner_startup_trials,
            n_warmup_steps=max(0, settings.pruner_warmup_epochs - 1),
        )
    epochs_searched = any(path.startswith(("train.max_epochs", "train.stages")) for path in space.paths)
    max_epochs = "auto" if epochs_searched else total_epochs(resolve_stages(config.train))
    return optuna.pruners.HyperbandPruner(
        min_resource=settings.min_epochs, max_resource=max_epochs, reduction_factor=settings.reduction_factor
    )


def open_study(name: str, url: str, space: SearchSpace, config: DictConfig) -> optuna.Study:
    """Create the study or load the existing one of that name; refuse one made with another search space."""
    settings = space.settings
    direction = "maximize" if monitor_mode(settings.metric) == "max" else "minimize"
    study = optuna.create_study(
        storage=open_storage(url, settings),
        sampler=build_sampler(settings),
        pruner=build_pruner(settings, config, space),
        study_name=name,
        direction=direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"study {name!r} in {redact(url)} {study.direction.name.lower()}s; this space's metric "
            f"{settings.metric!r} needs {direction}"
        )
    attrs = study.user_attrs
    expected = {_SPACE_ATTR: space.fingerprint(), _METRIC_ATTR: settings.metric}
    for key, value in expected.items():
        if key not in attrs:
            study.set_user_attr(key, value)
        elif attrs[key] != value:
            what = "search space" if key == _SPACE_ATTR else "metric"
            raise ValueError(
                f"study {name!r} in {redact(url)} was started with another {what}; "
                f"resume it with the same one or choose another --study-name"
            )
    return study


def count_trials(study: optuna.Study) -> int:
    """Trials that count towards the study's target: completed or pruned."""
    return len(study.get_trials(deepcopy=False, states=COUNTED_STATES))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


# ---- outputs -----------------------------------------------------------------------------------------------
def best_config(study: optuna.Study, space: SearchSpace, base: DictConfig) -> DictConfig:
    """The base config with the fixed values and the best trial's parameters, without the search's
    shortcuts (:data:`SEARCH_SHORTCUTS` not in the space); own name and output_dir."""
    trial = best_trial(study)
    if trial is None:
        raise ValueError(f"study {study.study_name!r} has no completed trial")
    defaults = {path: value for path, value in SEARCH_SHORTCUTS.items() if path not in space.paths}
    values = {**defaults, **space.fixed, **space.decode(trial.params)}
    config = resolved(apply_values(base, values))
    name = f"{config.name}-{study.study_name}-best"  # set after resolving: the trials' cache dir is kept
    return apply_values(config, {"name": name, "output_dir": str(Path(config.output_dir).parent / name)})


def write_best_config(study: optuna.Study, space: SearchSpace, base: DictConfig, path: Path) -> Path:
    """``best_config.yaml``: the resolved best config with a header saying where it comes from."""
    trial = best_trial(study)
    assert trial is not None
    config = best_config(study, space, base)
    header = [
        f"# Best trial #{trial.number} of Optuna study {study.study_name!r}: "
        f"{space.settings.metric} = {trial.value:.6g}",
        f"# written {datetime.now().isoformat(timespec='seconds')}; train it with: cxr train -c {path}",
    ]
    header += [f"#   {name} = {value!r}" for name, value in trial.params.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # workers may write it at the same time
    temporary.write_text("\n".join(header) + "\n" + OmegaConf.to_yaml(config, resolve=True))
    os.replace(temporary, path)
    return path


def keep_best_checkpoints(study: optuna.Study, trial: FrozenTrial) -> None:
    """Delete the checkpoints of every finished trial except the best completed one."""
    best = best_trial(study)
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    for other in study.get_trials(deepcopy=False, states=finished):
        run_dir = other.user_attrs.get("run_dir")
        if run_dir and (best is None or other.number != best.number):
            shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)


def _log_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    best = best_trial(study)
    value = "" if trial.value is None else f" {trial.value:.4f}"
    error = f" ({trial.user_attrs['error']})" if "error" in trial.user_attrs else ""
    best_text = f"; best #{best.number} {best.value:.4f}" if best is not None else ""
    log.info(
        "trial %d %s%s after %s epoch(s)%s%s",
        trial.number,
        trial.state.name,
        value,
        trial.user_attrs.get("epochs", "?"),
        error,
        best_text,
    )


def _write_study_files(config: DictConfig, space: SearchSpace, study_dir: Path) -> None:
    save_config(config, study_dir / BASE_CONFIG)
    (study_dir / SPACE_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(space.to_dict())))


def _start_tracking(
    config: DictConfig, space: SearchSpace, study: optuna.Study, study_dir: Path, url: str
) -> StudyTracking | None:
    """The study's MLflow parent run (when ``train.loggers`` has mlflow), shared by every worker."""
    if "mlflow" not in config.train.loggers:
        return None
    uri = space.settings.tracking_uri or config.train.tracking_uri or default_tracking_uri(study_dir)
    tracking = StudyTracking.start(
        uri,
        experiment=str(config.name),
        study=study,
        storage_label=redact(url),
        known_run_id=study.user_attrs.get(_PARENT_ATTR),
        artifact_root=local_artifact_location(uri),
        description=_description(space),
    )
    if study.user_attrs.get(_PARENT_ATTR) != tracking.parent_run_id:
        study.set_user_attr(_PARENT_ATTR, tracking.parent_run_id)
    return tracking


def _description(space: SearchSpace) -> dict[str, str]:
    """Search space and settings as MLflow parameters of the parent run."""
    settings = OmegaConf.to_container(OmegaConf.structured(space.settings))
    return {
        **{f"space.{param.path}": param.describe() for param in space.params},
        **{f"fixed.{path}": str(value) for path, value in space.fixed.items()},
        **{f"study.{name}": str(value) for name, value in settings.items()},
    }


def _retry(make: Any, what: str, attempts: int = 4) -> Any:
    """Retry opening a storage that another worker is initialising at the same moment."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return make()
        except SQLAlchemyError as error:
            if attempt == attempts - 1:
                raise RuntimeError(f"cannot open {what}: {error}") from error
            log.warning("opening %s failed (%s); retrying", what, str(error).splitlines()[0])
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def trials_summary(study: optuna.Study) -> dict[str, int]:
    """Number of trials per state name."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def describe(result: StudyResult) -> str:
    """A few lines for the terminal: trials per state, best value and parameters, where the outputs are."""
    study = result.study
    lines = [f"study {study.study_name}: " + json.dumps(trials_summary(study))]
    best = best_trial(study)
    if best is not None:
        lines.append(
            f"best trial #{best.number}: {study.user_attrs.get(_METRIC_ATTR, 'value')} = {best.value:.4f}"
        )
        lines += [f"  {name} = {value!r}" for name, value in best.params.items()]
    if result.best_config is not None:
        lines.append(f"best config: {result.best_config}  (cxr train -c {result.best_config})")
    if result.report is not None:
        lines.append(f"report: {result.report}")
    return "\n".join(lines)
