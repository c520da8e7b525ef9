"""Patient-wise splits: official (real NIH lists), random, k-fold; fractions, determinism, disjointness."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrkit.data.adapters import get
from cxrkit.data.config import SplitConfig
from cxrkit.data.manifest import Manifest, from_records
from cxrkit.data.merge import merge
from cxrkit.data.splits import assign_splits, check_patient_disjoint

LABELS = ["Effusion", "Hernia", "No Finding"]


def _synthetic(source: str, n_patients: int, seed: int, official: dict[int, str] | None = None) -> Manifest:
    """``n_patients`` patients with 1-4 images each; ``official`` maps patient index -> official split."""
    rng = np.random.default_rng(seed)
    records = []
    for patient in range(n_patients):
        for image in range(int(rng.integers(1, 5))):
            effusion, hernia = float(rng.random() < 0.3), float(rng.random() < 0.03)
            records.append(
                {
                    "path": f"/data/{source}/{patient}_{image}.png",
                    "patient_id": f"{source}:{patient}",
                    "split": (official or {}).get(patient, ""),
                    "source": source,
                    "targets": [effusion, hernia, float(not (effusion or hernia))],
                }
            )
    return from_records(records, LABELS)


def _patients(manifest: Manifest, split: str) -> set[str]:
    frame = manifest.frame
    return set(frame.loc[frame["split"] == split, "patient_id"])


@pytest.fixture(scope="module")
def nih_full(nih_sample: Path) -> Manifest:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        pytest.skip("torchxrayvision is not installed (it ships the full NIH label file)")
    label_file = Path(spec.origin).parent / "data" / "Data_Entry_2017_v2020.csv.gz"
    return get("nih")(str(nih_sample), label_file=str(label_file), require_images=False)


def test_official_keeps_nih_test_and_carves_validation(nih_full: Manifest):
    split = assign_splits(nih_full, SplitConfig(method="official", val_fraction=0.1, seed=3))
    counts = split.frame["split"].value_counts()
    assert counts["test"] == 25_596
    assert counts["train"] + counts["val"] == 86_524
    check_patient_disjoint(split)
    train_patients = len(_patients(split, "train")) + len(_patients(split, "val"))
    assert len(_patients(split, "val")) == round(0.1 * train_patients)
    official_test = nih_full.frame["split"] == "test"
    assert (split.frame.loc[official_test, "split"] == "test").all()
    again = assign_splits(nih_full, SplitConfig(method="official", val_fraction=0.1, seed=3))
    pd.testing.assert_series_equal(split.frame["split"], again.frame["split"])


def test_random_fractions_determinism_and_disjointness():
    manifest = _synthetic("a", 1000, seed=0)
    config = SplitConfig(method="random", test_fraction=0.2, val_fraction=0.1, seed=7)
    split = assign_splits(manifest, config)
    check_patient_disjoint(split)
    assert len(_patients(split, "test")) == 200
    assert len(_patients(split, "val")) == 100
    assert len(_patients(split, "train")) == 700
    assert abs((split.frame["split"] == "test").mean() - 0.2) < 0.05  # images follow patients roughly
    same = assign_splits(manifest, config)
    assert same.frame["split"].equals(split.frame["split"])
    other = assign_splits(manifest, SplitConfig(method="random", test_fraction=0.2, val_fraction=0.1, seed=8))
    assert _patients(other, "test") != _patients(split, "test")
    shuffled = Manifest(manifest.frame.sample(frac=1, random_state=1).reset_index(drop=True), manifest.labels)
    assert _patients(assign_splits(shuffled, config), "test") == _patients(
        split, "test"
    )  # row order irrelevant


def test_official_without_test_falls_back_to_random_per_source():
    with_test = _synthetic(
        "nih", 300, seed=1, official={p: "test" if p < 60 else "train" for p in range(300)}
    )
    without = _synthetic("padchest", 500, seed=2)
    merged = merge([with_test, without])
    split = assign_splits(merged, SplitConfig(method="official", test_fraction=0.2, val_fraction=0.1, seed=0))
    check_patient_disjoint(split)
    nih_test = {p for p in _patients(split, "test") if p.startswith("nih:")}
    assert nih_test == {f"nih:{p}" for p in range(60)}
    padchest_test = {p for p in _patients(split, "test") if p.startswith("padchest:")}
    assert len(padchest_test) == 100
    padchest_val = {p for p in _patients(split, "val") if p.startswith("padchest:")}
    assert len(padchest_val) == 40  # 10% of the 400 remaining train patients


def test_official_val_kept_and_mixed_patients_follow_test():
    official = {p: "val" if p < 30 else "train" for p in range(200)}
    manifest = _synthetic("chexpert", 200, seed=3, official=official)
    frame = manifest.frame.copy()
    mixed = frame.index[frame["patient_id"] == "chexpert:150"]
    frame.loc[mixed[:1], "split"] = "test"  # one image of a train patient is officially test
    split = assign_splits(Manifest(frame, manifest.labels), SplitConfig(method="official", seed=0))
    check_patient_disjoint(split)
    assert _patients(split, "val") == {f"chexpert:{p}" for p in range(30)}
    assert _patients(split, "test") == {"chexpert:150"}


def test_kfold_folds_are_disjoint_and_cover_all_patients():
    official = {p: "test" for p in range(50)}
    manifest = merge([_synthetic("nih", 400, seed=4, official=official), _synthetic("openi", 100, seed=5)])
    folds = [
        assign_splits(manifest, SplitConfig(method="kfold", n_folds=5, fold=k, seed=0)) for k in range(5)
    ]
    tests = [_patients(split, "test") for split in folds]
    assert all(test == tests[0] for test in tests)  # test is fixed across folds
    assert {f"nih:{p}" for p in range(50)} <= tests[0]
    assert (
        len({p for p in tests[0] if p.startswith("openi:")}) == 20
    )  # 20% of the source without a test split
    vals = [_patients(split, "val") for split in folds]
    for i in range(5):
        check_patient_disjoint(folds[i])
        for j in range(i + 1, 5):
            assert not vals[i] & vals[j]
    everyone = set(manifest.frame["patient_id"])
    assert set().union(*vals) == everyone - tests[0]
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 0.25 * np.mean(sizes)
    hernia = [folds[k].frame.loc[folds[k].frame["split"] == "val", "Hernia"].sum() for k in range(5)]
    assert min(hernia) > 0  # the rare label is stratified into every fold


def test_pneumonia_random_split_keeps_patients_together(pneumonia_root: Path):
    manifest = get("folder")(str(pneumonia_root))
    split = assign_splits(manifest, SplitConfig(method="random", test_fraction=0.2, val_fraction=0.1, seed=0))
    check_patient_disjoint(split)
    images_per_patient = manifest.frame["patient_id"].value_counts()
    assert images_per_patient.max() > 1  # the check above is meaningful: patients have several images
    assert set(split.frame["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SplitConfig(method="stratified"), "split method"),
        (SplitConfig(method="random", val_fraction=1.2), "val_fraction"),
        (SplitConfig(method="random", val_fraction=0.5, test_fraction=0.5), "below 1"),
        (SplitConfig(method="kfold", n_folds=5, fold=5), "fold"),
        (SplitConfig(method="kfold", n_folds=1), "n_folds"),
    ],
)
def test_invalid_split_configs(config: SplitConfig, message: str):
    with pytest.raises(ValueError, match=message):
        assign_splits(_synthetic("a", 20, seed=0), config)


def test_check_patient_disjoint_detects_leaks():
    records = [
        {
            "path": f"/x/{i}.png",
            "patient_id": patient,
            "split": split,
            "source": "a",
            "targets": [0.0, 0.0, 1.0],
        }
        for i, (patient, split) in enumerate([("a:1", "train"), ("a:1", "test"), ("a:2", "val")])
    ]
    with pytest.raises(ValueError, match="a:1"):
        check_patient_disjoint(from_records(records, LABELS))
    check_patient_disjoint(from_records(records[:1] + records[2:], LABELS))
