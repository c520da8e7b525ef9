"""OpenI / Indiana University chest X-rays (Demner-Fushman et al., JAMIA 2016): 7,470 images, 3,955 reports.

Expected layout (the NLM release, as torchxrayvision's ``Openi_Dataset`` reads it)::

    root/
      NLMCXR_reports.tgz | ecgen-radiology/*.xml      reports with MeSH indexing (option ``reports``)
      NLMCXR_dcm/1000_IM-0003-1001.dcm ...            DICOMs from NLMCXR_dcm.tgz (option ``image_dir``),
        or NLMCXR_png/CXR1000_IM-0003-1001.png ...    PNGs from NLMCXR_png.tgz, or images/ or root itself
      nlmcxr_dicom_metadata.csv.gz                    optional: DICOM headers (option ``metadata``)
      nlmcxr_tsne_pa.csv.gz                           optional: t-SNE-derived views (option ``tsne_views``)

torchxrayvision ships the reports and both CSVs in its ``data`` folder, so a copy of its
``NLMCXR_reports.tgz`` (or ``reports=<path>``) next to the images is enough.

Each report (``<uId id="CXR1000">``) lists its images (``<parentImage id="CXR1000_IM-0003-1001">``) and
MeSH major terms such as ``Opacity/lung/upper lobe/right``. The term before the first ``/`` is mapped to
the vocabulary (:mod:`cxrkit.data.labels`), with a few qualified terms (``Thickening/pleura`` -> Pleural
Thickening); unmapped terms are dropped and counted in the log. "No Finding" is 1 for reports indexed
``normal`` with no mapped finding. Reports indexed ``No Indexing`` are dropped. The labels in
:data:`ANNOTATED` are known for every image; the rest are unknown (NaN).

Reports are de-identified: a patient with several reports cannot be linked, so the report is the patient
(``openi:CXR1000``) and the study. View comes from the DICOM ``View Position`` (or the t-SNE view where
``tsne_views`` has one), age from the DICOM study and birth dates; sex is not released. No official split.
"""

from __future__ import annotations

import posixpath
import tarfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

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
    normalise_view,
    read_table,
    require_columns,
)
from cxrkit.data.manifest import Manifest

SOURCE = "openi"
REPORT_PATTERNS = ("NLMCXR_reports.tgz", "NLMCXR_reports.tar.gz", "ecgen-radiology")
METADATA_PATTERNS = ("nlmcxr_dicom_metadata.csv", "nlmcxr_dicom_metadata.csv.gz")
IMAGE_DIRS = ("NLMCXR_dcm", "NLMCXR_png", "images")
NORMAL = "normal"
NO_INDEXING = "no indexing"

#: MeSH terms whose meaning depends on their first qualifier.
QUALIFIED_TERMS: dict[tuple[str, str], str] = {
    ("thickening", "pleura"): "Pleural Thickening",
    ("density", "lung"): "Lung Opacity",
    ("cardiac shadow", "enlarged"): "Cardiomegaly",
    ("costophrenic angle", "blunted"): "Effusion",
}

#: Vocabulary labels the OpenI MeSH indexing covers (all others are unknown for OpenI).
ANNOTATED: tuple[str, ...] = (
    *vocab.NIH_FINDINGS,
    "Lung Opacity",
    "Fracture",
    "Tube",
    "Granuloma",
    "Calcification",
    "Scoliosis",
    vocab.NO_FINDING,
)


@dataclass(frozen=True)
class Report:
    uid: str
    terms: frozenset[str]  # MeSH major terms, lower-case, qualifiers joined by "/"
    image_ids: tuple[str, ...]


@register("openi")
def openi(
    root: str,
    *,
    reports: str | None = None,
    metadata: str | None = None,
    tsne_views: str | None = None,
    image_dir: str | None = None,
    require_images: bool = True,
) -> Manifest:
    """Read OpenI at ``root`` (see the module docstring for the layout and options)."""
    location = Location.of(root)
    location.require_dir("OpenI")
    report_list = list(_read_reports(location, reports))
    indexed = [r for r in report_list if NO_INDEXING not in r.terms]
    if len(indexed) < len(report_list):
        log.info("openi: dropped %d reports without MeSH indexing", len(report_list) - len(indexed))

    rows = pd.DataFrame(
        [(r.uid, image_id, r.terms) for r in indexed for image_id in r.image_ids],
        columns=["uid", "imageid", "terms"],
    )
    if rows.empty:
        raise ValueError(f"openi: no report with images found in {reports or location.url(location.root)}")
    folder = _image_folder(location, image_dir)
    listed = _listed_images(location, folder)
    header = _dicom_metadata(location, metadata, rows["imageid"])
    meta = pd.DataFrame(
        {
            "path": rows["imageid"]
            .map(listed)
            .fillna(
                rows["imageid"].map(
                    lambda i: location.url(posixpath.join(folder, f"{i.removeprefix('CXR')}.dcm"))
                )
            ),
            "patient_id": SOURCE + ":" + rows["uid"],
            "study_id": rows["uid"],
            "view": _views(location, header, tsne_views, rows["imageid"]),
            "sex": "",
            "age": header["age"].to_numpy(),
            "split": "",
            "source": SOURCE,
        }
    )
    meta = keep_with_images(meta, contained(rows["imageid"], listed), require_images, SOURCE)
    labels = vocab.order(ANNOTATED)
    targets = _targets(rows.loc[meta.index, "terms"], labels)
    manifest = make_manifest(meta, targets, labels)
    log.info("openi: %d images of %d reports", len(manifest), meta["patient_id"].nunique())
    return manifest


def _read_reports(location: Location, reports: str | None) -> Iterator[Report]:
    fs, path = (
        location.resolve(reports)
        if reports
        else (location.fs, location.find_one(REPORT_PATTERNS, "OpenI reports", "reports"))
    )
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".xml"))
        if not files:
            raise FileNotFoundError(f"OpenI reports folder {path} holds no .xml report")
        for file in files:
            with fs.open(file, "rb") as handle:
                yield _parse_report(handle, file)
        return
    if not fs.isfile(path):
        raise FileNotFoundError(f"OpenI reports not found: {path}")
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                yield _parse_report(archive.extractfile(member), f"{path}:{member.name}")


def _parse_report(handle, name: str) -> Report:
    try:
        root = ElementTree.parse(handle).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"OpenI report {name} is not valid XML: {error}") from error
    uid = root.find("uId")
    if uid is None:
        raise ValueError(f"OpenI report {name} has no <uId>")
    terms = frozenset(
        "/".join(part.strip() for part in node.text.lower().split("/"))
        for node in root.findall(".//MeSH/major")
        if node.text
    )
    images = tuple(node.attrib["id"] for node in root.findall(".//parentImage"))
    return Report(uid.attrib["id"], terms, images)


def map_term(term: str) -> str | None:
    """Canonical label of one MeSH major term (``opacity/lung/upper lobe``), or None when unmapped."""
    parts = term.split("/")
    if len(parts) > 1 and (parts[0], parts[1]) in QUALIFIED_TERMS:
        return QUALIFIED_TERMS[parts[0], parts[1]]
    return vocab.canonical(parts[0])


def _targets(terms: pd.Series, labels: list[str]) -> np.ndarray:
    mapped: dict[frozenset[str], frozenset[str]] = {}
    unmapped: Counter[str] = Counter()
    for report_terms, count in terms.value_counts().items():
        findings = {term: map_term(term) for term in report_terms}
        mapped[report_terms] = frozenset(
            label for label in findings.values() if label not in (None, vocab.NO_FINDING)
        )
        unmapped.update({term.split("/")[0]: count for term, label in findings.items() if label is None})
    if unmapped:
        top = ", ".join(f"{term} ({count})" for term, count in unmapped.most_common(8))
        log.info(
            "openi: dropped unmapped MeSH terms of %d kinds, most frequent (images): %s", len(unmapped), top
        )
    targets = encode_rows([mapped[t] for t in terms], ANNOTATED, labels)
    normal = [any(term.split("/")[0] == NORMAL for term in t) and not mapped[t] for t in terms]
    targets[:, labels.index(vocab.NO_FINDING)] = np.asarray(normal, dtype=np.float32)
    return targets


def _image_folder(location: Location, image_dir: str | None) -> str:
    if image_dir:
        fs, folder = location.resolve(image_dir)
        if not fs.isdir(folder):
            raise FileNotFoundError(f"OpenI image folder not found: {folder}")
        return folder
    for name in IMAGE_DIRS:
        if location.fs.isdir(location.join(name)):
            return location.join(name)
    return location.root


def _listed_images(location: Location, folder: str) -> dict[str, str]:
    """Image id (``CXR1000_IM-0003-1001``) -> path; DICOM preferred over PNG when both exist."""
    listed: dict[str, str] = {}
    for file in sorted(location.list_files(folder, {".png", ".dcm"}), key=lambda f: f.endswith(".dcm")):
        stem = posixpath.splitext(posixpath.basename(file))[0]
        listed[stem if stem.startswith("CXR") else f"CXR{stem}"] = location.url(file)
    return listed


def _dicom_metadata(location: Location, metadata: str | None, image_ids: pd.Series) -> pd.DataFrame:
    """Per image: DICOM ``View Position`` and age (study date - birth date), empty when no metadata file."""
    if metadata:
        fs, path = location.resolve(metadata)
    else:
        found = [p for pattern in METADATA_PATTERNS for p in location.fs.glob(location.join(pattern))]
        if not found:
            log.info("openi: no %s in root; views and ages left unknown", METADATA_PATTERNS[-1])
            return pd.DataFrame({"view": "", "age": np.nan}, index=image_ids.index)
        fs, path = location.fs, found[0]
    columns = ("imageid", "View Position", "Patient's Birth Date", "Study Date")
    table = read_table(fs, path, "OpenI DICOM metadata", usecols=lambda c: c in columns, dtype=str)
    require_columns(table, columns, f"OpenI DICOM metadata {path}")
    table = table.drop_duplicates("imageid").set_index("imageid").reindex(image_ids.to_numpy())
    birth = pd.to_datetime(table["Patient's Birth Date"].str[:8], format="%Y%m%d", errors="coerce")
    study = pd.to_datetime(table["Study Date"].str[:8], format="%Y%m%d", errors="coerce")
    age = ((study - birth).dt.days / 365.25).where(lambda a: (a >= 0) & (a < 130))
    return pd.DataFrame(
        {"view": map_unique(table["View Position"], normalise_view).to_numpy(), "age": age.to_numpy()},
        index=image_ids.index,
    )


def _views(
    location: Location, header: pd.DataFrame, tsne_views: str | None, image_ids: pd.Series
) -> pd.Series:
    if not tsne_views:
        return header["view"]
    fs, path = location.resolve(tsne_views)
    table = read_table(fs, path, "OpenI t-SNE view file", dtype=str)
    require_columns(table, ("imageid", "tsne-view"), f"OpenI t-SNE view file {path}")
    views = table.drop_duplicates("imageid").set_index("imageid")["tsne-view"].map(normalise_view)
    tsne = pd.Series(image_ids.map(views).to_numpy(), index=image_ids.index)
    return tsne.fillna(header["view"])
