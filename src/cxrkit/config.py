"""One YAML file drives a run; any field can be overridden with ``key.sub=value`` on the command line.

The schema is the :class:`RunConfig` dataclass tree (OmegaConf structured config): an unknown key, a value of
the wrong type or a choice outside its ``Literal`` is an error naming the field. :func:`load_config` then
checks what types cannot say (ranges, ``model.arch`` is a timm model, known adapters, stages and epochs)
before any data or weights are touched, and fills ``train.max_epochs``, so the saved config says what ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxrkit.data.config import DataConfig, check_data
from cxrkit.models.config import ModelConfig, check_model
from cxrkit.training.config import TrainConfig, check_train, settle_epochs


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Merge schema defaults, the YAML at ``path`` and dotted ``overrides``; resolve and validate."""
    return finish_config(merge_config(path, overrides))


def load_saved_config(path: str | Path) -> DictConfig:
    """A config saved with a run or bundle: what ran. With stages, their total is the run's length (runs
    saved before ``max_epochs`` was derived kept the unused default beside their stages)."""
    config = merge_config(path)
    if config.train.stages:
        config.train.max_epochs = None
    return finish_config(config)


def finish_config(config: DictConfig) -> DictConfig:
    """Resolve ``${...}`` references and validate (see :func:`validate_config`)."""
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config does not resolve: {_describe(error)}") from error
    return validate_config(config)


def merge_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults, the YAML at ``path`` and ``overrides``, unresolved (``${...}`` kept); a type or
    choice error names the file or the override it comes from."""
    config = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            config = OmegaConf.merge(config, OmegaConf.load(path))
        except (OmegaConfBaseException, yaml.YAMLError) as error:
            raise ConfigError(f"invalid config {path}: {_describe(error)}") from error
    for override in overrides:
        apply_override(config, override)
    return config


def apply_override(config: DictConfig, override: str) -> None:
    """Set one ``key.sub=value`` (list items by index: ``data.sources.0.root=...``); YAML-style values."""
    key, separator, text = override.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    try:
        value = OmegaConf.from_dotlist([f"value={text}"])["value"]
        OmegaConf.update(config, key.strip(), value, merge=True)
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"invalid override {override}: {_describe(error)}") from error


def validate_config(config: DictConfig) -> DictConfig:
    """Check a resolved config beyond its types and fill ``train.max_epochs``; return it.

    Raises :class:`ConfigError` listing every problem, each naming its field."""
    problems = [*check_data(config.data), *check_model(config.model), *check_train(config.train)]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    settle_epochs(config.train)
    return config


def save_config(config: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the file a run can be reproduced from)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(config, resolve=True))


def to_container(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]


def _describe(error: Exception) -> str:
    """OmegaConf's message on one line: the problem and the field (``full_key``) it concerns."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"{key}: {message}" if key else message
