"""Tissue detection and exclusions, on a low-resolution image of the whole slide.

Tissue is what absorbs light: the summed optical density, smoothed, above a glass threshold,
grown into connected pale tissue of a stain's colour down to the glass noise
(:func:`glass_floor`, :func:`pale_tissue`). Holes smaller than a lumen (sinusoids, fat
vacuoles) stay tissue; larger unstained holes inside the section are vessel lumens and are
excluded; pieces smaller than a speck are dust. The band along tissue/glass edges (never the
frame of a microscope field) is where the Glisson capsule is searched. Air bubbles under the
coverslip (:func:`detect_bubbles`: round regions inside a thin, dark, grey rim) are left out.
Every size is in µm² and converted with the image's µm per pixel.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.filters import threshold_otsu

from fibroquant import exclusions
from fibroquant.config import TissueSettings
from fibroquant.kernels import (
    gaussian_blur,
    remove_small_holes_fast,
    remove_small_objects_fast,
)
from fibroquant.stains import Vector, channel_spread, channel_sum, median, rgb_to_od


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
        Countable tissue: section minus lumens, folds and bubbles (capsule removed later, per
        pixel).
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
        The lowest summed OD of tissue: the glass threshold, or the pale-tissue floor below it
        that tissue grew into (:func:`glass_floor`, :func:`pale_tissue`).
    bubble : ndarray of bool
        Section under air bubbles, excluded (not part of ``tissue``, ``lumen``,
        ``capsule_band`` or ``vessel_wall``). All False when bubbles are not excluded or none
        were found; also when not given (then set from ``section``'s shape).
    edge_distance : ndarray of float64 or None
        Distance of every pixel to the glass around ``section`` (pixels; the image frame is
        not glass), kept by :func:`detect_tissue` for :func:`with_capsule`, which drops it
        (not kept above :data:`KEEP_EDGE_DISTANCE_MAX_PX`: computed again there).
    glass_threshold_od : float or None
        The glass threshold tissue grew from (:func:`glass_threshold`; ``glass_od`` when pale
        tissue was not grown).
    detected : mapping of str to ndarray of bool
        The excluded classes found by their own ``detect`` function
        (:func:`fibroquant.exclusions.detected`), by key; removed from ``tissue``.
    """

    mpp: float
    section: np.ndarray
    tissue: np.ndarray
    lumen: np.ndarray
    fold: np.ndarray
    capsule_band: np.ndarray
    vessel_wall: np.ndarray
    glass_od: float
    bubble: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]  # set in __post_init__
    edge_distance: np.ndarray | None = field(default=None, repr=False, compare=False)
    glass_threshold_od: float | None = None
    detected: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.bubble is None:
            object.__setattr__(self, "bubble", np.zeros(np.shape(self.section), bool))

    @property
    def glass_cut_od(self) -> float:
        """Summed OD above which a pixel is not glass: ``glass_threshold_od``, else
        ``glass_od``."""
        return self.glass_threshold_od if self.glass_threshold_od is not None else self.glass_od

    def excluded(self, key: str) -> np.ndarray | None:
        """The mask of an excluded class (:data:`fibroquant.exclusions.CLASSES`) by its key;
        None for one that is not a pixel class (``unfocused``)."""
        attr = _MASK_OF.get(key)
        return getattr(self, attr) if attr else self.detected.get(key)

    def area_mm2(self, mask: np.ndarray) -> float:
        """Area of a mask in mm²."""
        return float(np.count_nonzero(mask)) * self.mpp**2 / 1e6


#: The :class:`TissueMask` field of each built-in excluded class with a bit.
_MASK_OF = {"capsule": "capsule_band", "lumen": "lumen", "fold": "fold",
            "vessel_wall": "vessel_wall", "bubble": "bubble"}


def _px(area_um2: float, mpp: float) -> int:
    return round(area_um2 / mpp**2)


#: A tissue piece of at least this share of the image is never a speck: on an image smaller
#: than ``1 / SPECK_MAX_IMAGE_SHARE`` specks (a microscope field or a crop of a few thousand
#: µm²) the speck size shrinks with the image instead of discarding all of it as dust.
SPECK_MAX_IMAGE_SHARE = 0.05


def speck_area_um2(settings: TissueSettings, shape: tuple[int, ...], mpp: float) -> float:
    """Largest piece of tissue discarded as dust, µm².

    ``min_tissue_area_um2``, but at most ``SPECK_MAX_IMAGE_SHARE`` of the image's area, so a
    small field or crop keeps its tissue (the default 5,000 µm² is bigger than a whole
    200 x 240 px crop at 0.25 µm/px). Images of at least 20 specks (0.1 mm² by default) keep
    the setting unchanged.

    Examples
    --------
    >>> from fibroquant.config import TissueSettings
    >>> speck_area_um2(TissueSettings(), (200, 240), 0.25)  # a 3,000 µm² crop
    150.0
    >>> speck_area_um2(TissueSettings(), (4000, 4000), 1.0)
    5000.0
    """
    image_um2 = float(shape[0]) * float(shape[1]) * mpp**2
    return float(min(settings.min_tissue_area_um2, SPECK_MAX_IMAGE_SHARE * image_um2))


def edt(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(mask)`` of a 2-D bool mask, by OpenCV.

    OpenCV's exact Euclidean transform (``DIST_MASK_PRECISE``) is ~7x faster on a 4 MP
    thumbnail but returns float32. Squared distances are integers: they are recovered by
    rounding and the square root taken in float64, which gives scipy's values to the bit
    wherever float32 resolves the square (distances up to ~2,000 px; beyond, within 1e-3 px).

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)

    Returns
    -------
    ndarray of float64, shape (H, W)
        Distance of every True pixel to the nearest False pixel, pixels (0 on False).
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0 or mask.all() or max(mask.shape) >= 2**15:
        return ndi.distance_transform_edt(mask)
    d = cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d = d.astype(np.float64)
    np.square(d, out=d)
    np.rint(d, out=d)
    return np.sqrt(d, out=d)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` of a 2-D bool mask, by one OpenCV labelling.

    Holes are background regions not 4-connected to the image border (scipy's default
    structure); ~5x faster than scipy's iterative propagation on a 4 MP thumbnail.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0 or mask.size >= 2**31:
        return ndi.binary_fill_holes(mask)
    n, labels = cv2.connectedComponents((~mask).view(np.uint8), connectivity=4,
                                        ltype=cv2.CV_32S)
    outside = np.zeros(n, bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def _threshold_sample(od_sum: np.ndarray) -> np.ndarray:
    """The pixels the glass thresholds are taken from: a grid of at most ~1024 x 1024."""
    return od_sum[:: max(1, od_sum.shape[0] // 1024), :: max(1, od_sum.shape[1] // 1024)]


def glass_threshold(od_sum: np.ndarray, settings: TissueSettings) -> float:
    """Summed-OD threshold between glass and tissue.

    Otsu's threshold of the smoothed summed OD, clipped to ``[glass_od_min, glass_od_max]``:
    with glass in view Otsu falls between glass (OD ≈ 0) and tissue and the clip keeps pale
    parenchyma; on a field covered by tissue Otsu would split the tissue, and the clip keeps the
    threshold near glass.
    """
    if settings.glass_od is not None:
        return float(settings.glass_od)
    sample = _threshold_sample(od_sum)
    try:
        t = float(threshold_otsu(sample))
    except ValueError:  # a constant image
        t = settings.glass_od_max
    return float(np.clip(t, settings.glass_od_min, settings.glass_od_max))


def glass_floor(od_sum: np.ndarray, threshold: float, settings: TissueSettings) -> float:
    """The lowest summed OD that pale tissue may have: the glass level + ``pale_tissue_sd``
    robust SDs of the glass.

    The glass (or lumen) population is the histogram mode of the sampled pixels below
    ``threshold``; its spread is taken from the pixels on the bright side of the mode only
    (``1.4826 ×`` their median distance to it), which tissue cannot contaminate. Returns
    ``threshold`` itself when the setting is off, the threshold is fixed by the user, or fewer
    than 2 % of the pixels lie below it (no glass nor lumen to measure: the image is covered
    by tissue).

    Parameters
    ----------
    od_sum : ndarray of float32, shape (H, W)
        Smoothed summed optical density of the tissue-detection image.
    threshold : float
        The glass threshold (:func:`glass_threshold`).
    settings : TissueSettings

    Returns
    -------
    float
        Between ``glass_od_min`` and ``threshold`` (inclusive).

    Examples
    --------
    >>> from fibroquant.config import TissueSettings
    >>> rng = np.random.default_rng(0)
    >>> glass = rng.normal(0.0, 0.002, 5000)  # glass: OD 0, noise SD 0.002
    >>> pale = rng.normal(0.07, 0.01, 5000)   # barely stained parenchyma
    >>> od = np.concatenate([glass, pale]).astype(np.float32).reshape(100, 100)
    >>> round(glass_floor(od, 0.1, TissueSettings()), 3)  # glass_od_min: 0.03
    0.03
    """
    if settings.pale_tissue_sd <= 0 or settings.glass_od is not None:
        return float(threshold)
    sample = _threshold_sample(od_sum)
    sample = sample[np.isfinite(sample)]
    low = sample[sample < threshold]
    if low.size < max(0.02 * sample.size, 100):
        return float(threshold)
    hist, edges = np.histogram(low, bins=200, range=(min(float(low.min()), 0.0), threshold))
    mode = float(edges[np.argmax(hist)] + 0.5 * (edges[1] - edges[0]))
    bright = low[low <= mode]
    sd = 1.4826 * float(np.median(mode - bright)) if bright.size >= 50 else np.inf
    floor = max(mode + settings.pale_tissue_sd * sd, settings.glass_od_min)
    return float(min(floor, threshold))


#: Largest frame contact of a glass pocket taken for a vessel lumen cut by the image frame, in
#: units of the square root of its area (a half disc meets the frame along 1.6, a quarter disc
#: in a corner along 2.1; a strip of glass along the frame, longer than ~6x its width, more).
POCKET_MAX_CONTACT = 2.5

#: Pale tissue narrower than twice this (µm) is not added: the halo that optical blur spreads
#: around every section edge is a few µm wide, pale parenchyma is a cell or more.
PALE_TISSUE_MIN_HALF_WIDTH_UM = 2.0
#: Least colour of pale tissue: the spread of its OD over the channels (max - min) as a share
#: of their sum. Every stain has 0.29-0.72 (light green the least, picric acid the most); glass
#: darkened by uneven light is grey (0, plus noise), and is not grown into.
PALE_TISSUE_MIN_CHROMA = 0.2


def pale_tissue(
    od_sum: np.ndarray, threshold: float, floor: float, radius_px: float,
    coloured: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels above ``threshold``, with the pale tissue above ``floor`` that belongs to them.

    A hysteresis threshold (as :func:`skimage.filters.apply_hysteresis_threshold`, but
    8-connected, by OpenCV labelling): pixels above ``floor`` join when they are connected to
    a pixel above ``threshold``, so a faint smear or haze on the glass away from the section
    stays glass. What joins is then opened with a disk of ``radius_px``: the thin halo of blur
    around the section's edge is dropped (it would move the edge outward, away from the
    capsule), pale parenchyma wider than ``2 · radius_px`` is kept, and what the opening cut
    off from the section (a smear joined to it by a thin thread) is dropped too.

    Parameters
    ----------
    od_sum : ndarray of float32, shape (H, W)
    threshold, floor : float
        High and low thresholds, ``floor <= threshold``.
    radius_px : float
        Half the least width of pale tissue, pixels.
    coloured : ndarray of bool, shape (H, W), optional
        Pixels whose colour may be pale tissue (not grey); only those join below
        ``threshold``. None = all.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    high = od_sum > threshold
    if floor >= threshold:
        return high
    low = od_sum > floor
    if coloured is not None:
        low &= coloured | high
    pale = _components_with(low, high) & ~high
    # the opening can cut a thin thread that joined a faint smear to the section: what is left
    # must still touch a pixel above the threshold
    return _components_with(high | _open_disk(pale, radius_px), high)


#: Largest tissue image (pixels) whose edge distance :func:`detect_tissue` keeps for
#: :func:`with_capsule`: a larger one (a whole slide's 4-MP thumbnail: 32 MB of float64, held
#: through the rest of the calibration, its peak) is computed again there (~60 ms).
KEEP_EDGE_DISTANCE_MAX_PX = 2_000_000


def detect_tissue(
    rgb: np.ndarray, mpp: float, settings: TissueSettings, background_rgb: Vector
) -> TissueMask:
    """Find countable tissue, lumens, air bubbles and the capsule band.

    Tissue is the smoothed summed OD above :func:`glass_threshold`, grown by
    :func:`pale_tissue` into connected pixels of a stain's colour (channel spread at least
    ``PALE_TISSUE_MIN_CHROMA`` of the summed OD) above :func:`glass_floor`.

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
    od = rgb_to_od(rgb, background_rgb)
    od_sum = channel_sum(od)
    # a median keeps the tissue edge where it is (a Gaussian would push it into the glass)
    ksize = 5 if settings.smooth_um / mpp >= 1.5 else 3
    if min(od_sum.shape) >= ksize:
        od_sum = cv2.medianBlur(od_sum, ksize)
    t_glass = glass_threshold(od_sum, settings)
    t = glass_floor(od_sum, t_glass, settings)
    if t < t_glass:
        # pale tissue carries its stain's colour; glass darkened by uneven light is grey
        spread = channel_spread(od)
        if min(spread.shape) >= ksize:
            spread = cv2.medianBlur(spread, ksize)
        coloured = spread >= PALE_TISSUE_MIN_CHROMA * od_sum
        raw = pale_tissue(od_sum, t_glass, t, max(PALE_TISSUE_MIN_HALF_WIDTH_UM / mpp, 1.0),
                          coloured)
    else:
        raw = od_sum > t_glass
    bubble = np.zeros_like(raw)
    if settings.exclude_bubbles:
        bubble = detect_bubbles(rgb, mpp, settings, background_rgb, raw, od=od)
        if bubble.any():
            # a rim absorbs over glass too: decide what lies under it from its surroundings
            raw = _under_rims(raw, bubble, settings.bubble_rim_max_um / mpp)
    del od  # the thumbnail's OD is not needed further on (peak memory)
    # = skimage remove_small_objects(raw, max_size=_px(...) - 1) (4-connected), faster
    raw = remove_small_objects_fast(raw, _px(speck_area_um2(settings, raw.shape, mpp), mpp),
                                    connectivity=1)
    # Holes below the lumen size (sinusoids, fat, nuclei-free gaps) are tissue.
    lumen_px = max(_px(settings.lumen_min_area_um2, mpp), 1)
    filled_small = remove_small_holes_fast(raw, lumen_px, connectivity=1)
    section = fill_holes(filled_small)
    lumen = section & ~filled_small
    # Glass pockets cut by the image frame but otherwise enclosed by tissue, up to the size of
    # a large vessel, are lumens too (a vein at the edge of a microscope field), not outer glass.
    # A vein cut by the frame meets it along about its width (a half or quarter disc: at most
    # ~2.3 sqrt(area)); the strip of glass between a section and the frame runs along it.
    max_px = _px(settings.lumen_max_area_um2, mpp)
    outside, n = _label4(~section)
    if n:
        frame = np.zeros_like(section)
        frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = True
        sizes = np.bincount(outside.ravel(), minlength=n + 1)
        contact = np.bincount(outside[frame], minlength=n + 1)
        pocket = ((sizes >= lumen_px) & (sizes <= max_px) & (contact > 0)
                  & (contact <= POCKET_MAX_CONTACT * np.sqrt(sizes)))
        pocket[0] = False
        if pocket.any() and section.any():
            extra = pocket[outside]
            lumen |= extra
            section |= extra
    bubble &= section  # the section under bubbles is excluded; glass under them is glass
    lumen &= ~bubble
    fold = np.zeros_like(section)
    tissue = section & ~lumen & ~bubble
    found = with_detected(rgb, mpp, background_rgb, tissue)
    for mask in found.values():
        tissue &= ~mask
    band = np.zeros_like(section)
    dist = None
    if settings.exclude_capsule and settings.capsule_width_um > 0 and not section.all():
        # (a section filling the whole image has no glass edge: the band is empty)
        dist = edge_distance(section)
        band = tissue & (dist * mpp <= settings.capsule_width_um)
    wall = np.zeros_like(section)
    if settings.exclude_vessel_walls_above_um2 is not None and lumen.any():
        big = remove_small_objects_fast(
            lumen, _px(settings.exclude_vessel_walls_above_um2, mpp) + 1, connectivity=1
        )
        if big.any():
            dist_l = edt(~big)
            wall = tissue & (dist_l * mpp <= settings.vessel_wall_um)
    if dist is not None and dist.size > KEEP_EDGE_DISTANCE_MAX_PX:
        dist = None  # with_capsule computes it again (peak memory of a slide's calibration)
    return TissueMask(
        mpp=mpp, section=section, tissue=tissue, lumen=lumen, fold=fold, capsule_band=band,
        vessel_wall=wall, glass_od=t, bubble=bubble, edge_distance=dist,
        glass_threshold_od=t_glass, detected=found,
    )


def with_detected(rgb: np.ndarray, mpp: float, background_rgb: Vector,
                  tissue: np.ndarray) -> dict[str, np.ndarray]:
    """The masks of the excluded classes found by their own ``detect`` function
    (:func:`fibroquant.exclusions.detected`), within ``tissue``, by key (empty: none)."""
    classes = exclusions.detected()
    if not classes:
        return {}
    od = rgb_to_od(rgb, background_rgb)
    out = {}
    for c in classes:
        assert c.detect is not None
        out[c.key] = np.asarray(c.detect(rgb, od, mpp, tissue), bool) & tissue
        tissue = tissue & ~out[c.key]
    return out


def no_tissue_reason(
    rgb: np.ndarray, mpp: float, settings: TissueSettings, background_rgb: Vector,
    found: TissueMask,
) -> str:
    """What :func:`detect_tissue` saw on an image where it found no countable tissue, and why
    it rejected it (for the "no tissue found" message).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        The image tissue was detected on.
    mpp : float
        Its µm per pixel.
    settings : TissueSettings
    background_rgb : tuple of 3 float
    found : TissueMask
        What :func:`detect_tissue` returned.

    Returns
    -------
    str
        One clause, e.g. ``"3 piece(s) above the glass threshold 0.100 OD, the largest
        800 µm², all smaller than the speck size 5,000 µm² (min_tissue_area_um2)"``.
    """
    if found.section.any():
        parts = [f"{name} {found.area_mm2(mask) * 1e6:,.0f} µm²"
                 for name, mask in (("lumen", found.lumen), ("air bubble", found.bubble),
                                    ("fold", found.fold), *found.detected.items())
                 if mask.any()]
        return (f"the section found ({found.area_mm2(found.section) * 1e6:,.0f} µm²) is all "
                f"excluded: {', '.join(parts) or 'exclusions'}")
    od_sum = channel_sum(rgb_to_od(rgb, background_rgb))
    t = found.glass_cut_od
    above = od_sum > np.float32(t)
    if not above.any():
        return (f"nothing absorbs above the glass threshold {t:.3f} OD (highest summed OD "
                f"{float(od_sum.max()):.3f}): a blank field, or a dark-field image?")
    n, _, stats, _ = cv2.connectedComponentsWithStats(above.view(np.uint8), connectivity=4)
    largest_um2 = float(stats[1:, cv2.CC_STAT_AREA].max()) * mpp**2
    speck = speck_area_um2(settings, rgb.shape, mpp)
    return (f"{n - 1} piece(s) above the glass threshold {t:.3f} OD, the largest "
            f"{largest_um2:,.0f} µm², all smaller than the speck size {speck:,.0f} µm² "
            "(min_tissue_area_um2)")


def edge_distance(section: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the glass outside ``section``, pixels (float64); the
    frame of the image is not glass."""
    padded = np.pad(section, 1, constant_values=True)
    return edt(padded)[1:-1, 1:-1]


def _label4(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``scipy.ndimage.label(mask)`` (4-connected) up to the numbering of the labels, by
    OpenCV: the label image (int32, 0 = background) and the number of components."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0 or mask.size >= 2**31:
        return ndi.label(mask)
    n, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    return labels, n - 1


#: A collagen pixel at least this near the glass (pixels) starts a capsule ray.
CAPSULE_SEED_PX = 3.5
#: ... and at most this near (µm): a blurred or JPEG-softened edge is paler, and the tissue
#: mask reaches out over the halo, so the capsule's collagen starts a few pixels in.
CAPSULE_SEED_MAX_UM = 5.0
#: Holes in the capsule's collagen up to this size (µm²; nuclei) are filled before the rays.
CAPSULE_HOLE_UM2 = 60.0
#: A ray's neighbours are the rays starting within about this distance along the edge, µm.
CAPSULE_LOCAL_UM = 100.0
#: A ray deeper than this multiple of its neighbours' typical depth (plus a pixel) is a
#: septum or a portal tract running into the capsule, not a thicker stretch of capsule.
CAPSULE_SEPTUM_FACTOR = 2.0
#: The capsule's depth near a ray is this quantile of the depths of the rays within about
#: CAPSULE_LOCAL_UM along the edge (not the median). Why 0.3: docs/decisions.md#capsule-quantile
CAPSULE_TYPICAL_QUANTILE = 0.3


#: A capsule is a layer: the collagen share of the tissue within half the band's depth of the
#: glass must exceed that of the tissue one to two band depths in by this factor. Synthetic
#: sections with a capsule: 0.01-0.69 (behind / at the edge); real Sirius red tumour cores,
#: whose stroma is cut at a punched edge: 1.02-1.26 (1.6-2.2 % of their tissue was "capsule").
CAPSULE_LAYER_RATIO = 0.85


def is_layer(tissue: TissueMask, collagen: np.ndarray, dist: np.ndarray) -> bool:
    """Whether the collagen along the section's edge is a layer (denser than the tissue behind
    it, ``CAPSULE_LAYER_RATIO``), or stroma cut at the edge (as dense as behind it).

    Parameters
    ----------
    tissue : TissueMask
        With a non-empty ``capsule_band``.
    collagen : ndarray of bool
    dist : ndarray of float
        Distance to the glass, pixels (:func:`edge_distance`).
    """
    depth = float(dist[tissue.capsule_band].max())
    near = tissue.capsule_band & (dist <= 0.5 * depth)
    behind = tissue.tissue & (dist > depth) & (dist <= 2 * depth)
    if np.count_nonzero(behind) < 0.25 * np.count_nonzero(near) or not near.any():
        return True  # nothing behind the band to compare with (a thin section): keep
    at_edge = float(np.count_nonzero(collagen & near)) / np.count_nonzero(near)
    inside = float(np.count_nonzero(collagen & behind)) / np.count_nonzero(behind)
    return bool(inside < CAPSULE_LAYER_RATIO * at_edge)


def with_capsule(tissue: TissueMask, collagen: np.ndarray) -> TissueMask:
    """Narrow the capsule band to the collagen that runs in from the section edge.

    The Glisson capsule is a collagen layer on the surface of the liver. A collagen pixel of
    the band is capsule when the straight path from it to the nearest glass is collagen all
    the way (:func:`capsule_rays`), unless its ray is a septum or a portal tract running into
    the capsule (deeper than twice the capsule nearby, taken as the 30th percentile of the
    rays within ~100 µm along the edge, or through the whole band): such a ray is capsule
    only down to the median thickness of the capsule's other rays there
    (:func:`_capsule_depth_limit`). So a septum meeting the capsule loses only the capsule's
    own thickness there, a thicker stretch of capsule is removed whole, collagen running
    beside the capsule behind a strip of parenchyma is not capsule, and a septum reaching a
    cut edge without capsule loses at most its last pixel. Edges at the frame of the image (a
    microscope field) are never capsule, and neither is collagen at an edge that is no denser
    in collagen than the tissue behind it (:func:`is_layer`: stroma cut at a punched edge).

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
        return replace(tissue, edge_distance=None)
    dist = tissue.edge_distance
    if dist is None or dist.shape != tissue.section.shape:
        dist = edge_distance(tissue.section)
    if not is_layer(tissue, collagen, dist):
        return replace(tissue, capsule_band=np.zeros_like(band), edge_distance=None)
    region = np.zeros(band.shape, bool)
    # nuclei in the capsule would cast a shadow on the rays: holes up to a nucleus's size
    candidates = remove_small_holes_fast(collagen & band, _px(CAPSULE_HOLE_UM2, tissue.mpp))
    seed_px = capsule_seed_depth(dist[candidates], tissue.mpp)
    ys, xs, depth, root = capsule_rays(candidates, dist, seed_px)
    if len(ys):
        # edge without capsule (no collagen within the seeds' depth): depth 0
        near = cv2.dilate((collagen & band & (dist <= seed_px)).view(np.uint8),
                          _disk(seed_px)).view(bool)
        bare = band & (dist <= 1.5) & ~near
        keep = depth <= _capsule_depth_limit(ys, xs, depth, root, np.nonzero(bare),
                                             float(dist[band].max()), tissue.mpp)
        region[ys[keep], xs[keep]] = True
    # = ndi.binary_dilation(region, structure=np.ones((3, 3))) & band
    region = cv2.dilate(region.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool) & band
    return replace(tissue, capsule_band=region, edge_distance=None)


def capsule_seed_depth(depths: np.ndarray, mpp: float) -> float:
    """How near the glass a collagen pixel must be to start a capsule ray, pixels.

    Where the capsule's collagen begins below the tissue edge: the first depth at which the
    band holds at least half as many collagen pixels as at its fullest depth within
    CAPSULE_SEED_MAX_UM, plus 1.5 pixels; at least CAPSULE_SEED_PX, at most
    CAPSULE_SEED_MAX_UM.

    Parameters
    ----------
    depths : ndarray of float
        Distance to the glass of the band's collagen pixels, pixels.
    mpp : float
        µm per pixel of the masks.

    Returns
    -------
    float
    """
    top = max(CAPSULE_SEED_PX, CAPSULE_SEED_MAX_UM / mpp)
    counts = np.bincount(np.ceil(depths[depths <= top]).astype(np.intp))
    if counts.size == 0 or counts.max() == 0:
        return CAPSULE_SEED_PX
    first = int(np.argmax(counts >= 0.5 * counts.max()))
    return float(min(max(CAPSULE_SEED_PX, first + 1.5), top))


#: Row and column steps of the 8 compass directions, counter-clockwise from +x (octant k is the
#: angle ``k * 45°`` of ``arctan2(dy, dx)``).
_STEP_Y = np.array([0, 1, 1, 1, 0, -1, -1, -1], np.intp)
_STEP_X = np.array([1, 1, 0, -1, -1, -1, 0, 1], np.intp)


def capsule_rays(
    candidates: np.ndarray, dist: np.ndarray, seed_px: float = 3.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Collagen joined to the glass along the straight path to the nearest edge.

    A candidate's parents are the 8-neighbour nearest the direction down the gradient of the
    edge distance and the two beside it (a 90° cone towards the glass), when they are
    candidates nearer the glass. A candidate within ``seed_px`` of the edge is on a ray; any
    other is when one of its parents is (so a ray passes round a nucleus in the capsule).
    Collagen that meets the capsule only sideways (a septum beside it, behind a strip of
    parenchyma) is not on a ray.

    Parameters
    ----------
    candidates : ndarray of bool, shape (H, W)
        Collagen pixels of the capsule band.
    dist : ndarray of float, shape (H, W)
        Distance to the glass, pixels (:func:`edge_distance`).
    seed_px : float
        Depth within which a collagen pixel starts a ray (a blurred edge is paler).

    Returns
    -------
    ys, xs : ndarray of intp
        The pixels on rays.
    depth : ndarray of float64
        Their distance to the glass, pixels.
    root : ndarray of intp
        For each, the index (into ``ys``/``xs``) of the first pixel of its ray.
    """
    ys, xs = np.nonzero(candidates)
    empty = np.zeros(0, np.intp)
    if not len(ys):
        return empty, empty, np.zeros(0), empty
    h, w = dist.shape
    d = dist[ys, xs].astype(np.float64)
    # central differences of the distance (one-sided at the image border)
    gy = dist[np.minimum(ys + 1, h - 1), xs] - dist[np.maximum(ys - 1, 0), xs]
    gx = dist[ys, np.minimum(xs + 1, w - 1)] - dist[ys, np.maximum(xs - 1, 0)]
    ridge = (gy == 0) & (gx == 0)  # a ridge of the distance: no direction, no parent
    # the compass step towards the glass and its two neighbours (a 90-degree cone)
    octant = np.rint(np.arctan2(-gy, -gx) / (np.pi / 4)).astype(np.intp)
    index = np.full(dist.shape, -1, np.intp)
    index[ys, xs] = np.arange(len(ys))
    parents = []
    for turn in (0, -1, 1):
        k = (octant + turn) % 8
        py = np.clip(ys + _STEP_Y[k], 0, h - 1)
        px = np.clip(xs + _STEP_X[k], 0, w - 1)
        par = index[py, px]
        par[ridge] = -1
        has = par >= 0
        par[has] = np.where(d[par[has]] < d[has], par[has], -1)
        parents.append(par)  # candidates nearer the glass only: the rays form no cycle
    seed = d <= seed_px
    # on a ray after at most ~depth rounds (fixed point)
    on = seed.copy()
    for _ in range(int(d.max()) + 2):
        reach = np.zeros(len(ys), bool)
        for par in parents:
            reach |= (par >= 0) & on[np.maximum(par, 0)]
        new = reach & ~on
        if not new.any():
            break
        on |= new
    # the ray's previous pixel: the first parent on a ray, in the order centre, left, right
    # (a seed's too, so that a ray starts at the glass, not at every seed pixel)
    root = np.arange(len(ys))
    for par in parents[::-1]:
        ok = on & (par >= 0) & on[np.maximum(par, 0)]
        root[ok] = par[ok]
    while True:  # pointer jumping to the ray's first pixel
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    keep = np.nonzero(on)[0]
    renum = np.full(len(ys), -1, np.intp)
    renum[keep] = np.arange(len(keep))
    return ys[keep], xs[keep], d[keep], renum[root[keep]]


def _capsule_depth_limit(
    ys: np.ndarray, xs: np.ndarray, depth: np.ndarray, root: np.ndarray,
    bare: tuple[np.ndarray, ...], band_px: float, mpp: float,
) -> np.ndarray:
    """How deep every ray pixel may be and still be capsule (pixels; inf: the whole ray).

    A ray's neighbours are the rays starting within about CAPSULE_LOCAL_UM along the edge
    (the k nearest starts, at about one per pixel of edge). A ray that reaches the bottom of
    the band (``band_px``), or runs deeper than CAPSULE_SEPTUM_FACTOR times its neighbours'
    typical depth (CAPSULE_TYPICAL_QUANTILE of theirs) plus a pixel, is a septum or a portal
    tract meeting the capsule: it is capsule down to the median depth of the neighbours that
    are not (the bare edge, ``bare``, counting as depth 0), plus a pixel. Any other ray is
    capsule all along, so a thicker stretch of capsule is removed whole.
    """
    starts = np.unique(root)
    ray_depth = np.zeros(len(ys))
    np.maximum.at(ray_depth, root, depth)
    # rays that converge leave short ones beside them (a pixel has one parent): a ray's
    # depth is the deepest within 2 pixels of where it starts
    h = int(ys.max()) + 3
    w = int(xs.max()) + 3
    img = np.zeros((h, w), np.float32)
    img[ys[starts], xs[starts]] = ray_depth[starts]
    rd = cv2.dilate(img, _disk(2))[ys[starts], xs[starts]].astype(np.float64)
    pts = np.concatenate([np.column_stack([ys[starts], xs[starts]]),
                          np.column_stack(bare)]).astype(np.float64)
    # about one sample per pixel of edge: the k nearest span ~2 CAPSULE_LOCAL_UM of it. The
    # windows are taken round every k/16-th start (in raster order: spread along the edge),
    # and every start has the window of the nearest of those.
    n = len(starts)
    k = int(min(len(pts), max(8, round(2 * CAPSULE_LOCAL_UM / mpp))))
    centres = pts[: n : max(1, k // 16)]
    _, nn = cKDTree(pts).query(centres, k=k)
    nn = np.asarray(nn).reshape(len(centres), k)
    owner = np.asarray(cKDTree(centres).query(pts[:n], k=1)[1])
    rays = np.concatenate([rd, np.full(len(bare[0]), np.nan)])  # bare edge: no ray
    # a centre is a ray: never all nan
    typical = _row_nanquantile(rays[nn], CAPSULE_TYPICAL_QUANTILE)[owner]
    deep = (rd >= band_px - 1.5) | (rd > CAPSULE_SEPTUM_FACTOR * typical + 1.0)
    limit = np.full(len(ys), np.inf)
    if not deep.any():
        return limit
    votes = np.concatenate([np.where(deep, np.nan, rd), np.zeros(len(bare[0]))])
    near = votes[nn]
    centre_local = np.full(len(centres), np.nan)
    some = ~np.isnan(near).all(axis=1)
    if some.any():
        centre_local[some] = np.nanmedian(near[some], axis=1) + 1.0
    local = centre_local[owner[deep]]
    # no capsule ray or bare edge nearby: the section's capsule width
    local[np.isnan(local)] = 1.25 * capsule_width_px(depth) + 1.0
    at_start = np.full(len(ys), np.inf)
    at_start[starts[deep]] = local
    return at_start[root]


def _row_nanquantile(a: np.ndarray, q: float) -> np.ndarray:
    """``np.nanquantile(a, q, axis=1)`` (linear interpolation) of a 2-D float array, by one
    sort instead of numpy's loop over rows; rows must hold at least one number."""
    s = np.sort(a, axis=1)  # NaN last
    n = np.count_nonzero(~np.isnan(a), axis=1)
    pos = q * (n - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    rows = np.arange(len(a))
    below, above, t = s[rows, lo], s[rows, hi], pos - lo
    diff = above - below
    # numpy's own interpolation: from the nearer end, so that the result is exact at t = 1
    return np.where(t >= 0.5, above - diff * (1 - t), below + diff * t)


def _components_with(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``mask`` that hold a ``seeds`` pixel (seeds within mask):
    ``ndi.binary_propagation(seeds, mask=mask, structure=np.ones((3, 3)))``, by one labelling."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if not seeds.any():
        return np.zeros(mask.shape, bool)
    n, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    keep = np.zeros(n, bool)
    keep[labels[seeds]] = True
    keep[0] = False
    return keep[labels]


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


#: Fold growth: connected parenchyma whose counterstain is above this multiple of the median.
FOLD_GROW_FACTOR = 1.35
#: Smoothing of the parenchyma's counterstain for the fold test, µm (Gaussian sigma).
FOLD_SMOOTH_UM = 5.0
#: Holes in a fold up to this size (µm²) are fold (the septa and vessels of either layer).
FOLD_HOLE_UM2 = 2000.0
#: Collagen (not parenchyma) within this distance of a fold is fold too, µm.
FOLD_COLLAGEN_UM = 10.0
#: A fold is a double layer with a sharp edge: just inside its outline (from 2 to 4 smoothing
#: widths in) its parenchyma's counterstain is at least this multiple of that just outside
#: (as far out). A flap folded over the section doubles it at once; a darker region of the
#: section (denser cells, a thicker cut, picric-acid-rich cells in Sirius red tumour cores)
#: rises gradually across its outline.
FOLD_EDGE_RATIO = 1.5
#: Parenchyma whose counterstain (median, OD) is at most this has no layer to see doubled:
#: real liver parenchyma carries 0.18 (picric acid) to 0.3-0.65 (ponceau), the pale collagen
#: stroma of real Sirius red tumour cores 0.014-0.047, where picric-acid-rich cell islands,
#: 2-5 times as yellow and sharply bounded, were excluded as folds (5-18 % of the core).
FOLD_MIN_LEVEL_OD = 0.08
#: ... and the whole fold's median at most this multiple of its surroundings' (two layers of
#: the same tissue; a blob of much denser stain is no fold).
FOLD_MAX_RATIO = 3.0


def double_layers(
    candidates: np.ndarray, mean: np.ndarray, parenchyma: np.ndarray, sigma_px: float
) -> np.ndarray:
    """The fold candidates that are a double layer: a step in counterstain at their outline.

    For every 8-connected candidate region, the median smoothed counterstain of its band from
    ``2 sigma`` to ``4 sigma`` inside its outline is compared with that of the parenchyma
    from ``2 sigma`` to ``4 sigma`` outside it (at least 1 and 3 pixels): a flap folded over
    the section doubles the layer at once, at the fold line or the flap's edge
    (``FOLD_EDGE_RATIO``); a darker region of the section rises gradually. The region's median
    over that of the outer band must also stay below ``FOLD_MAX_RATIO``. A region too thin for
    its inner band is compared whole; one without parenchyma around it is not a fold.

    Parameters
    ----------
    candidates : ndarray of bool, shape (H, W)
    mean : ndarray of float32, shape (H, W)
        The parenchyma's counterstain, smoothed (OD units).
    parenchyma : ndarray of bool, shape (H, W)
        Where ``mean`` is meaningful (parenchyma around).
    sigma_px : float
        The smoothing width of ``mean``, pixels.

    Returns
    -------
    ndarray of bool, shape (H, W)
        The candidate regions kept.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(candidates).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    out = np.zeros(candidates.shape, bool)
    near, far = max(2 * sigma_px, 1.0), max(4 * sigma_px, 3.0)
    margin = int(np.ceil(far)) + 2
    h, w = candidates.shape
    for i in range(1, n):
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        ys = slice(max(y - margin, 0), min(y + bh + margin, h))
        xs = slice(max(x - margin, 0), min(x + bw + margin, w))
        region = labels[ys, xs] == i
        u8 = region.view(np.uint8)
        inside = cv2.distanceTransform(u8, cv2.DIST_L2, 3)
        outside = cv2.distanceTransform(1 - u8, cv2.DIST_L2, 3)
        m = mean[ys, xs]
        ring = parenchyma[ys, xs] & ~region & (outside > near) & (outside <= far)
        ring &= ~candidates[ys, xs]  # another candidate is no surrounding
        if np.count_nonzero(ring) < 3:
            continue
        band = region & (inside > near) & (inside <= far)
        if np.count_nonzero(band) < 3:
            band = region
        around = float(np.median(m[ring]))
        if around <= 0:
            continue
        step = float(np.median(m[band])) / around
        whole = float(np.median(m[region])) / around
        if step >= FOLD_EDGE_RATIO and whole <= FOLD_MAX_RATIO:
            out[ys, xs] |= region
    return out


def with_folds(
    tissue: TissueMask, counterstain: np.ndarray, settings: TissueSettings,
    collagen: np.ndarray, threshold_od: float,
) -> TissueMask:
    """Exclude folds: parenchyma two layers thick, its counterstain about doubled.

    Only parenchyma is compared: pixels whose collagen-stain concentration is at most
    ``threshold_od`` (septa, capsule and vessel walls carry little counterstain in either
    layer). Its counterstain is averaged over the parenchyma within ~5 µm (a masked Gaussian
    mean, so collagen does not dilute it). Where that mean exceeds ``fold_od_factor`` times
    its median over the section over at least ``fold_min_area_um2``, a fold starts; it grows
    through connected parenchyma above 1.35 times the median. It is kept only if it is a double
    layer, with a sharp step of its counterstain at its outline (:func:`double_layers`): a
    region of the section that is darker without being folded is not excluded. Holes in a fold
    up to 2,000 µm² (the septa and vessels of either layer), and collagen within 10 µm of it
    (the flap's capsule, folded in), are fold too.

    Parameters
    ----------
    tissue : TissueMask
    counterstain : ndarray of float32, shape like the masks
        Counterstain (picric acid / ponceau-fuchsin) concentration, OD units.
    settings : TissueSettings
    collagen : ndarray of float32, shape like the masks
        Collagen-stain concentration, OD units.
    threshold_od : float
        The slide's collagen threshold (parenchyma is at or below it).

    Returns
    -------
    TissueMask
        With ``fold`` set and removed from ``tissue``.
    """
    if not settings.exclude_folds or not tissue.tissue.any():
        return tissue
    par = tissue.tissue & (collagen <= threshold_od)
    if not par.any():
        return tissue
    sigma = max(FOLD_SMOOTH_UM / tissue.mpp, 0.5)
    amount = gaussian_blur((np.maximum(counterstain, 0) * par).astype(np.float32, copy=False),
                           sigma)
    share = gaussian_blur(par.astype(np.float32), sigma)
    covered = share > 0.2  # mostly collagen, lumen or glass around: no parenchyma to judge
    # in place (the same values): thumbnail-sized, not held through the steps below (peak
    # memory)
    mean = np.divide(amount, np.maximum(share, 1e-3, out=share), out=amount)
    del amount, share
    level = median(mean[par])
    if level <= FOLD_MIN_LEVEL_OD:
        return tissue
    ok = tissue.tissue & covered
    core = remove_small_objects_fast(ok & (mean > settings.fold_od_factor * level),
                                     _px(settings.fold_min_area_um2, tissue.mpp), connectivity=1)
    if not core.any():
        return tissue
    fold = _components_with(ok & (mean > FOLD_GROW_FACTOR * level), core)
    fold = double_layers(fold, mean, ok, sigma)
    if not fold.any():
        return tissue
    fold = remove_small_holes_fast(fold, _px(FOLD_HOLE_UM2, tissue.mpp)) & tissue.tissue
    # the collagen at its edge (the flap's capsule, folded in; septa of either layer)
    near = cv2.dilate(fold.view(np.uint8), _disk(FOLD_COLLAGEN_UM / tissue.mpp)).view(bool)
    fold |= near & tissue.tissue & ~par
    return replace(
        tissue, tissue=tissue.tissue & ~fold, fold=fold, capsule_band=tissue.capsule_band & ~fold,
        vessel_wall=tissue.vessel_wall & ~fold,
    )


# ------------------------------------------------------------------------------------------
# Air bubbles
# ------------------------------------------------------------------------------------------

#: A bubble's outline must overlap the ellipse fitted to it by at least this (intersection over
#: union; round and oval bubbles score 0.95-1, lumens, tears and fat clusters much less).
BUBBLE_MIN_ELLIPSE_IOU = 0.85
#: Shortest over longest axis of the fitted ellipse (coverslip pressure flattens bubbles a little).
BUBBLE_MIN_AXIS_RATIO = 0.4
#: Least share of a bubble's area inside its rim (a solid dark blob is not a bubble).
BUBBLE_MIN_INTERIOR = 0.25
#: A bubble cut by the image frame: its outline's greatest distance from the chord joining its
#: ends, over the chord's length, at least this (an arc of 45 degrees or more; a dark line
#: cutting off a corner of the image is straighter).
BUBBLE_MIN_ARC_SAGITTA = 0.1
#: Largest difference between the shares of tissue (pixels above the glass threshold) just
#: inside and just outside a bubble's rim.
BUBBLE_MAX_SUBSTRATE_CHANGE = 0.5
#: Least share of a bubble's outline (frame excluded) with a rim pixel reaching
#: ``bubble_rim_od`` within a third of ``bubble_rim_max_um`` (a rim is dark all round; strands
#: of dark tissue around a fat vacuole are dark in patches).
BUBBLE_MIN_DARK_OUTLINE = 0.6
#: Rim pixels down to this fraction of ``bubble_rim_od`` continue a thin dark structure that
#: reaches it (hysteresis: a rim narrows and fades along its outline, and blur dilutes it).
BUBBLE_FAINT_RIM = 0.75
#: Gaps along a rim bridged before looking for closed rings (closing radius), µm.
BUBBLE_GAP_UM = 1.5


def _disk(radius_px: float) -> np.ndarray:
    r = max(round(radius_px), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _open_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Opening of a bool mask with a disk, by two distance transforms (cost independent of the
    radius; the image frame does not erode)."""
    u8 = np.ascontiguousarray(mask).view(np.uint8)
    core = cv2.distanceTransform(u8, cv2.DIST_L2, 5) > radius_px
    if not core.any():
        return core
    return cv2.distanceTransform((~core).view(np.uint8), cv2.DIST_L2, 5) <= radius_px


def rim_candidates(
    rgb: np.ndarray, background_rgb: Vector, settings: TissueSettings,
    od: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark, achromatic pixels: what a bubble's refractile rim looks like.

    A rim scatters light of every colour out of the objective, so its optical density is high in
    all three channels alike. The *grey OD* of a pixel, the smallest of its R, G, B optical
    densities, is a lower bound on that colourless absorption: stains absorb one or two channels
    and leave the third nearly clear (Sirius red, picric acid, aniline blue and ponceau have a
    channel below 0.2 of their OD norm). Dark enough pixels must also be nearly grey: the spread
    of their three ODs, relative to their sum, at most ``bubble_rim_chroma`` (stains alone have
    0.4-0.8; dark purple trichrome mixtures about 0.2 and iron-haematoxylin nuclei, themselves
    near black, about 0.03, which the ring tests of :func:`detect_bubbles` then reject).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    background_rgb : tuple of 3 float
        Glass intensity of the slide.
    settings : TissueSettings
    od : ndarray of float32, shape (H, W, 3), optional
        ``rgb_to_od(rgb, background_rgb)`` when the caller has it already.

    Returns
    -------
    faint : ndarray of bool, shape (H, W)
        Achromatic pixels with a grey OD of at least ``BUBBLE_FAINT_RIM * bubble_rim_od``.
    dark : ndarray of bool, shape (H, W)
        Those reaching ``bubble_rim_od``.
    grey : ndarray of float32, shape (H, W)
        Grey OD (smallest channel OD).
    """
    if od is None:
        od = rgb_to_od(rgb, background_rgb)
    grey = np.minimum(od[..., 0], od[..., 1])
    np.minimum(grey, od[..., 2], out=grey)
    faint = grey >= np.float32(BUBBLE_FAINT_RIM * settings.bubble_rim_od)
    if faint.any():
        od_faint = od[faint]  # (n, 3): the channel ODs of the candidates
        spread = channel_spread(od_faint)
        faint[faint] = spread <= settings.bubble_rim_chroma * od_faint.sum(axis=1)
    return faint, faint & (grey >= np.float32(settings.bubble_rim_od)), grey


def detect_bubbles(
    rgb: np.ndarray,
    mpp: float,
    settings: TissueSettings,
    background_rgb: Vector,
    above_glass: np.ndarray | None = None,
    *,
    od: np.ndarray | None = None,
) -> np.ndarray:
    """Find air bubbles trapped under the coverslip.

    A bubble is a round or oval region bounded by a thin, dark, grey rim: light crossing the
    curved air/mountant interface is refracted out of the objective. Inside, glass looks like
    glass and tissue is visible (often paler); neither is measured. The method:

    1. rim pixels: dark and achromatic (:func:`rim_candidates`), down to ``BUBBLE_FAINT_RIM``
       of ``bubble_rim_od``; gaps up to ``2 * BUBBLE_GAP_UM`` closed;
    2. only *thin* structures are kept: what an opening with a disk of diameter
       ``bubble_rim_max_um`` removes, plus what it keeps in blobs smaller than a disk of
       diameter ``2 * bubble_rim_max_um`` (where a rim crosses a strand); larger dark areas
       (dark tissue, nuclear clusters, folds, an over-stained capsule) are removed. A structure
       must reach ``bubble_rim_od`` somewhere (hysteresis);
    3. each connected thin structure that encloses holes (the image frame closing it where it
       touches the frame, so that rings cut by the frame close too) gives candidates: the
       structure filled; else that region opened with a disk of diameter ``2 *
       bubble_rim_max_um`` (a rim merged with a dark strand or band it crosses); else each hole
       with the rim around it. A candidate is a bubble when
       (a) its area is within ``[bubble_min_area_um2, bubble_max_area_um2]`` and at least
       ``BUBBLE_MIN_INTERIOR`` of it lies inside the rim;
       (b) it matches the ellipse fitted to its outline (frame excluded; a frame-cut outline
       must be curved, ``BUBBLE_MIN_ARC_SAGITTA``) with intersection over union
       ``>= BUBBLE_MIN_ELLIPSE_IOU`` and axis ratio ``>= BUBBLE_MIN_AXIS_RATIO``;
       (c) the rim's median grey OD exceeds both the inside's and that of a band of width
       ``bubble_rim_max_um`` outside it by ``bubble_contrast_od`` (a fat vacuole or lumen
       inside dark tissue has no lighter surround);
       (d) inside and outside lie over the same substrate: their shares of pixels above the
       glass threshold differ by at most ``BUBBLE_MAX_SUBSTRATE_CHANGE`` (a dark capsule along
       the edge of a small round section has tissue inside and glass outside);
       (e) at least ``BUBBLE_MIN_DARK_OUTLINE`` of the outline has a rim pixel reaching
       ``bubble_rim_od`` near it (a rim is dark all round, strands of dark tissue in patches).

    Stain-coloured structures (septa, collagen, vessel walls) fail step 1; nuclei, pigment and
    dark tissue fail steps 2-3.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        Low-resolution image of the slide. Rims narrower than about two pixels are diluted by
        the downsampling and may be missed: use a finer ``tissue_mpp`` then.
    mpp : float
        µm per pixel of ``rgb``.
    settings : TissueSettings
    background_rgb : tuple of 3 float
        Glass intensity of the slide.
    above_glass : ndarray of bool, shape (H, W), optional
        Pixels above the glass threshold (computed with :func:`glass_threshold` when not given).
    od : ndarray of float32, shape (H, W, 3), optional
        ``rgb_to_od(rgb, background_rgb)`` when the caller has it already.

    Returns
    -------
    ndarray of bool, shape (H, W)
        The bubbles, rims included, over tissue and glass alike.

    Examples
    --------
    >>> from fibroquant.config import TissueSettings
    >>> from fibroquant.synthetic import SectionParams, make_section
    >>> rgb, truth = make_section(SectionParams(shape=(512, 512), bubbles=2), rng=3)
    >>> found = detect_bubbles(rgb, 0.5, TissueSettings(), truth.stains.background_rgb)
    >>> bool((found & truth.bubble_mask).sum() > 0.9 * truth.bubble_mask.sum())
    True
    """
    h, w = rgb.shape[:2]
    out = np.zeros((h, w), bool)
    min_px = max(settings.bubble_min_area_um2 / mpp**2, 1.0)
    max_px = settings.bubble_max_area_um2 / mpp**2
    if h * w < min_px:
        return out
    faint, dark, grey = rim_candidates(rgb, background_rgb, settings, od)
    if np.count_nonzero(dark) < 8:
        return out
    if above_glass is None:
        od_sum = channel_sum(rgb_to_od(rgb, background_rgb))
        above_glass = od_sum > glass_threshold(od_sum, settings)
    rim_px = settings.bubble_rim_max_um / mpp
    closed = cv2.morphologyEx(faint.view(np.uint8), cv2.MORPH_CLOSE, _disk(BUBBLE_GAP_UM / mpp))
    wide = _open_disk(closed.view(bool), rim_px / 2)
    # small wide blobs stay: where a rim crosses a dark strand or a nucleus it widens locally
    blobs = remove_small_objects_fast(wide, int(np.pi * rim_px**2) + 1, connectivity=2)
    thin = (closed > 0) & ~blobs
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        thin.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    # hysteresis: a thin structure counts if it is dark somewhere; its fainter stretches (where
    # the rim narrows and blur dilutes it) continue it
    has_dark = np.bincount(labels[dark & thin], minlength=n) > 0
    bbox_area = stats[:, cv2.CC_STAT_WIDTH] * stats[:, cv2.CC_STAT_HEIGHT]
    margin = int(np.ceil(2 * rim_px)) + 2
    limits = _Limits(min_px, max_px, rim_px, settings.bubble_contrast_od, settings.bubble_rim_od)
    for i in np.flatnonzero((bbox_area >= min_px) & has_dark):
        if i == 0:
            continue
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        y0, y1 = max(y - margin, 0), min(y + bh + margin, h)
        x0, x1 = max(x - margin, 0), min(x + bw + margin, w)
        ring = labels[y0:y1, x0:x1] == i
        holes, n_holes = _enclosed(ring, (y == 0, y + bh == h, x == 0, x + bw == w))
        if n_holes == 0:
            continue
        for cand, (sy, sx), alone in _candidates(ring, holes, n_holes, limits):
            (ch, cw), gy, gx = cand.shape, y0 + sy, x0 + sx
            ys, xs = slice(gy, gy + ch), slice(gx, gx + cw)
            if np.count_nonzero(cand & out[ys, xs]) > 0.5 * np.count_nonzero(cand):
                continue  # already found (as a piece of the opened structure)
            win = _Window(ring[sy : sy + ch, sx : sx + cw], grey[ys, xs], above_glass[ys, xs],
                          gy, gx, h, w)
            if _is_bubble(cand, win, limits):
                out[ys, xs] |= cand
                if alone:
                    break
    return out


@dataclass(frozen=True)
class _Limits:
    """Size and contrast limits in pixels / OD (see :func:`detect_bubbles`)."""

    min_px: float
    max_px: float
    rim_px: float
    contrast_od: float
    rim_od: float


@dataclass(frozen=True)
class _Window:
    """One thin dark structure and the image around it."""

    ring: np.ndarray  # bool, the structure
    grey: np.ndarray  # float32, grey OD
    above_glass: np.ndarray  # bool
    y0: int  # window origin in the image
    x0: int
    height: int  # the image's shape
    width: int


def _candidates(
    ring: np.ndarray, holes: np.ndarray, n_holes: int, limits: _Limits
) -> Iterator[tuple[np.ndarray, tuple[int, int], bool]]:
    """Candidate bubbles of one structure, most inclusive first (see :func:`detect_bubbles`).

    Yields ``(mask, (y, x), alone)``: a candidate in a box of the window starting at ``(y, x)``
    (the candidate plus a margin), and whether, once accepted, the others need not be tried
    (the structure filled). Then the filled structure opened, piece by piece (bubbles whose rims
    touch a dark strand or band), then each hole with its rim (touching bubbles).
    """
    whole = ring | (holes > 0)
    yield whole, (0, 0), True
    margin = int(np.ceil(2 * limits.rim_px)) + 2
    opened = _open_disk(whole, limits.rim_px)
    if opened.any() and not np.array_equal(opened, whole):
        _, lab, stats, _ = cv2.connectedComponentsWithStats(opened.view(np.uint8), connectivity=4)
        for j in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= limits.min_px):
            if j:
                box = _box(stats[j], margin, whole.shape)
                yield lab[box] == j, (box[0].start, box[1].start), False
    if n_holes < 2:
        return
    _, lab, stats, _ = cv2.connectedComponentsWithStats((holes > 0).view(np.uint8), connectivity=4)
    for j in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= BUBBLE_MIN_INTERIOR * limits.min_px):
        if j:
            box = _box(stats[j], margin, whole.shape)
            hole = lab[box] == j
            near = cv2.distanceTransform((~hole).view(np.uint8), cv2.DIST_L2, 3) <= limits.rim_px
            rimmed = fill_holes(hole | near & ring[box])
            yield rimmed, (box[0].start, box[1].start), False


def _box(stat: np.ndarray, margin: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Slices of a component's bounding box (OpenCV stats row) plus a margin, within shape."""
    x, y, w, h = (int(v) for v in stat[:4])
    return (slice(max(y - margin, 0), min(y + h + margin, shape[0])),
            slice(max(x - margin, 0), min(x + w + margin, shape[1])))


def _enclosed(ring: np.ndarray, walls: tuple[bool, bool, bool, bool]) -> tuple[np.ndarray, int]:
    """Label the regions a ring encloses, the image frame closing it on the sides it touches.

    Parameters
    ----------
    ring : ndarray of bool
        One connected structure in a window around it.
    walls : tuple of 4 bool
        Whether the structure touches the image frame at the top, bottom, left, right (the
        window then ends at the frame there).

    Returns
    -------
    labels : ndarray of int32
        0 on the ring and outside, 1..n on the enclosed regions.
    n : int
    """
    top, bottom, left, right = walls
    pad = np.zeros((ring.shape[0] + 2, ring.shape[1] + 2), np.uint8)
    pad[1:-1, 1:-1] = ring
    if top:
        pad[0, :] = 1
    if bottom:
        pad[-1, :] = 1
    if left:
        pad[:, 0] = 1
    if right:
        pad[:, -1] = 1
    n, lab = cv2.connectedComponents(1 - pad, connectivity=4, ltype=cv2.CV_32S)
    if n <= 1:
        return np.zeros(ring.shape, np.int32), 0
    # the outside: regions reaching an open side of the window, else (closed on all four sides)
    # the largest region
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    outside = np.zeros(n, bool)
    outside[border] = True
    outside[0] = True
    if outside[1:].sum() == 0:
        sizes = np.bincount(lab.ravel(), minlength=n)
        sizes[0] = 0
        outside[int(np.argmax(sizes))] = True
    keep = np.flatnonzero(~outside)
    remap = np.zeros(n, np.int32)
    remap[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return remap[lab[1:-1, 1:-1]], len(keep)


def _is_bubble(cand: np.ndarray, win: _Window, limits: _Limits) -> bool:
    """Size, interior, ellipse, contrast and substrate tests of one candidate (see
    :func:`detect_bubbles`)."""
    area = int(np.count_nonzero(cand))
    if not limits.min_px <= area <= limits.max_px:
        return False
    inside = cand & ~win.ring
    if np.count_nonzero(inside) < BUBBLE_MIN_INTERIOR * area:
        return False
    outline = _elliptic(cand, win)
    if outline is None:
        return False
    # the rim is dark (not only faint) along most of the outline
    not_dark = ~(win.ring & (win.grey >= np.float32(limits.rim_od)))
    to_dark = cv2.distanceTransform(not_dark.view(np.uint8), cv2.DIST_L2, 3)
    dark_near = to_dark[outline[:, 1], outline[:, 0]] <= max(limits.rim_px / 3, 2.0)
    if float(dark_near.mean()) < BUBBLE_MIN_DARK_OUTLINE:
        return False
    u8 = cand.view(np.uint8)
    depth = cv2.distanceTransform(u8, cv2.DIST_L2, 3)
    dist_out = cv2.distanceTransform(1 - u8, cv2.DIST_L2, 3)
    rim_px = limits.rim_px
    rim = win.ring & cand & (depth <= rim_px)
    core = inside & (depth > rim_px)
    if np.count_nonzero(core) < 0.1 * np.count_nonzero(inside):
        core = inside
    shell = (dist_out > 1.5) & (dist_out <= rim_px + 1.5) & ~win.ring
    if not rim.any() or not core.any() or not shell.any():
        return False
    # contrast: the rim is darker than what it encloses and than what surrounds it
    level = float(np.median(win.grey[rim])) - limits.contrast_od
    if float(np.median(win.grey[core])) > level or float(np.median(win.grey[shell])) > level:
        return False
    # substrate: a bubble lies over tissue and glass alike, its outline does not follow the
    # tissue/glass edge
    inner = inside & (depth > rim_px) & (depth <= 2 * rim_px + 1.5)
    if np.count_nonzero(inner) < 0.1 * np.count_nonzero(inside):
        inner = core
    change = abs(float(win.above_glass[inner].mean()) - float(win.above_glass[shell].mean()))
    return change <= BUBBLE_MAX_SUBSTRATE_CHANGE


def _elliptic(cand: np.ndarray, win: _Window) -> np.ndarray | None:
    """The outline (x, y points, image frame excluded) of a candidate if it is an ellipse's."""
    u8 = cand.view(np.uint8)
    contours, _ = cv2.findContours(u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    pts = max(contours, key=len).reshape(-1, 2)
    gx, gy = pts[:, 0] + win.x0, pts[:, 1] + win.y0
    on_frame = (gx == 0) | (gx == win.width - 1) | (gy == 0) | (gy == win.height - 1)
    if on_frame.any():  # the frame is no outline: keep the arc(s), in order along the contour
        shift = -int(np.flatnonzero(on_frame)[-1]) - 1
        pts = np.roll(pts, shift, axis=0)[~np.roll(on_frame, shift)]
        if len(pts) < 12 or not _curved(pts):
            return None
    if len(pts) < 12:
        return None
    (cx, cy), (ax1, ax2), angle = cv2.fitEllipse(pts.astype(np.float32))
    if not (np.isfinite([cx, cy, ax1, ax2]).all() and min(ax1, ax2) > 1):
        return None
    if min(ax1, ax2) < BUBBLE_MIN_AXIS_RATIO * max(ax1, ax2):
        return None
    # the window spans the candidate plus a margin: an ellipse reaching past an inner side of
    # the window (one not at the image frame) does not follow the candidate
    t = np.radians(angle)
    a, b = ax1 / 2, ax2 / 2
    ex = np.hypot(a * np.cos(t), b * np.sin(t))
    ey = np.hypot(a * np.sin(t), b * np.cos(t))
    wh, ww = cand.shape
    if ((cx - ex < -1 and win.x0 > 0) or (cx + ex > ww and win.x0 + ww < win.width)
            or (cy - ey < -1 and win.y0 > 0) or (cy + ey > wh and win.y0 + wh < win.height)):
        return None
    ell = np.zeros_like(u8)
    cv2.ellipse(ell, ((cx, cy), (ax1, ax2), angle), 1, thickness=-1)
    ell = ell.view(bool)
    if np.count_nonzero(ell & cand) < BUBBLE_MIN_ELLIPSE_IOU * np.count_nonzero(ell | cand):
        return None
    return pts


def _curved(arc: np.ndarray) -> bool:
    """Whether an ordered outline bulges enough off the chord joining its ends."""
    p0, p1 = arc[0].astype(np.float64), arc[-1].astype(np.float64)
    chord = p1 - p0
    length = float(np.hypot(*chord))
    if length < 1:
        return True  # the ends meet: a closed outline
    d = np.abs(chord[0] * (arc[:, 1] - p0[1]) - chord[1] * (arc[:, 0] - p0[0])) / length
    return float(d.max()) >= BUBBLE_MIN_ARC_SAGITTA * length


def _under_rims(raw: np.ndarray, bubble: np.ndarray, rim_px: float) -> np.ndarray:
    """Tissue-or-glass under bubble rims, from the pixels around them.

    A rim absorbs over glass as much as over tissue, so the glass threshold would call a rim
    over glass tissue. Rim pixels (the outer ``rim_px`` of each bubble, and two pixels outside
    it for the blur) take the majority of the known pixels within ``rim_px`` (a box): tissue
    outside or deeper inside the bubble.

    Parameters
    ----------
    raw : ndarray of bool
        Pixels above the glass threshold.
    bubble : ndarray of bool
    rim_px : float
        Widest rim, pixels.

    Returns
    -------
    ndarray of bool
        ``raw`` with rim pixels decided from their surroundings.
    """
    b8 = bubble.view(np.uint8)
    # depth inside the bubble (the image frame is no edge of it); the band and a 2-px halo
    depth = cv2.distanceTransform(b8, cv2.DIST_L2, 3)
    band = (cv2.dilate(b8, _disk(2)) > 0) & (depth <= rim_px)
    ys, xs = np.nonzero(band.any(axis=1))[0], np.nonzero(band.any(axis=0))[0]
    k = 2 * round(max(rim_px, 2.0)) + 1  # a box reaching rim_px each way
    y0, y1 = max(ys[0] - k, 0), min(ys[-1] + k + 1, raw.shape[0])
    x0, x1 = max(xs[0] - k, 0), min(xs[-1] + k + 1, raw.shape[1])
    sub_band = band[y0:y1, x0:x1]
    known = (~sub_band).astype(np.float32)
    num = cv2.blur(raw[y0:y1, x0:x1] * known, (k, k))
    den = cv2.blur(known, (k, k))
    out = raw.copy()
    out[y0:y1, x0:x1][sub_band] = (num > 0.5 * den)[sub_band] & (den > 1e-3)[sub_band]
    return out
