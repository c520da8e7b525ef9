"""The data description report: counts, leakage check, breakdowns and the written page."""

from __future__ import annotations

import base64
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrkit.data import describe as eda
from cxrkit.data.config import AugmentConfig
from cxrkit.data.manifest import Manifest, from_records

NAN = math.nan
LABELS = ["Atelectasis", "Effusion", "Pneumothorax", "No Finding"]
NIH_LABELS = ["Cardiomegaly", "Effusion", "Infiltration", "No Finding"]


def _record(i: int, split: str, targets: list[float], **meta) -> dict:
    return {
        "path": f"/data/img{i}.png",
        "patient_id": meta.pop("patient_id", f"nih:{i}"),
        "view": meta.pop("view", "PA"),
        "sex": meta.pop("sex", "M"),
        "age": meta.pop("age", 40 + i),
        "split": split,
        "source": meta.pop("source", "nih"),
        "targets": targets,
        **meta,
    }


@pytest.fixture
def manifest() -> Manifest:
    """8 images; padchest rows never annotate Pneumothorax (NaN); patient nih:1 is in train and test."""
    records = [
        _record(0, "train", [1, 1, 0, 0]),
        _record(1, "train", [1, 0, 0, 0], view="AP", sex="F"),
        _record(2, "train", [0, 0, 0, 1], view="", sex="", age=None),
        _record(3, "train", [1, 0, NAN, 0], source="padchest", patient_id="padchest:3"),
        _record(4, "val", [0, 1, NAN, 0], source="padchest", patient_id="padchest:4", age=412),
        _record(5, "val", [0, 0, 1, 0], view="LAT"),
        _record(6, "test", [0, 0, 0, 1]),
        _record(7, "test", [1, 0, 0, 0], patient_id="nih:1"),
    ]
    return from_records(records, LABELS)


def _counts(table: pd.DataFrame, split: str, label: str) -> tuple[int, int, int]:
    row = table[(table["split"] == split) & (table["label"] == label)].iloc[0]
    return int(row["positive"]), int(row["negative"]), int(row["unknown"])


def test_label_counts_keep_unknown_apart_from_negative(manifest: Manifest) -> None:
    counts = eda.label_counts(manifest)
    assert list(counts["split"].unique()) == ["train", "val", "test"]
    assert _counts(counts, "train", "Atelectasis") == (3, 1, 0)
    assert _counts(counts, "train", "Pneumothorax") == (0, 3, 1)
    assert _counts(counts, "val", "Pneumothorax") == (1, 0, 1)
    prevalence = counts.set_index(["split", "label"])["prevalence"]
    assert prevalence["val", "Pneumothorax"] == 1.0  # among annotated images only
    assert prevalence["train", "Atelectasis"] == 0.75


def test_prevalence_is_nan_when_nothing_is_annotated() -> None:
    manifest = from_records([_record(0, "train", [NAN, 1])], ["Hernia", "Effusion"])
    counts = eda.label_counts(manifest)
    assert _counts(counts, "train", "Hernia") == (0, 0, 1)
    assert np.isnan(counts.loc[counts["label"] == "Hernia", "prevalence"].iloc[0])


def test_cooccurrence_counts_positive_pairs_only(manifest: Manifest) -> None:
    matrix = eda.cooccurrence(manifest, ["Atelectasis", "Effusion", "Pneumothorax"])
    assert matrix.loc["Atelectasis", "Atelectasis"] == 4
    assert matrix.loc["Atelectasis", "Effusion"] == matrix.loc["Effusion", "Atelectasis"] == 1
    assert matrix.loc["Pneumothorax", "Pneumothorax"] == 1  # NaN is not positive
    assert matrix.loc["Pneumothorax", "Atelectasis"] == 0


def test_patient_overlap_names_the_shared_patients(manifest: Manifest) -> None:
    overlap = eda.patient_overlap(manifest)
    assert overlap.to_dict("records") == [
        {"splits": "train & test", "patients": 1, "images": 2, "example_ids": "nih:1"}
    ]
    assert eda.leaking_patients(manifest) == ["nih:1"]


def test_patient_overlap_ignores_unassigned_and_missing_ids() -> None:
    manifest = from_records(
        [
            _record(0, "train", [1], patient_id=""),
            _record(1, "test", [0], patient_id=""),
            _record(2, "", [0], patient_id="nih:5"),
            _record(3, "test", [0], patient_id="nih:5"),
        ],
        ["Mass"],
    )
    assert eda.patient_overlap(manifest).empty
    assert eda.leaking_patients(manifest) == []


def test_patient_overlap_lists_at_most_five_ids() -> None:
    records = [
        _record(i, split, [0], patient_id=f"p{i % 7}") for i, split in enumerate(["train"] * 7 + ["val"] * 7)
    ]
    overlap = eda.patient_overlap(from_records(records, ["Mass"]))
    assert overlap["patients"].tolist() == [7]
    assert overlap["example_ids"].iloc[0] == "p0, p1, p2, p3, p4, …"


def test_breakdown_orders_categories_and_names_unknown(manifest: Manifest) -> None:
    views = eda.breakdown(manifest, "view", ("PA", "AP", "LAT", "OTHER"))
    assert list(views.columns) == ["PA", "AP", "LAT", "unknown"]
    assert list(views.index) == ["train", "val", "test"]
    assert views.loc["train"].tolist() == [2, 1, 0, 1]
    assert views.to_numpy().sum() == len(manifest)


def test_age_summary_counts_missing_and_implausible(manifest: Manifest) -> None:
    ages = eda.age_summary(manifest).set_index("split")
    assert ages.loc["train", ["images", "known", "missing"]].tolist() == [4, 3, 1]
    assert ages.loc["val", "implausible"] == 1
    assert ages.loc["test", "max"] == 47


def test_summary_numbers(manifest: Manifest) -> None:
    summary = dict(eda.summary(manifest).itertuples(index=False))
    assert summary["images"] == 8
    assert summary["patients"] == 7
    assert summary["images per patient (max)"] == 2
    assert summary["sources"] == "nih, padchest"
    assert summary["images in val"] == 2
    sources = eda.sources(manifest).set_index("source")
    assert sources.loc["padchest", "annotated labels"] == "3 / 4"


class _Tables(HTMLParser):
    """Collect every <table> of a page as {caption: list of rows of cell texts}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._caption: str | None = None
        self._rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._caption, self._rows = "", []
        elif tag == "caption":
            self._in_caption = True
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self.tables[self._caption or f"table{len(self.tables)}"] = self._rows
        elif tag == "caption":
            self._in_caption = False
        elif tag in ("td", "th"):
            self._rows[-1].append("".join(self._cell or []))
            self._cell = None

    def handle_data(self, data):
        if self._in_caption:
            self._caption += data
        elif self._cell is not None:
            self._cell.append(data)


def _tables(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def _fake_images(position: int) -> np.ndarray:
    return np.full((48, 40), 20 * position, dtype=np.uint8)


def test_describe_writes_report_with_leak_unknowns_and_images(manifest: Manifest, tmp_path: Path) -> None:
    path = eda.describe(manifest, tmp_path / "eda", images=_fake_images, n_samples=4)
    page = path.read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 6  # labels, co-occurrence, view, sex, age, samples
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    for name in (
        "label_counts",
        "cooccurrence",
        "view_per_split",
        "sex_per_split",
        "age_histogram",
        "samples",
    ):
        assert (tmp_path / "eda" / f"{name}.png").stat().st_size > 1000

    assert 'class="callout error"' in page and "1 patients appear in more than one split" in page
    tables = _tables(page)
    assert tables["Shared patients per pair of splits"][1] == ["train & test", "1", "2", "nih:1"]
    train = {row[0]: row[1:] for row in tables["train: images per label"][1:]}
    assert train["Pneumothorax"] == ["0", "3", "1", "0.0%"]  # positive, negative, unknown, prevalence
    val = {row[0]: row[1:] for row in tables["val: images per label"][1:]}
    assert val["Pneumothorax"] == ["1", "0", "1", "100.0%"]
    assert "1 image(s) have an implausible age" in page
    assert "No augmentation config given." in page
    assert "Unreadable files" not in page

    tidy = pd.read_csv(tmp_path / "eda" / "label_counts.csv")
    assert tidy.loc[(tidy["split"] == "train") & (tidy["label"] == "Pneumothorax"), "unknown"].item() == 1
    assert (tmp_path / "eda" / "report.md").read_text().count("| Pneumothorax |") == 3


def test_describe_reports_ok_when_splits_are_patient_disjoint(manifest: Manifest, tmp_path: Path) -> None:
    clean = manifest.subset(manifest.frame["patient_id"] != "nih:1")
    page = eda.describe(clean, tmp_path, images=_fake_images, n_samples=2).read_text()
    assert (
        'class="callout ok"' in page
        and "No patient appears in more than one split (train / val / test)" in page
    )
    assert "Shared patients" not in page


def test_describe_escapes_metadata_and_notes_disabled_augmentation(tmp_path: Path) -> None:
    manifest = from_records([_record(0, "train", [1], source="<img src=x onerror=alert(1)>")], ["Mass"])
    disabled = AugmentConfig(enabled=False)
    page = eda.describe(manifest, tmp_path, images=_fake_images, augment_cfg=disabled).read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "Augmentation is disabled" in page


def test_describe_lists_failures_and_skips_unloadable_samples(manifest: Manifest, tmp_path: Path) -> None:
    def loader(position: int) -> np.ndarray:
        if position == 2:
            raise OSError("truncated file")
        return _fake_images(position)

    failures = pd.DataFrame({"path": ["/data/broken.dcm"], "reason": ["not a DICOM file"]})
    page = eda.describe(manifest, tmp_path, images=loader, n_samples=8, failures=failures).read_text()
    assert "Unreadable files" in page and "2 files could not be read" in page
    table = next(rows for rows in _tables(page).values() if rows[0] == ["path", "reason"])
    assert table[1:] == [
        ["/data/broken.dcm", "not a DICOM file"],
        ["/data/img2.png", "OSError: truncated file"],
    ]
    assert "7 images drawn at random" in page
    with pytest.raises(ValueError, match="missing column"):
        eda.describe(manifest, tmp_path, images=_fake_images, failures=pd.DataFrame({"path": ["x"]}))


def test_describe_refuses_an_empty_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty manifest"):
        eda.describe(from_records([], ["Mass"]), tmp_path, images=_fake_images)


def test_describe_without_splits_or_labels_positive_says_so(tmp_path: Path) -> None:
    manifest = from_records([_record(i, "", [0, NAN]) for i in range(3)], ["Mass", "Hernia"])
    page = eda.describe(manifest, tmp_path, images=_fake_images).read_text()
    assert "Only 0 split assigned" in page
    assert "unassigned: no positive image for Mass" in page
    assert "unassigned: Hernia never annotated" in page
    assert "Fewer than two findings have a positive image" in page


def test_describe_augmented_grid(manifest: Manifest, tmp_path: Path) -> None:
    config = AugmentConfig(crop_size=56)
    path = eda.describe(
        manifest, tmp_path, images=_fake_images, augment_cfg=config, image_size=64, n_samples=3
    )
    assert (tmp_path / "augmented.png").stat().st_size > 1000
    assert "output 56²" in path.read_text()


def test_augment_images_shapes_and_determinism() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(2)]
    config = AugmentConfig(crop_size=48)
    first = eda.augment_images(images, config, n_variants=3, seed=1)
    again = eda.augment_images(images, config, n_variants=3, seed=1)
    assert len(first) == 2 and all(len(variants) == 3 for variants in first)
    assert all(v.shape == (48, 48) and v.dtype == np.uint8 for variants in first for v in variants)
    assert all(
        np.array_equal(a, b) for fa, fb in zip(first, again, strict=True) for a, b in zip(fa, fb, strict=True)
    )
    assert not np.array_equal(first[0][0], first[0][1])  # the draws differ


@pytest.fixture
def nih_manifest(nih_sample: Path, tmp_path: Path) -> Manifest:
    """8 real NIH images (6 train, 2 test) and one row whose file does not exist."""
    entries = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv").head(8)
    records = []
    for i, entry in enumerate(entries.to_dict("records")):
        findings = set(entry["Finding Labels"].split("|"))
        records.append(
            {
                "path": str(nih_sample / "images" / entry["Image Index"]),
                "patient_id": f"nih:{entry['Patient ID']}",
                "view": entry["View Position"],
                "sex": entry["Patient Gender"],
                "age": entry["Patient Age"],
                "split": "test" if i >= 6 else "train",
                "source": "nih",
                "targets": [float(label in findings) for label in NIH_LABELS],
            }
        )
    records.append({**records[0], "path": str(tmp_path / "missing.png"), "patient_id": "nih:missing"})
    return from_records(records, NIH_LABELS)


@pytest.mark.shared_data
def test_describe_real_nih_images(nih_manifest: Manifest, tmp_path: Path) -> None:
    path = eda.describe(nih_manifest, tmp_path / "eda", n_samples=len(nih_manifest))  # decodes the originals
    page = path.read_text()
    assert "No patient appears in more than one split" in page
    assert "9 images from nih" in page
    failures = next(rows for rows in _tables(page).values() if rows[0] == ["path", "reason"])
    assert failures[1][0].endswith("missing.png")
    assert "8 images drawn at random" in page
    grid = (tmp_path / "eda" / "samples.png").read_bytes()
    assert grid.startswith(b"\x89PNG") and len(grid) > 50_000  # real radiographs, not blank tiles


@pytest.mark.shared_data
def test_describe_cache_reads_samples_and_failures_from_the_cache(
    nih_manifest: Manifest, tmp_path: Path
) -> None:
    from cxrkit.data.cache import prepare_cache

    prepare_cache(nih_manifest, tmp_path / "cache", image_size=64, shard_size=4, workers=1, progress=False)
    path = eda.describe_cache(tmp_path / "cache", tmp_path / "eda", AugmentConfig(crop_size=56), n_samples=4)
    page = path.read_text()
    assert "8 images from nih" in page  # the cached rows: the missing file is not in the cache
    failures = next(rows for rows in _tables(page).values() if rows[0] == ["path", "reason"])
    assert len(failures) == 2 and failures[1][0].endswith("missing.png")
    assert "4 images drawn at random" in page
    assert (tmp_path / "eda" / "samples.png").stat().st_size > 10_000
    assert "cache size (64²)" in page and "output 56²" in page  # augmented from the cached 64² images
