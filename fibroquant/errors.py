"""Project exceptions.

Every error a user can cause raises a :class:`FibroquantError` subclass whose message names the
file (or setting) and what is wrong with it. The command line turns them into one line on stderr.
"""

from __future__ import annotations


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
