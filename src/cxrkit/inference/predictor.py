"""Predict findings on chest X-ray files or arrays with a model bundle.

>>> predictor = Predictor.from_bundle("model.cxr")
>>> results = predictor.predict(["a.png", "b.dcm", array, upload_bytes], heatmaps=True)
>>> results[0].findings, results[0].probabilities["Effusion"], results[1].error

Inputs are paths, fsspec URLs, encoded bytes, binary file objects or arrays. Each goes through the inference
core (:mod:`cxrkit.inference.runner`): :func:`~cxrkit.inference.runner.prepare_image` (decode, plausibility
check, cache resize) on a thread pool (one thread per core; PIL and the DICOM codecs release the GIL) while
the :class:`~cxrkit.inference.runner.Runner` scores batches through ONNX Runtime when the bundle has a graph,
else PyTorch. Heatmaps map back to the image through :class:`cxrkit.data.transforms.InputGeometry`. An input
that cannot be read yields a result with ``error`` set and never stops the others.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from cxrkit.data.decode import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, Plausibility
from cxrkit.data.transforms import Geometry
from cxrkit.inference.bundle import Bundle
from cxrkit.inference.runner import ImageSource, PreparedImage, Runner, decode_image, prepare_image

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "onnx-int8", "torch")
#: ``False``: no heatmaps; ``True``: one per positive finding; a list: those labels.
HeatmapRequest = bool | Sequence[str]


@dataclass
class ImageResult:
    """The prediction for one input image, or the reason it could not be predicted (``error``)."""

    source: str
    probabilities: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  #: label → float32 (H, W) in [0, 1]
    height: int | None = None
    width: int | None = None
    error: str | None = None
    ood_score: float | None = None  #: distance to the training images' features (None: no detector)
    ood_flag: bool | None = None  #: ood_score above the bundle's detector threshold

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ranked(self) -> list[tuple[str, float]]:
        """(label, probability), most probable first."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])

    @property
    def findings(self) -> list[str]:
        """Labels at or above their operating threshold, most probable first."""
        return [label for label, p in self.ranked if p >= self.thresholds[label]]

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable summary (heatmaps excluded)."""
        if not self.ok:
            return {"source": self.source, "error": self.error}
        return {
            "source": self.source,
            "height": self.height,
            "width": self.width,
            "findings": self.findings,
            "probabilities": self.probabilities,
            **({} if self.ood_score is None else {"ood_score": self.ood_score, "ood_flag": self.ood_flag}),
        }


class Predictor:
    """Runs a :class:`~cxrkit.inference.bundle.Bundle` on images (see the module docstring)."""

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "auto",
        batch_size: int = 16,
        workers: int | None = None,
        threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cam_method: str = "gradcam",
        plausibility: Plausibility = Plausibility(),  # noqa: B008 (frozen)
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.bundle = bundle
        self.labels = list(bundle.labels)
        self.batch_size = batch_size
        self.workers = workers or os.cpu_count() or 1
        self.max_pixels = max_pixels
        self.cam_method = cam_method
        self.plausibility = plausibility
        self.backend = choose_backend(bundle, backend)
        self.thresholds = bundle.thresholds_for(self.backend)
        self.runner = bundle_runner(bundle, self.backend, threads)
        self._torch_model = self.runner.model
        self.ood = bundle.ood_for(self.backend)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, **options: Any) -> Predictor:
        """Load the bundle at ``path`` (folder or zip); ``options`` go to the constructor."""
        return cls(Bundle.load(path), **options)

    # ------------------------------------------------------------------ steps

    def decode(self, item: ImageSource, name: str | None = None) -> np.ndarray:
        """A path (PNG/JPEG/DICOM...), encoded bytes or a binary file object (``name`` names them), or an
        array, as the uint8 ``(H, W)`` image convention of :func:`~cxrkit.data.decode.read_image`."""
        return decode_image(item, name=name, max_pixels=self.max_pixels)

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """The uint8 cache image (resize policy to image_size) of a decoded image, and its geometry."""
        return self.bundle.preprocess.cache_image(image)

    def prepare(self, item: ImageSource, source: str, keep_image: bool = False) -> PreparedImage:
        """Decode, check :attr:`plausibility` and preprocess one input named ``source``; a failure is
        returned as ``error``, not raised."""
        options = {"max_pixels": self.max_pixels, "plausibility": self.plausibility}
        return prepare_image(item, source, self.bundle.preprocess, keep_image=keep_image, **options)

    def probabilities(self, cache_images: np.ndarray) -> np.ndarray:
        """Per-label probabilities ``[B, L]`` (float64) for uint8 cache images ``[B, S, S]``."""
        return self.runner.probabilities(cache_images)

    def scores(self, cache_images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``[B, L]`` and out-of-distribution scores ``[B]`` (None when the bundle has no
        detector) of uint8 cache images ``[B, S, S]``, from one forward pass when the network gives its
        pooled features (else, e.g. an ONNX graph without a ``features`` output, through PyTorch)."""
        if self.ood is None:
            return self.probabilities(cache_images), None
        probabilities, features = self.runner.probabilities_and_features(cache_images)
        if features is None:
            from cxrkit.inference.ood import pooled_features

            features = pooled_features(self.torch_model, self.bundle.preprocess.model_input(cache_images))
        return probabilities, self.ood.score(features)

    def score_rows(self, cache_images: np.ndarray) -> list[tuple[np.ndarray, float | None]]:
        """:meth:`scores` per image: ``(probabilities [L], ood_score or None)``."""
        probabilities, ood = self.scores(cache_images)
        return [(row, None if ood is None else float(ood[i])) for i, row in enumerate(probabilities)]

    def ood_flag(self, score: float | None) -> bool | None:
        """Whether an out-of-distribution score is above the detector's threshold (None without one)."""
        return None if score is None or self.ood is None else bool(score > self.ood.threshold)

    def logits(self, cache_images: np.ndarray) -> np.ndarray:
        """Raw logits ``[B, L]`` (float64) for uint8 cache images ``[B, S, S]``."""
        return self.runner.logits(cache_images)

    @property
    def torch_model(self) -> torch.nn.Module:
        """The PyTorch network (built on first use when inference runs on ONNX; heatmaps need it)."""
        if self._torch_model is None:
            self._torch_model = self.bundle.build_model()
        return self._torch_model

    def explain(self, cache_image: np.ndarray, labels: Sequence[str]) -> dict[str, np.ndarray]:
        """Class activation maps (``cam_method``) of one cache image for ``labels``, at model-input size."""
        from cxrkit.explain.cam import explain

        if not labels:
            return {}
        indices = [self.labels.index(label) for label in labels]
        images = torch.from_numpy(self.bundle.preprocess.model_input(cache_image[None]))
        explanation = explain(self.torch_model, images, targets=indices, method=self.cam_method)
        maps = explanation.heatmaps[0].numpy()
        return {label: maps[slot] for slot, label in enumerate(labels)}

    def heatmap_to_image(
        self, heatmap: np.ndarray, geometry: Geometry, out_shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Map a model-input-sized heatmap back onto the decoded image (or a resized ``out_shape`` view).

        Regions the model never saw (cropped margins) get 0.
        """
        return self.bundle.preprocess.input_geometry(geometry).heatmap_to_original(heatmap, out_shape)

    def heatmap_labels(self, probabilities: dict[str, float], request: HeatmapRequest) -> list[str]:
        if request is True:
            return [label for label, p in probabilities.items() if p >= self.thresholds[label]]
        if request is False:
            return []
        unknown = [label for label in request if label not in self.labels]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; the model predicts {self.labels}")
        return list(request)

    # ------------------------------------------------------------------ whole pipeline

    def iter_predict(
        self, images: Iterable[ImageSource], heatmaps: HeatmapRequest = False, progress: bool = False
    ) -> Iterator[ImageResult]:
        """Results in input order, decoding ahead on the thread pool while batches run."""
        items = list(images)
        sources = [_describe(item, index) for index, item in enumerate(items)]
        with (
            ThreadPoolExecutor(self.workers, thread_name_prefix="cxr-decode") as pool,
            tqdm(total=len(items), unit="img", desc="predict", disable=not progress) as bar,
        ):
            prepared = _ordered_map(pool, self.prepare, zip(items, sources, strict=True), 4 * self.batch_size)
            while chunk := list(islice(prepared, self.batch_size)):
                yield from self._predict_chunk(chunk, heatmaps)
                bar.update(len(chunk))

    def predict(
        self, images: Iterable[ImageSource], heatmaps: HeatmapRequest = False, progress: bool = False
    ) -> list[ImageResult]:
        """One :class:`ImageResult` per input, in order (bad inputs carry ``error``)."""
        return list(self.iter_predict(images, heatmaps, progress))

    def _predict_chunk(self, chunk: list[PreparedImage], heatmaps: HeatmapRequest) -> Iterator[ImageResult]:
        good = [item for item in chunk if item.error is None]
        scored = self.score_rows(np.stack([item.cache_image for item in good])) if good else []
        rows = {id(item): row for item, row in zip(good, scored, strict=True)}
        for item in chunk:
            if item.error is not None:
                yield ImageResult(item.source, error=item.error)
                continue
            row, ood_score = rows[id(item)]
            probabilities = {label: float(p) for label, p in zip(self.labels, row, strict=True)}
            assert item.geometry is not None and item.cache_image is not None
            maps = self.explain(item.cache_image, self.heatmap_labels(probabilities, heatmaps))
            yield ImageResult(
                item.source,
                probabilities,
                dict(self.thresholds),
                {label: self.heatmap_to_image(m, item.geometry) for label, m in maps.items()},
                item.geometry.orig_height,
                item.geometry.orig_width,
                ood_score=ood_score,
                ood_flag=self.ood_flag(ood_score),
            )


# ---------------------------------------------------------------------- helpers


def choose_backend(bundle: Bundle, backend: str) -> str:
    """The graph that serves ``backend``: ``auto`` is int8 only when it passed the gate and was measured
    faster at export, else the fp32 ONNX graph when there is one, else PyTorch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "onnx-int8" if bundle.int8_preferred else "onnx" if bundle.onnx else "torch"
    if backend == "onnx" and bundle.onnx is None:
        raise ValueError(f"bundle {bundle.source} has no ONNX graph (export it with --format onnx)")
    if backend == "onnx-int8" and bundle.onnx_int8 is None:
        raise ValueError(f"bundle {bundle.source} has no int8 ONNX graph (export it with --quantize)")
    return backend


def bundle_runner(
    bundle: Bundle, backend: str, threads: int | None = None, device: str | torch.device = "cpu"
) -> Runner:
    """The :class:`Runner` of ``backend`` (as :func:`choose_backend` returns) for ``bundle``; ``device``
    for PyTorch (ONNX graphs run on the CPU)."""
    graph = {"onnx": bundle.onnx, "onnx-int8": bundle.onnx_int8}.get(backend)
    if graph is not None:
        return Runner.from_onnx(graph, bundle.preprocess, bundle.activation, threads)
    return Runner.from_torch(bundle.build_model(), bundle.preprocess, bundle.activation, device)


def _describe(item: ImageSource, index: int) -> str:
    """How an input is named in its result: its path, its file object's name, else ``array[i]``..."""
    if isinstance(item, str | os.PathLike):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array[{index}]"
    if isinstance(item, bytes | bytearray | memoryview):
        return f"bytes[{index}]"
    return str(getattr(item, "name", None) or f"stream[{index}]")


def _ordered_map(
    pool: ThreadPoolExecutor, function: Callable[..., PreparedImage], arguments: Iterable[tuple], window: int
) -> Iterator[PreparedImage]:
    """``function(*args)`` for each args on ``pool``, in order, with at most ``window`` in flight."""
    pending: deque[Future[PreparedImage]] = deque()
    for args in arguments:
        pending.append(pool.submit(function, *args))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders (searched recursively for image suffixes), glob patterns and CSV files of paths
    (column ``path``, else the first column; relative paths are relative to the CSV) → image paths, plus
    ``(input, reason)`` for inputs that name nothing."""
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((text, "folder holds no PNG/JPEG/DICOM/BMP/TIFF file"))
            paths.extend(found)
        elif path.suffix.lower() == ".csv" and path.is_file():
            paths.extend(_paths_from_csv(path))
        elif path.exists():
            paths.append(text)
        elif glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            paths.extend(found) if found else problems.append((text, "no file matches the pattern"))
        else:
            problems.append((text, "no such file or folder"))
    return paths, problems


def _paths_from_csv(path: Path) -> list[str]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if frame.empty:
        return []
    column = "path" if "path" in frame.columns else frame.columns[0]
    values = [value for value in frame[column] if value]
    return [
        value if "://" in value or Path(value).is_absolute() else str(path.parent / value) for value in values
    ]


def heatmap_rgba(heatmap: np.ndarray, colormap: str = "jet", max_alpha: float = 0.85) -> np.ndarray:
    """A heatmap in [0, 1] as an RGBA uint8 overlay whose opacity grows with the value."""
    from matplotlib import colormaps

    rgba = colormaps[colormap](np.clip(heatmap, 0.0, 1.0))
    rgba[..., 3] = max_alpha * np.clip(heatmap, 0.0, 1.0)
    return np.rint(rgba * 255).astype(np.uint8)


def blend_heatmap(image: np.ndarray, heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """The grayscale image with the heatmap overlay composited on it (RGB uint8)."""
    overlay = heatmap_rgba(heatmap, colormap).astype(np.float32) / 255.0
    base = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    alpha = overlay[..., 3:]
    return np.rint((base * (1 - alpha) + overlay[..., :3] * alpha) * 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 (H, W), (H, W, 3) or (H, W, 4) array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
