"""Fast per-pixel kernels for the tile loop (numba), and fast image operations.

:func:`measure_tile_fused` decides and counts every pixel of a tile in one pass, by the
collagen decision of :class:`fibroquant.collagen.CollagenRule`, bit for bit: the products
``lut[c][v] * u[c]`` of :func:`fibroquant.collagen.collagen_concentration` are tabulated once
per call (same float32 rounding), each pixel is two float32 additions of table entries in the
reference's order, compiled without ``fastmath`` (no re-association, no fused multiply-add),
and the GIL is released (``nogil=True``), so tiles on a thread pool scale with cores. Rows of
width 8k are read as uint64 words, red + green from a 65,536-entry pair table
(:func:`pair_table`). Its numpy reference (the fallback without numba, and the tests' oracle)
is :func:`fibroquant.tiles.measure_tile_reference`.

Compilation happens once per process on first use (or in :func:`warmup_fused`); with
``cache=True`` later processes (process pools, Dask workers) load the machine code from
``__pycache__`` in tens of milliseconds. ``HAVE_NUMBA`` is False when numba is missing or
disabled. Also here: :func:`lookup_nearest` (nearest-neighbour upsampling of a low-resolution
mask), :func:`focus_moments`, :func:`remove_small_objects_fast` and :func:`gaussian_blur`.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fibroquant import exclusions

try:  # numba is a dependency, but keep the package usable without it
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only without numba
    _numba = None  # type: ignore[assignment]  # the optional-import idiom

HAVE_NUMBA = _numba is not None and os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")


def _jit(fn: Any) -> Any:
    """``numba.njit(nogil=True, cache=True, fastmath=False)``; no disk cache if unwritable."""
    if _numba is None:  # pragma: no cover
        return None
    try:
        return _numba.njit(nogil=True, cache=True, fastmath=False)(fn)
    except RuntimeError:  # "cannot cache function ... no locator available" (read-only install)
        return _numba.njit(nogil=True, cache=False, fastmath=False)(fn)


def _gather_py(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> None:
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(cols.shape[0]):
            out[i, j] = mask[r, cols[j]]


def _share_ok_py(
    c: np.float32, r: int, g: int, b: int, others: np.ndarray, min_share: np.float32
) -> np.bool_:
    # the collagen-share test of one pixel: its positive collagen concentration ``c`` is at
    # least ``min_share`` of its positive concentrations summed over all stains
    zero = np.float32(0.0)
    p = c if c > zero else zero
    total = p
    for k in range(others.shape[0]):
        ck = others[k, 0, r] + others[k, 1, g] + others[k, 2, b]
        total = total + (ck if ck > zero else zero)
    return p >= min_share * total


_share_ok_nb = _jit(_share_ok_py)


#: Bits of the per-pixel class map that :func:`measure_tile_fused` reads (at tissue resolution):
#: countable tissue, the capsule band and the vessel walls (fixed in the kernel); the other
#: classes of :data:`fibroquant.exclusions.CLASSES` are counted from their bits, whatever they are.
FLAG_TISSUE = exclusions.FLAG_TISSUE
FLAG_BAND = exclusions.BAND.bit
FLAG_WALL = exclusions.WALL.bit

def fused_counts() -> tuple[str, ...]:
    """Names of the counts :func:`measure_tile_fused` returns: tissue, collagen and every
    excluded class with a bit (``KEY_px``, in :data:`fibroquant.exclusions.CLASSES` order)."""
    return ("tissue_px", "collagen_px",
            *(c.count for c in exclusions.CLASSES if c.rule != "tiles"))


@functools.lru_cache(maxsize=4)
def _class_selection(classes: tuple[exclusions.Excluded, ...]) -> np.ndarray:
    # which of the 256 class-bit values count toward each ``area`` and ``wall`` class
    # (the wall: outside the capsule band; in it the kernel counts walls pixel by pixel)
    v = np.arange(256)
    rows = []
    for c in classes:
        if c.rule == "area":
            rows.append((v & c.bit) != 0)
        elif c.rule == "wall":
            rows.append(((v & FLAG_TISSUE) != 0) & ((v & c.bit) != 0) & ((v & FLAG_BAND) == 0))
    return np.array(rows, np.int64).reshape(-1, 256)


def _named_counts(counts: np.ndarray, by_class: np.ndarray) -> dict[str, int]:
    # the kernel's counters (tissue, collagen, capsule, walls in the band) and its counts per
    # class-bit value, named as fused_counts()
    classes = exclusions.CLASSES
    per_class = iter(int(n) for n in _class_selection(classes) @ by_class)
    named = {"tissue_px": int(counts[0]), "collagen_px": int(counts[1])}
    for c in classes:
        if c.rule == "band":
            named[c.count] = int(counts[2])
        elif c.rule == "wall":
            named[c.count] = int(counts[3]) + next(per_class)
        elif c.rule == "area":
            named[c.count] = next(per_class)
    return named


def _find_py(parent: np.ndarray, a: int) -> int:
    # root of run ``a`` (union-find with path halving)
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


_find_nb = _jit(_find_py)


def _grow_py(runs: np.ndarray) -> np.ndarray:
    # double the capacity of the run table
    n = runs.shape[0]
    runs2 = np.empty((2 * n, runs.shape[1]), runs.dtype)
    runs2[:n] = runs
    return runs2


_grow_nb = _jit(_grow_py)


def _is_blob_py(size: int, height: int, width: int, blob_px: int, blob_side: int) -> bool:
    # a compact round blob no larger than a nucleus: at most blob_px pixels, a bounding box
    # no wider or taller than blob_side, and filling at least half of it (a disc fills 79 %,
    # a thin fibre across its box a few %)
    return (blob_px > 0 and size <= blob_px and height <= blob_side and width <= blob_side
            and 2 * size >= height * width)


_is_blob_nb = _jit(_is_blob_py)


def _hit_list_py(words: np.ndarray, hit: np.ndarray, w: int, hits: np.ndarray) -> np.int64:
    # hits[:m] = the columns j < w where hit[j] is 1, in order; returns m. ``hit`` is a uint8
    # view of ``words`` (uint64, four per 32 columns, zero past w): a run of 32 columns is
    # tested by OR-ing its four words, and only the runs with a hit are listed, branch-free.
    # (Summing 32 int32 flags per run instead cost a vector reduction each: the listing took
    # ~0.4 ms per 1024² tile, twice as long as this.) The count is unsigned, so that numba
    # does not test the store's index for a negative wrap-around (a uint64, not the uint8 of
    # the flags: that would wrap at 256 in pure Python).
    m = np.uint64(0)
    for c in range(words.shape[0] // 4):
        if (words[4 * c] | words[4 * c + 1] | words[4 * c + 2] | words[4 * c + 3]) != 0:
            j1 = min(32 * c + 32, w)
            for j in range(32 * c, j1):
                hits[m] = j
                m += np.uint64(hit[j])
    return np.int64(m)


_hit_list_nb = _jit(_hit_list_py)


def _focus_row_py(row: np.ndarray, tis: np.ndarray, ref: np.float32, n: np.ndarray,
                  s1: np.ndarray, s2: np.ndarray) -> None:
    # one row of the focus samples into per-column sums: count, sum and sum of squares of
    # ``row - ref`` over its tissue pixels (float32; _focus_flush_py moves them to float64)
    for j in range(row.shape[0]):
        t = np.float32(tis[j])
        x = (row[j] - ref) * t
        n[j] += tis[j]
        s1[j] += x
        s2[j] += x * x


_focus_row_nb = _jit(_focus_row_py)


def _focus_lap_py(up: np.ndarray, mid: np.ndarray, down: np.ndarray, tis: np.ndarray,
                  n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
    # the 3x3 Laplacian of row ``mid`` (OpenCV's ksize=3 aperture: 2 at the corners, -8 at
    # the centre) into per-column sums over its tissue pixels off the frame
    two = np.float32(2.0)
    eight = np.float32(8.0)
    for j in range(1, mid.shape[0] - 1):
        t = np.float32(tis[j])
        corners = (up[j - 1] + up[j + 1]) + (down[j - 1] + down[j + 1])
        lap = (corners * two - eight * mid[j]) * t
        n[j] += tis[j]
        s1[j] += lap
        s2[j] += lap * lap


_focus_lap_nb = _jit(_focus_lap_py)


def _focus_flush_py(acc: np.ndarray, k: int, n: np.ndarray, s1: np.ndarray,
                    s2: np.ndarray) -> None:
    # add per-column float32 sums to the per-column float64 sums acc[k:k + 3], and clear them
    # (column-wise, so it vectorises; _focus_total_py sums the columns once at the end)
    a0 = acc[k]
    a1 = acc[k + 1]
    a2 = acc[k + 2]
    for j in range(n.shape[0]):
        a0[j] += n[j]
        a1[j] += s1[j]
        a2[j] += s2[j]
        n[j] = 0
        s1[j] = 0.0
        s2[j] = 0.0


_focus_flush_nb = _jit(_focus_flush_py)


def _focus_total_py(acc: np.ndarray, out: np.ndarray) -> None:
    # out[k] = the per-column float64 sums acc[k] summed over the columns, in column order
    for k in range(acc.shape[0]):
        t = 0.0
        for j in range(acc.shape[1]):
            t += acc[k, j]
        out[k] = t


_focus_total_nb = _jit(_focus_total_py)


def _add_run_py(counts: np.ndarray, bcol: np.ndarray, f: int, s: int, e: int) -> None:
    # add the columns s .. e - 1 to their block columns' counts (bcol[j] = j // f)
    j = s
    while j < e:
        je = min(bcol[j] * f + f, e)
        counts[bcol[j]] += je - j
        j = je


_add_run_nb = _jit(_add_run_py)

# A row of a C-contiguous uint8 RGB tile whose width is a multiple of 8 is read as uint64
# words, three per 8 pixels (little-endian: pixel k of a group starts at bit 24 k). A pixel's
# red and green are then one 16-bit field, the index of a pair table ``t01[(g << 8) | r] =
# t0[r] + t1[g]`` (float32, the reference's first addition, so the sums are bit-identical);
# blue indexes ``t2``. Two table reads and three word reads per 8 pixels instead of three
# table reads and three byte reads per pixel: the scalar loop was bound by its loads.
_M8 = np.uint64(0xFF)
_M16 = np.uint64(0xFFFF)
_S8 = np.uint64(8)
_S16 = np.uint64(16)
_S24 = np.uint64(24)
_S32 = np.uint64(32)
_S40 = np.uint64(40)
_S48 = np.uint64(48)
_S56 = np.uint64(56)


def _conc_row_words_py(words: np.ndarray, base: int, w: int, t01: np.ndarray, t2: np.ndarray,
                       out: np.ndarray) -> None:
    # out[j] = t01[rg] + t2[b] of the w pixels of the row whose words start at ``base``
    row = words[base:]  # indexed from 0: no negative-index wrap-around per read
    for k in range(w // 8):
        a = row[3 * k]
        b = row[3 * k + 1]
        c = row[3 * k + 2]
        j = 8 * k
        out[j] = t01[a & _M16] + t2[(a >> _S16) & _M8]
        out[j + 1] = t01[(a >> _S24) & _M16] + t2[(a >> _S40) & _M8]
        out[j + 2] = t01[a >> _S48] + t2[b & _M8]
        out[j + 3] = t01[(b >> _S8) & _M16] + t2[(b >> _S24) & _M8]
        out[j + 4] = t01[(b >> _S32) & _M16] + t2[(b >> _S48) & _M8]
        out[j + 5] = t01[(b >> _S56) | ((c & _M8) << _S8)] + t2[(c >> _S8) & _M8]
        out[j + 6] = t01[(c >> _S16) & _M16] + t2[(c >> _S32) & _M8]
        out[j + 7] = t01[(c >> _S40) & _M16] + t2[c >> _S56]


_conc_row_words_nb = _jit(_conc_row_words_py)


def _even_row_words_py(words: np.ndarray, base: int, w: int, t01: np.ndarray, t2: np.ndarray,
                       out: np.ndarray) -> None:
    # out[q] = t01[rg] + t2[b] of the row's even pixels 2 q (the focus samples, stride 2)
    row = words[base:]
    for k in range(w // 8):
        a = row[3 * k]
        b = row[3 * k + 1]
        c = row[3 * k + 2]
        q = 4 * k
        out[q] = t01[a & _M16] + t2[(a >> _S16) & _M8]
        out[q + 1] = t01[a >> _S48] + t2[b & _M8]
        out[q + 2] = t01[(b >> _S32) & _M16] + t2[(b >> _S48) & _M8]
        out[q + 3] = t01[(c >> _S16) & _M16] + t2[(c >> _S32) & _M8]


_even_row_words_nb = _jit(_even_row_words_py)


def _tile_py(
    rgb: np.ndarray, lut: np.ndarray, tables: np.ndarray, others: np.ndarray,
    guard: np.ndarray, flags: np.ndarray, thr: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, f: int, blocks: np.ndarray, stride: int, fmom: np.ndarray,
    counts: np.ndarray, od_total: np.ndarray, min_px: int, blob_px: int, blob_side: int,
    words: np.ndarray, t01: np.ndarray, l01: np.ndarray, area: int, by_class: np.ndarray,
) -> None:
    # Row by row. Each low-resolution row is expanded once over the tile's columns, run by run
    # of equal low-resolution column: the class of every column, the threshold of the plain
    # tissue columns (tissue outside the capsule band and the vessel walls; +inf elsewhere, so
    # that one comparison finds their collagen), the share guard of every column (``guard``
    # has the class map's shape, or (1, 1) for one guard everywhere), the number of plain tissue columns and of
    # columns excluded whatever their pixels (the ``area`` bits: lumen, fold, bubble...; wall
    # outside the band) in every block column, and the list of capsule-band tissue columns,
    # the only ones decided pixel by pixel (collagen there is capsule). Everything else is
    # counted once per low-resolution row from these: every run of equal class bits adds its
    # columns times the tile rows of that low-resolution row to ``by_class[bits]`` (the
    # excluded classes are told apart from these 256 counts afterwards). The plain columns
    # past the threshold are listed (``_hit_list_py``), and only they take the share guard
    # and go to their block's collagen count: no per-column counters.
    #
    # Speck removal (min_px > 1): each row's final collagen pixels are stored as runs
    # (row, first column, last column, parent) with their OD sums, and every run is joined
    # (union-find) to the runs of the row above that touch it, 8-connected. At the end, the
    # components smaller than min_px that do not touch the tile's edge are taken out of the
    # counts, the OD sum and the block counts, and so are compact blobs (is_blob). No
    # full-resolution mask is written. A row's runs are cut where the listed columns break
    # (branch-free), and only the removed runs' OD sums are taken, at the end, from the
    # pixels again.
    #
    # ``words`` (uint64, empty when not usable) is the tile read as words, with the pair
    # tables ``t01`` (collagen) and ``l01`` (summed OD): see _conc_row_words_py.
    #
    # Focus (stride > 0): the summed OD of every stride-th pixel of every stride-th row is
    # kept for three sampled rows only, and the moments of _focus_py are taken as the rows
    # come (a row's Laplacian when the row below it arrives), with the same sums in the same
    # order: fmom holds what focus_moments returns for the sampled grid, bit for bit.
    use_words = words.shape[0] > 0
    nw = (rgb.shape[1] * 3) // 8  # words per row (when use_words)
    t0 = tables[0]
    t1 = tables[1]
    t2 = tables[2]
    l0 = lut[0]
    l1 = lut[1]
    l2 = lut[2]
    n_other = others.shape[0]
    h = rgb.shape[0]
    w = rgb.shape[1]
    nbw = blocks.shape[2]
    zero = np.float32(0.0)
    inf = np.float32(np.inf)
    buf = np.empty(w, np.float32)  # collagen concentration of the current row
    tb = np.empty(w, np.float32)  # threshold of the plain tissue columns, +inf elsewhere
    gb = np.empty(w, np.float32)  # share guard of every column
    one_guard = guard.shape[0] == 1 and guard.shape[1] == 1
    if one_guard:
        gb[:] = guard[0, 0]
    fb = np.empty(w, np.uint8)  # class bits of every column
    spec = np.empty(w, np.int32)  # capsule-band tissue columns of the low-resolution row
    hit_words = np.zeros((w + 31) // 32 * 4, np.uint64)  # the cut of the row, padded to 32
    hit = hit_words.view(np.uint8)  # columns; the padding stays 0
    hits = np.empty(w, np.int64)  # plain columns that passed the cut (then the guard)
    brk = np.empty(w + 1, np.int64)  # where the listed columns break into runs
    isp_blk = np.zeros(nbw, np.int32)  # plain tissue columns per block column
    exc_blk = np.zeros(nbw, np.int32)  # columns excluded whatever the pixel, per block column
    bcol = np.empty(w, np.int64)  # block column of every column
    for j in range(w):
        bcol[j] = j // f
    run_s = np.empty(w + 1, np.int64)  # runs of equal low-resolution column: first column,
    run_c = np.empty(w, np.int64)  # and that low-resolution column
    n_cr = 0
    for j in range(w):
        if j == 0 or cols[j] != cols[j - 1]:
            run_s[n_cr] = j
            run_c[n_cr] = cols[j]
            n_cr += 1
    run_s[n_cr] = w
    hs = (h + stride - 1) // stride if stride > 0 else 0  # the sampled grid
    ws = (w + stride - 1) // stride if stride > 0 else 0
    ring = np.empty((3, ws), np.float32)  # summed OD of the last three sampled rows
    ring_t = np.empty((3, ws), np.uint8)  # and their tissue flags
    tsub = np.zeros(ws, np.uint8)  # tissue flags of the sampled columns (low-resolution row)
    f_n = np.zeros(ws, np.int32)  # per-column sums over up to 16 sampled rows (_focus_py)
    f_s1 = np.zeros(ws, np.float32)
    f_s2 = np.zeros(ws, np.float32)
    f_m = np.zeros(ws, np.int32)
    f_q1 = np.zeros(ws, np.float32)
    f_q2 = np.zeros(ws, np.float32)
    facc = np.zeros((6, ws), np.float64)  # per-column float64 sums (_focus_flush_py)
    reff = zero
    if hs > 0 and ws > 0:
        ci = (hs // 2) * stride
        cj = (ws // 2) * stride
        reff = l0[rgb[ci, cj, 0]] + l1[rgb[ci, cj, 1]] + l2[rgb[ci, cj, 2]]
    want_runs = min_px > 1 or blob_px > 0
    runs = np.empty((4096 if want_runs else 1, 4), np.int32)  # row, first, last, parent
    n_runs = 0
    prev0 = 0  # runs of the previous row: prev0 .. prev1 - 1
    prev1 = 0
    n_tis = 0
    n_col = 0
    n_cap = 0
    n_wall = 0  # walls in the capsule band (the others are in by_class)
    wall_exc = 4 | area  # excluded whatever the pixel in the band too
    od_acc = np.float64(0.0)  # (a plain 0.0 would sum in float32 as Python under NEP 50)
    prev = -1
    n_plain = 0
    n_spec = 0
    for i in range(h):
        ri = rows[i]
        if ri != prev:
            prev = ri
            frow = flags[ri]
            trow = thr[ri]
            grow = guard[0] if one_guard else guard[ri]
            n_plain = 0
            n_spec = 0
            row_exc = 0
            k = i + 1  # tile rows of this low-resolution row
            while k < h and rows[k] == ri:
                k += 1
            reps = k - i
            for bj in range(nbw):
                isp_blk[bj] = 0
                exc_blk[bj] = 0
            for u in range(n_cr):
                s = run_s[u]
                e = run_s[u + 1]
                fl = frow[run_c[u]]
                plain = (fl & 1) != 0 and (fl & 6) == 0  # tissue outside band and wall
                tv = trow[run_c[u]] if plain else inf
                for j in range(s, e):
                    fb[j] = fl
                    tb[j] = tv
                if not one_guard:
                    gv = grow[run_c[u]]
                    for j in range(s, e):
                        gb[j] = gv
                if plain:
                    n_plain += e - s
                    _add_run_nb(isp_blk, bcol, f, s, e)
                by_class[fl] += (e - s) * reps
                if (fl & 1) != 0 and (fl & 2) != 0:  # capsule band: decided per pixel
                    for j in range(s, e):
                        spec[n_spec] = j
                        n_spec += 1
                else:
                    wall = (fl & 1) != 0 and (fl & 4) != 0  # wall outside the band: all wall
                    if wall or (fl & area) != 0:  # excluded, whatever the pixel
                        row_exc += e - s
                        _add_run_nb(exc_blk, bcol, f, s, e)
            for sj in range(ws):
                tsub[sj] = fb[sj * stride] & 1
        bi = i // f
        if row_exc > 0:
            b2 = blocks[2, bi]
            for bj in range(nbw):
                b2[bj] += exc_blk[bj]
        if stride > 0 and i % stride == 0:
            si = i // stride
            osr = ring[si % 3]
            tsr = ring_t[si % 3]
            if use_words and stride == 2:
                _even_row_words_nb(words, i * nw, w, l01, l2, osr)
            else:
                for sj in range(ws):
                    j = sj * stride
                    osr[sj] = l0[rgb[i, j, 0]] + l1[rgb[i, j, 1]] + l2[rgb[i, j, 2]]
            for sj in range(ws):
                tsr[sj] = tsub[sj]
            _focus_row_nb(osr, tsr, reff, f_n, f_s1, f_s2)
            if si % 16 == 15 or si == hs - 1:
                _focus_flush_nb(facc, 0, f_n, f_s1, f_s2)
            if si >= 2:  # the Laplacian of the sampled row above
                _focus_lap_nb(ring[(si - 2) % 3], ring[(si - 1) % 3], osr, ring_t[(si - 1) % 3],
                              f_m, f_q1, f_q2)
                if (si - 1) % 16 == 15:
                    _focus_flush_nb(facc, 3, f_m, f_q1, f_q2)
        if n_plain + n_spec > 0:  # not glass only
            if use_words:
                _conc_row_words_nb(words, i * nw, w, t01, t2, buf)
            else:
                for j in range(w):
                    buf[j] = t0[rgb[i, j, 0]] + t1[rgb[i, j, 1]] + t2[rgb[i, j, 2]]
        m: int | np.integer[Any] = 0  # hits[:m]: plain collagen columns (after the guard)
        if n_plain > 0:
            n_tis += n_plain
            b1 = blocks[1, bi]
            for bj in range(nbw):
                b1[bj] += isp_blk[bj]
            for j in range(w):
                hit[j] = buf[j] > tb[j]
            m = _hit_list_nb(hit_words, hit, w, hits)  # (no pre-count: the listing skips
            # runs of 32 columns without a hit by their words anyway)
            if m > 0 and n_other == 2:  # the share guard, written out for the usual 3 stains
                oa0 = others[0, 0]
                oa1 = others[0, 1]
                oa2 = others[0, 2]
                ob0 = others[1, 0]
                ob1 = others[1, 1]
                ob2 = others[1, 2]
                m2: int | np.integer[Any] = 0  # (+= a numpy bool)
                for q in range(m):  # branch-free: the same sums, in _share_ok_py's order
                    j = hits[q]
                    r = rgb[i, j, 0]
                    g = rgb[i, j, 1]
                    b = rgb[i, j, 2]
                    c = buf[j]
                    p = c if c > zero else zero
                    ca = oa0[r] + oa1[g] + oa2[b]
                    cb = ob0[r] + ob1[g] + ob2[b]
                    total = (p + (ca if ca > zero else zero)) + (cb if cb > zero else zero)
                    hits[m2] = j
                    m2 += p >= gb[j] * total
                m = m2
            elif m > 0 and n_other > 0:
                m2 = 0
                for q in range(m):
                    j = hits[q]
                    hits[m2] = j
                    m2 += _share_ok_nb(buf[j], rgb[i, j, 0], rgb[i, j, 1], rgb[i, j, 2],
                                       others, gb[j])
                m = m2
            b0 = blocks[0, bi]
            for q in range(m):
                j = hits[q]
                b0[bcol[j]] += 1
                od_acc += buf[j]
            n_col += m
        if n_spec > 0:  # capsule band: collagen here is capsule; the rest is tissue or wall
            b1 = blocks[1, bi]
            b2 = blocks[2, bi]
            for q in range(n_spec):
                j = spec[q]
                fl = fb[j]
                c = buf[j]
                col = c > trow[cols[j]]
                if col and n_other > 0:
                    col = _share_ok_nb(c, rgb[i, j, 0], rgb[i, j, 1], rgb[i, j, 2], others,
                                       gb[j])
                if col:
                    n_cap += 1
                elif fl & 4:
                    n_wall += 1
                else:
                    n_tis += 1
                    b1[bcol[j]] += 1
                if col or (fl & wall_exc) != 0:
                    b2[bcol[j]] += 1
        if want_runs:
            cur0 = n_runs
            pr = prev0
            n_brk = 0
            for q in range(m):  # branch-free: q starts a run when its column is not the
                brk[n_brk] = q  # previous one's right neighbour
                n_brk += (q == 0) or (hits[q] != hits[q - 1] + 1)
            brk[n_brk] = m
            for u in range(n_brk):
                s = hits[brk[u]]
                e = hits[brk[u + 1] - 1]
                if n_runs == runs.shape[0]:
                    runs = _grow_nb(runs)
                runs[n_runs, 0] = i
                runs[n_runs, 1] = s
                runs[n_runs, 2] = e
                runs[n_runs, 3] = n_runs
                # join the runs of the row above that touch this one (8-connected)
                while pr < prev1 and runs[pr, 2] < s - 1:
                    pr += 1
                pp = pr
                while pp < prev1 and runs[pp, 1] <= e + 1:
                    ra = _find_nb(runs[:, 3], pp)
                    rb = _find_nb(runs[:, 3], n_runs)
                    if ra < rb:
                        runs[rb, 3] = ra
                    elif rb < ra:
                        runs[ra, 3] = rb
                    pp += 1
                n_runs += 1
            prev0 = cur0
            prev1 = n_runs
    n_rm = 0
    od_rm = np.float64(0.0)
    if n_runs > 0:
        # size and bounding box of every component (roots have the smallest index)
        size = np.zeros(n_runs, np.int64)
        r0 = np.full(n_runs, h, np.int64)
        r1 = np.full(n_runs, -1, np.int64)
        c0 = np.full(n_runs, w, np.int64)
        c1 = np.full(n_runs, -1, np.int64)
        parent = runs[:, 3]
        for r in range(n_runs):
            root = _find_nb(parent, r)
            parent[r] = root
            size[root] += runs[r, 2] - runs[r, 1] + 1
            r0[root] = min(r0[root], runs[r, 0])
            r1[root] = max(r1[root], runs[r, 0])
            c0[root] = min(c0[root], runs[r, 1])
            c1[root] = max(c1[root], runs[r, 2])
        # components touching the tile's edge may continue in the next tile: kept
        for r in range(n_runs):
            root = parent[r]
            if (size[root] < min_px or _is_blob_nb(size[root], r1[root] - r0[root] + 1,
                                                   c1[root] - c0[root] + 1, blob_px, blob_side)) \
                    and r0[root] > 0 and c0[root] > 0 and r1[root] < h - 1 and c1[root] < w - 1:
                n_rm += runs[r, 2] - runs[r, 1] + 1
                ri = runs[r, 0]
                s = runs[r, 1]
                od = np.float64(t0[rgb[ri, s, 0]] + t1[rgb[ri, s, 1]] + t2[rgb[ri, s, 2]])
                for j in range(s + 1, runs[r, 2] + 1):  # the run's OD sum, in pixel order
                    od += t0[rgb[ri, j, 0]] + t1[rgb[ri, j, 1]] + t2[rgb[ri, j, 2]]
                od_rm += od
                b0 = blocks[0, ri // f]
                for j in range(s, runs[r, 2] + 1):
                    b0[bcol[j]] -= 1
    if stride > 0:
        _focus_flush_nb(facc, 3, f_m, f_q1, f_q2)  # the Laplacian rows since the last 16
        _focus_total_nb(facc, fmom)
        fmom[6] = reff
    counts[0] += n_tis
    counts[1] += n_col - n_rm
    counts[2] += n_cap
    counts[3] += n_wall
    od_total[0] += od_acc - od_rm


def _focus_py(od: np.ndarray, tis: np.ndarray, ref: float, out: np.ndarray) -> None:
    # Moments for the focus measure: count, sum and sum of squares of ``od - ref`` over the
    # tissue pixels; the same of the 3x3 Laplacian over the tissue pixels off the frame.
    # Per-column float32 sums over 16 rows (they vectorise twice as wide as float64), added to
    # per-column float64 sums after every 16 rows, and those summed over the columns at the
    # end: the focus ratio moves by ~1e-8 relative. The tile kernel (_tile_py) takes the same
    # sums, in the same order, as its sampled rows come.
    h, w = od.shape
    cn = np.zeros(w, np.int32)
    c1 = np.zeros(w, np.float32)
    c2 = np.zeros(w, np.float32)
    dn = np.zeros(w, np.int32)
    d1 = np.zeros(w, np.float32)
    d2 = np.zeros(w, np.float32)
    acc = np.zeros((6, w), np.float64)
    reff = np.float32(ref)
    for i in range(h):
        _focus_row_nb(od[i], tis[i], reff, cn, c1, c2)
        if 0 < i < h - 1:
            _focus_lap_nb(od[i - 1], od[i], od[i + 1], tis[i], dn, d1, d2)
        if i % 16 == 15 or i == h - 1:
            _focus_flush_nb(acc, 0, cn, c1, c2)
            _focus_flush_nb(acc, 3, dn, d1, d2)
    _focus_total_nb(acc, out)


def focus_moments(od: np.ndarray, tissue: np.ndarray) -> np.ndarray | None:
    """Moments of a block's summed OD and of its Laplacian for :mod:`fibroquant.focus`.

    Parameters
    ----------
    od : ndarray of float32, shape (H, W)
    tissue : ndarray of bool, shape (H, W)

    Returns
    -------
    ndarray of float64, shape (7,) or None
        ``n, sum, sum of squares`` of ``od - ref`` over tissue, the same of the Laplacian over
        tissue off the frame, and ``ref`` (the block's centre value); None without numba or
        for other dtypes (the caller then uses OpenCV).
    """
    if not (HAVE_NUMBA and isinstance(od, np.ndarray) and od.dtype == np.float32
            and isinstance(tissue, np.ndarray) and tissue.dtype == np.bool_
            and od.ndim == 2 and od.shape == tissue.shape and od.size):
        return None
    out = np.zeros(7, np.float64)
    ref = float(od[od.shape[0] // 2, od.shape[1] // 2])
    _focus_nb(od, tissue, ref, out)
    out[6] = ref
    return out


_gather_nb = _jit(_gather_py)
_tile_nb = _jit(_tile_py)
_focus_nb = _jit(_focus_py)

_warm_fused_lock = threading.Lock()
_warm_fused = False


def kernels_ready() -> bool:
    """Whether :func:`warmup_fused` has finished (or there is no numba to warm up)."""
    return _warm_fused or not HAVE_NUMBA


def kernels_on_disk() -> bool | None:
    """Whether the tile kernel's compiled code for this CPU is in numba's disk cache: False on
    a machine's first run (the workers compile it, ~10-40 s), None when that cannot be told (no
    numba, no cache directory, or numba's cache internals changed)."""
    if not HAVE_NUMBA:
        return None
    try:  # numba internals (guarded): the index's keys, {} when missing or stale; each key
        # holds the target machine of its code (a cache shared with another CPU has none here)
        index = _tile_nb._cache._cache_file._load_index()
        here = _tile_nb.targetctx.codegen().magic_tuple()
        return any(key[1] == here for key in index)
    except Exception:  # noqa: BLE001 - any change there only loses this hint
        return None


def warmup_fused() -> bool:
    """Compile (or load from cache) :func:`measure_tile_fused`'s kernel, once per process.

    Safe to call from several threads; returns :data:`HAVE_NUMBA`.
    """
    global _warm_fused
    if not HAVE_NUMBA or _warm_fused:
        return HAVE_NUMBA
    with _warm_fused_lock:
        if not _warm_fused:
            rgb = np.zeros((2, 2, 3), np.uint8)
            idx = np.zeros(2, np.intp)
            measure_tile_fused(rgb, np.zeros((3, 256), np.float32), np.zeros(3, np.float32),
                               (np.zeros(3, np.float32),), 0.5, np.ones((1, 1), np.uint8),
                               np.zeros((1, 1), np.float32), idx, idx, 1, 2, 5)
            focus_moments(np.zeros((2, 2), np.float32), np.ones((2, 2), bool))
            _warm_fused = True
    return True


def scaled_tables(lut: np.ndarray, unmix_col: np.ndarray) -> np.ndarray:
    """``tables[c, v] = lut[c, v] * unmix_col[c]`` in float32 (the reference's products).

    Parameters
    ----------
    lut : ndarray of float32, shape (3, 256)
        Optical density per channel value, from :func:`fibroquant.stains.od_lut`.
    unmix_col : ndarray of float32, shape (3,)
        Column of the unmixing matrix for the collagen stain (OD → concentration).

    Returns
    -------
    ndarray of float32, shape (3, 256), C-contiguous
    """
    return np.ascontiguousarray(lut * unmix_col[:, None], dtype=np.float32)


def _other_tables(lut: np.ndarray, other_cols: tuple[np.ndarray, ...]) -> np.ndarray:
    """:func:`scaled_tables` of each other stain's column, stacked: float32 (k, 3, 256)."""
    others = np.zeros((len(other_cols), 3, 256), np.float32)
    for k, col in enumerate(other_cols):
        others[k] = scaled_tables(lut, col)
    return others


def pair_table(tables: np.ndarray) -> np.ndarray:
    """``t01[(g << 8) | r] = tables[0, r] + tables[1, g]`` in float32 (the reference's first
    addition, same rounding): the table that :func:`_conc_row_words_py` reads red and green
    from in one look-up.

    Parameters
    ----------
    tables : ndarray of float32, shape (3, 256)

    Returns
    -------
    ndarray of float32, shape (65536,)
    """
    return np.ascontiguousarray((tables[0][None, :] + tables[1][:, None]).ravel(),
                                dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _pair_tables_cached(tables: bytes, lut: bytes) -> tuple[np.ndarray, np.ndarray]:
    def pairs(b: bytes) -> np.ndarray:
        return pair_table(np.frombuffer(b, np.float32).reshape(3, 256))

    return pairs(tables), pairs(lut)


_NO_WORDS = np.empty(0, np.uint64)
_NO_PAIRS = np.empty(0, np.float32)


def _words(rgb: np.ndarray) -> np.ndarray:
    """The tile as uint64 words for the word path of the tile kernel, or an empty array when
    it cannot be read so (width not a multiple of 8, not C-contiguous, not 8-byte aligned,
    big-endian)."""
    if (rgb.shape[1] % 8 or not rgb.flags.c_contiguous or rgb.ctypes.data % 8
            or sys.byteorder != "little" or rgb.size == 0):
        return _NO_WORDS
    return rgb.reshape(-1).view(np.uint64)


def _fast_ok(rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray) -> bool:
    """Inputs for which the kernel reproduces the reference exactly."""
    return (
        HAVE_NUMBA
        and isinstance(rgb, np.ndarray)
        and rgb.dtype == np.uint8
        and rgb.ndim == 3
        and rgb.shape[2] == 3
        and isinstance(lut, np.ndarray)
        and lut.dtype == np.float32
        and lut.shape == (3, 256)
        and isinstance(unmix_col, np.ndarray)
        and unmix_col.dtype == np.float32
        and unmix_col.shape == (3,)
    )


def threshold_as_float32(conc_dtype: np.dtype, threshold: float) -> np.float32:
    """A float32 ``T`` with ``x > T`` ⇔ numpy's ``x > threshold`` for every float32 ``x``.

    numpy compares a float32 array with a Python float in float32 (NEP 50: the scalar is cast
    to float32, round to nearest), but with a ``np.float64`` scalar in float64. For the latter
    the equivalent float32 bound is ``threshold`` rounded *down* to float32.
    """
    with np.errstate(over="ignore"):  # |threshold| beyond float32: inf, as numpy does
        if np.result_type(conc_dtype, threshold) == np.float32:
            return np.float32(threshold)
        t64 = np.float64(threshold)
        t32 = np.float32(t64)
    if np.isfinite(t32) and np.float64(t32) > t64:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    elif not np.isfinite(t32) and np.isfinite(t64):  # beyond float32 range
        t32 = np.float32(np.finfo(np.float32).max if t64 > 0 else -np.inf)
    return np.float32(t32)


_GATHER_DTYPES = (np.dtype(np.bool_), np.dtype(np.float32))


def lookup_nearest(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``mask[np.ix_(rows, cols)]`` in one pass (nearest-neighbour upsampling of a mask).

    ~5x faster than ``np.ix_`` fancy indexing.

    Parameters
    ----------
    mask : ndarray of bool or float32, shape (h, w)
        Low-resolution mask (e.g. the thumbnail tissue mask) or map (the background map).
    rows, cols : ndarray of intp
        Mask row / column under each output row / column, already clipped to the mask.

    Returns
    -------
    ndarray of bool, shape (len(rows), len(cols))
    """
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    if not (
        HAVE_NUMBA and isinstance(mask, np.ndarray) and mask.dtype in _GATHER_DTYPES
        and mask.ndim == 2
        and rows.ndim == 1 and cols.ndim == 1 and rows.dtype == np.intp
        and cols.dtype == np.intp
    ):
        return mask[np.ix_(rows, cols)]
    if len(rows) and len(cols):  # bounds: numba does not check them
        h, w = mask.shape
        if rows.min() < 0 or rows.max() >= h or cols.min() < 0 or cols.max() >= w:
            return mask[np.ix_(rows, cols)]
    out = np.empty((len(rows), len(cols)), mask.dtype)
    if out.size:
        _gather_nb(mask, rows, cols, out)
    return out


@dataclass(frozen=True)
class FusedTile:
    """What :func:`measure_tile_fused` measures on one tile.

    Attributes
    ----------
    counts : dict of str to int
        Pixel counts named as :func:`fused_counts` says (tissue, collagen, every excluded
        class with a bit).
    collagen_od_sum : float
        Sum of the collagen concentration (OD units) over collagen pixels.
    blocks : ndarray of int32, shape (3, ceil(H / f), ceil(W / f))
        Per f x f block: collagen, countable tissue and excluded pixel counts (for the
        low-resolution masks: a block is set when at least half of its f² pixels are).
    focus : ndarray of float64, shape (7,) or None
        :func:`focus_moments` of the focus samples (the summed optical density of every
        ``stride``-th pixel of every ``stride``-th row, over its tissue pixels); None when
        ``stride`` is 0. :func:`fibroquant.focus.sharpness_from_moments` turns them into the
        tile's sharpness.
    focus_shape : tuple of int
        Shape of that sampled grid.
    """

    counts: dict[str, int]
    collagen_od_sum: float
    blocks: np.ndarray
    focus: np.ndarray | None
    focus_shape: tuple[int, int]


def focus_moments_reference(od: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """:func:`focus_moments`, by it when numba is there, else in float64 numpy (equal to
    ~1e-7 relative)."""
    mom = focus_moments(od, tissue)
    if mom is not None or od.size == 0:
        return np.zeros(7, np.float64) if mom is None else mom
    ref = float(od[od.shape[0] // 2, od.shape[1] // 2])
    x = (od.astype(np.float64) - ref) * tissue
    d = od.astype(np.float64)
    lap = 2.0 * ((d[:-2, :-2] + d[:-2, 2:]) + (d[2:, :-2] + d[2:, 2:])) - 8.0 * d[1:-1, 1:-1]
    lap = lap * tissue[1:-1, 1:-1]
    return np.array([np.count_nonzero(tissue), x.sum(), (x * x).sum(),
                     np.count_nonzero(tissue[1:-1, 1:-1]), lap.sum(), (lap * lap).sum(), ref])


def guard_array(min_share: float | np.ndarray) -> np.ndarray:
    """A share guard as the tile kernel reads it: C-contiguous float32 of 2 dimensions, (1, 1)
    for one value."""
    g = np.asarray(min_share, dtype=np.float32)
    return np.ascontiguousarray(g.reshape(1, 1) if g.ndim == 0 else g)


def fused_ok(rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray,
             other_cols: tuple[np.ndarray, ...], flags: np.ndarray, thr: np.ndarray,
             rows: np.ndarray, cols: np.ndarray) -> bool:
    """Whether :func:`measure_tile_fused` can take these inputs (numba present, dtypes and
    shapes as documented there, indices inside the class map); else the caller uses the numpy
    reference, :func:`fibroquant.tiles.measure_tile_reference`."""
    ok = (
        _fast_ok(rgb, lut, unmix_col) and flags.dtype == np.uint8 and thr.dtype == np.float32
        and flags.shape == thr.shape and rows.dtype == np.intp and cols.dtype == np.intp
        and len(rows) == rgb.shape[0] and len(cols) == rgb.shape[1]
        and all(isinstance(c, np.ndarray) and c.dtype == np.float32 and c.shape == (3,)
                for c in other_cols)
    )
    if ok and len(rows) and len(cols):
        ok = (rows.min() >= 0 and rows.max() < flags.shape[0] and cols.min() >= 0
              and cols.max() < flags.shape[1])
    return bool(ok)


def measure_tile_fused(
    rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray, other_cols: tuple[np.ndarray, ...],
    min_share: float | np.ndarray, flags: np.ndarray, thr: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, f: int, stride: int, min_px: int = 0, blob_px: int = 0, blob_side: int = 0,
) -> FusedTile:
    """Classify and count every pixel of a tile in one pass, by the collagen decision of
    :class:`fibroquant.collagen.CollagenRule`.

    Per pixel: OD by lookup table, the collagen concentration (one dot product, tabulated),
    the threshold and class of the pixel's low-resolution cell, the collagen-share guard only
    where the threshold is passed; collagen goes to its f x f block's count, while everything
    that does not depend on the pixel (plain tissue, lumens, folds, bubbles, walls outside the
    capsule band) is counted once per row. No full-resolution array is written. Same counts
    and blocks as :func:`fibroquant.tiles.measure_tile_reference`; the OD sum is accumulated
    in float64 in pixel order (the reference sums pairwise: equal to ~1e-12).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    lut : ndarray of float32, shape (3, 256)
        OD per channel value (:func:`fibroquant.stains.od_lut`).
    unmix_col : ndarray of float32, shape (3,)
        Collagen column of the unmixing matrix.
    other_cols : tuple of ndarray of float32, shape (3,)
        Unmixing columns of the other stains (share guard); empty to skip the guard.
    min_share : float or ndarray of float32, shape (h, w)
        Least share of the collagen stain in a collagen pixel's positive concentration: one
        value, or one per low-resolution cell (the share guard map of
        :class:`fibroquant.collagen.CollagenRule`).
    flags : ndarray of uint8, shape (h, w)
        Low-resolution class bits (``FLAG_*``).
    thr : ndarray of float32, shape (h, w)
        Low-resolution collagen threshold, OD units (``conc > thr`` is collagen).
    rows, cols : ndarray of intp
        Low-resolution row / column of every tile row / column.
    f : int
        Block edge of the mask resolution, tile pixels.
    stride : int
        Sampling step of the focus samples (0 = none).
    min_px : int
        Collagen specks (8-connected components of the final collagen mask) smaller than this
        are not collagen; components touching the tile's edge are kept (they may continue in
        the neighbouring tile). The kernel finds them from runs of collagen pixels joined
        row to row (union-find), without writing a full-resolution mask.
    blob_px, blob_side : int
        Compact blobs are not collagen either (:func:`fibroquant.collagen.blob_limits`):
        components of at most ``blob_px`` pixels whose bounding box is at most ``blob_side``
        on each side and at least half filled (not touching the tile's edge). 0 = off.

    Returns
    -------
    FusedTile
    """
    guard = guard_array(min_share)
    # a guard map is only built for slides with a guard (the test would read the whole map)
    other_cols = tuple(other_cols) if guard.shape != (1, 1) or guard[0, 0] > 0 else ()
    if not fused_ok(rgb, lut, unmix_col, other_cols, flags, thr, rows, cols) or not (
            guard.shape in ((1, 1), flags.shape)):
        msg = "measure_tile_fused: inputs the kernel cannot take (see fused_ok)"
        raise ValueError(msg)
    h, w = rgb.shape[:2]
    others = _other_tables(lut, other_cols)
    blocks = np.zeros((3, -(-h // f), -(-w // f)), np.int32)
    fmom = np.zeros(7, np.float64)
    counts = np.zeros(4, np.int64)  # tissue, collagen, capsule, walls in the capsule band
    by_class = np.zeros(256, np.int64)  # pixels by their class bits (the band decided apart)
    od_total = np.zeros(1, np.float64)
    tables = scaled_tables(lut, unmix_col)
    words = _words(rgb)
    t01 = l01 = _NO_PAIRS
    if words.size:
        t01, l01 = _pair_tables_cached(tables.tobytes(), np.ascontiguousarray(lut).tobytes())
    _tile_nb(rgb, lut, tables, others, guard, flags, thr,
             rows, cols, int(f), blocks, int(stride), fmom, counts, od_total,
             int(min_px), int(blob_px), int(blob_side), words, t01, l01,
             exclusions.area_bits(), by_class)
    shape = (-(-h // stride), -(-w // stride)) if stride > 0 else (0, 0)
    return FusedTile(_named_counts(counts, by_class), float(od_total[0]), blocks, fmom if stride > 0 else None, shape)


__all__ = [
    "HAVE_NUMBA",
    "FusedTile",
    "focus_moments",
    "focus_moments_reference",
    "fused_ok",
    "gaussian_blur",
    "guard_array",
    "lookup_nearest",
    "measure_tile_fused",
    "remove_small_holes_fast",
    "remove_small_objects_fast",
    "scaled_tables",
    "threshold_as_float32",
    "warmup_fused",
]


def remove_small_objects_fast(mask: np.ndarray, min_px: int, connectivity: int = 1
                              ) -> np.ndarray:
    """Drop connected components smaller than ``min_px`` pixels from a 2-D bool mask.

    Same result as ``skimage.morphology.remove_small_objects(mask, max_size=min_px - 1,
    connectivity=connectivity)`` (1 = 4-neighbours, 2 = 8-neighbours), but labels only the
    bounding box of the mask with OpenCV (which releases the GIL), and does no labelling at all
    for an empty mask. Returns a new array (or ``mask`` itself when nothing is removed).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or min_px <= 1:
        return mask
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = np.ascontiguousarray(mask[y0:y1, x0:x1]).view(np.uint8)
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(
        sub, connectivity=8 if connectivity >= 2 else 4, ltype=cv2.CV_32S
    )
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    if keep[1:].all():
        return mask
    out = np.zeros(mask.shape, bool)
    out[y0:y1, x0:x1] = keep[labels]
    return out


def remove_small_holes_fast(mask: np.ndarray, min_px: int, connectivity: int = 1) -> np.ndarray:
    """``skimage.morphology.remove_small_holes(mask, max_size=min_px - 1)``: fill holes
    (background components, including those at the border) smaller than ``min_px``."""
    mask = np.asarray(mask, dtype=bool)
    if min_px <= 1:
        return mask.copy()
    return ~remove_small_objects_fast(~mask, min_px, connectivity)


#: Above this Gaussian kernel length, :func:`gaussian_blur` convolves by FFT instead of OpenCV's
#: direct separable filter (whose cost grows with the kernel length).
FFT_BLUR_MIN_KSIZE = 257


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """``cv2.GaussianBlur(img, (0, 0), sigma)`` for a 2-D float32 image, fast for large sigma.

    Small kernels go to OpenCV. Large ones (a background scale of tens of µm on a fine tissue
    thumbnail: 400-tap kernels, seconds per call) are applied separably by FFT, in float64,
    with OpenCV's own float32 kernel and its default border (reflect-101): the result equals
    OpenCV's to float32 rounding (|diff| ~1e-7 relative).
    """
    img = np.asarray(img, np.float32)
    ksize = round(sigma * 8 + 1) | 1  # OpenCV's kernel size for float images
    if img.ndim != 2 or ksize < FFT_BLUR_MIN_KSIZE or min(img.shape) <= ksize:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    import scipy.fft as sfft

    k = cv2.getGaussianKernel(ksize, sigma, cv2.CV_32F).astype(np.float64).ravel()
    r = ksize // 2
    x = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="reflect")
        del x
        nfft = sfft.next_fast_len(xp.shape[axis], real=True)
        shape = [1, 1]
        shape[axis] = -1
        spec = sfft.rfft(xp, nfft, axis=axis, workers=-1)
        del xp
        spec *= sfft.rfft(k, nfft).reshape(shape)
        y = sfft.irfft(spec, nfft, axis=axis, workers=-1)
        del spec
        sl = [slice(None), slice(None)]
        sl[axis] = slice(ksize - 1, ksize - 1 + img.shape[axis])
        x = y[tuple(sl)]
        del y
    return x.astype(np.float32)

