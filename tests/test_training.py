"""Training end to end: run-directory artefacts, staged fine-tuning, determinism, EMA, test.

Determinism (here) and the SIGKILL resume tests (``test_resume.py``) run the real data path on real X-rays
(:func:`real_data_overrides`: cache, :class:`cxrkit.data.dataset.CXRDataModule`, its epoch sampler and
augmentation reseeding). The other trainer tests use a small synthetic data module with a learnable signal
that follows the same batch contract (``(images [B,1,S,S] in [0,1], targets [B,L] with NaN)``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from configs import tiny_run_config
from cxrkit.cli.main import cli
from cxrkit.config import ConfigError, load_config
from cxrkit.evaluation.metrics import MACRO, Predictions, ranking_table
from cxrkit.models.factory import create_model
from cxrkit.reporting.plots import save_training_curves, training_curves
from cxrkit.training import run
from cxrkit.training.callbacks import AtomicCheckpointIO, monitor_mode
from cxrkit.training.module import CXRClassifier, MaskedMultilabelAUROC, mean_over_findings, tta_views
from cxrkit.training.stages import StagedLRLambda, apply_stage, resolve_stages, stage_at

LABELS = ["Effusion", "Nodule", "Pneumothorax", "No Finding"]
IMAGE_SIZE = 16


# ---- synthetic data and network ----------------------------------------------------------------------------
def synthetic_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose quadrant k is brighter when finding k is present; some targets unknown (NaN)."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, 3, generator=generator) < 0.4).float()
    images = 0.3 * torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    half = IMAGE_SIZE // 2
    for k, (y, x) in enumerate([(0, 0), (0, half), (half, 0)]):
        images[:, 0, y : y + half, x : x + half] += 0.5 * targets[:, k, None, None]
    no_finding = (targets.sum(dim=1, keepdim=True) == 0).float()
    targets = torch.cat([targets, no_finding], dim=1)
    unknown = torch.rand(n, 4, generator=generator) < 0.1
    return images.clamp(0, 1), targets.masked_fill(unknown, float("nan"))


class EpochShuffle(Sampler[int]):
    """Permutation drawn from (seed, epoch): Lightning calls ``set_epoch`` before each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class SyntheticDataModule(LightningDataModule):
    def __init__(
        self, n_train: int = 64, n_val: int = 32, n_test: int = 32, batch_size: int = 16, seed: int = 0
    ):
        super().__init__()
        self.labels = list(LABELS)
        self.batch_size, self.seed = batch_size, seed
        self.splits = {
            "train": synthetic_split(n_train, 1),
            "val": synthetic_split(n_val, 2),
            "test": synthetic_split(n_test, 3),
        }

    def train_label_frequencies(self) -> np.ndarray:
        targets = self.splits["train"][1].numpy()
        return np.nanmean(targets, axis=0)

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(*self.splits["train"])
        return DataLoader(dataset, batch_size=self.batch_size, sampler=EpochShuffle(len(dataset), self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.splits["val"]), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.splits["test"]), batch_size=self.batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, targets = batch
        if self.trainer is not None and self.trainer.training:  # random noise + brightness, global RNG
            images = (
                images + 0.05 * torch.randn_like(images) + 0.05 * (torch.rand(len(images), 1, 1, 1) - 0.5)
            )
        return images.clamp(0, 1), targets


class TinyNet(nn.Module):
    """A small CNN with the parameter naming of the model factory (``backbone.*``, ``head.*``)."""

    def __init__(self, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = nn.Sequential()
        self.backbone.add_module(
            "stem", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        )
        self.backbone.add_module(
            "layer1", nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        )
        self.backbone.add_module(
            "layer2",
            nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
            ),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(32, num_labels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def tiny_config(tmp_path: Path, *overrides: str):
    base = [
        f"output_dir={tmp_path / 'run'}",
        "name=synthetic",
        "seed=7",
        "train.max_epochs=2",
        "train.loggers=[csv]",
        "train.accelerator=cpu",
        "train.devices=1",
        "train.log_every_n_steps=1",
        "train.optimizer.lr=0.01",
        "train.scheduler.name=cosine",
    ]
    return load_config(None, [*base, *overrides])


def fit_synthetic(config, run_dir: Path | None = None, resume: bool = False, **data_kwargs) -> Path:
    return run.fit(
        config,
        SyntheticDataModule(seed=int(config.seed), **data_kwargs),
        TinyNet,
        run_dir or Path(config.output_dir),
        resume=resume,
    )


def real_data_overrides(data_root: Path, cache_dir: Path) -> list[str]:
    """The real data path on real X-rays: the 2 x 24 pneumonia images of the ``tiny_data_root`` fixture
    through the folder adapter, a patient split, the uint8 cache (48 px), the epoch-seeded sampler and the
    device-side augmentation (rotation, translation, scale, crop, brightness and contrast, 40 px crops)."""
    return [
        f"data.sources=[{{adapter: folder, root: '{data_root / 'pneumonia'}'}}]",
        "data.no_finding=zeros",
        "data.split.method=random",
        "data.split.val_fraction=0.25",
        "data.split.test_fraction=0.25",
        "data.split.seed=3",  # both classes in every split (23 / 14 / 11 images)
        f"data.cache.dir='{cache_dir}'",
        "data.cache.image_size=48",
        "data.cache.workers=1",  # decode in this process (no forked pool)
        "data.augment.crop_size=40",
        "data.loader.batch_size=8",
        "data.loader.num_workers=0",
    ]


def fit_real(config, resume: bool = False) -> Path:
    """:func:`cxrkit.training.run.fit` with the real :class:`~cxrkit.data.dataset.CXRDataModule`."""
    datamodule = run.build_datamodule(config)
    assert type(datamodule).__name__ == "CXRDataModule"
    return run.fit(config, datamodule, TinyNet, Path(config.output_dir), resume=resume)


def epoch_table(run_dir: Path) -> pd.DataFrame:
    """Per-epoch metrics of a run, without the wall-clock throughput."""
    frame = pd.read_csv(run_dir / "metrics.csv").drop(columns=["train/images_per_s"], errors="ignore")
    return frame.reset_index(drop=True)


def make_folder_dataset(root: Path, per_class: int = 24, size: int = 40, seed: int = 0) -> Path:
    """A tiny pneumonia-style image folder (NORMAL / PNEUMONIA, Kermany file names): pneumonia images carry a
    bright patch in the lower half."""
    rng = np.random.default_rng(seed)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 90, (size, size)).astype(np.uint8)
            if label == "PNEUMONIA":
                y, x = rng.integers(size // 2, size - 10), rng.integers(2, size - 12)
                pixels[y : y + 8, x : x + 10] = 230
            name = (
                f"person{index}_bacteria_{index}.png" if label == "PNEUMONIA" else f"IM-{index:04d}-0001.png"
            )
            Image.fromarray(pixels, mode="L").save(root / label / name)
    return root


def write_cli_config(tmp_path: Path, data_root: Path, name: str = "e2e", **train: object) -> Path:
    """A complete ``cxr train`` YAML config for :func:`make_folder_dataset` with timm's tiny test ResNet."""
    config = tiny_run_config(
        name,
        tmp_path / "runs" / name,
        [{"adapter": "folder", "root": str(data_root)}],
        tmp_path / "cache",
        image_size=32,
        crop_size=28,
        batch_size=8,
        seed=5,
        data={
            "split": {"method": "random", "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0},
            "augment": {"crop_size": 28, "rotation_degrees": 5.0},
        },
        train={"max_epochs": 2, "scheduler": {"name": "cosine", "warmup_epochs": 0.5}, **train},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# ---- tests ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_train_and_test_on_an_image_folder(tmp_path):
    data_root = make_folder_dataset(tmp_path / "pneumonia")
    config_path = write_cli_config(tmp_path, data_root, loggers=["csv", "mlflow"], ema_decay=0.5, tta=True)
    output = invoke("train", "-c", str(config_path))
    run_dir = tmp_path / "runs" / "e2e"
    assert f"run directory: {run_dir}" in output

    for name in (
        "config.yaml",
        "labels.json",
        "metrics.csv",
        "training_curves.png",
        "mlflow.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "labels.json").read_text()) == ["Pneumonia"]
    record = json.loads((run_dir / "mlflow.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}"
    import mlflow

    logged = mlflow.MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    assert "val/auroc_mean" in logged.data.metrics and logged.data.params["model/arch"] == "test_resnet"

    # checkpoints hold only tensors and plain containers: they load with weights_only=True
    state = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)
    assert state["cxrkit"]["labels"] == ["Pneumonia"] and state["cxrkit"]["activation"] == "sigmoid"
    trained = run.load_trained_model(run_dir, "best")
    assert trained.labels == ["Pneumonia"] and trained.model(torch.rand(2, 1, 28, 28)).shape == (2, 1)

    output = invoke("test", str(run_dir), "--checkpoint", "last")
    payload = json.loads((run_dir / "test_metrics_last.json").read_text())
    assert payload["checkpoint"] == "checkpoints/last.ckpt" and payload["tta"] is True
    assert 0 <= payload["metrics"]["test/auroc/Pneumonia"] <= 1
    assert payload["metrics"]["test/auroc_mean"] == payload["metrics"]["test/auroc/Pneumonia"]
    assert "test AUROC" in output

    result = CliRunner().invoke(cli, ["train", "-c", str(config_path)])
    assert result.exit_code != 0 and "--resume" in result.output
    result = CliRunner().invoke(cli, ["train", "--resume", str(run_dir), "train.max_epochs=3"])
    assert result.exit_code != 0 and "drop --config" in result.output


@pytest.mark.slow
def test_training_writes_every_run_artefact(tmp_path):
    config = tiny_config(tmp_path, "train.max_epochs=3", "train.loss.name=weighted_bce")
    run_dir = fit_synthetic(config)

    for name in (
        "config.yaml",
        "labels.json",
        "metrics.csv",
        "training_curves.png",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "labels.json").read_text()) == LABELS
    assert load_config(run_dir / "config.yaml").train.loss.name == "weighted_bce"
    assert not list((run_dir / "checkpoints").glob(".*tmp*")), "temporary checkpoint files left behind"

    metrics = pd.read_csv(run_dir / "metrics.csv")
    epochs = metrics.dropna(subset=["val/auroc_mean"])
    assert epochs["epoch"].tolist() == [0, 1, 2]
    for label in LABELS:
        assert epochs[f"val/auroc/{label}"].between(0, 1).all()
    assert epochs["val/auroc_mean"].iloc[-1] > 0.75, "the synthetic signal should be learnt"
    assert metrics["train/images_per_s"].dropna().gt(0).all()

    last = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    assert last["epoch"] == 3 and last["cxrkit"]["labels"] == LABELS  # saved after the last epoch
    best = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=False)
    best_epoch = int(epochs.loc[epochs["val/auroc_mean"].idxmax(), "epoch"])
    assert best["epoch"] == best_epoch

    out = run.evaluate_checkpoint(config, SyntheticDataModule(seed=7), TinyNet, run_dir, "best")
    payload = json.loads(out.read_text())
    assert payload["checkpoint"] == "checkpoints/best.ckpt"
    assert 0.75 < payload["metrics"]["test/auroc_mean"] <= 1
    assert {f"test/auroc/{label}" for label in LABELS} <= set(payload["metrics"])


@pytest.mark.slow
def test_same_seed_gives_same_metrics(tmp_path, tiny_data_root):
    """Through the real data module on real images: same seed, same run (shuffle, augmentation, init)."""
    data = real_data_overrides(tiny_data_root, tmp_path / "cache")
    first = fit_real(tiny_config(tmp_path / "a", *data))
    second = fit_real(tiny_config(tmp_path / "b", *data))
    pd.testing.assert_frame_equal(epoch_table(first), epoch_table(second))
    assert epoch_table(first)["val/auroc_mean"].notna().sum() == 2
    other_seed = fit_real(tiny_config(tmp_path / "c", *data, "seed=8"))
    assert not epoch_table(first)["train/loss_step"].equals(epoch_table(other_seed)["train/loss_step"])


@pytest.mark.slow
def test_mixup_trains_reproducibly(tmp_path, tiny_data_root):
    """data.augment.mixup_alpha through the real data module and the training loop: reproducible with its
    seed, and another run than without mixup."""
    data = real_data_overrides(tiny_data_root, tmp_path / "cache")
    plain = fit_real(tiny_config(tmp_path / "a", *data))
    mixed = [fit_real(tiny_config(tmp_path / name, *data, "data.augment.mixup_alpha=0.4")) for name in "bc"]
    pd.testing.assert_frame_equal(epoch_table(mixed[0]), epoch_table(mixed[1]))
    assert not epoch_table(plain)["train/loss_step"].equals(epoch_table(mixed[0])["train/loss_step"])
    assert epoch_table(mixed[0])["val/auroc_mean"].notna().sum() == 2


def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.mark.slow
def test_staged_fine_tuning_freezes_and_switches(tmp_path):
    stages = (
        'train.stages=[{name: head, trainable: ["head.*"], epochs: 1, lr: 0.05},'
        '{name: layer2, trainable: ["backbone.layer2.*", "head.*"], epochs: 1, lr: 0.01,'
        " loss: {name: focal, gamma: 2.0}}]"
    )
    config = tiny_config(tmp_path, stages, "train.scheduler.name=none")
    assert config.train.max_epochs == 2, "the stages decide the epochs; the config says so"
    snapshots = {}

    def build(num_labels):
        model = TinyNet(num_labels)
        snapshots["init"] = _parameters(model)
        return model

    run_dir = run.fit(config, SyntheticDataModule(seed=7), build, config.output_dir)
    ckpt = torch.load(Path(run_dir) / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 2, "total epochs = sum of stage epochs"
    final = {name[len("model.") :]: value for name, value in ckpt["state_dict"].items()}
    init = snapshots["init"]
    # stem and layer1 never train (weights and BatchNorm statistics frozen); layer2 trains in stage 2 only
    for name in init:
        if name.startswith(("backbone.stem", "backbone.layer1")):
            assert torch.equal(init[name], final[name]), f"{name} changed although frozen"
    assert not torch.equal(init["head.1.weight"], final["head.1.weight"])
    assert not torch.equal(init["backbone.layer2.0.weight"], final["backbone.layer2.0.weight"])
    assert ckpt["cxrkit"]["stage_index"] == 1

    metrics = pd.read_csv(Path(run_dir) / "metrics.csv")
    lrs = metrics.dropna(subset=["train/lr"]).groupby("epoch")["train/lr"].unique()
    assert [np.round(v, 6).tolist() for v in lrs] == [[0.05], [0.01]]
    assert metrics.dropna(subset=["train/stage"])["train/stage"].tolist() == [0.0, 1.0]


def _resnet(arch: str) -> nn.Module:
    return create_model(load_config(None, [f"model.arch={arch}", "model.pretrained.source=none"]).model, 14)


def test_stage_patterns_express_resnet_schedules():
    resnet18 = _resnet("resnet18")
    config = load_config(None, ['train.stages=[{name: layer4, trainable: ["backbone.layer4.*", "head.*"]}]'])
    apply_stage(resnet18, resolve_stages(config.train)[0])
    trainable = {name.split(".")[1] for name, p in resnet18.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}  # backbone.layer4.* and head.fc.*
    assert not any(p.requires_grad for n, p in resnet18.named_parameters() if n.startswith("backbone.layer3"))

    resnet50 = _resnet("resnet50")
    five = (
        'train.stages=[{trainable: ["head.*"], epochs: 2}, {trainable: ["backbone.layer4.*", "head.*"]},'
        '{trainable: ["backbone.layer[34].*", "head.*"]}, {trainable: ["backbone.layer[234].*", "head.*"]},'
        '{trainable: ["*"], epochs: 3}]'
    )
    stages = resolve_stages(load_config(None, [five]).train)
    assert [s.start_epoch for s in stages] == [0, 2, 3, 4, 5] and stages[-1].end_epoch == 8
    counts = []
    for epoch in range(8):
        trainable, _ = apply_stage(resnet50, stage_at(stages, epoch))
        counts.append(trainable)
    assert counts[0] == counts[1] < counts[2] < counts[3] < counts[4] < counts[5] == counts[7]
    assert counts[5] == sum(p.numel() for p in resnet50.parameters())

    with pytest.raises(ValueError, match="matches no parameter"):
        apply_stage(
            resnet50, resolve_stages(load_config(None, ['train.stages=[{trainable: ["layer4.*"]}]']).train)[0]
        )


def test_cosine_and_onecycle_schedules_restart_per_stage():
    cosine = StagedLRLambda("cosine", 1.0, [1.0, 0.1], [10, 10], [2, 2], min_lr=0.0)
    values = [cosine(step) for step in range(20)]
    assert values[0] < values[1] < values[2] == pytest.approx(1.0)
    assert values[9] < 0.05 and values[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[2:10]))
    onecycle = StagedLRLambda("onecycle", 1.0, [1.0], [100], [0])
    curve = [onecycle(step) for step in range(100)]
    assert curve[0] == pytest.approx(1 / 25) and max(curve) == pytest.approx(1.0, rel=1e-3)
    assert curve[-1] < 1e-3 and int(np.argmax(curve)) == 30


def test_masked_auroc_skips_labels_without_both_classes():
    metric = MaskedMultilabelAUROC(["A", "B", "No Finding"])
    probs = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.4, 0.8], [0.8, 0.3, 0.2], [0.1, 0.2, 0.9]])
    nan = float("nan")
    targets = torch.tensor([[1, 1, 0], [0, 1, 1], [1, nan, 0], [nan, 1, 1]])
    metric.update(probs, targets)
    aurocs = metric.compute()
    assert set(aurocs) == {"A", "No Finding"}  # B has only positives among its known targets
    assert aurocs["A"] == pytest.approx(1.0)
    labels = ["A", "B", "No Finding"]
    assert mean_over_findings(aurocs, labels) == pytest.approx(1.0)  # No Finding left out of the mean
    assert math.isnan(float(mean_over_findings({}, labels)))
    # The rule of the evaluation report's mean: the monitor equals the report's macro AUROC.
    pred = Predictions(targets.numpy(), probs.numpy(), np.arange(4), labels)
    assert float(mean_over_findings(aurocs, labels)) == pytest.approx(ranking_table(pred).loc[MACRO, "auroc"])
    alone = {"No Finding": aurocs["No Finding"]}
    assert mean_over_findings(alone, ["No Finding"]) == pytest.approx(float(aurocs["No Finding"]))


def test_training_curves_plot_every_metric_without_switching_the_backend(tmp_path):
    """One training-curve figure (cxrkit.reporting.plots) for the run folder and the evaluation report;
    importing the training code leaves matplotlib's backend alone."""
    metrics_csv = tmp_path / "metrics.csv"
    pd.DataFrame(
        {
            "epoch": [0, 0, 1, 1],
            "step": [4, 4, 9, 9],
            "train/loss_epoch": [0.7, np.nan, 0.5, np.nan],
            "val/loss": [np.nan, 0.6, np.nan, 0.55],
            "val/auroc/Effusion": [np.nan, 0.6, np.nan, 0.7],
            "val/auroc_mean": [np.nan, 0.65, np.nan, 0.72],
        }
    ).to_csv(metrics_csv, index=False)
    figure = training_curves(metrics_csv)
    loss_ax, metric_ax = figure.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train/loss_epoch", "val/loss"]
    assert [line.get_label() for line in metric_ax.lines] == ["Effusion", "mean AUROC"]
    np.testing.assert_allclose(metric_ax.lines[1].get_ydata(), [0.65, 0.72])
    assert save_training_curves(metrics_csv, tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="epoch"):
        pd.DataFrame({"x": [1]}).to_csv(tmp_path / "bad.csv", index=False)
        training_curves(tmp_path / "bad.csv")
    code = (
        "import matplotlib; import cxrkit.training.callbacks, cxrkit.evaluation.report; "
        "print(matplotlib.get_backend())"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "svg"


def test_tta_views_are_deterministic_crops_without_flips():
    images = torch.arange(100.0).reshape(1, 1, 10, 10)
    views = tta_views(images)
    assert len(views) == 6 and all(v.shape == images.shape for v in views)
    assert torch.equal(views[0], images)
    flipped = images.flip(-1)
    assert not any(torch.allclose(v, flipped) for v in views)
    assert torch.equal(tta_views(images)[3], views[3])


def test_monitor_mode():
    assert monitor_mode("val/loss") == "min" and monitor_mode("val/auroc_mean") == "max"


def test_module_rejects_bad_settings():
    with pytest.raises(ConfigError, match=r"train\.optimizer\.name"):  # the schema refuses it on load
        load_config(None, ["train.optimizer.name=lamb"])
    with pytest.raises(ConfigError, match=r"train\.scheduler\.name"):
        load_config(None, ["train.scheduler.name=step"])
    with pytest.raises(ValueError, match=r"train\.monitor"):
        CXRClassifier(TinyNet(4), LABELS, load_config(None, ["train.monitor=val/auroc/Hernia"]).train)
    mixed = "train.stages=[{loss: {name: ce}}, {loss: {name: bce}}]"
    with pytest.raises(ValueError, match="mix"):
        CXRClassifier(TinyNet(4), LABELS, load_config(None, [mixed]).train)


@pytest.mark.slow
def test_ema_weights_are_validated_and_checkpointed(tmp_path):
    config = tiny_config(tmp_path, "train.ema_decay=0.9", "train.max_epochs=2", "train.channels_last=true")
    run_dir = fit_synthetic(config)
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    assert "current_model_state" in ckpt and "averaging_state" in ckpt
    ema = ckpt["state_dict"]["model.head.1.weight"]
    current = ckpt["current_model_state"]["model.head.1.weight"]
    assert not torch.equal(ema, current), "state_dict should hold the EMA weights, not the raw ones"


@pytest.mark.slow
def test_fresh_run_refuses_a_finished_run_dir(tmp_path):
    config = tiny_config(tmp_path, "train.max_epochs=1", "train.limit_val_batches=1")
    fit_synthetic(config)
    with pytest.raises(FileExistsError, match="--resume"):
        fit_synthetic(config)


def test_hardware_settings_on_cpu():
    train = load_config(None, ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]).train
    settings = run._hardware_args(train)
    assert settings["precision"] == "32-true" and settings["devices"] == 2 and settings["strategy"] == "ddp"
    assert run._devices("0,2") == [0, 2] and run._devices("auto") == "auto"
    frozen = load_config(None, ["train.strategy=ddp", 'train.stages=[{trainable: ["head.*"]}]']).train
    assert run._hardware_args(frozen)["strategy"] == "ddp_find_unused_parameters_true"


def test_only_the_first_process_prepares_the_cache(monkeypatch):
    for variable in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert run._is_first_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not run._is_first_process()
    monkeypatch.setenv("RANK", "0")
    assert run._is_first_process()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert not run._is_first_process()


class _FailsWhilePickled:
    def __reduce__(self):
        raise RuntimeError("interrupted while writing")


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="interrupted"):
        io.save_checkpoint({"weights": torch.zeros(3), "later": _FailsWhilePickled()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert [child.name for child in tmp_path.iterdir()] == ["last.ckpt"]
    partial = tmp_path / ".last.ckpt.tmp-12345"  # what a SIGKILL during a save leaves behind
    partial.write_bytes(b"PK\x03")
    run._remove_partial_checkpoints(tmp_path)
    assert not partial.exists() and path.exists()
