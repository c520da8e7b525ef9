"""One YAML file drives a run; any field can be overridden with ``key.sub=value`` on the command line.

The schema is the :class:`RunConfig` dataclass tree (OmegaConf structured config), so an unknown key or a
value of the wrong type is an error naming the field. The resolved config is saved with every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxrkit.data.config import DataConfig
from cxrkit.models.config import ModelConfig
from cxrkit.training.config import TrainConfig


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
    """Merge schema defaults, the YAML at ``path`` and dotted ``overrides``; return the resolved config."""
    config = OmegaConf.structured(RunConfig)
    try:
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise ConfigError(f"config file not found: {path}")
            config = OmegaConf.merge(config, OmegaConf.load(path))
        for override in overrides:
            apply_override(config, override)
        OmegaConf.resolve(config)
    except OmegaConfBaseException as error:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}: {error}") from error
    return config


def apply_override(config: DictConfig, override: str) -> None:
    """Set one ``key.sub=value`` (list items by index: ``data.sources.0.root=...``); YAML-style values."""
    key, separator, text = override.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    value = OmegaConf.from_dotlist([f"value={text}"])["value"]
    OmegaConf.update(config, key.strip(), value, merge=True)


def save_config(config: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the file a run can be reproduced from)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(config, resolve=True))


def to_container(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
