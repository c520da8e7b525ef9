"""Write an evaluation as one self-contained HTML report plus Markdown, JSON and CSV with the same numbers.

Files written into ``out_dir``:

=======================  ==================================================================================
``report.html``          everything, figures embedded (opens alone)
``report.md``            the same text and tables, figures as the PNG files next to it
``*.png``                the figures
``evaluation.json``      all numbers (strict JSON, NaN as null): metrics, intervals, thresholds, calibration,
                         reliability bins, subgroups, leakage, curves on a 101-point grid, settings
``per_finding.csv``      the per-finding table at full precision (labels, ``macro``, ``micro``)
``thresholds.json``      the operating points with their provenance (what a model bundle stores)
``calibration.csv``      ECE / NLL / Brier per label (and after temperature scaling)
``subgroups.csv``        AUROC per subgroup and label; ``subgroup_gaps.csv`` the best-worst gaps
``confusion_matrix.csv`` single-label tasks: the full confusion matrix
``comparison.csv``       with ``comparison=``: the paired AUROC differences
=======================  ==================================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrkit.evaluation import plots
from cxrkit.evaluation.compare import ComparisonResult
from cxrkit.evaluation.evaluator import EvaluationResult, jsonable
from cxrkit.evaluation.metrics import MACRO, MICRO, binarize
from cxrkit.reporting.html import Report
from cxrkit.reporting.plots import training_curves

ImageLike = np.ndarray | str | Path
_ROW_NAMES = {MACRO: "Mean (macro)", MICRO: "Pooled (micro)"}
_THUMBNAIL = 320
_CALIBRATION_NAMES = {
    "ece": "ECE",
    "nll": "NLL",
    "brier": "Brier",
    "ece_scaled": "ECE (scaled)",
    "nll_scaled": "NLL (scaled)",
    "brier_scaled": "Brier (scaled)",
}


def write_evaluation_report(
    result: EvaluationResult,
    out_dir: str | Path,
    *,
    title: str = "Evaluation report",
    subtitle: str = "",
    metrics_csv: str | Path | None = None,
    images: Mapping[int, ImageLike] | None = None,
    comparison: ComparisonResult | None = None,
) -> dict[str, Path]:
    """Write the report files; returns their paths by kind (``html``, ``markdown``, ``json``, ``csv``...).

    ``metrics_csv``: a Lightning ``metrics.csv`` for training curves. ``images``: test row index -> image
    (array or path) shown with true and predicted findings (see :func:`select_examples`). ``comparison``:
    a paired comparison with another run, shown as its own section.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    level = result.settings["level"]
    report = Report(title, subtitle)
    _summary(report, result)
    _per_finding(report, result, level)
    _curves(report, result, level)
    _operating_points(report, result)
    _calibration(report, result)
    _subgroups(report, result, level)
    if comparison is not None:
        _comparison(report, comparison)
    if metrics_csv is not None:
        _training(report, metrics_csv)
    if images:
        _examples(report, result, images)
    _methods(report, result)
    paths = {"html": report.write(out_dir), "markdown": out_dir / "report.md"}
    paths.update(_write_data(result, out_dir, comparison))
    return paths


# -------------------------------------------------------------------------------------------- sections


def _summary(report: Report, result: EvaluationResult) -> None:
    pred = result.predictions
    report.heading("Summary")
    report.paragraph(
        f"{len(pred):,} test images from {pred.n_patients:,} patients, {len(pred.labels)} labels "
        f"({pred.task})."
    )
    macro, settings = result.table.loc[MACRO], result.settings
    report.paragraph(
        f"Mean AUROC {plots.format_interval(macro, 'auroc')} and mean AUPRC "
        f"{plots.format_interval(macro, 'auprc')} ({settings['level']:.0%} intervals from "
        f"{settings['n_replicates']:,} {settings['unit']}-level bootstrap replicates)."
    )
    if result.leakage is not None:
        report.callout(result.leakage.summary(), "ok" if result.leakage.ok else "error")
    else:
        report.callout("Patient leakage between splits was not checked (no split information given).", "info")
    source = result.operating_points.source
    report.callout(
        f"Operating points: {result.operating_points.describe()}.", "info" if source != "test" else "warning"
    )
    undefined = [label for label in pred.labels if not np.isfinite(result.table.loc[label, "auroc"])]
    if undefined:
        report.callout(
            f"AUROC/AUPRC undefined (only one class among the known test targets): "
            f"{', '.join(undefined)}. They are left out of the macro averages.",
            "warning",
        )


def _per_finding(report: Report, result: EvaluationResult, level: float) -> None:
    report.heading("Per-finding results")
    report.table(
        per_finding_display(result.table, level),
        caption=f"AUROC, AUPRC and rates at the operating points with {level:.0%} patient-bootstrap "
        "intervals (macro: mean over findings; micro: all image-finding pairs pooled)",
    )


def per_finding_display(table: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """The per-finding table as formatted strings, in the style of the ChestX-ray14 papers."""
    ci = f"[{level:.0%} CI]"
    rows = []
    for label, row in table.iterrows():
        rows.append(
            {
                "Finding": _ROW_NAMES.get(str(label), str(label)),
                "Positives": _count(row["n_pos"]) if label != MACRO else "",
                "Prevalence": _percent(row["prevalence"]),
                f"AUROC {ci}": plots.format_interval(row, "auroc"),
                f"AUPRC {ci}": plots.format_interval(row, "auprc"),
                "Threshold": _number(row["threshold"], 3),
                f"Sensitivity {ci}": plots.format_interval(row, "sensitivity"),
                f"Specificity {ci}": plots.format_interval(row, "specificity"),
                "PPV": _number(row["precision"]),
                "NPV": _number(row["npv"]),
                "F1": _number(row["f1"]),
                "Accuracy": _number(row["accuracy"]),
            }
        )
    return pd.DataFrame(rows)


def _curves(report: Report, result: EvaluationResult, level: float) -> None:
    if not result.roc:
        return
    report.heading("ROC and precision-recall curves")
    report.figure(
        plots.roc_grid(result.roc, result.table, level=level),
        "roc_curves",
        caption="ROC curve per finding; the dot marks the operating point.",
    )
    report.figure(
        plots.pr_grid(result.pr, result.table, level=level),
        "pr_curves",
        caption="Precision-recall curve per finding; dashed: prevalence (precision of a random model).",
    )


def _operating_points(report: Report, result: EvaluationResult) -> None:
    report.heading("Operating points and confusion matrices")
    report.paragraph(f"Predicted positive when score >= threshold; {result.operating_points.describe()}.")
    counts = result.table.loc[result.labels, ["threshold", "tp", "fp", "tn", "fn"]].copy()
    counts.columns = ["Threshold", "TP", "FP", "TN", "FN"]
    for column in ("TP", "FP", "TN", "FN"):
        counts[column] = counts[column].astype(int)
    report.table(
        counts.rename_axis("Finding").reset_index(),
        caption="Confusion counts per finding",
        float_format="{:.4g}",
    )
    report.figure(
        plots.confusion_grid(result.table, result.labels),
        "confusion_matrices",
        caption="Rows: truth (neg/pos); columns: prediction; colour: fraction of the true row.",
    )
    if result.multiclass_confusion is not None:
        report.table(
            result.multiclass_confusion.rename_axis("true \\ predicted").reset_index(),
            caption="Full confusion matrix (argmax prediction)",
        )
        report.figure(
            plots.confusion_matrix_figure(result.multiclass_confusion),
            "confusion_matrix_full",
            caption="Full confusion matrix of the single-label task.",
        )


def _calibration(report: Report, result: EvaluationResult) -> None:
    report.heading("Calibration")
    n_bins = result.settings["n_bins"]
    report.paragraph(
        f"Expected calibration error with {n_bins} equal-width probability bins: the mean "
        "absolute gap between the observed frequency of the finding and the mean predicted "
        "probability, weighted by the number of entries per bin."
    )
    table = result.calibration.rename(index=_ROW_NAMES, columns=_CALIBRATION_NAMES)
    table = table.rename_axis("Finding").reset_index()
    report.table(
        table,
        caption="ECE, negative log-likelihood and Brier score (lower is better)"
        + ("; scaled: after temperature scaling fitted on validation" if result.temperature else ""),
        float_format="{:.4f}",
    )
    curves = {
        f"test, uncalibrated (ECE {result.calibration.loc[MICRO, 'ece']:.3f})": result.reliability[MICRO]
    }
    if result.temperature is not None:
        values = ", ".join(f"{t:.3f}" for t in result.temperature.temperature[:5])
        more = ", ..." if result.temperature.temperature.size > 5 else ""
        report.callout(f"Temperature scaling fitted on the validation split: T = {values}{more}.", "info")
        scaled = result.calibration.loc[MICRO, "ece_scaled"]
        curves[f"temperature-scaled (ECE {scaled:.3f})"] = result.reliability[f"{MICRO}_scaled"]
    report.figure(
        plots.reliability_diagram(curves, title="Reliability, all findings pooled"),
        "reliability",
        caption="Observed fraction positive against mean predicted probability per bin.",
    )
    per_label = {label: result.reliability[label] for label in result.labels}
    eces = result.calibration["ece"].to_dict()
    report.figure(plots.reliability_grid(per_label, eces), "reliability_per_finding")


def _subgroups(report: Report, result: EvaluationResult, level: float) -> None:
    groups = result.subgroups
    report.heading("Subgroups")
    if groups is None or groups.table.empty:
        report.paragraph(
            "No subgroup analysis: the predictions carry no sex, age or view metadata with at "
            "least two groups."
        )
        return
    largest = groups.largest_gap
    if largest is not None:
        report.callout(groups.summary(), "warning" if largest["significant"] else "info")
    macro = groups.table[groups.table["label"] == MACRO]
    display = pd.DataFrame(
        {
            "Attribute": macro["attribute"],
            "Group": macro["group"],
            "Images": macro["n_images"].astype(int),
            "Patients": macro["n_patients"].astype(int),
            f"Mean AUROC [{level:.0%} CI]": [
                plots.format_interval(row, "auroc") for _, row in macro.iterrows()
            ],
        }
    )
    report.table(
        display,
        caption="Mean AUROC per subgroup (over the findings defined in every group of "
        "the attribute); per-finding values in subgroups.csv",
    )
    report.table(
        gap_display(groups.gaps, level),
        caption="Largest best-minus-worst subgroup AUROC gaps. p: permutation test of the gap over all "
        "groups of the attribute (the choice of best and worst group is part of the test); adjusted: "
        "Benjamini-Hochberg across every gap; significant: adjusted p below "
        f"{1 - level:.2g}; flagged: the largest gap of the mean AUROC",
    )
    report.figure(
        plots.subgroup_forest(groups.table, MACRO, level=level),
        "subgroups",
        caption="Mean AUROC per subgroup with its interval.",
    )


def gap_display(gaps: pd.DataFrame, level: float = 0.95, top: int = 15) -> pd.DataFrame:
    """The ``top`` largest subgroup gaps as formatted strings."""
    rows = gaps.sort_values("gap", ascending=False).head(top)
    return pd.DataFrame(
        {
            "Attribute": rows["attribute"],
            "Finding": rows["label"].replace(_ROW_NAMES),
            "Best group": [
                f"{g} ({a:.3f})" for g, a in zip(rows["best_group"], rows["best_auroc"], strict=True)
            ],
            "Worst group": [
                f"{g} ({a:.3f})" for g, a in zip(rows["worst_group"], rows["worst_auroc"], strict=True)
            ],
            f"Gap [{level:.0%} CI]": [plots.format_interval(row, "gap") for _, row in rows.iterrows()],
            "p": [f"{p:.3g}" for p in rows["p_value"]],
            "p (adjusted)": [f"{p:.3g}" for p in rows["p_adjusted"]],
            "Significant": np.where(rows["significant"].astype(bool), "yes", ""),
            "Flagged": np.where(rows["largest"].astype(bool), "LARGEST", ""),
        }
    )


def _comparison(report: Report, comparison: ComparisonResult) -> None:
    report.heading("Comparison with another run")
    row = comparison.table.loc[MACRO]
    kind = "ok" if row["difference_low"] > 0 else "warning" if row["difference_high"] < 0 else "info"
    report.callout(comparison.summary(), kind)
    a, b = comparison.names
    rows = comparison.table
    table = pd.DataFrame(
        {
            "Finding": [_ROW_NAMES.get(str(label), str(label)) for label in rows.index],
            f"AUROC {a}": rows["auroc_a"].to_numpy(),
            f"AUROC {b}": rows["auroc_b"].to_numpy(),
            f"{b} - {a} [{comparison.level:.0%} CI]": [
                f"{r.difference:+.4f} [{r.difference_low:+.4f}, {r.difference_high:+.4f}]"
                for r in rows.itertuples()
            ],
            "Bootstrap p": rows["p_value"].to_numpy(),
        }
    )
    report.table(
        table,
        caption=f"Paired {comparison.unit} bootstrap ({comparison.n_replicates} replicates, same resamples "
        "for both runs)",
        float_format="{:.4f}",
    )


def _training(report: Report, metrics_csv: str | Path) -> None:
    report.heading("Training curves")
    try:
        figure = training_curves(metrics_csv)
    except (FileNotFoundError, ValueError, pd.errors.ParserError) as error:
        report.callout(f"Training curves skipped: {error}", "warning")
        return
    report.figure(figure, "training_curves", caption=str(metrics_csv))


def _examples(report: Report, result: EvaluationResult, images: Mapping[int, ImageLike]) -> None:
    report.heading("Examples")
    loaded, rows, skipped = [], [], []
    for row, image in images.items():
        try:
            loaded.append(_load_gray(image))
            rows.append(row)
        except (OSError, ValueError) as error:  # unreadable file or array: skip it, say so
            skipped.append(f"row {row}: {error}")
    if skipped:
        report.callout(f"{len(skipped)} example images skipped: {'; '.join(skipped[:5])}", "warning")
    if not loaded:
        return
    titles, correct = example_titles(result, rows)
    report.figure(
        plots.example_grid(loaded, titles, correct),
        "examples",
        caption="T: true findings, P: predicted findings at the operating points "
        "(green: every known finding right; red: at least one error).",
    )


def _methods(report: Report, result: EvaluationResult) -> None:
    settings = result.settings
    report.heading("Methods")
    report.paragraph(
        f"Intervals: {settings['level']:.0%} percentile bootstrap with {settings['n_replicates']} replicates "
        f"(seed {settings['seed']}), resampling {settings['unit']}s with replacement so that all images of a "
        "drawn patient enter together; each replicate is evaluated exactly as the weighted metric. Unknown "
        "targets (not annotated by the dataset) are excluded per finding. Macro values average the findings "
        "whose metric is defined on the test set (No Finding is left out unless it is the only label, as in "
        "the training monitor), and every bootstrap replicate averages that same set; micro values pool "
        "every known image-finding pair."
    )
    report.paragraph(
        "Operating points are chosen on the validation split (or taken from the model) and applied unchanged "
        "to the test split, so the test labels never influence a threshold."
    )


# ------------------------------------------------------------------------------------------- examples


def select_examples(result: EvaluationResult, n: int = 12, seed: int = 0) -> list[int]:
    """Test rows to show: about half fully correct and half with an error, preferring images with at least
    one positive finding; deterministic for a seed."""
    pred = result.predictions
    _, correct = example_titles(result, range(len(pred)))
    correct = np.asarray(correct)
    has_positive = np.nansum(pred.y_true, axis=1) > 0
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for want, pool in ((n - n // 2, correct), (n // 2, ~correct)):
        preferred = rng.permutation(np.flatnonzero(pool & has_positive))
        others = rng.permutation(np.flatnonzero(pool & ~has_positive))
        chosen += [int(i) for i in np.concatenate([preferred, others])[:want]]
    return sorted(chosen)


def example_titles(result: EvaluationResult, rows) -> tuple[list[str], list[bool]]:
    """For each row: "T: true findings / P: predicted findings" and whether every known label is right."""
    pred = result.predictions
    rows = np.asarray(list(rows), dtype=int)
    predicted = binarize(pred.y_score[rows], pred.labels, result.operating_points.thresholds)
    truth = pred.y_true[rows]
    known = ~np.isnan(truth)
    correct = ((predicted == truth) | ~known).all(axis=1)
    titles = []
    for r in range(len(rows)):
        true_names = [label for label, t in zip(pred.labels, truth[r], strict=True) if t == 1] or ["none"]
        guessed = [label for label, p in zip(pred.labels, predicted[r], strict=True) if p] or ["none"]
        mark = "\u2713" if correct[r] else "\u2717"
        titles.append(f"{mark} T: {_short(true_names)}\nP: {_short(guessed)}")
    return titles, [bool(c) for c in correct]


def _short(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" +{len(names) - limit}" if len(names) > limit else "")


def _load_gray(image: ImageLike) -> np.ndarray:
    """uint8 grayscale thumbnail of an array (HxW, HxWxC, CxHxW, any range) or an image file."""
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"example image not found: {path}")
        with Image.open(path) as opened:
            pil = opened.convert("L")
    else:
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 3:
            array = array[..., :3].mean(axis=-1)
        if array.ndim != 2:
            raise ValueError(f"example image must be 2-D or 3-D, got shape {np.asarray(image).shape}")
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        pil = Image.fromarray(scaled.astype(np.uint8))
    pil.thumbnail((_THUMBNAIL, _THUMBNAIL))
    return np.asarray(pil)


# ----------------------------------------------------------------------------------------------- data


def _write_data(
    result: EvaluationResult, out_dir: Path, comparison: ComparisonResult | None
) -> dict[str, Path]:
    data = result.to_dict()
    if comparison is not None:
        data["comparison"] = jsonable(comparison.to_dict())
    paths = {
        "json": out_dir / "evaluation.json",
        "csv": out_dir / "per_finding.csv",
        "thresholds": out_dir / "thresholds.json",
        "calibration": out_dir / "calibration.csv",
    }
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False))
    result.table.to_csv(paths["csv"])
    result.operating_points.save(paths["thresholds"])
    result.calibration.to_csv(paths["calibration"])
    if result.subgroups is not None and not result.subgroups.table.empty:
        paths["subgroups"] = out_dir / "subgroups.csv"
        paths["subgroup_gaps"] = out_dir / "subgroup_gaps.csv"
        result.subgroups.table.to_csv(paths["subgroups"], index=False)
        result.subgroups.gaps.to_csv(paths["subgroup_gaps"], index=False)
    if result.multiclass_confusion is not None:
        paths["confusion_matrix"] = out_dir / "confusion_matrix.csv"
        result.multiclass_confusion.to_csv(paths["confusion_matrix"])
    if comparison is not None:
        paths["comparison"] = out_dir / "comparison.csv"
        comparison.table.to_csv(paths["comparison"])
    return paths


# ------------------------------------------------------------------------------------------ formatting


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else ""


def _percent(value: float) -> str:
    return f"{value:.1%}" if np.isfinite(value) else ""


def _count(value: float) -> str:
    return f"{int(value):,}" if np.isfinite(value) else ""
