"""Search spaces: which config fields a study samples, over which values, and how the study runs.

A space is a YAML file with three sections::

    study:                          # how the study searches (all optional, see StudySettings)
      sampler: tpe
      pruner: median
    fixed:                          # dotted config field -> value set in every trial
      model.head.type: mlp
    params:                         # dotted config field -> distribution
      train.optimizer.name: {type: categorical, choices: [rmsprop, adam, sgd]}
      train.optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
      data.loader.batch_size: {type: categorical, choices: [8, 16]}
      model.head.hidden_layers: {type: int, low: 1, high: 5}
      model.head.dropout: {type: float, low: 0.0, high: 0.5, step: 0.1}
      train.optimizer.momentum: {type: float, low: 0.5, high: 0.99, when: {train.optimizer.name: sgd}}

Any field of the run config can be searched, lists included (``data.sources.0.options.x``); categorical
choices may be lists (``data.augment.scale_range: {type: categorical, choices: [[0.9, 1.1], [0.8, 1.2]]}``).
``when`` samples a parameter only if the trial's config (base config, fixed values and the parameters sampled
before it) has the given value or one of the given values at every listed field; otherwise the field keeps its
value. Every field path and every bound/choice is checked against the config schema before a study starts, so
an unknown field or a value of the wrong type is an error naming it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PARAM_TYPES: tuple[str, ...] = ("categorical", "int", "float")
SECTIONS: tuple[str, ...] = ("study", "fixed", "params")
_SPEC_KEYS = {"type", "choices", "low", "high", "step", "log", "when"}


class SpaceError(ValueError):
    """A search space that is malformed or does not fit the config schema."""


@dataclass
class StudySettings:
    """How a study searches, prunes and records (the ``study:`` section of a space file).

    ``sampler``: ``tpe`` (Optuna's TPE, seeded with ``seed``, ``n_startup_trials`` random trials first,
    multivariate so that conditional parameters are modelled jointly) or ``random``.
    ``pruner``: ``median`` (stop a trial whose best-so-far metric is worse than the median of earlier
    trials at the same epoch, after ``pruner_startup_trials`` finished trials and ``pruner_warmup_epochs``
    epochs), ``hyperband`` (successive halving brackets from ``min_epochs`` to the training's epochs with
    ``reduction_factor``) or ``none``.
    ``metric``: the validation metric optimised (the best epoch's value); its direction follows
    ``train.monitor`` conventions (``loss`` minimised, everything else maximised).
    ``heartbeat_interval``/``grace_period`` (seconds): a running trial records a heartbeat; a trial whose
    heartbeat is older than the grace period (its worker was killed) is marked FAIL by the next worker.
    ``tracking_uri``: MLflow store of the study (empty: the config's ``train.tracking_uri``, else the SQLite
    store ``<study_dir>/mlruns/mlflow.db``). ``keep_checkpoints``: ``best`` deletes the checkpoints of every
    finished trial but the best one, ``all`` keeps them.
    """

    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: int = 5
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int = 1
    min_epochs: int = 1
    reduction_factor: int = 3
    metric: str = "val/auroc_mean"
    heartbeat_interval: int = 60
    grace_period: int = 180
    tracking_uri: str = ""
    keep_checkpoints: Literal["best", "all"] = "best"


@dataclass(frozen=True)
class Param:
    """One searched config field and its distribution."""

    path: str
    type: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter's value from ``trial`` (Optuna parameter name = the dotted field path)."""
        if self.type == "categorical":
            if all(_is_scalar(choice) for choice in self.choices):
                return trial.suggest_categorical(self.path, list(self.choices))
            keys = [_choice_key(choice) for choice in self.choices]
            return self.decode(trial.suggest_categorical(self.path, keys))
        if self.type == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def decode(self, value: Any) -> Any:
        """The config value of an Optuna parameter value (list/dict choices are stored as JSON text)."""
        if self.type != "categorical" or all(_is_scalar(choice) for choice in self.choices):
            return value
        keys = [_choice_key(choice) for choice in self.choices]
        return copy.deepcopy(self.choices[keys.index(value)])

    def candidates(self) -> list[Any]:
        """Values that span the distribution (every choice, or both bounds): checked against the schema."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def applies(self, config: DictConfig) -> bool:
        """Whether every ``when`` condition holds on ``config``."""
        return all(_plain(OmegaConf.select(config, path)) in values for path, values in self.when)

    def describe(self) -> str:
        if self.type == "categorical":
            text = "{" + ", ".join(_choice_key(choice) for choice in self.choices) + "}"
        else:
            text = f"{self.type} [{_number(self.low)}, {_number(self.high)}]"
            text += " log" if self.log else ""
            text += f" step {_number(self.step)}" if self.step else ""
        if self.when:
            text += " when " + ", ".join(f"{path} in {list(values)}" for path, values in self.when)
        return text


@dataclass
class SearchSpace:
    """The parameters a study samples, the values fixed in every trial and the study's settings."""

    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    settings: StudySettings = field(default_factory=StudySettings)
    source: str = "<search space>"

    @property
    def paths(self) -> list[str]:
        return [param.path for param in self.params]

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Config values of a trial's Optuna parameters, in space order."""
        return {param.path: param.decode(params[param.path]) for param in self.params if param.path in params}

    def fingerprint(self) -> str:
        """A short hash of what is searched (params and fixed values), to recognise the space of a study."""
        payload = {
            "params": [param.describe() + f"@{param.path}" for param in self.params],
            "fixed": {path: _plain(value) for path, value in sorted(self.fixed.items())},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The space as plain data (what :func:`parse_space` reads)."""
        params = {}
        for param in self.params:
            spec: dict[str, Any] = {"type": param.type}
            if param.type == "categorical":
                spec["choices"] = list(param.choices)
            else:
                spec.update(low=param.low, high=param.high, log=param.log)
                if param.step is not None:
                    spec["step"] = param.step
            if param.when:
                spec["when"] = {path: list(values) for path, values in param.when}
            params[param.path] = spec
        settings = OmegaConf.to_container(OmegaConf.structured(self.settings))
        return {"study": settings, "fixed": dict(self.fixed), "params": params}


# ---- loading -----------------------------------------------------------------------------------------------
def load_space(path: str | Path, settings_overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read a space YAML file (module docstring); ``settings_overrides`` replace ``study:`` entries."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
        raise SpaceError(f"cannot read search space {path}: {error}") from error
    if not isinstance(raw, dict):
        raise SpaceError(f"search space {path}: expected a mapping with sections {list(SECTIONS)}")
    if settings_overrides:
        raw["study"] = {**(raw.get("study") or {}), **settings_overrides}
    return parse_space(raw, source=str(path))


def parse_space(raw: Mapping[str, Any], source: str = "<search space>") -> SearchSpace:
    """Build a :class:`SearchSpace` from plain data (``study``, ``fixed``, ``params`` sections)."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise SpaceError(
            f"search space {source}: unknown section(s) {sorted(unknown)}; expected {list(SECTIONS)}"
        )
    params_raw = raw.get("params") or {}
    fixed = dict(raw.get("fixed") or {})
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise SpaceError(f"search space {source}: 'params' must map dotted config fields to distributions")
    params = [_parse_param(str(path), spec, source) for path, spec in params_raw.items()]
    both = sorted(set(fixed) & {param.path for param in params})
    if both:
        raise SpaceError(f"search space {source}: {both} are both fixed and searched")
    return SearchSpace(params, fixed, _parse_settings(raw.get("study") or {}, source), source)


def _parse_settings(raw: Mapping[str, Any], source: str) -> StudySettings:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudySettings), dict(raw))
    except OmegaConfBaseException as error:
        key = f"study.{error.full_key}: " if getattr(error, "full_key", None) else ""
        raise SpaceError(f"search space {source}: {key}{_first_line(error)}") from error
    settings = StudySettings(**OmegaConf.to_container(merged))
    if settings.heartbeat_interval <= 0 or settings.grace_period <= settings.heartbeat_interval:
        raise SpaceError(
            f"search space {source}: study.grace_period ({settings.grace_period}) must exceed "
            f"study.heartbeat_interval ({settings.heartbeat_interval}) > 0"
        )
    return settings


def _parse_param(path: str, spec: Any, source: str) -> Param:
    where = f"search space {source}, param {path!r}"
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise SpaceError(
            f"{where}: expected a mapping with 'type' ({'/'.join(PARAM_TYPES)}); put constant "
            "values under 'fixed:'"
        )
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    kind = spec["type"]
    when = _parse_when(spec.get("when"), where)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
            raise SpaceError(f"{where}: categorical needs a non-empty list 'choices'")
        keys = [_choice_key(choice) for choice in choices]
        if len(set(keys)) != len(keys):
            raise SpaceError(f"{where}: duplicate choices {keys}")
        return Param(path, kind, choices=tuple(choices), when=when)
    if kind not in PARAM_TYPES:
        raise SpaceError(f"{where}: unknown type {kind!r}; choose from {list(PARAM_TYPES)}")
    if "choices" in spec:
        raise SpaceError(f"{where}: 'choices' is only for categorical parameters")
    try:
        low, high = float(spec["low"]), float(spec["high"])
        step = None if spec.get("step") is None else float(spec["step"])
    except KeyError as error:
        raise SpaceError(f"{where}: {kind} needs 'low' and 'high'") from error
    except (TypeError, ValueError) as error:
        raise SpaceError(f"{where}: low/high/step must be numbers ({error})") from error
    log = bool(spec.get("log", False))
    if kind == "int" and not all(value is None or float(value).is_integer() for value in (low, high, step)):
        raise SpaceError(f"{where}: int bounds and step must be whole numbers")
    if low > high:
        raise SpaceError(f"{where}: low ({low:g}) is greater than high ({high:g})")
    if log and low <= 0:
        raise SpaceError(f"{where}: log scale needs low > 0, got {low:g}")
    if log and step is not None and (kind == "float" or step != 1):
        raise SpaceError(f"{where}: 'step' cannot be combined with 'log: true'")
    if step is not None and step <= 0:
        raise SpaceError(f"{where}: step must be positive, got {step:g}")
    return Param(path, kind, low=low, high=high, step=step, log=log, when=when)


def _parse_when(raw: Any, where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(f"{where}: 'when' must map config fields to a value or a list of values")
    return tuple(
        (str(path), tuple(_plain(v) for v in (values if isinstance(values, list) else [values])))
        for path, values in raw.items()
    )


# ---- checking and applying ---------------------------------------------------------------------------------
def validate_space(space: SearchSpace, config: DictConfig) -> None:
    """Check every field path and value of ``space`` against ``config`` (a structured run config).

    Raises :class:`SpaceError` naming the first unknown field or ill-typed value.
    """
    for path, value in space.fixed.items():
        _check_value(config, path, value, f"search space {space.source}: fixed {path!r}")
    for param in space.params:
        for value in param.candidates():
            _check_value(config, param.path, value, f"search space {space.source}: param {param.path!r}")
        earlier = set(space.fixed) | set(space.paths[: space.paths.index(param.path)])
        for path, _ in param.when:
            if path not in earlier:
                _check_field(config, path, f"search space {space.source}: param {param.path!r} 'when'")


def apply_values(config: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A copy of ``config`` with each dotted field set to its value (type-checked by the schema)."""
    result = copy.deepcopy(config)
    for path, value in values.items():
        try:
            OmegaConf.update(result, path, value, merge=False)
        except OmegaConfBaseException as error:
            raise SpaceError(f"cannot set {path}={value!r}: {_first_line(error)}") from error
    return result


def resolved(config: DictConfig) -> DictConfig:
    """A copy of ``config`` with its ``${...}`` interpolations resolved (sampled values flow into them)."""
    result = copy.deepcopy(config)
    try:
        OmegaConf.resolve(result)
    except OmegaConfBaseException as error:
        raise SpaceError(f"config does not resolve: {_first_line(error)}") from error
    return result


def sample(space: SearchSpace, trial: optuna.Trial, base: DictConfig) -> tuple[dict[str, Any], DictConfig]:
    """Draw the trial's parameters in file order (honouring ``when``); return them and the trial's config."""
    config = apply_values(base, space.fixed)
    params: dict[str, Any] = {}
    for param in space.params:
        if not param.applies(config):
            continue
        params[param.path] = param.suggest(trial)
        config = apply_values(config, {param.path: params[param.path]})
    return params, config


def _check_field(config: DictConfig, path: str, where: str) -> None:
    node: Any = config
    for depth, key in enumerate(path.split(".")):
        parent = ".".join(path.split(".")[:depth]) or "<root>"
        if isinstance(node, ListConfig):
            if not key.isdigit() or int(key) >= len(node):
                raise SpaceError(
                    f"{where}: {parent} is a list of {len(node)} item(s); {key!r} is not an index"
                )
            node = node[int(key)]
        elif isinstance(node, DictConfig):
            if key not in node and _is_typed(node):
                fields = ", ".join(str(name) for name in node)
                raise SpaceError(f"{where}: unknown config field {path!r} ({parent} has: {fields})")
            node = node.get(key)
        else:
            raise SpaceError(f"{where}: unknown config field {path!r} ({parent} is a plain value)")


def _check_value(config: DictConfig, path: str, value: Any, where: str) -> None:
    _check_field(config, path, where)
    try:
        OmegaConf.update(copy.deepcopy(config), path, value, merge=False)
    except OmegaConfBaseException as error:
        raise SpaceError(f"{where}: value {value!r} does not fit the field: {_first_line(error)}") from error


def _is_typed(node: DictConfig) -> bool:
    """Whether a node is a schema dataclass (free-form dicts such as ``timm_kwargs`` accept new keys)."""
    return OmegaConf.get_type(node) not in (dict, None)


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return list(value)
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _choice_key(choice: Any) -> str:
    return choice if isinstance(choice, str) else json.dumps(_plain(choice))


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
