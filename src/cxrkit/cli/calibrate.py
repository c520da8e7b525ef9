"""``cxr calibrate``: refit a bundle's operating points (and temperature) on a sample of a new site."""

from __future__ import annotations

from pathlib import Path

import click

from cxrkit.cli.common import (
    data_split_option,
    device_option,
    out_option,
    replicates_option,
    temperature_option,
    threshold_options,
)


@click.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--data",
    required=True,
    help="The labelled site sample: a data config, or a dataset folder read with the adapter its layout "
    "fits (class folders such as pneumonia/test, an NIH folder...).",
)
@out_option("The new bundle (.cxr/.zip file or folder).", required=True)
@threshold_options(
    "How operating points are chosen on the site sample.",
    "With --threshold-method sensitivity: the sensitivity to reach on the site sample.",
)
@temperature_option("Also fit a temperature on the sample and fold it into the network's output layer.")
@click.option(
    "--precision",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="Largest acceptable half-width of the 95% CI of sensitivity/specificity; warns when wider.",
)
@data_split_option("Every image of the site data, or only its test split.")
@click.option("--site", default=None, help="Site name for the provenance (default: from the data path).")
@click.option("--version", default=None, help="New bundle version (default: <old>+site.<site>).")
@replicates_option
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@device_option
def calibrate(
    bundle: Path,
    data: str,
    out: Path,
    threshold_method: str,
    target_sensitivity: float,
    temperature: str,
    precision: float,
    data_split: str,
    site: str | None,
    version: str | None,
    replicates: int,
    batch_size: int,
    device: str,
) -> None:
    """Calibrate BUNDLE to a new site: operating points (and optionally temperature) fitted on a labelled
    sample, written as a new bundle version whose provenance names the site, the sample size and the
    intervals of sensitivity and specificity at the new thresholds. `cxr predict` and `cxr serve` use it.

    \b
    cxr calibrate runs/pneumonia.cxr --data ../shared/data/pneumonia/test --out runs/pneumonia-site.cxr
    """
    from cxrkit.inference.bundle import BundleError
    from cxrkit.inference.calibrate import calibrate_bundle

    if out.resolve() == bundle.resolve():
        raise click.ClickException("--out must differ from BUNDLE: calibration writes a new bundle version")
    try:
        result = calibrate_bundle(
            bundle,
            data,
            method=threshold_method,
            target_sensitivity=target_sensitivity,
            temperature=temperature,
            precision=precision,
            scope=data_split,
            site_name=site,
            version=version,
            n_replicates=replicates,
            batch_size=batch_size,
            device=device,
        )
        path = result.bundle.save(out)
    except (FileNotFoundError, ValueError, BundleError) as error:
        raise click.ClickException(str(error)) from error
    click.echo("\n".join(result.summary_lines()))
    click.echo(f"bundle: {path}")
