"""Configuration of the data layer: which datasets, how they are split, cached and augmented."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceConfig:
    """One dataset on disk (or at an fsspec URL) read by a named adapter."""

    adapter: str = "nih"
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitConfig:
    """How images are split into train/val/test, always by patient.

    ``official`` keeps the dataset's own test split (NIH ``test_list.txt``) and carves validation from the
    rest by patient; ``random`` draws test and validation patients with ``seed``; ``kfold`` uses fold
    ``fold`` of ``n_folds`` patient-grouped folds as validation (test stays official when there is one).
    """

    method: str = "official"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    n_folds: int = 5
    fold: int = 0
    seed: int = 0


@dataclass
class CacheConfig:
    """Decoded, resized uint8 images in memory-mappable shards (see :mod:`cxrkit.data.cache`)."""

    dir: str = "runs/cache/${name}-${data.cache.image_size}"
    image_size: int = 256
    resize_policy: str = "letterbox"
    shard_size: int = 1024
    workers: int = 0


@dataclass
class AugmentConfig:
    """Train-time augmentation, applied to whole batches (see :mod:`cxrkit.data.augment`)."""

    enabled: bool = True
    crop_size: int = 224
    rotation_degrees: float = 10.0
    translate_fraction: float = 0.05
    scale_range: tuple[float, float] = (0.9, 1.1)
    crop_area_range: tuple[float, float] = (0.7, 1.0)
    brightness: float = 0.2
    contrast: float = 0.2
    horizontal_flip: bool = False


@dataclass
class LoaderConfig:
    batch_size: int = 32
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    labels: list[str] = field(default_factory=list)
    no_finding: str = "class"
    views: list[str] = field(default_factory=list)
    no_finding_ratio: float | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
