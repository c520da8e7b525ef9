"""Training curves: loss and validation AUROC per epoch, from a run's ``metrics.csv``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

PER_LABEL_PREFIX = "val/auroc/"


def epoch_metrics(metrics_csv: str | Path) -> pd.DataFrame:
    """One row per epoch with each metric of ``metrics.csv`` (the last value logged in that epoch)."""
    frame = pd.read_csv(metrics_csv)
    if "epoch" not in frame:
        raise ValueError(f"{metrics_csv} has no 'epoch' column; is it a Lightning CSVLogger file?")
    return frame.dropna(subset=["epoch"]).groupby("epoch").last().reset_index()


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Draw loss (train and validation) and validation AUROC (mean bold, per label thin) against epoch."""
    epochs = epoch_metrics(metrics_csv)
    figure, (loss_axes, auroc_axes) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for column, label in (("train/loss_epoch", "train"), ("val/loss", "validation")):
        if column in epochs:
            rows = epochs.dropna(subset=[column])
            loss_axes.plot(rows["epoch"], rows[column], marker="o", label=label)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="loss")
    for column in sorted(c for c in epochs.columns if c.startswith(PER_LABEL_PREFIX)):
        rows = epochs.dropna(subset=[column])
        auroc_axes.plot(
            rows["epoch"], rows[column], linewidth=0.8, alpha=0.5, label=column[len(PER_LABEL_PREFIX) :]
        )
    if "val/auroc_mean" in epochs:
        rows = epochs.dropna(subset=["val/auroc_mean"])
        auroc_axes.plot(
            rows["epoch"], rows["val/auroc_mean"], color="black", linewidth=2.5, marker="o", label="mean"
        )
    auroc_axes.set(title="Validation AUROC", xlabel="epoch", ylabel="AUROC")
    for axes in (loss_axes, auroc_axes):
        if axes.has_data():
            axes.legend(fontsize="x-small", ncol=2)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    plt.close(figure)
    return out_png
