"""Agreement of collagen masks with people's annotations, and of collagen % across images.

Pixel agreement (:func:`pixel_counts`, :func:`dice`, :func:`iou`) is counted on the pixels a
person labelled inside a scored region; the people's majority (:func:`majority`) is the
strict majority vote of those who labelled a pixel. Agreement of collagen % across images
(:func:`concordance`) gives the Bland-Altman bias and 95 % limits of agreement, ICC(2,1)
(Shrout & Fleiss 1979: two-way random effects, absolute agreement, one rater), Lin's
concordance correlation coefficient (Lin 1989) and Pearson / Spearman r.

All functions here are pure; :mod:`fibroquant.cli_agree` reads a run's masks and writes the
tables, plots and report section.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fibroquant.annotations import Annotation, AnnotationError, resample_nearest

__all__ = [
    "PixelCounts",
    "RunAgreement",
    "agree_run",
    "concordance",
    "dice",
    "icc2_1",
    "image_agreement",
    "iou",
    "lins_ccc",
    "majority",
    "pixel_counts",
    "summarise",
]


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of a test mask against a reference on the scored pixels (sums only).

    ``tp`` both collagen, ``fp`` test only, ``fn`` reference only, ``n`` scored pixels.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    n: int = 0

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                           self.n + other.n)

    @property
    def dice(self) -> float:
        """2TP / (2TP + FP + FN); NaN when neither mask has collagen."""
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else math.nan

    @property
    def iou(self) -> float:
        """TP / (TP + FP + FN) (Jaccard); NaN when neither mask has collagen."""
        d = self.tp + self.fp + self.fn
        return self.tp / d if d else math.nan

    @property
    def test_percent(self) -> float:
        """Collagen % of the scored pixels by the test mask."""
        return 100.0 * (self.tp + self.fp) / self.n if self.n else math.nan

    @property
    def reference_percent(self) -> float:
        """Collagen % of the scored pixels by the reference."""
        return 100.0 * (self.tp + self.fn) / self.n if self.n else math.nan


def pixel_counts(test: np.ndarray, reference: np.ndarray, scored: np.ndarray) -> PixelCounts:
    """Confusion counts of two bool masks over the ``scored`` pixels (all the same shape)."""
    t = np.asarray(test, bool) & scored
    r = np.asarray(reference, bool) & scored
    tp = int(np.count_nonzero(t & r))
    return PixelCounts(tp, int(np.count_nonzero(t)) - tp, int(np.count_nonzero(r)) - tp,
                       int(np.count_nonzero(scored)))


def dice(test: np.ndarray, reference: np.ndarray, scored: np.ndarray | None = None) -> float:
    """Dice coefficient of two bool masks (over ``scored`` pixels, default all)."""
    scored = np.ones(np.shape(test), bool) if scored is None else scored
    return pixel_counts(test, reference, scored).dice


def iou(test: np.ndarray, reference: np.ndarray, scored: np.ndarray | None = None) -> float:
    """Intersection over union (Jaccard) of two bool masks (over ``scored`` pixels)."""
    scored = np.ones(np.shape(test), bool) if scored is None else scored
    return pixel_counts(test, reference, scored).iou


def majority(annotations: Sequence[Annotation]) -> tuple[np.ndarray, np.ndarray]:
    """The people's majority: ``(collagen, labelled)`` bool masks.

    A pixel is labelled when more than half of the people labelled it, and collagen when more
    than half of those who labelled it say so (a tie is not collagen). All annotations must
    share one grid.
    """
    n = len(annotations)
    if n == 0:
        msg = "majority needs at least one annotation"
        raise ValueError(msg)
    votes = np.zeros(annotations[0].shape, np.uint16)
    labellers = np.zeros(annotations[0].shape, np.uint16)
    for a in annotations:
        votes += a.collagen & a.labelled
        labellers += a.labelled
    labelled = 2 * labellers > n
    return labelled & (2 * votes > labellers), labelled


def _region(annotations: Sequence[Annotation], tool_tissue: np.ndarray) -> tuple[np.ndarray, str]:
    """Scored region: the people's drawn tissue (majority) if all drew it, else the tool's."""
    drawn = [a.tissue for a in annotations if a.tissue is not None]
    if drawn and len(drawn) == len(annotations):
        count = np.sum(drawn, axis=0)
        return 2 * count > len(drawn), "drawn tissue"
    return tool_tissue, "tool tissue"


def image_agreement(
    stem: str, tool_collagen: np.ndarray, tool_tissue: np.ndarray,
    annotations: Sequence[Annotation],
) -> tuple[list[dict[str, Any]], dict[str, PixelCounts]]:
    """Agreement rows of one image: the tool against each person and their majority, and the
    people pairwise.

    Parameters
    ----------
    stem : str
    tool_collagen, tool_tissue : ndarray of bool
        The tool's masks on the annotations' grid.
    annotations : sequence of Annotation
        One per person, on that grid.

    Returns
    -------
    rows : list of dict
        ``agreement.csv`` rows (``kind`` = ``tool_vs_person``, ``tool_vs_majority``,
        ``person_vs_person``).
    counts : dict
        Pixel counts by reference (``person``, ``majority``, ``A~B``), to pool across images.

    Notes
    -----
    The tool is scored on each person's labelled pixels inside the person's drawn tissue, or
    inside the tool's tissue where the person drew none. People are compared on the pixels
    both labelled (inside any tissue they drew), as an independent comparison of two masks
    would; ``dice_in_tool_tissue`` restricts that to the tool's tissue.
    """
    rows: list[dict[str, Any]] = []
    counts: dict[str, PixelCounts] = {}

    def row(kind: str, ref: str, c: PixelCounts, region: str, dense: bool,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"image": stem, "kind": kind, "reference": ref, "dice": c.dice, "iou": c.iou,
                "test_cpa_percent": c.test_percent, "reference_cpa_percent": c.reference_percent,
                "error_pp": c.test_percent - c.reference_percent, "scored_px": c.n,
                "scored_region": region, "dense": dense, **(extra or {})}

    for a in annotations:
        region = a.tissue if a.tissue is not None else tool_tissue
        c = pixel_counts(tool_collagen, a.collagen, a.labelled & region)
        counts[a.person] = c
        rows.append(row("tool_vs_person", a.person, c,
                        "drawn tissue" if a.tissue is not None else "tool tissue", a.dense))
    if len(annotations) > 1:
        maj, maj_labelled = majority(annotations)
        region, where = _region(annotations, tool_tissue)
        c = pixel_counts(tool_collagen, maj, maj_labelled & region)
        counts["majority"] = c
        rows.append(row("tool_vs_majority", "majority", c, where,
                        all(a.dense for a in annotations)))
        for a, b in itertools.combinations(annotations, 2):
            both = a.labelled & b.labelled
            c = pixel_counts(a.collagen, b.collagen, both)
            inside = pixel_counts(a.collagen, b.collagen, both & tool_tissue)
            key = f"{a.person}~{b.person}"
            counts[key] = c
            rows.append(row("person_vs_person", key, c, "both labelled", a.dense and b.dense,
                            {"dice_in_tool_tissue": inside.dice}))
    return rows, counts


def icc2_1(ratings: np.ndarray) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single rater.

    Parameters
    ----------
    ratings : ndarray, shape (n_targets, k_raters)

    Returns
    -------
    float
        ``(MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n)``; NaN for fewer than two
        targets or zero variance.

    References
    ----------
    Shrout P.E., Fleiss J.L. (1979) Intraclass correlations: uses in assessing rater
    reliability. Psychol Bull 86:420-428.
    """
    x = np.asarray(ratings, np.float64)
    n, k = x.shape
    if n < 2 or k < 2:
        return math.nan
    grand = x.mean()
    ss_rows = k * np.sum((x.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((x.mean(axis=0) - grand) ** 2)
    ss_err = np.sum((x - grand) ** 2) - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    denom = msr + (k - 1) * mse + k * (msc - mse) / n
    return float((msr - mse) / denom) if denom > 0 else math.nan


def lins_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient of two measurements of the same targets.

    ``2 s_xy / (s_x² + s_y² + (mean_x - mean_y)²)`` with population (1/n) moments, as in
    Lin (1989), Biometrics 45:255-268. NaN for fewer than two targets.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if len(x) < 2:
        return math.nan
    sxy = np.mean((x - x.mean()) * (y - y.mean()))
    denom = x.var() + y.var() + (x.mean() - y.mean()) ** 2
    return float(2 * sxy / denom) if denom > 0 else math.nan


def concordance(test: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Agreement of two measurements of collagen % across images.

    Returns
    -------
    dict
        ``n``; ``bias_pp`` (mean of test - reference) and ``loa_low_pp`` / ``loa_high_pp``
        (bias ∓ 1.96 SD of the differences, sample SD: Bland & Altman 1986); ``mae_pp``;
        ``icc2_1``; ``lin_ccc``; ``pearson_r``; ``spearman_r`` (NaN where undefined).
    """
    from scipy import stats

    x = np.asarray(test, np.float64)
    y = np.asarray(reference, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    out: dict[str, float] = {"n": float(n)}
    d = x - y
    bias = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    out.update(bias_pp=bias, loa_low_pp=bias - 1.96 * sd, loa_high_pp=bias + 1.96 * sd,
               mae_pp=float(np.abs(d).mean()) if n else math.nan,
               icc2_1=icc2_1(np.column_stack([x, y])), lin_ccc=lins_ccc(x, y))
    varied = n > 2 and np.ptp(x) > 0 and np.ptp(y) > 0
    out["pearson_r"] = float(stats.pearsonr(x, y).statistic) if varied else math.nan
    out["spearman_r"] = float(stats.spearmanr(x, y).statistic) if varied else math.nan
    return out


def _nanmean(values: Sequence[float | None]) -> float:
    arr = np.asarray([v for v in values if v is not None], np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def summarise(rows: Sequence[Mapping[str, Any]],
              pooled: Mapping[str, PixelCounts]) -> dict[str, Any]:
    """Overall figures from the per-image rows and the pixel counts pooled over images.

    Returns
    -------
    dict
        ``dice_vs_majority_mean`` (mean over images of the tool's Dice against the majority;
        against the one person when there is only one), ``people_pairwise_dice_mean`` (mean
        over images and pairs), ``dice_vs_person_mean`` by person, pooled Dice / IoU by
        reference, and :func:`concordance` of collagen % against each reference.
    """
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_kind.setdefault(str(r["kind"]), []).append(r)
    people = sorted({str(r["reference"]) for r in by_kind.get("tool_vs_person", [])})
    maj_rows = by_kind.get("tool_vs_majority") or by_kind.get("tool_vs_person", [])
    out: dict[str, Any] = {
        "images": len({r["image"] for r in rows}),
        "people": people,
        "dice_vs_majority_mean": _nanmean([r["dice"] for r in maj_rows]),
        "iou_vs_majority_mean": _nanmean([r["iou"] for r in maj_rows]),
        "people_pairwise_dice_mean": _nanmean(
            [r["dice"] for r in by_kind.get("person_vs_person", [])]),
        "people_pairwise_dice_in_tool_tissue_mean": _nanmean(
            [r.get("dice_in_tool_tissue", math.nan) for r in by_kind.get("person_vs_person", [])]),
        "dice_vs_person_mean": {
            p: _nanmean([r["dice"] for r in by_kind.get("tool_vs_person", [])
                         if r["reference"] == p]) for p in people},
        "pooled": {k: {"dice": c.dice, "iou": c.iou, "scored_px": c.n} for k, c in pooled.items()},
    }
    conc: dict[str, dict[str, float]] = {}
    for ref in [*people, "majority"]:
        sel = [r for r in rows if r["reference"] == ref and r["kind"] != "person_vs_person"]
        if sel:
            conc[ref] = concordance(np.array([r["test_cpa_percent"] for r in sel]),
                                    np.array([r["reference_cpa_percent"] for r in sel]))
    out["cpa_agreement"] = conc
    return out


# --- a run's masks against an annotation folder (I/O) --------------------------------------

#: Largest full-resolution grid (pixels) GeoJSON is rasterised on; beyond it, the tool's grid.
MAX_GRID_PX = 64_000_000


@dataclass
class RunAgreement:
    """Everything ``fibroquant agree`` computes for one output folder."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    notes: list[str]
    skipped: list[str]
    annotations_dir: Path | None = None
    annotation_files: dict[str, dict[str, Path]] | None = None


def _run_slides(out_dir: Path) -> list[dict[str, Any]]:
    import pandas as pd

    from fibroquant.tasks import output_stems

    table = out_dir / "slides.csv"
    if not table.is_file():
        msg = f"{table}: not found (is {out_dir} a fibroquant output folder?)"
        raise AnnotationError(msg)
    frame = pd.read_csv(table)
    frame = frame[frame["status"] == "ok"]
    stems = output_stems(frame["slide"].astype(str).tolist())
    records = [{str(k): v for k, v in rec.items()} for rec in frame.to_dict("records")]
    for rec in records:
        rec["stem"] = stems[str(rec["slide"])]
    return records


def _read_tool_mask(path: Path) -> np.ndarray:
    buf = np.fromfile(path, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if buf.size else None
    if img is None:
        msg = f"{path}: not a readable mask PNG"
        raise AnnotationError(msg)
    return img > 0


def _full_shape(rec: Mapping[str, Any]) -> tuple[int, int]:
    """Full-resolution (level-0) size of a measured slide from its ``slides.csv`` row."""
    f = float(rec["analysis_mpp"]) / float(rec["mpp"])
    return round(float(rec["height_px"]) * f), round(float(rec["width_px"]) * f)


def image_annotations(
    files: Mapping[str, Path], stem: str, full_shape: tuple[int, int],
    fallback_shape: tuple[int, int],
) -> tuple[list[Annotation], str]:
    """Read one image's annotations onto one grid; returns them and how the grid was chosen.

    Mask images fix the grid (the largest of them; others are resampled to it by nearest
    neighbour); GeoJSON alone is rasterised at full resolution, or on ``fallback_shape``
    (the tool's mask grid) when that would exceed :data:`MAX_GRID_PX`.
    """
    from fibroquant.annotations import GEOJSON_SUFFIXES, read_annotation

    masks = {p: f for p, f in files.items() if f.suffix.lower() not in GEOJSON_SUFFIXES}
    read = {p: read_annotation(f, person=p, stem=stem) for p, f in masks.items()}
    if read:
        grid = max((a.shape for a in read.values()), key=lambda s: s[0] * s[1])
        how = "the annotations' grid"
    elif full_shape[0] * full_shape[1] <= MAX_GRID_PX:
        grid, how = full_shape, "full resolution"
    else:
        grid, how = fallback_shape, "the tool's mask grid"
    scale = full_shape[1] / grid[1]
    for p, f in files.items():
        if p not in read:
            read[p] = read_annotation(f, shape=grid, scale=scale, person=p, stem=stem)
    return [read[p].resampled(grid) for p in sorted(read)], how


def agree_run(out_dir: str | Path, annotations_dir: str | Path) -> RunAgreement:
    """Compare a run's collagen masks (``masks/STEM.collagen.png``) with people's annotations.

    Raises
    ------
    AnnotationError
        No ``slides.csv``, no mask written by the run (``--masks``), no annotation matching
        a measured slide, or an unreadable annotation.
    """
    from fibroquant.annotations import discover
    from fibroquant.tasks import output_files

    out_dir = Path(out_dir)
    records = _run_slides(out_dir)
    by_stem = {r["stem"]: r for r in records}
    found = discover(annotations_dir, list(by_stem))
    if not found:
        msg = (f"{annotations_dir}: no annotation file is named after a measured slide of "
               f"{out_dir} (expected e.g. {next(iter(by_stem), 'STEM')}.png)")
        raise AnnotationError(msg)
    rows: list[dict[str, Any]] = []
    pooled: dict[str, PixelCounts] = {}
    notes: list[str] = []
    skipped: list[str] = []
    grids: set[str] = set()
    for stem, files in found.items():
        rec = by_stem[stem]
        paths = output_files(out_dir, stem, ("collagen", "tissue"))
        if not paths["collagen"].is_file() or not paths["tissue"].is_file():
            skipped.append(f"{stem}: no masks in {out_dir / 'masks'} (analyze with --masks)")
            continue
        tool_col = _read_tool_mask(paths["collagen"])
        tool_tis = _read_tool_mask(paths["tissue"])
        anns, how = image_annotations(files, stem, _full_shape(rec), tool_col.shape)
        grid = anns[0].shape
        grids.add(f"compared on {how} ({grid[0]}x{grid[1]} px); the tool's masks "
                  f"({tool_col.shape[0]}x{tool_col.shape[1]} px, {float(rec['mask_mpp']):g} "
                  "µm/px) resampled to it by nearest neighbour"
                  if grid != tool_col.shape else f"compared on the tool's mask grid, which is {how}")
        img_rows, counts = image_agreement(stem, resample_nearest(tool_col, grid),
                                           resample_nearest(tool_tis, grid), anns)
        rows += img_rows
        for k, c in counts.items():
            pooled[k] = pooled.get(k, PixelCounts()) + c
    if not rows:
        msg = "; ".join(skipped) or f"{out_dir}: nothing to compare"
        raise AnnotationError(msg)
    notes += sorted(grids)
    notes.append("scored inside the tool's tissue (masks/STEM.tissue.png) where the people "
                 "did not draw tissue; only the pixels each person labelled are scored; the "
                 "people are compared with each other on the pixels both labelled")
    unmatched = sorted(set(by_stem) - set(found))
    if unmatched:
        notes.append(f"{len(unmatched)} measured slide(s) without annotations: "
                     + ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else ""))
    scored = {stem: found[stem] for stem in dict.fromkeys(r["image"] for r in rows)}
    return RunAgreement(rows, summarise(rows, pooled), notes, skipped,
                        Path(annotations_dir), scored)


def _plots(rows: Sequence[Mapping[str, Any]], plot_dir: Path) -> list[Path]:
    """Bland-Altman and scatter plots of the tool's collagen % against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["kind"] == "tool_vs_majority"] or [
        r for r in rows if r["kind"] == "tool_vs_person"]
    if not sel:
        return []
    ref_name = "people's majority" if sel[0]["kind"] == "tool_vs_majority" else "annotation"
    x = np.array([r["test_cpa_percent"] for r in sel], np.float64)
    y = np.array([r["reference_cpa_percent"] for r in sel], np.float64)
    c = concordance(x, y)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    ax.scatter((x + y) / 2, x - y, s=18)
    for v, style in ((c["bias_pp"], "--"), (c["loa_low_pp"], ":"), (c["loa_high_pp"], ":")):
        if math.isfinite(v):
            ax.axhline(v, color="grey", linestyle=style, linewidth=1)
    ax.set_xlabel("mean collagen % (tool, reference)")
    ax.set_ylabel(f"tool - {ref_name} (pp)")
    ax.set_title(f"Bland-Altman: bias {c['bias_pp']:.2f} pp, "
                 f"limits {c['loa_low_pp']:.2f} to {c['loa_high_pp']:.2f}", fontsize=9)
    fig.tight_layout()
    paths.append(plot_dir / "agreement_bland_altman.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.scatter(y, x, s=18)
    top = float(np.nanmax(np.concatenate([x, y, [1.0]]))) * 1.05
    ax.plot([0, top], [0, top], color="grey", linewidth=1)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"{ref_name} collagen %")
    ax.set_ylabel("tool collagen %")
    ax.set_title(f"ICC(2,1) {c['icc2_1']:.3f}, Lin's CCC {c['lin_ccc']:.3f}", fontsize=9)
    fig.tight_layout()
    paths.append(plot_dir / "agreement_scatter.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def _fmt(v: Any) -> str:
    if v is None:  # NaN, as stored in standard JSON
        return "-"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def report_section(summary: Mapping[str, Any], notes: Sequence[str], plots: Sequence[Path],
                   stale: Sequence[str] = ()) -> str:
    """The report's agreement section (HTML, plots embedded); ``stale`` lists why the stored
    result no longer matches the run (shown as a warning above it)."""
    import base64
    import html

    s = summary
    lines = ['<section id="agreement"><h2>Agreement with annotations</h2>']
    if stale:
        lines.append('<p class="callout"><b>Stale:</b> since this agreement was computed, '
                     + html.escape("; ".join(stale))
                     + ". Run <code>fibroquant agree</code> again to update it.</p>")
    lines += [
        (f"<p>{s['images']} image(s), people: {html.escape(', '.join(s['people']))}. "
        f"Dice against the people's majority (mean over images): "
        f"<b>{_fmt(s['dice_vs_majority_mean'])}</b>; the people's own pairwise Dice: "
        f"<b>{_fmt(s['people_pairwise_dice_mean'])}</b>.</p>"),
        "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>",
        ('<div class="tablewrap">'
         "<table><tr><th>reference</th><th>n</th><th>bias pp</th><th>95 % limits pp</th>"
        "<th>MAE pp</th><th>ICC(2,1)</th><th>Lin's CCC</th><th>Pearson r</th>"
        "<th>Spearman r</th></tr>"),
    ]
    for ref, c in s["cpa_agreement"].items():
        lines.append(
            f"<tr><td>{html.escape(ref)}</td><td>{int(c['n'])}</td><td>{_fmt(c['bias_pp'])}</td>"
            f"<td>{_fmt(c['loa_low_pp'])} to {_fmt(c['loa_high_pp'])}</td>"
            f"<td>{_fmt(c['mae_pp'])}</td><td>{_fmt(c['icc2_1'])}</td>"
            f"<td>{_fmt(c['lin_ccc'])}</td><td>{_fmt(c['pearson_r'])}</td>"
            f"<td>{_fmt(c['spearman_r'])}</td></tr>")
    lines.append("</table></div><div>")
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        lines.append(f'<img alt="{html.escape(p.stem)}" style="max-width:100%" '
                     f'src="data:image/png;base64,{data}">')
    lines.append('</div><p class="note">Per image: <a href="agreement.csv">agreement.csv</a>; '
                 "the stored result: agreement_summary.json.</p></section>")
    return "\n".join(lines)


_START, _END = "<!-- fibroquant:agreement -->", "<!-- /fibroquant:agreement -->"


def insert_section(report_html: str, section: str) -> str:
    """The report with its agreement section replaced (or added before the settings)."""
    block = f"{_START}\n{section}\n{_END}"
    if _START in report_html and _END in report_html:
        head, _, rest = report_html.partition(_START)
        _, _, tail = rest.partition(_END)
        return head + block + tail
    for anchor in ('<section id="settings">', "</main>", "</body>"):
        if anchor in report_html:
            return report_html.replace(anchor, block + anchor, 1)
    return report_html + block


#: The stored result of ``fibroquant agree`` that every later report renders its section from.
AGREEMENT_JSON = "agreement_summary.json"
_PLOT_NAMES = ("agreement_bland_altman.png", "agreement_scatter.png")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def annotations_fingerprint(files: Mapping[str, Mapping[str, Path]]) -> str:
    """SHA-256 over the annotation files scored (``{stem: {person: path}}``): their images,
    people and contents, so that an edited, added or removed annotation changes it."""
    import hashlib

    h = hashlib.sha256()
    for stem in sorted(files):
        for person in sorted(files[stem]):
            h.update(f"{stem}\0{person}\0{_sha256(files[stem][person])}\n".encode())
    return h.hexdigest()


def measurement_keys(out_dir: Path, stems: Sequence[str]) -> dict[str, str]:
    """What ``agree`` scored of each image: SHA-256 of its collagen and tissue masks and its
    ``slides.csv`` CPA; a slide re-measured to another result changes its key ("" when the
    slide is no longer measured or its masks are gone)."""
    from fibroquant.tasks import output_files

    try:
        cpa = {r["stem"]: repr(float(r["cpa_percent"])) for r in _run_slides(out_dir)}
    except AnnotationError:
        cpa = {}
    keys = {}
    for stem in stems:
        paths = output_files(out_dir, stem, ("collagen", "tissue"))
        if stem not in cpa or not all(p.is_file() for p in paths.values()):
            keys[stem] = ""
            continue
        keys[stem] = (f"{_sha256(paths['collagen'])}:{_sha256(paths['tissue'])}:{cpa[stem]}")
    return keys


def stale_reasons(stored: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Why a stored agreement no longer describes ``out_dir`` (empty: it is current).

    The slides it scored must be unchanged (masks and CPA, see :func:`measurement_keys`) and
    its annotation files, when their folder is still there, identical.
    """
    from fibroquant.annotations import discover

    then = stored.get("measurements", {})
    now = measurement_keys(out_dir, list(then))
    changed = sorted(s for s in then if now.get(s) != then[s])
    reasons = []
    if changed:
        reasons.append(f"{len(changed)} of its {len(then)} slide(s) were re-measured to "
                       "another result or removed (" + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
                       + ")")
    folder = Path(str(stored.get("annotations_dir", "")))
    if stored.get("annotations_dir") and folder.is_dir():
        try:
            files = {k: v for k, v in discover(folder, list(then)).items() if k in then}
            same = annotations_fingerprint(files) == stored.get("annotations_sha256")
        except (AnnotationError, OSError):
            same = False
        if not same:
            reasons.append(f"the annotations in {folder} changed")
    return reasons


def stored_section(out_dir: str | Path) -> str | None:
    """The report section rendered from ``OUT_DIR/agreement_summary.json``, marked stale when
    the run or the annotations changed since; None when there is no (readable) stored result."""
    import json

    out_dir = Path(out_dir)
    try:
        stored = json.loads((out_dir / AGREEMENT_JSON).read_text(encoding="utf-8"))
        summary = stored["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    plots = [p for p in (out_dir / "plots" / n for n in _PLOT_NAMES) if p.is_file()]
    return report_section(summary, stored.get("notes", []), plots,
                          stale_reasons(stored, out_dir))


def refresh_report(out_dir: str | Path) -> bool:
    """Put the stored agreement section into ``OUT_DIR/report.html`` (atomically, only when it
    changed); called by ``agree`` and by every ``analyze``. Returns whether the report has one."""
    from fibroquant.outdir import atomic_write_text

    out_dir = Path(out_dir)
    report = out_dir / "report.html"
    section = stored_section(out_dir)
    if section is None or not report.is_file():
        return False
    text = report.read_text(encoding="utf-8")
    new = insert_section(text, section)
    if new != text:  # unchanged: leave the file (and its digest in the tables manifest) alone
        atomic_write_text(report, new)
    return True


def write_agreement(result: RunAgreement, out_dir: str | Path) -> list[Path]:
    """Write ``agreement.csv``, ``agreement_summary.json`` (the summary with the annotations'
    fingerprint and what it scored of each slide), the two plots and the report section
    (into an existing ``report.html``); returns the files written."""
    import pandas as pd

    from fibroquant.outdir import atomic_write_csv, atomic_write_text, standard_json

    out_dir = Path(out_dir)
    written = []
    table = out_dir / "agreement.csv"
    atomic_write_csv(table, pd.DataFrame(result.rows))
    written.append(table)
    files = result.annotation_files or {}
    stored = {**result.summary, "summary": result.summary, "notes": result.notes,
              "skipped": result.skipped,
              "annotations_dir": str(result.annotations_dir or ""),
              "annotations_sha256": annotations_fingerprint(files),
              "measurements": measurement_keys(out_dir, list(files))}
    summary = out_dir / AGREEMENT_JSON
    atomic_write_text(summary, standard_json(stored) + "\n")
    written.append(summary)
    written += _plots(result.rows, out_dir / "plots")
    if refresh_report(out_dir):
        written.append(out_dir / "report.html")
    return written
