"""Additive per-tile counts, and the typed result of one slide.

Tiles are measured independently and their :class:`TileCounts` added; areas, CPA and mean OD are
computed once from the totals (:meth:`Measurements.from_counts`), never by averaging ratios.
:class:`SlideResult` holds everything measured on a slide; :meth:`SlideResult.to_record` is its
flat row of ``slides.csv``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from fibroquant.confidence import qc_flags

if TYPE_CHECKING:  # types only: these modules sit above this one
    from fibroquant.collagen import CollagenThreshold
    from fibroquant.stains import StainEstimate
    from fibroquant.tiles import Geometry


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


@dataclass(frozen=True)
class SlideQC:
    """Quality figures of a slide's optics and stains (columns of ``slides.csv``).

    Attributes
    ----------
    glass_od : float
        Summed OD above which a thumbnail pixel is tissue.
    shading_od : float
        Range of the uneven illumination corrected, OD (0 = none).
    channel_shift_px : float
        Largest colour-plane misregistration corrected, level-0 pixels (0 = none).
    background_rgb : tuple of 3 float
        Glass intensity (R, G, B) of the optical density.
    background_source : str
        ``glass``, ``brightest``, ``default`` or ``config``.
    stain_angle_deg : float
        Angle of the slide's collagen-stain vector from the preset's, degrees.
    blob_max_area_um2 : float
        Compact blobs up to this area were not collagen (0 = off), µm².
    stain_fit : dict of str to float
        :func:`fibroquant.stains.stain_fit` residuals of the thumbnail's tissue.
    stain_guess : str
        The protocol those colours show (:func:`fibroquant.stains.stain_verdict`).
    wrong_stain : bool
        Another protocol fits clearly better than the one measured as (status
        ``wrong-stain`` in the tables).
    pale_counterstain : bool
        The collagen levels were taken by intensity (a ``qc_flags`` entry).
    """

    glass_od: float
    shading_od: float
    channel_shift_px: float
    background_rgb: tuple[float, float, float]
    background_source: str
    stain_angle_deg: float
    blob_max_area_um2: float
    stain_fit: dict[str, float]
    stain_guess: str = "unknown"
    wrong_stain: bool = False
    pale_counterstain: bool = False


@dataclass(frozen=True)
class SlideResult:
    """Everything measured on one slide (:func:`fibroquant.analyze`).

    Attributes
    ----------
    stain : str
        The protocol the slide was measured as (``sirius-red`` or ``masson``).
    format : str
        The reader's name of the file format.
    mpp : float
        Level-0 µm per pixel.
    geometry : Geometry
        Pyramid level, analysis resolution and size, mask resolution.
    measurements : Measurements
        Areas (mm²), CPA (%) and mean collagen OD.
    stains : StainEstimate
        The slide's stain vectors and their quality figures.
    threshold : CollagenThreshold
        The collagen threshold, its levels and share guard.
    qc : SlideQC
    warnings : tuple of str
        Plain-language stain and calibration warnings.
    seconds : float
        Wall time of the analysis.
    version : str
        fibroquant version that measured it.
    collagen_mask, tissue_mask, excluded_mask : ndarray of bool
        At ``geometry.mask_mpp`` (excluded: lumens, folds, bubbles, capsule, walls, blur).
    thumbnail : ndarray of uint8
        RGB image of the slide at ``mask_mpp`` or coarser, for QC overlays.
    flags : ndarray of uint8
        Low-resolution class bits (``kernels.FLAG_*``) that tell the QC overlay's exclusions
        apart.
    traits : dict of str to float
        Fibre-architecture columns (:mod:`fibroquant.traits`; empty when off).
    classifier : str
        The pixel classifier that decided collagen, ``NAME#SHA256-16`` (see
        :func:`fibroquant.classifier.classifier_label`); empty for the collagen threshold.
    """

    stain: str
    format: str
    mpp: float
    geometry: Geometry
    measurements: Measurements
    stains: StainEstimate
    threshold: CollagenThreshold
    qc: SlideQC
    warnings: tuple[str, ...]
    seconds: float
    version: str
    collagen_mask: np.ndarray = field(repr=False)
    tissue_mask: np.ndarray = field(repr=False)
    excluded_mask: np.ndarray = field(repr=False)
    thumbnail: np.ndarray = field(repr=False)
    flags: np.ndarray = field(repr=False)
    traits: dict[str, Any] = field(default_factory=dict)
    classifier: str = ""

    @property
    def mask_mpp(self) -> float:
        """µm per pixel of the masks."""
        return self.geometry.mask_mpp

    def to_record(self) -> dict[str, Any]:
        """The flat row of ``slides.csv`` (without the sample-sheet columns): plain numbers and
        strings, the stain vectors, angles and fit as JSON text."""
        g, t, qc, est = self.geometry, self.threshold, self.qc, self.stains
        record = {
            "status": "ok",
            "error": "",
            "stain": self.stain,
            "format": self.format,
            "mpp": self.mpp,
            "analysis_mpp": g.analysis_mpp,
            "level": g.level,
            "width_px": g.width,
            "height_px": g.height,
            "mask_mpp": g.mask_mpp,
            **asdict(self.measurements),
            "glass_od": qc.glass_od,
            "shading_od": qc.shading_od,
            "channel_shift_px": qc.channel_shift_px,
            "background_rgb": json.dumps([round(b, 1) for b in qc.background_rgb]),
            "background_source": qc.background_source,
            "stain_source": est.source,
            "stain_vectors": json.dumps(est.stains.to_dict()),
            "stain_angle_deg": qc.stain_angle_deg,
            "stain_angles_deg": json.dumps(est.angles_deg),
            "collagen_od_share": est.od_share.get(est.stains.collagen, 0.0),
            # what decided collagen: the threshold's scale, or the trained classifier
            "threshold_method": "classifier" if self.classifier else t.method,
            "classifier": self.classifier,
            "threshold_od": t.threshold_od,
            "parenchyma_od": t.parenchyma_od,
            "collagen_level_od": t.collagen_level_od,
            "share_guard": t.share_guard,
            "parenchyma_share": t.parenchyma_share,
            "blob_max_area_um2": qc.blob_max_area_um2,
            "stain_fit": json.dumps(qc.stain_fit),
            "stain_guess": qc.stain_guess,
            "wrong_stain": qc.wrong_stain,
            "stain_warning": "; ".join(self.warnings),
            "seconds": self.seconds,
            "version": self.version,
            **self.traits,
        }
        record["qc_flags"] = "; ".join(qc_flags(record, pale_counterstain=qc.pale_counterstain))
        return record
