"""Out-of-focus detection: blocks whose fine detail is far below the rest of the slide.

Sharpness of a block is the variance of the Laplacian of its summed optical density divided by
the variance of the summed optical density itself (high-frequency energy relative to contrast),
so pale and dark tissue score alike and only blur lowers it. A block is out of focus when its
sharpness is below ``factor`` × the median of the slide's tissue blocks.
"""

from __future__ import annotations

import numpy as np

from fibroquant import kernels


def block_sharpness(od_sum: np.ndarray, tissue: np.ndarray, *, min_tissue_fraction: float = 0.5
                    ) -> float:
    """Relative sharpness of one block, or NaN when it holds too little tissue.

    Parameters
    ----------
    od_sum : ndarray of float32, shape (H, W)
        Summed optical density of the block.
    tissue : ndarray of bool, shape (H, W)
        Countable tissue in the block.
    min_tissue_fraction : float
        Blocks with less tissue than this fraction are not judged.

    Returns
    -------
    float
        ``var(Laplacian(od_sum)) / var(od_sum)`` over tissue pixels (unitless).
    """
    if od_sum.size == 0 or min(od_sum.shape) < 8:
        return float("nan")
    return sharpness_from_moments(kernels.focus_moments_reference(od_sum, tissue), od_sum.shape,
                                  min_tissue_fraction=min_tissue_fraction)


def sharpness_from_moments(mom: np.ndarray | None, shape: tuple[int, int], *,
                           min_tissue_fraction: float = 0.5) -> float:
    """:func:`block_sharpness` from the block's moments (:func:`fibroquant.kernels.focus_moments`).

    Parameters
    ----------
    mom : ndarray of float64, shape (7,), or None
        Count, sum and sum of squares of the summed OD (less a reference value) over tissue,
        the same of its Laplacian over tissue off the frame, and the reference value.
    shape : tuple of int
        Shape of the block the moments were taken over.
    min_tissue_fraction : float
        Blocks with less tissue than this fraction are not judged.

    Returns
    -------
    float
        ``var(Laplacian) / var(od_sum)`` (unitless), NaN when the block is not judged.
    """
    size = shape[0] * shape[1]
    if mom is None or size == 0 or min(shape) < 8 or mom[0] / size < min_tissue_fraction:
        return float("nan")
    n, s1, s2, m, q1, q2, _ = mom
    if m == 0:
        return float("nan")
    v = s2 / n - (s1 / n) ** 2
    if v <= 1e-8:
        return float("nan")
    return float((q2 / m - (q1 / m) ** 2) / v)


def unfocused(sharpness: np.ndarray, *, factor: float, min_blocks: int = 8) -> np.ndarray:
    """Which blocks are out of focus.

    Parameters
    ----------
    sharpness : ndarray of float
        One value per block (NaN = not judged).
    factor : float
        A block below ``factor`` × the median sharpness of judged blocks is out of focus.
    min_blocks : int
        With fewer judged blocks no block is flagged (no reference).

    Returns
    -------
    ndarray of bool
    """
    s = np.asarray(sharpness, dtype=np.float64)
    judged = np.isfinite(s)
    if judged.sum() < min_blocks:
        return np.zeros(s.shape, bool)
    ref = float(np.median(s[judged]))
    return judged & (s < factor * ref)
