"""Reading checkpoints and weight files without ever executing code stored in them.

Every torch file cxrkit reads (training checkpoints for resume, test, export and evaluation; pretrained weight
files) goes through :func:`load_checkpoint`: PyTorch's weights-only unpickler, which rebuilds tensors, plain
containers (dict, list, tuple, set, str, numbers) and the classes explicitly allow-listed by the caller, and
refuses everything else. cxrkit stores run configs and hyper-parameters in checkpoints as plain data, so its
own checkpoints (Lightning's resume state included) always pass. A file that would need full unpickling is
refused with one line naming it; it is never "tried anyway".
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

Allowed = Iterable[Any]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or refused because it pickles more than tensors and data."""


def load_checkpoint(path: str | Path, allowed: Allowed = (), content: BinaryIO | None = None) -> Any:
    """The contents of the torch file ``path`` (on CPU), read with ``torch.load(weights_only=True)``.

    ``allowed``: extra classes or functions the file may reference (``torch.serialization.safe_globals``),
    for formats that pickle known classes, e.g. torchxrayvision's whole-model files. ``content``: read this
    stream (a re-encoded copy of ``path``) instead of the file. Raises :class:`CheckpointError` with a
    one-line message naming ``path``.
    """
    path = Path(path)
    if content is None and not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(content or path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: it pickles objects other than tensors and plain data "
            f"({unpickling_detail(error)}); code stored in a checkpoint is never executed"
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {_first_line(error)}") from error


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of a cxrkit run (a dict holding ``state_dict``), via :func:`load_checkpoint`."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def unpickling_detail(error: BaseException) -> str:
    """What torch's weights-only unpickler refused, without the paragraphs of advice torch wraps it in."""
    text = str(error)
    _, found, detail = text.partition("WeightsUnpickler error:")
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in (detail if found else text).splitlines() if line.strip()]
    first = next((line for line in lines if not line.startswith(advice)), "")
    return first.split(" Please use")[0].rstrip(".") or type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
