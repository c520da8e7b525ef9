"""Shared fixtures: the real images in ../shared/data and small synthetic data."""

from __future__ import annotations

from pathlib import Path

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
