"""Patient-wise train/val/test splits: a patient's images always land in one split.

Methods (``SplitConfig.method``):

- ``official``: per source, keep what the dataset defines and draw what it lacks. Patients with an image
  in the official ``test`` split form the test set (all their images); a source without one gets
  ``test_fraction`` of its patients drawn at random (logged). Patients in an official ``val`` split
  (CheXpert's valid.csv) form the validation set, else ``val_fraction`` of the train patients are drawn.
- ``random``: per source, ``test_fraction`` and ``val_fraction`` of the patients are drawn into test and val.
- ``kfold``: the test set is the official one (or, for a source without one, ``test_fraction`` of its
  patients drawn with ``seed``, the same for every fold; ``test_fraction: 0`` for pure cross-validation);
  the other patients are cut into ``n_folds`` folds of whole patients, stratified on each patient's
  rarest positive label (scikit-learn ``StratifiedKFold`` over patients), and fold ``fold`` is the
  validation set.

Every draw is seeded with ``seed`` (and the source name), so a split is reproducible; fractions count
patients, not images.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from cxrkit.data.manifest import Manifest

log = logging.getLogger(__name__)

METHODS = ("official", "random", "kfold")
SPLITS = ("train", "val", "test")


def assign_splits(manifest: Manifest, split_cfg) -> Manifest:
    """Return ``manifest`` with its ``split`` column set to train/val/test by patient (see module docs)."""
    _validate(split_cfg)
    frame = manifest.frame
    if frame.empty:
        raise ValueError("cannot split an empty manifest")
    if split_cfg.method == "official":
        assignment = _official(frame, split_cfg)
    elif split_cfg.method == "random":
        assignment = _random(frame, split_cfg)
    else:
        assignment = _kfold(manifest, split_cfg)
    result = frame.copy()
    result["split"] = result["patient_id"].map(assignment).fillna("train")
    split = Manifest(result, list(manifest.labels))
    check_patient_disjoint(split)
    log.info("splits (%s, seed %d): %s", split_cfg.method, split_cfg.seed, describe(split))
    return split


def check_patient_disjoint(manifest: Manifest) -> None:
    """Raise ValueError when a patient has images in more than one split."""
    splits_per_patient = manifest.frame.groupby("patient_id")["split"].nunique()
    leaking = splits_per_patient[splits_per_patient > 1]
    if len(leaking):
        raise ValueError(f"{len(leaking)} patients are in more than one split, e.g. {leaking.index[0]!r}")


def describe(manifest: Manifest) -> str:
    """``train 100 images / 40 patients, val ..., test ...``."""
    frame = manifest.frame
    parts = []
    for name in (*SPLITS, ""):
        rows = frame[frame["split"] == name]
        if len(rows):
            parts.append(
                f"{name or 'unsplit'} {len(rows):,} images / {rows['patient_id'].nunique():,} patients"
            )
    return ", ".join(parts)


def _validate(cfg) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"split method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ValueError(f"split {name} must be in [0, 1), got {value}")
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise ValueError("split val_fraction + test_fraction must be below 1 (train needs patients)")
    if cfg.method == "kfold":
        if cfg.n_folds < 2:
            raise ValueError(f"split n_folds must be at least 2, got {cfg.n_folds}")
        if not 0 <= cfg.fold < cfg.n_folds:
            raise ValueError(f"split fold must be in [0, {cfg.n_folds}), got {cfg.fold}")


def _rng(seed: int, source: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(source.encode())])


def _draw(patients: Iterable[str], fraction: float, total: int, rng: np.random.Generator) -> list[str]:
    """``fraction`` of ``total`` patients drawn from ``patients`` (at least one when the fraction is > 0)."""
    pool = sorted(patients)
    count = round(fraction * total)
    if fraction > 0 and len(pool) > 1:
        count = max(count, 1)
    count = min(count, max(len(pool) - 1, 0))
    return [pool[i] for i in rng.permutation(len(pool))[:count]]


def _official_sets(group: pd.DataFrame) -> tuple[set[str], set[str]]:
    """Patients with an official test image, and (other) patients with an official val image."""
    test = set(group.loc[group["split"] == "test", "patient_id"])
    val = set(group.loc[group["split"] == "val", "patient_id"]) - test
    labelled = group[group["split"] != ""]
    mixed = int((labelled.groupby("patient_id")["split"].nunique() > 1).sum())
    if mixed:
        log.warning(
            "%d patients have images in several official splits; all their images follow one split", mixed
        )
    return test, val


def _official(frame: pd.DataFrame, cfg) -> dict[str, str]:
    assignment: dict[str, str] = {}
    for source, group in frame.groupby("source", sort=True):
        test, val = _official_sets(group)
        rng = _rng(cfg.seed, str(source))
        patients = set(group["patient_id"])
        if not test:
            log.info(
                "splits: %s has no official test split; drawing %.0f%% of its patients",
                source,
                100 * cfg.test_fraction,
            )
            test = set(_draw(patients - val, cfg.test_fraction, len(patients), rng))
        train = patients - test - val
        if not val:
            val = set(_draw(train, cfg.val_fraction, len(train), rng))
        assignment.update(dict.fromkeys(train - val, "train"))
        assignment.update(dict.fromkeys(val, "val"))
        assignment.update(dict.fromkeys(test, "test"))
    return assignment


def _random(frame: pd.DataFrame, cfg) -> dict[str, str]:
    assignment: dict[str, str] = {}
    for source, group in frame.groupby("source", sort=True):
        rng = _rng(cfg.seed, str(source))
        patients = set(group["patient_id"])
        test = set(_draw(patients, cfg.test_fraction, len(patients), rng))
        val = set(_draw(patients - test, cfg.val_fraction, len(patients), rng))
        assignment.update(dict.fromkeys(patients - test - val, "train"))
        assignment.update(dict.fromkeys(val, "val"))
        assignment.update(dict.fromkeys(test, "test"))
    return assignment


def _kfold(manifest: Manifest, cfg) -> dict[str, str]:
    frame = manifest.frame
    test: set[str] = set()
    for source, group in frame.groupby("source", sort=True):
        official_test, _ = _official_sets(group)
        patients = set(group["patient_id"])
        drawn = _draw(patients, cfg.test_fraction, len(patients), _rng(cfg.seed, str(source)))
        test |= official_test or set(drawn)
    strata = _patient_strata(manifest, cfg.n_folds).drop(list(test))
    if len(strata) < cfg.n_folds:
        raise ValueError(
            f"kfold needs at least {cfg.n_folds} patients outside the test set, got {len(strata)}"
        )
    folds = StratifiedKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
    _, val_index = list(folds.split(np.zeros(len(strata)), strata.to_numpy()))[cfg.fold]
    assignment = dict.fromkeys(strata.index, "train")
    assignment.update(dict.fromkeys(strata.index[val_index], "val"))
    assignment.update(dict.fromkeys(test, "test"))
    return assignment


def _patient_strata(manifest: Manifest, n_folds: int) -> pd.Series:
    """Per patient (sorted), the rarest label positive in any of their images, "none" without one.

    Strata with fewer patients than folds are merged into "other", so every fold can hold every stratum.
    """
    frame = manifest.frame
    positive = pd.DataFrame(np.nan_to_num(manifest.targets, nan=0.0) > 0, columns=manifest.labels)
    per_patient = positive.groupby(frame["patient_id"].to_numpy()).any().sort_index()
    if not manifest.labels:
        return pd.Series("none", index=per_patient.index)
    prevalence = per_patient.sum(axis=0).to_numpy()
    rarity = np.where(per_patient.to_numpy(), prevalence[None, :], np.inf)
    names = np.asarray(manifest.labels, dtype=object)[rarity.argmin(axis=1)]
    key = pd.Series(np.where(per_patient.to_numpy().any(axis=1), names, "none"), index=per_patient.index)
    return key.where(key.map(key.value_counts()) >= n_folds, "other")
