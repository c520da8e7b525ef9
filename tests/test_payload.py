"""Nothing executes from a file: checkpoints whose pickle would run code are refused, in one line, unrun.

A payload checkpoint is planted where each command reads one (``cxr export --checkpoint``, ``cxr test``,
``cxr train --resume``, loading a run for evaluation); its ``__reduce__`` would create a marker file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cxrkit.cli.main import cli
from cxrkit.models.checkpoint import CheckpointError, load_checkpoint, load_training_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import invoke, make_folder_dataset, write_cli_config


class ShellPayload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload(ShellPayload):
    """Unpickling this runs Python code that creates ``marker``."""

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path: Path, marker: Path, kind: str, genuine: Path | None = None) -> Path:
    """Write a payload checkpoint at ``path``: a real checkpoint with a payload value (``torch``, zip format),
    or a bare pickle of the payload (``pickle``)."""
    if kind == "pickle":
        path.write_bytes(pickle.dumps(ShellPayload(marker)))
    else:
        checkpoint = load_checkpoint(genuine) if genuine else {"state_dict": {}}
        checkpoint["hyper_parameters"] = {"config": ExecPayload(marker)}
        torch.save(checkpoint, path)
    return path


def refusal(result, path: Path) -> str:
    """The one error line of a failed command, checked to name ``path`` and say it was refused."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert str(path) in errors[0] and "refused to load" in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `cxr train` run (timm's test ResNet, one epoch on a small image folder)."""
    root = tmp_path_factory.mktemp("payload")
    data_root = make_folder_dataset(root / "pneumonia", per_class=12)
    invoke("train", "-c", str(write_cli_config(root, data_root, name="genuine", max_epochs=1)))
    return root / "runs" / "genuine"


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(params=["torch", "pickle"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_genuine_checkpoints_are_plain_data(trained: Path) -> None:
    for name in ("best", "last"):
        checkpoint = load_training_checkpoint(trained / "checkpoints" / f"{name}.ckpt")
        assert checkpoint["state_dict"] and isinstance(checkpoint["epoch"], int)


def test_export_refuses_a_payload_checkpoint(run_dir: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    evil = plant(tmp_path / "evil.ckpt", marker, kind, run_dir / "checkpoints" / "best.ckpt")
    out = tmp_path / "model.cxr"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--checkpoint", str(evil), "--out", str(out)])
    refusal(result, evil)
    assert not marker.exists(), "the payload ran"
    assert not out.exists()


def test_test_refuses_a_payload_checkpoint(run_dir: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    best = run_dir / "checkpoints" / "best.ckpt"
    plant(best, marker, kind, best)
    result = CliRunner().invoke(cli, ["test", str(run_dir)])
    refusal(result, best)
    assert not marker.exists(), "the payload ran"
    assert not (run_dir / "test_metrics_best.json").exists()


def test_resume_refuses_a_payload_checkpoint(run_dir: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    last = run_dir / "checkpoints" / "last.ckpt"
    plant(last, marker, kind, last)
    metrics = (run_dir / "metrics.csv").read_bytes()
    result = CliRunner().invoke(cli, ["train", "--resume", str(run_dir)])
    refusal(result, last)
    assert not marker.exists(), "the payload ran"
    assert (run_dir / "metrics.csv").read_bytes() == metrics, "a refused resume must change nothing"


def test_loading_a_run_for_evaluation_refuses_a_payload(run_dir: Path, tmp_path: Path, kind: str) -> None:
    from cxrkit.inference.loading import load_model

    marker = tmp_path / "ran"
    best = run_dir / "checkpoints" / "best.ckpt"
    plant(best, marker, kind, best)
    with pytest.raises(CheckpointError, match="refused to load") as error:
        load_model(run_dir, "best")
    assert str(best) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists(), "the payload ran"


def test_unreadable_or_absent_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.ckpt")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as error:
        load_checkpoint(broken)
    assert str(broken) in str(error.value) and "\n" not in str(error.value)
    plain = tmp_path / "plain.ckpt"
    torch.save({"epoch": 1}, plain)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_training_checkpoint(plain)
