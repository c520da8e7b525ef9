"""Patient leakage check: does any patient have images in more than one split?

A patient in both train and test inflates test metrics (the model has seen that patient's anatomy, devices
and reader), which is why NIH ChestX-ray14's official split and every cxrkit split are patient-wise. Given
the training patients a run stored (:func:`cxrkit.data.run_manifest.load_run_manifest`), the check also
compares every evaluated split with them, so data that changed on disk after training cannot hide a leak.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd


@dataclass
class LeakageReport:
    """Patients per split and, for every pair of splits, the patients they share."""

    patients_per_split: dict[str, int]
    shared: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not any(self.shared.values())

    def summary(self, max_examples: int = 5) -> str:
        sizes = ", ".join(f"{split}: {n:,} patients" for split, n in self.patients_per_split.items())
        if self.ok:
            return f"No patient appears in more than one split ({sizes})."
        parts = []
        for pair, patients in self.shared.items():
            if patients:
                examples = ", ".join(patients[:max_examples]) + (
                    ", ..." if len(patients) > max_examples else ""
                )
                parts.append(
                    f"{len(patients):,} patients in both {pair.replace('/', ' and ')} (e.g. {examples})"
                )
        return f"Patient leakage: {'; '.join(parts)} ({sizes})."

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "patients_per_split": self.patients_per_split,
            "shared_patients": {pair: len(p) for pair, p in self.shared.items()},
            "examples": {pair: p[:20] for pair, p in self.shared.items() if p},
        }


RUN_TRAIN = "run train"


def check_patient_leakage(
    patient_ids: np.ndarray | pd.Series,
    splits: np.ndarray | pd.Series,
    training_patients: Iterable[str] | None = None,
) -> LeakageReport:
    """Compare the patient sets of the splits given per row (rows with an empty split are ignored) and,
    with ``training_patients`` (the run's stored ones), each split but train with them too."""
    frame = pd.DataFrame(
        {"patient": np.asarray(patient_ids).astype(str), "split": np.asarray(splits).astype(str)}
    )
    if len(frame) == 0:
        raise ValueError("leakage check needs at least one row")
    frame = frame[frame["split"] != ""]
    patients = {split: set(group["patient"]) for split, group in frame.groupby("split", sort=False)}
    order = sorted(patients, key=_split_rank)
    shared = {f"{a}/{b}": sorted(patients[a] & patients[b]) for a, b in combinations(order, 2)}
    sizes = {split: len(patients[split]) for split in order}
    if training_patients is not None:
        trained = {str(patient) for patient in training_patients}
        sizes[RUN_TRAIN] = len(trained)
        for split in order:
            if split != "train":
                shared[f"{RUN_TRAIN}/{split}"] = sorted(trained & patients[split])
    return LeakageReport(sizes, shared)


def _split_rank(split: str) -> tuple[int, str]:
    known = {"train": 0, "val": 1, "test": 2}
    return known.get(split, len(known)), split
