"""Matplotlib figures shared by the data report and the evaluation reports.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, nothing
to close), rendered by the Agg backend when saved. Save with :func:`save_png` or embed with
:meth:`cxrkit.reporting.html.Report.figure`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
#: Colours for groups (splits, categories): matplotlib's colour-blind-friendly "tab10" order.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render ``fig`` to PNG bytes (tight bounding box, so no label is clipped)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG file at ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_png(fig, dpi))
    return path


def label_counts_bar(
    counts: pd.DataFrame,
    *,
    title: str = "Positive images per label",
    xlabel: str = "positive images",
    log: bool = False,
) -> Figure:
    """Grouped horizontal bars: one row per label (``counts.index``), one bar per group (``counts.columns``).

    Horizontal bars keep long label names legible; the first label is drawn at the top.
    """
    labels = [str(label) for label in counts.index]
    groups = [str(group) for group in counts.columns]
    height = max(2.5, 0.22 * len(labels) * max(1, len(groups)) ** 0.5 + 1.2)
    fig = Figure(figsize=(8, height), layout="constrained")
    ax = fig.add_subplot()
    bar_height = 0.8 / max(1, len(groups))
    positions = np.arange(len(labels))
    for g, group in enumerate(counts.columns):
        offsets = positions - 0.4 + bar_height * (g + 0.5)
        values = counts[group].to_numpy(dtype=float)
        bars = ax.barh(offsets, values, height=bar_height, label=str(group), color=PALETTE[g % len(PALETTE)])
        if len(labels) * len(groups) <= 60:
            ax.bar_label(bars, labels=[_count_text(v) for v in values], padding=2, fontsize=7)
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.12)
    ax.grid(axis="x", alpha=0.3)
    if len(groups) > 1:
        ax.legend(title=counts.columns.name, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    return fig


def cooccurrence_heatmap(
    matrix: pd.DataFrame, *, title: str = "Label co-occurrence (images)", annotate: bool = True
) -> Figure:
    """Annotated heatmap of a square label x label count matrix (diagonal: images positive for the label).

    Colour is on a log scale, so rare pairs stay visible next to the large diagonal.
    """
    names = [str(name) for name in matrix.index]
    values = matrix.to_numpy(dtype=float)
    side = max(4.0, 0.42 * len(names) + 2.2)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    shown = np.log1p(values)
    image = ax.imshow(shown, cmap="viridis", vmin=0, vmax=max(shown.max(), 1e-9))
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), names)
    ax.set_title(title)
    if annotate and len(names) <= 30:
        threshold = shown.max() * 0.6
        fontsize = 8 if len(names) <= 15 else 6
        for (row, col), value in np.ndenumerate(values):
            colour = "black" if shown[row, col] > threshold else "white"
            ax.text(col, row, _count_text(value), ha="center", va="center", fontsize=fontsize, color=colour)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = [t for t in (0, 1, 10, 100, 1_000, 10_000, 100_000) if t <= max(values.max(), 1)]
    colorbar.set_ticks(np.log1p(ticks), labels=[_count_text(t) for t in ticks])
    colorbar.set_label("images")
    return fig


def histogram(
    values: np.ndarray | Mapping[str, np.ndarray],
    *,
    bins: int | Sequence[float] = 20,
    xlabel: str = "",
    title: str = "",
    normalize: bool = False,
) -> Figure:
    """Histogram of ``values``, or overlaid step histograms of several named groups (NaN ignored).

    ``normalize`` plots the percentage of each group per bin, so groups of different sizes compare.
    """
    groups = values if isinstance(values, Mapping) else {"": values}
    finite = {name: _finite(v) for name, v in groups.items()}
    everything = np.concatenate([np.zeros(0), *finite.values()])
    if isinstance(bins, int) and everything.size:
        bins = np.histogram_bin_edges(everything, bins=bins)
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for g, (name, data) in enumerate(finite.items()):
        if not data.size:
            continue
        style = {"histtype": "step", "linewidth": 1.8} if len(finite) > 1 else {"edgecolor": "white"}
        weights = np.full(data.size, 100 / data.size) if normalize else None
        label = f"{name} (n={data.size:,})" if name else f"n={data.size:,}"
        ax.hist(data, bins=bins, weights=weights, color=PALETTE[g % len(PALETTE)], label=label, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("% of images" if normalize else "images")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if everything.size:
        ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    return fig


def category_bars(
    table: pd.DataFrame, *, title: str = "", normalize: bool = True, stacked: bool = True
) -> Figure:
    """Bars of categorical breakdowns: one bar (group) per row of ``table``, one segment per column.

    ``normalize`` shows each row as percentages (counts are written inside segments that are wide enough);
    ``stacked=False`` draws grouped bars instead.
    """
    counts = table.astype(float)
    totals = counts.sum(axis=1).replace(0, np.nan)
    shown = counts.div(totals, axis=0).fillna(0) * 100 if normalize else counts
    rows = [str(row) for row in counts.index]
    fig = Figure(
        figsize=(7.5, max(2.2, 0.55 * len(rows) * (1 if stacked else len(counts.columns)) + 1.3)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    positions = np.arange(len(rows))
    left = np.zeros(len(rows))
    width = 0.8 / (1 if stacked else max(1, len(counts.columns)))
    for c, column in enumerate(counts.columns):
        colour = PALETTE[c % len(PALETTE)]
        values = shown[column].to_numpy()
        if stacked:
            bars = ax.barh(positions, values, left=left, height=0.7, color=colour, label=str(column))
            text = [_count_text(n) if v >= 7 else "" for n, v in zip(counts[column], values, strict=True)]
            ax.bar_label(bars, labels=text, label_type="center", fontsize=7, color="white")
            left += values
        else:
            offsets = positions - 0.4 + width * (c + 0.5)
            bars = ax.barh(offsets, values, height=width, color=colour, label=str(column))
            ax.bar_label(bars, labels=[_count_text(n) for n in counts[column]], padding=2, fontsize=7)
    ax.set_yticks(positions, rows)
    ax.invert_yaxis()
    ax.set_xlabel("% of images" if normalize else "images")
    if normalize and stacked:
        ax.set_xlim(0, 100)
    ax.set_title(title)
    ax.legend(title=counts.columns.name, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    return fig


def image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    *,
    title: str = "",
    tile_inches: float = 2.2,
) -> Figure:
    """Grayscale images (uint8 HxW) in a grid, each with an optional title, shown at full 0-255 range."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"image_grid got {len(images)} images but {len(titles)} titles")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig = Figure(
        figsize=(tile_inches * ncols, (tile_inches + 0.35) * nrows + (0.4 if title else 0)),
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(images):
            continue
        ax.imshow(_as_gray(images[i]), cmap="gray", vmin=0, vmax=255, interpolation="lanczos")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _as_gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise ValueError(f"image_grid expects grayscale HxW images, got shape {image.shape}")
    return image


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def _count_text(value: float) -> str:
    if value != value:  # NaN
        return ""
    if float(value).is_integer():
        value = int(value)
        return f"{value / 1000:.0f}k" if value >= 100_000 else f"{value:,}"
    return f"{value:.3g}"


#: Per-label validation AUROC columns of a run's ``metrics.csv``.
PER_LABEL_AUROC = "val/auroc/"
MEAN_AUROC = "val/auroc_mean"


def epoch_metrics(metrics_csv: str | Path) -> pd.DataFrame:
    """One row per epoch of a Lightning ``CSVLogger`` ``metrics.csv`` (sparse rows: each value sits on the
    row of its step), holding each numeric metric's last value in that epoch; indexed by epoch."""
    path = Path(metrics_csv)
    if not path.exists():
        raise FileNotFoundError(f"training metrics file not found: {path}")
    frame = pd.read_csv(path)
    if "epoch" not in frame.columns:
        raise ValueError(f"{path}: no 'epoch' column (not a Lightning CSVLogger metrics file)")
    values = [
        c
        for c in frame.columns
        if c not in ("epoch", "step") and frame[c].notna().any() and pd.api.types.is_numeric_dtype(frame[c])
    ]
    return frame.dropna(subset=["epoch"]).groupby("epoch")[values].last()


def training_curves(metrics_csv: str | Path) -> Figure:
    """Loss per epoch (every ``*loss*`` column logged per epoch) beside validation AUROC (the mean bold,
    each label thin) and any other validation metric, from a run's ``metrics.csv``."""
    epochs = epoch_metrics(metrics_csv)
    losses = [c for c in epochs.columns if "loss" in c and not c.endswith("_step")]
    aurocs = sorted(c for c in epochs.columns if c.startswith(PER_LABEL_AUROC))
    others = [c for c in epochs.columns if c.startswith(("val/", "test/")) and c not in (*losses, *aurocs)]
    if not losses and not aurocs and not others:
        raise ValueError(f"{metrics_csv}: no loss or validation metric to plot")
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    for i, column in enumerate(losses):
        _epoch_line(loss_ax, epochs[column], column, color=PALETTE[i % len(PALETTE)], marker="o")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    for column in aurocs:
        _epoch_line(metric_ax, epochs[column], column[len(PER_LABEL_AUROC) :], linewidth=0.8, alpha=0.5)
    for i, column in enumerate(others):
        bold = column == MEAN_AUROC
        style = {"color": "black", "linewidth": 2.5} if bold else {"color": PALETTE[i % len(PALETTE)]}
        _epoch_line(metric_ax, epochs[column], "mean AUROC" if bold else column, marker="o", **style)
    metric_ax.set(title="Validation", xlabel="epoch", ylabel="AUROC" if aurocs else "metric")
    for ax in (loss_ax, metric_ax):
        if ax.has_data():
            ax.legend(fontsize="x-small", ncol=2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def save_training_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """:func:`training_curves` written as a PNG file."""
    return save_png(training_curves(metrics_csv), out_png)


def _epoch_line(ax, series: pd.Series, label: str, **style) -> None:
    series = series.dropna()
    ax.plot(series.index, series.to_numpy(), label=label, markersize=3, **style)
