"""The run config says what it accepts: choices typed in the schema, ranges and names checked when it loads
(before any data or weights are touched), each error naming the field and where the value came from."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cxrkit.cli.main import cli
from cxrkit.config import ConfigError, load_config, save_config
from cxrkit.data import config as data_config
from cxrkit.models import config as model_config
from cxrkit.training import config as train_config

REPO = Path(__file__).resolve().parents[1]
PNEUMONIA = REPO / "configs" / "pneumonia_lite0_offline.yaml"


def test_schema_choices_are_the_ones_the_code_implements() -> None:
    from cxrkit.data import transforms
    from cxrkit.models import heads, pretrained
    from cxrkit.training import losses, module

    pairs = [
        (data_config.ResizePolicy, transforms.RESIZE_POLICIES),
        (data_config.EvalMode, transforms.EVAL_MODES),
        (model_config.HeadType, heads.HEAD_TYPES),
        (model_config.PretrainedSource, pretrained.SOURCES),
        (train_config.LossName, losses.LOSS_NAMES),
        (train_config.OptimizerName, module.OPTIMIZERS),
    ]
    for literal, implemented in pairs:
        assert set(typing.get_args(literal)) == set(implemented), (literal, implemented)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.loss.name=bcee", "train.loss.name"),
        ("train.optimizer.name=adamm", "train.optimizer.name"),
        ("train.scheduler.name=step", "train.scheduler.name"),
        ("train.precision=16", "train.precision"),
        ("train.loggers=[csv,mlflw]", "train.loggers"),
        ("train.stages=[{loss: {name: focall}}]", "train.stages"),
        ("data.cache.resize_policy=pad", "data.cache.resize_policy"),
        ("data.augment.eval_mode=crop", "data.augment.eval_mode"),
        ("data.split.method=official_split", "data.split.method"),
        ("data.no_finding=drop", "data.no_finding"),
        ("data.views=[PA,XX]", "data.views"),
        ("model.head.type=transformer", "model.head.type"),
        ("model.channel_adapt=mean", "model.channel_adapt"),
        ("model.pretrained.source=imagenet", "model.pretrained.source"),
    ],
)
def test_a_choice_outside_the_schema_is_refused_naming_the_override(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(PNEUMONIA, [override])
    message = str(error.value)
    assert message.startswith(f"invalid override {override}")
    assert field in message and "expected one of" in message
    assert str(PNEUMONIA) not in message, "an override typo is not the YAML file's fault"
    assert "\n" not in message


def test_a_bad_value_in_the_yaml_file_names_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  loss: {name: bcee}\n")
    with pytest.raises(ConfigError, match=rf"invalid config {recipe}: train\.loss\.name: .*'bcee'"):
        load_config(recipe)
    recipe.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"invalid config {recipe}"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.arch=resnet5O", r"model\.arch: 'resnet5O' is not a timm model; did you mean .*resnet50"),
        ("data.split.val_fraction=1.2", r"data\.split\.val_fraction must be in \[0, 1\)"),
        ("data.split.test_fraction=-0.1", r"data\.split\.test_fraction must be in \[0, 1\)"),
        ("train.optimizer.lr=0", r"train\.optimizer\.lr must be positive"),
        ("train.optimizer.lr=-1e-3", r"train\.optimizer\.lr must be positive"),
        ("data.cache.image_size=0", r"data\.cache\.image_size must be positive"),
        ("data.loader.batch_size=0", r"data\.loader\.batch_size must be positive"),
        ("data.augment.crop_size=512", r"data\.augment\.crop_size \(512\) exceeds data\.cache\.image_size"),
        ("model.drop_rate=1.0", r"model\.drop_rate must be in \[0, 1\)"),
        ("train.ema_decay=1.0", r"train\.ema_decay must be in \[0, 1\)"),
        ("train.limit_train_batches=1.5", r"train\.limit_train_batches=1\.5: a float is a fraction"),
        ("train.limit_val_batches=-2", r"train\.limit_val_batches must be >= 0 batches"),
        ("data.sources.0.adapter=kermany", r"data\.sources\.0\.adapter: unknown adapter 'kermany'"),
        ("train.monitor=auroc", r"train\.monitor must be a validation metric"),
    ],
)
def test_ranges_and_names_are_checked_when_the_config_loads(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PNEUMONIA, [override])


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.optimizer.lr=0", "model.arch=no_such_net", "data.split.val_fraction=2"])
    message = str(error.value)
    assert "train.optimizer.lr" in message and "model.arch" in message and "val_fraction" in message


def test_limit_batches_an_integer_is_a_number_of_batches(tmp_path: Path) -> None:
    one_batch = load_config(None, ["train.limit_train_batches=1"]).train
    whole_epoch = load_config(None, ["train.limit_train_batches=1.0"]).train
    assert one_batch.limit_train_batches == 1 and isinstance(one_batch.limit_train_batches, int)
    assert isinstance(whole_epoch.limit_train_batches, float)
    config = load_config(None, ["train.limit_train_batches=1", "train.limit_val_batches=0.25"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.train.limit_train_batches == 1 and isinstance(again.train.limit_train_batches, int)
    assert again.train.limit_val_batches == 0.25

    from cxrkit.training.run import build_trainer

    trainer = build_trainer(
        load_config(None, ["train.limit_train_batches=1", "train.accelerator=cpu"]), tmp_path, []
    )
    assert trainer.limit_train_batches == 1 and isinstance(trainer.limit_train_batches, int)


def test_stages_decide_the_epochs_and_the_saved_config_says_so(tmp_path: Path) -> None:
    config = load_config(PNEUMONIA)  # stages of 2 + 1 epochs
    assert config.train.max_epochs == 3
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["max_epochs"] == 3
    assert load_config(tmp_path / "config.yaml").train.max_epochs == 3
    assert load_config(PNEUMONIA, ["train.max_epochs=3"]).train.max_epochs == 3
    with pytest.raises(ConfigError, match=r"train\.max_epochs=1 conflicts with train\.stages \(2\+1 = 3"):
        load_config(PNEUMONIA, ["train.max_epochs=1"])
    shorter = load_config(PNEUMONIA, ["train.stages.0.epochs=1"])
    assert shorter.train.max_epochs == 2
    assert load_config(None).train.max_epochs == train_config.DEFAULT_MAX_EPOCHS
    with pytest.raises(ConfigError, match=r"train\.stages\.0\.epochs must be >= 1"):
        load_config(PNEUMONIA, ["train.stages.0.epochs=0"])


def test_a_run_saved_before_max_epochs_was_derived_still_loads(tmp_path: Path) -> None:
    from cxrkit.training.run import load_run_config

    saved = yaml.safe_load(Path(PNEUMONIA).read_text())
    saved["train"]["max_epochs"] = 10  # older runs saved the unused default beside their stages
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"conflicts with train\.stages"):
        load_config(tmp_path / "config.yaml")  # as a recipe for a new run it is refused
    stages = sum(stage["epochs"] for stage in saved["train"]["stages"])
    assert load_run_config(tmp_path).train.max_epochs == stages  # as a record, the stages are what ran


def test_the_saved_config_holds_plain_strings(tmp_path: Path) -> None:
    config = load_config(PNEUMONIA, ["data.augment.eval_mode=center_crop", "train.precision=bf16-mixed"])
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # safe_load: plain YAML types only
    assert saved["data"]["augment"]["eval_mode"] == "center_crop"
    assert saved["train"]["precision"] == "bf16-mixed"
    assert saved["model"]["pretrained"]["source"] == "efficientnet-lite"
    assert type(config.train.loss.name) is str and config.train.loss.name == "bce"


def test_eval_mode_reaches_the_preprocessing() -> None:
    from cxrkit.data.transforms import PreprocessSpec

    data = load_config(PNEUMONIA, ["data.augment.eval_mode=center_crop"]).data
    assert PreprocessSpec.from_data_config(data).eval_mode == "center_crop"
    assert PreprocessSpec.from_data_config(load_config(PNEUMONIA).data).eval_mode == "resize"


def test_every_recipe_loads_and_validates() -> None:
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(recipe)
        assert config.train.max_epochs >= 1, recipe


def test_cli_refuses_a_bad_config_in_one_line_before_touching_data(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for override in ("train.optimizer.name=adamm", "model.arch=resnet5O", "train.loss.name=bcee"):
        result = CliRunner().invoke(cli, ["train", "-c", str(PNEUMONIA), f"output_dir={out}", override])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: invalid "), result.output
        assert not out.exists(), "refused before the run folder is written"
