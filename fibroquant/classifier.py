"""A per-study pixel classifier of collagen, trained on people's annotations.

Features (:func:`pixel_features`, sized in µm, as ilastik's and QuPath's pixel classifiers):
the slide's stain concentrations and total optical density, each smoothed at several Gaussian
scales, the gradient magnitude and the two Hessian eigenvalues of the collagen stain and of the
total OD at each scale. The stains are those fitted to each slide by the analysis (glass
background and stain vectors, :func:`fibroquant.pipeline.analyze_slide`), so a classifier
trained on one staining batch reads another's concentrations, not its colours.

The model is scikit-learn's ``HistGradientBoostingClassifier`` (or a random forest). It is
saved as one file (:func:`save`): a JSON header line (format version, fibroquant and
scikit-learn versions, settings, feature list, stain calibration rule, training provenance
with annotation fingerprints), then the pickled model. :func:`load` refuses another format
version or another scikit-learn minor version with one line. Load only files you trust:
the model part is a pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fibroquant.errors import FibroquantError
from fibroquant.stains import StainMatrix, od_lut

__all__ = [
    "FORMAT_VERSION",
    "ClassifierError",
    "PixelClassifier",
    "feature_names",
    "load",
    "load_cached",
    "pixel_features",
    "save",
]

logger = logging.getLogger(__name__)

#: 2: scales of >= 2 px computed at reduced resolution (:func:`scale_levels`), 20 rounds.
FORMAT_VERSION = 2
_MAGIC = b"fibroquant-classifier"
#: How a slide's stains are calibrated before its features are computed (stored in the file).
STAIN_RULE = ("per slide, as analyze: glass background and stain vectors fitted to the slide "
              "(fibroquant.pipeline.analyze_slide, the Settings stored here)")
DEFAULT_SCALES_UM = (1.0, 2.0, 4.0)


class ClassifierError(FibroquantError, ValueError):
    """A classifier file that cannot be used, or training data that cannot train one."""


def feature_names(stain_names: Sequence[str], scales_um: Sequence[float]) -> list[str]:
    """Names of the feature columns of :func:`pixel_features`, in order."""
    planes = [*stain_names, "od"]
    names = [f"{p}" for p in planes]
    for s in scales_um:
        names += [f"{p}_gauss_{s:g}um" for p in planes]
        for p in (stain_names[0], "od"):
            names += [f"{p}_gradient_{s:g}um", f"{p}_hessian_max_{s:g}um",
                      f"{p}_hessian_min_{s:g}um"]
    return names


def halo_um(scales_um: Sequence[float]) -> float:
    """Context a pixel's features read around it, µm (4 SD of the largest scale + 1 px)."""
    return 4.0 * max(scales_um)


def hessian_eigenvalues(smoothed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Larger and smaller eigenvalue of the Hessian of an already smoothed float32 image
    (second derivatives as central differences of central differences, reflected borders).

    Same as ``skimage.feature.hessian_matrix_eigvals(hessian_matrix(img, sigma,
    use_gaussian_derivatives=False))`` on the image ``smoothed`` came from (up to the border
    mode of the smoothing).
    """
    img = np.ascontiguousarray(smoothed, np.float32)
    grad, hi, lo = (np.empty_like(img) for _ in range(3))
    _structure(img, np.float32(1.0), grad, hi, lo)
    return hi, lo


def _structure_py(img, step, grad, hi, lo):  # pragma: no cover - compiled below
    """Gradient magnitude and the Hessian's two eigenvalues of a float32 image per unit of
    ``step`` (the grid's µm per pixel), into ``grad``, ``hi`` and ``lo``, in one pass.

    First derivatives are central differences (``0.5 * (p[i + 1] - p[i - 1])``, as
    ``numpy.gradient``); second ones, central differences of the first (``drr`` and ``drc``
    of ``dr``, ``dcc`` of ``dc``); every difference reflects the border (``p[-1] = p[0]``,
    OpenCV's ``BORDER_REFLECT``). All in float32.
    """
    h, w = img.shape
    half = np.float32(0.5)
    quarter = np.float32(0.25)
    inv1 = np.float32(1.0) / step
    inv2 = np.float32(1.0) / (step * step)
    dr = np.empty((h, w), np.float32)
    dc = np.empty((h, w), np.float32)
    for r in range(h):
        up, mid, down = img[max(r - 1, 0)], img[r], img[min(r + 1, h - 1)]
        dr_r, dc_r = dr[r], dc[r]
        for c in range(w):
            dr_r[c] = half * (down[c] - up[c])
        for c in range(1, w - 1):
            dc_r[c] = half * (mid[c + 1] - mid[c - 1])
        dc_r[0] = half * (mid[min(1, w - 1)] - mid[0])
        dc_r[w - 1] = half * (mid[w - 1] - mid[max(w - 2, 0)])
    for r in range(h):
        a, b = dr[r], dc[r]
        up, down = dr[max(r - 1, 0)], dr[min(r + 1, h - 1)]
        g_r, hi_r, lo_r = grad[r], hi[r], lo[r]
        for c in range(w):
            cl = c - 1 if c > 0 else 0
            cr = c + 1 if c < w - 1 else w - 1
            drr = half * (down[c] - up[c])
            drc = half * (a[cr] - a[cl])
            dcc = half * (b[cr] - b[cl])
            half_tr = half * (drr + dcc)
            diff = drr - dcc
            root = np.sqrt(quarter * diff * diff + drc * drc)
            g_r[c] = np.sqrt(a[c] * a[c] + b[c] * b[c]) * inv1
            hi_r[c] = (half_tr + root) * inv2
            lo_r[c] = (half_tr - root) * inv2


#: Smallest Gaussian SD, in pixels of a downsampled plane, at which a scale is computed at
#: reduced resolution (see :func:`scale_levels`).
MIN_SIGMA_PX = 1.0
#: Coarsest downsampling of a scale's planes.
MAX_LEVEL = 8


def scale_levels(scales_um: Sequence[float], mpp: float,
                 min_sigma_px: float = MIN_SIGMA_PX) -> list[int]:
    """Downsampling factor of each scale's planes: the largest power of 2 (at most
    :data:`MAX_LEVEL`) that leaves the Gaussian an SD of at least ``min_sigma_px`` pixels.

    A plane smoothed at ``sigma`` holds nothing finer than ``sigma``: computed on the 2^k-fold
    block mean and upsampled bilinearly, it costs 4^k times less (as ilastik's pipelines).
    """
    levels = []
    for s in scales_um:
        sigma_px, d = s / mpp, 1
        while d < MAX_LEVEL and sigma_px / (2 * d) >= min_sigma_px:
            d *= 2
        levels.append(d)
    return levels


def _blur(plane: np.ndarray, sigma_px: float, d: int, *, dst: np.ndarray) -> None:
    """Gaussian of SD ``sigma_px`` (full-resolution pixels) of a plane already reduced by
    ``d`` (the block mean's own spread, (d² - 1) / 12 px², is taken off), into ``dst``."""
    var = sigma_px * sigma_px - (d * d - 1) / 12.0
    sigma = math.sqrt(max(var, 0.25)) / d
    cv2.GaussianBlur(plane, (0, 0), sigma, dst=dst, borderType=cv2.BORDER_REFLECT)


def _upsample(low: np.ndarray, d: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (OpenCV's, pixel centres aligned) of a plane reduced ``d``-fold,
    cropped to ``shape``."""
    if d == 1:
        return low
    h, w = shape
    up = cv2.resize(low, (low.shape[1] * d, low.shape[0] * d), interpolation=cv2.INTER_LINEAR)
    return up[:h, :w]


@dataclass(frozen=True)
class FeaturePlanes:
    """The feature planes of an image, each at the resolution it is computed at.

    Attributes
    ----------
    buffer : ndarray of float32, (N,)
        All planes, one after the other, row-major.
    offset, height, width, factor : ndarray of int64, (F,)
        Where each feature's plane starts in ``buffer``, its size, and how many image
        pixels one of its pixels spans (1, 2, 4 or 8; reduced planes are upsampled
        bilinearly, as :func:`pixel_features` does).
    shape : (int, int)
        The image's height and width.
    """

    buffer: np.ndarray
    offset: np.ndarray
    height: np.ndarray
    width: np.ndarray
    factor: np.ndarray
    shape: tuple[int, int]

    def plane(self, k: int) -> np.ndarray:
        """Feature ``k``'s plane at its own resolution (a view)."""
        n = int(self.height[k] * self.width[k])
        o = int(self.offset[k])
        return self.buffer[o : o + n].reshape(int(self.height[k]), int(self.width[k]))

    def full(self, k: int) -> np.ndarray:
        """Feature ``k``'s plane at the image's resolution."""
        return _upsample(self.plane(k), int(self.factor[k]), self.shape)

    @classmethod
    def of(cls, planes: np.ndarray) -> FeaturePlanes:
        """Full-resolution ``(F, H, W)`` planes as :class:`FeaturePlanes`."""
        f, h, w = planes.shape
        buf = np.ascontiguousarray(planes, np.float32).reshape(-1)
        ones = np.ones(f, np.int64)
        return cls(buf, np.arange(f, dtype=np.int64) * h * w, ones * h, ones * w, ones, (h, w))


def feature_planes(rgb: np.ndarray, stains: StainMatrix, mpp: float,
                   scales_um: Sequence[float] = DEFAULT_SCALES_UM, *,
                   min_sigma_px: float | None = MIN_SIGMA_PX,
                   reference_od: float = 1.0) -> FeaturePlanes:
    """The features of :func:`pixel_features`, each plane at the resolution it is computed
    at (what a tile's classification reads: nothing is upsampled but the pixels it asks)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        msg = f"rgb must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}"
        raise ValueError(msg)
    if not (math.isfinite(mpp) and mpp > 0):
        msg = f"mpp must be a positive number of µm per pixel, got {mpp=}"
        raise ValueError(msg)
    h, w = rgb.shape[:2]
    n = len(stains.names)
    levels = ([1] * len(scales_um) if min_sigma_px is None
              else scale_levels(scales_um, mpp, min_sigma_px))
    top = max(levels)
    hp, wp = h + (-h % top), w + (-w % top)
    sizes = [(h, w, 1)] * (n + 1)
    for d in levels:
        sizes += [(h, w, 1) if d == 1 else (hp // d, wp // d, d)] * (n + 7)
    counts = np.array([a * b for a, b, _ in sizes], np.int64)
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    planes = FeaturePlanes(np.empty(int(counts.sum()), np.float32), offset,
                           np.array([a for a, _, _ in sizes], np.int64),
                           np.array([b for _, b, _ in sizes], np.int64),
                           np.array([d for _, _, d in sizes], np.int64), (h, w))
    # optical density, then the stains' concentrations and the total OD (one matrix product
    # per pixel)
    m = np.vstack([stains.unmixing.T, np.ones((1, 3))]).astype(np.float32)
    m[0] /= np.float32(reference_od)  # the collagen stain relative to the slide's own level
    # the 2-fold block means of the planes in the same pass, on the image reflected up to a
    # multiple of ``top`` at the bottom and right (the reduced grids' anchor is the top left)
    src = rgb if (hp, wp) == (h, w) else cv2.copyMakeBorder(rgb, 0, hp - h, 0, wp - w,
                                                            cv2.BORDER_REFLECT)
    half = np.empty((n + 1, hp // 2, wp // 2) if top > 1 else (n + 1, 0, 0), np.float32)
    _base_planes(np.ascontiguousarray(src),
                 np.ascontiguousarray(od_lut(stains.background_rgb), np.float32), m,
                 planes.buffer[: (n + 1) * h * w].reshape(n + 1, h * w), h, w, half)
    reduced = _pyramid([planes.plane(i) for i in range(n + 1)], list(half), top)
    k = n + 1
    for s, d in zip(scales_um, levels, strict=True):
        sigma_px = s / mpp
        smooth = [planes.plane(k + i) for i in range(n + 1)]
        for i, p in enumerate(reduced[d]):
            _blur(p, sigma_px, d, dst=smooth[i])
        k += n + 1
        step = np.float32(mpp * d)  # µm per pixel of the reduced plane
        for p in (smooth[0], smooth[n]):
            # per µm, so that the same structure gives the same value at any resolution
            _structure(p, step, planes.plane(k), planes.plane(k + 1), planes.plane(k + 2))
            k += 3
    return planes


def _base_planes_py(rgb, lut, m, out, h, w, half):  # pragma: no cover - compiled below
    """Each pixel's optical density (``lut[channel, value]``) times ``m``: the stains'
    concentrations and the total OD, written plane by plane into ``out`` (``(K, h * w)``, the
    top-left ``h`` x ``w`` of ``rgb``), and their 2 x 2 block means into ``half`` (``(K,
    H / 2, W / 2)``, or ``(K, 0, 0)``: none), in one pass, row by row."""
    k = m.shape[0]
    do_half = half.shape[1] > 0
    n_rows = rgb.shape[0] if do_half else h
    n_cols = rgb.shape[1] if do_half else w
    half_w = half.shape[2]
    od = np.empty((3, n_cols), np.float32)
    row = np.empty(n_cols, np.float32)
    acc = np.zeros((k, half_w), np.float32)
    quarter = np.float32(0.25)
    for r in range(n_rows):
        for c in range(n_cols):
            od[0, c] = lut[0, rgb[r, c, 0]]
            od[1, c] = lut[1, rgb[r, c, 1]]
            od[2, c] = lut[2, rgb[r, c, 2]]
        for i in range(k):
            m0, m1, m2 = m[i, 0], m[i, 1], m[i, 2]
            for c in range(n_cols):
                row[c] = od[0, c] * m0 + od[1, c] * m1 + od[2, c] * m2
            if r < h:
                out[i, r * w : (r + 1) * w] = row[:w]
            if do_half:
                a = acc[i]
                for c2 in range(half_w):
                    a[c2] += row[2 * c2] + row[2 * c2 + 1]
                if (r & 1) == 1:
                    hr = half[i, r >> 1]
                    for c2 in range(half_w):
                        hr[c2] = a[c2] * quarter
                        a[c2] = 0


def pixel_features(rgb: np.ndarray, stains: StainMatrix, mpp: float,
                   scales_um: Sequence[float] = DEFAULT_SCALES_UM, *,
                   min_sigma_px: float | None = MIN_SIGMA_PX,
                   reference_od: float = 1.0) -> np.ndarray:
    """Per-pixel features of a uint8 RGB image, one plane per feature (float32, ``(F, H, W)``).

    Parameters
    ----------
    rgb : ndarray of uint8, (H, W, 3)
    stains : StainMatrix
        The slide's stains with its glass background (collagen stain first).
    mpp : float
        µm per pixel of ``rgb``.
    scales_um : sequence of float
        Gaussian SDs in µm.
    min_sigma_px : float or None
        Each scale is computed on the image reduced 2^k-fold (block means, grid anchored at
        the top-left pixel) as :func:`scale_levels` says, and upsampled bilinearly; None
        computes every scale at full resolution.

    Returns
    -------
    ndarray of float32, (F, H, W)
        Planes as :func:`feature_names` (planes, not pixels, are contiguous: the filters write
        them whole, and :func:`rows_at` gathers the pixels to classify). Pixels within
        :func:`halo_um` of the border see a reflected image: read a halo around tiles, whose
        origin is a multiple of :data:`MAX_LEVEL` pixels from the slide's for the same grid.
    """
    planes = feature_planes(rgb, stains, mpp, scales_um, min_sigma_px=min_sigma_px,
                            reference_od=reference_od)
    h, w = planes.shape
    out = np.empty((len(planes.offset), h, w), np.float32)
    for k in range(len(out)):
        out[k] = planes.full(k)
    return out


def _pyramid(planes: list[np.ndarray], half: list[np.ndarray], top: int
             ) -> dict[int, list[np.ndarray]]:
    """The planes reduced 2-, 4-, ... ``top``-fold by block means, from their 2-fold block
    means ``half`` (of the planes reflected up to a multiple of ``top``); level 1 is the
    planes themselves."""
    levels: dict[int, list[np.ndarray]] = {1: list(planes)}
    if top == 1:
        return levels
    cur, d = half, 2
    levels[2] = cur
    while d < top:
        d *= 2
        cur = [cv2.resize(p, (p.shape[1] // 2, p.shape[0] // 2), interpolation=cv2.INTER_AREA)
               for p in cur]
        levels[d] = cur
    return levels


def rows_at(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Feature rows ``(N, F)`` float32 of the pixels of ``mask`` from ``(F, H, W)`` planes."""
    idx = np.flatnonzero(mask.ravel())
    flat = features.reshape(features.shape[0], -1)
    return np.ascontiguousarray(np.take(flat, idx, axis=1).T)


class CompiledEnsemble:
    """A fitted binary ``HistGradientBoostingClassifier`` as flat node arrays, evaluated by a
    compiled loop on feature planes (no gathered copy of the rows, no Python per tree).

    Gives the model's own raw score (``baseline + sum of leaf values``; collagen when >= 0,
    i.e. ``predict_proba >= 0.5``): a pixel goes left when its feature ``<=`` the node's
    threshold, as scikit-learn's ``_predict_from_raw_data`` (features are never NaN here).
    """

    def __init__(self, model: Any, exit_margins: Sequence[float] | None = None,
                 exit_every: int | None = None) -> None:
        trees = [preds[0].nodes for preds in model._predictors]
        sizes = np.array([len(t) for t in trees], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        nodes = np.concatenate(trees)
        if nodes["is_categorical"].any():
            msg = "categorical splits are not supported"
            raise ValueError(msg)
        self.feature = nodes["feature_idx"].astype(np.int64)
        self.threshold = nodes["num_threshold"].astype(np.float64)
        self.left = nodes["left"].astype(np.int64)
        self.right = nodes["right"].astype(np.int64)
        self.is_leaf = nodes["is_leaf"].astype(np.bool_)
        self.value = nodes["value"].astype(np.float64)
        self.baseline = float(np.ravel(model._baseline_prediction)[0])
        # the most the trees from t on can still add or take away: a pixel is decided as soon
        # as its running score is further from 0 than that
        most = np.array([np.abs(t["value"][t["is_leaf"].astype(bool)]).max() for t in trees])
        self.remaining = np.concatenate([np.cumsum(most[::-1])[::-1], [0.0]]).astype(np.float64)
        # the walk's exit bounds: the exact ones, or the (smaller) trained margins
        # (:func:`exit_margins`), checked every ``exit_every`` trees
        self.exit_every = int(exit_every or EXIT_EVERY)
        self.exit_margins = [float(m) for m in exit_margins or []]
        self.bound = self.remaining.copy()
        for k, m in enumerate(self.exit_margins):
            t = self.exit_every * (k + 1)
            if t < len(trees):
                self.bound[t] = min(self.bound[t], m)
        self._perfect(trees)

    def _perfect(self, trees: list[np.ndarray]) -> None:
        """Every tree as a perfect binary tree of the ensemble's depth (a leaf above it split
        on itself, threshold +inf: always left), so pixels walk it without branches."""
        depth = 0
        for t in trees:
            d = np.zeros(len(t), np.int64)
            for k in range(len(t)):  # children come after their parent in sklearn's layout
                if not t["is_leaf"][k]:
                    d[t["left"][k]] = d[t["right"][k]] = d[k] + 1
            depth = max(depth, int(d.max()))
        n_inner, n_leaf = 2**depth - 1, 2**depth
        feat = np.zeros((len(trees), max(n_inner, 1)), np.int64)
        thr = np.full((len(trees), max(n_inner, 1)), np.inf, np.float64)
        leaf = np.zeros((len(trees), n_leaf), np.float64)
        for ti, t in enumerate(trees):
            stack = [(0, 0, 0)]  # (sklearn node, perfect position, depth)
            while stack:
                node, pos, dd = stack.pop()
                if dd == depth:
                    leaf[ti, pos - n_inner] = t["value"][node]
                    continue
                if t["is_leaf"][node]:
                    stack += [(node, 2 * pos + 1, dd + 1), (node, 2 * pos + 2, dd + 1)]
                    continue
                feat[ti, pos] = t["feature_idx"][node]
                thr[ti, pos] = t["num_threshold"][node]
                stack += [(int(t["left"][node]), 2 * pos + 1, dd + 1),
                          (int(t["right"][node]), 2 * pos + 2, dd + 1)]
        # float32 features: ``x <= t`` for a float64 ``t`` is ``x <= t32`` for the largest
        # float32 ``t32 <= t``, so the walk compares in float32 with the same outcome
        thr32 = thr.astype(np.float32)
        over = thr32.astype(np.float64) > thr
        thr32[over] = np.nextafter(thr32[over], np.float32(-np.inf))
        self.depth, self.p_feature, self.p_threshold, self.p_leaf = (
            depth, feat.astype(np.intp), thr32, leaf)
        # the features first read by each group of exit_every trees (the walk gathers a
        # group's features only for the pixels still undecided when it starts); feature 0 is
        # in the first group (the padding nodes read it, and always go left)
        seen: set[int] = {0}
        groups: list[list[int]] = []
        every = self.exit_every
        for g in range(0, len(trees), every):
            used = {int(v) for v in feat[g : g + every].ravel()} | ({0} if g == 0 else set())
            groups.append(sorted(used - (seen if g else set())))
            seen |= used
        self.group_start = np.concatenate(
            [[0], np.cumsum([len(gr) for gr in groups])]).astype(np.int64)
        self.group_feature = np.array([f for gr in groups for f in gr], np.int64)

    def raw(self, planes: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Raw scores (float64) of the pixels ``index`` (flat) of ``(F, H, W)`` planes."""
        flat = planes.reshape(planes.shape[0], -1)
        return _ensemble_raw(flat, index.astype(np.int64), self.offsets, self.feature,
                             self.threshold, self.left, self.right, self.is_leaf, self.value,
                             self.baseline)

    def decide(self, planes: np.ndarray | FeaturePlanes, index: np.ndarray) -> np.ndarray:
        """Collagen (raw score >= 0) of the pixels ``index`` (flat, row-major in the image)
        of ``(F, H, W)`` planes or of :class:`FeaturePlanes`.

        Walks the perfect trees branch-free, 64 pixels at a time (their features copied
        together, reduced planes read bilinearly, each group of trees' features only for the
        pixels still undecided), tree by tree; every ``exit_every`` trees, the pixels
        whose score is past the exit bound are decided. With the exact bound (no exit
        margins) these are the decisions of :meth:`raw` on the upsampled planes, up to float
        rounding of the bilinear reads; with trained margins (:func:`exit_margins`), all but
        a few in 10⁴ of them.
        """
        fp = planes if isinstance(planes, FeaturePlanes) else FeaturePlanes.of(planes)
        return _perfect_decide(fp.buffer, fp.offset, fp.height, fp.width, fp.factor,
                               fp.shape[1], index.astype(np.int64), self.p_feature,
                               self.p_threshold, self.p_leaf, self.depth, self.baseline,
                               self.bound, self.group_start, self.group_feature,
                               self.exit_every)

    def partial_scores(self, rows: np.ndarray) -> np.ndarray:
        """Raw scores of feature rows ``(N, F)`` after 0, ``exit_every``, 2 ``exit_every``,
        ... trees and after all of them: float64, ``(K, N)``."""
        flat = np.ascontiguousarray(np.asarray(rows, np.float32).T)
        return _ensemble_partial(flat, self.offsets, self.feature, self.threshold, self.left,
                                 self.right, self.is_leaf, self.value, self.baseline,
                                 self.exit_every)


#: Trees walked between two exit checks (and per group of gathered features): on the
#: synthetic Masson slide of docs/decisions.md#classifier-exit, 94 % of the pixels are decided
#: after 2 trees, and the walk reads 15 features and 2.5 trees per pixel (checking every 4
#: trees: 20 and 4.4).
EXIT_EVERY = 2
#: Share of the gate-passing training pixels a trained exit margin may decide otherwise than
#: the whole ensemble, per check (:func:`exit_margins`; on a synthetic Masson slide, 8e-5 of
#: the pixels the walk is asked about end otherwise, and the walk takes a fifth of the time:
#: docs/decisions.md#classifier-exit).
EXIT_TOLERANCE = 5e-4
#: Smallest exit margin (log-odds: a probability of 0.12 or 0.88).
MIN_EXIT_MARGIN = 2.0


def exit_margins(partial: np.ndarray, tolerance: float = EXIT_TOLERANCE,
                 least: float = MIN_EXIT_MARGIN) -> list[float]:
    """Exit margins of an ensemble from its partial scores on training pixels
    (:meth:`CompiledEnsemble.partial_scores`): after each check, the least margin (at least
    ``least``) beyond which at most ``tolerance`` of the pixels end on the other side of 0.

    A pixel whose score after some trees is that far from 0 is decided there (a cascade, as
    in Viola and Jones' detector): most pixels of a section are far from the decision
    boundary after a few trees, so the walk does a fraction of its work.
    """
    final = partial[-1] >= 0
    n = partial.shape[1]
    allowed = math.floor(tolerance * n)
    margins = []
    for s in partial[1:-1]:
        flipped = np.sort(np.abs(s[(s >= 0) != final]))[::-1]
        m = float(flipped[allowed]) if flipped.size > allowed else 0.0
        margins.append(max(m, least))
    return margins

def _bilinear_axis_py(p, inv, size):  # pragma: no cover - compiled below
    """Full-resolution coordinate ``p`` on a grid reduced by ``1 / inv``: the two samples
    and the weight of the second, clamped at the edges (``cv2.resize``'s bilinear rule)."""
    f = (p + 0.5) * inv - 0.5
    s0 = int(np.floor(f))
    a = f - s0
    if s0 < 0:
        s0, a = 0, 0.0
    if s0 >= size - 1:
        s0, a = size - 1, 0.0
    return s0, min(s0 + 1, size - 1), a


def _perfect_decide_py(buf, offset, height, width, factor, img_w, index, feat, thr, leaf,
                       depth, baseline, bound, group_start, group_feature, every
                       ):  # pragma: no cover - compiled below
    n = len(index)
    n_feat = len(offset)
    n_trees = feat.shape[0]
    n_inner = 2**depth - 1
    out = np.empty(n, np.bool_)
    block = 64
    acc = np.empty(block, np.float64)
    active = np.empty(block, np.int64)
    node = np.empty(block, np.int64)
    # the block's features pixel by pixel (8.7 kB: the walks read the L1 cache, not 34
    # planes of megabytes); a reduced plane is read bilinearly, as OpenCV upsamples it
    rows = np.zeros((block, n_feat), np.float32)
    pr = np.empty(block, np.int64)
    pc = np.empty(block, np.int64)
    # every pixel's two samples and weight on each reduced grid (level: log2 of the factor)
    x0 = np.empty((4, block), np.int64)
    x1 = np.empty((4, block), np.int64)
    y0 = np.empty((4, block), np.int64)
    y1 = np.empty((4, block), np.int64)
    ax = np.empty((4, block), np.float32)
    ay = np.empty((4, block), np.float32)
    level = np.zeros(n_feat, np.int64)
    wanted = np.zeros(4, np.bool_)
    lw = np.zeros(4, np.int64)  # a reduced plane's width and height, by level
    lh = np.zeros(4, np.int64)
    for f in range(n_feat):
        d = factor[f]
        while (1 << level[f]) < d:
            level[f] += 1
        wanted[level[f]] = True
        lw[level[f]] = width[f]
        lh[level[f]] = height[f]
    for b in range(0, n, block):
        nb = min(block, n - b)
        for j in range(nb):
            pr[j] = index[b + j] // img_w
            pc[j] = index[b + j] - pr[j] * img_w
        for lv in range(1, 4):
            if not wanted[lv]:
                continue
            inv = 1.0 / (1 << lv)
            for j in range(nb):
                x0[lv, j], x1[lv, j], ax[lv, j] = _bilinear_axis(pc[j], inv, lw[lv])
                y0[lv, j], y1[lv, j], ay[lv, j] = _bilinear_axis(pr[j], inv, lh[lv])
        for j in range(nb):
            acc[j] = baseline
            active[j] = j
        n_active = nb
        for t in range(n_trees):
            if t % every == 0:  # decide the pixels past the exit bound; gather the next group's
                m = 0  # features for the others
                for a in range(n_active):
                    j = active[a]
                    if abs(acc[j]) <= bound[t]:
                        active[m] = j
                        m += 1
                n_active = m
                if n_active == 0:
                    break
                g = t // every
                for q in range(group_start[g], group_start[g + 1]):
                    f = group_feature[q]
                    base = offset[f]
                    wl = width[f]
                    lv = level[f]
                    if lv == 0:
                        for a in range(n_active):
                            j = active[a]
                            rows[j, f] = buf[base + pr[j] * wl + pc[j]]
                        continue
                    for a in range(n_active):
                        j = active[a]
                        r0 = base + y0[lv, j] * wl
                        r1 = base + y1[lv, j] * wl
                        u = ax[lv, j]
                        v = ay[lv, j]
                        top = buf[r0 + x0[lv, j]] * (np.float32(1) - u) + buf[r0 + x1[lv, j]] * u
                        bot = buf[r1 + x0[lv, j]] * (np.float32(1) - u) + buf[r1 + x1[lv, j]] * u
                        rows[j, f] = top * (np.float32(1) - v) + bot * v
            # level by level over the block's pixels: their walks are independent, so the
            # CPU overlaps them (a pixel's own walk is a chain of dependent loads)
            ft, tt = feat[t], thr[t]
            for a in range(n_active):
                node[a] = 0
            for _ in range(depth):
                for a in range(n_active):
                    i = node[a]
                    node[a] = 2 * i + 1 + (rows[active[a], ft[i]] > tt[i])
            for a in range(n_active):
                acc[active[a]] += leaf[t, node[a] - n_inner]
        for j in range(nb):
            out[b + j] = acc[j] >= 0.0
    return out


def _ensemble_partial_py(flat, offsets, feature, threshold, left, right, is_leaf, value,
                         baseline, every):  # pragma: no cover - compiled below
    n_trees = len(offsets)
    n_checks = (n_trees + every - 1) // every
    out = np.empty((n_checks + 1, flat.shape[1]), np.float64)
    for p in range(flat.shape[1]):
        acc = baseline
        for t in range(n_trees):
            if t % every == 0:
                out[t // every, p] = acc
            acc += _leaf_value(flat, p, offsets[t], feature, threshold, left, right, is_leaf,
                               value)
        out[n_checks, p] = acc
    return out


def _ensemble_raw_py(flat, index, offsets, feature, threshold, left, right, is_leaf, value,
                     baseline):  # pragma: no cover - compiled below; the Python body is the spec
    out = np.empty(len(index), np.float64)
    for n in range(len(index)):
        p = index[n]
        acc = baseline
        for t in range(len(offsets)):
            acc += _leaf_value(flat, p, offsets[t], feature, threshold, left, right, is_leaf,
                               value)
        out[n] = acc
    return out


def _leaf_value_py(flat, p, base, feature, threshold, left, right, is_leaf, value
                   ):  # pragma: no cover - compiled below
    """The leaf value of pixel ``p`` (a column of ``flat``) in the tree whose nodes start at
    ``base`` (children are relative to it)."""
    node = 0
    while not is_leaf[base + node]:
        k = base + node
        node = left[k] if flat[feature[k], p] <= threshold[k] else right[k]
    return value[base + node]


def _compile(fn: Any) -> Any:
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return fn
    return numba.njit(nogil=True, cache=True)(fn)


_leaf_value = _compile(_leaf_value_py)
_ensemble_raw = _compile(_ensemble_raw_py)
_bilinear_axis = _compile(_bilinear_axis_py)
_perfect_decide = _compile(_perfect_decide_py)
_ensemble_partial = _compile(_ensemble_partial_py)


@dataclass
class PixelClassifier:
    """A trained collagen pixel classifier with its header.

    Attributes
    ----------
    model : sklearn classifier
        Predicts class 1 (collagen) against 0 from :func:`pixel_features` columns.
    header : dict
        What :func:`save` writes as JSON (versions, settings, features, provenance).
    gate_od : float
        Pixels whose collagen stain concentration smoothed at the smallest scale is below this
        are not collagen without asking the model (0.2 % of the training collagen pixels were
        below it); ``-inf`` disables it.
    """

    model: Any
    header: dict[str, Any]
    gate_od: float = -math.inf
    sha256: str = ""
    reference_od: float = 1.0
    _compiled: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._compiled is None and type(self.model).__name__ == \
                "HistGradientBoostingClassifier":
            try:
                settings = self.header.get("settings", {})
                self._compiled = CompiledEnsemble(self.model, settings.get("exit_margins"),
                                                  settings.get("exit_every"))
            except (AttributeError, KeyError, ValueError, IndexError):  # another layout
                logger.debug("classifier: scikit-learn's own predict is used")

    @property
    def scales_um(self) -> tuple[float, ...]:
        """Gaussian scales of the features, µm."""
        return tuple(self.header["settings"]["scales_um"])

    @property
    def min_sigma_px(self) -> float | None:
        """The features' reduced-resolution rule (:func:`pixel_features`)."""
        value = self.header["settings"].get("min_sigma_px", MIN_SIGMA_PX)
        return None if value is None else float(value)

    def for_slide(self, collagen_level_od: float) -> PixelClassifier:
        """This classifier for one slide: its collagen-stain features relative to the slide's
        collagen level (``slides.csv``'s ``collagen_level_od``), as it was trained, so that a
        darker or paler staining batch reads the same; itself when trained on raw features."""
        settings = self.header.get("settings", {})
        if settings.get("reference") != REFERENCE:
            return self
        ref = slide_reference_od(collagen_level_od,
                                 float(settings.get("reference_fallback_od", 1.0)))
        return replace(self, reference_od=ref, _compiled=self._compiled)

    @property
    def coarse_to_fine(self) -> bool:
        """Whether tiles are decided coarse to fine: the model decides every other pixel of
        every other row first, and the pixels between them only where those disagree (about a
        third of the model's work on synthetic sections; docs/decisions.md)."""
        return bool(self.header["settings"].get("coarse_to_fine", True))

    def halo_px(self, mpp: float) -> int:
        """Pixels of context a tile needs around it at ``mpp`` µm/px (a multiple of
        :data:`MAX_LEVEL`: tiles at multiples of it see the reduced planes' grid)."""
        return -(-(math.ceil(halo_um(self.scales_um) / mpp) + 1) // MAX_LEVEL) * MAX_LEVEL

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of collagen of feature rows ``(N, F)`` (float64)."""
        if len(features) == 0:
            return np.zeros(0)
        return self.model.predict_proba(features)[:, 1]

    def predict_tile(self, rgb_with_halo: np.ndarray, halo_px: int, stains: StainMatrix, *,
                     mpp: float, tissue: np.ndarray | None = None) -> np.ndarray:
        """Collagen mask of a tile's core from the tile read with a halo around it.

        Parameters
        ----------
        rgb_with_halo : ndarray of uint8, (h + 2 halo, w + 2 halo, 3)
        halo_px : int
            Halo read on every side (at least :meth:`halo_px` for exact features; less is
            accepted, the border then sees a reflected image).
        stains : StainMatrix
            The slide's fitted stains with its background.
        mpp : float
            µm per pixel of the tile.
        tissue : ndarray of bool, (h, w), optional
            Only these core pixels are classified (the others are False); the features are
            computed on the box around them and its halo only (its corner on the
            :data:`MAX_LEVEL` grid of the tile's, so the reduced planes see the same grid).

        Returns
        -------
        ndarray of bool, (h, w)
        """
        h = rgb_with_halo.shape[0] - 2 * halo_px
        w = rgb_with_halo.shape[1] - 2 * halo_px
        if tissue is not None:
            rows = np.flatnonzero(tissue.any(axis=1))
            if rows.size == 0:
                return np.zeros((h, w), bool)
            cols = np.flatnonzero(tissue.any(axis=0))
            y0 = int(rows[0]) // MAX_LEVEL * MAX_LEVEL
            x0 = int(cols[0]) // MAX_LEVEL * MAX_LEVEL
            y1, x1 = int(rows[-1]) + 1, int(cols[-1]) + 1
            if (y1 - y0) * (x1 - x0) < 0.9 * h * w:  # worth a smaller feature box
                out = np.zeros((h, w), bool)
                out[y0:y1, x0:x1] = self.predict_tile(
                    rgb_with_halo[y0 : y1 + 2 * halo_px, x0 : x1 + 2 * halo_px], halo_px,
                    stains, mpp=mpp, tissue=tissue[y0:y1, x0:x1])
                return out
        planes = feature_planes(rgb_with_halo, stains, mpp, self.scales_um,
                                min_sigma_px=self.min_sigma_px,
                                reference_od=self.reference_od)
        big_w = rgb_with_halo.shape[1]
        gate_col = len(stains.names) + 1  # the collagen stain at the smallest scale
        todo = planes.full(gate_col)[halo_px : halo_px + h, halo_px : halo_px + w] >= self.gate_od
        if tissue is not None:
            todo &= tissue
        out = np.zeros((h, w), bool)
        if not todo.any():
            return out

        def model(idx: np.ndarray) -> np.ndarray:  # decisions of core pixels (flat indices)
            rows, cols = np.divmod(idx, w)
            at = (rows + halo_px) * big_w + cols + halo_px
            if self._compiled is not None:
                return self._compiled.decide(planes, at)
            x = np.stack([planes.full(k).ravel()[at] for k in range(len(planes.offset))], 1)
            return self.predict_proba(x) >= 0.5

        if not self.coarse_to_fine:
            idx = np.flatnonzero(todo.ravel())
            out.ravel()[idx] = model(idx)
            return out
        grid = np.zeros_like(todo)
        grid[::2, ::2] = todo[::2, ::2]
        idx = np.flatnonzero(grid.ravel())
        out.ravel()[idx] = model(idx)
        need = _from_coarse(todo, out)
        out.ravel()[need] = model(need)
        return out


def _from_coarse_py(todo, out):  # pragma: no cover - compiled below
    """Decide the pixels of ``todo`` off the even rows and columns from the even-grid pixels
    around them (``out``, already decided there; pixels outside ``todo`` count as not
    collagen) where those agree, in place; return the flat indices of the others."""
    h, w = todo.shape
    need = np.empty(h * w, np.int64)
    n = 0
    for r in range(h):
        r0 = r - (r & 1)
        r1 = r0 + 2 if (r & 1) and r0 + 2 < h else r0
        for c in range(w):
            if not todo[r, c] or ((r & 1) == 0 and (c & 1) == 0):
                continue
            c0 = c - (c & 1)
            c1 = c0 + 2 if (c & 1) and c0 + 2 < w else c0
            v = out[r0, c0]
            if out[r0, c1] == v and out[r1, c0] == v and out[r1, c1] == v:
                out[r, c] = v
            else:
                need[n] = r * w + c
                n += 1
    return need[:n]


_from_coarse = _compile(_from_coarse_py)
_structure = _compile(_structure_py)
_base_planes = _compile(_base_planes_py)


# --- file format ---------------------------------------------------------------------------

def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def save(clf: PixelClassifier, path: str | Path) -> str:
    """Write a classifier as one file (JSON header line + pickle), atomically.

    Returns
    -------
    str
        SHA-256 (first 16 hex digits) of the file, as it joins the settings hash.
    """
    from fibroquant import __version__

    path = Path(path)
    header = dict(clf.header)
    rule = STAIN_RULE
    if header.get("settings", {}).get("reference") == REFERENCE:
        rule += (f"; the collagen stain's features divided by the slide's {REFERENCE} (the "
                 "training slides' median when it has none)")
    header.update(format="fibroquant-classifier", format_version=FORMAT_VERSION,
                  fibroquant_version=__version__, sklearn_version=_sklearn_version(),
                  gate_od=clf.gate_od, stain_calibration=rule)
    buf = io.BytesIO()
    pickle.dump(clf.model, buf, protocol=pickle.HIGHEST_PROTOCOL)
    data = _MAGIC + b" " + json.dumps(header, sort_keys=True).encode() + b"\n" + buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()[:16]


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a classifier file (no model is unpickled).

    Raises
    ------
    ClassifierError
        Not a fibroquant classifier file.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            line = fh.readline(1 << 20)
    except OSError as exc:
        msg = f"{path}: cannot read classifier ({exc.strerror or exc})"
        raise ClassifierError(msg) from None
    if not line.startswith(_MAGIC + b" "):
        msg = f"{path}: not a fibroquant classifier file"
        raise ClassifierError(msg)
    try:
        return dict(json.loads(line[len(_MAGIC) + 1 :]))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
        msg = f"{path}: damaged classifier header"
        raise ClassifierError(msg) from None


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a classifier file's bytes (once per file version)."""
    try:
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        return _HASHES[key]
    except OSError as exc:
        msg = f"{path}: cannot read classifier ({exc.strerror or exc})"
        raise ClassifierError(msg) from None


def check_compatible(path: str | Path, stain_names: Sequence[str]) -> dict[str, Any]:
    """The header of a classifier file that this fibroquant can run on slides of these stains.

    Raises
    ------
    ClassifierError
        Not a classifier, another format or scikit-learn version, or trained on other stains.
    """
    path = Path(path)
    header = read_header(path)
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        msg = (f"{path}: classifier format version {version} is not supported by this "
               f"fibroquant (reads version {FORMAT_VERSION}); retrain it with fibroquant train")
        raise ClassifierError(msg)
    made = str(header.get("sklearn_version", "?"))
    if _minor(made) != _minor(_sklearn_version()):
        msg = (f"{path}: made with scikit-learn {made}, this is {_sklearn_version()}; "
               "retrain it with fibroquant train")
        raise ClassifierError(msg)
    trained = header.get("stain_names")
    if trained is not None and list(trained) != list(stain_names):
        msg = (f"{path}: trained on {'/'.join(trained)} slides, the analysis is "
               f"{'/'.join(stain_names)} (set --stain)")
        raise ClassifierError(msg)
    return header


def load(path: str | Path) -> PixelClassifier:
    """Read a classifier file, refusing another format or scikit-learn version.

    Raises
    ------
    ClassifierError
        Not a classifier, another format version, made with another scikit-learn minor
        version (retrain it), or a damaged model.
    """
    path = Path(path)
    header = read_header(path)
    check_compatible(path, header.get("stain_names") or [])
    data = path.read_bytes()
    body = data[data.index(b"\n") + 1 :]
    try:
        model = pickle.loads(body)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a damaged file
        msg = f"{path}: damaged classifier model ({type(exc).__name__})"
        raise ClassifierError(msg) from None
    return PixelClassifier(model, header, float(header.get("gate_od", -math.inf)),
                           hashlib.sha256(data).hexdigest()[:16])


_CACHE: dict[tuple[str, int, int], PixelClassifier] = {}
_CACHE_LOCK = threading.Lock()


def classifier_label(path: str | Path) -> str:
    """How ``slides.csv`` names a classifier file: ``NAME#SHA256-16`` (its file name and the
    first 16 hex digits of its SHA-256, as in the settings' ``classifier_sha256``)."""
    return f"{Path(path).name}#{file_hash(path)}"


def load_cached(path: str | Path) -> PixelClassifier:
    """:func:`load` once per process and file version (path, size, mtime)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        msg = f"{p}: cannot read classifier ({exc.strerror or exc})"
        raise ClassifierError(msg) from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load(p)
        return _CACHE[key]


# --- training ------------------------------------------------------------------------------

@dataclass
class TrainingImage:
    """Labelled pixels of one image, as feature rows.

    Attributes
    ----------
    stem : str
    features : ndarray of float32, (N, F)
        Training pixels (a random subset of the scored, labelled pixels).
    labels : ndarray of bool, (N,)
        Collagen (the people's majority).
    eval_features : ndarray of float32, (M, F)
        Another uniform random subset of the scored pixels, for held-out agreement.
    eval_labels : ndarray of bool, (M,)
    scored_px : int
        Scored pixels in the image (labelled and inside the tissue).
    reference_od : float
        The slide's collagen level (OD; NaN: none) its features are, or are to be, taken
        relative to (:func:`apply_references`).
    """

    stem: str
    features: np.ndarray
    labels: np.ndarray
    eval_features: np.ndarray
    eval_labels: np.ndarray
    scored_px: int
    provenance: dict[str, Any] = field(default_factory=dict)
    reference_od: float = math.nan


#: Which slide level the collagen stain's features are taken relative to (a column of
#: ``slides.csv``: the median collagen-stain concentration of the slide's collagen-dominated
#: pixels, from its threshold calibration).
REFERENCE = "collagen_level_od"


def slide_reference_od(level: float, fallback: float) -> float:
    """The collagen level a slide's features are divided by: its own, or ``fallback`` when it
    has none (a threshold method without levels, too few collagen pixels to calibrate)."""
    return float(level) if math.isfinite(level) and level > 0 else float(fallback)


def apply_references(images: Sequence[TrainingImage], stain_names: Sequence[str],
                     scales_um: Sequence[float] = DEFAULT_SCALES_UM) -> float:
    """Divide the collagen stain's feature columns of raw training images by each slide's
    collagen level, in place, as :func:`feature_planes` with ``reference_od`` does (they are
    linear in the stain's plane); slides without a level take the median of the others'.

    Returns
    -------
    float
        That median (1.0 when no slide has a level): the fallback stored with the classifier.
    """
    levels = [im.reference_od for im in images
              if math.isfinite(im.reference_od) and im.reference_od > 0]
    fallback = float(np.median(levels)) if levels else 1.0
    names = feature_names(stain_names, scales_um)
    cols = [i for i, nm in enumerate(names) if nm.split("_")[0] == stain_names[0]]
    for im in images:
        ref = np.float32(slide_reference_od(im.reference_od, fallback))
        for x in (im.features, im.eval_features):
            x[:, cols] /= ref
    return fallback


def _rng(rng: int | np.random.Generator | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_pixels(features: np.ndarray, labels: np.ndarray, scored: np.ndarray, *, stem: str,
                  max_train_px: int = 100_000, max_eval_px: int = 100_000,
                  rng: int | np.random.Generator | None = 0) -> TrainingImage:
    """Feature rows of a uniform random subset of the scored pixels of one image.

    Parameters
    ----------
    features : ndarray of float32, (F, H, W)
        :func:`pixel_features`.
    labels, scored : ndarray of bool, (H, W)
    """
    g = _rng(rng)
    idx = np.flatnonzero(scored.ravel())
    flat = features.reshape(features.shape[0], -1)
    lab = labels.ravel()
    train = g.choice(idx, size=min(max_train_px, idx.size), replace=False) if idx.size else idx
    ev = g.choice(idx, size=min(max_eval_px, idx.size), replace=False) if idx.size else idx
    return TrainingImage(stem, np.ascontiguousarray(flat[:, train].T), lab[train],
                         np.ascontiguousarray(flat[:, ev].T), lab[ev], int(idx.size))


def make_model(kind: str = "hgb", *, rng: int = 0) -> Any:
    """A scikit-learn classifier: ``"hgb"`` gradient boosting (default) or ``"rf"`` forest.

    Sized for speed at prediction (every tissue pixel of a study goes through it): 40
    boosting rounds of trees of at most 15 leaves and depth 5 (as accurate as 60 rounds at
    0.15 on the synthetic cohorts, docs/decisions.md), or 40 trees of depth 12.
    """
    if kind == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=15, max_depth=5,
                                              learning_rate=0.25, early_stopping=False,
                                              random_state=rng)
    if kind == "rf":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=40, max_depth=12, min_samples_leaf=5,
                                      n_jobs=1, random_state=rng)
    msg = f"model must be 'hgb' or 'rf', got {kind!r}"
    raise ValueError(msg)


def _gate(features: np.ndarray, labels: np.ndarray, gate_col: int) -> float:
    """Collagen-stain level below which (almost) no training collagen pixel lies."""
    pos = features[labels, gate_col]
    neg = features[~labels, gate_col]
    if pos.size < 200 or neg.size == 0:
        return -math.inf
    return float(np.quantile(pos, 0.002))


def training_problems(images: Sequence[TrainingImage], *, min_px: int = 1000,
                      min_images: int = 3) -> tuple[list[str], list[str]]:
    """Errors (training impossible) and warnings (training unreliable) of a training set."""
    errors: list[str] = []
    warns: list[str] = []
    pos = sum(int(im.labels.sum()) for im in images)
    neg = sum(int((~im.labels).sum()) for im in images)
    if not images:
        errors.append("no annotated image matched a slide")
        return errors, warns
    if pos == 0 or neg == 0:
        errors.append("one class is missing: no pixel labelled "
                      + ("collagen" if pos == 0 else "not collagen"))
        return errors, warns
    if len(images) < min_images:
        warns.append(f"only {len(images)} annotated image(s): too few to judge a classifier "
                     f"(leave-one-image-out needs >= {min_images})")
    if pos < min_px or neg < min_px:
        warns.append(f"few labelled pixels (collagen {pos}, not collagen {neg}; "
                     f"want >= {min_px} of each)")
    for im in images:
        if not im.labels.any() or im.labels.all():
            warns.append(f"{im.stem}: only "
                         + ("not-collagen" if not im.labels.any() else "collagen")
                         + " pixels labelled")
    return errors, warns


def fit(images: Sequence[TrainingImage], *, kind: str = "hgb", rng: int = 0,
        header: dict[str, Any] | None = None, gate_col: int | None = None) -> PixelClassifier:
    """Train a classifier on the labelled pixels of some images.

    Raises
    ------
    ClassifierError
        No images, or one class missing altogether.
    """
    errors, _ = training_problems(images)
    if errors:
        raise ClassifierError("cannot train: " + "; ".join(errors))
    x = np.concatenate([im.features for im in images])
    y = np.concatenate([im.labels for im in images]).astype(np.uint8)
    model = make_model(kind, rng=rng)
    model.fit(x, y)
    header = dict(header or {})
    settings = dict(header.get("settings", {}))
    settings.setdefault("scales_um", list(DEFAULT_SCALES_UM))
    settings.setdefault("min_sigma_px", MIN_SIGMA_PX)
    settings.setdefault("coarse_to_fine", True)
    settings["model"] = kind
    header["settings"] = settings
    gate = _gate(x, y.astype(bool), gate_col) if gate_col is not None else -math.inf
    if kind == "hgb":  # the walk's exit margins, from the pixels the walk will see
        asked = x if gate_col is None else x[x[:, gate_col] >= gate]
        settings["exit_margins"] = exit_margins(
            CompiledEnsemble(model).partial_scores(asked))
        settings["exit_every"] = EXIT_EVERY
    return PixelClassifier(model, header, gate)


def held_out_rows(clf: PixelClassifier, image: TrainingImage, gate_col: int) -> dict[str, Any]:
    """Agreement of a classifier with one image's labels, in :mod:`fibroquant.agreement`'s terms
    (estimated on the image's evaluation pixels)."""
    from fibroquant.agreement import PixelCounts

    x = image.eval_features
    pred = np.zeros(len(x), bool)
    todo = x[:, gate_col] >= clf.gate_od
    if todo.any():
        pred[todo] = clf.predict_proba(x[todo]) >= 0.5
    ref = image.eval_labels
    tp = int(np.count_nonzero(pred & ref))
    c = PixelCounts(tp, int(pred.sum()) - tp, int(ref.sum()) - tp, len(ref))
    return {"image": image.stem, "kind": "classifier_vs_majority", "reference": "majority",
            "dice": c.dice, "iou": c.iou, "test_cpa_percent": c.test_percent,
            "reference_cpa_percent": c.reference_percent,
            "error_pp": c.test_percent - c.reference_percent, "scored_px": image.scored_px,
            "evaluated_px": len(ref)}


def cross_validate(images: Sequence[TrainingImage], *, kind: str = "hgb", rng: int = 0,
                   gate_col: int | None = None) -> list[dict[str, Any]]:
    """Leave-one-image-out agreement: each image scored by a classifier trained on the others.

    Images whose training set would miss a class are left out (no row).
    """
    rows = []
    for i, held in enumerate(images):
        rest = [im for j, im in enumerate(images) if j != i]
        if training_problems(rest)[0]:
            continue
        clf = fit(rest, kind=kind, rng=rng, gate_col=gate_col)
        rows.append(held_out_rows(clf, held, gate_col if gate_col is not None else 0))
    return rows


# --- training data from slides and annotation files (I/O) ----------------------------------

def stains_of_record(record: dict[str, Any]) -> StainMatrix:
    """The stains a slide was measured with, from its ``slides.csv`` record (collagen first)."""
    vectors = json.loads(record["stain_vectors"])
    background = tuple(json.loads(record["background_rgb"]))
    return StainMatrix(tuple(vectors), np.array(list(vectors.values())), background)


def _open(path: Path, mpp: float | None) -> Any:
    from fibroquant.slides import open_slide

    sl = open_slide(path)
    if sl.mpp is None and mpp is not None:
        sl.close()
        sl = open_slide(path, mpp=mpp)
    return sl


def training_image(
    slide_path: str | Path, files: dict[str, Path], settings: Any, *, stem: str,
    mpp: float | None = None, scales_um: Sequence[float] = DEFAULT_SCALES_UM,
    max_train_px: int = 100_000, max_eval_px: int = 100_000,
    rng: int | np.random.Generator | None = 0,
) -> tuple[TrainingImage, StainMatrix]:
    """Training pixels of one slide: its people's majority on the scored pixels.

    The slide is measured first (:func:`fibroquant.pipeline.analyze_slide` with ``settings``)
    for its fitted stains and its tissue; features are computed at full resolution on the
    box around the scored pixels (labelled, inside the drawn tissue or else the tool's).

    Raises
    ------
    FibroquantError
        The slide cannot be measured, or an annotation cannot be read or placed.
    """
    from fibroquant.agreement import MAX_GRID_PX, image_annotations, majority
    from fibroquant.annotations import fingerprint, resample_nearest
    from fibroquant.pipeline import analyze_slide
    from fibroquant.slides import require_mpp

    slide_path = Path(slide_path)
    if getattr(settings, "classifier", None) is not None:  # measured as the threshold sees it
        settings = settings.model_copy(update={"classifier": None})
    analysis = analyze_slide(slide_path, settings, fallback_mpp=mpp)
    record = analysis.to_record()
    stains = stains_of_record(record)
    level = float(record.get(REFERENCE, math.nan))
    with _open(slide_path, mpp) as sl:
        mpp0 = require_mpp(sl)
        full = sl.levels[0].shape[:2]
        if full[0] * full[1] > MAX_GRID_PX:
            msg = (f"{slide_path}: {full[1]}x{full[0]} px is too large to train on whole; "
                   "annotate crops (regions exported as images) instead")
            raise ClassifierError(msg)
        anns, _ = image_annotations(files, stem, full, analysis.collagen_bits.shape)
        anns = [a.resampled(full) for a in anns]
        if len(anns) == 1:
            labels, labelled = anns[0].collagen, anns[0].labelled
        else:
            labels, labelled = majority(anns)
        drawn = [a.tissue for a in anns if a.tissue is not None]
        if drawn and len(drawn) == len(anns):
            region = 2 * np.sum(drawn, axis=0) > len(drawn)
        else:
            region = resample_nearest(analysis.tissue_mask, full)
        scored = labelled & region
        if not scored.any():
            return sample_pixels(np.zeros((len(feature_names(stains.names, scales_um)), 1, 1),
                                          np.float32), np.zeros((1, 1), bool),
                                 np.zeros((1, 1), bool), stem=stem), stains
        rows = np.flatnonzero(scored.any(axis=1))
        cols = np.flatnonzero(scored.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        halo = math.ceil(halo_um(scales_um) / mpp0) + 1
        rgb = sl.read_region(0, y0 - halo, x0 - halo, y1 - y0 + 2 * halo, x1 - x0 + 2 * halo)
    feats = pixel_features(rgb, stains, mpp0, scales_um)[:, halo:-halo, halo:-halo]
    image = sample_pixels(feats, labels[y0:y1, x0:x1], scored[y0:y1, x0:x1], stem=stem,
                          max_train_px=max_train_px, max_eval_px=max_eval_px, rng=rng)
    image.provenance = {
        "slide": slide_path.name, "mpp": mpp0, "scored_px": image.scored_px,
        "collagen_px": int((labels & scored).sum()),
        "annotations": {a.person: {"file": a.path.name, "sha256": fingerprint(a.path),
                                   "dense": a.dense} for a in anns},
        REFERENCE: level if math.isfinite(level) else None,
    }
    image.reference_od = level  # raw features: apply_references divides them
    return image, stains
