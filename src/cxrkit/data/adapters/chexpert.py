"""CheXpert (Irvin et al., AAAI 2019): 224,316 chest radiographs of 65,240 patients, 14 labeler labels.

Expected layout (``CheXpert-v1.0`` or ``CheXpert-v1.0-small`` as unzipped)::

    root/
      train.csv                           option ``train_csv`` (relative to root, absolute path or URL)
      valid.csv                           option ``valid_csv``; optional when left at its default
      train/patient00001/study1/view1_frontal.jpg ...
      valid/patient64541/study1/view1_frontal.jpg ...

CSV columns used: ``Path`` (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``; the leading
dataset folder is dropped and the rest resolved against root), ``Sex``, ``Age``, ``Frontal/Lateral``,
``AP/PA`` and the 14 label columns, each 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned).

Uncertain labels follow ``uncertain``: ``ones`` (U-Ones), ``zeros`` (U-Zeros) or ``ignore`` (unknown, NaN;
masked in training). Blank is 0 (not mentioned = absent, the usual reading) unless ``blank_as_unknown``.
``frontal_only`` keeps frontal views. The patient id comes from the path (``chexpert:patient00001``), the
study from ``patient00001/study1``. Split: train.csv -> ``train``, valid.csv -> ``val``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrkit.data import labels as vocab
from cxrkit.data.adapters import register
from cxrkit.data.adapters._common import (
    Location,
    contained,
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

SOURCE = "chexpert"
LABEL_COLUMNS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
UNCERTAIN_POLICIES = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}
SPLIT_FOLDERS = ("train", "valid", "test")
_PATH_PARTS = r"^(?:.*/)?(?P<patient>patient\d+)/(?P<study>study\d+)/"


@register("chexpert")
def chexpert(
    root: str,
    *,
    train_csv: str = "train.csv",
    valid_csv: str | None = "valid.csv",
    uncertain: str = "ones",
    blank_as_unknown: bool = False,
    frontal_only: bool = False,
    require_images: bool = True,
) -> Manifest:
    """Read CheXpert at ``root`` (see the module docstring for the layout and options)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"chexpert option uncertain must be one of {sorted(UNCERTAIN_POLICIES)}, got {uncertain!r}"
        )
    location = Location.of(root)
    location.require_dir("CheXpert")
    table = pd.concat(list(_read_csvs(location, train_csv, valid_csv)), ignore_index=True)
    if frontal_only:
        frontal = table["Frontal/Lateral"].str.strip().str.lower() == "frontal"
        log.info("chexpert: kept %d frontal of %d images", int(frontal.sum()), len(table))
        table = table.loc[frontal].reset_index(drop=True)

    relative = table["Path"].str.strip().map(_relative_path)
    parts = relative.str.extract(_PATH_PARTS)
    if parts["patient"].isna().any():
        bad = table.loc[parts["patient"].isna(), "Path"].iloc[0]
        raise ValueError(f"chexpert: cannot find patientNNNNN/studyN in Path {bad!r}")
    listed = {
        p.removeprefix(location.root + "/") for p in location.list_files(location.root, {".jpg", ".png"})
    }
    base = location.url(location.root).rstrip("/") + "/"
    meta = pd.DataFrame(
        {
            "path": base + relative,
            "patient_id": SOURCE + ":" + parts["patient"],
            "study_id": parts["patient"] + "/" + parts["study"],
            "view": _views(table),
            "sex": map_unique(table["Sex"], normalise_sex),
            "age": map_unique(table["Age"], parse_age),
            "split": table["_split"],
            "source": SOURCE,
        }
    )
    meta = keep_with_images(meta, contained(relative, listed), require_images, SOURCE)
    labels = [vocab.canonical_or_raise(c, field="CheXpert label") for c in LABEL_COLUMNS]
    targets = _targets(table.loc[meta.index], uncertain, blank_as_unknown)
    manifest = make_manifest(meta, targets, labels).with_labels(vocab.order(labels))
    log.info("chexpert: %d images of %d patients", len(manifest), meta["patient_id"].nunique())
    return manifest


def _read_csvs(location: Location, train_csv: str, valid_csv: str | None):
    for option, name, split in (("train_csv", train_csv, "train"), ("valid_csv", valid_csv, "val")):
        if not name:
            continue
        fs, path = location.resolve(name)
        if not fs.isfile(path):
            if option == "valid_csv" and name == "valid.csv":
                log.info(
                    "chexpert: no valid.csv in %s; no official validation split", location.url(location.root)
                )
                continue
            raise FileNotFoundError(f"CheXpert {option} not found: {path}")
        table = read_table(fs, path, f"CheXpert {option}", dtype={"Path": str, "Sex": str, "AP/PA": str})
        require_columns(table, (*META_COLUMNS, *LABEL_COLUMNS), f"CheXpert {option} {path}")
        table["_split"] = split
        yield table


def _relative_path(path: str) -> str:
    """Drop the leading dataset folder (``CheXpert-v1.0-small/``) so the path is relative to root."""
    head, _, rest = path.partition("/")
    return rest if head not in SPLIT_FOLDERS and rest else path


def _views(table: pd.DataFrame) -> pd.Series:
    lateral = table["Frontal/Lateral"].fillna("").str.strip().str.lower() == "lateral"
    frontal = map_unique(table["AP/PA"], normalise_view)
    return frontal.where(~lateral, "LAT")


def _targets(table: pd.DataFrame, uncertain: str, blank_as_unknown: bool) -> np.ndarray:
    values = np.stack([_label_values(table[name]) for name in LABEL_COLUMNS], axis=1)
    targets = values.copy()
    targets[values == -1] = UNCERTAIN_POLICIES[uncertain]
    targets[np.isnan(values)] = np.nan if blank_as_unknown else 0.0
    return targets


def _label_values(raw: pd.Series) -> np.ndarray:
    values = pd.to_numeric(raw, errors="coerce")
    bad = (values.isna() & raw.notna()) | ~(values.isin((1, 0, -1)) | values.isna())
    if bad.any():
        value = raw[bad].iloc[0]
        raise ValueError(f"CheXpert label {raw.name!r} has value {value!r}; expected 1, 0, -1 or blank")
    return values.to_numpy(dtype=np.float32)
