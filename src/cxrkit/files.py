"""Files written all at once: a reader (or a crash) sees the old file or the new one, never a part."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` by ``data`` (bytes, or a function writing to a binary file) all at once; return it.

    The data goes to a temporary file ``.<name>.tmp-<pid>`` in the same folder, is flushed to disk and renamed
    over ``path``; the folder is synced so the rename survives a crash. On any error (Ctrl-C included) the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            if callable(data):
                data(file)
            else:
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def fsync_directory(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename or an unlink in it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
