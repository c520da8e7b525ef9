"""From a data config to the manifest a run trains and evaluates on."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from cxrkit.data import labels as vocab
from cxrkit.data.adapters import load_source
from cxrkit.data.cache import CacheReport, prepare_cache
from cxrkit.data.config import SourceConfig
from cxrkit.data.manifest import VIEWS, Manifest, apply_no_finding_policy
from cxrkit.data.merge import merge
from cxrkit.data.run_manifest import has_run_manifest, load_run_manifest
from cxrkit.data.splits import assign_splits, describe

log = logging.getLogger(__name__)


def build_manifest(data_cfg) -> Manifest:
    """Load every source, merge, select labels and views, apply the No Finding policy, split, subsample.

    Steps, in order: :func:`load_manifest`; :func:`~cxrkit.data.splits.assign_splits` with
    ``data_cfg.split``; and, when ``data_cfg.no_finding_ratio`` is set, subsample No Finding images of the
    train split so they make up that fraction of it (seeded with ``data_cfg.split.seed``; val and test are
    never subsampled).
    """
    manifest, no_finding_mask = _load(data_cfg)
    manifest = assign_splits(manifest, data_cfg.split)
    if data_cfg.no_finding_ratio is not None:
        manifest = subsample_no_finding(
            manifest, data_cfg.no_finding_ratio, data_cfg.split.seed, no_finding_mask
        )
    log.info(summary(manifest))
    return manifest


def load_manifest(data_cfg) -> Manifest:
    """The images of ``data_cfg`` before splitting: each ``data_cfg.sources`` entry through its adapter;
    :func:`~cxrkit.data.merge.merge` over ``data_cfg.labels`` (canonical names; default all labels of the
    sources); keep ``data_cfg.views`` (e.g. ``[PA, AP]``; default all);
    :func:`~cxrkit.data.manifest.apply_no_finding_policy`; drop images with no known label left. The
    ``split`` column holds the datasets' official splits."""
    return _load(data_cfg)[0]


def build_run_manifest(data_cfg, run_dir: str | Path) -> Manifest:
    """The images of ``data_cfg`` in the splits the run in ``run_dir`` trained on (see
    :mod:`cxrkit.data.run_manifest`); a run that stores no manifest gets :func:`build_manifest`, with a
    warning that its splits are rebuilt from the files on disk."""
    if not has_run_manifest(run_dir):
        log.warning(
            "%s stores no data manifest (trained before cxrkit stored one): its splits are rebuilt from the "
            "files on disk and hold only if the data has not changed since",
            run_dir,
        )
        return build_manifest(data_cfg)
    manifest = load_run_manifest(run_dir, load_manifest(data_cfg))
    log.info("%s (the splits of %s)", summary(manifest), run_dir)
    return manifest


def _load(data_cfg) -> tuple[Manifest, np.ndarray]:
    """:func:`load_manifest` and, aligned with it, which images have no finding."""
    sources = [_source(source) for source in data_cfg.sources]
    if not sources:
        raise ValueError("data.sources is empty: add at least one dataset (adapter and root)")
    manifests = []
    for source in sources:
        log.info("loading %s from %s", source.adapter, source.root)
        manifests.append(load_source(source))
    wanted = [vocab.canonical(label) or label for label in data_cfg.labels] or None
    manifest = merge(manifests, wanted)
    manifest = filter_views(manifest, list(data_cfg.views))
    no_finding_mask = _no_finding(manifest)
    manifest = apply_no_finding_policy(manifest, data_cfg.no_finding)
    return _drop_unlabelled(manifest, no_finding_mask)


def filter_views(manifest: Manifest, views: list[str]) -> Manifest:
    """Keep images whose view is in ``views`` (PA, AP, LAT, OTHER, or "" for unknown); all when empty."""
    if not views:
        return manifest
    wanted = {str(view).strip().upper() for view in views}
    unknown = wanted - VIEWS
    if unknown:
        raise ValueError(f"data.views has {sorted(unknown)}; use {sorted(v for v in VIEWS if v)} or ''")
    kept = manifest.subset(manifest.frame["view"].isin(wanted).to_numpy())
    log.info("views %s: kept %d of %d images", sorted(wanted), len(kept), len(manifest))
    if not len(kept):
        raise ValueError(f"no image has a view in {sorted(wanted)}")
    return kept


def subsample_no_finding(
    manifest: Manifest, ratio: float, seed: int, no_finding: np.ndarray | None = None
) -> Manifest:
    """Drop train images with no finding at random until they are ``ratio`` of the train split.

    ``no_finding`` marks the images with no finding (default: "No Finding" = 1 when that label is kept,
    else every known label 0). The train split is only reduced, never grown: when No Finding images are
    already at most ``ratio`` of it, nothing changes.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"data.no_finding_ratio must be in [0, 1), got {ratio}")
    frame = manifest.frame
    no_finding = _no_finding(manifest) if no_finding is None else np.asarray(no_finding, dtype=bool)
    train = (frame["split"] == "train").to_numpy()
    candidates = np.flatnonzero(train & no_finding)
    others = int((train & ~no_finding).sum())
    keep_count = round(ratio * others / (1 - ratio))
    if len(candidates) <= keep_count:
        log.info(
            "no_finding_ratio %.2f: train already has %d No Finding images; nothing dropped",
            ratio,
            len(candidates),
        )
        return manifest
    rng = np.random.default_rng(seed)
    dropped = rng.choice(candidates, size=len(candidates) - keep_count, replace=False)
    keep = np.ones(len(frame), dtype=bool)
    keep[dropped] = False
    log.info(
        "no_finding_ratio %.2f: kept %d of %d No Finding train images (%d with findings)",
        ratio,
        keep_count,
        len(candidates),
        others,
    )
    return manifest.subset(keep)


def summary(manifest: Manifest) -> str:
    """One line: images, patients, sources, splits, labels and the No Finding share of train."""
    frame = manifest.frame
    sources = ", ".join(
        f"{name} {count:,}" for name, count in frame["source"].value_counts().sort_index().items()
    )
    train = (frame["split"] == "train").to_numpy()
    share = _no_finding(manifest)[train].mean() if train.any() else float("nan")
    return (
        f"manifest: {len(frame):,} images of {frame['patient_id'].nunique():,} patients ({sources}); "
        f"{describe(manifest)}; {len(manifest.labels)} labels; No Finding {share:.1%} of train"
    )


def _source(source) -> SourceConfig:
    """A SourceConfig with plain Python options, from the dataclass or an OmegaConf node."""
    if OmegaConf.is_config(source):
        source = OmegaConf.to_container(source, resolve=True)
    if isinstance(source, dict):
        return SourceConfig(**source)
    options = source.options
    if OmegaConf.is_config(options):
        options = OmegaConf.to_container(options, resolve=True)
    return SourceConfig(adapter=source.adapter, root=source.root, options=dict(options))


def _no_finding(manifest: Manifest) -> np.ndarray:
    """Images with no finding: "No Finding" = 1 when it is a label, else known labels all 0."""
    frame = manifest.frame
    if vocab.NO_FINDING in manifest.labels:
        return (frame[vocab.NO_FINDING] == 1).to_numpy()
    targets = manifest.targets
    known = ~np.isnan(targets)
    return known.any(axis=1) & ~(np.nan_to_num(targets, nan=0.0) > 0).any(axis=1)


def _drop_unlabelled(manifest: Manifest, no_finding: np.ndarray) -> tuple[Manifest, np.ndarray]:
    """Drop images whose every label is unknown (they teach nothing), keeping ``no_finding`` aligned."""
    labelled = (~np.isnan(manifest.targets)).any(axis=1) if manifest.labels else np.zeros(len(manifest), bool)
    if labelled.all():
        return manifest, no_finding
    log.info(
        "dropped %d images with no known label among %s", int((~labelled).sum()), ", ".join(manifest.labels)
    )
    if not labelled.any():
        raise ValueError("no image has a known value for any of the selected labels")
    return manifest.subset(labelled), no_finding[labelled]


def prepare_data(
    data_cfg, shard: tuple[int, int] | None = None, manifest: Manifest | None = None
) -> CacheReport:
    """Build the preprocessing cache of ``manifest`` (default: :func:`build_manifest` of ``data_cfg``) in
    ``data_cfg.cache.dir``.

    Re-running does no finished work (see :func:`cxrkit.data.cache.prepare_cache`); ``shard=(i, n)`` builds
    one part of a cluster job.
    """
    cache = data_cfg.cache
    return prepare_cache(
        build_manifest(data_cfg) if manifest is None else manifest,
        cache.dir,
        image_size=int(cache.image_size),
        resize_policy=str(cache.resize_policy),
        intensity=str(cache.intensity),
        shard_size=int(cache.shard_size),
        workers=int(cache.workers),
        shard=shard,
    )
