"""Colour-plane misregistration (lateral chromatic aberration): measured and undone.

A camera or scanner whose red, green and blue planes do not fall on the same pixels (lateral
chromatic aberration of the lens, a misaligned 3-CCD prism, demosaicing) paints a coloured
fringe along every sharp edge: the rim of each fat vacuole and lumen turns blue on one side
and red or yellow on the other. Colour deconvolution reads those fringes as stain: a blue rim
is aniline blue (collagen in Masson's trichrome), a red one is Sirius red.

:func:`estimate_channel_shifts` measures the shift of the red and the blue plane against the
green one by phase correlation of their gradient magnitudes (edges sit at the same places in
every plane, whatever their contrast), on a few tissue tiles at full resolution, and keeps the
median when the tiles agree. :func:`shift_channels` moves the planes back by bicubic
resampling. Shifts below ``MIN_SHIFT_PX`` are left alone: every image has some, and resampling
blurs a little.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

__all__ = ["MIN_SHIFT_PX", "estimate_channel_shifts", "margin_for", "plane_shift", "shift_channels"]

#: Smallest shift (pixels, either plane) that is corrected.
MIN_SHIFT_PX = 0.25
#: Largest shift believed (pixels); larger estimates are misregistered content, not optics.
MAX_SHIFT_PX = 4.0
#: Least mean Sobel gradient magnitude of each plane in a quadrant that is correlated.
MIN_GRADIENT = 6.0
#: Smallest quadrant correlated, pixels (images under twice this are not measured).
MIN_CROP_PX = 64
#: Largest spread (pixels, median absolute deviation) between the tiles' estimates.
MAX_SPREAD_PX = 0.15
#: Edge of the central square of each tile whose quadrants are correlated, pixels.
CROP_PX = 512


def _gradient(plane: np.ndarray) -> np.ndarray:
    p = plane.astype(np.float32)
    gx = cv2.Sobel(p, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(p, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.magnitude(gx, gy)


def plane_shift(rgb: np.ndarray) -> np.ndarray:
    """Shift of the red and blue planes against green in one uint8 RGB image.

    Cross-correlation of the planes' gradient magnitudes, upsampled 20x around its peak
    (``skimage.registration.phase_cross_correlation``, Guizar-Sicairos et al. 2008): ~0.05 px.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)

    Returns
    -------
    ndarray of float64, shape (2, 2)
        ``[[dy_red, dx_red], [dy_blue, dx_blue]]``: where each plane's content lies relative
        to the green plane's, pixels (positive = down / right).
    """
    return _plane_shift([_gradient(rgb[..., c]) for c in range(3)])


def _plane_shift(gradients: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`plane_shift` from the three planes' gradient magnitudes. The green plane's
    Fourier transform is taken once for both correlations (``space="fourier"`` with the
    transforms skimage takes itself: the same shifts)."""
    from scipy.fft import fftn
    from skimage.registration import phase_cross_correlation

    g = fftn(gradients[1])
    out = np.zeros((2, 2))
    for row, c in enumerate((0, 2)):
        shift, _, _ = phase_cross_correlation(g, fftn(gradients[c]), space="fourier",
                                              upsample_factor=20, normalization=None)
        out[row] = -np.asarray(shift)  # skimage returns the move that registers the plane
    return out


def _has_edges(rgb: np.ndarray) -> bool:
    """Whether every plane has edges enough to correlate: a mean gradient magnitude of at least
    ``MIN_GRADIENT`` grey levels per pixel (glass and saturated white have about 0-3; tissue
    10-50)."""
    return _edges(_gradient(rgb[..., c]) for c in range(3))


def _edges(gradients: Iterable[np.ndarray]) -> bool:
    return all(float(g.mean()) >= MIN_GRADIENT for g in gradients)


def _crops(rgb: np.ndarray) -> list[np.ndarray]:
    """The four quadrants of the central ``CROP_PX`` square (each plane-shift estimate)."""
    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - CROP_PX) // 2), max(0, (w - CROP_PX) // 2)
    crop = rgb[y0 : y0 + CROP_PX, x0 : x0 + CROP_PX]
    ch, cw = crop.shape[0] // 2, crop.shape[1] // 2
    return [np.ascontiguousarray(crop[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw])
            for i in (0, 1) for j in (0, 1)]


def estimate_channel_shifts(tiles: Sequence[np.ndarray]) -> np.ndarray | None:
    """The red and blue planes' shift against green, from tissue tiles of one slide.

    Parameters
    ----------
    tiles : sequence of ndarray of uint8, shape (H, W, 3)
        Full-resolution tissue regions. Each quadrant of each tile's central ``CROP_PX``
        square gives one estimate.

    Returns
    -------
    ndarray of float64, shape (2, 2) or None
        ``[[dy_red, dx_red], [dy_blue, dx_blue]]`` in pixels of the tiles, the median of the
        estimates; None when no plane is shifted by ``MIN_SHIFT_PX`` or more, or the estimates
        disagree (median absolute deviation above ``MAX_SPREAD_PX``: no clear edges).
    """
    found = []
    for rgb in tiles:
        if min(rgb.shape[:2]) < 2 * MIN_CROP_PX:
            continue
        for crop in _crops(rgb):
            grads = [_gradient(crop[..., c]) for c in range(3)]  # for the test and the shift
            if not _edges(grads):
                continue  # glass or blank: the correlation of flat planes is meaningless
            shifts = _plane_shift(grads)
            if np.abs(shifts).max() <= MAX_SHIFT_PX:
                found.append(shifts)
    if len(found) < 4:
        return None
    est = np.stack(found)
    median = np.median(est, axis=0)
    spread = np.median(np.abs(est - median), axis=0).max()
    if spread > MAX_SPREAD_PX or np.hypot(*median.T).max() < MIN_SHIFT_PX:
        return None
    return median


def shift_channels(rgb: np.ndarray, shifts: np.ndarray, margin: int = 0) -> np.ndarray:
    """Move the red and blue planes back onto the green one (bicubic resampling: a bilinear
    half-pixel shift would blur the planes against green, and thin fibres lose their colour).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        A region read ``margin`` pixels larger on every side than the one wanted.
    shifts : ndarray, shape (2, 2)
        From :func:`estimate_channel_shifts`, in pixels of ``rgb``.
    margin : int
        Pixels cropped from every side after resampling.

    Returns
    -------
    ndarray of uint8, shape (H - 2 margin, W - 2 margin, 3)
    """
    h, w = rgb.shape[:2]
    out = np.empty((h - 2 * margin, w - 2 * margin, 3), np.uint8)
    out[..., 1] = rgb[margin : h - margin, margin : w - margin, 1]
    for c, (dy, dx) in zip((0, 2), shifts, strict=True):
        # content at p + (dy, dx) belongs at p: sample the plane there
        m = np.array([[1, 0, dx + margin], [0, 1, dy + margin]], np.float32)
        out[..., c] = cv2.warpAffine(
            np.ascontiguousarray(rgb[..., c]), m, (w - 2 * margin, h - 2 * margin),
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE,
        )
    return out


def margin_for(shifts: np.ndarray) -> int:
    """Pixels to read around a region so that :func:`shift_channels` never samples outside."""
    return math.ceil(float(np.abs(shifts).max())) + 1
