"""Hyperparameter search: search spaces, studies end to end, failed and pruned trials, MLflow nesting, CLI.

Studies train either the real pipeline (``cxr tune`` on a few real pneumonia JPEGs downscaled to 32 px, timm's
~100k-parameter ``test_efficientnet``) or, where only the study logic is tested, the synthetic data module and
network of ``test_training.py`` through the objective's ``runner`` hook. ``test_tuning_storage.py`` covers
several worker processes, resume after a kill and PostgreSQL.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from omegaconf import OmegaConf
from optuna.trial import TrialState
from PIL import Image

from cxrkit.cli.main import cli
from cxrkit.config import load_config
from cxrkit.training import run
from cxrkit.tuning.space import SpaceError, load_space, parse_space, sample, validate_space
from cxrkit.tuning.study import build_pruner, build_sampler, load_base_config, run_study

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_training import SyntheticDataModule, TinyNet, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks run much faster on one thread, above all on a busy shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_runner(config, callbacks, mlflow_tags):
    """Train a trial on the synthetic data module (the study logic is what these tests look at)."""
    return run.fit(
        config,
        SyntheticDataModule(seed=int(config.seed)),
        TinyNet,
        config.output_dir,
        callbacks=callbacks,
        mlflow_tags=mlflow_tags,
    )


def synthetic_base(tmp_path: Path, *overrides: str):
    return tiny_config(tmp_path, "train.max_epochs=2", "train.scheduler.name=none", *overrides)


def by_state(study: optuna.Study) -> dict[str, list[optuna.trial.FrozenTrial]]:
    states: dict[str, list] = {}
    for trial in study.trials:
        states.setdefault(trial.state.name, []).append(trial)
    return states


# ---- search spaces -----------------------------------------------------------------------------------------
def test_shipped_spaces_fit_their_configs():
    seed = load_space(REPO / "configs/spaces/seed_space.yaml")
    validate_space(seed, load_base_config(REPO / "configs/pneumonia_lite0_offline.yaml"))
    assert seed.fixed == {"model.head.type": "mlp"}
    params = {param.path: param for param in seed.params}
    assert params["train.optimizer.name"].choices == ("rmsprop", "adam", "sgd")
    lr = params["train.optimizer.lr"]
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-1, True)
    assert params["data.loader.batch_size"].choices == (8, 16)
    assert (params["model.head.hidden_layers"].low, params["model.head.hidden_layers"].high) == (1, 5)
    assert (params["model.head.hidden_units"].low, params["model.head.hidden_units"].high) == (64, 512)
    assert params["model.head.dropout"].choices == (0.1, 0.3, 0.5)
    assert seed.settings.sampler == "tpe" and seed.settings.metric == "val/auroc_mean"

    nih = load_space(REPO / "configs/spaces/nih_best.yaml")
    validate_space(nih, load_base_config(REPO / "configs/nih_lite0_offline.yaml"))
    assert {
        "train.optimizer.lr",
        "train.optimizer.weight_decay",
        "model.drop_path_rate",
        "train.ema_decay",
        "data.augment.crop_size",
        "data.augment.brightness",
    } <= set(nih.paths)
    assert nih.settings.pruner == "hyperband"


def test_sampling_follows_types_log_steps_conditions_and_list_choices():
    space = parse_space(
        {
            "params": {
                "train.optimizer.name": {"type": "categorical", "choices": ["adam", "sgd"]},
                "train.optimizer.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                "train.optimizer.momentum": {
                    "type": "float",
                    "low": 0.5,
                    "high": 0.9,
                    "when": {"train.optimizer.name": "sgd"},
                },
                "model.head.hidden_units": {"type": "int", "low": 64, "high": 512, "step": 64},
                "model.head.dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
                "data.augment.scale_range": {"type": "categorical", "choices": [[0.9, 1.1], [0.8, 1.2]]},
            },
            "fixed": {"model.head.type": "mlp"},
            "study": {"pruner": "none"},
        }
    )
    base = load_base_config(None)
    validate_space(space, base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    lrs, names = [], set()
    for _ in range(40):
        trial = study.ask()
        params, config = sample(space, trial, base)
        assert config.model.head.type == "mlp"
        assert (
            config.train.optimizer.lr == params["train.optimizer.lr"]
            and 1e-5 <= config.train.optimizer.lr <= 0.1
        )
        assert ("train.optimizer.momentum" in params) == (config.train.optimizer.name == "sgd")
        if config.train.optimizer.name == "adam":
            assert config.train.optimizer.momentum == 0.9  # the schema default, untouched
        assert config.model.head.hidden_units % 64 == 0
        assert math.isclose(config.model.head.dropout * 10, round(config.model.head.dropout * 10))
        assert list(config.data.augment.scale_range) in ([0.9, 1.1], [0.8, 1.2])
        assert space.decode(trial.params)["data.augment.scale_range"] == list(config.data.augment.scale_range)
        lrs.append(params["train.optimizer.lr"])
        names.add(config.train.optimizer.name)
        study.tell(trial, 0.5)
    assert names == {"adam", "sgd"}
    decades = {math.floor(math.log10(lr)) for lr in lrs}
    assert len(decades) >= 3, "log-uniform draws should spread over the decades"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"train.optimizer.lrr": {"type": "float", "low": 0.1, "high": 1}},
            "unknown config field 'train.optimizer.lrr'",
        ),
        (
            {"trian.max_epochs": {"type": "int", "low": 1, "high": 3}},
            "unknown config field 'trian.max_epochs'",
        ),
        ({"train.max_epochs": {"type": "float", "low": 0.5, "high": 3}}, "train.max_epochs"),
        ({"data.sources.3.root": {"type": "categorical", "choices": ["a"]}}, "data.sources is a list of 1"),
        ({"train.optimizer.lr": {"type": "uniform", "low": 0.1, "high": 1}}, "unknown type 'uniform'"),
        (
            {"train.optimizer.lr": {"type": "float", "low": 0, "high": 1, "log": True}},
            "log scale needs low > 0",
        ),
        ({"train.optimizer.lr": {"type": "float", "low": 1, "high": 0.1}}, "greater than high"),
        ({"train.optimizer.lr": 0.1}, "put constant values under 'fixed:'"),
        ({"train.optimizer.name": {"type": "categorical", "choices": []}}, "non-empty list"),
        (
            {"train.optimizer.lr": {"type": "float", "low": 0.1, "high": 1, "when": {"train.nope": 1}}},
            "unknown config field 'train.nope'",
        ),
    ],
)
def test_invalid_spaces_name_the_problem(params, message):
    with pytest.raises(SpaceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_space(parse_space({"params": params}), load_base_config(None))


def test_invalid_space_files_and_settings(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    lr = {"train.optimizer.lr": {"type": "float", "low": 0.1, "high": 1}}
    with pytest.raises(SpaceError, match=r"study\.pruner: .*expected one of"):
        parse_space({"params": lr, "study": {"pruner": "asha"}})
    with pytest.raises(SpaceError, match="unknown section"):
        parse_space({"params": lr, "sttudy": {}})
    with pytest.raises(SpaceError, match="both fixed and searched"):
        parse_space({"params": lr, "fixed": {"train.optimizer.lr": 0.1}})
    with pytest.raises(SpaceError, match=r"fixed 'model\.head\.kind'"):
        validate_space(
            parse_space({"params": lr, "fixed": {"model.head.kind": "mlp"}}), load_base_config(None)
        )
    free_form = parse_space(
        {"params": {"model.timm_kwargs.img_size": {"type": "categorical", "choices": [64]}}}
    )
    validate_space(free_form, load_base_config(None))  # free-form dicts accept new keys


def test_samplers_reseed_per_trial_so_a_resumed_study_draws_like_an_uninterrupted_one():
    space = parse_space(
        {
            "study": {"seed": 11, "n_startup_trials": 3},
            "params": {
                "train.optimizer.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                "model.head.hidden_units": {"type": "int", "low": 64, "high": 512, "step": 64},
                "train.optimizer.name": {"type": "categorical", "choices": ["adam", "sgd", "rmsprop"]},
            },
        }
    )
    base = load_base_config(None)

    def objective(trial):
        params, _ = sample(space, trial, base)
        return -abs(math.log10(params["train.optimizer.lr"]) + 3) + params["model.head.hidden_units"] / 1000

    def draws(study):
        return [t.params for t in study.trials]

    uninterrupted = optuna.create_study(direction="maximize", sampler=build_sampler(space.settings))
    uninterrupted.optimize(objective, n_trials=7)
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(
        storage=storage, study_name="s", direction="maximize", sampler=build_sampler(space.settings)
    )
    first.optimize(objective, n_trials=4)
    resumed = optuna.load_study(storage=storage, study_name="s", sampler=build_sampler(space.settings))
    resumed.optimize(objective, n_trials=3)
    assert draws(resumed) == draws(uninterrupted)
    assert len({p["train.optimizer.lr"] for p in draws(resumed)}) == 7


def test_pruner_settings():
    lr = {"train.optimizer.lr": {"type": "float", "low": 0.1, "high": 1}}
    base = load_base_config(None, ["train.max_epochs=9"])
    hyperband = parse_space({"params": lr, "study": {"pruner": "hyperband", "min_epochs": 2}})
    pruner = build_pruner(hyperband.settings, base, hyperband)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource) == (2, 9)
    epochs = parse_space(
        {
            "params": {**lr, "train.max_epochs": {"type": "int", "low": 2, "high": 9}},
            "study": {"pruner": "hyperband"},
        }
    )
    assert build_pruner(epochs.settings, base, epochs)._max_resource == "auto"
    median = parse_space({"params": lr, "study": {"pruner_warmup_epochs": 3}})
    assert build_pruner(median.settings, base, median)._n_warmup_steps == 2  # epochs 0-2 always run
    assert isinstance(
        build_pruner(parse_space({"params": lr, "study": {"pruner": "none"}}).settings, base, median),
        optuna.pruners.NopPruner,
    )


# ---- studies -----------------------------------------------------------------------------------------------
def tiny_pneumonia(root: Path, source: Path, per_class: int = 16) -> Path:
    """The first ``per_class`` real images of each class, grayscale, downscaled to 32 px."""
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / "train" / label).glob("*.jpeg"))[:per_class]:
            Image.open(path).convert("L").resize((32, 32), Image.BILINEAR).save(root / label / path.name)
    return root


def tiny_pneumonia_config(tmp_path: Path, data_root: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
name: tiny-pneumonia
seed: 0
output_dir: {tmp_path / "runs" / "tiny-pneumonia"}
data:
  sources: [{{adapter: folder, root: {data_root}}}]
  no_finding: zeros
  split: {{method: random, val_fraction: 0.35, test_fraction: 0.15, seed: 1}}
  cache: {{dir: {tmp_path / "cache"}, image_size: 32}}
  augment: {{crop_size: 32, rotation_degrees: 5}}
  loader: {{batch_size: 8}}
model: {{arch: test_efficientnet, pretrained: {{source: none}}}}
train:
  max_epochs: 2
  loggers: [csv]
  accelerator: cpu
  devices: "1"
  scheduler: {{name: none}}
  log_every_n_steps: 1
""")
    return config


@pytest.mark.slow
@pytest.mark.shared_data
def test_cli_tune_writes_a_best_config_that_trains(tmp_path, pneumonia_root):
    config = tiny_pneumonia_config(tmp_path, tiny_pneumonia(tmp_path / "pneumonia", pneumonia_root))
    space = tmp_path / "space.yaml"
    space.write_text("""
study: {seed: 1, n_startup_trials: 2, pruner: none}
fixed: {model.head.type: mlp}
params:
  train.optimizer.name: {type: categorical, choices: [adam, sgd]}
  train.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  model.head.hidden_units: {type: int, low: 8, high: 32, step: 8}
""")
    study_dir = tmp_path / "study"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "tune",
            "-c",
            str(config),
            "--space",
            str(space),
            "--trials",
            "3",
            "--study-dir",
            str(study_dir),
            "--study-name",
            "tiny",
            "train.limit_train_batches=3",  # a search shortcut: not in the best config
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "best config:" in result.output

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and all(0 <= t.value <= 1 for t in complete)
    assert len({t.params["train.optimizer.lr"] for t in complete}) == 3
    best = study.best_trial
    metrics = pd.read_csv(Path(best.user_attrs["run_dir"]) / "metrics.csv")
    assert best.value == pytest.approx(metrics["val/auroc_mean"].max())

    best_config = load_config(study_dir / "best_config.yaml")
    assert best_config.train.optimizer.name == best.params["train.optimizer.name"]
    assert best_config.train.optimizer.lr == pytest.approx(best.params["train.optimizer.lr"])
    assert best_config.model.head.hidden_units == best.params["model.head.hidden_units"]
    assert best_config.model.head.type == "mlp"
    assert best_config.data.cache.dir == str(tmp_path / "cache"), (
        "the final training reuses the trials' cache"
    )
    assert best_config.output_dir != str(study_dir / "trials")
    assert best_config.train.limit_train_batches == 1.0
    assert "limit_train_batches: 1.0" in (study_dir / "best_config.yaml").read_text()
    assert OmegaConf.load(study_dir / "base_config.yaml").train.limit_train_batches == 3
    other_checkpoints = [
        t
        for t in study.trials
        if t.number != best.number and (Path(t.user_attrs["run_dir"]) / "checkpoints").exists()
    ]
    assert not other_checkpoints, "only the best trial keeps its checkpoints"

    report = study_dir / "report"
    html = (report / "report.html").read_text()
    for name in ("optimization_history", "learning_curves", "param_importances", "parallel_coordinates"):
        assert (report / f"{name}.png").stat().st_size > 1000, name
    assert "Best trial #" in html and "train.optimizer.lr" in html
    trials = pd.read_csv(report / "trials.csv")
    assert trials["state"].tolist() == ["COMPLETE"] * 3 and trials["epochs"].tolist() == [2, 2, 2]

    trained = runner.invoke(
        cli,
        ["train", "-c", str(study_dir / "best_config.yaml"), "train.max_epochs=1"],
        catch_exceptions=False,
    )
    assert trained.exit_code == 0, trained.output
    assert (Path(best_config.output_dir) / "checkpoints" / "best.ckpt").is_file()

    again = runner.invoke(
        cli,
        [
            "tune",
            "-c",
            str(config),
            "-s",
            str(space),
            "-n",
            "3",
            "--study-dir",
            str(study_dir),
            "--study-name",
            "tiny",
        ],
        catch_exceptions=False,
    )
    assert again.exit_code == 0, again.output
    assert (
        len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}").trials) == 3
    )


def test_cli_rejects_unknown_fields_and_prints_the_workers_note(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.optimizer.lrr: {type: float, low: 0.001, high: 0.1}\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["tune", "-s", str(space), "-n", "2", f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2 and "train.optimizer.lrr" in result.output

    space.write_text("params:\n  train.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n")
    storage = "postgresql+psycopg2://optuna:secret@db.example.org/cxr"
    note = runner.invoke(
        cli,
        [
            "tune",
            "-s",
            str(space),
            "-n",
            "40",
            "--storage",
            storage,
            "--study-name",
            "s1",
            "--workers-note",
            "train.max_epochs=3",
        ],
    )
    assert note.exit_code == 0, note.output
    assert "--study-name s1" in note.output and "train.max_epochs=3" in note.output and "-n 40" in note.output
    assert "secret" not in note.output and "optuna:***@db.example.org" in note.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path):
    space = parse_space(
        {
            "study": {"sampler": "random", "seed": 4, "pruner": "none"},
            "params": {
                "train.optimizer.momentum": {
                    "type": "categorical",
                    "choices": [0.9, 1.5],
                },  # 1.5: refused by the config's range check
                "train.optimizer.lr": {
                    "type": "categorical",
                    "choices": [0.01, 1.0e30],
                },  # 1e30: the loss diverges
            },
        }
    )
    result = run_study(
        synthetic_base(tmp_path), space, 4, study_dir=tmp_path / "study", runner=synthetic_runner
    )
    states = by_state(result.study)
    errors = [t.user_attrs["error"] for t in states.get("FAIL", [])]
    assert any("train.optimizer.momentum must be in [0, 1)" in error for error in errors), errors
    assert any("FloatingPointError: non-finite training loss" in error for error in errors), errors
    for trial in states["FAIL"]:
        assert trial.params["train.optimizer.momentum"] == 1.5 or trial.params["train.optimizer.lr"] > 1
    assert len(states["COMPLETE"]) >= 1
    assert all(
        t.params == {"train.optimizer.momentum": 0.9, "train.optimizer.lr": 0.01} for t in states["COMPLETE"]
    )
    assert result.best_config is not None
    trials = pd.read_csv(result.report.parent / "trials.csv")
    assert trials.loc[trials["state"] == "FAIL", "error"].str.len().gt(0).all()
    assert len(result.study.trials) == 4, "each worker stops after --trials attempts even if some fail"


@pytest.mark.slow
def test_median_pruning_stops_hopeless_trials_early(tmp_path):
    space = parse_space(
        {
            "study": {
                "sampler": "random",
                "seed": 0,
                "pruner": "median",
                "pruner_startup_trials": 1,
                "pruner_warmup_epochs": 1,
            },
            "params": {"train.optimizer.lr": {"type": "categorical", "choices": [0.01, 1e-12]}},
        }
    )  # lr 1e-12: a hopeless trial (a zero lr is refused by the config)
    base = synthetic_base(tmp_path, "train.max_epochs=3", "train.optimizer.name=adam")
    result = run_study(
        base, space, 5, study_dir=tmp_path / "study", runner=synthetic_runner, write_report=False
    )
    states = by_state(result.study)
    assert states.get("PRUNED"), "some lr=1e-12 trial should have been pruned"
    for trial in states["PRUNED"]:
        assert trial.params["train.optimizer.lr"] == 1e-12
        assert trial.user_attrs["epochs"] < 3 and len(trial.intermediate_values) < 3
    good = [t for t in result.study.trials if t.params["train.optimizer.lr"] == 0.01]
    assert good and all(t.state == TrialState.COMPLETE and t.user_attrs["epochs"] == 3 for t in good)
    assert result.study.best_trial.params["train.optimizer.lr"] == 0.01


@pytest.mark.slow
def test_trials_are_mlflow_runs_nested_under_the_study_run(tmp_path):
    from mlflow import MlflowClient

    space = parse_space(
        {
            "study": {"seed": 2, "pruner": "none"},
            "params": {"train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        }
    )
    base = synthetic_base(tmp_path, "train.loggers=[csv,mlflow]")
    result = run_study(base, space, 2, study_dir=tmp_path / "study", runner=synthetic_runner)
    uri = f"sqlite:///{(tmp_path / 'study' / 'mlruns' / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["cxrkit.role"] == "optuna-study" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(result.study.best_value)
    assert "space.train.optimizer.lr" in parent.data.params
    parent_artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "report"} <= parent_artifacts

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        trial = result.study.trials[int(child.data.tags["optuna.trial_number"])]
        assert float(child.data.params["train.optimizer.lr"]) == pytest.approx(
            trial.params["train.optimizer.lr"]
        )
        assert child.data.metrics["objective"] == pytest.approx(trial.value)
        history = client.get_metric_history(child.info.run_id, "val/auroc_mean")
        assert len(history) == 2, "one validation AUROC per epoch, logged by the trainer's MLFlowLogger"
        assert [item.path for item in client.list_artifacts(child.info.run_id)] == ["config.yaml"]
        assert child.info.status == "FINISHED"
        assert child.info.artifact_uri.startswith((tmp_path / "study" / "mlruns").resolve().as_uri())


def test_cli_tune_puts_the_study_where_output_dir_says(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n")
    runner = CliRunner()
    args = ["tune", "-s", str(space), "-n", "2", "--workers-note"]
    chosen = runner.invoke(cli, [*args, f"output_dir={tmp_path / 'my-study'}"])
    assert chosen.exit_code == 0, chosen.output
    assert f"study directory {(tmp_path / 'my-study').resolve()}" in chosen.output
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'from-file'}\n")
    from_file = runner.invoke(cli, [*args, "-c", str(recipe)])
    assert f"study directory {(tmp_path / 'from-file').resolve()}" in from_file.output
    explicit = runner.invoke(cli, [*args, "-c", str(recipe), "--study-dir", str(tmp_path / "s")])
    assert f"study directory {(tmp_path / 's').resolve()}" in explicit.output
    default = runner.invoke(cli, args)
    assert f"study directory {Path('runs/studies/run-tune').resolve()}" in default.output
