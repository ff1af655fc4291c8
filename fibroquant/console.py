"""The command line's two consoles: results on stdout, diagnostics on stderr.

``out`` prints what a command answers (the comparison, a table, JSON), so ``fibroquant analyze
... > result.txt`` keeps it. ``err`` prints progress, warnings and errors. Written to a file or a
pipe (cron, a log), ``err`` never wraps a line and starts every line with a UTC timestamp, and
the progress bar is off. Logging goes to ``err`` in the same form.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

__all__ = ["err", "note", "out", "set_quiet", "setup_logging", "warn"]

#: Loggers of libraries that talk at DEBUG level about themselves (fonts, image plugins, JIT),
#: kept at WARNING even with ``-v``.
NOISY_LOGGERS = ("matplotlib", "PIL", "numba", "fontTools", "asyncio", "distributed",
                 "urllib3", "h5py", "tifffile")


class _Console(Console):
    """A console that, when not a terminal, never wraps and timestamps each printed line."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.is_terminal:
            kwargs["soft_wrap"] = True
            if objects and isinstance(objects[0], str):
                objects = (_stamp() + objects[0], *objects[1:])
        super().print(*objects, **kwargs)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ ")


err: Console = _Console(stderr=True, highlight=False)
out: Console = Console(highlight=False, soft_wrap=True)

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """``--quiet``: :func:`note` prints nothing; warnings and errors still print."""
    _state["quiet"] = quiet


def is_quiet() -> bool:
    """Whether ``--quiet`` was given."""
    return _state["quiet"]


def note(message: str) -> None:
    """A progress or status line on stderr (not with ``--quiet``)."""
    if not _state["quiet"]:
        err.print(message, markup=False, highlight=False)


def warn(message: str) -> None:
    """A warning line on stderr (also with ``--quiet``)."""
    err.print(f"[yellow]warning:[/] {_escape(message)}", markup=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _Handler(logging.Handler):
    """Log records as console lines: ``LEVEL name: message`` (the timestamp comes from the
    console when it is not a terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"{record.levelname.lower()}: {record.getMessage()}"
            if record.levelno < logging.WARNING:
                text = f"{record.levelname.lower()} {record.name}: {record.getMessage()}"
            style = "yellow" if record.levelno == logging.WARNING else (
                "red" if record.levelno > logging.WARNING else "dim")
            err.print(f"[{style}]{_escape(text)}[/]", markup=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Route logging to the stderr console: WARNING by default, DEBUG with ``verbose`` (for
    fibroquant; the libraries in :data:`NOISY_LOGGERS` stay at WARNING), ERROR with ``quiet``
    is not applied: warnings always reach the console."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):
            root.removeHandler(h)
    root.addHandler(_Handler())
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    set_quiet(quiet)
