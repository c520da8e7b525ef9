"""Models: any timm backbone with a chest X-ray head, 1-channel input and pretrained sources.

Names are loaded on first use, so ``import cxrkit.models.config`` stays light (no timm import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CXRModel": "cxrkit.models.factory",
    "cam_reshape_transform": "cxrkit.models.factory",
    "cam_target_layer": "cxrkit.models.factory",
    "create_model": "cxrkit.models.factory",
    "layer_groups": "cxrkit.models.factory",
    "LoadReport": "cxrkit.models.pretrained",
    "PretrainedWeightsError": "cxrkit.models.pretrained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
