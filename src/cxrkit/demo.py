"""``cxr demo``: the whole pipeline on real data with the bundled recipes.

Data comes from, in order: ``--data PATH``, ``$CXR_DATA``, ``../shared/data`` when it exists, and otherwise a
download of a small public chest X-ray set from the Hugging Face hub. A data root may hold ``nih/`` (NIH
ChestX-ray14 images + ``Data_Entry_2017*.csv``) and/or ``pneumonia/`` (class-per-folder images), or be a
downloaded Hugging Face dataset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from cxrkit.config import load_config

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SHARED_DATA = Path("../shared/data")
DOWNLOAD_DIR = Path.home() / ".cache" / "cxrkit" / "data"


class NoDataError(RuntimeError):
    """No data was given, found or downloadable."""


@dataclass
class DemoDataset:
    """One dataset the demo runs on: a recipe, the overrides pointing it at the data, and the seeds of more
    runs trained beside the recipe's own (with them, the runs are exported as one ensemble bundle)."""

    name: str
    recipe: str
    overrides: list[str]
    extra_seeds: tuple[int, ...] = ()


@dataclass
class DemoStep:
    """One row of the closing summary: what ran, its key figure and where its output is."""

    dataset: str
    stage: str
    figure: str
    path: Path


@dataclass
class DemoResult:
    steps: list[DemoStep] = field(default_factory=list)
    bundles: list[Path] = field(default_factory=list)

    def table(self) -> str:
        """The steps as an aligned text table (dataset, stage, key figure, output)."""
        rows = [("dataset", "stage", "key figure", "output")]
        rows += [(step.dataset, step.stage, step.figure, str(step.path)) for step in self.steps]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
            for row in rows
        )


def locate_data(explicit: str | None = None, download: Callable[[], Path] | None = None) -> Path:
    """Return the demo's data root (see the module docstring), downloading as the last resort."""
    for candidate, origin in ((explicit, "--data"), (os.environ.get("CXR_DATA"), "$CXR_DATA")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.exists():
                raise NoDataError(f"{origin} points to {path}, which does not exist")
            return path
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    try:
        return (download or _download_pneumonia)()
    except Exception as error:  # any failure to fetch means: no data here
        raise NoDataError(
            "no chest X-ray data found and the download failed "
            f"({error}).\nGive data with `cxr demo --data PATH` or CXR_DATA=PATH, where PATH holds nih/ "
            "(NIH ChestX-ray14 PNGs + Data_Entry_2017*.csv) and/or pneumonia/ (NORMAL/, PNEUMONIA/ folders), "
            "or get a public set online with `cxr data download pneumonia --dest data`."
        ) from error


def _download_pneumonia() -> Path:
    from cxrkit.data.download import download

    return download("pneumonia", DOWNLOAD_DIR)


def datasets_in(root: Path) -> list[DemoDataset]:
    """The datasets found under ``root``, each with its recipe."""
    found = []
    nih = root / "nih"
    if any(nih.glob("Data_Entry_2017*.csv*")):
        found.append(DemoDataset("nih", "nih_lite0_offline.yaml", [f"data.sources.0.root={nih}"]))
    pneumonia = root / "pneumonia" / "train"
    if pneumonia.is_dir():
        found.append(
            DemoDataset(
                "pneumonia",
                "pneumonia_lite0_offline.yaml",
                [f"data.sources.0.root={pneumonia}"],
                PNEUMONIA_EXTRA_SEEDS,
            )
        )
    if not found and _is_huggingface_dataset(root):
        found.append(
            DemoDataset(
                "pneumonia",
                "pneumonia_lite0_offline.yaml",
                ["data.sources.0.adapter=huggingface", f"data.sources.0.root={root}"],
                PNEUMONIA_EXTRA_SEEDS,
            )
        )
    if not found:
        raise NoDataError(f"{root} holds neither nih/ nor pneumonia/train/ nor a Hugging Face dataset")
    return found


def _is_huggingface_dataset(root: Path) -> bool:
    markers = ("dataset_dict.json", "dataset_info.json", "state.json")
    return any((root / marker).exists() for marker in markers) or any(root.glob("**/*.parquet"))


def demo_config(dataset: DemoDataset, out: Path, extra: list[str]) -> DictConfig:
    """The recipe of ``dataset`` pointed at the demo data, writing under ``out``."""
    overrides = [
        *dataset.overrides,
        f"output_dir={out / dataset.name}",
        f"data.cache.dir={out / 'cache' / dataset.name}",
        *extra,
    ]
    return load_config(CONFIG_DIR / dataset.recipe, overrides)


#: The pneumonia recipe (seed 0) ships as an ensemble with a second seed: what holds at a new site (README,
#: "Validating at a new site").
PNEUMONIA_EXTRA_SEEDS = (1,)
QUICK_OVERRIDES = ["train.limit_train_batches=0.2"]
SEARCH_SPACE = CONFIG_DIR / "spaces" / "seed_space.yaml"
#: A small real search: few trials, each on a slice of every epoch (the full study is `cxr tune`).
SEARCH_TRIALS = 3
SEARCH_OVERRIDES = ["train.limit_train_batches=8", "train.loggers=[csv]"]


def run_demo(data: str | None, out: Path, extra: list[str], quick: bool = False) -> DemoResult:
    """Every stage on every dataset found: prepare → describe → train → evaluate → explain → export (and a
    small search on the pneumonia data); progress is logged, the result summarises each stage."""
    root = locate_data(data)
    log.info("data: %s", root.resolve())
    result = DemoResult()
    for dataset in datasets_in(root):
        overrides = [*(QUICK_OVERRIDES if quick else []), *extra]
        config = demo_config(dataset, out, overrides)
        members = [
            demo_config(dataset, out, [*overrides, *member_overrides(seed, out, dataset)])
            for seed in dataset.extra_seeds
        ]
        bundle = run_pipeline(dataset.name, config, result, members)
        if dataset.name == "pneumonia" and (root / "pneumonia" / "test").is_dir():
            run_site(dataset.name, bundle, root / "pneumonia" / "test", result)
        if dataset.name == "pneumonia":
            search = demo_config(dataset, out, [*extra, *SEARCH_OVERRIDES])
            run_search(search, out / "studies" / "pneumonia", result)
    return result


def member_overrides(seed: int, out: Path, dataset: DemoDataset) -> list[str]:
    """The overrides of an ensemble member: its seed and its own run folder beside the first run's."""
    return [f"seed={seed}", f"output_dir={out / f'{dataset.name}-seed{seed}'}"]


def run_site(name: str, bundle: Path, site: Path, result: DemoResult) -> None:
    """A new site (``pneumonia/test``): external evaluation of the exported bundle (beside its internal
    test split), then calibration of the bundle."""
    from cxrkit.evaluation.external import evaluate_external
    from cxrkit.evaluation.metrics import MACRO
    from cxrkit.inference.calibrate import calibrate_bundle

    log.info("[%s] external evaluation on %s (a new site)", name, site)
    ext = evaluate_external(bundle, site)
    outside = ext.external.table.loc[MACRO]
    inside = f"internal {ext.internal.table.loc[MACRO, 'auroc']:.3f} vs " if ext.internal else ""
    figure = f"AUROC {inside}external {outside['auroc']:.3f}; sens/spec {outside['sensitivity']:.3f}/"
    figure += f"{outside['specificity']:.3f}"
    result.steps.append(DemoStep(name, "external", figure, ext.paths["html"]))
    log.info("[%s] site calibration on %s", name, site)
    calibrated = calibrate_bundle(bundle, site)
    path = calibrated.bundle.save(bundle.with_name(f"{name}-site.cxr"))
    row = calibrated.table.iloc[0]
    figure = f"site thresholds: sens/spec {row['sensitivity']:.3f}/{row['specificity']:.3f} (in-sample)"
    result.steps.append(DemoStep(name, "calibrate", figure, path))
    result.bundles.append(path)


def run_search(config: DictConfig, study_dir: Path, result: DemoResult) -> None:
    """A few trials of the original project's search space (Optuna TPE, pruning, MLflow-tracked)."""
    from cxrkit.tuning.space import load_space
    from cxrkit.tuning.study import best_trial, run_study

    log.info("[search] %d trials of %s in %s", SEARCH_TRIALS, SEARCH_SPACE.name, study_dir)
    study = run_study(config, load_space(SEARCH_SPACE), SEARCH_TRIALS, study_dir=study_dir)
    best = best_trial(study.study)
    figure = f"best val AUROC {best.value:.3f} (trial #{best.number})" if best else "no completed trial"
    result.steps.append(DemoStep("pneumonia", "search", figure, study.report or study_dir))
    if study.best_config is not None:
        result.steps.append(DemoStep("pneumonia", "best config", "cxr train -c it", study.best_config))


def run_pipeline(
    name: str, config: DictConfig, result: DemoResult, members: list[DictConfig] | None = None
) -> Path:
    """One dataset through the whole pipeline, each stage adding a row to ``result``; returns the bundle.
    ``members``: configs of more runs (other seeds) trained after ``config``'s and exported with it as one
    ensemble bundle; evaluation and Grad-CAM are of ``config``'s run."""
    from cxrkit.cli.data import prepare
    from cxrkit.data.cache import Cache
    from cxrkit.data.describe import describe_cache
    from cxrkit.evaluation.evaluator import MACRO
    from cxrkit.evaluation.run import run_evaluation
    from cxrkit.explain.run import run_explanation
    from cxrkit.inference.export import export_run
    from cxrkit.models.ensemble import ensemble_runs

    def step(stage: str, figure: str, path: Path) -> None:
        result.steps.append(DemoStep(name, stage, figure, Path(path)))

    log.info("[%s] preparing the cache in %s", name, config.data.cache.dir)
    report = prepare(config)
    step("prepare", f"{report.n_images} images cached, {report.n_failed} unreadable", report.out_dir)
    log.info("[%s] describing the data", name)
    page = describe_cache(
        config.data.cache.dir, Path(config.output_dir) / "describe", config.data.augment, seed=config.seed
    )
    step("describe", _split_sizes(Cache(config.data.cache.dir).manifest), page)
    run_dir = train_or_resume(config, name)
    step("train", _best_validation(run_dir, str(config.train.monitor)), run_dir)
    log.info("[%s] evaluating on the test split", name)
    evaluation = run_evaluation(run_dir, "test")
    macro = evaluation.result.table.loc[MACRO]
    figure = f"test AUROC {macro['auroc']:.3f} ({macro['auroc_low']:.3f}-{macro['auroc_high']:.3f})"
    step("evaluate", figure, evaluation.report)
    log.info("[%s] Grad-CAM heatmaps", name)
    explanation = run_explanation(run_dir, split="test", limit=8)
    step("explain", f"{len(explanation.gallery.records)} heatmaps", explanation.report)
    member_dirs = []
    for member in members or []:
        member_dirs.append(train_or_resume(member, f"{name}, seed {member.seed}"))
        step(
            f"train seed {member.seed}",
            _best_validation(member_dirs[-1], str(member.train.monitor)),
            member_dirs[-1],
        )
    bundle_path = Path(config.output_dir) / f"{name}.cxr"
    if member_dirs:
        log.info(
            "[%s] exporting the ensemble of %d runs as one bundle (with ONNX)", name, 1 + len(member_dirs)
        )
        bundle = ensemble_runs([run_dir, *member_dirs], bundle_path, onnx=True)
        kind = f"ensemble of {1 + len(member_dirs)} runs, "
    else:
        log.info("[%s] exporting the model bundle (with ONNX)", name)
        bundle = export_run(run_dir, bundle_path, onnx=True)
        kind = ""
    step("export", f"{bundle.num_classes} label(s), {kind}thresholds: {bundle.threshold_source}", bundle_path)
    result.bundles.append(bundle_path)
    return bundle_path


def _split_sizes(manifest) -> str:
    """``train/val/test 3,632/779/779 images, 1 label(s)``."""
    counts = manifest.frame["split"].value_counts()
    sizes = "/".join(f"{int(counts.get(name, 0)):,}" for name in ("train", "val", "test"))
    return f"train/val/test {sizes} images, {len(manifest.labels)} label(s)"


def _best_validation(run_dir: Path, monitor: str) -> str:
    """``best val/auroc_mean 0.912 (epoch 3)`` from the run's metrics.csv."""
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    values = metrics[["epoch", monitor]].dropna() if monitor in metrics.columns else pd.DataFrame()
    if values.empty:
        return f"no {monitor} logged"
    best = values.loc[values[monitor].idxmin() if "loss" in monitor else values[monitor].idxmax()]
    return f"best {monitor} {best[monitor]:.3f} (epoch {int(best['epoch']) + 1})"


def train_or_resume(config: DictConfig, name: str) -> Path:
    """Train the recipe, or finish an earlier (possibly interrupted) demo run in the same place."""
    from cxrkit.training.run import train

    run_dir = Path(config.output_dir)
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        log.info("[%s] resuming the run in %s", name, run_dir)
        return train(config, resume=run_dir)
    log.info("[%s] training %s into %s", name, config.model.arch, run_dir)
    return train(config)
