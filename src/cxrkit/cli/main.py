"""Entry point of the ``cxr`` command.

Every error ends the command with one line on stderr (``Error: ...``; exit status 2 for a usage or config
error, 1 otherwise); ``cxr -v ...`` also prints the traceback.
"""

from __future__ import annotations

import logging
import traceback

import click

from cxrkit import __version__
from cxrkit.cli.calibrate import calibrate
from cxrkit.cli.common import BadConfig
from cxrkit.cli.data import data
from cxrkit.cli.demo import demo
from cxrkit.cli.evaluate import compare, evaluate, explain
from cxrkit.cli.inference import export, predict, serve
from cxrkit.cli.logs import setup_logging
from cxrkit.cli.train import test, train
from cxrkit.cli.tune import tune
from cxrkit.config import ConfigError
from cxrkit.extras import missing_extra

#: Errors whose message says what is wrong: shown as they are. Anything else is shown with its type.
EXPECTED_ERRORS = (ValueError, OSError, ImportError, KeyError, RuntimeError)


class CxrGroup(click.Group):
    """A click group that turns any exception of a subcommand into one ``Error:`` line."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError:
            raise
        except click.ClickException as error:
            error.message = _one_line(error.message)
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM where a command turns it into one
            detail = _one_line(stop) or "stopped before it finished"
            raise click.ClickException(f"interrupted; {detail}") from stop
        except Exception as error:
            if ctx.params.get("verbose"):
                traceback.print_exc()
            raise as_click_error(error, verbose=bool(ctx.params.get("verbose"))) from error


def as_click_error(error: Exception, verbose: bool = False) -> click.ClickException:
    """One line for ``error``: config errors are usage errors (exit 2), the rest exit 1."""
    if isinstance(error, ConfigError):
        return BadConfig(_one_line(error))
    if isinstance(error, ImportError):
        error = missing_extra(error)
    if isinstance(error, EXPECTED_ERRORS):
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        return click.ClickException(_one_line(text) or type(error).__name__)
    hint = "" if verbose else " (run with -v for the traceback)"
    return click.ClickException(f"{type(error).__name__}: {_one_line(error)}{hint}")


def _one_line(error: Exception | str) -> str:
    return " ".join(str(error).split())


@click.group(cls=CxrGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxrkit")
@click.option("--verbose", "-v", is_flag=True, help="Log debug messages; print the traceback of an error.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings, errors and results (no progress bars).")
def cli(verbose: bool, quiet: bool) -> None:
    """cxrkit: chest X-ray datasets, training, evaluation, explanation and serving.

    Every command that takes --config also takes KEY=VALUE overrides of any config field,
    e.g. `cxr data prepare -c configs/nih_lite0_offline.yaml data.cache.image_size=320`.
    """
    if verbose and quiet:
        raise click.UsageError("give either --verbose or --quiet, not both")
    setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


cli.add_command(calibrate)
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
