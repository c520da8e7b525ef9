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


#: How :func:`detect` recognises a layout: adapter -> file patterns under the root (first match wins).
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("nih", ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz", "sample_labels.csv")),
    ("padchest", ("PADCHEST_*.csv", "PADCHEST_*.csv.gz")),
    ("chexpert", ("train.csv", "valid.csv")),
)


def detect(root: str) -> str:
    """The adapter whose layout the folder ``root`` fits: a label file of NIH, PadChest or CheXpert, else
    class subfolders of images (``folder``); ValueError naming what was looked for otherwise."""
    from cxrkit.data.adapters._common import Location

    location = Location.of(root)
    location.require_dir("dataset")
    for name, patterns in _SIGNATURES:
        if any(location.fs.glob(location.join(pattern)) for pattern in patterns):
            return name
    entries = location.fs.ls(location.root, detail=True)
    if any(entry["type"] == "directory" for entry in entries):
        return "folder"
    raise ValueError(
        f"cannot tell which dataset {root} is: no NIH/PadChest/CheXpert label file and no class subfolders; "
        "pass a config (--data CONFIG.yaml) naming the adapter"
    )


def load_source(source: SourceConfig) -> Manifest:
    """Run the adapter named by ``source.adapter`` on ``source.root`` with ``source.options``."""
    if not source.root:
        raise ValueError(f"data source {source.adapter!r} has no 'root' (the dataset folder or URL)")
    return get(source.adapter)(str(source.root), **dict(source.options))
