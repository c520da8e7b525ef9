"""A complete, tiny ``cxr train`` config for the tests that train, evaluate, explain or export a real run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_run_config(
    name: str,
    output_dir: Path,
    sources: list[dict[str, Any]],
    cache_dir: Path,
    *,
    image_size: int = 64,
    crop_size: int = 56,
    batch_size: int = 16,
    seed: int = 0,
    data: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """timm's tiny test ResNet on the CPU for one epoch (CSV logs, AdamW, no LR schedule), as a dict to dump
    as YAML; ``data``/``train`` add or replace entries of those sections (with ``stages``, no ``max_epochs``:
    the stages decide the length)."""
    train_section = {
        "max_epochs": 1,
        "loggers": ["csv"],
        "accelerator": "cpu",
        "devices": "1",
        "log_every_n_steps": 1,
        "optimizer": {"name": "adamw", "lr": 0.003},
        "scheduler": {"name": "none"},
        **(train or {}),
    }
    if "stages" in train_section:
        del train_section["max_epochs"]
    return {
        "name": name,
        "seed": seed,
        "output_dir": str(output_dir),
        "data": {
            "sources": sources,
            "no_finding": "zeros",
            "cache": {"dir": str(cache_dir), "image_size": image_size, "workers": 1},
            "augment": {"crop_size": crop_size},
            "loader": {"batch_size": batch_size},
            **(data or {}),
        },
        "model": {"arch": "test_resnet", "pretrained": {"source": "none"}},
        "train": train_section,
    }
