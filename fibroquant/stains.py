"""Stain vectors, optical density and colour deconvolution.

Conventions (the reference libraries disagree, so they are written down here):

* optical density is base-10, ``OD_c = -log10(I_c / I0_c)`` with ``I0`` the slide's own glass
  intensity per channel, and ``I`` clipped to at least 1 before the log;
* a :class:`StainMatrix` holds **rows = stains**, each a unit-norm OD vector (R, G, B);
* concentrations ``C`` solve ``OD = C @ M`` in the least-squares sense, ``C = OD @ pinv(M)``
  (Ruifrok & Johnston 2001); with fewer than three stains the residual direction is their
  normalised cross product;
* images are uint8 RGB in, float32 OD and concentrations out; no float64 full-size copies.

References
----------
Ruifrok AC, Johnston DA. Quantification of histochemical staining by color deconvolution.
Anal Quant Cytol Histol 2001;23:291-299.
Macenko M et al. A method for normalizing histology slides for quantitative analysis.
ISBI 2009:1107-1110.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np

from fibroquant.config import STAIN_NAMES, StainSettings

logger = logging.getLogger(__name__)

Vector = tuple[float, float, float]


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@dataclass(frozen=True)
class StainMatrix:
    """Stain OD vectors (rows) and the glass intensity they are relative to.

    Parameters
    ----------
    names : tuple of str
        One name per stain; the first is the collagen stain for fibroquant's presets.
    vectors : array_like, shape (n_stains, 3)
        OD vectors (R, G, B); normalised to unit length on construction.
    background_rgb : tuple of 3 float
        Glass intensity ``I0`` per channel, 0-255.
    """

    names: tuple[str, ...]
    vectors: np.ndarray
    background_rgb: Vector = (255.0, 255.0, 255.0)
    collagen: str = field(default="")

    def __post_init__(self) -> None:
        vec = np.asarray(self.vectors, dtype=np.float64)
        if vec.ndim != 2 or vec.shape[1] != 3 or not 1 <= vec.shape[0] <= 3:
            msg = f"stain vectors must have shape (1..3, 3), got {vec.shape}"
            raise ValueError(msg)
        if len(self.names) != vec.shape[0]:
            msg = f"{len(self.names)} stain names for {vec.shape[0]} vectors"
            raise ValueError(msg)
        if not np.all(np.isfinite(vec)) or np.any(np.linalg.norm(vec, axis=1) == 0):
            msg = f"stain vectors must be finite and non-zero, got {vec.tolist()}"
            raise ValueError(msg)
        bg = tuple(float(b) for b in self.background_rgb)
        if len(bg) != 3 or not all(0 < b <= 255 for b in bg):
            msg = f"background_rgb must be three values in (0, 255], got {self.background_rgb}"
            raise ValueError(msg)
        object.__setattr__(self, "vectors", _unit(vec).astype(np.float32))
        object.__setattr__(self, "background_rgb", bg)
        object.__setattr__(self, "collagen", self.collagen or self.names[0])

    @cached_property
    def full_matrix(self) -> np.ndarray:
        """3×3 float64 matrix: the stains plus residual rows (cross products) to fill 3."""
        rows = [np.asarray(v, np.float64) for v in self.vectors]
        if len(rows) == 1:
            a = rows[0]
            helper = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
            rows.append(_unit(np.cross(a, helper)))
        if len(rows) == 2:
            rows.append(_unit(np.cross(rows[0], rows[1])))
        return np.vstack(rows)

    @cached_property
    def unmixing(self) -> np.ndarray:
        """float32 (3, n_stains) matrix ``U`` with ``C = OD @ U``."""
        inv = np.linalg.inv(self.full_matrix)
        return inv[:, : len(self.names)].astype(np.float32)

    def index(self, name: str) -> int:
        """Row of the stain called ``name``."""
        return self.names.index(name)

    @property
    def collagen_index(self) -> int:
        """Row of the collagen stain."""
        return self.index(self.collagen)

    def with_background(self, background_rgb: Vector) -> StainMatrix:
        """Copy with another glass intensity."""
        return StainMatrix(self.names, self.vectors, background_rgb, self.collagen)

    def with_vectors(self, vectors: np.ndarray) -> StainMatrix:
        """Copy with other vectors (same names and background)."""
        return StainMatrix(self.names, vectors, self.background_rgb, self.collagen)

    def to_dict(self) -> dict[str, list[float]]:
        """Vectors by stain name, rounded to 4 decimals (for tables and provenance)."""
        return {n: [round(float(x), 4) for x in v] for n, v in zip(self.names, self.vectors, strict=True)}


# Published or fitted presets (unit OD vectors R, G, B); see docs in README and domain notes.
SIRIUS_RED_VECTOR: Vector = (0.14, 0.83, 0.54)
PICRIC_ACID_VECTOR: Vector = (0.08, 0.19, 0.98)
HAEMATOXYLIN_VECTOR: Vector = (0.650, 0.704, 0.286)  # Ruifrok & Johnston
EOSIN_VECTOR: Vector = (0.072, 0.990, 0.105)  # Ruifrok & Johnston
ANILINE_BLUE_VECTOR: Vector = (0.7995, 0.5914, 0.1053)  # Landini, Masson trichrome preset
PONCEAU_FUCHSIN_VECTOR: Vector = (0.1000, 0.7374, 0.6680)  # Landini, Masson trichrome preset
LIGHT_GREEN_VECTOR: Vector = (0.78, 0.30, 0.55)  # fitted to light/fast-green collagen pixels
IRON_HAEMATOXYLIN_VECTOR: Vector = (0.55, 0.58, 0.60)  # near-neutral brown-black nuclei

SIRIUS_RED = StainMatrix(  # Weigert's iron haematoxylin leaves nuclei near-neutral black
    STAIN_NAMES["sirius-red"],
    np.array([SIRIUS_RED_VECTOR, PICRIC_ACID_VECTOR, IRON_HAEMATOXYLIN_VECTOR]),
)
MASSON = StainMatrix(
    STAIN_NAMES["masson"],
    np.array([ANILINE_BLUE_VECTOR, PONCEAU_FUCHSIN_VECTOR, IRON_HAEMATOXYLIN_VECTOR]),
)
MASSON_LIGHT_GREEN = StainMatrix(
    STAIN_NAMES["masson-light-green"],
    np.array([LIGHT_GREEN_VECTOR, PONCEAU_FUCHSIN_VECTOR, IRON_HAEMATOXYLIN_VECTOR]),
)
H_AND_E = StainMatrix(("eosin", "haematoxylin"), np.array([EOSIN_VECTOR, HAEMATOXYLIN_VECTOR]))
#: Eosin and haematoxylin as real scanned H&E shows them: fitted by non-negative matrix
#: factorisation to 60,000 stained pixels of three real H&E images (a TCGA and a CMU Aperio
#: slide, a human liver tile). Ruifrok & Johnston's eosin absorbs almost only green; real eosin
#: absorbs blue too (residual of real H&E 0.03-0.06 with these, 0.26-0.31 with theirs, which
#: fitted real H&E worst of all protocols).
REAL_EOSIN_VECTOR: Vector = (0.094, 0.866, 0.491)
REAL_HAEMATOXYLIN_VECTOR: Vector = (0.953, 0.261, 0.154)
H_AND_E_REAL = StainMatrix(("eosin", "haematoxylin"),
                           np.array([REAL_EOSIN_VECTOR, REAL_HAEMATOXYLIN_VECTOR]))


#: Every protocol's preset by the protocol's name (the keys of ``protocols.STAIN_NAMES``).
PRESETS: dict[str, StainMatrix] = {
    "sirius-red": SIRIUS_RED, "masson": MASSON, "masson-light-green": MASSON_LIGHT_GREEN,
}
#: The presets by their stain names (:meth:`StainSettings.stain_names` picks one).
_PRESETS = {m.names: m for m in PRESETS.values()}


def preset_for(settings: StainSettings) -> StainMatrix:
    """The preset stain matrix for a protocol, with explicit study vectors applied.

    Parameters
    ----------
    settings : StainSettings

    Returns
    -------
    StainMatrix
        Collagen stain first.
    """
    preset = _PRESETS[settings.stain_names()]
    if settings.vectors:
        unknown = set(settings.vectors) - set(preset.names)
        if unknown:
            msg = (
                f"stains.vectors: unknown stain(s) {sorted(unknown)} for {settings.stain.value}; "
                f"expected names among {list(preset.names)}"
            )
            raise ValueError(msg)
        vec = np.array(
            [settings.vectors.get(n, tuple(preset.vectors[i])) for i, n in enumerate(preset.names)]
        )
        preset = preset.with_vectors(vec)
    if settings.background_rgb is not None:
        preset = preset.with_background(settings.background_rgb)
    return preset


def od_lut(background_rgb: Vector, *, clip: bool = True) -> np.ndarray:
    """Lookup table of optical density: float32 (3, 256), ``lut[c, v] = -log10(max(v,1)/I0_c)``.

    Values brighter than the glass give OD 0 (clipped), so ``OD >= 0`` always; with
    ``clip=False`` they keep their negative OD (the illumination fit needs them).
    """
    values = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    bg = np.asarray(background_rgb, dtype=np.float64)[:, None]
    od = -np.log10(values[None, :] / bg)
    return (np.maximum(od, 0.0) if clip else od).astype(np.float32)


def rgb_to_od(
    rgb: np.ndarray, background_rgb: Vector = (255.0, 255.0, 255.0), *, clip: bool = True
) -> np.ndarray:
    """Optical density of a uint8 RGB image.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (..., 3)
        Transmitted-light image.
    background_rgb : tuple of 3 float
        Glass intensity per channel (0-255).
    clip : bool
        Clip at 0 (pixels brighter than the glass); see :func:`od_lut`.

    Returns
    -------
    ndarray of float32, shape (..., 3)
        Base-10 OD, clipped at 0 unless ``clip=False``. The input is not modified.

    Examples
    --------
    >>> import numpy as np
    >>> float(rgb_to_od(np.array([[25, 255, 255]], np.uint8))[0, 0]).__round__(3)
    1.009
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        msg = f"rgb must be uint8 with 3 channels last, got {rgb.dtype} {rgb.shape}"
        raise ValueError(msg)
    lut = od_lut(background_rgb, clip=clip)
    if rgb.flags.c_contiguous and 0 < rgb.size // 3 < 2**31:
        # one OpenCV lookup over all three channels (releases the GIL; ~2x numpy indexing)
        table = np.ascontiguousarray(lut.T).reshape(256, 1, 3)
        return cv2.LUT(rgb.reshape(-1, 1, 3), table).reshape(rgb.shape)
    out = np.empty(rgb.shape, dtype=np.float32)
    for c in range(3):
        out[..., c] = lut[c][rgb[..., c]]
    return out


def channel_sum(values: np.ndarray) -> np.ndarray:
    """``values.sum(axis=-1)`` of a float array with 2 to 7 channels last, ~6-20x faster.

    numpy reduces a short last axis pixel by pixel; adding the channel planes is vectorised.
    The values are the same to the bit (below 8 values numpy adds them in order); only
    the sign of an exact zero may differ (``-0.0 + -0.0`` here, ``0.0`` from numpy).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    >>> np.array_equal(channel_sum(a), a.sum(axis=-1))
    True
    """
    values = np.asarray(values)
    n = values.shape[-1] if values.ndim else 0
    if not 2 <= n <= 7 or values.dtype.kind != "f":
        return values.sum(axis=-1)
    out = values[..., 0] + values[..., 1]
    for c in range(2, n):
        out += values[..., c]
    return out


def row_norm(values: np.ndarray, *, keepdims: bool = False) -> np.ndarray:
    """``np.linalg.norm(values, axis=-1, keepdims=keepdims)`` of a float array with 2 to 7
    channels last, plane by plane (:func:`channel_sum` of the squares): the same values to the
    bit (numpy adds fewer than 8 squares in order; a square is never -0), ~5x faster than
    numpy's pixel-by-pixel reduction of a short last axis (0.15 M OD pixels: 3 ms).

    Examples
    --------
    >>> import numpy as np
    >>> row_norm(np.array([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]]))
    array([5., 3.])
    """
    values = np.asarray(values)
    out = np.sqrt(channel_sum(np.square(values)))
    return out[..., np.newaxis] if keepdims else out


def channel_spread(values: np.ndarray) -> np.ndarray:
    """``values.max(axis=-1) - values.min(axis=-1)`` of a float array with 3 channels last,
    plane by plane (numpy reduces a short last axis pixel by pixel, ~10x slower on a 4 MP
    thumbnail); the same values to the bit. The planes are read in place (strided views):
    12-16 ms on a 4 MP image against 25-35 ms when copied out contiguous first (numpy 2.4),
    and no copies (48 MB).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)
    >>> np.array_equal(channel_spread(a), a.max(axis=-1) - a.min(axis=-1))
    True
    """
    values = np.asarray(values)
    if values.ndim == 0 or values.shape[-1] != 3 or values.dtype.kind != "f":
        return values.max(axis=-1) - values.min(axis=-1)
    a, b, c = values[..., 0], values[..., 1], values[..., 2]
    out = np.maximum(a, b)
    np.maximum(out, c, out=out)
    low = np.minimum(a, b)
    np.minimum(low, c, out=low)
    out -= low
    return out


def od_to_rgb(od: np.ndarray, background_rgb: Vector = (255.0, 255.0, 255.0)) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: ``I = I0 · 10^-OD`` rounded to uint8."""
    od = np.asarray(od, dtype=np.float32)
    bg = np.asarray(background_rgb, dtype=np.float32)
    return np.clip(np.rint(bg * np.power(np.float32(10.0), -od)), 0, 255).astype(np.uint8)


def unmix(od: np.ndarray, stains: StainMatrix) -> np.ndarray:
    """Stain concentrations from optical density (colour deconvolution).

    Parameters
    ----------
    od : ndarray of float32, shape (..., 3)
    stains : StainMatrix

    Returns
    -------
    ndarray of float32, shape (..., n_stains)
        Concentrations in OD units along each stain vector (may be slightly negative from noise).
    """
    return np.asarray(od, dtype=np.float32) @ stains.unmixing


def mix(conc: np.ndarray, stains: StainMatrix) -> np.ndarray:
    """Optical density from stain concentrations (Beer-Lambert), float32 (..., 3)."""
    conc = np.asarray(conc, dtype=np.float32)
    return conc @ stains.vectors


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors in degrees."""
    cos = float(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0))
    return float(np.degrees(np.arccos(cos)))


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


def median(values: np.ndarray) -> float:
    """``float(np.median(values))``, by one selection.

    numpy 2's median selects its two middle positions and the last (its NaN check) and is
    ~10x slower on a few hundred thousand float32 values (6-10 ms, three times per
    calibration of a field). The same value to the bit: the middle value, or the mean of the
    two middle values in the array's dtype, as numpy takes it. NaNs or no values: numpy's.

    Examples
    --------
    >>> median(np.array([3.0, 1.0, 2.0, 10.0], np.float32))
    2.5
    """
    v = np.array(values).ravel()  # a copy: partitioned in place
    m = v.size // 2
    if v.size == 0 or v.dtype.kind not in "fiu":
        return float(np.median(values))
    v.partition(m)
    if v.dtype.kind == "f" and np.isnan(v[m:]).any():  # (NaNs are placed last)
        return float(np.median(values))
    middle = v[m : m + 1] if v.size % 2 else np.array([v[:m].max(), v[m]], v.dtype)
    return float(np.mean(middle))


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


def _histogram(values: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount(values, minlength=minlength)`` of a 1-D uint8 or uint16 array (int64),
    by OpenCV when it can (~5x faster: no intp copy; its float32 counts are exact below
    2**24)."""
    if (values.dtype in (np.uint8, np.uint16) and values.flags.c_contiguous
            and 0 < len(values) < 2**24 and int(values.max()) < minlength):
        hist = cv2.calcHist([values.reshape(-1, 1)], [0], None, [minlength], [0, minlength])
        return hist.ravel().astype(np.int64)
    return _bincount(values, minlength)


def _masked_median(px: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``np.median(px[mask], axis=0)`` of uint8 (N, 3) pixels and a bool (N,) mask with at
    least one pixel, float64, from histograms: of the masked pixels in place (no copy of
    them) when they are many and OpenCV can count them exactly."""
    n = int(np.count_nonzero(mask))
    if n <= len(px) // 16:  # a few pixels (the brightest 0.5 %): taken out, then counted
        return _median_uint8_columns(px[np.flatnonzero(mask)])
    if n < 2**24 and px.flags.c_contiguous:
        image = px.reshape(-1, 1, 3)
        m = np.ascontiguousarray(mask).view(np.uint8).reshape(-1, 1)
        hists = [cv2.calcHist([image], [c], m, [256], [0, 256]).ravel().astype(np.int64)
                 for c in range(3)]
        return _median_from_histograms(hists, n)
    return _median_uint8_columns(px[mask])


def glass_median(
    rgb_pixels: np.ndarray, glass_mask: np.ndarray, min_pixels: int = 500
) -> Vector | None:
    """The glass colour of :func:`estimate_background` from the pixels known to be glass, or
    None when fewer than ``min_pixels`` are known or their median is too dark to be glass
    (its other sources are then left to the caller)."""
    px = np.asarray(rgb_pixels).reshape(-1, 3)
    glass = np.asarray(glass_mask).reshape(-1)
    if int(np.count_nonzero(glass)) < min_pixels:
        return None
    bg = _masked_median(px, glass)
    if bg.min() >= 120:
        return tuple(float(max(b, 1.0)) for b in bg)  # type: ignore[return-value]
    return None


def estimate_background(
    rgb_pixels: np.ndarray, *, glass_mask: np.ndarray | None = None, min_pixels: int = 500
) -> tuple[Vector, str]:
    """Estimate the glass intensity ``I0`` of a slide.

    Uses the median of glass pixels when enough are known; otherwise the median of the brightest
    0.5 % of pixels (unstained lumens, vacuoles), accepted only when they are bright and near
    neutral. Falls back to (255, 255, 255). Medians and the quantile come from per-channel
    histograms, exactly as ``np.median`` / ``np.quantile`` give them (no sort, no copy of a
    16-MP thumbnail).

    Parameters
    ----------
    rgb_pixels : ndarray of uint8, shape (..., 3)
    glass_mask : ndarray of bool, optional
        Same leading shape as ``rgb_pixels``: pixels known to be glass.
    min_pixels : int
        Fewest glass pixels to trust.

    Returns
    -------
    background_rgb : tuple of 3 float
    source : str
        ``"glass"``, ``"brightest"`` or ``"default"``.
    """
    px = np.asarray(rgb_pixels).reshape(-1, 3)
    if px.dtype != np.uint8:
        msg = f"estimate_background: expected uint8 RGB pixels, got {px.dtype}"
        raise TypeError(msg)
    if glass_mask is not None:
        bg_glass = glass_median(px, glass_mask, min_pixels)
        if bg_glass is not None:
            return bg_glass, "glass"
    if len(px) == 0:
        return (255.0, 255.0, 255.0), "default"
    brightness = px[:, 0].astype(np.uint16)
    brightness += px[:, 1]
    brightness += px[:, 2]
    n = len(px)
    virtual = (n - 1) * 0.995  # np.quantile, method "linear"
    lo = math.floor(virtual)
    hi = min(lo + 1, n - 1)
    a, b = _hist_order_stats(_histogram(brightness, 766), [lo, hi])
    # numpy's own interpolation between the two order statistics (same rounding)
    cut = np.quantile(np.array([a, b], np.int64), virtual - lo)
    # brightness is integer: b >= cut <=> b >= ceil(cut) (no float64 copy of the comparison)
    bg = _masked_median(px, brightness >= math.ceil(float(cut)))
    if bg.min() >= 170 and (bg.max() - bg.min()) <= 0.25 * bg.max():
        return tuple(float(b) for b in bg), "brightest"  # type: ignore[return-value]
    return (255.0, 255.0, 255.0), "default"


@dataclass(frozen=True)
class StainEstimate:
    """Per-slide stain calibration and its quality figures."""

    stains: StainMatrix
    source: str  # "estimated", "partly-estimated" or "preset"
    angles_deg: dict[str, float]
    n_pixels: dict[str, int]
    od_share: dict[str, float]
    warnings: tuple[str, ...] = ()
    #: per stain: True when its vector was fitted to this slide (not the preset or study vector)
    fitted: tuple[bool, ...] = ()

    def counterstain_fitted(self) -> bool:
        """Whether the counterstain (second stain: picric acid, ponceau-fuchsin) was fitted to
        this slide, so that what its vector leaves on the collagen axis is stain, not misfit."""
        return len(self.fitted) > 1 and self.fitted[1]


def estimate_stains(
    od_pixels: np.ndarray,
    preset: StainMatrix,
    settings: StainSettings,
    *,
    n_iter: int = 4,
) -> StainEstimate:
    """Estimate a slide's stain vectors from its own tissue pixels, anchored to a preset.

    Each stain's vector is re-estimated as the median OD direction of the pixels that the current
    vectors attribute mostly to that stain (share of positive concentration above
    ``settings.min_share``), iterated from the preset, so every estimate keeps the identity of its
    preset stain even when three stains overlap (Macenko's two-extremes method cannot tell Sirius
    red from haematoxylin and picric acid, which lie on either side of it). A stain whose estimate
    moves more than ``settings.max_angle_deg`` from its preset keeps the preset, with a warning.
    When this cannot estimate the collagen stain or the counterstain, the iteration starts again
    from the corners of the pixels' colour triangle (:func:`_vertex_start`), and that result is
    kept if it estimates more of those two stains (the collagen stain breaks a tie).

    Parameters
    ----------
    od_pixels : ndarray of float32, shape (N, 3)
        OD of tissue pixels (already relative to the slide's glass intensity).
    preset : StainMatrix
    settings : StainSettings

    Returns
    -------
    StainEstimate
    """
    names = preset.names
    od = np.asarray(od_pixels, dtype=np.float32).reshape(-1, 3)
    norms = row_norm(od)
    x = od[norms > settings.od_floor]
    zero = dict.fromkeys(names, 0.0)
    if settings.estimate == "preset" or len(x) < 500:
        warn = () if settings.estimate == "preset" else (
            f"too few stained pixels ({len(x)}) to estimate stain vectors; preset used",
        )
        share = _od_share(od, preset)
        return StainEstimate(preset, "preset", zero, dict.fromkeys(names, 0), share, warn)
    unit = x / row_norm(x, keepdims=True)
    min_count = max(200, int(0.0005 * len(x)))
    # The anchored iteration starts from the presets. When it cannot estimate the collagen
    # stain or the counterstain (a stain whose colour lies outside the presets' triangle is
    # read as its neighbour: a Sirius red 16° towards picric acid becomes picric acid and
    # collagen becomes parenchyma), it starts again from the data's own extreme colours
    # matched to the presets (:func:`_vertex_start`), and that result is kept if it estimates
    # more of those two stains.
    # The counterstain is held (:data:`COUNTERSTAIN_MAX_TOWARD_COLLAGEN_DEG`) for Sirius red
    # from either start, for every protocol from the data's corners.
    limit = COUNTERSTAIN_MAX_TOWARD_COLLAGEN_DEG.get(preset.collagen)
    corner_limit = CORNER_COUNTERSTAIN_MAX_TOWARD_COLLAGEN_DEG
    if limit is not None:
        corner_limit = min(limit, corner_limit)

    def starts() -> Iterator[tuple[np.ndarray | None, float | None]]:  # the second if needed
        yield preset.vectors.astype(np.float64), limit
        yield _vertex_start(x, preset), corner_limit

    best = None
    for start_vectors, start_limit in starts():
        if start_vectors is None:
            break
        vectors, counts = _refine(x, unit, start_vectors, preset, settings, n_iter, min_count,
                                  start_limit)
        outcome = _checked(vectors, counts, preset, settings, min_count)
        estimated = outcome[3]
        # how many of the collagen stain and counterstain are estimated; the collagen stain
        # breaks a tie
        score = (sum(estimated[:2]), estimated[0])
        if best is None or score > best[0]:
            best = (score, counts, outcome)
        if best[0][0] == 2:
            break
    assert best is not None  # the preset start always runs
    _, counts, (result, angles, warnings, estimated) = best
    n_estimated = sum(estimated)
    if n_estimated == len(names):
        source = "estimated"
    elif n_estimated:
        source = "partly-estimated"
    else:
        source = "preset"
    fitted = tuple(bool(n_estimated) and not np.allclose(result.vectors[i], preset.vectors[i])
                   for i in range(len(names)))
    return StainEstimate(result, source, angles, counts, _od_share(od, result), tuple(warnings),
                         fitted)


def _checked(
    vectors: np.ndarray, counts: dict[str, int], preset: StainMatrix, settings: StainSettings,
    min_count: int,
) -> tuple[StainMatrix, dict[str, float], list[str], tuple[bool, ...]]:
    """A refined estimate with its checks applied: a stain with fewer than ``min_count``
    pixels, or more than ``max_angle_deg`` from its preset, keeps the preset (a warning, except
    for the nuclear stain), and nearly parallel vectors fall back to the preset altogether.

    Returns (stains, angles in degrees, warnings, which stains are estimated)."""
    names = preset.names
    vectors = vectors.copy()
    warnings: list[str] = []
    angles: dict[str, float] = {}
    estimated = [False] * len(names)
    for i, name in enumerate(names):
        ang = angle_deg(vectors[i], preset.vectors[i])
        angles[name] = round(ang, 2)
        if counts[name] < min_count:
            vectors[i] = preset.vectors[i]
            angles[name] = 0.0
            continue
        if ang > settings.max_angle_deg:
            if i >= 2:  # the nuclear stain: keep the preset quietly (recorded in the angles)
                vectors[i] = preset.vectors[i]
                continue
            warnings.append(
                f"{name} vector {ang:.0f}° from its preset (limit {settings.max_angle_deg:g}°): "
                "preset used; check the stain"
            )
            vectors[i] = preset.vectors[i]
        else:
            estimated[i] = True
    result = preset.with_vectors(vectors)
    if _ill_conditioned(result) and len(names) > 2 and estimated[2]:
        # the nuclear stain is the least certain (few, mixed pixels): try without it first
        vectors[2] = preset.vectors[2]
        estimated[2] = False
        result = preset.with_vectors(vectors)
    if _ill_conditioned(result):
        warnings.append("estimated stain vectors are nearly parallel; preset used")
        return preset, angles, warnings, (False,) * len(names)
    return result, angles, warnings, tuple(estimated)


#: How much closer (degrees) the counterstain's estimate may come to the collagen stain's than
#: its preset is, by collagen stain; :func:`_refine` re-applies it every iteration. Why 15° for
#: Sirius red and none for Masson: docs/decisions.md#counterstain-hold
COUNTERSTAIN_MAX_TOWARD_COLLAGEN_DEG: dict[str, float] = {"sirius-red": 15.0}

#: The same limit, for every protocol, when the estimate starts from the data's corners
#: (:func:`_vertex_start`). Why: docs/decisions.md#corner-hold
CORNER_COUNTERSTAIN_MAX_TOWARD_COLLAGEN_DEG = 15.0


def limit_toward(
    est: np.ndarray, ref: np.ndarray, other: np.ndarray, limit_deg: float,
) -> np.ndarray:
    """Turn an estimated vector back towards its reference so that it has come at most
    ``limit_deg`` closer to ``other`` (a turn elsewhere is kept).

    Parameters
    ----------
    est, ref, other : ndarray of float, shape (3,)
        Non-zero OD vectors: the estimate, its preset, and the stain it must not drift into.
    limit_deg : float
        Positive, degrees.

    Returns
    -------
    ndarray of float64, shape (3,)
        ``est`` (as float64) when within the limit; otherwise the unit vector on the way from
        ``ref`` to ``est`` (normalised linear blend, bisected: the angle to ``other`` along
        that arc has one crossing) whose angle to ``other`` is ``limit_deg`` less than
        ``ref``'s, to ~1e-7 degrees and never past it.
    """
    est = np.asarray(est, np.float64)
    ref = np.asarray(ref, np.float64)
    base = angle_deg(ref, other)
    if base - angle_deg(est, other) <= limit_deg:
        return est
    lo, hi = 0.0, 1.0
    for _ in range(30):
        f = 0.5 * (lo + hi)
        if base - angle_deg(_unit((1 - f) * ref + f * est), other) > limit_deg:
            hi = f
        else:
            lo = f
    return _unit((1 - lo) * ref + lo * est)


def _refine(
    x: np.ndarray, unit: np.ndarray, start: np.ndarray, preset: StainMatrix,
    settings: StainSettings, n_iter: int, min_count: int, limit: float | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """The anchored iteration: each stain's vector becomes the median direction of the purest
    fifth of the pixels the current vectors attribute mostly to it (share > ``min_share``);
    a stain with fewer than ``min_count`` such pixels returns to its preset. With ``limit``
    (degrees), the counterstain may come at most that much closer to the current
    collagen-stain estimate than its preset is, in every iteration."""
    names = preset.names
    vectors = np.array(start, np.float64)
    counts = dict.fromkeys(names, 0)
    for _ in range(n_iter):
        current = preset.with_vectors(vectors)
        conc = np.maximum(x @ current.unmixing, 0.0)
        total = channel_sum(conc)  # numpy's sum to the bit (an exact zero's sign aside)
        total[total == 0] = 1.0
        new = vectors.copy()
        for i, name in enumerate(names):
            # one stain's share as a contiguous column (the same divisions as the whole
            # share matrix's); the median of the picked unit vectors column by column
            share = np.ascontiguousarray(conc[:, i]) / total
            sel = share > settings.min_share
            counts[name] = int(np.count_nonzero(sel))
            if counts[name] < min_count:
                new[i] = preset.vectors[i]
                continue
            purity = share[sel]
            purest = purity >= np.quantile(purity, 0.8)
            if np.count_nonzero(purest) < min_count:
                purest = np.ones_like(purity, dtype=bool)
            picked = unit[np.flatnonzero(sel)[purest]]
            direction = np.median(np.ascontiguousarray(picked.T), axis=1)
            new[i] = _unit(np.maximum(direction, 1e-6))
        if limit is not None and counts[names[1]] >= min_count:
            new[1] = limit_toward(new[1], preset.vectors[1], new[0], limit)
        if np.allclose(new, vectors, atol=1e-4):
            vectors = new
            break
        vectors = new
    return vectors, counts


#: Chromaticity histogram of :func:`_vertex_start`: bins per axis, and the least share of the
#: pixels a bin must hold to count (a few stray pixels do not make a stain).
VERTEX_BINS = 64
VERTEX_MIN_SHARE = 2e-4


def _vertex_start(x: np.ndarray, preset: StainMatrix) -> np.ndarray | None:
    """The three stains' directions as the corners of the pixels' colour triangle.

    In the chromaticity plane (OD divided by its sum) every pixel is a convex combination of
    its stains' chromaticities, so the pure stains are the corners of the region the pixels
    fill: the largest triangle on the convex hull of the populated histogram bins. The corners
    are matched to the presets by the assignment with the least total angle. Unlike the
    preset start, this finds a stain whose colour lies outside the presets' triangle (a
    Sirius red 16° towards picric acid would otherwise be read as picric acid, and its pixels
    as parenchyma). None when the stains are not three or the pixels fill no triangle.
    """
    if len(preset.names) != 3 or len(x) < 500:
        return None
    from itertools import combinations, permutations

    from scipy.spatial import ConvexHull, QhullError

    pos = np.maximum(x.astype(np.float64), 0.0) + 1e-6
    chroma = pos[:, :2] / pos.sum(axis=1, keepdims=True)
    hist, ye, xe = np.histogram2d(chroma[:, 0], chroma[:, 1], bins=VERTEX_BINS,
                                  range=[[0, 1], [0, 1]])
    iy, ix = np.nonzero(hist >= max(3, VERTEX_MIN_SHARE * len(x)))
    if len(iy) < 3:
        return None
    pts = np.column_stack([(ye[iy] + ye[iy + 1]) / 2, (xe[ix] + xe[ix + 1]) / 2])
    try:
        corners = pts[ConvexHull(pts).vertices]
    except QhullError:  # all on a line
        return None
    tri = np.array(list(combinations(range(len(corners)), 3)))
    a, b, c = corners[tri[:, 0]], corners[tri[:, 1]], corners[tri[:, 2]]
    area = np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1])
                  - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]))
    best = corners[tri[int(np.argmax(area))]]
    # a bin on the chromaticity border (pixels with a channel at or below zero, clipped) has
    # its third coordinate at ~0: keep it just inside
    v = np.maximum(np.column_stack([best, 1.0 - best.sum(axis=1)]), 1e-3)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ref = preset.vectors.astype(np.float64)
    perm = min(permutations(range(3)),
               key=lambda p: sum(angle_deg(v[p[i]], ref[i]) for i in range(3)))
    return v[list(perm)]


def _ill_conditioned(stains: StainMatrix, limit: float = 30.0) -> bool:
    return bool(np.linalg.cond(stains.full_matrix) > limit)


def _od_share(od: np.ndarray, stains: StainMatrix) -> dict[str, float]:
    """Fraction of the summed positive concentration carried by each stain."""
    if len(od) == 0:
        return dict.fromkeys(stains.names, 0.0)
    conc = np.maximum(od @ stains.unmixing, 0.0).sum(axis=0, dtype=np.float64)
    total = float(conc.sum()) or 1.0
    return {n: round(float(c) / total, 4) for n, c in zip(stains.names, conc, strict=True)}


def _pixel_residuals(od: np.ndarray, stains: StainMatrix) -> np.ndarray:
    """Relative residual of explaining each OD pixel by non-negative amounts of the stains."""
    m = stains.vectors.astype(np.float64)
    conc = np.maximum(od @ np.linalg.pinv(m), 0.0)
    return row_norm(od - conc @ m) / np.maximum(row_norm(od), 1e-6)


#: The protocols :func:`stain_fit` compares (the keys of its residuals).
PROTOCOLS = (*PRESETS, "h&e")


def fit_references() -> dict[str, StainMatrix]:
    """The two-stain reference of every protocol in :data:`PROTOCOLS` (collagen stain or eosin
    first): Sirius red + picric acid, aniline blue or light green + ponceau-fuchsin, and H&E as
    real slides show it (:data:`H_AND_E_REAL`)."""
    return {**{name: StainMatrix(m.names[:2], m.vectors[:2]) for name, m in PRESETS.items()},
            "h&e": H_AND_E_REAL}


#: Masson's two variants are told apart by the stained pixels that one collagen stain explains
#: with a relative residual at least this much lower than the other: the collagen itself. Red
#: muscle and cytoplasm stay below it, but on real Masson hearts (aniline blue) they fit the
#: light-green reference slightly better on average (0.08-0.11 against 0.09-0.16); their
#: collagen puts 2-6 % of the stained pixels past the margin for blue and under 1 % for green.
MASSON_VARIANT_MARGIN = 0.2
#: ... when at least this many pixels are past the margin (else the mean residuals decide).
MASSON_VARIANT_MIN_PIXELS = 50

#: A stained pixel within this angle (degrees) of :data:`REAL_EOSIN_VECTOR` is eosin-pink.
EOSIN_ANGLE_DEG = 8.0
#: A pixel whose brightest channel is below this (0-255) is dark: most of a fluorescence
#: image, a few nuclei or pigment specks of a bright-field section.
DARK_PIXEL_MAX = 50
#: A stained pixel within this angle (degrees) of the grey axis (equal OD in R, G and B) is
#: neutral: real stained sections have 0-0.9 % of their stained pixels so (near-black iron
#: haematoxylin nuclei, pigment), a greyscale image saved as RGB 100 %.
NEUTRAL_ANGLE_DEG = 5.0


def protocol_fit(od: np.ndarray, dark_share: float = 0.0) -> dict[str, float]:
    """Residual of every protocol on stained OD pixels, with the colour evidence beside them.

    Parameters
    ----------
    od : ndarray of float64, shape (N, 3)
        OD of stained pixels (glass and pale pixels already left out).
    dark_share : float
        Share of the sampled pixels that are dark (:data:`DARK_PIXEL_MAX`), 0-1.

    Returns
    -------
    dict
        ``sirius-red, masson, masson-light-green, h&e``: mean relative residual of explaining
        the pixels by non-negative amounts of the protocol's two stains (lower is better);
        ``light_green_share``: of the pixels one Masson collagen stain explains far better than
        the other (:data:`MASSON_VARIANT_MARGIN`), the share light green explains better
        (absent with fewer than :data:`MASSON_VARIANT_MIN_PIXELS` of them);
        ``eosin_share``: share of the pixels that are eosin-pink (within ``EOSIN_ANGLE_DEG`` of
        real eosin: H&E has 4-60 %, purple Masson livers and red Masson hearts under 0.5 %);
        ``dark_share``: as given; ``neutral_share``: share of the pixels that are grey
        (within ``NEUTRAL_ANGLE_DEG`` of equal OD in all channels: a greyscale image).
    """
    residuals = {k: _pixel_residuals(od, v) for k, v in fit_references().items()}
    fit = {k: round(float(np.mean(r)), 4) for k, r in residuals.items()}
    # Masson's variant from the pixels one collagen stain explains far better than the other
    # (the blue or green collagen itself), not from the mean, which the counterstain dominates
    margin = residuals["masson-light-green"] - residuals["masson"]
    blue = int(np.count_nonzero(margin > MASSON_VARIANT_MARGIN))
    green = int(np.count_nonzero(margin < -MASSON_VARIANT_MARGIN))
    if blue + green >= MASSON_VARIANT_MIN_PIXELS:
        fit["light_green_share"] = round(green / (blue + green), 4)
    unit = od / np.maximum(row_norm(od, keepdims=True), 1e-12)
    eosin = np.asarray(REAL_EOSIN_VECTOR) / np.linalg.norm(REAL_EOSIN_VECTOR)
    fit["eosin_share"] = round(float(np.mean(unit @ eosin > np.cos(np.radians(EOSIN_ANGLE_DEG)))),
                               4)
    grey = np.full(3, 1.0 / math.sqrt(3.0))
    fit["neutral_share"] = round(
        float(np.mean(unit @ grey > np.cos(np.radians(NEUTRAL_ANGLE_DEG)))), 4)
    fit["dark_share"] = round(float(dark_share), 4)
    return fit


def dark_share(rgb_pixels: np.ndarray) -> float:
    """Share of pixels whose brightest channel is below :data:`DARK_PIXEL_MAX` (0-1)."""
    px = np.asarray(rgb_pixels).reshape(-1, 3)
    if len(px) == 0:
        return 0.0
    brightest = np.maximum(px[:, 0], px[:, 1])  # px.max(axis=1), ~30x faster
    for c in range(2, px.shape[1]):
        np.maximum(brightest, px[:, c], out=brightest)
    return float(np.mean(brightest < DARK_PIXEL_MAX))


#: The stain-fit QC reads at most about this many of the low-resolution image's tissue pixels
#: (every k-th row and column; fits within 0.001 of the full image's).
STAIN_FIT_MAX_PIXELS = 500_000


def tissue_pixels(rgb: np.ndarray, mask: np.ndarray, max_pixels: int) -> np.ndarray:
    """The ``mask`` pixels of ``rgb`` as an (N, 3) array, from every k-th row and column
    (k the smallest that leaves at most about ``max_pixels``; 1 for small images)."""
    n = int(np.count_nonzero(mask))
    k = math.ceil(math.sqrt(n / max_pixels)) if n > max_pixels else 1
    return rgb[::k, ::k][mask[::k, ::k]]


def stain_fit(rgb: np.ndarray, *, od_floor: float = 0.15, max_pixels: int = 200_000
              ) -> dict[str, float]:
    """How well each known stain protocol explains an image's colours (lower is better).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        Usually a thumbnail, or the tissue pixels of one as (N, 3).
    od_floor : float
        Pixels with a smaller OD norm (glass, pale areas) are ignored.
    max_pixels : int
        Pixels sampled (at random, seed 0; the OD is computed only of them: the OD norm of
        every pixel comes from per-channel tables).

    Returns
    -------
    dict
        :func:`protocol_fit` of the sampled stained pixels; only ``dark_share`` when fewer
        than 100 pixels are stained.
    """
    px = np.asarray(rgb).reshape(-1, 3)
    if px.dtype != np.uint8:
        msg = f"stain_fit: expected uint8 RGB pixels, got {px.dtype}"
        raise TypeError(msg)
    dark = dark_share(px)
    bg, _ = estimate_background(px)
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
        return {"dark_share": round(dark, 4)} if dark >= DARK_FIELD_MIN_SHARE else {}
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
    return protocol_fit(od, dark)


#: Most pixels dark: a fluorescence (dark-field) image, not a bright-field stain.
DARK_FIELD_MIN_SHARE = 0.5
#: H&E is a guess only with at least this share of eosin-pink pixels: a purple Masson section
#: (haematoxylin nuclei, aniline blue in the cytoplasm) fits the H&E reference better than the
#: Masson one (0.07-0.08 vs 0.12 on two real rodent livers and a human biopsy) but has
#: 0.1-0.4 % eosin-pink pixels; real H&E has 3.9-61 %.
EOSIN_MIN_SHARE = 0.02
#: Most stained pixels neutral grey (``neutral_share``): a greyscale image, not a colour stain.
GREY_MIN_SHARE = 0.5
#: With at least ``EOSIN_MIN_SHARE`` eosin-pink pixels, Sirius red is guessed rather than a
#: better-fitting Masson whose residual is above this share of Sirius red's: pale Sirius red
#: stroma is pink and fits Masson's reference (crimson + a little blue) about as well as its
#: own (real TWOMBLI cores 2L_4D, 2L_7D: Sirius red at 1.08-1.26 times Masson, 3-16 %
#: eosin-pink), while a Masson section with pink pixels fits Sirius red 2.3-8 times worse
#: (synthetic sections with drifted vectors); real Masson hearts fit it 1.26-1.6 times worse
#: but have no eosin-pink pixels (0.01-0.05 %).
PINK_SIRIUS_RED_RATIO = 1.5
#: Another protocol fits "clearly better" when its residual is below this share of the expected
#: protocol's: pale real Sirius red cores fit Masson's reference at 0.70-0.92 of their own; real
#: H&E, Sirius red and the other way round at 0.14-0.48.
WRONG_STAIN_RATIO = 0.6
#: ... and, for H&E with eosin-pink pixels, below this share (real H&E run as Masson: 0.55-0.68,
#: the two being purple-pink with a blue-purple second stain).
WRONG_STAIN_RATIO_HE = 0.85
#: The expected protocol's residual must exceed this for a wrong-stain verdict (else it fits
#: well enough); for H&E, which needs eosin-pink pixels besides, ``WRONG_STAIN_MIN_RESIDUAL_HE``
#: (real H&E fits Masson's reference at 0.07).
WRONG_STAIN_MIN_RESIDUAL = 0.1
WRONG_STAIN_MIN_RESIDUAL_HE = 0.03
#: ... and the other protocol must itself fit (residual at most this): real slides fit their
#: own protocol at 0.03-0.16; an image of random colours fits none (0.37-0.5) and is no
#: evidence of another stain.
WRONG_STAIN_MAX_GUESS_RESIDUAL = 0.2


@dataclass(frozen=True)
class StainVerdict:
    """Which protocol a slide's colours show, and whether it is not the one expected.

    Attributes
    ----------
    guess : str
        A protocol of :data:`PROTOCOLS`, ``"fluorescence"``, ``"grey"`` (not a colour stain)
        or ``"unknown"``.
    wrong : bool
        The colours fit another protocol clearly better than the expected one, or are not a
        bright-field stain at all.
    message : str
        One line saying why (empty when not wrong).
    """

    guess: str
    wrong: bool
    message: str = ""


def _family(protocol: str) -> str:
    return "masson" if protocol.startswith("masson") else protocol


def guess_protocol(fit: dict[str, float]) -> str:
    """The protocol a :func:`stain_fit` result shows: the lowest residual, except that H&E
    needs eosin-pink pixels (``EOSIN_MIN_SHARE``; else the next best) and, with them, a Masson
    fit within ``PINK_SIRIUS_RED_RATIO`` of Sirius red's is Sirius red; Masson's variant is the
    one its collagen pixels show (``light_green_share``) when known; a mostly dark image is
    ``"fluorescence"``, a mostly neutral grey one ``"grey"`` (not a colour stain);
    ``"unknown"`` without a fit.

    Examples
    --------
    >>> guess_protocol({"sirius-red": 0.09, "masson": 0.07, "h&e": 0.18, "eosin_share": 0.16})
    'sirius-red'
    >>> guess_protocol({"sirius-red": 0.46, "masson": 0.23, "masson-light-green": 0.10,
    ...                 "h&e": 0.21, "neutral_share": 1.0})
    'grey'
    """
    if fit.get("dark_share", 0.0) >= DARK_FIELD_MIN_SHARE:
        return "fluorescence"
    if fit.get("neutral_share", 0.0) >= GREY_MIN_SHARE:
        return "grey"
    order = sorted((k for k in PROTOCOLS if k in fit), key=fit.__getitem__)
    if not order:
        return "unknown"
    pink = fit.get("eosin_share", 0.0) >= EOSIN_MIN_SHARE
    if order[0] == "h&e" and not pink and len(order) > 1:
        order = order[1:]
    best = order[0]
    if (pink and _family(best) == "masson" and "sirius-red" in fit
            and fit["sirius-red"] <= PINK_SIRIUS_RED_RATIO * fit[best]):
        return "sirius-red"
    if _family(best) == "masson" and "light_green_share" in fit:
        return "masson-light-green" if fit["light_green_share"] > 0.5 else "masson"
    return best


def stain_verdict(fit: dict[str, float], protocol: str) -> StainVerdict:
    """Whether a slide stained for ``protocol`` shows another stain (see :func:`guess_protocol`).

    Wrong when the image is a fluorescence one, or when the guessed protocol (Masson's two
    variants count as one) has a residual below ``WRONG_STAIN_RATIO`` (H&E:
    ``WRONG_STAIN_RATIO_HE``) times the expected one's, which exceeds
    ``WRONG_STAIN_MIN_RESIDUAL`` (H&E: ``WRONG_STAIN_MIN_RESIDUAL_HE``), and is itself at most
    ``WRONG_STAIN_MAX_GUESS_RESIDUAL``.

    Parameters
    ----------
    fit : dict
        :func:`stain_fit` result (empty: nothing can be said).
    protocol : str
        The expected stain: ``sirius-red`` or ``masson`` (either variant).

    Returns
    -------
    StainVerdict

    Examples
    --------
    >>> fit = {"sirius-red": 0.27, "masson": 0.06, "masson-light-green": 0.25, "h&e": 0.04,
    ...        "eosin_share": 0.04, "dark_share": 0.0}
    >>> v = stain_verdict(fit, "sirius-red")
    >>> v.guess, v.wrong
    ('h&e', True)
    >>> stain_verdict({**fit, "eosin_share": 0.003}, "masson").wrong  # purple Masson
    False
    """
    guess = guess_protocol(fit)
    if guess == "fluorescence":
        return StainVerdict(guess, True, (
            f"dark background ({100 * fit['dark_share']:.0f} % of the pixels dark): a "
            "fluorescence image, not a bright-field collagen stain"))
    if guess == "grey":
        return StainVerdict(guess, True, (
            f"grey ({100 * fit['neutral_share']:.0f} % of the stained pixels neutral): not a "
            "colour stain"))
    mine = [fit[k] for k in PROTOCOLS if k in fit and _family(k) == _family(protocol)]
    if guess == "unknown" or not mine or _family(guess) == _family(protocol):
        return StainVerdict(guess, False)
    expected = min(mine)
    he = guess == "h&e"
    ratio = WRONG_STAIN_RATIO_HE if he else WRONG_STAIN_RATIO
    least = WRONG_STAIN_MIN_RESIDUAL_HE if he else WRONG_STAIN_MIN_RESIDUAL
    if expected > least and fit[guess] < min(ratio * expected, WRONG_STAIN_MAX_GUESS_RESIDUAL):
        return StainVerdict(guess, True, (
            f"colours fit {guess} clearly better than {protocol} (residual {fit[guess]:.2f} "
            f"vs {expected:.2f}): wrong stain"))
    return StainVerdict(guess, False)


def stain_doubt(fit: dict[str, float], protocol: str) -> str | None:
    """A warning when the colours show another stain (:func:`guess_protocol`) that fits better
    than ``protocol`` but not clearly (:func:`stain_verdict` keeps the slide): real Masson
    hearts run as Sirius red fit Masson at 0.62-0.79 of Sirius red's residual, inside the
    range of pale Sirius red cores (0.70-0.92), which their eosin-pink pixels guess as Sirius
    red. None when the expected stain is guessed, fits best, or the verdict is wrong-stain."""
    verdict = stain_verdict(fit, protocol)
    return None if verdict.wrong else _doubt(fit, protocol, verdict.guess)


def _doubt(fit: dict[str, float], protocol: str, guess: str) -> str | None:
    """:func:`stain_doubt` of a slide whose verdict is not wrong-stain, given its guess."""
    if guess not in PROTOCOLS or _family(guess) == _family(protocol):
        return None
    mine = [fit[k] for k in PROTOCOLS if k in fit and _family(k) == _family(protocol)]
    theirs = min(fit[k] for k in PROTOCOLS if k in fit and _family(k) == _family(guess))
    if not mine or theirs >= min(mine):
        return None
    check = "check --stain" if _family(guess) in ("sirius-red", "masson") else "check the stain"
    return (f"colours fit {guess} better than {protocol} (residual {theirs:.3f} vs "
            f"{min(mine):.3f}), though not clearly: {check}")


def stain_mismatch(fit: dict[str, float], protocol: str) -> str | None:
    """The "wrong stain" warning of :func:`stain_verdict`, else the doubt of
    :func:`stain_doubt`; None when the expected stain fits best (or nothing can be said)."""
    verdict = stain_verdict(fit, protocol)
    return verdict.message if verdict.wrong else _doubt(fit, protocol, verdict.guess)


def describe_fit(fit: dict[str, float]) -> str:
    """The protocol :func:`guess_protocol` picks from :func:`stain_fit` results, with every
    protocol's residual, as text."""
    guess = guess_protocol(fit)
    residuals = {k: fit[k] for k in PROTOCOLS if k in fit}
    if guess == "fluorescence":
        return ("fluorescence: not a bright-field collagen stain "
                f"({100 * fit['dark_share']:.0f} % of the pixels dark)")
    if guess == "grey":
        return ("grey: not a colour stain "
                f"({100 * fit['neutral_share']:.0f} % of the stained pixels neutral)")
    if not residuals:
        return "unknown (too little stained tissue)"
    text = f"{guess} (residual {residuals[guess]:.2f}; " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(residuals.items(), key=lambda kv: kv[1])
        if k != guess) + f"; eosin-pink pixels {100 * fit.get('eosin_share', 0.0):.1f} %)"
    if guess.startswith("masson") or guess == "h&e":
        # both are purple-pink with a blue or purple second stain: residuals overlap
        text += "; H&E and Masson's trichrome are told apart by eosin-pink pixels"
    return text
