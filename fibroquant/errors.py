"""Project exceptions.

Every error a user can cause raises a :class:`FibroquantError` subclass whose message names the
file (or setting) and what is wrong with it. The command line turns them into one line on stderr.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FibroquantError(Exception):
    """Base class of every error fibroquant raises on purpose."""


class SlideReadError(FibroquantError):
    """A slide file cannot be read: missing, empty, truncated, corrupt or unsupported."""


class MissingResolutionError(SlideReadError):
    """A slide has no usable µm-per-pixel metadata and none was given."""


class NotColourError(FibroquantError):
    """A slide can be read but holds no colour (a greyscale image): no stain to measure."""


class ConfigError(FibroquantError, ValueError):
    """A configuration file or option is invalid."""


class SampleSheetError(FibroquantError, ValueError):
    """The sample sheet is missing, malformed or does not match the slides folder."""


class StoreError(FibroquantError):
    """The results store cannot be opened or written."""


class StoreLockedError(StoreError):
    """Another fibroquant run holds the lock on the output folder."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received (``kill``, a batch scheduler, ``systemctl stop``): handled like Ctrl-C,
    with exit code 143 instead of 130 (see :func:`sigterm_as_interrupt`)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread, so a run
    stops as on Ctrl-C: slides finished so far are kept, worker processes are ended, and the
    command exits 143 with one line. Elsewhere than the main thread: no change."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(exc: BaseException) -> int:
    """128 + the signal: 143 for SIGTERM (:class:`Terminated`), 130 for Ctrl-C."""
    return 143 if isinstance(exc, Terminated) else 130


#: Environment variable that tells worker processes to call :func:`quiet_warnings`.
QUIET_ENV = "FIBROQUANT_QUIET_WARNINGS"


def quiet_warnings() -> None:
    """One line per warning (``warning: ...``, no source line), and tifffile's own log only at
    CRITICAL: the one-line error of a damaged file already says what is wrong with it. Used
    by the command line (without ``-v``) and its worker processes."""
    import logging
    import os
    import warnings

    warnings.formatwarning = _one_line_warning  # type: ignore[assignment]
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    os.environ[QUIET_ENV] = "1"  # inherited by worker processes (see executor.run_slide_pinned)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"
