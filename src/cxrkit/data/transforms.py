"""How an image becomes model input: the one place every stage takes it from.

* :class:`Geometry` — the cache resize (``letterbox``/``crop``/``stretch`` to ``S x S``) and the mapping of
  points and boxes between original and cache pixels.
* :class:`PreprocessSpec` — the full evaluation preprocessing: the cache resize, then the evaluation transform
  (:func:`cxrkit.data.augment.eval_transform`) to the model input.
* :class:`InputGeometry` — the way back: heatmaps, boxes and points from model-input to original pixels.

Training (through the cache), evaluation, explanation, prediction, serving and export all use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrkit.data.augment import eval_transform

RESIZE_POLICIES: tuple[str, ...] = ("letterbox", "crop", "stretch")
GEOMETRY_COLUMNS: tuple[str, ...] = (
    "orig_height",
    "orig_width",
    "resized_height",
    "resized_width",
    "scale_x",
    "scale_y",
    "shift_x",
    "shift_y",
)
EVAL_MODES: tuple[str, ...] = ("resize", "center_crop")
INTENSITY_MODES: tuple[str, ...] = ("none", "equalize", "clahe")
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = 8


def adjust_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """The cache step's contrast normalisation of a decoded uint8 ``(H, W)`` image, before resizing (so
    letterbox padding stays black): ``none``; ``equalize``, global histogram equalisation; ``clahe``,
    contrast-limited adaptive equalisation (OpenCV; clip limit 2, 8 x 8 tiles over the image), which evens
    out the exposure and post-processing differences between sites and devices."""
    if mode == "none":
        return image
    import cv2

    image = np.ascontiguousarray(image, dtype=np.uint8)
    if mode == "equalize":
        return cv2.equalizeHist(image)
    if mode == "clahe":
        clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=(CLAHE_TILES, CLAHE_TILES))
        return clahe.apply(image)
    raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {mode!r}")


class PreprocessSpecError(ValueError):
    """A preprocessing spec with an unknown policy or mode, or a crop larger than the image."""


@dataclass(frozen=True)
class Geometry:
    """Where an original image sits in its S x S cache image.

    Coordinates are continuous pixel coordinates (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``), as NIH
    bounding boxes are. A point maps as ``x_cache = x * scale_x + shift_x`` (``y`` likewise): the image is
    resized to ``resized_width x resized_height`` and its top-left corner placed at ``(shift_x, shift_y)``
    (positive: zero padding; negative: cropped margin).
    """

    orig_height: int
    orig_width: int
    size: int
    resized_height: int
    resized_width: int
    shift_x: int
    shift_y: int

    @classmethod
    def fit(cls, height: int, width: int, size: int, policy: str) -> Geometry:
        """The geometry of resizing a ``height x width`` image to ``size`` under ``policy``."""
        if policy == "stretch":
            return cls(height, width, size, size, size, 0, 0)
        if policy == "letterbox":
            factor = size / max(height, width)
            resized_h, resized_w = max(1, round(height * factor)), max(1, round(width * factor))
        elif policy == "crop":
            factor = size / min(height, width)
            resized_h, resized_w = max(size, round(height * factor)), max(size, round(width * factor))
        else:
            raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {policy!r}")
        return cls(
            height, width, size, resized_h, resized_w, (size - resized_w) // 2, (size - resized_h) // 2
        )

    @classmethod
    def from_row(cls, row: pd.Series | dict, size: int) -> Geometry:
        """The geometry stored in a cache manifest row (see :data:`GEOMETRY_COLUMNS`)."""
        return cls(
            orig_height=int(row["orig_height"]),
            orig_width=int(row["orig_width"]),
            size=size,
            resized_height=int(row["resized_height"]),
            resized_width=int(row["resized_width"]),
            shift_x=int(row["shift_x"]),
            shift_y=int(row["shift_y"]),
        )

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.orig_width

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.orig_height

    def columns(self) -> dict[str, float]:
        """The values of :data:`GEOMETRY_COLUMNS` for this image, in that order."""
        return {name: getattr(self, name) for name in GEOMETRY_COLUMNS}

    def to_cache_point(self, x: float, y: float) -> tuple[float, float]:
        return x * self.scale_x + self.shift_x, y * self.scale_y + self.shift_y

    def to_original_point(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.shift_x) / self.scale_x, (y - self.shift_y) / self.scale_y

    def to_cache_box(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Map a box ``(x, y, w, h)`` (top-left corner, width, height) from original to cache pixels."""
        cx, cy = self.to_cache_point(x, y)
        return cx, cy, w * self.scale_x, h * self.scale_y

    def to_original_box(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Inverse of :meth:`to_cache_box`; parts outside a cropped image map outside the original."""
        ox, oy = self.to_original_point(x, y)
        return ox, oy, w / self.scale_x, h / self.scale_y

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Resize and pad/crop a uint8 ``(orig_height, orig_width)`` image to ``(size, size)``."""
        if image.shape != (self.orig_height, self.orig_width):
            raise ValueError(
                f"image shape {image.shape} does not match geometry {self.orig_height}x{self.orig_width}"
            )
        resized = image
        if (self.resized_height, self.resized_width) != image.shape:
            target = (self.resized_width, self.resized_height)
            resized = np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BILINEAR))
        canvas = np.zeros((self.size, self.size), dtype=np.uint8)
        src_x, dst_x, width = _overlap(self.shift_x, self.resized_width, self.size)
        src_y, dst_y, height = _overlap(self.shift_y, self.resized_height, self.size)
        canvas[dst_y : dst_y + height, dst_x : dst_x + width] = resized[
            src_y : src_y + height, src_x : src_x + width
        ]
        return canvas


def _overlap(shift: int, length: int, size: int) -> tuple[int, int, int]:
    """Source start, destination start and length of a 1-D segment placed at ``shift`` on ``[0, size)``."""
    src = max(0, -shift)
    dst = max(0, shift)
    return src, dst, min(length - src, size - dst)


def cache_settings(image_size: int, resize_policy: str, intensity: str = "none") -> dict[str, Any]:
    """The settings that make two caches' images interchangeable (a cache's, a data config's, a spec's)."""
    return {"image_size": int(image_size), "resize_policy": str(resize_policy), "intensity": str(intensity)}


def describe_cache_settings(settings: dict[str, Any]) -> str:
    """``224 px (letterbox)``, ``224 px (letterbox, clahe)``."""
    extra = "" if settings.get("intensity", "none") == "none" else f", {settings['intensity']}"
    return f"{settings['image_size']} px ({settings['resize_policy']}{extra})"


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded uint8 image becomes model input, exactly as in training and evaluation: the cache step
    (:func:`adjust_intensity` by ``intensity``, then :class:`Geometry`: ``resize_policy`` to ``image_size``)
    then the evaluation transform
    (:func:`cxrkit.data.augment.eval_transform` to ``crop_size`` with ``eval_mode``) on values in [0, 1].
    Intensity normalisation happens inside the network."""

    image_size: int
    resize_policy: str
    crop_size: int
    eval_mode: str = "resize"
    intensity: str = "none"

    def __post_init__(self) -> None:
        if self.resize_policy not in RESIZE_POLICIES:
            raise PreprocessSpecError(
                f"resize_policy must be one of {RESIZE_POLICIES}, got {self.resize_policy!r}"
            )
        if self.eval_mode not in EVAL_MODES:
            raise PreprocessSpecError(f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        if self.intensity not in INTENSITY_MODES:
            raise PreprocessSpecError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if not 0 < self.crop_size <= self.image_size:
            raise PreprocessSpecError(
                f"crop_size {self.crop_size} must be in 1..image_size ({self.image_size})"
            )

    def cache_image(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """The uint8 ``(image_size, image_size)`` image the training cache would hold, and its geometry."""
        geometry = Geometry.fit(image.shape[0], image.shape[1], self.image_size, self.resize_policy)
        return geometry.apply(adjust_intensity(image, self.intensity)), geometry

    @property
    def cache_settings(self) -> dict[str, Any]:
        """What a training cache must have been built with to hold this spec's cache images."""
        return cache_settings(self.image_size, self.resize_policy, self.intensity)

    def model_input(self, cache_images: np.ndarray) -> np.ndarray:
        """uint8 cache images ``[B, S, S]`` → float32 model input ``[B, 1, crop, crop]`` in [0, 1]."""
        # uint8 -> float32 / 255 exactly as the data module's to_unit_float, in numpy (no thread-pool wake-up)
        unit = np.divide(cache_images, np.float32(255.0), dtype=np.float32)
        batch = torch.from_numpy(unit).unsqueeze(1)
        with torch.inference_mode():
            return np.ascontiguousarray(eval_transform(batch, self.crop_size, self.eval_mode).numpy())

    def input_geometry(self, cache: Geometry) -> InputGeometry:
        """Where an original image with cache geometry ``cache`` sits in this spec's model input."""
        return InputGeometry(cache, self.crop_size, self.eval_mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize_policy": self.resize_policy,
            "crop_size": self.crop_size,
            "eval_mode": self.eval_mode,
            "intensity": self.intensity,
            "input": f"float32 [batch, 1, {self.crop_size}, {self.crop_size}] in [0, 1]",
        }

    @classmethod
    def from_data_config(cls, data: Any) -> PreprocessSpec:
        """The spec of a run's ``data`` config: its cache resize and its evaluation transform."""
        cache, augment = data.cache, data.augment
        return cls(
            int(cache.image_size),
            str(cache.resize_policy),
            int(augment.crop_size),
            str(getattr(augment, "eval_mode", "resize")),
            str(getattr(cache, "intensity", "none")),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessSpec:
        return cls(
            int(values["image_size"]),
            str(values["resize_policy"]),
            int(values["crop_size"]),
            str(values.get("eval_mode", "resize")),
            str(values.get("intensity", "none")),
        )


@dataclass(frozen=True)
class InputGeometry:
    """Where an original image sits in the model input: the cache resize (:class:`Geometry`) then the
    evaluation transform to ``input_size`` (``resize`` of the whole cache image, or ``center_crop``). The one
    mapping of heatmaps, boxes and points between model-input and original pixels.

    Coordinates are continuous pixel coordinates (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``), so a box
    maps exactly: no rounding happens between spaces. Boxes are ``[N, 4]`` ``(x0, y0, x1, y1)`` arrays.
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

    @property
    def _ratio(self) -> float:
        """Model-input pixels per cache pixel."""
        return self.input_size / self.cache.size if self.mode == "resize" else 1.0

    @property
    def _offset(self) -> int:
        """Cache pixels cut from the top/left by the centre crop (the offset of ``eval_transform``)."""
        return (self.cache.size - self.input_size) // 2 if self.mode == "center_crop" else 0

    def to_original_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Model-input boxes to original pixel coordinates (through the cache geometry)."""
        cache_boxes = _xyxy(boxes) / self._ratio + self._offset
        return _map_corners(cache_boxes, self.cache.to_original_point)

    def to_input_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Original boxes to model-input pixels (inverse of :meth:`to_original_boxes`)."""
        return (_map_corners(_xyxy(boxes), self.cache.to_cache_point) - self._offset) * self._ratio

    def to_original_point(self, point: tuple[float, float]) -> tuple[float, float]:
        x, y = point
        return self.cache.to_original_point(x / self._ratio + self._offset, y / self._ratio + self._offset)

    def heatmap_to_original(
        self, heatmap: np.ndarray, out_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Resample a model-input heatmap onto the original image grid (or an ``out_shape`` view of it),
        bilinear at pixel centres; parts of the original the model never saw (cropped margins) get 0."""
        heatmap = np.asarray(heatmap, dtype=np.float32)
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


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size and (array.ndim != 2 or array.shape[1] != 4):
        raise ValueError(f"boxes must have shape [N, 4] (x0, y0, x1, y1), got {array.shape}")
    return array.reshape(-1, 4)


def _map_corners(boxes: np.ndarray, point: Callable[[float, float], tuple[float, float]]) -> np.ndarray:
    """``boxes`` with both corners mapped through ``point``."""
    mapped = [(*point(x0, y0), *point(x1, y1)) for x0, y0, x1, y1 in boxes]
    return np.asarray(mapped, dtype=np.float64).reshape(-1, 4)
