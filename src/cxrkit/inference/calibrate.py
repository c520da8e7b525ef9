"""Site calibration: refit a bundle's operating points (and optionally its temperature) on a labelled
sample from a new site, and write the result as a new bundle version.

>>> site = calibrate_bundle("pneumonia.cxr", "../shared/data/pneumonia/test", method="youden")
>>> site.bundle.save("pneumonia-site.cxr"); print("\\n".join(site.summary_lines()))

Steps of :func:`calibrate_bundle`:

1. read the site sample (a data config or a dataset folder, with the adapter its layout fits; see
   :func:`cxrkit.evaluation.external.external_manifest`) and predict it with the bundle's network;
2. with ``temperature`` ``global`` or ``per_label``, fit T by NLL on the sample
   (:class:`cxrkit.evaluation.calibration.TemperatureScaler`) and fold it into the network's last linear
   layer (weights and bias divided by T), so that PyTorch, ONNX, ``cxr predict`` and ``cxr serve`` all output
   the calibrated probabilities; an ONNX graph is re-exported, an int8 graph (quantised from the old
   weights) is dropped;
3. fit the operating points on the (calibrated) sample: Youden, F1 or a target sensitivity
   (:class:`cxrkit.evaluation.thresholds.OperatingPoints`); a finding the sample has no label for keeps
   its threshold;
4. compute sensitivity and specificity at the new thresholds with patient-bootstrap intervals
   (:func:`cxrkit.evaluation.bootstrap.bootstrap`) and warn when an interval is wider than ``precision``
   allows (too few positives or negatives). These are in-sample figures (the thresholds were chosen on
   the same images): :func:`cross_fitted_decisions` gives out-of-sample ones;
5. return the new bundle, version ``<old>+site.<name>`` unless given, whose provenance records the site,
   the sample size, the old and new thresholds, the temperature and the intervals
   (``provenance["site_calibration"]``) and whose ``threshold_source`` names the site.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from cxrkit.config import RunConfig
from cxrkit.evaluation import bootstrap as bs
from cxrkit.evaluation import metrics
from cxrkit.evaluation.calibration import TemperatureScaler
from cxrkit.evaluation.metrics import Predictions
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.inference.bundle import Bundle, BundleError
from cxrkit.inference.loading import load_model

log = logging.getLogger(__name__)

TEMPERATURE_MODES = ("none", "global", "per_label")
THRESHOLD_METHODS = ("youden", "f1", "sensitivity")
Z_95 = 1.959964


@dataclass
class SiteCalibration:
    """The calibrated bundle and what the site sample said."""

    bundle: Bundle
    site: str
    points: OperatingPoints
    table: pd.DataFrame  #: per finding: images, positives, old/new threshold, sensitivity/specificity [CI]
    temperature: TemperatureScaler | None = None
    warnings: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        lines = [
            f"site {self.site}: {self.table['images'].max():,} images; {self.points.describe()}",
            f"new bundle {self.bundle.model_id} v{self.bundle.version}",
        ]
        if self.temperature is not None:
            lines.append(f"temperature {self.temperature.to_dict()['temperature']}")
        for label, row in self.table.iterrows():
            lines.append(
                f"{label}: threshold {row['threshold_before']:.3f} -> {row['threshold']:.3f}; sensitivity "
                f"{row['sensitivity']:.3f} [{row['sensitivity_low']:.3f}, {row['sensitivity_high']:.3f}], "
                f"specificity {row['specificity']:.3f} [{row['specificity_low']:.3f}, "
                f"{row['specificity_high']:.3f}] ({int(row['positives'])} positives, "
                f"{int(row['negatives'])} negatives)"
            )
        return lines + [f"WARNING: {warning}" for warning in self.warnings]


def calibrate_bundle(
    bundle_path: str | Path,
    data: str | Path,
    *,
    method: str = "youden",
    target_sensitivity: float = 0.9,
    temperature: str = "none",
    precision: float = 0.05,
    scope: str = "all",
    site_name: str | None = None,
    version: str | None = None,
    n_replicates: int = 1000,
    batch_size: int = 32,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> SiteCalibration:
    """Calibrate the bundle at ``bundle_path`` on the labelled site sample ``data`` (see module docs)."""
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    if temperature not in TEMPERATURE_MODES:
        raise ValueError(f"temperature must be one of {TEMPERATURE_MODES}, got {temperature!r}")
    if not 0 < precision < 1:
        raise ValueError(
            f"precision (the largest acceptable CI half-width) must be in (0, 1), got {precision}"
        )
    bundle = Bundle.load(bundle_path)
    site = site_name or site_label(data)
    predictions, skipped = predict_site(bundle_path, data, scope, batch_size, device, progress)
    scaler = None
    if temperature != "none":
        scaler = TemperatureScaler.fit(predictions, per_label=temperature == "per_label")
        predictions = scaler.transform(predictions)
    points = OperatingPoints.fit(predictions, method, target_sensitivity, source=f"site {site}")
    table = rates_table(predictions, points.thresholds, bundle.thresholds, n_replicates, seed)
    warnings = precision_warnings(table, precision)
    for warning in warnings:
        log.warning("site calibration: %s", warning)
    new = _new_bundle(bundle, site, version)
    if scaler is not None:
        _fold_temperature(new, scaler)
    new.thresholds = {**bundle.thresholds, **points.thresholds}
    new.threshold_source = (
        f"site calibration on {site} ({len(predictions):,} images, {predictions.n_patients:,} patients): "
        f"{points.describe()}"
    )
    new.provenance["site_calibration"] = {
        "site": site,
        "data": str(data),
        "scope": scope,
        "images": len(predictions),
        "patients": predictions.n_patients,
        "calibrated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parent": {"model_id": bundle.model_id, "version": bundle.version},
        "method": method,
        "target_sensitivity": target_sensitivity if method == "sensitivity" else None,
        "thresholds_before": dict(bundle.thresholds),
        "thresholds": dict(points.thresholds),
        "skipped_labels": skipped,
        "temperature": None if scaler is None else scaler.to_dict(),
        "intervals": "in-sample 95% patient-bootstrap percentile intervals "
        f"({n_replicates} replicates); the thresholds were chosen on the same images",
        "per_label": table.reset_index().to_dict(orient="records"),
        "precision": precision,
        "warnings": warnings,
    }
    return SiteCalibration(new, site, points, table, scaler, warnings)


def site_label(data: str | Path) -> str:
    """A short name for a site folder or config: ``pneumonia/test`` -> ``pneumonia-test``."""
    path = Path(str(data).rstrip("/")).resolve()
    parts = [part for part in (path.parent.name, path.stem) if part]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)) or "site"


def predict_site(
    bundle_path: str | Path, data: str | Path, scope: str, batch_size: int, device: str, progress: bool
) -> tuple[Predictions, list[str]]:
    """The bundle's plain predictions on every labelled image of the site, restricted to the findings the
    site has labels for, and the findings it has none for."""
    from cxrkit.data.build import prepare_data
    from cxrkit.data.cache import open_cache
    from cxrkit.evaluation.external import external_data_config, external_manifest
    from cxrkit.evaluation.run import predict_rows

    bundle = Bundle.load(bundle_path)
    config = None
    if not bundle.provenance.get("config"):  # no training config: the site data needs only the geometry
        config = OmegaConf.structured(RunConfig)
        config.data.cache.update(bundle.preprocess.cache_settings)
    loaded = load_model(bundle_path, config=config, backend="torch")  # the int8 graph is not carried over
    with tempfile.TemporaryDirectory(prefix="cxr-site-") as work:
        section = external_data_config(data, loaded, Path(work) / "cache")
        manifest, skipped = external_manifest(section, loaded.labels, scope)
        prepare_data(section, manifest=manifest)
        cache = open_cache(section.cache.dir)
        options = {"batch_size": batch_size, "device": device, "progress": progress}
        predictions, _ = predict_rows(loaded, cache, np.arange(len(cache)), desc="predict site", **options)
    if skipped:
        log.warning("the site sample has no labels for %s: their thresholds are kept", ", ".join(skipped))
    return predictions.select_labels([label for label in loaded.labels if label not in skipped]), skipped


def rates_table(
    predictions: Predictions,
    thresholds: dict[str, float],
    before: dict[str, float],
    n_replicates: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Per finding: images, positives, negatives, old and new threshold, sensitivity and specificity at
    the new one with patient-bootstrap intervals."""
    point = metrics.threshold_table(predictions, thresholds)
    intervals = bs.bootstrap(predictions, thresholds, n_replicates=n_replicates, seed=seed).table()
    rows = {}
    for j, label in enumerate(predictions.labels):
        known = ~np.isnan(predictions.y_true[:, j])
        positives = int((predictions.y_true[known, j] == 1).sum())
        rows[label] = {
            "images": int(known.sum()),
            "positives": positives,
            "negatives": int(known.sum()) - positives,
            "threshold_before": before[label],
            "threshold": thresholds[label],
            **{
                f"{rate}{suffix}": float(source.loc[label, f"{rate}{suffix}"])
                for rate in ("sensitivity", "specificity")
                for suffix, source in (("", point), ("_low", intervals), ("_high", intervals))
            },
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("label")


def precision_warnings(table: pd.DataFrame, precision: float) -> list[str]:
    """One line per rate whose 95% interval is wider than ±``precision``, with the cases it would need
    (normal approximation: ``n = z² p (1 - p) / precision²``)."""
    out = []
    for label, row in table.iterrows():
        for rate, cases in (("sensitivity", "positives"), ("specificity", "negatives")):
            half = (row[f"{rate}_high"] - row[f"{rate}_low"]) / 2
            if math.isfinite(half) and half <= precision:
                continue
            p = row[rate] if math.isfinite(row[rate]) else 0.5
            p = min(max(p, 0.05), 0.95)
            needed = math.ceil(Z_95**2 * p * (1 - p) / precision**2)
            width = f"±{half:.3f}" if math.isfinite(half) else "undefined"
            out.append(
                f"{label}: the 95% CI of {rate} is {width} from {int(row[cases])} {cases}, wider than the "
                f"requested ±{precision:.3f}; about {needed} {cases} are needed"
            )
    return out


def cross_fitted_decisions(
    predictions: Predictions,
    method: str = "youden",
    target_sensitivity: float = 0.9,
    n_folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-sample site calibration: the images are cut into ``n_folds`` folds of whole patients,
    stratified on whether an image has any positive finding (shuffled with ``seed``); each fold's 0/1
    decisions use thresholds fitted on the other folds. Returns ``[N, L]`` decisions."""
    decisions = np.zeros_like(predictions.y_score, dtype=np.int8)
    positive = (np.nan_to_num(predictions.y_true, nan=0.0) > 0).any(axis=1)
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fit_rows, held_rows in folds.split(predictions.y_score, positive, groups=predictions.patient_ids):
        points = OperatingPoints.fit(predictions.subset(fit_rows), method, target_sensitivity)
        held = predictions.subset(held_rows)
        decisions[held_rows] = metrics.binarize(held.y_score, held.labels, points.thresholds)
    return decisions


def _new_bundle(bundle: Bundle, site: str, version: str | None) -> Bundle:
    new = copy.deepcopy(bundle)
    new.version = version or f"{bundle.version}+site.{site}"
    new.onnx_int8, new.quantization = None, None
    return new


def _fold_temperature(bundle: Bundle, scaler: TemperatureScaler) -> None:
    """Divide the output layer's weights and bias by T (per output for per-label T; every member's, for an
    ensemble, whose mean logit then divides by T too); check the logits."""
    from cxrkit.inference.export import add_onnx

    model = bundle.build_model()
    layers = [_output_layer(network, bundle.num_classes) for network in getattr(model, "members", [model])]
    temperature = torch.as_tensor(np.broadcast_to(scaler.temperature, (bundle.num_classes,)).copy())
    probe = torch.rand(2, 1, bundle.preprocess.crop_size, bundle.preprocess.crop_size)
    with torch.no_grad():
        before = model(probe).double()
        for layer in layers:
            layer.weight.div_(temperature.to(layer.weight.dtype)[:, None])
            if layer.bias is not None:
                layer.bias.div_(temperature.to(layer.bias.dtype))
        after = model(probe).double()
    if not torch.allclose(after, before / temperature, rtol=1e-3, atol=1e-4):
        raise BundleError("the temperature could not be folded into this network's output layer")
    bundle.weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    if bundle.onnx is not None:
        bundle.onnx = None
        add_onnx(bundle, model)


def _output_layer(model: nn.Module, num_classes: int) -> nn.Linear:
    """The last ``nn.Linear`` producing ``num_classes`` outputs (the logits)."""
    candidates = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not candidates:
        raise BundleError("no linear output layer with one output per label: cannot fold a temperature")
    return candidates[-1]
