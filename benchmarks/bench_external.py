"""External validity of the offline pneumonia recipe at a new site, printed as JSON.

Trains ``configs/pneumonia_lite0_offline.yaml`` on ../shared/data/pneumonia/train (validation and internal
test drawn by patient from it) with seeds 0 and 1 (``--members N``: seeds 0..N-1), scored as one ensemble
as ``cxr demo`` ships it, or reuses trained runs (``--run DIR``, repeatable: several runs are scored as an
ensemble), then reports:

* internal test AUROC with a patient-bootstrap 95 % CI, and accuracy at the validation threshold;
* external AUROC (../shared/data/pneumonia/test: Kermany's own test images, collected apart from the
  training images) with its CI;
* external accuracy, sensitivity and specificity (a) at the validation threshold (Youden's J on the
  validation split, what an exported bundle ships) and (b) with site calibration cross-fitted by patient:
  the threshold is fitted on k-1 patient folds of the external sample (stratified by label) and applied to
  the held-out fold, so no image is scored at a threshold fitted on it; repeated over several fold draws
  (mean, min and max reported);
* training wall time, training CPU time (user + system of this process: the honest figure on a shared
  machine, where wall time is inflated by other work) and peak memory (RSS).

``--tta`` scores every split with the test-time views of :func:`cxrkit.training.module.tta_views`
(validation included, so the threshold is fitted on the same kind of scores it is applied to) and also
reports the single-view figures (``without_tta``). Several runs are pooled by their mean logit, exactly
as the one-graph ensemble bundle of :func:`cxrkit.models.ensemble.ensemble_runs` pools them.

Targets (issue 9): external AUROC >= 0.990, external accuracy >= 0.92 at the validation threshold and
>= 0.95 with cross-fitted site calibration, with <= 15 min of training on a quiet 2-core CPU.

Usage: ``python benchmarks/bench_external.py [--run RUN_DIR ...] [--tta] [--out runs/bench-external]``
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrkit.config import load_config
from cxrkit.data.build import prepare_data
from cxrkit.data.cache import Cache, open_cache
from cxrkit.evaluation.bootstrap import bootstrap
from cxrkit.evaluation.external import external_data_config, external_manifest
from cxrkit.evaluation.metrics import Predictions, auroc, confusion_counts, rates
from cxrkit.evaluation.run import open_data, predict_rows, split_rows
from cxrkit.evaluation.thresholds import choose_thresholds
from cxrkit.inference.calibrate import cross_fitted_decisions
from cxrkit.inference.loading import LoadedModel, load_model
from cxrkit.training.run import train

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RECIPE = REPO / "configs" / "pneumonia_lite0_offline.yaml"
EXTERNAL = SHARED / "pneumonia" / "test"
TARGETS = {"external_auroc": 0.990, "accuracy_at_val_threshold": 0.92, "accuracy_site_calibrated": 0.95}


@dataclass
class Scored:
    """Ensemble-averaged predictions of the validation, internal test and external images."""

    val: Predictions
    test: Predictions
    external: Predictions


# ---- training ----------------------------------------------------------------------------------------------
def train_recipe(out: Path, seed: int, overrides: list[str]) -> tuple[Path, dict]:
    """Train the recipe into ``out/run-<seed>``; return the run and its wall/CPU time."""
    config = load_config(
        RECIPE,
        [
            f"data.sources.0.root={SHARED / 'pneumonia' / 'train'}",
            f"data.cache.dir={out / 'cache-pneumonia'}",
            f"output_dir={out / f'run-{seed}'}",
            f"seed={seed}",
            "train.loggers=[csv]",
            *overrides,
        ],
    )
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run_dir = train(config)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run_dir, {"wall_min": (time.perf_counter() - started) / 60, "cpu_min": cpu / 60}


# ---- scoring -----------------------------------------------------------------------------------------------
def score(runs: list[Path], tta: bool, out: Path, batch_size: int) -> dict[str, Scored]:
    """Predictions of every run on the shared internal splits and the external images, pooled over the runs
    as the exported ensemble pools them (:mod:`cxrkit.models.ensemble`: mean logit): ``plain`` (one view,
    as a bundle predicts) and, with ``tta``, ``tta``."""
    models = [load_model(run) for run in runs]
    cache = open_data(models[0])
    external = external_cache(models[0], out / f"cache-external-{models[0].preprocess.intensity}")
    per_member = []
    for model in models:
        _same_task(model, models[0])
        model.tta = tta
        per_member.append(member_predictions(model, cache, external, batch_size))
    return {mode: pooled([member[mode] for member in per_member]) for mode in per_member[0]}


def member_predictions(
    model: LoadedModel, cache: Cache, external: Cache, batch_size: int
) -> dict[str, Scored]:
    """One model's ``plain`` (and, when ``model.tta``, ``tta``) predictions of val, test and external."""
    sets = {
        "val": (cache, split_rows(cache, "val")),
        "test": (cache, split_rows(cache, "test")),
        "external": (external, np.arange(len(external))),
    }
    scored = {
        name: predict_rows(model, source, rows, batch_size=batch_size, progress=False)
        for name, (source, rows) in sets.items()
    }
    modes = {"plain": 1, "tta": 0} if model.tta else {"plain": 0}
    return {
        mode: Scored(**{name: pair[index] for name, pair in scored.items()}) for mode, index in modes.items()
    }


def pooled(members: list[Scored]) -> Scored:
    return Scored(
        *(mean_logit([getattr(member, name) for member in members]) for name in ("val", "test", "external"))
    )


def external_cache(model: LoadedModel, cache_dir: Path) -> Cache:
    """Every image of the external sample, cached with the model's geometry."""
    section = external_data_config(EXTERNAL, model, cache_dir)
    manifest, skipped = external_manifest(section, model.labels, "all")
    if skipped:
        raise ValueError(f"{EXTERNAL} has no labels for {skipped}")
    prepare_data(section, manifest=manifest)
    return open_cache(section.cache.dir)


def _same_task(model: LoadedModel, first: LoadedModel) -> None:
    if model.labels != first.labels or model.activation != first.activation:
        raise ValueError(f"{model.path} predicts {model.labels} ({model.activation}), unlike {first.path}")
    if model.config.data.split != first.config.data.split:
        raise ValueError(f"{model.path} was trained on another split than {first.path}: not comparable")
    if model.preprocess != first.preprocess:
        raise ValueError(f"{model.path} preprocesses images unlike {first.path}: one ensemble needs one")


def mean_logit(members: list[Predictions]) -> Predictions:
    """The members' scores pooled as :class:`~cxrkit.models.ensemble.EnsembleModel` pools them: the mean
    of their logits, activated again (sigmoid, or softmax for one-label-per-image scores)."""
    first = members[0]
    logits = np.mean([member.logits() for member in members], axis=0)
    if first.task == "multiclass":
        scores = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    return Predictions(first.y_true, scores, first.patient_ids, first.labels, first.metadata, first.task)


# ---- metrics -----------------------------------------------------------------------------------------------
def ranking(pred: Predictions, replicates: int) -> dict:
    """AUROC with its patient-bootstrap 95 % interval, and the set's size."""
    label = pred.labels[0]
    y_true, y_score = pred.column(label)
    table = bootstrap(pred, n_replicates=replicates, micro=False).table()
    return {
        "images": len(y_true),
        "patients": int(pred.n_patients),
        "positives": int(y_true.sum()),
        "auroc": round(auroc(y_true, y_score), 4),
        "auroc_ci95": [
            round(float(table.loc[label, "auroc_low"]), 4),
            round(float(table.loc[label, "auroc_high"]), 4),
        ],
    }


def at_threshold(pred: Predictions, threshold: float) -> dict:
    label = pred.labels[0]
    y_true, y_score = pred.column(label)
    counts = confusion_counts(y_true, (y_score >= threshold).astype(float))
    return {"threshold": round(threshold, 4), **_rates(counts), **counts}


def cross_fitted(pred: Predictions, method: str, folds: int, repeats: int) -> dict:
    """Site calibration scored out of fold: per repeat, a threshold fitted (``method``) on k-1 patient folds
    of ``pred`` classifies the held-out fold; accuracy etc. over all images, then summarised over repeats."""
    label = pred.labels[0]
    y_true, _ = pred.column(label)
    per_repeat = [
        _rates(
            confusion_counts(y_true, cross_fitted_decisions(pred, method, n_folds=folds, seed=repeat)[:, 0])
        )
        for repeat in range(repeats)
    ]
    summary = {"method": method, "folds": folds, "repeats": repeats}
    for name in ("accuracy", "sensitivity", "specificity"):
        values = np.array([repeat[name] for repeat in per_repeat])
        summary[name] = round(float(values.mean()), 4)
        summary[f"{name}_min_max"] = [round(float(values.min()), 4), round(float(values.max()), 4)]
    return summary


def _rates(counts: dict) -> dict:
    values = rates(counts["tp"], counts["fp"], counts["tn"], counts["fn"])
    return {name: round(float(values[name]), 4) for name in ("accuracy", "sensitivity", "specificity")}


def report(scored: Scored, args: argparse.Namespace) -> dict:
    if len(scored.val.labels) != 1:
        raise ValueError(f"the pneumonia benchmark expects one label, got {scored.val.labels}")
    threshold = choose_thresholds(scored.val, "youden")[scored.val.labels[0]]
    internal = {
        **ranking(scored.test, args.replicates),
        "at_val_threshold": at_threshold(scored.test, threshold),
    }
    external = {
        **ranking(scored.external, args.replicates),
        "at_val_threshold": at_threshold(scored.external, threshold),
        "site_calibrated_cross_fitted": cross_fitted(scored.external, args.method, args.folds, args.repeats),
    }
    return {
        "validation_threshold_youden": round(threshold, 4),
        "internal_test": internal,
        "external": external,
    }


def meets(result: dict) -> dict:
    external = result["external"]
    return {
        "external_auroc": external["auroc"] >= TARGETS["external_auroc"],
        "accuracy_at_val_threshold": external["at_val_threshold"]["accuracy"]
        >= TARGETS["accuracy_at_val_threshold"],
        "accuracy_site_calibrated": external["site_calibrated_cross_fitted"]["accuracy"]
        >= TARGETS["accuracy_site_calibrated"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, action="append", default=[], help="trained run (repeat: ensemble)"
    )
    parser.add_argument(
        "--members",
        type=int,
        default=2,
        help="runs to train without --run (seeds 0..N-1), scored as one ensemble; 2: what `cxr demo` ships",
    )
    parser.add_argument("--override", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--tta", action="store_true", help="score with test-time augmentation views")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-external")
    parser.add_argument("--replicates", type=int, default=1000, help="patient-bootstrap replicates")
    parser.add_argument("--folds", type=int, default=5, help="patient folds of the cross-fitted calibration")
    parser.add_argument("--repeats", type=int, default=20, help="fold draws of the cross-fitted calibration")
    parser.add_argument("--method", default="youden", help="site threshold method (youden, f1, sensitivity)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    result: dict = {"recipe": str(RECIPE.relative_to(REPO)), "external_data": str(EXTERNAL), "tta": args.tta}
    runs = list(args.run)
    if not runs:
        timings = []
        for seed in range(args.members):
            run_dir, timing = train_recipe(args.out, seed, args.override)
            runs.append(run_dir)
            timings.append(timing)
        result["training"] = {
            "members": len(timings),
            "wall_min": round(sum(t["wall_min"] for t in timings), 2),
            "cpu_min": round(sum(t["cpu_min"] for t in timings), 2),
            "budget": "15 min wall on a quiet 2-core CPU (about 30 CPU-min)",
            "note": "CPU time = user + system of this process; wall time is inflated on a shared machine",
        }
    result["runs"] = [str(run) for run in runs]
    started = time.perf_counter()
    scored = score(runs, args.tta, args.out, args.batch_size)
    result.update(report(scored["tta" if args.tta else "plain"], args))
    if args.tta:
        result["without_tta"] = report(scored["plain"], args)
    result["evaluation_wall_s"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["targets"] = TARGETS
    result["meets_targets"] = meets(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
