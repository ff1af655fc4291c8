"""The ``fibroquant`` command line: parse, validate, call the library, print. No science here.

Exit codes: 0 every slide ok; 1 some slides failed (all tables still written); 2 a usage,
configuration or sample-sheet error (nothing measured); 3 the output folder is in use by another
run (use ``--wait``); 4 an internal error or an output that cannot be written (the tables may be
stale); 130 interrupted by Ctrl-C, 143 by SIGTERM (slides finished so far are kept).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from fibroquant import __version__
from fibroquant.cli_common import (
    STAIN_OPTION,
    App,
    StainChoice,
    available_cores,  # noqa: F401 - part of the command line's face (tests)
    command_line,
    fail,
    run_analyze,
)
from fibroquant.console import err, note, out, setup_logging
from fibroquant.errors import FibroquantError, exit_143_on_sigterm


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


app = App(
    name="fibroquant",
    help="Collagen proportionate area (CPA) of Sirius red / Masson trichrome liver sections: "
    "slides in, per-mouse tables and a treated-vs-control comparison out.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=_Group,
)


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
    exit_143_on_sigterm()
    if not verbose:
        from fibroquant.errors import quiet_warnings

        quiet_warnings()


class ClusterChoice(StrEnum):
    """Batch systems of ``--cluster``."""

    SLURM = "slurm"
    PBS = "pbs"
    SGE = "sge"
    LOCAL = "local"


SlidesOrFile = Annotated[Path, typer.Argument(
    exists=True, file_okay=True, dir_okay=True, readable=True, resolve_path=True, help="Folder of slides (searched recursively), or one slide file.")]
#: ``--allow-unlisted`` (analyze, watch)
AllowUnlisted = Annotated[bool, typer.Option(
    "--allow-unlisted", help="Measure slide files the sample sheet does not list yet, and "
    "leave them out of the tables until it does (a scheduled run while the sheet catches up; "
    "by default they are an error before any work).")]
#: ``--allow-missing`` (analyze, watch)
AllowMissing = Annotated[bool, typer.Option(
    "--allow-missing", help="Keep sample-sheet rows whose slide file is not in the folder yet "
    "in the tables as not measured (a scheduled run while scans arrive; by default they are "
    "an error before any work).")]
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
        help="Sample sheet (CSV, TSV or .xlsx): slide,mouse,group (+ extra columns).")] = None,
    stain: Annotated[StainChoice | None, typer.Option(
        **STAIN_OPTION,
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
    zoom: Annotated[bool | None, typer.Option(
        "--zoom/--no-zoom", help="Write a zoomable full-resolution QC view of each measured "
        "slide (zoom/, opened from the report; off by default: it costs about 1.5x the "
        "analysis time on a whole slide).",
        show_default=False)] = None,
    allow_unlisted: AllowUnlisted = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Measure CPA on every new or changed slide and write the study tables and report.

    The comparison goes to stdout, progress and warnings to stderr.
    """
    code = run_analyze(
        slides_dir, out, samples=samples, stain=stain, config=config, mpp=mpp,
        analysis_mpp=analysis_mpp, masks=masks, workers=workers, scheduler=scheduler,
        force=force, wait=wait, control=control, traits=traits,
        cluster=cluster.value if cluster is not None else None, classifier=classifier,
        quiet=quiet, as_json=as_json, keep_wrong_stain=keep_wrong_stain, zoom=zoom,
        allow_unlisted=allow_unlisted, allow_missing=allow_missing,
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
    code = run_analyze(
        slides, out / "results", samples=slides / "samples.csv", stain=None, config=None,
        mpp=None, analysis_mpp=None, masks=True, workers=workers, scheduler=None, force=False,
        wait=True, control="control",
        command=command_line("demo", {"out": out, "workers": workers}),
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
    stain: Annotated[StainChoice | None, typer.Option(
        **STAIN_OPTION, help="Expected stain.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a slide's format, size, levels, µm per pixel and a stain guess."""
    from fibroquant.slides import inspect_slide

    try:
        info = inspect_slide(slide, mpp=mpp)
        fit = _stain_fit_of(slide, mpp, info)
    except FibroquantError as exc:
        raise fail(str(exc), 2) from None
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
