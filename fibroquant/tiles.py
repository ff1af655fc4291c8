"""One tile measured: the collagen decision, the class map and the counts, by one path.

:func:`measure_tile` hands a tile to the fused kernel
(:func:`fibroquant.kernels.measure_tile_fused`) when it can take it, else to
:func:`measure_tile_reference`, its numpy twin (no numba; the tests' oracle). Both decide collagen
by :class:`fibroquant.collagen.CollagenRule`, unless a :class:`PixelDecider` (e.g. a trained
pixel classifier) decides it instead: its mask then goes through the same counting.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fibroquant import kernels
from fibroquant.collagen import (
    CollagenRule,
    collagen_concentration,
    is_collagen,
    speck_mask,
)
from fibroquant.kernels import FUSED_COUNTS, FusedTile


class PixelDecider(Protocol):
    """A collagen decision that replaces :func:`fibroquant.collagen.is_collagen` on each tile.

    The tile loop reads each tile with ``halo_um`` of the slide around it (at the analysis
    resolution; white, like glass, past the slide's edge) and calls ``decide(rgb, halo_px)`` with that
    read and the halo width in pixels; the mask it returns (bool, the tile's shape, halo cut
    off) goes through the same tissue, capsule, wall, speck and counting steps as the rule's.
    """

    halo_um: float

    def __call__(self, rgb: np.ndarray, halo_px: int) -> np.ndarray: ...


def measure_tile(
    rgb: np.ndarray, rule: CollagenRule, flags: np.ndarray, thr: np.ndarray, rows: np.ndarray,
    cols: np.ndarray, f: int, stride: int, *, decided: np.ndarray | None = None,
) -> FusedTile:
    """Counts, block counts and focus moments of one tile (see :func:`measure_tile_reference`):
    by the fused kernel when it can take the inputs and no ``decided`` mask is given."""
    if decided is None and kernels.fused_ok(rgb, rule.lut, rule.unmix_col, rule.other_cols,
                                            flags, thr, rows, cols):
        return kernels.measure_tile_fused(
            rgb, rule.lut, rule.unmix_col, rule.other_cols, rule.share_guard, flags, thr, rows,
            cols, f, stride, rule.min_object_px, rule.blob_px, rule.blob_side)
    return measure_tile_reference(rgb, rule, flags, thr, rows, cols, f, stride, decided=decided)


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
        Collagen pixels decided by a :class:`PixelDecider` instead of the rule's steps 1-2.

    Returns
    -------
    FusedTile
    """
    fl = flags[np.ix_(rows, cols)]
    tissue = (fl & kernels.FLAG_TISSUE) != 0
    if decided is None:
        conc, col = is_collagen(rgb, thr[np.ix_(rows, cols)], rule)
    else:
        conc, col = collagen_concentration(rgb, rule.lut, rule.unmix_col), decided
    col = col & tissue
    capsule = col & ((fl & kernels.FLAG_BAND) != 0)
    wall = ((fl & kernels.FLAG_WALL) != 0) & tissue & ~capsule
    col &= ~capsule & ~wall
    tissue &= ~capsule & ~wall
    col &= ~speck_mask(col, rule)
    kinds = [((fl & b) != 0) for b in (kernels.FLAG_LUMEN, kernels.FLAG_FOLD,
                                       kernels.FLAG_BUBBLE)]
    excluded = capsule | wall | kinds[0] | kinds[1] | kinds[2]
    counts = dict(zip(FUSED_COUNTS, (int(np.count_nonzero(m)) for m in
                                     (tissue, col, capsule, wall, *kinds))))
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
