"""The ``fibroquant`` command line: parse, validate, call the library, print. No science here.

Exit codes: 0 every slide ok; 1 some slides failed (all tables still written); 2 a usage,
configuration or sample-sheet error (nothing measured); 3 the output folder is in use by another
run (use ``--wait``); 4 an internal error or an output that cannot be written (the tables may be
stale); 130 interrupted by Ctrl-C, 143 by SIGTERM (slides finished so far are kept).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from fibroquant import __version__
from fibroquant.console import err, note, out, setup_logging, warn
from fibroquant.errors import (
    ConfigError,
    FibroquantError,
    SampleSheetError,
    StoreError,
    StoreLockedError,
    interrupt_exit_code,
    one_line,
    sigterm_as_interrupt,
)


def _plain_flags(params: list[Any]) -> list[Any]:
    """Flags show no ``<bool>`` placeholder in help (Typer's default does)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="fibroquant",
    help="Collagen proportionate area (CPA) of Sirius red / Masson trichrome liver sections: "
    "slides in, per-mouse tables and a treated-vs-control comparison out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=_Group,
)


class StainChoice(str, Enum):
    """Stain protocol of the slides."""

    sirius_red = "sirius-red"
    masson = "masson"


def _fail(message: str, code: int) -> typer.Exit:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code=code)


def _version(value: bool) -> None:
    if value:
        out.print(f"fibroquant {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Only warnings, errors and the results.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """fibroquant: collagen proportionate area from stained liver slides."""
    setup_logging(verbose=verbose, quiet=quiet)
    if not verbose:
        from fibroquant.errors import quiet_warnings

        quiet_warnings()


def _settings(config: Path | None, stain: StainChoice | None, analysis_mpp: float | None,
              traits: bool | None = None, classifier: Path | None = None):
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
    return load_settings(config, overrides)


def _command(name: str, args: dict[str, Any]) -> str:
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


def _scheduler_problem(address: str) -> str | None:
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


def _analyze(
    slides_dir: Path, out_dir: Path, *, samples: Path | None, stain: StainChoice | None,
    config: Path | None, mpp: float | None, analysis_mpp: float | None, masks: bool,
    workers: int | None, scheduler: str | None, force: bool, wait: bool, control: str | None,
    quiet: bool = False, command: str | None = None, traits: bool = True,
    cluster: str | None = None, classifier: Path | None = None,
    as_json: bool = False, keep_wrong_stain: bool = False,
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
        command = _command("analyze", {
            "slides_dir": slides_dir, "out": out_dir, "samples": samples, "stain": stain,
            "config": config, "mpp": mpp, "analysis_mpp": analysis_mpp, "masks": masks,
            "workers": workers, "scheduler": scheduler, "cluster": cluster, "control": control,
            "force": force, "wait": wait, "classifier": classifier,
            "keep_wrong_stain": keep_wrong_stain})
    try:
        settings = _settings(config, stain, analysis_mpp, traits, classifier)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if scheduler is not None:
        problem = _scheduler_problem(scheduler)
        if problem:
            raise _fail(f"--scheduler {scheduler!r}: {problem}", 2)
    cluster_kind = cluster or settings.cluster.kind
    if cluster_kind is not None and scheduler is not None:
        raise _fail("--cluster and --scheduler: give one of them, not both", 2)
    n_workers = workers or available_cores()
    progress = Progress(
        TextColumn("[bold]analyze"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, disable=quiet or not err.is_terminal,
        transient=False, redirect_stdout=False,  # the bar is on stderr; stdout stays the
    )  # caller's (a library imported mid-run, e.g. numba's colorama, may hold on to it)
    task_id = None
    failed_lines: list[str] = []

    def on_plan(n: int, skipped: int) -> None:
        nonlocal task_id
        if not quiet:
            note(f"{n} slide(s) to measure, {skipped} already measured")
        task_id = progress.add_task("", total=n)

    def on_result(rec: dict[str, Any]) -> None:
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
            note(f"measured {rec.get('slide', '')}: CPA {_float(rec.get('cpa_percent')):.2f} %")
        if rec.get("status") == "ok" and rec.get("qc_flags") and not quiet:
            progress.console.print(f"doubtful: {rec.get('slide')}: {rec.get('qc_flags')}",
                                   soft_wrap=True, markup=False)
        if task_id is not None:
            progress.update(task_id, advance=1, description=rec.get("slide", ""))

    try:
        with (sigterm_as_interrupt(), progress,
              _cluster_or(scheduler, cluster_kind, settings) as where):
            summary = analyze_folder(
                slides_dir, out_dir, settings, samples=samples, control=control, mpp=mpp,
                workers=n_workers, scheduler=where, force=force, wait=wait, masks=masks,
                command=command, on_plan=on_plan, on_result=on_result,
                keep_wrong_stain=keep_wrong_stain,
            )
    except StoreLockedError as exc:
        raise _fail(str(exc), 3) from None
    except KeyboardInterrupt as exc:  # while planning or writing the tables
        err.print("interrupted: slides finished so far are stored; rerun to continue")
        return interrupt_exit_code(exc)
    except (SampleSheetError, ConfigError) as exc:
        raise _fail(str(exc), 2) from None
    except StoreError as exc:  # the store or an output cannot be written
        raise _fail(f"{exc} (the tables may be stale; rerun when fixed)", 4) from None
    except FibroquantError as exc:
        raise _fail(str(exc), 2) from None
    except Exception as exc:  # a bug: one line (details with -v), exit 4
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        raise _fail(f"internal error: {type(exc).__name__}: {one_line(exc)} (the tables may "
                    "be stale; rerun with -v for details)", 4) from None
    n_warn = len(summary.warnings)
    if not quiet:
        n_wrong = len(summary.wrong_stain)
        note(f"measured {summary.processed - summary.failed}, failed {summary.failed}, "
             + (f"wrong stain {n_wrong} ({'kept in' if keep_wrong_stain else 'left out of'} "
                "mice and groups), " if n_wrong else "")
             + f"skipped {summary.skipped} (already measured), removed {summary.removed} "
             f"in {summary.seconds:.1f} s" + (f"; {n_warn} warning(s)" if n_warn else ""))
        for old, new in summary.renamed:
            note(f"renamed: {new} (was {old}): its measurement and overlay kept")
    for slide, error in summary.failed_slides:
        if not any(error in line for line in failed_lines):
            err.print(f"[yellow]failed: {escape(error or slide)}[/]", markup=True)
    for slide in summary.crashed:
        warn(f"not measured again: {slide} (it crashed its worker process in earlier runs; "
             "--force to retry)")
    for line in summary.warnings:
        warn(line)
    if summary.interrupted:
        err.print("interrupted: slides finished so far are stored; rerun to continue")
    elif summary.exit_code == 2 and summary.wrong_stain:
        stain_name = settings.stains.stain.value
        err.print(f"[red]most slides are not {stain_name}: {len(summary.wrong_stain)} "
                  "slide(s) show another stain; check --stain (exit 2)[/]", markup=True,
                  soft_wrap=True)
    files = {name: str(out_dir / name) for name in
             ("slides.csv", "mice.csv", "groups.csv", "results.xlsx", "report.html")}
    if as_json:
        out.print_json(data=_run_json(summary, out_dir, files))
        return summary.exit_code
    out.print(summary.comparison, markup=False)
    if n_warn or summary.failed:
        out.print(f"{summary.failed} slide(s) failed, {n_warn} warning(s): see above and the "
                  "report before trusting the comparison.", markup=False)
    out.print(f"report: {files['report.html']}", markup=False)
    if not quiet:
        out.print(f"tables: {files['slides.csv']}, {files['mice.csv']}, {files['groups.csv']}, "
                  f"{files['results.xlsx']}", markup=False)
    return summary.exit_code


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _run_json(summary: Any, out_dir: Path, files: dict[str, str]) -> dict[str, Any]:
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
        "skipped": summary.skipped, "failed": summary.failed, "removed": summary.removed,
        "seconds": summary.seconds, "interrupted": summary.interrupted,
        "comparison": summary.comparison, "warnings": list(summary.warnings),
        "failed_slides": [{"slide": s, "error": e} for s, e in summary.failed_slides],
        "wrong_stain": [{"slide": s, "why": w} for s, w in summary.wrong_stain],
        "renamed": [{"from": a, "to": b} for a, b in summary.renamed],
        "files": files, "groups": groups,
    }


def _cluster_or(scheduler: str | None, kind: str | None, settings: Any) -> Any:
    """A context giving the run's scheduler: a batch cluster's for ``kind`` (closed after the
    run, its jobs cancelled), else the ``--scheduler`` address or None (local workers)."""
    from contextlib import nullcontext

    if kind is None:
        return nullcontext(scheduler)
    from fibroquant.cluster import cluster_for

    err.print(f"cluster: {kind}, {settings.cluster.jobs} job(s) of "
              f"{settings.cluster.cores} core(s), {settings.cluster.memory}")
    return cluster_for(kind, settings.cluster)


class ClusterChoice(str, Enum):
    """Batch systems of ``--cluster``."""

    SLURM = "slurm"
    PBS = "pbs"
    SGE = "sge"
    LOCAL = "local"


SlidesDir = Annotated[Path, typer.Argument(
    exists=True, file_okay=False, dir_okay=True, readable=True, resolve_path=True,
    help="Folder of slides (searched recursively).")]
SlidesOrFile = Annotated[Path, typer.Argument(
    exists=True, file_okay=True, dir_okay=True, readable=True, resolve_path=True, help="Folder of slides (searched recursively), or one slide file.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q",
                                     help="Only warnings, errors and the results.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the run summary and the group "
                                      "table as JSON on stdout.")]


@app.command()
def analyze(
    slides_dir: SlidesOrFile,
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, resolve_path=True,
                                      help="Output folder (tables, masks, QC, report, store).")],
    samples: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, resolve_path=True,
        help="Sample sheet CSV: slide,mouse,group (+ extra columns).")] = None,
    stain: Annotated[StainChoice | None, typer.Option(
        help="Stain of the slides (default from config: sirius-red).")] = None,
    config: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, help="YAML settings file.")] = None,
    mpp: Annotated[float | None, typer.Option(
        min=0.05, max=50.0, help="µm per pixel for slides whose files lack it.")] = None,
    analysis_mpp: Annotated[float | None, typer.Option(
        min=0.05, max=10.0, help="Analysis resolution in µm per pixel (native when unset; "
        "septa need <= 2, fine fibres <= 1).")]
    = None,
    masks: Annotated[bool, typer.Option("--masks", help="Write collagen/tissue mask PNGs.")]
    = False,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Parallel workers (default: all cores this process may use).")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Dask scheduler address, e.g. tcp://10.0.0.5:8786.")] = None,
    control: Annotated[str | None, typer.Option(
        help="Control group name (default: the group called 'control').")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-measure every slide.")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait for another run using OUT instead of exiting.")] = False,
    traits: Annotated[bool, typer.Option(
        "--traits/--no-traits", help="Measure fibre traits and compartments (on by default; "
        "--no-traits saves their time).")] = True,
    cluster: Annotated[ClusterChoice | None, typer.Option(
        help="Run the slides as batch jobs (dask-jobqueue); shape them in the config's "
        "cluster: section (cores, memory, walltime, queue, account, jobs). See docs/cluster.md."
    )] = None,
    classifier: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, resolve_path=True,
        help="Pixel classifier (fibroquant train) deciding collagen instead of the "
        "threshold.")] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
    keep_wrong_stain: Annotated[bool, typer.Option(
        "--keep-wrong-stain", help="Count slides whose colours show another stain in mice "
        "and groups (left out by default).")] = False,
) -> None:
    """Measure CPA on every new or changed slide and write the study tables and report.

    The comparison goes to stdout, progress and warnings to stderr.
    """
    code = _analyze(
        slides_dir, out, samples=samples, stain=stain, config=config, mpp=mpp,
        analysis_mpp=analysis_mpp, masks=masks, workers=workers, scheduler=scheduler,
        force=force, wait=wait, control=control, traits=traits,
        cluster=cluster.value if cluster is not None else None, classifier=classifier,
        quiet=quiet, as_json=as_json, keep_wrong_stain=keep_wrong_stain,
    )
    raise typer.Exit(code=code)


def bundled_samples() -> Path | None:
    """The repository's ``sample_slides/`` folder, when running from a checkout."""
    here = Path(__file__).resolve().parents[1] / "sample_slides"
    return here if (here / "samples.csv").is_file() else None


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, resolve_path=True,
                                      help="Output folder.")] = Path("fibroquant-demo"),
    workers: Annotated[int | None, typer.Option(min=1, help="Parallel workers.")] = None,
) -> None:
    """Analyse the bundled synthetic study (4 control + 4 MSC-treated mice) and show where."""
    slides = bundled_samples()
    if slides is None:
        from fibroquant.synthetic import make_cohort

        slides = out / "sample_slides"
        err.print(f"no bundled sample_slides/ found: generating a synthetic study in {slides}")
        make_cohort(slides, rng=0)
    code = _analyze(
        slides, out / "results", samples=slides / "samples.csv", stain=None, config=None,
        mpp=None, analysis_mpp=None, masks=True, workers=workers, scheduler=None, force=False,
        wait=True, control="control",
        command=_command("demo", {"out": out, "workers": workers}),
    )
    from fibroquant.console import out as stdout

    truth = slides / "truth" / "truth.csv"
    if truth.is_file():
        import pandas as pd

        t = pd.read_csv(truth)
        got = pd.read_csv(out / "results" / "slides.csv")
        m = t.merge(got, on="slide")
        if len(m):
            mae = (m["cpa_percent"] - m["truth_cpa_percent"]).abs().mean()
            stdout.print(f"synthetic truth: mean absolute CPA error {mae:.2f} pp over {len(m)} "
                         "slides")
    note(f"open {out / 'results' / 'report.html'} in a browser")
    raise typer.Exit(code=code)


@app.command()
def inspect(
    slide: Annotated[Path, typer.Argument(exists=True, dir_okay=True, readable=True,
                                          help="A slide or image file, or a DICOM WSI folder.")],
    mpp: Annotated[float | None, typer.Option(min=0.01, help="µm per pixel override.")] = None,
    stain: Annotated[StainChoice | None, typer.Option(help="Expected stain.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a slide's format, size, levels, µm per pixel and a stain guess."""
    from fibroquant.slides import inspect_slide

    try:
        info = inspect_slide(slide, mpp=mpp)
        fit = _stain_fit_of(slide, mpp, info)
    except FibroquantError as exc:
        raise _fail(str(exc), 2) from None
    from fibroquant.stains import describe_fit, stain_mismatch

    info["stain_guess"] = describe_fit(fit)
    if stain is not None:
        if not fit:
            info["stain_check"] = f"{stain.value}: too little stained tissue to tell"
        else:
            info["stain_check"] = stain_mismatch(fit, stain.value) or (
                f"{stain.value} fits (residual "
                f"{min(v for k, v in fit.items() if k.startswith(stain.value)):.2f})")
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    for key, value in info.items():
        if key == "levels":
            for i, lev in enumerate(value):
                out.print(f"  level {i}: {lev['shape'][1]} x {lev['shape'][0]} px, "
                          f"downsample {lev['downsample']:.2f}, mpp {lev['mpp']}")
        else:
            out.print(f"{key}: {value}")


def _stain_fit_of(path: Path, mpp: float | None, info: dict[str, Any]) -> dict[str, float]:
    """How well each preset explains a slide's colours (from a small thumbnail)."""
    import numpy as np

    from fibroquant.slides import open_slide
    from fibroquant.stains import stain_fit

    with open_slide(path, mpp=mpp if mpp else (info.get("mpp") or 1.0)) as sl:
        mpp0 = sl.mpp or 1.0
        longest = max(sl.levels[0].shape) * mpp0
        thumb = sl.thumbnail(max(mpp0, longest / 1024))
    return stain_fit(np.asarray(thumb))


def run() -> None:  # pragma: no cover - console entry alternative
    """Entry point used by ``python -m fibroquant``."""
    app(prog_name="fibroquant")
from fibroquant import cli_agree as _cli_agree  # noqa: F401  (registers agree and train)
from fibroquant import cli_ops as _cli_ops  # noqa: F401  (registers status and watch)
from fibroquant import cli_study as _cli_study  # noqa: F401  (registers compare and stains)

for _info in app.registered_commands:  # every command's flags without a <bool> placeholder
    if _info.cls in (None, typer.core.TyperCommand):
        _info.cls = _Command
