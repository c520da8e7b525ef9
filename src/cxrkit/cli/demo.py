"""``cxr demo``: run the whole pipeline on real data and print where the outputs are."""

from __future__ import annotations

from pathlib import Path

import click

from cxrkit.cli.common import out_option


@click.command()
@click.option(
    "--data",
    "data_root",
    type=click.Path(),
    default=None,
    help="Data root holding nih/ and/or pneumonia/ (default: $CXR_DATA, ../shared/data, download).",
)
@out_option("Folder for every output of the demo.", kind="dir", default="runs/demo")
@click.option("--quick", is_flag=True, help="Train on a fifth of each epoch (a few minutes on a laptop CPU).")
@click.argument("overrides", nargs=-1)
def demo(data_root: str | None, out: Path, quick: bool, overrides: tuple[str, ...]) -> None:
    """Run the whole pipeline on real data with the bundled offline recipes: prepare the cache, describe the
    data, train, evaluate on the test split, explain with Grad-CAM, and export a servable model bundle.

    KEY=VALUE overrides apply to every recipe the demo runs (e.g. train.limit_train_batches=20).
    It ends with a table of every stage (key figure, output) and the `cxr serve` command of each bundle.
    """
    from cxrkit.demo import NoDataError, run_demo

    try:
        result = run_demo(data_root, out, list(overrides), quick=quick)
    except NoDataError as error:
        raise click.ClickException(str(error)) from error
    click.echo("")
    click.echo(result.table())
    for bundle in result.bundles:
        click.echo(f"\nserve the model with: cxr serve {bundle}")
