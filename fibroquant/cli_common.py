"""What the command modules share (``cli``, ``cli_ops``, ``cli_study``, ``cli_agree``): the
stain choice, one-line failures, settings from options, the provenance command line, and the
analyze run itself (``analyze``, ``demo`` and ``watch`` all call :func:`run_analyze`). The
consoles are :mod:`fibroquant.console`'s.

Exit codes (README): 0 every slide ok; 1 some slides failed (all tables still written); 2 a
usage, configuration or sample-sheet error; 3 the output folder is in use by another run; 4 an
internal error or an output that cannot be written (the tables may be stale); 130 interrupted
by Ctrl-C, 143 by SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from fibroquant.console import err, note, out, warn
from fibroquant.errors import (
    ConfigError,
    FibroquantError,
    SampleSheetError,
    StoreError,
    StoreLockedError,
    interrupt_exit_code,
    name_list,
    one_line,
    received_interrupt,
    sigterm_as_interrupt,
)
from fibroquant.protocols import Stain

__all__ = ["STAIN_OPTION", "App", "StainChoice", "available_cores", "cli_settings",
           "command_line", "err", "fail", "out", "run_analyze"]


class App(typer.Typer):
    """The Typer app. A command-line mistake (an unknown option, a path that does not exist)
    is one line and exit 2, as any other bad input, not a usage block and a framed box; an
    uncaught error (a bug, an I/O failure outside a run) exits 4 with one line instead of a
    traceback and exit code 1 (which means "some slides failed")."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fibroquant.cores import tune_gc

        tune_gc()
        try:
            code = super().__call__(*args, **{**kwargs, "standalone_mode": False})
        except Exception as exc:
            if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None),
                                                               int):
                sys.exit(_usage_error(exc))  # click's ClickException, UsageError...
            if type(exc).__name__ == "Abort":
                print("error: aborted", file=sys.stderr)
                sys.exit(1)
            # the last resort: one line, exit 4
            logging.getLogger("fibroquant").debug("internal error", exc_info=True)
            print(f"error: internal error: {type(exc).__name__}: {one_line(exc)} "
                  "(rerun with -v for details)", file=sys.stderr)
            sys.exit(4)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: Any) -> int:
    """Print a click error of the command line as one line on stderr; its exit code."""
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path} -h" if ctx is not None else "fibroquant -h"
    message = " ".join(str(exc.format_message()).split()).rstrip(".")
    if message:  # (none after the help that a bare `fibroquant` prints)
        print(f"error: {message} (see {where})", file=sys.stderr)
    return int(exc.exit_code)


#: The stain protocols ``--stain`` offers.
StainChoice = Stain
#: ``--stain``'s options: the protocols' names and the names labs use for them (PSR...).
STAIN_OPTION = {"parser": lambda value: parse_stain(value), "metavar": "sirius-red|masson"}


def parse_stain(value: str | Stain) -> Stain:
    """``--stain``'s value: a protocol's name, in any case, or another name labs use for it
    (``PSR``, ``picrosirius``, ``trichrome``; :class:`fibroquant.protocols.Stain`)."""
    try:
        return Stain(value)
    except ValueError:
        msg = (f"{value!r} is not a stain fibroquant measures: sirius-red (also PSR, "
               "picrosirius) or masson (also trichrome)")
        raise typer.BadParameter(msg) from None


def fail(message: str, code: int) -> typer.Exit:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code=code)


def cli_settings(config: Path | None, stain: StainChoice | None, analysis_mpp: float | None,
              traits: bool | None = None, classifier: Path | None = None,
              zoom: bool | None = None):
    from fibroquant.config import load_settings

    overrides: dict[str, Any] = {}
    if traits is False:  # --no-traits; --traits keeps the config's choice
        overrides["traits"] = {"enabled": False}
    if classifier is not None:
        overrides["classifier"] = str(classifier)
    if stain is not None:
        overrides.setdefault("stains", {})["stain"] = stain.value
    if analysis_mpp is not None:
        overrides.setdefault("tiling", {})["analysis_mpp"] = analysis_mpp
    if zoom is not None:  # --zoom / --no-zoom; unset keeps the config's (auto by default)
        overrides.setdefault("tiling", {})["zoom"] = zoom
    return load_settings(config, overrides)


def command_line(name: str, args: dict[str, Any]) -> str:
    """The command with its effective arguments, for provenance (``run.json``, the store).

    Built from the parsed values (paths resolved, defaults left out), so it reads the same
    whether the command came from a shell, ``demo``, ``watch`` or a test runner.
    """
    parts = [f"fibroquant {name}"]
    for key, value in args.items():
        if value is None or value is False:
            continue
        if isinstance(value, Enum):
            value = value.value
        if key == "slides_dir":  # the positional argument
            parts.append(shlex.quote(str(value)))
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (what ``taskset``, cgroup cpusets
    and batch schedulers give it), else ``os.cpu_count()``; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def scheduler_problem(address: str) -> str | None:
    """Why ``address`` is not a Dask scheduler address (``tcp://HOST:PORT``, ``tls://...``,
    ``inproc://...``, or ``HOST:PORT``), or None."""
    from urllib.parse import urlsplit

    text = address.strip()
    if "://" not in text:
        text = "tcp://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return f"not an address ({exc}); expected tcp://HOST:PORT"
    if parts.scheme == "inproc":
        return None
    if parts.scheme not in ("tcp", "tls", "ucx", "ws", "wss"):
        return f"unknown protocol '{parts.scheme}'; expected tcp://HOST:PORT"
    if not parts.hostname:
        return "no host; expected tcp://HOST:PORT"
    if port is None:
        return "no port; expected tcp://HOST:PORT (Dask's default is 8786)"
    return None


def run_analyze(
    slides_dir: Path, out_dir: Path, *, samples: Path | None, stain: StainChoice | None,
    config: Path | None, mpp: float | None, analysis_mpp: float | None, masks: bool,
    workers: int | None, scheduler: str | None, force: bool, wait: bool, control: str | None,
    quiet: bool = False, command: str | None = None, traits: bool = True,
    cluster: str | None = None, classifier: Path | None = None,
    as_json: bool = False, keep_wrong_stain: bool = False, zoom: bool | None = None,
    allow_unlisted: bool = False, allow_missing: bool = False,
) -> int:
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from fibroquant.console import is_quiet
    from fibroquant.run import analyze_folder

    quiet = quiet or is_quiet() or as_json
    if command is None:
        command = command_line("analyze", {
            "slides_dir": slides_dir, "out": out_dir, "samples": samples, "stain": stain,
            "config": config, "mpp": mpp, "analysis_mpp": analysis_mpp, "masks": masks,
            "workers": workers, "scheduler": scheduler, "cluster": cluster, "control": control,
            "force": force, "wait": wait, "classifier": classifier,
            "keep_wrong_stain": keep_wrong_stain, "no_traits": not traits, "zoom": zoom,
            "no_zoom": zoom is False, "allow_unlisted": allow_unlisted,
            "allow_missing": allow_missing})
    try:
        settings = cli_settings(config, stain, analysis_mpp, traits, classifier, zoom)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    if scheduler is not None:
        problem = scheduler_problem(scheduler)
        if problem:
            raise fail(f"--scheduler {scheduler!r}: {problem}", 2)
    cluster_kind = cluster or settings.cluster.kind
    if cluster_kind is not None and scheduler is not None:
        raise fail("--cluster and --scheduler: give one of them, not both", 2)
    n_workers = workers or available_cores()
    progress = Progress(
        TextColumn("[bold]analyze"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, disable=quiet or not err.is_terminal,
        transient=False, redirect_stdout=False,  # the bar is on stderr; stdout stays the
    )  # caller's (a library imported mid-run, e.g. numba's colorama, may hold on to it)
    task_id = None
    failed_lines: list[str] = []
    measured_now = [0]  # slides measured by this run (summary.failed counts the whole table)

    def on_plan(n: int, skipped: int) -> None:
        nonlocal task_id
        if not quiet:
            note(f"{n} slide(s) to measure, {skipped} already measured")
            if n and cluster_kind is None and scheduler is None and _first_compile():
                note("compiling the image kernels for this machine (first run, or first "
                     "after an update): 10-40 s before the first slide; later runs load them")
        task_id = progress.add_task("", total=n)

    def on_result(rec: dict[str, Any]) -> None:
        measured_now[0] += rec.get("status") == "ok"
        if rec.get("status") != "ok":
            line = f"failed: {rec.get('error')}"
            failed_lines.append(line)
            progress.console.print(f"[yellow]{escape(line)}[/]", markup=True, soft_wrap=True)
        elif rec.get("wrong_stain") is True:
            why = next((w for w in str(rec.get("stain_warning", "")).split("; ")
                        if "clearly better" in w or "fluorescence" in w),
                       f"colours show {rec.get('stain_guess', 'another stain')}")
            progress.console.print(f"[yellow]wrong stain: {escape(str(rec.get('slide')))}: "
                                   f"{escape(why)}[/]", markup=True, soft_wrap=True)
        elif not quiet and not progress.live.is_started:  # a log: one line per slide
            note(f"measured {rec.get('slide', '')}: CPA {as_float(rec.get('cpa_percent')):.2f} %")
        if rec.get("status") == "ok" and rec.get("qc_flags") and not quiet:
            progress.console.print(f"doubtful: {rec.get('slide')}: {rec.get('qc_flags')}",
                                   soft_wrap=True, markup=False)
        if task_id is not None:
            progress.update(task_id, advance=1, description=rec.get("slide", ""))

    try:
        with (sigterm_as_interrupt(), progress,
              cluster_or(scheduler, cluster_kind, settings) as where):
            summary = analyze_folder(
                slides_dir, out_dir, settings, samples=samples, control=control, mpp=mpp,
                workers=n_workers, scheduler=where, force=force, wait=wait, masks=masks,
                command=command, on_plan=on_plan, on_result=on_result,
                keep_wrong_stain=keep_wrong_stain, allow_unlisted=allow_unlisted,
                allow_missing=allow_missing,
            )
    except StoreLockedError as exc:
        raise fail(str(exc), 3) from None
    except KeyboardInterrupt as exc:  # while planning or writing the tables
        err.print("interrupted: slides finished so far are stored; rerun to continue")
        return interrupt_exit_code(exc)
    except (SampleSheetError, ConfigError) as exc:
        raise fail(str(exc), 2) from None
    except StoreError as exc:  # the store or an output cannot be written
        raise fail(f"{exc} (the tables may be stale; rerun when fixed)", 4) from None
    except FibroquantError as exc:
        raise fail(str(exc), 2) from None
    except Exception as exc:  # a bug: one line (details with -v), exit 4
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        got = received_interrupt()
        if got is not None:  # what failed came after (or of) the interrupt: say that
            err.print("interrupted: slides finished so far are stored; rerun to continue")
            return interrupt_exit_code(got)
        raise fail(f"internal error: {type(exc).__name__}: {one_line(exc)} (the tables may "
                    "be stale; rerun with -v for details)", 4) from None
    n_warn = len(summary.warnings)
    if not quiet:
        n_wrong = len(summary.wrong_stain)
        note(f"measured {measured_now[0]}, failed {summary.failed}, "
             + (f"wrong stain {n_wrong} ({'kept in' if keep_wrong_stain else 'left out of'} "
                "mice and groups), " if n_wrong else "")
             + (f"not measured {summary.not_measured} ("
                + ("interrupted" if summary.interrupted else "not in the folder yet") + "), "
                if summary.not_measured else "")
             + f"skipped {summary.skipped} (already measured), removed {summary.removed} "
             f"in {summary.seconds:.1f} s" + (f"; {n_warn} warning(s)" if n_warn else ""))
        for old, new in summary.renamed:
            note(f"renamed: {new} (was {old}): its measurement and overlay kept")
        if summary.removed_slides:  # (renamed ones are not among them)
            note(f"removed: {name_list(summary.removed_slides)} (no longer in the folder): "
                 "their results stay in the store's history")
    for slide, error in summary.failed_slides:
        if not any(error in line for line in failed_lines):
            err.print(f"[yellow]failed: {escape(error or slide)}[/]", markup=True)
    for slide in summary.crashed:
        warn(f"not measured again: {slide} (it crashed the process measuring it in earlier runs; "
             "--force to retry)")
    for line in summary.warnings:
        warn(line)
    if summary.interrupted:
        err.print("interrupted: slides finished so far are stored"
                  + (f", {summary.not_measured} not measured yet" if summary.not_measured
                     else "") + "; rerun to continue")
    elif summary.exit_code == 2 and summary.wrong_stain:
        err.print(f"[red]most slides are not {settings.stains.stain.value}: "
                  f"{len(summary.wrong_stain)} slide(s) show another stain; check --stain "
                  "(exit 2)[/]", markup=True, soft_wrap=True)
    files = {name: str(out_dir / name) for name in
             ("slides.csv", "mice.csv", "groups.csv", "traits.csv", "trait_groups.csv",
              "results.xlsx", "report.html")
             if not name.startswith("trait") or (out_dir / name).is_file()}
    if as_json:  # (no files when an interrupted run wrote none)
        out.print_json(data=run_json(summary, out_dir, files if summary.tables_written else {}))
        return summary.exit_code
    out.print(summary.comparison, markup=False)
    if not summary.tables_written:  # interrupted before any slide was stored
        if (out_dir / "report.html").is_file():
            out.print(f"report (of an earlier run): {files['report.html']}", markup=False)
        return summary.exit_code
    if n_warn or summary.failed:
        # (this is stdout; the failures and warnings went to stderr, maybe to another file)
        out.print(f"{summary.failed} slide(s) failed, {n_warn} warning(s): see the 'failed:' "
                  "and 'warning:' lines and the report before trusting the comparison.",
                  markup=False)
    out.print(f"report: {files['report.html']}", markup=False)
    if not quiet:
        # (the traits' tables: not with --no-traits; their comparison only with groups)
        trait_files = [files[n] for n in ("traits.csv", "trait_groups.csv") if n in files]
        out.print(f"tables: {files['slides.csv']}, {files['mice.csv']}, {files['groups.csv']}, "
                  + "".join(f"{t}, " for t in trait_files) + f"{files['results.xlsx']}",
                  markup=False)
        views = sorted((out_dir / "zoom").glob("*.html"))
        if views:  # whole slides' zoomable QC views, opened from the report's gallery
            out.print(f"zoomable QC views: {out_dir / 'zoom'} ({len(views)} slide(s), opened "
                      "from the report)", markup=False)
    return summary.exit_code


def as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def run_json(summary: Any, out_dir: Path, files: dict[str, str]) -> dict[str, Any]:
    """What ``analyze --json`` prints: the run's counts, comparison, warnings, failed slides,
    output files and the group table as in ``groups.csv``."""
    import pandas as pd

    groups: list[dict[str, Any]] = []
    path = out_dir / "groups.csv"
    if path.is_file():
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        groups = json.loads(frame.to_json(orient="records"))
    return {
        "exit_code": summary.exit_code, "processed": summary.processed,
        "skipped": summary.skipped, "failed": summary.failed,
        "not_measured": summary.not_measured, "removed": summary.removed,
        "removed_slides": list(summary.removed_slides), "seconds": summary.seconds,
        "interrupted": summary.interrupted,
        "tables_written": summary.tables_written,
        "comparison": summary.comparison, "warnings": list(summary.warnings),
        "failed_slides": [{"slide": s, "error": e} for s, e in summary.failed_slides],
        "wrong_stain": [{"slide": s, "why": w} for s, w in summary.wrong_stain],
        "renamed": [{"from": a, "to": b} for a, b in summary.renamed],
        "files": files, "groups": groups,
    }


def cluster_or(scheduler: str | None, kind: str | None, settings: Any) -> Any:
    """A context giving the run's scheduler: a batch cluster's for ``kind`` (closed after the
    run, its jobs cancelled), else the ``--scheduler`` address or None (local workers)."""
    from contextlib import nullcontext

    if kind is None:
        return nullcontext(scheduler)
    from fibroquant.cluster import cluster_for

    err.print(f"cluster: {kind}, {settings.cluster.jobs} job(s) of "
              f"{settings.cluster.cores} core(s), {settings.cluster.memory}")
    return cluster_for(kind, settings.cluster)


def _first_compile() -> bool:
    """True when the tile kernels are not in numba's disk cache yet (a machine's first run)."""
    from fibroquant.kernels import kernels_on_disk

    return kernels_on_disk() is False
