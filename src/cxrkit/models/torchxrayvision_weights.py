"""torchxrayvision's chest X-ray DenseNet-121 weights (e.g. ``densenet121-res224-all``) on timm's
``densenet121``.

torchxrayvision stores these weights as whole pickled models in ``~/.torchxrayvision/models_data``. They are
read with PyTorch's weights-only unpickler and an explicit allowlist (the nn.Module classes of ``torch.nn``
and ``torchxrayvision.models``): no other code in the file can run. Nothing is downloaded: offline
without the cached file is an error telling where to put it. The parameter names are torchvision's DenseNet
names, which timm's ``densenet121`` shares; the 18-pathology classifier is dropped.

torchxrayvision models take one gray channel scaled to [-1024, 1024] (``x·2048 − 1024`` for x in [0, 1]):
mean 0.5, std 1/2048.
"""

from __future__ import annotations

import importlib
import io
import pickle
import pickletools
import zipfile
from pathlib import Path

import torch
from torch import nn

from cxrkit.models.checkpoint import CheckpointError, load_checkpoint
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


def module_class(persistent_id: tuple) -> type:
    """The class in a legacy ``('module', class, source file, source)`` record (:func:`legacy_as_loadable`);
    the class itself was already checked against the allowlist by torch's unpickler."""
    kind = persistent_id[0].decode("ascii") if isinstance(persistent_id[0], bytes) else persistent_id[0]
    if kind != "module" or not isinstance(persistent_id[1], type):
        raise pickle.UnpicklingError(f"unexpected persistent record {kind!r} in a legacy torch file")
    return persistent_id[1]


_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
_PUT_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}
_GET_OPS = {"BINGET", "LONG_BINGET", "GET"}
_MODULE_CLASS = f"c{module_class.__module__}\n{module_class.__qualname__}\n".encode()
_TUPLE1_REDUCE = pickle.TUPLE1 + pickle.REDUCE


def legacy_as_loadable(data: bytes) -> io.BytesIO:
    """A legacy (pre-1.6, non-zip) torch file re-encoded for torch's weights-only unpickler.

    That unpickler rejects the legacy format's ``('module', class, file, source)`` persistent records (by
    which it names nn.Module classes). Each is rewritten, opcode for opcode, into a call of
    :func:`module_class` on the same tuple, so the class goes through the unpickler's allowlist like any
    other global. Nothing is unpickled here: the pickle opcodes are only scanned (``pickletools``).
    """
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        for _ in pickletools.genops(stream):
            pass
    start = stream.tell()
    out, copied = bytearray(data[:start]), start
    marks: list[int] = []  # positions of the open MARKs
    memo: dict[int, object] = {}
    previous: tuple[str, object] = ("", None)
    tuple_start = -1  # MARK position of the tuple just built (until another opcode than a memo put)
    for opcode, arg, position in pickletools.genops(stream):
        name = opcode.name
        if pickletools.markobject in opcode.stack_before:
            mark = marks.pop()
            tuple_start = mark if name == "TUPLE" else -1
        elif name in _PUT_OPS and previous[0] in _STRING_OPS:
            memo[int(arg)] = previous[1]
        elif name == "BINPERSID" and tuple_start >= 0 and _starts_with_module(data, tuple_start, memo):
            out += data[copied:tuple_start] + _MODULE_CLASS + data[tuple_start:position] + _TUPLE1_REDUCE
            copied = position + 1
        if name == "MARK":
            marks.append(position)
        if name != "TUPLE" and name not in _PUT_OPS:
            tuple_start = -1
        previous = (name, arg)
    out += data[copied:]
    return io.BytesIO(bytes(out))


def _starts_with_module(data: bytes, mark: int, memo: dict[int, object]) -> bool:
    """Whether the tuple opened by the MARK at ``mark`` starts with the string ``'module'``."""
    opcode, arg, _ = next(pickletools.genops(io.BytesIO(data[mark + 1 : mark + 64])))
    if opcode.name in _GET_OPS:
        arg = memo.get(int(arg))
    return arg in ("module", b"module")


def read_pickled_model(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a pickled torchxrayvision model (or of a plain checkpoint), without running code.

    Read by torch's weights-only unpickler allowing only nn.Module classes of ``torch.nn`` and
    ``torchxrayvision.models`` besides tensors and plain data, in the zip and in the legacy torch format."""
    allowed = _allowed_module_classes()
    content = None
    if not zipfile.is_zipfile(path):
        try:
            content = legacy_as_loadable(Path(path).read_bytes())
        except (ValueError, EOFError, IndexError) as error:  # pickletools: not a torch pickle
            raise PretrainedWeightsError(f"{path}: not a readable torch file: {error}") from error
        allowed.append(module_class)
    try:
        checkpoint = load_checkpoint(path, allowed, content)
    except CheckpointError as error:
        raise PretrainedWeightsError(str(error)) from error
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
