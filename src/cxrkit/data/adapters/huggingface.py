"""Hugging Face ``datasets`` image-classification datasets: saved to disk, local folders, or hub ids.

``root`` is one of:

- a folder written by ``DatasetDict.save_to_disk`` / ``Dataset.save_to_disk`` (read with ``load_from_disk``;
  also an fsspec URL to one);
- any other local folder ``datasets.load_dataset`` understands: an ``imagefolder`` tree
  (``train/NORMAL/x.jpeg``), or parquet files such as a hub snapshot fetched by
  :func:`cxrkit.data.download.download`;
- a hub id such as ``keremberke/chest-xray-classification`` (option ``config``, e.g. ``full``); needs network
  access the first time (then the ``datasets`` cache).

The image column (option ``image_column``) defaults to the first ``Image`` feature, the label column
(``label_column``) to the first ``ClassLabel`` (single-label) or list-of-``ClassLabel`` (multi-label)
feature, or a string column named ``label``/``labels``. Class names go through the vocabulary (``NORMAL``
-> No Finding, ``PNEUMONIA`` -> Pneumonia; ``class_labels`` maps names explicitly; others stay custom
labels). Every class of the dataset is annotated for every image; other labels are unknown (NaN).

Images stored as files (imagefolder) keep their path. Images stored inside the dataset are written once
as PNG files to ``export_dir``, in one folder per split and dataset fingerprint, so the manifest holds file
paths. Default: ``<root>/_cxrkit_export`` for ``save_to_disk`` folders; ``~/.cache/cxrkit/huggingface/<id>``
for hub ids, URLs and other folders (files added inside a folder ``load_dataset`` scans would change it).

Splits: ``train``, ``validation``/``valid``/``val`` -> ``val``, ``test``; other split names -> "".
Patients: ``patient_column`` when the dataset has one, else parsed from the image's original file name with
``patient_regex`` (default: Kermany names, see :mod:`cxrkit.data.adapters.folder`), else each image is its
own patient. Patient ids are prefixed with ``name`` (default: the folder or hub dataset name, skipping generic
folder names such as ``full`` or ``train``).
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image as PILImage
from tqdm.auto import tqdm

from cxrkit.data import labels as vocab
from cxrkit.data.adapters import register
from cxrkit.data.adapters._common import dataset_name, encode_rows, log, make_manifest, source_name
from cxrkit.data.adapters.folder import KERMANY_PATIENT_REGEX, parse_patient
from cxrkit.data.manifest import Manifest

SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
BATCH_SIZE = 256


@dataclass(frozen=True)
class Columns:
    image: str
    label: str
    patient: str | None


@register("huggingface")
def huggingface(
    root: str,
    *,
    config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    patient_column: str | None = None,
    patient_regex: str = KERMANY_PATIENT_REGEX,
    class_labels: dict[str, str] | None = None,
    export_dir: str | None = None,
    cache_dir: str | None = None,
    name: str | None = None,
) -> Manifest:
    """Read a Hugging Face image-classification dataset (see the module docstring)."""
    splits, default_export = _load(root, config, cache_dir)
    source = source_name(name, dataset_name(root))
    export = Path(export_dir) if export_dir else default_export
    pattern = re.compile(patient_regex)
    to_label = _labeller(class_labels or {})
    frames = []
    labels: list[str] = []
    for split_name, dataset in splits.items():
        columns = _columns(
            dataset, image_column, label_column, patient_column, f"{source} split {split_name!r}"
        )
        class_names = _class_names(dataset.features[columns.label])
        folder = export / f"{split_name or 'data'}-{dataset._fingerprint[:12]}"
        frame = pd.DataFrame(
            _rows(dataset, split_name, columns, pattern, folder, class_names),
            columns=["path", "patient", "names"],
        )
        frame["positives"] = frame["names"].map(lambda names: frozenset(map(to_label, names)))
        frame["split"] = SPLITS.get(split_name.lower(), "")
        frames.append(frame)
        seen = (label for positives in frame["positives"] for label in positives)
        labels = vocab.order([*labels, *map(to_label, class_names), *seen])
    table = pd.concat(frames, ignore_index=True)
    if table.empty:
        raise ValueError(f"huggingface dataset {root!r} has no rows")
    _fill_missing_patients(table, source)
    meta = table.assign(patient_id=source + ":" + table["patient"], source=source)
    targets = encode_rows(list(table["positives"]), labels, labels)
    manifest = make_manifest(meta, targets, labels)
    log.info("%s: %d images (%s) from %s", source, len(table), ", ".join(labels), root)
    return manifest


def _load(root: str, config: str | None, cache_dir: str | None) -> tuple[dict[str, Any], Path]:
    """The dataset's splits (name -> Dataset) and the default export folder."""
    import datasets

    local = Path(root)
    try:
        if local.is_dir():
            if _is_saved_to_disk(local):
                return _as_splits(datasets.load_from_disk(str(local))), local / "_cxrkit_export"
            # PNGs written inside a folder that load_dataset scans would change what it finds there
            loaded = datasets.load_dataset(str(local), config, cache_dir=cache_dir)
            return _as_splits(loaded), _cache_folder(str(local.resolve()))
        if "://" in root:
            return _as_splits(datasets.load_from_disk(root)), _cache_folder(root)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"cannot read Hugging Face dataset at {root}: {error}") from error
    if not HUB_ID.match(root):
        raise FileNotFoundError(f"Hugging Face dataset not found: {root} is neither a folder nor a hub id")
    try:
        loaded = datasets.load_dataset(root, config, cache_dir=cache_dir)
    except Exception as error:  # the hub client raises many types (connection, HTTP, offline mode)
        raise ConnectionError(
            f"cannot load Hugging Face dataset {root!r} from the hub ({type(error).__name__}: {error}). "
            "Without network access, download it elsewhere (`cxr data download`), or save it with "
            "`save_to_disk`, and point the source root at that folder."
        ) from error
    return _as_splits(loaded), _cache_folder(root)


def _is_saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _as_splits(loaded: Any) -> dict[str, Any]:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {str(loaded.split) if loaded.split is not None else "": loaded}


def _cache_folder(root: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "cxrkit" / "huggingface" / re.sub(r"[^\w.-]+", "__", root)


def _columns(dataset: Any, image: str | None, label: str | None, patient: str | None, what: str) -> Columns:
    import datasets

    features = dataset.features
    image = image or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label = label or next((c for c, f in features.items() if _class_label(f) is not None), None)
    label = label or next((c for c in ("label", "labels") if c in features), None)
    if image is None or label is None:
        missing = (
            "image_column (an Image feature)" if image is None else "label_column (a ClassLabel feature)"
        )
        raise ValueError(f"{what}: cannot tell the {missing} among {list(features)}; pass it as an option")
    for column in (image, label, patient):
        if column and column not in features:
            raise ValueError(f"{what} has no column {column!r} (columns: {list(features)})")
    return Columns(image, label, patient)


def _class_label(feature: Any) -> Any:
    """The ClassLabel of a ClassLabel or list-of-ClassLabel feature, else None."""
    import datasets

    for candidate in (feature, getattr(feature, "feature", None)):
        if isinstance(candidate, datasets.ClassLabel):
            return candidate
    return None


def _class_names(feature: Any) -> list[str]:
    class_label = _class_label(feature)
    return list(class_label.names) if class_label is not None else []


def _labeller(class_labels: dict[str, str]):
    def to_label(class_name: str) -> str:
        name = class_labels.get(class_name, class_name)
        return vocab.canonical(name) or name

    return to_label


def _rows(
    dataset: Any, split: str, columns: Columns, pattern: re.Pattern[str], folder: Path, class_names: list[str]
) -> Iterator[tuple[str, str, list[str]]]:
    """(image path, patient id or "", class names) per row, exporting images stored in the dataset."""
    import datasets

    dataset = dataset.cast_column(columns.image, datasets.Image(decode=False))
    selected = dataset.select_columns([c for c in (columns.image, columns.label, columns.patient) if c])
    index = 0
    with tqdm(total=len(dataset), desc=f"huggingface {split or 'data'}", unit="img", leave=False) as progress:
        for batch in selected.iter(batch_size=BATCH_SIZE):
            for i, image in enumerate(batch[columns.image]):
                value = batch[columns.label][i]
                values = value if isinstance(value, list) else [value]
                names = [class_names[v] if isinstance(v, int) and class_names else str(v) for v in values]
                original = posixpath.basename(image.get("path") or "")
                if columns.patient:
                    patient = str(batch[columns.patient][i])
                else:
                    patient = parse_patient(original, pattern) if original else ""
                yield _image_path(image, folder / f"{index:07d}.png"), patient, names
                index += 1
            progress.update(len(batch[columns.image]))


def _image_path(image: dict[str, Any], target: Path) -> str:
    """The image's own file when it is one on disk, else a PNG written once to ``target``."""
    if image.get("bytes") is None:
        path = image.get("path")
        if path and Path(path).is_file():
            return path
        raise FileNotFoundError(f"huggingface image has neither bytes nor an existing file: {path!r}")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.stem + ".partial.png")
        with PILImage.open(io.BytesIO(image["bytes"])) as decoded:
            decoded.save(partial, format="PNG")
        partial.replace(target)
    return str(target)


def _fill_missing_patients(table: pd.DataFrame, source: str) -> None:
    """Images without a patient id become their own patient (``<split>-<file stem>``), with a warning."""
    unknown = table["patient"] == ""
    if not unknown.any():
        return
    log.warning("%s: %d images have no patient id; each is its own patient", source, int(unknown.sum()))
    splits = table.loc[unknown, "split"].replace("", "data")
    stems = table.loc[unknown, "path"].map(lambda p: posixpath.splitext(posixpath.basename(p))[0])
    table.loc[unknown, "patient"] = splits + "-" + stems
