"""build_manifest end to end on the real NIH sample and pneumonia folder; merge over harmonised labels."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cxrkit.config import load_config
from cxrkit.data import labels as vocab
from cxrkit.data.adapters import get
from cxrkit.data.build import build_manifest, build_run_manifest, subsample_no_finding
from cxrkit.data.config import DataConfig, SourceConfig, SplitConfig
from cxrkit.data.manifest import Manifest, from_records
from cxrkit.data.merge import merge
from cxrkit.data.run_manifest import RUN_MANIFEST_FILE, freeze_splits, save_run_manifest
from cxrkit.data.splits import check_patient_disjoint


def _config(*sources: SourceConfig, **fields) -> DataConfig:
    return DataConfig(sources=list(sources), **fields)


def test_build_nih_sample_official(nih_sample: Path, caplog):
    with caplog.at_level(logging.INFO):
        manifest = build_manifest(_config(SourceConfig("nih", str(nih_sample)), split=SplitConfig(seed=1)))
    frame = manifest.frame
    table = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv")
    test_names = set((nih_sample / "official_split" / "test_list.txt").read_text().split())
    assert len(frame) == 205
    assert (frame["split"] == "test").sum() == table["Image Index"].isin(test_names).sum()
    n_rest = (frame["split"] != "test").sum()  # one image per patient
    assert abs((frame["split"] == "val").sum() - 0.1 * n_rest) <= 3.5 * (0.1 * 0.9 * n_rest) ** 0.5
    assert manifest.labels == [*vocab.NIH_FINDINGS, vocab.NO_FINDING]
    summary = [r.message for r in caplog.records if r.message.startswith("manifest:")]
    assert len(summary) == 1 and "205 images of 205 patients (nih 205)" in summary[0]


def test_build_from_yaml_config_with_views_labels_and_policy(nih_sample: Path, tmp_path: Path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        f"""
data:
  sources:
    - adapter: nih
      root: {nih_sample}
      options: {{require_images: true}}
  labels: [Pneumonia, pleural effusion, No Finding]
  views: [PA]
  no_finding: zeros
  split: {{method: random, test_fraction: 0.2, val_fraction: 0.1, seed: 5}}
"""
    )
    config = load_config(yaml)
    manifest = build_manifest(config.data)
    frame = manifest.frame
    assert manifest.labels == ["Pneumonia", "Effusion"]  # canonical names; No Finding dropped by "zeros"
    assert (frame["view"] == "PA").all()
    table = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv")
    assert len(frame) == (table["View Position"] == "PA").sum()
    assert set(frame["split"]) == {"train", "val", "test"}
    assert OmegaConf.is_config(config.data)


def test_build_rejects_bad_views_and_labels(nih_sample: Path):
    source = SourceConfig("nih", str(nih_sample))
    with pytest.raises(ValueError, match="views"):
        build_manifest(_config(source, views=["frontal"]))
    with pytest.raises(ValueError, match="'Tortuous Aorta' is in no data source"):
        build_manifest(_config(source, labels=["Tortuous Aorta"]))
    with pytest.raises(ValueError, match="sources is empty"):
        build_manifest(DataConfig(sources=[]))


def test_no_finding_ratio_subsamples_train_only(pneumonia_root: Path):
    split = SplitConfig(method="random", test_fraction=0.2, val_fraction=0.1, seed=0)
    source = SourceConfig("folder", str(pneumonia_root))
    full = build_manifest(_config(source, split=split))
    reduced = build_manifest(_config(source, split=split, no_finding_ratio=0.1))
    train = reduced.frame[reduced.frame["split"] == "train"]
    assert train[vocab.NO_FINDING].mean() == pytest.approx(0.1, abs=0.002)
    assert (train["Pneumonia"] == 1).sum() == (
        (full.frame["split"] == "train") & (full.frame["Pneumonia"] == 1)
    ).sum()
    for name in ("val", "test"):
        assert (reduced.frame["split"] == name).sum() == (full.frame["split"] == name).sum()
    again = build_manifest(_config(source, split=split, no_finding_ratio=0.1))
    assert again.frame["path"].equals(reduced.frame["path"])
    unchanged = build_manifest(_config(source, split=split, no_finding_ratio=0.5))  # already below 50%
    assert len(unchanged) == len(full)
    check_patient_disjoint(reduced)


def test_subsample_without_no_finding_label_uses_all_zero_rows(pneumonia_root: Path):
    manifest = get("folder")(str(pneumonia_root / "train")).with_labels(["Pneumonia"])
    reduced = subsample_no_finding(manifest, 0.2, seed=0)
    assert (reduced.frame["Pneumonia"] == 0).mean() == pytest.approx(0.2, abs=0.002)
    with pytest.raises(ValueError, match="no_finding_ratio"):
        subsample_no_finding(manifest, 1.0, seed=0)


def test_merge_nih_and_pneumonia_folder(nih_sample: Path, pneumonia_root: Path):
    manifest = build_manifest(
        _config(
            SourceConfig("nih", str(nih_sample)),
            SourceConfig("folder", str(pneumonia_root)),
            split=SplitConfig(method="official", seed=0),
        )
    )
    frame = manifest.frame
    assert manifest.labels == [*vocab.NIH_FINDINGS, vocab.NO_FINDING]
    pneumonia = frame[frame["source"] == "pneumonia"]
    assert pneumonia["Pneumonia"].notna().all() and pneumonia[vocab.NO_FINDING].notna().all()
    assert pneumonia["Effusion"].isna().all()
    assert not frame.loc[frame["source"] == "nih", manifest.labels].isna().any().any()
    assert (pneumonia["split"] == "test").any()
    check_patient_disjoint(manifest)


def test_merge_padchest_and_openi_marks_unannotated_labels_unknown(tmp_path: Path):
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        pytest.skip("torchxrayvision is not installed (it ships the PadChest and OpenI label files)")
    data = Path(spec.origin).parent / "data"
    padchest_csv = tmp_path / "padchest.csv"
    pd.read_csv(
        data / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", nrows=500, dtype=str
    ).to_csv(padchest_csv, index=False)
    padchest = get("padchest")(str(tmp_path), label_file=str(padchest_csv), require_images=False)
    openi = get("openi")(str(tmp_path), reports=str(data / "NLMCXR_reports.tgz"), require_images=False)
    merged = merge([padchest, openi])
    assert merged.labels == vocab.order([*padchest.labels, *openi.labels])
    frame = merged.frame
    from_openi = frame["source"] == "openi"
    assert frame.loc[from_openi, "Aortic Elongation"].isna().all()  # PadChest-only label
    assert frame.loc[~from_openi, "Lung Opacity"].isna().all()  # OpenI-only label
    assert frame.loc[:, "Cardiomegaly"].notna().all()  # both annotate it
    assert frame[merged.labels].dtypes.eq(np.float32).all()
    chosen = merge([padchest, openi], labels=["Effusion", "No Finding"])
    assert chosen.labels == ["Effusion", "No Finding"] and len(chosen) == len(merged)


def test_merge_requires_manifests():
    with pytest.raises(ValueError, match="at least one"):
        merge([])


def test_build_accepts_an_unstructured_config(nih_sample: Path):
    config = OmegaConf.create(
        {
            "sources": [{"adapter": "nih", "root": str(nih_sample), "options": {"require_images": False}}],
            "labels": [],
            "views": [],
            "no_finding": "class",
            "no_finding_ratio": None,
            "split": {
                "method": "random",
                "val_fraction": 0.1,
                "test_fraction": 0.2,
                "n_folds": 5,
                "fold": 0,
                "seed": 0,
            },
        }
    )
    manifest = build_manifest(config)
    assert isinstance(manifest, Manifest) and len(manifest) == 205


def _rows(*rows: tuple[str, str, str, float]) -> Manifest:
    """A manifest of (path, patient, split, Effusion) rows."""
    records = [
        {"path": path, "patient_id": patient, "split": split, "source": "a", "targets": [effusion]}
        for path, patient, split, effusion in rows
    ]
    return from_records(records, ["Effusion"])


def test_freeze_splits_keeps_stored_splits_and_reports_every_change():
    stored = _rows(
        ("t1.png", "a:1", "train", 1.0),
        ("t2.png", "a:2", "train", 0.0),
        ("v1.png", "a:3", "val", 0.0),
        ("x1.png", "a:4", "test", 1.0),
        ("x2.png", "a:5", "test", 0.0),
        ("x3.png", "a:6", "test", 0.0),
    )
    current = _rows(  # splits as a fresh build would draw them today: ignored
        ("t1.png", "a:1", "test", 1.0),
        ("t2.png", "a:2", "", 0.0),
        ("v1.png", "a:3", "train", 0.0),
        ("x1.png", "a:4", "train", 0.0),  # relabelled
        ("x3.png", "a:2", "", 0.0),  # today's ids put it with training patient a:2
        ("new.png", "a:1", "test", 1.0),  # a new image of a training patient
        ("new2.png", "a:9", "test", 1.0),  # a new patient
    )
    frozen, report = freeze_splits(stored, current)
    splits = dict(zip(frozen.frame["path"], frozen.frame["split"], strict=True))
    assert splits == {"t1.png": "train", "t2.png": "train", "v1.png": "val", "x1.png": "test"}
    assert frozen.frame.loc[frozen.frame["path"] == "x1.png", "Effusion"].item() == 0.0  # today's label
    assert report.added == ["new.png", "new2.png"] and report.missing == {"test": ["x2.png"]}
    assert report.relabelled == ["x1.png"] and report.train_patients_left_out == ["a:2"]
    assert len(report.lines()) == 4
    with pytest.raises(ValueError, match="another dataset"):
        freeze_splits(stored, _rows(("elsewhere.png", "b:1", "", 1.0)))


def test_build_run_manifest_uses_stored_splits_and_refuses_edits(tmp_path: Path, pneumonia_root: Path):
    config = _config(
        SourceConfig("folder", str(pneumonia_root / "train")),
        split=SplitConfig(method="random", seed=0),
        no_finding="zeros",
    )
    built = build_manifest(config)
    stored = built.frame.copy()
    stored["split"] = np.where(stored.index % 2 == 0, "train", "test")  # any split a run once had
    stored = stored.groupby("patient_id")["split"].transform("first").rename("split")
    manifest = Manifest(built.frame.assign(split=stored), built.labels)
    save_run_manifest(manifest, tmp_path)
    frozen = build_run_manifest(config, tmp_path)
    pd.testing.assert_series_equal(
        frozen.frame.set_index("path")["split"].sort_index(),
        manifest.frame.set_index("path")["split"].sort_index(),
    )
    assert build_run_manifest(config, tmp_path / "old-run").frame["split"].equals(built.frame["split"])
    edited = manifest.frame.copy()
    edited.loc[0, "split"] = "val"
    Manifest(edited, manifest.labels).save(tmp_path / RUN_MANIFEST_FILE)
    with pytest.raises(ValueError, match="modified after training"):
        build_run_manifest(config, tmp_path)
