"""Torch datasets and the Lightning DataModule over a preprocessing cache (:mod:`cxrkit.data.cache`).

Loading is cheap indexing into memory-mapped uint8 shards; batches travel as uint8 and become float [0, 1]
on the training device, where :class:`~cxrkit.data.augment.BatchAugment` (train) or
:func:`~cxrkit.data.augment.eval_transform` (val/test) runs on the whole batch. A batch is
``(images float32 [B, 1, C, C] in [0, 1], targets float32 [B, L])`` with NaN marking unknown labels;
intensity normalisation belongs to the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cxrkit.data.augment import BatchAugment, eval_transform, mixup
from cxrkit.data.cache import Cache, open_cache
from cxrkit.data.config import DataConfig
from cxrkit.data.manifest import SPLITS

Sample = tuple[torch.Tensor, torch.Tensor]


class CachedImages(Dataset[Sample]):
    """The cached images of one split (all rows when ``split`` is None) with their targets.

    An item is ``(uint8 tensor [1, S, S], float32 tensor [L])``, NaN for unknown labels. ``labels`` picks and
    orders label columns (default: the cache's). ``__getitems__`` gathers a whole batch from the memmaps at
    once, which the DataLoader uses automatically.
    """

    def __init__(
        self, cache: Cache | str | os.PathLike, split: str | None = None, labels: Sequence[str] | None = None
    ):
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        frame = self.cache.manifest.frame
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        self.split = split
        self.rows = (
            np.arange(len(frame)) if split is None else np.flatnonzero(frame["split"].to_numpy() == split)
        )
        self.labels = list(labels) if labels else self.cache.labels
        unknown = [label for label in self.labels if label not in self.cache.labels]
        if unknown:
            raise ValueError(
                f"labels {unknown} are not in cache {self.cache.out_dir} (it has {self.cache.labels})"
            )
        self.targets = torch.from_numpy(frame[self.labels].to_numpy(dtype=np.float32)[self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        image = torch.from_numpy(np.array(self.cache.image(int(self.rows[index]))))
        return image.unsqueeze(0), self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        return _GatheredSamples(self.batch(indices))

    def batch(self, indices: Sequence[int] | np.ndarray) -> Sample:
        """Images ``uint8 [B, 1, S, S]`` and targets ``float32 [B, L]`` of ``indices`` in one gather."""
        indices = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.cache.images(self.rows[indices])).unsqueeze(1)
        return images, self.targets[torch.from_numpy(indices)]

    def label_counts(self) -> pd.DataFrame:
        """Per label: positives, annotated (non-NaN) and frequency = positives / annotated (NaN if none)."""
        targets = self.targets.numpy()
        annotated = (~np.isnan(targets)).sum(axis=0)
        positives = np.nansum(targets, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            frequency = np.where(annotated > 0, positives / annotated, np.nan)
        return pd.DataFrame(
            {"positives": positives.astype(np.int64), "annotated": annotated, "frequency": frequency},
            index=self.labels,
        )


class _GatheredSamples(list):
    """The samples of a batch gathered at once; keeps the stacked tensors so collation is free."""

    def __init__(self, stacked: Sample) -> None:
        super().__init__(zip(*stacked, strict=True))
        self.stacked = stacked


def collate_uint8(samples: list[Sample]) -> Sample:
    """Stack samples into ``(uint8 [B, 1, S, S], float32 [B, L])``."""
    if isinstance(samples, _GatheredSamples):
        return samples.stacked
    images, targets = zip(*samples, strict=True)
    return torch.stack(images), torch.stack(targets)


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from ``(seed, epoch)``: every epoch differs, and a resumed run sees the same order.

    Lightning calls :meth:`set_epoch` at the start of each training epoch.
    """

    def __init__(self, n_items: int, seed: int) -> None:
        self.n_items = int(n_items)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_items

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_items)
        return iter(order.tolist())


class CXRDataModule(pl.LightningDataModule):
    """Train/val/test loaders over a cache, augmenting on the device after transfer.

    ``data_cfg`` is a :class:`~cxrkit.data.config.DataConfig` (its ``labels``, ``augment`` and ``loader``
    are used); ``cache_dir`` a finished cache; ``seed`` drives the shuffling and the augmentation, both
    reseeded from ``(seed, epoch)`` each epoch. ``eval_mode`` is :func:`eval_transform`'s ``mode``.
    """

    def __init__(
        self, data_cfg: DataConfig, cache_dir: str | os.PathLike, seed: int = 0, eval_mode: str = "resize"
    ):
        super().__init__()
        self.cfg = data_cfg
        self.cache_dir = cache_dir
        self.seed = int(seed)
        self.eval_mode = eval_mode
        self.augment = BatchAugment(data_cfg.augment, seed=self.seed)
        if data_cfg.augment.mixup_alpha < 0:
            raise ValueError(f"data.augment.mixup_alpha must be >= 0, got {data_cfg.augment.mixup_alpha}")
        self._cache: Cache | None = None
        self._datasets: dict[str, CachedImages] = {}
        self._augment_epoch: int | None = None

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            self._cache = open_cache(self.cache_dir)
        return self._cache

    @property
    def labels(self) -> list[str]:
        return list(self.cfg.labels) if self.cfg.labels else self.cache.labels

    @property
    def crop_size(self) -> int:
        return int(self.cfg.augment.crop_size)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self.dataset(split)

    def dataset(self, split: str) -> CachedImages:
        if split not in self._datasets:
            self._datasets[split] = CachedImages(self.cache, split, self.labels)
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        dataset = self._non_empty("train")
        loader = self.cfg.loader
        sampler = EpochShuffleSampler(len(dataset), self.seed)
        return self._loader(dataset, sampler=sampler, drop_last=len(dataset) > int(loader.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._non_empty("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._non_empty("test"))

    def _non_empty(self, split: str) -> CachedImages:
        dataset = self.dataset(split)
        if len(dataset) == 0:
            raise ValueError(
                f"cache {self.cache.out_dir} has no rows with split={split!r}: assign splits in the manifest "
                "before caching"
            )
        return dataset

    def _loader(
        self, dataset: CachedImages, sampler: Sampler | None = None, drop_last: bool = False
    ) -> DataLoader:
        loader = self.cfg.loader
        workers = int(loader.num_workers)
        return DataLoader(
            dataset,
            batch_size=int(loader.batch_size),
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            collate_fn=collate_uint8,
            num_workers=workers,
            pin_memory=bool(loader.pin_memory),
            persistent_workers=workers > 0,
        )

    def on_after_batch_transfer(self, batch: Sample, dataloader_idx: int) -> Sample:
        """uint8 → float [0, 1], then augmentation while training, else the eval transform."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self._reseed_augment(trainer.current_epoch)
            return self.train_transform(batch)
        return self.eval_batch_transform(batch)

    def train_transform(self, batch: Sample) -> Sample:
        """Augmentation (or the eval transform when disabled), then mixup when ``augment.mixup_alpha``."""
        images, targets = batch
        if self.cfg.augment.enabled:
            images = self.augment(images)  # scales uint8 to [0, 1] in its intensity pass
        else:
            images = eval_transform(to_unit_float(images), self.crop_size, self.eval_mode)
        alpha = float(self.cfg.augment.mixup_alpha)
        return mixup(images, targets, alpha, len(self.labels), self.augment.generator)

    def eval_batch_transform(self, batch: Sample) -> Sample:
        images, targets = batch
        return eval_transform(to_unit_float(images), self.crop_size, self.eval_mode), targets

    def _reseed_augment(self, epoch: int) -> None:
        if epoch != self._augment_epoch:
            self.augment.reseed(int(np.random.default_rng([self.seed, epoch, 1]).integers(2**63)))
            self._augment_epoch = epoch

    def train_label_counts(self) -> pd.DataFrame:
        """Positives, annotated and frequency per label over the training split."""
        return self.dataset("train").label_counts()

    def train_label_frequencies(self) -> np.ndarray:
        """positives / annotated per label over the training split (NaN where never annotated), in ``labels``
        order, e.g. for class-weighted losses."""
        return self.train_label_counts()["frequency"].to_numpy(dtype=np.float64)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1] (float input is returned unchanged)."""
    if images.is_floating_point():
        return images
    return images.to(torch.float32).div_(255.0)
