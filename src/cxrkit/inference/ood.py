"""Out-of-distribution flag: is this image like the chest X-rays the model was trained on?

A feature-space detector (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples"): the pooled backbone features (:meth:`cxrkit.models.factory.CXRModel.pooled_features`, timm's
own global pooling; the same from ``forward_with_features`` and from a bundle's ONNX graph's ``features``
output) of the training images define a Gaussian; an image's
score is its Mahalanobis distance to that Gaussian, with the covariance estimated by Ledoit-Wolf shrinkage
(``sklearn.covariance.LedoitWolf``: well conditioned with more feature dimensions than images). The flag
threshold is a high quantile (default 99.5 %) of the scores of validation images, which the mean and
covariance never saw, so about 0.5 % of in-distribution images are flagged by construction and everything far
from the training images is.

>>> detector = fit_from_cache(model, "runs/cache/pneumonia-224", spec)    # train fits, val sets the threshold
>>> detector.save("bundle/ood")                                           # ood.safetensors + ood.json
>>> OODDetector.load("bundle/ood").flag(pooled_features(model, images))

Saved as plain arrays (safetensors) and JSON, never pickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load, save
from sklearn.covariance import LedoitWolf
from torch import nn

from cxrkit.data.transforms import PreprocessSpec

DEFAULT_QUANTILE = 0.995
FORMAT = "cxrkit-ood-mahalanobis/1"


@dataclass
class OODDetector:
    """Mahalanobis distance to the training features; ``flag`` = distance above ``threshold``."""

    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D), inverse of the shrunk covariance
    threshold: float
    quantile: float
    n_fit: int
    n_calibration: int
    shrinkage: float

    @classmethod
    def fit(
        cls, features: np.ndarray, calibration: np.ndarray, quantile: float = DEFAULT_QUANTILE
    ) -> OODDetector:
        """Mean and Ledoit-Wolf covariance of ``features`` (training images, [N, D]); the threshold is the
        ``quantile`` of the distances of ``calibration`` (validation images, never used for the fit)."""
        features, calibration = _as_features(features, "features"), _as_features(calibration, "calibration")
        if features.shape[1] != calibration.shape[1]:
            raise ValueError(f"feature sizes differ: {features.shape[1]} (fit) vs {calibration.shape[1]}")
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
        if len(features) < 2 or len(calibration) < 1:
            raise ValueError("the detector needs at least 2 training and 1 validation image")
        estimate = LedoitWolf().fit(features)
        detector = cls(
            estimate.location_,
            estimate.precision_,
            float("inf"),
            quantile,
            len(features),
            len(calibration),
            float(estimate.shrinkage_),
        )
        detector.threshold = detector.threshold_of(calibration)
        return detector

    def threshold_of(self, calibration: np.ndarray) -> float:
        """The :attr:`quantile` of the distances of ``calibration`` features [N, D] (validation images)."""
        return float(np.quantile(self.score(calibration), self.quantile))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of every row of ``features`` [N, D] to the training features."""
        features = _as_features(features, "features")
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected {self.mean.shape[0]} features per image, got {features.shape[1]}")
        centred = features - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        return np.sqrt(np.clip(squared, 0, None))

    def flag(self, features: np.ndarray) -> np.ndarray:
        """True where an image is out of distribution (distance above the threshold)."""
        return self.score(features) > self.threshold

    def to_bytes(self) -> tuple[bytes, bytes]:
        """The safetensors arrays (mean, precision) and the JSON metadata (threshold, provenance)."""
        arrays = save({"mean": self.mean, "precision": self.precision})
        return arrays, json.dumps(self.info(), indent=2).encode()

    def info(self) -> dict[str, object]:
        """The JSON metadata: format, threshold, quantile and how many images fitted and calibrated it."""
        return {
            "format": FORMAT,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "n_fit": self.n_fit,
            "n_calibration": self.n_calibration,
            "shrinkage": self.shrinkage,
            "n_features": int(self.mean.shape[0]),
        }

    @classmethod
    def from_bytes(cls, arrays: bytes, meta: bytes, name: str = "detector") -> OODDetector:
        """Read what :meth:`to_bytes` wrote; errors name ``name`` (e.g. the file or bundle member)."""
        try:
            info = json.loads(meta)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{name}: metadata is not valid JSON: {error}") from error
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            found = info.get("format") if isinstance(info, dict) else None
            raise ValueError(f"{name}: not a cxrkit OOD detector (format {found!r})")
        tensors = load(arrays)
        mean, precision = tensors.get("mean"), tensors.get("precision")
        if mean is None or precision is None or precision.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"{name}: needs 'mean' [D] and 'precision' [D, D] arrays")
        if mean.shape[0] != info["n_features"]:
            raise ValueError(f"{name}: {mean.shape[0]} features but its metadata says {info['n_features']}")
        return cls(
            mean,
            precision,
            float(info["threshold"]),
            float(info["quantile"]),
            int(info["n_fit"]),
            int(info["n_calibration"]),
            float(info["shrinkage"]),
        )

    def save(self, prefix: str | Path) -> tuple[Path, Path]:
        """Write ``<prefix>.safetensors`` (mean, precision) and ``<prefix>.json`` (threshold, provenance)."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        arrays, meta = prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")
        array_bytes, meta_bytes = self.to_bytes()
        arrays.write_bytes(array_bytes)
        meta.write_bytes(meta_bytes)
        return arrays, meta

    @classmethod
    def load(cls, prefix: str | Path) -> OODDetector:
        """Read what :meth:`save` wrote; a clear error names a missing or inconsistent file."""
        prefix = Path(prefix)
        arrays, meta = prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")
        for path in (arrays, meta):
            if not path.is_file():
                raise FileNotFoundError(f"out-of-distribution detector file not found: {path}")
        return cls.from_bytes(arrays.read_bytes(), meta.read_bytes(), str(meta))


def pooled_features(model: nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Pooled backbone features ``[N, C]`` (float64) of model-input images ``[N, 1, H, W]`` in [0, 1],
    through ``model.pooled_features`` (a :class:`~cxrkit.models.factory.CXRModel`)."""
    images = torch.as_tensor(images)
    device = next(model.parameters()).device
    parts = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, torch.float32)
            parts.append(model.pooled_features(batch).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, 0))


def has_features(model: nn.Module) -> bool:
    """Whether ``model`` gives its pooled features with its logits (``forward_with_features``: a single
    :class:`~cxrkit.models.factory.CXRModel`, not an ensemble)."""
    return callable(getattr(model, "forward_with_features", None))


def features_of_batches(model: nn.Module, batches: Iterable[np.ndarray | torch.Tensor]) -> np.ndarray:
    """:func:`pooled_features` over an iterable of model-input batches, stacked."""
    return np.concatenate([pooled_features(model, batch) for batch in batches])


def cache_batches(
    cache_dir: str | Path, split: str, spec: PreprocessSpec, limit: int | None = None, batch_size: int = 32
) -> Iterable[np.ndarray]:
    """Model-input batches of the cached images of ``split`` (the first ``limit`` in a seeded shuffle)."""
    from cxrkit.data.dataset import CachedImages

    images = CachedImages(cache_dir, split)
    order = np.random.default_rng(0).permutation(len(images))[:limit]
    if len(order) == 0:
        raise ValueError(f"cache {cache_dir} has no {split!r} images to fit the detector on")
    for start in range(0, len(order), batch_size):
        cached, _ = images.batch(np.sort(order[start : start + batch_size]))
        yield spec.model_input(cached[:, 0].numpy())


def fit_from_cache(
    model: nn.Module,
    cache_dir: str | Path,
    spec: PreprocessSpec,
    quantile: float = DEFAULT_QUANTILE,
    limit: int | None = 4000,
) -> OODDetector:
    """Fit on (up to ``limit``) cached training images, threshold on the cached validation images."""
    train = features_of_batches(model, cache_batches(cache_dir, "train", spec, limit))
    val = features_of_batches(model, cache_batches(cache_dir, "val", spec, limit))
    return OODDetector.fit(train, val, quantile)


def _as_features(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a finite [N, D] array, got shape {array.shape}")
    return array
