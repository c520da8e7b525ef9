"""The ``cxr data`` commands and the config overrides, end to end on real images."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cxrkit.cli.main import cli
from cxrkit.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def nih_config_args(nih_sample: Path, tmp_path: Path) -> list[str]:
    return [
        "-c",
        str(REPO / "configs" / "nih_lite0_offline.yaml"),
        f"data.sources.0.root={nih_sample}",
        f"data.cache.dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'run'}",
        "data.cache.image_size=64",
        "data.augment.crop_size=56",
        "data.cache.workers=1",
    ]


def test_overrides_reach_every_level_and_typos_are_named() -> None:
    config = load_config(
        REPO / "configs" / "pneumonia_lite0_offline.yaml",
        ["data.sources.0.root=/data/x", "train.optimizer.lr=1e-4", "data.augment.scale_range=[0.8,1.2]"],
    )
    assert config.data.sources[0].root == "/data/x"
    assert config.train.optimizer.lr == pytest.approx(1e-4)
    assert list(config.data.augment.scale_range) == [0.8, 1.2]
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(None, ["train.optimiser.lr=1"])
    with pytest.raises(ConfigError, match="max_epochs"):
        load_config(None, ["train.max_epochs=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(REPO / "configs" / "no_such_recipe.yaml")


def test_every_recipe_loads() -> None:
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert load_config(recipe).name


@pytest.mark.shared_data
def test_manifest_prepare_describe_on_the_nih_sample(nih_sample: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = nih_config_args(nih_sample, tmp_path)

    result = runner.invoke(cli, ["data", "manifest", *args, "--out", str(tmp_path / "m.csv")])
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(tmp_path / "m.csv")
    assert len(manifest) == 205
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert "manifest: 205 images" in result.output

    result = runner.invoke(cli, ["data", "prepare", *args])
    assert result.exit_code == 0, result.output
    assert "205 images" in result.output
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["image_size"] == 64
    saved = load_config(tmp_path / "cache" / "config.yaml")
    assert saved.data.cache.image_size == 64

    again = runner.invoke(cli, ["data", "prepare", *args])
    assert again.exit_code == 0, again.output
    assert "0 shards built" in again.output

    result = runner.invoke(cli, ["data", "describe", *args, "--samples", "4"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "run" / "describe" / "report.html"
    assert report.exists()
    assert "data:image/png;base64," in report.read_text()


def test_missing_dataset_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(
        cli,
        [
            "data",
            "manifest",
            "-c",
            str(REPO / "configs" / "nih_lite0_offline.yaml"),
            f"data.sources.0.root={missing}",
        ],
    )
    assert result.exit_code != 0
    assert str(missing) in result.output


def test_bad_shard_spec_is_rejected(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["data", "prepare", "--shard", "3/2"])
    assert result.exit_code != 0
    assert "--shard" in result.output
