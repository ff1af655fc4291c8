"""Running slide tasks: in this process, a local pool of worker processes, or a Dask cluster.

:func:`run_slide` is the task unit that local process pools and Dask workers run: it analyses
a slide (:func:`fibroquant.pipeline.analyze_slide`), writes its masks and QC overlay, and turns
any error into a ``failed`` record, so one bad slide never stops a run. :func:`run_tasks`
yields the records as the slides finish. Worker processes pin OpenCV's and the BLAS thread
pools (:func:`run_slide_pinned`) and share the pool's cores (:mod:`fibroquant.cores`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2

from fibroquant import cores
from fibroquant.confidence import qc_flags
from fibroquant.config import Settings, TilingSettings
from fibroquant.errors import (
    QUIET_ENV,
    FibroquantError,
    interrupts_held,
    one_line,
    quiet_warnings,
)
from fibroquant.outdir import measuring_marker
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import Slide, open_slide
from fibroquant.store import require_regular, within_seconds
from fibroquant.tasks import (
    MASK_KINDS,
    SlideTask,
    discard_outputs,
    failed_record,
    output_files,
    remove_files,
    remove_zoom,
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
    from fibroquant.zoom import zoom_writer

    settings = Settings.model_validate_json(task.settings_json)
    out = Path(task.out_dir)
    stem = task_stem(task)
    slide: Slide | None = None
    file_mpp: float | None = None
    files = output_files(out, stem)
    # outputs written beside the fibre traits: the masks, and the QC overlay's draft (its
    # lumen calls come with the traits)
    written: list[BaseException | Any] = []

    def write_beside(partial: Any) -> None:
        try:
            draft = _write_outputs(files, partial, settings, task, finish=False)
        except Exception as exc:  # noqa: BLE001 - handled below, as if written here
            written.append(exc)
        else:
            written.append(draft)

    try:
        slide, file_mpp = open_within(task, settings.tiling.input_timeout_s)
        # no zoomable view (the default): no `after` step, so the slide's calibration is
        # freed before its traits and overlay (peak memory); a view of an earlier run goes
        zoom = settings.tiling.zoom is not False
        analysis = analyze_slide(
            task.path, settings, mpp=task.mpp, fallback_mpp=task.fallback_mpp,
            workers=task.threads, slide=slide,
            after=zoom_writer(out, stem, settings, task.slide, task.threads) if zoom else None,
            masks_ready=write_beside,
        )
        if not zoom:
            remove_zoom(out, stem)
    except FibroquantError as exc:
        return _failed(task, one_line(exc))
    except MemoryError:
        return _failed(task, f"{Path(task.path).name}: out of memory")
    except OSError as exc:
        return _failed(task, f"{task.path}: cannot read: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen file problem: record it, carry on
        logger.debug("unexpected error on %s:\n%s", task.path, traceback.format_exc())
        return _failed(
            task, f"{Path(task.path).name}: unexpected {type(exc).__name__}: {one_line(exc)}"[:500]
        )
    finally:
        if slide is not None:
            slide.close()
    try:
        if not written:
            _write_outputs(files, analysis, settings, task)
        elif isinstance(written[0], BaseException):
            raise written[0]
        else:  # drawn beside the traits: their lumen calls added now
            from fibroquant import report

            report.write_qc_draft(files["qc"], written[0], analysis.vessels)
            if task.write_masks:
                report.add_geojson_features(files["geojson"], report.vessel_features(
                    analysis.vessels, analysis.mpp, task.slide))
    except Exception as exc:  # noqa: BLE001 - the writers raise FibroquantError (or a bug)
        logger.debug("cannot write outputs of %s:\n%s", task.path, traceback.format_exc())
        return _failed(
            task, f"{Path(task.path).name}: cannot write outputs: {write_error(exc)}"[:500]
        )
    record = {"slide": task.slide, "fingerprint": task.fingerprint, **analysis.to_record()}
    if file_mpp is not None:  # the sample sheet gave the µm/px: flagged where the file differs
        record["file_mpp"] = file_mpp
        record["qc_flags"] = "; ".join(
            qc_flags(record, pale_counterstain=analysis.qc.pale_counterstain))
    return record


def _write_outputs(files: dict[str, Path], analysis: Any, settings: Settings,
                   task: SlideTask, *, finish: bool = True) -> Any:
    """A slide's QC overlay and, with ``write_masks``, its masks and GeoJSON (else those of
    an earlier measurement are removed). Without ``finish`` the overlay is left a draft
    (returned: :func:`fibroquant.report.qc_draft`), to be finished with the traits' lumen
    calls; the rest needs no trait."""
    from fibroquant import report

    draft: Any = report.qc_draft(analysis, max_px=settings.tiling.qc_max_px, title=task.slide)
    if finish:
        report.write_qc_draft(files["qc"], draft, analysis.vessels)
        draft = None
    if task.write_masks:
        # 0/255 straight from the bits: the same PNG as the bool mask, without its copy
        report.write_png(files["collagen"], analysis.collagen_bits.unpack(255))
        report.write_png(files["tissue"], analysis.tissue_bits.unpack(255))
        # outlines in full-resolution (level 0) pixel coordinates, for QuPath
        scale = analysis.mask_mpp / analysis.mpp
        report.write_mask_geojson(files["geojson"], analysis.tissue_bits,
                                  analysis.collagen_bits, scale=scale, slide_name=task.slide,
                                  vessels=analysis.vessels if finish else (), mpp=analysis.mpp)
    else:  # masks of an earlier measurement would contradict this one
        remove_files(files[k] for k in MASK_KINDS)
    return draft


def open_within(task: SlideTask, seconds: float) -> tuple[Slide, float | None]:
    """Open a task's slide (with the sample sheet's µm/px, else the file's, else ``--mpp``),
    given at most ``seconds``: a file on a hung network share, or one that blocks on open,
    fails its own row instead of holding the run (and its lock) for ever. Also returns the
    µm/px the file states when the sheet gave another (to check the sheet's against), else
    None.

    Raises
    ------
    SlideReadError
        ``PATH: opening the slide: no answer after N s``; not a regular file (a named pipe); as
        :func:`fibroquant.slides.open_slide`.
    """
    def open_it() -> tuple[Slide, float | None]:
        require_regular(Path(task.path), os.stat(task.path))  # a named pipe would block
        slide = open_slide(task.path, mpp=task.mpp)
        file_mpp = None
        if task.mpp is not None:
            file_mpp = _own_mpp(task.path)
        if slide.mpp is None and task.fallback_mpp is not None:
            slide.close()
            slide = open_slide(task.path, mpp=task.fallback_mpp)
        return slide, file_mpp

    return within_seconds(open_it, seconds, f"{task.path}: opening the slide",
                          discard=lambda opened: opened[0].close())


def _own_mpp(path: str) -> float | None:
    """The µm/px a file states, to check a sample sheet's against; None when it states none
    or cannot be read without the sheet's (the sheet's value is there to replace bad tags)."""
    try:
        own = open_slide(path)
    except Exception:  # noqa: BLE001 - a check only: the slide opens with the sheet's value
        return None
    try:
        return own.mpp
    finally:
        own.close()


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
    processes do not run N x cores threads in all. OpenBLAS's threads spin while they wait:
    two local worker processes left at two BLAS threads each took 1.3-2.4 s per 8k² slide
    instead of ~1.05 s. The limits are process-wide: tasks running side by side in one worker
    (a Dask worker with several threads) share one pinning, set by the first and undone when
    the last one ends (:func:`_pinned`).
    """
    if os.environ.get(QUIET_ENV) == "1":
        quiet_warnings()
    # in a local pool the tile threads follow the cores free (cores.tile_threads), and OpenCV and
    # BLAS keep one thread: the slides beside it use the others
    with _pinned(1 if cores.in_pool() else max(1, task.threads)):
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
    isolate: Collection[str] = (),
) -> Iterable[dict[str, Any]]:
    """Run slide tasks and yield each record as it finishes (in completion order).

    Parameters
    ----------
    tasks : list of SlideTask
    workers : int
        Local processes (slides in parallel); with one slide, threads over its tiles instead.
        A slide in a local pool runs its tiles on its share of the ``workers`` cores among the
        slides running, so one left running alone takes the cores the others gave back. With
        one worker (or one slide) the slides are measured in this process, each named in
        OUT_DIR while it is (:func:`fibroquant.outdir.measuring_marker`) so that a crash of
        this process is recorded by the next run.
    scheduler : str, distributed.Client or Dask cluster, optional
        Address of a Dask scheduler (``tcp://host:port``), a client, or a cluster object
        (``distributed.LocalCluster``, a dask-jobqueue cluster...): tasks then run on the
        cluster (the slides and OUT_DIR must be reachable from the workers).
    isolate : collection of str
        Fingerprints of slides that crashed a process before: measured in a worker process of
        their own even when the others are measured in this one, so that a second crash fails
        only their row.
    """
    if not tasks:
        return
    if scheduler is not None:
        yield from _run_dask(tasks, scheduler)
        return
    if workers <= 1 or len(tasks) == 1:
        for t in tasks:
            if t.fingerprint in isolate:
                yield from _run_local([t], workers)
            else:
                yield run_in_process(_with_threads(t, workers))
        return
    yield from _run_local(tasks, workers)


def run_in_process(task: SlideTask) -> dict[str, Any]:
    """:func:`run_slide` in this process, the slide named in OUT_DIR while it is measured.

    A crash here (a segfault in a decoder or a kernel) ends the run itself; the marker it
    leaves, with the fatal signal, lets the next run record the slide as crashed and measure it
    again in a process of its own (``isolate`` of :func:`run_tasks`). Measuring in this process
    keeps ``--workers 1`` free of process start-up (the marker costs ~1 ms a slide; a process
    per slide cost ~4 s a slide on a 2-core machine: start, imports, kernel cache) and
    debuggable (a breakpoint, a profiler, monkeypatching in tests).
    """
    settings = Settings.model_validate_json(task.settings_json)
    info = {"slide": task.slide, "fingerprint": task.fingerprint, "path": task.path,
            "settings_hash": settings.settings_hash(), "pid": os.getpid(),
            "started": time.time()}
    if settings.traits.enabled:
        from fibroquant.cores import release_code_pages
        from fibroquant.traits import start_warm_skan, warm_skan

        if task.threads > 1:  # skan loaded beside the slide; its traits wait for it
            start_warm_skan()
        elif warm_skan():  # one core: skan's per-process load before the slide's stall clock
            release_code_pages()  # numba's LLVM is not run again (peak memory)
    with measuring_marker(Path(task.out_dir), info, stall_s=settings.tiling.slide_timeout_s):
        return run_slide(task)


#: How often a worker process checks that the run that started it is still alive (seconds).
PARENT_CHECK_SECONDS = 0.5


def crash_message(task: SlideTask, exitcode: int | None) -> str:
    """The error of a slide whose worker process died while measuring it.

    Parameters
    ----------
    task : SlideTask
    exitcode : int or None
        The process's exit code (negative: killed by that signal).
    """
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exited with code {exitcode}"
    return f"{Path(task.path).name}: worker process {how} while measuring this slide"


def _die_with_parent(parent_pid: int) -> None:
    """End this worker process when the run that started it ends, however it ends.

    On Linux the kernel sends SIGKILL when the parent process exits
    (``prctl(PR_SET_PDEATHSIG)``); a worker started through a fork server has the server as
    its parent, so a daemon thread also checks every :data:`PARENT_CHECK_SECONDS` that the
    run's process still exists and exits at once when it does not.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            if not cores.process_alive(parent_pid):
                os._exit(1)

    threading.Thread(target=watch, name="fibroquant-parent-watch", daemon=True).start()


_PR_SET_PDEATHSIG = 1


def _worker_main(conn: Any, running: Any, n_cores: int, parent_pid: int) -> None:
    """A local worker process: measure the tasks the run sends, one at a time, until told to
    stop or the run is gone. Ctrl-C is the run's to handle (it ends its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cores.tune_gc()
    _die_with_parent(parent_pid)
    _init_worker(running, n_cores)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            rec = run_slide_pinned(task)
        except Exception as exc:  # noqa: BLE001 - run_slide records slide problems itself
            rec = failed_record(task, f"{Path(task.path).name}: unexpected "
                                f"{type(exc).__name__}: {one_line(exc)}"[:500])
        conn.send(rec)


class _Worker:
    """One local worker process, its end of the pipe and the task it is measuring."""

    def __init__(self, ctx: Any, running: Any, n_cores: int) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, name="fibroquant-worker", daemon=True,
                                args=(child, running, n_cores, os.getpid()))
        self.proc.start()
        child.close()
        self.task: SlideTask | None = None
        self.started = 0.0  # time.monotonic() when the task was sent

    def send(self, task: SlideTask) -> None:
        """Give the process a slide to measure."""
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def stop(self) -> None:
        """End the process now (it may be in the middle of a slide)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)


def _run_local(tasks: list[SlideTask], workers: int) -> Iterator[dict[str, Any]]:
    """Slides on ``workers`` local processes, largest first. A process that dies (a crash,
    the out-of-memory killer) fails only the slide it was measuring, named with the signal;
    a new process takes its place and the other slides carry on. Every process is ended
    when the run ends, is interrupted or fails."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = _worker_context(mp, skan=_traits_on(tasks))
    if ctx.get_start_method() == "forkserver":  # started here, where Ctrl-C may cut it short
        from multiprocessing import forkserver

        forkserver.ensure_running()
    # slides running now, across the worker processes: counted here, where tasks are sent and
    # records come back, and only read by the workers; so no lock (a named semaphore, which a
    # kill -9 of the run leaves to the resource tracker: "leaked semaphore objects"), and a
    # worker killed mid-slide is not counted as running for ever
    running = ctx.RawValue("i", 0)
    pending = [_with_threads(t, workers) for t in reversed(largest_first(tasks))]
    limit_s = slide_timeout_s(tasks)
    pool: list[_Worker] = []
    try:
        while pending or any(w.task is not None for w in pool):
            for w in pool:
                if w.task is None and pending:
                    w.send(pending.pop())
            while pending and len(pool) < min(workers, len(tasks)):
                with interrupts_held():  # a process half started when Ctrl-C/SIGTERM ends
                    w = _Worker(ctx, running, workers)  # the run would escape the clean-up
                    pool.append(w)
                w.send(pending.pop())
            busy = [w for w in pool if w.task is not None]
            running.value = len(busy)
            first_due = min(w.started for w in busy) + limit_s
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                         timeout=max(0.0, first_due - time.monotonic()))
            for w in busy:
                if w.conn not in ready and w.proc.sentinel not in ready:
                    if time.monotonic() - w.started >= limit_s:  # stalled: end it, carry on
                        task, w.task = w.task, None
                        assert task is not None
                        msg = (f"{Path(task.path).name}: not finished after {limit_s:g} s (a "
                               "read that hangs? tiling.slide_timeout_s); its worker process "
                               "was ended")
                        logger.warning("%s", msg)
                        yield failed_record(task, msg) | {"crashed": True}
                        w.stop()
                        pool.remove(w)
                    continue
                task, w.task = w.task, None
                assert task is not None  # a busy worker holds a task
                try:
                    if w.conn.poll():
                        yield w.conn.recv()
                        continue
                except (EOFError, OSError):
                    pass
                w.proc.join(timeout=5)  # died: its slide fails; a new process replaces it
                logger.warning("%s", crash_message(task, w.proc.exitcode))
                yield failed_record(task, crash_message(task, w.proc.exitcode)) | {
                    "crashed": True}
                w.stop()
                pool.remove(w)
    finally:
        for w in pool:
            w.stop()


def slide_timeout_s(tasks: list[SlideTask]) -> float:
    """``tiling.slide_timeout_s`` of the run's settings (every task carries the same)."""
    if not tasks:
        return float(TilingSettings.model_fields["slide_timeout_s"].default)
    return Settings.model_validate_json(tasks[0].settings_json).tiling.slide_timeout_s


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


def _package_on_worker_path() -> None:
    """Append the folder this fibroquant was imported from to ``PYTHONPATH`` (for the
    forkserver and its workers).

    The forkserver starts as ``python -c``, so the working folder comes first on its path, and
    on Python < 3.12 it does not take the parent's path. An editable install is found by a
    finder that runs after the path is searched, so a ``fibroquant/`` folder in the working
    folder (the clone, seen from one level above) was imported instead, as an empty namespace
    package, and every worker failed (issue 23). A regular package anywhere on the path wins
    over a namespace folder, so appending the real one is enough.
    """
    root = str(Path(__file__).resolve().parents[1])
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in current:
        os.environ["PYTHONPATH"] = os.pathsep.join([*current, root])


def _worker_context(mp: Any, *, skan: bool = False) -> Any:
    """The start method of local worker processes: ``forkserver`` with fibroquant's modules
    imported once in the server (the preload only imports, never starts threads), ``spawn``
    where there is no forkserver; never plain ``fork`` (the parent runs threads). Why:
    docs/decisions.md#worker-context. With ``skan`` (fibre traits on) the server also loads
    skan's path tracing (:mod:`fibroquant.warm_skan`): once per run, not once per worker.
    A server already running keeps the preload it started with.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    _package_on_worker_path()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fibroquant.executor", "fibroquant.report",
                                *(["fibroquant.warm_skan"] if skan else [])])
    return ctx


def _traits_on(tasks: list[SlideTask]) -> bool:
    """Whether the run measures fibre traits (every task carries the same settings)."""
    return bool(tasks) and Settings.model_validate_json(tasks[0].settings_json).traits.enabled


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
        client: Any = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT) if own else scheduler
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
            except Exception as exc:  # noqa: BLE001 - the worker or its task failed
                t = futures[fut]
                yield failed_record(t, f"{Path(t.path).name}: worker failed: "
                                    f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if own:
            client.close()



__all__ = [
    "SlideTask",
    "largest_first",
    "open_within",
    "run_in_process",
    "run_slide",
    "run_slide_pinned",
    "run_tasks",
    "write_error",
]
