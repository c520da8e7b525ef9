"""Patient-wise train/val/test splits: a patient's images always land in one split, and stay there.

Every drawn split is a keyed hash of the patient id: ``u = blake2b(patient_id, key=f"{seed}:{source}")``
read as a number in [0, 1), and a patient's split depends on its own ``u`` only. Adding or removing
patients therefore never moves an existing patient, and the fractions hold within sampling error (a
binomial count, about ``sqrt(f (1 - f) / n)`` of ``n`` patients). When a draw would leave a split empty on a
small dataset, the patient whose ``u`` is nearest above the cut joins it (logged); that one assignment can
change when patients are added. A run stores the manifest it trained on (:mod:`cxrkit.data.run_manifest`)
and is evaluated on that, whatever the data on disk became.

Methods (``SplitConfig.method``):

- ``official``: per source, keep what the dataset defines and draw what it lacks. Patients with an image
  in the official ``test`` split form the test set (all their images); a source without one sends the
  patients with ``u < test_fraction`` to test (logged). Patients in an official ``val`` split (CheXpert's
  valid.csv) form the validation set, else ``val_fraction`` of the train patients are drawn by ``u``.
- ``random``: per source, ``u < test_fraction`` is test and ``test_fraction <= u < test_fraction +
  val_fraction`` is validation (fractions of all the source's patients).
- ``kfold``: the test set is the official one (or, for a source without one, the ``u < test_fraction``
  patients, the same for every fold; ``test_fraction: 0`` for pure cross-validation); the other patients
  are cut into ``n_folds`` folds of whole patients, stratified on each patient's rarest positive label
  (scikit-learn ``StratifiedKFold`` over patients, seeded with ``seed``), and fold ``fold`` is the
  validation set. The test set is as stable as above; the folds are re-drawn over the patients present, so
  a cross-validation is run on one version of the data (each run keeps its own stored manifest).

Fractions count patients, not images.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from cxrkit.data.manifest import SPLITS, Manifest

log = logging.getLogger(__name__)

_HASH_SCALE = float(2**64)


def assign_splits(manifest: Manifest, split_cfg) -> Manifest:
    """Return ``manifest`` with its ``split`` column set to train/val/test by patient (see module docs).

    ``split_cfg`` is checked when the config loads (:func:`cxrkit.data.config.check_data`)."""
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


def patient_uniform(patient_ids: pd.Series | np.ndarray | list[str], seed: int, source: str) -> np.ndarray:
    """Per patient id, its keyed hash ``blake2b(id, key=f"{seed}:{source}")`` as a float in [0, 1)."""
    key = f"{int(seed)}:{source}".encode()[:64]
    values = [
        int.from_bytes(hashlib.blake2b(str(pid).encode(), key=key, digest_size=8).digest(), "big")
        for pid in patient_ids
    ]
    return np.asarray(values, dtype=np.float64) / _HASH_SCALE


def _draw(u: pd.Series, low: float, high: float, keep: int = 1) -> set[str]:
    """Patients (index of ``u``) with ``low <= u < high``; when that is empty but ``high > low``, the one with
    the smallest ``u >= low``, provided at least ``keep`` patients stay outside the draw."""
    drawn = set(u.index[(u >= low) & (u < high)])
    if drawn or high <= low or len(u) <= keep:
        return drawn
    above = u[u >= low]
    if above.empty:
        above = u
    nearest = str(above.idxmin())
    log.info("splits: no patient hashed into [%.3f, %.3f); %s joins that split", low, high, nearest)
    return {nearest}


def _source_uniform(group: pd.DataFrame, seed: int, source: str) -> pd.Series:
    patients = sorted(set(group["patient_id"]))
    return pd.Series(patient_uniform(patients, seed, source), index=patients)


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
        u = _source_uniform(group, cfg.seed, str(source))
        cut = 0.0
        if not test:
            log.info(
                "splits: %s has no official test split; drawing %.0f%% of its patients",
                source,
                100 * cfg.test_fraction,
            )
            cut = cfg.test_fraction
            test = _draw(u.drop(list(val)), 0.0, cut)
        rest = u.drop(list(test | val))
        if not val:
            val = _draw(rest, cut, cut + cfg.val_fraction * (1 - cut))
        assignment.update(dict.fromkeys(rest.index, "train"))
        assignment.update(dict.fromkeys(val, "val"))
        assignment.update(dict.fromkeys(test, "test"))
    return assignment


def _random(frame: pd.DataFrame, cfg) -> dict[str, str]:
    assignment: dict[str, str] = {}
    for source, group in frame.groupby("source", sort=True):
        u = _source_uniform(group, cfg.seed, str(source))
        test = _draw(u, 0.0, cfg.test_fraction)
        val = _draw(u.drop(list(test)), cfg.test_fraction, cfg.test_fraction + cfg.val_fraction)
        assignment.update(dict.fromkeys(u.index, "train"))
        assignment.update(dict.fromkeys(val, "val"))
        assignment.update(dict.fromkeys(test, "test"))
    return assignment


def _kfold(manifest: Manifest, cfg) -> dict[str, str]:
    frame = manifest.frame
    test: set[str] = set()
    for source, group in frame.groupby("source", sort=True):
        official_test, _ = _official_sets(group)
        test |= official_test or _draw(_source_uniform(group, cfg.seed, str(source)), 0.0, cfg.test_fraction)
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
