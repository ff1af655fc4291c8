"""``fibroquant agree`` and ``fibroquant train``: annotations against a run, and a per-study
pixel classifier. Parse, call the library, print; registered on :data:`fibroquant.cli.app`."""

from __future__ import annotations

import math
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
from fibroquant.errors import ConfigError, FibroquantError
from fibroquant.outdir import standard_json


def _num(v: Any) -> str:
    return "-" if isinstance(v, float) and not math.isfinite(v) else (
        f"{v:.3f}" if isinstance(v, float) else str(v))


@app.command()
def agree(
    out_dir: Annotated[Path, typer.Argument(
        exists=True, file_okay=False, resolve_path=True,
        help="Output folder of an analyze run made with --masks.")],
    annotations: Annotated[Path, typer.Option(
        exists=True, file_okay=False, resolve_path=True,
        help="Annotation folder: one sub-folder per person (PERSON/STEM.png or .geojson), "
        "or one person's flat folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Compare a run's collagen masks with people's annotations.

    Dice, IoU, collagen % and its error against each person and their majority, the people's
    pairwise Dice, Bland-Altman, ICC(2,1) and Lin's CCC across images; written to
    agreement.csv, two plots and a section of report.html.
    """
    from fibroquant.agreement import agree_run, write_agreement

    try:
        result = agree_run(out_dir, annotations)
        files = write_agreement(result, out_dir)
    except FibroquantError as exc:
        raise fail(str(exc), 2) from None
    for line in result.skipped:
        err.print(f"[yellow]skipped: {line}[/]", markup=True, soft_wrap=True)
    s = result.summary
    if as_json:
        out.print_json(standard_json({**s, "notes": result.notes,
                                      "files": [str(f) for f in files]}))
        raise typer.Exit(0)
    out.print(f"{s['images']} image(s); people: {', '.join(s['people'])}", soft_wrap=True)
    out.print(f"Dice vs majority (mean over images): {_num(s['dice_vs_majority_mean'])}; "
              f"people's pairwise Dice: {_num(s['people_pairwise_dice_mean'])}")
    for ref, c in s["cpa_agreement"].items():
        out.print(f"  collagen % vs {ref}: bias {_num(c['bias_pp'])} pp "
                  f"(95 % limits {_num(c['loa_low_pp'])} to {_num(c['loa_high_pp'])}), "
                  f"ICC(2,1) {_num(c['icc2_1'])}, Lin's CCC {_num(c['lin_ccc'])}, "
                  f"Pearson {_num(c['pearson_r'])}, Spearman {_num(c['spearman_r'])}",
                  soft_wrap=True)
    for note in result.notes:
        out.print(f"note: {note}", soft_wrap=True)
    out.print("written: " + ", ".join(str(f) for f in files), soft_wrap=True)


@app.command()
def train(
    annotations: Annotated[Path, typer.Argument(
        exists=True, file_okay=False, resolve_path=True,
        help="Annotation folder (PERSON/STEM.png or .geojson, or one person's folder).")],
    slides: Annotated[Path, typer.Option(
        exists=True, file_okay=False, resolve_path=True,
        help="Folder of the annotated images (named STEM.*).")],
    out_file: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, resolve_path=True,
                                           help="Classifier file to write.")],
    stain: Annotated[StainChoice | None, typer.Option(
        **STAIN_OPTION,
        help="Stain of the slides (default from config: sirius-red).")] = None,
    config: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, help="YAML settings file.")] = None,
    mpp: Annotated[float | None, typer.Option(
        min=0.01, max=100.0, help="µm per pixel for images whose files lack it.")] = None,
    model: Annotated[str, typer.Option(help="hgb (gradient boosting) or rf (random forest).")]
    = "hgb",
    max_pixels: Annotated[int, typer.Option(
        min=1000, help="Training pixels drawn per image at most.")] = 100_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train a collagen pixel classifier on annotated images.

    Reports leave-one-image-out agreement in agree's terms; use the file with
    analyze --classifier.
    """
    from fibroquant.annotations import discover
    from fibroquant.classifier import (
        DEFAULT_SCALES_UM,
        REFERENCE,
        ClassifierError,
        apply_references,
        cross_validate,
        feature_names,
        fit,
        save,
        training_image,
        training_problems,
    )
    from fibroquant.slides import list_slides
    from fibroquant.tasks import output_stems

    if model not in ("hgb", "rf"):
        raise fail(f"--model must be hgb or rf, got {model!r}", 2)
    try:
        settings = cli_settings(config, stain, None, False)  # no fibre traits: not needed
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    files = list_slides(slides)
    stems = output_stems([f.relative_to(slides).as_posix() for f in files])
    by_stem = {stems[f.relative_to(slides).as_posix()]: f for f in files}
    try:
        found = discover(annotations, list(by_stem))
    except FibroquantError as exc:
        raise fail(str(exc), 2) from None
    if not found:
        raise fail(f"{annotations}: no annotation file is named after an image in {slides}", 2)
    images, stain_names, failed = [], None, []
    for i, (stem, people) in enumerate(found.items()):
        try:
            image, stains = training_image(by_stem[stem], people, settings, stem=stem, mpp=mpp,
                                           max_train_px=max_pixels, rng=i)
        except FibroquantError as exc:
            failed.append(str(exc))
            err.print(f"[yellow]failed: {exc}[/]", markup=True, soft_wrap=True)
            continue
        stain_names = stains.names
        images.append(image)
    errors, warns = training_problems(images)
    if errors or stain_names is None:
        raise fail("cannot train: " + "; ".join(errors or failed or ["no image"]), 1)
    gate_col = len(stain_names) + 1
    # the collagen stain relative to each slide's collagen level (darker batches read alike)
    fallback_od = apply_references(images, stain_names)
    rows = cross_validate(images, kind=model, gate_col=gate_col)
    header: dict[str, Any] = {
        "settings": {"scales_um": list(DEFAULT_SCALES_UM), "model": model,
                     "reference": REFERENCE, "reference_fallback_od": fallback_od,
                     "max_train_px": max_pixels, "stain": settings.stains.stain.value,
                     "analysis_settings": settings.measurement_dict()},
        "features": feature_names(stain_names, DEFAULT_SCALES_UM),
        "stain_names": list(stain_names),
        "training": {"images": [im.provenance for im in images],
                     "pixels": int(sum(len(im.labels) for im in images)),
                     "collagen_pixels": int(sum(int(im.labels.sum()) for im in images))},
        "cross_validation": rows,
    }
    try:
        clf = fit(images, kind=model, header=header, gate_col=gate_col)
        digest = save(clf, out_file)
    except (ClassifierError, OSError) as exc:
        raise fail(str(exc), 2) from None
    dice = [r["dice"] for r in rows if math.isfinite(r["dice"])]
    errs = [abs(r["error_pp"]) for r in rows if math.isfinite(r["error_pp"])]
    summary = {"classifier": str(out_file), "sha256": digest, "images": len(images),
               "failed": failed, "warnings": warns, "cross_validation": rows,
               "cv_dice_vs_majority_mean": sum(dice) / len(dice) if dice else math.nan,
               "cv_cpa_mae_pp": sum(errs) / len(errs) if errs else math.nan}
    if as_json:
        out.print_json(standard_json(summary))
        raise typer.Exit(1 if failed else 0)
    for w in warns:
        err.print(f"[yellow]warning: {w}[/]", markup=True, soft_wrap=True)
    out.print(f"trained on {len(images)} image(s), {header['training']['pixels']} pixels "
              f"({header['training']['collagen_pixels']} collagen); model {model}")
    if rows:
        out.print("leave-one-image-out (each image by a classifier trained on the others):")
        for r in rows:
            out.print(f"  {r['image']}: Dice vs majority {_num(r['dice'])}, collagen % "
                      f"{_num(r['test_cpa_percent'])} vs {_num(r['reference_cpa_percent'])} "
                      f"({_num(r['error_pp'])} pp)", soft_wrap=True)
        out.print(f"mean Dice {_num(summary['cv_dice_vs_majority_mean'])}, collagen % MAE "
                  f"{_num(summary['cv_cpa_mae_pp'])} pp (estimated on up to 100,000 random "
                  "scored pixels per image)")
    else:
        out.print("no leave-one-image-out estimate (needs two or more images with both classes)")
    out.print(f"written: {out_file} (sha256 {digest})")
    raise typer.Exit(1 if failed else 0)
