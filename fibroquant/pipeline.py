"""One slide from file to measurements: the per-slide recipe.

:func:`calibrate_slide` finds everything a slide's tiles are measured with, from its thumbnail
and a sample of its pixels (optics, glass colour, tissue and exclusions, stain vectors, collagen
threshold and rule); :func:`measure_tiles` then streams the tiles that touch tissue;
:func:`analyze_slide` does both and returns a :class:`fibroquant.measure.SlideResult`.
Running slides as tasks (worker processes, Dask) is :mod:`fibroquant.executor`.

Memory is bounded by the tile size, not the slide size: the tissue mask comes from a thumbnail,
and only tiles that touch tissue are read, one per worker thread at a time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fibroquant import __version__, focus, kernels
from fibroquant.bitmask import BitMask
from fibroquant.collagen import (
    BAND_MIN_GUARD,
    BAND_SHARE_SIGMA_UM,
    BAND_THRESHOLD_DROP,
    CollagenRule,
    CollagenThreshold,
    auto_blob_area,
    calibrate_threshold,
    pale_band_weight,
    parenchyma_background,
)
from fibroquant.confidence import FAINT_COLLAGEN_OD
from fibroquant.config import Settings
from fibroquant.cores import release_code_pages, release_free_heap, tune_malloc
from fibroquant.errors import FibroquantError, SlideReadError
from fibroquant.measure import Measurements, SlideQC, SlideResult, TileCounts
from fibroquant.registration import estimate_channel_shifts
from fibroquant.shading import CorrectedSlide, estimate_shading, fit_image
from fibroquant.slides import Slide, open_slide, require_colour, require_mpp
from fibroquant.stains import (
    STAIN_FIT_MAX_PIXELS,
    StainEstimate,
    StainMatrix,
    Vector,
    angle_deg,
    channel_sum,
    estimate_background,
    estimate_stains,
    glass_median,
    median,
    od_lut,
    preset_for,
    rgb_to_od,
    row_norm,
    stain_fit,
    stain_mismatch,
    stain_verdict,
    tissue_pixels,
)
from fibroquant.tiles import (
    Geometry,
    PixelDecider,
    TileJob,
    calibration_pixels,
    class_flags,
    map_tiles,
    plan_geometry,
    registration_tiles,
    tile_grid,
    tissue_boxes,
)
from fibroquant.tissue import (
    TissueMask,
    detect_tissue,
    no_tissue_reason,
    with_capsule,
    with_folds,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """What a slide's tiles are measured with (:func:`calibrate_slide`).

    Attributes
    ----------
    slide : Slide
        The slide with its optics corrected (:class:`fibroquant.shading.CorrectedSlide`), or
        as given.
    geometry : Geometry
    thumbnail : ndarray of uint8
        The evenly lit tissue-detection image, at ``thumbnail_mpp`` µm per pixel.
    thumbnail_mpp : float
    tissue : TissueMask
        Tissue and exclusions (lumens, folds, bubbles, capsule band, vessel walls).
    flags : ndarray of uint8
        The same as class bits (``kernels.FLAG_*``), at the tissue mask's resolution.
    stains : StainEstimate
    preset : StainMatrix
        The protocol's preset, with the slide's glass colour.
    threshold : CollagenThreshold
    threshold_map : ndarray of float32
        Collagen threshold at the tissue mask's resolution, OD units.
    rule : CollagenRule
        The slide's collagen decision.
    qc : SlideQC
    warnings : tuple of str
    overview : ndarray of uint8, optional
        The evenly lit overview (glass colour, shading, QC image) when ``thumbnail`` is an
        integer reduction of it (a field: :func:`tissue_image_mpp`); else None.
    overview_mpp : float
        Its µm per pixel (0 without it).
    """

    slide: Slide
    geometry: Geometry
    thumbnail: np.ndarray
    thumbnail_mpp: float
    tissue: TissueMask
    flags: np.ndarray
    stains: StainEstimate
    preset: StainMatrix
    threshold: CollagenThreshold
    threshold_map: np.ndarray
    rule: CollagenRule
    qc: SlideQC
    warnings: tuple[str, ...]
    overview: np.ndarray | None = None
    overview_mpp: float = 0.0


#: Collagen level (OD units) above which the collagen stain is reported as over-stained
#: (the faint end is :data:`fibroquant.confidence.FAINT_COLLAGEN_OD`, shared with qc_flags).
DARK_COLLAGEN_OD = 1.6


def stain_warnings(
    est: StainEstimate, preset: StainMatrix, thr: CollagenThreshold, fit: dict[str, float],
    protocol: str,
) -> list[str]:
    """Plain-language stain QC warnings for one slide.

    Parameters
    ----------
    est : StainEstimate
    preset : StainMatrix
    thr : CollagenThreshold
    fit : dict
        :func:`fibroquant.stains.stain_fit` residuals of the slide's thumbnail.
    protocol : str
        The stain the run expects (``sirius-red`` or ``masson``).
    """
    out = list(est.warnings)
    col = preset.collagen
    share = est.od_share.get(col, 0.0)
    if thr.note:
        out.append(thr.note)
    if share < 0.005:
        out.append(f"almost no {col} signal ({100 * share:.1f} % of stain OD): wrong stain?")
    mismatch = stain_mismatch(fit, protocol)
    if mismatch:
        out.append(mismatch)
    level = thr.collagen_level_od
    if np.isfinite(level) and level < FAINT_COLLAGEN_OD:
        out.append(f"faint {col} staining (collagen level {level:.2f} OD)")
    elif np.isfinite(level) and level > DARK_COLLAGEN_OD:
        out.append(f"very dark {col} staining (collagen level {level:.2f} OD): over-stained?")
    return out


_blas_lock = threading.Lock()
_blas_users = 0
_blas_undo: Any = None


@contextmanager
def blas_single_thread() -> Iterator[None]:
    """BLAS on one thread while any slide is being analysed in this process (restored when
    the last one ends).

    A slide's BLAS calls are small (3-column stain products, the 256² correlations of the
    registration check), and a threaded OpenBLAS loses on them: its idle threads spin, and
    with every core busy (tile threads, other slides) the registration check took 0.3-1.3 s
    on 2 threads against 0.04 s on one. Products of these shapes are split over rows, never
    along their sums, so the numbers do not change.
    """
    global _blas_users, _blas_undo
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _blas_undo = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_undo is not None:
                _blas_undo.restore_original_limits()
                _blas_undo = None


def analyze_slide(
    path: str | Path,
    settings: Settings,
    *,
    mpp: float | None = None,
    fallback_mpp: float | None = None,
    workers: int = 1,
    slide: Slide | None = None,
    decide: PixelDecider | None = None,
    after: Callable[[Calibration, SlideResult, PixelDecider | None], None] | None = None,
    masks_ready: Callable[[SlideResult], None] | None = None,
) -> SlideResult:
    """Measure collagen proportionate area on one slide: :func:`calibrate_slide`, then
    :func:`measure_tiles`.

    Parameters
    ----------
    path : str or Path
        Slide file (ignored when ``slide`` is given, except for naming).
    settings : Settings
    mpp : float, optional
        Level-0 µm per pixel overriding the file's metadata (a sample-sheet ``mpp`` column).
    fallback_mpp : float, optional
        Level-0 µm per pixel for files without resolution metadata (``--mpp``).
    workers : int
        Threads over tiles.
    slide : Slide, optional
        An already open slide (e.g. :class:`fibroquant.slides.ArraySlide`).
    decide : PixelDecider, optional
        A per-pixel collagen decision replacing the slide's :class:`CollagenRule` on every
        tile (see :class:`fibroquant.tiles.PixelDecider`); by default the classifier of
        ``settings.classifier``, if any.
    after : callable, optional
        Called with the calibration, the result and the pixel decider while the slide is
        still open (the zoomable QC view reads it again: :mod:`fibroquant.zoom`).
    masks_ready : callable, optional
        With ``workers > 1`` and fibre traits on: called on a thread of its own, while the
        traits are measured, with the result before its traits (``traits`` empty, ``seconds``
        0), e.g. to draw the QC overlay meanwhile; joined before this returns. Without
        ``after`` it holds the only reference to the QC image (``thumbnail``; the result
        returned has an empty one: freed once drawn, not held through the traits). Its
        exceptions are its own to keep (raised there, they are logged and lost). Not called
        otherwise: the caller does that work after.

    Returns
    -------
    SlideResult

    Raises
    ------
    FibroquantError
        Unreadable slide, greyscale image, missing resolution, no tissue.
    """
    with blas_single_thread():
        return _analyze_slide(path, settings, mpp, fallback_mpp, workers, slide, decide, after,
                              masks_ready)


def _analyze_slide(
    path: str | Path, settings: Settings, mpp: float | None, fallback_mpp: float | None,
    workers: int, slide: Slide | None, decide: PixelDecider | None,
    after: Callable[[Calibration, SlideResult, PixelDecider | None], None] | None,
    masks_ready: Callable[[SlideResult], None] | None = None,
) -> SlideResult:
    t_start = time.perf_counter()
    tune_malloc()
    own = slide is None
    sl = open_slide(path, mpp=mpp) if slide is None else slide
    if own and sl.mpp is None and fallback_mpp is not None:
        sl.close()
        sl = open_slide(path, mpp=fallback_mpp)
    try:
        if not kernels.kernels_ready():
            # load the compiled tile kernels (numba cache, ~0.5 s once per process) while the
            # thumbnail is read and analysed; the tile loop waits for it
            threading.Thread(target=_warm_quietly, name="fibroquant-warmup",
                             daemon=True).start()
        cal = calibrate_slide(sl, settings)
        release_free_heap()
        if decide is None and settings.classifier is not None:
            from fibroquant.classifier import load_cached

            decide = load_cached(settings.classifier)
        clf_label = ""  # slides.csv's `classifier`: empty when the threshold decides
        if settings.classifier is not None:
            from fibroquant.classifier import classifier_label

            clf_label = classifier_label(settings.classifier)
        if decide is not None and hasattr(decide, "for_slide"):  # the slide's stain levels
            decide = decide.for_slide(cal.threshold.collagen_level_od)
        t_wait = time.perf_counter()
        kernels.warmup_fused()  # compiling or loading kernels is not the slide's time
        t_start += time.perf_counter() - t_wait
        total, collagen_m, tissue_m, excluded_m = measure_tiles(cal, settings, workers, decide)
        if total.tissue_px == 0:
            msg = f"{sl.path.name}: no countable tissue left after exclusions"
            raise FibroquantError(msg)
        geo = cal.geometry
        qc = _qc_image(cal)
        result = SlideResult(
            settings.stains.stain.value, sl.format, require_mpp(sl), geo,
            Measurements.from_counts(total, geo.analysis_mpp), cal.stains, cal.threshold,
            cal.qc, cal.warnings, 0.0, __version__,
            collagen_m, tissue_m, excluded_m, qc, cal.flags, {}, clf_label)
        del qc  # held by the result alone (handed to masks_ready below)
        # the traits and the QC overlay need only the lumens of the calibration: without an
        # `after` step its tissue masks, threshold and guard maps (~80 MB on a 1-GP slide)
        # are freed before they run
        lumen, lumen_mpp = cal.tissue.lumen, cal.thumbnail_mpp
        cal_after = cal if after is not None else None
        del cal
        sl.drop_cache()  # segments partly read at the tissue's edge are not read again
        release_free_heap()
        beside = gate = None
        if masks_ready is not None and workers > 1 and settings.traits.enabled:
            # the overlay takes one trait thread's place until it is written: the two do not
            # stack their memory (~100 MB each on a 1-GP slide), and the cores stay busy
            gate = threading.Semaphore(workers - 1)
            # the QC image goes with it alone: freed once drawn (the thread drops its
            # arguments when done), not held through the traits' peak beside its drawing
            partial, result = result, replace(result, thumbnail=np.zeros((0, 0, 3), np.uint8))
            beside = threading.Thread(target=_quietly, args=(masks_ready, partial, gate),
                                      name="fibroquant-masks-ready", daemon=True)
            del partial
            beside.start()
        traits: dict[str, float] = {}
        vessels: list[Any] = []  # the traits' call on each lumen, outlined on the overlay
        try:
            if settings.traits.enabled:
                from fibroquant import traits as fibre_traits

                t_wait = time.perf_counter()
                # skan's per-process load (a first run's compile) is not the slide's time;
                # numba's LLVM, run by it, is not run again (its code pages go back: memory)
                if fibre_traits.warm_skan():
                    release_code_pages()
                t_start += time.perf_counter() - t_wait
                traits = fibre_traits.in_slide_areas(
                    fibre_traits.measure_slide(collagen_m, tissue_m, geo.mask_mpp,
                                               settings.traits, lumen=lumen,
                                               lumen_mpp=lumen_mpp, workers=workers, gate=gate,
                                               calls=vessels),
                    result.measurements.collagen_area_mm2)
                release_free_heap()
        finally:
            if beside is not None:
                beside.join()
        result = replace(result, seconds=round(time.perf_counter() - t_start, 3),
                         traits=traits, vessels=tuple(vessels))
        if after is not None and cal_after is not None:
            after(cal_after, result, decide)
        return result
    finally:
        if own:
            sl.close()


def calibrate_slide(slide: Slide, settings: Settings) -> Calibration:
    """Everything a slide's tiles are measured with, from its thumbnail and a pixel sample.

    The optics are corrected first (uneven illumination, misregistered colour planes: every
    later read sees the corrected slide), then the glass colour, tissue and exclusions are
    found on the thumbnail, the stain vectors and the collagen threshold on a sample of tissue
    pixels at the analysis resolution, and the threshold map, capsule and collagen rule follow.

    Parameters
    ----------
    slide : Slide
    settings : Settings

    Returns
    -------
    Calibration

    Raises
    ------
    FibroquantError
        Greyscale image, missing resolution, no tissue.
    """
    name, raw, sl = slide.path.name, slide, slide
    require_colour(sl)  # a greyscale image would read as CPA 0 %: refuse it instead
    geo = plan_geometry(sl, settings.tiling.analysis_mpp, settings.tiling.mask_max_mpx,
                        settings.tiling.read_oversample)
    extent_um = (sl.levels[0].shape[0] * require_mpp(sl), sl.levels[0].shape[1] * require_mpp(sl))
    thumb = sl.thumbnail(settings.tissue.tissue_mpp or _overview_mpp(
        extent_um, geo.analysis_mpp, settings.tissue.max_thumbnail_mpx))
    thumb_mpp = extent_um[1] / thumb.shape[1]
    background, bg_source = _background(thumb, settings)
    small = fit_image(thumb) if settings.tissue.flat_field else None
    shading = estimate_shading(thumb, background, settings.tissue, small=small)
    if shading is not None:
        # every later read (calibration pixels, tiles, QC image) sees the evenly lit slide
        sl = CorrectedSlide(raw, shading=shading)
        thumb = shading.apply(thumb, thumb.shape[:2])
        background, bg_source = _background(thumb, settings)
    if settings.stains.background_rgb is None:
        glass = _glass_background(thumb, thumb_mpp, settings, background,
                                  small if shading is None else None)
        if glass is not None:
            background, bg_source = glass, "glass"
    overview, overview_mpp = None, 0.0
    if settings.tissue.tissue_mpp is None:
        # glass colour and shading come from the overview; tissue, exclusions and the
        # threshold map from its integer reduction when it is a fine one (a field)
        k = round(tissue_image_mpp(extent_um, geo.analysis_mpp,
                                   settings.tissue.max_thumbnail_mpx) / thumb_mpp)
        if k > 1:
            overview, overview_mpp = thumb, thumb_mpp
            h, w = thumb.shape[:2]
            thumb = cv2.resize(thumb, (w // k, h // k), interpolation=cv2.INTER_AREA)
            thumb_mpp = extent_um[1] / thumb.shape[1]
    tissue = detect_tissue(thumb, thumb_mpp, settings.tissue, background)
    release_free_heap()  # its thumbnail-sized temporaries (~150 MB on a 4-MP thumbnail)
    if not tissue.tissue.any():
        why = no_tissue_reason(thumb, thumb_mpp, settings.tissue, background, tissue)
        msg = f"{name}: no tissue found: {why}"
        raise FibroquantError(msg)
    covered = tissue_boxes(tissue, geo.height / thumb.shape[0], geo.width / thumb.shape[1],
                           tile_grid(geo, settings.tiling.tile_px))
    shifts = None
    if settings.tissue.register_channels:
        shifts = estimate_channel_shifts(registration_tiles(sl, geo, covered))
        if shifts is not None:
            shifts = shifts * sl.levels[geo.level].downsample  # level-0 pixels
            sl = CorrectedSlide(raw, shading, shifts)
    preset = preset_for(settings.stains).with_background(background)
    sample = calibration_pixels(sl, geo, tissue, covered, settings.stains.sample_pixels)
    # the tiles' thumbnail rows and columns, and the segments the sample left partly read
    # (~15 + 26 MB on a 1-GP slide: those under tissue are decoded again by the tile loop)
    del covered
    sl.drop_cache()
    od_sample = rgb_to_od(sample, background)
    est = estimate_stains(od_sample, preset, settings.stains)
    stains = est.stains
    conc_sample = od_sample @ stains.unmixing
    pos = np.maximum(conc_sample, 0)
    # (channel_sum: pos.sum(axis=1)'s values, an exact zero's sign aside, which the floor hides)
    share = pos[:, stains.collagen_index] / np.maximum(channel_sum(pos), 1e-6)
    stained = row_norm(od_sample) > settings.stains.od_floor
    thr = calibrate_threshold(
        conc_sample[:, stains.collagen_index], share, settings.collagen, stained=stained,
        share_from_parenchyma=settings.share_from_parenchyma(est.counterstain_fitted()),
    )
    blob_auto = settings.collagen.blob_max_area_um2 is None
    # automatic: decided by the nuclei's stain (per slide; the settings stay as given)
    blob_um2 = auto_blob_area(pos[stained], stains) if blob_auto else \
        (settings.collagen.blob_max_area_um2 or 0.0)
    tissue, threshold_map, guard_map = _threshold_map(thumb, thumb_mpp, tissue, background,
                                                      stains, thr, settings)
    fit = stain_fit(tissue_pixels(thumb, tissue.tissue, STAIN_FIT_MAX_PIXELS), max_pixels=50_000)
    warnings = stain_warnings(est, preset, thr, fit, settings.stains.stain.value)
    verdict = stain_verdict(fit, settings.stains.stain.value)
    if blob_auto and blob_um2:
        warnings.append(
            "nuclei not iron haematoxylin (blue-purple): compact blobs up to "
            f"{blob_um2:g} µm² not counted as collagen (automatic)")
    col = stains.collagen_index
    qc = SlideQC(
        tissue.glass_od, 0.0 if shading is None else round(shading.od_range, 4),
        0.0 if shifts is None else round(float(np.hypot(*shifts.T).max()), 3),
        background, bg_source, round(angle_deg(stains.vectors[col], preset.vectors[col]), 2),
        blob_um2, fit, verdict.guess, verdict.wrong, thr.pale_counterstain)
    rule = CollagenRule.for_slide(od_lut(background), stains, thr.share_guard,
                                  settings.collagen, blob_um2, geo.analysis_mpp)
    if guard_map is not None:
        rule = replace(rule, guard_map=guard_map)
    return Calibration(sl, geo, thumb, thumb_mpp, tissue, class_flags(tissue), est, preset, thr,
                       threshold_map, rule, qc, tuple(warnings), overview, overview_mpp)


#: A tissue-detection image finer than this (µm/px) is reduced by an integer factor to
#: about a quarter of ``max_thumbnail_mpx`` (:func:`tissue_image_mpp`).
FINE_TISSUE_MPP = 2.5


def _overview_mpp(
    extent_um: tuple[float, float], analysis_mpp: float, max_thumbnail_mpx: float,
) -> float:
    """µm per pixel of the slide's overview (glass colour, shading, QC image): as coarse as
    ``max_thumbnail_mpx`` megapixels needs, never finer than the analysis."""
    return max(analysis_mpp, math.sqrt(extent_um[0] * extent_um[1] / (max_thumbnail_mpx * 1e6)))


def tissue_image_mpp(
    extent_um: tuple[float, float], analysis_mpp: float, max_thumbnail_mpx: float,
) -> float:
    """About the µm per pixel of a slide's tissue-detection image (the automatic
    ``tissue_mpp``): :func:`calibrate_slide` reduces its overview (glass colour and shading
    are found there, at ``max_thumbnail_mpx``) by the nearest integer factor to it.

    As coarse as ``max_thumbnail_mpx`` megapixels needs, never finer than the analysis. An
    image of at least ``max_thumbnail_mpx`` at the analysis resolution (a 2048² microscope
    field, by default) is reduced by the integer factor ``k`` that brings it nearest a quarter
    of that without going coarser than :data:`FINE_TISSUE_MPP`: the section, lumens and
    folds are found as well at 2 µm/px, and every step on the tissue image (detection, glass
    colour, shading, threshold map) costs ``1/k²`` of its full-resolution cost. Smaller
    images and slides from 100 mm² up (whose 4-MP tissue image is coarser than 2.5 µm/px)
    keep their tissue image; between them it is at most 2.5 µm/px (a 4 x 4 mm slide at
    0.5 µm/px: 2.5 instead of 2.0).

    Parameters
    ----------
    extent_um : tuple of 2 float
        Height and width of the slide, µm.
    analysis_mpp : float
        µm per pixel of the analysis.
    max_thumbnail_mpx : float
        ``TissueSettings.max_thumbnail_mpx``.

    Examples
    --------
    >>> tissue_image_mpp((2048.0, 2048.0), 1.0, 4.0)  # a 2048² field at 1 µm/px
    2.0
    >>> round(tissue_image_mpp((16384.0, 16384.0), 0.5, 4.0), 3)  # a 1-GP slide
    8.192
    >>> tissue_image_mpp((1440.0, 904.0), 1.0, 4.0)  # a 1.3-MP image: native
    1.0
    >>> tissue_image_mpp((2048.0, 2048.0), 1.0, 16.0)  # a larger tissue image asked for
    1.0
    """
    px = extent_um[0] * extent_um[1] / analysis_mpp**2
    k = min(math.isqrt(int(px / (max_thumbnail_mpx / 4 * 1e6))),
            int(FINE_TISSUE_MPP / analysis_mpp))
    return max(analysis_mpp * k, _overview_mpp(extent_um, analysis_mpp, max_thumbnail_mpx))


def _qc_image(cal: Calibration) -> np.ndarray:
    """The image under the QC overlay: the tissue image when it is at least as coarse as the
    masks, else the slide read at the masks' resolution; a field whose tissue image is a
    reduction (:func:`tissue_image_mpp`) shows its overview, not the reduction upsampled."""
    geo = cal.geometry
    if cal.overview is not None and cal.overview_mpp >= geo.mask_mpp * 0.999:
        return cal.overview
    if cal.thumbnail_mpp >= geo.mask_mpp * 0.999:
        return cal.thumbnail
    return cal.slide.thumbnail(geo.mask_mpp)


def _threshold_map(
    thumb: np.ndarray, thumb_mpp: float, tissue: TissueMask, background: Vector,
    stains: StainMatrix, thr: CollagenThreshold, settings: Settings,
) -> tuple[TissueMask, np.ndarray, np.ndarray | None]:
    """Folds and capsule added to ``tissue``, the collagen threshold at its resolution
    (float32, OD units: the slide's threshold, raised by the local parenchyma background) and
    the share guard there (float32; None = the slide's guard everywhere): both lowered in
    diffuse pale collagen (:func:`_pale_bands`)."""
    local_um = settings.collagen.local_background_um
    relative = thr.method == "relative" and bool(local_um)
    thumb_col, counter, tshare, above_floor = _thumbnail_planes(
        thumb, background, stains, settings.stains.od_floor, shares=relative)
    if counter is not None:
        tissue = with_folds(tissue, counter, settings.tissue, thumb_col, thr.threshold_od)
        del counter
    if not relative or not local_um:
        tissue = with_capsule(tissue, thumb_col > thr.threshold_od)
        return tissue, np.full(tissue.tissue.shape, kernels.threshold_as_float32(
            np.dtype(np.float32), thr.threshold_od), np.float32), None
    assert tshare is not None  # (computed with shares=True)
    assert above_floor is not None
    stained = tissue.tissue & above_floor
    del above_floor
    band, band_p = _pale_bands(tshare, stained, thumb_mpp, thr, settings)
    del stained
    # Pixels that pass the share guard may be collagen and do not define the non-specific
    # uptake: a broad pale collagen band over cells (share ~0.45) would raise the map, and the
    # threshold, under itself.
    cut = thr.share_guard if 0.0 < thr.share_guard < 0.5 else 0.5
    parenchyma = tissue.tissue & (tshare < np.float32(cut))
    del tshare
    if band is not None:
        parenchyma &= band == 0
    # The thumbnail gives the map's shape; its level comes from the analysis-resolution
    # sample. A coarse thumbnail pixel mixes in fine fibres, which would raise the
    # parenchyma level it sees (and the threshold) the coarser the thumbnail.
    bias = 0.0
    if parenchyma.any():
        bias = max(median(thumb_col[parenchyma]), 0.0) - thr.parenchyma_od
    bg_map = parenchyma_background(
        thumb_col, parenchyma,
        local_um / thumb_mpp, thr.parenchyma_od + bias,
    )
    if bias:
        bg_map -= np.float32(bias)
    del parenchyma
    # in place (the same float32 sums): thumbnail-sized maps are not held twice (peak RSS)
    bg_map += np.float32(thr.threshold_od - thr.parenchyma_od)
    threshold_map = bg_map
    guard_map = None
    if band is not None:
        threshold_map -= band * np.float32(BAND_THRESHOLD_DROP * max(
            thr.threshold_od - thr.parenchyma_od - settings.collagen.min_contrast_od, 0.0))
        # the guard falls to the slide's bluest parenchyma (as in collagen.share_guard)
        low = min(max(settings.collagen.parenchyma_share_spread * band_p, BAND_MIN_GUARD),
                  thr.share_guard)
        guard_map = np.float32(thr.share_guard) - band * np.float32(thr.share_guard - low)
        del band
    # where the counterstain projects below zero on the collagen axis the local level is
    # negative, and so may the threshold be: a pixel with no stain at all would pass
    np.maximum(threshold_map, np.float32(MIN_COLLAGEN_OD), out=threshold_map)
    collagen = thumb_col > threshold_map
    del thumb_col
    return with_capsule(tissue, collagen), threshold_map, guard_map


#: Least collagen-stain concentration of a collagen pixel, OD: the local threshold map never
#: falls below it. Real Sirius red and Masson liver maps reach down to 0.053 OD (pale TWOMBLI
#: core 2L_7D, whose yellow parenchyma projects below zero), and keep their answers; on 7 of
#: 12 real Masson hearts the map lay below zero everywhere (medians -0.19 to -0.44 OD: red
#: muscle projects far below zero), and the unstained white clefts between muscle bundles
#: (0 OD) read as collagen (1_heart_2710497275: 6.95 % CPA, 1.90 % with the floor; 3.49 %
#: once its glass colour was right too, :func:`_glass_background`).
MIN_COLLAGEN_OD = 0.04

#: Thumbnail rows converted to concentrations at a time (:func:`_thumbnail_planes`).
CONC_BAND_ROWS = 256


def _thumbnail_planes(
    thumb: np.ndarray, background: Vector, stains: StainMatrix, od_floor: float, *,
    shares: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """What :func:`_threshold_map` reads of the thumbnail's stain concentrations
    (``C = rgb_to_od(thumb, background) @ stains.unmixing``): the collagen plane and the
    second stain's (float32, contiguous; None with one stain) and, with ``shares``, the
    collagen stain's share of the positive concentration ``max(C, 0)`` (float32) and where
    their sum exceeds ``od_floor`` (bool).

    Computed band by band: neither the optical density nor the concentrations are ever held
    whole (48 MB each on a 4-MP thumbnail). The same values to the bit: the product is taken
    pixel row by pixel row either way, and every other step is per pixel.
    """
    h, w = thumb.shape[:2]
    col = stains.collagen_index
    thumb_col = np.empty((h, w), np.float32)
    counter = np.empty((h, w), np.float32) if len(stains.names) > 1 else None
    tshare = np.empty((h, w), np.float32) if shares else None
    above = np.empty((h, w), bool) if shares else None
    for y in range(0, h, CONC_BAND_ROWS):
        rows = slice(y, y + CONC_BAND_ROWS)
        conc = rgb_to_od(thumb[rows], background) @ stains.unmixing
        thumb_col[rows] = conc[..., col]
        if counter is not None:
            counter[rows] = conc[..., 1]
        if tshare is not None and above is not None:
            pos = np.maximum(conc, 0, out=conc)
            total = channel_sum(pos)
            above[rows] = total > od_floor
            tshare[rows] = pos[..., col] / np.maximum(total, 1e-6, out=total)
    return thumb_col, counter, tshare, above


def _pale_bands(share: np.ndarray, stained: np.ndarray, thumb_mpp: float,
                thr: CollagenThreshold, settings: Settings) -> tuple[np.ndarray | None, float]:
    """Weight of diffuse pale collagen on the thumbnail (:func:`collagen.pale_band_weight`,
    float32 0-1; None where there is none or the setting is off) and the thumbnail's
    parenchymal collagen-stain share it is measured against."""
    if not (settings.collagen.pale_bands and thr.share_guard > 0):
        return None, 0.0
    parenchyma = stained & (share < np.float32(0.5))
    n = np.count_nonzero(parenchyma)
    if n < 50 or n < 0.5 * np.count_nonzero(stained):
        # most of the stained tissue is collagen-stain dominated (a pale counterstain under
        # non-specific uptake, or cirrhosis): the share no longer sets bands apart
        return None, 0.0
    values = share[parenchyma]
    if values.size > 1_000_000:  # a median of a million pixels is as good, and 4-16x cheaper
        values = values[:: values.size // 1_000_000]
    p = max(median(values), 0.0)
    w = pale_band_weight(share, stained, p, BAND_SHARE_SIGMA_UM / thumb_mpp)
    return (w if w.any() else None), p


def measure_tiles(
    cal: Calibration, settings: Settings, workers: int = 1, decide: PixelDecider | None = None,
) -> tuple[TileCounts, BitMask, BitMask, BitMask]:
    """Measure every tile that touches the section and add up the counts.

    Tiles far blurrier than the rest of the slide (``tissue.exclude_unfocused``) have their
    tissue excluded (reported as unfocused area), like a fold.

    Parameters
    ----------
    cal : Calibration
    settings : Settings
    workers : int
        Threads over tiles.
    decide : PixelDecider, optional
        A per-pixel collagen decision replacing ``cal.rule`` on every tile.

    Returns
    -------
    total : TileCounts
    collagen, tissue, excluded : BitMask
        Masks at ``cal.geometry.mask_mpp``, as bits.
    """
    geo = cal.geometry
    boxes = tile_grid(geo, settings.tiling.tile_px)
    job = TileJob(geo, cal.tissue, geo.height / cal.thumbnail.shape[0],
                  geo.width / cal.thumbnail.shape[1], cal.rule, cal.flags,
                  cal.threshold_map, 2 if settings.tissue.exclude_unfocused else 0, decide,
                  cal.stains.stains)
    f = geo.mask_factor
    mh, mw = -(-geo.height // f), -(-geo.width // f)
    # held as bits: a 1-GP slide's three masks take 16 MB instead of 129 MB
    collagen_m, tissue_m, excluded_m = (BitMask((mh, mw)) for _ in range(3))
    kernels.warmup_fused()
    measured: list[tuple[tuple[int, int, int, int], TileCounts, float]] = []
    for out in map_tiles(cal.slide, job, boxes, workers):
        if out is None:
            continue
        (y0, x0, y1, x1), counts, c, tis, exc, sharp = out  # masks already block-reduced
        measured.append(((y0, x0, y1, x1), counts, sharp))
        sy, sx = y0 // f, x0 // f
        collagen_m[sy : sy + c.shape[0], sx : sx + c.shape[1]] = c
        tissue_m[sy : sy + c.shape[0], sx : sx + c.shape[1]] = tis
        excluded_m[sy : sy + c.shape[0], sx : sx + c.shape[1]] = exc
    blurry = np.zeros(len(measured), bool)
    if settings.tissue.exclude_unfocused:
        blurry = focus.unfocused(np.array([m[2] for m in measured]),
                                 factor=settings.tissue.unfocused_factor)
    total = TileCounts()
    for ((y0, x0, y1, x1), counts, _), bad in zip(measured, blurry, strict=True):
        if not bad:
            total = total + counts
            continue
        total = total + counts.out_of_focus()
        ys, xs = slice(y0 // f, -(-y1 // f)), slice(x0 // f, -(-x1 // f))
        excluded_m[ys, xs] = excluded_m[ys, xs] | tissue_m[ys, xs]
        collagen_m[ys, xs] = False
        tissue_m[ys, xs] = False
    return total, collagen_m, tissue_m, excluded_m


def _quietly(fn: Callable[[SlideResult], None], result: SlideResult,
             gate: threading.Semaphore | None = None) -> None:
    """``fn(result)`` on a thread of its own: an exception is logged (``fn`` keeps its own).
    Its freed memory is given back at once, not held while the traits peak; then ``gate``
    gets the permit of the thread this one stood in for."""
    try:
        fn(result)
    except Exception:  # noqa: BLE001 - a thread has nowhere to raise it
        logger.debug("masks_ready failed:\n%s", traceback.format_exc())
    finally:
        release_free_heap()
        if gate is not None:
            gate.release()


def _warm_quietly() -> None:
    """Background kernel loading; a failure is raised again, on the caller's thread, by the
    tile loop's own :func:`kernels.warmup_fused` call."""
    try:
        kernels.warmup_fused()
        release_code_pages()  # numba's LLVM is not run again by this slide (peak memory)
    except Exception:  # noqa: BLE001 - reported by the foreground call
        logger.debug("background kernel warm-up failed:\n%s", traceback.format_exc())


def _glass_background(
    thumb: np.ndarray, thumb_mpp: float, settings: Settings, background: Vector,
    reduced: np.ndarray | None = None,
) -> Vector | None:
    """The glass colour from the pixels outside the section (the ``"glass"`` source of
    :func:`fibroquant.stains.estimate_background`), or None when there are not enough of them
    (the caller keeps its brightest-pixel colour: computed again here, it was the same).

    Which pixels are glass is decided by a tissue detection on a 4x smaller copy of the
    thumbnail, with the section grown by one coarse pixel, so the median never takes in the
    section's edge. Only the glass mask comes from the small copy: on 8 synthetic sections
    and 19 real images the glass colour equals the one from a full-size detection, at about
    1/10 of its cost (one full-size detection is left, with the final background).
    ``reduced``, an ``INTER_AREA`` reduction of ``thumb`` the caller has (the shading fit's),
    is the small copy when it has its size.
    """
    h, w = thumb.shape[:2]
    k = 4 if min(h, w) >= 256 else 1
    if k == 1:
        small = thumb
    elif reduced is not None and reduced.shape[:2] == (h // k, w // k):
        small = reduced
    else:
        small = cv2.resize(thumb, (w // k, h // k), interpolation=cv2.INTER_AREA)
    found = detect_tissue(small, thumb_mpp * w / small.shape[1], settings.tissue, background)
    # only pixels as clear as glass: a strip of tissue cut off by the frame, dropped from the
    # section as a speck, is not glass (a real heart field's glass read 207,192,204: red
    # muscle in it, for 227,220,218)
    clear = channel_sum(rgb_to_od(small, background)) <= np.float32(found.glass_cut_od)
    if k == 1:
        glass = ~found.section & clear
    else:
        grown = cv2.dilate(found.section.view(np.uint8), np.ones((3, 3), np.uint8))
        grown[~clear] = 1
        glass = cv2.resize(grown, (w, h), interpolation=cv2.INTER_NEAREST) == 0
    return glass_median(thumb, glass)


def _background(thumb: np.ndarray, settings: Settings) -> tuple[tuple[float, float, float], str]:
    if settings.stains.background_rgb is not None:
        return settings.stains.background_rgb, "config"
    return estimate_background(thumb)


__all__ = [
    "Calibration",
    "SlideReadError",
    "analyze_slide",
    "blas_single_thread",
    "calibrate_slide",
    "measure_tiles",
    "stain_warnings",
]
