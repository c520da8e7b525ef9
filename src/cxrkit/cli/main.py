"""Entry point of the ``cxr`` command."""

from __future__ import annotations

import logging

import click

from cxrkit import __version__
from cxrkit.cli.data import data
from cxrkit.cli.demo import demo
from cxrkit.cli.evaluate import compare, evaluate, explain
from cxrkit.cli.inference import export, predict, serve
from cxrkit.cli.train import test, train
from cxrkit.cli.tune import tune


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxrkit")
@click.option("--verbose", "-v", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """cxrkit: chest X-ray datasets, training, evaluation, explanation and serving.

    Every command that takes --config also takes KEY=VALUE overrides of any config field,
    e.g. `cxr data prepare -c configs/nih_lite0_offline.yaml data.cache.image_size=320`.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


cli.add_command(compare)
cli.add_command(data)
cli.add_command(demo)
cli.add_command(evaluate)
cli.add_command(explain)
cli.add_command(export)
cli.add_command(predict)
cli.add_command(serve)
cli.add_command(test)
cli.add_command(train)
cli.add_command(tune)


def main() -> None:
    cli()
