"""Building blocks shared by the adapters: fsspec locations, CSV reading, normalising metadata, targets."""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pandas as pd
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_compression

from cxrkit.data import labels as vocab
from cxrkit.data.decode import IMAGE_SUFFIXES
from cxrkit.data.manifest import META_COLUMNS, Manifest

log = logging.getLogger("cxrkit.data.adapters")


@dataclass(frozen=True)
class Location:
    """A folder on a local disk or behind an fsspec URL (``gs://``, ``s3://``, ``https://``, ``file://``)."""

    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def of(cls, url: str) -> Location:
        fs, root = fsspec.core.url_to_fs(str(url))
        return cls(fs, root.rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def name(self) -> str:
        return PurePosixPath(self.root).name

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, path: str) -> str:
        """What a manifest stores: a plain path on local disks, a full URL elsewhere."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def resolve(self, path_or_url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """A file given as a URL, an absolute path or a path relative to the root."""
        if "://" in path_or_url:
            fs, path = fsspec.core.url_to_fs(path_or_url)
            return fs, path
        if path_or_url.startswith("/") and self.is_local:
            return self.fs, path_or_url
        return self.fs, self.join(path_or_url)

    def require_dir(self, what: str) -> None:
        if not self.fs.isdir(self.root):
            raise FileNotFoundError(f"{what} folder not found: {self.url(self.root)}")

    def find_one(self, patterns: Sequence[str], what: str, option: str) -> str:
        """The file under the root matching the first of ``patterns`` that matches (last match wins)."""
        for pattern in patterns:
            matches = sorted(self.fs.glob(self.join(pattern)))
            if matches:
                if len(matches) > 1:
                    log.info("several %s files match %s; using %s", what, pattern, matches[-1])
                return matches[-1]
        wanted = " or ".join(patterns)
        raise FileNotFoundError(
            f"{what} not found: no {wanted} in {self.url(self.root)} (pass the file with option {option}=...)"
        )

    def list_files(self, folder: str, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[str]:
        """Files under ``folder`` (recursively) whose suffix is in ``suffixes`` (case-insensitive)."""
        if not self.fs.isdir(folder):
            return []
        wanted = {s.lower() for s in suffixes}
        return sorted(p for p in self.fs.find(folder) if PurePosixPath(p).suffix.lower() in wanted)


def read_table(fs: fsspec.AbstractFileSystem, path: str, what: str, **read_csv_options) -> pd.DataFrame:
    """Read a CSV (optionally compressed, by suffix) with a clear error when it is missing or unreadable."""
    if not fs.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    compression = infer_compression(path)
    try:
        with fs.open(path, "rb") as handle:
            return pd.read_csv(handle, compression=compression, **read_csv_options)
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from error


def require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what} has no column {missing[0]!r} (columns: {', '.join(map(str, frame.columns))})"
        )


_VIEWS = {
    "PA": "PA",
    "POSTEROANTERIOR": "PA",
    "AP": "AP",
    "ANTEROPOSTERIOR": "AP",
    "AP_HORIZONTAL": "AP",
    "AP SUPINE": "AP",
    "AP_SUPINE": "AP",
    "L": "LAT",
    "LL": "LAT",
    "RL": "LAT",
    "LAT": "LAT",
    "LATERAL": "LAT",
    "LARGE LATERAL": "LAT",
}
_UNKNOWN = {"", "NAN", "NONE", "UNK", "UNKNOWN"}


def map_unique(values: pd.Series, function: Callable[[object], object]) -> pd.Series:
    """``values.map(function)``, calling ``function`` once per distinct value (fast on long columns)."""
    lookup = {value: function(value) for value in values.unique()}
    return values.map(lookup)


def normalise_view(value: object) -> str:
    """Map a dataset's projection name to PA, AP, LAT, OTHER, or "" when unknown."""
    text = "" if pd.isna(value) else str(value).strip().upper()
    if text in _UNKNOWN:
        return ""
    return _VIEWS.get(text, "OTHER")


def normalise_sex(value: object) -> str:
    text = "" if pd.isna(value) else str(value).strip().upper()
    if text in ("M", "MALE"):
        return "M"
    if text in ("F", "FEMALE"):
        return "F"
    return ""


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def parse_age(value: object) -> float:
    """Age in years from numbers or DICOM-style strings (``058Y``, ``006M``); NaN when absent or invalid."""
    if pd.isna(value):
        return float("nan")
    match = _AGE.match(str(value))
    if not match:
        return float("nan")
    years = float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]
    return years if 0 <= years < 130 else float("nan")


def encode_rows(
    positive_sets: Sequence[frozenset[str]], annotated: Sequence[str], labels: Sequence[str]
) -> np.ndarray:
    """Stack :func:`cxrkit.data.labels.encode` rows, encoding each distinct set of positives once."""
    cache: dict[frozenset[str], np.ndarray] = {}
    rows = np.empty((len(positive_sets), len(labels)), dtype=np.float32)
    for i, positives in enumerate(positive_sets):
        row = cache.get(positives)
        if row is None:
            row = cache[positives] = vocab.encode(positives, annotated, labels)
        rows[i] = row
    return rows


def contained(values: pd.Series, members: set[str] | dict[str, str]) -> pd.Series:
    """``values.isin(members)``, fast for large sets of strings (arrow-backed ``isin`` is slow there)."""
    return pd.Series([value in members for value in values], index=values.index, dtype=bool)


def files_exist(paths: pd.Series) -> pd.Series:
    """Whether each path or URL is an existing file, listing every distinct folder once."""
    folders = paths.map(posixpath.dirname)
    present: set[str] = set()
    for folder in folders.unique():
        fs, path = fsspec.core.url_to_fs(folder or ".")
        if fs.isdir(path):
            present.update(
                posixpath.join(folder, posixpath.basename(p.rstrip("/"))) for p in fs.ls(path, detail=False)
            )
    return contained(paths, present)


def keep_with_images(
    frame: pd.DataFrame, exists: pd.Series, require_images: bool, source: str
) -> pd.DataFrame:
    """Drop rows whose image is missing (when ``require_images``), logging how many."""
    if not require_images:
        return frame
    missing = int((~exists).sum())
    if missing == len(frame) and missing:
        raise FileNotFoundError(
            f"{source}: none of the {missing} images in the label file were found "
            f"(e.g. {frame['path'].iloc[0]}); check the root folder or pass require_images=False"
        )
    if missing:
        log.warning("%s: dropped %d of %d rows whose image file is missing", source, missing, len(frame))
    return frame.loc[exists.to_numpy()]


def make_manifest(meta: pd.DataFrame, targets: np.ndarray, labels: Sequence[str]) -> Manifest:
    """Assemble a manifest from metadata columns (missing ones filled) and a target matrix over ``labels``."""
    frame = pd.DataFrame(index=range(len(meta)))
    for column in META_COLUMNS:
        if column == "age":
            values = meta["age"].to_numpy() if "age" in meta else np.nan
            frame["age"] = pd.to_numeric(pd.Series(values, index=frame.index), errors="coerce").astype(float)
        else:
            values = meta[column].to_numpy() if column in meta else ""
            frame[column] = pd.Series(values, index=frame.index).fillna("").astype(str)
    targets = np.asarray(targets, dtype=np.float32).reshape(len(frame), len(labels))
    label_frame = pd.DataFrame(targets, columns=list(labels), index=frame.index)
    return Manifest(pd.concat([frame, label_frame], axis=1), list(labels))


#: Folder names that say nothing about the dataset (a split, a config, a generic container).
GENERIC_FOLDERS = frozenset(
    {"train", "val", "valid", "validation", "test", "full", "data", "default", "images"}
)


def dataset_name(path: str) -> str:
    """A folder's dataset name: its own, or its nearest non-generic parent's (``pneumonia/train``)."""
    parts = [part for part in PurePosixPath(path.rstrip("/")).parts if part not in ("/", "")]
    while len(parts) > 1 and parts[-1].lower() in GENERIC_FOLDERS:
        parts.pop()
    return parts[-1] if parts else ""


def source_name(name: str | None, fallback: str) -> str:
    """A short source name usable as a patient-id prefix (letters, digits, ``-_.``)."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", (name or fallback).strip()).strip("-")
    if not text:
        raise ValueError(f"cannot derive a source name from {name or fallback!r}; pass option name=...")
    return text
