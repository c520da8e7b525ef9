"""Every ``cxr`` error is one line (``-v`` adds the traceback); logs print each message once, without
third-party advertising; option names agree across commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrkit.cli.logs import setup_logging
from cxrkit.cli.main import cli

REPO = Path(__file__).resolve().parents[1]
PNEUMONIA = REPO / "configs" / "pneumonia_lite0_offline.yaml"


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logging.captureWarnings(False)  # setup_logging turns it on; start each test from the default
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def error_lines(output: str) -> list[str]:
    return [line for line in output.strip().splitlines() if line.strip()]


def test_an_unexpected_error_is_one_line_and_verbose_shows_the_traceback(monkeypatch, tmp_path) -> None:
    def broken(config, resume=None):
        raise TypeError("unsupported operand")

    monkeypatch.setattr("cxrkit.training.run.train", broken)
    args = ["train", "-c", str(PNEUMONIA), f"output_dir={tmp_path / 'run'}"]
    result = invoke(*args)
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        "Error: TypeError: unsupported operand (run with -v for the traceback)"
    ]
    verbose = invoke("-v", *args)
    assert verbose.exit_code == 1
    assert "Traceback (most recent call last)" in verbose.output
    assert verbose.output.strip().endswith("Error: TypeError: unsupported operand")


def test_a_known_error_is_its_message_on_one_line(monkeypatch, tmp_path) -> None:
    def missing(config, resume=None):
        raise FileNotFoundError("checkpoint not found: runs/x/checkpoints/last.ckpt")

    monkeypatch.setattr("cxrkit.training.run.train", missing)
    result = invoke("train", "-c", str(PNEUMONIA), f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 1
    assert error_lines(result.output) == ["Error: checkpoint not found: runs/x/checkpoints/last.ckpt"]


def test_a_missing_extra_names_the_extra_to_install(monkeypatch, tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n")
    for module in [name for name in sys.modules if name == "optuna" or name.startswith("optuna.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the [tune] extra were not installed
    result = invoke("tune", "-s", str(space), "-n", "1")
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        "Error: this needs the optional package 'optuna': pip install 'cxrkit[tune]'"
    ]


def test_require_names_the_extra() -> None:
    from cxrkit.extras import EXTRAS, MissingExtraError, missing_extra, require

    with pytest.raises(MissingExtraError, match=r"ONNX export needs .*pip install 'cxrkit\[onnx\]'"):
        try:
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        except ImportError as error:
            raise missing_extra(error, "ONNX export") from error
    assert require("json").dumps([]) == "[]"
    assert set(EXTRAS.values()) <= {"serve", "tune", "track", "onnx", "download", "weights"}
    unrelated = ModuleNotFoundError("No module named 'numpyy'", name="numpyy")
    assert missing_extra(unrelated) is unrelated


def test_the_extras_are_declared_in_the_package_metadata() -> None:
    import tomllib

    from cxrkit.extras import EXTRAS

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS.values()) | {"all", "dev"} == set(extras)
    core = " ".join(project["dependencies"])
    for optional in ("optuna", "mlflow", "fastapi", "onnx", "datasets", "kagglehub", "efficientnet"):
        assert optional not in core, optional
    assert all("==" not in requirement for requirement in project["dependencies"]), "ranges, not pins"
    pins = (REPO / "constraints.txt").read_text()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def test_test_takes_checkpoint_like_every_other_command() -> None:
    for command in ("test", "evaluate", "explain", "export", "compare"):
        assert "--checkpoint" in invoke(command, "--help").output, command
    assert "No such option '--ckpt'" in invoke("test", "runs/x", "--ckpt", "last").output


@pytest.mark.parametrize("shard", ["0/2", "3/2", "x", "1/0"])
def test_shards_count_from_one(shard: str) -> None:
    result = invoke("data", "prepare", "-c", str(PNEUMONIA), "--shard", shard)
    assert result.exit_code == 2 and "--shard" in result.output


def test_predict_documents_relative_paths_in_csv_files() -> None:
    help_text = " ".join(invoke("predict", "--help").output.split())
    assert "relative path inside a CSV is relative to the CSV file's folder" in help_text


def test_the_evaluation_folder_follows_the_threshold_method(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from cxrkit.evaluation.run import default_out_dir

    run = SimpleNamespace(kind="run", path=tmp_path, checkpoint="best", operating_points=None)
    folders = {
        default_out_dir(run, "test"),
        default_out_dir(run, "test", "f1"),
        default_out_dir(run, "test", "sensitivity", 0.95),
        default_out_dir(run, "test", "sensitivity", 0.9),
    }
    assert len(folders) == 4, "a second threshold method never replaces the first report"
    assert default_out_dir(run, "test") == tmp_path / "evaluation" / "test-best"
    assert default_out_dir(run, "test", "f1") == tmp_path / "evaluation" / "test-best-f1"


def test_lightning_messages_print_once_without_tips(capsys) -> None:
    library = logging.getLogger("lightning.pytorch")
    own = logging.StreamHandler(sys.stderr)  # what Lightning attaches when imported before logging is set up
    library.addHandler(own)
    library.propagate = False
    setup_logging(logging.INFO)
    try:
        logging.getLogger("lightning.pytorch.trainer").info("GPU available: False")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info(
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger"
        )
        logging.getLogger("cxrkit.training.run").info("run finished")
    finally:
        library.removeHandler(own)
    err = capsys.readouterr().err
    assert err.count("GPU available: False") == 1
    assert "INFO GPU available: False" in err and "INFO run finished" in err
    assert "Tip" not in err


def test_a_library_imported_after_setup_cannot_add_its_own_console_handler() -> None:
    from cxrkit.cli.logs import _root_printed

    library = _root_printed("cxrkit-test-library")  # as "lightning" is before Lightning's lazy import
    library.addHandler(logging.StreamHandler())  # what `import lightning` does
    library.addHandler(logging.NullHandler())
    assert [type(h) for h in library.handlers] == [logging.NullHandler]


def test_quiet_keeps_warnings_only() -> None:
    assert invoke("-q", "data", "--help").exit_code == 0
    assert logging.getLogger().level == logging.WARNING
    assert invoke("-v", "data", "--help").exit_code == 0
    assert logging.getLogger().level == logging.DEBUG
    result = invoke("-q", "-v", "data", "--help")
    assert result.exit_code == 2 and "not both" in result.output


def test_the_same_option_has_the_same_name_in_every_command() -> None:
    import click

    def commands(group: click.Group, prefix: str = ""):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    names = {"out": ["--out", "-o"], "checkpoint": ["--checkpoint"], "config_path": ["--config", "-c"]}
    for path, command in commands(cli):
        for param in command.params:
            if isinstance(param, click.Option) and param.name in names:
                assert param.opts == names[param.name], (path, param.opts)


def test_only_the_known_third_party_warning_is_filtered(capsys) -> None:
    import warnings

    with warnings.catch_warnings():
        setup_logging(logging.INFO)
        text = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`"
        for module in ("lightning.pytorch.utilities._pytree", "cxrkit.somewhere"):
            warnings.warn_explicit(text, FutureWarning, "_pytree.py", 21, module=module)
        warnings.warn_explicit("something else is deprecated", FutureWarning, "x.py", 1, module="lightning.x")
    err = capsys.readouterr().err
    assert err.count("LeafSpec") == 1, "filtered where Lightning raises it, not elsewhere"
    assert "something else is deprecated" in err


def test_a_command_error_of_several_lines_is_shown_on_one(monkeypatch, tmp_path) -> None:
    from cxrkit import demo

    def nothing(*args, **kwargs):
        raise demo.NoDataError("no chest X-ray data found.\nGive data with `cxr demo --data PATH`")

    monkeypatch.setattr(demo, "run_demo", nothing)
    result = invoke("demo", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        "Error: no chest X-ray data found. Give data with `cxr demo --data PATH`"
    ]


@pytest.mark.parametrize(
    ("stop", "line"),
    [
        (KeyboardInterrupt(), "Error: interrupted; stopped before it finished"),
        (
            KeyboardInterrupt("resume with `cxr train --resume runs/x`"),
            "Error: interrupted; resume with `cxr train --resume runs/x`",
        ),
    ],
)
def test_an_interrupted_command_ends_with_one_error_line(monkeypatch, tmp_path, stop, line) -> None:
    def interrupted(config, resume=None):
        raise stop

    monkeypatch.setattr("cxrkit.training.run.train", interrupted)
    result = invoke("train", "-c", str(PNEUMONIA), f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 1
    assert error_lines(result.output) == [line]  # not Click's bare "Aborted!"


def test_shared_option_choices_are_the_library_ones() -> None:
    from cxrkit.cli.common import BACKENDS, THRESHOLD_METHODS
    from cxrkit.data.manifest import SPLITS
    from cxrkit.evaluation.thresholds import METHODS
    from cxrkit.inference.predictor import BACKENDS as PREDICTOR_BACKENDS

    assert BACKENDS == PREDICTOR_BACKENDS
    assert set(THRESHOLD_METHODS) == set(METHODS) - {"fixed"}
    for command in ("evaluate", "compare", "explain"):
        help_text = " ".join(invoke(command, "--help").output.split())
        assert f"--split [{'|'.join(SPLITS)}]" in help_text, command
