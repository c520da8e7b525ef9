"""The model bundle: everything needed to run a trained model, and nothing that executes on load.

A bundle is a folder or a zip file (``model.cxr``) holding:

=====================  ==============================================================================
``bundle.json``        manifest: model id and version, labels, operating thresholds (and where they came
                       from), output activation, preprocessing spec, architecture (the ``model`` config
                       section), training provenance, SHA-256 of every other file, quantisation report
``weights.safetensors`` network weights (state dict of :func:`cxrkit.models.factory.create_model`)
``model.onnx``         optional ONNX graph, opset >= 17: ``image`` [B,1,crop,crop] → ``logits`` (dynamic B)
``model.int8.onnx``    optional int8 dynamically quantised graph, present only if it passed the AUROC gate
=====================  ==============================================================================

Loading reads JSON, safetensors and ONNX bytes only (never pickle), checks every file's SHA-256 and ignores
nothing silently: an unknown member, a missing field or a digest mismatch is an error naming it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import cxrkit
from cxrkit.config import to_container
from cxrkit.data.augment import eval_transform
from cxrkit.data.cache import RESIZE_POLICIES, Geometry
from cxrkit.inference.onnx_export import MIN_OPSET
from cxrkit.inference.quantize import MAX_AUROC_DROP
from cxrkit.models.config import ModelConfig

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "cxrkit-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
MEMBERS = (MANIFEST, WEIGHTS, ONNX, ONNX_INT8)
ZIP_SUFFIXES = (".cxr", ".zip")
ACTIVATIONS = ("sigmoid", "softmax")
THRESHOLDS_FILE = "thresholds.json"  #: a run's operating thresholds (cxrkit OperatingPoints JSON)
DEFAULT_THRESHOLD = 0.5
EVAL_MODES = ("resize", "center_crop")


class BundleError(ValueError):
    """A bundle that is missing, malformed or fails its integrity checks."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded uint8 image becomes model input, exactly as in training and evaluation: the cache step
    (:class:`cxrkit.data.cache.Geometry`: ``resize_policy`` to ``image_size``) then the evaluation transform
    (:func:`cxrkit.data.augment.eval_transform` to ``crop_size`` with ``eval_mode``) on values in [0, 1].
    Intensity normalisation happens inside the network."""

    image_size: int
    resize_policy: str
    crop_size: int
    eval_mode: str = "resize"

    def __post_init__(self) -> None:
        if self.resize_policy not in RESIZE_POLICIES:
            raise BundleError(f"resize_policy must be one of {RESIZE_POLICIES}, got {self.resize_policy!r}")
        if self.eval_mode not in EVAL_MODES:
            raise BundleError(f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        if not 0 < self.crop_size <= self.image_size:
            raise BundleError(f"crop_size {self.crop_size} must be in 1..image_size ({self.image_size})")

    def cache_image(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """The uint8 ``(image_size, image_size)`` image the training cache would hold, and its geometry."""
        geometry = Geometry.fit(image.shape[0], image.shape[1], self.image_size, self.resize_policy)
        return geometry.apply(image), geometry

    def model_input(self, cache_images: np.ndarray) -> np.ndarray:
        """uint8 cache images ``[B, S, S]`` → float32 model input ``[B, 1, crop, crop]`` in [0, 1]."""
        # uint8 -> float32 / 255 exactly as the data module's to_unit_float, in numpy (no thread-pool wake-up)
        unit = np.divide(cache_images, np.float32(255.0), dtype=np.float32)
        batch = torch.from_numpy(unit).unsqueeze(1)
        with torch.inference_mode():
            return np.ascontiguousarray(eval_transform(batch, self.crop_size, self.eval_mode).numpy())

    def heatmap_to_cache(self, heatmap: np.ndarray) -> np.ndarray:
        """A ``crop``-sized map back onto the ``image_size`` cache canvas (inverse of the eval transform)."""
        if self.eval_mode == "resize":
            resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize(
                (self.image_size, self.image_size), Image.Resampling.BILINEAR
            )
            return np.asarray(resized, dtype=np.float32)
        canvas = np.zeros((self.image_size, self.image_size), dtype=np.float32)
        start = (self.image_size - self.crop_size) // 2
        canvas[start : start + self.crop_size, start : start + self.crop_size] = heatmap
        return canvas

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize_policy": self.resize_policy,
            "crop_size": self.crop_size,
            "eval_mode": self.eval_mode,
            "input": f"float32 [batch, 1, {self.crop_size}, {self.crop_size}] in [0, 1]",
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessSpec:
        return cls(
            int(values["image_size"]),
            str(values["resize_policy"]),
            int(values["crop_size"]),
            str(values.get("eval_mode", "resize")),
        )


@dataclass
class Bundle:
    """A loaded bundle: metadata, weights (CPU tensors) and optional ONNX graphs (bytes)."""

    model_id: str
    version: str
    labels: list[str]
    thresholds: dict[str, float]
    threshold_source: str
    activation: str
    preprocess: PreprocessSpec
    model_config: dict[str, Any]
    provenance: dict[str, Any]
    weights: dict[str, torch.Tensor]
    onnx: bytes | None = None
    onnx_int8: bytes | None = None
    quantization: dict[str, Any] | None = None
    onnx_parity: float | None = None
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.labels = [str(label) for label in self.labels]
        missing = [label for label in self.labels if label not in self.thresholds]
        if missing:
            raise BundleError(f"bundle has no operating threshold for labels {missing}")
        if self.activation not in ACTIVATIONS:
            raise BundleError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        self.thresholds = {label: float(self.thresholds[label]) for label in self.labels}

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def network_config(self) -> Any:
        """The ``model`` config section as a validated OmegaConf object, with pretrained loading disabled
        (the bundle's weights replace any initialisation)."""
        config = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.model_config)
        config.pretrained.source = "none"
        return config

    def build_model(self) -> nn.Module:
        """The PyTorch network with the bundle's weights, in eval mode (strict key and shape match)."""
        from cxrkit.models.factory import create_model

        model = create_model(self.network_config(), self.num_classes)
        try:
            model.load_state_dict(self.weights, strict=True)
        except RuntimeError as error:
            arch = self.model_config.get("arch")
            raise BundleError(f"weights do not fit architecture {arch!r}: {error}") from error
        return model.eval()

    def manifest(self, digests: dict[str, str]) -> dict[str, Any]:
        """The ``bundle.json`` content; ``digests`` maps member names to their SHA-256."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "version": self.version,
            "labels": self.labels,
            "activation": self.activation,
            "thresholds": self.thresholds,
            "threshold_source": self.threshold_source,
            "preprocess": self.preprocess.to_dict(),
            "model": self.model_config,
            "provenance": self.provenance,
            "onnx_parity_max_abs_logit_diff": self.onnx_parity,
            "quantization": self.quantization,
            "files": {name: {"sha256": digest} for name, digest in digests.items()},
        }

    def members(self) -> dict[str, bytes]:
        """File name → bytes of everything but the manifest."""
        files = {WEIGHTS: save_safetensors({k: v.contiguous() for k, v in self.weights.items()})}
        if self.onnx is not None:
            files[ONNX] = self.onnx
        if self.onnx_int8 is not None:
            files[ONNX_INT8] = self.onnx_int8
        return files

    def save(self, path: str | Path) -> Path:
        """Write a zip when ``path`` ends in .cxr or .zip, else a folder."""
        path = Path(path)
        files = self.members()
        digests = {name: _sha256(data) for name, data in files.items()}
        files[MANIFEST] = json.dumps(self.manifest(digests), indent=2, sort_keys=False).encode()
        if path.suffix.lower() in ZIP_SUFFIXES:
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name in MEMBERS:
                    if name in files:
                        archive.writestr(name, files[name])
        else:
            path.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (path / name).write_bytes(data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read a bundle folder or zip (JSON + safetensors + ONNX bytes; nothing is unpickled)."""
        files = _read_members(Path(path))
        manifest = _parse_manifest(files.pop(MANIFEST), path)
        declared = manifest["files"]
        for name, data in files.items():
            expected = declared.get(name, {}).get("sha256")
            if expected is None:
                raise BundleError(f"{path}: member {name} is not listed in {MANIFEST}")
            if _sha256(data) != expected:
                raise BundleError(f"{path}: {name} is corrupt (SHA-256 does not match {MANIFEST})")
        absent = [name for name in declared if name not in files]
        if absent:
            raise BundleError(f"{path}: files listed in {MANIFEST} are missing: {absent}")
        return cls(
            model_id=manifest["model_id"],
            version=manifest["version"],
            labels=manifest["labels"],
            thresholds=manifest["thresholds"],
            threshold_source=manifest["threshold_source"],
            activation=manifest["activation"],
            preprocess=PreprocessSpec.from_dict(manifest["preprocess"]),
            model_config=manifest["model"],
            provenance=manifest["provenance"],
            weights=load_safetensors(files[WEIGHTS]),
            onnx=files.get(ONNX),
            onnx_int8=files.get(ONNX_INT8),
            quantization=manifest.get("quantization"),
            onnx_parity=manifest.get("onnx_parity_max_abs_logit_diff"),
            source=str(path),
        )


def load_bundle(path: str | Path) -> Bundle:
    return Bundle.load(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_REQUIRED = (
    "format",
    "format_version",
    "model_id",
    "version",
    "labels",
    "activation",
    "thresholds",
    "threshold_source",
    "preprocess",
    "model",
    "provenance",
    "files",
)


def _parse_manifest(data: bytes, path: str | Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: {MANIFEST} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a cxrkit bundle ({MANIFEST} lacks format={BUNDLE_FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {manifest.get('format_version')} is not supported "
            f"(this cxrkit reads version {FORMAT_VERSION})"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{path}: {MANIFEST} is missing fields {missing}")
    if WEIGHTS not in manifest["files"]:
        raise BundleError(f"{path}: {MANIFEST} lists no {WEIGHTS}")
    return manifest


def _read_members(path: Path) -> dict[str, bytes]:
    """Known members of a zip or folder, read into memory (nothing is extracted to disk)."""
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    if path.is_dir():
        names = {child.name for child in path.iterdir() if child.is_file()}
        _check_names(names, path)
        return {name: (path / name).read_bytes() for name in MEMBERS if name in names}
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path} is neither a bundle folder nor a zip file")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        _check_names(names, path)
        return {name: archive.read(name) for name in MEMBERS if name in names}


def _check_names(names: set[str], path: Path) -> None:
    if MANIFEST not in names:
        raise BundleError(f"{path}: no {MANIFEST} (not a cxrkit bundle)")
    unknown = sorted(names - set(MEMBERS))
    if unknown:
        raise BundleError(f"{path}: unexpected files {unknown} (a bundle holds only {list(MEMBERS)})")


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the safetensors encoding of ``weights`` (a stable id for a set of weights)."""
    return _sha256(save_safetensors({k: v.contiguous() for k, v in weights.items()}))


# ---------------------------------------------------------------------- export from a training run


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as plain containers (``weights_only`` unpickling; a checkpoint holding other
    objects is read fully, with a warning: only do that for your own runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning(
            "%s holds objects beyond tensors and containers; unpickling it fully (trusted runs only)", path
        )
        return torch.load(path, map_location="cpu", weights_only=False)


def network_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's state dict from a checkpoint of :class:`~cxrkit.training.module.CXRClassifier`
    (``model.`` keys; EMA weights when the run used them, since Lightning's weight averaging stores the
    average in ``state_dict``)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise BundleError("checkpoint has no 'state_dict' (not a Lightning checkpoint)")
    weights = {key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")}
    if not weights:
        raise BundleError(
            "checkpoint state_dict has no 'model.*' entries (not a cxrkit CXRClassifier checkpoint)"
        )
    return weights


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    checkpoint: str = "best",
    thresholds_path: str | Path | None = None,
    threshold_method: str = "youden",
    onnx: bool = False,
    quantize: bool = False,
    max_auroc_drop: float = MAX_AUROC_DROP,
    opset: int = MIN_OPSET,
    model_id: str | None = None,
    version: str | None = None,
    parity_tolerance: float = 1e-4,
) -> Bundle:
    """Bundle a ``cxr train`` run directory (see :mod:`cxrkit.training.run`); write it to ``out`` if given.

    Operating thresholds come from ``thresholds_path``, else the run's ``thresholds.json``, else are
    chosen on the validation split with ``threshold_method``; only when no validation data can be read do
    they default to 0.5, with a warning. ``quantize`` adds an int8 graph if the validation AUROC drops by
    less than ``max_auroc_drop`` (the report is stored either way).
    """
    from cxrkit.training.module import CHECKPOINT_METADATA_KEY, activation_for
    from cxrkit.training.run import LABELS_FILE, load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    labels = json.loads((run_dir / LABELS_FILE).read_text())
    checkpoint_file = _checkpoint_file(run_dir, checkpoint)
    state = read_checkpoint(checkpoint_file)
    metadata = state.get(CHECKPOINT_METADATA_KEY, {})
    weights = network_weights(state)
    bundle = Bundle(
        model_id=model_id or str(config.name),
        version=version or f"{datetime.now(UTC):%Y%m%d}-{weights_digest(weights)[:8]}",
        labels=labels,
        thresholds=dict.fromkeys(labels, DEFAULT_THRESHOLD),
        threshold_source="default",
        activation=str(metadata.get("activation") or activation_for(config.train.loss.name)),
        preprocess=PreprocessSpec(
            int(config.data.cache.image_size),
            str(config.data.cache.resize_policy),
            int(config.data.augment.crop_size),
            # the data module's evaluation transform (resize unless the config chooses another mode)
            str(OmegaConf.select(config, "data.augment.eval_mode", default="resize")),
        ),
        model_config=to_container(config.model),
        provenance=_provenance(run_dir, config, checkpoint_file, state),
        weights=weights,
    )
    model = bundle.build_model()
    thresholds, source = _given_thresholds(thresholds_path, run_dir, labels)
    validation = None
    if thresholds is None or quantize:
        validation = _load_validation(config, labels)
    if thresholds is None:
        thresholds, source = _validation_thresholds(bundle, model, validation, threshold_method)
    bundle.thresholds, bundle.threshold_source = thresholds, source
    if onnx or quantize:
        add_onnx(bundle, model, opset, parity_tolerance, validation.images[:8] if validation else None)
    if quantize:
        if validation is None:
            raise BundleError("int8 quantisation needs the run's validation images, which could not be read")
        add_int8(bundle, validation.images, validation.targets, max_auroc_drop)
    if out is not None:
        bundle.save(out)
    return bundle


@dataclass
class ValidationData:
    """The run's validation split: uint8 cache images ``[N, S, S]`` (as training reads them), targets
    ``[N, L]`` (1/0/NaN) and patient ids."""

    images: np.ndarray
    targets: np.ndarray
    patient_ids: np.ndarray


def _checkpoint_file(run_dir: Path, checkpoint: str) -> Path:
    from cxrkit.training.run import checkpoint_path

    if checkpoint in ("best", "last"):
        return checkpoint_path(run_dir, checkpoint)
    path = Path(checkpoint)
    path = path if path.is_absolute() or path.exists() else run_dir / path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (give best, last or a .ckpt path)")
    return path


def _provenance(run_dir: Path, config: Any, checkpoint_file: Path, state: dict[str, Any]) -> dict[str, Any]:
    resolved = to_container(config)
    return {
        "run_dir": str(run_dir.resolve()),
        "run_name": str(config.name),
        "config_sha256": hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest(),
        "checkpoint": str(checkpoint_file.resolve()),
        "checkpoint_sha256": hashlib.sha256(checkpoint_file.read_bytes()).hexdigest(),
        "epoch": state.get("epoch"),
        "global_step": state.get("global_step"),
        "ema_weights": "current_model_state" in state,
        "metrics": _run_metrics(run_dir),
        "cxrkit_version": cxrkit.__version__,
        "torch_version": torch.__version__,
        "timm_version": _version("timm"),
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": resolved,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    """Validation metrics of the best epoch (by mean AUROC) from metrics.csv, and any test metrics."""
    from cxrkit.training.run import METRICS_FILE

    metrics: dict[str, Any] = {}
    path = run_dir / METRICS_FILE
    if path.exists():
        frame = pd.read_csv(path)
        if "val/auroc_mean" in frame:
            rows = frame.dropna(subset=["val/auroc_mean"])
            if not rows.empty:
                best = rows.loc[rows["val/auroc_mean"].idxmax()]
                metrics["validation"] = {
                    key: float(value) if key != "epoch" else int(value)
                    for key, value in best.items()
                    if (key.startswith("val/") or key == "epoch") and pd.notna(value)
                }
    for test_file in sorted(run_dir.glob("test_metrics_*.json")):
        metrics[test_file.stem] = json.loads(test_file.read_text()).get("metrics", {})
    return metrics


def _given_thresholds(
    path: str | Path | None, run_dir: Path, labels: list[str]
) -> tuple[dict[str, float] | None, str]:
    """Thresholds from ``path`` or the run's thresholds.json: a cxrkit OperatingPoints file or a plain
    ``{label: threshold}`` object; ``(None, "")`` when neither exists."""
    from cxrkit.evaluation.thresholds import OperatingPoints

    if path is None:
        path = run_dir / THRESHOLDS_FILE
        if not path.exists():
            return None, ""
    path = Path(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "thresholds" in data:
        points = OperatingPoints.from_dict(data)
        values, source = points.thresholds, f"{path.name}: {points.describe()}"
    elif isinstance(data, dict) and all(isinstance(v, int | float) for v in data.values()):
        values, source = {str(k): float(v) for k, v in data.items()}, f"{path.name}"
    else:
        raise BundleError(f"{path}: expected a cxrkit thresholds file or a {{label: threshold}} object")
    missing = [label for label in labels if label not in values]
    if missing:
        raise BundleError(f"{path} has no threshold for labels {missing}")
    bad = [label for label in labels if not 0.0 <= values[label] <= 1.0]
    if bad:
        raise BundleError(f"{path}: thresholds must be probabilities in [0, 1]; invalid for {bad}")
    return {label: values[label] for label in labels}, source


def _validation_thresholds(
    bundle: Bundle, model: nn.Module, validation: ValidationData | None, method: str
) -> tuple[dict[str, float], str]:
    from cxrkit.evaluation.metrics import Predictions
    from cxrkit.evaluation.thresholds import OperatingPoints

    if validation is None:
        log.warning(
            "\n%s\nNO OPERATING THRESHOLDS: the run has no thresholds.json, none was given (--thresholds) "
            "and its validation split could not be read. Every finding uses the DEFAULT THRESHOLD %.1f, "
            "which is almost never a sensible operating point for a clinical finding.\n%s",
            "!" * 100,
            DEFAULT_THRESHOLD,
            "!" * 100,
        )
        return dict.fromkeys(
            bundle.labels, DEFAULT_THRESHOLD
        ), f"default {DEFAULT_THRESHOLD} (no validation data)"
    scores = _probabilities(model, bundle.preprocess, validation.images, bundle.activation)
    task = "multiclass" if bundle.activation == "softmax" else "multilabel"
    predictions = Predictions(validation.targets, scores, validation.patient_ids, bundle.labels, task=task)
    points = OperatingPoints.fit(predictions, method=method)
    log.info("operating thresholds: %s", points.describe())
    return points.thresholds, points.describe()


def _probabilities(
    model: nn.Module, spec: PreprocessSpec, images: np.ndarray, activation: str, batch_size: int = 32
) -> np.ndarray:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(spec.model_input(images[start : start + batch_size]))).float()
            outputs.append((logits.softmax(1) if activation == "softmax" else logits.sigmoid()).numpy())
    return np.concatenate(outputs).astype(np.float64)


def add_onnx(
    bundle: Bundle,
    model: nn.Module | None = None,
    opset: int = MIN_OPSET,
    tolerance: float = 1e-4,
    sample: np.ndarray | None = None,
) -> None:
    """Add the ONNX graph of ``model`` (default: the bundle's network) to ``bundle`` after checking it
    against PyTorch on ``sample`` uint8 cache images ``[N, S, S]`` (random ones if None)."""
    model = model if model is not None else bundle.build_model()
    from cxrkit.inference.onnx_export import create_session, export_onnx, max_logit_difference

    spec = bundle.preprocess
    with tempfile.TemporaryDirectory(prefix="cxrkit-onnx-") as folder:
        path = export_onnx(model, Path(folder) / ONNX, spec.crop_size, opset)
        bundle.onnx = path.read_bytes()
    if sample is None or not len(sample):
        sample = np.random.default_rng(0).integers(
            0, 256, (4, spec.image_size, spec.image_size), dtype=np.uint8
        )
    difference = max_logit_difference(model, create_session(bundle.onnx), spec.model_input(sample))
    if difference > tolerance:
        raise BundleError(f"ONNX graph differs from PyTorch by {difference:.2e} in logits (> {tolerance:g})")
    bundle.onnx_parity = difference


def add_int8(
    bundle: Bundle, images: np.ndarray, targets: np.ndarray, max_drop: float = MAX_AUROC_DROP
) -> None:
    """Quantise the bundle's ONNX graph (int8, dynamic) and keep it only if the mean AUROC on validation
    ``images`` (uint8 cache images ``[N, S, S]``) with ``targets`` ``[N, L]`` drops by less than
    ``max_drop``; the report is stored in ``bundle.quantization`` either way."""
    from cxrkit.inference.quantize import evaluate_quantization, quantize_onnx

    if bundle.onnx is None:
        raise BundleError("quantisation needs the bundle's ONNX graph: call add_onnx first")
    int8 = quantize_onnx(bundle.onnx)
    report = evaluate_quantization(
        bundle.onnx, int8, images, targets, bundle.labels, max_drop, transform=bundle.preprocess.model_input
    )
    bundle.quantization = report.to_dict()
    bundle.onnx_int8 = int8 if report.accepted else None


def _load_validation(config: Any, labels: list[str]) -> ValidationData | None:
    """The run's validation split through its own manifest and cache (built if absent, reused if current);
    None, with a warning, when the data cannot be read."""
    from cxrkit.data.build import build_manifest
    from cxrkit.data.cache import open_cache, prepare_cache

    cache_cfg = config.data.cache
    try:
        manifest = build_manifest(config.data)
        prepare_cache(
            manifest,
            cache_cfg.dir,
            image_size=int(cache_cfg.image_size),
            resize_policy=str(cache_cfg.resize_policy),
            shard_size=int(cache_cfg.shard_size),
            workers=int(cache_cfg.workers),
        )
        cache = open_cache(cache_cfg.dir)
    except (OSError, ValueError, RuntimeError) as error:
        log.warning("cannot read the validation split of run %r: %s", str(config.name), error)
        return None
    frame = cache.manifest.frame
    rows = np.flatnonzero(frame["split"].astype(str).to_numpy() == "val")
    if rows.size == 0:
        log.warning("run %r has no validation images in its data", str(config.name))
        return None
    missing = [label for label in labels if label not in cache.labels]
    if missing:
        log.warning("validation data has no targets for labels %s (treated as unknown)", missing)
    targets = cache.manifest.with_labels(labels).targets[rows].astype(np.float64)
    log.info("validation split: %d images", rows.size)
    return ValidationData(cache.images(rows), targets, frame["patient_id"].astype(str).to_numpy()[rows])
