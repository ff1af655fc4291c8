"""Project exceptions.

Every error a user can cause raises a :class:`FibroquantError` subclass whose message names the
file (or setting) and what is wrong with it. The command line turns them into one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def name_list(items: Sequence[object], limit: int = 3, *, quote: bool = True) -> str:
    """Names for a one-line message: the first ``limit``, then how many more.

    >>> name_list(["a.tif", "b.tif", "c.tif", "d.tif", "e.tif"])
    "'a.tif', 'b.tif', 'c.tif' and 2 more"
    >>> name_list([3, 7], quote=False)
    '3, 7'
    """
    shown = ", ".join(repr(str(i)) if quote else str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


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


_held = 0
_pending: KeyboardInterrupt | None = None


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM (as handled by :func:`sigterm_as_interrupt`) wait
    until it ends: for steps that must not be cut in two (a worker process being started,
    which would escape the run's clean-up)."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if _held == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc


_received: KeyboardInterrupt | None = None


def received_interrupt() -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM this process received within :func:`sigterm_as_interrupt`, if any:
    once interrupted, a command exits 130/143 even when what follows fails (an import cut in
    two by the signal can break a later import of the same package)."""
    return _received


def _on_signal(signum: int, frame: object) -> None:
    global _pending, _received
    import signal

    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    _received = _received or exc
    if _held:
        _pending = _pending or exc
        return
    raise exc


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (and Ctrl-C KeyboardInterrupt) in
    the main thread, except inside :func:`interrupts_held`, so a run stops as on Ctrl-C:
    slides finished so far are kept, worker processes are ended, and the command exits 143
    with one line. Elsewhere than the main thread: no change."""
    import signal
    import threading

    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None  # this block's interrupt, not an earlier command's in the same process
    previous_term = signal.signal(signal.SIGTERM, _on_signal)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def exit_143_on_sigterm() -> None:
    """Outside a run's :func:`sigterm_as_interrupt` block (settings read, tables already
    written, the process ending), SIGTERM ends the command with exit 143 and one line, not a
    bare signal death: a scheduler sees the same code whenever it stops the command."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _exit(signum: int, frame: object) -> None:
        sys.stderr.write("terminated (SIGTERM)\n")
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _exit)


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

    warnings.formatwarning = _one_line_warning
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    os.environ[QUIET_ENV] = "1"  # inherited by worker processes (see executor.run_slide_pinned)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"
