"""Any dataset described by a CSV: one row per image, a path column and 1/0/blank label columns.

Expected layout::

    root/                       a folder holding the CSV (option ``csv``, found when it is the only one),
      labels.csv                or root is the CSV itself
      images/0001.png ...       paths in the CSV: relative to the CSV's folder, absolute, or URLs

Options:

- ``path_column`` (default ``path``): the image path.
- ``label_columns``: label columns, each holding 1 (present), 0 (absent) or blank (unknown). Column names
  go through the vocabulary (``Pleural Effusion`` -> Effusion); others are kept as custom labels. When not
  given, every other column whose values are all 0, 1 or blank is a label column.
- ``patient_column``, ``study_column``, ``view_column``, ``sex_column``, ``age_column``: optional metadata.
  Without a patient column every image is its own patient (splits cannot then keep a patient's images
  together, and a warning says so).
- ``split_column``: optional official split (train, val|valid|validation, test or blank).
- ``name``: source name and patient-id prefix (default: the CSV's file stem).
- ``require_images`` (default True): drop rows whose image file is missing.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd

from cxrkit.data import labels as vocab
from cxrkit.data.adapters import register
from cxrkit.data.adapters._common import (
    Location,
    files_exist,
    keep_with_images,
    log,
    make_manifest,
    map_unique,
    normalise_sex,
    normalise_view,
    parse_age,
    read_table,
    require_columns,
    source_name,
)
from cxrkit.data.manifest import Manifest

TABLE_SUFFIXES = (".csv", ".csv.gz", ".csv.zip", ".csv.bz2", ".csv.xz")
SPLITS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


@register("table")
def table(
    root: str,
    *,
    csv: str | None = None,
    path_column: str = "path",
    label_columns: list[str] | None = None,
    patient_column: str | None = None,
    study_column: str | None = None,
    view_column: str | None = None,
    sex_column: str | None = None,
    age_column: str | None = None,
    split_column: str | None = None,
    name: str | None = None,
    require_images: bool = True,
) -> Manifest:
    """Read the CSV-described dataset at ``root`` (see the module docstring for the options)."""
    location, csv_path = _locate(root, csv)
    frame = read_table(location.fs, csv_path, "label table", dtype={path_column: str})
    what = f"label table {location.url(csv_path)}"
    optional = {
        "patient_id": patient_column,
        "study_id": study_column,
        "view": view_column,
        "sex": sex_column,
        "age": age_column,
        "split": split_column,
    }
    require_columns(frame, [path_column, *(c for c in optional.values() if c)], what)
    columns = (
        list(label_columns)
        if label_columns
        else _infer_label_columns(frame, {path_column, *optional.values()})
    )
    require_columns(frame, columns, what)
    labels = _label_names(columns, what)
    source = source_name(name, posixpath.basename(csv_path).split(".")[0])

    base = posixpath.dirname(csv_path)
    paths = frame[path_column].fillna("").str.strip()
    if (paths == "").any():
        raise ValueError(f"{what}: column {path_column!r} is empty in row {int((paths == '').idxmax()) + 2}")
    meta = pd.DataFrame({"path": paths.map(lambda p: _resolve(location, base, p)), "source": source})
    meta["patient_id"] = source + ":" + _patients(frame, patient_column, paths, what)
    if study_column:
        meta["study_id"] = frame[study_column].fillna("").astype(str).str.strip()
    if view_column:
        meta["view"] = map_unique(frame[view_column], normalise_view)
    if sex_column:
        meta["sex"] = map_unique(frame[sex_column], normalise_sex)
    if age_column:
        meta["age"] = map_unique(frame[age_column], parse_age)
    if split_column:
        meta["split"] = map_unique(frame[split_column], lambda value: _split(value, what))
    targets = np.stack([_binary(frame[c], what) for c in columns], axis=1)

    if require_images:
        meta = keep_with_images(meta, files_exist(meta["path"]), require_images, source)
    manifest = make_manifest(meta, targets[meta.index.to_numpy()], labels).with_labels(vocab.order(labels))
    log.info("%s: %d images, labels %s", source, len(manifest), ", ".join(manifest.labels))
    return manifest


def _locate(root: str, csv: str | None) -> tuple[Location, str]:
    location = Location.of(root)
    if location.fs.isfile(location.root):
        return Location(location.fs, posixpath.dirname(location.root)), location.root
    location.require_dir("label table dataset")
    if csv:
        fs, path = location.resolve(csv)
        if not fs.isfile(path):
            raise FileNotFoundError(f"label table not found: {path}")
        return Location(fs, posixpath.dirname(path)), path
    found = [p for suffix in TABLE_SUFFIXES for p in location.fs.glob(location.join(f"*{suffix}"))]
    if len(found) != 1:
        listing = ", ".join(posixpath.basename(p) for p in found) or "none"
        raise FileNotFoundError(
            f"label table: pass option csv=... (CSV files in {location.url(location.root)}: {listing})"
        )
    return location, found[0]


def _resolve(location: Location, base: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return location.url(posixpath.normpath(posixpath.join(base, path)))


def _infer_label_columns(frame: pd.DataFrame, used: set[str | None]) -> list[str]:
    columns = [
        c
        for c in frame.columns
        if c not in used and pd.api.types.is_numeric_dtype(frame[c]) and frame[c].dropna().isin((0, 1)).all()
    ]
    if not columns:
        raise ValueError("label table: no 0/1 label column found; pass option label_columns=[...]")
    log.info("label table: label columns %s", ", ".join(columns))
    return columns


def _label_names(columns: list[str], what: str) -> list[str]:
    names = [vocab.canonical(c) or c for c in columns]
    seen: dict[str, str] = {}
    for column, label in zip(columns, names, strict=True):
        if label in seen:
            raise ValueError(f"{what}: columns {seen[label]!r} and {column!r} are both the label {label!r}")
        seen[label] = column
    return names


def _binary(values: pd.Series, what: str) -> np.ndarray:
    numeric = pd.to_numeric(values, errors="coerce")
    bad = (numeric.isna() & values.notna()) | ~(numeric.isin((0, 1)) | numeric.isna())
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise ValueError(
            f"{what}: label {values.name!r} is {values.iloc[row]!r} in row {row + 2}; use 1, 0 or blank"
        )
    return numeric.to_numpy(dtype=np.float32)


def _patients(frame: pd.DataFrame, patient_column: str | None, paths: pd.Series, what: str) -> pd.Series:
    if patient_column:
        patients = frame[patient_column].astype(str).str.strip()
        if frame[patient_column].isna().any():
            raise ValueError(f"{what}: patient column {patient_column!r} has blank values")
        return patients
    log.warning(
        "%s: no patient column; every image is its own patient, so splits cannot group patients", what
    )
    return paths.map(lambda p: posixpath.splitext(p)[0])


def _split(value: object, what: str) -> str:
    text = "" if pd.isna(value) else str(value).strip().lower()
    if text and text not in SPLITS:
        raise ValueError(f"{what}: split value {value!r} is not one of {', '.join(SPLITS)} or blank")
    return SPLITS.get(text, "")
