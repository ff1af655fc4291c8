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
from typing import Any

import numpy as np

from fibroquant.annotations import Annotation

__all__ = [
    "PixelCounts",
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
        ``n``; ``bias_pp`` (mean of test − reference) and ``loa_low_pp`` / ``loa_high_pp``
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


def _nanmean(values: Sequence[float]) -> float:
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
