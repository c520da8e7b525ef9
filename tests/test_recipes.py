"""Every recipe in configs/ trains from the CLI on tiny real data (smoke test of the whole training path).

Each recipe keeps its model, loss, optimiser, schedule and stages; the data sources are swapped for tiny
copies of the real NIH sample and pneumonia folders (symlinks), images shrink to 48 px, stages and epochs to
one short epoch (``train.max_epochs`` only without stages, which decide the epochs). Hub weights cannot be
fetched offline, so ``hub`` becomes ``none``; the offline recipes keep their real EfficientNet-Lite weights.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cxrkit.cli.main import cli
from cxrkit.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_data(tiny_data_root: Path) -> dict[str, Path]:
    return {"nih": tiny_data_root / "nih", "folder": tiny_data_root / "pneumonia" / "train"}


def tiny_overrides(recipe: str, data: dict[str, Path], out: Path) -> list[str]:
    config = load_config(REPO / "configs" / recipe)
    overrides = [
        f"output_dir={out / 'run'}",
        f"data.cache.dir={out / 'cache'}",
        "data.cache.image_size=48",
        "data.cache.workers=1",
        "data.augment.crop_size=40",
        "data.loader.batch_size=8",
        "data.loader.num_workers=0",
        "data.loader.pin_memory=false",
        "data.no_finding_ratio=null",
        "train.limit_train_batches=2",
        "train.loggers=[csv]",
    ]
    if len(config.data.sources) > 1:  # a merged recipe: merge two real datasets with different label sets
        nih, folder = data["nih"], data["folder"]
        overrides.append(f"data.sources=[{{adapter: nih, root: {nih}}}, {{adapter: folder, root: {folder}}}]")
        overrides += ["data.labels=[]", "data.views=[]"]  # the recipe's PadChest/OpenI-only labels and views
    else:
        kind = "folder" if config.data.sources[0].adapter == "folder" else "nih"
        overrides += [f"data.sources.0.adapter={kind}", f"data.sources.0.root={data[kind]}"]
    stages = range(len(config.train.stages))  # the stages decide the epochs: one each, else max_epochs=1
    overrides += [f"train.stages.{i}.epochs=1" for i in stages] or ["train.max_epochs=1"]
    if config.model.pretrained.source == "hub":
        overrides.append("model.pretrained.source=none")
    return overrides


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_on_tiny_data(recipe: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    overrides = tiny_overrides(recipe, tiny_data, tmp_path)
    result = CliRunner().invoke(cli, ["train", "-c", str(REPO / "configs" / recipe), *overrides])
    assert result.exit_code == 0, f"{recipe}: {result.output}\n{result.exception!r}"
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "best.ckpt").exists()
    assert (run_dir / "config.yaml").exists()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    epochs = len(load_config(REPO / "configs" / recipe).train.stages) or 1
    assert metrics["epoch"].max() == epochs - 1
    assert "val/loss" in metrics.columns
