"""Study commands: ``fibroquant compare`` (statistics from stored results) and ``stains``.

Registered on :data:`fibroquant.cli.app` when ``fibroquant.cli`` imports this module at its end.
No science here: both call the library and print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fibroquant.cli import app
from fibroquant.cli_common import (
    STAIN_OPTION,
    StainChoice,
    cli_settings,
    err,
    fail,
    out,
)
from fibroquant.errors import ConfigError, FibroquantError, name_list, one_line


def _sheet_columns(slides) -> list[str]:
    """Sample-sheet extra columns: those between ``group`` and ``status`` in slides.csv."""
    cols = list(slides.columns)
    try:
        return cols[cols.index("group") + 1 : cols.index("status")]
    except ValueError:
        return []


def _matches(column: Any, value: str) -> Any:
    """Rows (a bool Series) whose ``column`` is ``value``: as text, or as a number where both
    are numbers (a dose of 0 reads 0.0 from a column with empty cells)."""
    import pandas as pd  # (the CLI's commands import pandas when they run)

    same = column.astype(str) == value
    if not pd.api.types.is_numeric_dtype(column):  # ids stay text: mouse=7 is not "007"
        return same
    try:
        number = float(value)
    except ValueError:
        return same
    return same | (column == number)


def _parse_where(where: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            msg = f"--where {item!r}: expected COLUMN=VALUE"
            raise FibroquantError(msg)
        pairs.append((key.strip(), value.strip()))
    return pairs


def _holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` is an analyze output folder (its tables are the run's own)."""
    from fibroquant.layout import STORE_NAME

    return (folder / STORE_NAME).exists() or (folder / "run.json").exists()


def _full_precision(slides: Any, out_dir: Path) -> Any:
    """``slides.csv`` (rounded for reading) with its areas and CPA at full precision from the
    run's store, so that a comparison here equals the run's own to the last digit."""
    from fibroquant.layout import STORE_NAME
    from fibroquant.store import ResultStore

    store_path = out_dir / STORE_NAME
    try:
        shash = json.loads((out_dir / "provenance.json").read_text(encoding="utf-8"))[
            "settings_hash"]
    except (OSError, ValueError, KeyError):
        return slides
    if not store_path.is_file() or "fingerprint" not in slides.columns:
        return slides
    slides = slides.copy()
    cols = ("tissue_area_mm2", "collagen_area_mm2", "cpa_percent")
    with ResultStore(store_path) as store:
        for i, fp in slides["fingerprint"].items():
            rec = store.get_result(str(fp), shash) if isinstance(fp, str) else None
            if rec and rec.get("status") == "ok":
                for c in cols:
                    if c in rec and c in slides.columns:
                        slides.at[i, c] = rec[c]
    return slides


@app.command()
def compare(
    out_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                            help="An analyze output folder.")],
    control: Annotated[str | None, typer.Option(help="Control group (value of --by).")] = None,
    by: Annotated[str, typer.Option(help="Sample-sheet column defining the groups.")] = "group",
    where: Annotated[list[str] | None, typer.Option(
        help="Keep only slides with COLUMN=VALUE (repeatable), e.g. session=2026-10.")] = None,
    save: Annotated[Path | None, typer.Option(
        file_okay=False, help="Write mice.csv, groups.csv and a plot to this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the group table as JSON.")]
    = False,
    keep_wrong_stain: Annotated[bool, typer.Option(
        "--keep-wrong-stain", help="Count slides whose colours show another stain in mice "
        "and groups (as for analyze; left out by default).")] = False,
) -> None:
    """Recompute the group comparison from stored results, without re-reading slides."""
    import pandas as pd

    from fibroquant import report, stats
    from fibroquant.cohort import aggregate_mice
    from fibroquant.run import for_groups
    from fibroquant.store import atomic_write_csv

    path = out_dir / "slides.csv"
    if not path.is_file():
        raise fail(f"{out_dir}: no slides.csv (run fibroquant analyze first)", 2)
    if save is not None and _holds_a_run(save):
        raise fail(f"--save {save}: holds an analyze run's tables (fibroquant.sqlite or "
                    "run.json); compare writes its subset elsewhere, e.g. "
                    f"--save {save / 'compare'}", 2)
    slides = pd.read_csv(path, dtype={"mouse": str, "group": str}, keep_default_na=False,
                         na_values=[""])
    slides = _full_precision(slides, out_dir)
    extras = _sheet_columns(slides)
    try:
        for key, value in _parse_where(where or []):
            if key not in slides.columns:
                raise FibroquantError(f"--where {key}: no such column in {path}")
            column = slides[key]
            kept = slides[_matches(column, value)]
            if kept.empty:
                have = name_list(sorted({str(v) for v in column.dropna()}), 5)
                raise FibroquantError(f"{path}: no slides left after --where {key}={value} "
                                      f"(its values: {have or 'none'})")
            slides = kept
        if by not in slides.columns:
            raise FibroquantError(
                f"--by {by}: no such column in {path}; sheet columns: "
                f"{', '.join(['group', *extras]) or 'none'}")
        per_mouse = slides.groupby("mouse")[by].nunique(dropna=False)
        varying = per_mouse[per_mouse > 1]
        if len(varying):
            raise FibroquantError(
                f"--by {by}: differs between slides of mouse {varying.index[0]}; the mouse is "
                "the unit of comparison, so group by a per-mouse column (or subset with --where)")
        work = for_groups(slides, keep_wrong_stain).copy()
        if by != "group":
            work["group"] = work[by].astype(str)
        mice = aggregate_mice(work, extra_columns=[c for c in extras if c != by])
        groups = stats.compare_groups(mice, control=control)
    except (FibroquantError, ValueError) as exc:
        raise fail(one_line(exc), 2) from None
    ctrl = groups.attrs.get("control")
    sentence = stats.summary_sentence(groups) if ctrl else (
        groups.attrs.get("note") or "no control group: groups described, not compared")
    if as_json:
        out.print_json(groups.to_json(orient="records", double_precision=15))
    else:
        cols = [c for c in ("group", "n_mice", "cpa_mean_percent", "cpa_sd", "diff_vs_control_pp",
                            "change_vs_control_percent", "welch_p", "mannwhitney_p", "hedges_g",
                            "dunnett_p") if c in groups.columns]
        out.print(groups[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"),
                  soft_wrap=True)
        out.print(sentence, soft_wrap=True)
        if mice["group"].nunique() > 2:
            omni = stats.omnibus_tests(mice)
            for name, res in omni.items():
                if isinstance(res, dict) and "p" in res:
                    out.print(f"{res.get('test', name)}: p = {report.format_p(res['p'])}")
    if save is not None:
        from fibroquant import schema
        from fibroquant.store import atomic_write_text

        save.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(save / "mice.csv", schema.round_table(mice, "mice"))
        atomic_write_csv(save / "groups.csv", schema.round_table(groups, "groups"))
        report.plot_groups(mice, groups, save / "cpa_groups", control=ctrl)
        record = {"source": str(out_dir.resolve()), "by": by, "control": ctrl,
                  "where": list(where or []), "keep_wrong_stain": keep_wrong_stain,
                  "comparison": sentence,
                  "n_slides": len(slides), "n_mice": len(mice)}
        atomic_write_text(save / "compare.json", json.dumps(record, indent=2) + "\n")
        err.print(f"written: {save / 'mice.csv'}, {save / 'groups.csv'}, "
                  f"{save / 'cpa_groups.png'}, {save / 'compare.json'} (the filter)")


@app.command()
def stains(
    slides_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                               help="Folder of slides.")],
    stain: Annotated[StainChoice | None, typer.Option(
        **STAIN_OPTION, help="Stain of the slides.")] = None,
    config: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                help="YAML settings file.")] = None,
    mpp: Annotated[float | None, typer.Option(min=0.01, help="µm per pixel if files lack it.")]
    = None,
    write: Annotated[Path | None, typer.Option(
        dir_okay=False, help="Write a study config with the median estimated vectors.")] = None,
    analysis_mpp: Annotated[float | None, typer.Option(
        min=0.05, help="Resolution to estimate at, µm/px (default 2.0 for speed).")] = 2.0,
) -> None:
    """Estimate each slide's stain vectors, show stain QC, optionally write one study config.

    With --write, the median of the per-slide estimates becomes the config's stain vectors
    (estimate: preset), so a whole study is deconvolved with the same vectors.
    """
    import numpy as np
    import yaml

    from fibroquant.pipeline import calibrate_slide
    from fibroquant.slides import list_slides, open_slide

    try:
        settings = cli_settings(config, stain, analysis_mpp)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    files = list_slides(slides_dir)
    if not files:
        raise fail(f"{slides_dir}: no slide files found", 2)
    estimates: list[dict[str, list[float]]] = []
    failed = 0
    for f in files:
        try:  # the calibration step only: no tile is measured
            slide = open_slide(f)
            if slide.mpp is None and mpp is not None:
                slide.close()
                slide = open_slide(f, mpp=mpp)
            with slide:
                cal = calibrate_slide(slide, settings)
        except FibroquantError as exc:
            failed += 1
            err.print(f"[yellow]failed: {one_line(exc)}[/]", markup=True)
            continue
        est, thr, warning = cal.stains, cal.threshold, "; ".join(cal.warnings)
        vec = est.stains.to_dict()
        out.print(f"[bold]{f.relative_to(slides_dir)}[/] ({est.source})", markup=True)
        for name, v in vec.items():
            out.print(f"  {name:18s} {v[0]:.4f} {v[1]:.4f} {v[2]:.4f}   "
                      f"{est.angles_deg.get(name, 0):5.1f}° from preset")
        out.print(f"  collagen level {thr.collagen_level_od:.3f} OD, parenchyma "
                  f"{thr.parenchyma_od:.3f} OD, collagen share "
                  f"{est.od_share.get(est.stains.collagen, 0.0):.2f}")
        if warning:
            out.print(f"  [yellow]warning: {warning}[/]", markup=True, soft_wrap=True)
        if cal.qc.wrong_stain:
            out.print("  [yellow]left out of the study vectors (wrong stain?)[/]", markup=True)
        elif est.source != "preset":
            estimates.append(vec)
    if write is not None:
        if not estimates:
            raise fail("no slide gave a full stain estimate; nothing written", 1)
        names = list(estimates[0])
        median = {n: [round(float(x), 4) for x in
                      np.median(np.array([e[n] for e in estimates]), axis=0)] for n in names}
        data: dict[str, Any] = {"stains": {"stain": settings.stains.stain.value,
                                           "estimate": "preset", "vectors": median}}
        if settings.stains.stain.value == "masson":
            data["stains"]["masson_collagen"] = settings.stains.masson_collagen
        header = (f"# study stain vectors: median of {len(estimates)} slide estimates from "
                  f"{slides_dir} (fibroquant stains --write)\n")
        write.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        err.print(f"written {write}: use it with --config")
    if failed:
        raise typer.Exit(code=1)
