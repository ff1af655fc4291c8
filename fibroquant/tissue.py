"""Tissue detection and exclusions, on a low-resolution image of the whole slide.

Tissue is what absorbs light: the summed optical density, smoothed, above a glass threshold.
Holes smaller than a lumen (sinusoids, fat vacuoles) stay tissue; larger unstained holes inside
the section are vessel lumens and are excluded; pieces smaller than a speck are dust. The band
along tissue/glass edges (never the frame of a microscope field) is where the Glisson capsule is
searched. Every size is in µm² and converted with the image's µm per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from fibroquant.collagen import gaussian_blur
from fibroquant.config import TissueSettings
from fibroquant.kernels import remove_small_holes_fast, remove_small_objects_fast
from fibroquant.stains import Vector, rgb_to_od


@dataclass(frozen=True)
class TissueMask:
    """Tissue and exclusion masks at one resolution (all bool, same shape).

    Attributes
    ----------
    mpp : float
        µm per pixel of the masks.
    section : ndarray of bool
        The section with its small holes filled (lumens still inside).
    tissue : ndarray of bool
        Countable tissue: section minus lumens and folds (capsule removed later, per pixel).
    lumen : ndarray of bool
        Large unstained holes inside the section.
    fold : ndarray of bool
        Folds (double-thickness tissue), excluded.
    capsule_band : ndarray of bool
        Tissue within the capsule width of the glass around the section (the search band); after
        :func:`with_capsule` only the edge-connected collagen region within it.
    vessel_wall : ndarray of bool
        Rings around large lumens when vessel walls are excluded (else all False).
    glass_od : float
        The summed-OD threshold used.
    """

    mpp: float
    section: np.ndarray
    tissue: np.ndarray
    lumen: np.ndarray
    fold: np.ndarray
    capsule_band: np.ndarray
    vessel_wall: np.ndarray
    glass_od: float

    def area_mm2(self, mask: np.ndarray) -> float:
        """Area of a mask in mm²."""
        return float(np.count_nonzero(mask)) * self.mpp**2 / 1e6


def _px(area_um2: float, mpp: float) -> int:
    return int(round(area_um2 / mpp**2))


def glass_threshold(od_sum: np.ndarray, settings: TissueSettings) -> float:
    """Summed-OD threshold between glass and tissue.

    Otsu's threshold of the smoothed summed OD, clipped to ``[glass_od_min, glass_od_max]``:
    with glass in view Otsu falls between glass (OD ≈ 0) and tissue and the clip keeps pale
    parenchyma; on a field covered by tissue Otsu would split the tissue, and the clip keeps the
    threshold near glass.
    """
    if settings.glass_od is not None:
        return float(settings.glass_od)
    sample = od_sum[:: max(1, od_sum.shape[0] // 1024), :: max(1, od_sum.shape[1] // 1024)]
    try:
        t = float(threshold_otsu(sample))
    except ValueError:  # a constant image
        t = settings.glass_od_max
    return float(np.clip(t, settings.glass_od_min, settings.glass_od_max))


def detect_tissue(
    rgb: np.ndarray, mpp: float, settings: TissueSettings, background_rgb: Vector
) -> TissueMask:
    """Find countable tissue, lumens and the capsule band.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        Low-resolution image of the whole slide.
    mpp : float
        µm per pixel of ``rgb``.
    settings : TissueSettings
    background_rgb : tuple of 3 float
        Glass intensity of the slide.

    Returns
    -------
    TissueMask
    """
    od_sum = rgb_to_od(rgb, background_rgb).sum(axis=-1)
    # a median keeps the tissue edge where it is (a Gaussian would push it into the glass)
    ksize = 5 if settings.smooth_um / mpp >= 1.5 else 3
    if min(od_sum.shape) >= ksize:
        od_sum = cv2.medianBlur(od_sum, ksize)
    t = glass_threshold(od_sum, settings)
    raw = od_sum > t
    # = skimage remove_small_objects(raw, max_size=_px(...) - 1) (4-connected), faster
    raw = remove_small_objects_fast(raw, _px(settings.min_tissue_area_um2, mpp), connectivity=1)
    # Holes below the lumen size (sinusoids, fat, nuclei-free gaps) are tissue.
    lumen_px = max(_px(settings.lumen_min_area_um2, mpp), 1)
    filled_small = remove_small_holes_fast(raw, lumen_px, connectivity=1)
    section = ndi.binary_fill_holes(filled_small)
    lumen = section & ~filled_small
    # Glass pockets cut by the image frame but otherwise enclosed by tissue, up to the size of
    # a large vessel, are lumens too (a vein at the edge of a microscope field), not outer glass.
    max_px = _px(settings.lumen_max_area_um2, mpp)
    outside, n = ndi.label(~section)
    if n:
        frame = np.zeros_like(section)
        frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = True
        sizes = np.bincount(outside.ravel(), minlength=n + 1)
        touches = np.bincount(outside[frame], minlength=n + 1) > 0
        pocket = (sizes >= lumen_px) & (sizes <= max_px) & touches
        pocket[0] = False
        if pocket.any() and section.any():
            extra = pocket[outside]
            lumen |= extra
            section |= extra
    fold = np.zeros_like(section)
    tissue = section & ~lumen
    band = np.zeros_like(section)
    if settings.exclude_capsule and settings.capsule_width_um > 0 and not section.all():
        # (a section filling the whole image has no glass edge: the band is empty)
        # distance to glass outside the section; the frame of the image is not glass
        padded = np.pad(section, 1, constant_values=True)
        dist = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
        band = tissue & (dist * mpp <= settings.capsule_width_um)
    wall = np.zeros_like(section)
    if settings.exclude_vessel_walls_above_um2 is not None and lumen.any():
        big = remove_small_objects_fast(
            lumen, _px(settings.exclude_vessel_walls_above_um2, mpp) + 1, connectivity=1
        )
        if big.any():
            dist_l = ndi.distance_transform_edt(~big)
            wall = tissue & (dist_l * mpp <= settings.vessel_wall_um)
    return TissueMask(mpp, section, tissue, lumen, fold, band, wall, t)


def with_capsule(tissue: TissueMask, collagen: np.ndarray) -> TissueMask:
    """Narrow the capsule band to the collagen that runs in from the section edge.

    The Glisson capsule is a collagen layer on the surface of the liver: collagen pixels of the
    band that are connected, through collagen within the band, to the tissue/glass edge. Septa
    reaching the surface lose only their last ``capsule_width_um``; parenchyma at the edge stays
    tissue. Edges at the frame of the image (a microscope field) are never capsule.

    Parameters
    ----------
    tissue : TissueMask
    collagen : ndarray of bool
        Collagen at the resolution of the masks (threshold applied to the thumbnail).

    Returns
    -------
    TissueMask
        ``capsule_band`` replaced by the capsule region, grown by one pixel so that the finer
        analysis resolution is covered.
    """
    band = tissue.capsule_band
    if not band.any():
        return tissue
    padded = np.pad(tissue.section, 1, constant_values=True)
    dist = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
    seeds = band & (dist <= 3.5) & collagen
    region = ndi.binary_propagation(seeds, mask=collagen & band, structure=np.ones((3, 3)))
    if region.any():
        width_px = capsule_width_px(dist[region])
        region &= dist <= 1.25 * width_px + 1.0
    region = ndi.binary_dilation(region, structure=np.ones((3, 3))) & band
    return TissueMask(
        tissue.mpp, tissue.section, tissue.tissue, tissue.lumen, tissue.fold, region,
        tissue.vessel_wall, tissue.glass_od,
    )


def capsule_width_px(depths: np.ndarray) -> float:
    """Thickness of the capsule layer from the depths of edge-connected collagen pixels.

    A layer of width W along the edge contributes the same number of pixels at every depth up
    to W, then none: the depth histogram drops there. Septa and portal tracts that touch the
    capsule add pixels at all depths, but along a much shorter stretch of edge, so the drop
    stays visible. W is the first depth whose pixel count falls below 30 % of the median count of
    the shallower depths.

    Parameters
    ----------
    depths : ndarray of float
        Distance to the glass (pixels) of the candidate capsule pixels.

    Returns
    -------
    float
        Capsule width, pixels.
    """
    counts = np.bincount(np.ceil(depths).astype(np.intp))
    for d in range(3, len(counts)):
        if counts[d] < 0.3 * np.median(counts[1:d]):
            return float(d - 1)
    return float(len(counts) - 1)


def with_folds(
    tissue: TissueMask, counterstain: np.ndarray, settings: TissueSettings
) -> TissueMask:
    """Exclude folds: regions of doubled counterstain density.

    Parameters
    ----------
    tissue : TissueMask
    counterstain : ndarray of float32, shape like the masks
        Counterstain (picric acid / ponceau-fuchsin) concentration, OD units.
    settings : TissueSettings

    Returns
    -------
    TissueMask
        With ``fold`` set and removed from ``tissue``.
    """
    if not settings.exclude_folds or not tissue.tissue.any():
        return tissue
    smooth = gaussian_blur(counterstain.astype(np.float32), max(5.0 / tissue.mpp, 0.5))
    level = float(np.median(smooth[tissue.tissue]))
    if level <= 0.02:
        return tissue
    fold = tissue.tissue & (smooth > settings.fold_od_factor * level)
    fold = remove_small_objects_fast(fold, _px(settings.fold_min_area_um2, tissue.mpp),
                                     connectivity=1)
    if not fold.any():
        return tissue
    return TissueMask(
        tissue.mpp, tissue.section, tissue.tissue & ~fold, tissue.lumen, fold,
        tissue.capsule_band & ~fold, tissue.vessel_wall & ~fold, tissue.glass_od,
    )
