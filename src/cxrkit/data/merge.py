"""Merge manifests from several datasets over one harmonised label list."""

from __future__ import annotations

import logging

import pandas as pd

from cxrkit.data import labels as vocab
from cxrkit.data.manifest import Manifest

log = logging.getLogger(__name__)


def merge(manifests: list[Manifest], labels: list[str] | None = None) -> Manifest:
    """Stack ``manifests`` over ``labels`` (default: the union of their labels, in vocabulary order).

    A label a source does not annotate is unknown (NaN) for that source's images, so e.g. PadChest and
    OpenI merge into one table in which each keeps its own labels. Requested ``labels`` that no source
    has are an error (a typo would otherwise silently become an all-unknown column).
    """
    if not manifests:
        raise ValueError("merge needs at least one manifest")
    available = vocab.order(label for manifest in manifests for label in manifest.labels)
    if labels is None:
        labels = available
    else:
        missing = [label for label in labels if label not in available]
        if missing:
            raise ValueError(
                f"label {missing[0]!r} is in no data source (their labels: {', '.join(available)})"
            )
    frames = [manifest.with_labels(list(labels)).frame for manifest in manifests]
    frame = pd.concat(frames, ignore_index=True)
    frame[list(labels)] = frame[list(labels)].astype("float32")
    merged = Manifest(frame, list(labels))
    _warn_shared_patients(merged)
    return merged


def _warn_shared_patients(manifest: Manifest) -> None:
    sources = manifest.frame.groupby("patient_id")["source"].nunique()
    shared = sources[sources > 1]
    if len(shared):
        log.warning(
            "%d patient ids occur in more than one source (e.g. %s); they will be kept together in splits",
            len(shared),
            shared.index[0],
        )
