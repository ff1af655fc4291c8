"""The output folder: one run at a time (:class:`OutputLock`), files replaced atomically
(:func:`atomic_write_bytes`, the one writer every module uses), and the temporary files a killed
writer leaves behind removed (:func:`remove_stale_temp_files`, :func:`clean_output_folder`).

Every output file is written as ``.NAME.XXXXXXXX.fibroquant-tmp`` in its own folder, fsynced,
then renamed over ``NAME``: a reader sees the old or the new file, never part of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import faulthandler
import fcntl
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from fibroquant.errors import StoreError, StoreLockedError
from fibroquant.layout import LOCK_NAME, MEASURING_NAME

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: Suffix of the temporary files :func:`atomic_write_bytes` creates next to its target.
TEMP_SUFFIX = ".fibroquant-tmp"
#: Temporary files of earlier versions' report writer (``.NAME.XXXXXXXX.tmp``, from
#: :func:`tempfile.mkstemp`), removed by the same cleanup.
_LEGACY_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
#: Folders of an output folder that writers put files in (cleaned of temporary files).
OUTPUT_SUBFOLDERS = ("qc", "masks", "geojson", "plots")


def _now() -> str:
    """The current UTC time as an ISO 8601 string with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _umask() -> int:
    """Return the process umask without changing it (Linux), or by a quick set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry change to disk; a no-op where directories cannot be fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some network and FUSE file systems refuse fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd`` (the seam a test uses to simulate a full disk)."""
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old or the new file, never part.

    Creates the file's folder when missing, writes a temporary file there, fsyncs it, renames
    it over `path` with :func:`os.replace`, then fsyncs the folder. The new file keeps the
    permissions of the file it replaces, or gets the usual ``0o666 & ~umask``.

    Parameters
    ----------
    path : Path
        The target file.
    data : bytes
        The complete new content.

    Raises
    ------
    StoreError
        ``cannot write PATH: reason`` when the file cannot be written (read-only or full disk,
        a folder in the way); no temporary file is left behind.

    Notes
    -----
    A process killed mid-write can leave a ``.NAME.*.fibroquant-tmp`` file; the target is
    intact. :func:`remove_stale_temp_files` removes them.
    """
    path = Path(path)
    directory = path.parent
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    tmp: Path | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        tmp = Path(tmp_name)
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(directory)
    except OSError as exc:
        msg = f"cannot write {path}: {exc.strerror or exc}"
        raise StoreError(msg) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` atomically (see :func:`atomic_write_bytes`).

    Parameters
    ----------
    path : Path
        The target file.
    text : str
        The complete new content, written without newline translation.
    encoding : str, optional
        Text encoding, UTF-8 by default.
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_csv(path: Path, df: pd.DataFrame, *, index: bool = False) -> None:
    """Write a table as CSV (UTF-8, ``\\n`` line ends) atomically (see :func:`atomic_write_bytes`).

    Parameters
    ----------
    path : Path
        The target ``.csv`` file.
    df : pandas.DataFrame
        The table; missing values are written as empty fields.
    index : bool, optional
        Whether to write the index as the first column; off by default.
    """
    text = df.to_csv(index=index, lineterminator="\n")
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(value: Any) -> Any:
    """The ``default=`` of :func:`json.dumps` for tables' values: numpy scalars and arrays as
    numbers and lists, dates as ISO text, sets as sorted lists, anything else as its text."""
    import numpy as np  # not at import time: the command line starts without numpy

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, _dt.date):  # datetimes and pandas Timestamps too
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def standard_json(value: Any) -> str:
    """JSON text of ``value`` (see :func:`json_default`) with NaN and ±inf as ``null``, the
    standard JSON that readers of ``--json`` output expect."""
    text = json.dumps(value, default=json_default)
    return json.dumps(json.loads(text, parse_constant=lambda _: None))


def is_temp_file(name: str) -> bool:
    """Whether a file name is one of a writer's temporary files (this version's or older)."""
    return (name.startswith(".") and name.endswith(TEMP_SUFFIX)) or bool(_LEGACY_TEMP.match(name))


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files left in `directory` by writers that were killed mid-write.

    Only call this while holding the folder's :class:`OutputLock`: otherwise it could remove the
    temporary file of a write in progress.

    Parameters
    ----------
    directory : Path
        A folder (not searched recursively).

    Returns
    -------
    list of Path
        The files removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in sorted(entries, key=lambda e: e.name):
        if is_temp_file(entry.name):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def clean_output_folder(out_dir: Path, subfolders: Iterable[str] = OUTPUT_SUBFOLDERS
                        ) -> list[Path]:
    """Remove the temporary files of killed writers from an output folder and its ``qc/``,
    ``masks/``, ``geojson/`` and ``plots/`` (hold the :class:`OutputLock`).

    Returns
    -------
    list of Path
        The files removed.
    """
    removed = remove_stale_temp_files(out_dir)
    for sub in subfolders:
        removed += remove_stale_temp_files(Path(out_dir) / sub)
    return removed


class OutputLock:
    """Exclusive lock on an output folder, held for the duration of a run.

    Uses ``fcntl.flock`` on ``OUT_DIR/.fibroquant.lock``. The kernel releases the lock when the
    holder exits for any reason (including ``kill -9``), so there are no stale locks to clean up.
    The holder's pid, host, start time and command are written into the lock file so a second
    run can say who is in the way. The lock file itself is never deleted (deleting it would let
    two runs lock two different files).

    Parameters
    ----------
    out_dir : Path
        The output folder; it must exist.
    wait : bool, optional
        Queue behind a run holding the lock instead of failing at once.
    timeout : float, optional
        With `wait`, give up after this many seconds (``None``: wait for ever).

    Raises
    ------
    StoreLockedError
        On entering, when another run holds the lock (and `wait` is false or `timeout` expired).
    StoreError
        When the lock file cannot be opened.

    Notes
    -----
    The lock belongs to the open file description, so worker processes forked while the lock is
    held keep it held until they exit too. On NFS, Linux maps ``flock`` onto NFS byte-range locks,
    which work across hosts when the server supports locking.
    """

    def __init__(self, out_dir: Path, *, wait: bool = False, timeout: float | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.wait = wait
        self.timeout = timeout
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def _holder(self, fd: int) -> str:
        """Describe the current holder from the lock file's content."""
        try:
            raw = os.pread(fd, 65536, 0)
            info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict):
            info = {}
        text = f"pid {info.get('pid', '?')}, started {info.get('started', '?')}"
        if info.get("host"):
            text += f", host {info['host']}"
        return text

    def acquire(self) -> None:
        """Take the lock (see the class description); a no-op when already held."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            msg = f"{self.path}: cannot open the output folder's lock file: {exc.strerror or exc}"
            raise StoreError(msg) from exc
        try:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            delay = 0.02
            announced = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                if self.wait and not announced:  # say once why nothing happens yet
                    logger.warning("%s: waiting for another fibroquant run (%s) to finish",
                                   self.out_dir, self._holder(fd))
                    announced = True
                if not self.wait:
                    msg = (
                        f"{self.out_dir}: another fibroquant run ({self._holder(fd)}) is using "
                        "this output folder; use --wait to queue behind it"
                    )
                    raise StoreLockedError(msg)
                if deadline is not None and time.monotonic() >= deadline:
                    msg = (
                        f"{self.out_dir}: another fibroquant run ({self._holder(fd)}) is still "
                        f"using this output folder after waiting {self.timeout:g} s"
                    )
                    raise StoreLockedError(msg)
                pause = delay if deadline is None else min(delay, deadline - time.monotonic())
                time.sleep(max(pause, 0.0))
                delay = min(delay * 2, 0.5)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "command": " ".join(sys.argv),
            }
            with contextlib.suppress(OSError):  # the info is a courtesy; the lock is what counts
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Release the lock; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@contextlib.contextmanager
def measuring_marker(out_dir: Path, info: dict[str, Any],
                     stall_s: float | None = None) -> Iterator[None]:
    """Name the slide being measured in the run's own process in ``OUT_DIR/.fibroquant-measuring``
    while the block runs, with the report of a fatal signal appended by :mod:`faulthandler`.

    A crash there (a segfault in a decoder or a kernel) ends the whole run before it can record
    the slide; the file it leaves tells the next run which slide it was
    (:func:`take_measuring_marker`). The file is removed when the block ends in any other way
    (a result, an exception, Ctrl-C). Hold the folder's :class:`OutputLock`.

    Parameters
    ----------
    out_dir : Path
    info : dict
        JSON-able facts about the slide (``slide``, ``fingerprint``, ``settings_hash``...).
    stall_s : float, optional
        A slide not finished after this many seconds (a read that hangs mid-slide) ends the
        process, which no thread here can stop otherwise; the file then says so
        (faulthandler's ``Timeout``) and the next run records the slide as stalled.
    """
    path = Path(out_dir) / MEASURING_NAME
    try:
        fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after faulthandler
    except OSError:  # a safety net only: without it a crash is not recorded, as before
        yield
        return
    was_enabled = faulthandler.is_enabled()
    try:
        fh.write(json.dumps(info) + "\n")
        fh.flush()
        faulthandler.enable(file=fh, all_threads=True)
        if stall_s is not None:
            faulthandler.dump_traceback_later(stall_s, exit=True, file=fh)
        yield
    finally:
        if stall_s is not None:
            faulthandler.cancel_dump_traceback_later()
        faulthandler.disable()
        if was_enabled and sys.__stderr__ is not None:
            with contextlib.suppress(ValueError, OSError):
                faulthandler.enable(file=sys.__stderr__)
        fh.close()
        with contextlib.suppress(OSError):
            path.unlink()


_FATAL = re.compile(r"^Fatal Python error: (.+)$", re.MULTILINE)
_STALLED = re.compile(r"^Timeout \((\d+):(\d+):(\d+(?:\.\d+)?)\)!$", re.MULTILINE)


def take_measuring_marker(out_dir: Path) -> dict[str, Any] | None:
    """The slide a run was measuring in its own process when it ended abruptly, and remove the
    file (:func:`measuring_marker`); None when the last run left none. Hold the folder's
    :class:`OutputLock` (the file of a run in progress is not a leftover).

    Returns
    -------
    dict or None
        As :func:`read_measuring_marker`.
    """
    info = read_measuring_marker(out_dir)
    with contextlib.suppress(OSError):
        (Path(out_dir) / MEASURING_NAME).unlink()
    return info


def read_measuring_marker(out_dir: Path) -> dict[str, Any] | None:
    """The slide named by ``OUT_DIR/.fibroquant-measuring`` (:func:`measuring_marker`): being
    measured in a run's own process, or being measured when that run ended abruptly.

    Returns
    -------
    dict or None
        The ``info`` it was given, with ``fatal``: the fatal signal faulthandler reported
        (``"Segmentation fault"``, ``"Aborted"``...), or None when the run was killed without
        one (``kill -9``, the out-of-memory killer, a power cut) or is still running. None
        when there is no such file.
    """
    try:
        text = (Path(out_dir) / MEASURING_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    head, _, rest = text.partition("\n")
    try:
        info = json.loads(head)
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    fatal = _FATAL.search(rest)
    info["fatal"] = fatal.group(1).strip() if fatal else None
    stalled = _STALLED.search(rest)
    if stalled and not fatal:
        h, m, sec = stalled.groups()
        info["stalled_s"] = int(h) * 3600 + int(m) * 60 + float(sec)
        info["fatal"] = f"not finished after {info['stalled_s']:g} s"
    return info


__all__ = [
    "OUTPUT_SUBFOLDERS",
    "TEMP_SUFFIX",
    "OutputLock",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_text",
    "clean_output_folder",
    "fsync_dir",
    "is_temp_file",
    "measuring_marker",
    "read_measuring_marker",
    "remove_stale_temp_files",
    "take_measuring_marker",
]
