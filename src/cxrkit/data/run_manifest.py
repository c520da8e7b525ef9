"""The data a run trained on, frozen in its run directory, so every later step uses the same splits.

``cxr train`` stores the manifest of its cache (paths, patient ids, splits, labels) as
``RUN_DIR/data_manifest.csv`` (+ ``.labels.json``) and ``RUN_DIR/data_manifest.json`` (its SHA-256 and the
images and patients per split). ``cxr test``, ``evaluate``, ``export``, ``explain`` and a resumed training
read the data config again and :func:`freeze_splits` lays the stored splits over it:

* an image the run knew keeps the split it had (its labels are read afresh, a changed label is reported);
* an image that appeared since is left out of every split (reported): the run's test set stays exactly
  the one it was scored on, and no new image of a training patient can reach a test set;
* an image of the run that is no longer on disk is reported and dropped;
* a patient who, under today's patient ids, has images in the run's training split and in another split
  loses the other images (reported): a training patient is never evaluated.

When nothing of the run's data is found, the data config names another dataset: that is an external
evaluation (``cxr evaluate RUN --data ...``), and :func:`freeze_splits` refuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrkit.data.manifest import Manifest

log = logging.getLogger(__name__)

RUN_MANIFEST_FILE = "data_manifest.csv"
RUN_MANIFEST_META = "data_manifest.json"
HASH_COLUMNS: tuple[str, ...] = ("path", "patient_id", "split")
_EXAMPLES = 3


def content_hash(manifest: Manifest) -> str:
    """SHA-256 of the paths, patient ids, splits and labels, independent of row order."""
    columns = [*HASH_COLUMNS, *manifest.labels]
    frame = manifest.frame[columns].sort_values("path", kind="stable").reset_index(drop=True)
    payload = json.dumps(manifest.labels).encode() + frame.to_csv(index=False, na_rep="nan").encode()
    return hashlib.sha256(payload).hexdigest()


def split_counts(manifest: Manifest) -> dict[str, dict[str, int]]:
    """Images and patients per split."""
    frame = manifest.frame
    return {
        str(split): {"images": len(rows), "patients": int(rows["patient_id"].nunique())}
        for split, rows in frame.groupby("split", sort=True)
    }


def save_run_manifest(manifest: Manifest, run_dir: str | Path) -> Path:
    """Write the metadata and label columns of ``manifest`` and its hash into ``run_dir``; return the CSV."""
    run_dir = Path(run_dir)
    stored = manifest.with_labels(list(manifest.labels))
    path = run_dir / RUN_MANIFEST_FILE
    stored.save(path)
    meta = {"sha256": content_hash(stored), "images": len(stored), "splits": split_counts(stored)}
    (run_dir / RUN_MANIFEST_META).write_text(json.dumps(meta, indent=2))
    log.info("data manifest of the run stored in %s", path)
    return path


def has_run_manifest(run_dir: str | Path) -> bool:
    return (Path(run_dir) / RUN_MANIFEST_FILE).is_file()


def run_manifest_hash(run_dir: str | Path) -> str:
    """The SHA-256 recorded for the run's stored manifest."""
    meta = Path(run_dir) / RUN_MANIFEST_META
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} is missing: the run stores no data manifest")
    return str(json.loads(meta.read_text())["sha256"])


def training_patients(run_dir: str | Path) -> set[str] | None:
    """Patient ids of the run's stored training split; None when the run stores no manifest."""
    if not has_run_manifest(run_dir):
        return None
    frame = load_run_manifest(run_dir).frame
    return set(frame.loc[frame["split"] == "train", "patient_id"].astype(str))


def load_run_manifest(run_dir: str | Path, current: Manifest | None = None) -> Manifest:
    """The run's stored manifest (hash checked) or, given the ``current`` data, that data with the run's
    frozen splits (:func:`freeze_splits`, whose report is logged)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} stores no data manifest ({RUN_MANIFEST_FILE}); it was trained before cxrkit "
            "stored one, so its splits cannot be recovered"
        )
    stored = Manifest.load(path)
    expected, actual = run_manifest_hash(run_dir), content_hash(stored)
    if expected != actual:
        raise ValueError(f"{path} was modified after training: its SHA-256 {actual} is not {expected}")
    if current is None:
        return stored
    frozen, report = freeze_splits(stored, current)
    report.log(run_dir)
    return frozen


@dataclass
class FreezeReport:
    """How today's data differs from the run's stored manifest (paths as examples)."""

    kept: int = 0
    added: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    relabelled: list[str] = field(default_factory=list)
    train_patients_left_out: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.added:
            out.append(
                f"{len(self.added)} images appeared since the run was trained "
                f"(e.g. {_examples(self.added)}); they are in none of its splits and are left out"
            )
        for split, paths in self.missing.items():
            out.append(
                f"{len(paths)} {split or 'unsplit'} images of the run are no longer in the data "
                f"(e.g. {_examples(paths)}); they are left out"
            )
        if self.relabelled:
            out.append(
                f"{len(self.relabelled)} images have other labels than at training time "
                f"(e.g. {_examples(self.relabelled)}); today's labels are used"
            )
        if self.train_patients_left_out:
            out.append(
                f"{len(self.train_patients_left_out)} patients have images in the run's training split "
                "and in another split under today's patient ids "
                f"(e.g. {_examples(self.train_patients_left_out)}); their other images are left out"
            )
        return out

    def log(self, run_dir: Path) -> None:
        lines = self.lines()
        for line in lines:
            log.warning("data of %s: %s", run_dir, line)
        if not lines:
            log.info("data of %s: the %d images of its stored splits are all present", run_dir, self.kept)

    def to_dict(self) -> dict:
        return {
            "kept": self.kept,
            "added": len(self.added),
            "missing": {split: len(paths) for split, paths in self.missing.items()},
            "relabelled": len(self.relabelled),
            "train_patients_left_out": len(self.train_patients_left_out),
        }


def freeze_splits(stored: Manifest, current: Manifest) -> tuple[Manifest, FreezeReport]:
    """``current`` restricted to the images of ``stored``, each in its stored split (see module docs)."""
    stored_split = stored.frame.drop_duplicates("path").set_index("path")["split"].astype(str)
    frame = current.frame
    known = frame["path"].isin(stored_split.index).to_numpy()
    if not known.any():
        raise ValueError(
            f"none of the {len(frame)} images of this data is in the run's stored manifest: it is another "
            "dataset; evaluate it as one with `cxr evaluate RUN --data CONFIG_OR_DIR`"
        )
    report = FreezeReport(kept=int(known.sum()), added=frame.loc[~known, "path"].astype(str).tolist())
    missing = stored.frame[~stored.frame["path"].isin(frame["path"])]
    report.missing = {
        str(split): rows["path"].astype(str).tolist() for split, rows in missing.groupby("split", sort=True)
    }
    frozen = frame.loc[known].reset_index(drop=True)
    frozen["split"] = frozen["path"].map(stored_split).to_numpy()
    report.relabelled = _relabelled(stored, frozen, current.labels)
    frozen, report.train_patients_left_out = _without_training_patients(frozen)
    return Manifest(frozen, list(current.labels)), report


def _relabelled(stored: Manifest, frozen: pd.DataFrame, labels: list[str]) -> list[str]:
    """Paths whose value of a label both manifests hold differs (NaN equals NaN)."""
    common = [label for label in labels if label in stored.labels]
    if not common:
        return []
    by_path = stored.frame.drop_duplicates("path").set_index("path")
    before = by_path.loc[frozen["path"], common].to_numpy(dtype=float)
    after = frozen[common].to_numpy(dtype=float)
    differs = ~((before == after) | (np.isnan(before) & np.isnan(after))).all(axis=1)
    return frozen.loc[differs, "path"].astype(str).tolist()


def _without_training_patients(frozen: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Drop non-train images of patients (today's ids) who also have training images."""
    train_patients = set(frozen.loc[frozen["split"] == "train", "patient_id"])
    clash = frozen["patient_id"].isin(train_patients) & (frozen["split"] != "train")
    patients = sorted(set(frozen.loc[clash, "patient_id"].astype(str)))
    return frozen.loc[~clash].reset_index(drop=True), patients


def _examples(items: list[str]) -> str:
    return ", ".join(items[:_EXAMPLES]) + (", ..." if len(items) > _EXAMPLES else "")


def fitted_on(run_dir: str | Path, checkpoint_file: str | Path, split: str = "val") -> dict[str, str | None]:
    """What operating points fitted on a run's ``split`` depend on: checkpoint name and SHA-256, the split,
    and the SHA-256 of the run's stored data manifest (None when it stores none)."""
    checkpoint_file = Path(checkpoint_file)
    return {
        "checkpoint": checkpoint_file.stem,
        "checkpoint_sha256": hashlib.sha256(checkpoint_file.read_bytes()).hexdigest(),
        "split": split,
        "data_sha256": run_manifest_hash(run_dir) if has_run_manifest(run_dir) else None,
    }


def fitted_on_mismatches(recorded: dict, run_dir: str | Path, checkpoint_file: str | Path) -> list[str]:
    """The ways thresholds recorded as fitted on ``recorded`` (see :func:`fitted_on`) do not belong to this
    checkpoint and data of the run; a field the record lacks is not compared."""
    actual = fitted_on(run_dir, checkpoint_file, str(recorded.get("split") or "val"))
    problems = []
    for key, what in (
        ("checkpoint_sha256", "another checkpoint"),
        ("data_sha256", "another version of the run's data"),
    ):
        if recorded.get(key) and actual[key] and recorded[key] != actual[key]:
            problems.append(
                f"they were fitted on {what} ({key} {recorded[key][:12]} is not {actual[key][:12]})"
            )
    if recorded.get("split") not in (None, "val"):
        problems.append(f"they were fitted on the {recorded['split']!r} split, not the validation split")
    return problems
