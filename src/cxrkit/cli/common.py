"""Options and helpers shared by the ``cxr`` subcommands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
from omegaconf import DictConfig

from cxrkit.config import ConfigError, load_config
from cxrkit.data.manifest import SPLITS

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config file (see configs/).",
)
overrides_argument = click.argument("overrides", nargs=-1)


class BadConfig(click.ClickException):
    """A config file or override that does not fit the schema: one ``Error:`` line, exit status 2."""

    exit_code = 2


def resolve_config(config_path: str | None, overrides: tuple[str, ...]) -> DictConfig:
    """Load and validate the config, or exit with one line naming the problem."""
    try:
        return load_config(config_path, overrides)
    except ConfigError as error:
        raise BadConfig(str(error)) from error


def with_config(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command with ``--config`` and trailing ``key=value`` overrides."""
    return config_option(overrides_argument(function))


# Options several commands share: defined once here, with the help text a command may reword.
#: Mirrors inference.predictor.BACKENDS and evaluation.thresholds.METHODS (less "fixed"); kept here so that
#: `cxr --help` imports neither torch nor scikit-learn (tests/test_cli_errors.py checks they agree).
BACKENDS = ("auto", "onnx", "onnx-int8", "torch")
THRESHOLD_METHODS = ("youden", "f1", "sensitivity")

#: What click.option(...) returns: a function that adds the option to a command.
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def out_option(
    help: str,
    *,
    required: bool = False,
    kind: Literal["any", "dir", "file"] = "any",
    default: str | None = None,
) -> Decorator:
    """``--out/-o``: a path; ``kind`` "dir" or "file" refuses the other."""
    path = click.Path(file_okay=kind != "dir", dir_okay=kind != "file", path_type=Path)
    return click.option(
        "--out",
        "-o",
        required=required,
        type=path,
        default=default,
        show_default=default is not None,
        help=help,
    )


def checkpoint_option(help: str) -> Decorator:
    """``--checkpoint best|last`` of a run."""
    return click.option(
        "--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True, help=help
    )


def threshold_options(method_help: str, sensitivity_help: str | None = None) -> Decorator:
    """``--threshold-method`` (and, with ``sensitivity_help``, ``--target-sensitivity``)."""
    method = click.option(
        "--threshold-method",
        type=click.Choice(THRESHOLD_METHODS),
        default="youden",
        show_default=True,
        help=method_help,
    )
    if sensitivity_help is None:
        return method
    sensitivity = click.option(
        "--target-sensitivity",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.9,
        show_default=True,
        help=sensitivity_help,
    )
    return lambda function: method(sensitivity(function))


def temperature_option(help: str) -> Decorator:
    """``--temperature none|global|per_label``: temperature scaling fitted on labelled data."""
    return click.option(
        "--temperature",
        type=click.Choice(["none", "global", "per_label"]),
        default="none",
        show_default=True,
        help=help,
    )


def data_split_option(help: str) -> Decorator:
    """``--data-split all|test`` of an external dataset."""
    return click.option(
        "--data-split", type=click.Choice(["all", "test"]), default="all", show_default=True, help=help
    )


def backend_option(help: str | None = None) -> Decorator:
    """``--backend``: the graph of a bundle that runs."""
    return click.option(
        "--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help=help
    )


replicates_option = click.option(
    "--replicates",
    type=click.IntRange(min=10),
    default=1000,
    show_default=True,
    help="Patient-bootstrap replicates for the intervals.",
)
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1...")
split_option = click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
