"""``cxr data``: get datasets, build manifests, prepare the cache and describe the data."""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """Datasets: download, manifest, prepare (cache), describe (EDA report)."""
