"""Weakly supervised localisation: heatmaps to boxes, and scoring against NIH ``BBox_List_2017``.

Follows Wang et al. 2017 (ChestX-ray8, CVPR, Sec. 5.2 and the localisation table), per finding, over the
images that have a ground-truth box of that finding, using the heatmap of that finding's output whatever the
predicted probability:

* **Boxes from a heatmap**: min-max normalise the map (the paper to [0, 255]), keep the pixels at or above a
  threshold, label the connected components and draw one box around each. The paper thresholds at 60 and at
  180 of 255; both are scored by default (:data:`WANG_HEATMAP_THRESHOLDS`), each as its own set of detections.
* **Accuracy at T**: an image is correctly localised when *at least one* box has IoBB > T (or IoU > T) with a
  ground-truth box of the finding (strict ``>``). IoBB is the intersection over the *detected* box area
  (:func:`cxrkit.explain.boxes.iobb`). Thresholds as in the paper's table (:data:`WANG_OVERLAP_THRESHOLDS`):
  T(IoBB) in {0.1, 0.25, 0.5, 0.75, 0.9} and T(IoU) in {0.1, 0.2, ..., 0.7}.
* **AFP at T** (average false positives): boxes whose IoBB (IoU) with every ground-truth box of the finding
  is <= T, summed over the images and divided by their number. An image with no box is a miss with no false
  positive.
* **Pointing game** (Zhang et al. 2016, not in Wang et al.): a hit when the heatmap's maximum (first maximum
  in raster order, at its pixel centre, mapped to original coordinates) falls inside a ground-truth box,
  optionally grown by ``tolerance`` pixels. A constant heatmap has no maximum and counts as a miss.

Ground-truth boxes are in the pixels of NIH's 1024² release images; boxes from a heatmap are mapped to the
pixels of the image file actually read, and the ground truth is rescaled to that file's size
(:func:`cxrkit.explain.boxes.boxes_to_image`), so downscaled copies score like the originals.

Where cxrkit differs from the paper: the heatmap comes from CAM/Grad-CAM of the chosen network at its input
resolution (the paper: its own transition-layer heatmap, 32 x 32 up-sampled); the paper's text does not say
whether its table pools the boxes of both thresholds, so each threshold is reported separately; component
boxes are exact pixel extents (no smoothing); images whose file is missing or unreadable are skipped and
listed, not counted as misses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import ndimage

from cxrkit.data.transforms import InputGeometry
from cxrkit.explain.boxes import as_boxes, clip_boxes, iobb, iou

#: Heatmap thresholds of Wang et al. 2017: 60 and 180 on the map min-max normalised to [0, 255].
WANG_HEATMAP_THRESHOLDS: tuple[float, ...] = (60 / 255, 180 / 255)
#: Overlap thresholds of the paper's localisation table, per criterion.
WANG_OVERLAP_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "IoBB": (0.1, 0.25, 0.5, 0.75, 0.9),
    "IoU": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
}
CRITERIA = {"IoU": iou, "IoBB": iobb}


@dataclass(frozen=True)
class BoxParams:
    """How a heatmap becomes boxes: keep pixels >= ``min + threshold x (max - min)`` (``threshold`` on the
    min-max normalised map), one box per connected component (``connectivity`` 1: edge neighbours, 2: also
    diagonal), drop components smaller than ``min_area`` (a fraction of the heatmap's area), keep at most
    ``max_boxes`` (highest peak first; None keeps all)."""

    threshold: float = 0.5
    min_area: float = 0.0
    connectivity: int = 2
    max_boxes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"box threshold: a share of the heatmap range in (0, 1], got {self.threshold}")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"min_area: a fraction of the heatmap area in [0, 1), got {self.min_area}")
        if self.connectivity not in (1, 2):
            raise ValueError(f"connectivity: 1 (4-neighbour) or 2 (8-neighbour), got {self.connectivity}")


@dataclass
class HeatmapBoxes:
    """Boxes ``[N, 4]`` (x0, y0, x1, y1) in heatmap pixel coordinates and each component's peak value."""

    boxes: np.ndarray
    scores: np.ndarray


def heatmap_to_boxes(heatmap: np.ndarray, params: BoxParams | None = None) -> HeatmapBoxes:
    """Boxes around the connected components of the min-max normalised map at or above ``threshold``,
    highest peak first; none for a constant (or non-finite) map."""
    params = params or BoxParams()
    heatmap = _as_map(heatmap)
    peak, floor = float(heatmap.max()), float(heatmap.min())
    if not (np.isfinite(peak) and np.isfinite(floor)) or peak <= floor:
        return HeatmapBoxes(np.zeros((0, 4)), np.zeros(0))
    mask = heatmap >= floor + params.threshold * (peak - floor)
    structure = ndimage.generate_binary_structure(2, params.connectivity)
    components, count = ndimage.label(mask, structure=structure)
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(mask, components, index)
    peaks = ndimage.maximum(heatmap, components, index)
    min_pixels = params.min_area * heatmap.size
    boxes, scores = [], []
    for slices, size, value in zip(ndimage.find_objects(components), sizes, peaks, strict=True):
        if size < min_pixels:
            continue
        rows, cols = slices
        boxes.append((cols.start, rows.start, cols.stop, rows.stop))
        scores.append(value)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[: params.max_boxes]
    return HeatmapBoxes(
        as_boxes(np.asarray(boxes, dtype=np.float64)[order]), np.asarray(scores, dtype=np.float64)[order]
    )


def heatmap_peak(heatmap: np.ndarray) -> tuple[float, float] | None:
    """``(x, y)`` centre of the heatmap's first maximum pixel, or None for a constant map."""
    heatmap = _as_map(heatmap)
    if not np.isfinite(heatmap).all():
        raise ValueError("heatmap contains NaN or infinite values")
    if heatmap.max() <= heatmap.min():
        return None
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return float(col) + 0.5, float(row) + 0.5


def point_in_boxes(point: tuple[float, float] | None, boxes: np.ndarray, tolerance: float = 0.0) -> bool:
    """True when ``point`` lies inside any of ``boxes`` grown by ``tolerance`` on every side."""
    if point is None:
        return False
    x, y = point
    b = as_boxes(boxes)
    inside = (b[:, 0] - tolerance <= x) & (x <= b[:, 2] + tolerance)
    inside &= (b[:, 1] - tolerance <= y) & (y <= b[:, 3] + tolerance)
    return bool(inside.any())


def original_boxes(
    heatmap: np.ndarray, geometry: InputGeometry, image_shape: tuple[int, ...], params: BoxParams
) -> np.ndarray:
    """Boxes of a model-input ``heatmap`` in the pixels of the original image, clipped to it."""
    boxes = heatmap_to_boxes(heatmap, params).boxes
    return clip_boxes(geometry.to_original_boxes(boxes), *image_shape[:2])


def boxes_per_threshold(
    heatmap: np.ndarray,
    geometry: InputGeometry,
    image_shape: tuple[int, ...],
    params: BoxParams | None = None,
    thresholds: Sequence[float] = WANG_HEATMAP_THRESHOLDS,
) -> dict[float, np.ndarray]:
    """:func:`original_boxes` at every heatmap threshold (the other ``params`` kept)."""
    params = params or BoxParams()
    return {
        float(t): original_boxes(heatmap, geometry, image_shape, replace(params, threshold=float(t)))
        for t in thresholds
    }


@dataclass
class LocalizationCase:
    """One image and finding with ground truth: the boxes found at each heatmap threshold, the ground truth
    and the heatmap's peak, all in the original image's pixels."""

    image: str
    finding: str
    gt_boxes: np.ndarray
    pred_boxes: Mapping[float, np.ndarray]
    peak: tuple[float, float] | None


def overlap_outcome(pred: np.ndarray, gt: np.ndarray, criterion: str, threshold: float) -> tuple[bool, int]:
    """``(correct, false_positives)`` for one image: correct when any predicted box has overlap > threshold
    with any ground-truth box; a false positive is a predicted box with overlap <= threshold with all."""
    pred, gt = as_boxes(pred), as_boxes(gt)
    if len(pred) == 0:
        return False, 0
    if len(gt) == 0:
        return False, len(pred)
    best = CRITERIA[criterion](pred, gt).max(axis=1)
    hits = best > threshold
    return bool(hits.any()), int((~hits).sum())


@dataclass
class LocalizationScores:
    """``overlap``: one row per heatmap threshold, finding, criterion and overlap threshold (accuracy, afp,
    n_images); ``pointing``: one row per finding (hits, n_images, hit_rate)."""

    overlap: pd.DataFrame
    pointing: pd.DataFrame

    def table(self, criterion: str = "IoBB") -> pd.DataFrame:
        """The paper's table layout: rows ``T(IoBB)=0.1 Acc.`` / ``AFP`` (prefixed ``heatmap 60/255:`` when
        several heatmap thresholds were scored), one column per finding, plus ``Mean`` (unweighted)."""
        part = self.overlap[self.overlap["criterion"] == criterion]
        if part.empty:
            have = sorted(self.overlap["criterion"].unique())
            raise ValueError(f"no scores for criterion {criterion!r}; have {have}")
        several = part["heatmap_threshold"].nunique() > 1
        rows = {}
        for (heatmap_threshold, threshold), group in part.groupby(["heatmap_threshold", "threshold"]):
            prefix = f"heatmap {heatmap_threshold * 255:.0f}/255: " if several else ""
            by_finding = group.set_index("finding")
            for metric, column in (("Acc.", "accuracy"), ("AFP", "afp")):
                values = by_finding[column]
                name = f"{prefix}T({criterion})={threshold:g} {metric}"
                rows[name] = {**values.to_dict(), "Mean": values.mean()}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "metric"
        return table


def score_localization(
    cases: Iterable[LocalizationCase],
    thresholds: Mapping[str, Sequence[float]] = WANG_OVERLAP_THRESHOLDS,
    pointing_tolerance: float = 0.0,
) -> LocalizationScores:
    """Accuracy and average false positives at each overlap threshold of each criterion (``thresholds``:
    criterion -> T values) for every heatmap threshold of the cases, and the pointing game, per finding."""
    cases = list(cases)
    if not cases:
        raise ValueError("no localisation cases to score (no image has a ground-truth box for the findings)")
    unknown = sorted(set(thresholds) - set(CRITERIA))
    if unknown:
        raise ValueError(f"unknown overlap criteria {unknown}; use {sorted(CRITERIA)}")
    overlap_rows, pointing_rows = [], []
    for finding in sorted({case.finding for case in cases}):
        group = [case for case in cases if case.finding == finding]
        for heatmap_threshold in sorted({t for case in group for t in case.pred_boxes}):
            for criterion, values in thresholds.items():
                for threshold in values:
                    outcomes = [
                        overlap_outcome(c.pred_boxes[heatmap_threshold], c.gt_boxes, criterion, threshold)
                        for c in group
                    ]
                    overlap_rows.append(
                        {
                            "heatmap_threshold": heatmap_threshold,
                            "finding": finding,
                            "criterion": criterion,
                            "threshold": float(threshold),
                            "accuracy": float(np.mean([correct for correct, _ in outcomes])),
                            "afp": float(np.mean([false_positives for _, false_positives in outcomes])),
                            "n_images": len(group),
                        }
                    )
        hits = sum(point_in_boxes(c.peak, c.gt_boxes, pointing_tolerance) for c in group)
        pointing_rows.append(
            {"finding": finding, "hits": hits, "n_images": len(group), "hit_rate": hits / len(group)}
        )
    return LocalizationScores(pd.DataFrame(overlap_rows), pd.DataFrame(pointing_rows))


def _as_map(heatmap: np.ndarray) -> np.ndarray:
    array = np.asarray(heatmap, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [H, W], got shape {array.shape}")
    return array
