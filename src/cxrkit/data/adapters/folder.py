"""Image folders with one subfolder per class (Kermany pediatric pneumonia, COVID-19 collections, ...).

Expected layout, either of::

    root/NORMAL/*.jpeg  root/PNEUMONIA/*.jpeg                 classes only (split: root's name when it is
                                                              train/val/test, e.g. pneumonia/train; else "")
    root/train/NORMAL/*.jpeg ... root/test/PNEUMONIA/*.jpeg   split folders (train, val|valid, test)

Images are found recursively inside each class folder (png, jpg, jpeg, dcm, bmp, tif). Hidden folders and
folders starting with ``_`` are ignored. Class names go through the vocabulary (``NORMAL`` -> No Finding,
``PNEUMONIA`` -> Pneumonia); option ``class_labels`` maps folder names explicitly; other names are kept as
custom labels. Each image is positive for its class and negative for the other classes of the dataset;
labels the dataset does not have are unknown (NaN).

The patient id is parsed from the file name with ``patient_regex`` (group ``patient``, else the first
group, else the whole match); the default reads Kermany names: ``person123_bacteria_456.jpeg`` ->
``person123``, ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``.
When it does not match, the file stem is the patient. Patient ids are prefixed with ``name`` (default: the
root folder's name, or its parent's for a split folder, e.g. ``pneumonia:person123``), also the ``source``.

``patient_scope`` says whether a file-name id names one patient across the split folders. ``split`` (the
default): ids are numbered within each split folder, as in Kermany's collections, whose test/ was gathered
apart from train/ (train's ``person100`` is not test's ``person100``); ids read from a split folder other
than ``train`` then carry its name (``pneumonia:test:person100``), so two collections never share a
patient. ``dataset``: one id space across all split folders (the same id is the same patient).
"""

from __future__ import annotations

import posixpath
import re

import pandas as pd

from cxrkit.data import labels as vocab
from cxrkit.data.adapters import register
from cxrkit.data.adapters._common import Location, dataset_name, encode_rows, log, make_manifest, source_name
from cxrkit.data.manifest import Manifest

#: Kermany et al. file names: person<N>_<bacteria|virus>_<M>, [NORMAL<k>-]IM-<N>-<M>[-<k>].
KERMANY_PATIENT_REGEX = r"^(?P<patient>person\d+|(?:NORMAL\d*-)?IM-\d+)"
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PATIENT_SCOPES = ("split", "dataset")


@register("folder")
def folder(
    root: str,
    *,
    patient_regex: str = KERMANY_PATIENT_REGEX,
    class_labels: dict[str, str] | None = None,
    name: str | None = None,
    patient_scope: str = "split",
) -> Manifest:
    """Read a class-per-subfolder image dataset at ``root`` (see the module docstring)."""
    if patient_scope not in PATIENT_SCOPES:
        raise ValueError(f"folder option patient_scope must be one of {PATIENT_SCOPES}: {patient_scope!r}")
    location = Location.of(root)
    location.require_dir("image folder dataset")
    source = source_name(name, dataset_name(location.root))
    pattern = _compile(patient_regex)
    rows = []
    for split, split_dir in _split_dirs(location):
        classes = _subfolders(location, split_dir)
        if not classes:
            raise FileNotFoundError(f"image folder dataset: no class subfolders in {location.url(split_dir)}")
        for class_name in classes:
            label = _class_label(class_name, class_labels or {})
            for file in location.list_files(posixpath.join(split_dir, class_name)):
                rows.append(
                    (location.url(file), parse_patient(posixpath.basename(file), pattern), split, label)
                )
    if not rows:
        raise FileNotFoundError(f"image folder dataset: no images under {location.url(location.root)}")

    table = pd.DataFrame(rows, columns=["path", "patient", "split", "label"])
    if patient_scope == "split":
        own_folder = table["split"].isin(["train", ""])
        table["patient"] = table["patient"].where(own_folder, table["split"] + ":" + table["patient"])
    annotated = vocab.order(table["label"])
    meta = table.assign(patient_id=source + ":" + table["patient"], source=source)
    targets = encode_rows([frozenset({label}) for label in table["label"]], annotated, annotated)
    manifest = make_manifest(meta, targets, annotated)
    counts = ", ".join(f"{label} {count}" for label, count in table["label"].value_counts().items())
    log.info("%s: %d images of %d patients (%s)", source, len(table), table["patient"].nunique(), counts)
    return manifest


def _compile(patient_regex: str) -> re.Pattern[str]:
    try:
        return re.compile(patient_regex)
    except re.error as error:
        raise ValueError(
            f"folder option patient_regex {patient_regex!r} is not a valid regex: {error}"
        ) from error


def _subfolders(location: Location, folder: str) -> list[str]:
    entries = location.fs.ls(folder, detail=True)
    names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"]
    return sorted(n for n in names if not n.startswith((".", "_")))


def _split_dirs(location: Location) -> list[tuple[str, str]]:
    """(split, folder) pairs: the split folders when root has any, else (root's split or "", root)."""
    subfolders = _subfolders(location, location.root)
    splits = [n for n in subfolders if n.lower() in SPLIT_FOLDERS]
    if not splits:
        return [(SPLIT_FOLDERS.get(location.name.lower(), ""), location.root)]
    ignored = sorted(set(subfolders) - set(splits))
    if ignored:
        log.warning("image folder dataset: ignoring folders beside the split folders: %s", ", ".join(ignored))
    return [(SPLIT_FOLDERS[n.lower()], location.join(n)) for n in splits]


def _class_label(class_name: str, class_labels: dict[str, str]) -> str:
    if class_name in class_labels:
        return vocab.canonical(class_labels[class_name]) or class_labels[class_name]
    return vocab.canonical(class_name) or class_name


def parse_patient(filename: str, pattern: re.Pattern[str]) -> str:
    """The patient id in ``filename``: group ``patient``, else group 1, else the match; the stem if none."""
    match = pattern.search(filename)
    if match is None:
        return posixpath.splitext(filename)[0]
    if "patient" in pattern.groupindex:
        return match.group("patient")
    return match.group(1) if pattern.groups else match.group(0)
