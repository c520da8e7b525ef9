"""Where MLflow records go by default: a SQLite store in the run (or study) folder, artifacts beside it."""

from __future__ import annotations

from pathlib import Path

MLRUNS_DIR = "mlruns"
_SQLITE = "sqlite:///"


def default_tracking_uri(folder: str | Path) -> str:
    """``sqlite:///<folder>/mlruns/mlflow.db`` (absolute), creating the store folder."""
    store = (Path(folder) / MLRUNS_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE}{store / 'mlflow.db'}"


def local_artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go next to it (MLflow's default is ./mlruns in the working dir)."""
    if not uri.startswith(_SQLITE):
        return None
    return (Path(uri[len(_SQLITE) :]).parent / "artifacts").resolve().as_uri()
