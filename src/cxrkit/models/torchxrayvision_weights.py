"""torchxrayvision's chest X-ray DenseNet-121 weights (e.g. ``densenet121-res224-all``) on timm's
``densenet121``.

torchxrayvision stores these weights as whole pickled models in ``~/.torchxrayvision/models_data``. They are
read here with ``torch.load(weights_only=True)``, allowing only nn.Module classes of ``torch.nn`` and
``torchxrayvision.models`` to be rebuilt: no other code in the file can run. Nothing is downloaded: offline
without the cached file is an error telling where to put it. The parameter names are torchvision's DenseNet
names, which timm's ``densenet121`` shares; the 18-pathology classifier is dropped.

torchxrayvision models take one gray channel scaled to [-1024, 1024] (``x·2048 − 1024`` for x in [0, 1]):
mean 0.5, std 1/2048.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import pickle
import types
import zipfile
from pathlib import Path
from typing import ClassVar

import torch
from torch import _weights_only_unpickler, nn

from cxrkit.models.pretrained import PretrainedWeightsError, unwrap_checkpoint

DEFAULT_WEIGHTS = "densenet121-res224-all"
XRV_ARCHS = ("densenet121",)
XRV_MEAN = (0.5,)
XRV_STD = (1.0 / 2048.0,)


def _torchxrayvision():
    try:
        return importlib.import_module("torchxrayvision")
    except ImportError as error:
        raise ImportError(
            "model.pretrained.source=torchxrayvision needs the torchxrayvision package "
            "(pip install torchxrayvision)"
        ) from error


def densenet_weight_names() -> list[str]:
    xrv = _torchxrayvision()
    return sorted(name for name in xrv.models.model_urls if name.startswith("densenet121"))


def weights_url(name: str) -> str:
    xrv = _torchxrayvision()
    if name not in densenet_weight_names():
        raise ValueError(
            f"model.pretrained.name: unknown torchxrayvision DenseNet-121 weights {name!r}; "
            f"choose one of {', '.join(densenet_weight_names())}"
        )
    return xrv.models.model_urls[name]["weights_url"]


def weights_file(name: str = "", path: str | Path = "") -> Path:
    """The cached weights file of ``name``: ``path`` itself if it is a file, else inside the folder ``path``
    or torchxrayvision's cache folder. Raises when it is not there (nothing is downloaded)."""
    name = name or DEFAULT_WEIGHTS
    url = weights_url(name)
    filename = url.rsplit("/", 1)[-1]
    if path and Path(path).expanduser().is_file():
        return Path(path).expanduser()
    folder = Path(path).expanduser() if path else Path(_torchxrayvision().utils.get_cache_dir())
    candidate = folder / filename
    if not candidate.is_file():
        raise PretrainedWeightsError(
            f"torchxrayvision weights {name!r} are not cached: {candidate} does not exist. Download {url} to "
            "that path (or run torchxrayvision once online: xrv.models.DenseNet(weights=...)), point "
            "model.pretrained.path at the file, or use source=efficientnet-lite or source=none offline."
        )
    return candidate


def _allowed_module_classes() -> list[type]:
    xrv = _torchxrayvision()
    return [
        obj
        for namespace in (vars(nn), vars(xrv.models))
        for obj in namespace.values()
        if isinstance(obj, type) and issubclass(obj, nn.Module)
    ]


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler resolving only torch's ``weights_only`` globals and the allowed nn.Module classes."""

    allowed: ClassVar[dict[str, object]] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names of protocol-2 pickles
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module}.{name}"
        if key not in self.allowed:
            raise pickle.UnpicklingError(f"global {key} is not allowed in a weights file")
        return self.allowed[key]


def _restricted_pickle_module() -> types.ModuleType:
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update({f"{cls.__module__}.{cls.__qualname__}": cls for cls in _allowed_module_classes()})
    unpickler = type("RestrictedUnpickler", (_RestrictedUnpickler,), {"allowed": allowed})
    module = types.ModuleType("cxrkit_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    return module


def _load_restricted(path: Path) -> object:
    if zipfile.is_zipfile(path):
        with torch.serialization.safe_globals(_allowed_module_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    # legacy (pre-1.6) format, which torch's weights_only loader cannot read when it holds modules
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())


def read_pickled_model(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a pickled torchxrayvision model (or of a plain checkpoint), without running code:
    only torch's ``weights_only`` globals and nn.Module classes of ``torch.nn``/``torchxrayvision.models``
    can be rebuilt, in the zip and in the legacy torch format."""
    try:
        checkpoint = _load_restricted(path)
    except pickle.UnpicklingError as error:
        raise PretrainedWeightsError(
            f"{path}: refused to load: it references objects outside torch.nn and torchxrayvision model "
            f"classes, and code stored in a weights file is never executed. Detail: {error}"
        ) from error
    if isinstance(checkpoint, nn.Module):
        return dict(checkpoint.state_dict())
    return unwrap_checkpoint(checkpoint, str(path))


def torchxrayvision_state_dict(
    arch: str, name: str = "", path: str | Path = ""
) -> tuple[dict[str, torch.Tensor], Path]:
    """torchxrayvision DenseNet-121 weights in timm ``densenet121`` names, and their file."""
    if arch not in XRV_ARCHS:
        raise ValueError(
            f"model.pretrained.source=torchxrayvision needs model.arch in {', '.join(XRV_ARCHS)}; "
            f"got {arch!r}"
        )
    file = weights_file(name, path)
    return read_pickled_model(file), file
