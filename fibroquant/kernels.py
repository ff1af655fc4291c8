"""Fast per-pixel kernels for the tile loop (numba, with a numpy fallback).

The reference for everything here is :func:`fibroquant.pipeline.collagen_concentration`::

    conc = lut[0][r] * u[0] + lut[1][g] * u[1] + lut[2][b] * u[2]      # float32 throughout

The kernels compute exactly that, bit for bit: the three products ``lut[c][v] * u[c]`` are
tabulated once per call (768 float32 multiplies, the same rounding as the reference), and each
pixel is two float32 additions of table entries in the reference's order, compiled without
``fastmath`` (so no re-association and no fused multiply-add). One pass over the tile, no
temporaries, and the GIL is released (``nogil=True``), so tiles on a thread pool scale with cores.

Public API
----------
``collagen_concentration_fast(rgb, lut, unmix_col)``
    Drop-in for :func:`fibroquant.pipeline.collagen_concentration`.
``collagen_concentration_and_mask(rgb, lut, unmix_col, threshold, tissue)``
    The same map plus ``(conc > threshold) & tissue`` in the same pass.
``lookup_nearest(mask, rows, cols)``, ``block_majority(mask, f)``
    Exact, faster replacements for ``pipeline._lookup`` (``mask[np.ix_(rows, cols)]``) and
    ``pipeline._block_reduce`` (the per-tile mask bookkeeping, which dominated the tile loop in
    ``benchmarks/wsi.py``'s profile).
``warmup()``
    Compile (or load from numba's on-disk cache) once, before starting worker threads.
``HAVE_NUMBA``
    False when numba is missing or disabled; the functions then call the numpy reference.

Compilation happens once per process on first use (or in :func:`warmup`); with ``cache=True``
later processes (process pools, Dask workers) load the machine code from ``__pycache__`` in
tens of milliseconds instead of compiling. Nothing is compiled per tile.

A 256³ RGB → collagen lookup table (16 MiB, one read per pixel) was measured as an
alternative to the fused mask and is slower on this code path; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

try:  # numba is a dependency, but keep the package usable without it
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only without numba
    _numba = None

HAVE_NUMBA = _numba is not None and os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")


def _jit(fn: Any) -> Any:
    """``numba.njit(nogil=True, cache=True, fastmath=False)``; no disk cache if unwritable."""
    if _numba is None:  # pragma: no cover
        return None
    try:
        return _numba.njit(nogil=True, cache=True, fastmath=False)(fn)
    except RuntimeError:  # "cannot cache function ... no locator available" (read-only install)
        return _numba.njit(nogil=True, cache=False, fastmath=False)(fn)


def _conc_py(rgb: np.ndarray, tables: np.ndarray, out: np.ndarray) -> None:
    t0 = tables[0]
    t1 = tables[1]
    t2 = tables[2]
    h, w = out.shape
    for i in range(h):
        for j in range(w):
            out[i, j] = t0[rgb[i, j, 0]] + t1[rgb[i, j, 1]] + t2[rgb[i, j, 2]]


def _conc_mask_py(
    rgb: np.ndarray, tables: np.ndarray, threshold: np.float32, tissue: np.ndarray,
    out: np.ndarray, mask: np.ndarray,
) -> None:
    t0 = tables[0]
    t1 = tables[1]
    t2 = tables[2]
    h, w = out.shape
    for i in range(h):
        for j in range(w):
            c = t0[rgb[i, j, 0]] + t1[rgb[i, j, 1]] + t2[rgb[i, j, 2]]
            out[i, j] = c
            mask[i, j] = (c > threshold) & tissue[i, j]


def _gather_py(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> None:
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(cols.shape[0]):
            out[i, j] = mask[r, cols[j]]


def _share_py(
    rgb: np.ndarray, tables: np.ndarray, others: np.ndarray, min_share: np.float32,
    out: np.ndarray, ok: np.ndarray,
) -> None:
    t0 = tables[0]
    t1 = tables[1]
    t2 = tables[2]
    n_other = others.shape[0]
    zero = np.float32(0.0)
    h, w = out.shape
    for i in range(h):
        for j in range(w):
            r = rgb[i, j, 0]
            g = rgb[i, j, 1]
            b = rgb[i, j, 2]
            c = t0[r] + t1[g] + t2[b]
            out[i, j] = c
            p = c if c > zero else zero
            total = p
            for k in range(n_other):
                ck = others[k, 0, r] + others[k, 1, g] + others[k, 2, b]
                total = total + (ck if ck > zero else zero)
            ok[i, j] = p >= min_share * total


def _block_py(mask: np.ndarray, f: int, out: np.ndarray) -> None:
    h, w = mask.shape
    oh, ow = out.shape
    counts = np.zeros(ow, np.int64)
    for bi in range(oh):
        counts[:] = 0
        for i in range(bi * f, min(bi * f + f, h)):
            for bj in range(ow):
                c = 0
                for j in range(bj * f, min(bj * f + f, w)):
                    c += mask[i, j]
                counts[bj] += c
        for bj in range(ow):
            out[bi, bj] = 2 * counts[bj] >= f * f


_conc_nb = _jit(_conc_py)
_conc_mask_nb = _jit(_conc_mask_py)
_gather_nb = _jit(_gather_py)
_block_nb = _jit(_block_py)
_share_nb = _jit(_share_py)

_warm_lock = threading.Lock()
_warm = False


def warmup() -> bool:
    """Compile (or load from cache) the kernels for C-ordered and strided tiles, once.

    Safe to call from several threads; returns :data:`HAVE_NUMBA`.
    """
    global _warm
    if not HAVE_NUMBA or _warm:
        return HAVE_NUMBA
    with _warm_lock:
        if _warm:
            return True
        tables = np.zeros((3, 256), np.float32)
        for rgb in (np.zeros((2, 2, 3), np.uint8), np.zeros((2, 4, 3), np.uint8)[:, ::2]):
            out = np.empty((2, 2), np.float32)
            _conc_nb(rgb, tables, out)
            for tissue in (np.ones((2, 2), bool), np.ones((2, 4), bool)[:, ::2]):
                _conc_mask_nb(rgb, tables, np.float32(0), tissue, out, np.empty((2, 2), bool))
                lookup_nearest(tissue, np.zeros(2, np.intp), np.zeros(2, np.intp))
                lookup_nearest(tissue.astype(np.float32), np.zeros(2, np.intp),
                               np.zeros(2, np.intp))
                block_majority(tissue, 2)
            _share_nb(rgb, tables, np.zeros((1, 3, 256), np.float32), np.float32(0.5), out,
                      np.empty((2, 2), bool))
        _warm = True
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


def _reference(rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray) -> np.ndarray:
    from fibroquant.pipeline import collagen_concentration  # noqa: PLC0415 - avoid a cycle

    return collagen_concentration(rgb, lut, unmix_col)


def collagen_concentration_fast(
    rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray
) -> np.ndarray:
    """Collagen stain concentration of a uint8 RGB tile, float32 OD units (one fused pass).

    Same result as :func:`fibroquant.pipeline.collagen_concentration`, bit for bit, for
    uint8 ``(H, W, 3)`` tiles of any strides with a float32 ``lut`` and ``unmix_col``; other
    inputs (and machines without numba) are handed to that reference function.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        Transmitted-light tile (need not be contiguous).
    lut : ndarray of float32, shape (3, 256)
        OD per channel value, from :func:`fibroquant.stains.od_lut` (OD units).
    unmix_col : ndarray of float32, shape (3,)
        Collagen column of the unmixing matrix (concentration per OD unit).

    Returns
    -------
    ndarray of float32, shape (H, W)
        Collagen concentration, OD units (may be slightly negative from noise).
    """
    if not _fast_ok(rgb, lut, unmix_col):
        return _reference(rgb, lut, unmix_col)
    out = np.empty(rgb.shape[:2], np.float32)
    if out.size:
        _conc_nb(rgb, scaled_tables(lut, unmix_col), out)
    return out


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


def collagen_concentration_and_mask(
    rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray, threshold: float,
    tissue: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Collagen concentration and ``(conc > threshold) & tissue`` in one pass.

    Parameters
    ----------
    rgb, lut, unmix_col
        As for :func:`collagen_concentration_fast`.
    threshold : float
        Collagen threshold, OD units (e.g. ``CollagenThreshold.threshold_od``); compared with
        exactly numpy's semantics for ``conc > threshold``.
    tissue : ndarray of bool, shape (H, W)
        Tissue mask of the tile (need not be contiguous).

    Returns
    -------
    conc : ndarray of float32, shape (H, W)
        Collagen concentration, OD units.
    mask : ndarray of bool, shape (H, W)
        Thresholded collagen inside tissue (before speck removal), i.e. what
        :func:`fibroquant.collagen.segment_collagen` computes before ``remove_small_objects``
        when ``smooth_um`` is 0.
    """
    tissue = np.asarray(tissue)
    if (
        not _fast_ok(rgb, lut, unmix_col)
        or tissue.dtype != np.bool_
        or tissue.shape != rgb.shape[:2]
    ):
        conc = collagen_concentration_fast(rgb, lut, unmix_col)
        return conc, (conc > threshold) & tissue
    out = np.empty(rgb.shape[:2], np.float32)
    mask = np.empty(rgb.shape[:2], bool)
    if out.size:
        thr = threshold_as_float32(out.dtype, threshold)
        _conc_mask_nb(rgb, scaled_tables(lut, unmix_col), thr, tissue, out, mask)
    return out, mask


_GATHER_DTYPES = (np.dtype(np.bool_), np.dtype(np.float32))


def lookup_nearest(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``mask[np.ix_(rows, cols)]`` in one pass (nearest-neighbour upsampling of a mask).

    Same result as ``pipeline._lookup``; ~5x faster than ``np.ix_`` fancy indexing.

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


def collagen_concentration_and_share(
    rgb: np.ndarray, lut: np.ndarray, unmix_col: np.ndarray, other_cols: tuple[np.ndarray, ...],
    min_share: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Collagen concentration and the collagen-share test in one pass.

    Same result, bit for bit, as the reference::

        conc = collagen_concentration(rgb, lut, unmix_col)
        pos = np.maximum(conc, 0)
        total = pos.copy()
        for col in other_cols:
            total += np.maximum(collagen_concentration(rgb, lut, col), 0)
        ok = pos >= np.float32(min_share) * total

    Parameters
    ----------
    rgb, lut, unmix_col
        As for :func:`collagen_concentration_fast`.
    other_cols : tuple of ndarray of float32, shape (3,)
        Unmixing columns of the other stains, in the order they are summed.
    min_share : float
        The collagen stain's least share of a pixel's positive concentration.

    Returns
    -------
    conc : ndarray of float32, shape (H, W)
    ok : ndarray of bool, shape (H, W)
    """
    if not (_fast_ok(rgb, lut, unmix_col) and all(
        isinstance(c, np.ndarray) and c.dtype == np.float32 and c.shape == (3,)
        for c in other_cols
    )):
        conc = collagen_concentration_fast(rgb, lut, unmix_col)
        pos = np.maximum(conc, 0)
        total = pos.copy()
        for col in other_cols:
            total += np.maximum(collagen_concentration_fast(rgb, lut, col), 0)
        return conc, pos >= np.float32(min_share) * total
    out = np.empty(rgb.shape[:2], np.float32)
    ok = np.empty(rgb.shape[:2], bool)
    if out.size:
        others = np.zeros((len(other_cols), 3, 256), np.float32)
        for k, col in enumerate(other_cols):
            others[k] = scaled_tables(lut, col)
        _share_nb(rgb, scaled_tables(lut, unmix_col), others, np.float32(min_share), out, ok)
    return out, ok


def block_majority(mask: np.ndarray, f: int) -> np.ndarray:
    """Downsample a bool mask by ``f``: a block is True when at least half of its f x f is.

    Same result as ``pipeline._block_reduce`` (blocks past the edge are padded with False and
    still divided by f²), without the float32 copy and the strided mean.

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W)
    f : int
        Block edge in pixels (>= 1).

    Returns
    -------
    ndarray of bool, shape (ceil(H / f), ceil(W / f))
    """
    f = int(f)
    if f == 1:
        return mask
    mask = np.asarray(mask)
    h, w = mask.shape
    out = np.empty((-(-h // f), -(-w // f)), bool)
    if not (HAVE_NUMBA and mask.dtype == np.bool_ and f > 1):
        hh, ww = out.shape[0] * f, out.shape[1] * f
        padded = np.zeros((hh, ww), np.float32)
        padded[:h, :w] = mask
        return padded.reshape(hh // f, f, ww // f, f).mean(axis=(1, 3)) >= 0.5
    if out.size:
        _block_nb(mask, f, out)
    return out


__all__ = [
    "HAVE_NUMBA",
    "block_majority",
    "collagen_concentration_and_mask",
    "collagen_concentration_and_share",
    "collagen_concentration_fast",
    "lookup_nearest",
    "scaled_tables",
    "threshold_as_float32",
    "warmup",
]


def remove_small_objects_fast(mask: np.ndarray, min_px: int, connectivity: int = 1) -> np.ndarray:
    """Drop connected components smaller than ``min_px`` pixels from a 2-D bool mask.

    Same result as ``skimage.morphology.remove_small_objects(mask, max_size=min_px - 1,
    connectivity=connectivity)`` (1 = 4-neighbours, 2 = 8-neighbours), but labels only the
    bounding box of the mask with OpenCV (which releases the GIL), and does no labelling at all
    for an empty mask. Returns a new array (or ``mask`` itself when nothing is removed).
    """
    import cv2  # noqa: PLC0415 - keep the module importable without OpenCV at import time

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or min_px <= 1:
        return mask
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = np.ascontiguousarray(mask[y0:y1, x0:x1]).view(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
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
