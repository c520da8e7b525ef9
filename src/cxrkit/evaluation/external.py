"""External validation: score another dataset at the model's own thresholds, beside its internal test set.

>>> ext = evaluate_external("runs/pneumonia-lite0", "../shared/data/pneumonia/test")
>>> print("\\n".join(ext.summary_lines())); ext.paths["html"]

Steps of :func:`evaluate_external`:

1. load the model (a run directory or a bundle) and its operating points: a bundle's own thresholds, a
   run's ``thresholds.json`` (written by ``cxr evaluate``), else thresholds fitted on the run's validation
   split now (not saved). Nothing of the run is ever written: every output goes under ``out``;
2. internal set: the model's own test split (a run's stored split, :mod:`cxrkit.data.run_manifest`);
3. external set: every image of ``data`` (a config's data section, or a folder read with the adapter its
   layout fits, :func:`cxrkit.data.adapters.detect`), or only its ``test`` split; cached under
   ``out/cache`` at the model's input size. Findings the external set has no label for are skipped, with a
   note;
4. both sets are evaluated (:func:`cxrkit.evaluation.evaluator.evaluate`: patient-bootstrap intervals,
   rates at the shipped thresholds, calibration), the internal - external difference of AUROC and AUPRC
   gets a percentile interval from independent patient bootstraps of the two sets, and the report puts the
   two side by side with the score distributions of both sets (``score_distributions.png``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from cxrkit.config import load_config
from cxrkit.data.config import SourceConfig
from cxrkit.data.manifest import Manifest
from cxrkit.evaluation import bootstrap as bs
from cxrkit.evaluation.evaluator import EvaluationResult, evaluate, jsonable
from cxrkit.evaluation.metrics import MACRO, Predictions
from cxrkit.evaluation.run import open_data, predict_rows, split_rows
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.inference.export import THRESHOLDS_FILE
from cxrkit.inference.loading import LoadedModel, load_model
from cxrkit.reporting.html import Report
from cxrkit.reporting.plots import PALETTE

log = logging.getLogger(__name__)

EXTERNAL_DIR = "external"
DATA_SCOPES = ("all", "test")
_RATES = ("sensitivity", "specificity")


@dataclass
class ExternalEvaluation:
    """Internal and external results of one model at the same operating points."""

    model: LoadedModel
    data: str
    internal: EvaluationResult | None
    external: EvaluationResult
    difference: pd.DataFrame  #: per finding and mean: internal - external AUROC/AUPRC with interval
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per evaluated finding and the mean: both sets' numbers side by side."""
        rows = []
        for label in [*self.external.labels, MACRO]:
            row: dict = {"finding": "mean" if label == MACRO else label}
            for name, result in (("internal", self.internal), ("external", self.external)):
                if result is None:
                    continue
                values = result.table.loc[label]
                cal = result.calibration.loc[label] if label in result.calibration.index else None
                row.update(
                    {
                        f"{name}_images": len(result.predictions),
                        f"{name}_patients": result.predictions.n_patients,
                        **{
                            f"{name}_{metric}{suffix}": values.get(f"{metric}{suffix}", np.nan)
                            for metric in ("auroc", "auprc", *_RATES)
                            for suffix in ("", "_low", "_high")
                        },
                        f"{name}_ece": np.nan if cal is None else cal.get("ece", np.nan),
                    }
                )
            if self.internal is not None:
                row.update(self.difference.loc[label].add_prefix("difference_").to_dict())
            row["threshold"] = self.external.operating_points.thresholds.get(label, np.nan)
            rows.append(row)
        return pd.DataFrame(rows)

    def summary_lines(self) -> list[str]:
        ext = self.external.table.loc[MACRO]
        lines = [
            f"external: {self.data}: {len(self.external.predictions):,} images, "
            f"{self.external.predictions.n_patients:,} patients",
            f"{self.external.operating_points.describe()}",
        ]
        if self.internal is not None:
            lines.append(_line("internal", self.internal.table.loc[MACRO]))
        lines.append(_line("external", ext))
        if self.internal is not None:
            diff = self.difference.loc[MACRO]
            lines.append(
                f"AUROC internal - external {diff['auroc']:+.4f} "
                f"(95% CI {diff['auroc_low']:+.4f} to {diff['auroc_high']:+.4f})"
            )
        return lines + self.notes


def _line(name: str, row: pd.Series) -> str:
    return (
        f"{name}: mean AUROC {row['auroc']:.4f} [{row['auroc_low']:.4f}, {row['auroc_high']:.4f}], "
        f"sensitivity {row['sensitivity']:.3f}, specificity {row['specificity']:.3f}"
    )


# ---- the external data -------------------------------------------------------------------------------------
def external_data_config(data: str | Path, model: LoadedModel, cache_dir: Path) -> DictConfig:
    """The data section that reads ``data`` (a YAML config or a dataset folder) for ``model``: the model's
    labels, its cache geometry, a cache in ``cache_dir``."""
    path = Path(data)
    if path.is_file():
        section = load_config(path).data
    elif path.is_dir():
        from cxrkit.data.adapters import detect

        adapter = detect(str(path))
        log.info("external data %s read with the %r adapter", path, adapter)
        section = OmegaConf.merge(
            model.config.data, {"sources": [OmegaConf.structured(SourceConfig(adapter, str(path)))]}
        )
        section.no_finding_ratio = None
        section.views = []
    else:
        raise FileNotFoundError(f"external data not found: {data} (a data config or a dataset folder)")
    section = OmegaConf.merge(section, {})
    section.labels = []
    section.no_finding = "class"
    section.cache.dir = str(cache_dir)
    section.cache.update(model.preprocess.cache_settings)
    return section


def external_manifest(section: DictConfig, labels: list[str], scope: str) -> tuple[Manifest, list[str]]:
    """The images of ``section`` (its ``test`` split when ``scope`` is ``test``) over ``labels``, and the
    labels it has no known value for (skipped)."""
    from cxrkit.data.build import build_manifest, load_manifest

    if scope not in DATA_SCOPES:
        raise ValueError(f"external data scope must be one of {DATA_SCOPES}, got {scope!r}")
    manifest = load_manifest(section) if scope == "all" else build_manifest(section)
    if scope == "test":
        manifest = manifest.subset((manifest.frame["split"] == "test").to_numpy())
        if not len(manifest):
            raise ValueError("the external data has no test split")
    manifest = manifest.with_labels(labels)
    known = ~np.isnan(manifest.targets)
    skipped = [label for j, label in enumerate(labels) if not known[:, j].any()]
    if len(skipped) == len(labels):
        raise ValueError(f"the external data has no label the model predicts ({', '.join(labels)})")
    frame = manifest.frame.assign(split="test")
    return Manifest(frame, list(labels)), skipped


# ---- evaluation --------------------------------------------------------------------------------------------
def evaluate_external(
    path: str | Path,
    data: str | Path,
    *,
    scope: str = "all",
    checkpoint: str = "best",
    out: str | Path | None = None,
    n_replicates: int = 1000,
    batch_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    backend: str = "auto",
) -> ExternalEvaluation:
    """Evaluate the run or bundle at ``path`` on the external ``data`` (see the module docstring);
    ``backend``: for a bundle, the graph scored at its own thresholds (``auto``: the one it serves)."""
    from cxrkit.data.build import prepare_data
    from cxrkit.data.cache import open_cache

    loaded = load_model(path, checkpoint, backend=backend)
    out_dir = Path(out) if out is not None else default_out_dir(loaded, data)
    options = {"batch_size": batch_size or int(loaded.config.data.loader.batch_size), "device": device}
    options["progress"] = progress
    notes: list[str] = []
    section = external_data_config(data, loaded, out_dir / "cache")
    manifest, skipped = external_manifest(section, loaded.labels, scope)
    if skipped:
        notes.append(f"skipped (the external data has no labels for them): {', '.join(skipped)}")
    internal_pred, points = _internal(loaded, options, notes)
    prepare_data(section, manifest=manifest)
    cache = open_cache(section.cache.dir)
    rows = np.arange(len(cache))
    external_pred, _ = predict_rows(loaded, cache, rows, desc="predict external", **options)
    kept = [label for label in loaded.labels if label not in skipped]
    external_pred = external_pred.select_labels(kept)
    common = {"operating_points": points, "n_replicates": n_replicates, "seed": seed, "progress": progress}
    external = evaluate(external_pred, **common)
    internal = None
    difference = pd.DataFrame()
    if internal_pred is not None:
        internal = evaluate(internal_pred.select_labels(kept), **common)
        difference = bootstrap_difference(internal.predictions, external_pred, n_replicates, seed)
    evaluation = ExternalEvaluation(loaded, str(data), internal, external, difference, skipped, notes)
    evaluation.paths = write_external_report(evaluation, out_dir)
    return evaluation


def default_out_dir(loaded: LoadedModel, data: str | Path) -> Path:
    name = Path(str(data).rstrip("/")).resolve()
    label = f"{name.parent.name}-{name.stem}" if name.parent.name else name.stem
    base = (
        loaded.path / "evaluation"
        if loaded.kind == "run"
        else loaded.path.parent / f"{loaded.path.stem}-evaluation"
    )
    return base / f"{EXTERNAL_DIR}-{label}"


def _internal(
    loaded: LoadedModel, options: dict, notes: list[str]
) -> tuple[Predictions | None, OperatingPoints]:
    """Predictions on the model's own test split (None, with a note, when its data cannot be read) and the
    operating points the model ships with."""
    points = loaded.operating_points
    if points is None and (loaded.path / THRESHOLDS_FILE).is_file():
        points = _run_thresholds(loaded, notes)
    try:
        cache = open_data(loaded)
    except (FileNotFoundError, ValueError) as error:
        notes.append(f"internal test set unavailable ({error}); external numbers only")
        if points is None:
            raise ValueError(
                f"{loaded.path} has no thresholds.json and its validation data cannot be read"
            ) from error
        return None, points
    if points is None:
        val_rows = split_rows(cache, "val")
        if not val_rows.size:
            raise ValueError(
                f"{loaded.path} has no thresholds.json and no validation split to choose them on"
            )
        _, val_plain = predict_rows(loaded, cache, val_rows, desc="predict val", **options)
        points = OperatingPoints.fit(val_plain, source="val")
        notes.append(
            f"{loaded.path} has no {THRESHOLDS_FILE}: Youden thresholds fitted on its validation split"
        )
    rows = split_rows(cache, "test")
    if not rows.size:
        notes.append("the model's data has no test split: external numbers only")
        return None, points
    _, plain = predict_rows(loaded, cache, rows, desc="predict internal test", **options)
    return plain, points


def _run_thresholds(loaded: LoadedModel, notes: list[str]) -> OperatingPoints | None:
    """The run's thresholds.json, unless it records another checkpoint or data (then None, with a note)."""
    from cxrkit.data.run_manifest import fitted_on_mismatches
    from cxrkit.training.run import checkpoint_path

    points = OperatingPoints.load(loaded.path / THRESHOLDS_FILE)
    checkpoint = checkpoint_path(loaded.path, loaded.checkpoint or "best")
    problems = fitted_on_mismatches(points.extra, loaded.path, checkpoint)
    if problems:
        notes.append(f"{THRESHOLDS_FILE} ignored: {'; '.join(problems)}")
        return None
    return points


def bootstrap_difference(
    internal: Predictions, external: Predictions, n_replicates: int, seed: int, level: float = 0.95
) -> pd.DataFrame:
    """Internal - external AUROC and AUPRC per label and mean, with percentile intervals of independent
    patient bootstraps of the two sets (the same number of replicates each)."""
    runs = [
        bs.bootstrap(pred, n_replicates=n_replicates, seed=seed + k)
        for k, pred in enumerate((internal, external))
    ]
    names = [*internal.labels, MACRO]
    frame = pd.DataFrame(index=pd.Index(names, name="label"))
    for metric in ("auroc", "auprc"):
        samples = [run.per_label_samples()[metric][:, : len(names)] for run in runs]
        delta = samples[0] - samples[1]
        low, high = bs.percentile_interval(delta, level)
        frame[metric] = _point(internal, metric, names) - _point(external, metric, names)
        frame[f"{metric}_low"], frame[f"{metric}_high"] = low, high
    return frame


def _point(pred: Predictions, metric: str, names: list[str]) -> np.ndarray:
    from cxrkit.evaluation.metrics import ranking_table

    return ranking_table(pred).reindex(names)[metric].to_numpy(dtype=float)


# ---- report ------------------------------------------------------------------------------------------------
def score_distributions(evaluation: ExternalEvaluation) -> Figure:
    """Per finding, the predicted probabilities of both sets (positives solid, negatives dashed) and the
    shipped threshold."""
    labels = evaluation.external.labels
    fig = Figure(figsize=(4.2 * len(labels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    sets = [("internal", evaluation.internal), ("external", evaluation.external)]
    bins = np.linspace(0, 1, 26)
    for ax, label in zip(axes, labels, strict=True):
        for k, (name, result) in enumerate(sets):
            if result is None:
                continue
            y_true, y_score = result.predictions.column(label)
            for positive, style in ((1, "-"), (0, "--")):
                scores = y_score[y_true == positive]
                if scores.size:
                    weights = np.full(scores.size, 100 / scores.size)
                    ax.hist(
                        scores,
                        bins=bins,
                        weights=weights,
                        histtype="step",
                        linestyle=style,
                        linewidth=1.6,
                        color=PALETTE[k],
                        label=f"{name} {'pos' if positive else 'neg'} (n={scores.size})",
                    )
        ax.axvline(evaluation.external.operating_points.thresholds[label], color="black", linewidth=1)
        ax.set_title(label)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("% of the group's images")
        ax.legend(fontsize=7)
    return fig


def write_external_report(evaluation: ExternalEvaluation, out_dir: Path) -> dict[str, Path]:
    """report.html/.md, external.json, side_by_side.csv, score_distributions.png and both predictions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = evaluation.model
    report = Report(f"External evaluation of {model.name}", subtitle=f"external data: {evaluation.data}")
    lines = evaluation.summary_lines()
    drop = evaluation.difference.loc[MACRO, "auroc_low"] if evaluation.internal is not None else np.nan
    report.callout("\n".join(lines), "warning" if np.isfinite(drop) and drop > 0 else "info")
    table = evaluation.table()
    report.table(_display(table, evaluation.internal is not None), caption=_caption(evaluation))
    report.attach(table, "side_by_side")
    report.figure(
        score_distributions(evaluation),
        "score_distributions",
        "Predicted probabilities per finding, internal test vs external (solid: positives, dashed: "
        "negatives; % of each set's images); the vertical line is the shipped threshold",
    )
    paths = {
        "html": report.write(out_dir),
        "markdown": out_dir / "report.md",
        "csv": out_dir / "side_by_side.csv",
    }
    paths["plot"] = out_dir / "score_distributions.png"
    payload = {
        "model": str(model.path),
        "model_kind": model.kind,
        "checkpoint": model.checkpoint,
        "data": evaluation.data,
        "operating_points": evaluation.external.operating_points.to_dict(),
        "skipped": evaluation.skipped,
        "notes": evaluation.notes,
        "table": table.to_dict(orient="records"),
    }
    paths["json"] = out_dir / "external.json"
    paths["json"].write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False))
    paths["predictions"] = evaluation.external.predictions.save(out_dir / "predictions_external.csv")
    if evaluation.internal is not None:
        paths["internal_predictions"] = evaluation.internal.predictions.save(
            out_dir / "predictions_internal.csv"
        )
    return paths


def _caption(evaluation: ExternalEvaluation) -> str:
    settings = evaluation.external.settings
    return (
        f"{settings['level']:.0%} percentile intervals from {settings['n_replicates']} patient-bootstrap "
        "replicates of each set; the difference (internal - external) from the two independent bootstraps; "
        "sensitivity and specificity at the shipped thresholds "
        f"({evaluation.external.operating_points.describe()})"
    )


def _display(table: pd.DataFrame, with_internal: bool) -> pd.DataFrame:
    def interval(row: pd.Series, prefix: str, metric: str) -> str:
        value = row.get(f"{prefix}_{metric}", np.nan)
        if not np.isfinite(value):
            return ""
        return f"{value:.3f} [{row[f'{prefix}_{metric}_low']:.3f}, {row[f'{prefix}_{metric}_high']:.3f}]"

    sets = ["internal", "external"] if with_internal else ["external"]
    out = pd.DataFrame({"Finding": table["finding"]})
    for name in sets:
        for metric in ("auroc", "auprc", *_RATES):
            out[f"{metric.upper() if metric.startswith('au') else metric} {name}"] = [
                interval(row, name, metric) for _, row in table.iterrows()
            ]
        out[f"ECE {name}"] = [f"{v:.3f}" if np.isfinite(v) else "" for v in table[f"{name}_ece"]]
    if with_internal:
        for metric in ("auroc", "auprc"):
            out[f"{metric.upper()} difference"] = [
                f"{row[f'difference_{metric}']:+.3f} [{row[f'difference_{metric}_low']:+.3f}, "
                f"{row[f'difference_{metric}_high']:+.3f}]"
                for _, row in table.iterrows()
            ]
    out["Threshold"] = [f"{v:.3f}" if np.isfinite(v) else "" for v in table["threshold"]]
    return out
