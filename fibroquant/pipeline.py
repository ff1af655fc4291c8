"""One slide from file to measurements: the per-slide recipe.

:func:`calibrate_slide` finds everything a slide's tiles are measured with, from its thumbnail
and a sample of its pixels (optics, glass colour, tissue and exclusions, stain vectors, collagen
threshold and rule); :func:`measure_tiles` then streams the tiles that touch tissue;
:func:`analyze_slide` does both and returns a :class:`fibroquant.measure.SlideResult`.
:func:`run_slide` is the task unit that local process pools and Dask workers run: it analyses a
slide, writes its masks and QC overlay, and turns any error into a ``failed`` record.

Memory is bounded by the tile size, not the slide size: the tissue mask comes from a thumbnail,
and only tiles that touch tissue are read, one per worker thread at a time.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fibroquant import __version__, focus, kernels
from fibroquant.collagen import (
    CollagenRule,
    CollagenThreshold,
    auto_blob_area,
    calibrate_threshold,
    parenchyma_background,
)
from fibroquant.config import Settings
from fibroquant.errors import (
    QUIET_ENV,
    FibroquantError,
    SlideReadError,
    one_line,
    quiet_warnings,
)
from fibroquant.measure import Measurements, SlideQC, SlideResult, TileCounts
from fibroquant.registration import estimate_channel_shifts
from fibroquant.shading import CorrectedSlide, estimate_shading
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
    od_lut,
    preset_for,
    rgb_to_od,
    stain_fit,
    stain_mismatch,
    tissue_pixels,
)
from fibroquant.tasks import (
    MASK_KINDS,
    SlideTask,
    discard_outputs,
    failed_record,
    output_files,
    output_stem,  # noqa: F401 - re-exported (tests, benchmarks)
    remove_files,
    task_stem,
)
from fibroquant.tiles import (
    Geometry,
    PixelDecider,
    TileJob,
    calibration_pixels,
    class_flags,
    plan_geometry,
    registration_tiles,
    tile_grid,
    tissue_boxes,
)
from fibroquant.tiles import (
    measure_box as _process_tile,  # the tile loop's unit (_map_tiles)
)
from fibroquant.tissue import TissueMask, detect_tissue, with_capsule, with_folds

logger = logging.getLogger(__name__)
_TileJob = TileJob  # the tile loop's annotation


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
    """

    slide: Slide
    geometry: Geometry
    thumbnail: np.ndarray
    thumbnail_mpp: float
    tissue: TissueMask
    stains: StainEstimate
    preset: StainMatrix
    threshold: CollagenThreshold
    threshold_map: np.ndarray
    rule: CollagenRule
    qc: SlideQC
    warnings: tuple[str, ...]


#: Collagen levels (OD units) outside this range are reported as faint or over-stained.
FAINT_COLLAGEN_OD = 0.2
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


#: glibc ``mallopt`` parameters and the values :func:`tune_malloc` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLDS_BYTES = (64 << 20, 32 << 20)  # glibc before ~2.26 refuses more than 32 MB
_TRIM_THRESHOLD_BYTES = 256 << 20
_malloc_lock = threading.Lock()
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Let the C heap reuse tile-sized buffers (glibc only; once per process).

    Every tile allocates a few buffers of 1–12 MB (decoded tiles, masks, labels), and the
    low-resolution pass some of up to ~50 MB. With glibc's defaults, and much more with
    ``MALLOC_TRIM_THRESHOLD_=65536``, which Dask's nanny sets in its workers, many of them are
    mapped fresh from the kernel and zero-filled page by page every time: measured on an 8k²
    slide, 3.3 s per slide by default and 4.4–5.0 s in a Dask worker, 2.5–2.8 s with the heap
    kept (same peak RSS). This raises glibc's mmap threshold to 64 MB (32 MB where glibc
    refuses more) and its trim threshold to 256 MB: each heap (the main one, and one per
    thread that allocates) keeps up to that much freed memory mapped for reuse. Left alone when
    ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice) or the C library is not glibc.

    Returns
    -------
    bool
        Whether the mmap threshold is (now) raised.
    """
    global _malloc_tuned
    with _malloc_lock:
        if _malloc_tuned is None:
            _malloc_tuned = _set_mallopt()
        return _malloc_tuned


def _set_mallopt() -> bool:
    import os
    import platform

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        raised = any(libc.mallopt(_M_MMAP_THRESHOLD, v) for v in _MMAP_THRESHOLDS_BYTES)
        if raised:
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # no glibc after all
        return False
    return raised


def analyze_slide(
    path: str | Path,
    settings: Settings,
    *,
    mpp: float | None = None,
    fallback_mpp: float | None = None,
    workers: int = 1,
    slide: Slide | None = None,
    decide: PixelDecider | None = None,
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
        tile (e.g. a trained classifier; see :class:`fibroquant.tiles.PixelDecider`).

    Returns
    -------
    SlideResult

    Raises
    ------
    FibroquantError
        Unreadable slide, greyscale image, missing resolution, no tissue.
    """
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
        total, collagen_m, tissue_m, excluded_m = measure_tiles(cal, settings, workers, decide)
        if total.tissue_px == 0:
            msg = f"{sl.path.name}: no countable tissue left after exclusions"
            raise FibroquantError(msg)
        geo = cal.geometry
        qc = cal.thumbnail if cal.thumbnail_mpp >= geo.mask_mpp * 0.999 else \
            cal.slide.thumbnail(geo.mask_mpp)
        return SlideResult(
            settings.stains.stain.value, sl.format, require_mpp(sl), geo,
            Measurements.from_counts(total, geo.analysis_mpp), cal.stains, cal.threshold,
            cal.qc, cal.warnings, round(time.perf_counter() - t_start, 3), __version__,
            collagen_m, tissue_m, excluded_m, qc)
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
    tissue_mpp = settings.tissue.tissue_mpp or max(
        geo.analysis_mpp,
        math.sqrt(extent_um[0] * extent_um[1] / (settings.tissue.max_thumbnail_mpx * 1e6)),
    )
    thumb = sl.thumbnail(tissue_mpp)
    thumb_mpp = extent_um[1] / thumb.shape[1]
    background, bg_source = _background(thumb, settings)
    shading = estimate_shading(thumb, background, settings.tissue)
    if shading is not None:
        # every later read (calibration pixels, tiles, QC image) sees the evenly lit slide
        sl = CorrectedSlide(raw, shading=shading)
        thumb = shading.apply(thumb, thumb.shape[:2])
        background, bg_source = _background(thumb, settings)
    if settings.stains.background_rgb is None:
        bg2, src2 = _glass_background(thumb, thumb_mpp, settings, background)
        if src2 == "glass":
            background, bg_source = bg2, src2
    tissue = detect_tissue(thumb, thumb_mpp, settings.tissue, background)
    if not tissue.tissue.any():
        t = tissue.glass_threshold_od if tissue.glass_threshold_od is not None else tissue.glass_od
        msg = f"{name}: no tissue found (glass threshold {t:.3f} OD)"
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
    od_sample = rgb_to_od(sample, background)
    est = estimate_stains(od_sample, preset, settings.stains)
    stains = est.stains
    conc_sample = od_sample @ stains.unmixing
    pos = np.maximum(conc_sample, 0)
    share = pos[:, stains.collagen_index] / np.maximum(pos.sum(axis=1), 1e-6)
    stained = np.linalg.norm(od_sample, axis=1) > settings.stains.od_floor
    thr = calibrate_threshold(
        conc_sample[:, stains.collagen_index], share, settings.collagen, stained=stained,
        share_from_parenchyma=settings.share_from_parenchyma(est.counterstain_fitted()),
    )
    blob_auto = settings.collagen.blob_max_area_um2 is None
    # automatic: decided by the nuclei's stain (per slide; the settings stay as given)
    blob_um2 = auto_blob_area(pos[stained], stains) if blob_auto else \
        settings.collagen.blob_max_area_um2
    tissue, threshold_map = _threshold_map(thumb, thumb_mpp, tissue, background, stains, thr,
                                           settings)
    fit = stain_fit(tissue_pixels(thumb, tissue.tissue, STAIN_FIT_MAX_PIXELS), max_pixels=50_000)
    warnings = stain_warnings(est, preset, thr, fit, settings.stains.stain.value)
    if blob_auto and blob_um2:
        warnings.append(
            "nuclei not iron haematoxylin (blue-purple): compact blobs up to "
            f"{blob_um2:g} µm² not counted as collagen (automatic)")
    col = stains.collagen_index
    qc = SlideQC(
        tissue.glass_od, 0.0 if shading is None else round(shading.od_range, 4),
        0.0 if shifts is None else round(float(np.hypot(*shifts.T).max()), 3),
        background, bg_source, round(angle_deg(stains.vectors[col], preset.vectors[col]), 2),
        blob_um2, fit)
    rule = CollagenRule.for_slide(od_lut(background), stains, thr.share_guard,
                                  settings.collagen, blob_um2, geo.analysis_mpp)
    return Calibration(sl, geo, thumb, thumb_mpp, tissue, est, preset, thr, threshold_map,
                       rule, qc, tuple(warnings))


def _threshold_map(
    thumb: np.ndarray, thumb_mpp: float, tissue: TissueMask, background: Vector,
    stains: StainMatrix, thr: CollagenThreshold, settings: Settings,
) -> tuple[TissueMask, np.ndarray]:
    """Folds and capsule added to ``tissue``, and the collagen threshold at its resolution
    (float32, OD units: the slide's threshold, raised by the local parenchyma background)."""
    thumb_conc = rgb_to_od(thumb, background) @ stains.unmixing
    # the collagen plane is read by every step below: contiguous, not a strided view
    thumb_col = np.ascontiguousarray(thumb_conc[..., stains.collagen_index])
    if len(stains.names) > 1:
        tissue = with_folds(tissue, np.ascontiguousarray(thumb_conc[..., 1]), settings.tissue,
                            thumb_col, thr.threshold_od)
    if not (thr.method == "relative" and settings.collagen.local_background_um):
        tissue = with_capsule(tissue, thumb_col > thr.threshold_od)
        return tissue, np.full(tissue.tissue.shape, kernels.threshold_as_float32(
            np.dtype(np.float32), thr.threshold_od), np.float32)
    tpos = np.maximum(thumb_conc, 0)
    del thumb_conc  # thumbnail-sized temporaries are freed as soon as possible (peak RSS)
    tshare = tpos[..., stains.collagen_index] / np.maximum(channel_sum(tpos), 1e-6)
    del tpos
    parenchyma = tissue.tissue & (tshare < 0.5)
    del tshare
    # The thumbnail gives the map's shape; its level comes from the analysis-resolution
    # sample. A coarse thumbnail pixel mixes in fine fibres, which would raise the
    # parenchyma level it sees (and the threshold) the coarser the thumbnail.
    bias = 0.0
    if parenchyma.any():
        bias = max(float(np.median(thumb_col[parenchyma])), 0.0) - thr.parenchyma_od
    bg_map = parenchyma_background(
        thumb_col, parenchyma,
        settings.collagen.local_background_um / thumb_mpp, thr.parenchyma_od + bias,
    )
    if bias:
        bg_map -= np.float32(bias)
    del parenchyma
    threshold_map = bg_map + np.float32(thr.threshold_od - thr.parenchyma_od)
    return with_capsule(tissue, thumb_col > threshold_map), threshold_map


def measure_tiles(
    cal: Calibration, settings: Settings, workers: int = 1, decide: PixelDecider | None = None,
) -> tuple[TileCounts, np.ndarray, np.ndarray, np.ndarray]:
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
    collagen, tissue, excluded : ndarray of bool
        Masks at ``cal.geometry.mask_mpp``.
    """
    geo = cal.geometry
    boxes = tile_grid(geo, settings.tiling.tile_px)
    job = TileJob(geo, cal.tissue, geo.height / cal.thumbnail.shape[0],
                  geo.width / cal.thumbnail.shape[1], cal.rule, class_flags(cal.tissue),
                  cal.threshold_map, 2 if settings.tissue.exclude_unfocused else 0, decide)
    f = geo.mask_factor
    mh, mw = -(-geo.height // f), -(-geo.width // f)
    collagen_m = np.zeros((mh, mw), bool)
    tissue_m = np.zeros((mh, mw), bool)
    excluded_m = np.zeros((mh, mw), bool)
    kernels.warmup_fused()
    measured: list[tuple[tuple[int, int, int, int], TileCounts, float]] = []
    for out in _map_tiles(cal.slide, job, boxes, workers):
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
        total = total + TileCounts(
            lumen_px=counts.lumen_px, fold_px=counts.fold_px, bubble_px=counts.bubble_px,
            unfocused_px=counts.tissue_px + counts.capsule_px + counts.wall_px,
        )
        ys, xs = slice(y0 // f, -(-y1 // f)), slice(x0 // f, -(-x1 // f))
        excluded_m[ys, xs] |= tissue_m[ys, xs]
        collagen_m[ys, xs] = False
        tissue_m[ys, xs] = False
    return total, collagen_m, tissue_m, excluded_m


def _warm_quietly() -> None:
    """Background kernel loading; a failure is raised again, on the caller's thread, by the
    tile loop's own :func:`kernels.warmup_fused` call."""
    try:
        kernels.warmup_fused()
    except Exception:  # noqa: BLE001 - reported by the foreground call
        logger.debug("background kernel warm-up failed:\n%s", traceback.format_exc())


def _glass_background(
    thumb: np.ndarray, thumb_mpp: float, settings: Settings, background: Vector
) -> tuple[tuple[float, float, float], str]:
    """The glass colour from the pixels outside the section (``"glass"``), when there are
    enough of them; otherwise what :func:`fibroquant.stains.estimate_background` falls back to.

    Which pixels are glass is decided by a tissue detection on a 4x smaller copy of the
    thumbnail, with the section grown by one coarse pixel, so the median never takes in the
    section's edge. Only the glass mask comes from the small copy: on 8 synthetic sections
    and 19 real images the glass colour equals the one from a full-size detection, at about
    1/10 of its cost (one full-size detection is left, with the final background).
    """
    h, w = thumb.shape[:2]
    k = 4 if min(h, w) >= 256 else 1
    small = thumb if k == 1 else cv2.resize(thumb, (w // k, h // k), interpolation=cv2.INTER_AREA)
    section = detect_tissue(small, thumb_mpp * w / small.shape[1], settings.tissue,
                            background).section
    if k == 1:
        glass = ~section
    else:
        grown = cv2.dilate(section.view(np.uint8), np.ones((3, 3), np.uint8))
        glass = cv2.resize(grown, (w, h), interpolation=cv2.INTER_NEAREST) == 0
    return estimate_background(thumb, glass_mask=glass)


def _background(thumb: np.ndarray, settings: Settings) -> tuple[tuple[float, float, float], str]:
    if settings.stains.background_rgb is not None:
        return settings.stains.background_rgb, "config"
    return estimate_background(thumb)


#: Slides running in the local worker processes of this run (a shared counter, given to each
#: worker by :func:`_init_worker`); None outside a local process pool.
_running: Any = None
#: The cores those worker processes share.
_pool_cores = 0


def _init_worker(running: Any, cores: int) -> None:
    """Initializer of a run's local worker processes: the shared count of running slides."""
    global _running, _pool_cores
    _running, _pool_cores = running, cores


def _tile_threads(cap: int) -> int:
    """Tile threads a slide may use now: ``cap`` outside a local pool; inside one, an equal
    share of the pool's cores among the slides running (at least 1, at most ``cap``), so that
    a slide left running alone (a run's last, or a large one started beside small ones) takes
    the cores the finished ones gave back instead of keeping one thread to the end."""
    if _running is None:
        return cap
    return max(1, min(cap, _pool_cores // max(1, _running.value)))


@contextmanager
def _counted_running() -> Iterator[None]:
    """Count this slide among the pool's running slides while it runs (no-op outside one)."""
    running = _running
    if running is None:
        yield
        return
    with running.get_lock():
        running.value += 1
    try:
        yield
    finally:
        with running.get_lock():
            running.value -= 1


#: How often a tile waiting for its slide's share of the cores looks again (seconds): the
#: share grows when a slide in another worker process ends, which no event here reports.
SHARE_POLL_SECONDS = 0.05


def _gated(fn: Any, cap: int) -> Any:
    """``fn`` run by at most :func:`_tile_threads` threads at once (re-read as tiles start and
    end, and every :data:`SHARE_POLL_SECONDS` while one waits); the others wait their turn."""
    cond = threading.Condition()
    active = 0

    def run(*args: Any) -> Any:
        nonlocal active
        with cond:
            while active >= _tile_threads(cap):
                cond.wait(SHARE_POLL_SECONDS)
            active += 1
        try:
            return fn(*args)
        finally:
            with cond:
                active -= 1
                cond.notify()

    return run


def _map_tiles(slide: Slide, job: _TileJob, boxes: list, workers: int) -> Iterator[Any]:
    if workers <= 1 or len(boxes) < 2:
        for box in boxes:
            yield _process_tile(slide, job, box)
        return
    # The tile threads already use every core: OpenCV's own thread pool inside each call
    # (top-hat, labelling) would only oversubscribe them (measured: 11.0 s -> 9.0 s on a 16k²
    # slide with 2 threads). Restored when the loop ends.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    tile = _process_tile if _running is None else _gated(_process_tile, workers)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # bounded in-flight window keeps memory independent of slide size
            window = 2 * workers
            it = iter(boxes)
            pending = [pool.submit(tile, slide, job, b) for _, b in zip(range(window), it)]
            while pending:
                fut = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(tile, slide, job, nxt))
                yield fut.result()
    finally:
        cv2.setNumThreads(cv_threads)


# ------------------------------------------------------------------------------------------
# Task unit for pools and clusters
# ------------------------------------------------------------------------------------------


def run_slide(task: SlideTask) -> dict[str, Any]:
    """Analyse one slide and write its masks and QC overlay; never raises for slide problems.

    Outputs follow the measurement: without ``write_masks``, masks and GeoJSON of an earlier
    measurement of the slide are removed; a failed slide's overlay, masks and GeoJSON are
    removed. A slide whose outputs cannot be written (read-only or full disk, a folder in the
    way) is ``failed`` with ``cannot write outputs: ...``: its numbers are not kept without
    its overlay.

    Returns
    -------
    dict
        The slide's record, ``status`` ``ok`` or ``failed`` with a one-line ``error``.
    """
    from fibroquant import report  # local: keeps workers' import light until needed

    settings = Settings.model_validate_json(task.settings_json)
    out = Path(task.out_dir)
    stem = task_stem(task)
    try:
        analysis = analyze_slide(
            task.path, settings, mpp=task.mpp, fallback_mpp=task.fallback_mpp,
            workers=task.threads,
        )
    except FibroquantError as exc:
        return _failed(task, one_line(exc))
    except MemoryError:
        return _failed(task, f"{Path(task.path).name}: out of memory")
    except Exception as exc:  # a bug or an unforeseen file problem: record it, carry on
        logger.debug("unexpected error on %s:\n%s", task.path, traceback.format_exc())
        return _failed(
            task, f"{Path(task.path).name}: unexpected {type(exc).__name__}: {one_line(exc)}"[:500]
        )
    files = output_files(out, stem)
    try:
        report.write_qc(files["qc"], analysis, max_px=settings.tiling.qc_max_px)
        if task.write_masks:
            report.write_png(files["collagen"], analysis.collagen_mask)
            report.write_png(files["tissue"], analysis.tissue_mask)
            # outlines in full-resolution (level 0) pixel coordinates, for QuPath
            scale = analysis.mask_mpp / analysis.record["mpp"]
            fc = report.mask_to_geojson(analysis.tissue_mask, analysis.collagen_mask,
                                        scale=scale, slide_name=task.slide)
            report.write_geojson(files["geojson"], fc)
        else:  # masks of an earlier measurement would contradict this one
            remove_files(files[k] for k in MASK_KINDS)
    except Exception as exc:  # noqa: BLE001 - the writers raise FibroquantError (or a bug)
        logger.debug("cannot write outputs of %s:\n%s", task.path, traceback.format_exc())
        return _failed(
            task, f"{Path(task.path).name}: cannot write outputs: {write_error(exc)}"[:500]
        )
    return {"slide": task.slide, "fingerprint": task.fingerprint, **analysis.record}


def _failed(task: SlideTask, error: str) -> dict[str, Any]:
    """A failed record, after removing the slide's outputs of any earlier measurement."""
    problem = discard_outputs(task.out_dir, task_stem(task))
    if problem:  # the run discards them again on receiving the record, and reports it
        logger.debug("%s", problem)
    return failed_record(task, error)


def write_error(exc: BaseException) -> str:
    """One line on why an output could not be written, without a repeated "cannot write".

    Parameters
    ----------
    exc : BaseException
        What a writer raised: :class:`FibroquantError` (``cannot write PATH: reason``),
        ``OSError``, or anything else (a bug, named as unexpected).

    Returns
    -------
    str
        e.g. ``/out/qc/a.png: Read-only file system``.
    """
    if not isinstance(exc, (FibroquantError, OSError)):
        return f"unexpected {type(exc).__name__}: {one_line(exc)}"
    text = one_line(exc)
    return text.removeprefix("cannot write ")


def run_slide_pinned(task: SlideTask) -> dict[str, Any]:
    """:func:`run_slide` in a worker process that shares the machine with other workers.

    OpenCV's thread pool and the BLAS and OpenMP pools (numpy's OpenBLAS, through
    ``threadpoolctl``) are limited to the task's threads while it runs, so that N worker
    processes do not run N × cores threads in all. OpenBLAS's threads spin while they wait:
    two local worker processes left at two BLAS threads each took 1.3–2.4 s per 8k² slide
    instead of ~1.05 s. The limits are process-wide: tasks running side by side in one worker
    (a Dask worker with several threads) share one pinning, set by the first and undone when
    the last one ends (:func:`_pinned`).
    """
    if os.environ.get(QUIET_ENV) == "1":
        quiet_warnings()
    # in a local pool the tile threads follow the cores free (_tile_threads), and OpenCV and
    # BLAS keep one thread: the slides beside it use the others
    with _pinned(1 if _running is not None else max(1, task.threads)), _counted_running():
        return run_slide(task)


_pin_lock = threading.Lock()
_pin_users = 0
_pin_undo: tuple[int, Any] | None = None


@contextmanager
def _pinned(threads: int) -> Iterator[None]:
    """Limit OpenCV's and the BLAS/OpenMP thread pools to ``threads`` while any caller is
    inside; the limits found by the first caller are restored when the last one leaves."""
    global _pin_users, _pin_undo
    from threadpoolctl import threadpool_limits

    with _pin_lock:
        if _pin_users == 0:
            cv_threads = cv2.getNumThreads()
            cv2.setNumThreads(threads)
            _pin_undo = (cv_threads, threadpool_limits(limits=threads))
        _pin_users += 1
    try:
        yield
    finally:
        with _pin_lock:
            _pin_users -= 1
            if _pin_users == 0 and _pin_undo is not None:
                cv_threads, limits = _pin_undo
                limits.restore_original_limits()
                cv2.setNumThreads(cv_threads)
                _pin_undo = None


def run_tasks(
    tasks: list[SlideTask],
    *,
    workers: int,
    scheduler: str | Any | None = None,
) -> Iterable[dict[str, Any]]:
    """Run slide tasks and yield each record as it finishes (in completion order).

    Parameters
    ----------
    tasks : list of SlideTask
    workers : int
        Local processes (slides in parallel); with one slide, threads over its tiles instead.
        A slide in a local pool runs its tiles on its share of the ``workers`` cores among the
        slides running, so one left running alone takes the cores the others gave back.
    scheduler : str, distributed.Client or Dask cluster, optional
        Address of a Dask scheduler (``tcp://host:port``), a client, or a cluster object
        (``distributed.LocalCluster``, a dask-jobqueue cluster...): tasks then run on the
        cluster (the slides and OUT_DIR must be reachable from the workers).
    """
    if not tasks:
        return
    if scheduler is not None:
        yield from _run_dask(tasks, scheduler)
        return
    if workers <= 1 or len(tasks) == 1:
        for t in tasks:
            yield run_slide(_with_threads(t, workers))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = _worker_context(mp)
    running = ctx.Value("i", 0)  # slides running now, across the worker processes
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                             initializer=_init_worker, initargs=(running, workers)) as pool:
        # each slide may use up to every core, as its share of them (_tile_threads)
        futures = {pool.submit(run_slide_pinned, _with_threads(t, workers)): t
                   for t in largest_first(tasks)}
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except Exception as exc:  # a worker died (e.g. killed by the OOM killer)
                yield failed_record(futures[fut], f"{Path(futures[fut].path).name}: worker "
                                    f"failed: {type(exc).__name__}: {exc}"[:500])


def largest_first(tasks: list[SlideTask]) -> list[SlideTask]:
    """The tasks by file size, largest first (ties in the given order): with slides of mixed
    sizes the last ones to start are the small ones, so no core is left waiting on a large
    slide begun at the end. A file that cannot be read counts as empty (it fails quickly)."""
    def size(task: SlideTask) -> int:
        try:
            return os.stat(task.path).st_size
        except OSError:
            return 0

    sizes = [size(t) for t in tasks]
    order = sorted(range(len(tasks)), key=lambda i: -sizes[i])
    return [tasks[i] for i in order]


def _worker_context(mp: Any) -> Any:
    """The start method of local worker processes: ``forkserver`` where there is one (POSIX;
    Python's own default from 3.14 on Linux), with fibroquant's modules imported once in the
    server, so each worker starts without re-importing them (~0.5 s each: eight 8k² slides
    on two workers 7.1-7.2 -> 6.2-6.5 s); ``spawn`` elsewhere. Never plain ``fork``: the
    parent may be running threads (progress display, tile threads).

    The preload only imports: it must not start threads, since the server forks every worker
    (an analysis of a small section run there, to load the numba kernels once, left OpenCV's
    and the kernel warm-up's threads behind, and the forked workers hung).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fibroquant.pipeline", "fibroquant.report"])
    return ctx


def _with_threads(task: SlideTask, threads: int) -> SlideTask:
    from dataclasses import replace

    return replace(task, threads=max(1, threads))


#: How long to wait for a Dask scheduler given by its address before giving up.
DASK_CONNECT_TIMEOUT = "20s"


def _run_dask(tasks: list[SlideTask], scheduler: str | Any) -> Iterator[dict[str, Any]]:
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        msg = "--scheduler needs dask.distributed: pip install 'dask[distributed]'"
        raise FibroquantError(msg) from exc
    # an address, a Client, or a cluster object (LocalCluster, a dask-jobqueue cluster...):
    # a cluster gets a client of its own, closed at the end like one made from an address
    own = not hasattr(scheduler, "submit")
    if own and not isinstance(scheduler, str) and not hasattr(scheduler, "scheduler_address"):
        msg = (f"scheduler: expected an address (tcp://HOST:PORT), a distributed.Client or a "
               f"Dask cluster object, got {type(scheduler).__name__}")
        raise FibroquantError(msg)
    try:
        client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT) if own else scheduler
    except OSError as exc:
        where = getattr(scheduler, "scheduler_address", scheduler)
        msg = f"cannot reach the Dask scheduler at {where}: {exc}"
        raise FibroquantError(msg) from None
    try:
        run = uuid.uuid4().hex[:12]  # two runs sharing a cluster keep their own tasks
        n = len(tasks)  # largest first: a higher priority runs earlier
        futures = {client.submit(run_slide_pinned, t, pure=False, priority=n - i,
                                 key=f"slide-{run}-{i}-{t.fingerprint}"): t
                   for i, t in enumerate(largest_first(tasks))}
        for fut in as_completed(list(futures)):
            try:
                yield fut.result()
            except Exception as exc:
                t = futures[fut]
                yield failed_record(t, f"{Path(t.path).name}: worker failed: "
                                    f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if own:
            client.close()


__all__ = [
    "Calibration",
    "SlideReadError",
    "SlideTask",
    "analyze_slide",
    "calibrate_slide",
    "measure_tiles",
    "tune_malloc",
    "run_slide",
    "run_tasks",
]
