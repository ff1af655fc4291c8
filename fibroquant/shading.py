"""Uneven illumination (vignetting, shading): estimated from the image itself and divided out.

Microscope field photos are rarely lit evenly: the corners of a camera frame are often 10-30 %
darker than its centre. Optical density is measured against one glass colour, so a darkened
corner reads as a uniform (grey) optical density on top of the stains: glass there passes the
tissue threshold and tissue there gains stain.

The illumination is seen wherever the light crosses nothing: glass around the section, lumens,
fat vacuoles, sinusoids. Such pixels have a *neutral* optical density (the same in R, G and B:
the light is only dimmer), while stained tissue is strongly coloured. :func:`estimate_shading`
takes the neutral, pale pixels of the thumbnail, fits a smooth field to their optical density
per channel (a low-order polynomial of the image coordinates, robust to the darker tissue
pixels that slip in), and :class:`CorrectedSlide` divides it out of every pixel read, so the
thumbnail, the tiles and the QC overlay all see an evenly lit image. Nothing is corrected
unless the field varies by at least ``flat_field_min_od`` over the image (about 5 % of the
light), the neutral pixels cover most of the image, and the field explains most of their
variation (``MIN_FIT_R2``): an evenly lit whole-slide scan is read as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from fibroquant.config import TissueSettings
from fibroquant.registration import margin_for, shift_channels
from fibroquant.slides import Level, Slide, SlideBase
from fibroquant.stains import channel_sum, rgb_to_od

__all__ = ["CorrectedSlide", "ShadingField", "estimate_shading", "shading_basis"]

#: Plane shifts smaller than this on a level (pixels) are not resampled there.
LEVEL_MIN_SHIFT_PX = 0.05
#: Pixels of the image the field is fitted on (the thumbnail is shrunk to about this size).
FIT_PIXELS = 250_000
#: Largest neutral deviation of a glass pixel: max over channels of |OD_c - mean OD| (OD units).
NEUTRAL_OD = 0.04
#: Darkest glass considered (mean OD; 0.35 OD = 45 % of the light).
MAX_GLASS_OD = 0.35
#: Largest correction, OD (a factor of 10**0.35 = 2.2 in light).
MAX_CORRECTION_OD = 0.35
#: Robust residual scatter above which the neutral pixels are not glass-like enough to trust.
MAX_SCATTER_OD = 0.02
#: Least share of the cells' (weighted) variance the field must explain to be applied.
MIN_FIT_R2 = 0.8
#: The brightest pixels (this percentile of each channel) may come out of the correction at
#: most this much brighter: ``MAX_BRIGHTENING_OD`` (0.01 OD = 2.3 %, ~5 grey levels) or
#: ``MAX_BRIGHTENING_SHARE`` of the field's range, the larger. An evened-out vignette leaves
#: the glass about as bright as its brightest part (0.004-0.02 OD, at most 0.21 of the range
#: on synthetic vignettes of 0.1-0.3, more in fields with little glass); evening out pale
#: tissue beside glass as if it were darker glass brightens it by 0.03-0.05 OD (0.5-0.7).
BRIGHT_PERCENTILE = 99.5
MAX_BRIGHTENING_OD = 0.01
MAX_BRIGHTENING_SHARE = 0.35
#: Cells of a 3 x 3 grid over the image that must hold neutral pixels (coverage of the fit).
MIN_CELLS = 6
#: Cells per side of the grid whose brightest neutral pixels the field is fitted to.
GRID_CELLS = 12
#: Largest grid step (pixels) at which the field is evaluated before being interpolated.
EVAL_STEP = 8
#: Fewest grid nodes across the image's shorter side (smaller images get a finer step).
EVAL_NODES = 64


def shading_basis(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Polynomial terms of the illumination field at normalised coordinates.

    Parameters
    ----------
    u, v : ndarray of float
        Column and row positions scaled to [-1, 1] over the whole image (same shape).

    Returns
    -------
    ndarray of float64, shape (u.size, 7)
        ``1, u, v, u², uv, v², (u² + v²)²``: any off-centre quadratic, plus the quartic
        fall-off of a lens's vignetting (cos⁴ law) about the image centre.
    """
    u = np.asarray(u, np.float64).ravel()
    v = np.asarray(v, np.float64).ravel()
    r2 = u * u + v * v
    return np.column_stack([np.ones_like(u), u, v, u * u, u * v, v * v, r2 * r2])


@dataclass(frozen=True)
class ShadingField:
    """A slide's illumination field, as optical density to take away per channel.

    Attributes
    ----------
    coef : ndarray of float64, shape (7, 3)
        Per-channel coefficients of :func:`shading_basis` for the OD of the glass, relative
        to the brightest point of the image (so the correction only ever brightens, up to
        rounding of the per-channel tint).
    od_range : float
        Range of the channel-mean correction over the image, OD units (0.1 = corners at 79 %
        of the centre's light).
    n_pixels : int
        Neutral pixels of the grid cells the fit was made on.
    lo, hi : ndarray of float64, shape (3,)
        Per-channel bounds of the correction: the field's values at those cells (the field is
        not extrapolated beyond them).
    """

    coef: np.ndarray = field(repr=False)
    od_range: float
    n_pixels: int
    lo: np.ndarray = field(repr=False)
    hi: np.ndarray = field(repr=False)

    def gain(self, shape: tuple[int, int], y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Factor that evens out the light of a region, float32 ``(h, w, 3)`` (>= ~1).

        Parameters
        ----------
        shape : tuple of int
            ``(height, width)`` of the whole image (level) the region is in.
        y0, x0, h, w : int
            The region, in that image's pixel coordinates.

        Notes
        -----
        The polynomial is evaluated on nodes ``step`` pixels apart (at least ``EVAL_NODES``
        across the image, so the bilinear interpolation between them stays within ~1e-4 OD of
        it) and interpolated by ``cv2.resize``, whose pixel-centre mapping puts node ``k`` on
        pixel ``(k - 1) * step + (step - 1) / 2`` of the region: one node beyond each side, so
        no pixel is extrapolated.
        """
        height, width = shape
        step = int(max(1, min(EVAL_STEP, min(height, width) // EVAL_NODES)))
        ny, nx = -(-h // step) + 2, -(-w // step) + 2
        off = (step - 1) / 2 - step
        gy = y0 + off + step * np.arange(ny, dtype=np.float64)
        gx = x0 + off + step * np.arange(nx, dtype=np.float64)
        uu, vv = np.meshgrid(2 * (gx + 0.5) / width - 1, 2 * (gy + 0.5) / height - 1)
        lo = np.clip(self.lo, -MAX_CORRECTION_OD, MAX_CORRECTION_OD)
        hi = np.clip(self.hi, -MAX_CORRECTION_OD, MAX_CORRECTION_OD)
        od = np.clip(shading_basis(uu, vv) @ self.coef, -MAX_CORRECTION_OD, MAX_CORRECTION_OD)
        nodes = np.power(10.0, od.reshape(ny, nx, 3)).astype(np.float32)
        if step == 1:
            fine = nodes[1 : 1 + h, 1 : 1 + w]
        else:
            fine = cv2.resize(nodes, (nx * step, ny * step),
                              interpolation=cv2.INTER_LINEAR)[step : step + h, step : step + w]
        # bounded after the interpolation: nodes clipped before it would bend the field
        # within a step of where it meets its bounds (at a steep corner, 4 levels low)
        low, high = ((*(float(x) for x in np.power(10.0, b)), 0.0) for b in (lo, hi))
        return cv2.min(cv2.max(np.ascontiguousarray(fine), low), high)

    def apply(self, rgb: np.ndarray, shape: tuple[int, int], y0: int = 0, x0: int = 0
              ) -> np.ndarray:
        """Divide the illumination out of a uint8 RGB region (a new uint8 array, rounded and
        saturated at 255)."""
        h, w = rgb.shape[:2]
        return cv2.multiply(rgb, self.gain(shape, y0, x0, h, w), dtype=cv2.CV_8U)


def _cell_points(
    od: np.ndarray, mean: np.ndarray, cand: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The glass's OD in each cell of a ``GRID_CELLS``² grid: the mean OD of the brightest
    quarter of the cell's neutral pixels (mixed pixels at the rims of small gaps are darker),
    at their mean position. Returns (uv (n, 2), od (n, 3), pixel counts (n,)) or None."""
    sh, sw = mean.shape
    ys, xs = np.nonzero(cand)
    cell = (ys * GRID_CELLS // sh) * GRID_CELLS + xs * GRID_CELLS // sw
    order = np.argsort(cell, kind="stable")
    ys, xs, cell = ys[order], xs[order], cell[order]
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    ends = np.r_[starts[1:], len(cell)]
    min_px = max(12, int(0.01 * sh * sw / GRID_CELLS**2))
    uv, val, cnt = [], [], []
    for a, b in zip(starts, ends, strict=True):
        if b - a < min_px:
            continue
        cy, cx = ys[a:b], xs[a:b]
        m = mean[cy, cx]
        bright = m <= np.quantile(m, 0.25)
        cy, cx = cy[bright], cx[bright]
        uv.append((2 * (cx.mean() + 0.5) / sw - 1, 2 * (cy.mean() + 0.5) / sh - 1))
        val.append(od[cy, cx].mean(axis=0))
        cnt.append(b - a)
    if len(cnt) < 2 * 7:
        return None
    return np.array(uv), np.array(val, np.float64), np.array(cnt, np.float64)


def _covers(uv: np.ndarray) -> bool:
    """Whether fitted cells lie in at least ``MIN_CELLS`` of the 3 x 3 parts of the image."""
    part = np.clip(((uv + 1) * 1.5).astype(int), 0, 2)
    return len(np.unique(part[:, 1] * 3 + part[:, 0])) >= MIN_CELLS


def grey_and_chroma(od: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``od.mean(axis=-1)`` and ``np.abs(od - mean[..., None]).max(axis=-1)`` of a float32
    (..., 3) optical density, plane by plane: the same values (an exact zero's sign aside),
    ~10x faster than numpy's pixel-by-pixel reduction of a short last axis."""
    mean = channel_sum(od) / np.float32(od.shape[-1])
    chroma = np.zeros_like(mean)
    for c in range(od.shape[-1]):
        np.maximum(chroma, np.abs(np.ascontiguousarray(od[..., c]) - mean), out=chroma)
    return mean, chroma


def fit_image(thumb: np.ndarray) -> np.ndarray:
    """The thumbnail reduced (``INTER_AREA``) to about ``FIT_PIXELS``, where
    :func:`estimate_shading` fits the field (the thumbnail itself when no larger)."""
    h, w = thumb.shape[:2]
    k = max(1.0, float(np.sqrt(h * w / FIT_PIXELS)))
    if k <= 1:
        return thumb
    return cv2.resize(thumb, (max(1, round(w / k)), max(1, round(h / k))),
                      interpolation=cv2.INTER_AREA)


def estimate_shading(
    thumb: np.ndarray, background: tuple[float, float, float], settings: TissueSettings,
    *, small: np.ndarray | None = None,
) -> ShadingField | None:
    """Estimate the illumination field of a slide from its thumbnail.

    Parameters
    ----------
    thumb : ndarray of uint8, shape (H, W, 3)
        The whole slide at low resolution.
    background : tuple of 3 float
        The glass colour the optical density is measured against.
    settings : TissueSettings
        ``flat_field`` and ``flat_field_min_od``.
    small : ndarray of uint8, optional
        ``fit_image(thumb)`` when the caller has it already.

    Returns
    -------
    ShadingField or None
        None when the field is flat (range below ``flat_field_min_od``), when the neutral
        pixels do not cover the image well enough to fit it, when they scatter too much to
        be glass, or when the field explains less than ``MIN_FIT_R2`` of their variation.
    """
    if not settings.flat_field:
        return None
    small = fit_image(thumb) if small is None else small
    sh, sw = small.shape[:2]
    if sh < 16 or sw < 16:
        return None
    od = rgb_to_od(small, background, clip=False)  # glass brighter than ``background`` < 0
    mean, chroma = grey_and_chroma(od)
    cand = (chroma < NEUTRAL_OD) & (mean < MAX_GLASS_OD)
    if np.count_nonzero(cand) < 0.01 * sh * sw:
        return None
    points = _cell_points(od, mean, cand)
    if points is None:
        return None
    uv, y, weight = points
    basis = shading_basis(uv[:, 0], uv[:, 1])
    ym = y.mean(axis=1)
    keep = np.ones(len(ym), bool)
    scatter = 0.0
    for _ in range(8):
        sw_ = np.sqrt(weight[keep])[:, None]
        coef_m = np.linalg.lstsq(basis[keep] * sw_, ym[keep] * sw_[:, 0], rcond=None)[0]
        resid = ym - basis @ coef_m
        r = resid[keep]
        scatter = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 0.003)
        # cells of mixed pixels (small gaps in tissue) are darker than the glass: trim mostly
        # from above
        new = (resid < 2.5 * scatter) & (resid > -4.0 * scatter)
        if np.array_equal(new, keep) or np.count_nonzero(new) < 2 * basis.shape[1]:
            break
        keep = new
    if scatter > MAX_SCATTER_OD or not _covers(uv[keep]):
        return None
    # the field must explain the cells' variation (a lens's fall-off: R² 0.94-1.0 on synthetic
    # vignettes), not fit the scatter of small mixed gaps (R² 0.03-0.6 on evenly lit fields)
    wk, yk = weight[keep], ym[keep]
    total = float(np.sum(wk * (yk - np.average(yk, weights=wk)) ** 2))
    if total <= 0 or 1.0 - float(np.sum(wk * resid[keep] ** 2)) / total < MIN_FIT_R2:
        return None
    sw_ = np.sqrt(weight[keep])[:, None]
    coef = np.linalg.lstsq(basis[keep] * sw_, y[keep] * sw_, rcond=None)[0]  # (7, 3)
    # no extrapolation beyond what the glass showed: the field is clipped to the range of its
    # values at the cells it was fitted on
    seen = basis[keep] @ coef
    gv, gu = np.mgrid[-1:1:33j, -1:1:33j]
    grid = np.clip(shading_basis(gu, gv) @ coef, seen.min(axis=0), seen.max(axis=0))
    ref = int(np.argmin(grid.mean(axis=1)))
    lo, hi = seen.min(axis=0) - grid[ref], seen.max(axis=0) - grid[ref]
    coef = coef.copy()
    coef[0] -= grid[ref]
    grid_mean = (grid - grid[ref]).mean(axis=1)
    od_range = float(grid_mean.max() - grid_mean.min())
    if od_range < settings.flat_field_min_od:
        return None
    field_ = ShadingField(coef, od_range, int(weight[keep].sum()), lo, hi)
    # An even light makes the darkened glass as bright as the brightest glass, not brighter:
    # when the brightest pixels come out brighter than any seen, the "darker glass" it evened
    # out was pale tissue (a barely counterstained section beside its glass), not shading.
    before = np.percentile(small.reshape(-1, 3), BRIGHT_PERCENTILE, axis=0)
    after = np.percentile(field_.apply(small, (sh, sw)).reshape(-1, 3), BRIGHT_PERCENTILE,
                          axis=0)
    brightening = np.log10(np.maximum(after, 1.0) / np.maximum(before, 1.0)).max()
    if brightening > max(MAX_BRIGHTENING_OD, MAX_BRIGHTENING_SHARE * od_range):
        return None
    return field_


class CorrectedSlide(SlideBase):
    """A slide read through the corrections of its optics (every level, every region).

    Parameters
    ----------
    slide : Slide
        The slide as read from the file; it stays owned (and closed) by the caller.
    shading : ShadingField, optional
        Uneven illumination, divided out of every region.
    shifts : ndarray of float64, shape (2, 2), optional
        The red and blue planes' misregistration in level-0 pixels
        (:func:`fibroquant.registration.estimate_channel_shifts`), moved back on every level
        where it is still ``LEVEL_MIN_SHIFT_PX`` or more.
    """

    def __init__(
        self, slide: Slide, shading: ShadingField | None = None, shifts: np.ndarray | None = None
    ) -> None:
        self.inner = slide
        self.shading = shading
        self.shifts = None if shifts is None else np.asarray(shifts, np.float64)
        self.path = slide.path
        self.format = slide.format
        self.mpp = slide.mpp
        self.levels: tuple[Level, ...] = slide.levels
        for name in ("vendor", "compression", "tile_size", "mpp_source", "greyscale"):
            if hasattr(slide, name):
                setattr(self, name, getattr(slide, name))

    def level_shifts(self, level: int) -> np.ndarray | None:
        """The planes' shift in pixels of ``level``, or None where it is negligible."""
        if self.shifts is None:
            return None
        s = self.shifts / self.levels[level].downsample
        return s if np.abs(s).max() >= LEVEL_MIN_SHIFT_PX else None

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        shifts = self.level_shifts(level)
        if shifts is None:
            rgb = self.inner.read_region(level, y0, x0, y1 - y0, x1 - x0)
        else:
            # a margin around the region, from inside the image only (edge pixels repeated
            # beyond it, so the image frame gets no white fringe)
            m = margin_for(shifts)
            height, width = self.levels[level].shape
            ry0, rx0 = max(y0 - m, 0), max(x0 - m, 0)
            ry1, rx1 = min(y1 + m, height), min(x1 + m, width)
            big = self.inner.read_region(level, ry0, rx0, ry1 - ry0, rx1 - rx0)
            pad = ((ry0 - (y0 - m), (y1 + m) - ry1), (rx0 - (x0 - m), (x1 + m) - rx1), (0, 0))
            if any(p for pair in pad for p in pair):
                big = np.pad(big, pad, mode="edge")
            rgb = shift_channels(big, shifts, m)
        if self.shading is not None:
            rgb = self.shading.apply(rgb, self.levels[level].shape, y0, x0)
        return rgb

    def close(self) -> None:
        """Stop reading through this wrapper (the wrapped slide is closed by its owner)."""
        self._closed = True

    def drop_cache(self) -> None:
        """Forget the wrapped slide's decoded pixels."""
        self.inner.drop_cache()
