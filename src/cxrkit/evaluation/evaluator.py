"""Evaluate test predictions end to end: metrics with patient-bootstrap intervals at validation-chosen
operating points, calibration, subgroups and the leakage check, collected in one :class:`EvaluationResult`.

>>> result = evaluate(test_predictions, val_predictions, threshold_method="youden", n_replicates=1000)
>>> print(result.summary())
>>> write_evaluation_report(result, "runs/x/eval")   # cxrkit.evaluation.report

Operating points come, in this order, from ``operating_points`` (e.g. stored with the model), from
``val`` predictions (chosen by ``threshold_method``), or default to 0.5 — never from the test labels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxrkit.evaluation import bootstrap as bs
from cxrkit.evaluation import calibration as cal
from cxrkit.evaluation import metrics
from cxrkit.evaluation.leakage import LeakageReport
from cxrkit.evaluation.metrics import MACRO, MICRO, Curve, Predictions
from cxrkit.evaluation.subgroups import ATTRIBUTES, SubgroupResult, analyse_subgroups
from cxrkit.evaluation.thresholds import OperatingPoints

TEMPERATURE_MODES = ("none", "global", "per_label")
_CURVE_GRID = np.linspace(0.0, 1.0, 101)


@dataclass
class EvaluationResult:
    """Everything the report shows. ``table`` has one row per label plus ``macro`` and ``micro``."""

    predictions: Predictions
    table: pd.DataFrame
    operating_points: OperatingPoints
    roc: dict[str, Curve]
    pr: dict[str, Curve]
    calibration: pd.DataFrame
    reliability: dict[str, pd.DataFrame]
    settings: dict
    temperature: cal.TemperatureScaler | None = None
    subgroups: SubgroupResult | None = None
    leakage: LeakageReport | None = None
    multiclass_confusion: pd.DataFrame | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.predictions.labels)

    def summary(self) -> str:
        """Plain-text headline: mean AUROC with interval, operating points, leakage."""
        macro = self.table.loc[MACRO]
        level = self.settings["level"]
        lines = [
            f"{len(self.predictions):,} images, {self.predictions.n_patients:,} patients, "
            f"{len(self.labels)} labels",
            f"mean AUROC {macro['auroc']:.4f} ({level:.0%} CI {macro['auroc_low']:.4f}-"
            f"{macro['auroc_high']:.4f}, "
            f"{self.settings['n_replicates']} {self.settings['unit']} bootstrap replicates)",
            f"mean AUPRC {macro['auprc']:.4f}; {self.operating_points.describe()}: mean sensitivity "
            f"{macro['sensitivity']:.3f}, specificity {macro['specificity']:.3f}",
        ]
        undefined = [label for label in self.labels if not np.isfinite(self.table.loc[label, "auroc"])]
        if undefined:
            lines.append(f"undefined AUROC (single class in test): {', '.join(undefined)}")
        if self.leakage is not None:
            lines.append(self.leakage.summary())
        if self.subgroups is not None and self.subgroups.largest_gap is not None:
            lines.append(self.subgroups.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable numbers (NaN -> None); curves resampled on a 101-point grid."""
        out = {
            "settings": self.settings,
            "n_images": len(self.predictions),
            "n_patients": self.predictions.n_patients,
            "labels": self.labels,
            "task": self.predictions.task,
            "operating_points": self.operating_points.to_dict(),
            "metrics": _records(self.table),
            "calibration": _records(self.calibration),
            "temperature": None if self.temperature is None else self.temperature.to_dict(),
            "reliability": {
                name: table.to_dict(orient="records") for name, table in self.reliability.items()
            },
            "roc_curves": {
                "fpr": _CURVE_GRID.tolist(),
                "tpr": {label: c.resample(_CURVE_GRID).tolist() for label, c in self.roc.items()},
            },
            "pr_curves": {
                "recall": _CURVE_GRID.tolist(),
                "precision": {label: c.resample(_CURVE_GRID).tolist() for label, c in self.pr.items()},
            },
            "leakage": None if self.leakage is None else self.leakage.to_dict(),
            "timings_s": self.timings,
        }
        if self.subgroups is not None:
            out["subgroups"] = self.subgroups.table.to_dict(orient="records")
            out["subgroup_gaps"] = self.subgroups.gaps.to_dict(orient="records")
        if self.multiclass_confusion is not None:
            matrix = self.multiclass_confusion
            out["confusion_matrix"] = {"classes": list(matrix.index), "counts": matrix.to_numpy().tolist()}
        return jsonable(out)


def evaluate(
    test: Predictions,
    val: Predictions | None = None,
    *,
    operating_points: OperatingPoints | None = None,
    threshold_method: str = "youden",
    target_sensitivity: float = 0.9,
    n_replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "patient",
    n_bins: int = cal.DEFAULT_BINS,
    temperature: str = "none",
    subgroup_attributes: Sequence[str] | None = ATTRIBUTES,
    leakage: LeakageReport | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate ``test``; ``val`` (validation predictions of the same model) is used only to choose
    operating points and fit the temperature, never to score."""
    if temperature not in TEMPERATURE_MODES:
        raise ValueError(f"temperature must be one of {TEMPERATURE_MODES}, got {temperature!r}")
    if temperature != "none" and val is None:
        raise ValueError("temperature scaling needs validation predictions (val=...)")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    points = _operating_points(test, val, operating_points, threshold_method, target_sensitivity)
    lap("thresholds")
    ranking = metrics.ranking_table(test)
    at_threshold = metrics.threshold_table(test, points.thresholds)
    roc, pr = metrics.roc_curves(test), metrics.pr_curves(test)
    lap("metrics")
    intervals = bs.bootstrap(
        test,
        points.thresholds,
        n_replicates=n_replicates,
        level=level,
        seed=seed,
        unit=unit,
        progress=progress,
    )
    table = _combine(ranking, at_threshold, intervals.table())
    lap("bootstrap")
    calibration, reliability, scaler = _calibration(test, val, temperature, n_bins)
    lap("calibration")
    subgroups = None
    if subgroup_attributes and test.metadata is not None:
        subgroups = analyse_subgroups(
            test, subgroup_attributes, n_replicates=n_replicates, level=level, seed=seed, progress=progress
        )
    lap("subgroups")
    confusion = None
    if test.task == "multiclass" or len(test.labels) == 1:
        confusion = metrics.multiclass_confusion(test, points.thresholds[test.labels[0]])
    settings = {
        "n_replicates": n_replicates,
        "level": level,
        "seed": seed,
        "unit": unit,
        "n_bins": n_bins,
        "temperature": temperature,
        "interval": "percentile bootstrap",
    }
    timings["total"] = round(sum(timings.values()), 4)
    return EvaluationResult(
        predictions=test,
        table=table,
        operating_points=points,
        roc=roc,
        pr=pr,
        calibration=calibration,
        reliability=reliability,
        settings=settings,
        temperature=scaler,
        subgroups=subgroups,
        leakage=leakage,
        multiclass_confusion=confusion,
        timings=timings,
    )


def _operating_points(
    test: Predictions, val: Predictions | None, given: OperatingPoints | None, method: str, target: float
) -> OperatingPoints:
    if given is not None:
        missing = [label for label in test.labels if label not in given.thresholds]
        if missing:
            raise ValueError(f"the given operating points have no threshold for {missing}")
        return given
    if val is not None:
        if list(val.labels) != list(test.labels):
            raise ValueError(f"validation labels {val.labels} differ from test labels {test.labels}")
        return OperatingPoints.fit(val, method, target, source="val")
    thresholds = {label: 0.5 for label in test.labels}
    return OperatingPoints(thresholds, "fixed", source="default (no validation predictions)")


def _combine(ranking: pd.DataFrame, at_threshold: pd.DataFrame, intervals: pd.DataFrame) -> pd.DataFrame:
    table = ranking.join(at_threshold)
    for column in intervals.columns:
        table[column] = intervals[column]
    order = ["n", "n_pos", "n_neg", "prevalence"]
    for name in ("auroc", "auprc", *metrics.RATE_COLUMNS):
        order += [name, f"{name}_low", f"{name}_high"]
    order += ["threshold", "tp", "fp", "tn", "fn"]
    rest = [c for c in table.columns if c not in order]
    return table[order + rest]


def _calibration(
    test: Predictions, val: Predictions | None, temperature: str, n_bins: int
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], cal.TemperatureScaler | None]:
    table = cal.calibration_table(test, n_bins)
    reliability = {
        label: cal.reliability_table(test.y_true[:, j], test.y_score[:, j], n_bins)
        for j, label in enumerate(test.labels)
    }
    reliability[MICRO] = cal.reliability_table(test.y_true, test.y_score, n_bins)
    if temperature == "none" or val is None:
        return table, reliability, None
    scaler = cal.TemperatureScaler.fit(val, per_label=temperature == "per_label")
    scaled = scaler.transform(test)
    scaled_table = cal.calibration_table(scaled, n_bins).add_suffix("_scaled")
    reliability[f"{MICRO}_scaled"] = cal.reliability_table(scaled.y_true, scaled.y_score, n_bins)
    return table.join(scaled_table), reliability, scaler


def _records(table: pd.DataFrame) -> list[dict]:
    return table.reset_index().to_dict(orient="records")


def jsonable(value: object) -> object:
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if np.isfinite(value) else None
    return value
