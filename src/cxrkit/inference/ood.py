"""Out-of-distribution flag: is this image like the chest X-rays the model was trained on?

A feature-space detector, deep nearest neighbours (Sun et al. 2022, "Out-of-distribution detection with deep
nearest neighbors"): the pooled backbone features (:meth:`cxrkit.models.factory.CXRModel.pooled_features`,
timm's own global pooling; the same from ``forward_with_features`` and from a bundle's ONNX graph's
``features`` output) of training images, scaled to unit length, form a bank; an image's score is the cosine
distance from its unit feature vector to its ``k``-th nearest neighbour in the bank. Unlike a Gaussian fit
(Mahalanobis distance) it assumes no shape of the feature distribution, and it keeps the non-chest images
apart when an int8 graph blurs the features (``benchmarks/bench_ood.py``). The flag threshold is a high
quantile (default 99.5 %) of the scores of validation images, which the bank never holds, so about 0.5 % of
in-distribution images are flagged by construction and everything far from the training images is.

>>> detector = OODDetector.fit(pooled_features(model, train), pooled_features(model, val))
>>> detector.save("bundle/ood")                                           # ood.safetensors + ood.json
>>> OODDetector.load("bundle/ood").flag(pooled_features(model, images))

(``cxr export`` fits it on a run's training and validation images: :func:`cxrkit.inference.export.add_ood`.)

Saved as plain arrays (safetensors, the bank in float16) and JSON, never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load, save
from torch import nn

DEFAULT_QUANTILE = 0.995
NEIGHBOUR_FRACTION = 0.05  #: default k as a share of the bank (50 of 1,000 training images)
FORMAT = "cxrkit-ood-knn/1"


class OutdatedDetector(ValueError):
    """A detector of an earlier cxrkit format (e.g. the Mahalanobis detector): re-export to replace it."""


@dataclass
class OODDetector:
    """Cosine distance to the ``k``-th nearest training image; ``flag`` = distance above ``threshold``."""

    bank: np.ndarray  # (N, D) float32, unit-length pooled features of training images
    k: int
    threshold: float
    quantile: float
    n_calibration: int

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        calibration: np.ndarray,
        quantile: float = DEFAULT_QUANTILE,
        k: int | None = None,
    ) -> OODDetector:
        """The bank of ``features`` (training images, [N, D]); ``k`` defaults to :data:`NEIGHBOUR_FRACTION`
        of N and is capped at N. The threshold is the ``quantile`` of the scores of ``calibration``
        (validation images, never in the bank)."""
        features, calibration = _as_features(features, "features"), _as_features(calibration, "calibration")
        if features.shape[1] != calibration.shape[1]:
            raise ValueError(f"feature sizes differ: {features.shape[1]} (fit) vs {calibration.shape[1]}")
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
        if len(features) < 2 or len(calibration) < 1:
            raise ValueError("the detector needs at least 2 training and 1 validation image")
        k = max(1, round(NEIGHBOUR_FRACTION * len(features))) if k is None else k
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        bank = _unit(features).astype(np.float16).astype(np.float32)  # as saved
        detector = cls(bank, min(k, len(bank)), float("inf"), quantile, len(calibration))
        detector.threshold = detector.threshold_of(calibration)
        return detector

    @property
    def n_fit(self) -> int:
        """How many training images the bank holds."""
        return len(self.bank)

    def threshold_of(self, calibration: np.ndarray) -> float:
        """The :attr:`quantile` of the scores of ``calibration`` features [N, D] (validation images)."""
        return float(np.quantile(self.score(calibration), self.quantile))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Cosine distance (0 to 2) of every row of ``features`` [N, D] to its k-th nearest training image."""
        features = _as_features(features, "features")
        if features.shape[1] != self.bank.shape[1]:
            raise ValueError(f"expected {self.bank.shape[1]} features per image, got {features.shape[1]}")
        similarity = _unit(features).astype(np.float32) @ self.bank.T  # (N, bank)
        kth = np.partition(similarity, -self.k, axis=1)[:, -self.k]
        return np.clip(1.0 - kth.astype(np.float64), 0.0, 2.0)

    def flag(self, features: np.ndarray) -> np.ndarray:
        """True where an image is out of distribution (distance above the threshold)."""
        return self.score(features) > self.threshold

    def to_bytes(self) -> tuple[bytes, bytes]:
        """The safetensors bank (float16) and the JSON metadata (k, threshold, provenance)."""
        arrays = save({"bank": self.bank.astype(np.float16)})
        return arrays, json.dumps(self.info(), indent=2).encode()

    def info(self) -> dict[str, object]:
        """The JSON metadata: format, k, threshold, quantile and how many images fitted and calibrated it."""
        return {
            "format": FORMAT,
            "k": self.k,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "n_fit": self.n_fit,
            "n_calibration": self.n_calibration,
            "n_features": int(self.bank.shape[1]),
        }

    @classmethod
    def from_bytes(cls, arrays: bytes, meta: bytes, name: str = "detector") -> OODDetector:
        """Read what :meth:`to_bytes` wrote; errors name ``name`` (e.g. the file or bundle member);
        :class:`OutdatedDetector` for an earlier cxrkit detector format."""
        try:
            info = json.loads(meta)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{name}: metadata is not valid JSON: {error}") from error
        found = info.get("format") if isinstance(info, dict) else None
        if isinstance(found, str) and found.startswith("cxrkit-ood-") and found != FORMAT:
            raise OutdatedDetector(f"{name}: detector format {found!r} of an earlier cxrkit (now {FORMAT!r})")
        if found != FORMAT:
            raise ValueError(f"{name}: not a cxrkit OOD detector (format {found!r})")
        bank = load(arrays).get("bank")
        if bank is None or bank.ndim != 2 or len(bank) < 1:
            raise ValueError(f"{name}: needs a 'bank' [N, D] array")
        if bank.shape[1] != info["n_features"] or len(bank) != info["n_fit"]:
            raise ValueError(
                f"{name}: bank of shape {list(bank.shape)} but its metadata says "
                f"{info['n_fit']} x {info['n_features']}"
            )
        k = int(info["k"])
        if not 1 <= k <= len(bank):
            raise ValueError(f"{name}: k={k} outside 1..{len(bank)}")
        return cls(
            bank.astype(np.float32),
            k,
            float(info["threshold"]),
            float(info["quantile"]),
            int(info["n_calibration"]),
        )

    def save(self, prefix: str | Path) -> tuple[Path, Path]:
        """Write ``<prefix>.safetensors`` (the bank) and ``<prefix>.json`` (k, threshold, provenance)."""
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
    """Whether ``model`` gives its pooled features with its logits (``forward_with_features``: a
    :class:`~cxrkit.models.factory.CXRModel` or an :class:`~cxrkit.models.ensemble.EnsembleModel` of them)."""
    return callable(getattr(model, "forward_with_features", None))


def _unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero: distance 1 to everything)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def _as_features(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a finite [N, D] array, got shape {array.shape}")
    return array
