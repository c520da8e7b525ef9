"""Datasets and the DataModule over a real (small) NIH cache: shapes, NaN targets, order, transforms."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cxrkit.data.cache import open_cache, prepare_cache
from cxrkit.data.config import AugmentConfig, DataConfig, LoaderConfig
from cxrkit.data.dataset import CachedImages, CXRDataModule, EpochShuffleSampler, collate_uint8
from cxrkit.data.manifest import from_records

LABELS = ["Atelectasis", "Effusion", "Hernia"]
SPLITS = ["train", "train", "train", "train", "train", "val", "val", "test"]
TARGETS = [
    [1.0, 0.0, math.nan],
    [0.0, 0.0, math.nan],
    [1.0, 1.0, math.nan],
    [0.0, math.nan, math.nan],
    [1.0, 0.0, math.nan],
    [0.0, 1.0, 0.0],
    [1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0],
]


@pytest.fixture(scope="module")
def cache_dir(nih_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = sorted((nih_sample / "images").glob("*.png"))[: len(SPLITS)]
    records = [
        {"path": str(path), "patient_id": f"nih:{i}", "split": split, "source": "nih", "targets": targets}
        for i, (path, split, targets) in enumerate(zip(paths, SPLITS, TARGETS, strict=True))
    ]
    out_dir = tmp_path_factory.mktemp("cache")
    prepare_cache(
        from_records(records, LABELS), out_dir, image_size=32, shard_size=3, workers=1, progress=False
    )
    return out_dir


def data_config(batch_size: int = 2, **augment) -> DataConfig:
    return DataConfig(
        labels=[],
        augment=dataclasses.replace(AugmentConfig(), crop_size=24, **augment),
        loader=LoaderConfig(batch_size=batch_size, num_workers=0),
    )


# ---------------------------------------------------------------- CachedImages


def test_items_are_uint8_images_with_nan_targets(cache_dir: Path) -> None:
    train = CachedImages(cache_dir, split="train")
    assert len(train) == 5 and train.labels == LABELS
    image, target = train[3]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert target.dtype == torch.float32 and target.shape == (3,)
    torch.testing.assert_close(target, torch.tensor(TARGETS[3]), equal_nan=True)
    np.testing.assert_array_equal(image[0].numpy(), open_cache(cache_dir).image(3))


def test_splits_select_their_rows(cache_dir: Path) -> None:
    cache = open_cache(cache_dir)
    sizes = {split: len(CachedImages(cache, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 5, "val": 2, "test": 1} and len(CachedImages(cache)) == 8
    val_image, val_target = CachedImages(cache, "val")[1]
    np.testing.assert_array_equal(val_image[0].numpy(), cache.image(6))
    torch.testing.assert_close(val_target, torch.tensor(TARGETS[6]))
    with pytest.raises(ValueError, match="split"):
        CachedImages(cache, "holdout")


def test_batch_gather_equals_single_items(cache_dir: Path) -> None:
    dataset = CachedImages(cache_dir)
    indices = [7, 0, 4, 3]
    images, targets = dataset.batch(indices)
    single_images, single_targets = collate_uint8([dataset[i] for i in indices])
    assert images.shape == (4, 1, 32, 32) and images.dtype == torch.uint8
    torch.testing.assert_close(images, single_images)
    torch.testing.assert_close(targets, single_targets, equal_nan=True)
    torch.testing.assert_close(collate_uint8(dataset.__getitems__(indices))[0], single_images)


def test_label_selection(cache_dir: Path) -> None:
    dataset = CachedImages(cache_dir, labels=["Hernia", "Atelectasis"])
    torch.testing.assert_close(dataset[7][1], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="Pneumonia"):
        CachedImages(cache_dir, labels=["Pneumonia"])


# ---------------------------------------------------------------- sampler


def test_epoch_shuffle_is_deterministic_per_epoch() -> None:
    sampler = EpochShuffleSampler(50, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    resumed = EpochShuffleSampler(50, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1  # a resumed run sees the same order
    assert list(EpochShuffleSampler(50, seed=4)) != epoch0


# ---------------------------------------------------------------- DataModule


def test_datamodule_batches(cache_dir: Path) -> None:
    module = CXRDataModule(data_config(), cache_dir, seed=0)
    module.setup("fit")
    assert module.labels == LABELS
    loader = module.train_dataloader()
    raw = list(loader)
    assert len(raw) == 2  # 5 training images, batch 2, last partial batch dropped
    assert raw[0][0].dtype == torch.uint8 and raw[0][0].shape == (2, 1, 32, 32)
    images, targets = module.train_transform(raw[0])
    assert images.shape == (2, 1, 24, 24) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.05
    assert targets.shape == (2, 3) and torch.isnan(targets[:, 2]).all()

    val_images, val_targets = module.eval_batch_transform(next(iter(module.val_dataloader())))
    assert val_images.shape == (2, 1, 24, 24) and not torch.isnan(val_targets).any()
    assert len(list(module.test_dataloader())) == 1


def test_train_order_follows_seed_and_epoch(cache_dir: Path) -> None:
    def first_epoch_targets(seed: int, epoch: int) -> torch.Tensor:
        loader = CXRDataModule(data_config(batch_size=5), cache_dir, seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([targets for _, targets in loader])

    torch.testing.assert_close(first_epoch_targets(0, 2), first_epoch_targets(0, 2), equal_nan=True)
    orders = {tuple(first_epoch_targets(0, epoch)[:, 0].tolist()) for epoch in range(6)}
    assert len(orders) > 1


def test_augmentation_disabled_uses_the_eval_transform(cache_dir: Path) -> None:
    module = CXRDataModule(data_config(enabled=False), cache_dir, seed=0)
    batch = next(iter(module.train_dataloader()))
    train_images, _ = module.train_transform(batch)
    eval_images, _ = module.eval_batch_transform(batch)
    torch.testing.assert_close(train_images, eval_images)


def test_train_label_frequencies(cache_dir: Path) -> None:
    module = CXRDataModule(data_config(), cache_dir, seed=0)
    np.testing.assert_allclose(module.train_label_frequencies(), [3 / 5, 1 / 4, np.nan])
    counts = module.train_label_counts()
    assert counts.loc["Effusion", "annotated"] == 4 and counts.loc["Hernia", "annotated"] == 0


def test_labels_from_the_config(cache_dir: Path) -> None:
    config = data_config()
    config.labels = ["Effusion"]
    module = CXRDataModule(config, cache_dir, seed=0)
    assert module.labels == ["Effusion"] and next(iter(module.val_dataloader()))[1].shape == (2, 1)


def test_empty_split_is_a_clear_error(cache_dir: Path, tmp_path: Path) -> None:
    cache = open_cache(cache_dir)
    manifest = cache.manifest.subset(cache.manifest.frame["split"] != "test")
    prepare_cache(manifest, tmp_path / "no_test", image_size=32, workers=1, progress=False)
    with pytest.raises(ValueError, match="no rows with split='test'"):
        CXRDataModule(data_config(), tmp_path / "no_test").test_dataloader()


class _ShapeRecorder(pl.LightningModule):
    """A tiny model that records what the DataModule hands to each step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(24 * 24, 3)
        self.seen: dict[str, list[tuple]] = {"train": [], "val": []}

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, targets = batch
        self.seen[stage].append((tuple(images.shape), images.dtype, float(images.min()), float(images.max())))
        logits = self.layer(images.flatten(1))
        known = ~torch.isnan(targets)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_gets_transformed_float_batches(cache_dir: Path) -> None:
    module = CXRDataModule(data_config(), cache_dir, seed=0)
    model = _ShapeRecorder()
    augmented: list[int] = []
    augment_forward = module.augment.forward
    module.augment.forward = lambda images, generator=None: (
        augmented.append(1) or augment_forward(images, generator)
    )
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=module)
    assert len(model.seen["train"]) == 4 and len(model.seen["val"]) == 2
    assert len(augmented) == 4  # training batches only; validation took the eval transform
    for shape, dtype, low, high in model.seen["train"] + model.seen["val"]:
        assert shape == (2, 1, 24, 24) and dtype == torch.float32 and 0.0 <= low <= high <= 1.0
    assert trainer.train_dataloader.sampler.epoch == 1  # Lightning advanced the seeded sampler
