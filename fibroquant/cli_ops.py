"""Operational commands: ``fibroquant status`` (what is stored, what changed) and ``watch``.

Registered on :data:`fibroquant.cli.app` when ``fibroquant.cli`` imports this module at its end.
No science here: ``status`` only reads the results store (it never takes the output lock, so it
works while a run is going on) and ``watch`` calls the same code as ``analyze``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from fibroquant.cli import AllowMissing, AllowUnlisted, ClusterChoice, app
from fibroquant.cli_common import (
    STAIN_OPTION,
    StainChoice,
    command_line,
    err,
    fail,
    out,
    run_analyze,
)
from fibroquant.cores import process_alive
from fibroquant.errors import FibroquantError, one_line
from fibroquant.layout import STORE_NAME

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int | None, host: str | None) -> bool | None:
    """Whether a run's process still exists (``None``: another host, cannot tell)."""
    if pid is None:
        return False
    if host and host != socket.gethostname():
        return None
    try:
        return process_alive(int(pid))
    except (TypeError, ValueError):
        return False


def _run_state(run: dict[str, Any], newest: bool, measuring: dict[str, Any] | None = None
               ) -> str:
    """``finished``, ``running``, or how an unfinished run ended; ``measuring`` is the slide
    it named in OUT_DIR (:func:`fibroquant.outdir.read_measuring_marker`), if any."""
    if run.get("finished_at"):
        return "finished"
    alive = _pid_alive(run.get("pid"), run.get("host"))
    if alive and newest:
        return "running"
    if alive is None:
        return "unfinished (other host)"
    if measuring and newest and measuring.get("pid") == run.get("pid"):
        slide = measuring.get("slide")
        if measuring.get("fatal"):
            return (f"crashed ({measuring['fatal']}) while measuring {slide}; the next run "
                    "records it and measures it in a process of its own")
        return f"did not finish (killed while measuring {slide})"
    return "did not finish (killed or crashed)"


def folder_changes(store: Any, slides_dir: Path, out_dir: Path, settings_hash: str | None,
                   files: list[Path] | None = None) -> dict[str, Any]:
    """What the next run would do with a slides folder, from the run's own plan
    (:func:`fibroquant.run.plan_run`): new, changed, not yet measured, failed before (measured
    again), crashed (not measured again), removed, renamed, unreadable, and measured slides
    whose files in OUT_DIR are missing or show another content. Fingerprints come from the
    store's cache; nothing is written to the store. The µm/px each slide is measured with are
    the last run's (its sample sheet's ``mpp`` column, remembered ``--mpp``).
    """
    from fibroquant.run import discover, plan_run
    from fibroquant.store import FingerprintCache

    files = discover(slides_dir, out_dir) if files is None else files
    cache = FingerprintCache(store, slides_dir)  # never flushed: status stays read-only
    plan = plan_run(store, slides_dir, out_dir, files, settings_hash=settings_hash or "",
                    cache=cache, sheet_mpp=_last_sheet_mpp(out_dir))
    by_state: dict[str, list[str]] = {}
    for e in plan.slides:
        by_state.setdefault(e.state, []).append(e.slide)
    stored = set(plan.previous)
    missing = by_state.get("outputs_missing", [])
    renamed = [{"from": e.renamed_from[0], "to": e.slide} for e in plan.slides
               if e.state == "renamed"]
    gone = {r["from"] for r in renamed}
    return {
        "slides_dir": str(slides_dir), "files": len(files),
        "new": by_state.get("new", []) + [s for s in missing if s not in stored],
        "changed": by_state.get("changed", []),
        "not_measured_with_these_settings": by_state.get("not_measured", []),
        "failed_before": by_state.get("failed_before", []),
        "crashed": by_state.get("crashed", []),
        "unreadable": [{"slide": e.slide, "error": e.error} for e in plan.slides
                       if e.state == "unreadable"],
        "outputs_missing": [s for s in missing if s in stored],
        "removed": [s for s in plan.removed if s not in gone], "renamed": renamed,
        "unchanged": len(by_state.get("unchanged", [])),
        "present": sorted(e.slide for e in plan.slides),
    }


def _last_sheet_mpp(out_dir: Path) -> dict[str, float]:
    """The last run's sample-sheet µm/px by slide (from the sheet provenance.json names)."""
    import pandas as pd

    try:
        prov = json.loads((out_dir / "provenance.json").read_text(encoding="utf-8"))
        sheet = pd.read_csv(prov["samples"], dtype={"slide": str}) if prov.get("samples") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    if sheet is None or "mpp" not in sheet or "slide" not in sheet:
        return {}
    mpp = pd.to_numeric(sheet["mpp"], errors="coerce")
    return {str(s): float(v) for s, v in zip(sheet["slide"], mpp, strict=True) if pd.notna(v)}


def gather_status(out_dir: Path, slides_dir: Path | None = None, *, n_runs: int = 5,
                  samples: Path | None = None) -> dict[str, Any]:
    """Everything ``fibroquant status`` shows, as a JSON-ready dict; with ``samples`` (and
    ``slides_dir``) also the sheet's rows whose scan is not in the folder and the files it
    does not list (``"sheet"``).

    Raises
    ------
    FibroquantError
        When OUT_DIR has no results store or it cannot be read; a sample sheet that cannot be
        used (as ``analyze`` would say, but for unlisted files and rows not scanned yet).
    """
    from fibroquant.store import ResultStore

    out_dir = Path(out_dir)
    path = out_dir / STORE_NAME
    if not path.is_file():
        msg = (f"{out_dir}: no results store ({STORE_NAME}) here; run "
               f"'fibroquant analyze SLIDES --out {out_dir}' first")
        raise FibroquantError(msg)
    with ResultStore(path, timeout=10.0, read_only=True) as store:
        runs = store.runs(limit=n_runs)
        hashes = store.settings_hashes()
        shash = runs[0]["settings_hash"] if runs else (hashes[0] if hashes else None)
        folder = None
        sheet_info = None
        present: set[str] | None = None
        if slides_dir is not None:
            from fibroquant.run import discover

            files = discover(Path(slides_dir), out_dir)
            if samples is not None:
                kept = {r["slide"] for r in store.current_results(shash)} if shash else set()
                sheet_info = _sheet_status(samples, Path(slides_dir), files, kept,
                                           set(store.slide_fingerprints()))
            folder = folder_changes(store, Path(slides_dir), out_dir, shash, files)
            present = set(folder.pop("present"))
            if sheet_info is not None:  # listed, not in the folder: no removal (analyze's)
                listed = {w["slide"] for w in sheet_info["waiting"]} | set(
                    sheet_info["gone"]) | set(sheet_info["gone_other_settings"])
                folder["removed"] = [s for s in folder["removed"] if s not in listed]
        else:  # leave out the slides the last run found removed (from its provenance)
            removed = _last_removed(out_dir)
            if removed:
                stored = set(store.slide_fingerprints())
                present = stored - set(removed)
        current = store.current_results(shash, present=present) if shash else []
    from fibroquant.outdir import read_measuring_marker

    measuring = read_measuring_marker(out_dir)
    for i, run in enumerate(runs):
        run["state"] = _run_state(run, newest=i == 0, measuring=measuring)
        run.pop("settings_json", None)
    failed = [{"slide": r["slide"], "error": r.get("error") or ""}
              for r in current if r.get("status") != "ok"]
    from fibroquant.run import tables_state

    return {
        "out_dir": str(out_dir), "store": str(path), "settings_hash": shash,
        "other_settings_hashes": [h for h in hashes if h != shash],
        "slides": {"stored": len(current),
                   "ok": sum(r.get("status") == "ok" for r in current),
                   "failed": len(failed)},
        "failed": failed, "runs": runs, "folder": folder, "sheet": sheet_info,
        "tables": tables_state(out_dir),
    }


def _sheet_status(samples: Path, slides_dir: Path, files: list[Path], kept: set[str],
                  stored: set[str]) -> dict[str, Any]:
    """The sample sheet against the folder: rows not scanned yet (``waiting``, with a hint
    when a file's name is close), rows whose file left the folder after it was measured
    with the current settings (``gone``: their result is kept with ``--allow-missing``) or
    with other settings only (``gone_other_settings``: nothing to keep), and the files it
    does not list. ``kept``: slides with a result for the current settings; ``stored``: for
    any."""
    from fibroquant.cohort import read_sample_sheet

    sheet = read_sample_sheet(samples, slides_dir, files, allow_unlisted=True,
                              allow_missing=True)
    missing: dict[str, str] = sheet.attrs.get("missing", {})
    return {"samples": str(samples), "rows": len(sheet),
            "waiting": [{"slide": s, "hint": h} for s, h in missing.items() if s not in stored],
            "gone": [s for s in missing if s in kept],
            "gone_other_settings": [s for s in missing if s in stored and s not in kept],
            "unlisted": list(sheet.attrs.get("unlisted", []))}


def _last_removed(out_dir: Path) -> list[str]:
    try:
        prov = json.loads((out_dir / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    removed = prov.get("removed_slides") if isinstance(prov, dict) else None
    return [str(s) for s in removed] if isinstance(removed, list) else []


def _print_status(info: dict[str, Any]) -> None:
    s = info["slides"]
    out.print(f"store: {info['store']}", markup=False)
    out.print(f"settings {info['settings_hash'] or '-'}: {s['stored']} slide(s) stored, "
              f"{s['ok']} ok, {s['failed']} failed")
    if info["other_settings_hashes"]:
        out.print(f"  (also results for other settings: {', '.join(info['other_settings_hashes'])})")
    if info.get("tables") == "incomplete":
        out.print("tables: incomplete (a run stopped while writing them, or a table was "
                  "edited or deleted): the next run writes them all again", soft_wrap=True)
    if info["runs"]:
        out.print("last runs:")
        for r in info["runs"]:
            counts = (f"processed {r['processed']}, skipped {r['skipped']}, failed {r['failed']},"
                      f" removed {r['removed']}, exit {r['exit_code']}"
                      if r["finished_at"] else r["state"])
            out.print(f"  #{r['run_id']} {r['started_at']} -> {r['finished_at'] or '-'}: "
                      f"{counts}", soft_wrap=True)
            out.print(f"      {r['command']}", soft_wrap=True, markup=False)
    if info["failed"]:
        out.print("failed:")
        for f in info["failed"]:
            # (an error names its file already: "a.png: not a PNG file")
            error = f["error"]
            line = error if error.startswith(f"{f['slide']}:") else f"{f['slide']}: {error}"
            out.print(f"  {line}", soft_wrap=True, markup=False)
    folder = info["folder"]
    if folder is not None:
        out.print(f"slides folder {folder['slides_dir']}: {folder['files']} file(s), "
                  f"{folder['unchanged']} unchanged", soft_wrap=True, markup=False)
        for key, label in (("new", "new"), ("changed", "changed"),
                           ("not_measured_with_these_settings", "not measured yet"),
                           ("failed_before", "failed before (measured again)"),
                           ("crashed", "crashed the process measuring it twice (not measured again)"),
                           ("outputs_missing", "overlay missing or outdated (measured again)"),
                           ("removed", "removed")):
            for name in folder[key]:
                out.print(f"  {label}: {name}", soft_wrap=True, markup=False)
        for r in folder.get("renamed", []):
            out.print(f"  renamed: {r['from']} -> {r['to']} (measurement kept)", soft_wrap=True,
                      markup=False)
        for u in folder["unreadable"]:
            out.print(f"  unreadable: {u['error']}", soft_wrap=True, markup=False)
        if not any(folder.get(k) for k in ("new", "changed", "not_measured_with_these_settings",
                                           "failed_before", "outputs_missing", "removed",
                                           "unreadable", "renamed")):
            out.print("  nothing new: a rerun would measure nothing")
    sheet = info.get("sheet")
    if sheet is not None:
        out.print(f"sample sheet {sheet['samples']}: {sheet['rows']} row(s); "
                  f"{len(sheet['waiting'])} waiting for a scan, "
                  f"{len(sheet['gone']) + len(sheet['gone_other_settings'])} gone from the "
                  f"folder after measuring, {len(sheet['unlisted'])} file(s) it does not list",
                  soft_wrap=True, markup=False)
        for w in sheet["waiting"]:
            out.print(f"  waiting for a scan: {w['slide']}{w['hint']}", soft_wrap=True,
                      markup=False)
        for name in sheet["gone"]:
            out.print(f"  gone from the folder: {name} (its result is kept with "
                      "--allow-missing)", soft_wrap=True, markup=False)
        for name in sheet["gone_other_settings"]:
            out.print(f"  gone from the folder: {name} (measured with other settings only: "
                      "nothing of it to keep)", soft_wrap=True, markup=False)
        for name in sheet["unlisted"]:
            out.print(f"  not in the sheet: {name} (measured with --allow-unlisted, kept out of "
                      "the tables)", soft_wrap=True, markup=False)


@app.command()
def status(
    out_dir: Annotated[Path, typer.Argument(
        file_okay=False, resolve_path=True, help="Output folder of earlier runs.")],
    slides: Annotated[Path | None, typer.Option(
        "--slides", file_okay=False, resolve_path=True,
        help="Slides folder: also show what is new, changed or removed there.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    samples: Annotated[Path | None, typer.Option(
        "--samples", exists=True, dir_okay=False, readable=True, resolve_path=True,
        help="Sample sheet (with --slides): also show its rows still waiting for a scan and "
        "the files it does not list.")] = None,
) -> None:
    """Show what is stored in OUT_DIR, the last runs, what failed and (with --slides) what is new."""
    if slides is not None and not slides.is_dir():
        raise fail(f"{slides}: slides folder not found or not a folder", 2)
    if samples is not None and slides is None:
        raise fail(f"--samples {samples}: needs --slides, the folder its rows name", 2)
    try:
        info = gather_status(out_dir, slides, samples=samples)
    except FibroquantError as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        out.print_json(json.dumps(info, default=str))
    else:
        _print_status(info)


# --------------------------------------------------------------------------------------------
# watch
# --------------------------------------------------------------------------------------------


class Settler:
    """Files waiting until their size (and mtime) has not changed for ``settle`` seconds.

    Parameters
    ----------
    settle : float
        Quiet period in seconds.
    clock : callable, optional
        Monotonic clock (tests pass a fake one).
    """

    def __init__(self, settle: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle = settle
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[Path, tuple[tuple[int, int] | None, float]] = {}
        self.dirty = False  # something to run for that needs no settling (a deletion)

    def touch(self, path: Path) -> None:
        """Note that `path` was created or modified (restarts its quiet period)."""
        with self._lock:
            self._pending[Path(path)] = (None, self.clock())

    def touch_existing(self, path: Path) -> None:
        """Note a file found at start: quiet since its last modification, so one unchanged for
        ``settle`` seconds already is analysed without waiting."""
        try:
            st = Path(path).stat()
        except OSError:
            return
        age = max(0.0, time.time() - st.st_mtime)
        with self._lock:
            self._pending[Path(path)] = ((st.st_size, st.st_mtime_ns), self.clock() - age)

    def deleted(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(Path(path), None)
            self.dirty = True

    def __len__(self) -> int:
        return len(self._pending)

    def poll(self) -> bool:
        """Update sizes; return True when everything pending has settled (and something is)."""
        now = self.clock()
        with self._lock:
            for path, (sig, _since) in list(self._pending.items()):
                try:
                    st = path.stat()
                except OSError:  # vanished before settling
                    del self._pending[path]
                    self.dirty = True
                    continue
                cur = (st.st_size, st.st_mtime_ns)
                if cur != sig:
                    self._pending[path] = (cur, now)
            if not self._pending:
                return self.dirty
            return all(sig is not None and now - since >= self.settle
                       for sig, since in self._pending.values())

    def take(self) -> list[Path]:
        """Empty the queue (call when a run starts); returns what was pending."""
        with self._lock:
            paths = list(self._pending)
            self._pending.clear()
            self.dirty = False
        return paths


def _is_slide(path: Path, out_dir: Path) -> bool:
    from fibroquant.slides import SUPPORTED_SUFFIXES

    if any(part.startswith(".") for part in path.parts[-1:]):
        return False
    try:
        path.resolve().relative_to(out_dir.resolve())
        return False
    except ValueError:
        pass
    name = path.name.lower()
    return any(name.endswith(s) for s in SUPPORTED_SUFFIXES)


@app.command()
def watch(
    slides_dir: Annotated[Path, typer.Argument(
        exists=True, file_okay=False, dir_okay=True, readable=True, resolve_path=True,
        help="Folder of slides to watch (recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, resolve_path=True,
                                      help="Output folder (as for analyze).")],
    samples: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, resolve_path=True,
        help="Sample sheet, CSV, TSV or .xlsx (re-read at each run; edits trigger a run).")] = None,
    stain: Annotated[StainChoice | None, typer.Option(
        **STAIN_OPTION, help="Stain of the slides.")] = None,
    config: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, help="YAML settings file.")] = None,
    mpp: Annotated[float | None, typer.Option(
        min=0.05, max=50.0, help="µm per pixel for slides whose files lack it.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Parallel workers.")] = None,
    control: Annotated[str | None, typer.Option(help="Control group name.")] = None,
    analysis_mpp: Annotated[float | None, typer.Option(
        min=0.05, max=10.0, help="Analysis resolution in µm per pixel (as for analyze).")]
    = None,
    masks: Annotated[bool, typer.Option("--masks", help="Write collagen/tissue mask PNGs.")]
    = False,
    scheduler: Annotated[str | None, typer.Option(
        help="Dask scheduler address, e.g. tcp://10.0.0.5:8786.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Re-measure every slide in the first run.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Only warnings, errors and the results.")] = False,
    settle: Annotated[float, typer.Option(
        min=0.0, help="Seconds a file's size must stay unchanged before it is analysed.")]
    = 30.0,
    once: Annotated[bool, typer.Option(
        "--once", help="Process the slides pending now, then exit (exit code of that run).")]
    = False,
    traits: Annotated[bool, typer.Option(
        "--traits/--no-traits", help="Measure fibre traits and compartments (as for "
        "analyze).")] = True,
    cluster: Annotated[ClusterChoice | None, typer.Option(
        help="Run the slides as batch jobs (as for analyze; see docs/cluster.md).")] = None,
    classifier: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, resolve_path=True,
        help="Pixel classifier (fibroquant train) deciding collagen (as for analyze).")] = None,
    keep_wrong_stain: Annotated[bool, typer.Option(
        "--keep-wrong-stain", help="Count slides whose colours show another stain in mice "
        "and groups (as for analyze).")] = False,
    zoom: Annotated[bool | None, typer.Option(
        "--zoom/--no-zoom", help="Write a zoomable full-resolution QC view of each measured "
        "slide (as for analyze; off by default).", show_default=False)] = None,
    allow_unlisted: AllowUnlisted = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Watch a slides folder and run analyze whenever slides arrive or change (Ctrl-C stops)."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    settler = Settler(settle)
    sheet = samples.resolve() if samples is not None else None

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            try:
                self._note(event)
            except Exception as exc:  # noqa: BLE001 - the watcher thread must never die
                logger.warning("watch: %s: %s", getattr(event, "src_path", "?"), one_line(exc))

        def _note(self, event: FileSystemEvent) -> None:
            if event.is_directory or event.event_type in ("opened", "closed_no_write"):
                return
            src = Path(os.fsdecode(event.src_path))
            dest = getattr(event, "dest_path", "")
            if event.event_type == "deleted":
                if _is_slide(src, out):
                    settler.deleted(src)
                return
            if event.event_type == "moved":
                if _is_slide(src, out):
                    settler.deleted(src)
                src = Path(os.fsdecode(dest))
            if _is_slide(src, out) or (sheet is not None and src == sheet):
                settler.touch(src)

    first = [force]

    def run_once() -> int:
        settler.take()
        if not quiet:
            err.print(f"[bold]watch:[/] analysing {slides_dir}", markup=True)
        try:
            return run_analyze(
                slides_dir, out, samples=samples, stain=stain, config=config, mpp=mpp,
                analysis_mpp=analysis_mpp, masks=masks, workers=workers, scheduler=scheduler,
                force=first.pop() if first else False, wait=True, control=control,
                quiet=quiet, traits=traits,
                cluster=cluster.value if cluster is not None else None,
                classifier=classifier, keep_wrong_stain=keep_wrong_stain, zoom=zoom,
                allow_unlisted=allow_unlisted, allow_missing=allow_missing,
                command=command_line("watch", {
                    "slides_dir": slides_dir, "out": out, "samples": samples, "stain": stain,
                    "config": config, "mpp": mpp, "workers": workers, "control": control,
                    "analysis_mpp": analysis_mpp, "masks": masks, "scheduler": scheduler,
                    "force": force, "settle": settle, "once": once, "no_traits": not traits,
                    "cluster": cluster, "classifier": classifier,
                    "keep_wrong_stain": keep_wrong_stain, "zoom": zoom,
                    "no_zoom": zoom is False, "allow_unlisted": allow_unlisted,
                    "allow_missing": allow_missing}),
            )
        except typer.Exit as exc:  # a sheet/config problem: reported; keep watching
            return int(exc.exit_code)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else: said in one line; keep watching
            err.print(f"watch: the run failed: {type(exc).__name__}: {one_line(exc)}",
                      soft_wrap=True, markup=False)
            return 4

    from fibroquant.slides import list_slides

    # Everything already there is pending at start (a rerun of unchanged slides is cheap).
    for p in list_slides(slides_dir):
        if _is_slide(p, out):
            settler.touch_existing(p)
    if not len(settler) and once:
        err.print(f"watch: no slide files in {slides_dir}; nothing to do")
        raise typer.Exit(code=0)

    observer = Observer()
    observer.schedule(Handler(), str(slides_dir), recursive=True)
    if sheet is not None and not sheet.is_relative_to(slides_dir):
        observer.schedule(Handler(), str(sheet.parent), recursive=False)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    observer.start()
    code = 0
    running = False
    tick = min(1.0, max(0.05, settle / 4))
    try:
        if not once:
            err.print(f"watching {slides_dir} (settle {settle:g} s); Ctrl-C to stop")
        elif not settler.poll() and not quiet:
            err.print(f"watch: waiting until {len(settler)} slide file(s) have not changed "
                      f"for {settle:g} s")
        while True:
            if settler.poll():
                running = True
                code = run_once()
                running = False
                if code == 130:
                    break
                if once:
                    break
                err.print(f"watch: waiting for new slides in {slides_dir}")
            time.sleep(tick)
    except KeyboardInterrupt:
        code = 130 if (once or running) else 0
        err.print("watch: stopped" + (" during a run; rerun to continue" if running else ""))
    finally:
        observer.stop()
        observer.join(timeout=5)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code=code)


# --------------------------------------------------------------------------------------------
# store check / store rebuild
# --------------------------------------------------------------------------------------------

store_app = typer.Typer(help="Check or rebuild an output folder's results store.",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")

OutDir = Annotated[Path, typer.Argument(
    exists=True, file_okay=False, resolve_path=True, help="An analyze output folder.")]


@store_app.command("check")
def store_check(out_dir: OutDir) -> None:
    """Check that the results store opens, is not damaged and holds every slide of the tables
    (exit 0), or say what is wrong and how to recover (exit 4)."""
    from fibroquant.recover import check_store

    problems = check_store(out_dir)
    for line in problems:
        err.print(f"[bold red]problem:[/] {line}", markup=True, soft_wrap=True)
    if problems:
        raise typer.Exit(code=4)
    out.print(f"{out_dir / STORE_NAME}: ok", markup=False)


@store_app.command("rebuild")
def store_rebuild(out_dir: OutDir) -> None:
    """Re-derive the results store from slides.csv and provenance.json (the old store is moved
    aside, not deleted), so the next run measures nothing the tables already hold."""
    from fibroquant.errors import StoreLockedError
    from fibroquant.recover import rebuild_store

    try:
        n, moved = rebuild_store(out_dir)
    except StoreLockedError as exc:
        raise fail(str(exc), 3) from None
    except FibroquantError as exc:
        raise fail(str(exc), 4) from None
    if moved is not None:
        err.print(f"old store moved to {moved}", soft_wrap=True, markup=False)
    out.print(f"{out_dir / STORE_NAME}: rebuilt with {n} slide result(s) from slides.csv",
              markup=False)
