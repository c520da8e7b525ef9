"""``cxr data``: get datasets, build manifests, prepare the cache and describe the data."""

from __future__ import annotations

from pathlib import Path

import click
from omegaconf import DictConfig

from cxrkit.cli.common import resolve_config, with_config
from cxrkit.config import save_config
from cxrkit.data.cache import CacheReport


@click.group()
def data() -> None:
    """Datasets: download, manifest, prepare (cache), describe (EDA report)."""


@data.command("download")
@click.argument("name_or_url")
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default="data",
    show_default=True,
    help="Folder to download into.",
)
@click.option("--sha256", default=None, help="Expected SHA-256 of a URL download.")
@click.option("--force", is_flag=True, help="Download again even if present.")
def download_command(name_or_url: str, dest: str, sha256: str | None, force: bool) -> None:
    """Fetch a dataset: nih, nih-sample (kagglehub), pneumonia (Hugging Face hub) or any fsspec URL
    (gs://, s3://, https://, file://); zip/tar archives are extracted and checked."""
    from cxrkit.data.download import DATASETS, DownloadError, download

    try:
        path = download(name_or_url, Path(dest), sha256=sha256, force=force)
    except DownloadError as error:
        raise click.ClickException(str(error)) from error
    adapter = DATASETS[name_or_url].adapter if name_or_url in DATASETS else "<adapter>"
    click.echo(f"downloaded to {path}\nuse it with: data.sources='[{{adapter: {adapter}, root: {path}}}]'")


@data.command("manifest")
@with_config
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Manifest CSV to write (default <output_dir>/manifest.csv).",
)
def manifest_command(config_path: str | None, overrides: tuple[str, ...], out: str | None) -> None:
    """Build the manifest (sources → merged labels → views → splits) and print its summary."""
    from cxrkit.data.build import summary

    config = resolve_config(config_path, overrides)
    manifest = _build(config)
    path = Path(out or Path(config.output_dir) / "manifest.csv")
    manifest.save(path)
    click.echo(summary(manifest))
    click.echo(f"manifest: {path}")


@data.command("prepare")
@with_config
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Build only part I of N (cluster array jobs); finish with --merge.",
)
@click.option("--merge", "merge_only", is_flag=True, help="Merge the parts built with --shard.")
def prepare_command(
    config_path: str | None, overrides: tuple[str, ...], shard: str | None, merge_only: bool
) -> None:
    """Decode, resize and cache every image once (resumable; corrupt files are skipped and listed)."""
    from cxrkit.data.cache import merge_cache

    config = resolve_config(config_path, overrides)
    if merge_only:
        click.echo(f"cache: {merge_cache(config.data.cache.dir)}")
        return
    report = prepare(config, _parse_shard(shard))
    click.echo(
        f"cache: {report.out_dir} ({report.n_images} images, {len(report.shards_built)} shards built, "
        f"{len(report.shards_skipped)} already done, {report.n_failed} unreadable)"
    )
    if report.n_failed:
        click.echo(f"unreadable files are listed in {report.out_dir / 'failures.csv'}", err=True)


@data.command("describe")
@with_config
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Report folder (default <output_dir>/describe).",
)
@click.option("--samples", default=16, show_default=True, help="Images in the sample grids.")
def describe_command(
    config_path: str | None, overrides: tuple[str, ...], out: str | None, samples: int
) -> None:
    """Write the data description report: label distributions, co-occurrence, views/sex/age,
    patient leakage check, sample and augmented image grids (HTML + Markdown + PNG)."""
    from cxrkit.data.describe import describe, describe_cache

    config = resolve_config(config_path, overrides)
    out_dir = Path(out or Path(config.output_dir) / "describe")
    if (Path(config.data.cache.dir) / "meta.json").exists():
        path = describe_cache(
            config.data.cache.dir, out_dir, config.data.augment, n_samples=samples, seed=config.seed
        )
    else:
        path = describe(
            _build(config),
            out_dir,
            augment_cfg=config.data.augment,
            n_samples=samples,
            seed=config.seed,
            image_size=config.data.cache.image_size,
            resize_policy=config.data.cache.resize_policy,
        )
    click.echo(f"report: {path}")


def prepare(config: DictConfig, shard: tuple[int, int] | None = None) -> CacheReport:
    """Build the manifest and the cache for ``config``; save the resolved config next to the cache."""
    from cxrkit.data.build import prepare_data

    try:
        report = prepare_data(config.data, shard)
    except (OSError, ValueError, KeyError) as error:
        raise click.ClickException(str(error)) from error
    save_config(config, Path(config.data.cache.dir) / "config.yaml")
    return report


def _build(config: DictConfig):
    from cxrkit.data.build import build_manifest

    try:
        return build_manifest(config.data)
    except (OSError, ValueError, KeyError) as error:
        raise click.ClickException(str(error)) from error


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise click.BadParameter(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from error
    if not 0 <= index < count:
        raise click.BadParameter(f"--shard {text}: need 0 <= I < N")
    return index, count
