"""Dataset adapters on real label files (NIH, PadChest, OpenI, CheXpert), real images and small layouts."""

from __future__ import annotations

import importlib.util
import io
import logging
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrkit.data import labels as vocab
from cxrkit.data.adapters import available, detect, get, load_source
from cxrkit.data.adapters._common import parse_age
from cxrkit.data.adapters.chexpert import LABEL_COLUMNS as CHEXPERT_COLUMNS
from cxrkit.data.adapters.openi import map_term
from cxrkit.data.config import SourceConfig
from cxrkit.data.manifest import META_COLUMNS, VIEWS
from cxrkit.explain.boxes import read_nih_boxes

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"


@pytest.fixture(scope="session")
def xrv_data() -> Path:
    """torchxrayvision's bundled label files (found without importing the package, which loads torch)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        pytest.skip("torchxrayvision is not installed (its data folder holds the real label files)")
    return Path(spec.origin).parent / "data"


@pytest.fixture(scope="module")
def nih_full(nih_sample: Path, xrv_data: Path):
    label_file = xrv_data / "Data_Entry_2017_v2020.csv.gz"
    return get("nih")(str(nih_sample), label_file=str(label_file), require_images=False)


def _check_manifest(manifest, source: str) -> None:
    frame = manifest.frame
    assert list(frame.columns) == [*META_COLUMNS, *manifest.labels]
    assert frame["patient_id"].str.startswith(f"{source}:").all()
    assert set(frame["view"]) <= VIEWS
    assert set(frame["sex"]) <= {"M", "F", ""}
    assert (frame["source"] == source).all()
    assert frame["age"].dtype == float
    for label in manifest.labels:
        assert frame[label].dtype == np.float32


def test_registry_lists_every_adapter():
    assert available() == ["chexpert", "folder", "huggingface", "nih", "openi", "padchest", "table"]


# --- NIH ---------------------------------------------------------------------------------------------------


def test_nih_full_label_file_official_split(nih_full):
    frame = nih_full.frame
    _check_manifest(nih_full, "nih")
    assert len(frame) == 112_120
    assert frame["split"].value_counts().to_dict() == {"train": 86_524, "test": 25_596}
    splits_per_patient = frame.groupby("patient_id")["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert frame["patient_id"].nunique() == 30_805
    assert nih_full.labels == [*vocab.NIH_FINDINGS, vocab.NO_FINDING]
    assert not np.isnan(nih_full.targets).any()
    findings = frame[list(vocab.NIH_FINDINGS)].to_numpy()
    np.testing.assert_array_equal(
        frame[vocab.NO_FINDING].to_numpy(), (findings.sum(axis=1) == 0).astype(np.float32)
    )
    assert set(frame["view"]) == {"PA", "AP"}


def test_nih_row_values_match_label_file(nih_full):
    row = nih_full.frame.set_index("study_id").loc["00000001_001"]
    assert row["patient_id"] == "nih:1"
    assert (row["sex"], row["age"], row["view"], row["split"]) == ("M", 58.0, "PA", "train")
    positives = {label for label in nih_full.labels if row[label] == 1}
    assert positives == {"Cardiomegaly", "Emphysema"}


def test_nih_sample_with_images(nih_sample: Path):
    manifest = get("nih")(str(nih_sample))
    frame = manifest.frame
    table = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv")
    assert len(frame) == len(table) == 205
    assert all(Path(p).is_file() for p in frame["path"])
    assert frame["patient_id"].nunique() == 205
    expected = table["Finding Labels"].str.split("|").explode().value_counts()
    assert frame[vocab.NO_FINDING].sum() == expected["No Finding"]
    assert frame["Infiltration"].sum() == expected["Infiltration"]
    test_names = set((nih_sample / "official_split" / "test_list.txt").read_text().split())
    assert (frame["split"] == "test").sum() == table["Image Index"].isin(test_names).sum()


def test_nih_missing_images_dropped_and_logged(nih_sample: Path, tmp_path: Path, caplog):
    shutil.copy(nih_sample / "Data_Entry_2017_subset.csv", tmp_path)
    names = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv")["Image Index"].tolist()
    (tmp_path / "images_003" / "images").mkdir(parents=True)
    for name in names[:3]:
        (tmp_path / "images_003" / "images" / name).symlink_to(nih_sample / "images" / name)
    with caplog.at_level(logging.WARNING):
        kept = get("nih")(str(tmp_path))
    assert len(kept) == 3
    assert "dropped 202 of 205" in caplog.text
    assert set(kept.frame["path"]) == {str(tmp_path / "images_003" / "images" / n) for n in names[:3]}
    assert (kept.frame["split"] == "").all()  # no split lists in this root
    assert len(get("nih")(str(tmp_path), require_images=False)) == 205


def test_nih_clear_errors(nih_sample: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="NIH ChestX-ray14 folder not found"):
        get("nih")(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="label_file"):
        get("nih")(str(tmp_path))
    table = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv").drop(columns=["View Position"])
    table.to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    with pytest.raises(ValueError, match="'View Position'"):
        get("nih")(str(tmp_path), require_images=False)
    (tmp_path / "test_list.txt").write_text("00000002_000.png")
    shutil.copy(nih_sample / "Data_Entry_2017_subset.csv", tmp_path / "Data_Entry_2017.csv")
    with pytest.raises(FileNotFoundError, match=r"train_val_list\.txt"):
        get("nih")(str(tmp_path), require_images=False)


def test_nih_reads_file_urls(nih_sample: Path):
    manifest = get("nih")(f"file://{nih_sample}")
    assert len(manifest) == 205
    assert all(Path(p).is_file() for p in manifest.frame["path"])


def test_nih_bbox_spelling_infiltrate_maps_to_infiltration(xrv_data: Path, nih_sample: Path):
    boxes = read_nih_boxes(xrv_data / "BBox_List_2017.csv.gz")  # the one NIH box reader
    assert len(boxes) == 984
    assert set(boxes["finding"]) <= set(vocab.NIH_FINDINGS)
    raw = pd.read_csv(xrv_data / "BBox_List_2017.csv.gz")
    infiltrate = (raw["Finding Label"] == "Infiltrate").to_numpy()
    assert infiltrate.sum() == 123
    assert (boxes.loc[infiltrate, "finding"] == "Infiltration").all()
    assert vocab.canonical("Infiltrate") == "Infiltration"
    sample = read_nih_boxes(nih_sample / "BBox_List_2017_subset.csv")
    assert len(sample) == 12
    assert ((sample["x0"] >= 0) & (sample["x1"] <= 1024)).all()


@pytest.mark.parametrize(
    ("value", "years"),
    [("058Y", 58.0), (61, 61.0), ("006M", 0.5), ("", math.nan), ("413", math.nan), (None, math.nan)],
)
def test_parse_age(value, years):
    result = parse_age(value)
    assert (math.isnan(result) and math.isnan(years)) or result == pytest.approx(years)


# --- PadChest ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padchest_small(xrv_data: Path, tmp_path_factory) -> Path:
    """The first 3,000 rows of the real PadChest label file, as a release folder without images."""
    root = tmp_path_factory.mktemp("padchest")
    pd.read_csv(xrv_data / PADCHEST_CSV, nrows=3000, dtype=str).to_csv(root / PADCHEST_CSV, index=False)
    return root


def test_padchest_full_label_file(xrv_data: Path, tmp_path: Path, caplog):
    with caplog.at_level(logging.INFO):
        manifest = get("padchest")(
            str(tmp_path), label_file=str(xrv_data / PADCHEST_CSV), require_images=False
        )
    _check_manifest(manifest, "padchest")
    frame = manifest.frame.set_index(manifest.frame["path"].str.rsplit("/", n=1).str[-1])
    raw = pd.read_csv(xrv_data / PADCHEST_CSV, usecols=["ImageID", "Labels", "Projection"])
    excluded = raw["Labels"].str.contains(r"'\s*exclude'", na=False) | (raw["Projection"] == "EXCLUDE")
    assert len(frame) == (raw["Labels"].notna() & ~excluded).sum() - 21  # 21 known broken images
    assert "unmapped label mentions" in caplog.text and "copd signs" in caplog.text

    normal = frame.loc["20536686640136348236148679891455886468_k6ga29.png"]
    assert (normal["view"], normal["sex"], normal["age"], normal[vocab.NO_FINDING]) == ("PA", "F", 84.0, 1.0)
    fibrosis = frame.loc["135803415504923515076821959678074435083_fzis7d.png"]
    positives = {label for label in manifest.labels if fibrosis[label] == 1}
    assert positives == {"Fibrosis", "Infiltration"}  # pulmonary fibrosis, ground glass pattern
    assert (fibrosis["view"], fibrosis["sex"], fibrosis["age"]) == ("LAT", "M", 86.0)

    findings = frame[[label for label in manifest.labels if label != vocab.NO_FINDING]].to_numpy()
    assert not np.isnan(findings).any()
    assert (findings[frame[vocab.NO_FINDING].to_numpy() == 1].sum(axis=1) == 0).all()
    ap_horizontal = raw.loc[raw["Projection"] == "AP_horizontal", "ImageID"]
    assert (frame.loc[frame.index.isin(ap_horizontal), "view"] == "AP").all()


def test_padchest_unmapped_only_is_not_no_finding(padchest_small: Path):
    frame = get("padchest")(str(padchest_small), require_images=False).frame
    raw = pd.read_csv(padchest_small / PADCHEST_CSV, dtype=str).dropna(subset=["Labels"])
    only_copd = raw.loc[raw["Labels"] == "['COPD signs']", "ImageID"]
    assert len(only_copd) > 0
    rows = frame[frame["path"].str.rsplit("/", n=1).str[-1].isin(only_copd)]
    assert (rows[vocab.NO_FINDING] == 0).all()
    assert (rows[[label for label in frame.columns[8:] if label != vocab.NO_FINDING]] == 0).all().all()


def test_padchest_image_layout_and_options(padchest_small: Path, tmp_path: Path):
    raw = pd.read_csv(padchest_small / PADCHEST_CSV, dtype=str)
    root = tmp_path / "release"
    root.mkdir()
    (root / PADCHEST_CSV).symlink_to(padchest_small / PADCHEST_CSV)
    chosen = raw.dropna(subset=["Labels"]).head(4)
    for image_id, folder in zip(chosen["ImageID"], chosen["ImageDir"], strict=True):
        (root / folder).mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(root / folder / image_id)
    manifest = get("padchest")(str(root))
    assert sorted(Path(p).name for p in manifest.frame["path"]) == sorted(chosen["ImageID"])
    assert all(Path(p).is_file() for p in manifest.frame["path"])
    kept = len(get("padchest")(str(padchest_small), require_images=False))
    with_excluded = len(get("padchest")(str(padchest_small), require_images=False, drop_excluded=False))
    assert with_excluded > kept


# --- OpenI -------------------------------------------------------------------------------------------------


def test_openi_real_reports(xrv_data: Path, tmp_path: Path):
    manifest = get("openi")(
        str(tmp_path),
        reports=str(xrv_data / "NLMCXR_reports.tgz"),
        metadata=str(xrv_data / "nlmcxr_dicom_metadata.csv.gz"),
        require_images=False,
    )
    _check_manifest(manifest, "openi")
    frame = manifest.frame
    assert 7_000 < len(frame) <= 7_470
    assert frame["path"].str.endswith(".dcm").all()
    image = frame.set_index(frame["path"].map(lambda p: Path(p).stem))
    cxr1000 = image.loc["1000_IM-0003-2001"]
    assert cxr1000["patient_id"] == "openi:CXR1000" and cxr1000["view"] == "PA"
    assert {label for label in manifest.labels if cxr1000[label] == 1} == {"Lung Opacity", "Atelectasis"}
    assert image.loc["10_IM-0002-1001", "Granuloma"] == 1  # Calcified Granuloma/lung/upper lobe/right
    normal = image.loc["1_1_IM-0001-3001"]
    assert normal[vocab.NO_FINDING] == 1
    assert normal[[label for label in manifest.labels if label != vocab.NO_FINDING]].sum() == 0
    assert image.loc["2_IM-0652-1001", "Cardiomegaly"] == 1
    assert frame["age"].between(0, 130).mean() > 0.9


def test_openi_mesh_terms():
    assert map_term("thickening/pleura/right") == "Pleural Thickening"
    assert map_term("thickening/bronchi") is None
    assert map_term("pulmonary atelectasis/base/left") == "Atelectasis"
    assert map_term("fractures, bone/ribs/left") == "Fracture"


def test_openi_folder_layout_with_dicoms(xrv_data: Path, shared_data: Path, tmp_path: Path):
    reports = tmp_path / "ecgen-radiology"
    reports.mkdir()
    with tarfile.open(xrv_data / "NLMCXR_reports.tgz") as archive:
        for name in ("1000.xml", "1.xml"):
            data = archive.extractfile(f"ecgen-radiology/{name}").read()
            (reports / name).write_bytes(data)
    (tmp_path / "NLMCXR_dcm").mkdir()
    dicom = tmp_path / "NLMCXR_dcm" / "1000_IM-0003-1001.dcm"
    dicom.symlink_to(shared_data / "dicom" / "siim_pneumothorax_sample.dcm")
    manifest = get("openi")(str(tmp_path))
    assert list(manifest.frame["path"]) == [str(dicom)]
    assert manifest.frame.loc[0, "view"] == ""  # no metadata file in root
    assert len(get("openi")(str(tmp_path), require_images=False)) == 5
    with pytest.raises(FileNotFoundError, match="reports"):
        get("openi")(str(tmp_path / "NLMCXR_dcm"))


# --- CheXpert ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chexpert_root(xrv_data: Path, tmp_path_factory) -> Path:
    """train.csv = real rows 0-299, valid.csv = real rows 300-339 moved to valid/ (other patients)."""
    root = tmp_path_factory.mktemp("chexpert")
    table = pd.read_csv(xrv_data / "chexpert_train.csv.gz", nrows=340, dtype={"AP/PA": str})
    train, valid = table.iloc[:300], table.iloc[300:].copy()
    valid = valid[
        ~valid["Path"].str.extract(r"(patient\d+)")[0].isin(train["Path"].str.extract(r"(patient\d+)")[0])
    ]
    valid["Path"] = valid["Path"].str.replace("/train/", "/valid/")
    train.to_csv(root / "train.csv", index=False)
    valid.to_csv(root / "valid.csv", index=False)
    return root


def test_chexpert_full_train_csv(xrv_data: Path, tmp_path: Path):
    manifest = get("chexpert")(
        str(tmp_path), train_csv=str(xrv_data / "chexpert_train.csv.gz"), require_images=False
    )
    _check_manifest(manifest, "chexpert")
    frame = manifest.frame
    assert len(frame) == 223_414
    assert frame["patient_id"].str.fullmatch(r"chexpert:patient\d{5}").all()
    assert (frame["split"] == "train").all()
    assert set(manifest.labels) == {vocab.canonical(c) for c in CHEXPERT_COLUMNS}
    assert "Effusion" in manifest.labels and not np.isnan(manifest.targets).any()
    assert frame.loc[0, "path"] == str(tmp_path / "train/patient00001/study1/view1_frontal.jpg")


@pytest.mark.parametrize(("policy", "expected"), [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan)])
def test_chexpert_uncertainty_policies(chexpert_root: Path, policy: str, expected: float):
    frame = get("chexpert")(str(chexpert_root), uncertain=policy, require_images=False).frame
    row = frame[frame["path"].str.endswith("patient00002/study2/view1_frontal.jpg")].iloc[0]
    assert row["Lung Opacity"] == 1 and row["Fracture"] == 1  # 1.0 in the CSV
    assert row["Pneumonia"] == 0 and row[vocab.NO_FINDING] == 0  # blank
    for label in ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Effusion"):  # -1.0 in the CSV
        assert row[label] == expected or (math.isnan(expected) and math.isnan(row[label]))
    assert (row["patient_id"], row["study_id"], row["sex"], row["age"], row["view"]) == (
        "chexpert:patient00002",
        "patient00002/study2",
        "F",
        87.0,
        "AP",
    )


def test_chexpert_valid_split_frontal_only_and_blanks(chexpert_root: Path):
    manifest = get("chexpert")(str(chexpert_root), require_images=False)
    frame = manifest.frame
    assert set(frame["split"]) == {"train", "val"}
    assert frame.loc[frame["split"] == "val", "path"].str.contains("/valid/").all()
    assert (frame["view"] == "LAT").any()
    frontal = get("chexpert")(str(chexpert_root), frontal_only=True, require_images=False).frame
    assert len(frontal) == (frame["view"] != "LAT").sum() and (frontal["view"] != "LAT").all()
    unknown = get("chexpert")(str(chexpert_root), blank_as_unknown=True, require_images=False)
    assert np.isnan(unknown.targets).mean() > 0.5  # most labels are blank in CheXpert
    assert np.isnan(manifest.targets).sum() == 0


def test_chexpert_images_and_errors(chexpert_root: Path, tmp_path: Path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    shutil.copy(chexpert_root / "train.csv", root)
    image = root / "train/patient00001/study1/view1_frontal.jpg"
    image.parent.mkdir(parents=True)
    Image.new("L", (8, 8)).save(image)
    assert list(get("chexpert")(str(root)).frame["path"]) == [str(image)]
    with pytest.raises(ValueError, match="uncertain"):
        get("chexpert")(str(root), uncertain="maybe")
    table = pd.read_csv(root / "train.csv")
    table.loc[3, "Edema"] = 2
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match="'Edema'"):
        get("chexpert")(str(root), require_images=False)
    with pytest.raises(FileNotFoundError, match="valid_csv"):
        get("chexpert")(str(root), valid_csv="other.csv")


# --- Folder ------------------------------------------------------------------------------------------------


def test_folder_pneumonia(pneumonia_root: Path):
    manifest = get("folder")(str(pneumonia_root))
    _check_manifest(manifest, "pneumonia")
    frame = manifest.frame
    assert len(frame) == 5_190 + 253  # Kermany layout: train/ and the shared sample of its test/
    assert manifest.labels == ["Pneumonia", vocab.NO_FINDING]
    assert frame[vocab.NO_FINDING].sum() == 1_340 + 89 and frame["Pneumonia"].sum() == 3_850 + 164
    assert (frame["Pneumonia"] + frame[vocab.NO_FINDING] == 1).all()
    assert frame["split"].value_counts().to_dict() == {"train": 5_190, "test": 253}
    train = frame[frame["split"] == "train"]
    assert train["patient_id"].str.fullmatch(r"pneumonia:(person\d+|(NORMAL\d+-)?IM-\d+)").all()
    by_file = train.set_index(train["path"].map(lambda p: Path(p).name))["patient_id"]
    assert (
        by_file["person1000_bacteria_2931.jpeg"]
        == by_file["person1000_virus_1681.jpeg"]
        == "pneumonia:person1000"
    )
    assert by_file["IM-0115-0001.jpeg"] == "pneumonia:IM-0115"
    assert train["patient_id"].nunique() < len(train)  # several images per patient exist
    # test/ numbers its patients apart from train/: train's person100 is not test's person100
    test_ids = frame.loc[frame["split"] == "test", "patient_id"]
    assert test_ids.str.fullmatch(r"pneumonia:test:(person\d+|(NORMAL\d+-)?IM-\d+)").all()
    assert "pneumonia:person100" in set(train["patient_id"]) and "pneumonia:test:person100" in set(test_ids)
    assert frame.groupby("patient_id")["split"].nunique().max() == 1
    shared = get("folder")(str(pneumonia_root), patient_scope="dataset").frame
    assert shared.groupby("patient_id")["split"].nunique().max() == 2  # one id space: ids collide
    split_folder = get("folder")(str(pneumonia_root / "train")).frame  # root is itself a split folder
    assert split_folder["patient_id"].equals(train["patient_id"].reset_index(drop=True))
    assert (split_folder["split"] == "train").all()
    labels = pd.read_csv(pneumonia_root / "labels.csv")
    assert labels["label"].value_counts().to_dict() == {"PNEUMONIA": 3_850 + 164, "NORMAL": 1_340 + 89}
    assert labels["file"].str.startswith("test/").sum() == 253


def test_folder_splits_custom_classes_and_regex(pneumonia_root: Path, tmp_path: Path):
    normal = sorted((pneumonia_root / "train" / "NORMAL").iterdir())[:2]
    sick = sorted((pneumonia_root / "train" / "PNEUMONIA").iterdir())[:2]
    layout = {
        "train/NORMAL": normal[:1],
        "train/COVID-19": sick[:1],
        "val/NORMAL": normal[1:],
        "test/COVID-19": sick[1:],
    }
    for folder, files in layout.items():
        (tmp_path / "ds" / folder).mkdir(parents=True)
        for file in files:
            (tmp_path / "ds" / folder / file.name).symlink_to(file)
    manifest = get("folder")(str(tmp_path / "ds"), name="covid")
    frame = manifest.frame
    assert manifest.labels == [vocab.NO_FINDING, "COVID-19"]
    assert sorted(frame["split"]) == ["test", "train", "train", "val"]
    assert frame["patient_id"].str.startswith("covid:").all()
    mapped = get("folder")(
        str(tmp_path / "ds"),
        class_labels={"COVID-19": "Pneumonia"},
        patient_regex=r"^(\w+?)_",
        patient_scope="dataset",
    )
    assert mapped.labels == ["Pneumonia", vocab.NO_FINDING]
    stems = {Path(p).stem for p in normal}
    assert set(mapped.frame["patient_id"]) >= {f"ds:{stem}" for stem in stems}  # regex does not match: stem
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        get("folder")(str(tmp_path / "ds" / "train" / "NORMAL"))
    with pytest.raises(ValueError, match="patient_scope"):
        get("folder")(str(tmp_path / "ds"), patient_scope="site")


# --- Hugging Face ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pneumonia_files(shared_data: Path) -> list[Path]:
    folder = shared_data / "pneumonia" / "train"
    return sorted((folder / "NORMAL").iterdir())[:3] + sorted((folder / "PNEUMONIA").iterdir())[:3]


def test_huggingface_save_to_disk_exports_png_once(pneumonia_files: list[Path], tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["NORMAL", "PNEUMONIA"])}
    )
    table = datasets.Dataset.from_dict(
        {"image": [str(p) for p in pneumonia_files], "label": [0, 0, 0, 1, 1, 1]}, features=features
    )
    datasets.DatasetDict(train=table.select(range(4)), validation=table.select(range(4, 6))).save_to_disk(
        str(tmp_path / "saved")
    )
    manifest = get("huggingface")(str(tmp_path / "saved"), name="kermany")
    _check_manifest(manifest, "kermany")
    frame = manifest.frame
    assert manifest.labels == ["Pneumonia", vocab.NO_FINDING]
    assert list(frame["split"]) == ["train"] * 4 + ["val"] * 2
    assert list(frame["Pneumonia"]) == [0, 0, 0, 1, 1, 1]
    assert list(frame["patient_id"]) == [
        f"kermany:{p.name.split('_')[0].rsplit('-', 1)[0]}" for p in pneumonia_files
    ]
    for exported, original in zip(frame["path"], pneumonia_files, strict=True):
        assert exported.startswith(str(tmp_path / "saved" / "_cxrkit_export")) and exported.endswith(".png")
        with Image.open(exported) as png, Image.open(original) as jpeg:
            np.testing.assert_array_equal(np.asarray(png), np.asarray(jpeg))
    modified = {p: Path(p).stat().st_mtime_ns for p in frame["path"]}
    again = get("huggingface")(str(tmp_path / "saved"), name="kermany")
    assert {p: Path(p).stat().st_mtime_ns for p in again.frame["path"]} == modified


def test_huggingface_imagefolder_keeps_original_files(pneumonia_files: list[Path], tmp_path: Path):
    pytest.importorskip("datasets")
    for split, files in (
        ("train", pneumonia_files[:2] + pneumonia_files[3:5]),
        ("test", pneumonia_files[5:]),
    ):
        for file in files:
            folder = tmp_path / "imf" / split / file.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, folder)
    manifest = get("huggingface")(str(tmp_path / "imf"), cache_dir=str(tmp_path / "cache"))
    frame = manifest.frame
    assert sorted(frame["split"]) == ["test", "train", "train", "train", "train"]
    assert all(Path(p).is_file() and str(tmp_path / "imf") in p for p in frame["path"])
    assert not (tmp_path / "imf" / "_cxrkit_export").exists()
    assert (frame["Pneumonia"] == frame["path"].str.contains("/PNEUMONIA/")).all()


def test_huggingface_parquet_snapshot_layout(pneumonia_files: list[Path], tmp_path: Path, monkeypatch):
    """The layout ``download("pneumonia")`` leaves: <config>/<split>/0000.parquet with image bytes."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"image": datasets.Image(), "labels": datasets.ClassLabel(names=["NORMAL", "PNEUMONIA"])}
    )
    for split, files in (
        ("train", pneumonia_files[:4]),
        ("validation", pneumonia_files[4:5]),
        ("test", pneumonia_files[5:]),
    ):
        images = [{"bytes": file.read_bytes(), "path": file.name} for file in files]
        labels = [int(file.parent.name == "PNEUMONIA") for file in files]
        (tmp_path / "full" / split).mkdir(parents=True)
        table = datasets.Dataset.from_dict({"image": images, "labels": labels}, features=features)
        table.to_parquet(str(tmp_path / "full" / split / "0000.parquet"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    manifest = get("huggingface")(str(tmp_path / "full"), name="pneumonia", cache_dir=str(tmp_path / "cache"))
    frame = manifest.frame
    assert sorted(frame["split"]) == ["test", "train", "train", "train", "train", "val"]
    assert all(p.startswith(str(tmp_path / "xdg" / "cxrkit" / "huggingface")) for p in frame["path"])
    assert frame["Pneumonia"].sum() == 3 and frame[vocab.NO_FINDING].sum() == 3
    again = get("huggingface")(str(tmp_path / "full"), name="pneumonia", cache_dir=str(tmp_path / "cache"))
    assert again.frame["path"].equals(frame["path"])  # exported once, found again
    assert set(frame["patient_id"]) == {
        "pneumonia:IM-0115",
        "pneumonia:IM-0117",
        "pneumonia:IM-0119",
        "pneumonia:person1000",
        "pneumonia:person1001",
    }


def test_huggingface_multilabel_and_errors(pneumonia_files: list[Path], tmp_path: Path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    names = ["Pleural Effusion", "nodule", "Tortuous aorta"]
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "findings": datasets.List(datasets.ClassLabel(names=names)),
            "pid": datasets.Value("string"),
        }
    )
    data = {
        "img": [str(p) for p in pneumonia_files[:3]],
        "findings": [[0, 1], [], [2]],
        "pid": ["a", "a", "b"],
    }
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "multi"))
    manifest = get("huggingface")(
        str(tmp_path / "multi"), patient_column="pid", export_dir=str(tmp_path / "out")
    )
    assert manifest.labels == ["Effusion", "Nodule", "Tortuous aorta"]
    np.testing.assert_array_equal(manifest.targets, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    assert list(manifest.frame["patient_id"]) == ["multi:a", "multi:a", "multi:b"]
    assert all(p.startswith(str(tmp_path / "out")) for p in manifest.frame["path"])

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="save_to_disk"):
        get("huggingface")("keremberke/chest-xray-classification")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        get("huggingface")(str(tmp_path / "absent" / "x" / "y"))


# --- Table -------------------------------------------------------------------------------------------------


def test_table_adapter(pneumonia_files: list[Path], tmp_path: Path, caplog):
    (tmp_path / "images").mkdir()
    for file in pneumonia_files[:4]:
        (tmp_path / "images" / file.name).symlink_to(file)
    table = pd.DataFrame(
        {
            "file": [f"images/{p.name}" for p in pneumonia_files[:4]] + ["images/missing.jpeg"],
            "subject": ["p1", "p1", "p2", "p3", "p4"],
            "Pleural Effusion": [1, 0, None, 0, 1],
            "Pneumonia": [0, 1, 1, 0, 0],
            "projection": ["PA", "AP", "L", "", "PA"],
            "gender": ["Female", "M", "", "F", "M"],
            "age_years": [34, 50, None, 8, 40],
            "fold": ["train", "valid", "test", "", "train"],
        }
    )
    table.to_csv(tmp_path / "labels.csv", index=False)
    options = {
        "path_column": "file",
        "label_columns": ["Pleural Effusion", "Pneumonia"],
        "patient_column": "subject",
        "view_column": "projection",
        "sex_column": "gender",
        "age_column": "age_years",
        "split_column": "fold",
    }
    with caplog.at_level(logging.WARNING):
        manifest = load_source(SourceConfig(adapter="table", root=str(tmp_path), options=options))
    assert "dropped 1 of 5" in caplog.text
    frame = manifest.frame
    assert manifest.labels == ["Effusion", "Pneumonia"]
    assert list(frame["path"]) == [str(tmp_path / "images" / p.name) for p in pneumonia_files[:4]]
    assert list(frame["patient_id"]) == ["labels:p1", "labels:p1", "labels:p2", "labels:p3"]
    assert list(frame["view"]) == ["PA", "AP", "LAT", ""]
    assert list(frame["sex"]) == ["F", "M", "", "F"]
    assert list(frame["split"]) == ["train", "val", "test", ""]
    np.testing.assert_array_equal(frame["Effusion"].to_numpy(), [1, 0, np.nan, 0])

    inferred = get("table")(str(tmp_path / "labels.csv"), path_column="file", require_images=False)
    assert inferred.labels == ["Effusion", "Pneumonia"] and len(inferred) == 5
    table.loc[0, "Pneumonia"] = 3
    table.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="'Pneumonia'"):
        get("table")(str(tmp_path), csv="bad.csv", path_column="file", label_columns=["Pneumonia"])
    with pytest.raises(ValueError, match="'path'"):
        get("table")(str(tmp_path), csv="labels.csv", label_columns=["Pneumonia"])
    with pytest.raises(FileNotFoundError, match="csv="):
        get("table")(str(tmp_path))


def test_adapters_read_csv_through_fsspec_memory_filesystem():
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    memory.pipe("/remote/ds/images/a.png", buffer.getvalue())
    memory.pipe("/remote/ds/labels.csv", b"path,patient,Cardiomegaly\nimages/a.png,7,1\nimages/b.png,8,0\n")
    manifest = get("table")("memory://remote/ds", patient_column="patient")
    (path,) = manifest.frame["path"]
    assert path.startswith("memory://") and path.endswith("/remote/ds/images/a.png")
    with fsspec.open(path, "rb") as handle:
        assert handle.read() == buffer.getvalue()
    assert manifest.labels == ["Cardiomegaly"]


def test_detect_names_the_adapter_a_folder_fits(nih_sample: Path, pneumonia_root: Path, tmp_path: Path):
    assert detect(str(nih_sample)) == "nih"
    assert detect(str(pneumonia_root)) == "folder" and detect(str(pneumonia_root / "test")) == "folder"
    (tmp_path / "valid.csv").write_text("Path,Sex\n")
    assert detect(str(tmp_path)) == "chexpert"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="cannot tell which dataset"):
        detect(str(empty))
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        detect(str(tmp_path / "missing"))
