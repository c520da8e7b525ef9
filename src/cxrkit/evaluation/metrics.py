"""Predictions on a split and the metrics computed from them.

:class:`Predictions` holds everything evaluation needs as arrays, so it does not depend on how the scores
were produced: ``y_true`` (N x L, 1 / 0 / NaN = unknown), ``y_score`` (N x L probabilities), one patient id
per row, the label names and optional per-row metadata (``sex``, ``age``, ``view``, ``path``...).

Unknown (NaN) targets are excluded label by label: a row counts for every label it is annotated for. A label
whose known targets hold a single class has no ROC curve; its AUROC and AUPRC are NaN ("undefined") and are
left out of macro averages rather than raising. Ranking metrics come from scikit-learn.

The mean (``macro``) row averages the *findings*: "No Finding" is reported on its own row but left out of
the mean unless it is the only label (:func:`mean_label_mask`). The training monitor ``val/auroc_mean``
follows the same rule, so the number that picks the checkpoint is the number the report calls the mean.

Operating-point convention (used everywhere in cxrkit): a row is predicted positive when
``score >= threshold``, as scikit-learn's ``roc_curve`` thresholds are defined.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from cxrkit.data.labels import NO_FINDING

TASKS = ("multilabel", "multiclass")
TRUE_PREFIX = "true:"
SCORE_PREFIX = "score:"
#: Rows of the metric tables that average over labels.
MACRO = "macro"
MICRO = "micro"


@dataclass(eq=False)
class Predictions:
    """Targets and scores of one model on one split (rows = images, columns = labels).

    ``task="multiclass"`` means exactly one label per image (softmax scores, e.g. NORMAL vs PNEUMONIA):
    the full confusion matrix is then computed over argmax predictions. ``multilabel`` scores are
    independent per-label probabilities.
    """

    y_true: np.ndarray
    y_score: np.ndarray
    patient_ids: np.ndarray
    labels: list[str]
    metadata: pd.DataFrame | None = None
    task: Literal["multilabel", "multiclass"] = "multilabel"
    _known: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=np.float64)
        self.y_score = np.asarray(self.y_score, dtype=np.float64)
        self.patient_ids = np.asarray(self.patient_ids).astype(str)
        self.labels = [str(label) for label in self.labels]
        if self.y_true.ndim == 1:
            self.y_true = self.y_true[:, None]
        if self.y_score.ndim == 1:
            self.y_score = self.y_score[:, None]
        _validate(self)
        if self.metadata is not None:
            self.metadata = self.metadata.reset_index(drop=True)
        self._known = ~np.isnan(self.y_true)

    def __len__(self) -> int:
        return self.y_true.shape[0]

    @property
    def known(self) -> np.ndarray:
        """Boolean N x L mask of annotated targets."""
        return self._known

    @property
    def n_patients(self) -> int:
        return int(pd.unique(self.patient_ids).size)

    def column(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """Known targets and their scores for ``label``."""
        j = self._index(label)
        mask = self._known[:, j]
        return self.y_true[mask, j], self.y_score[mask, j]

    def subset(self, rows: np.ndarray) -> Predictions:
        """Rows selected by a boolean mask or an index array."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        metadata = None if self.metadata is None else self.metadata.iloc[rows]
        return Predictions(
            self.y_true[rows],
            self.y_score[rows],
            self.patient_ids[rows],
            list(self.labels),
            metadata,
            self.task,
        )

    def select_labels(self, labels: Sequence[str]) -> Predictions:
        columns = [self._index(label) for label in labels]
        return Predictions(
            self.y_true[:, columns],
            self.y_score[:, columns],
            self.patient_ids,
            list(labels),
            self.metadata,
            self.task,
        )

    def logits(self, eps: float = 1e-7) -> np.ndarray:
        """Scores mapped back to logits: ``log(p / (1 - p))`` (multilabel) or ``log p`` (multiclass)."""
        p = np.clip(self.y_score, eps, 1 - eps)
        return np.log(p) if self.task == "multiclass" else np.log(p) - np.log1p(-p)

    def to_frame(self) -> pd.DataFrame:
        """One row per image: ``patient_id``, metadata, ``true:<label>`` and ``score:<label>`` columns."""
        frame = pd.DataFrame({"patient_id": self.patient_ids})
        if self.metadata is not None:
            extra = self.metadata.drop(columns=["patient_id"], errors="ignore")
            frame = pd.concat([frame, extra], axis=1)
        targets = pd.DataFrame(self.y_true, columns=[TRUE_PREFIX + label for label in self.labels])
        scores = pd.DataFrame(self.y_score, columns=[SCORE_PREFIX + label for label in self.labels])
        return pd.concat([frame, targets, scores], axis=1)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, task: str = "multilabel") -> Predictions:
        """Inverse of :meth:`to_frame`; every column that is neither a target nor a score is metadata."""
        if "patient_id" not in frame.columns:
            raise ValueError("predictions table is missing column 'patient_id'")
        labels = [c[len(TRUE_PREFIX) :] for c in frame.columns if c.startswith(TRUE_PREFIX)]
        missing = [label for label in labels if SCORE_PREFIX + label not in frame.columns]
        if not labels or missing:
            raise ValueError(
                f"predictions table needs 'true:<label>' and 'score:<label>' columns "
                f"(labels without scores: {missing})"
            )
        meta_columns = [
            c for c in frame.columns if not c.startswith((TRUE_PREFIX, SCORE_PREFIX)) and c != "patient_id"
        ]
        metadata = frame[meta_columns].reset_index(drop=True) if meta_columns else None
        return cls(
            frame[[TRUE_PREFIX + label for label in labels]].to_numpy(dtype=float),
            frame[[SCORE_PREFIX + label for label in labels]].to_numpy(dtype=float),
            frame["patient_id"].astype(str).to_numpy(),
            labels,
            metadata,
            task,
        )  # type: ignore[arg-type]

    def save(self, path: str | Path) -> Path:
        """Write the table of :meth:`to_frame` as CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_csv(path, index=False)
        return path

    @classmethod
    def load(cls, path: str | Path, task: str = "multilabel") -> Predictions:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"predictions file not found: {path}")
        frame = pd.read_csv(
            path,
            dtype={"patient_id": str, "sex": str, "view": str, "path": str},
            keep_default_na=False,
            na_values=[""],
        )
        for column in ("sex", "view"):
            if column in frame:
                frame[column] = frame[column].fillna("")
        try:
            return cls.from_frame(frame, task)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def _index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"label {label!r} not in predictions (labels: {self.labels})") from None


def _validate(pred: Predictions) -> None:
    n, n_labels = pred.y_true.shape
    if pred.y_true.ndim != 2 or pred.y_score.shape != pred.y_true.shape:
        raise ValueError(f"y_true {pred.y_true.shape} and y_score {pred.y_score.shape} must both be N x L")
    if len(pred.labels) != n_labels:
        raise ValueError(f"{len(pred.labels)} label names for {n_labels} label columns")
    if len(set(pred.labels)) != len(pred.labels):
        raise ValueError(f"label names must be unique: {pred.labels}")
    if pred.patient_ids.shape != (n,):
        raise ValueError(f"patient_ids has shape {pred.patient_ids.shape}, expected ({n},)")
    finite = pred.y_true[~np.isnan(pred.y_true)]
    if finite.size and not np.isin(finite, (0.0, 1.0)).all():
        raise ValueError("y_true must hold 1, 0 or NaN (unknown)")
    if not np.isfinite(pred.y_score).all():
        raise ValueError("y_score must be finite (NaN or inf found)")
    if pred.y_score.size and (pred.y_score.min() < 0 or pred.y_score.max() > 1):
        raise ValueError("y_score must hold probabilities in [0, 1] (apply sigmoid/softmax to logits first)")
    if pred.metadata is not None and len(pred.metadata) != n:
        raise ValueError(f"metadata has {len(pred.metadata)} rows for {n} predictions")
    if pred.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {pred.task!r}")


# --------------------------------------------------------------------------------------------- ranking


def is_defined(y_true: np.ndarray) -> bool:
    """Whether a ROC curve exists: at least one known positive and one known negative."""
    y_true = y_true[~np.isnan(y_true)]
    return bool((y_true == 1).any() and (y_true == 0).any())


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of the known entries; NaN when only one class is present."""
    known = ~np.isnan(y_true)
    if not is_defined(y_true):
        return float("nan")
    return float(roc_auc_score(y_true[known], y_score[known]))


def auprc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step-wise); NaN when undefined."""
    known = ~np.isnan(y_true)
    if not is_defined(y_true):
        return float("nan")
    return float(average_precision_score(y_true[known], y_score[known]))


def ranking_table(pred: Predictions) -> pd.DataFrame:
    """Per-label counts, prevalence, AUROC and AUPRC, plus ``macro`` (mean over the defined findings) and
    ``micro`` (all known image-label pairs pooled) rows. Indexed by label."""
    rows = []
    for j, label in enumerate(pred.labels):
        y, s = pred.y_true[:, j], pred.y_score[:, j]
        rows.append({"label": label, **_counts(y), "auroc": auroc(y, s), "auprc": auprc(y, s)})
    table = pd.DataFrame(rows).set_index("label")
    y_flat, s_flat = pred.y_true.ravel(), pred.y_score.ravel()
    micro = {**_counts(y_flat), "auroc": auroc(y_flat, s_flat), "auprc": auprc(y_flat, s_flat)}
    table.loc[MACRO] = _macro_row(table, pred.labels, ("auroc", "auprc"))
    table.loc[MICRO] = micro
    return table


def _macro_row(table: pd.DataFrame, labels: Sequence[str], averaged: Sequence[str]) -> dict[str, float]:
    """The ``macro`` row: the mean of each ``averaged`` column over :func:`mean_label_mask`; NaN elsewhere."""
    mean_rows = table[mean_label_mask(labels)]
    return {column: _nanmean(mean_rows[column]) if column in averaged else np.nan for column in table.columns}


def mean_label_mask(labels: Sequence[str]) -> np.ndarray:
    """Which labels the mean (``macro``) averages: every finding; "No Finding" only when it is alone."""
    findings = np.array([label != NO_FINDING for label in labels], dtype=bool)
    return findings if findings.any() else np.ones(len(findings), dtype=bool)


def _counts(y: np.ndarray) -> dict[str, float]:
    known = y[~np.isnan(y)]
    n_pos = int((known == 1).sum())
    return {
        "n": known.size,
        "n_pos": n_pos,
        "n_neg": known.size - n_pos,
        "prevalence": n_pos / known.size if known.size else np.nan,
    }


def _nanmean(values: pd.Series | np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# --------------------------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """Points of a ROC (x = false positive rate, y = true positive rate) or PR (x = recall,
    y = precision) curve, with the score thresholds that produce them."""

    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray

    def resample(self, grid: np.ndarray) -> np.ndarray:
        """``y`` at the ``x`` values of ``grid`` (linear interpolation; for compact storage)."""
        order = np.argsort(self.x, kind="stable")
        return np.interp(grid, self.x[order], self.y[order])


def roc_curves(pred: Predictions) -> dict[str, Curve]:
    """ROC curve per defined label (scikit-learn ``roc_curve`` on the known entries)."""
    return _per_defined_label(pred, lambda y, s: Curve(*roc_curve(y, s)))


def pr_curves(pred: Predictions) -> dict[str, Curve]:
    """Precision-recall curve per defined label (scikit-learn ``precision_recall_curve``)."""

    def recall_precision(y: np.ndarray, s: np.ndarray) -> Curve:
        precision, recall, thresholds = precision_recall_curve(y, s)
        return Curve(recall, precision, np.append(thresholds, np.inf))

    return _per_defined_label(pred, recall_precision)


def _per_defined_label(
    pred: Predictions, curve: Callable[[np.ndarray, np.ndarray], Curve]
) -> dict[str, Curve]:
    """``curve(targets, scores)`` of each label's known entries, for the labels defined on ``pred``."""
    columns = {label: pred.column(label) for label in pred.labels}
    return {label: curve(y, s) for label, (y, s) in columns.items() if is_defined(y)}


# ----------------------------------------------------------------------------------- operating points

#: Columns of :func:`threshold_table` derived from the confusion counts.
RATE_COLUMNS = ("sensitivity", "specificity", "precision", "npv", "f1", "accuracy")


def binarize(y_score: np.ndarray, labels: Sequence[str], thresholds: Mapping[str, float]) -> np.ndarray:
    """0/1 predictions: ``score >= threshold`` of each label's column."""
    missing = [label for label in labels if label not in thresholds]
    if missing:
        raise KeyError(f"no threshold for labels {missing}")
    cut = np.array([thresholds[label] for label in labels], dtype=float)
    return (np.asarray(y_score) >= cut).astype(np.int8)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """TP/FP/TN/FN of binary predictions on the known entries (scikit-learn ``confusion_matrix``)."""
    known = ~np.isnan(y_true)
    if not known.any():
        return {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    tn, fp, fn, tp = confusion_matrix(
        y_true[known].astype(int), y_pred[known].astype(int), labels=[0, 1]
    ).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def rates(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity (= recall), specificity, precision (PPV), NPV, F1 and accuracy from confusion counts
    (arrays broadcast; a rate with an empty denominator is NaN)."""
    tp, fp, tn, fn = (np.asarray(a, dtype=float) for a in (tp, fp, tn, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(
        numerator,
        denominator,
        out=np.full(np.broadcast(numerator, denominator).shape, np.nan),
        where=denominator > 0,
    )


def threshold_table(pred: Predictions, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """Per-label threshold, confusion counts and rates at that threshold, plus ``macro`` (mean of the
    per-label rates) and ``micro`` (rates of the summed counts) rows. Indexed by label."""
    predicted = binarize(pred.y_score, pred.labels, thresholds)
    rows = []
    for j, label in enumerate(pred.labels):
        counts = confusion_counts(pred.y_true[:, j], predicted[:, j])
        rows.append(
            {
                "label": label,
                "threshold": float(thresholds[label]),
                **counts,
                **{k: float(v) for k, v in rates(**counts).items()},
            }
        )
    table = pd.DataFrame(rows).set_index("label")
    for column in ("tp", "fp", "tn", "fn"):
        table[column] = table[column].astype(float)
    summed = {k: float(table[k].sum()) for k in ("tp", "fp", "tn", "fn")}
    micro = {"threshold": np.nan, **summed, **{k: float(v) for k, v in rates(**summed).items()}}
    table.loc[MACRO] = _macro_row(table, pred.labels, RATE_COLUMNS)
    table.loc[MICRO] = micro
    return table


def multiclass_confusion(pred: Predictions, threshold: float = 0.5) -> pd.DataFrame:
    """Full confusion matrix of a single-label task: rows = true class, columns = predicted (argmax).

    With one label (binary task) the classes are ``not <label>`` and ``<label>``, predicted at
    ``threshold``; rows with any unknown target are skipped.
    """
    complete = pred.known.all(axis=1)
    if len(pred.labels) == 1:
        names = [f"not {pred.labels[0]}", pred.labels[0]]
        truth = pred.y_true[complete, 0].astype(int)
        guess = (pred.y_score[complete, 0] >= threshold).astype(int)
    else:
        rows = pred.y_true[complete]
        if not np.all(rows.sum(axis=1) == 1):
            raise ValueError("multiclass confusion needs exactly one positive label per image")
        names = list(pred.labels)
        truth = rows.argmax(axis=1)
        guess = pred.y_score[complete].argmax(axis=1)
    matrix = confusion_matrix(truth, guess, labels=list(range(len(names))))
    return pd.DataFrame(matrix, index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted"))
