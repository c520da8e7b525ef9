"""Configuration of the data layer: which datasets, how they are split, cached and augmented.

Choice fields are ``Literal`` types, so OmegaConf rejects any other value when the config loads;
:func:`check_data` adds the checks a type cannot express (ranges, known adapters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SplitMethod = Literal["official", "random", "kfold"]
ResizePolicy = Literal["letterbox", "crop", "stretch"]
EvalMode = Literal["resize", "center_crop"]
Intensity = Literal["none", "equalize", "clahe"]
NoFinding = Literal["class", "zeros"]
View = Literal["PA", "AP", "LAT", "OTHER"]


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

    method: SplitMethod = "official"
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
    resize_policy: ResizePolicy = "letterbox"
    intensity: Intensity = "none"  # contrast normalisation before resizing: equalize or clahe (transforms)
    shard_size: int = 1024
    workers: int = 0


@dataclass
class AugmentConfig:
    """Train-time augmentation, applied to whole batches (see :mod:`cxrkit.data.augment`).

    ``eval_mode``: how a cached image becomes the ``crop_size`` model input at evaluation and inference:
    ``resize`` the whole image, or ``center_crop`` its middle.
    """

    enabled: bool = True
    crop_size: int = 224
    eval_mode: EvalMode = "resize"
    rotation_degrees: float = 10.0
    translate_fraction: float = 0.05
    scale_range: tuple[float, float] = (0.9, 1.1)
    aspect_range: tuple[float, float] = (1.0, 1.0)  # width:height stretch of the film, log-uniform
    crop_area_range: tuple[float, float] = (0.7, 1.0)
    brightness: float = 0.2
    contrast: float = 0.2
    horizontal_flip: bool = False
    # acquisition-style jitter (identity by default): resolution loss, blur/sharpen, gamma, noise
    downscale_range: tuple[float, float] = (1.0, 1.0)
    sharpness: float = 0.0
    blur_sigma: float = 1.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    noise_std: float = 0.0
    mixup_alpha: float = 0.0  # > 0: mixup of images and targets, λ ~ Beta(alpha, alpha) (0.2 is usual)


@dataclass
class LoaderConfig:
    batch_size: int = 32
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class DataConfig:
    """``no_finding``: ``class`` keeps "No Finding" as a label, ``zeros`` drops it (an all-zero row).
    ``views``: keep only these view positions (empty: all). ``no_finding_ratio``: at most this many
    no-finding training images per image with a finding (None: all)."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    labels: list[str] = field(default_factory=list)
    no_finding: NoFinding = "class"
    views: list[View] = field(default_factory=list)
    no_finding_ratio: float | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)


def check_data(data: Any) -> list[str]:
    """What is wrong with ``data`` beyond its types (one message per problem, naming the field)."""
    from cxrkit.data.adapters import available

    problems = []
    for index, source in enumerate(data.sources):
        if source.adapter not in available():
            problems.append(
                f"data.sources.{index}.adapter: unknown adapter {source.adapter!r}; "
                f"available: {', '.join(available())}"
            )
    split = data.split
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= split[name] < 1:
            problems.append(f"data.split.{name} must be in [0, 1), got {split[name]}")
    if split.val_fraction + split.test_fraction >= 1:
        problems.append("data.split.val_fraction + test_fraction must be below 1 (train needs patients)")
    if split.method == "kfold":
        if split.n_folds < 2:
            problems.append(f"data.split.n_folds must be at least 2, got {split.n_folds}")
        elif not 0 <= split.fold < split.n_folds:
            problems.append(f"data.split.fold must be in [0, {split.n_folds}), got {split.fold}")
    if data.no_finding_ratio is not None and data.no_finding_ratio <= 0:
        problems.append(f"data.no_finding_ratio must be positive (or null), got {data.no_finding_ratio}")
    sizes = ["cache.image_size", "cache.shard_size", "augment.crop_size", "loader.batch_size"]
    problems += _positive(data, sizes)
    problems += _non_negative(data, ["cache.workers", "loader.num_workers"])
    augment = data.augment
    if augment.crop_size > data.cache.image_size:
        problems.append(
            f"data.augment.crop_size ({augment.crop_size}) exceeds data.cache.image_size "
            f"({data.cache.image_size})"
        )
    for name in ("translate_fraction", "brightness", "contrast"):
        if not 0 <= augment[name] < 1:
            problems.append(f"data.augment.{name} must be in [0, 1), got {augment[name]}")
    for name in ("scale_range", "crop_area_range"):
        low, high = augment[name]
        if not 0 < low <= high:
            problems.append(f"data.augment.{name} must be [low, high], 0 < low <= high; got [{low}, {high}]")
    if augment.crop_area_range[1] > 1:
        problems.append(f"data.augment.crop_area_range must not exceed 1, got {augment.crop_area_range[1]}")
    return problems


def _positive(section: Any, paths: list[str]) -> list[str]:
    return [
        f"data.{path} must be positive, got {value}"
        for path, value in ((path, _select(section, path)) for path in paths)
        if value <= 0
    ]


def _non_negative(section: Any, paths: list[str]) -> list[str]:
    return [
        f"data.{path} must be >= 0, got {value}"
        for path, value in ((path, _select(section, path)) for path in paths)
        if value < 0
    ]


def _select(section: Any, path: str) -> Any:
    for key in path.split("."):
        section = section[key]
    return section
