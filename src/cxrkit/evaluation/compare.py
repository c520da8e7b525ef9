"""Compare two models on the same test set with a paired patient bootstrap.

Both runs are scored on identical replicates (the same patients drawn the same number of times), so the
interval of the AUROC difference reflects the models' disagreement, not the sampling noise they share —
far narrower than comparing two independent intervals. The reported ``p_value`` is the two-sided bootstrap
fraction ``2 * min(P(diff <= 0), P(diff >= 0))`` over the replicates (a p-value in spirit, not from a test
statistic with a known null distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrkit.evaluation import bootstrap as bs
from cxrkit.evaluation.metrics import MACRO, Predictions, auroc, mean_label_mask


@dataclass
class ComparisonResult:
    """One row per label and ``macro``: AUROC of each run, difference ``b - a`` with interval and p."""

    table: pd.DataFrame
    names: tuple[str, str]
    n_replicates: int
    level: float
    unit: str

    def summary(self) -> str:
        row = self.table.loc[MACRO]
        a, b = self.names
        if row["difference_low"] > 0:
            verdict = "better than"
        elif row["difference_high"] < 0:
            verdict = "worse than"
        else:
            verdict = "not distinguishable from"
        # A bootstrap fraction of 0 only says p < 1 / replicates.
        p = f"< {1 / self.n_replicates:.2g}" if row["p_value"] == 0 else f"= {row['p_value']:.3g}"
        return (
            f"{b} vs {a}: mean AUROC {row['auroc_b']:.4f} vs {row['auroc_a']:.4f}, difference "
            f"{row['difference']:+.4f} ({self.level:.0%} CI {row['difference_low']:+.4f} to "
            f"{row['difference_high']:+.4f}, bootstrap p {p}): {b} is {verdict} {a}."
        )

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "n_replicates": self.n_replicates,
            "level": self.level,
            "unit": self.unit,
            "table": self.table.reset_index().to_dict(orient="records"),
        }


def compare_runs(
    a: Predictions,
    b: Predictions,
    *,
    names: tuple[str, str] = ("A", "B"),
    n_replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "patient",
    progress: bool = False,
) -> ComparisonResult:
    """Paired bootstrap of per-label and mean AUROC, ``b`` minus ``a``, on their common labels."""
    a, b = align(a, b)
    resampler = bs.Resampler(bs.resampling_groups(a, unit), n_replicates, seed)
    samples = bs.run(
        resampler,
        {
            "a": bs.auroc_statistic(a.y_true, a.y_score, resampler),
            "b": bs.auroc_statistic(b.y_true, b.y_score, resampler),
        },
        progress,
    )
    point_a = np.array([auroc(a.y_true[:, j], a.y_score[:, j]) for j in range(len(a.labels))])
    point_b = np.array([auroc(b.y_true[:, j], b.y_score[:, j]) for j in range(len(b.labels))])
    defined = np.isfinite(point_a) & mean_label_mask(a.labels)
    rows = []
    for j, label in enumerate([*a.labels, MACRO]):
        if j < len(a.labels):
            pa, pb, diff = point_a[j], point_b[j], samples["b"][:, j] - samples["a"][:, j]
        else:
            pa, pb = _mean(point_a[defined]), _mean(point_b[defined])
            diff = bs.common_mean(samples["b"], defined) - bs.common_mean(samples["a"], defined)
        low, high = bs.percentile_interval(diff[:, None], level)
        rows.append(
            {
                "label": label,
                "auroc_a": pa,
                "auroc_b": pb,
                "difference": pb - pa,
                "difference_low": low[0],
                "difference_high": high[0],
                "p_value": _bootstrap_p(diff),
            }
        )
    return ComparisonResult(pd.DataFrame(rows).set_index("label"), names, n_replicates, level, unit)


def align(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions]:
    """Restrict both runs to their common labels and ``b``'s rows to ``a``'s order (by ``path`` metadata
    when both have it); raise when they were not evaluated on the same images and targets."""
    common = [label for label in a.labels if label in b.labels]
    if not common:
        raise ValueError(f"the runs share no label (A: {a.labels}, B: {b.labels})")
    a, b = a.select_labels(common), b.select_labels(common)
    if _has_paths(a) and _has_paths(b):
        position = pd.Index(b.metadata["path"].astype(str))
        if not position.is_unique or set(position) != set(a.metadata["path"].astype(str)):
            raise ValueError("the runs were evaluated on different images (their 'path' sets differ)")
        b = b.subset(position.get_indexer(a.metadata["path"].astype(str)))
    if len(a) != len(b) or not np.array_equal(a.patient_ids, b.patient_ids):
        raise ValueError(
            f"the runs were evaluated on different rows ({len(a)} vs {len(b)} images or "
            "different patient order); save predictions with a 'path' column to align them"
        )
    if not np.array_equal(a.y_true, b.y_true, equal_nan=True):
        raise ValueError("the runs have different targets for the same images")
    return a, b


def _has_paths(pred: Predictions) -> bool:
    return pred.metadata is not None and "path" in pred.metadata.columns


def _bootstrap_p(difference: np.ndarray) -> float:
    difference = difference[np.isfinite(difference)]
    if difference.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min((difference <= 0).mean(), (difference >= 0).mean())))


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
