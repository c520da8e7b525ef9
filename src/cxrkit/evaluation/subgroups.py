"""Performance by patient subgroup (sex, age band, view position) with bootstrap intervals and gaps.

Subgroups come from the predictions' metadata columns ``sex``, ``age`` (binned into bands, by default
<40, 40-60, 60-80, 80+) and ``view``; rows with an unknown value are left out of that attribute. Each group
is bootstrapped over its own patients. The ``macro`` AUROC of a group averages the labels that are defined in
every group of the attribute, so groups are compared on the same findings.

For each attribute and label the gap is best minus worst group AUROC. Its interval pairs the independent
replicates of the two groups (exact for disjoint groups such as sex or age band, approximate for views where
a patient can have both); it describes the size of that gap but, since the pair was chosen *because* it is
the most different, it is not a test. Whether a gap is real is decided by a permutation test of the gap
statistic itself (max minus min group AUROC over all usable groups of the attribute): group labels are
shuffled among patients (among images when a patient's images fall in several groups, e.g. views), which
keeps group sizes, and the p-value is the share of shufflings with a gap at least as large,
``(1 + #{gap* >= gap}) / (1 + n)``. The selection of the best and worst group is thus part of the null
distribution. Across all gaps of a result (every attribute and finding, and the means) the p-values are
adjusted with Benjamini-Hochberg (``scipy.stats.false_discovery_control``); a gap is ``significant`` when its
adjusted p-value is below ``1 - level``. On null data this flags about ``1 - level`` of the analyses (see
``test_subgroup_null_rate``). The largest macro gap over all attributes is marked ``largest``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from cxrkit.evaluation import bootstrap as bs
from cxrkit.evaluation.metrics import MACRO, Predictions, mean_label_mask

AGE_EDGES: tuple[float, ...] = (40, 60, 80)
ATTRIBUTES: tuple[str, ...] = ("sex", "age", "view")


def age_bands(age: np.ndarray | pd.Series, edges: Sequence[float] = AGE_EDGES) -> np.ndarray:
    """Band names (``<40``, ``40-60``, ``60-80``, ``80+`` for the default edges); "" for unknown ages."""
    age = np.asarray(age, dtype=float)
    names = age_band_names(edges)
    index = np.digitize(age, edges, right=False)
    bands = np.array(names, dtype=object)[np.clip(index, 0, len(names) - 1)]
    bands[~np.isfinite(age)] = ""
    return bands.astype(str)


def age_band_names(edges: Sequence[float] = AGE_EDGES) -> list[str]:
    inner = [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(edges)]
    return [f"<{edges[0]:g}", *inner, f"{edges[-1]:g}+"]


def subgroup_values(
    metadata: pd.DataFrame, attribute: str, age_edges: Sequence[float] = AGE_EDGES
) -> np.ndarray:
    """Group name of every row for ``attribute`` ("" = unknown)."""
    if attribute == "age":
        return age_bands(metadata["age"], age_edges)
    values = metadata[attribute].fillna("").astype(str).str.strip()
    return values.to_numpy()


@dataclass
class SubgroupResult:
    """``table``: one row per attribute, group and label (labels + ``macro``) with AUROC and interval;
    ``gaps``: best-minus-worst group per attribute and label with the permutation p-value, its
    Benjamini-Hochberg adjustment and ``significant``; the largest macro gap flagged."""

    table: pd.DataFrame
    gaps: pd.DataFrame

    @property
    def largest_gap(self) -> pd.Series | None:
        flagged = self.gaps[self.gaps["largest"]] if len(self.gaps) else self.gaps
        return flagged.iloc[0] if len(flagged) else None

    def summary(self) -> str:
        row = self.largest_gap
        if row is None:
            return "No subgroup comparison possible (no sex, age or view metadata with two usable groups)."
        interval = f"interval {row['gap_low']:.3f} to {row['gap_high']:.3f}"
        verdict = "significant" if row["significant"] else "not significant"
        return (
            f"Largest subgroup gap: {row['attribute']} — macro AUROC {row['best_auroc']:.3f} in "
            f"{row['best_group']} vs {row['worst_auroc']:.3f} in {row['worst_group']} "
            f"(gap {row['gap']:.3f}, {interval}; permutation p {row['p_value']:.3g}, "
            f"adjusted {row['p_adjusted']:.3g}: {verdict})."
        )


def analyse_subgroups(
    pred: Predictions,
    attributes: Sequence[str] = ATTRIBUTES,
    *,
    n_replicates: int = 1000,
    n_permutations: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_patients: int = 10,
    age_edges: Sequence[float] = AGE_EDGES,
    progress: bool = False,
) -> SubgroupResult:
    """AUROC with patient-bootstrap intervals per subgroup, and the gaps between groups with
    selection-corrected permutation p-values, adjusted across all gaps."""
    tables, gaps = [], []
    if pred.metadata is None:
        return SubgroupResult(_empty_table(), _empty_gaps())
    for a, attribute in enumerate(a for a in attributes if a in pred.metadata.columns):
        values = subgroup_values(pred.metadata, attribute, age_edges)
        groups = [g for g in _ordered_groups(values, attribute, age_edges) if g != ""]
        if len(groups) < 2:
            continue
        per_group = {}
        for g, group in enumerate(groups):
            subset = pred.subset(values == group)
            per_group[group] = _group_auroc(subset, min_patients, n_replicates, seed + 1000 * a + g, progress)
        common = _common_labels(per_group, pred.labels)
        tables.append(_attribute_table(attribute, per_group, pred.labels, common, level))
        null = _null_gaps(pred, values, per_group, common, n_permutations, seed + 1000 * a + 999, progress)
        gaps.append(_attribute_gaps(attribute, per_group, pred.labels, common, level, null))
    if not tables:
        return SubgroupResult(_empty_table(), _empty_gaps())
    table = pd.concat(tables, ignore_index=True)
    gap_table = pd.concat(gaps, ignore_index=True)
    tested = gap_table["p_value"].notna()
    gap_table["p_adjusted"] = np.nan
    if tested.any():
        # float: an attribute without any gap contributes an empty (object-typed) frame to the concat
        p_values = gap_table.loc[tested, "p_value"].to_numpy(dtype=float)
        gap_table.loc[tested, "p_adjusted"] = false_discovery_control(p_values)
    gap_table["significant"] = (gap_table["p_adjusted"] < 1 - level).to_numpy()
    gap_table["largest"] = False
    macro = gap_table[(gap_table["label"] == MACRO) & gap_table["gap"].notna()]
    if len(macro):
        gap_table.loc[macro["gap"].idxmax(), "largest"] = True
    return SubgroupResult(table, gap_table)


@dataclass
class _Group:
    n_images: int
    n_patients: int
    n_pos: np.ndarray  # per label
    point: np.ndarray  # per-label AUROC (NaN: undefined or too few patients)
    samples: np.ndarray  # (n_replicates, n_labels)


def _group_auroc(
    subset: Predictions, min_patients: int, n_replicates: int, seed: int, progress: bool
) -> _Group:
    n_labels = len(subset.labels)
    n_pos = np.nansum(subset.y_true, axis=0).astype(int)
    n_patients = subset.n_patients
    if n_patients < min_patients:
        return _Group(
            len(subset),
            n_patients,
            n_pos,
            np.full(n_labels, np.nan),
            np.full((n_replicates, n_labels), np.nan),
        )
    resampler = bs.Resampler(subset.patient_ids, n_replicates, seed)
    statistic = bs.auroc_statistic(subset.y_true, subset.y_score, resampler)
    point = statistic(np.ones((resampler.n_units, 1), dtype=np.float32))[0]  # every patient once
    samples = bs.run(resampler, {"auroc": statistic}, progress)["auroc"]
    return _Group(len(subset), n_patients, n_pos, point, samples)


def _common_labels(per_group: dict[str, _Group], labels: list[str]) -> np.ndarray:
    """The findings the group means average: counted in the mean and defined in every usable group."""
    usable = [g for g in per_group.values() if np.isfinite(g.point).any()]
    if len(usable) < 2:
        return np.zeros(len(labels), dtype=bool)
    return np.all([np.isfinite(g.point) for g in usable], axis=0) & mean_label_mask(labels)


def _macro(values: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Mean over the common labels along the last axis; NaN where one of them is undefined (a replicate
    never averages fewer findings) or none is common."""
    if not common.any():
        return np.full(values.shape[:-1], np.nan)
    return values[..., common].mean(axis=-1)


def _null_gaps(
    pred: Predictions,
    values: np.ndarray,
    per_group: dict[str, _Group],
    common: np.ndarray,
    n_permutations: int,
    seed: int,
    progress: bool,
) -> np.ndarray:
    """Gap (max minus min AUROC over the usable groups) of every label and the macro mean under random
    relabellings of the groups: (n_permutations, n_labels + 1), NaN where fewer than two groups are defined.

    Rows of unknown group are left out. Group labels are shuffled among patients when each patient belongs to
    one group, otherwise among images."""
    names = list(per_group)
    usable = np.array([np.isfinite(group.point).any() for group in per_group.values()])
    if usable.sum() < 2:
        return np.full((n_permutations, len(pred.labels) + 1), np.nan)
    known = np.isin(values, names)
    subset, codes = pred.subset(known), pd.Index(names).get_indexer(values[known])
    patients = subset.patient_ids
    one_group_each = pd.Series(codes).groupby(patients).nunique().max() == 1
    units = patients if one_group_each else np.arange(len(subset))
    index, uniques = pd.factorize(units, sort=True)
    unit_groups = np.zeros(len(uniques), dtype=np.int64)
    unit_groups[index] = codes
    permutations = bs.GroupPermutations(units, unit_groups, n_permutations, seed)
    statistic = bs.auroc_statistic(subset.y_true, subset.y_score, permutations)
    samples = bs.run(permutations, {"auroc": statistic}, progress)["auroc"]
    samples = samples.reshape(n_permutations, len(names), -1)  # (permutation, group, label)
    samples = np.concatenate([samples, _macro(samples, common)[..., None]], axis=-1)
    return _spread(samples[:, usable])


def _spread(values: np.ndarray) -> np.ndarray:
    """Max minus min over axis 1, ignoring NaN; NaN where fewer than two values are finite."""
    finite = np.isfinite(values)
    high = np.where(finite, values, -np.inf).max(axis=1)
    low = np.where(finite, values, np.inf).min(axis=1)
    return np.where(finite.sum(axis=1) >= 2, high - low, np.nan)


def _permutation_p(observed: float, null: np.ndarray) -> float:
    """``(1 + #{null >= observed}) / (1 + n)`` over the defined null values (a tolerance absorbs rounding)."""
    null = null[np.isfinite(null)]
    if null.size == 0:
        return float("nan")
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + null.size))


def _with_macro(group: _Group, common: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    point = np.append(group.point, _macro(group.point, common))
    samples = np.column_stack([group.samples, _macro(group.samples, common)])
    return point, samples


def _attribute_table(
    attribute: str, per_group: dict[str, _Group], labels: list[str], common: np.ndarray, level: float
) -> pd.DataFrame:
    rows = []
    for group_name, group in per_group.items():
        point, samples = _with_macro(group, common)
        low, high = bs.percentile_interval(samples, level)
        for j, label in enumerate([*labels, MACRO]):
            rows.append(
                {
                    "attribute": attribute,
                    "group": group_name,
                    "label": label,
                    "n_images": group.n_images,
                    "n_patients": group.n_patients,
                    "n_pos": int(group.n_pos[j]) if j < len(labels) else int(group.n_pos.sum()),
                    "auroc": point[j],
                    "auroc_low": low[j],
                    "auroc_high": high[j],
                }
            )
    return pd.DataFrame(rows)


def _attribute_gaps(
    attribute: str,
    per_group: dict[str, _Group],
    labels: list[str],
    common: np.ndarray,
    level: float,
    null: np.ndarray,
) -> pd.DataFrame:
    with_macro = {name: _with_macro(group, common) for name, group in per_group.items()}
    rows = []
    for j, label in enumerate([*labels, MACRO]):
        points = {name: point[j] for name, (point, _) in with_macro.items() if np.isfinite(point[j])}
        if len(points) < 2:
            continue
        best = max(points, key=points.__getitem__)
        worst = min(points, key=points.__getitem__)
        difference = with_macro[best][1][:, j] - with_macro[worst][1][:, j]
        low, high = bs.percentile_interval(difference[:, None], level)
        rows.append(
            {
                "attribute": attribute,
                "label": label,
                "best_group": best,
                "best_auroc": points[best],
                "worst_group": worst,
                "worst_auroc": points[worst],
                "gap": points[best] - points[worst],
                "gap_low": low[0],
                "gap_high": high[0],
                "p_value": _permutation_p(points[best] - points[worst], null[:, j]),
            }
        )
    return pd.DataFrame(rows, columns=_GAP_COLUMNS[: _GAP_COLUMNS.index("p_value") + 1])


def _ordered_groups(values: np.ndarray, attribute: str, age_edges: Sequence[float]) -> list[str]:
    present = list(pd.unique(values))
    preferred = {
        "sex": ["F", "M"],
        "view": ["PA", "AP", "LAT", "OTHER"],
        "age": age_band_names(age_edges),
    }.get(attribute, [])
    return [g for g in preferred if g in present] + sorted(g for g in present if g not in preferred)


_TABLE_COLUMNS = [
    "attribute",
    "group",
    "label",
    "n_images",
    "n_patients",
    "n_pos",
    "auroc",
    "auroc_low",
    "auroc_high",
]
_GAP_COLUMNS = [
    "attribute",
    "label",
    "best_group",
    "best_auroc",
    "worst_group",
    "worst_auroc",
    "gap",
    "gap_low",
    "gap_high",
    "p_value",
    "p_adjusted",
    "significant",
    "largest",
]


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=_TABLE_COLUMNS)


def _empty_gaps() -> pd.DataFrame:
    return pd.DataFrame(columns=_GAP_COLUMNS)
