"""PadChest (Bustos et al., Medical Image Analysis 2020): 160,861 images of 67,000 patients, Spanish reports.

Expected layout (the BIMCV release)::

    root/
      PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]   label file (option ``label_file``)
      0/ 1/ ... 54/<ImageID>.png                                   16-bit PNGs in their ``ImageDir`` folders,
      <ImageID>.png                                                or all directly in root

Label file columns used: ``ImageID``, ``ImageDir``, ``PatientID``, ``StudyID``, ``Projection``
(PA, AP, AP_horizontal -> AP, L -> LAT, COSTAL -> OTHER), ``PatientSex_DICOM``, ``PatientBirth`` (year) and
``StudyDate_DICOM`` (age = study year - birth year), and ``Labels``, a list such as
``['normal', 'pleural effusion']``. Labels are mapped to the vocabulary through
:mod:`cxrkit.data.labels`; unmapped labels (``COPD signs``, ``kyphosis``, ...) are dropped and counted in the
log. "No Finding" is 1 only for images labelled ``normal`` with no mapped finding (an image whose only
labels are unmapped findings is not "No Finding"). The labels in :data:`ANNOTATED` are known for every
image; the rest of the vocabulary is unknown (NaN). PadChest has no official split.

Dropped rows (logged): rows without labels; with ``drop_excluded`` (default) images the authors marked
``exclude`` (label or projection); with ``drop_broken`` (default) the known truncated or missing PNGs
(list from torchxrayvision); with ``require_images`` (default) rows whose image file is missing.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter

import numpy as np
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
    read_table,
    require_columns,
)
from cxrkit.data.manifest import Manifest

SOURCE = "padchest"
LABEL_FILE_PATTERNS = (
    "PADCHEST_chest_x_ray_images_labels*.csv",
    "PADCHEST_chest_x_ray_images_labels*.csv.gz",
)
COLUMNS = (
    "ImageID",
    "ImageDir",
    "PatientID",
    "StudyID",
    "Projection",
    "PatientSex_DICOM",
    "PatientBirth",
    "StudyDate_DICOM",
    "Labels",
)
PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LAT", "COSTAL": "OTHER"}
_QUOTED = re.compile(r"'([^']*)'")
NORMAL = "normal"
EXCLUDE = "exclude"
#: Report labels that carry no finding of their own (neither mapped nor counted as unmapped).
NON_FINDINGS = frozenset({"", NORMAL, EXCLUDE})

#: Vocabulary labels that PadChest's label hierarchy covers (all others are unknown for PadChest).
ANNOTATED: tuple[str, ...] = (
    *vocab.NIH_FINDINGS,
    "Fracture",
    *vocab.PADCHEST_EXTRA_FINDINGS,
    vocab.NO_FINDING,
)

#: Images that are missing from the release or truncated (found by torchxrayvision's PC_Dataset).
BROKEN_IMAGES = frozenset(
    {
        "216840111366964012819207061112010307142602253_04-014-084.png",
        "216840111366964012989926673512011074122523403_00-163-058.png",
        "216840111366964012959786098432011033083840143_00-176-115.png",
        "216840111366964012558082906712009327122220177_00-102-064.png",
        "216840111366964012339356563862009072111404053_00-043-192.png",
        "216840111366964013076187734852011291090445391_00-196-188.png",
        "216840111366964012373310883942009117084022290_00-064-025.png",
        "216840111366964012283393834152009033102258826_00-059-087.png",
        "216840111366964012373310883942009170084120009_00-097-074.png",
        "216840111366964012819207061112010315104455352_04-024-184.png",
        "216840111366964012819207061112010306085429121_04-020-102.png",
        "216840111366964012989926673512011083134050913_00-168-009.png",
        "216840111366964012373310883942009152114636712_00-102-045.png",
        "216840111366964012819207061112010281134410801_00-129-131.png",
        "216840111366964012487858717522009280135853083_00-075-001.png",
        "216840111366964012989926673512011151082430686_00-157-045.png",
        "216840111366964013686042548532013208193054515_02-026-007.png",
        "216840111366964013590140476722013058110301622_02-056-111.png",
        "216840111366964013590140476722013043111952381_02-065-198.png",
        "216840111366964013829543166512013353113303615_02-092-190.png",
        "216840111366964013962490064942014134093945580_01-178-104.png",
    }
)


@register("padchest")
def padchest(
    root: str,
    *,
    label_file: str | None = None,
    drop_excluded: bool = True,
    drop_broken: bool = True,
    require_images: bool = True,
) -> Manifest:
    """Read PadChest at ``root`` (see the module docstring for the layout and options)."""
    location = Location.of(root)
    location.require_dir("PadChest")
    fs, csv_path = (
        location.resolve(label_file)
        if label_file
        else (location.fs, location.find_one(LABEL_FILE_PATTERNS, "PadChest label file", "label_file"))
    )
    table = read_table(fs, csv_path, "PadChest label file", dtype=str, usecols=lambda c: c in COLUMNS)
    require_columns(table, COLUMNS, f"PadChest label file {csv_path}")
    table = _drop_unusable(table, drop_excluded, drop_broken)
    raw_labels = table.pop("_labels")

    listed = _listed_images(location)
    names = table["ImageID"].str.strip()
    meta = pd.DataFrame(
        {
            "path": _image_paths(location, table, listed),
            "patient_id": SOURCE + ":" + table["PatientID"].str.strip(),
            "study_id": table["StudyID"].fillna("").str.strip(),
            "view": map_unique(table["Projection"], lambda p: PROJECTIONS.get(p) or normalise_view(p)),
            "sex": map_unique(table["PatientSex_DICOM"], normalise_sex),
            "age": _age(table),
            "split": "",
            "source": SOURCE,
        },
        index=table.index,
    )
    meta = keep_with_images(meta, contained(names, listed), require_images, SOURCE)
    labels = vocab.order(ANNOTATED)
    targets = _targets(raw_labels.loc[meta.index], labels)
    manifest = make_manifest(meta, targets, labels)
    log.info(
        "padchest: %d images of %d patients from %s", len(manifest), meta["patient_id"].nunique(), csv_path
    )
    return manifest


def _drop_unusable(table: pd.DataFrame, drop_excluded: bool, drop_broken: bool) -> pd.DataFrame:
    unlabelled = table["Labels"].isna()
    if unlabelled.any():
        log.info("padchest: dropped %d rows without labels", int(unlabelled.sum()))
    table = table.loc[~unlabelled].copy()
    parsed = {text: _parse_labels(text) for text in table["Labels"].unique()}
    table["_labels"] = table["Labels"].map(parsed)
    drop = pd.Series(False, index=table.index)
    if drop_excluded:
        excluded = table["_labels"].map(lambda names: EXCLUDE in names) | (table["Projection"] == "EXCLUDE")
        log.info("padchest: dropped %d images marked 'exclude'", int(excluded.sum()))
        drop |= excluded
    if drop_broken:
        broken = table["ImageID"].isin(BROKEN_IMAGES)
        log.info("padchest: dropped %d images known to be missing or truncated", int(broken.sum()))
        drop |= broken
    return table.loc[~drop]


def _parse_labels(text: str) -> frozenset[str]:
    """``"['normal', 'pleural effusion']"`` -> {"normal", "pleural effusion"} (stripped, lower-case)."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"PadChest 'Labels' value is not a list: {text!r}")
    return frozenset(name.strip().lower() for name in _QUOTED.findall(text))


def _targets(raw_labels: pd.Series, labels: list[str]) -> np.ndarray:
    mapped: dict[frozenset[str], frozenset[str]] = {}
    unmapped: Counter[str] = Counter()
    for names, count in raw_labels.value_counts().items():
        findings = {name: vocab.canonical(name) for name in names - NON_FINDINGS}
        mapped[names] = frozenset(label for label in findings.values() if label is not None)
        unmapped.update({name: count for name, label in findings.items() if label is None})
    positive_sets = [mapped[names] for names in raw_labels]
    if unmapped:
        top = ", ".join(f"{name} ({count})" for name, count in unmapped.most_common(8))
        log.info(
            "padchest: dropped %d unmapped label mentions of %d kinds, most frequent: %s",
            sum(unmapped.values()),
            len(unmapped),
            top,
        )
    targets = encode_rows(positive_sets, ANNOTATED, labels)
    normal = [NORMAL in names and not mapped[names] for names in raw_labels]
    targets[:, labels.index(vocab.NO_FINDING)] = np.asarray(normal, dtype=np.float32)
    return targets


def _age(table: pd.DataFrame) -> pd.Series:
    birth = pd.to_numeric(table["PatientBirth"], errors="coerce")
    study_year = pd.to_numeric(table["StudyDate_DICOM"].str[:4], errors="coerce")
    age = study_year - birth
    return age.where((age >= 0) & (age < 130))


def _listed_images(location: Location) -> dict[str, str]:
    return {posixpath.basename(f): location.url(f) for f in location.list_files(location.root, {".png"})}


def _image_paths(location: Location, table: pd.DataFrame, listed: dict[str, str]) -> pd.Series:
    """Found images keep their path; missing ones get the expected ``root/<ImageDir>/<ImageID>``."""
    names = table["ImageID"].str.strip()
    expected = (
        location.url(location.root).rstrip("/") + "/" + table["ImageDir"].fillna("").str.strip() + "/" + names
    )
    return names.map(listed).fillna(expected)
