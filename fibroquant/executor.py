"""Running slide tasks: in this process, a local pool of worker processes, or a Dask cluster.

:func:`run_slide` is the task unit that local process pools and Dask workers run: it analyses
a slide (:func:`fibroquant.pipeline.analyze_slide`), writes its masks and QC overlay, and turns
any error into a ``failed`` record, so one bad slide never stops a run. :func:`run_tasks`
yields the records as the slides finish. Worker processes pin OpenCV's and the BLAS thread
pools (:func:`run_slide_pinned`) and share the pool's cores (:mod:`fibroquant.cores`).
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2

from fibroquant import cores
from fibroquant.config import Settings
from fibroquant.errors import QUIET_ENV, FibroquantError, one_line, quiet_warnings
from fibroquant.pipeline import analyze_slide
from fibroquant.tasks import (
    MASK_KINDS,
    SlideTask,
    discard_outputs,
    failed_record,
    output_files,
    remove_files,
    task_stem,
)

logger = logging.getLogger(__name__)


def _init_worker(running: Any, n_cores: int) -> None:
    """Initializer of a run's local worker processes: the shared count of running slides."""
    cores.join_pool(running, n_cores)


# ------------------------------------------------------------------------------------------
# Task unit for pools and clusters
# ------------------------------------------------------------------------------------------


def run_slide(task: SlideTask) -> dict[str, Any]:
    """Analyse one slide and write its masks and QC overlay; never raises for slide problems.

    Outputs follow the measurement: without ``write_masks``, masks and GeoJSON of an earlier
    measurement of the slide are removed; a failed slide's overlay, masks and GeoJSON are
    removed. A slide whose outputs cannot be written (read-only or full disk, a folder in the
    way) is ``failed`` with ``cannot write outputs: ...``: its numbers are not kept without
    its overlay.

    Returns
    -------
    dict
        The slide's record, ``status`` ``ok`` or ``failed`` with a one-line ``error``.
    """
    from fibroquant import report  # local: keeps workers' import light until needed

    settings = Settings.model_validate_json(task.settings_json)
    out = Path(task.out_dir)
    stem = task_stem(task)
    try:
        analysis = analyze_slide(
            task.path, settings, mpp=task.mpp, fallback_mpp=task.fallback_mpp,
            workers=task.threads,
        )
    except FibroquantError as exc:
        return _failed(task, one_line(exc))
    except MemoryError:
        return _failed(task, f"{Path(task.path).name}: out of memory")
    except Exception as exc:  # a bug or an unforeseen file problem: record it, carry on
        logger.debug("unexpected error on %s:\n%s", task.path, traceback.format_exc())
        return _failed(
            task, f"{Path(task.path).name}: unexpected {type(exc).__name__}: {one_line(exc)}"[:500]
        )
    files = output_files(out, stem)
    try:
        report.write_qc(files["qc"], analysis, max_px=settings.tiling.qc_max_px)
        if task.write_masks:
            report.write_png(files["collagen"], analysis.collagen_mask)
            report.write_png(files["tissue"], analysis.tissue_mask)
            # outlines in full-resolution (level 0) pixel coordinates, for QuPath
            scale = analysis.mask_mpp / analysis.record["mpp"]
            fc = report.mask_to_geojson(analysis.tissue_mask, analysis.collagen_mask,
                                        scale=scale, slide_name=task.slide)
            report.write_geojson(files["geojson"], fc)
        else:  # masks of an earlier measurement would contradict this one
            remove_files(files[k] for k in MASK_KINDS)
    except Exception as exc:  # noqa: BLE001 - the writers raise FibroquantError (or a bug)
        logger.debug("cannot write outputs of %s:\n%s", task.path, traceback.format_exc())
        return _failed(
            task, f"{Path(task.path).name}: cannot write outputs: {write_error(exc)}"[:500]
        )
    return {"slide": task.slide, "fingerprint": task.fingerprint, **analysis.record}


def _failed(task: SlideTask, error: str) -> dict[str, Any]:
    """A failed record, after removing the slide's outputs of any earlier measurement."""
    problem = discard_outputs(task.out_dir, task_stem(task))
    if problem:  # the run discards them again on receiving the record, and reports it
        logger.debug("%s", problem)
    return failed_record(task, error)


def write_error(exc: BaseException) -> str:
    """One line on why an output could not be written, without a repeated "cannot write".

    Parameters
    ----------
    exc : BaseException
        What a writer raised: :class:`FibroquantError` (``cannot write PATH: reason``),
        ``OSError``, or anything else (a bug, named as unexpected).

    Returns
    -------
    str
        e.g. ``/out/qc/a.png: Read-only file system``.
    """
    if not isinstance(exc, (FibroquantError, OSError)):
        return f"unexpected {type(exc).__name__}: {one_line(exc)}"
    text = one_line(exc)
    return text.removeprefix("cannot write ")


def run_slide_pinned(task: SlideTask) -> dict[str, Any]:
    """:func:`run_slide` in a worker process that shares the machine with other workers.

    OpenCV's thread pool and the BLAS and OpenMP pools (numpy's OpenBLAS, through
    ``threadpoolctl``) are limited to the task's threads while it runs, so that N worker
    processes do not run N × cores threads in all. OpenBLAS's threads spin while they wait:
    two local worker processes left at two BLAS threads each took 1.3–2.4 s per 8k² slide
    instead of ~1.05 s. The limits are process-wide: tasks running side by side in one worker
    (a Dask worker with several threads) share one pinning, set by the first and undone when
    the last one ends (:func:`_pinned`).
    """
    if os.environ.get(QUIET_ENV) == "1":
        quiet_warnings()
    # in a local pool the tile threads follow the cores free (cores.tile_threads), and OpenCV and
    # BLAS keep one thread: the slides beside it use the others
    with _pinned(1 if cores.in_pool() else max(1, task.threads)), cores.counted_running():
        return run_slide(task)


_pin_lock = threading.Lock()
_pin_users = 0
_pin_undo: tuple[int, Any] | None = None


@contextmanager
def _pinned(threads: int) -> Iterator[None]:
    """Limit OpenCV's and the BLAS/OpenMP thread pools to ``threads`` while any caller is
    inside; the limits found by the first caller are restored when the last one leaves."""
    global _pin_users, _pin_undo
    from threadpoolctl import threadpool_limits

    with _pin_lock:
        if _pin_users == 0:
            cv_threads = cv2.getNumThreads()
            cv2.setNumThreads(threads)
            _pin_undo = (cv_threads, threadpool_limits(limits=threads))
        _pin_users += 1
    try:
        yield
    finally:
        with _pin_lock:
            _pin_users -= 1
            if _pin_users == 0 and _pin_undo is not None:
                cv_threads, limits = _pin_undo
                limits.restore_original_limits()
                cv2.setNumThreads(cv_threads)
                _pin_undo = None


def run_tasks(
    tasks: list[SlideTask],
    *,
    workers: int,
    scheduler: str | Any | None = None,
) -> Iterable[dict[str, Any]]:
    """Run slide tasks and yield each record as it finishes (in completion order).

    Parameters
    ----------
    tasks : list of SlideTask
    workers : int
        Local processes (slides in parallel); with one slide, threads over its tiles instead.
        A slide in a local pool runs its tiles on its share of the ``workers`` cores among the
        slides running, so one left running alone takes the cores the others gave back.
    scheduler : str, distributed.Client or Dask cluster, optional
        Address of a Dask scheduler (``tcp://host:port``), a client, or a cluster object
        (``distributed.LocalCluster``, a dask-jobqueue cluster...): tasks then run on the
        cluster (the slides and OUT_DIR must be reachable from the workers).
    """
    if not tasks:
        return
    if scheduler is not None:
        yield from _run_dask(tasks, scheduler)
        return
    if workers <= 1 or len(tasks) == 1:
        for t in tasks:
            yield run_slide(_with_threads(t, workers))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = _worker_context(mp)
    running = ctx.Value("i", 0)  # slides running now, across the worker processes
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                             initializer=_init_worker, initargs=(running, workers)) as pool:
        # each slide may use up to every core, as its share of them (cores.tile_threads)
        futures = {pool.submit(run_slide_pinned, _with_threads(t, workers)): t
                   for t in largest_first(tasks)}
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except Exception as exc:  # a worker died (e.g. killed by the OOM killer)
                yield failed_record(futures[fut], f"{Path(futures[fut].path).name}: worker "
                                    f"failed: {type(exc).__name__}: {exc}"[:500])


def largest_first(tasks: list[SlideTask]) -> list[SlideTask]:
    """The tasks by file size, largest first (ties in the given order): with slides of mixed
    sizes the last ones to start are the small ones, so no core is left waiting on a large
    slide begun at the end. A file that cannot be read counts as empty (it fails quickly)."""
    def size(task: SlideTask) -> int:
        try:
            return os.stat(task.path).st_size
        except OSError:
            return 0

    sizes = [size(t) for t in tasks]
    order = sorted(range(len(tasks)), key=lambda i: -sizes[i])
    return [tasks[i] for i in order]


def _worker_context(mp: Any) -> Any:
    """The start method of local worker processes: ``forkserver`` where there is one (POSIX;
    Python's own default from 3.14 on Linux), with fibroquant's modules imported once in the
    server, so each worker starts without re-importing them (~0.5 s each: eight 8k² slides
    on two workers 7.1-7.2 -> 6.2-6.5 s); ``spawn`` elsewhere. Never plain ``fork``: the
    parent may be running threads (progress display, tile threads).

    The preload only imports: it must not start threads, since the server forks every worker
    (an analysis of a small section run there, to load the numba kernels once, left OpenCV's
    and the kernel warm-up's threads behind, and the forked workers hung).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fibroquant.executor", "fibroquant.report"])
    return ctx


def _with_threads(task: SlideTask, threads: int) -> SlideTask:
    from dataclasses import replace

    return replace(task, threads=max(1, threads))


#: How long to wait for a Dask scheduler given by its address before giving up.
DASK_CONNECT_TIMEOUT = "20s"


def _run_dask(tasks: list[SlideTask], scheduler: str | Any) -> Iterator[dict[str, Any]]:
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        msg = "--scheduler needs dask.distributed: pip install 'dask[distributed]'"
        raise FibroquantError(msg) from exc
    # an address, a Client, or a cluster object (LocalCluster, a dask-jobqueue cluster...):
    # a cluster gets a client of its own, closed at the end like one made from an address
    own = not hasattr(scheduler, "submit")
    if own and not isinstance(scheduler, str) and not hasattr(scheduler, "scheduler_address"):
        msg = (f"scheduler: expected an address (tcp://HOST:PORT), a distributed.Client or a "
               f"Dask cluster object, got {type(scheduler).__name__}")
        raise FibroquantError(msg)
    try:
        client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT) if own else scheduler
    except OSError as exc:
        where = getattr(scheduler, "scheduler_address", scheduler)
        msg = f"cannot reach the Dask scheduler at {where}: {exc}"
        raise FibroquantError(msg) from None
    try:
        run = uuid.uuid4().hex[:12]  # two runs sharing a cluster keep their own tasks
        n = len(tasks)  # largest first: a higher priority runs earlier
        futures = {client.submit(run_slide_pinned, t, pure=False, priority=n - i,
                                 key=f"slide-{run}-{i}-{t.fingerprint}"): t
                   for i, t in enumerate(largest_first(tasks))}
        for fut in as_completed(list(futures)):
            try:
                yield fut.result()
            except Exception as exc:
                t = futures[fut]
                yield failed_record(t, f"{Path(t.path).name}: worker failed: "
                                    f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if own:
            client.close()



__all__ = [
    "SlideTask",
    "largest_first",
    "run_slide",
    "run_slide_pinned",
    "run_tasks",
    "write_error",
]
