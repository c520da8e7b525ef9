"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal PNGs of 30,805 patients, 14 findings.

Expected layout (the NIH Box / Kaggle ``nih-chest-xrays/data`` release, or any subset of it)::

    root/
      Data_Entry_2017.csv | Data_Entry_2017_v2020.csv[.gz]   label file (option ``label_file``;
                                                              ``sample_labels.csv`` in the Kaggle sample)
      train_val_list.txt, test_list.txt                       official split, in root or root/official_split/
      images/00000001_000.png ...                             images in one folder (or directly in root),
      images_001/images/... images_012/images/...              or in the 12 folders of the official release
                                                              (else PNGs anywhere under root)

Label file columns used: ``Image Index``, ``Finding Labels`` (``|``-separated findings or ``No Finding``),
``Patient ID``, ``Patient Age`` (years, or ``058Y``-style in the 2017 file), ``Patient Gender``,
``View Position``. The 14 findings and No Finding are annotated; every other label is unknown (NaN).
Official split: names in ``test_list.txt`` -> ``test``, in ``train_val_list.txt`` -> ``train``; validation is
carved from train by patient in :mod:`cxrkit.data.splits`. ``study_id`` is the image stem
(``00000001_000``: patient and follow-up number).

Options: ``label_file`` (path relative to root, absolute path or URL), ``split_dir`` (folder holding the two
split lists), ``require_images`` (drop rows whose image is missing; default True).
"""

from __future__ import annotations

import posixpath

import pandas as pd

from cxrkit.data import labels as vocab
from cxrkit.data.adapters import register
from cxrkit.data.adapters._common import (
    Location,
    contained,
    encode_rows,
    keep_with_images,
    log,
    make_manifest,
    map_unique,
    normalise_sex,
    normalise_view,
    parse_age,
    read_table,
    require_columns,
)
from cxrkit.data.manifest import Manifest

SOURCE = "nih"
LABEL_FILE_PATTERNS = ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz", "sample_labels.csv")
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}
ANNOTATED: tuple[str, ...] = (*vocab.NIH_FINDINGS, vocab.NO_FINDING)


@register("nih")
def nih(
    root: str, *, label_file: str | None = None, split_dir: str | None = None, require_images: bool = True
) -> Manifest:
    """Read NIH ChestX-ray14 at ``root`` (see the module docstring for the layout)."""
    location = Location.of(root)
    location.require_dir("NIH ChestX-ray14")
    fs, csv_path = (
        location.resolve(label_file)
        if label_file
        else (location.fs, location.find_one(LABEL_FILE_PATTERNS, "NIH label file", "label_file"))
    )
    table = read_table(fs, csv_path, "NIH label file", dtype={"Image Index": str, "Finding Labels": str})
    require_columns(table, COLUMNS, f"NIH label file {csv_path}")
    names = table["Image Index"].str.strip()
    listed = _listed_images(location)

    meta = pd.DataFrame(
        {
            "path": _image_paths(location, names, listed),
            "patient_id": SOURCE + ":" + table["Patient ID"].astype(str).str.strip().str.lstrip("0"),
            "study_id": names.str.rsplit(".", n=1).str[0],
            "view": map_unique(table["View Position"], normalise_view),
            "sex": map_unique(table["Patient Gender"], normalise_sex),
            "age": map_unique(table["Patient Age"], parse_age),
            "split": _official_split(location, names, split_dir),
            "source": SOURCE,
        }
    )
    findings = _parse_findings(table["Finding Labels"], csv_path)
    keep = keep_with_images(meta, contained(names, listed), require_images, SOURCE).index
    labels = vocab.order(ANNOTATED)
    targets = encode_rows([findings[i] for i in keep], ANNOTATED, labels)
    manifest = make_manifest(meta.loc[keep], targets, labels)
    log.info(
        "nih: %d images of %d patients from %s",
        len(manifest),
        manifest.frame["patient_id"].nunique(),
        csv_path,
    )
    return manifest


def _parse_findings(column: pd.Series, csv_path: str) -> list[frozenset[str]]:
    parsed: dict[str, frozenset[str]] = {}
    for text in column.fillna("").unique():
        names = [name for name in str(text).split("|") if name.strip()]
        if not names:
            raise ValueError(f"NIH label file {csv_path}: empty 'Finding Labels' value")
        canonical = {vocab.canonical_or_raise(name, field="NIH finding") for name in names}
        parsed[text] = frozenset(canonical - {vocab.NO_FINDING})
    return [parsed[text] for text in column.fillna("")]


def _listed_images(location: Location) -> dict[str, str]:
    """Image name -> path of every PNG in images/ or images_0xx/images/, else anywhere under the root."""
    folders = [location.join("images"), *sorted(location.fs.glob(location.join("images_*")))]
    files = [f for folder in folders for f in location.list_files(folder, {".png"})]
    if not files:
        files = location.list_files(location.root, {".png"})
    return {posixpath.basename(f): location.url(f) for f in files}


def _image_paths(location: Location, names: pd.Series, listed: dict[str, str]) -> pd.Series:
    base = location.join("images") if location.fs.isdir(location.join("images")) else location.root
    return names.map(lambda name: listed.get(name) or location.url(posixpath.join(base, name)))


def _official_split(location: Location, names: pd.Series, split_dir: str | None) -> pd.Series:
    folder = _split_folder(location, split_dir)
    split = pd.Series("", index=names.index)
    if folder is None:
        log.info("nih: no official split lists (%s) found; split left empty", ", ".join(SPLIT_FILES.values()))
        return split
    for name, filename in SPLIT_FILES.items():
        with location.fs.open(posixpath.join(folder, filename), "rt") as handle:
            listed = {line.strip() for line in handle.read().splitlines() if line.strip()}
        split[contained(names, listed).to_numpy()] = name
    unlisted = int((split == "").sum())
    if unlisted:
        log.info("nih: %d images are in neither official split list", unlisted)
    return split


def _split_folder(location: Location, split_dir: str | None) -> str | None:
    if split_dir:
        fs, folder = location.resolve(split_dir)
        missing = [f for f in SPLIT_FILES.values() if not fs.isfile(posixpath.join(folder, f))]
        if missing:
            raise FileNotFoundError(f"NIH split list {missing[0]} not found in {folder}")
        return folder
    for folder in (location.root, location.join("official_split")):
        present = [location.fs.isfile(posixpath.join(folder, f)) for f in SPLIT_FILES.values()]
        if all(present):
            return folder
        if any(present):
            raise FileNotFoundError(
                f"NIH official split is incomplete in {folder}: need {' and '.join(SPLIT_FILES.values())}"
            )
    return None
