"""Explanations of chest X-ray classifiers: class activation maps (pytorch-grad-cam), overlays at the original
resolution, boxes from heatmaps and weakly supervised localisation scored against NIH boxes.

The main names are importable from here; they load their module on first use (pytorch-grad-cam and the
model code are imported only when needed).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "CAM_METHODS": "cam",
    "Explanation": "cam",
    "explain": "cam",
    "read_nih_boxes": "boxes",
    "BoxParams": "localize",
    "LocalizationScores": "localize",
    "heatmap_to_boxes": "localize",
    "score_localization": "localize",
    "ExplainRun": "gallery",
    "explain_files": "gallery",
    "write_report": "gallery",
    "RunExplanation": "run",
    "explain_run": "run",
    "run_explanation": "run",
}
__all__ = [
    "CAM_METHODS",
    "BoxParams",
    "ExplainRun",
    "Explanation",
    "LocalizationScores",
    "RunExplanation",
    "explain",
    "explain_files",
    "explain_run",
    "heatmap_to_boxes",
    "read_nih_boxes",
    "run_explanation",
    "score_localization",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
