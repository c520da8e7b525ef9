"""A corrupt image among real ones never stops training: prepare skips and lists it, training goes on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cxrkit.cli.main import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.shared_data
def test_training_skips_unreadable_images(tiny_data_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "pneumonia" / "train"
    shutil.copytree(tiny_data_root / "pneumonia" / "train", data, symlinks=True)
    real = next((data / "PNEUMONIA").iterdir()).resolve().read_bytes()
    bad = {
        "person9001_bacteria_1.jpeg": b"",  # zero bytes
        "person9002_bacteria_2.jpeg": real[: len(real) // 3],  # truncated
        "person9003_bacteria_3.jpeg": b"this is a text file, not an X-ray\n",  # wrong format
    }
    for name, content in bad.items():
        (data / "PNEUMONIA" / name).write_bytes(content)

    result = CliRunner().invoke(
        cli,
        [
            "train",
            "-c",
            str(REPO / "configs" / "pneumonia_lite0_offline.yaml"),
            f"data.sources.0.root={data}",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'run'}",
            "data.cache.image_size=48",
            "data.cache.workers=1",
            "data.augment.crop_size=40",
            "data.loader.batch_size=8",
            "train.stages=[]",
            "train.max_epochs=1",
            "train.limit_train_batches=2",
            "train.loggers=[csv]",
        ],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv")
    assert {Path(p).name for p in failures["path"]} == set(bad)
    assert failures["reason"].str.len().gt(0).all()
