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
