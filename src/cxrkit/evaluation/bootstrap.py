"""Patient-level bootstrap confidence intervals, vectorised over replicates.

Images of one patient are correlated (follow-up films, same anatomy, same reader), so the resampling unit is
the patient, not the image: each replicate draws ``n_patients`` patients with replacement and every image of a
drawn patient enters the replicate as often as its patient was drawn. A replicate is therefore a vector of
integer patient multiplicities, and a metric on a replicate is the same metric with integer sample weights.

Replicates are processed in chunks as a ``(n_patients, chunk)`` multiplicity matrix. Per label, the distinct
scores of the positives split the negatives into segments (below, equal to, between those scores); the
replicate weight of the positives at each score and of the negatives in each segment is one sparse
(segment x patient) product with the multiplicity matrix. From these, for every replicate at once:

* AUROC with integer weights is the weighted Mann-Whitney statistic
  ``sum_pos w_i (W_neg(< s_i) + W_neg(= s_i) / 2) / (W_pos * W_neg)`` (ties count one half, as the
  trapezoidal ROC area of scikit-learn does), from cumulative sums over the segments;
* average precision with integer weights is ``sum_t (TP_t - TP_t-1) / TP * TP_t / (TP_t + FP_t)`` over the
  distinct score thresholds ``t`` (scikit-learn's ``average_precision_score``);
* confusion counts at fixed thresholds are sums of per-patient counts, i.e. one matrix product.

Each equals scikit-learn called with ``sample_weight`` = the replicate's image weights (see the tests).
Intervals are percentile intervals; replicates in which a metric is undefined (e.g. no positive patient
drawn) are ignored, and the number of usable replicates is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from cxrkit.evaluation import metrics
from cxrkit.evaluation.metrics import MACRO, MICRO, RATE_COLUMNS, Predictions

#: A statistic maps a (n_units, chunk) multiplicity matrix to a (chunk, ...) array of replicate values.
Statistic = Callable[[np.ndarray], np.ndarray]


class Replicates(Protocol):
    """Unit weights of many replicates: ``index`` maps rows to units; ``chunks()`` yields (n_units, chunk)."""

    index: np.ndarray
    n_units: int
    n_replicates: int
    chunk_size: int

    def chunks(self) -> Iterator[np.ndarray]: ...


class Resampler:
    """Bootstrap replicates as multiplicities of resampling units (patients by default).

    ``groups`` gives the unit of every row (patient ids); pass ``np.arange(n)`` to resample images instead.
    The replicates depend only on ``seed``, so two statistics evaluated over the same resampler (or two
    resamplers with the same groups and seed) see identical replicates: this is what makes paired
    comparisons paired.
    """

    def __init__(self, groups: np.ndarray, n_replicates: int = 1000, seed: int = 0, chunk_size: int = 32):
        if n_replicates < 1:
            raise ValueError(f"n_replicates must be >= 1, got {n_replicates}")
        self.index, uniques = pd.factorize(np.asarray(groups), sort=True)
        self.n_units = len(uniques)
        if self.n_units == 0:
            raise ValueError("cannot bootstrap an empty set of rows")
        self.n_replicates = n_replicates
        self.seed = seed
        self.chunk_size = chunk_size

    def chunks(self) -> Iterator[np.ndarray]:
        """Yield float32 multiplicity matrices of shape (n_units, chunk); columns are replicates."""
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.n_replicates, self.chunk_size):
            size = min(self.chunk_size, self.n_replicates - start)
            draws = rng.integers(0, self.n_units, size=(size, self.n_units))
            flat = (draws + np.arange(size)[:, None] * self.n_units).ravel()
            counts = np.bincount(flat, minlength=size * self.n_units).reshape(size, self.n_units)
            yield np.ascontiguousarray(counts.T, dtype=np.float32)

    def row_weights(self, replicate: int) -> np.ndarray:
        """Integer weight of every row in one replicate (for checks against weighted library metrics)."""
        start = 0
        for counts in self.chunks():
            if replicate < start + counts.shape[1]:
                return counts[self.index, replicate - start].astype(np.int64)
            start += counts.shape[1]
        raise IndexError(f"replicate {replicate} out of range ({self.n_replicates} replicates)")


class GroupPermutations:
    """Random relabellings of groups among units, as 0/1 unit weights for permutation tests.

    ``unit_groups`` gives the group code (0..n_groups-1) of every unit. Each permutation shuffles these codes
    among the units (group sizes stay fixed); a chunk holds, for each of its permutations ``c`` and each
    group ``g``, the indicator column ``c * n_groups + g`` of the units that permutation puts in ``g``. A
    statistic over a chunk therefore returns (chunk * n_groups, ...) values, permutation-major.
    """

    def __init__(
        self,
        groups: np.ndarray,
        unit_groups: np.ndarray,
        n_permutations: int = 1000,
        seed: int = 0,
        chunk_size: int = 32,
    ):
        if n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
        self.index, uniques = pd.factorize(np.asarray(groups), sort=True)
        self.n_units = len(uniques)
        self.unit_groups = np.asarray(unit_groups, dtype=np.int64)
        if self.unit_groups.shape != (self.n_units,):
            raise ValueError(
                f"unit_groups needs one group per unit ({self.n_units}), got {self.unit_groups.shape}"
            )
        self.n_groups = int(self.unit_groups.max()) + 1
        self.n_replicates = n_permutations
        self.seed = seed
        self.chunk_size = chunk_size

    def chunks(self) -> Iterator[np.ndarray]:
        """Yield float32 indicator matrices of shape (n_units, chunk * n_groups)."""
        rng = np.random.default_rng(self.seed)
        codes = np.arange(self.n_groups)
        for start in range(0, self.n_replicates, self.chunk_size):
            size = min(self.chunk_size, self.n_replicates - start)
            shuffled = rng.permuted(np.tile(self.unit_groups, (size, 1)), axis=1)  # (size, n_units)
            indicator = shuffled[:, None, :] == codes[None, :, None]  # (size, n_groups, n_units)
            yield np.ascontiguousarray(indicator.reshape(-1, self.n_units).T, dtype=np.float32)


def run(
    resampler: Replicates, statistics: Mapping[str, Statistic], progress: bool = False
) -> dict[str, np.ndarray]:
    """Evaluate every statistic on every replicate; returns name -> array (n_replicates, ...)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    n_chunks = -(-resampler.n_replicates // resampler.chunk_size)
    for counts in tqdm(
        resampler.chunks(), total=n_chunks, desc="bootstrap", unit="chunk", disable=not progress
    ):
        for name, statistic in statistics.items():
            parts[name].append(statistic(counts))
    return {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}


# ------------------------------------------------------------------------------------------- kernels


class _RankingKernel:
    """Weighted AUROC and average precision of one label for every replicate of a chunk.

    With ``v_0 < ... < v_m-1`` the distinct scores of the positives, only the total weight of positives at
    each ``v_k`` and of negatives in each of the ``2m + 1`` segments ``(-inf, v_0), {v_0}, (v_0, v_1), {v_1},
    ..., (v_m-1, inf)`` matter. Both totals are sparse (segment x patient) count matrices applied to the
    multiplicity matrix, so a chunk costs one sparse product over the known entries and sums over segments.
    """

    def __init__(
        self,
        y_true: np.ndarray,
        y_score: np.ndarray,
        unit: np.ndarray,
        n_units: int,
        average_precision: bool = True,
    ):
        known = ~np.isnan(y_true)
        y, s, u = y_true[known], y_score[known], unit[known]
        positive = y == 1
        self.defined = bool(positive.any() and (~positive).any())
        self.n_entries = y.size
        self.average_precision = average_precision
        values = np.unique(s[positive])
        m = values.size
        below = np.searchsorted(values, s[~positive], side="left")
        tie = values[np.minimum(below, max(m - 1, 0))] == s[~positive] if m else np.zeros(below.size, bool)
        self.pos_weights = _count_matrix(np.searchsorted(values, s[positive]), u[positive], m, n_units)
        self.neg_weights = _count_matrix(2 * below + tie, u[~positive], 2 * m + 1, n_units)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """(chunk, 2): AUROC and average precision (NaN where undefined or not requested)."""
        out = np.full((counts.shape[1], 2), np.nan)
        if not self.defined:
            return out
        # Weighted counts are integers: float32 holds them (and sums of two) exactly below 2**23.
        exact_in_float32 = self.n_entries * float(counts.max()) < 2**23
        counts = counts if exact_in_float32 else counts.astype(np.float64)
        pos = self.pos_weights @ counts  # (m, chunk): positive weight at v_k
        cum_neg = np.cumsum(self.neg_weights @ counts, axis=0)  # (2m + 1, chunk)
        below, at_most, total_neg = cum_neg[0:-1:2], cum_neg[1::2], cum_neg[-1]  # W_neg(< v_k), W_neg(<= v_k)
        total_pos = pos.sum(axis=0, dtype=np.float64)
        # AUROC = sum_k pos_k (W_neg(< v_k) + W_neg(= v_k) / 2) / (W_pos W_neg); below + at_most = 2 (...).
        twice_rank_sum = np.einsum("kc,kc->c", pos, below + at_most, dtype=np.float64)
        out[:, 0] = _safe_divide(twice_rank_sum / 2, total_pos * total_neg)
        if self.average_precision:
            # AP = sum_k pos_k / W_pos * precision(v_k), precision = TP / (TP + FP) over scores >= v_k.
            true_pos = np.cumsum(pos[::-1], axis=0)[::-1]
            predicted = true_pos + (total_neg - below)
            precision = np.divide(
                true_pos, predicted, out=np.zeros(true_pos.shape), where=predicted > 0, dtype=np.float64
            )
            out[:, 1] = _safe_divide(np.einsum("kc,kc->c", pos, precision, dtype=np.float64), total_pos)
        return out


def _count_matrix(rows: np.ndarray, units: np.ndarray, n_rows: int, n_units: int) -> sparse.csr_matrix:
    """Sparse (n_rows, n_units) matrix counting the entries of each (row, unit) pair."""
    data = np.ones(rows.size, dtype=np.float32)
    return sparse.csr_matrix((data, (rows, units)), shape=(n_rows, n_units), dtype=np.float32)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator > 0)


def ranking_statistic(
    y_true: np.ndarray, y_score: np.ndarray, resampler: Replicates, average_precision: bool = True
) -> Statistic:
    """Per-label AUROC and average precision of every replicate: (chunk, n_labels, 2)."""
    y_true, y_score = _as_2d(y_true), _as_2d(y_score)
    unit, n_units = resampler.index, resampler.n_units
    kernels = [
        _RankingKernel(y_true[:, j], y_score[:, j], unit, n_units, average_precision)
        for j in range(y_true.shape[1])
    ]

    def statistic(counts: np.ndarray) -> np.ndarray:
        return np.stack([kernel(counts) for kernel in kernels], axis=1)

    return statistic


def auroc_statistic(y_true: np.ndarray, y_score: np.ndarray, resampler: Replicates) -> Statistic:
    """Per-label AUROC of every replicate: (chunk, n_labels)."""
    ranking = ranking_statistic(y_true, y_score, resampler, average_precision=False)
    return lambda counts: ranking(counts)[..., 0]


def micro_ranking_statistic(y_true: np.ndarray, y_score: np.ndarray, resampler: Resampler) -> Statistic:
    """AUROC and average precision over all known image-label pairs pooled: (chunk, 2)."""
    y_true, y_score = _as_2d(y_true), _as_2d(y_score)
    unit = np.repeat(resampler.index, y_true.shape[1])
    return _RankingKernel(y_true.ravel(), y_score.ravel(), unit, resampler.n_units)


def confusion_statistic(y_true: np.ndarray, y_pred: np.ndarray, resampler: Resampler) -> Statistic:
    """Per-label TP, FP, TN, FN of every replicate: (chunk, n_labels, 4), from per-unit counts."""
    y_true, y_pred = _as_2d(y_true), _as_2d(y_pred)
    known = ~np.isnan(y_true)
    cells = np.stack(
        [
            known & (y_true == 1) & (y_pred == 1),
            known & (y_true == 0) & (y_pred == 1),
            known & (y_true == 0) & (y_pred == 0),
            known & (y_true == 1) & (y_pred == 0),
        ],
        axis=2,
    )
    n_rows, n_labels, _ = cells.shape
    per_unit = np.zeros((resampler.n_units, n_labels * 4))
    np.add.at(per_unit, resampler.index, cells.reshape(n_rows, -1).astype(np.float64))

    def statistic(counts: np.ndarray) -> np.ndarray:
        return (counts.T.astype(np.float64) @ per_unit).reshape(counts.shape[1], n_labels, 4)

    return statistic


def _as_2d(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    return array[:, None] if array.ndim == 1 else array


# ------------------------------------------------------------------------------------------ intervals


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval along axis 0, ignoring NaN replicates (NaN when none is usable)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    samples = np.asarray(samples, dtype=np.float64)
    tail = (1 - level) / 2 * 100
    usable = np.isfinite(samples).any(axis=0)
    low = np.full(samples.shape[1:], np.nan)
    high = np.full(samples.shape[1:], np.nan)
    if usable.any():
        low[usable] = np.nanpercentile(samples[:, usable], tail, axis=0)
        high[usable] = np.nanpercentile(samples[:, usable], 100 - tail, axis=0)
    return low, high


@dataclass
class BootstrapResult:
    """Replicate values of every metric; ``table()`` turns them into interval columns.

    ``point`` holds the same statistics on the full set (every unit once); it fixes which findings the mean
    (``macro``) averages: those defined on the full set and counted by
    :func:`~cxrkit.evaluation.metrics.mean_label_mask`. Every replicate averages exactly that set; a replicate
    in which one of them is undefined has no mean (it is not averaged over fewer findings).
    """

    labels: list[str]
    samples: dict[str, np.ndarray]
    point: dict[str, np.ndarray]
    n_replicates: int
    level: float
    unit: str
    seed: int

    def table(self) -> pd.DataFrame:
        """Columns ``<metric>_low``/``<metric>_high`` (and ``<metric>_replicates``, the usable count)
        for AUROC, AUPRC and, when thresholds were given, the rates at the operating points. Rows: labels,
        ``macro`` (replicate-wise mean over one common set of findings) and ``micro`` (pooled pairs /
        summed counts)."""
        frame = pd.DataFrame(index=pd.Index([*self.labels, MACRO, MICRO], name="label"))
        for name, per_label in self.per_label_samples().items():
            low, high = percentile_interval(per_label, self.level)
            frame[f"{name}_low"] = low
            frame[f"{name}_high"] = high
            frame[f"{name}_replicates"] = np.isfinite(per_label).sum(axis=0)
        return frame

    def per_label_samples(self) -> dict[str, np.ndarray]:
        """Metric -> (n_replicates, n_labels + 2) replicate values, columns = labels, macro, micro."""
        samples, point = _per_label_metrics(self.samples), _per_label_metrics(self.point)
        mask = metrics.mean_label_mask(self.labels)
        out = {}
        for name, (per_label, pooled) in samples.items():
            point_per_label, _ = point[name]
            columns = mask & np.isfinite(point_per_label[0])
            out[name] = np.column_stack([per_label, common_mean(per_label, columns), pooled])
        return out


def _per_label_metrics(values: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Metric -> (per-label replicate values (R, L), pooled values (R,)) from the raw statistics."""
    out = {}
    for name in ("auroc", "auprc"):
        if name in values:
            out[name] = (values[name], values[f"micro_{name}"])
    if "confusion" in values:
        confusion = values["confusion"]
        per_label = metrics.rates(*np.moveaxis(confusion, 2, 0))
        summed = metrics.rates(*np.moveaxis(confusion.sum(axis=1), 1, 0))
        for name in RATE_COLUMNS:
            out[name] = (per_label[name], summed[name])
    return out


def common_mean(samples: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Mean of each replicate over the label ``columns`` (boolean mask); NaN for a replicate in which any
    of them is undefined, and for every replicate when no column is chosen."""
    columns = np.asarray(columns, dtype=bool)
    if not columns.any():
        return np.full(samples.shape[0], np.nan)
    return samples[:, columns].mean(axis=1)


def resampling_groups(pred: Predictions, unit: str) -> np.ndarray:
    """Resampling unit of every row: ``patient`` ids or ``image`` (each row its own unit)."""
    if unit == "patient":
        return pred.patient_ids
    if unit == "image":
        return np.arange(len(pred))
    raise ValueError(f"bootstrap unit must be 'patient' or 'image', got {unit!r}")


def bootstrap(
    pred: Predictions,
    thresholds: Mapping[str, float] | None = None,
    *,
    n_replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    unit: str = "patient",
    micro: bool = True,
    progress: bool = False,
) -> BootstrapResult:
    """Bootstrap AUROC, AUPRC (per label, macro, micro) and, given ``thresholds``, the confusion counts at
    those operating points, resampling ``unit`` (``patient`` or ``image``)."""
    resampler = Resampler(resampling_groups(pred, unit), n_replicates, seed)
    statistics: dict[str, Statistic] = {"ranking": ranking_statistic(pred.y_true, pred.y_score, resampler)}
    if micro:
        statistics["micro"] = micro_ranking_statistic(pred.y_true, pred.y_score, resampler)
    if thresholds is not None:
        predicted = metrics.binarize(pred.y_score, pred.labels, thresholds)
        statistics["confusion"] = confusion_statistic(pred.y_true, predicted, resampler)
    samples = _named(run(resampler, statistics, progress), micro)
    every_unit_once = np.ones((resampler.n_units, 1), dtype=np.float32)
    point = _named({name: statistic(every_unit_once) for name, statistic in statistics.items()}, micro)
    return BootstrapResult(list(pred.labels), samples, point, n_replicates, level, unit, seed)


def _named(values: dict[str, np.ndarray], micro: bool) -> dict[str, np.ndarray]:
    """Split the ranking statistics into ``auroc``, ``auprc``, ``micro_auroc`` and ``micro_auprc``."""
    values = dict(values)
    ranking = values.pop("ranking")
    pooled = values.pop("micro") if micro else np.full((ranking.shape[0], 2), np.nan)
    return {
        "auroc": ranking[..., 0],
        "auprc": ranking[..., 1],
        "micro_auroc": pooled[:, 0],
        "micro_auprc": pooled[:, 1],
        **values,
    }
