"""Shared fixtures: the real images in ../shared/data and small synthetic data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real chest X-rays (../shared/data); skips the test with a message when absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see its README in the project docs)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nih_sample(shared_data: Path) -> Path:
    return shared_data / "nih"


@pytest.fixture(scope="session")
def pneumonia_root(shared_data: Path) -> Path:
    return shared_data / "pneumonia"


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory, nih_sample: Path, pneumonia_root: Path) -> Path:
    """A data root like ../shared/data: 48 NIH and 2x24 pneumonia images (symlinks to the real ones)."""
    root = tmp_path_factory.mktemp("tiny-data")
    nih = root / "nih"
    (nih / "images").mkdir(parents=True)
    entries = pd.read_csv(nih_sample / "Data_Entry_2017_subset.csv").head(48)
    entries.to_csv(nih / "Data_Entry_2017_subset.csv", index=False)
    for name in entries["Image Index"]:
        (nih / "images" / name).symlink_to(nih_sample / "images" / name)
    (nih / "official_split").symlink_to(nih_sample / "official_split")
    (nih / "BBox_List_2017_subset.csv").symlink_to(nih_sample / "BBox_List_2017_subset.csv")
    for label in ("NORMAL", "PNEUMONIA"):
        folder = root / "pneumonia" / "train" / label
        folder.mkdir(parents=True)
        for image in sorted((pneumonia_root / "train" / label).glob("*.jpeg"))[:24]:
            (folder / image.name).symlink_to(image)
    return root
