"""Options and helpers shared by the ``cxr`` subcommands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from omegaconf import DictConfig

from cxrkit.config import ConfigError, load_config

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config file (see configs/).",
)
overrides_argument = click.argument("overrides", nargs=-1)


def resolve_config(config_path: str | None, overrides: tuple[str, ...]) -> DictConfig:
    """Load the config or exit with a click error that names the problem."""
    try:
        return load_config(config_path, overrides)
    except (ConfigError, ValueError) as error:
        raise click.UsageError(str(error)) from error


def with_config(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command with ``--config`` and trailing ``key=value`` overrides."""
    return config_option(overrides_argument(function))
