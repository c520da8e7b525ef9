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
@click.option("--quick", is_flag=True, help="Train on a fifth of each epoch (a few minutes on a laptop CPU).")
@click.argument("overrides", nargs=-1)
def demo(data_root: str | None, out: str, quick: bool, overrides: tuple[str, ...]) -> None:
    """Run the whole pipeline on real data with the bundled offline recipes: prepare the cache, describe the
    data, train, evaluate on the test split, explain with Grad-CAM, and export a servable model bundle.

    KEY=VALUE overrides apply to every recipe the demo runs (e.g. train.max_epochs=1).
    """
    from cxrkit.demo import NoDataError, run_demo

    try:
        result = run_demo(data_root, Path(out), list(overrides), echo=click.echo, quick=quick)
    except NoDataError as error:
        raise click.ClickException(str(error)) from error
    click.echo("\noutputs:")
    for name, path in result.outputs.items():
        click.echo(f"  {name}: {path}")
