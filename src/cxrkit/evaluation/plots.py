"""Evaluation figures: ROC and PR small multiples, confusion matrices, reliability diagrams, subgroup
forest plot and an annotated grid of test images (training curves live in :mod:`cxrkit.reporting.plots`).

Like :mod:`cxrkit.reporting.plots`, every function returns a :class:`matplotlib.figure.Figure` built without
pyplot (Agg backend when saved); embed with :meth:`cxrkit.reporting.html.Report.figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cxrkit.evaluation.metrics import Curve
from cxrkit.reporting.plots import PALETTE, image_grid

CORRECT_COLOUR = "#1a7f37"
WRONG_COLOUR = "#cf222e"


def _panels(n: int, ncols: int, tile: float = 2.6) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(tile * ncols, tile * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    return fig, axes.flat[:n]


def roc_grid(
    curves: Mapping[str, Curve], table: pd.DataFrame, *, ncols: int = 5, level: float = 0.95
) -> Figure:
    """One ROC panel per label: the curve, the chance diagonal, the operating point (sensitivity,
    1 - specificity from ``table``) and AUROC with its interval in the title."""
    fig, axes = _panels(len(curves), ncols)
    for ax, (label, curve) in zip(axes, curves.items(), strict=True):
        row = table.loc[label]
        ax.plot(curve.x, curve.y, color=PALETTE[0], linewidth=1.6)
        ax.plot([0, 1], [0, 1], linestyle="--", color="#9aa0a6", linewidth=0.8)
        if {"sensitivity", "specificity"} <= set(row.index) and np.isfinite(row["sensitivity"]):
            ax.plot(1 - row["specificity"], row["sensitivity"], "o", color=PALETTE[3], markersize=5)
        ax.set_title(f"{label}\nAUROC {format_interval(row, 'auroc')}", fontsize=8.5)
        _unit_axes(ax, "1 - specificity", "sensitivity")
    fig.suptitle(f"ROC curves ({level:.0%} CI; dot = operating point)", fontsize=10)
    return fig


def pr_grid(
    curves: Mapping[str, Curve], table: pd.DataFrame, *, ncols: int = 5, level: float = 0.95
) -> Figure:
    """One precision-recall panel per label, with the prevalence (a random model's precision) dashed."""
    fig, axes = _panels(len(curves), ncols)
    for ax, (label, curve) in zip(axes, curves.items(), strict=True):
        row = table.loc[label]
        ax.step(curve.x, curve.y, where="post", color=PALETTE[2], linewidth=1.6)
        if np.isfinite(row.get("prevalence", np.nan)):
            ax.axhline(row["prevalence"], linestyle="--", color="#9aa0a6", linewidth=0.8)
        if np.isfinite(row.get("sensitivity", np.nan)) and np.isfinite(row.get("precision", np.nan)):
            ax.plot(row["sensitivity"], row["precision"], "o", color=PALETTE[3], markersize=5)
        ax.set_title(f"{label}\nAUPRC {format_interval(row, 'auprc')}", fontsize=8.5)
        _unit_axes(ax, "recall", "precision")
    fig.suptitle(f"Precision-recall curves ({level:.0%} CI; dashed = prevalence)", fontsize=10)
    return fig


def confusion_grid(table: pd.DataFrame, labels: Sequence[str], *, ncols: int = 7) -> Figure:
    """A 2 x 2 confusion matrix per label at its operating point (rows = truth, columns = prediction);
    cells are coloured by the fraction of their true row, so rare findings stay readable."""
    fig, axes = _panels(len(labels), ncols, tile=1.9)
    for ax, label in zip(axes, labels, strict=True):
        row = table.loc[label]
        counts = np.array([[row["tn"], row["fp"]], [row["fn"], row["tp"]]], dtype=float)
        _matrix(ax, counts, ["neg", "pos"], fontsize=7)
        ax.set_title(f"{label}\nthreshold {row['threshold']:.3g}", fontsize=8)
    fig.suptitle("Confusion matrices at the operating points (rows: truth, columns: prediction)", fontsize=10)
    return fig


def confusion_matrix_figure(matrix: pd.DataFrame, *, title: str = "Confusion matrix") -> Figure:
    """Full confusion matrix of a single-label task (counts; colour = fraction of the true class)."""
    side = max(3.2, 0.7 * len(matrix) + 1.8)
    fig = Figure(figsize=(side + 0.6, side), layout="constrained")
    ax = fig.add_subplot()
    _matrix(ax, matrix.to_numpy(dtype=float), [str(c) for c in matrix.columns], fontsize=9)
    ax.set_yticks(range(len(matrix)), [str(i) for i in matrix.index])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def _matrix(ax, counts: np.ndarray, names: list[str], fontsize: float) -> None:
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for (r, c), value in np.ndenumerate(counts):
        colour = "white" if fraction[r, c] > 0.6 else "black"
        ax.text(
            c,
            r,
            f"{int(value):,}\n{fraction[r, c]:.0%}",
            ha="center",
            va="center",
            fontsize=fontsize,
            color=colour,
        )
    ax.set_xticks(range(len(names)), names, fontsize=fontsize)
    ax.set_yticks(range(len(names)), names, fontsize=fontsize)


def reliability_diagram(curves: Mapping[str, pd.DataFrame], *, title: str = "Reliability diagram") -> Figure:
    """Observed frequency against mean predicted probability per bin for each named curve (e.g. raw and
    temperature-scaled), with the diagonal of perfect calibration and, below, the number of entries per bin
    of the first curve (log scale)."""
    fig = Figure(figsize=(5.2, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], linestyle="--", color="#9aa0a6", linewidth=0.9, label="perfect calibration")
    for i, (name, table) in enumerate(curves.items()):
        filled = table[table["count"] > 0]
        top.plot(
            filled["mean_predicted"],
            filled["fraction_positive"],
            "o-",
            color=PALETTE[i % len(PALETTE)],
            markersize=4,
            linewidth=1.4,
            label=name,
        )
    top.set_ylabel("observed fraction positive")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title)
    first = next(iter(curves.values()))
    bottom.bar(
        first["lower"],
        first["count"],
        width=first["upper"] - first["lower"],
        align="edge",
        color=PALETTE[0],
        alpha=0.6,
        edgecolor="white",
    )
    bottom.set_yscale("log")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("entries")
    return fig


def reliability_grid(
    curves: Mapping[str, pd.DataFrame], eces: Mapping[str, float], *, ncols: int = 5
) -> Figure:
    """Per-label reliability diagrams (small multiples), ECE in the titles."""
    fig, axes = _panels(len(curves), ncols, tile=2.3)
    for ax, (label, table) in zip(axes, curves.items(), strict=True):
        filled = table[table["count"] > 0]
        ax.plot([0, 1], [0, 1], linestyle="--", color="#9aa0a6", linewidth=0.8)
        ax.plot(
            filled["mean_predicted"],
            filled["fraction_positive"],
            "o-",
            color=PALETTE[1],
            markersize=3,
            linewidth=1.2,
        )
        ax.set_title(f"{label}\nECE {eces.get(label, float('nan')):.3f}", fontsize=8.5)
        _unit_axes(ax, "predicted", "observed")
    fig.suptitle("Reliability per finding", fontsize=10)
    return fig


def subgroup_forest(table: pd.DataFrame, label: str = "macro", *, level: float = 0.95) -> Figure:
    """AUROC with interval of ``label`` per subgroup (one row per attribute/group), like a forest plot."""
    rows = table[(table["label"] == label) & table["auroc"].notna()].reset_index(drop=True)
    fig = Figure(figsize=(6.5, max(2.2, 0.32 * len(rows) + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    attributes = list(dict.fromkeys(rows["attribute"]))
    positions = np.arange(len(rows))
    for i, attribute in enumerate(attributes):
        part = rows[rows["attribute"] == attribute]
        colour = PALETTE[i % len(PALETTE)]
        ax.errorbar(
            part["auroc"],
            part.index,
            xerr=[part["auroc"] - part["auroc_low"], part["auroc_high"] - part["auroc"]],
            fmt="o",
            color=colour,
            capsize=3,
            label=attribute,
        )
    names = [
        f"{a}: {g} (n={n:,})"
        for a, g, n in zip(rows["attribute"], rows["group"], rows["n_images"], strict=True)
    ]
    ax.set_yticks(positions, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"AUROC ({level:.0%} CI)")
    ax.set_title(f"Subgroup AUROC — {label}")
    ax.grid(axis="x", alpha=0.3)
    if len(attributes) > 1:
        ax.legend(fontsize=8, loc="best")
    return fig


def example_grid(
    images: Sequence[np.ndarray], titles: Sequence[str], correct: Sequence[bool], *, ncols: int = 4
) -> Figure:
    """Test images titled with their true and predicted findings; titles of fully correct images are
    green, the others red."""
    fig = image_grid(
        list(images), list(titles), ncols=ncols, title="Test examples (green: all findings correct)"
    )
    for ax, ok in zip(fig.axes, correct, strict=False):
        ax.title.set_color(CORRECT_COLOUR if ok else WRONG_COLOUR)
    return fig


def _unit_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel, fontsize=7.5)
    ax.set_ylabel(ylabel, fontsize=7.5)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25)


def format_interval(row: pd.Series, name: str) -> str:
    """``value [low, high]`` from the ``name``, ``name_low``, ``name_high`` entries ("undefined" for NaN)."""
    value = row.get(name, np.nan)
    low, high = row.get(f"{name}_low", np.nan), row.get(f"{name}_high", np.nan)
    if not np.isfinite(value):
        return "undefined"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"
