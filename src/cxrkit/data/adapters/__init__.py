"""Dataset adapters: each turns one dataset's layout on disk into a :class:`~cxrkit.data.manifest.Manifest`.

An adapter is a function ``adapter(root: str, **options) -> Manifest`` registered under a short name with
:func:`register`; :func:`load_source` runs the one a :class:`~cxrkit.data.config.SourceConfig` names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cxrkit.data.config import SourceConfig
from cxrkit.data.manifest import Manifest

Adapter = Callable[..., Manifest]

_REGISTRY: dict[str, Adapter] = {}
_MODULES = ("nih", "padchest", "openi", "chexpert", "folder", "huggingface", "table")


def register(name: str) -> Callable[[Adapter], Adapter]:
    """Register ``function`` as the adapter called ``name``."""

    def decorator(function: Adapter) -> Adapter:
        _REGISTRY[name] = function
        return function

    return decorator


def _import_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"{__name__}.{module}")


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get(name: str) -> Adapter:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset adapter {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def load_source(source: SourceConfig) -> Manifest:
    """Run the adapter named by ``source.adapter`` on ``source.root`` with ``source.options``."""
    if not source.root:
        raise ValueError(f"data source {source.adapter!r} has no 'root' (the dataset folder or URL)")
    return get(source.adapter)(str(source.root), **dict(source.options))
