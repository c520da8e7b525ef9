"""Evaluation of chest X-ray classifiers: metrics with patient-bootstrap intervals, validation-chosen
operating points, calibration, subgroups, leakage checks, paired comparisons and reports.

The main names are importable from here; they load their module on first use, so importing one submodule
(e.g. :mod:`cxrkit.evaluation.metrics`) does not pull in the model and data code of :mod:`.run`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Predictions": "metrics",
    "EvaluationResult": "evaluator",
    "evaluate": "evaluator",
    "OperatingPoints": "thresholds",
    "choose_thresholds": "thresholds",
    "LeakageReport": "leakage",
    "check_patient_leakage": "leakage",
    "ComparisonResult": "compare",
    "compare_runs": "compare",
    "write_evaluation_report": "report",
    "select_examples": "report",
    "RunEvaluation": "run",
    "predict_rows": "run",
    "run_evaluation": "run",
    "evaluate_run": "run",
    "compare_saved": "run",
    "find_predictions": "run",
}
__all__ = [
    "ComparisonResult",
    "EvaluationResult",
    "LeakageReport",
    "OperatingPoints",
    "Predictions",
    "RunEvaluation",
    "check_patient_leakage",
    "choose_thresholds",
    "compare_runs",
    "compare_saved",
    "evaluate",
    "evaluate_run",
    "find_predictions",
    "predict_rows",
    "run_evaluation",
    "select_examples",
    "write_evaluation_report",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
