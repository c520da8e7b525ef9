"""``cxr data``: get datasets, build manifests, prepare the cache and describe the data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from omegaconf import DictConfig

from cxrkit.cli.common import out_option, resolve_config, with_config
from cxrkit.config import save_config

if TYPE_CHECKING:
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
@out_option("Manifest CSV to write (default <output_dir>/manifest.csv).", kind="file")
def manifest_command(config_path: str | None, overrides: tuple[str, ...], out: Path | None) -> None:
    """Build the manifest (sources → merged labels → views → splits); its summary is logged."""
    config = resolve_config(config_path, overrides)
    manifest = _build(config)
    path = out or Path(config.output_dir) / "manifest.csv"
    manifest.save(path)
    click.echo(f"manifest written to {path}")


@data.command("prepare")
@with_config
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Build only part I of N, counting from 1 (1/4 ... 4/4: one cluster array task each); "
    "finish with --merge.",
)
@click.option("--merge", "merge_only", is_flag=True, help="Merge the parts built with --shard.")
def prepare_command(
    config_path: str | None, overrides: tuple[str, ...], shard: str | None, merge_only: bool
) -> None:
    """Decode, resize and cache every image once (resumable; corrupt files are skipped and listed).

    \b
    On a cluster, one array task per part, then one merge:
    cxr data prepare -c cfg.yaml --shard 1/4      (... --shard 4/4)
    cxr data prepare -c cfg.yaml --merge
    """
    config = resolve_config(config_path, overrides)
    if merge_only:
        click.echo(f"cache: {merge(config.data.cache.dir)}")
        return
    part = _parse_shard(shard)
    report = prepare(config, part)
    if part is not None and not report.shards_built and not report.shards_skipped:
        click.echo(
            f"shard {shard}: nothing to build: the cache has fewer than {part[0] + 1} shards of "
            f"data.cache.shard_size={config.data.cache.shard_size} images (use fewer parts or a smaller "
            "shard_size)"
        )
        return
    click.echo(
        f"cache: {report.out_dir} ({report.n_images} images, {len(report.shards_built)} shards built, "
        f"{len(report.shards_skipped)} already done, {report.n_failed} unreadable)"
    )
    if report.n_failed:
        click.echo(f"unreadable files are listed in {report.out_dir / 'failures.csv'}", err=True)


@data.command("describe")
@with_config
@out_option("Report folder (default <output_dir>/describe).", kind="dir")
@click.option("--samples", default=16, show_default=True, help="Images in the sample grids.")
def describe_command(
    config_path: str | None, overrides: tuple[str, ...], out: Path | None, samples: int
) -> None:
    """Write the data description report: label distributions, co-occurrence, views/sex/age,
    patient leakage check, sample and augmented image grids (HTML + Markdown + PNG)."""
    from cxrkit.data.describe import describe, describe_cache

    config = resolve_config(config_path, overrides)
    out_dir = out or Path(config.output_dir) / "describe"
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
            intensity=config.data.cache.intensity,
        )
    click.echo(f"report: {path}")


def prepare(config: DictConfig, shard: tuple[int, int] | None = None) -> CacheReport:
    """Build the manifest and the cache for ``config``; save the resolved config next to the cache."""
    from cxrkit.data.build import prepare_data

    try:
        report = prepare_data(config.data, shard)
    except (OSError, ValueError, KeyError) as error:
        raise click.ClickException(str(error)) from error
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: finished shards are kept
        raise click.ClickException("interrupted; rerun to resume") from stop
    save_config(config, Path(config.data.cache.dir) / "config.yaml")
    return report


def merge(cache_dir: str) -> Path:
    """Merge the parts of a sharded prepare; missing parts fail in one line naming them."""
    from cxrkit.data.cache import CacheIncompleteError, merge_cache

    try:
        return merge_cache(cache_dir)
    except CacheIncompleteError as error:
        missing = getattr(error, "missing", None)
        if not missing:
            raise
        raise click.ClickException(
            f"cannot merge {cache_dir}: shard(s) {', '.join(map(str, missing))} of {error.total} missing; "
            "`cxr data prepare --shard I/N` builds the shards k with k % N == I - 1 (k from 0)"
        ) from error


def _build(config: DictConfig):
    from cxrkit.data.build import build_manifest

    return build_manifest(config.data)


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    """``I/N`` (parts counted from 1) as the 0-based ``(I - 1, N)`` of
    :func:`~cxrkit.data.cache.prepare_cache`."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        message = f"must look like I/N (e.g. 1/4), got {text!r}"
        raise click.BadParameter(message, param_hint="--shard") from error
    if not 1 <= index <= count:
        raise click.BadParameter(f"{text}: parts count from 1: need 1 <= I <= N", param_hint="--shard")
    return index - 1, count
