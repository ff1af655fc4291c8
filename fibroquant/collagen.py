"""The collagen decision (:class:`CollagenRule`, :func:`is_collagen`) and its per-slide threshold.

The default threshold is *relative*: it sits a fixed fraction of the way from the slide's
parenchyma level (the median collagen-stain concentration of tissue pixels dominated by other
stains: non-specific uptake) to its
collagen level (the median concentration of pixels that the stain vectors attribute mostly to the
collagen stain). Both levels scale with the stain's intensity, so a section stained 30 % weaker,
or scanned with another white balance, is cut at the same place in its own distribution: the
threshold *means the same on every slide*. A floor ``min_contrast_od`` above the parenchyma level
stops a slide without collagen from being thresholded inside its own noise. ``fixed-od`` (one
OD value for every slide, as in Fiji macros) and ``otsu`` (per-slide Otsu on tissue pixels) remain
available.

A pixel is collagen only if the collagen stain also carries enough of its stain (the *share
guard*, ``min_share``): dark red muscle and purple red-blue mixtures project onto the collagen
axis without being collagen. In Masson's trichrome the two dyes compete for the same tissue, and
an under-differentiated section leaves the hepatocyte cytoplasm purple: the parenchyma itself
carries a collagen-stain share ``p`` (median over stained parenchyma pixels), varying from cell to
cell and across the lobule. The guard is then counted from the bluest parenchyma,
``p_hi = min(parenchyma_share_spread · p, 0.5)``, to pure collagen stain (share 1):
``guard = p_hi + min_share · (1 - p_hi)``, i.e. a pixel must be at least ``min_share`` of the way
from the slide's own parenchyma colour to the colour of the collagen stain. With a clean red
counterstain ``p`` is ~0 and the guard is ``min_share`` as before (:func:`share_guard`).

Diffuse pale collagen (a broad band of faint collagen stain over cells) has, pixel by pixel, the
colour of purple cytoplasm; its neighbourhood tells it apart (:func:`pale_band_weight`). There
the guard and the threshold are lowered per cell of the slide's threshold map (``guard_map`` of
:class:`CollagenRule`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from skimage.filters import threshold_otsu

from fibroquant.config import CollagenSettings
from fibroquant.kernels import gaussian_blur
from fibroquant.stains import median

if TYPE_CHECKING:
    from fibroquant.stains import StainMatrix

#: From this background sigma (pixels) on, :func:`parenchyma_background` works on a coarser grid.
COARSE_BACKGROUND_MIN_SIGMA = 16.0


@dataclass(frozen=True)
class CollagenRule:
    """The collagen decision of one slide: which pixels of a tile are collagen.

    A tissue pixel is collagen when (:func:`is_collagen`)

    1. its collagen-stain concentration (OD by ``lut``, then one dot product with
       ``unmix_col``) is above the threshold at its place (the slide's
       :class:`CollagenThreshold`, raised by :func:`parenchyma_background`), and
    2. the collagen stain carries at least ``share_guard`` of its positive concentration summed
       over all stains (the *share guard*; off without ``other_cols`` or when 0), or the
       guard of its low-resolution cell in ``guard_map`` where one is given (lowered inside
       diffuse pale collagen, :func:`pale_band_weight`),

    and then the tile's 8-connected collagen components that are smaller than
    ``min_object_px``, or compact blobs (:func:`blob_limits`), and do not touch the tile's edge
    are not collagen (:func:`speck_mask`). The fused tile kernel
    (:func:`fibroquant.kernels.measure_tile_fused`) implements the same rule in one pass, bit
    for bit (``tests/test_speed_paths.py``).

    Attributes
    ----------
    lut : ndarray of float32, shape (3, 256)
        OD per channel value (:func:`fibroquant.stains.od_lut` of the slide's glass colour).
    unmix_col : ndarray of float32, shape (3,)
        Collagen column of the slide's unmixing matrix (OD -> concentration).
    other_cols : tuple of ndarray of float32, shape (3,)
        Unmixing columns of the other stains, in the order their shares are summed.
    share_guard : float
        Least collagen-stain share of a collagen pixel (:func:`share_guard`), 0-1.
    min_object_px, blob_px, blob_side : int
        Speck and blob limits in pixels of the analysis resolution (0 = off).
    guard_map : ndarray of float32, shape (h, w), optional
        The share guard per cell of the slide's threshold map (at most ``share_guard``); None =
        ``share_guard`` everywhere.
    """

    lut: np.ndarray
    unmix_col: np.ndarray
    other_cols: tuple[np.ndarray, ...] = ()
    share_guard: float = 0.0
    min_object_px: int = 0
    blob_px: int = 0
    blob_side: int = 0
    guard_map: np.ndarray | None = None

    @property
    def guard(self) -> float | np.ndarray:
        """The share guard as the tile kernel takes it: ``guard_map``, else ``share_guard``."""
        return self.share_guard if self.guard_map is None else self.guard_map

    @classmethod
    def for_slide(cls, lut: np.ndarray, stains: StainMatrix, share_guard: float,
                  settings: CollagenSettings, blob_max_area_um2: float | None, mpp: float
                  ) -> CollagenRule:
        """The rule of a slide from its calibration, at ``mpp`` µm per pixel."""
        i = stains.collagen_index
        return cls(lut, stains.unmixing[:, i].copy(),
                   tuple(stains.unmixing[:, k].copy() for k in range(len(stains.names)) if k != i),
                   share_guard, round(settings.min_object_area_um2 / mpp**2),
                   *blob_limits(blob_max_area_um2, mpp))


def collagen_concentration(rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray) -> np.ndarray:
    """Stain concentration of a uint8 RGB image along one unmixing column (float32, OD units).

    ``lut[0][r] * u[0] + lut[1][g] * u[1] + lut[2][b] * u[2]`` in float32, added left to right:
    the tile kernel tabulates the same products and adds them in the same order.
    """
    return (
        lut[0][rgb[..., 0]] * unmix_col[0]
        + lut[1][rgb[..., 1]] * unmix_col[1]
        + lut[2][rgb[..., 2]] * unmix_col[2]
    )


def is_collagen(rgb: np.ndarray, threshold: np.ndarray | float, rule: CollagenRule,
                guard: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1 and 2 of :class:`CollagenRule` for every pixel of a tile (numpy).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    threshold : float32 or ndarray of float32, shape (H, W)
        Collagen threshold at every pixel, OD units.
    rule : CollagenRule
    guard : ndarray of float32, shape (H, W), optional
        Share guard at every pixel (``rule.guard_map`` read at the tile's pixels); None =
        ``rule.share_guard``.

    Returns
    -------
    conc : ndarray of float32, shape (H, W)
        Collagen concentration, OD units.
    collagen : ndarray of bool, shape (H, W)
        Pixels that pass the threshold and the share guard (tissue and specks not applied).
    """
    conc = collagen_concentration(rgb, rule.lut, rule.unmix_col)
    collagen = conc > threshold
    g = np.float32(rule.share_guard) if guard is None else np.asarray(guard, np.float32)
    if rule.other_cols and np.any(g > 0):
        pos = np.maximum(conc, 0)
        total = pos.copy()
        for col in rule.other_cols:
            total += np.maximum(collagen_concentration(rgb, rule.lut, col), 0)
        collagen &= pos >= g * total
    return conc, collagen


def blob_limits(area_um2: float | None, mpp: float) -> tuple[int, int]:
    """Pixel limits of a compact blob of at most ``area_um2``: (largest area, largest bounding
    box side = 1.5 diameters of a disc of that area); (0, 0) when off (0 or None)."""
    if not area_um2 or area_um2 <= 0:
        return 0, 0
    diameter = 2.0 * math.sqrt(area_um2 / math.pi)
    return round(area_um2 / mpp**2), math.ceil(1.5 * diameter / mpp)


def blob_components(stats: np.ndarray, blob_px: int, blob_side: int) -> np.ndarray:
    """Which components of ``cv2.connectedComponentsWithStats`` are compact blobs: at most
    ``blob_px`` pixels, a bounding box at most ``blob_side`` on each side and at least half
    filled (a disc fills 79 %, a thin fibre across its box a few %); bool per label."""
    area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    bw = stats[:, cv2.CC_STAT_WIDTH].astype(np.int64)
    bh = stats[:, cv2.CC_STAT_HEIGHT].astype(np.int64)
    if blob_px <= 0:
        return np.zeros(len(area), bool)
    return (area <= blob_px) & (bh <= blob_side) & (bw <= blob_side) & (2 * area >= bh * bw)


def speck_mask(collagen: np.ndarray, rule: CollagenRule) -> np.ndarray:
    """The pixels of a tile's collagen mask that step 3 of :class:`CollagenRule` takes out:
    8-connected components smaller than ``min_object_px`` or compact blobs, not touching the
    tile's edge (they may continue in the next tile); bool, shape of ``collagen``."""
    if not ((rule.min_object_px > 1 or rule.blob_px > 0) and collagen.any()):
        return np.zeros(collagen.shape, bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(collagen).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    small = ((stats[:, cv2.CC_STAT_AREA] < rule.min_object_px)
             | blob_components(stats, rule.blob_px, rule.blob_side))
    small[0] = False
    small[edge] = False
    return small[labels]

@dataclass(frozen=True)
class CollagenThreshold:
    """The threshold of one slide and the levels it came from (OD units)."""

    method: str
    threshold_od: float
    parenchyma_od: float
    collagen_level_od: float
    n_collagen_px: int
    note: str = ""
    share_guard: float = 0.0  # least collagen-stain share of a collagen pixel (per-pixel rule)
    parenchyma_share: float = 0.0  # median collagen-stain share of stained parenchyma, 0-1
    pale_counterstain: bool = False  # levels taken by intensity (_pale_counterstain_split)


#: Parenchymal collagen-stain share (median) above which a slide is reported as purple.
PURPLE_PARENCHYMA_SHARE = 0.25


def share_guard(
    collagen_share: np.ndarray,
    settings: CollagenSettings,
    *,
    stained: np.ndarray | None = None,
    from_parenchyma: bool = False,
) -> tuple[float, float]:
    """A slide's share guard and the parenchymal share it is counted from.

    Parameters
    ----------
    collagen_share : ndarray of float32, shape (N,)
        The collagen stain's share of each sampled tissue pixel's positive concentration, 0-1.
    settings : CollagenSettings
    stained : ndarray of bool, shape (N,), optional
        Pixels dark enough for their share to mean something (OD norm above the stain
        estimation floor); the share of near-glass pixels is noise. None = all.
    from_parenchyma : bool
        Count ``min_share`` from the parenchyma's own share (``share_baseline`` parenchyma,
        Masson by default) instead of from zero.

    Returns
    -------
    guard : float
        ``p_hi + min_share · (1 - p_hi)`` with ``p_hi = min(parenchyma_share_spread · p, 0.5)``;
        ``min_share`` when not counted from the parenchyma or ``min_share`` is 0.
    p : float
        Median share of stained pixels dominated by other stains (share < 0.5); 0 when not
        measured (fewer than 50 such pixels).

    Examples
    --------
    >>> import numpy as np
    >>> from fibroquant.config import CollagenSettings
    >>> share = np.r_[np.full(900, 0.15), np.full(100, 0.9)].astype(np.float32)
    >>> g, p = share_guard(share, CollagenSettings(), from_parenchyma=True)
    >>> round(p, 2), round(g, 3)
    (0.15, 0.496)
    >>> share_guard(share, CollagenSettings())[0]
    0.35
    """
    share = np.asarray(collagen_share, dtype=np.float32).ravel()
    if not from_parenchyma or settings.min_share <= 0:
        return settings.min_share, 0.0
    parenchyma = share < 0.5
    if stained is not None:
        parenchyma &= np.asarray(stained, bool).ravel()
    if np.count_nonzero(parenchyma) < 50:
        return settings.min_share, 0.0
    p = max(median(share[parenchyma]), 0.0)
    p_hi = min(settings.parenchyma_share_spread * p, 0.5)
    return p_hi + settings.min_share * (1.0 - p_hi), p


def calibrate_threshold(
    collagen_conc: np.ndarray,
    collagen_share: np.ndarray,
    settings: CollagenSettings,
    *,
    stained: np.ndarray | None = None,
    share_from_parenchyma: bool = False,
) -> CollagenThreshold:
    """Choose a slide's collagen threshold and share guard from a sample of its tissue pixels.

    Parameters
    ----------
    collagen_conc : ndarray of float32, shape (N,)
        Collagen stain concentration of tissue pixels, OD units.
    collagen_share : ndarray of float32, shape (N,)
        The collagen stain's share of each pixel's positive concentration, 0-1.
    settings : CollagenSettings
    stained : ndarray of bool, shape (N,), optional
        Pixels whose share is meaningful (see :func:`share_guard`).
    share_from_parenchyma : bool
        Count the share guard from the parenchyma's own share (see :func:`share_guard`).

    Returns
    -------
    CollagenThreshold
        Includes ``share_guard``, the per-pixel least collagen share for this slide.
    """
    conc = np.asarray(collagen_conc, dtype=np.float32).ravel()
    share = np.asarray(collagen_share, dtype=np.float32).ravel()
    if conc.size == 0:
        return CollagenThreshold(settings.method, float("inf"), 0.0, 0.0, 0, "no tissue",
                                 settings.min_share)
    guard, p_share = share_guard(share, settings, stained=stained,
                                 from_parenchyma=share_from_parenchyma)
    purple = ""
    if p_share >= PURPLE_PARENCHYMA_SHARE:
        purple = (
            f"purple parenchyma: {100 * p_share:.0f} % of its stain is collagen stain "
            f"(under-differentiated?); collagen share guard raised to {guard:.2f}"
        )
    # parenchyma level: pixels the stain vectors attribute mostly to other stains (cytoplasm,
    # nuclei); robust when collagen covers a large part of the tissue (cirrhosis, capsule)
    other = conc[share < 0.5]
    base = median(other if other.size >= max(50, conc.size // 20) else conc)
    # a negative level means the counterstain projects below zero on the collagen axis
    # (vectors off for this slide): measure contrast from zero instead
    base = max(base, 0.0)
    if settings.method == "fixed-od":
        return CollagenThreshold("fixed-od", settings.fixed_od, base, float("nan"), 0, purple,
                                 guard, p_share)
    if settings.method == "otsu":
        try:
            t = float(threshold_otsu(conc))
        except ValueError:
            t = base + settings.min_contrast_od
        t = max(t, base + settings.min_contrast_od)
        return CollagenThreshold("otsu", t, base, float("nan"), 0, purple, guard, p_share)
    floor = base + settings.min_contrast_od
    candidates = conc[(share > 0.5) & (conc > floor)]
    min_px = max(50, int(0.0002 * conc.size))
    if candidates.size < min_px:
        note = (
            f"too few collagen-dominated pixels ({candidates.size}) to calibrate; threshold set "
            f"{settings.min_contrast_od:g} OD above parenchyma"
        )
        note = "; ".join(n for n in (purple, note) if n)
        return CollagenThreshold("relative", floor, base, float("nan"), int(candidates.size), note,
                                 guard, p_share)
    level = median(candidates)
    note = purple
    split = _pale_counterstain_split(candidates, level)
    if split is not None:
        # The counterstain is too pale to tell parenchyma from collagen by colour: its
        # collagen-stain uptake passed for collagen and the candidates' median fell to the
        # parenchyma's level. Split them by intensity instead.
        level = float(np.median(candidates[candidates > split]))
        base = max(base, float(np.median(conc[conc <= split])))
        floor = base + settings.min_contrast_od
        pale = (
            f"pale counterstain: the parenchyma is collagen-stain dominated; collagen level "
            f"{level:.2f} OD and parenchyma level {base:.2f} OD taken by intensity"
        )
        note = "; ".join(n for n in (purple, pale) if n)
    t = base + settings.relative_threshold * (level - base)
    return CollagenThreshold("relative", max(t, floor), base, level, int(candidates.size), note,
                             guard, p_share, split is not None)


#: The dense population of collagen-stain-dominated pixels at least this many times the
#: candidates' median means the median is the parenchyma's (see _pale_counterstain_split).
PALE_COUNTERSTAIN_RATIO = 2.0


def _pale_counterstain_split(candidates: np.ndarray, level: float) -> float | None:
    """Intensity between pink parenchyma and collagen among collagen-dominated pixels, or None.

    With a counterstain (picric acid, ponceau) the pixels dominated by the collagen stain are
    collagen, and their median is the collagen level. Without one (picric acid washed out, a
    faded ponceau), the parenchyma's own collagen-stain uptake dominates its colour too, and
    the candidates hold two populations: many pale parenchyma pixels and the dense collagen.
    Otsu's threshold on log concentration separates them; the split is used when the upper
    population's median is at least ``PALE_COUNTERSTAIN_RATIO`` times the candidates' median
    (on ordinary slides it is 1.0-1.35 times; on pale ones 3-7.5 times).
    """
    if candidates.size < 100 or level <= 0:
        return None
    log_c = np.log(np.maximum(candidates, 1e-6))
    try:
        split = float(np.exp(threshold_otsu(log_c)))
    except ValueError:
        return None
    upper = candidates[candidates > split]
    if upper.size < 50 or float(np.median(upper)) < PALE_COUNTERSTAIN_RATIO * level:
        return None
    return split


def parenchyma_background(
    collagen_conc: np.ndarray,
    parenchyma_mask: np.ndarray,
    sigma_px: float,
    fallback: float,
) -> np.ndarray:
    """Smooth map of non-specific collagen-stain uptake (OD units), from parenchyma only.

    Normalised convolution: a Gaussian average of the collagen concentration over pixels that
    belong to parenchyma (dominated by other stains), divided by the Gaussian average of that
    mask, so septa and portal tracts do not raise the background around them. Where almost no
    parenchyma is near, the slide-wide level ``fallback`` is used.

    Parameters
    ----------
    collagen_conc : ndarray of float32, shape (H, W)
        Collagen stain concentration (usually of the low-resolution tissue image).
    parenchyma_mask : ndarray of bool, shape (H, W)
    sigma_px : float
        Gaussian sigma, pixels of these arrays.
    fallback : float
        Slide-wide parenchyma level, OD units.

    Returns
    -------
    ndarray of float32, shape (H, W)

    Notes
    -----
    For ``sigma_px >= 16`` the map is computed on a grid ``sigma_px // 6`` times coarser (box
    averages of the concentration and of the mask) and interpolated back bilinearly: the map
    has no detail finer than sigma, and the cost falls with the square of the step.
    """
    w = parenchyma_mask.astype(np.float32)
    num = collagen_conc.astype(np.float32)
    num *= w
    if sigma_px >= COARSE_BACKGROUND_MIN_SIGMA and min(collagen_conc.shape) >= 2:
        step = int(sigma_px // 6)
        h, w_ = collagen_conc.shape
        size = (max(1, -(-w_ // step)), max(1, -(-h // step)))
        # box sums of the weighted concentration and of the mask, then the same blur
        num_box = cv2.resize(num, size, interpolation=cv2.INTER_AREA)
        w_box = cv2.resize(w, size, interpolation=cv2.INTER_AREA)
        del num, w  # full-size: not held while the map is blurred and resized back
        coarse = _normalised_blur(num_box, w_box, sigma_px / step, fallback)
        return cv2.resize(coarse, (w_, h), interpolation=cv2.INTER_LINEAR)
    parts = [num, w]
    del num, w
    return _normalised_blur_of(parts, sigma_px, fallback)


#: Diffuse pale collagen (:func:`pale_band_weight`): the Gaussian sigma (µm, a few liver cells)
#: over which a neighbourhood's collagen-stain share is averaged; pixels of at least
#: ``PURE_COLLAGEN_SHARE`` (septa, fibres) are left out of that average; and how far above the
#: slide's parenchymal share (share units) the average starts and ends the weight's ramp.
#: Chosen on synthetic sections (a 0.2 OD band 60 µm wide over red cells; purple Masson with
#: 25-45 % of the cytoplasm's stain aniline blue, cell-to-cell log-SD up to 0.35) and checked
#: on the real images (benchmarks/README.md): the band's neighbourhood averages 0.2-0.35 above
#: the parenchyma's share, purple cytoplasm's within 0.1. Collagen's mixed edge pixels (share
#: 0.5-0.7) count in the average, so the guard also falls a little along septa: held-out
#: purple cohorts moved toward the truth (MAE 0.42 to 0.40 and 0.45 to 0.41 pp).
BAND_SHARE_SIGMA_UM = 30.0
BAND_SHARE_RISE = (0.1, 0.2)
PURE_COLLAGEN_SHARE = 0.7
#: Inside diffuse pale collagen (weight 1) the share guard falls to the slide's bluest parenchyma
#: but not below ``BAND_MIN_GUARD`` (a band's pixels carry 0.35-0.65 collagen stain; a vessel's
#: purple-red media beside its collagen cuff, 0.15-0.4), and the threshold falls this fraction
#: of the way to ``min_contrast_od`` above the local parenchyma.
BAND_MIN_GUARD = 0.3
BAND_THRESHOLD_DROP = 0.5


def pale_band_weight(
    collagen_share: np.ndarray, stained: np.ndarray, parenchyma_share: float, sigma_px: float,
) -> np.ndarray:
    """0-1 per pixel: how clearly the pixel lies in diffuse pale collagen.

    A broad band of faint collagen stain laid over cells has, pixel by pixel, the colour of
    purple (under-differentiated) Masson cytoplasm: only its neighbourhood tells them apart.
    Purple cytoplasm varies from cell to cell around the slide's parenchymal share, so its
    average over a few cells stays near that share; a band raises the average over its whole
    width. The weight ramps from 0 to 1 as the neighbourhood's share (pixels of pure collagen
    stain left out, so that septa do not raise their surroundings) rises ``BAND_SHARE_RISE``
    above ``parenchyma_share``.

    Parameters
    ----------
    collagen_share : ndarray of float32, shape (H, W)
        The collagen stain's share of each pixel's positive concentration, 0-1.
    stained : ndarray of bool, shape (H, W)
        Tissue pixels dark enough for their share to mean something.
    parenchyma_share : float
        The slide's parenchymal share (median over stained pixels dominated by other stains).
    sigma_px : float
        ``BAND_SHARE_SIGMA_UM`` in pixels of these arrays.

    Returns
    -------
    ndarray of float32, shape (H, W)
        0 where there is too little stained tissue nearby.
    """
    # the average share of the stained, not purely collagen-stained pixels near each pixel: a
    # normalised blur, on a grid sigma / 6 coarser from sigma 6 px on (the weight is smooth;
    # the same grid as parenchyma_background's from 16 px on)
    w = (stained & (collagen_share < np.float32(PURE_COLLAGEN_SHARE))).astype(np.float32)
    num = np.asarray(collagen_share, np.float32) * w
    step = int(sigma_px // 6) if sigma_px >= 6 else 1
    if step > 1:
        h, w_ = num.shape
        size = (max(1, -(-w_ // step)), max(1, -(-h // step)))
        num_box = cv2.resize(num, size, interpolation=cv2.INTER_AREA)
        w_box = cv2.resize(w, size, interpolation=cv2.INTER_AREA)
        del num, w  # full-size: not held while the share is blurred and resized back
        coarse = _normalised_blur(num_box, w_box, sigma_px / step, float(parenchyma_share))
        local = cv2.resize(coarse, (w_, h), interpolation=cv2.INTER_LINEAR)
    else:
        parts = [num, w]
        del num, w
        local = _normalised_blur_of(parts, max(sigma_px, 0.5), float(parenchyma_share))
    lo, hi = BAND_SHARE_RISE
    # in place (the same float32 operations): one full-size array, not three
    np.subtract(local, np.float32(parenchyma_share + lo), out=local)
    np.divide(local, np.float32(hi - lo), out=local)
    return np.clip(local, 0.0, 1.0, out=local)


def _normalised_blur(num: np.ndarray, w: np.ndarray, sigma_px: float, fallback: float
                     ) -> np.ndarray:
    """``blur(num) / blur(w)``, blended to ``fallback`` where ``blur(w) < 0.05``; float32,
    computed in place in ``num`` (which must be a float32 array the caller gives up)."""
    return _normalised_blur_of([num, w], sigma_px, fallback)


def _normalised_blur_of(parts: list[np.ndarray], sigma_px: float, fallback: float
                        ) -> np.ndarray:
    """:func:`_normalised_blur` of ``parts = [num, w]``, which it empties: arrays a caller
    hands over this way (keeping no other reference) are freed as soon as they are blurred,
    two thumbnail-sized arrays fewer at once (peak memory of a slide's calibration)."""
    num = gaussian_blur(parts.pop(0), sigma_px)
    den = gaussian_blur(parts.pop(0), sigma_px)
    if np.result_type(np.float32, fallback) != np.float32:  # e.g. a np.float64 level
        weight = np.clip(den / 0.05, 0.0, 1.0)
        local = num / np.maximum(den, 1e-6)
        return (weight * local + (1.0 - weight) * fallback).astype(np.float32)
    # in place, same float32 operations in the same order as
    #   weight = clip(den / 0.05, 0, 1); local = num / maximum(den, 1e-6)
    #   weight * local + (1 - weight) * fallback
    # (thumbnail-sized temporaries dominate the peak memory of a slide)
    tmp = np.maximum(den, 1e-6)
    np.divide(num, tmp, out=num)  # local
    del tmp
    np.divide(den, 0.05, out=den)
    np.clip(den, 0.0, 1.0, out=den)  # weight: blend to the fallback where parenchyma is scarce
    np.multiply(den, num, out=num)  # weight * local
    np.subtract(1.0, den, out=den)
    np.multiply(den, fallback, out=den)
    np.add(num, den, out=num)
    return num.astype(np.float32, copy=False)


#: The automatic blob rule (``blob_max_area_um2: null``): the blob area it uses, µm² (a
#: nucleus of 5-10 µm), and the share of stained pixels that are iron-haematoxylin-like
#: (mostly nuclear stain, within ``NUCLEUS_OD_RANGE``) below which a Masson slide's nuclei are
#: taken for a plain haematoxylin. Weigert's iron haematoxylin leaves 0.9-3 % of the stained
#: pixels of synthetic sections so (0.18 % with half the usual nuclear stain), 12-44 % of the
#: real rat-heart fields, 3 % of the real human liver tile and 0.01-0.02 % of the two rodent
#: liver tiles (whose faint purple nuclei then take the rule); Ruifrok & Johnston's
#: blue-purple haematoxylin 0.0 % (0.03-0.07 % after JPEG).
AUTO_BLOB_AREA_UM2 = 80.0
IRON_NUCLEI_MIN_SHARE = 0.001
#: Nuclear-stain concentration (OD) of a pixel counted as an iron-haematoxylin nucleus: JPEG's
#: chroma smear leaves faint near-neutral fringes around blue-purple nuclei (0.1-5 % of the
#: stained pixels mostly nuclear stain at quality 90-75, but at most 0.03 % above 0.3 OD in a
#: section, 0.76 % in a field at quality 75); near-black debris (dust, pigment) lies above 1.5.
NUCLEUS_OD_RANGE = (0.3, 1.5)


def auto_blob_area(conc: np.ndarray, stains: StainMatrix) -> float:
    """The blob area of the automatic blob rule for a slide: ``AUTO_BLOB_AREA_UM2`` when the
    slide is an aniline-blue Masson whose nuclei are not iron haematoxylin, else 0 (off).

    A plain haematoxylin's blue-purple lies in the plane of aniline blue and ponceau-fuchsin
    (0.7° from it: ~0.78 aniline blue + 0.32 ponceau), so no deconvolution separates its
    nuclei from collagen; but then almost no pixel is mostly the (near-black) iron-haematoxylin
    stain, which tells the protocol. The nuclei are then left out by shape: compact round blobs
    of at most a nucleus's area. Interstitial collagen has compact patches too, so the rule is
    not used when the nuclei are iron haematoxylin (where it is not needed).

    Parameters
    ----------
    conc : ndarray of float, shape (N, 3)
        Stain concentrations (negatives clipped to 0) of the slide's stained calibration
        pixels (OD norm above the stain estimation floor), unmixed with ``stains``.
    stains : StainMatrix
        The slide's stains (collagen stain first, nuclear stain third).

    Returns
    -------
    float
        Blob area, µm² (0 = off).
    """
    if len(stains.names) < 3 or stains.names[0] != "aniline-blue" or len(conc) < 1000:
        return 0.0
    nuclear = conc[:, 2] / np.maximum(conc.sum(axis=1), 1e-6)
    lo, hi = NUCLEUS_OD_RANGE
    nucleus = (nuclear > 0.5) & (conc[:, 2] > lo) & (conc[:, 2] < hi)
    return AUTO_BLOB_AREA_UM2 if np.mean(nucleus) < IRON_NUCLEI_MIN_SHARE else 0.0
