"""Weakly supervised localisation: heatmaps to boxes, and scoring against NIH ``BBox_List_2017``.

Boxes come from a heatmap as in Wang et al. 2017 (ChestX-ray8, Sec. 5.2): threshold the map, label its
connected components, and draw one box around each component. The paper min-max normalises maps to [0, 255]
and thresholds at 60 and 180; cxrkit maps are already min-max normalised to [0, 1], so ``threshold`` is a
fraction of the maximum (0.235 and 0.706 reproduce the paper's two settings).

Scoring follows the paper's Table 4, per finding, over the images that have a ground-truth box of that
finding, using the heatmap of that finding's output (whatever the predicted probability):

* **Accuracy at T** (IoU or IoBB): an image counts as correctly localised when *at least one* predicted
  box has IoU > T (or IoBB > T) with a ground-truth box of the finding (strict ``>``, as in the paper). IoBB
  is the intersection over the *detected* box area (:func:`cxrkit.explain.boxes.iobb`). Table 4 reports
  both criteria for T in {0.1, 0.25, 0.5, 0.75, 0.9}; so does :meth:`LocalizationScores.table`.
* **AFP at T** (average false positives): predicted boxes whose IoU (IoBB) with every ground-truth box of
  the finding is <= T, summed over the images and divided by their number. An image with no predicted box is
  a miss with no false positive.
* **Pointing game** (Zhang et al. 2016): a hit when the heatmap's maximum (first maximum in raster order,
  at its pixel centre, mapped to original coordinates) falls inside a ground-truth box, optionally grown by
  ``tolerance`` pixels. A constant heatmap has no maximum and counts as a miss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from cxrkit.data.cache import Geometry
from cxrkit.explain.boxes import as_boxes, iobb, iou, xywh_to_xyxy, xyxy_to_xywh
from cxrkit.inference.bundle import EVAL_MODES, PreprocessSpec

#: Overlap thresholds of Wang et al. 2017, Table 4.
WANG_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
CRITERIA = {"IoU": iou, "IoBB": iobb}


@dataclass(frozen=True)
class InputGeometry:
    """Where an original image sits in the model input: the cache resize (:class:`cxrkit.data.cache.Geometry`)
    then the evaluation transform to ``input_size`` (``resize`` of the whole cache image, or ``center_crop``).

    Coordinates are continuous pixel coordinates (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``), so a box
    maps exactly: no rounding happens between spaces.
    """

    cache: Geometry
    input_size: int
    mode: str = "resize"

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {self.mode!r}")
        if self.mode == "center_crop" and self.input_size > self.cache.size:
            raise ValueError(f"cannot centre-crop {self.input_size} from a {self.cache.size} cache image")

    @classmethod
    def fit(
        cls,
        height: int,
        width: int,
        image_size: int,
        resize_policy: str,
        input_size: int,
        mode: str = "resize",
    ) -> InputGeometry:
        """The geometry of a ``height x width`` original under a cache ``image_size``/``resize_policy``."""
        return cls(Geometry.fit(height, width, image_size, resize_policy), input_size, mode)

    @classmethod
    def from_spec(cls, cache: Geometry, spec: PreprocessSpec) -> InputGeometry:
        """The geometry of a bundle's preprocessing (cache resize, then ``eval_mode`` to ``crop_size``)."""
        return cls(cache, spec.crop_size, spec.eval_mode)

    @property
    def _ratio(self) -> float:
        """Model-input pixels per cache pixel."""
        return self.input_size / self.cache.size if self.mode == "resize" else 1.0

    @property
    def _offset(self) -> int:
        """Cache pixels cut from the top/left by the centre crop (the offset of ``eval_transform``)."""
        return (self.cache.size - self.input_size) // 2 if self.mode == "center_crop" else 0

    def to_original_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Model-input ``[N, 4]`` xyxy boxes to original pixel coordinates (through the cache geometry)."""
        cache_boxes = as_boxes(boxes) / self._ratio + self._offset
        mapped = [self.cache.to_original_box(*box) for box in xyxy_to_xywh(cache_boxes)]
        return xywh_to_xyxy(np.asarray(mapped, dtype=np.float64).reshape(-1, 4))

    def to_input_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Original ``[N, 4]`` xyxy boxes to model-input pixels (inverse of :meth:`to_original_boxes`)."""
        mapped = [self.cache.to_cache_box(*box) for box in xyxy_to_xywh(boxes)]
        cache_boxes = xywh_to_xyxy(np.asarray(mapped, dtype=np.float64).reshape(-1, 4))
        return (cache_boxes - self._offset) * self._ratio

    def to_original_point(self, point: tuple[float, float]) -> tuple[float, float]:
        x, y = point
        return self.cache.to_original_point(x / self._ratio + self._offset, y / self._ratio + self._offset)

    def heatmap_to_original(
        self, heatmap: np.ndarray, out_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Resample a model-input heatmap onto the original image grid (or an ``out_shape`` view of it),
        bilinear at pixel centres; parts of the original the model never saw (cropped margins) get 0."""
        heatmap = _as_map(heatmap).astype(np.float32)
        if heatmap.shape != (self.input_size, self.input_size):
            raise ValueError(f"heatmap shape {heatmap.shape} is not the model input {self.input_size}²")
        out_h, out_w = out_shape or (self.cache.orig_height, self.cache.orig_width)
        zoom_x, zoom_y = out_w / self.cache.orig_width, out_h / self.cache.orig_height
        ratio, offset = self._ratio, self._offset
        # output x -> original x / zoom -> cache x * scale + shift -> input (cache - offset) * ratio
        coefficients = (
            self.cache.scale_x * ratio / zoom_x,
            0.0,
            (self.cache.shift_x - offset) * ratio,
            0.0,
            self.cache.scale_y * ratio / zoom_y,
            (self.cache.shift_y - offset) * ratio,
        )
        mapped = Image.fromarray(heatmap).transform(
            (out_w, out_h), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR
        )
        return np.clip(np.asarray(mapped, dtype=np.float32), 0.0, 1.0)


@dataclass(frozen=True)
class BoxParams:
    """How a heatmap becomes boxes: keep pixels >= ``threshold`` x max, one box per connected component
    (``connectivity`` 1: edge neighbours, 2: also diagonal), drop components smaller than ``min_area``
    (a fraction of the heatmap's area), keep at most ``max_boxes`` (highest peak first; None keeps all)."""

    threshold: float = 0.5
    min_area: float = 0.0
    connectivity: int = 2
    max_boxes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"box threshold: a fraction of the heatmap max in (0, 1], got {self.threshold}")
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
    """Boxes around the connected components of ``heatmap >= threshold * max``, highest peak first."""
    params = params or BoxParams()
    heatmap = _as_map(heatmap)
    peak = float(heatmap.max())
    if peak <= 0.0 or not np.isfinite(peak):
        return HeatmapBoxes(np.zeros((0, 4)), np.zeros(0))
    mask = heatmap >= params.threshold * peak
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


@dataclass
class LocalizationCase:
    """One image and finding with ground truth: every box and point in original pixel coordinates."""

    image: str
    finding: str
    gt_boxes: np.ndarray
    pred_boxes: np.ndarray
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
    """``overlap``: one row per finding, criterion and threshold (accuracy, afp, n_images);
    ``pointing``: one row per finding (hits, n_images, hit_rate)."""

    overlap: pd.DataFrame
    pointing: pd.DataFrame

    def table(self, criterion: str = "IoBB") -> pd.DataFrame:
        """Wang et al. 2017 Table 4 layout: rows ``T(IoBB)=0.1 Acc.`` / ``AFP``, one column per finding,
        plus ``Mean`` (unweighted over findings)."""
        part = self.overlap[self.overlap["criterion"] == criterion]
        if part.empty:
            have = sorted(self.overlap["criterion"].unique())
            raise ValueError(f"no scores for criterion {criterion!r}; have {have}")
        rows = {}
        for threshold, group in part.groupby("threshold", sort=True):
            by_finding = group.set_index("finding")
            for metric, column in (("Acc.", "accuracy"), ("AFP", "afp")):
                values = by_finding[column]
                rows[f"T({criterion})={threshold:g} {metric}"] = {**values.to_dict(), "Mean": values.mean()}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "metric"
        return table


def score_localization(
    cases: Iterable[LocalizationCase],
    thresholds: Sequence[float] = WANG_THRESHOLDS,
    pointing_tolerance: float = 0.0,
) -> LocalizationScores:
    """Accuracy and average false positives at each IoU/IoBB threshold, and the pointing game, per finding."""
    cases = list(cases)
    if not cases:
        raise ValueError("no localisation cases to score (no image has a ground-truth box for the findings)")
    overlap_rows, pointing_rows = [], []
    findings = sorted({case.finding for case in cases})
    for finding in findings:
        group = [case for case in cases if case.finding == finding]
        for criterion in CRITERIA:
            for threshold in thresholds:
                outcomes = [overlap_outcome(c.pred_boxes, c.gt_boxes, criterion, threshold) for c in group]
                overlap_rows.append(
                    {
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
