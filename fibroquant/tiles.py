"""The analysis image's geometry and its tiles, each measured by one path.

:func:`plan_geometry` places the analysis image in the slide's pyramid; :func:`tile_grid` cuts it
into tiles and :func:`measure_box` measures one (reading only tiles that touch the section).
:func:`measure_tile` hands a tile to the fused kernel
(:func:`fibroquant.kernels.measure_tile_fused`) when it can take it, else to
:func:`measure_tile_reference`, its numpy twin (no numba; the tests' oracle). Both decide collagen
by :class:`fibroquant.collagen.CollagenRule`, unless a :class:`PixelDecider` (e.g. a trained
pixel classifier) decides it instead: its mask then goes through the same counting.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from fibroquant import cores, exclusions, focus, kernels
from fibroquant.collagen import (
    CollagenRule,
    collagen_concentration,
    is_collagen,
    speck_mask,
)
from fibroquant.kernels import FusedTile
from fibroquant.measure import TileCounts
from fibroquant.slides import Slide, require_mpp
from fibroquant.stains import StainMatrix
from fibroquant.tissue import TissueMask


class PixelDecider(Protocol):
    """A collagen decision that replaces the :class:`fibroquant.collagen.CollagenRule` on each
    tile (e.g. :class:`fibroquant.classifier.PixelClassifier`).

    The tile loop reads each tile with ``halo_px(mpp)`` pixels of the slide around it (white,
    like glass, past the slide's edge) and calls ``predict_tile``; the mask it returns (bool,
    the tile's shape) is counted as the rule's is, except that the capsule stays the rule's
    collagen in the capsule band (so the tissue counted is the rule's whichever decides).
    """

    def halo_px(self, mpp: float) -> int: ...

    def predict_tile(self, rgb_with_halo: np.ndarray, halo_px: int, stains: StainMatrix, *,
                     mpp: float, tissue: np.ndarray | None = None) -> np.ndarray: ...


def measure_tile(
    rgb: np.ndarray, rule: CollagenRule, flags: np.ndarray, thr: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, f: int, stride: int, *, decided: np.ndarray | None = None,
) -> FusedTile:
    """Counts, block counts and focus moments of one tile (see :func:`measure_tile_reference`):
    by the fused kernel when it can take the inputs (with a ``decided`` mask:
    :func:`measure_decided_fused`)."""
    if kernels.fused_ok(rgb, rule.lut, rule.unmix_col, rule.other_cols, flags, thr, rows, cols):
        if decided is None:
            return kernels.measure_tile_fused(
                rgb, rule.lut, rule.unmix_col, rule.other_cols, rule.guard, flags, thr,
                rows, cols, f, stride, rule.min_object_px, rule.blob_px, rule.blob_side)
        return measure_decided_fused(rgb, rule, flags, thr, rows, cols, f, stride, decided)
    return measure_tile_reference(rgb, rule, flags, thr, rows, cols, f, stride, decided=decided)


def measure_decided_fused(
    rgb: np.ndarray, rule: CollagenRule, flags: np.ndarray, thr: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, f: int, stride: int, decided: np.ndarray,
) -> FusedTile:
    """:func:`measure_tile_reference` with a ``decided`` mask, by the fused kernel.

    The kernel counts the tile with an infinite threshold outside the capsule band (tissue,
    exclusions, the rule's capsule in the band, blocks and focus as the reference's; no
    collagen elsewhere). The collagen is then the decided pixels of the tissue outside the
    vessel walls and the rule's capsule (the rule is asked only at decided band pixels), in
    one compiled pass over the mask: the reference's counts and blocks, and its collagen OD
    sum to ~1e-12 (summed in float64 in pixel order, as the kernel does).

    Parameters
    ----------
    decided : ndarray of bool, shape (H, W)
        Collagen pixels decided by a :class:`PixelDecider`.
    """
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    fl = np.ascontiguousarray(flags[r0:r1, c0:c1])  # the tile's cells only
    rr, cc = rows - r0, cols - c0
    band = (fl & (kernels.FLAG_TISSUE | kernels.FLAG_BAND)) == (kernels.FLAG_TISSUE
                                                               | kernels.FLAG_BAND)
    cut = np.where(band, thr[r0:r1, c0:c1], np.float32(np.inf)).astype(np.float32)
    guard = kernels.guard_array(rule.guard)  # (1, 1), or the tile's cells of the guard map
    if guard.shape != (1, 1):
        guard = np.ascontiguousarray(guard[r0:r1, c0:c1])
    out = kernels.measure_tile_fused(rgb, rule.lut, rule.unmix_col, rule.other_cols, guard,
                                     fl, cut, rr, cc, f, stride)
    countable = (fl & (kernels.FLAG_TISSUE | kernels.FLAG_WALL)) == kernels.FLAG_TISSUE
    cells = np.where(countable, np.where(band, 2, 1), 0).astype(np.uint8)
    others = kernels._other_tables(rule.lut, rule.other_cols if rule.share_guard > 0 else ())
    blocks = out.blocks.copy()
    blocks[0] = 0
    n, od = _count_decided(np.ascontiguousarray(decided), rgb, cells, cut, rr, cc, int(f),
                           kernels.scaled_tables(rule.lut, rule.unmix_col), others, guard,
                           blocks[0])
    return FusedTile(dict(out.counts, collagen_px=int(n)), float(od), blocks, out.focus,
                     out.focus_shape)


def _count_decided_py(decided, rgb, cells, thr, rows, cols, f, tables, others, guard,
                      blocks):  # pragma: no cover - compiled below
    """Count the decided pixels of countable cells (``cells`` 1, or 2 in the capsule band,
    where the rule's capsule is not collagen: the fused kernel's test, with the share guard of
    the cell, ``guard`` (1, 1) for one everywhere), with their collagen concentration (summed
    in float64 in pixel order) and block counts (into ``blocks``)."""
    t0, t1, t2 = tables[0], tables[1], tables[2]
    one_guard = guard.shape[0] == 1 and guard.shape[1] == 1
    n = 0
    od = np.float64(0.0)
    for i in range(decided.shape[0]):
        ri = rows[i]
        brow = blocks[i // f]
        for j in range(decided.shape[1]):
            if not decided[i, j]:
                continue
            cj = cols[j]
            k = cells[ri, cj]
            if k == 0:
                continue
            r, g, b = rgb[i, j, 0], rgb[i, j, 1], rgb[i, j, 2]
            c = t0[r] + t1[g] + t2[b]
            gv = guard[0, 0] if one_guard else guard[ri, cj]
            if k == 2 and c > thr[ri, cj] and (
                    others.shape[0] == 0 or kernels._share_ok_nb(c, r, g, b, others, gv)):
                continue  # the rule's capsule
            n += 1
            od += c
            brow[j // f] += 1
    return n, od


_count_decided = kernels._jit(_count_decided_py) or _count_decided_py


def measure_tile_reference(
    rgb: np.ndarray, rule: CollagenRule, flags: np.ndarray, thr: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, f: int, stride: int, *, decided: np.ndarray | None = None,
) -> FusedTile:
    """numpy reference of :func:`fibroquant.kernels.measure_tile_fused` (whole-array steps).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    rule : CollagenRule
    flags : ndarray of uint8, shape (h, w)
        Low-resolution class bits (``kernels.FLAG_*``).
    thr : ndarray of float32, shape (h, w)
        Low-resolution collagen threshold, OD units.
    rows, cols : ndarray of intp
        Low-resolution row / column of every tile row / column.
    f : int
        Block edge of the mask resolution, tile pixels.
    stride : int
        Sampling step of the focus samples (0 = none).
    decided : ndarray of bool, shape (H, W), optional
        Collagen pixels decided by a :class:`PixelDecider` instead of the rule (no speck
        removal; the capsule is still the rule's collagen in the band).

    Returns
    -------
    FusedTile
    """
    fl = flags[np.ix_(rows, cols)]
    tissue = (fl & kernels.FLAG_TISSUE) != 0
    band = (fl & kernels.FLAG_BAND) != 0
    if decided is not None and not band.any():  # the rule would only find the capsule
        conc, col = collagen_concentration(rgb, rule.lut, rule.unmix_col), decided
    else:
        guard = None if rule.guard_map is None else rule.guard_map[np.ix_(rows, cols)]
        conc, col = is_collagen(rgb, thr[np.ix_(rows, cols)], rule, guard)
    col = col & tissue
    capsule = col & band
    if decided is not None:
        col = decided & tissue
    wall = ((fl & kernels.FLAG_WALL) != 0) & tissue & ~capsule
    col &= ~capsule & ~wall
    tissue &= ~capsule & ~wall
    if decided is None:
        col &= ~speck_mask(col, rule)
    area = (fl & np.uint8(exclusions.area_bits())) != 0
    excluded = capsule | wall | area
    masks = {"tissue_px": tissue, "collagen_px": col, exclusions.BAND.count: capsule,
             exclusions.WALL.count: wall}
    masks.update({c.count: (fl & np.uint8(c.bit)) != 0 for c in exclusions.by_rule("area")})
    counts = {name: int(np.count_nonzero(masks[name])) for name in kernels.fused_counts()}
    h, w = tissue.shape
    bh, bw = -(-h // f), -(-w // f)
    blocks = np.zeros((3, bh * f, bw * f), np.int32)
    for k, m in enumerate((col, tissue, excluded)):
        blocks[k, :h, :w] = m
    blocks = blocks.reshape(3, bh, f, bw, f).sum(axis=(2, 4), dtype=np.int32)
    mom, shape = None, (0, 0)
    if stride > 0:
        lut = rule.lut
        sub = rgb[::stride, ::stride]
        od_sub = lut[0][sub[..., 0]] + lut[1][sub[..., 1]] + lut[2][sub[..., 2]]
        tis_sub = ((fl & kernels.FLAG_TISSUE) != 0)[::stride, ::stride]
        mom, shape = kernels.focus_moments_reference(od_sub, tis_sub), od_sub.shape
    return FusedTile(counts, float(conc[col].sum(dtype=np.float64)), blocks, mom, shape)


@dataclass(frozen=True)
class Geometry:
    """Where the analysis image sits in the slide (:func:`plan_geometry`)."""

    level: int
    level_mpp: float
    analysis_mpp: float
    scale: float  # analysis px per level px (<= 1)
    height: int  # analysis image size
    width: int
    mask_factor: int  # analysis px per mask px

    @property
    def mask_mpp(self) -> float:
        """µm per pixel of the low-resolution masks."""
        return self.analysis_mpp * self.mask_factor


def plan_geometry(
    slide: Slide, analysis_mpp: float | None, mask_max_mpx: float, oversample: float = 2.0
) -> Geometry:
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
    h = max(round(lev.shape[0] * scale), 1)
    w = max(round(lev.shape[1] * scale), 1)
    factor = max(1, math.ceil(math.sqrt(h * w / (mask_max_mpx * 1e6))))
    return Geometry(best, level_mpp, level_mpp / scale, scale, h, w, factor)


def read_analysis(slide: Slide, geo: Geometry, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Read a rectangle in analysis coordinates (uint8 RGB).

    Downsampling averages intensities (``cv2.INTER_AREA``), as a camera pixel of that size
    would. (Averaging optical density instead keeps more of a thin fibre's dye in the mixed
    pixel but counts the mixed rims of thick fibres as collagen: +0.4-0.7 pp against native
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


def index_map(start: int, stop: int, factor: float, size: int) -> np.ndarray:
    """Rows (or columns) of a low-resolution mask under analysis pixels start..stop."""
    idx = np.floor((np.arange(start, stop) + 0.5) / factor).astype(np.intp)
    return np.clip(idx, 0, size - 1)


def tile_grid(geo: Geometry, tile: int) -> list[tuple[int, int, int, int]]:
    tile = max(tile - tile % geo.mask_factor, geo.mask_factor)
    return [
        (y, x, min(y + tile, geo.height), min(x + tile, geo.width))
        for y in range(0, geo.height, tile)
        for x in range(0, geo.width, tile)
    ]


@dataclass(frozen=True)
class TileJob:
    """What every tile of a slide needs: where it is, its class map and its collagen rule."""

    geo: Geometry
    tissue: TissueMask
    fy: float  # analysis px per tissue-mask px
    fx: float
    rule: CollagenRule
    flags: np.ndarray  # per-pixel class bits (kernels.FLAG_*) at tissue resolution, uint8
    threshold_map: np.ndarray  # float32 collagen threshold there, OD units
    focus_stride: int  # sampling step of the focus samples (0 = focus not measured)
    decide: PixelDecider | None = None  # replaces the rule's per-pixel decision
    stains: StainMatrix | None = None  # the slide's fitted stains (what ``decide`` reads)


def class_flags(tissue: TissueMask) -> np.ndarray:
    """Per-pixel class bits of a tissue mask, uint8: ``FLAG_TISSUE`` and the bit of every
    excluded class (:data:`fibroquant.exclusions.CLASSES`)."""
    flags = tissue.tissue.astype(np.uint8)  # FLAG_TISSUE
    for c in exclusions.CLASSES:
        mask = tissue.excluded(c.key)
        if mask is not None and mask.any():
            flags[mask] |= np.uint8(c.bit)
    return flags


def lookup_any(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``mask[np.ix_(rows, cols)]`` for non-decreasing index maps, without the gather when the mask is
    uniform over the rows/columns spanned (all False: lumens, folds, capsule and walls in most
    tiles; all True: tissue inside the section). Same result: the looked-up pixels are a
    subset of that rectangle."""
    if len(rows) and len(cols):
        sub = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        if not sub.any():
            return np.zeros((len(rows), len(cols)), bool)
        if sub.all():
            return np.ones((len(rows), len(cols)), bool)
    return kernels.lookup_nearest(mask, rows, cols)


def touches(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> bool:
    """``lookup_any(mask, rows, cols).any()`` without building the looked-up array when the
    index maps step by at most one (a mask at least as coarse as the tile: every cell of the
    rectangle they span is looked up, so the answer is that rectangle's ``any``)."""
    if not (len(rows) and len(cols)):
        return False
    sub = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if _steps_le_one(rows) and _steps_le_one(cols):
        return bool(sub.any())
    return bool(sub.any()) and bool(lookup_any(mask, rows, cols).any())


def _steps_le_one(idx: np.ndarray) -> bool:
    """Whether a non-decreasing index map skips no index."""
    return len(idx) < 2 or bool((np.diff(idx) <= 1).all())


def measure_box(
    slide: Slide, job: TileJob, box: tuple[int, int, int, int]
) -> tuple[tuple[int, int, int, int], TileCounts, np.ndarray, np.ndarray, np.ndarray,
           float] | None:
    """Measure one tile (None when it does not touch the section): its counts, its collagen,
    tissue and excluded masks at the mask resolution, and its sharpness (NaN when not
    measured)."""
    y0, x0, y1, x1 = box
    th, tw = job.flags.shape
    rows = index_map(y0, y1, job.fy, th)
    cols = index_map(x0, x1, job.fx, tw)
    if not touches(job.tissue.section, rows, cols):
        return None
    f = job.geo.mask_factor
    sub = job.flags[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    decided = None
    if not (sub & kernels.FLAG_TISSUE).any():  # lumens / folds only: no pixel to read
        rgb = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    elif job.decide is None:
        rgb = read_analysis(slide, job.geo, y0, x0, y1 - y0, x1 - x0)
    else:
        mpp = job.geo.analysis_mpp
        halo = job.decide.halo_px(mpp)
        wide = read_analysis(slide, job.geo, y0 - halo, x0 - halo, y1 - y0 + 2 * halo,
                             x1 - x0 + 2 * halo)
        # the pixels whose decision counts: tissue outside the vessel walls
        tissue = kernels.lookup_nearest(
            (sub & (kernels.FLAG_TISSUE | kernels.FLAG_WALL)) == kernels.FLAG_TISSUE,
            rows - rows[0], cols - cols[0])
        assert job.stains is not None, "a PixelDecider reads the slide's stains"
        decided = np.asarray(job.decide.predict_tile(wide, halo, job.stains, mpp=mpp,
                                                     tissue=tissue), np.bool_)
        rgb = np.ascontiguousarray(wide[halo : halo + y1 - y0, halo : halo + x1 - x0])
    out = measure_tile(rgb, job.rule, job.flags, job.threshold_map, rows, cols, f,
                       job.focus_stride, decided=decided)
    counts = TileCounts.from_named(out.counts, out.collagen_od_sum)
    sharp = float("nan")
    if job.focus_stride and counts.tissue_px:
        sharp = focus.sharpness_from_moments(out.focus, out.focus_shape)
    # at least half the block (2 b >= f², b an integer count), without a doubled copy
    least = (f * f + 1) // 2
    col, tis, exc = (b >= least for b in out.blocks)
    return box, counts, col, tis, exc, sharp


#: A tile with tissue: (tissue fraction, box, low-resolution row of every tile row, of every
#: tile column).
Covered = tuple[float, tuple[int, int, int, int], np.ndarray, np.ndarray]


def tissue_boxes(
    tissue: TissueMask, fy: float, fx: float, boxes: list[tuple[int, int, int, int]]
) -> list[Covered]:
    """The tiles that touch tissue, in grid order, with their tissue fraction (judged on every
    8th row and column of the tissue mask under them)."""
    th, tw = tissue.tissue.shape
    covered = []
    for box in boxes:
        y0, x0, y1, x1 = box
        rows = index_map(y0, y1, fy, th)
        cols = index_map(x0, x1, fx, tw)
        frac = float(tissue.tissue[np.ix_(rows[::8], cols[::8])].mean())
        if frac > 0:
            covered.append((frac, box, rows, cols))
    return covered


def registration_tiles(
    slide: Slide, geo: Geometry, covered: list[Covered], n_tiles: int = 3
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


def calibration_pixels(
    slide: Slide, geo: Geometry, tissue: TissueMask, covered: list[Covered], n_pixels: int
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
        rgb = read_analysis(slide, geo, y0, x0, y1 - y0, x1 - x0)[::step, ::step]
        # the mask under the pixels by two 1-D lookups (np.ix_'s 2-D fancy index is ~7x
        # slower), and its pixels in row order by np.compress from a contiguous copy (the
        # same pixels as an index gather, ~2x faster)
        inside = tissue.tissue.take(rows[::step], axis=0).take(cols[::step], axis=1)
        chunks.append(np.compress(inside.ravel(), np.ascontiguousarray(rgb).reshape(-1, 3),
                                  axis=0))
    px = np.concatenate(chunks)
    if len(px) > n_pixels:
        rng = np.random.default_rng(0)
        px = px[np.sort(rng.choice(len(px), n_pixels, replace=False))]
    return px


def map_tiles(slide: Slide, job: TileJob, boxes: list[tuple[int, int, int, int]],
              workers: int) -> Iterator[Any]:
    """:func:`measure_box` of every box, in order, on up to ``workers`` threads (the slide's
    share of the cores inside a local pool: :mod:`fibroquant.cores`), with a bounded number
    of tiles in flight, so memory does not grow with the slide."""
    if workers <= 1 or len(boxes) < 2:
        for box in boxes:
            yield measure_box(slide, job, box)
        return
    # The tile threads already use every core: OpenCV's own thread pool inside each call
    # would only oversubscribe them. Restored when the loop ends.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    tile = measure_box if not cores.in_pool() else cores.gated(measure_box, workers)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            window = 2 * workers
            it = iter(boxes)
            pending = [pool.submit(tile, slide, job, b) for _, b in zip(range(window), it, strict=False)]
            while pending:
                fut = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(tile, slide, job, nxt))
                yield fut.result()
    finally:
        cv2.setNumThreads(cv_threads)
