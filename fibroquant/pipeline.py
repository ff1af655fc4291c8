"""One slide from file to measurements: tissue, stain calibration, tile streaming, counts.

:func:`analyze_slide` is pure apart from reading the slide: it returns a :class:`SlideAnalysis`
(a flat record for ``slides.csv`` plus low-resolution masks for QC). Running slides as tasks
(worker processes, Dask) is :mod:`fibroquant.executor`.

Memory is bounded by the tile size, not the slide size: the tissue mask comes from a thumbnail,
and only tiles that touch tissue are read, one (plus its halo) per worker thread at a time.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fibroquant import __version__, cores, focus, kernels
from fibroquant.collagen import (
    CollagenThreshold,
    auto_blob_area,
    calibrate_threshold,
    parenchyma_background,
    segment_collagen,
)
from fibroquant.confidence import qc_flags
from fibroquant.config import Settings
from fibroquant.errors import FibroquantError, SlideReadError
from fibroquant.measure import Measurements, TileCounts
from fibroquant.registration import estimate_channel_shifts
from fibroquant.shading import CorrectedSlide, estimate_shading
from fibroquant.slides import Slide, open_slide, require_colour, require_mpp
from fibroquant.stains import (
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
    stain_verdict,
)
from fibroquant.tasks import (
    SlideTask,
    output_stem,  # noqa: F401 - re-exported (tests, benchmarks)
)
from fibroquant.tissue import (
    TissueMask,
    detect_tissue,
    no_tissue_reason,
    with_capsule,
    with_folds,
)

logger = logging.getLogger(__name__)


@dataclass
class SlideAnalysis:
    """Everything measured on one slide.

    Attributes
    ----------
    record : dict
        Flat row of ``slides.csv`` (without the sample-sheet columns).
    collagen_mask, tissue_mask : ndarray of bool
        At ``mask_mpp`` (the analysis resolution unless the slide is too large for it).
    excluded_mask : ndarray of bool
        Lumens, folds, bubbles and capsule at ``mask_mpp``.
    mask_mpp : float
    thumbnail : ndarray of uint8
        RGB image of the slide at ``mask_mpp`` or coarser, for QC overlays.
    """

    record: dict[str, Any]
    collagen_mask: np.ndarray
    tissue_mask: np.ndarray
    excluded_mask: np.ndarray
    mask_mpp: float
    thumbnail: np.ndarray = field(repr=False)
    #: low-resolution class bits (``kernels.FLAG_*``) that tell the QC overlay's exclusions apart
    flags: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Geometry:
    """Where the analysis image sits in the slide."""

    level: int
    level_mpp: float
    analysis_mpp: float
    scale: float  # analysis px per level px (<= 1)
    height: int  # analysis image size
    width: int
    mask_factor: int  # analysis px per mask px


def plan_geometry(
    slide: Slide, analysis_mpp: float | None, mask_max_mpx: float, oversample: float = 2.0
) -> _Geometry:
    """Pick the pyramid level for an analysis resolution and the mask resolution.

    The level is the coarsest one at least ``oversample`` times as fine as ``analysis_mpp``
    (level 0 when none is), so it is only ever downsampled; when ``analysis_mpp`` is finer
    than the slide, the slide's own resolution is used. ``oversample`` defaults to
    ``TilingSettings.read_oversample``'s default. On a pyramid with 4x steps (0.25, 1, 4
    µm/px, as in many SVS files) 1 µm/px with oversampling reads level 0.

    Examples
    --------
    >>> import numpy as np
    >>> from fibroquant.slides import ArraySlide
    >>> slide = ArraySlide(np.zeros((4096, 4096, 3), np.uint8), 0.25, levels=4)
    >>> g = plan_geometry(slide, 1.0, 64.0)
    >>> g.level, g.level_mpp, g.scale, g.height
    (1, 0.5, 0.5, 1024)
    >>> g = plan_geometry(slide, 1.0, 64.0, oversample=1.0)
    >>> g.level, g.level_mpp, g.scale, g.height
    (2, 1.0, 1.0, 1024)
    """
    mpp0 = require_mpp(slide)
    target = mpp0 if analysis_mpp is None else max(analysis_mpp, mpp0)
    best = 0
    for i, lev in enumerate(slide.levels):
        if lev.mpp is not None and lev.mpp <= target / oversample * (1 + 1e-3):
            best = i
    lev = slide.levels[best]
    level_mpp = lev.mpp if lev.mpp is not None else mpp0
    scale = min(level_mpp / target, 1.0)
    if abs(scale - 1.0) < 1e-3:
        scale = 1.0
    h = max(int(round(lev.shape[0] * scale)), 1)
    w = max(int(round(lev.shape[1] * scale)), 1)
    factor = max(1, math.ceil(math.sqrt(h * w / (mask_max_mpx * 1e6))))
    return _Geometry(best, level_mpp, level_mpp / scale, scale, h, w, factor)


def _read_analysis(slide: Slide, geo: _Geometry, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Read a rectangle in analysis coordinates (uint8 RGB).

    Downsampling averages intensities (``cv2.INTER_AREA``), as a camera pixel of that size
    would. (Averaging optical density instead keeps more of a thin fibre's dye in the mixed
    pixel but counts the mixed rims of thick fibres as collagen: +0.4–0.7 pp against native
    resolution on lossless pyramids, where intensity averaging stays within 0.25 pp.)
    """
    if geo.scale == 1.0:
        return slide.read_region(geo.level, y, x, h, w)
    ly0 = math.floor(y / geo.scale)
    lx0 = math.floor(x / geo.scale)
    ly1 = math.ceil((y + h) / geo.scale)
    lx1 = math.ceil((x + w) / geo.scale)
    region = slide.read_region(geo.level, ly0, lx0, ly1 - ly0, lx1 - lx0)
    return cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA)


def _index_map(start: int, stop: int, factor: float, size: int) -> np.ndarray:
    """Rows (or columns) of a low-resolution mask under analysis pixels start..stop."""
    idx = np.floor((np.arange(start, stop) + 0.5) / factor).astype(np.intp)
    return np.clip(idx, 0, size - 1)


def _lookup(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return kernels.lookup_nearest(mask, rows, cols)


def _tile_grid(geo: _Geometry, tile: int) -> list[tuple[int, int, int, int]]:
    tile = max(tile - tile % geo.mask_factor, geo.mask_factor)
    return [
        (y, x, min(y + tile, geo.height), min(x + tile, geo.width))
        for y in range(0, geo.height, tile)
        for x in range(0, geo.width, tile)
    ]


@dataclass(frozen=True)
class _TileJob:
    geo: _Geometry
    tissue: TissueMask
    fy: float
    fx: float
    lut: np.ndarray
    unmix_col: np.ndarray  # (3,) float32
    threshold: float
    settings: Settings
    background_map: np.ndarray | None = None  # per-pixel threshold offset at tissue resolution
    other_cols: tuple[np.ndarray, ...] = ()  # unmixing columns of the other stains
    line_od: float | None = None  # thin-fibre top-hat contrast
    line_floor_offset: float | None = None
    flags: np.ndarray | None = None  # per-pixel class bits at tissue resolution (fast path)
    threshold_map: np.ndarray | None = None  # float32 collagen threshold there (fast path)
    share_guard: float = 0.0  # least collagen share of a collagen pixel (CollagenThreshold)
    # a pixel classifier (fibroquant.classifier.PixelClassifier) deciding collagen instead of
    # the threshold, with the slide's fitted stains it reads
    classifier: Any = None
    stains: StainMatrix | None = None


def fast_path(settings: Settings, mpp: float, line_od: float | None) -> bool:
    """Whether a slide's tiles can be measured by the fused per-pixel kernel.

    That is the case when no step needs a neighbourhood at full resolution: no smoothing of
    the collagen channel and no thin-fibre top-hat (both off by default). Speck removal is
    done on the kernel's collagen mask. Otherwise tiles go through
    :func:`fibroquant.collagen.segment_collagen` with a halo.
    """
    c = settings.collagen
    return c.smooth_um / mpp <= 0.2 and line_od is None


def class_flags(tissue: TissueMask) -> np.ndarray:
    """Per-pixel class bits (``kernels.FLAG_*``) of a tissue mask, uint8."""
    flags = tissue.tissue.astype(np.uint8)  # FLAG_TISSUE
    for mask, bit in ((tissue.capsule_band, kernels.FLAG_BAND),
                      (tissue.vessel_wall, kernels.FLAG_WALL),
                      (tissue.lumen, kernels.FLAG_LUMEN), (tissue.fold, kernels.FLAG_FOLD),
                      (tissue.bubble, kernels.FLAG_BUBBLE)):
        if mask.any():
            flags[mask] |= np.uint8(bit)
    return flags


def _tile_masks(job: _TileJob, y0: int, x0: int, y1: int, x1: int, halo: int):
    th, tw = job.tissue.tissue.shape
    rows = _index_map(y0 - halo, y1 + halo, job.fy, th)
    cols = _index_map(x0 - halo, x1 + halo, job.fx, tw)
    return rows, cols


def collagen_concentration(rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray) -> np.ndarray:
    """Collagen stain concentration of a uint8 RGB tile (float32, OD units).

    Reference implementation: lookup-table OD per channel, then one dot product.
    """
    return (
        lut[0][rgb[..., 0]] * unmix_col[0]
        + lut[1][rgb[..., 1]] * unmix_col[1]
        + lut[2][rgb[..., 2]] * unmix_col[2]
    )


def _lookup_any(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """:func:`_lookup` for non-decreasing index maps, without the gather when the mask is
    uniform over the rows/columns spanned (all False: lumens, folds, capsule and walls in most
    tiles; all True: tissue inside the section). Same result: the looked-up pixels are a
    subset of that rectangle."""
    if len(rows) and len(cols):
        sub = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        if not sub.any():
            return np.zeros((len(rows), len(cols)), bool)
        if sub.all():
            return np.ones((len(rows), len(cols)), bool)
    return _lookup(mask, rows, cols)


def _process_tile(
    slide: Slide, job: _TileJob, box: tuple[int, int, int, int]
) -> tuple[tuple[int, int, int, int], TileCounts, np.ndarray, np.ndarray, np.ndarray] | None:
    """Measure one tile; masks are returned already reduced to the mask resolution."""
    if job.flags is not None:
        return _measure_tile_fused(slide, job, box)
    out = _measure_tile(slide, job, box)
    if out is None:
        return None
    box, counts, col, tis, exc, sharp = out
    f = job.geo.mask_factor
    return (box, counts, _block_reduce(col, f), _block_reduce(tis, f), _block_reduce(exc, f),
            sharp)


def _measure_tile_fused(slide: Slide, job: _TileJob, box: tuple[int, int, int, int]):
    """:func:`_measure_tile` when every decision is per pixel: one fused kernel pass, no halo,
    masks counted per block of the mask resolution instead of written at full resolution."""
    y0, x0, y1, x1 = box
    th, tw = job.flags.shape
    rows = _index_map(y0, y1, job.fy, th)
    cols = _index_map(x0, x1, job.fx, tw)
    if not _lookup_any(job.tissue.section, rows, cols).any():
        return None
    f = job.geo.mask_factor
    sub = job.flags[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if not (sub & kernels.FLAG_TISSUE).any():  # lumens / folds only: no pixel to read
        rgb = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    else:
        rgb = _read_analysis(slide, job.geo, y0, x0, y1 - y0, x1 - x0)
    stride = 2 if job.settings.tissue.exclude_unfocused else 0
    out = kernels.measure_tile_fused(
        rgb, job.lut, job.unmix_col, job.other_cols, job.share_guard,
        job.flags, job.threshold_map, rows, cols, f, stride,
        int(round(job.settings.collagen.min_object_area_um2 / job.geo.analysis_mpp**2)),
        *kernels.blob_limits(job.settings.collagen.blob_max_area_um2, job.geo.analysis_mpp),
    )
    counts = TileCounts(collagen_od_sum=out.collagen_od_sum, **out.counts)
    sharp = float("nan")
    if stride and counts.tissue_px:
        sharp = focus.sharpness_from_moments(out.focus, out.focus_shape)
    half = f * f
    col, tis, exc = (2 * b >= half for b in out.blocks)
    return box, counts, col, tis, exc, sharp


def _measure_tile(
    slide: Slide, job: _TileJob, box: tuple[int, int, int, int]
) -> tuple[tuple[int, int, int, int], TileCounts, np.ndarray, np.ndarray, np.ndarray] | None:
    y0, x0, y1, x1 = box
    rows_c = _index_map(y0, y1, job.fy, job.tissue.tissue.shape[0])
    cols_c = _index_map(x0, x1, job.fx, job.tissue.tissue.shape[1])
    if not _lookup_any(job.tissue.section, rows_c, cols_c).any():
        return None
    halo = job.settings.tiling.halo_px
    if job.classifier is not None:
        halo = max(halo, job.classifier.halo_px(job.geo.analysis_mpp))
    rows, cols = _tile_masks(job, y0, x0, y1, x1, halo)
    tissue_pad = _lookup_any(job.tissue.tissue, rows, cols)
    core = (slice(halo, halo + y1 - y0), slice(halo, halo + x1 - x0))
    lumen = _lookup_any(job.tissue.lumen, rows_c, cols_c)
    fold = _lookup_any(job.tissue.fold, rows_c, cols_c)
    bubble = _lookup_any(job.tissue.bubble, rows_c, cols_c)
    if not tissue_pad[core].any():
        counts = TileCounts(lumen_px=int(np.count_nonzero(lumen)), fold_px=int(np.count_nonzero(fold)),
                            bubble_px=int(np.count_nonzero(bubble)))
        empty = np.zeros((y1 - y0, x1 - x0), bool)
        return box, counts, empty, empty, lumen | fold | bubble, float("nan")
    rgb = _read_analysis(slide, job.geo, y0 - halo, x0 - halo, y1 - y0 + 2 * halo, x1 - x0 + 2 * halo)
    threshold: float | np.ndarray = job.threshold
    if job.background_map is not None:
        threshold = _lookup(job.background_map, rows, cols) + np.float32(job.threshold)
    share_ok = None
    if job.other_cols and job.share_guard > 0:
        conc, share_ok = kernels.collagen_concentration_and_share(
            rgb, job.lut, job.unmix_col, job.other_cols, job.share_guard
        )
    else:
        conc = kernels.collagen_concentration_fast(rgb, job.lut, job.unmix_col)
    tissue = tissue_pad[core]
    band = _lookup_any(job.tissue.capsule_band, rows_c, cols_c)
    wall = _lookup_any(job.tissue.vessel_wall, rows_c, cols_c)
    decided = None
    if job.classifier is None or band.any():
        decided = segment_collagen(
            conc, tissue_pad if share_ok is None else tissue_pad & share_ok, threshold,
            job.geo.analysis_mpp, job.settings.collagen,
            line_od=job.line_od, line_floor_offset=job.line_floor_offset,
        )[core]
    if job.classifier is not None:  # the study's classifier decides collagen; the capsule
        # stays the threshold's collagen in the capsule band, so the tissue counted (the
        # denominator) is the default path's whichever decides
        collagen = job.classifier.predict_tile(rgb, halo, job.stains, mpp=job.geo.analysis_mpp,
                                               tissue=tissue)
        capsule = band & decided if decided is not None else np.zeros_like(collagen)
    else:
        collagen = decided
        capsule = collagen & band
    wall_px = wall & tissue & ~capsule
    collagen = collagen & ~capsule & ~wall_px
    tissue = tissue & ~capsule & ~wall_px
    counts = TileCounts(
        tissue_px=int(np.count_nonzero(tissue)),
        collagen_px=int(np.count_nonzero(collagen)),
        collagen_od_sum=float(conc[core][collagen].sum(dtype=np.float64)),
        capsule_px=int(np.count_nonzero(capsule)),
        lumen_px=int(np.count_nonzero(lumen)),
        fold_px=int(np.count_nonzero(fold)),
        wall_px=int(np.count_nonzero(wall_px)),
        bubble_px=int(np.count_nonzero(bubble)),
    )
    sharp = float("nan")
    if job.settings.tissue.exclude_unfocused:
        # every second pixel: blur that matters removes detail at that scale too, at 1/4 cost
        core_rgb = rgb[core][::2, ::2]
        od_sum = (job.lut[0][core_rgb[..., 0]] + job.lut[1][core_rgb[..., 1]]
                  + job.lut[2][core_rgb[..., 2]])
        sharp = focus.block_sharpness(od_sum, tissue_pad[core][::2, ::2])
    return box, counts, collagen, tissue, capsule | wall_px | lumen | fold | bubble, sharp


def _block_reduce(mask: np.ndarray, f: int) -> np.ndarray:
    """Majority vote over f×f blocks (mask resolution of large slides)."""
    if f == 1:
        return mask
    return kernels.block_majority(mask, f)


#: A tile with tissue: (tissue fraction, box, low-resolution row of every tile row, of every
#: tile column).
_Covered = tuple[float, tuple[int, int, int, int], np.ndarray, np.ndarray]


def _tissue_boxes(
    tissue: TissueMask, fy: float, fx: float, boxes: list[tuple[int, int, int, int]]
) -> list[_Covered]:
    """The tiles that touch tissue, in grid order, with their tissue fraction (judged on every
    8th row and column of the tissue mask under them)."""
    th, tw = tissue.tissue.shape
    covered = []
    for box in boxes:
        y0, x0, y1, x1 = box
        rows = _index_map(y0, y1, fy, th)
        cols = _index_map(x0, x1, fx, tw)
        frac = float(tissue.tissue[np.ix_(rows[::8], cols[::8])].mean())
        if frac > 0:
            covered.append((frac, box, rows, cols))
    return covered


def _registration_tiles(
    slide: Slide, geo: _Geometry, covered: list[_Covered], n_tiles: int = 3
) -> list[np.ndarray]:
    """Up to ``n_tiles`` regions of the most tissue-covered tiles, read from the analysis
    level as they are (no resampling: a plane shift is a sub-pixel property of that level)."""
    best = sorted(covered, key=lambda c: -c[0])[: 4 * n_tiles]
    pick = np.unique(np.linspace(0, len(best) - 1, min(n_tiles, len(best))).round().astype(int))
    level_h, level_w = slide.levels[geo.level].shape
    tiles = []
    for i in pick:
        y0, x0, y1, x1 = best[i][1]
        # the box's centre on the level, and a square of up to 512 px around it
        cy = int((y0 + y1) / 2 / geo.scale)
        cx = int((x0 + x1) / 2 / geo.scale)
        half = min(256, level_h // 2, level_w // 2)
        if half < 32:
            break  # a level this small has no quadrant worth correlating
        ry = min(max(cy - half, 0), level_h - 2 * half)
        rx = min(max(cx - half, 0), level_w - 2 * half)
        tiles.append(slide.read_region(geo.level, ry, rx, 2 * half, 2 * half))
    return tiles


def _calibration_pixels(
    slide: Slide, geo: _Geometry, tissue: TissueMask, covered: list[_Covered], n_pixels: int
) -> np.ndarray:
    """uint8 RGB (N, 3) of tissue pixels at analysis resolution, spread over the slide."""
    if not covered:
        return np.zeros((0, 3), np.uint8)
    per_tile = max((b[2] - b[0]) * (b[3] - b[1]) for _, b, _, _ in covered)
    n_tiles = min(len(covered), max(8, math.ceil(2 * n_pixels / per_tile)))
    pick = np.unique(np.linspace(0, len(covered) - 1, n_tiles).round().astype(int))
    # every second row and column when the tiles hold far more pixels than needed
    step = 2 if len(pick) * per_tile >= 8 * n_pixels else 1
    chunks = []
    for i in pick:
        _, (y0, x0, y1, x1), rows, cols = covered[i]
        rgb = _read_analysis(slide, geo, y0, x0, y1 - y0, x1 - x0)[::step, ::step]
        chunks.append(rgb[tissue.tissue[np.ix_(rows[::step], cols[::step])]])
    px = np.concatenate(chunks)
    if len(px) > n_pixels:
        rng = np.random.default_rng(0)
        px = px[np.sort(rng.choice(len(px), n_pixels, replace=False))]
    return px


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

    Raises glibc's mmap threshold to 64 MB (32 MB where refused) and its trim threshold to
    256 MB, so tile buffers are not mapped and zero-filled afresh for every tile; left alone
    when ``MALLOC_MMAP_THRESHOLD_`` is set or the C library is not glibc. Why and what it saves:
    docs/decisions.md#malloc

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
) -> SlideAnalysis:
    """Measure collagen proportionate area on one slide.

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
        An already open slide (e.g. :class:`fibroquant.slides.ArraySlide` in tests).

    Returns
    -------
    SlideAnalysis

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
        return _analyze(sl, settings, workers, t_start)
    finally:
        if own:
            sl.close()


def _warm_quietly() -> None:
    """Background kernel loading; a failure is raised again, on the caller's thread, by the
    tile loop's own :func:`kernels.warmup_fused` call."""
    try:
        kernels.warmup_fused()
    except Exception:  # noqa: BLE001 - reported by the foreground call
        logger.debug("background kernel warm-up failed:\n%s", traceback.format_exc())


def _analyze(sl: Slide, settings: Settings, workers: int, t_start: float) -> SlideAnalysis:
    name = sl.path.name
    raw = sl  # the slide as given; corrections of the optics wrap it (CorrectedSlide)
    require_colour(sl)  # a greyscale image would read as CPA 0 %: refuse it instead
    if not kernels.kernels_ready():
        # load the compiled tile kernels (numba cache, ~0.5 s once per process) while the
        # thumbnail is read and analysed; the tile loop waits for it below
        threading.Thread(target=_warm_quietly, name="fibroquant-warmup", daemon=True).start()
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
        why = no_tissue_reason(thumb, thumb_mpp, settings.tissue, background, tissue)
        msg = f"{name}: no tissue found: {why}"
        raise FibroquantError(msg)
    fy = geo.height / thumb.shape[0]
    fx = geo.width / thumb.shape[1]
    boxes = _tile_grid(geo, settings.tiling.tile_px)

    covered = _tissue_boxes(tissue, fy, fx, boxes)
    shifts = None
    if settings.tissue.register_channels:
        shifts = estimate_channel_shifts(_registration_tiles(sl, geo, covered))
        if shifts is not None:
            shifts = shifts * sl.levels[geo.level].downsample  # level-0 pixels
            sl = CorrectedSlide(raw, shading, shifts)
    preset = preset_for(settings.stains).with_background(background)
    sample = _calibration_pixels(sl, geo, tissue, covered, settings.stains.sample_pixels)
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
    if blob_auto:  # automatic: decided by the nuclei's stain
        blob = auto_blob_area(pos[stained], stains)
        settings = settings.model_copy(update={
            "collagen": settings.collagen.model_copy(update={"blob_max_area_um2": blob})})
    thumb_conc = rgb_to_od(thumb, background) @ stains.unmixing
    # the collagen plane is read by every step below: contiguous, not a strided view
    thumb_col = np.ascontiguousarray(thumb_conc[..., stains.collagen_index])
    if len(stains.names) > 1:
        tissue = with_folds(tissue, np.ascontiguousarray(thumb_conc[..., 1]), settings.tissue,
                            thumb_col, thr.threshold_od)
    bg_map = None
    thumb_threshold: float | np.ndarray = thr.threshold_od
    offset = thr.threshold_od
    if thr.method == "relative" and settings.collagen.local_background_um:
        tpos = np.maximum(thumb_conc, 0)
        tshare = tpos[..., stains.collagen_index] / np.maximum(channel_sum(tpos), 1e-6)
        del tpos  # thumbnail-sized temporaries are freed as soon as possible (peak RSS)
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
        offset = thr.threshold_od - thr.parenchyma_od
        thumb_threshold = bg_map + np.float32(offset)
    tissue = with_capsule(tissue, thumb_col > thumb_threshold)
    del thumb_conc, thumb_col, thumb_threshold  # not needed by the tile loop (peak RSS)

    line_od, line_floor = _line_params(thr, settings)
    flags = threshold_map = None
    clf = None
    if settings.classifier is not None:
        from fibroquant.classifier import load_cached

        clf = load_cached(settings.classifier)
    if clf is None and fast_path(settings, geo.analysis_mpp, line_od):
        flags = class_flags(tissue)
        if bg_map is not None:
            threshold_map = bg_map + np.float32(offset)  # float32, as the tile path adds it
        else:
            threshold_map = np.full(flags.shape, kernels.threshold_as_float32(
                np.dtype(np.float32), thr.threshold_od), np.float32)
    job = _TileJob(
        geo, tissue, fy, fx, od_lut(background), stains.unmixing[:, stains.collagen_index].copy(),
        offset if bg_map is not None else thr.threshold_od, settings, bg_map,
        tuple(stains.unmixing[:, i].copy() for i in range(len(stains.names))
              if i != stains.collagen_index),
        line_od, line_floor, flags, threshold_map, thr.share_guard, clf, stains,
    )
    f = geo.mask_factor
    mh, mw = -(-geo.height // f), -(-geo.width // f)
    collagen_m = np.zeros((mh, mw), bool)
    tissue_m = np.zeros((mh, mw), bool)
    excluded_m = np.zeros((mh, mw), bool)
    total = TileCounts()
    if flags is not None:
        kernels.warmup_fused()
    else:
        kernels.warmup()
    measured: list[tuple[tuple[int, int, int, int], TileCounts, float]] = []
    for out in _map_tiles(sl, job, boxes, workers):
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
    for ((y0, x0, y1, x1), counts, _), bad in zip(measured, blurry):
        if not bad:
            total = total + counts
            continue
        # out of focus: its tissue is excluded (reported), like a fold
        total = total + TileCounts(
            lumen_px=counts.lumen_px, fold_px=counts.fold_px, bubble_px=counts.bubble_px,
            unfocused_px=counts.tissue_px + counts.capsule_px + counts.wall_px,
        )
        ys, xs = slice(y0 // f, -(-y1 // f)), slice(x0 // f, -(-x1 // f))
        excluded_m[ys, xs] |= tissue_m[ys, xs]
        collagen_m[ys, xs] = False
        tissue_m[ys, xs] = False
    meas = Measurements.from_counts(total, geo.analysis_mpp)
    fit = _stain_fit(_tissue_pixels(thumb, tissue.tissue, STAIN_FIT_MAX_PIXELS), max_pixels=50_000)
    warnings = stain_warnings(est, preset, thr, fit, settings.stains.stain.value)
    if blob_auto and settings.collagen.blob_max_area_um2:
        warnings.append(
            "nuclei not iron haematoxylin (blue-purple): compact blobs up to "
            f"{settings.collagen.blob_max_area_um2:g} µm² not counted as collagen (automatic)")
    if total.tissue_px == 0:
        msg = f"{name}: no countable tissue left after exclusions"
        raise FibroquantError(msg)
    mask_mpp = geo.analysis_mpp * f
    qc = thumb if thumb_mpp >= mask_mpp * 0.999 else sl.thumbnail(mask_mpp)
    col_idx = stains.collagen_index
    verdict = stain_verdict(fit, settings.stains.stain.value)
    record: dict[str, Any] = {
        "status": "ok",
        "error": "",
        "stain": settings.stains.stain.value,
        "format": sl.format,
        "mpp": require_mpp(sl),
        "analysis_mpp": geo.analysis_mpp,
        "level": geo.level,
        "width_px": geo.width,
        "height_px": geo.height,
        "mask_mpp": mask_mpp,
        **{k: getattr(meas, k) for k in meas.__dataclass_fields__},
        "glass_od": tissue.glass_od,
        "shading_od": 0.0 if shading is None else round(shading.od_range, 4),
        "channel_shift_px": 0.0 if shifts is None else round(float(np.hypot(*shifts.T).max()), 3),
        "background_rgb": json.dumps([round(b, 1) for b in background]),
        "background_source": bg_source,
        "stain_source": est.source,
        "stain_vectors": json.dumps(stains.to_dict()),
        "stain_angle_deg": round(angle_deg(stains.vectors[col_idx], preset.vectors[col_idx]), 2),
        "stain_angles_deg": json.dumps(est.angles_deg),
        "collagen_od_share": est.od_share.get(stains.collagen, 0.0),
        "threshold_method": thr.method,
        "threshold_od": thr.threshold_od,
        "parenchyma_od": thr.parenchyma_od,
        "collagen_level_od": thr.collagen_level_od,
        "share_guard": thr.share_guard,
        "parenchyma_share": thr.parenchyma_share,
        "blob_max_area_um2": settings.collagen.blob_max_area_um2,
        "stain_fit": json.dumps(fit),
        "stain_guess": verdict.guess,
        "wrong_stain": verdict.wrong,
        "stain_warning": "; ".join(warnings),
        "seconds": round(time.perf_counter() - t_start, 3),
        "version": __version__,
    }
    if settings.traits.enabled:
        from fibroquant import traits  # noqa: PLC0415 - only when measured

        record.update(traits.measure_slide(collagen_m, tissue_m, mask_mpp, settings.traits,
                                           lumen=tissue.lumen, lumen_mpp=thumb_mpp,
                                           workers=workers))
        record["seconds"] = round(time.perf_counter() - t_start, 3)
    record["qc_flags"] = "; ".join(qc_flags(record, pale_counterstain=thr.pale_counterstain))
    return SlideAnalysis(record, collagen_m, tissue_m, excluded_m, mask_mpp, qc,
                         flags=flags if flags is not None else class_flags(tissue))


def _glass_background(
    thumb: np.ndarray, thumb_mpp: float, settings: Settings, background: Vector
) -> tuple[tuple[float, float, float], str]:
    """The glass colour from the pixels outside the section (``"glass"``), when there are
    enough of them; otherwise what :func:`_estimate_background` falls back to.

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
    return _estimate_background(thumb, glass_mask=glass)


def _line_params(thr: CollagenThreshold, settings: Settings) -> tuple[float | None, float | None]:
    """Thin-fibre contrast and floor from the slide's levels (relative method only)."""
    c = settings.collagen
    if thr.method != "relative" or c.fibre_width_um <= 0 or not np.isfinite(thr.collagen_level_od):
        return None, None
    line = max(c.fibre_threshold * (thr.collagen_level_od - thr.parenchyma_od),
               0.5 * c.min_contrast_od)
    # floor: parenchyma level + minimum contrast, expressed relative to the area threshold
    return line, thr.threshold_od - thr.parenchyma_od - c.min_contrast_od


def _background(thumb: np.ndarray, settings: Settings) -> tuple[tuple[float, float, float], str]:
    if settings.stains.background_rgb is not None:
        return settings.stains.background_rgb, "config"
    return _estimate_background(thumb)


# ------------------------------------------------------------------------------------------
# Thumbnail statistics: exact, histogram-based versions of stains.estimate_background and
# stains.stain_fit (the originals sort / copy the whole 16 MP thumbnail as int32 / float64).
# tests/test_speed_paths.py checks they return exactly what the stains.py functions return.
# ------------------------------------------------------------------------------------------


_CHUNK = 1 << 21  # pixels per chunk of the thumbnail statistics (bounded temporaries)


def _bincount(values: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount(values, minlength=minlength)`` in chunks (no full-size intp copy)."""
    out = np.zeros(minlength, np.int64)
    for s in range(0, len(values), _CHUNK):
        out += np.bincount(values[s : s + _CHUNK], minlength=minlength)
    return out


def _hist_order_stats(hist: np.ndarray, ks: list[int]) -> list[int]:
    """Values at sorted positions ``ks`` of the data whose histogram (bin = value) is given."""
    cum = np.cumsum(hist)
    return [int(np.searchsorted(cum, k, side="right")) for k in ks]


def _median_uint8_columns(px: np.ndarray) -> np.ndarray:
    """``np.median(px, axis=0)`` of uint8 (N, 3) pixels (N >= 1), float64, via histograms."""
    return _median_from_histograms([_bincount(px[:, c], 256) for c in range(px.shape[1])],
                                   len(px))


def _median_from_histograms(hists: list[np.ndarray], n: int) -> np.ndarray:
    """Per-channel ``np.median`` of n uint8 values given their 256-bin histograms."""
    out = np.empty(len(hists), np.float64)
    for c, hist in enumerate(hists):
        a, b = _hist_order_stats(hist, [(n - 1) // 2, n // 2])
        out[c] = np.mean(np.array([a, b], np.uint8)) if a != b else float(a)
    return out


def _estimate_background(
    rgb_pixels: np.ndarray, *, glass_mask: np.ndarray | None = None, min_pixels: int = 500
) -> tuple[tuple[float, float, float], str]:
    """Same result as :func:`fibroquant.stains.estimate_background`, without sorting."""
    px = np.asarray(rgb_pixels).reshape(-1, 3)
    if px.dtype != np.uint8:
        return estimate_background(rgb_pixels, glass_mask=glass_mask, min_pixels=min_pixels)
    if glass_mask is not None:
        glass = np.asarray(glass_mask).reshape(-1)
        n_glass = int(np.count_nonzero(glass))
        if n_glass >= min_pixels:
            if n_glass < 2**24 and px.flags.c_contiguous:
                # histograms of the glass pixels in place (no copy of them); OpenCV's float32
                # counts are exact below 2**24
                image = px.reshape(-1, 1, 3)
                m = np.ascontiguousarray(glass).view(np.uint8).reshape(-1, 1)
                hists = [cv2.calcHist([image], [c], m, [256], [0, 256]).ravel().astype(np.int64)
                         for c in range(3)]
                bg = _median_from_histograms(hists, n_glass)
            else:
                bg = _median_uint8_columns(px[glass])
            if bg.min() >= 120:
                return tuple(float(max(b, 1.0)) for b in bg), "glass"  # type: ignore[return-value]
    if len(px) == 0:
        return (255.0, 255.0, 255.0), "default"
    brightness = px[:, 0].astype(np.uint16)
    brightness += px[:, 1]
    brightness += px[:, 2]
    n = len(px)
    virtual = (n - 1) * 0.995  # np.quantile, method "linear"
    lo = math.floor(virtual)
    hi = min(lo + 1, n - 1)
    a, b = _hist_order_stats(_bincount(brightness, 766), [lo, hi])
    # numpy's own interpolation between the two order statistics (same rounding)
    cut = np.quantile(np.array([a, b], np.int64), virtual - lo)
    # brightness is integer: b >= cut <=> b >= ceil(cut) (no float64 copy of the comparison)
    bright = px[brightness >= math.ceil(float(cut))]
    bg = _median_uint8_columns(bright)
    if bg.min() >= 170 and (bg.max() - bg.min()) <= 0.25 * bg.max():
        return tuple(float(b) for b in bg), "brightest"  # type: ignore[return-value]
    return (255.0, 255.0, 255.0), "default"


#: The stain-fit QC reads at most about this many of the low-resolution image's tissue pixels
#: (every k-th row and column): the boolean index and the per-pixel passes over a 4-MP image
#: took 0.3-0.45 s per slide, a ninth of it 0.05 s, with fits within 0.001 of the full image's.
STAIN_FIT_MAX_PIXELS = 500_000


def _tissue_pixels(rgb: np.ndarray, mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """The ``mask`` pixels of ``rgb`` as an (N, 3) array, from every k-th row and column
    (k the smallest that leaves at most about ``max_pixels``; 1 for small images)."""
    n = int(np.count_nonzero(mask))
    k = math.ceil(math.sqrt(n / max_pixels)) if n > max_pixels else 1
    return rgb[::k, ::k][mask[::k, ::k]]


def _stain_fit(rgb: np.ndarray, *, od_floor: float = 0.15, max_pixels: int = 200_000
               ) -> dict[str, float]:
    """Same result as :func:`fibroquant.stains.stain_fit`, computing the OD only of the
    pixels it samples (the OD norm of every pixel comes from per-channel tables)."""
    from fibroquant import stains as st

    px = np.asarray(rgb).reshape(-1, 3)
    if px.dtype != np.uint8:
        return stain_fit(rgb, od_floor=od_floor, max_pixels=max_pixels)
    dark = st.dark_share(px)
    bg, _ = _estimate_background(px)
    sq = od_lut(bg).astype(np.float64) ** 2
    keep = np.empty(len(px), bool)
    for s in range(0, len(px), _CHUNK):
        p = px[s : s + _CHUNK]
        norm = np.sqrt(sq[0][p[:, 0]] + sq[1][p[:, 1]] + sq[2][p[:, 2]])
        k = norm > od_floor
        # pixels within rounding of the floor: decide exactly as np.linalg.norm does
        near = np.flatnonzero(np.abs(norm - od_floor) <= 1e-9)
        if near.size:
            od_near = rgb_to_od(p[near], bg).astype(np.float64)
            k[near] = np.linalg.norm(od_near, axis=1) > od_floor
        keep[s : s + _CHUNK] = k
    # = idx = flatnonzero(keep); idx[rng.choice(len(idx), max_pixels, replace=False)], without
    # the full-size index array: ranks among kept pixels are mapped chunk by chunk
    counts = np.array([np.count_nonzero(keep[s : s + _CHUNK]) for s in range(0, len(px), _CHUNK)],
                      np.int64)
    n_keep = int(counts.sum())
    if n_keep < 100:
        return {"dark_share": round(dark, 4)} if dark >= st.DARK_FIELD_MIN_SHARE else {}
    if n_keep > max_pixels:
        ranks = np.random.default_rng(0).choice(n_keep, max_pixels, replace=False)
    else:
        ranks = np.arange(n_keep)
    ends = np.cumsum(counts)
    chunk_of = np.searchsorted(ends, ranks, side="right")
    idx = np.empty(len(ranks), np.intp)
    for c in np.unique(chunk_of):
        sel = chunk_of == c
        nz = np.flatnonzero(keep[c * _CHUNK : (c + 1) * _CHUNK]) + c * _CHUNK
        idx[sel] = nz[ranks[sel] - (ends[c] - counts[c])]
    od = rgb_to_od(px[idx], bg).astype(np.float64)
    return st.protocol_fit(od, dark)


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
    tile = _process_tile if not cores.in_pool() else cores.gated(_process_tile, workers)
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


__all__ = [
    "SlideAnalysis",
    "SlideReadError",
    "SlideTask",
    "analyze_slide",
    "collagen_concentration",
    "plan_geometry",
    "tune_malloc",
]
