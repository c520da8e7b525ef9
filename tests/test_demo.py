"""``cxr demo``: finding data, and the whole pipeline end to end on a tiny copy of the real data."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrkit import demo
from cxrkit.cli.main import cli


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
        assert f"cxr serve {out / name / f'{name}.cxr'}" in result.output
    assert "heatmap gallery" in result.output
    assert "evaluation report" in result.output
    assert (out / "studies" / "pneumonia" / "best_config.yaml").exists()
    assert "search report" in result.output
