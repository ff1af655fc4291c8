"""Additive per-tile counts and the per-slide result derived from them.

Tiles are measured independently and their :class:`TileCounts` added; areas, CPA and mean OD are
computed once from the totals (:meth:`SlideResult.from_counts`), never by averaging ratios, so any
tiling gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TileCounts:
    """Pixel sums of one tile (or of many, once added).

    Attributes
    ----------
    tissue_px : int
        Countable tissue pixels (capsule, lumens, folds, bubbles removed).
    collagen_px : int
        Collagen pixels within countable tissue.
    collagen_od_sum : float
        Sum of the collagen stain concentration (OD units) over collagen pixels.
    capsule_px, lumen_px, fold_px, wall_px, unfocused_px, bubble_px : int
        Excluded pixels of each kind.
    """

    tissue_px: int = 0
    collagen_px: int = 0
    collagen_od_sum: float = 0.0
    capsule_px: int = 0
    lumen_px: int = 0
    fold_px: int = 0
    wall_px: int = 0
    unfocused_px: int = 0
    bubble_px: int = 0

    def __add__(self, other: TileCounts) -> TileCounts:
        if not isinstance(other, TileCounts):
            return NotImplemented
        return TileCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: object) -> TileCounts:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented


def _mm2(px: int, mpp: float) -> float:
    return px * mpp * mpp / 1e6


@dataclass(frozen=True)
class Measurements:
    """Areas and CPA of a slide, in physical units."""

    tissue_area_mm2: float
    collagen_area_mm2: float
    cpa_percent: float
    collagen_od_mean: float
    capsule_area_mm2: float
    lumen_area_mm2: float
    fold_area_mm2: float
    vessel_wall_area_mm2: float
    unfocused_area_mm2: float
    bubble_area_mm2: float

    @classmethod
    def from_counts(cls, counts: TileCounts, mpp: float) -> Measurements:
        """Derive areas (mm²), CPA (%) and mean collagen OD from summed counts.

        Parameters
        ----------
        counts : TileCounts
            Totals over the slide.
        mpp : float
            µm per pixel at which the counts were made.
        """
        cpa = 100.0 * counts.collagen_px / counts.tissue_px if counts.tissue_px else float("nan")
        od = counts.collagen_od_sum / counts.collagen_px if counts.collagen_px else float("nan")
        return cls(
            tissue_area_mm2=_mm2(counts.tissue_px, mpp),
            collagen_area_mm2=_mm2(counts.collagen_px, mpp),
            cpa_percent=cpa,
            collagen_od_mean=od,
            capsule_area_mm2=_mm2(counts.capsule_px, mpp),
            lumen_area_mm2=_mm2(counts.lumen_px, mpp),
            fold_area_mm2=_mm2(counts.fold_px, mpp),
            vessel_wall_area_mm2=_mm2(counts.wall_px, mpp),
            unfocused_area_mm2=_mm2(counts.unfocused_px, mpp),
            bubble_area_mm2=_mm2(counts.bubble_px, mpp),
        )
