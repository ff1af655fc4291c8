"""Additive per-tile counts, and the typed result of one slide.

Tiles are measured independently and their :class:`TileCounts` added; areas, CPA and mean OD are
computed once from the totals (:meth:`Measurements.from_counts`), never by averaging ratios.
:class:`SlideResult` holds everything measured on a slide; :meth:`SlideResult.to_record` is its
flat row of ``slides.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fibroquant import exclusions
from fibroquant.confidence import qc_flags
from fibroquant.exclusions import BAND, TILES, WALL, by_rule

if TYPE_CHECKING:  # types only: these modules sit above this one
    from fibroquant.bitmask import BitMask
    from fibroquant.collagen import CollagenThreshold
    from fibroquant.stains import StainEstimate
    from fibroquant.tiles import Geometry
    from fibroquant.traits import VesselCall


@dataclass(frozen=True)
class TileCounts:
    """Pixel sums of one tile (or of many, once added).

    Attributes
    ----------
    tissue_px : int
        Countable tissue pixels (every excluded class removed).
    collagen_px : int
        Collagen pixels within countable tissue.
    collagen_od_sum : float
        Sum of the collagen stain concentration (OD units) over collagen pixels.
    excluded_px : mapping of str to int
        Excluded pixels of each class (:data:`fibroquant.exclusions.CLASSES`), by key; a
        class not there has none.
    """

    tissue_px: int = 0
    collagen_px: int = 0
    collagen_od_sum: float = 0.0
    excluded_px: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_named(cls, counts: Mapping[str, int], collagen_od_sum: float) -> TileCounts:
        """From a tile's counts named ``tissue_px``, ``collagen_px`` and ``KEY_px`` per
        excluded class (:func:`fibroquant.kernels.fused_counts`)."""
        return cls(counts["tissue_px"], counts["collagen_px"], collagen_od_sum,
                   {c.key: counts[c.count] for c in exclusions.CLASSES if c.count in counts})

    def out_of_focus(self) -> TileCounts:
        """The tile left out as unfocused: its tissue, capsule and walls become the
        ``tiles`` class (:data:`fibroquant.exclusions.TILES`), the areas excluded whatever
        the pixel stay theirs; no collagen."""
        moved = self.tissue_px + sum(self.excluded_px.get(c.key, 0) for c in (BAND, WALL))
        kept = {c.key: self.excluded_px[c.key] for c in by_rule("area")
                if c.key in self.excluded_px}
        return TileCounts(excluded_px={**kept, TILES.key: moved})

    def __add__(self, other: TileCounts) -> TileCounts:
        if not isinstance(other, TileCounts):
            return NotImplemented
        keys = dict.fromkeys([*self.excluded_px, *other.excluded_px])
        return TileCounts(
            self.tissue_px + other.tissue_px, self.collagen_px + other.collagen_px,
            self.collagen_od_sum + other.collagen_od_sum,
            {k: self.excluded_px.get(k, 0) + other.excluded_px.get(k, 0) for k in keys})

    def __radd__(self, other: object) -> TileCounts:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented


def _mm2(px: int, mpp: float) -> float:
    return px * mpp * mpp / 1e6


@dataclass(frozen=True)
class Measurements:
    """Areas and CPA of a slide, in physical units.

    Attributes
    ----------
    tissue_area_mm2, collagen_area_mm2 : float
    cpa_percent : float
    collagen_od_mean : float
        Mean collagen-stain concentration over collagen pixels, OD.
    excluded_area_mm2 : dict of str to float
        Area of every excluded class by its column (``capsule_area_mm2``...), in
        :data:`fibroquant.exclusions.CLASSES` order; also read as attributes
        (``measurements.fold_area_mm2``).
    """

    tissue_area_mm2: float
    collagen_area_mm2: float
    cpa_percent: float
    collagen_od_mean: float
    excluded_area_mm2: dict[str, float] = field(default_factory=dict)

    def __getattr__(self, name: str) -> float:
        # an excluded class's column read as an attribute (only called for unknown names)
        try:
            return self.__dict__["excluded_area_mm2"][name]
        except KeyError:
            msg = f"{type(self).__name__!r} object has no attribute {name!r}"
            raise AttributeError(msg) from None

    def columns(self) -> dict[str, float]:
        """The measurement columns of ``slides.csv``, in their order."""
        return {"tissue_area_mm2": self.tissue_area_mm2,
                "collagen_area_mm2": self.collagen_area_mm2, "cpa_percent": self.cpa_percent,
                "collagen_od_mean": self.collagen_od_mean, **self.excluded_area_mm2}

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
            excluded_area_mm2={c.column: _mm2(counts.excluded_px.get(c.key, 0), mpp)
                               for c in exclusions.CLASSES},
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
    collagen_bits, tissue_bits, excluded_bits : BitMask
        The masks at ``geometry.mask_mpp``, held as bits (excluded: lumens, folds, bubbles,
        capsule, walls, blur); ``collagen_mask``, ``tissue_mask`` and ``excluded_mask`` unpack
        them (bool ndarrays, a new copy on every access).
    thumbnail : ndarray of uint8
        RGB image of the slide at ``mask_mpp`` or coarser, for QC overlays (empty when it was
        handed to ``analyze_slide``'s ``masks_ready``).
    flags : ndarray of uint8
        Low-resolution class bits (:func:`fibroquant.tiles.class_flags`) that tell the QC
        overlay's exclusions apart.
    traits : dict of str to float
        Fibre-architecture columns (:mod:`fibroquant.traits`; empty when off).
    classifier : str
        The pixel classifier that decided collagen, ``NAME#SHA256-16`` (see
        :func:`fibroquant.classifier.classifier_label`); empty for the collagen threshold.
    vessels : tuple of fibroquant.traits.VesselCall
        The traits' call on each lumen (portal, central, undecided, unlined), drawn on the QC
        overlay; empty without traits.
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
    collagen_bits: BitMask = field(repr=False)
    tissue_bits: BitMask = field(repr=False)
    excluded_bits: BitMask = field(repr=False)
    thumbnail: np.ndarray = field(repr=False)
    flags: np.ndarray = field(repr=False)
    traits: dict[str, Any] = field(default_factory=dict)
    classifier: str = ""
    vessels: tuple[VesselCall, ...] = field(default=(), repr=False)

    @property
    def mask_mpp(self) -> float:
        """µm per pixel of the masks."""
        return self.geometry.mask_mpp

    @property
    def collagen_mask(self) -> np.ndarray:
        """Collagen (bool, at ``mask_mpp``), unpacked from ``collagen_bits``."""
        return self.collagen_bits.unpack()

    @property
    def tissue_mask(self) -> np.ndarray:
        """Countable tissue (bool, at ``mask_mpp``), unpacked from ``tissue_bits``."""
        return self.tissue_bits.unpack()

    @property
    def excluded_mask(self) -> np.ndarray:
        """Excluded tissue (bool, at ``mask_mpp``), unpacked from ``excluded_bits``."""
        return self.excluded_bits.unpack()

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
            **self.measurements.columns(),
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
