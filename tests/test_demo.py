"""``cxr demo``: finding data, and the whole pipeline end to end on a tiny copy of the real data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrkit import demo
from cxrkit.cli.main import cli
from cxrkit.config import load_saved_config
from cxrkit.inference.bundle import Bundle


def test_explicit_data_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(demo.NoDataError, match="nowhere"):
        demo.locate_data(str(tmp_path / "nowhere"))


def test_environment_variable_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DATA", str(tmp_path))
    assert demo.locate_data(None) == tmp_path


def test_without_data_the_message_says_how_to_get_some(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here

    def offline() -> Path:
        raise OSError("network is unreachable")

    with pytest.raises(demo.NoDataError, match="cxr demo --data PATH") as error:
        demo.locate_data(None, download=offline)
    assert "network is unreachable" in str(error.value)


def test_a_folder_without_datasets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(demo.NoDataError, match="neither"):
        demo.datasets_in(tmp_path)


@pytest.mark.slow
@pytest.mark.shared_data
def test_demo_runs_the_whole_pipeline(tiny_data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    overrides = [
        "data.cache.image_size=48",
        "data.cache.workers=1",
        "data.augment.crop_size=40",
        "data.loader.batch_size=8",
        "data.split.val_fraction=0.4",  # both classes in the tiny validation split
        "train.limit_train_batches=2",
        "train.loggers=[csv]",
    ]
    result = CliRunner().invoke(cli, ["demo", "--data", str(tiny_data_root), "--out", str(out), *overrides])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    for name in ("nih", "pneumonia"):
        assert (out / name / "describe" / "report.html").exists()
        assert (out / name / "checkpoints" / "best.ckpt").exists()
        assert (out / name / "thresholds.json").exists()
        assert (out / name / f"{name}.cxr").exists()
    assert (out / "studies" / "pneumonia" / "best_config.yaml").exists()
    # the pneumonia recipe ships as an ensemble of its run and a second seed's
    assert (out / "pneumonia-seed1" / "checkpoints" / "best.ckpt").exists()
    assert load_saved_config(out / "pneumonia-seed1" / "config.yaml").seed == 1
    assert Bundle.load(out / "pneumonia" / "pneumonia.cxr").network_config().ensemble_size == 2
    assert Bundle.load(out / "nih" / "nih.cxr").network_config().ensemble_size == 1
    # the closing summary: one row per stage (key figure, output), then the serve commands, last
    header = re.search(r"^dataset +stage +key figure +output$", result.stdout, re.MULTILINE)
    assert header, result.stdout
    table = result.stdout[header.start() :]
    for stage in ("prepare", "describe", "train", "evaluate", "explain", "export", "search"):
        assert re.search(rf"^(nih|pneumonia) +{stage} ", table, re.MULTILINE), stage
    assert "test AUROC" in table and "best val/auroc_mean" in table
    assert re.search(r"^pneumonia +train seed 1 +best val/auroc_mean", table, re.MULTILINE)
    assert re.search(r"^pneumonia +export +1 label\(s\), ensemble of 2 runs", table, re.MULTILINE)
    serve_lines = [line for line in table.splitlines() if line.startswith("serve the model with")]
    assert serve_lines == [
        f"serve the model with: cxr serve {out / name / f'{name}.cxr'}" for name in ("nih", "pneumonia")
    ]
    assert table.rstrip().endswith(serve_lines[-1])
    assert "cxr serve" not in result.output[: result.output.index(header.group(0))]


def test_the_summary_table_lines_up_stage_figure_and_output(tmp_path: Path) -> None:
    result = demo.DemoResult(
        [
            demo.DemoStep("nih", "prepare", "48 images cached, 0 unreadable", tmp_path / "cache"),
            demo.DemoStep("pneumonia", "evaluate", "test AUROC 0.912 (0.870-0.950)", tmp_path / "r.html"),
        ]
    )
    header, *rows = result.table().splitlines()
    assert header.split() == ["dataset", "stage", "key", "figure", "output"]
    assert rows[1].startswith("pneumonia  evaluate  test AUROC 0.912") and rows[1].endswith("r.html")
    assert len({line.index(line.split()[1]) for line in [header, *rows]}) == 1, "stage column aligned"
