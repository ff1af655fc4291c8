"""The cores a slide's tile threads may use now, inside a run's local pool of worker processes.

A local pool shares one counter of the slides running across its worker processes
(:func:`join_pool`, called by each worker's initializer), kept by the run that sends them their
slides. A slide's tile loop runs as many tiles
at once as its equal share of the pool's cores among the slides running
(:func:`tile_threads`), so a slide left running alone takes the cores the others gave back.
Outside a local pool (one process, a Dask worker) a slide uses the threads it was given.
The C heap of a process measuring slides is tuned once (:func:`tune_malloc`).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from typing import Any

#: Slides running in the local worker processes of this run (a shared
#: ``multiprocessing.RawValue`` the run sets and the workers read, given to each worker by
#: :func:`join_pool`); None outside a pool.
_running: Any = None
#: The cores those worker processes share.
_pool_cores = 0
#: How often a tile waiting for its slide's share of the cores looks again (seconds): the
#: share grows when a slide in another worker process ends, which no event here reports.
SHARE_POLL_SECONDS = 0.05


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed run not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):  # not a pid
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def join_pool(running: Any, cores: int) -> None:
    """Make this process a worker of a local pool of ``cores`` cores counted by ``running``."""
    global _running, _pool_cores
    _running, _pool_cores = running, cores


def in_pool() -> bool:
    """Whether this process is a worker of a local pool."""
    return _running is not None


def tile_threads(cap: int) -> int:
    """Tile threads a slide may use now: ``cap`` outside a local pool; inside one, an equal
    share of the pool's cores among the slides running (at least 1, at most ``cap``)."""
    if _running is None:
        return cap
    return max(1, min(cap, _pool_cores // max(1, _running.value)))


def gated(fn: Callable[..., Any], cap: int) -> Callable[..., Any]:
    """``fn`` run by at most :func:`tile_threads` threads at once (re-read as tiles start and
    end, and every :data:`SHARE_POLL_SECONDS` while one waits); the others wait their turn."""
    cond = threading.Condition()
    active = 0

    def run(*args: Any) -> Any:
        nonlocal active
        with cond:
            while active >= tile_threads(cap):
                cond.wait(SHARE_POLL_SECONDS)
            active += 1
        try:
            return fn(*args)
        finally:
            with cond:
                active -= 1
                cond.notify()

    return run


#: glibc ``mallopt`` parameters and the values :func:`tune_malloc` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLDS_BYTES = (64 << 20, 32 << 20)  # glibc before ~2.26 refuses more than 32 MB
_TRIM_THRESHOLD_BYTES = 256 << 20
_malloc_lock = threading.Lock()
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Let the C heap reuse tile-sized buffers (glibc only; once per process).

    Raises glibc's mmap threshold to 64 MB (32 MB where refused) and its trim threshold to
    256 MB, so tile buffers are not mapped and zero-filled afresh for every tile; left alone
    when ``MALLOC_MMAP_THRESHOLD_`` is set or the C library is not glibc. Why and what it saves:
    docs/decisions.md#malloc

    Returns
    -------
    bool
        Whether the mmap threshold is (now) raised.
    """
    global _malloc_tuned
    with _malloc_lock:
        if _malloc_tuned is None:
            _malloc_tuned = _set_mallopt()
        return _malloc_tuned


def _set_mallopt() -> bool:
    import os
    import platform

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        raised = any(libc.mallopt(_M_MMAP_THRESHOLD, v) for v in _MMAP_THRESHOLDS_BYTES)
        if raised:
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # no glibc after all
        return False
    return raised


_MADV_DONTNEED = 4
#: Shared libraries whose code pages :func:`release_code_pages` gives back: numba's LLVM, run
#: only while numba compiles or loads a kernel (~70 MB resident once skan's graph code has been
#: compiled in this process).
CODE_LIBRARIES = ("libllvmlite",)


def release_code_pages(libraries: tuple[str, ...] = CODE_LIBRARIES) -> int:
    """Drop the resident pages of the read-only mappings (machine code, constants) of the
    shared libraries whose file names contain one of ``libraries``; returns the bytes dropped.

    The pages are clean copies of the file: the next call into the library reads them back
    from the page cache (numba compiling or loading a kernel again), nothing else changes. A
    mapping that is writable, or holds pages copied on write (relocations), is left alone.
    Linux only (elsewhere, or where ``/proc/self/smaps`` cannot be read, nothing is done).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end, rss_kb in _code_mappings(text, libraries):
        if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += rss_kb << 10
    return dropped


def _code_mappings(smaps: str, libraries: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(start, end, resident KB) of the read-only mappings of ``libraries`` in a
    ``/proc/PID/smaps`` text that hold resident pages and no anonymous (copied) ones.

    Examples
    --------
    >>> text = '''7f00-7f10 r-xp 00000000 08:01 12 /x/libllvmlite.so
    ... Rss:                  40 kB
    ... Anonymous:             0 kB
    ... 7f10-7f20 rw-p 00010000 08:01 12 /x/libllvmlite.so
    ... Rss:                  40 kB
    ... Anonymous:            40 kB
    ... 7f20-7f30 r--p 00020000 08:01 12 /x/libllvmlite.so
    ... Rss:                   8 kB
    ... Anonymous:             8 kB
    ... '''
    >>> _code_mappings(text, ("libllvmlite",))
    [(32512, 32528, 40)]
    """
    found = []
    vma: dict[str, Any] | None = None

    def keep(v: dict[str, Any] | None) -> None:
        if (v is not None and v["lib"] and "w" not in v["perms"] and v.get("Anonymous") == 0
                and v.get("Rss", 0) > 0):
            found.append((v["start"], v["end"], v["Rss"]))

    for line in smaps.splitlines():
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and ":" in parts[3]:
            keep(vma)
            start, end = (int(a, 16) for a in parts[0].split("-"))
            name = parts[5] if len(parts) > 5 else ""
            lib = any(x in name.rsplit("/", 1)[-1] for x in libraries)
            vma = {"start": start, "end": end, "perms": parts[1], "lib": lib}
        elif vma is not None and len(parts) >= 2 and parts[0] in ("Rss:", "Anonymous:"):
            vma[parts[0][:-1]] = int(parts[1])
    keep(vma)
    return found


#: Allocations between two collections of the cyclic garbage collector's youngest generation
#: in a process running slides (Python's default: 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Run the cyclic garbage collector less often in this process (a command's, a worker's).

    The imports (pandas, numba, scikit-image, matplotlib) and numba's compiles allocate
    millions of objects and little cyclic garbage; at Python's default threshold a collection
    starts every 700 allocations, and each full one walks every object the imports left: on a
    1-GP slide, ~1.3 s of ~15 s CPU at ``--workers 1``, all of it holding the GIL. Arrays and
    tiles are freed by reference counting, not by this collector, so memory is not held longer.
    """
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


_libc: Any = None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a
    no-op).

    Called after each of a slide's phases (calibration, tiles, traits):
    :func:`tune_malloc` keeps freed buffers for reuse, which within a phase
    saves page faults, but across phases left one phase's temporaries resident while the next
    ran (on a 1-GP slide the trait tiles' ~150 MB stayed resident while the QC overlay was
    drawn).
    """
    global _libc
    if _libc is None:
        import ctypes
        import platform

        try:
            _libc = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
