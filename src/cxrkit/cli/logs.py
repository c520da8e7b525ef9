"""Console logging of the ``cxr`` command: one handler, each message once, no third-party advertising.

Lightning's top-level package attaches its own console handler to the ``lightning`` logger whenever it is
imported (``lightning.pytorch`` and ``lightning.fabric`` only do so when the root logger has none), so each
of its messages was printed twice: by that handler (``INFO: ...``) and by the root's (``INFO ...``). The CLI
owns the console: the ``lightning`` logger is made one that ignores console handlers, before Lightning (a
lazy import) creates it.
"""

from __future__ import annotations

import logging
import sys
import warnings

FORMAT = "%(levelname)s %(message)s"
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class NoAdvertising(logging.Filter):
    """Drop Lightning's "💡 Tip: ... try installing litlogger / litmodels" records (no setting turns
    them off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("lightning") and str(record.msg).startswith("💡 Tip:"))


class RootPrinted(logging.Logger):
    """A library logger whose records reach the console only through the root handler."""

    def addHandler(self, handler: logging.Handler) -> None:
        if type(handler) is not logging.StreamHandler:
            super().addHandler(handler)


def setup_logging(level: int) -> None:
    """Root handler on stderr at ``level``; each message printed once, through it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(NoAdvertising())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in LIBRARY_LOGGERS:
        library = _root_printed(name)
        for own in [h for h in library.handlers if type(h) is logging.StreamHandler]:
            library.removeHandler(own)
        library.propagate = True
        library.setLevel(logging.NOTSET)
    logging.captureWarnings(True)
    _filter_known_warnings()


def _root_printed(name: str) -> logging.Logger:
    """The logger ``name``, created as a :class:`RootPrinted` unless it already exists."""
    if isinstance(logging.Logger.manager.loggerDict.get(name), logging.Logger):
        return logging.getLogger(name)
    previous = logging.getLoggerClass()
    logging.setLoggerClass(RootPrinted)
    try:
        return logging.getLogger(name)
    finally:
        logging.setLoggerClass(previous)


def _filter_known_warnings() -> None:
    """Third-party deprecation warnings users cannot act on, each matched by message and module."""
    warnings.filterwarnings(  # Lightning 2.6 calls a pytree API that torch 2.14 deprecates
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
