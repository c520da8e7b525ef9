"""Bounding boxes: overlap measures and the NIH ``BBox_List_2017.csv`` file.

Boxes are float arrays of shape ``[N, 4]`` in ``(x0, y0, x1, y1)`` form, in continuous pixel coordinates where
pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``; so a box covering columns 10..19 is ``x0=10, x1=20``.
NIH gives ``(x, y, w, h)``, which is ``(x, y, x + w, y + h)`` here.

NIH boxes are in the pixels of the 1024 x 1024 release images (:data:`NIH_BOX_FRAME`). Data_Entry's
``OriginalImage[Width`` / ``Height]`` columns give the size of the scan before NIH resized it to 1024²
(without keeping the aspect ratio), so the release image, the original scan and any downscaled copy
(e.g. 224² or 512² re-encodings) all show the same field: :func:`boxes_to_image` rescales the boxes to the
size of the file actually read.

This module holds the one reader of the NIH box file (:func:`read_nih_boxes`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrkit.data.labels import canonical

#: Columns of the NIH file as pandas reads it: the header ``Bbox [x,y,w,h]`` is split by its commas.
NIH_BOX_COLUMNS: tuple[str, ...] = ("Bbox [x", "y", "w", "h]")
#: (height, width) of the images NIH's box coordinates refer to.
NIH_BOX_FRAME: tuple[int, int] = (1024, 1024)
#: Columns of :func:`read_nih_boxes`.
BOX_TABLE_COLUMNS: tuple[str, ...] = ("image", "finding", "x0", "y0", "x1", "y1")


def as_boxes(boxes: np.ndarray | list) -> np.ndarray:
    """Return ``boxes`` as a float64 ``[N, 4]`` array, raising on any other shape."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (x0, y0, x1, y1), got {array.shape}")
    return array


def xywh_to_xyxy(boxes: np.ndarray | list) -> np.ndarray:
    array = as_boxes(boxes).copy()
    array[:, 2:] += array[:, :2]
    return array


def xyxy_to_xywh(boxes: np.ndarray | list) -> np.ndarray:
    array = as_boxes(boxes).copy()
    array[:, 2:] -= array[:, :2]
    return array


def box_area(boxes: np.ndarray | list) -> np.ndarray:
    array = as_boxes(boxes)
    return np.clip(array[:, 2] - array[:, 0], 0, None) * np.clip(array[:, 3] - array[:, 1], 0, None)


def clip_boxes(boxes: np.ndarray | list, height: float, width: float) -> np.ndarray:
    """Clip boxes to the image ``[0, width] x [0, height]`` and drop those left with no area."""
    array = as_boxes(boxes).copy()
    array[:, [0, 2]] = np.clip(array[:, [0, 2]], 0, width)
    array[:, [1, 3]] = np.clip(array[:, [1, 3]], 0, height)
    return array[box_area(array) > 0]


def boxes_to_image(
    boxes: np.ndarray | list, image_shape: tuple[int, ...], frame: tuple[int, int] = NIH_BOX_FRAME
) -> np.ndarray:
    """Boxes given on a ``frame`` (height, width) image, rescaled to a resized copy of ``image_shape``."""
    height, width = image_shape[:2]
    scale = np.array([width / frame[1], height / frame[0]] * 2)
    return as_boxes(boxes) * scale


def intersection(pred: np.ndarray | list, gt: np.ndarray | list) -> np.ndarray:
    """Pairwise intersection areas, ``[N_pred, N_gt]``."""
    a, b = as_boxes(pred), as_boxes(gt)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    sides = np.clip(bottom_right - top_left, 0, None)
    return sides[..., 0] * sides[..., 1]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def iou(pred: np.ndarray | list, gt: np.ndarray | list) -> np.ndarray:
    """Pairwise intersection over union, ``[N_pred, N_gt]``."""
    inter = intersection(pred, gt)
    union = box_area(pred)[:, None] + box_area(gt)[None, :] - inter
    return _ratio(inter, union)


def iobb(pred: np.ndarray | list, gt: np.ndarray | list) -> np.ndarray:
    """Pairwise intersection over the *detected* (predicted) box area, ``[N_pred, N_gt]``.

    This is IoBB of Wang et al. 2017 (ChestX-ray8, Sec. 5.2), "similar to Area of Precision or Purity": the
    share of a predicted box that lies inside the ground truth. It is 1 for any predicted box inside the
    ground truth, however small; the paper uses it because boxes from its 32 x 32 heatmaps are coarser and
    larger than the ground truth, and reports IoU beside it.
    """
    return _ratio(intersection(pred, gt), box_area(pred)[:, None])


def read_nih_boxes(path: str | Path) -> pd.DataFrame:
    """Read NIH ``BBox_List_2017.csv`` (full file, subset, or ``.csv.gz``) as a table of xyxy boxes.

    Returns columns ``image`` (``Image Index``), ``finding`` (canonical, so ``Infiltrate`` becomes
    ``Infiltration``), ``x0, y0, x1, y1`` in original 1024² pixel space. Raises ValueError naming the file and
    the problem for a missing column, a non-numeric coordinate, or a finding outside the cxrkit vocabulary.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bounding-box file not found: {path}")
    raw = pd.read_csv(path, dtype={"Image Index": str, "Finding Label": str})
    raw.columns = [str(column).strip() for column in raw.columns]
    missing = [c for c in ("Image Index", "Finding Label", *NIH_BOX_COLUMNS) if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns are {list(raw.columns)}")
    coordinates = raw[list(NIH_BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    bad = coordinates.isna().any(axis=1) | (coordinates[["w", "h]"]] <= 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        values = raw.iloc[row][list(NIH_BOX_COLUMNS)].tolist()
        raise ValueError(f"{path}: row {row + 2} has an invalid box (x, y, w, h) = {values}")
    names = raw["Finding Label"].astype(str).str.strip()
    findings = [canonical(name) for name in names]
    unknown = sorted({name for name, label in zip(names, findings, strict=True) if label is None})
    if unknown:
        raise ValueError(f"{path}: unknown finding label(s) {unknown} (not in cxrkit.data.labels)")
    xyxy = xywh_to_xyxy(coordinates.to_numpy())
    table = pd.DataFrame(xyxy, columns=["x0", "y0", "x1", "y1"])
    table.insert(0, "finding", findings)
    table.insert(0, "image", raw["Image Index"].str.strip().to_numpy())
    return table


def group_boxes(table: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """``{(image, finding): [M, 4] boxes}`` from a :func:`read_nih_boxes` table."""
    return {
        (str(image), str(finding)): group[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
        for (image, finding), group in table.groupby(["image", "finding"], sort=False)
    }
