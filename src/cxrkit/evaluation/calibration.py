"""Calibration: expected calibration error, reliability diagrams and temperature scaling.

ECE (per label, on known entries) uses ``n_bins`` equal-width bins of the predicted probability:
bin ``k`` holds probabilities in ``[k/n, (k+1)/n)`` and the last bin also holds 1.0. Then

    ECE = sum_k (n_k / n) * | mean(y in bin k) - mean(p in bin k) |

i.e. the weighted mean absolute gap between observed frequency and mean confidence (the L1 calibration error
of torchmetrics' ``BinaryCalibrationError``, which agrees except that it puts p = 1.0 in a bin of its own).
For a multiclass task the per-class one-vs-rest probabilities are treated the same way.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T (``per_label=False``) or one T per
label, fitted on validation predictions by minimising the negative log-likelihood with L-BFGS; it changes no
ranking (AUROC, thresholds' order) but the probabilities' scale, and is then applied to test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cxrkit.evaluation.metrics import MACRO, MICRO, Predictions, mean_label_mask

DEFAULT_BINS = 15


def bin_edges(n_bins: int = DEFAULT_BINS) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.linspace(0.0, 1.0, n_bins + 1)


def reliability_table(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """One row per bin: edges, count, mean predicted probability, observed fraction positive (NaN targets
    are dropped; empty bins have count 0 and NaN means)."""
    y_true, y_prob = _known(y_true, y_prob)
    edges = bin_edges(n_bins)
    index = np.digitize(y_prob, edges[1:-1], right=False)  # k with edges[k] <= p < edges[k+1]
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=y_prob, minlength=n_bins) / count
        fraction_positive = np.bincount(index, weights=y_true, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "lower": edges[:-1],
            "upper": edges[1:],
            "count": count,
            "mean_predicted": mean_predicted,
            "fraction_positive": fraction_positive,
        }
    )


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE with equal-width bins (see the module docstring); NaN when no entry is known."""
    table = reliability_table(y_true, y_prob, n_bins)
    total = table["count"].sum()
    if total == 0:
        return float("nan")
    filled = table[table["count"] > 0]
    gaps = (filled["fraction_positive"] - filled["mean_predicted"]).abs()
    return float((gaps * filled["count"]).sum() / total)


def binary_nll(y_true: np.ndarray, y_prob: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of the known entries."""
    y_true, y_prob = _known(y_true, y_prob)
    if y_true.size == 0:
        return float("nan")
    p = np.clip(y_prob, eps, 1 - eps)
    return float(-np.mean(y_true * np.log(p) + (1 - y_true) * np.log1p(-p)))


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    y_true, y_prob = _known(y_true, y_prob)
    return float(np.mean((y_prob - y_true) ** 2)) if y_true.size else float("nan")


def calibration_table(pred: Predictions, n_bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """ECE, negative log-likelihood and Brier score per label, their ``macro`` mean (over the findings, as
    :func:`~cxrkit.evaluation.metrics.mean_label_mask` says) and the ``micro``
    value over all known image-label pairs pooled."""
    rows = {}
    for j, label in enumerate(pred.labels):
        rows[label] = _scores(pred.y_true[:, j], pred.y_score[:, j], n_bins)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc[MACRO] = table[mean_label_mask(pred.labels)].mean(numeric_only=True)
    table.loc[MICRO] = pd.Series(_scores(pred.y_true.ravel(), pred.y_score.ravel(), n_bins))
    table.index.name = "label"
    return table


def _scores(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int) -> dict[str, float]:
    return {
        "ece": expected_calibration_error(y_true, y_prob, n_bins),
        "nll": binary_nll(y_true, y_prob),
        "brier": brier_score(y_true, y_prob),
    }


def _known(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    if y_true.shape != y_prob.shape:
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} differ in size")
    known = ~np.isnan(y_true)
    return y_true[known], y_prob[known]


# ------------------------------------------------------------------------------------ temperature


@dataclass
class TemperatureScaler:
    """Logits / T -> probabilities; ``temperature`` has one entry (shared) or one per label."""

    temperature: np.ndarray
    labels: list[str]
    task: str = "multilabel"

    @classmethod
    def fit(
        cls, val_predictions: Predictions, per_label: bool = False, max_iter: int = 200
    ) -> TemperatureScaler:
        """Fit T on validation predictions (their logits, recovered from the scores) by minimising NLL."""
        if per_label and val_predictions.task == "multiclass":
            raise ValueError("per-label temperatures are for multilabel tasks; a multiclass task has one T")
        logits = torch.as_tensor(val_predictions.logits(), dtype=torch.float64)
        targets = torch.as_tensor(val_predictions.y_true, dtype=torch.float64)
        n_params = logits.shape[1] if per_label else 1
        log_t = torch.zeros(n_params, dtype=torch.float64, requires_grad=True)
        loss_fn = _multiclass_nll if val_predictions.task == "multiclass" else _masked_bce
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = loss_fn(logits / log_t.exp(), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = log_t.detach().exp().numpy()
        return cls(temperature, list(val_predictions.labels), val_predictions.task)

    def transform(self, pred: Predictions) -> Predictions:
        """The same predictions with temperature-scaled scores."""
        if list(pred.labels) != self.labels:
            raise ValueError(f"temperature fitted on labels {self.labels}, predictions have {pred.labels}")
        scaled = torch.as_tensor(pred.logits(), dtype=torch.float64) / torch.as_tensor(self.temperature)
        probs = scaled.softmax(dim=1) if self.task == "multiclass" else scaled.sigmoid()
        return Predictions(
            pred.y_true, probs.numpy(), pred.patient_ids, list(pred.labels), pred.metadata, pred.task
        )

    def to_dict(self) -> dict:
        values = [float(t) for t in self.temperature]
        if len(values) == 1:
            return {"temperature": values[0], "per_label": False, "task": self.task}
        return {
            "temperature": dict(zip(self.labels, values, strict=True)),
            "per_label": True,
            "task": self.task,
        }

    @classmethod
    def from_dict(cls, data: dict, labels: list[str]) -> TemperatureScaler:
        value = data["temperature"]
        temperature = [value[label] for label in labels] if isinstance(value, dict) else [value]
        if not all(math.isfinite(t) and t > 0 for t in temperature):
            raise ValueError(f"temperatures must be positive and finite, got {temperature}")
        return cls(np.asarray(temperature, dtype=np.float64), list(labels), data.get("task", "multilabel"))


def _masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(targets)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(targets), reduction="none"
    )
    # Mean per label, summed over labels: with per-label T the labels' fits are independent.
    per_label = (losses * known).sum(dim=0) / known.sum(dim=0).clamp(min=1)
    return per_label.sum()


def _multiclass_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    complete = ~torch.isnan(targets).any(dim=1)
    return torch.nn.functional.cross_entropy(logits[complete], targets[complete].argmax(dim=1))
