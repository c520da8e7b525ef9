"""Evaluate a trained run (or an exported bundle) on its data: predict, choose operating points, report.

>>> paths = evaluate_run("runs/nih-lite0", split="test", threshold_method="youden", n_replicates=1000)
>>> paths["html"], paths["predictions"], paths["run_thresholds"]

Steps of :func:`run_evaluation`:

1. load the network (:func:`cxrkit.inference.loading.load_model`): a run directory's
   ``checkpoints/<best|last>.ckpt`` (EMA weights when the run used them) or a bundle's weights, with its
   labels, activation and preprocessing;
2. open the run's cache (built or refreshed from the run's ``data`` config, exactly as training does) and
   predict the validation split and the requested split with :class:`cxrkit.inference.runner.Runner`: the
   cache image, then the evaluation transform, then the network; with ``train.tta`` the probabilities are
   averaged over :func:`cxrkit.training.module.tta_views`, as ``cxr test`` does;
3. fit the operating points on the VALIDATION predictions only (never the evaluated labels) and, for a run,
   save them to ``RUN_DIR/thresholds.json``, which ``cxr export`` stores in the bundle. The saved file is
   fitted on plain (non-TTA) validation scores because a bundle predicts without TTA; a bundle is
   evaluated at the thresholds it carries;
4. check patient leakage between the splits of the cache manifest, run
   :func:`cxrkit.evaluation.evaluator.evaluate` (bootstrap intervals, calibration, subgroups by sex, age and
   view) and write the report (:func:`cxrkit.evaluation.report.write_evaluation_report`) with the training
   curves of ``metrics.csv`` and a grid of evaluated images;
5. save the per-image predictions (``predictions.csv``, ``predictions_val.csv``) so that
   :func:`compare_saved` (``cxr compare``) can pair two runs on the same images later.

Outputs go to ``RUN_DIR/evaluation/<split>-<checkpoint>/`` unless ``out`` is given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cxrkit.data.cache import Cache
from cxrkit.data.manifest import SPLITS
from cxrkit.data.run_manifest import fitted_on, training_patients
from cxrkit.data.transforms import describe_cache_settings
from cxrkit.evaluation.compare import ComparisonResult, compare_runs
from cxrkit.evaluation.evaluator import TEMPERATURE_MODES, EvaluationResult, evaluate, jsonable
from cxrkit.evaluation.leakage import check_patient_leakage
from cxrkit.evaluation.metrics import MACRO, Predictions
from cxrkit.evaluation.report import select_examples, write_evaluation_report
from cxrkit.evaluation.thresholds import OperatingPoints
from cxrkit.inference.export import THRESHOLDS_FILE
from cxrkit.inference.loading import LoadedModel, load_model
from cxrkit.inference.runner import batches
from cxrkit.reporting.html import Report

log = logging.getLogger(__name__)

EVALUATION_DIR = "evaluation"
PREDICTIONS_FILE = "predictions.csv"
VAL_PREDICTIONS_FILE = "predictions_val.csv"
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "f1", "sensitivity")
#: Per-image metadata carried into the predictions (subgroups, example grid, pairing in ``cxr compare``).
METADATA_COLUMNS: tuple[str, ...] = ("path", "sex", "age", "view")


# ---- data and predictions ----------------------------------------------------------------------------------
def open_data(loaded: LoadedModel) -> Cache:
    """The cache of the model's data config, built or brought up to date first (finished shards reused)."""
    from cxrkit.data.build import build_run_manifest, prepare_data
    from cxrkit.data.cache import open_cache

    data = loaded.config.data
    frozen = build_run_manifest(data, loaded.path) if loaded.kind == "run" else None  # the run's splits
    report = prepare_data(data, manifest=frozen)
    if report.n_failed:
        log.warning(
            "%d images could not be decoded and are left out (see %s/failures.csv)",
            report.n_failed,
            data.cache.dir,
        )
    cache = open_cache(data.cache.dir)
    spec = loaded.preprocess
    if cache.settings != spec.cache_settings:
        raise ValueError(
            f"cache {cache.out_dir} holds {describe_cache_settings(cache.settings)} images; the model "
            f"expects {describe_cache_settings(spec.cache_settings)}"
        )
    return cache


def split_rows(cache: Cache, split: str) -> np.ndarray:
    """Cache rows of ``split``, in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.flatnonzero(cache.manifest.frame["split"].astype(str).to_numpy() == split)


def predict_rows(
    loaded: LoadedModel,
    cache: Cache,
    rows: np.ndarray,
    *,
    batch_size: int = 32,
    device: str = "auto",
    desc: str = "predict",
    progress: bool = True,
) -> tuple[Predictions, Predictions]:
    """Predictions for cache ``rows``: ``(as evaluated, plain)``. They are the same object unless the model
    uses TTA, in which case the first averages the TTA views and the second scores the plain image only."""
    from cxrkit.training.module import tta_views

    if len(rows) == 0:
        raise ValueError(f"no images to predict in cache {cache.out_dir}")
    image_batches = (cache.images(chunk) for chunk in batches(rows, batch_size))
    total = -(-len(rows) // batch_size)
    image_batches = tqdm(image_batches, total=total, desc=desc, unit="batch", disable=not progress)
    views = loaded.runner(device).predict_views(image_batches, tta_views if loaded.tta else None)
    frame = cache.manifest.frame.iloc[rows].reset_index(drop=True)
    targets = cache.manifest.with_labels(loaded.labels).targets[rows]
    metadata = frame[list(METADATA_COLUMNS)].copy()

    def predictions(scores: np.ndarray) -> Predictions:
        return Predictions(
            targets,
            np.clip(scores, 0.0, 1.0),
            frame["patient_id"].astype(str).to_numpy(),
            loaded.labels,
            metadata.copy(),
            loaded.task,  # type: ignore[arg-type]
        )

    plain_predictions = predictions(views[0])
    return (predictions(views.mean(axis=0)) if loaded.tta else plain_predictions), plain_predictions


# ---- evaluation --------------------------------------------------------------------------------------------
@dataclass
class RunEvaluation:
    """What :func:`run_evaluation` produced."""

    model: LoadedModel
    split: str
    result: EvaluationResult
    paths: dict[str, Path]
    out_dir: Path

    @property
    def report(self) -> Path:
        return self.paths["html"]


def default_out_dir(
    loaded: LoadedModel, split: str, method: str = "youden", sensitivity: float = 0.9
) -> Path:
    """``RUN/evaluation/<split>-<checkpoint>``, with ``-<method>`` when operating points are chosen on
    validation by another method than Youden's (a second method never replaces the first report)."""
    if loaded.kind == "run":
        suffix = "" if method == "youden" or loaded.operating_points is not None else f"-{method}"
        suffix += f"{sensitivity:g}" if suffix == "-sensitivity" else ""
        return loaded.path / EVALUATION_DIR / f"{split}-{loaded.checkpoint}{suffix}"
    return loaded.path.parent / f"{loaded.path.stem}-{EVALUATION_DIR}" / split


def run_evaluation(
    path: str | Path,
    split: str = "test",
    *,
    checkpoint: str = "best",
    threshold_method: str = "youden",
    target_sensitivity: float = 0.9,
    n_replicates: int = 1000,
    temperature: str = "none",
    out: str | Path | None = None,
    config: str | Path | DictConfig | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    n_examples: int = 12,
    seed: int = 0,
    progress: bool = True,
    backend: str = "auto",
) -> RunEvaluation:
    """Evaluate a run directory or bundle on ``split`` (see the module docstring for every step)."""
    if threshold_method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {threshold_method!r}")
    if temperature not in TEMPERATURE_MODES:
        raise ValueError(f"temperature must be one of {TEMPERATURE_MODES}, got {temperature!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    loaded = load_model(path, checkpoint, config, backend)
    cache = open_data(loaded)
    batch_size = batch_size or int(loaded.config.data.loader.batch_size)
    evaluated_rows = split_rows(cache, split)
    if evaluated_rows.size == 0:
        raise ValueError(f"the data of {loaded.name} has no {split!r} images (cache {cache.out_dir})")
    if split == "val":
        log.warning("evaluating on the validation split, where the operating points are chosen: optimistic")
    options = {"batch_size": batch_size, "device": device, "progress": progress}
    val, val_plain = _validation(loaded, cache, options)
    test, _ = predict_rows(loaded, cache, evaluated_rows, desc=f"predict {split}", **options)

    default = default_out_dir(loaded, split, threshold_method, target_sensitivity)
    out_dir = Path(out) if out is not None else default
    points = loaded.operating_points
    if points is None and val is not None:
        points = OperatingPoints.fit(val, threshold_method, target_sensitivity, source="val")
    if temperature != "none" and val is None:
        raise ValueError("temperature scaling is fitted on the validation split, which has no images")
    frame = cache.manifest.frame
    trained = training_patients(loaded.path) if loaded.kind == "run" else None
    leakage = check_patient_leakage(frame["patient_id"], frame["split"], trained)
    result = evaluate(
        test,
        val,
        operating_points=points,
        n_replicates=n_replicates,
        temperature=temperature,
        leakage=leakage,
        seed=seed,
        progress=progress,
    )
    result.settings.update(
        {
            "model": str(loaded.path),
            "model_kind": loaded.kind,
            "backend": loaded.backend,
            "checkpoint": loaded.checkpoint,
            "split": split,
            "tta": loaded.tta,
            "threshold_method": threshold_method,
        }
    )
    examples = select_examples(result, n=n_examples, seed=seed) if n_examples > 0 else []
    metrics_csv = loaded.path / "metrics.csv" if loaded.kind == "run" else None
    paths = write_evaluation_report(
        result,
        out_dir,
        title=f"Evaluation of {loaded.name} on the {split} split",
        subtitle=_subtitle(loaded),
        metrics_csv=metrics_csv if metrics_csv is not None and metrics_csv.exists() else None,
        images={row: _example_image(cache, int(evaluated_rows[row])) for row in examples},
    )
    paths["predictions"] = test.save(out_dir / PREDICTIONS_FILE)
    if val is not None:
        paths["val_predictions"] = val.save(out_dir / VAL_PREDICTIONS_FILE)
    if loaded.kind == "run" and val_plain is not None and config is None:  # -c other data: report only
        plain_points = points if val_plain is val else None
        paths["run_thresholds"] = save_run_thresholds(
            loaded, val_plain, threshold_method, target_sensitivity, plain_points
        )
    return RunEvaluation(loaded, split, result, paths, out_dir)


def evaluate_run(path: str | Path, split: str = "test", **options) -> dict[str, Path]:
    """:func:`run_evaluation`, returning the written files by kind (``html``, ``markdown``, ``json``, ``csv``,
    ``predictions``, ``val_predictions``, ``run_thresholds``...)."""
    return run_evaluation(path, split, **options).paths


def _validation(
    loaded: LoadedModel, cache: Cache, options: dict
) -> tuple[Predictions | None, Predictions | None]:
    rows = split_rows(cache, "val")
    if rows.size == 0:
        log.warning(
            "the data of %s has no validation images: operating points %s",
            loaded.name,
            "come from the bundle" if loaded.operating_points else "default to 0.5 and are not saved",
        )
        return None, None
    return predict_rows(loaded, cache, rows, desc="predict val", **options)


def save_run_thresholds(
    loaded: LoadedModel,
    val_plain: Predictions,
    method: str,
    target_sensitivity: float,
    points: OperatingPoints | None = None,
) -> Path:
    """Write ``RUN_DIR/thresholds.json`` for ``cxr export``: ``points`` when already fitted on ``val_plain``,
    else operating points fitted on the plain (single-view) validation scores now."""
    from cxrkit.training.run import checkpoint_path

    if points is None:
        points = OperatingPoints.fit(val_plain, method, target_sensitivity, source="val")
    points = OperatingPoints.from_dict(points.to_dict())  # a copy: the report keeps its own provenance
    points.extra = {
        "run": loaded.name,
        "scores": "single view, no test-time augmentation (as an exported bundle predicts)",
        "written_by": "cxr evaluate",
        **fitted_on(loaded.path, checkpoint_path(loaded.path, loaded.checkpoint)),
    }
    path = points.save(loaded.path / THRESHOLDS_FILE)
    log.debug("operating points for `cxr export` saved to %s", path)  # `cxr evaluate` prints the path
    return path


def _example_image(cache: Cache, row: int) -> np.ndarray:
    """The original image of a cache row for the example grid (sharper than the cache), else the cache one."""
    from cxrkit.data.decode import ImageDecodeError, read_image

    try:
        return read_image(cache.manifest.frame["path"].iloc[row])
    except (ImageDecodeError, OSError, ValueError) as error:
        log.debug("example image from the cache for row %d: %s", row, error)
        return cache.image(row)


def _subtitle(loaded: LoadedModel) -> str:
    what = f"bundle {loaded.path}"
    if loaded.kind == "run":
        what = f"run {loaded.path}, checkpoint {loaded.checkpoint}"
    spec = loaded.preprocess
    return f"{what}; input {spec.crop_size} px from a {spec.image_size} px {spec.resize_policy} cache" + (
        "; test-time augmentation" if loaded.tta else ""
    )


def per_finding_lines(result: EvaluationResult) -> list[str]:
    """Plain-text table: per finding, positives, AUROC [CI], threshold, sensitivity and specificity."""
    interval = f"AUROC [{result.settings['level']:.0%} CI]"
    header = f"{'finding':<20} {'pos':>5}  {interval:<26} {'thr':>6} {'sens':>6} {'spec':>6}"
    lines = [header, "-" * len(header)]
    for label in [*result.labels, MACRO]:
        row = result.table.loc[label]
        auroc = f"{row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]"
        if not np.isfinite(row["auroc"]):
            auroc = "undefined (one class)"
        positives = "" if label == MACRO else f"{int(row['n_pos'])}"
        threshold = "" if label == MACRO else f"{row['threshold']:.3f}"
        name = "mean" if label == MACRO else label
        lines.append(
            f"{name:<20} {positives:>5}  {auroc:<26} {threshold:>6} {_rate(row['sensitivity'])} "
            f"{_rate(row['specificity'])}"
        )
    return lines


def _rate(value: float) -> str:
    return f"{value:>6.3f}" if np.isfinite(value) else f"{'':>6}"


# ---- comparison --------------------------------------------------------------------------------------------
def find_predictions(path: str | Path, split: str = "test", checkpoint: str = "best") -> Path:
    """The predictions CSV of a run directory (``evaluation/<split>-<checkpoint>/``), an evaluation folder, or
    the CSV itself."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / PREDICTIONS_FILE, path / EVALUATION_DIR / f"{split}-{checkpoint}" / PREDICTIONS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    raise FileNotFoundError(
        f"no saved predictions for {path} (looked for {', '.join(str(c) for c in candidates)}): run "
        f"`cxr evaluate {path} --split {split} --checkpoint {checkpoint}` first"
    )


def compare_saved(
    a: str | Path,
    b: str | Path,
    *,
    split: str = "test",
    checkpoint: str = "best",
    n_replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> tuple[ComparisonResult, dict[str, Path]]:
    """Paired patient bootstrap of per-finding and mean AUROC, ``b`` minus ``a``, from saved predictions
    (run directories, evaluation folders or predictions CSVs); writes comparison.csv/.json/report.html to
    ``out`` when given."""
    files = [find_predictions(path, split, checkpoint) for path in (a, b)]
    names = _names(files)
    predictions = [Predictions.load(file) for file in files]
    result = compare_runs(
        *predictions, names=names, n_replicates=n_replicates, level=level, seed=seed, progress=progress
    )
    paths = write_comparison(result, out, files) if out is not None else {}
    return result, paths


def _names(files: Sequence[Path]) -> tuple[str, str]:
    """Run names from predictions files inside ``RUN/evaluation/<split>-<ckpt>/``, else their folders."""
    names = []
    for file in files:
        folder = file.parent
        names.append(folder.parent.parent.name if folder.parent.name == EVALUATION_DIR else folder.name)
    if names[0] == names[1]:
        names = [f"A ({names[0]})", f"B ({names[1]})"]
    return names[0], names[1]


def write_comparison(result: ComparisonResult, out: str | Path, files: Sequence[Path]) -> dict[str, Path]:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    a, b = result.names
    paths = {"csv": out_dir / "comparison.csv", "json": out_dir / "comparison.json"}
    result.table.to_csv(paths["csv"])
    payload = {**result.to_dict(), "predictions": {a: str(files[0]), b: str(files[1])}}
    paths["json"].write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False))
    report = Report(f"{b} vs {a}", subtitle=f"predictions: {files[0]} and {files[1]}")
    row = result.table.loc[MACRO]
    kind = "ok" if row["difference_low"] > 0 else "warning" if row["difference_high"] < 0 else "info"
    report.callout(result.summary(), kind)
    report.table(
        comparison_display(result),
        caption=f"AUROC per finding; difference {b} - {a} with its {result.level:.0%} paired "
        f"{result.unit}-bootstrap interval ({result.n_replicates} replicates, the same resamples for both)",
    )
    paths["html"] = report.write(out_dir)
    paths["markdown"] = out_dir / "report.md"
    return paths


def comparison_display(result: ComparisonResult) -> pd.DataFrame:
    a, b = result.names
    table = result.table
    return pd.DataFrame(
        {
            "Finding": ["Mean" if label == MACRO else label for label in table.index],
            f"AUROC {a}": [f"{value:.4f}" for value in table["auroc_a"]],
            f"AUROC {b}": [f"{value:.4f}" for value in table["auroc_b"]],
            f"{b} - {a} [{result.level:.0%} CI]": [
                f"{r.difference:+.4f} [{r.difference_low:+.4f}, {r.difference_high:+.4f}]"
                for r in table.itertuples()
            ],
            "Bootstrap p": [f"{value:.3g}" for value in table["p_value"]],
        }
    )
