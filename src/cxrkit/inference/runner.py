"""The one inference core: an image → its cache image → model input → logits → probabilities.

>>> prepared = prepare_image("a.dcm", "a.dcm", spec)          # decode + cache resize, errors captured
>>> runner = Runner.from_torch(model, spec, "sigmoid", device="cuda")
>>> scores = runner.predict(batches(cache_images, 32))            # [N, L] float64 probabilities
>>> views = runner.predict_views(batches(cache_images, 32), tta_views)  # [V, N, L], view 0 = the image

Evaluation (:func:`cxrkit.evaluation.run.predict_rows`), prediction and serving
(:class:`cxrkit.inference.predictor.Predictor`) and export (thresholds on the validation split, the ONNX
parity check) all call it, and explanation prepares its images with :func:`prepare_image`, so an image is
scored the same way everywhere. The input side is :func:`cxrkit.data.decode.read_image` and
:class:`cxrkit.data.transforms.PreprocessSpec` (the cache resize and the evaluation transform); the output
side is :func:`activate`, the one place that turns logits into probabilities.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from cxrkit.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, Plausibility, array_to_gray, read_image
from cxrkit.data.transforms import Geometry, PreprocessSpec
from cxrkit.inference.ood import has_features

if TYPE_CHECKING:
    import onnxruntime

#: Output activations: ``sigmoid`` (multi-label, one independent probability per finding) or ``softmax``
#: (one label per image, e.g. NORMAL vs PNEUMONIA).
ACTIVATIONS: tuple[str, ...] = ("sigmoid", "softmax")
#: An image: a path or fsspec URL, encoded bytes, a binary file object (an upload) or a decoded array.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray
#: Extra views of a model-input batch (test-time augmentation); the first view must be the batch itself.
Views = Callable[[Tensor], list[Tensor]]


def activate(logits: Tensor, activation: str) -> Tensor:
    """Probabilities from logits ``[B, L]`` under ``activation``, in the logits' dtype."""
    if activation == "softmax":
        return logits.softmax(dim=1)
    if activation == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def task_for(activation: str) -> str:
    """The evaluation task of an activation: ``multiclass`` for softmax, ``multilabel`` for sigmoid."""
    return "multiclass" if activation == "softmax" else "multilabel"


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of ``batch_size`` images (the last one shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


@dataclass
class PreparedImage:
    """A decoded image as the training cache would hold it, with the geometry that maps it back."""

    source: str
    cache_image: np.ndarray | None = None  #: uint8 (image_size, image_size), as the training cache holds it
    geometry: Geometry | None = None
    image: np.ndarray | None = None  #: the decoded uint8 (H, W) image, kept only on request
    error: str | None = None


def decode_image(
    source: ImageSource, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Any :data:`ImageSource` as the uint8 ``(H, W)`` convention of :func:`~cxrkit.data.decode.read_image`
    (arrays through :func:`~cxrkit.data.decode.array_to_gray`); ``name`` names in-memory input in errors."""
    if isinstance(source, np.ndarray):
        return array_to_gray(source)
    return read_image(source, name=name, max_pixels=max_pixels)


def prepare_image(
    source: ImageSource,
    name: str,
    spec: PreprocessSpec,
    *,
    keep_image: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    plausibility: Plausibility | None = None,
) -> PreparedImage:
    """Decode ``source``, check its shape against ``plausibility`` (when given) and resize it as the cache
    does; a failure is returned as ``error``, not raised.

    ``name`` labels the result and errors; its suffix lets a DICOM upload without its preamble be read."""
    try:
        image = decode_image(source, name=name, max_pixels=max_pixels)
        if plausibility is not None:
            plausibility.check(image.shape[1], image.shape[0], name)
        cache_image, geometry = spec.cache_image(image)
    except (ImageDecodeError, ValueError, OSError) as error:
        reason = error.reason if isinstance(error, ImageDecodeError) else str(error)
        return PreparedImage(name, error=reason)
    return PreparedImage(name, cache_image, geometry, image if keep_image else None)


@dataclass
class Runner:
    """A network (a PyTorch module or an ONNX Runtime session) with the preprocessing and activation it was
    trained with. Build one with :meth:`from_torch` or :meth:`from_onnx`."""

    spec: PreprocessSpec
    activation: str
    model: nn.Module | None = None
    session: onnxruntime.InferenceSession | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if (self.model is None) == (self.session is None):
            raise ValueError("a Runner needs exactly one of a PyTorch model and an ONNX Runtime session")

    @classmethod
    def from_torch(
        cls, model: nn.Module, spec: PreprocessSpec, activation: str, device: str | torch.device = "cpu"
    ) -> Runner:
        """Run ``model`` (moved to ``device``, put in eval mode) under ``torch.inference_mode``."""
        target = resolve_device(device)
        return cls(spec, activation, model=model.to(target).eval(), device=target)

    @classmethod
    def from_onnx(
        cls, graph: bytes | str, spec: PreprocessSpec, activation: str, threads: int | None = None
    ) -> Runner:
        """Run an ONNX graph (bytes or file) on ONNX Runtime's CPU provider, ``threads`` intra-op threads."""
        from cxrkit.inference.onnx_export import create_session

        return cls(spec, activation, session=create_session(graph, threads))

    @property
    def backend(self) -> str:
        return "onnx" if self.session is not None else "torch"

    def model_input(self, cache_images: np.ndarray) -> Tensor:
        """uint8 cache images ``[B, S, S]`` → float32 model input ``[B, 1, crop, crop]`` on the device."""
        return torch.from_numpy(self.spec.model_input(cache_images)).to(self.device)

    def forward(self, batch: Tensor) -> Tensor:
        """Logits ``[B, L]`` (float64, on the CPU) of a model-input batch."""
        if self.session is not None:
            from cxrkit.inference.onnx_export import run_session

            return torch.from_numpy(run_session(self.session, batch.cpu().numpy())).double()
        assert self.model is not None
        with torch.inference_mode():
            return self.model(batch).double().cpu()

    def forward_with_features(self, batch: Tensor) -> tuple[Tensor, np.ndarray | None]:
        """Logits ``[B, L]`` (float64, on the CPU) and pooled backbone features ``[B, C]`` (float64) of a
        model-input batch from ONE forward pass (PyTorch: the model's ``forward_with_features``; ONNX: the
        graph's ``features`` output). Features are None when the network does not expose them (a
        graph exported without that output)."""
        if self.session is not None:
            from cxrkit.inference.onnx_export import has_features_output, run_session, run_session_features

            images = batch.cpu().numpy()
            if not has_features_output(self.session):
                return torch.from_numpy(run_session(self.session, images)).double(), None
            logits, features = run_session_features(self.session, images)
            return torch.from_numpy(logits).double(), features.astype(np.float64)
        assert self.model is not None
        if not has_features(self.model):
            return self.forward(batch), None
        with torch.inference_mode():
            logits, features = self.model.forward_with_features(batch)
            return logits.double().cpu(), features.float().cpu().numpy().astype(np.float64)

    def probabilities_and_features(self, cache_images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``[B, L]`` and pooled features ``[B, C]`` (or None, see
        :meth:`forward_with_features`) of one batch of uint8 cache images ``[B, S, S]``."""
        logits, features = self.forward_with_features(self.model_input(cache_images))
        return activate(logits, self.activation).numpy(), features

    def logits(self, cache_images: np.ndarray) -> np.ndarray:
        """Logits ``[B, L]`` (float64) of one batch of uint8 cache images ``[B, S, S]``."""
        return self.forward(self.model_input(cache_images)).numpy()

    def probabilities(self, cache_images: np.ndarray) -> np.ndarray:
        """Probabilities ``[B, L]`` (float64) of one batch of uint8 cache images ``[B, S, S]``."""
        return activate(self.forward(self.model_input(cache_images)), self.activation).numpy()

    def predict(self, image_batches: Iterable[np.ndarray]) -> np.ndarray:
        """Probabilities ``[N, L]`` (float64) of every batch of uint8 cache images, in order."""
        return self.predict_views(image_batches)[0]

    def predict_views(self, image_batches: Iterable[np.ndarray], views: Views | None = None) -> np.ndarray:
        """Probabilities ``[V, N, L]`` of every batch under each of ``views`` (default: the image only)."""
        scores: list[np.ndarray] = []
        for cache_images in image_batches:
            batch = self.model_input(cache_images)
            viewed = views(batch) if views is not None else [batch]
            scores.append(np.stack([activate(self.forward(v), self.activation).numpy() for v in viewed]))
        if not scores:
            raise ValueError("no images to predict")
        return np.concatenate(scores, axis=1)
