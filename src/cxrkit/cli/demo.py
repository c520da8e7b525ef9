"""``cxr demo``: run the whole pipeline on real data and print where the outputs are."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--data",
    "data_root",
    type=click.Path(),
    default=None,
    help="Data root holding nih/ and/or pneumonia/ (default: $CXR_DATA, ../shared/data, download).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/demo",
    show_default=True,
    help="Folder for every output of the demo.",
)
@click.argument("overrides", nargs=-1)
def demo(data_root: str | None, out: str, overrides: tuple[str, ...]) -> None:
    """Prepare the data, write the EDA reports, and run the later pipeline stages on the bundled recipes.

    KEY=VALUE overrides apply to every recipe the demo runs (e.g. train.max_epochs=1).
    """
    from cxrkit.demo import NoDataError, run_demo

    try:
        result = run_demo(data_root, Path(out), list(overrides), echo=click.echo)
    except NoDataError as error:
        raise click.ClickException(str(error)) from error
    click.echo("\noutputs:")
    for name, path in result.outputs.items():
        click.echo(f"  {name}: {path}")
