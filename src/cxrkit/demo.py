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
    """One dataset the demo runs on: a recipe and the overrides pointing it at the data."""

    name: str
    recipe: str
    overrides: list[str]


@dataclass
class DemoResult:
    outputs: dict[str, Path] = field(default_factory=dict)


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
            DemoDataset("pneumonia", "pneumonia_lite0_offline.yaml", [f"data.sources.0.root={pneumonia}"])
        )
    if not found and _is_huggingface_dataset(root):
        found.append(
            DemoDataset(
                "pneumonia",
                "pneumonia_lite0_offline.yaml",
                ["data.sources.0.adapter=huggingface", f"data.sources.0.root={root}"],
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


QUICK_OVERRIDES = ["train.limit_train_batches=0.2"]
SEARCH_SPACE = CONFIG_DIR / "spaces" / "seed_space.yaml"
#: A small real search: few trials, each on a slice of every epoch (the full study is `cxr tune`).
SEARCH_TRIALS = 3
SEARCH_OVERRIDES = ["train.limit_train_batches=8", "train.loggers=[csv]"]


def run_demo(
    data: str | None,
    out: Path,
    extra: list[str],
    echo: Callable[[str], None] = print,
    quick: bool = False,
) -> DemoResult:
    """Every stage on every dataset found: prepare → describe → train → evaluate → explain → export."""
    root = locate_data(data)
    echo(f"data: {root.resolve()}")
    result = DemoResult()
    for dataset in datasets_in(root):
        config = demo_config(dataset, out, [*(QUICK_OVERRIDES if quick else []), *extra])
        result.outputs.update(run_pipeline(dataset.name, config, echo))
        if dataset.name == "pneumonia":
            search = demo_config(dataset, out, [*extra, *SEARCH_OVERRIDES])
            result.outputs.update(run_search(search, out / "studies" / "pneumonia", echo))
    return result


def run_search(config: DictConfig, study_dir: Path, echo: Callable[[str], None]) -> dict[str, Path]:
    """A few trials of the original project's search space (Optuna TPE, pruning, MLflow-tracked)."""
    from cxrkit.tuning.space import load_space
    from cxrkit.tuning.study import run_study

    echo(f"[search] {SEARCH_TRIALS} trials of {SEARCH_SPACE.name} in {study_dir}")
    study = run_study(config, load_space(SEARCH_SPACE), SEARCH_TRIALS, study_dir=study_dir)
    found = {"search report": study.report, "best config from the search": study.best_config}
    return {name: path for name, path in found.items() if path is not None}


def run_pipeline(name: str, config: DictConfig, echo: Callable[[str], None]) -> dict[str, Path]:
    """One dataset through the whole pipeline; returns the outputs people look at."""
    from cxrkit.cli.data import prepare
    from cxrkit.data.describe import describe_cache
    from cxrkit.evaluation.run import evaluate_run
    from cxrkit.explain.run import explain_run
    from cxrkit.inference.bundle import export_run

    outputs: dict[str, Path] = {}
    echo(f"[{name}] preparing the cache in {config.data.cache.dir}")
    report = prepare(config)
    echo(f"[{name}] {report.n_images} images cached, {report.n_failed} unreadable")
    outputs[f"{name} data report"] = describe_cache(
        config.data.cache.dir, Path(config.output_dir) / "describe", config.data.augment, seed=config.seed
    )
    run_dir = train_or_resume(config, echo, name)
    outputs[f"{name} run"] = run_dir
    echo(f"[{name}] evaluating on the test split")
    outputs[f"{name} evaluation report"] = evaluate_run(run_dir, "test")["html"]
    echo(f"[{name}] Grad-CAM heatmaps")
    outputs[f"{name} heatmap gallery"] = explain_run(run_dir, split="test", limit=8)
    bundle_path = Path(config.output_dir) / f"{name}.cxr"
    echo(f"[{name}] exporting the model bundle (with ONNX)")
    export_run(run_dir, bundle_path, onnx=True)
    outputs[f"{name} model bundle"] = bundle_path
    echo(f"[{name}] serve it with: cxr serve {bundle_path}")
    return outputs


def train_or_resume(config: DictConfig, echo: Callable[[str], None], name: str) -> Path:
    """Train the recipe, or finish an earlier (possibly interrupted) demo run in the same place."""
    from cxrkit.training.run import train

    run_dir = Path(config.output_dir)
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        echo(f"[{name}] resuming the run in {run_dir}")
        return train(config, resume=run_dir)
    echo(f"[{name}] training {config.model.arch} into {run_dir}")
    return train(config)
