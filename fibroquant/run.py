"""A whole run: discover slides, plan against the results store, measure, write the tables.

This is the library behind ``fibroquant analyze``; the CLI only parses options and prints.
Results are stored slide by slide as they finish, so a crash loses at most the slides in flight;
every table in OUT_DIR is regenerated from the store at the end and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fibroquant import __version__, schema
from fibroquant.cohort import aggregate_mice, read_sample_sheet, sheet_without_samples
from fibroquant.config import Settings
from fibroquant.errors import (
    ConfigError,
    FibroquantError,
    SampleSheetError,
    SlideReadError,
    StoreError,
    interrupt_exit_code,
    name_list,
    one_line,
)
from fibroquant.layout import STORE_NAME
from fibroquant.outdir import (
    OutputLock,
    atomic_write_csv,
    atomic_write_text,
    clean_output_folder,
    fsync_dir,
    take_measuring_marker,
)
from fibroquant.slides import list_slides, mpp_problem
from fibroquant.store import REBUILD_HINT, FingerprintCache, ResultStore, within_seconds
from fibroquant.tasks import (
    OUTPUT_KINDS,
    SlideTask,
    discard_outputs,
    move_outputs,
    output_files,
    output_stem,
    output_stems,
    task_stem,
)

logger = logging.getLogger(__name__)


#: Columns of slides.csv, in this order (the output contract, from :mod:`fibroquant.schema`);
#: sample-sheet columns follow ``group``, columns the schema does not know come last.
SLIDE_COLUMNS = [c.name for c in schema.SLIDES if not c.optional]
#: Status of a measured slide whose colours fit another protocol clearly better than the
#: expected one (:func:`fibroquant.stains.stain_verdict`): its row keeps its measurements, and
#: it is left out of mice and groups unless the run keeps wrong stains. The store keeps such a
#: slide as ``ok`` (measured) with ``wrong_stain`` true; the tables show this status.
WRONG_STAIN = "wrong-stain"
#: Status of a slide of the folder without a stored result: the run was interrupted before it
#: was measured (not a failure: the next run measures it).
NOT_MEASURED = "not-measured"
_INTERNAL = {"settings_hash", "version", "crashed"}
#: A slide whose measurement killed its worker process this many times (in as many runs) is
#: not measured again without ``--force``: it would only crash again.
MAX_CRASHES = 2


@dataclass
class RunSummary:
    """What one run did (also written as ``run.json``)."""

    processed: int = 0
    skipped: int = 0
    failed: int = 0
    #: slides without a result: the run was interrupted before they were measured
    not_measured: int = 0
    removed: int = 0
    #: the slides the store forgot: their files left the folder (and the sheet)
    removed_slides: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exit_code: int = 0
    interrupted: bool = False
    #: (slide, why) of the measured slides whose colours show another stain
    wrong_stain: list[tuple[str, str]] = field(default_factory=list)
    #: slides not measured again because they crashed their worker process MAX_CRASHES times
    crashed: list[str] = field(default_factory=list)
    comparison: str = ""
    #: the tables and report describe this run (False: interrupted or terminated before)
    tables_written: bool = False
    warnings: list[str] = field(default_factory=list)
    failed_slides: list[tuple[str, str]] = field(default_factory=list)
    #: (old path, new path) of renamed slides whose measurement and outputs were kept
    renamed: list[tuple[str, str]] = field(default_factory=list)


def package_versions() -> dict[str, str]:
    """Versions of fibroquant and the libraries that shape its numbers."""
    names = ["numpy", "scipy", "scikit-image", "opencv-python-headless", "tifffile",
             "imagecodecs", "pandas", "statsmodels", "numba", "pydantic"]
    out = {"fibroquant": __version__, "python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def discover(slides_dir: Path, out_dir: Path, timeout_s: float = 120.0) -> list[Path]:
    """Slide files under ``slides_dir``, leaving out anything inside ``out_dir``.

    Other fibroquant output folders inside ``slides_dir`` (earlier results) are left out by
    :func:`fibroquant.slides.list_slides`; ``out_dir`` is also left out before its first run.
    A folder that does not answer within ``timeout_s`` (a hung network share) is an error,
    not a run that hangs holding the output folder's lock.
    """
    def walk() -> list[Path]:
        if not slides_dir.is_dir():
            msg = f"{slides_dir}: not a folder"
            raise FibroquantError(msg)
        out_res = out_dir.resolve()
        files = []
        for p in list_slides(slides_dir):
            try:
                p.resolve().relative_to(out_res)
            except (ValueError, OSError, RuntimeError):  # outside OUT_DIR, or a symlink loop
                files.append(p)  # (which fails its own row when fingerprinted)
        return files

    return within_seconds(walk, timeout_s, f"{slides_dir}: listing the slides folder")


def _relative(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def outputs_current(out_dir: Path, task: SlideTask, last: tuple[str, str, str] | None) -> bool:
    """Whether a slide's files in ``out_dir`` show its current content.

    They do when the slide path's latest measurement (:meth:`ResultStore.last_measured`) was of
    this content and succeeded, and its overlay (and, with masks, its masks and GeoJSON) exist.
    Otherwise they show another content (a file changed, e.g. back to a content measured
    before) or nothing, and the slide is measured again. A return to earlier settings reuses
    the stored results without measuring again (issue 6), so until the next measurement the
    files show the settings last measured with (``--force`` redraws them).

    Parameters
    ----------
    out_dir : Path
    task : SlideTask
        The slide, with its fingerprint, output stem and whether masks are wanted.
    last : tuple of str, optional
        ``(fingerprint, settings_hash, status)`` of the path's latest measurement (any
        settings: see above).
    """
    if last is None or (last[0], last[2]) != (task.fingerprint, "ok"):
        return False
    kinds = OUTPUT_KINDS if task.write_masks else ("qc",)
    return all(path.exists() for path in output_files(out_dir, task_stem(task), kinds).values())


def renamed_sources(last: dict[str, tuple[str, str, str]], previous: Iterable[str],
                    present: set[str], settings_hash: str) -> dict[str, list[str]]:
    """Slide paths the last run saw, gone from the folder now, whose files show a measurement
    with these settings, by fingerprint: where a slide now found under another name had its
    overlay and masks.

    Only the last run's paths: the stem of a path removed earlier (or a slide's first name,
    renamed twice) may have been taken since by another slide's files.

    Parameters
    ----------
    last : dict
        :meth:`ResultStore.last_measured` (path -> ``(fingerprint, settings_hash, status)``).
    previous : iterable of str
        The slide paths of the last run (:meth:`ResultStore.slide_paths`, before this run's
        planning).
    present : set of str
        The slide paths of this run.
    settings_hash : str
    """
    out: dict[str, list[str]] = {}
    for slide in sorted(set(previous) - present):
        fp, sh, status = last.get(slide, ("", "", ""))
        if sh == settings_hash and status == "ok":
            out.setdefault(fp, []).append(slide)
    return out


def slide_key(content: str, sheet_mpp: float | None, fallback_mpp: float | None) -> str:
    """The store key of a slide: its content fingerprint, and the µm/px it is measured with
    when that does not come from the file (a sheet ``mpp`` wins over ``--mpp``)."""
    if sheet_mpp is not None:
        return f"{content}-mpp{sheet_mpp:g}"
    if fallback_mpp is not None:
        return f"{content}-fallbackmpp{fallback_mpp:g}"
    return content


#: What the next run does with a slide, by the state :func:`plan_run` gives it.
MEASURE_STATES = ("new", "changed", "not_measured", "failed_before", "outputs_missing")


@dataclass(frozen=True)
class PlannedSlide:
    """One slide of a run's plan (:func:`plan_run`).

    ``state`` is one of: ``new`` (a path the store has not seen), ``changed`` (its content or
    µm/px differ from the last run's), ``not_measured`` (not with these settings),
    ``failed_before`` (measured again), ``crashed`` (crashed its worker :data:`MAX_CRASHES`
    times: not measured again without ``--force``), ``outputs_missing`` (measured, but its
    overlay is missing or shows another content), ``renamed`` (measured under a name gone
    since: its outputs are moved, ``renamed_from``), ``unchanged``, ``unreadable`` (fails at
    once: ``error``).
    """

    slide: str
    path: Path
    key: str
    state: str
    sheet_mpp: float | None = None
    fallback_mpp: float | None = None
    error: str | None = None
    renamed_from: tuple[str, ...] = ()
    size_bytes: int | None = None


@dataclass
class RunPlan:
    """What a run over a slides folder does (:func:`plan_run`): read-only, shared by
    ``analyze`` (which then does it) and ``status --slides`` (which shows it)."""

    slides: list[PlannedSlide]
    #: slide paths the store knew before (the last run's folder) and those gone since
    previous: list[str]
    removed: list[str]
    #: the fingerprints computed, for the store's cache (written by analyze only)
    keys: dict[str, str] = field(default_factory=dict)
    #: unchanged slides whose overlay (and masks) were drawn with other settings: a return to
    #: earlier settings reuses their stored results without measuring (and drawing) again
    drawn_otherwise: list[str] = field(default_factory=list)


def plan_run(store: ResultStore, slides_dir: Path, out_dir: Path, files: list[Path], *,
             settings_hash: str, cache: FingerprintCache, masks: bool = False,
             sheet_mpp: Mapping[str, float] | None = None, fallback_mpp: float | None = None,
             ) -> RunPlan:
    """Decide what a run does with each slide file, without writing anything.

    Parameters
    ----------
    store : ResultStore
    slides_dir, out_dir : Path
    files : list of Path
        The slide files (:func:`discover`).
    settings_hash : str
    cache : FingerprintCache
        Fingerprints (analyze flushes what it learns; status does not).
    masks : bool
        Whether the run writes masks (their files count as outputs).
    sheet_mpp : mapping, optional
        Slide path -> the sample sheet's µm/px.
    fallback_mpp : float, optional
        ``--mpp`` of this run; without it, each slide's remembered ``--mpp``.

    Returns
    -------
    RunPlan
    """
    sheet_mpp = sheet_mpp or {}
    remembered = store.remembered_mpp() if fallback_mpp is None else {}
    stored = store.slide_fingerprints()
    known = store.known(settings_hash)
    crashes = store.crashes(settings_hash)
    last = store.last_measured()
    previous = sorted(stored)
    rels = [_relative(p, slides_dir) for p in files]
    stems = output_stems(rels)
    planned: list[PlannedSlide] = []
    drawn_otherwise: list[str] = []
    keys: dict[str, str] = {}
    for p, rel in zip(files, rels, strict=True):
        over = sheet_mpp.get(rel)
        try:
            content = cache.fingerprint(p)
            size = p.stat().st_size
        except (SlideReadError, OSError) as exc:
            key = "unreadable-" + hashlib.sha256(rel.encode()).hexdigest()[:16]
            planned.append(PlannedSlide(rel, p, key, "unreadable", error=one_line(exc)))
            keys[rel] = key
            continue
        problem = mpp_problem(over, "the sample sheet's mpp column") if over is not None else None
        if problem:  # a typo in the sheet: this slide's row fails at once
            key = slide_key(content, over, None)
            planned.append(PlannedSlide(rel, p, key, "unreadable", error=f"{rel}: {problem}"))
            keys[rel] = key
            continue
        fallback = fallback_mpp if fallback_mpp is not None else remembered.get(rel)
        key = slide_key(content, over, fallback)
        keys[rel] = key
        status = known.get(key)
        if status == "ok":
            task = SlideTask(path=str(p), slide=rel, fingerprint=key, mpp=over,
                             fallback_mpp=fallback, settings_json="", out_dir=str(out_dir),
                             write_masks=masks, stem=stems[rel])
            state = "unchanged" if outputs_current(out_dir, task, last.get(rel)) else (
                "outputs_missing")
            if state == "unchanged" and last[rel][1] != settings_hash:
                drawn_otherwise.append(rel)
        elif status == "failed" and crashes.get(key, 0) >= MAX_CRASHES:
            state = "crashed"
        elif rel not in stored:
            state = "new"
        elif stored[rel] != key:
            state = "changed"
        elif status == "failed":
            state = "failed_before"
        else:
            state = "not_measured"
        planned.append(PlannedSlide(rel, p, key, state, sheet_mpp=over, fallback_mpp=fallback,
                                    size_bytes=size))
    # a slide renamed (or moved) since it was measured: same content, so its result stands;
    # its overlay and masks are moved to the new name instead of measuring
    sources = renamed_sources(last, previous, set(keys), settings_hash)
    for i, entry in enumerate(planned):
        if entry.state == "outputs_missing" and sources.get(entry.key):
            planned[i] = replace(entry, state="renamed",
                                 renamed_from=tuple(sources[entry.key]))
    removed = sorted(set(previous) - set(keys))
    return RunPlan(planned, previous, removed, keys, drawn_otherwise)



def _keep_renamed(store: ResultStore, out_dir: Path, task: SlideTask,
                  sources: dict[str, list[str]], old_stems: dict[str, str],
                  stems_now: set[str], settings_hash: str, run_id: int) -> str | None:
    """Move the outputs of the slide's old name to its new one and record it; the old path,
    or None when there is none to take them from (then the slide is measured)."""
    for old in sources.get(task.fingerprint, []):
        stem = old_stems.get(old) or output_stem(old)
        if stem.casefold() in stems_now:  # another present slide writes there
            continue
        try:
            if not move_outputs(out_dir, stem, task_stem(task), task.slide,
                                masks=task.write_masks):
                continue
        except Exception as exc:  # noqa: BLE001 - any problem: measure it instead
            logger.warning("%s: cannot take the outputs of %s (%s); measuring it again",
                           task.slide, old, one_line(exc))
            return None
        store.record_move(task.slide, task.fingerprint, settings_hash, run_id=run_id)
        sources[task.fingerprint].remove(old)
        return old
    return None


def stale_stems(previous_slides: Iterable[str], stems: dict[str, str]) -> list[str]:
    """Output stems the last run used that no slide of this run uses (removed slides).

    Parameters
    ----------
    previous_slides : iterable of str
        The slide paths the store knew before this run (the previous run's folder).
    stems : dict of str to str
        This run's :func:`output_stems`.

    Returns
    -------
    list of str
        Sorted stems whose files belong to no present slide (the plain :func:`output_stem` of
        each previous slide counts too: earlier versions gave slides with the same stem that
        one).
    """
    previous = list(previous_slides)
    old = set(output_stems(previous).values()) | {output_stem(s) for s in previous}
    current = {stem.casefold() for stem in stems.values()}  # one file on some file systems
    return sorted(stem for stem in old if stem.casefold() not in current)


def identical_files(slides_df: pd.DataFrame) -> str | None:
    """A warning naming slides whose files have identical content (one scan under two names,
    e.g. a copy kept beside a renamed file), which the tables would count twice; None when
    every file differs. Files are compared by fingerprint (size and both ends of the file);
    unreadable files are left out."""
    if "fingerprint" not in slides_df or slides_df.empty:
        return None
    content = slides_df["fingerprint"].astype(str).str.slice(0, 64)  # without the mpp suffix
    ok = ~content.str.startswith("unreadable-") & (content.str.len() == 64)
    groups = [sorted(g) for _, g in slides_df.loc[ok, "slide"].groupby(content[ok]) if len(g) > 1]
    if not groups:
        return None
    listed = "; ".join(" = ".join(g) for g in sorted(groups))
    return (f"identical files counted as separate slides (the same scan under two names?): "
            f"{listed}")


def blob_rule_mixed(slides_df: pd.DataFrame, settings: Settings) -> str | None:
    """A warning when the automatic blob rule (``collagen.blob_max_area_um2: null``) was used on
    some of a run's measured slides and not on others: they were then measured differently
    (a few dark specks of debris can read as iron-haematoxylin nuclei and turn it off), which
    a comparison between groups must not depend on. None when consistent or not automatic."""
    if settings.collagen.blob_max_area_um2 is not None or "blob_max_area_um2" not in slides_df:
        return None
    ok = slides_df.loc[slides_df["status"] == "ok", "blob_max_area_um2"]
    ok = pd.to_numeric(ok, errors="coerce").dropna()
    used = int((ok > 0).sum())
    if used == 0 or used == len(ok):
        return None
    return (f"the automatic blob rule (blue-purple nuclei) was used on {used} of {len(ok)} "
            "slides, which are therefore measured differently: set collagen.blob_max_area_um2 "
            "to 80 (plain haematoxylin) or 0 (iron haematoxylin) for the whole study")


def _discard(out_dir: Path, stem: str) -> None:
    """Remove a slide stem's overlay, masks and GeoJSON; a file that stays is logged."""
    problem = discard_outputs(out_dir, stem)
    if problem:
        logger.warning("%s", problem)


def analyze_folder(
    slides_dir: str | Path,
    out_dir: str | Path,
    settings: Settings,
    *,
    samples: str | Path | None = None,
    control: str | None = None,
    mpp: float | None = None,
    workers: int = 1,
    scheduler: str | Any | None = None,
    force: bool = False,
    wait: bool = False,
    masks: bool = False,
    command: str = "",
    on_plan: Callable[[int, int], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    keep_wrong_stain: bool = False,
    allow_unlisted: bool = False,
    allow_missing: bool = False,
) -> RunSummary:
    """Measure every new or changed slide of a folder and regenerate the study tables.

    Parameters
    ----------
    slides_dir : str or Path
        Folder of slides (searched recursively).
    out_dir : str or Path
        Output folder; holds the results store, tables, masks, QC overlays and report.
    settings : Settings
    samples : str or Path, optional
        Sample sheet (``slide,mouse,group`` + extra columns). Without it every slide is its own
        mouse and no comparison is made.
    control : str, optional
        Control group name (default: a group called ``control``).
    mpp : float, optional
        µm per pixel for slides whose files lack it.
    workers : int
        Local processes/threads.
    scheduler : str, distributed.Client or Dask cluster, optional
        Run the slides on a Dask cluster: its scheduler's address (``tcp://HOST:PORT``), a
        client, or a cluster object such as ``distributed.LocalCluster``.
    force : bool
        Re-measure slides already in the store.
    wait : bool
        Wait for another run holding OUT_DIR instead of failing.
    masks : bool
        Write collagen and tissue masks.
    command : str
        The command line, for provenance.
    on_plan, on_result : callable, optional
        Progress hooks: ``on_plan(n_to_process, n_skipped)`` and ``on_result(record)``.
    keep_wrong_stain : bool
        Count slides of status ``wrong-stain`` in mice and groups (left out by default). The
        run exits with 2 when most measured slides are the wrong stain, kept or not.
    allow_unlisted : bool
        Slide files the sheet does not list are measured and stored but left out of the tables
        (a warning names them) instead of a :class:`SampleSheetError` before any work.
    allow_missing : bool
        Sheet rows whose slide file is not in the folder (not scanned yet) stay in the tables
        as ``not-measured`` (a warning names them) instead of a :class:`SampleSheetError`.

    Returns
    -------
    RunSummary

    Raises
    ------
    FibroquantError
        Problems that stop the whole run before any slide is measured (no slides, a bad
        sample sheet, OUT_DIR locked by another run, an unusable store).
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    # absolute, as the command line gives them: slide paths are joined to slides_dir, and
    # tasks sent to a cluster's workers must not depend on this process's working folder
    slides_dir = Path(slides_dir).resolve()
    out_dir = Path(out_dir).resolve()
    samples = Path(samples).resolve() if samples is not None else None
    problem = mpp_problem(mpp, "--mpp") if mpp is not None else None
    if problem:
        raise ConfigError(problem)
    if slides_dir.is_file():  # one image: a study of that slide, in its folder
        one = slides_dir.resolve()
        slides_dir = one.parent
        files = [p for p in discover(slides_dir, out_dir, settings.tiling.input_timeout_s)
                 if p.resolve() == one]
        if not files:
            msg = f"{one}: not a slide file (.svs .ndpi .tif .tiff .png .jpg ...)"
            raise FibroquantError(msg)
    else:
        files = discover(slides_dir, out_dir, settings.tiling.input_timeout_s)
    if not files:
        msg = f"{slides_dir}: no slide files found (.svs .ndpi .tif .tiff .png .jpg ...)"
        raise FibroquantError(msg)
    sheet = (
        read_sample_sheet(samples, slides_dir, files, allow_unlisted=allow_unlisted,
                          allow_missing=allow_missing)
        if samples is not None
        else sheet_without_samples(files, slides_dir)
    )
    if control is not None and samples is not None:
        groups = sorted(set(sheet["group"]))
        if control not in groups:
            msg = (f"control group {control!r} is not a group of {Path(samples).name} "
                   f"(groups: {', '.join(map(repr, groups))})")
            raise SampleSheetError(msg)
    extra_cols = [c for c in sheet.columns if c not in ("slide", "mouse", "group")]
    unlisted = sheet.attrs.get("unlisted", [])
    missing = sheet.attrs.get("missing", {})
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only file system, a file in the way
        msg = f"cannot create the output folder {out_dir}: {exc.strerror or exc}"
        raise StoreError(msg) from None
    summary = RunSummary()
    interrupt_code = 130
    shash = settings.settings_hash()
    with OutputLock(out_dir, wait=wait):
        clean_output_folder(out_dir)
        with ResultStore(out_dir / STORE_NAME) as store:
            _refuse_lost_runs(store, out_dir)
            run_id = store.start_run(
                command=command, version=__version__, settings_hash=shash,
                settings_json=json.dumps(settings.model_dump(mode="json"), sort_keys=True),
            )
            ended_on = record_run_crash(store, out_dir, run_id)
            sheet_mpp = ({str(r): float(v) for r, v in sheet.set_index("slide")["mpp"].items()
                          if pd.notna(v)} if "mpp" in sheet.columns else {})
            # --mpp is remembered per slide: a rerun without it measures the same way
            if mpp is not None:
                store.remember_mpp((_relative(p, slides_dir) for p in files), mpp)
            stems = output_stems(_relative(p, slides_dir) for p in files)
            with FingerprintCache(store, slides_dir,
                                  timeout=settings.tiling.input_timeout_s) as cache:
                plan = plan_run(store, slides_dir, out_dir, files, settings_hash=shash,
                                cache=cache, masks=masks, sheet_mpp=sheet_mpp,
                                fallback_mpp=mpp)
            previous_slides = plan.previous
            keys = plan.keys
            sizes = {e.slide: e.size_bytes for e in plan.slides if e.size_bytes is not None}
            store.link_slides(keys, run_id=run_id)
            known = store.known(shash)
            last = store.last_measured()
            sources = renamed_sources(last, previous_slides, set(keys), shash)
            old_stems = output_stems(previous_slides)
            stems_now = {stem.casefold() for stem in stems.values()}
            early_failed: list[dict[str, Any]] = []
            tasks: list[SlideTask] = []
            todo = []
            for e in plan.slides:
                if e.state == "unreadable":
                    early_failed.append({"slide": e.slide, "fingerprint": e.key,
                                         "status": "failed", "error": e.error,
                                         "version": __version__})
                    continue
                t = SlideTask(
                    path=str(e.path), slide=e.slide, fingerprint=e.key, mpp=e.sheet_mpp,
                    fallback_mpp=e.fallback_mpp, settings_json=settings.model_dump_json(),
                    out_dir=str(out_dir), write_masks=masks, stem=stems[e.slide])
                tasks.append(t)
                if force or e.state in MEASURE_STATES:
                    todo.append(t)
                elif e.state == "crashed":
                    summary.crashed.append(e.slide)  # its stored failure stands
                elif e.state == "renamed":
                    old = _keep_renamed(store, out_dir, t, sources, old_stems, stems_now,
                                        shash, run_id)
                    if old is None:
                        todo.append(t)
                    else:
                        summary.renamed.append((old, t.slide))
            summary.skipped = len(tasks) - len(todo)
            if on_plan:
                n_early = sum(1 for r in early_failed
                              if force or known.get(r["fingerprint"]) != "failed")
                on_plan(len(todo) + n_early, summary.skipped + len(early_failed) - n_early)
            for rec in early_failed:
                if known.get(rec["fingerprint"]) == "failed" and not force:
                    summary.skipped += 1  # still unreadable, already recorded
                    continue
                store.put_result({**rec, "settings_hash": shash}, run_id=run_id)
                _discard(out_dir, stems[rec["slide"]])  # no overlay of an earlier content
                summary.processed += 1
                if on_result:
                    on_result(rec)
            try:
                if todo:  # the analysis stack is imported only when there is work
                    from fibroquant.executor import run_tasks

                    if workers > 1 and len(todo) > 1:
                        preload_table_stack()
                else:
                    run_tasks = _no_tasks
                # slides that crashed a process before are measured in one of their own
                isolate = set(store.crashes(shash)) | ({ended_on} if ended_on else set())
                for rec in run_tasks(todo, workers=workers, scheduler=scheduler,
                                     isolate=isolate):
                    rec = {**rec, "settings_hash": shash}
                    store.put_result(rec, run_id=run_id)
                    if rec.get("status") != "ok":  # e.g. a worker that died mid-write
                        _discard(out_dir, stems[rec["slide"]])
                    summary.processed += 1
                    if on_result:
                        on_result(rec)
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: keep what is stored
                summary.interrupted = True
                interrupt_code = interrupt_exit_code(exc)
            present = set(keys)
            removed = store.removed_slides(present)
            # a slide the sheet lists whose file is gone (an archived scan, a half-mounted
            # share; --allow-missing) keeps its last measurement, overlay and name
            gone = [s for s in removed if s in missing]
            removed = [s for s in removed if s not in missing]
            missing = {s: hint for s, hint in missing.items() if s not in gone}
            for s in gone:
                if s in old_stems and old_stems[s].casefold() not in stems_now:
                    stems[s] = old_stems[s]
            renamed_from = {a for a, _ in summary.renamed}  # moved, not removed
            summary.removed_slides = [s for s in removed if s not in renamed_from]
            summary.removed = len(summary.removed_slides)
            store.forget_slides(removed)
            for stem in stale_stems(previous_slides, stems):
                _discard(out_dir, stem)
            current = store.current_results(shash, present=present | set(gone))
            # unlisted slides that failed: out of the tables, not out of the count and exit code
            unlisted_failed = [(str(r["slide"]), str(r.get("error") or ""))
                               for r in current if r["slide"] in unlisted
                               and slide_status(r) not in ("ok", WRONG_STAIN)]
            notes = unlisted_note(unlisted, failed=[s for s, _ in unlisted_failed])
            # a gone slide measured only with other settings has nothing to keep here
            stored_now = {r["slide"]: r for r in current}
            gone_unmeasured = [s for s in gone if s not in stored_now]
            gone = [s for s in gone if s in stored_now]
            notes += missing_note(missing, slides_dir, gone=gone,
                                  gone_unmeasured=gone_unmeasured)
            if plan.drawn_otherwise and not force:
                notes.append(
                    f"{len(plan.drawn_otherwise)} slide(s) ({name_list(plan.drawn_otherwise)}) "
                    "keep results stored with these settings, but their QC overlays (and masks) "
                    "show the last settings measured with; --force redraws them")
            slides_df = build_slides_table(sheet, current, missing=missing,
                                           gone=gone_unmeasured)
            measured_or_not = ["ok", WRONG_STAIN, NOT_MEASURED]
            summary.failed = (int((~slides_df["status"].isin(measured_or_not)).sum())
                              + len(unlisted_failed))
            summary.not_measured = int((slides_df["status"] == NOT_MEASURED).sum())
            summary.failed_slides = [
                (str(r.slide), str(r.error)) for r in slides_df.itertuples()
                if r.status not in measured_or_not
            ] + unlisted_failed
            summary.wrong_stain = [
                (str(r["slide"]), str(r.get("stain_warning") or ""))
                for r in slides_df.to_dict("records") if r["status"] == WRONG_STAIN
            ]
            # every slide of the tables, those whose file is gone too (their stored
            # fingerprint): `store rebuild` restores the results the tables show
            inputs = [{"slide": k, "fingerprint": v, "size_bytes": sizes.get(k),
                       "stain_source": stored_now.get(k, {}).get("stain_source"),
                       "stain_vectors": _json_or_none(
                           stored_now.get(k, {}).get("stain_vectors")),
                       **({"file_gone": True} if k in gone else {})}
                      for k, v in sorted({**keys, **{s: stored_now[s].get("fingerprint")
                                                     for s in gone}}.items())]
            provenance = {
                "fibroquant_version": __version__, "started_utc": started,
                "command": command, "settings_hash": shash,
                "settings": settings.model_dump(mode="json"),
                "versions": package_versions(), "platform": platform.platform(),
                "slides_dir": str(slides_dir.resolve()),
                "samples": str(samples.resolve()) if samples else None,
                "inputs": inputs, "removed_slides": summary.removed_slides,
            }
            tables_key = hashlib.sha256("\n".join([
                slides_df.to_csv(index=False), repr(extra_cols), str(control),
                str(samples is not None), shash, __version__, f"keep={keep_wrong_stain}",
            ]).encode()).hexdigest()
            provenance["tables_key"] = tables_key
            try:  # the console shows them whether or not the tables are rewritten
                summary.warnings = notes + study_warnings(
                    slides_df, settings, control=control,
                    mice=(aggregate_mice(for_groups(slides_df, keep_wrong_stain),
                                         extra_columns=extra_cols)  # as write_tables does
                          if samples is not None else None))
            except ValueError:
                summary.warnings = notes
            previous = tables_current(out_dir, tables_key)
            # SIGTERM, or Ctrl-C before this run stored anything: end now (the tables would
            # show what the last run showed; the next run writes them)
            nothing_new = summary.interrupted and not summary.processed and not removed
            if interrupt_code == 143 or nothing_new:
                summary.comparison = (
                    "terminated (SIGTERM): tables not updated; the next run writes them"
                    if interrupt_code == 143 else
                    "interrupted before any slide was stored: tables not updated")
                summary.seconds = round(time.perf_counter() - t0, 3)
                summary.exit_code = interrupt_code
                summary.warnings = notes  # the run's own; the tables' are the next run's
                store.finish_run(
                    run_id, processed=summary.processed, skipped=summary.skipped,
                    failed=summary.failed, removed=summary.removed, exit_code=interrupt_code,
                    seconds=summary.seconds)
                return summary
            summary.tables_written = True
            if previous is not None and not summary.processed and not removed:
                summary.comparison = previous  # nothing changed: tables are already current
                from fibroquant.agreement import refresh_report

                refresh_report(out_dir)  # the annotations `agree` scored may have changed
            else:
                summary.comparison = write_tables(
                    out_dir, slides_df, extra_cols, settings, provenance,
                    control=control, has_sheet=samples is not None,
                    keep_wrong_stain=keep_wrong_stain, notes=notes, stems=stems,
                )
            summary.seconds = round(time.perf_counter() - t0, 3)
            summary.exit_code = (interrupt_code if summary.interrupted
                                 else (1 if summary.failed else 0))
            if not summary.interrupted and mostly_wrong_stain(slides_df):
                summary.exit_code = 2  # the user chose the wrong --stain
            run_json = {
                "processed": summary.processed, "skipped": summary.skipped,
                "failed": summary.failed, "not_measured": summary.not_measured,
                "removed": summary.removed, "removed_slides": summary.removed_slides,
                "seconds": summary.seconds, "exit_code": summary.exit_code,
                "interrupted": summary.interrupted, "command": command,
                "version": __version__, "settings_hash": shash, "started_utc": started,
                "run_id": run_id,
                "comparison": summary.comparison,
                "failed_slides": [{"slide": s, "error": e} for s, e in summary.failed_slides],
                "renamed": [{"from": a, "to": b} for a, b in summary.renamed],
                "warnings": summary.warnings,
            }
            atomic_write_text(out_dir / "run.json", json.dumps(run_json, indent=2) + "\n")
            store.finish_run(
                run_id, processed=summary.processed, skipped=summary.skipped,
                failed=summary.failed, removed=summary.removed,
                exit_code=summary.exit_code, seconds=summary.seconds,
            )
    return summary


def preload_table_stack() -> threading.Thread:
    """Import the table writers' libraries (matplotlib's Agg figures, openpyxl: ~0.5-1 s) on
    a background thread, so that the tables written after the slides do not wait for them.

    Started only when worker processes measure the slides (``workers > 1`` and several
    slides): this process only waits on them. (With one slide measured here, the ~40 MB
    imported would add to the slide's peak memory.) An import that fails here is left to
    fail, with its message, where the tables import it.
    """
    def run() -> None:
        try:
            import openpyxl  # noqa: F401
            from matplotlib.backends import backend_agg  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
        except Exception:  # noqa: BLE001 - reported by the foreground import
            logger.debug("preloading the table stack failed:\n%s", traceback.format_exc())

    thread = threading.Thread(target=run, name="fibroquant-preload", daemon=True)
    thread.start()
    return thread


def record_run_crash(store: ResultStore, out_dir: Path, run_id: int) -> str | None:
    """Record the slide the last run was measuring in its own process when it ended abruptly
    (:func:`fibroquant.outdir.take_measuring_marker`); hold the folder's lock.

    A fatal signal (a segfault in a decoder or a kernel) is stored as a ``crashed`` failure of
    that slide, which counts towards :data:`MAX_CRASHES` as a crashed worker process does. A
    run killed without one (``kill -9``, the out-of-memory killer) is not held against the
    slide, which may have had nothing to do with it.

    Returns
    -------
    str or None
        The slide's fingerprint, measured again in a process of its own (either way), or None
        when the last run left no marker.
    """
    info = take_measuring_marker(out_dir)
    if info is None or not isinstance(info.get("fingerprint"), str):
        return None
    slide, fatal = str(info.get("slide")), info.get("fatal")
    if not fatal:
        logger.warning("%s: the last run ended while measuring it (killed?); measuring it "
                       "in a separate process", slide)
        return str(info["fingerprint"])
    error = (f"{Path(slide).name}: fibroquant crashed ({fatal}) while measuring this slide "
             "in its own process")
    if info.get("stalled_s") is not None:  # ended by tiling.slide_timeout_s
        error = (f"{Path(slide).name}: not finished after {info['stalled_s']:g} s (a read "
                 "that hangs? tiling.slide_timeout_s); the run measuring it in its own "
                 "process was ended")
    logger.warning("%s", error)
    if isinstance(info.get("settings_hash"), str) and info["settings_hash"]:
        store.put_result({"slide": slide, "fingerprint": info["fingerprint"],
                          "settings_hash": info["settings_hash"], "status": "failed",
                          "error": error, "version": __version__, "crashed": True},
                         run_id=run_id)
    return str(info["fingerprint"])


def _refuse_lost_runs(store: ResultStore, out_dir: Path) -> None:
    """Refuse a store that lost the run which wrote ``run.json`` (its WAL deleted after a
    crash, an older copy put back): measuring on would silently drop those results."""
    try:
        last = json.loads((out_dir / "run.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(last, int) and not store.has_run(last):
        msg = (f"{store.path}: the results store has lost run #{last}, whose tables are in "
               f"this folder; {REBUILD_HINT.format(out=out_dir)}")
        raise StoreError(msg)


def _json_or_none(text: Any) -> Any:
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _no_tasks(tasks: list[SlideTask], **_: Any) -> list[dict[str, Any]]:
    return []


def build_slides_table(sheet: pd.DataFrame, records: list[dict[str, Any]], *,
                       missing: Mapping[str, str] | None = None,
                       gone: Sequence[str] = ()) -> pd.DataFrame:
    """Join the sample sheet with the stored records: one row per slide, contract columns first.

    Slides in the sheet without a record appear as ``not-measured``: those of ``missing`` (no
    file yet: ``--allow-missing``) as not scanned, those of ``gone`` as gone from the folder
    (measured with other settings only), the others as left by an interrupted run.
    """
    by_slide = {r["slide"]: r for r in records}
    rows = []
    for row in sheet.to_dict("records"):
        rec = by_slide.get(row["slide"])
        if rec is None:
            why = ("not in the slides folder yet (listed in the sample sheet)"
                   if missing and row["slide"] in missing
                   else "no longer in the slides folder, and measured with other settings only"
                   if row["slide"] in gone
                   else "not measured yet (the run was interrupted)")
            rec = {"status": NOT_MEASURED, "error": f"{row['slide']}: {why}"}
        # the sheet's mpp is the one measured with; an empty one leaves the file's own
        sheet_row = {str(k): v for k, v in row.items() if not (k == "mpp" and "mpp" in rec)}
        merged = {**{k: v for k, v in rec.items() if k not in _INTERNAL}, **sheet_row}
        merged["status"] = slide_status(rec)
        if merged.get("error") is None:
            merged["error"] = ""
        rows.append(merged)
    df = pd.DataFrame(rows)
    for col in SLIDE_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    sheet_cols = [c for c in sheet.columns if c not in SLIDE_COLUMNS]
    return df[schema.ordered(df.columns, "slides", first_extra=sheet_cols)]


def unlisted_note(unlisted: Sequence[str], failed: Sequence[str] = ()) -> list[str]:
    """The warning of a run with ``--allow-unlisted`` whose folder holds slides the sheet does
    not list (measured and stored, out of the tables until listed; ``failed``: those of them
    whose measurement failed, which the tables' counts do not show); empty without any."""
    if not unlisted:
        return []
    names = name_list(unlisted)
    line = (f"{len(unlisted)} slide file(s) not in the sample sheet ({names}): measured, "
            "their results kept, left out of the tables until the sheet lists them")
    if failed:
        line += f" ({len(failed)} of them failed: {name_list(failed)})"
    return [line]


def missing_note(missing: Mapping[str, str], slides_dir: Path,
                 gone: Sequence[str] = (), gone_unmeasured: Sequence[str] = ()) -> list[str]:
    """The warnings of a run with ``--allow-missing`` whose sample sheet lists slides the
    folder does not hold: ``missing`` (slide -> hint, e.g. "; did you mean 'x'?"), never
    measured; ``gone``, measured before, whose last measurement the tables keep;
    ``gone_unmeasured``, measured before with other settings only. Empty without any."""
    out = []
    if missing:
        names = name_list([f"{s!r}{hint}" for s, hint in missing.items()], quote=False)
        out.append(f"{len(missing)} slide(s) of the sample sheet not in {slides_dir} yet "
                   f"({names}): not measured, left out of mice and groups until scanned")
    if gone:
        out.append(f"{len(gone)} slide(s) of the sample sheet measured before are no longer "
                   f"in {slides_dir} ({name_list(gone)}): their last measurement is kept; "
                   "remove them from the sheet to drop them")
    if gone_unmeasured:
        out.append(f"{len(gone_unmeasured)} slide(s) of the sample sheet are no longer in "
                   f"{slides_dir} ({name_list(gone_unmeasured)}) and were measured with other "
                   "settings only: not measured with these, left out of mice and groups")
    return out


def study_warnings(slides_df: pd.DataFrame, settings: Settings, *,
                   mice: pd.DataFrame | None = None, control: str | None = None) -> list[str]:
    """Everything a person should know before trusting the tables, one line each: slides
    measured differently or identical, fibre traits too coarse to show thin fibres, each
    slide's stain warning, the measured slides each doubt flags (:mod:`fibroquant.confidence`)
    and groups the headline gives no p value (:func:`fibroquant.stats.group_warnings`;
    ``mice`` None: no groups compared)."""
    from fibroquant.traits import resolution_warning, width_floor_warning

    out = [p for p in (blob_rule_mixed(slides_df, settings), identical_files(slides_df),
                       resolution_warning(slides_df, settings),
                       width_floor_warning(slides_df, settings.traits.thin_um))
           if p]
    if "stain_warning" in slides_df.columns:
        out += [f"{r.slide}: {r.stain_warning}" for r in slides_df.itertuples()
                if isinstance(r.stain_warning, str) and r.stain_warning]
    out += doubt_lines(slides_df)
    if mice is not None:
        from fibroquant import stats

        out += stats.group_warnings(mice, control)
    return out


#: Doubt flags (:data:`fibroquant.confidence.FLAGS`) that repeat a slide's stain warning.
STAIN_FLAGS = ("wrong stain", "faint stain", "pale counterstain",
               "few collagen pixels to calibrate")


def doubt_lines(slides_df: pd.DataFrame) -> list[str]:
    """One line per doubt flag (``qc_flags``) naming the measured slides it marks, in
    :data:`fibroquant.confidence.FLAGS` order; the flags the stain calibration raises (a wrong
    or faint stain, a pale counterstain, too few collagen pixels) have each slide's own stain
    warning line already."""
    from fibroquant.confidence import FLAGS

    if "qc_flags" not in slides_df.columns:
        return []
    ok = slides_df[slides_df["status"].astype(str) == "ok"]
    flags = ok["qc_flags"].map(lambda v: v.split("; ") if isinstance(v, str) and v else [])
    out = []
    for flag in (f for f in FLAGS if f not in STAIN_FLAGS):
        marked = [str(s) for s, f in zip(ok["slide"], flags, strict=True) if flag in f]
        if marked:
            out.append(f"doubtful ({flag}): {len(marked)} slide(s), {name_list(marked)}: "
                       "look at their overlays before trusting their CPA")
    return out


def slide_status(record: dict[str, Any]) -> str:
    """A stored record's status in the tables: ``wrong-stain`` for a measured slide whose
    colours show another stain (``wrong_stain`` true), else its stored status."""
    status = str(record.get("status", ""))
    if status == "ok" and record.get("wrong_stain") is True:
        return WRONG_STAIN
    return status


def mostly_wrong_stain(slides_df: pd.DataFrame) -> bool:
    """Whether more than half of a run's measured slides are the wrong stain (the user chose
    the wrong ``--stain``)."""
    status = slides_df["status"]
    n_wrong = int((status == WRONG_STAIN).sum())
    return n_wrong > 0 and n_wrong > 0.5 * int(status.isin(["ok", WRONG_STAIN]).sum())


def for_groups(slides_df: pd.DataFrame, keep_wrong_stain: bool) -> pd.DataFrame:
    """The slides table as mice and groups see it: ``wrong-stain`` rows count as ``ok`` when
    kept, else (their status not ``ok``) they are left out like failed slides."""
    if not keep_wrong_stain or "status" not in slides_df:
        return slides_df
    out = slides_df.copy()
    out.loc[out["status"] == WRONG_STAIN, "status"] = "ok"
    return out


def _statistics(
    slides_df: pd.DataFrame, mice: pd.DataFrame, *, control: str | None, has_sheet: bool,
) -> tuple[pd.DataFrame, Any, Any, str, list[str]]:
    """The group comparison of a run, never raising: a step that cannot be made (no ok
    slide in the control group, a group with no ok slide, a statistics failure) leaves its
    part empty and says why in one line.

    Returns
    -------
    groups, omnibus, mixed, sentence, warnings
        ``groups.csv`` (empty with only its columns when no comparison could be made), the
        omnibus tests and the mixed model (None when not made), the one-sentence summary and
        the warnings for the report.
    """
    groups = pd.DataFrame(columns=list(schema.names("groups")))  # stats.GROUP_COLUMNS
    warnings: list[str] = []
    if not has_sheet:  # no statistics: not even their import (scipy.stats, ~0.6 s)
        sentence = "No sample sheet: each slide is its own mouse and no groups are compared."
        return groups, None, None, sentence, warnings
    from fibroquant import stats

    try:
        groups = stats.compare_groups(mice, control=control)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the comparison empty
        logger.debug("group comparison failed:\n%s", traceback.format_exc())
        sentence = f"No group comparison: {one_line(exc)}."
        warnings.append(sentence)
        return pd.DataFrame(columns=list(stats.GROUP_COLUMNS)), None, None, sentence, warnings
    ctrl = groups.attrs.get("control")
    if ctrl is None:
        sentence = groups.attrs.get("note") or (
            "No control group (name one with --control): groups described, not compared.")
    else:
        sentence = stats.summary_sentence(groups)
    omnibus = mixed = None
    if mice.loc[mice["n_slides"] > 0, "group"].nunique() > 2:  # more than one comparison
        try:
            omnibus = stats.omnibus_tests(mice)
        except Exception as exc:  # noqa: BLE001
            warnings.append(f"omnibus tests not made: {one_line(exc)}")
    try:
        mixed, reason = stats.mixed_model_with_reason(slides_df, control=ctrl)
    except Exception as exc:  # noqa: BLE001
        mixed, reason = None, one_line(exc)
    ok = slides_df[slides_df["status"] == "ok"]
    if mixed is None and reason and (ok.groupby("mouse").size() >= 2).sum() >= 2:
        warnings.append(f"mixed model not fitted: {reason}")  # not for one section per mouse
    return groups, omnibus, mixed, sentence, warnings


#: The tables every run writes (the traits add theirs: :func:`_write_trait_tables`).
TABLE_FILES = ("slides.csv", "mice.csv", "groups.csv", "provenance.json", "results.xlsx",
               "report.html")
#: The file of an output folder that says its tables are current: written after every table,
#: removed before the first one is rewritten (a run killed in between leaves none).
TABLES_MANIFEST = ".fibroquant-tables.json"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _intact_manifest(out_dir: Path, tables_key: str | None = None) -> dict[str, Any] | None:
    """The manifest (:data:`TABLES_MANIFEST`) when every table it names is there as written
    (and, given ``tables_key``, it was written from inputs with that key); else None.

    The manifest is written after the last table and names each table file with its SHA-256:
    a run killed while writing them, a disk that filled, a table edited or deleted since, all
    show as a missing manifest or a file that differs.
    """
    try:
        manifest = json.loads((out_dir / TABLES_MANIFEST).read_text(encoding="utf-8"))
        if tables_key is not None and manifest.get("tables_key") != tables_key:
            return None
        files = manifest.get("files")
        if files and all(_digest(out_dir / name) == digest for name, digest in files.items()):
            return dict(manifest)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def tables_current(out_dir: Path, tables_key: str) -> str | None:
    """The last comparison sentence when the tables in ``out_dir`` were all written, complete,
    from inputs with this ``tables_key``; None when any of them must be written again."""
    manifest = _intact_manifest(out_dir, tables_key)
    return None if manifest is None else str(manifest.get("comparison", ""))


def tables_state(out_dir: Path) -> str:
    """``complete`` when the tables of ``out_dir`` were all written and none changed since
    (:func:`_intact_manifest`), ``incomplete`` when some are there but not such a set (a run
    stopped while writing them, a table edited or deleted: the next run writes them all
    again), ``none`` when there is neither a table nor a manifest."""
    if _intact_manifest(out_dir) is not None:
        return "complete"
    there = (out_dir / name for name in (TABLES_MANIFEST, *TABLE_FILES))
    return "incomplete" if any(path.exists() for path in there) else "none"


def _forget_tables(out_dir: Path) -> None:
    """Remove the manifest before any table is rewritten (see :func:`tables_current`)."""
    try:
        (out_dir / TABLES_MANIFEST).unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        msg = f"cannot write {out_dir / TABLES_MANIFEST}: {exc.strerror or exc}"
        raise StoreError(msg) from exc
    fsync_dir(out_dir)


def _write_trait_tables(
    out_dir: Path, slides_df: pd.DataFrame, mice: pd.DataFrame, plots_dir: Path,
    plots: list[Path], warnings: list[str], *, control: str | None, has_sheet: bool,
) -> list[str]:
    """``traits.csv`` (long form) and, with groups, ``trait_groups.csv`` and the traits' small
    multiple (appended to ``plots``); nothing when no slide has fibre traits. A failed
    comparison leaves a warning, never stops the tables. Returns the files written."""
    from fibroquant import report, traits

    for name in ("traits.csv", "trait_groups.csv"):  # those of an earlier run, until rewritten
        (out_dir / name).unlink(missing_ok=True)
    if not any(c in slides_df.columns for c in traits.TRAIT_COLUMNS):
        return []
    # rounded for reading, as the other tables; the store and the xlsx keep full precision
    atomic_write_csv(out_dir / "traits.csv",
                     schema.round_traits(traits.traits_long(slides_df), "traits"))
    written = ["traits.csv"]
    if not has_sheet or mice["group"].nunique() < 2:
        return written
    try:
        compared = traits.compare_traits(mice, control=control)
    except Exception as exc:  # noqa: BLE001 - as the CPA comparison: reported, not raised
        logger.debug("trait comparison failed:\n%s", traceback.format_exc())
        warnings.append(f"fibre traits not compared: {one_line(exc)}")
        return written
    atomic_write_csv(out_dir / "trait_groups.csv", schema.round_traits(compared, "trait_groups"))
    plots += report.plot_traits(mice, compared, plots_dir / "trait_groups", control=control)
    return [*written, "trait_groups.csv"]


def write_tables(
    out_dir: Path,
    slides_df: pd.DataFrame,
    extra_cols: list[str],
    settings: Settings,
    provenance: dict[str, Any],
    *,
    control: str | None,
    has_sheet: bool,
    keep_wrong_stain: bool = False,
    notes: Sequence[str] = (),
    stems: Mapping[str, str] | None = None,
) -> str:
    """Write slides/mice/groups tables, plots, xlsx, report and provenance (all atomic).

    The tables are written as one set: the manifest that says they are current
    (:func:`tables_current`) is removed first and written last, so a run killed or a disk
    that fills part way leaves no manifest and the next run writes them all again. The
    statistics never stop the tables (:func:`_statistics`).
    Slides of status ``wrong-stain`` are in ``slides.csv`` but left out of mice and groups
    unless ``keep_wrong_stain``.

    Returns
    -------
    str
        One sentence on the comparison (or why none was made).

    Raises
    ------
    StoreError
        When a file cannot be written (``cannot write PATH: reason``).
    """
    from fibroquant import report

    _forget_tables(out_dir)
    grouped = for_groups(slides_df, keep_wrong_stain)
    mice = aggregate_mice(grouped, extra_columns=extra_cols)
    groups, omnibus, mixed, sentence, warnings = _statistics(
        grouped, mice, control=control, has_sheet=has_sheet)
    written = list(TABLE_FILES)
    # rounded for reading; the store and the xlsx keep full precision
    atomic_write_csv(out_dir / "slides.csv", schema.round_table(slides_df, "slides"))
    atomic_write_csv(out_dir / "mice.csv", schema.round_table(mice, "mice"))
    atomic_write_csv(out_dir / "groups.csv", schema.round_table(groups, "groups"))
    atomic_write_text(out_dir / "provenance.json",
                      json.dumps(provenance, indent=2, default=str) + "\n")
    settings_dict = settings.model_dump(mode="json")
    # what a person should know before trusting the tables (the xlsx and the report)
    problems = [*notes, *study_warnings(slides_df, settings, control=control,
                                        mice=mice if has_sheet else None)]
    report.write_xlsx(out_dir / "results.xlsx", slides=slides_df, mice=mice, groups=groups,
                      settings=settings_dict, provenance=provenance, summary=sentence,
                      warnings=problems)
    plots_dir = out_dir / "plots"
    plots: list[Path] = []
    ctrl = groups.attrs.get("control") if has_sheet else None
    if has_sheet and len(groups):
        plots += report.plot_groups(mice, groups, plots_dir / "cpa_groups", control=ctrl)
    plots += report.plot_slides(slides_df, plots_dir / "cpa_slides")
    written += _write_trait_tables(out_dir, slides_df, mice, plots_dir, plots, warnings,
                                   control=ctrl, has_sheet=has_sheet)
    plots += report.plot_stain_qc(slides_df, plots_dir / "stain_qc")
    for old in plots_dir.glob("*"):  # an earlier run's plots this one did not draw
        if old.suffix in (".png", ".svg") and old not in plots:
            old.unlink(missing_ok=True)
    # the stems the run wrote under (over every slide file, listed in the sheet or not)
    stems = stems if stems is not None else output_stems(slides_df["slide"])
    qc = {s: output_files(out_dir, stems[s], ("qc",))["qc"]
          for s in slides_df["slide"] if s in stems}
    warnings += problems  # (the console shows RunSummary.warnings)
    report.write_report_html(
        out_dir / "report.html", title="fibroquant: collagen proportionate area",
        slides=slides_df, mice=mice, groups=groups, omnibus=omnibus, mixed=mixed,
        summary=sentence, qc_images=qc, plots=plots, settings=settings_dict,
        provenance=provenance, warnings=warnings, keep_wrong_stain=keep_wrong_stain,
    )
    from fibroquant.agreement import refresh_report

    refresh_report(out_dir)  # a stored `fibroquant agree` result keeps its section
    written += [Path(p).relative_to(out_dir).as_posix() for p in plots]
    manifest = {"tables_key": provenance.get("tables_key"), "comparison": sentence,
                "files": {name: _digest(out_dir / name) for name in written}}
    atomic_write_text(out_dir / TABLES_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return sentence
