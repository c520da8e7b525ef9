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


def _within(count: int, fraction: float, n: int, sigmas: float = 3.5) -> bool:
    """``count`` is a plausible binomial(n, fraction) draw (within ``sigmas`` standard deviations)."""
    return abs(count - fraction * n) <= sigmas * np.sqrt(n * fraction * (1 - fraction))


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
    assert _within(len(_patients(split, "val")), 0.1, train_patients)
    official_test = nih_full.frame["split"] == "test"
    assert (split.frame.loc[official_test, "split"] == "test").all()
    again = assign_splits(nih_full, SplitConfig(method="official", val_fraction=0.1, seed=3))
    pd.testing.assert_series_equal(split.frame["split"], again.frame["split"])


def test_random_fractions_determinism_and_disjointness():
    manifest = _synthetic("a", 1000, seed=0)
    config = SplitConfig(method="random", test_fraction=0.2, val_fraction=0.1, seed=7)
    split = assign_splits(manifest, config)
    check_patient_disjoint(split)
    assert _within(len(_patients(split, "test")), 0.2, 1000)
    assert _within(len(_patients(split, "val")), 0.1, 1000)
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
    assert _within(len(padchest_test), 0.2, 500)
    padchest_val = {p for p in _patients(split, "val") if p.startswith("padchest:")}
    assert _within(len(padchest_val), 0.1, 500 - len(padchest_test))  # 10% of the remaining patients


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
    assert _within(len({p for p in tests[0] if p.startswith("openi:")}), 0.2, 100)  # source without test
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
    ("overrides", "message"),
    [
        (["data.split.method=stratified"], r"data\.split\.method"),
        (["data.split.val_fraction=1.2"], "val_fraction"),
        (["data.split.val_fraction=0.5", "data.split.test_fraction=0.5"], "below 1"),
        (["data.split.method=kfold", "data.split.n_folds=5", "data.split.fold=5"], "fold"),
        (["data.split.method=kfold", "data.split.n_folds=1"], "n_folds"),
    ],
)
def test_invalid_split_configs(overrides: list[str], message: str):
    from cxrkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):  # checked when the config loads
        load_config(None, overrides)


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


def _assignment(manifest: Manifest) -> pd.Series:
    return manifest.frame.groupby("patient_id")["split"].first()


@pytest.mark.parametrize("method", ["random", "official", "kfold"])
def test_growth_and_shrinkage_move_no_existing_patient(method: str):
    """Adding patients and removing others leaves every remaining patient in its split (kfold: its test)."""
    config = SplitConfig(method=method, test_fraction=0.2, val_fraction=0.1, seed=5)
    full = _synthetic("a", 1200, seed=9)
    frame = full.frame
    number = frame["patient_id"].str.split(":").str[1].astype(int)
    before = assign_splits(full.subset((number < 1000).to_numpy()), config)
    after = assign_splits(full.subset((number >= 100).to_numpy()), config)  # 100 removed, 200 added
    old, new = _assignment(before), _assignment(after)
    kept = old.index.intersection(new.index)
    assert len(kept) == 900
    if method == "kfold":
        assert ((old[kept] == "test") == (new[kept] == "test")).all()  # folds are re-drawn, test is not
    else:
        assert (old[kept] == new[kept]).all()


def test_fractions_hold_within_sampling_error_for_any_seed():
    manifest = _synthetic("a", 3000, seed=1)
    for seed in range(5):
        split = assign_splits(
            manifest, SplitConfig(method="random", test_fraction=0.15, val_fraction=0.1, seed=seed)
        )
        assert _within(len(_patients(split, "test")), 0.15, 3000)
        assert _within(len(_patients(split, "val")), 0.1, 3000)


def test_small_datasets_get_every_split():
    config = SplitConfig(method="random", test_fraction=0.1, val_fraction=0.1)
    split = assign_splits(_synthetic("a", 5, seed=0), config)
    assert all(_patients(split, name) for name in ("train", "val", "test"))
