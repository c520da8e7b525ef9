"""Export a ``cxr train`` run to a model bundle (:mod:`cxrkit.inference.bundle`).

>>> bundle = export_run("runs/nih-lite0", "model.cxr", onnx=True, quantize=True)

:func:`export_run` reads the run's checkpoint (weights only, never unpickled objects), labels, config and
metrics, takes the operating thresholds from a thresholds file (``cxr evaluate`` writes the run's
``thresholds.json``) or fits them on the validation split, and adds an ONNX graph checked against PyTorch
(:func:`add_onnx`), an int8 graph kept only if the validation AUROC holds (:func:`add_int8`) and an
out-of-distribution detector fitted on training images, thresholded on validation ones (:func:`add_ood`).
Validation images are scored with :class:`cxrkit.inference.runner.Runner`, as evaluation and prediction
score them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

import cxrkit
from cxrkit.config import to_container
from cxrkit.data.transforms import PreprocessSpec
from cxrkit.extras import require
from cxrkit.inference.bundle import ONNX, Bundle, BundleError
from cxrkit.inference.onnx_export import MIN_OPSET
from cxrkit.inference.ood import DEFAULT_QUANTILE, OODDetector
from cxrkit.inference.runner import Runner, batches, task_for
from cxrkit.models.checkpoint import load_training_checkpoint

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"  #: a run's operating thresholds (cxrkit OperatingPoints JSON)
DEFAULT_THRESHOLD = 0.5
OOD_FIT_IMAGES = 1000  #: training-split images the out-of-distribution detector is fitted on (at most)
OOD_CALIBRATION_IMAGES = 2000  #: validation images whose score quantile sets its threshold (at most)


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
    max_auroc_drop: float | None = None,
    opset: int = MIN_OPSET,
    model_id: str | None = None,
    version: str | None = None,
    parity_tolerance: float = 1e-4,
    ood: bool = True,
    ood_quantile: float = DEFAULT_QUANTILE,
) -> Bundle:
    """Bundle a ``cxr train`` run directory (see :mod:`cxrkit.training.run`); write it to ``out`` if given.

    Operating thresholds come from ``thresholds_path``, else the run's ``thresholds.json``, else are
    chosen on the validation split with ``threshold_method``; only when no validation data can be read do
    they default to 0.5, with a warning. ``quantize`` adds an int8 graph if the validation AUROC drops by
    less than ``max_auroc_drop`` (default :data:`cxrkit.inference.quantize.MAX_AUROC_DROP`; the report is
    stored either way). ``ood`` adds the out-of-distribution detector (:func:`add_ood`; skipped with a
    warning when the data cannot be read). ONNX and quantisation need the ``onnx`` extra; a plain bundle
    does not.
    """
    run_dir = Path(run_dir)
    bundle = run_bundle(run_dir, checkpoint=checkpoint, model_id=model_id, version=version)
    labels = bundle.labels
    model = bundle.build_model()
    checkpoint_file = _checkpoint_file(run_dir, checkpoint)
    thresholds, source = _given_thresholds(thresholds_path, run_dir, labels, checkpoint_file)
    validation = None
    if thresholds is None or quantize or ood:
        validation = run_validation(run_dir, labels)
    if thresholds is None:
        thresholds, source = validation_thresholds(bundle, model, validation, threshold_method)
    bundle.thresholds, bundle.threshold_source = thresholds, source
    add_graphs(
        bundle,
        model,
        validation,
        onnx=onnx,
        quantize=quantize,
        threshold_method=threshold_method,
        max_auroc_drop=max_auroc_drop,
        opset=opset,
        parity_tolerance=parity_tolerance,
        ood=ood,
        ood_quantile=ood_quantile,
    )
    if out is not None:
        bundle.save(out)
    return bundle


def run_bundle(
    run_dir: str | Path,
    *,
    checkpoint: str = "best",
    model_id: str | None = None,
    version: str | None = None,
) -> Bundle:
    """The bundle of a run's ``checkpoint`` network alone (weights, labels, activation, preprocessing,
    provenance) at the default thresholds: what :func:`export_run` starts from, and an ensemble member."""
    from cxrkit.training.module import CHECKPOINT_METADATA_KEY, activation_for
    from cxrkit.training.run import LABELS_FILE, load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    labels = json.loads((run_dir / LABELS_FILE).read_text())
    checkpoint_file = _checkpoint_file(run_dir, checkpoint)
    state = load_training_checkpoint(checkpoint_file)
    metadata = state.get(CHECKPOINT_METADATA_KEY, {})
    weights = network_weights(state)
    return Bundle(
        model_id=model_id or str(config.name),
        version=version or f"{datetime.now(UTC):%Y%m%d}-{weights_digest(weights)[:8]}",
        labels=labels,
        thresholds=dict.fromkeys(labels, DEFAULT_THRESHOLD),
        threshold_source="default",
        activation=str(metadata.get("activation") or activation_for(config.train.loss.name)),
        preprocess=PreprocessSpec.from_data_config(config.data),
        model_config=to_container(config.model),
        provenance=_provenance(run_dir, config, checkpoint_file, state),
        weights=weights,
    )


def add_graphs(
    bundle: Bundle,
    model: nn.Module,
    validation: ValidationData | None,
    *,
    onnx: bool,
    quantize: bool,
    threshold_method: str = "youden",
    max_auroc_drop: float | None = None,
    opset: int = MIN_OPSET,
    parity_tolerance: float = 1e-4,
    ood: bool = True,
    ood_quantile: float = DEFAULT_QUANTILE,
) -> None:
    """What a bundle of ``model`` adds to its weights and thresholds: the ONNX graph (``onnx`` or
    ``quantize``), the int8 graph (``quantize``: :func:`add_int8`) and the out-of-distribution detector
    (``ood``: :func:`add_ood`), from the run's ``validation`` data."""
    if onnx or quantize:
        add_onnx(bundle, model, opset, parity_tolerance, validation.images[:8] if validation else None)
    if quantize:
        if validation is None:
            raise BundleError("int8 quantisation needs the run's validation images, which could not be read")
        add_int8(bundle, validation, threshold_method, max_auroc_drop)
    if ood:
        add_ood(bundle, model, validation, ood_quantile)


@dataclass
class ValidationData:
    """The run's validation split: uint8 cache images ``[N, S, S]`` (as training reads them), targets
    ``[N, L]`` (1/0/NaN) and patient ids; ``calibration``: training-split images (int8 calibration) and
    ``ood_fit``: training-split images the out-of-distribution detector is fitted on."""

    images: np.ndarray
    targets: np.ndarray
    patient_ids: np.ndarray
    calibration: np.ndarray
    ood_fit: np.ndarray | None = None


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
    path: str | Path | None, run_dir: Path, labels: list[str], checkpoint_file: Path
) -> tuple[dict[str, float] | None, str]:
    """Thresholds from ``path`` or the run's thresholds.json: a cxrkit OperatingPoints file or a plain
    ``{label: threshold}`` object; ``(None, "")`` when neither exists. A file recording another checkpoint,
    data or split than the exported ones (:func:`cxrkit.data.run_manifest.fitted_on`) is refused."""
    from cxrkit.data.run_manifest import fitted_on_mismatches
    from cxrkit.evaluation.thresholds import OperatingPoints

    if path is None:
        path = run_dir / THRESHOLDS_FILE
        if not path.exists():
            return None, ""
    path = Path(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "thresholds" in data:
        points = OperatingPoints.from_dict(data)
        problems = fitted_on_mismatches(points.extra, run_dir, checkpoint_file)
        if problems:
            raise BundleError(
                f"{path} does not fit this export: {'; '.join(problems)}; re-run `cxr evaluate`"
            )
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


def run_validation(run_dir: str | Path, labels: list[str]) -> ValidationData | None:
    """The validation split (and training images) stored by the run ``run_dir`` (see :func:`export_run`);
    None, with a warning, when its data cannot be read."""
    from cxrkit.training.run import load_run_config

    return _load_validation(load_run_config(run_dir), labels, Path(run_dir))


def validation_thresholds(
    bundle: Bundle, model: nn.Module, validation: ValidationData | None, method: str = "youden"
) -> tuple[dict[str, float], str]:
    """Thresholds of ``model`` (the bundle's network) fitted with ``method`` on ``validation``, and their
    description; 0.5 with a loud warning when there is no validation data."""
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
    runner = Runner.from_torch(model, bundle.preprocess, bundle.activation)
    scores = runner.predict(batches(validation.images, 32))
    task = task_for(bundle.activation)
    predictions = Predictions(validation.targets, scores, validation.patient_ids, bundle.labels, task=task)
    points = OperatingPoints.fit(predictions, method=method)
    log.info("operating thresholds: %s", points.describe())
    return points.thresholds, points.describe()


def add_onnx(
    bundle: Bundle,
    model: nn.Module | None = None,
    opset: int = MIN_OPSET,
    tolerance: float = 1e-4,
    sample: np.ndarray | None = None,
) -> None:
    """Add the ONNX graph of ``model`` (default: the bundle's network) to ``bundle`` after checking it
    against PyTorch on ``sample`` uint8 cache images ``[N, S, S]`` (random ones if None)."""
    from cxrkit.inference.onnx_export import export_onnx

    model = model if model is not None else bundle.build_model()
    spec = bundle.preprocess
    with tempfile.TemporaryDirectory(prefix="cxrkit-onnx-") as folder:
        path = export_onnx(model, Path(folder) / ONNX, spec.crop_size, opset, features=True)
        bundle.onnx = path.read_bytes()
    if sample is None or not len(sample):
        sample = np.random.default_rng(0).integers(
            0, 256, (4, spec.image_size, spec.image_size), dtype=np.uint8
        )
    eager = Runner.from_torch(model, spec, bundle.activation).logits(sample)
    graph = Runner.from_onnx(bundle.onnx, spec, bundle.activation).logits(sample)
    difference = float(np.abs(eager - graph).max())
    if difference > tolerance:
        raise BundleError(f"ONNX graph differs from PyTorch by {difference:.2e} in logits (> {tolerance:g})")
    bundle.onnx_parity = difference


def add_int8(
    bundle: Bundle, data: ValidationData, threshold_method: str = "youden", max_drop: float | None = None
) -> None:
    """Add the static int8 graph of the bundle's ONNX graph (:mod:`cxrkit.inference.quantize`: calibrated
    on ``data.calibration``, kept only if every finding's validation AUROC drops by at most ``max_drop``,
    with its own thresholds chosen on validation by ``threshold_method``); the report (thresholds and
    measured speed included) is stored in ``bundle.quantization`` either way."""
    require("onnxruntime", "int8 quantisation")
    from cxrkit.inference.quantize import MAX_AUROC_DROP, quantize_for_serving

    if bundle.onnx is None:
        raise BundleError("quantisation needs the bundle's ONNX graph: call add_onnx first")
    int8, report = quantize_for_serving(
        bundle.onnx,
        data.calibration,
        data.images,
        data.targets,
        data.patient_ids,
        bundle.labels,
        bundle.activation,
        bundle.preprocess.model_input,
        threshold_method,
        MAX_AUROC_DROP if max_drop is None else max_drop,
    )
    bundle.quantization = report.to_dict()
    bundle.onnx_int8 = int8 if report.accepted else None


def add_ood(
    bundle: Bundle, model: nn.Module, data: ValidationData | None, quantile: float = DEFAULT_QUANTILE
) -> None:
    """Fit the bundle's out-of-distribution detector (:class:`~cxrkit.inference.ood.OODDetector`) on the
    pooled features of ``data.ood_fit`` (training images) with its threshold at ``quantile`` of the scores of
    (up to :data:`OOD_CALIBRATION_IMAGES`) validation images; without such data, or for a network without
    pooled features, the bundle gets none and a warning says so."""
    if data is None or data.ood_fit is None or len(data.ood_fit) < 2:
        log.warning("no out-of-distribution detector: the run's training/validation images cannot be read")
        return
    runner = Runner.from_torch(model, bundle.preprocess, bundle.activation)
    fit = _pooled_features(runner, data.ood_fit)
    if fit is None:
        log.warning("no out-of-distribution detector: the network has no pooled backbone features")
        return
    calibration = data.images[_spread(len(data.images), OOD_CALIBRATION_IMAGES)]
    bundle.ood = OODDetector.fit(fit, _pooled_features(runner, calibration), quantile)
    log.info(
        "out-of-distribution detector: %d training images, threshold %.3f = %.1f%% quantile of %d validation",
        bundle.ood.n_fit,
        bundle.ood.threshold,
        100 * quantile,
        bundle.ood.n_calibration,
    )
    if bundle.onnx_int8 is not None and bundle.quantization is not None:
        int8 = Runner.from_onnx(bundle.onnx_int8, bundle.preprocess, bundle.activation)
        int8_features = _pooled_features(int8, calibration)
        if int8_features is not None:
            bundle.quantization["ood_threshold"] = bundle.ood.threshold_of(int8_features)
            log.info("int8 graph's own detector threshold: %.3f", bundle.quantization["ood_threshold"])


def _pooled_features(runner: Runner, images: np.ndarray) -> np.ndarray | None:
    """Pooled backbone features ``[N, C]`` of uint8 cache images (None when the network has none)."""
    parts = [runner.forward_with_features(runner.model_input(batch))[1] for batch in batches(images, 32)]
    return None if any(part is None for part in parts) else np.concatenate(parts)


def _spread(total: int, count: int) -> np.ndarray:
    """Up to ``count`` indices spread evenly over ``range(total)``."""
    return np.linspace(0, total - 1, min(total, count)).astype(int) if total else np.arange(0)


def _load_validation(config: Any, labels: list[str], run_dir: Path) -> ValidationData | None:
    """The run's validation split through its own manifest and cache (built if absent, reused if current);
    None, with a warning, when the data cannot be read."""
    from cxrkit.data.build import build_run_manifest, prepare_data
    from cxrkit.data.cache import open_cache
    from cxrkit.inference.quantize import CALIBRATION_IMAGES

    cache_cfg = config.data.cache
    try:
        manifest = build_run_manifest(config.data, run_dir)  # the splits the run stored
        prepare_data(config.data, manifest=manifest)
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
    patients = frame["patient_id"].astype(str).to_numpy()[rows]
    calibration = cache.images(_training_rows(frame, CALIBRATION_IMAGES))
    ood_fit = cache.images(_training_rows(frame, OOD_FIT_IMAGES))
    return ValidationData(cache.images(rows), targets, patients, calibration, ood_fit)


def _training_rows(frame: pd.DataFrame, count: int) -> np.ndarray:
    """Up to ``count`` training-split rows, spread evenly over the split (int8 calibration, OOD fit)."""
    train = np.flatnonzero(frame["split"].astype(str).to_numpy() == "train")
    return train[_spread(len(train), count)]


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the safetensors encoding of ``weights`` (a stable id for a set of weights)."""
    return hashlib.sha256(save_safetensors({k: v.contiguous() for k, v in weights.items()})).hexdigest()
