"""Operating points chosen on the validation split, stored with the model, applied unchanged to test.

Methods (per label, on the known validation entries; a row is positive when ``score >= threshold``):

``youden``
    maximises Youden's J = sensitivity + specificity - 1 over the ROC thresholds (the highest threshold
    among ties);
``f1``
    maximises F1 over the precision-recall thresholds (the highest threshold among ties);
``sensitivity``
    the highest threshold whose validation sensitivity is at least ``target_sensitivity`` (the most
    specific operating point that still catches the target fraction of positives);
``fixed``
    ``fixed_threshold`` (0.5 by default) for every label, ignoring the data.

A label whose validation entries hold one class cannot be tuned; it gets ``fixed_threshold`` and a
warning. :func:`choose_thresholds` never sees test data; pass it validation predictions only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from cxrkit.evaluation.metrics import Predictions, is_defined

log = logging.getLogger(__name__)

METHODS = ("youden", "f1", "sensitivity", "fixed")


def choose_thresholds(
    val_predictions: Predictions,
    method: str = "youden",
    target_sensitivity: float = 0.9,
    fixed_threshold: float = 0.5,
) -> dict[str, float]:
    """One threshold per label of ``val_predictions`` (plain floats, JSON-serialisable)."""
    if method not in METHODS:
        raise ValueError(f"threshold method must be one of {METHODS}, got {method!r}")
    if method == "sensitivity" and not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    thresholds = {}
    for label in val_predictions.labels:
        y_true, y_score = val_predictions.column(label)
        if method == "fixed":
            thresholds[label] = float(fixed_threshold)
        elif not is_defined(y_true):
            log.warning(
                "label %r lacks a known positive or negative in the validation split; using threshold %s",
                label,
                fixed_threshold,
            )
            thresholds[label] = float(fixed_threshold)
        else:
            thresholds[label] = _CHOOSERS[method](y_true, y_score, target_sensitivity)
    return thresholds


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray, _: float = 0.0) -> float:
    """Threshold maximising sensitivity + specificity - 1."""
    fpr, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    j = tpr[finite] - fpr[finite]
    return float(thresholds[finite][_first_max(j)])  # thresholds descend: the first is the highest


def f1_threshold(y_true: np.ndarray, y_score: np.ndarray, _: float = 0.0) -> float:
    """Threshold maximising F1 = 2 PR / (P + R)."""
    precision, recall, thresholds = precision_recall_curve(y_true, y_score)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(thresholds[::-1][_first_max(f1[::-1])])  # thresholds ascend: search from the highest


def sensitivity_threshold(y_true: np.ndarray, y_score: np.ndarray, target: float = 0.9) -> float:
    """Highest threshold with sensitivity >= ``target``."""
    _, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
    reaching = np.flatnonzero((tpr >= target - 1e-12) & np.isfinite(thresholds))
    return float(thresholds[reaching[0]])  # thresholds descend, tpr ascends


def _first_max(values: np.ndarray, tolerance: float = 1e-12) -> int:
    """Index of the first value within ``tolerance`` of the maximum (ties differ by rounding only)."""
    return int(np.flatnonzero(values >= values.max() - tolerance)[0])


_CHOOSERS = {"youden": youden_threshold, "f1": f1_threshold, "sensitivity": sensitivity_threshold}


@dataclass
class OperatingPoints:
    """Thresholds with their provenance, as stored next to a model (``thresholds.json``)."""

    thresholds: dict[str, float]
    method: str
    target_sensitivity: float | None = None
    source: str = "val"
    n_images: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        val_predictions: Predictions,
        method: str = "youden",
        target_sensitivity: float = 0.9,
        fixed_threshold: float = 0.5,
        source: str = "val",
    ) -> OperatingPoints:
        thresholds = choose_thresholds(val_predictions, method, target_sensitivity, fixed_threshold)
        return cls(
            thresholds,
            method,
            target_sensitivity if method == "sensitivity" else None,
            source,
            len(val_predictions),
        )

    def describe(self) -> str:
        how = {
            "youden": "maximising Youden's J",
            "f1": "maximising F1",
            "sensitivity": f"at sensitivity >= {self.target_sensitivity}",
            "fixed": "fixed",
        }.get(self.method, self.method)
        size = f", {self.n_images:,} images" if self.n_images else ""
        return f"thresholds {how}, chosen on the {self.source} split{size}"

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> OperatingPoints:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"thresholds file not found: {path}")
        data = json.loads(path.read_text())
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a cxrkit thresholds file ({error})") from error

    @classmethod
    def from_dict(cls, data: Mapping) -> OperatingPoints:
        thresholds = {str(k): float(v) for k, v in data["thresholds"].items()}
        bad = [k for k, v in thresholds.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"non-finite thresholds for {bad}")
        return cls(
            thresholds,
            str(data["method"]),
            data.get("target_sensitivity"),
            data.get("source", "val"),
            data.get("n_images"),
            dict(data.get("extra", {})),
        )
