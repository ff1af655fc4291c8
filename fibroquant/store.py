"""The results store and everything that makes reruns safe.

Labs rerun ``fibroquant analyze`` from cron on a growing slides folder, so a run must be cheap to
repeat, safe to kill at any moment, and must never trample a concurrent run. This module holds:

* :func:`fingerprint` and :class:`FingerprintCache`: a content key per slide file that is cheap on
  multi-gigabyte slides, and a ``(path, size, mtime_ns)`` fast path so unchanged files are not
  re-read at all.
* the output folder's lock and atomic writer live in :mod:`fibroquant.outdir` (re-exported
  here).
* :class:`ResultStore`: ``OUT_DIR/fibroquant.sqlite``, one transaction per slide result, keyed by
  ``(slide fingerprint, settings hash)``, with a history that is never overwritten.

Notes
-----
Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``PRAGMA application_id`` =
:data:`APPLICATION_ID`):

``runs``
    One row per run: command, version, settings hash and JSON, counts, exit code, seconds.
``results``
    One row per ``(fingerprint, settings_hash)``, upserted: the latest measurement of that content
    with those settings. Rows for old fingerprints are kept.
``slides``
    ``slide`` (path relative to the slides folder) -> the fingerprint its file had when last seen.
    "Current" results are ``slides`` joined with ``results``, so a changed file replaces its old
    result in :meth:`ResultStore.current_results` while the old row stays in ``results``.
``history``
    Append-only: every :meth:`ResultStore.put_result` call, never updated or deleted.
``fingerprints``
    The fingerprint fast path: ``rel -> (size, mtime_ns, fingerprint)``.

Records are stored as JSON written with ``allow_nan=True``: NaN and ±inf are written as the
``NaN``/``Infinity`` tokens that Python's :mod:`json` reads back exactly, so they round-trip
through the store. Those tokens are not strict JSON, so SQLite's own ``json_*`` functions reject
such rows; read records through this module.

The database uses WAL journaling on local disks. On network file systems (NFS, SMB/CIFS, …) WAL
is unsafe (its shared-memory index is not coherent between hosts), so the store falls back to a
rollback journal there; :class:`OutputLock` serialises runs in either case.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from fibroquant.errors import SlideReadError, StoreError
from fibroquant.layout import LOCK_NAME, STORE_NAME
from fibroquant.outdir import (  # re-exported: the output folder's lock and writer
    TEMP_SUFFIX,
    OutputLock,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    remove_stale_temp_files,
)

__all__ = [
    "APPLICATION_ID",
    "FINGERPRINT_CHUNK",
    "LOCK_NAME",
    "SCHEMA_VERSION",
    "STORE_NAME",
    "TEMP_SUFFIX",
    "FingerprintCache",
    "OutputLock",
    "ResultStore",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_text",
    "fingerprint",
    "remove_stale_temp_files",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Bytes hashed at each end of a slide file by :func:`fingerprint` (1 MiB).
FINGERPRINT_CHUNK = 1 << 20
#: Version of the database layout; bump it and add a migration when the schema changes.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` marking a SQLite file as a fibroquant store ("FQST").
APPLICATION_ID = 0x46515354

_FP_DOMAIN = b"fibroquant-fingerprint-v1\0"
#: Longest time a committed result lives only in the WAL (seconds; see ``_keep_journal``).
CHECKPOINT_SECONDS = 1.0
#: The tables every store of :data:`SCHEMA_VERSION` has.
REQUIRED_TABLES = ("runs", "results", "slides", "history", "fingerprints")
#: How to recover a store that lost data (see ``fibroquant store rebuild``).
REBUILD_HINT = ("run 'fibroquant store rebuild {out}' to re-derive the results from its "
                "slides.csv and provenance.json (or move the store aside to start afresh)")
_REQUIRED_KEYS = ("slide", "fingerprint", "settings_hash", "status", "error")
_STATUSES = ("ok", "failed")
_NETWORK_FS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
        "fuse.glusterfs", "fuse.sshfs", "sshfs", "lustre", "gpfs", "beegfs", "fuse.s3fs",
        "fuse.rclone", "davfs", "fuse.davfs2",
    }
)  # fmt: skip


def _now() -> str:
    """Return the current UTC time as an ISO 8601 string with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def fingerprint(path: Path, *, size: int | None = None) -> str:
    """Return a content key for a slide file, cheap on multi-gigabyte slides.

    The key is the SHA-256 (hex) of the file size, the first :data:`FINGERPRINT_CHUNK` bytes and
    the last :data:`FINGERPRINT_CHUNK` bytes. Files no larger than two chunks are hashed whole.

    Parameters
    ----------
    path : Path
        The slide file.
    size : int, optional
        The file size in bytes, when the caller already has it from ``os.stat``; read from the
        file otherwise.

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    SlideReadError
        When the file cannot be read, or is shorter than `size` (it is still being written).

    Notes
    -----
    Two files of the same size that differ only in their middle get the same key. Re-scanned or
    re-exported slides virtually always differ in size and in their headers and tile tables, which
    sit at the ends of TIFF-like files; ``--force`` remeasures regardless.
    """
    path = Path(path)
    try:
        # non-blocking: a named pipe or a device in the slides folder must not hang the run
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            require_regular(path, os.fstat(fh.fileno()))
            if size is None:
                size = os.fstat(fh.fileno()).st_size
            digest = hashlib.sha256(_FP_DOMAIN)
            digest.update(f"{size}\0".encode())
            if size <= 2 * FINGERPRINT_CHUNK:
                spans = [(0, size)]
            else:
                spans = [(0, FINGERPRINT_CHUNK), (size - FINGERPRINT_CHUNK, FINGERPRINT_CHUNK)]
            for offset, length in spans:
                data = os.pread(fh.fileno(), length, offset)
                if len(data) != length:
                    msg = (
                        f"{path}: file is shorter than its size of {size} bytes "
                        "(still being copied?)"
                    )
                    raise SlideReadError(msg)
                digest.update(data)
    except OSError as exc:
        msg = f"{path}: cannot read file to fingerprint it: {exc.strerror or exc}"
        raise SlideReadError(msg) from exc
    return digest.hexdigest()


#: Longest wait for a slide file's fingerprint (seconds): a file on a hung network share (or
#: anything else that blocks) fails its row instead of holding the run and its lock for ever.
INPUT_TIMEOUT_SECONDS = 120.0


def require_regular(path: Path, st: os.stat_result) -> None:
    """Refuse anything but a regular file (a named pipe, a device, a socket blocks or never
    ends when read).

    Raises
    ------
    SlideReadError
        ``PATH: not a regular file (a named pipe)``.
    """
    if stat.S_ISREG(st.st_mode):
        return
    kind = ("a named pipe" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
    msg = f"{path}: not a regular file ({kind})"
    raise SlideReadError(msg)


def within_seconds(fn: Callable[[], T], seconds: float, what: str,
                   discard: Callable[[T], object] | None = None) -> T:
    """``fn()`` run on a daemon thread, given at most ``seconds``: a file operation that blocks
    (a hung network share) fails instead of hanging the run. The thread, if it never returns,
    is left behind (a daemon: it does not keep the process alive); if it returns too late, its
    value is given to ``discard`` (e.g. to close a file it opened).

    Raises
    ------
    SlideReadError
        ``WHAT: no answer after N s`` on a timeout; whatever ``fn`` raised otherwise.
    """
    box: dict[str, Any] = {}
    done = threading.Event()
    lock = threading.Lock()

    def call() -> None:
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = exc
        else:
            with lock:
                late = box.get("abandoned", False)
                box["value"] = value
            if late and discard is not None:
                with contextlib.suppress(Exception):
                    discard(value)
        finally:
            done.set()

    threading.Thread(target=call, name="fibroquant-bounded-io", daemon=True).start()
    if not done.wait(seconds):
        with lock:
            box["abandoned"] = True
            value = box.get("value")
        if value is not None and discard is not None:  # answered at the last moment
            with contextlib.suppress(Exception):
                discard(value)
        msg = f"{what}: no answer after {seconds:g} s (a hung network share?)"
        raise SlideReadError(msg)
    if "error" in box:
        raise box["error"]
    return box["value"]


class FingerprintCache:
    """Fingerprints of the files under a slides folder, re-hashing only files that changed.

    The whole cache table is read once; each :meth:`fingerprint` call then costs one ``os.stat``
    when the file's relative path, size and ``mtime_ns`` are unchanged. New entries are buffered
    and written in one transaction by :meth:`flush` (also on leaving the ``with`` block).

    Parameters
    ----------
    store : ResultStore
        The store whose ``fingerprints`` table holds the cache.
    root : Path
        The slides folder; cache keys are POSIX paths relative to it.
    racy_seconds : float, optional
        Files modified less than this many seconds ago are fingerprinted but not cached: within
        one mtime tick (up to 2 s on some network shares) a file can change without its
        ``(size, mtime_ns)`` changing. Default 2.0 s.
    timeout : float, optional
        Longest wait for one file's fingerprint, seconds (``tiling.input_timeout_s``).

    Examples
    --------
    >>> with FingerprintCache(store, slides_dir) as cache:  # doctest: +SKIP
    ...     keys = {p.name: cache.fingerprint(p) for p in slides_dir.glob("*.svs")}
    """

    def __init__(self, store: ResultStore, root: Path, *, racy_seconds: float = 2.0,
                 timeout: float = INPUT_TIMEOUT_SECONDS) -> None:
        self._store = store
        self.timeout = timeout
        self.root = Path(root)
        self.racy_ns = int(racy_seconds * 1e9)
        self._entries = store._fingerprint_cache_all()
        self._pending: dict[str, tuple[int, int, str]] = {}
        #: Number of files answered from the cache / hashed.
        self.hits = 0
        self.misses = 0

    def relative(self, path: Path) -> str:
        """Return the cache key of `path`: a POSIX path relative to :attr:`root`.

        Parameters
        ----------
        path : Path
            A file under :attr:`root`, given absolute or relative to it.
        """
        full = self._full(path)
        with contextlib.suppress(ValueError):
            return full.relative_to(self.root).as_posix()
        return full.as_posix()

    def _full(self, path: Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def fingerprint(self, path: Path) -> str:
        """Return the fingerprint of `path`, from the cache when the file is unchanged.

        Parameters
        ----------
        path : Path
            A slide file, absolute or relative to :attr:`root`.

        Returns
        -------
        str
            As :func:`fingerprint`.

        Raises
        ------
        SlideReadError
            When the file cannot be read or changes while it is being read.
        """
        full = self._full(path)
        rel = self.relative(full)
        try:
            st = full.stat()
        except OSError as exc:
            msg = f"{full}: cannot read file to fingerprint it: {exc.strerror or exc}"
            raise SlideReadError(msg) from exc
        require_regular(full, st)
        hit = self._entries.get(rel)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            self.hits += 1
            return hit[2]
        self.misses += 1
        key = within_seconds(lambda: fingerprint(full, size=st.st_size), self.timeout,
                             f"{full}: reading the file to fingerprint it")
        try:
            after = full.stat()
        except OSError as exc:
            msg = f"{full}: file disappeared while being fingerprinted"
            raise SlideReadError(msg) from exc
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            msg = f"{full}: file changed while being fingerprinted (still being copied?)"
            raise SlideReadError(msg)
        if time.time_ns() - st.st_mtime_ns >= self.racy_ns:
            entry = (st.st_size, st.st_mtime_ns, key)
            self._entries[rel] = entry
            self._pending[rel] = entry
        return key

    def flush(self) -> None:
        """Write the entries learnt since the last flush, in one transaction."""
        if self._pending:
            rows = [(rel, *entry) for rel, entry in self._pending.items()]
            self._store.fingerprint_cache_put_many(rows)
            self._pending.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.flush()


# --------------------------------------------------------------------------------------------
# Results store
# --------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at    TEXT NOT NULL,
    finished_at   TEXT,
    command       TEXT NOT NULL,
    version       TEXT NOT NULL,
    settings_hash TEXT NOT NULL,
    settings_json TEXT NOT NULL,
    pid           INTEGER,
    host          TEXT,
    processed     INTEGER,
    skipped       INTEGER,
    failed        INTEGER,
    removed       INTEGER,
    exit_code     INTEGER,
    seconds       REAL
);
CREATE TABLE IF NOT EXISTS results (
    fingerprint   TEXT NOT NULL,
    settings_hash TEXT NOT NULL,
    slide         TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error         TEXT,
    record_json   TEXT NOT NULL,
    run_id        INTEGER REFERENCES runs (run_id),
    written_at    TEXT NOT NULL,
    PRIMARY KEY (fingerprint, settings_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS results_by_settings ON results (settings_hash);
CREATE TABLE IF NOT EXISTS slides (
    slide         TEXT PRIMARY KEY,
    fingerprint   TEXT NOT NULL,
    run_id        INTEGER REFERENCES runs (run_id),
    updated_at    TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        INTEGER REFERENCES runs (run_id),
    slide         TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    settings_hash TEXT NOT NULL,
    status        TEXT NOT NULL,
    record_json   TEXT NOT NULL,
    written_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_slide ON history (slide, settings_hash);
CREATE TABLE IF NOT EXISTS fingerprints (
    rel           TEXT PRIMARY KEY,
    size          INTEGER NOT NULL,
    mtime_ns      INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL
) WITHOUT ROWID;
"""

_RUN_COLUMNS = (
    "run_id", "started_at", "finished_at", "command", "version", "settings_hash",
    "settings_json", "pid", "host", "processed", "skipped", "failed", "removed", "exit_code",
    "seconds",
)  # fmt: skip


def _filesystem_type(path: Path) -> str | None:
    """Return the Linux file-system type holding `path` (from ``/proc/self/mounts``), if known."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, best_type = mount, parts[2]
    return best_type


def _encode_value(value: Any) -> Any:
    """JSON fallback: numpy scalars and similar become Python numbers; anything else is refused."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    msg = f"value {value!r} of type {type(value).__name__} cannot be stored"
    raise TypeError(msg)


class ResultStore:
    """The SQLite results store of an output folder (``OUT_DIR/fibroquant.sqlite``).

    Every write is one short transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) with
    ``synchronous=FULL``, so a run killed at any moment leaves every result either fully stored
    or absent, and a committed result survives a power cut. Concurrent writers queue on SQLite's
    lock (``busy_timeout``) instead of failing.

    Parameters
    ----------
    path : Path
        The database file; created with its schema when missing. Its folder must exist.
    timeout : float, optional
        Seconds to wait for another writer before giving up (``busy_timeout``), default 60 s.

    Raises
    ------
    StoreError
        When the file is not a readable fibroquant store (corrupt, another program's database,
        or written by a newer fibroquant). The file is never modified or deleted in that case.

    Examples
    --------
    >>> with ResultStore(out_dir / "fibroquant.sqlite") as store:  # doctest: +SKIP
    ...     run_id = store.start_run(command="fibroquant analyze …", version="0.1.0",
    ...                              settings_hash=h, settings_json=js)
    ...     todo = [fp for fp in fingerprints if store.known(h).get(fp) != "ok"]
    """

    def __init__(self, path: Path, *, timeout: float = 60.0, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._checkpointed = 0.0
        if not self.path.parent.is_dir():
            msg = (
                f"{self.path}: cannot open the results store: "
                f"folder {self.path.parent} does not exist"
            )
            raise StoreError(msg)
        self._refuse_emptied()
        try:
            self._conn: sqlite3.Connection | None = self._connect(timeout)
        except sqlite3.Error as exc:
            msg = f"{self.path}: cannot open the results store: {exc}"
            raise StoreError(msg) from exc
        try:
            self._setup(timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float) -> sqlite3.Connection:
        """A connection; read-only ones open the file as it is, even in a read-only folder
        (where SQLite cannot create the WAL's index, so the file is read as immutable)."""
        if not self.read_only:
            return sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        uri = self.path.resolve().as_uri()
        if os.access(self.path.parent, os.W_OK):
            return sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout,
                                   isolation_level=None)
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=timeout,
                               isolation_level=None)

    def _refuse_emptied(self) -> None:
        """A zero-byte store next to tables of earlier runs lost its history (truncated, or
        replaced by an empty file): refuse it instead of starting afresh. In a folder without
        tables it is a store whose creation was interrupted, and is created again."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size == 0 and (self.path.parent / "slides.csv").is_file():
            msg = (f"{self.path}: the results store is empty (0 bytes) but this folder holds "
                   f"tables of earlier runs; {REBUILD_HINT.format(out=self.path.parent)}")
            raise StoreError(msg)

    # -- connection and schema --------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            msg = f"{self.path}: the results store is closed"
            raise StoreError(msg)
        return self._conn

    def _setup(self, timeout: float) -> None:
        conn = self._db
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            n_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            msg = self._unreadable(exc)
            raise StoreError(msg) from exc
        if n_tables and app_id != APPLICATION_ID:
            msg = (
                f"{self.path}: not a fibroquant results store (another program's SQLite "
                "database); choose another output folder"
            )
            raise StoreError(msg)
        if n_tables and version == SCHEMA_VERSION:
            names = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            lost = [t for t in REQUIRED_TABLES if t not in names]
            if lost:
                msg = (f"{self.path}: the results store has lost its tables ({', '.join(lost)}); "
                       f"{REBUILD_HINT.format(out=self.path.parent)}")
                raise StoreError(msg)
        elif not n_tables and app_id == APPLICATION_ID:
            msg = (f"{self.path}: the results store has lost its tables; "
                   f"{REBUILD_HINT.format(out=self.path.parent)}")
            raise StoreError(msg)
        if version > SCHEMA_VERSION:
            msg = (
                f"{self.path}: written by a newer fibroquant (store schema {version}, this version "
                f"reads up to {SCHEMA_VERSION}); upgrade fibroquant or choose another output folder"
            )
            raise StoreError(msg)
        #: The journal mode in use: ``"wal"`` locally, ``"delete"`` on network file systems,
        #: ``"ro"`` read-only.
        self.journal_mode: str
        if self.read_only:
            self.journal_mode = "ro"
            if version < SCHEMA_VERSION:
                msg = f"{self.path}: not a fibroquant results store yet (no runs stored)"
                raise StoreError(msg)
            return
        fs_type = _filesystem_type(self.path.parent)
        wanted = "delete" if fs_type in _NETWORK_FS else "wal"
        if wanted != "wal":
            logger.info("%s is on a %s network file system: using a rollback journal, not WAL",
                        self.path, fs_type)
        try:
            mode = conn.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0]
        except sqlite3.OperationalError:  # another connection prevents switching: keep its mode
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            msg = self._unreadable(exc)
            raise StoreError(msg) from exc
        self.journal_mode = str(mode).lower()
        with self._errors("open"):
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            if version < SCHEMA_VERSION:
                with self._transaction("create"):
                    current = conn.execute("PRAGMA user_version").fetchone()[0]
                    if current < SCHEMA_VERSION:  # re-checked under the write lock
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _unreadable(self, exc: BaseException) -> str:
        return (
            f"{self.path}: not a readable fibroquant results store ({exc}); "
            "move it aside or choose another output folder"
        )

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn SQLite errors into a one-line :class:`StoreError` naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            msg = f"{self.path}: cannot {action} in the results store: {exc}"
            raise StoreError(msg) from exc

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front (no upgrade deadlocks)."""
        conn = self._db
        with self._errors(action):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            self._keep_journal()

    def _keep_journal(self) -> None:
        """After each write: copy the WAL into the store file (a passive checkpoint, at most
        every :data:`CHECKPOINT_SECONDS`), so a committed result survives the WAL being
        deleted after a crash; and when the WAL has
        been deleted under this connection, save what only it held into the store file and
        go on with a rollback journal (SQLite would otherwise write on into the deleted file,
        and the results would vanish when this run ends)."""
        if self.journal_mode != "wal":
            return
        conn = self._db
        if os.path.exists(f"{self.path}-wal"):
            now = time.monotonic()
            if now - self._checkpointed >= CHECKPOINT_SECONDS:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self._checkpointed = now
            return
        logger.warning("%s: its -wal file was deleted during the run; its results were saved "
                       "into the store, which uses a rollback journal until this run ends",
                       self.path)
        self.journal_mode = str(conn.execute("PRAGMA journal_mode = delete").fetchone()[0])

    def close(self) -> None:
        """Close the database connection; idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def check(self) -> None:
        """Run SQLite's ``quick_check`` over the whole file.

        Raises
        ------
        StoreError
            When the database is damaged.
        """
        with self._errors("check the database"):
            rows = [r[0] for r in self._db.execute("PRAGMA quick_check")]
        if rows != ["ok"]:
            msg = f"{self.path}: the results store is damaged: {'; '.join(rows[:3])}"
            raise StoreError(msg)

    # -- runs -------------------------------------------------------------------------------

    def start_run(
        self, *, command: str, version: str, settings_hash: str, settings_json: str
    ) -> int:
        """Record the start of a run.

        Parameters
        ----------
        command : str
            The command line, as typed.
        version : str
            The fibroquant version.
        settings_hash : str
            ``config.settings_hash()`` of the run's settings.
        settings_json : str
            The settings as canonical JSON.

        Returns
        -------
        int
            The new run id.
        """
        with self._transaction("start a run") as conn:
            cur = conn.execute(
                "INSERT INTO runs (started_at, command, version, settings_hash, settings_json,"
                " pid, host) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_now(), command, version, settings_hash, settings_json, os.getpid(),
                 socket.gethostname()),
            )
            run_id = cur.lastrowid
        return int(run_id or 0)

    def finish_run(
        self,
        run_id: int,
        *,
        processed: int,
        skipped: int,
        failed: int,
        removed: int,
        exit_code: int,
        seconds: float,
    ) -> None:
        """Record the outcome of a run started with :meth:`start_run`.

        Parameters
        ----------
        run_id : int
            From :meth:`start_run`.
        processed, skipped, failed, removed : int
            Counts of slides measured, skipped as already measured, failed, and gone from the
            folder.
        exit_code : int
            The command's exit code.
        seconds : float
            Wall time of the run, in seconds.

        Raises
        ------
        StoreError
            When `run_id` is unknown.
        """
        with self._transaction("finish a run") as conn:
            cur = conn.execute(
                "UPDATE runs SET finished_at = ?, processed = ?, skipped = ?, failed = ?,"
                " removed = ?, exit_code = ?, seconds = ? WHERE run_id = ?",
                (_now(), processed, skipped, failed, removed, exit_code, float(seconds), run_id),
            )
            if cur.rowcount != 1:
                msg = f"{self.path}: no run with id {run_id} to finish"
                raise StoreError(msg)

    def runs(self, limit: int = 10) -> list[dict[str, Any]]:
        """Return the latest runs, newest first.

        Parameters
        ----------
        limit : int, optional
            At most this many runs (10 by default).

        Returns
        -------
        list of dict
            One dict per run with the columns of the ``runs`` table; unfinished (or killed)
            runs have ``finished_at`` and the counts set to ``None``.
        """
        with self._errors("list runs"):
            rows = self._db.execute(
                f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs ORDER BY run_id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [dict(zip(_RUN_COLUMNS, row, strict=True)) for row in rows]

    def settings_hashes(self) -> list[str]:
        """Return every settings hash with results or runs, most recently used first."""
        with self._errors("list settings"):
            rows = self._db.execute(
                "SELECT settings_hash, max(t) FROM ("
                " SELECT settings_hash, started_at AS t FROM runs"
                " UNION ALL SELECT settings_hash, written_at AS t FROM results)"
                " GROUP BY settings_hash ORDER BY max(t) DESC, settings_hash"
            ).fetchall()
        return [row[0] for row in rows]

    # -- results ----------------------------------------------------------------------------

    def _encode(self, record: Mapping[str, Any]) -> str:
        try:
            return json.dumps(
                dict(record), allow_nan=True, ensure_ascii=False, default=_encode_value
            )
        except (TypeError, ValueError) as exc:
            msg = f"{self.path}: cannot store the record of {record.get('slide')!r}: {exc}"
            raise StoreError(msg) from exc

    def _decode(self, text: str) -> dict[str, Any]:
        try:
            record = json.loads(text)
        except ValueError as exc:
            msg = f"{self.path}: a stored record is not valid JSON: {exc}"
            raise StoreError(msg) from exc
        return record

    def put_result(self, record: Mapping[str, Any], *, run_id: int) -> None:
        """Store one slide's result, in one transaction.

        Upserts on ``(fingerprint, settings_hash)``, points the slide path at this fingerprint
        (so a changed file's new result replaces the old one in :meth:`current_results`) and
        appends to the history.

        Parameters
        ----------
        record : Mapping
            A flat, JSON-serialisable dict with at least ``slide`` (path relative to the slides
            folder), ``fingerprint``, ``settings_hash``, ``status`` (``"ok"`` or ``"failed"``)
            and ``error`` (``None`` when ok). Any other keys (measurements) are stored with it.
            NaN and ±inf round-trip; numpy scalars are stored as Python numbers.
        run_id : int
            The run that produced it (:meth:`start_run`).

        Raises
        ------
        StoreError
            When a required key is missing, the status is unknown, a value cannot be stored as
            JSON, or the database cannot be written.
        """
        missing = [key for key in _REQUIRED_KEYS if key not in record]
        if missing:
            msg = (
                f"{self.path}: cannot store a record without {', '.join(missing)}: "
                f"{dict(record)!r:.200}"
            )
            raise StoreError(msg)
        if record["status"] not in _STATUSES:
            msg = (
                f"{self.path}: record of {record['slide']!r} has status {record['status']!r}, "
                "expected 'ok' or 'failed'"
            )
            raise StoreError(msg)
        for key in ("slide", "fingerprint", "settings_hash"):
            if not isinstance(record[key], str) or not record[key]:
                msg = (
                    f"{self.path}: record key {key!r} must be a non-empty string, "
                    f"got {record[key]!r}"
                )
                raise StoreError(msg)
        text = self._encode(record)
        slide, fp = record["slide"], record["fingerprint"]
        sh, status = record["settings_hash"], record["status"]
        error = None if record["error"] is None else str(record["error"])
        now = _now()
        with self._transaction(f"store the result of {slide!r}") as conn:
            conn.execute(
                "INSERT INTO results (fingerprint, settings_hash, slide, status, error,"
                " record_json, run_id, written_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (fingerprint, settings_hash) DO UPDATE SET slide = excluded.slide,"
                " status = excluded.status, error = excluded.error,"
                " record_json = excluded.record_json, run_id = excluded.run_id,"
                " written_at = excluded.written_at",
                (fp, sh, slide, status, error, text, run_id, now),
            )
            conn.execute(
                "INSERT INTO slides (slide, fingerprint, run_id, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (slide) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " run_id = excluded.run_id, updated_at = excluded.updated_at",
                (slide, fp, run_id, now),
            )
            conn.execute(
                "INSERT INTO history (run_id, slide, fingerprint, settings_hash, status,"
                " record_json, written_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, slide, fp, sh, status, text, now),
            )

    def record_move(self, slide: str, fingerprint: str, settings_hash: str, *, run_id: int
                    ) -> None:
        """Record that slide path ``slide`` now shows the stored result of its content: a
        renamed file whose overlay and masks were moved to its name, not measured again.

        Appends the result, under the new path, to the history (so :meth:`last_measured` knows
        what the path's files show) and points the path at the fingerprint; the stored result
        itself, and the run that measured it, are left as they are.

        Parameters
        ----------
        slide : str
            The new slide path.
        fingerprint, settings_hash : str
            The stored ``ok`` result it shows.
        run_id : int
            The run that moved the files.

        Raises
        ------
        StoreError
            When there is no such ``ok`` result, or the database cannot be written.
        """
        now = _now()
        with self._transaction(f"record the rename of {slide!r}") as conn:
            row = conn.execute(
                "SELECT status, record_json FROM results WHERE fingerprint = ? AND"
                " settings_hash = ?", (fingerprint, settings_hash),
            ).fetchone()
            if row is None or row[0] != "ok":
                msg = f"{self.path}: no measured result of {slide!r} to move its outputs to"
                raise StoreError(msg)
            record = self._decode(row[1])
            record["slide"] = slide
            conn.execute(
                "INSERT INTO slides (slide, fingerprint, run_id, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (slide) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " run_id = excluded.run_id, updated_at = excluded.updated_at",
                (slide, fingerprint, run_id, now),
            )
            conn.execute(
                "INSERT INTO history (run_id, slide, fingerprint, settings_hash, status,"
                " record_json, written_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, slide, fingerprint, settings_hash, "ok", self._encode(record), now),
            )

    def link_slides(self, fingerprints: Mapping[str, str], *, run_id: int | None = None) -> None:
        """Record the fingerprint each slide path has now, in one transaction.

        Call it when planning a run with every present slide: a slide that is skipped because
        its (new) content was already measured, e.g. a file renamed or reverted, then shows that
        result in :meth:`current_results` rather than the result of its old content, and a
        changed slide whose new content is not measured yet shows nothing instead of a stale row.

        Parameters
        ----------
        fingerprints : Mapping of str to str
            Slide path (relative to the slides folder) -> fingerprint.
        run_id : int, optional
            The run doing the planning.
        """
        now = _now()
        with self._transaction("record slide fingerprints") as conn:
            conn.executemany(
                "INSERT INTO slides (slide, fingerprint, run_id, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (slide) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " run_id = excluded.run_id, updated_at = excluded.updated_at"
                " WHERE slides.fingerprint != excluded.fingerprint",
                [(slide, fp, run_id, now) for slide, fp in fingerprints.items()],
            )

    def get_result(self, fingerprint: str, settings_hash: str) -> dict[str, Any] | None:
        """Return the stored record for this content and settings, or ``None``.

        Parameters
        ----------
        fingerprint : str
            The slide's :func:`fingerprint`.
        settings_hash : str
            The settings hash.

        Returns
        -------
        dict or None
            The record exactly as given to :meth:`put_result` (after a JSON round trip).
        """
        with self._errors("read a result"):
            row = self._db.execute(
                "SELECT record_json FROM results WHERE fingerprint = ? AND settings_hash = ?",
                (fingerprint, settings_hash),
            ).fetchone()
        return None if row is None else self._decode(row[0])

    def known(self, settings_hash: str) -> dict[str, str]:
        """Return ``fingerprint -> status`` of every result with these settings, in one query.

        Parameters
        ----------
        settings_hash : str
            The settings hash.

        Returns
        -------
        dict of str to str
            Status is ``"ok"`` or ``"failed"``.
        """
        with self._errors("list known results"):
            rows = self._db.execute(
                "SELECT fingerprint, status FROM results WHERE settings_hash = ?", (settings_hash,)
            ).fetchall()
        return dict(rows)

    def crashes(self, settings_hash: str) -> dict[str, int]:
        """How many times measuring each content with these settings killed its worker process
        (failed records stored with ``crashed``), by fingerprint; contents that never did are
        left out.

        Parameters
        ----------
        settings_hash : str
        """
        with self._errors("list crashed slides"):
            rows = self._db.execute(
                "SELECT fingerprint, record_json FROM history WHERE settings_hash = ?"
                " AND status = 'failed' AND record_json LIKE '%\"crashed\"%'", (settings_hash,)
            ).fetchall()
        out: dict[str, int] = {}
        for fp, text in rows:
            if self._decode(text).get("crashed") is True:
                out[fp] = out.get(fp, 0) + 1
        return out

    def has_run(self, run_id: int) -> bool:
        """Whether run ``run_id`` is recorded (False: the store lost it, e.g. with its WAL)."""
        with self._errors("read the runs"):
            row = self._db.execute("SELECT 1 FROM runs WHERE run_id = ?", (int(run_id),)
                                   ).fetchone()
        return row is not None

    def slide_fingerprints(self) -> dict[str, str]:
        """``slide path -> the fingerprint its file had when last seen`` (the ``slides`` table)."""
        with self._errors("list slides"):
            rows = self._db.execute("SELECT slide, fingerprint FROM slides").fetchall()
        return dict(rows)

    def current_results(
        self, settings_hash: str, present: set[str] | None = None
    ) -> list[dict[str, Any]]:
        """Return the current record of each slide path for these settings, sorted by slide.

        The current record of a slide is the result for the fingerprint its file had when last
        seen (:meth:`put_result`, :meth:`link_slides`); older contents stay in :meth:`history`.

        Parameters
        ----------
        settings_hash : str
            The settings hash.
        present : set of str, optional
            Slide paths now in the slides folder; others (removed files) are left out.

        Returns
        -------
        list of dict
            Records as stored, with ``slide`` set to the slide path (two identical files share
            one stored result).
        """
        with self._errors("read current results"):
            rows = self._db.execute(
                "SELECT s.slide, r.record_json FROM slides AS s JOIN results AS r"
                " ON r.fingerprint = s.fingerprint AND r.settings_hash = ? ORDER BY s.slide",
                (settings_hash,),
            ).fetchall()
        out = []
        for slide, text in rows:
            if present is not None and slide not in present:
                continue
            record = self._decode(text)
            record["slide"] = slide
            out.append(record)
        return out

    def failed_last(
        self, settings_hash: str, present: set[str] | None = None
    ) -> list[dict[str, Any]]:
        """Return the current records whose last attempt failed, sorted by slide.

        Parameters
        ----------
        settings_hash : str
            The settings hash.
        present : set of str, optional
            As in :meth:`current_results`.

        Returns
        -------
        list of dict
            The records with ``status == "failed"`` among :meth:`current_results`.
        """
        current = self.current_results(settings_hash, present)
        return [r for r in current if r.get("status") == "failed"]

    def last_measured(self) -> dict[str, tuple[str, str, str]]:
        """Return what each slide path's latest stored measurement was, in one query.

        A run writes a slide's overlay, masks and GeoJSON (or removes them) with each
        measurement of it, so these are what the files on disk show.

        Returns
        -------
        dict of str to tuple of str
            Slide path -> ``(fingerprint, settings_hash, status)`` of its latest
            :meth:`put_result`, for every path in the history.
        """
        with self._errors("read the latest measurements"):
            rows = self._db.execute(
                "SELECT h.slide, h.fingerprint, h.settings_hash, h.status FROM history AS h"
                " JOIN (SELECT max(id) AS id FROM history GROUP BY slide) AS m ON h.id = m.id"
            ).fetchall()
        return {slide: (fp, sh, status) for slide, fp, sh, status in rows}

    _MPP_TABLE = ("CREATE TABLE IF NOT EXISTS slide_mpp "
                  "(slide TEXT PRIMARY KEY, mpp REAL NOT NULL)")

    def remember_mpp(self, slides: Iterable[str], mpp: float) -> None:
        """Remember ``--mpp`` (µm/px for files without their own) for these slide paths, so a
        later run without it measures them the same way (a cron rerun must not fail them).

        Parameters
        ----------
        slides : iterable of str
            Slide paths relative to the slides folder.
        mpp : float
            µm per pixel given with ``--mpp``.
        """
        with self._transaction("remember --mpp") as conn:
            conn.execute(self._MPP_TABLE)
            conn.executemany("INSERT OR REPLACE INTO slide_mpp (slide, mpp) VALUES (?, ?)",
                             [(s, float(mpp)) for s in slides])

    def remembered_mpp(self) -> dict[str, float]:
        """Slide path -> the ``--mpp`` last given for it (:meth:`remember_mpp`)."""
        with self._errors("read remembered --mpp"):
            exists = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'slide_mpp'"
            ).fetchone()
            if not exists:
                return {}
            rows = self._db.execute("SELECT slide, mpp FROM slide_mpp").fetchall()
        return {str(s): float(m) for s, m in rows}

    def slide_paths(self) -> list[str]:
        """Return every slide path the store currently knows (the last run's folder), sorted."""
        with self._errors("list slides"):
            rows = self._db.execute("SELECT slide FROM slides ORDER BY slide").fetchall()
        return [row[0] for row in rows]

    def removed_slides(self, present: set[str]) -> list[str]:
        """Return the slide paths the store has seen that are no longer present, sorted.

        Parameters
        ----------
        present : set of str
            Slide paths now in the slides folder.
        """
        with self._errors("list slides"):
            rows = self._db.execute("SELECT slide FROM slides ORDER BY slide").fetchall()
        return [row[0] for row in rows if row[0] not in present]

    def forget_slides(self, slides: Iterable[str]) -> None:
        """Drop removed slide paths from the current view (their results stay in history).

        Parameters
        ----------
        slides : iterable of str
            Slide paths no longer in the slides folder.
        """
        names = [(s,) for s in slides]
        if not names:
            return
        with self._transaction("forget removed slides") as conn:
            conn.executemany("DELETE FROM slides WHERE slide = ?", names)
            conn.executemany("DELETE FROM fingerprints WHERE rel = ?", names)

    def history(
        self, settings_hash: str | None = None, slide: str | None = None
    ) -> list[dict[str, Any]]:
        """Return every record ever stored, oldest first, optionally filtered.

        Parameters
        ----------
        settings_hash : str, optional
            Only results with these settings.
        slide : str, optional
            Only results for this slide path.

        Returns
        -------
        list of dict
            The records, each with ``run_id`` and ``written_at`` added under the keys
            ``_run_id`` and ``_written_at``.
        """
        sql = "SELECT record_json, run_id, written_at FROM history WHERE 1 = 1"
        args: list[str] = []
        if settings_hash is not None:
            sql += " AND settings_hash = ?"
            args.append(settings_hash)
        if slide is not None:
            sql += " AND slide = ?"
            args.append(slide)
        with self._errors("read the history"):
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        out = []
        for text, run_id, written_at in rows:
            record = self._decode(text)
            record["_run_id"] = run_id
            record["_written_at"] = written_at
            out.append(record)
        return out

    # -- fingerprint cache ------------------------------------------------------------------

    def fingerprint_cache_get(self, rel: str, size: int, mtime_ns: int) -> str | None:
        """Return the cached fingerprint of `rel` if its size and mtime are unchanged.

        Parameters
        ----------
        rel : str
            POSIX path relative to the slides folder.
        size : int
            File size in bytes.
        mtime_ns : int
            Modification time in nanoseconds (``os.stat().st_mtime_ns``).
        """
        with self._errors("read the fingerprint cache"):
            row = self._db.execute(
                "SELECT fingerprint FROM fingerprints WHERE rel = ? AND size = ? AND mtime_ns = ?",
                (rel, size, mtime_ns),
            ).fetchone()
        return None if row is None else str(row[0])

    def fingerprint_cache_put(self, rel: str, size: int, mtime_ns: int, fingerprint: str) -> None:
        """Cache the fingerprint of `rel` at this size and mtime (replacing older entries).

        Parameters
        ----------
        rel : str
            POSIX path relative to the slides folder.
        size : int
            File size in bytes.
        mtime_ns : int
            Modification time in nanoseconds.
        fingerprint : str
            From :func:`fingerprint`.
        """
        self.fingerprint_cache_put_many([(rel, size, mtime_ns, fingerprint)])

    def fingerprint_cache_put_many(self, rows: Iterable[tuple[str, int, int, str]]) -> None:
        """Cache many ``(rel, size, mtime_ns, fingerprint)`` entries in one transaction."""
        with self._transaction("write the fingerprint cache") as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO fingerprints (rel, size, mtime_ns, fingerprint)"
                " VALUES (?, ?, ?, ?)",
                list(rows),
            )

    def _fingerprint_cache_all(self) -> dict[str, tuple[int, int, str]]:
        """Return the whole fingerprint cache, ``rel -> (size, mtime_ns, fingerprint)``."""
        with self._errors("read the fingerprint cache"):
            rows = self._db.execute(
                "SELECT rel, size, mtime_ns, fingerprint FROM fingerprints"
            ).fetchall()
        return {rel: (size, mtime_ns, fp) for rel, size, mtime_ns, fp in rows}
