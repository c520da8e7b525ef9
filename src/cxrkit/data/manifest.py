"""The manifest: one table describing a dataset on disk, the common currency of every adapter.

Columns (one row per image):

========== ======= ==================================================================
column     type    meaning
========== ======= ==================================================================
path       str     image path or fsspec URL
patient_id str     patient identifier, prefixed by the source (``nih:30805``)
study_id   str     study identifier ("" when the dataset has none)
view       str     ``PA``, ``AP``, ``LAT`` or ``OTHER`` ("" when unknown)
sex        str     ``M``, ``F`` or ""
age        float   age in years (NaN when unknown)
split      str     official split of the dataset: ``train``, ``val``, ``test`` or ""
source     str     adapter name (``nih``, ``padchest``, ...)
<label>    float   one column per label in ``Manifest.labels``: 1, 0 or NaN (unknown)
========== ======= ==================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrkit.data import labels as vocab

META_COLUMNS: tuple[str, ...] = ("path", "patient_id", "study_id", "view", "sex", "age", "split", "source")
VIEWS: frozenset[str] = frozenset({"PA", "AP", "LAT", "OTHER", ""})
#: The split names, in pipeline order; a manifest row may also carry "" (not assigned to any split).
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class Manifest:
    """A dataset as a table: metadata columns plus one float column per label."""

    frame: pd.DataFrame
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate(self.frame, self.labels)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def targets(self) -> np.ndarray:
        """Label matrix (n_images x n_labels), float32 with NaN for unknown."""
        return self.frame[self.labels].to_numpy(dtype=np.float32)

    def subset(self, mask: pd.Series | np.ndarray) -> Manifest:
        return Manifest(self.frame.loc[mask].reset_index(drop=True), list(self.labels))

    def with_labels(self, labels: list[str]) -> Manifest:
        """Re-express over ``labels``: missing columns become unknown (NaN), extra columns are dropped."""
        frame = self.frame[list(META_COLUMNS)].copy()
        for label in labels:
            frame[label] = self.frame[label] if label in self.frame else np.float32(np.nan)
        frame[list(labels)] = frame[list(labels)].astype("float32")
        return Manifest(frame, list(labels))

    def save(self, path: str | Path) -> None:
        """Write ``path`` (CSV) and ``path.labels.json`` with the label order."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.frame.to_csv(path, index=False)
        path.with_suffix(path.suffix + ".labels.json").write_text(json.dumps(self.labels))

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"manifest not found: {path}")
        labels = json.loads(path.with_suffix(path.suffix + ".labels.json").read_text())
        dtypes = {c: str for c in META_COLUMNS if c != "age"}
        frame = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values={"age": [""]})
        for label in labels:
            frame[label] = pd.to_numeric(frame[label].replace("", np.nan), errors="raise").astype("float32")
        frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
        return cls(frame, labels)


def validate(frame: pd.DataFrame, labels: list[str]) -> None:
    """Raise ValueError naming the first missing column or bad value."""
    for column in (*META_COLUMNS, *labels):
        if column not in frame.columns:
            raise ValueError(f"manifest is missing column {column!r}")
    bad_views = set(frame["view"].unique()) - VIEWS
    if bad_views:
        raise ValueError(f"manifest column 'view' has values outside {sorted(VIEWS)}: {sorted(bad_views)}")
    bad_splits = set(frame["split"].unique()) - {*SPLITS, ""}
    if bad_splits:
        raise ValueError(f"manifest column 'split' has values outside {[*SPLITS, '']}: {sorted(bad_splits)}")
    for label in labels:
        values = frame[label].to_numpy(dtype=np.float64)
        finite = values[~np.isnan(values)]
        if finite.size and not np.isin(finite, (0.0, 1.0)).all():
            raise ValueError(f"manifest label column {label!r} must hold 0, 1 or NaN")


def from_records(records: list[dict], labels: list[str]) -> Manifest:
    """Build a manifest from dicts holding the metadata columns and a ``targets`` row over ``labels``."""
    rows = []
    for record in records:
        row = {c: record.get(c, "") for c in META_COLUMNS}
        row["age"] = float(record["age"]) if record.get("age") not in (None, "") else np.nan
        row.update(dict(zip(labels, record["targets"], strict=True)))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*META_COLUMNS, *labels])
    frame[labels] = frame[labels].astype("float32")
    return Manifest(frame, list(labels))


def apply_no_finding_policy(manifest: Manifest, policy: str) -> Manifest:
    """``class`` keeps "No Finding" as a label; ``zeros`` drops it (an all-zero row means no finding)."""
    if policy == "class":
        return manifest
    if policy == "zeros":
        return manifest.with_labels([label for label in manifest.labels if label != vocab.NO_FINDING])
    raise ValueError(f"no_finding policy must be 'class' or 'zeros', got {policy!r}")
