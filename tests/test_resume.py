"""Exact resume: a training killed with SIGKILL mid-epoch, then resumed, ends like an uninterrupted one.

The SIGKILL tests run the real data path on real X-rays (the pneumonia images of the ``tiny_data_root``
fixture): manifest, patient split, uint8 cache, :class:`~cxrkit.data.dataset.CXRDataModule` with its
epoch-seeded sampler and its augmentation reseeded from (seed, epoch), so what is resumed is what training
really does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxrkit.config import load_config

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from cxrkit.training import run  # noqa: E402
from test_training import (  # noqa: E402
    SyntheticDataModule,
    TinyNet,
    epoch_table,
    fit_real,
    invoke,
    real_data_overrides,
    write_cli_config,
)

SCENARIOS = {
    # cosine schedule, EMA, dropout, augmentation, class weights and a stage switch at the resumed epoch
    "cosine-ema-stages": [
        "train.scheduler.name=cosine",
        "train.scheduler.warmup_epochs=0.5",
        "train.ema_decay=0.8",
        "train.loss.name=weighted_bce",
        'train.stages=[{name: head, trainable: ["head.*"], epochs: 2, lr: 0.02},'
        ' {name: all, trainable: ["*"], epochs: 2, lr: 0.01, loss: {name: focal}}]',
    ],
    # reduce-on-plateau with patience 0 (its state must come back) and early stopping state
    "plateau-earlystop": [
        "train.scheduler.name=plateau",
        "train.scheduler.patience=0",
        "train.scheduler.factor=0.5",
        "train.monitor=val/loss",
        "train.early_stopping_patience=3",
        "train.max_epochs=4",
        "train.optimizer.name=sgd",
        "train.optimizer.weight_decay=0.001",
    ],
}
KILL_EPOCH, KILL_BATCH = 2, 2

SCRIPT = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_training import TinyNet
from cxrkit.config import load_config
from cxrkit.data.dataset import CXRDataModule
from cxrkit.training import run


class PausingDataModule(CXRDataModule):
    '''Announces reaching (epoch, batch) in a marker file, then waits to be killed.'''

    def __init__(self, marker, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker, self.batches = Path(marker), 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            if self.trainer.current_epoch == {epoch}:
                self.batches += 1
                if self.batches == {batch}:
                    self.marker.write_text(str(os.getpid()))
                    time.sleep(600)
        return super().on_after_batch_transfer(batch, dataloader_idx)


config = load_config(None, sys.argv[2:])
run.build_datamodule(config)  # the cache the reference run built, reused as it is
data = PausingDataModule(sys.argv[1], config.data, config.data.cache.dir, seed=int(config.seed))
run.fit(config, data, TinyNet, config.output_dir)
"""


def _config(run_dir: Path, scenario: str, data: tuple[str, ...] | list[str] = ()) -> list[str]:
    return [
        f"output_dir={run_dir}",
        "name=resume",
        "seed=3",
        "train.max_epochs=4",
        "train.loggers=[csv]",
        "train.accelerator=cpu",
        "train.devices=1",
        "train.log_every_n_steps=1",
        "train.optimizer.lr=0.02",
        *SCENARIOS[scenario],
        *data,
    ]


def _train_until_killed(tmp_path: Path, overrides: list[str]) -> None:
    script = tmp_path / "train_then_pause.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS), epoch=KILL_EPOCH, batch=KILL_BATCH)))
    marker = tmp_path / "reached"
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(
                    f"training exited early ({process.returncode}):\n{process.stderr.read()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("training did not reach the kill point in time")
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, scenario, tiny_data_root):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    data = real_data_overrides(tiny_data_root, tmp_path / "cache")
    fit_real(load_config(None, _config(reference_dir, scenario, data)))

    _train_until_killed(tmp_path, _config(killed_dir, scenario, data))
    last = torch.load(killed_dir / "checkpoints/last.ckpt", weights_only=False)
    assert last["epoch"] == KILL_EPOCH, "last.ckpt should hold the state at the start of the killed epoch"
    interrupted_rows = pd.read_csv(killed_dir / "metrics.csv")
    assert interrupted_rows["epoch"].max() < KILL_EPOCH + 1

    fit_real(run.load_run_config(killed_dir), resume=True)

    pd.testing.assert_frame_equal(epoch_table(killed_dir), epoch_table(reference_dir))
    for name in ("last", "best"):
        resumed = torch.load(killed_dir / f"checkpoints/{name}.ckpt", weights_only=False)
        reference = torch.load(reference_dir / f"checkpoints/{name}.ckpt", weights_only=False)
        assert resumed["epoch"] == reference["epoch"]
        for key, value in reference["state_dict"].items():
            assert torch.equal(resumed["state_dict"][key], value), f"{name}.ckpt differs at {key}"
        for key in ("optimizer_states", "lr_schedulers", "plateau_scheduler"):
            _assert_identical(resumed.get(key), reference.get(key), f"{name}.ckpt[{key}]")
    assert (killed_dir / "training_curves.png").is_file()


def _assert_identical(resumed, reference, where: str) -> None:
    """Recursive exact equality of checkpoint contents (tensors bit for bit)."""
    if isinstance(reference, torch.Tensor):
        assert torch.equal(resumed, reference), where
    elif isinstance(reference, dict):
        assert resumed.keys() == reference.keys(), where
        for key in reference:
            _assert_identical(resumed[key], reference[key], f"{where}[{key!r}]")
    elif isinstance(reference, list | tuple):
        assert len(resumed) == len(reference), where
        for index, (left, right) in enumerate(zip(resumed, reference, strict=True)):
            _assert_identical(left, right, f"{where}[{index}]")
    else:
        assert resumed == reference, f"{where}: {resumed!r} != {reference!r}"


@pytest.mark.slow
def test_cli_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_data_root):
    """`cxr train` on real X-rays, SIGKILL as soon as the first last.ckpt exists, `cxr train --resume`."""
    data_root = tiny_data_root / "pneumonia"
    train = {"max_epochs": 3, "ema_decay": 0.7, "loss": {"name": "weighted_bce"}}
    reference_config = write_cli_config(tmp_path, data_root, name="reference", **train)
    killed_config = write_cli_config(tmp_path, data_root, name="killed", **train)
    options = ["data.loader.batch_size=4", "data.split.seed=3"]  # both classes in every split
    invoke("train", "-c", str(reference_config), *options)
    reference_dir, killed_dir = tmp_path / "runs" / "reference", tmp_path / "runs" / "killed"

    last = killed_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("cxr")),
            "train",
            "-c",
            str(killed_config),
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 300
        while not last.exists():
            if process.poll() is not None:
                raise AssertionError(
                    f"training exited early ({process.returncode}):\n{process.stderr.read()}"
                )
            assert time.monotonic() < deadline, "no last.ckpt in time"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert torch.load(last, weights_only=True)["epoch"] < 3, (
        "the run must have been killed before it finished"
    )

    invoke("train", "--resume", str(killed_dir))
    pd.testing.assert_frame_equal(epoch_table(killed_dir), epoch_table(reference_dir))
    for name in ("last", "best"):
        resumed = torch.load(killed_dir / f"checkpoints/{name}.ckpt", weights_only=True)
        reference = torch.load(reference_dir / f"checkpoints/{name}.ckpt", weights_only=True)
        _assert_identical(resumed["state_dict"], reference["state_dict"], f"{name}.ckpt state_dict")
        _assert_identical(
            resumed["optimizer_states"], reference["optimizer_states"], f"{name}.ckpt optimizer"
        )


def test_resume_needs_a_checkpoint(tmp_path):
    config = load_config(None, _config(tmp_path / "empty", "plateau-earlystop"))
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt"):
        run.fit(config, SyntheticDataModule(), TinyNet, tmp_path / "empty", resume=True)
