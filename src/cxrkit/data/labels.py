"""One pathology vocabulary for every dataset, with per-dataset synonyms.

Targets are multi-hot rows over a list of canonical labels: 1 = present, 0 = annotated and absent,
NaN = the dataset never annotates that label (unknown). Unknown labels are masked by every loss and
metric, so datasets with different label sets can be merged and trained together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

NO_FINDING = "No Finding"

#: The 14 findings of NIH ChestX-ray14, in the order of the original papers (canonical spelling).
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural Thickening",
    "Hernia",
)

#: Findings that PadChest brings to the vocabulary (neither NIH nor CheXpert annotates them).
PADCHEST_EXTRA_FINDINGS: tuple[str, ...] = (
    "Tube",
    "Electrical Device",
    "Granuloma",
    "Calcification",
    "Scoliosis",
    "Aortic Elongation",
)

#: Findings beyond NIH that CheXpert, PadChest or OpenI annotate.
EXTRA_FINDINGS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Lung Opacity",
    "Lung Lesion",
    "Fracture",
    "Pleural Other",
    "Support Devices",
    *PADCHEST_EXTRA_FINDINGS,
)

#: Every canonical finding (No Finding excluded), in a fixed order.
FINDINGS: tuple[str, ...] = NIH_FINDINGS + EXTRA_FINDINGS

#: Canonical vocabulary: findings plus "No Finding".
VOCABULARY: tuple[str, ...] = (*FINDINGS, NO_FINDING)

_SYNONYMS: dict[str, str] = {
    # NIH spellings
    "pleural_thickening": "Pleural Thickening",
    "infiltrate": "Infiltration",  # BBox_List_2017
    "infiltrates": "Infiltration",
    "no finding": NO_FINDING,
    # CheXpert
    "pleural effusion": "Effusion",
    # PadChest (lower-case names, as in its Labels column)
    "normal": NO_FINDING,
    "pulmonary fibrosis": "Fibrosis",
    "fibrotic band": "Fibrosis",
    "hiatal hernia": "Hernia",
    "interstitial pattern": "Infiltration",
    "reticular interstitial pattern": "Infiltration",
    "reticulonodular interstitial pattern": "Infiltration",
    "ground glass pattern": "Infiltration",
    "alveolar pattern": "Consolidation",
    "pulmonary mass": "Mass",
    "pulmonary edema": "Edema",
    "apical pleural thickening": "Pleural Thickening",
    "costophrenic angle blunting": "Effusion",
    "laminar atelectasis": "Atelectasis",
    "lobar atelectasis": "Atelectasis",
    "segmental atelectasis": "Atelectasis",
    "round atelectasis": "Atelectasis",
    "total atelectasis": "Atelectasis",
    "multiple nodules": "Nodule",
    "calcified granuloma": "Granuloma",
    "rib fracture": "Fracture",
    "clavicle fracture": "Fracture",
    "vertebral fracture": "Fracture",
    "humeral fracture": "Fracture",
    "nsg tube": "Tube",
    "endotracheal tube": "Tube",
    "chest drain tube": "Tube",
    "tracheostomy tube": "Tube",
    "central venous catheter": "Tube",
    "central venous catheter via jugular vein": "Tube",
    "central venous catheter via subclavian vein": "Tube",
    "electrical device": "Electrical Device",
    "pacemaker": "Electrical Device",
    "dual chamber device": "Electrical Device",
    "single chamber device": "Electrical Device",
    "aortic elongation": "Aortic Elongation",
    "callus rib fracture": "Fracture",
    "loculated pleural effusion": "Effusion",
    "loculated fissural effusion": "Effusion",
    "atelectasis basal": "Atelectasis",
    "calcified pleural thickening": "Pleural Thickening",
    "pleural plaques": "Pleural Thickening",
    "calcified pleural plaques": "Pleural Thickening",
    "central venous catheter via umbilical vein": "Tube",
    "reservoir central venous catheter": "Tube",
    "catheter": "Tube",
    "atypical pneumonia": "Pneumonia",
    "air bronchogram": "Consolidation",
    "hydropneumothorax": "Pneumothorax",
    "calcified densities": "Calcification",
    "calcified adenopathy": "Calcification",
    "calcified mediastinal adenopathy": "Calcification",
    "heart valve calcified": "Calcification",
    # OpenI (MeSH-style major terms)
    "pulmonary atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "pulmonary emphysema": "Emphysema",
    "lung, hyperlucent": "Emphysema",
    "opacity": "Lung Opacity",
    "lung opacity": "Lung Opacity",
    "granulomatous disease": "Granuloma",
    "calcinosis": "Calcification",
    "fractures, bone": "Fracture",
    "hernia, hiatal": "Hernia",
    "hernia, diaphragmatic": "Hernia",
    "catheters, indwelling": "Tube",
    "tube, inserted": "Tube",
    "airspace disease": "Lung Opacity",
    "pulmonary congestion": "Edema",
    "lung diseases, interstitial": "Infiltration",
    "bullous emphysema": "Emphysema",
    "hemopneumothorax": "Pneumothorax",
    # Folder datasets (pediatric pneumonia)
    "pneumonia": "Pneumonia",
    "bacterial pneumonia": "Pneumonia",
    "viral pneumonia": "Pneumonia",
}


def _normalise(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


_LOOKUP: dict[str, str] = {_normalise(label): label for label in VOCABULARY}
_LOOKUP.update({_normalise(alias): label for alias, label in _SYNONYMS.items()})


def canonical(name: str) -> str | None:
    """Return the canonical label for a dataset's spelling of a finding, or None when it is not mapped."""
    return _LOOKUP.get(_normalise(name))


def canonical_or_raise(name: str, *, field: str = "label") -> str:
    """Like :func:`canonical`, but raise a ValueError naming the unknown ``field`` value."""
    label = canonical(name)
    if label is None:
        raise ValueError(f"unknown {field} {name!r}: not in the cxrkit vocabulary (cxrkit.data.labels)")
    return label


def encode(positives: Iterable[str], annotated: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Multi-hot row over ``labels``: 1 for positives, 0 for annotated-but-absent, NaN when not annotated.

    ``positives`` and ``annotated`` must already be canonical. "No Finding" is set to 1 when it is in
    ``labels``, annotated, and no other annotated finding is positive.
    """
    positive_set = set(positives)
    annotated_set = set(annotated)
    row = np.full(len(labels), math.nan, dtype=np.float32)
    for i, label in enumerate(labels):
        if label == NO_FINDING:
            continue
        if label in annotated_set:
            row[i] = 1.0 if label in positive_set else 0.0
    if NO_FINDING in labels and NO_FINDING in annotated_set:
        any_positive = bool(positive_set & (annotated_set - {NO_FINDING}))
        row[list(labels).index(NO_FINDING)] = 0.0 if any_positive else 1.0
    return row


def as_rows(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets as float rows ``[B, C]``: class indices ``[B]`` (single-label ``ce`` tasks; negative =
    unknown) become one-hot rows, NaN where unknown; rows ``[B, C]`` are returned as they are."""
    if targets.ndim == 2:
        return targets
    one_hot = torch.nn.functional.one_hot(targets.clamp(min=0).long(), num_classes).float()
    return torch.where((targets >= 0)[:, None], one_hot, torch.full_like(one_hot, float("nan")))


def order(labels: Iterable[str]) -> list[str]:
    """Sort canonical labels into vocabulary order; custom labels (outside the vocabulary) go last."""
    known = {label: i for i, label in enumerate(VOCABULARY)}
    unique = list(dict.fromkeys(labels))
    return sorted(unique, key=lambda label: (known.get(label, len(known)), label))
