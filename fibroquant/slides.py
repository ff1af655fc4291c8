"""Read slide files: the one module that touches image files.

:func:`open_slide` returns a :class:`Slide`, a small reader interface with the level-0
resolution ``mpp`` (µm per pixel, ``None`` when unknown), the pyramid ``levels``,
``read_region`` and ``thumbnail``. Every reader returns ``uint8`` RGB arrays of shape
``(h, w, 3)``.

Readers
-------
* Flat images (PNG, JPEG, BMP; decoded with OpenCV) and small flat strip TIFFs are decoded whole,
  once, on first use and cached.
* Tiled TIFFs (Aperio SVS, Hamamatsu NDPI, OME-TIFF, generic tiled (Big)TIFF pyramids, any
  compression tifffile and imagecodecs decode) are read tile by tile: ``read_region`` reads only
  the bytes of the tiles that overlap the region (under a lock per file handle), decodes them
  outside the lock and keeps a small LRU cache of decoded tiles. Large strip TIFFs are read strip
  by strip the same way.
* Other vendor formats (``.mrxs``, ``.scn``, ``.czi``, ``.vms``, ``.vmu``, ``.bif``), and
  Philips, Leica and Ventana TIFFs under a ``.tif``/``.tiff`` name, go through OpenSlide
  (:mod:`fibroquant.read_openslide`).
* DICOM whole-slide images (``.dcm`` files, or a folder of them) go through ``wsidicom``
  (:mod:`fibroquant.read_dicom`).

Every reader says its name in ``reader`` (``tifffile``, ``opencv``, ``openslide``, ``wsidicom``,
``array``). Readers in their own module are listed in :data:`READER_MODULES`: adding one is
that module plus one line there.

Pixel normalisation (every reader)
----------------------------------
Alpha is composited over white (and then dropped), greyscale is expanded to RGB with a
``UserWarning`` (and the reader's ``greyscale`` flag set: :func:`require_colour` refuses such a
slide for analysis, while ``inspect`` can still open it), palette images are mapped through their colormap, and 16-bit images are scaled
to 8 bit with a ``UserWarning``: by 1/257 (full 16-bit range), or, when the image maximum is
below 4096 (10-, 12-bit cameras), by ``255 / (2**k - 1)`` where ``2**k`` is the image maximum
rounded up to a power of two. Float, signed, 2-channel (without declared alpha), more than
4-channel, CMYK and 1-pixel images are rejected with :class:`~fibroquant.errors.SlideReadError`.

Resolution (µm per pixel)
-------------------------
Taken, in order, from vendor metadata (Aperio ``MPP =`` in the ImageDescription, OME-XML
``PhysicalSizeX`` with ``PhysicalSizeXUnit``, ImageJ ``unit=micron`` descriptions), then generic
density fields (TIFF ``XResolution`` with ``ResolutionUnit`` inch/cm/mm/µm, NDPI included; PNG
``pHYs``; JPEG JFIF density; BMP pixels per metre). Generic density fields are routinely filled
with screen defaults (72, 96, 300 dpi) by cameras and image editors, so a value is only accepted
when it is denser than 600 pixels per inch, i.e. when it gives less than
``25400 / 600 ≈ 42.3`` µm per pixel (no microscope image is coarser); otherwise the resolution
is unknown (``mpp=None``) and the caller must supply it (see :func:`require_mpp`). A resolution
unit of "none" always means unknown. ``open_slide(path, mpp=...)`` overrides the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import cv2
import numpy as np

from fibroquant.errors import MissingResolutionError, NotColourError, SlideReadError
from fibroquant.layout import LOCK_NAME, STORE_NAME

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ArraySlide",
    "Level",
    "Slide",
    "inspect_slide",
    "is_output_folder",
    "list_slides",
    "mpp_problem",
    "open_slide",
    "require_colour",
    "require_mpp",
]

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = frozenset({".svs", ".ndpi", ".tif", ".tiff", ".btf", ".tf2", ".tf8"})
"""Suffixes read with tifffile (``.ome.tif`` and ``.ome.tiff`` end in ``.tif``/``.tiff``)."""
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
"""Flat image suffixes read with OpenCV."""
OPENSLIDE_SUFFIXES = frozenset({".mrxs", ".scn", ".czi", ".vms", ".vmu", ".bif"})
"""Suffixes read with OpenSlide (:mod:`fibroquant.read_openslide`)."""
DICOM_SUFFIXES = frozenset({".dcm"})
"""Suffixes read with wsidicom (:mod:`fibroquant.read_dicom`); a folder of them is one slide."""
SUPPORTED_SUFFIXES: frozenset[str] = (TIFF_SUFFIXES | IMAGE_SUFFIXES | OPENSLIDE_SUFFIXES
                                      | DICOM_SUFFIXES)
"""Lower-case file suffixes :func:`list_slides` and :func:`open_slide` accept."""

OUTPUT_MARKERS = (STORE_NAME, LOCK_NAME)
"""Files that make a folder a fibroquant output folder: the results store and the run lock."""
_RUN_JSON_KEYS = frozenset({"processed", "skipped", "failed", "removed", "settings_hash",
                            "version"})

MAX_PLAUSIBLE_MPP = 25400.0 / 600.0
"""Generic density fields giving this many µm per pixel or more (≤ 600 dpi) mean "unknown"."""
_MAX_FLAT_PIXELS = 2**31
_WHOLE_PAGE_PIXELS = 256 * 2**20
_MAX_SCAN_PIXELS = 64 * 2**20
_TILE_CACHE_ITEMS = 320  # > one pass of 1056-px reads over a 32k-wide slide (4 rows x 64 tiles)
_TILE_CACHE_BYTES = 256 * 2**20
_JPEG_COMPRESSIONS = frozenset({6, 7, 33003, 33005, 33007, 34712, 34892})

READER_MODULES: dict[str, tuple[str, frozenset[str]]] = {
    "openslide": ("fibroquant.read_openslide", OPENSLIDE_SUFFIXES),
    "wsidicom": ("fibroquant.read_dicom", DICOM_SUFFIXES),
}
"""Readers in a module of their own: name -> (module, suffixes it always reads). Each module
has ``open_path(path, mpp_override) -> Slide``; it is imported on first use."""

_FORMAT_NAMES = {"tiff": "TIFF", "png": "PNG", "jpeg": "JPEG", "bmp": "BMP"}
_SUFFIX_KIND = {
    **dict.fromkeys(TIFF_SUFFIXES, "tiff"),
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
}


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One resolution level of a slide.

    Attributes
    ----------
    shape : tuple of int
        ``(height, width)`` in pixels.
    downsample : float
        Level-0 width divided by this level's width (1.0 for level 0).
    mpp : float or None
        µm per pixel of this level (level-0 mpp × downsample), ``None`` when unknown.
    """

    shape: tuple[int, int]
    downsample: float
    mpp: float | None


@runtime_checkable
class Slide(Protocol):
    """What every slide reader provides. See the module docstring for formats and rules."""

    path: Path
    format: str
    mpp: float | None
    levels: tuple[Level, ...]

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Return uint8 RGB ``(h, w, 3)`` at ``level`` pixel coordinates; outside is white."""
        ...

    def thumbnail(self, target_mpp: float) -> np.ndarray:
        """Return the whole slide as uint8 RGB at ``target_mpp`` µm per pixel."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...

    def drop_cache(self) -> None:
        """Forget decoded pixels kept for later reads (decoded again if asked for)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def require_mpp(slide: Slide) -> float:
    """Return the slide's level-0 µm per pixel or raise if it is unknown.

    Parameters
    ----------
    slide : Slide
        An open slide.

    Returns
    -------
    float
        Level-0 resolution in µm per pixel.

    Raises
    ------
    MissingResolutionError
        The file has no usable resolution and none was given to :func:`open_slide`.
    """
    if slide.mpp is None:
        raise MissingResolutionError(
            f"{slide.path.name}: no µm-per-pixel resolution in the file; "
            "give --mpp or an mpp column in the sample sheet"
        )
    source = getattr(slide, "mpp_source", None)
    problem = mpp_problem(slide.mpp, "the sample sheet or --mpp" if source == "given"
                          else (source or "the file"))
    if problem:
        raise SlideReadError(f"{slide.path.name}: {problem}")
    return slide.mpp


#: The plausible range of a bright-field slide's µm per pixel (a 100x oil objective on a
#: fine camera is ~0.05; a macro image of a whole slide ~50): anything outside is a broken
#: tag or a typo, and measuring with it would give wrong areas (or allocate without bound).
MPP_RANGE_UM = (0.05, 50.0)


def mpp_problem(mpp: float, source: str) -> str | None:
    """Why ``mpp`` (µm per pixel, from ``source``) cannot be a bright-field slide's
    resolution, or None when it is within :data:`MPP_RANGE_UM`."""
    low, high = MPP_RANGE_UM
    if math.isfinite(mpp) and low <= mpp <= high:
        return None
    return (f"{mpp:g} µm/px from {source} is implausible for bright-field microscopy "
            f"(expected {low:g}-{high:g} µm/px)")


def require_colour(slide: Slide) -> None:
    """Raise unless the slide holds colour: a stain cannot be measured on a greyscale image.

    Parameters
    ----------
    slide : Slide
        An open slide. Readers of this module set ``greyscale`` when the file has one colour
        channel (grey, with or without alpha) or a palette of grey colours only; a slide object
        without that attribute counts as colour.

    Raises
    ------
    NotColourError
        The slide is a greyscale image.
    """
    if getattr(slide, "greyscale", False):
        msg = f"{slide.path.name}: greyscale image, not a colour-stained section"
        raise NotColourError(msg)


# --------------------------------------------------------------------------------------------
# Pixel normalisation
# --------------------------------------------------------------------------------------------


@dataclass
class _PixelFormat:
    """How to turn decoded samples into uint8 RGB (see module docstring)."""

    grey: bool = False
    alpha: str | None = None  # None, "straight" or "premultiplied"
    invert: bool = False  # MINISWHITE
    bgr: bool = False  # OpenCV channel order
    lut: np.ndarray | None = None  # palette: (n, 3) uint8
    scale: float | None = None  # 16-bit: multiply by this, round, clip to 0..255

    @property
    def no_colour(self) -> bool:
        """True for one grey channel or a palette whose colours are all grey."""
        if self.lut is not None:
            return bool((self.lut == self.lut[:, :1]).all())
        return self.grey

    def convert(self, raw: np.ndarray) -> np.ndarray:
        """Convert ``(h, w)`` or ``(h, w, s)`` decoded samples to uint8 RGB ``(h, w, 3)``."""
        if raw.ndim == 2:
            raw = raw[..., np.newaxis]
        if raw.dtype == bool:
            raw = raw.astype(np.uint8) * np.uint8(255)
        if self.lut is not None:
            index = np.minimum(raw[..., 0], len(self.lut) - 1)
            return self.lut[index]
        ncolour = 1 if self.grey else 3
        if (self.bgr and not self.grey and not self.invert and raw.dtype == np.uint8
                and raw.shape[-1] == 3):
            return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)  # a plain colour image: 4x faster
        colour = raw[..., :ncolour]
        alpha = raw[..., ncolour] if self.alpha is not None and raw.shape[-1] > ncolour else None
        if self.bgr and ncolour == 3:
            colour = colour[..., ::-1]
        if colour.dtype != np.uint8:
            scale = self.scale if self.scale is not None else 1.0 / 257.0
            colour = _to_uint8(colour, scale)
        if alpha is not None and alpha.dtype != np.uint8:
            alpha = _to_uint8(alpha, 1.0 / 257.0)
        if self.invert:
            colour = 255 - colour
        if ncolour == 1:
            colour = np.repeat(colour, 3, axis=-1)
        if alpha is not None and alpha.min() < 255:
            a = alpha.astype(np.float32)[..., np.newaxis] * np.float32(1 / 255)
            white = np.float32(255) * (1 - a)
            if self.alpha == "premultiplied":
                mixed = colour.astype(np.float32) + white
            else:
                mixed = colour.astype(np.float32) * a + white
            colour = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(colour, dtype=np.uint8)


def _to_uint8(values: np.ndarray, scale: float) -> np.ndarray:
    out = values.astype(np.float32) * np.float32(scale) + np.float32(0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def _scale_for_max(maximum: int) -> float:
    """Return the 16-bit → 8-bit factor for an image whose largest colour sample is ``maximum``."""
    if maximum >= 4096:
        return 1.0 / 257.0
    top = 1 << max(8, int(maximum).bit_length())  # maximum rounded up to a power of two
    return 255.0 / (top - 1)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------
# Base class: argument checks, white fill, thumbnail, context manager
# --------------------------------------------------------------------------------------------


class SlideBase:
    """Shared behaviour of the readers (and of :class:`fibroquant.shading.CorrectedSlide`):
    regions clipped to the level and padded white, thumbnails, closing; subclasses set
    their levels (``_set_levels``) and implement ``_read_inside``."""

    path: Path
    format: str
    mpp: float | None
    levels: tuple[Level, ...]
    reader: str | None = None  # the library reading the file, e.g. "tifffile"
    vendor: str | None = None
    compression: str | None = None
    tile_size: tuple[int, int] | None = None
    mpp_source: str | None = None
    greyscale: bool = False  # no colour in the file: see require_colour
    _closed: bool = False

    def _set_levels(
        self, shapes: list[tuple[int, int]], mpp: float | None, source: str | None
    ) -> None:
        self.mpp = mpp
        self.mpp_source = source if mpp is not None else None
        width0 = shapes[0][1]
        levels = []
        for shape in shapes:
            downsample = width0 / shape[1]
            levels.append(Level(shape, downsample, None if mpp is None else mpp * downsample))
        self.levels = tuple(levels)

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Read a rectangle of one level.

        Parameters
        ----------
        level : int
            Index into :attr:`levels` (0 = full resolution).
        y, x : int
            Top-left corner in that level's pixel coordinates (may be negative).
        h, w : int
            Size of the region in pixels (> 0).

        Returns
        -------
        numpy.ndarray
            uint8 RGB, shape ``(h, w, 3)``; pixels outside the image are 255 (white, like glass).

        Raises
        ------
        SlideReadError
            The file is truncated or a tile is corrupt.
        ValueError
            ``level`` out of range, non-positive size, or the slide is closed.
        """
        if self._closed:
            msg = f"{self.path.name}: read_region on a closed slide"
            raise ValueError(msg)
        level, y, x, h, w = int(level), int(y), int(x), int(h), int(w)
        if not 0 <= level < len(self.levels):
            msg = f"level must be in 0..{len(self.levels) - 1}, got {level=}"
            raise ValueError(msg)
        if h <= 0 or w <= 0:
            msg = f"region size must be positive, got {h=}, {w=}"
            raise ValueError(msg)
        height, width = self.levels[level].shape
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, height), min(x + w, width)
        if y0 >= y1 or x0 >= x1:
            return np.full((h, w, 3), 255, np.uint8)
        inside = self._read_inside(level, y0, x0, y1, x1)
        if (y0, x0, y1, x1) == (y, x, y + h, x + w):
            return inside
        out = np.full((h, w, 3), 255, np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = inside
        return out

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, target_mpp: float) -> np.ndarray:
        """Return the whole slide resampled to ``target_mpp``.

        Reads the coarsest level that is still at least as fine as ``target_mpp`` and resizes
        it with ``cv2.INTER_AREA`` to ``round(level0_shape * mpp / target_mpp)`` (at least
        1 pixel). When ``target_mpp <= mpp`` the level-0 image is returned unchanged.

        Parameters
        ----------
        target_mpp : float
            Wanted resolution in µm per pixel (> 0).

        Returns
        -------
        numpy.ndarray
            uint8 RGB ``(height, width, 3)``.

        Raises
        ------
        MissingResolutionError
            The slide's resolution is unknown.
        """
        if not (math.isfinite(target_mpp) and target_mpp > 0):
            msg = f"target_mpp must be a positive number of µm per pixel, got {target_mpp=}"
            raise ValueError(msg)
        mpp = require_mpp(self)
        height0, width0 = self.levels[0].shape
        if target_mpp <= mpp:
            return self.read_region(0, 0, 0, height0, width0)
        out_h = max(1, round(height0 * mpp / target_mpp))
        out_w = max(1, round(width0 * mpp / target_mpp))
        tolerance = target_mpp * 1e-9
        best = 0
        for index, level in enumerate(self.levels):
            if (level.mpp is not None and level.mpp <= target_mpp + tolerance
                    and level.mpp > (self.levels[best].mpp or 0.0)):
                best = index
        height, width = self.levels[best].shape
        if (height, width) == (out_h, out_w):
            return self.read_region(best, 0, 0, height, width)
        return cv2.resize(self._whole_level(best), (out_w, out_h), interpolation=cv2.INTER_AREA)

    def _whole_level(self, level: int) -> np.ndarray:
        """A whole level for a caller that only reads it (a resize): a reader that holds the
        level decoded returns it without a copy (read-only)."""
        height, width = self.levels[level].shape
        return self.read_region(level, 0, 0, height, width)

    def close(self) -> None:
        """Release the file and caches; further reads raise ``ValueError``."""
        self._closed = True

    def drop_cache(self) -> None:
        """Forget decoded pixels kept for later reads (decoded again if asked for): the
        pipeline calls it once a slide's tiles are measured. Nothing to forget here."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        shape = self.levels[0].shape if self.levels else None
        return (
            f"<{type(self).__name__} {self.path.name!r} format={self.format} "
            f"shape={shape} levels={len(self.levels)} mpp={self.mpp}>"
        )


# --------------------------------------------------------------------------------------------
# In-memory slides: ArraySlide (tests) and flat images (PNG, JPEG, BMP)
# --------------------------------------------------------------------------------------------


class ArraySlide(SlideBase):
    """An in-memory slide, for tests and for images already in memory.

    Parameters
    ----------
    rgb : numpy.ndarray
        uint8 (or uint16, scaled with a warning) image ``(h, w, 3)``, ``(h, w, 4)`` (alpha is
        composited over white) or ``(h, w)`` (expanded to RGB with a warning).
    mpp : float or None
        Level-0 µm per pixel, ``None`` when unknown.
    path : str or Path, optional
        Name reported in messages, default ``"array.png"``.
    levels : int, optional
        Number of pyramid levels; each further level halves the previous one with
        ``cv2.INTER_AREA`` (width and height floor-divided by 2, at least 1 pixel).
    """

    def __init__(
        self,
        rgb: np.ndarray,
        mpp: float | None,
        path: str | Path = "array.png",
        levels: int = 1,
    ) -> None:
        self.path = Path(path)
        self.format = "array"
        self.reader = "array"
        if levels < 1:
            msg = f"levels must be >= 1, got {levels=}"
            raise ValueError(msg)
        base, self.greyscale = _normalise_array(np.asarray(rgb), self.path.name, bgr=False)
        pyramid = [base]
        for _ in range(levels - 1):
            prev = pyramid[-1]
            size = (max(1, prev.shape[1] // 2), max(1, prev.shape[0] // 2))
            pyramid.append(cv2.resize(prev, size, interpolation=cv2.INTER_AREA))
        self._pyramid = pyramid
        self._set_levels([a.shape[:2] for a in pyramid], _check_mpp(mpp), "given")

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self._pyramid[level][y0:y1, x0:x1].copy()


def _normalise_array(array: np.ndarray, name: str, *, bgr: bool) -> tuple[np.ndarray, bool]:
    """Normalise a whole decoded image (OpenCV or caller array) to uint8 RGB, with warnings.

    Returns
    -------
    numpy.ndarray
        uint8 RGB ``(h, w, 3)``.
    bool
        Whether the image had one (grey) colour channel.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or array.size == 0:
        msg = f"{name}: image has shape {array.shape}; expected (height, width[, channels])"
        raise SlideReadError(msg)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels == 2:
        msg = f"{name}: 2-channel image is not supported (need grey, RGB or RGBA)"
        raise SlideReadError(msg)
    if channels > 4:
        msg = f"{name}: {channels}-channel image is not supported (need grey, RGB or RGBA)"
        raise SlideReadError(msg)
    _check_dims(name, array.shape[0], array.shape[1])
    fmt = _PixelFormat(grey=channels == 1, alpha="straight" if channels == 4 else None, bgr=bgr)
    if array.dtype == np.uint16:
        colour = array if channels < 4 else array[..., :3]
        maximum = int(colour.max())
        fmt.scale = _scale_for_max(maximum)
        _warn(
            f"{name}: 16-bit image scaled to 8 bit (maximum {maximum}, "
            f"factor {fmt.scale:.6g})"
        )
    elif array.dtype == bool:
        pass
    elif array.dtype != np.uint8:
        msg = f"{name}: {array.dtype} pixels are not supported (need 8- or 16-bit unsigned)"
        raise SlideReadError(msg)
    if channels == 1:
        _warn(f"{name}: greyscale image expanded to RGB (is this really a stained section?)")
    return fmt.convert(array), channels == 1


def _all_grey(rgb: np.ndarray) -> bool:
    """True when every pixel of a uint8 RGB image has R == G == B."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1])
                and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _check_dims(name: str, height: int, width: int) -> None:
    if height < 2 or width < 2:
        msg = f"{name}: image is only {width}x{height} pixels"
        raise SlideReadError(msg)


class _ImageSlide(SlideBase):
    """PNG, JPEG or BMP, decoded whole with OpenCV on first use and cached."""

    def __init__(self, path: Path, kind: str, data_size: int, override: float | None) -> None:
        self.path = path
        self.format = kind
        self.reader = "opencv"
        self.compression = {"png": "deflate", "jpeg": "jpeg", "bmp": None}[kind]
        self._lock = threading.Lock()
        self._image: np.ndarray | None = None
        with path.open("rb") as fh:
            head = fh.read(min(data_size, 1 << 20))
        parse = {"png": _png_header, "jpeg": _jpeg_header, "bmp": _bmp_header}[kind]
        height, width, file_mpp, source = parse(head, path.name)
        # PNG colour type (IHDR): 0 grey, 4 grey + alpha (OpenCV returns it as BGRA), 3 palette
        png_type = head[25] if kind == "png" else None
        self._grey_header = png_type in (0, 4)
        self._palette = png_type == 3
        # an 8-bit three-component JPEG is decoded straight to RGB (the same pixels as BGR
        # swapped afterwards, without the swap's pass over the image)
        self._rgb_jpeg = kind == "jpeg" and _jpeg_frame(head) == (8, 3)
        self._grey: bool | None = None
        if kind == "jpeg" and not _jpeg_has_end(path, data_size):
            msg = f"{path.name}: truncated JPEG (no end-of-image marker)"
            raise SlideReadError(msg)
        _check_dims(path.name, height, width)
        if height * width > _MAX_FLAT_PIXELS:
            msg = (
                f"{path.name}: {width}x{height} pixels is too large to decode as a flat "
                f"{_FORMAT_NAMES[kind]} (limit {_MAX_FLAT_PIXELS} pixels); save it as a tiled "
                "pyramidal TIFF"
            )
            raise SlideReadError(msg)
        mpp, source = (override, "given") if override is not None else (file_mpp, source)
        self._set_levels([(height, width)], mpp, source)

    def _decoded(self) -> np.ndarray:
        image = self._image
        if image is not None:
            return image
        with self._lock:
            if self._image is None:
                try:
                    data = np.fromfile(self.path, np.uint8)
                except OSError as exc:
                    msg = f"{self.path.name}: cannot read file ({exc.strerror or exc})"
                    raise SlideReadError(msg) from exc
                # (IMREAD_UNCHANGED ignores an EXIF orientation; so must the RGB decode)
                decoded = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
                                       if self._rgb_jpeg else cv2.IMREAD_UNCHANGED)
                if decoded is None:
                    msg = (
                        f"{self.path.name}: cannot decode {_FORMAT_NAMES[self.format]} "
                        "(corrupt or truncated file)"
                    )
                    raise SlideReadError(msg)
                image, one_channel = _normalise_array(decoded, self.path.name,
                                                      bgr=not self._rgb_jpeg)
                if image.shape[:2] != self.levels[0].shape:
                    msg = (
                        f"{self.path.name}: decoded size {image.shape[:2]} differs from the "
                        f"header's {self.levels[0].shape}"
                    )
                    raise SlideReadError(msg)
                self._grey = one_channel or (self._palette and _all_grey(image))
                self._image = image
            return self._image

    @property
    def greyscale(self) -> bool:  # type: ignore[override]
        """No colour in the file (decodes the image once, unless the PNG header tells)."""
        if self._grey_header:
            return True
        if self._grey is None:
            self._decoded()
        return bool(self._grey)

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self._decoded()[y0:y1, x0:x1].copy()

    def _whole_level(self, level: int) -> np.ndarray:
        if self._closed:
            return super()._whole_level(level)  # (raises as read_region does)
        view = self._decoded()[:]  # the decoded image, not copied (12 MB for a 2048² field)
        view.flags.writeable = False
        return view

    def close(self) -> None:
        """Drop the cached image."""
        super().close()
        self._image = None


def _plausible(mpp: float | None, what: str, name: str) -> float | None:
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        return None
    if mpp >= MAX_PLAUSIBLE_MPP:
        logger.debug("%s: ignoring %s of %.4g µm/px (a screen default, not a microscope)",
                     name, what, mpp)
        return None
    return mpp


def _png_header(head: bytes, name: str) -> tuple[int, int, float | None, str | None]:
    """Return (height, width, mpp, source) from the PNG IHDR and pHYs chunks."""
    if len(head) < 33 or head[12:16] != b"IHDR":
        msg = f"{name}: truncated or corrupt PNG header"
        raise SlideReadError(msg)
    width, height, depth, colour_type = struct.unpack(">IIBB", head[16:26])
    if colour_type in (0, 4):
        logger.debug("%s: greyscale PNG (%d-bit)", name, depth)
    mpp = None
    pos = 8
    while pos + 8 <= len(head):
        length, ctype = struct.unpack(">I4s", head[pos : pos + 8])
        if ctype in (b"IDAT", b"IEND"):
            break
        if ctype == b"pHYs" and length == 9 and pos + 17 <= len(head):
            ppu_x, _ppu_y, unit = struct.unpack(">IIB", head[pos + 8 : pos + 17])
            if unit == 1 and ppu_x > 0:  # pixels per metre
                mpp = _plausible(1e6 / ppu_x, "PNG pHYs density", name)
        pos += 12 + length
    return height, width, mpp, "PNG pHYs" if mpp is not None else None


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_segments(head: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, payload) of each of a JPEG's header segments, from its start up to its
    start-of-scan marker (not given) or the end of ``head``."""
    pos = 2
    while pos + 4 <= len(head) and head[pos] == 0xFF:
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length, no payload
            pos += 2
            continue
        if marker == 0xDA:
            return
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        yield marker, head[pos + 4 : pos + 2 + length]
        pos += 2 + length


def _jpeg_header(head: bytes, name: str) -> tuple[int, int, float | None, str | None]:
    """Return (height, width, mpp, source) from JPEG markers (JFIF APP0 density, SOF size)."""
    mpp: float | None = None
    for marker, segment in _jpeg_segments(head):
        if marker == 0xE0 and segment[:5] == b"JFIF\x00" and len(segment) >= 12:
            units, density_x, _density_y = struct.unpack(">BHH", segment[7:12])
            per_unit_um = {1: 25400.0, 2: 10000.0}.get(units)
            if per_unit_um is not None and density_x > 1:
                mpp = _plausible(per_unit_um / density_x, "JPEG JFIF density", name)
        elif marker in _SOF_MARKERS and len(segment) >= 6:
            _precision, height, width, _components = struct.unpack(">BHHB", segment[:6])
            return height, width, mpp, "JPEG JFIF density" if mpp is not None else None
    msg = f"{name}: corrupt JPEG (no frame header found)"
    raise SlideReadError(msg)


def _jpeg_frame(head: bytes) -> tuple[int, int] | None:
    """(sample precision, number of components) from a JPEG's start-of-frame marker; None
    when the header is not parsed to it."""
    for marker, segment in _jpeg_segments(head):
        if marker in _SOF_MARKERS and len(segment) >= 6:
            return segment[0], segment[5]
    return None


def _jpeg_has_end(path: Path, size: int) -> bool:
    with path.open("rb") as fh:
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    return b"\xff\xd9" in tail


def _bmp_header(head: bytes, name: str) -> tuple[int, int, float | None, str | None]:
    """Return (height, width, mpp, source) from a BMP BITMAPINFOHEADER."""
    if len(head) < 26:
        msg = f"{name}: truncated BMP header"
        raise SlideReadError(msg)
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<hh", head[18:22])
        return abs(height), width, None, None
    width, height = struct.unpack("<ii", head[18:26])
    mpp = None
    if len(head) >= 46:
        (ppm_x,) = struct.unpack("<i", head[38:42])
        if ppm_x > 0:
            mpp = _plausible(1e6 / ppm_x, "BMP density", name)
    return abs(height), width, mpp, "BMP pixels per metre" if mpp is not None else None


# --------------------------------------------------------------------------------------------
# TIFF (tifffile): flat, tiled, pyramids
# --------------------------------------------------------------------------------------------


class _TileCache:
    """Thread-safe cache of decoded segments, bounded by count and bytes (least recently used
    first out).

    A segment is decoded once however many threads ask for it at the same time
    (:meth:`fetch`), and kept only while some of it is unread: it drops out once the reads
    that took it have covered its area. The tile loop reads every pixel once, so a segment
    cut by tile edges is decoded once and freed when its last piece is read (a count-only LRU
    dropped segments a later tile row still needed: ~12 % of a 1-GP slide's segments were
    decoded twice). Reads that overlap (calibration samples, registration crops) only make a
    segment leave early, to be decoded again if asked for.
    """

    def __init__(self, max_items: int = _TILE_CACHE_ITEMS, max_bytes: int = _TILE_CACHE_BYTES):
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._unread: dict[tuple[int, int], int] = {}  # pixels of a kept segment not yet read
        self._pending: dict[tuple[int, int], _Decoding] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.max_items = max_items
        self.max_bytes = max_bytes

    def fetch(self, key: tuple[int, int], decode: Callable[[], np.ndarray], read_px: int
              ) -> np.ndarray:
        """The segment ``key`` (decoded by ``decode()`` unless cached or being decoded by
        another thread), of which the caller reads ``read_px`` pixels."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self._take(key, read_px)
                return value
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Decoding()
        assert pending is not None
        if not owner:
            pending.done.wait()
            if pending.value is None:  # the decoding thread failed: try (and fail) here
                return decode()
            with self._lock:
                if key in self._items:
                    self._take(key, read_px)
            return pending.value
        try:
            value = decode()
        except BaseException:
            with self._lock:
                del self._pending[key]
            pending.done.set()
            raise
        with self._lock:
            del self._pending[key]
            pending.value = value
            left = value.shape[0] * value.shape[1] - read_px
            if left > 0:
                self._put(key, value, left)
        pending.done.set()
        return value

    def _take(self, key: tuple[int, int], read_px: int) -> None:
        left = self._unread.get(key, 0) - read_px
        if left > 0:
            self._unread[key] = left
        else:
            self._drop(key)

    def _put(self, key: tuple[int, int], value: np.ndarray, unread_px: int) -> None:
        if value.nbytes > self.max_bytes:
            return
        self._drop(key)
        self._items[key] = value
        self._unread[key] = unread_px
        self._bytes += value.nbytes
        while len(self._items) > self.max_items or self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: tuple[int, int]) -> None:
        old = self._items.pop(key, None)
        self._unread.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._unread.clear()
            self._bytes = 0


class _Decoding:
    """A segment being decoded by one thread; the others asking for it wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: np.ndarray | None = None


class _TiffLevel:
    """One TIFF page read segment by segment (tiles or strips)."""

    def __init__(self, slide: _TiffSlide, page: Any, index: int) -> None:
        self.slide = slide
        self.index = index
        self.name = slide.path.name
        self.height = int(page.imagelength)
        self.width = int(page.imagewidth)
        if int(getattr(page, "imagedepth", 1) or 1) > 1:
            msg = f"{self.name}: volumetric TIFF (depth {page.imagedepth}) is not supported"
            raise SlideReadError(msg)
        self.tiled = bool(page.is_tiled)
        if self.tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            rows = int(page.rowsperstrip or self.height)
            self.seg_h, self.seg_w = max(1, min(rows, self.height)), self.width
        self.unit = "tile" if self.tiled else "strip"
        self.grid_h = math.ceil(self.height / self.seg_h)
        self.grid_w = math.ceil(self.width / self.seg_w)
        self.per_plane = self.grid_h * self.grid_w
        self.planes = int(page.samplesperpixel) if page.planarconfig == 2 else 1
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        self.total = self.per_plane * self.planes
        if len(self.offsets) < self.total or len(self.bytecounts) < self.total:
            msg = (
                f"{self.name}: damaged TIFF (level {index} lists {len(self.offsets)} of "
                f"{self.total} {self.unit}s)"
            )
            raise SlideReadError(msg)
        if self.seg_h * self.seg_w > _MAX_FLAT_PIXELS:
            msg = (
                f"{self.name}: a single {self.unit} of {self.seg_w}x{self.seg_h} pixels is too "
                "large to decode; re-save the file tiled"
            )
            raise SlideReadError(msg)
        self.fh = page.parent.filehandle  # multi-file OME: levels may live in other files
        self.file_size = int(self.fh.size)
        self.lock = slide.locks.setdefault(id(self.fh), threading.Lock())
        self.decode = page.decode  # tifffile's decoder closure (created here, in one thread)
        self.jpegtables = page.jpegtables
        self.jpegheader = getattr(page, "jpegheader", None)
        self.whole = not self.tiled and self.height * self.width <= _WHOLE_PAGE_PIXELS
        self._whole_image: np.ndarray | None = None
        self._whole_lock = threading.Lock()

    # raw segments --------------------------------------------------------------------------

    def raw_segment(self, index: int) -> np.ndarray | None:
        """Return decoded samples ``(h, w, s)`` of segment ``index`` cropped to the image."""
        offset = int(self.offsets[index])
        count = int(self.bytecounts[index])
        if count == 0 or offset == 0:
            return None  # sparse segment: rendered white
        label = f"{self.unit} {index + 1} of {self.total}"
        if offset + count > self.file_size:
            msg = f"{self.name}: truncated TIFF ({label} unreadable, beyond the end of the file)"
            raise SlideReadError(msg)
        data = self.slide.read_bytes(self.fh, self.lock, offset, count)
        if len(data) < count:
            msg = f"{self.name}: truncated TIFF ({label} unreadable)"
            raise SlideReadError(msg)
        try:
            segment, _indices, _shape = self.decode(
                data, index, jpegtables=self.jpegtables, jpegheader=self.jpegheader
            )
        except Exception as exc:
            msg = f"{self.name}: corrupt TIFF ({label} at level {self.index} cannot be decoded: {exc})"
            raise SlideReadError(msg) from exc
        if segment is None:
            return None
        segment = segment[0]
        row, col = divmod(index % self.per_plane, self.grid_w)
        h = min(self.seg_h, self.height - row * self.seg_h)
        w = min(self.seg_w, self.width - col * self.seg_w)
        if segment.shape[0] < h or segment.shape[1] < w:
            msg = (
                f"{self.name}: corrupt TIFF ({label} at level {self.index} decodes to "
                f"{segment.shape[1]}x{segment.shape[0]} pixels, expected {w}x{h})"
            )
            raise SlideReadError(msg)
        return segment[:h, :w]

    def segment_rgb(self, index: int) -> np.ndarray:
        """Return segment ``index`` (0 .. grid_h * grid_w - 1) as uint8 RGB."""
        parts = [self.raw_segment(plane * self.per_plane + index) for plane in range(self.planes)]
        row, col = divmod(index, self.grid_w)
        h = min(self.seg_h, self.height - row * self.seg_h)
        w = min(self.seg_w, self.width - col * self.seg_w)
        arrays = [part for part in parts if part is not None]
        if len(arrays) < len(parts):
            return np.full((h, w, 3), 255, np.uint8)
        raw = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
        return self.slide.pixel_format.convert(raw)

    # regions -------------------------------------------------------------------------------

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        if self.whole:
            return self._whole()[y0:y1, x0:x1].copy()
        return self._assemble(y0, x0, y1, x1, use_cache=True)

    def _assemble(self, y0: int, x0: int, y1: int, x1: int, *, use_cache: bool) -> np.ndarray:
        # segments go through the cache, which keeps one only while part of it is unread
        # (_TileCache.fetch): a grid of regions (the tile loop) decodes each segment once
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        cache = self.slide.cache
        for row in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            ty = row * self.seg_h
            sy0, sy1 = max(y0, ty), min(y1, ty + self.seg_h, self.height)
            for col in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                tx = col * self.seg_w
                sx0, sx1 = max(x0, tx), min(x1, tx + self.seg_w, self.width)
                index = row * self.grid_w + col
                if use_cache:
                    tile = cache.fetch((self.index, index), partial(self.segment_rgb, index),
                                       (sy1 - sy0) * (sx1 - sx0))
                else:
                    tile = self.segment_rgb(index)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx
                ]
        return out

    def _whole(self) -> np.ndarray:
        image = self._whole_image
        if image is not None:
            return image
        with self._whole_lock:
            if self._whole_image is None:
                self._whole_image = self._assemble(0, 0, self.height, self.width, use_cache=False)
            return self._whole_image

    def raw_max(self, channels: int) -> int:
        """Largest colour sample of the whole level (for 16-bit scaling)."""
        maximum = 0
        for plane in range(min(self.planes, channels)):
            for index in range(self.per_plane):
                seg = self.raw_segment(plane * self.per_plane + index)
                if seg is not None:
                    maximum = max(maximum, int(seg[..., :channels].max()))
        return maximum


_OPENSLIDE_TIFFS = ("philips", "bif", "scn")
"""TIFF flavours (tifffile's ``is_*`` flags) read with OpenSlide: Philips (µm/px in its own
XML), Ventana BIF (overlapping tiles to stitch) and Leica SCN (several images per file)."""


class _OtherReader(Exception):
    """Raised by a reader that finds the file is better read by another one."""

    def __init__(self, reader: str, flavour: str) -> None:
        super().__init__(f"{flavour} file: read with {reader}")
        self.reader = reader
        self.flavour = flavour


class _TiffSlide(SlideBase):
    """A TIFF of any flavour read through tifffile, tile by tile."""

    def __init__(self, path: Path, file_size: int, override: float | None) -> None:
        import tifffile

        self.path = path
        self.reader = "tifffile"
        self.file_size = file_size
        self.cache = _TileCache()
        self.locks: dict[int, threading.Lock] = {}  # one per tifffile file handle, set in _init
        name = path.name
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as exc:
            msg = f"{name}: not a readable TIFF ({_short(exc)})"
            raise SlideReadError(msg) from exc
        try:
            self._init(tifffile, override)  # not shared with other threads yet: no lock needed
        except (SlideReadError, _OtherReader):
            self._tif.close()
            raise
        except Exception as exc:
            self._tif.close()
            msg = f"{name}: damaged or unsupported TIFF ({_short(exc)})"
            raise SlideReadError(msg) from exc

    def _init(self, tifffile: Any, override: float | None) -> None:
        tif = self._tif
        name = self.path.name
        if not tif.pages or len(tif.pages) == 0:
            msg = f"{name}: TIFF has no images"
            raise SlideReadError(msg)
        flavour = next((f for f in _OPENSLIDE_TIFFS if getattr(tif, f"is_{f}", False)), None)
        if flavour is not None:
            raise _OtherReader("openslide", flavour)
        pages = _pyramid_pages(tif)
        if not pages:
            msg = f"{name}: TIFF has no readable image"
            raise SlideReadError(msg)
        base = pages[0]
        _check_dims(name, int(base.imagelength), int(base.imagewidth))
        self.pixel_format, channels = _tiff_pixel_format(base, name)
        self.greyscale = self.pixel_format.no_colour
        for page in pages[1:]:
            if (page.samplesperpixel, page.photometric, page.dtype) != (
                base.samplesperpixel,
                base.photometric,
                base.dtype,
            ):
                msg = f"{name}: pyramid levels differ in pixel type; cannot read as one slide"
                raise SlideReadError(msg)
        self._levels = [_TiffLevel(self, page, i) for i, page in enumerate(pages)]
        if base.dtype == np.uint16:
            self.pixel_format.scale = self._scale_16bit(channels)
        if tif.is_svs:
            self.format, self.vendor = "svs", "aperio"
        elif tif.is_ndpi:
            self.format, self.vendor = "ndpi", "hamamatsu"
        elif tif.is_ome:
            self.format, self.vendor = "ome-tiff", None
        else:
            self.format = "tiff-pyramid" if len(pages) > 1 else "tiff"
        try:
            self.compression = tifffile.COMPRESSION(base.compression).name.lower()
        except ValueError:
            self.compression = str(int(base.compression))
        self.tile_size = (int(base.tilelength), int(base.tilewidth)) if base.is_tiled else None
        mpp: float | None
        source: str | None
        if override is not None:
            mpp, source = override, "given"
        else:
            mpp, source = _tiff_mpp(tif, base, name)
        self._set_levels([(lv.height, lv.width) for lv in self._levels], mpp, source)

    def _scale_16bit(self, channels: int) -> float:
        name = self.path.name
        coarsest = self._levels[-1]
        if coarsest.height * coarsest.width <= _MAX_SCAN_PIXELS:
            maximum = coarsest.raw_max(channels)
            scale = _scale_for_max(maximum)
            detail = f"maximum {maximum}"
        else:
            scale, detail = 1.0 / 257.0, "full 16-bit range assumed"
        _warn(f"{name}: 16-bit image scaled to 8 bit ({detail}, factor {scale:.6g})")
        return scale

    def read_bytes(self, fh: Any, lock: threading.Lock, offset: int, count: int) -> bytes:
        """Read ``count`` bytes at ``offset`` of tifffile handle ``fh`` under its ``lock``."""
        with lock:
            if self._closed:
                msg = f"{self.path.name}: read on a closed slide"
                raise ValueError(msg)
            try:
                fh.seek(offset)
                return bytes(fh.read(count))
            except OSError as exc:
                msg = f"{self.path.name}: cannot read file ({exc.strerror or exc})"
                raise SlideReadError(msg) from exc

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self._levels[level].read(y0, x0, y1, x1)

    def drop_cache(self) -> None:
        """Drop the decoded segments kept for reads yet to come (after the tile loop, up to
        ``_TILE_CACHE_ITEMS`` segments partly read at the tissue's edge: 60 MB on a 1-GP slide)."""
        self.cache.clear()

    def close(self) -> None:
        """Close the file handle and drop cached tiles."""
        locks = list(self.locks.values())
        for lock in locks:  # wait for reads in progress
            lock.acquire()
        try:
            if not self._closed:
                self._closed = True
                self._tif.close()
        finally:
            for lock in locks:
                lock.release()
        self.cache.clear()


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _pyramid_pages(tif: Any) -> list[Any]:
    """Return the key pages of the main pyramid, finest first (label/macro/thumbnail skipped)."""
    series = [s for s in tif.series if s.name not in ("Label", "Macro", "Thumbnail", "Map")]
    if not series:
        return []
    main = series[0]
    for candidate in series[1:]:
        if _area(candidate.keyframe) > _area(main.keyframe):
            main = candidate
    pages = [lvl.keyframe for lvl in main.levels]
    if len(main.shape) > len(main.keyframe.shape):
        logger.info("%s: series has shape %s; reading its first plane only",
                    tif.filehandle.name, main.shape)
    if len(pages) == 1 and not (tif.is_svs or tif.is_ndpi or tif.is_ome):
        # generic pyramids stored as separate (reduced) pages / series
        for candidate in series:
            page = candidate.keyframe
            if candidate is main or not _is_reduced_copy(pages[0], page):
                continue
            if all(int(p.imagewidth) != int(page.imagewidth) for p in pages):
                pages.append(page)
    pages.sort(key=lambda p: -int(p.imagewidth))
    return pages


def _area(page: Any) -> int:
    return int(page.imagelength) * int(page.imagewidth)


def _is_reduced_copy(base: Any, page: Any) -> bool:
    """True when ``page`` looks like a downsampled copy of ``base`` (same aspect, pixel type)."""
    w0, h0, w, h = (int(base.imagewidth), int(base.imagelength),
                    int(page.imagewidth), int(page.imagelength))
    if w >= w0 or h >= h0 or w < 1 or h < 1:
        return False
    if (page.samplesperpixel, page.dtype) != (base.samplesperpixel, base.dtype):
        return False
    ds_x, ds_y = w0 / w, h0 / h
    return abs(ds_x - ds_y) <= 0.02 * ds_x + 2.0 / min(w, h)


def _tiff_pixel_format(page: Any, name: str) -> tuple[_PixelFormat, int]:
    """Return the pixel format of a TIFF page and its number of colour channels; warn/raise."""
    dtype = page.dtype
    photometric = int(page.photometric)
    samples = int(page.samplesperpixel)
    if dtype is None or (dtype != bool and dtype not in (np.uint8, np.uint16)):
        msg = (
            f"{name}: {dtype if dtype is not None else 'unknown'} pixels are not supported "
            f"({page.bitspersample}-bit, sample format {int(page.sampleformat)}; "
            "need 8- or 16-bit unsigned)"
        )
        raise SlideReadError(msg)
    fmt = _PixelFormat()
    if photometric in (0, 1):  # MINISWHITE, MINISBLACK
        channels = 1
        fmt.grey = True
        fmt.invert = photometric == 0
    elif photometric == 2:  # RGB
        channels = 3
    elif photometric == 6:  # YCbCr: tifffile/imagecodecs return RGB for JPEG-type codecs
        if int(page.compression) not in _JPEG_COMPRESSIONS:
            msg = f"{name}: YCbCr TIFF without JPEG compression is not supported"
            raise SlideReadError(msg)
        channels = 3
    elif photometric == 3:  # PALETTE
        channels = 1
        colormap = page.colormap
        if colormap is None:
            msg = f"{name}: palette TIFF without a colormap"
            raise SlideReadError(msg)
        cmap = np.asarray(colormap)
        if cmap.max() > 255:
            cmap = np.clip(np.round(cmap / 257.0), 0, 255)
        fmt.lut = np.ascontiguousarray(cmap.T.astype(np.uint8))
    elif photometric == 5:
        msg = f"{name}: CMYK (separated) TIFF is not supported; save it as RGB"
        raise SlideReadError(msg)
    else:
        msg = f"{name}: TIFF photometric interpretation {page.photometric!s} is not supported"
        raise SlideReadError(msg)
    extra = samples - channels
    if extra < 0:
        msg = f"{name}: TIFF has {samples} sample(s) per pixel but {channels} colour channels"
        raise SlideReadError(msg)
    if extra >= 1:
        kinds = tuple(int(e) for e in (page.extrasamples or ()))
        kind = kinds[0] if kinds else 0
        if samples > 4 or extra > 1:
            msg = f"{name}: {samples}-channel image is not supported (need grey, RGB or RGBA)"
            raise SlideReadError(msg)
        if channels == 1 and kind == 0:
            msg = f"{name}: 2-channel image is not supported (need grey, RGB or RGBA)"
            raise SlideReadError(msg)
        if fmt.lut is not None:
            msg = f"{name}: palette TIFF with extra samples is not supported"
            raise SlideReadError(msg)
        fmt.alpha = "premultiplied" if kind == 1 else "straight"
    if fmt.grey:
        _warn(f"{name}: greyscale image expanded to RGB (is this really a stained section?)")
    return fmt, channels


_SVS_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_LENGTH_UM = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "\\u00b5m": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
    "inch": 25400.0, "in": 25400.0,
}  # fmt: skip


#: How the micro sign reaches us when a file's text was written in one encoding and read in
#: another (UTF-8 read as Latin-1 or CP1252, the Greek mu, a Java escape, a lost character).
_MICRO_SPELLINGS = ("\\u00b5", "\\u03bc", "âµ", "î¼", "\u03bc", "\ufffd")


def length_unit_um(unit: str) -> float | None:
    """Micrometres in one ``unit`` of a metadata length (ImageJ ``unit=``, OME
    ``PhysicalSizeXUnit``), or None when not a length unit.

    Understands ``micron``, ``µm``, ``um``, ``nm``, ``mm``, ``cm``, ``m``, ``inch`` and the
    micro sign mis-encoded as ImageJ and other tools leave it (``\\u00b5m``, ``Âµm``,
    ``\xb5m`` read as Latin-1, Greek ``μm``).

    Examples
    --------
    >>> length_unit_um("Âµm"), length_unit_um("nm"), length_unit_um("pixel")
    (1.0, 0.001, None)
    """
    text = unit.strip().strip("\"'").strip().lower()
    for spelling in _MICRO_SPELLINGS:
        text = text.replace(spelling, "µ")
    return _LENGTH_UM.get(text)


def _imagej_unit(description: str) -> str | None:
    """The ``unit=`` of an ImageJ description (first page), or None."""
    if not description.startswith("ImageJ="):
        return None
    match = re.search(r"^unit=(.*)$", description, re.MULTILINE)
    return match.group(1) if match else None


def _tiff_mpp(tif: Any, page: Any, name: str) -> tuple[float | None, str | None]:
    """Return (level-0 µm per pixel, where it came from) of a TIFF, or (None, None)."""
    mpp: float | None
    description = page.description or ""
    if tif.is_svs:
        match = _SVS_MPP.search(description)
        if match:
            mpp = float(match.group(1))
            if mpp > 0:
                return mpp, "Aperio MPP"
    if tif.is_ome:
        mpp = _ome_mpp(tif.pages[0].description or description, name)
        if mpp is not None:
            return mpp, "OME PhysicalSizeX"
    tags = page.tags
    xres = tags.valueof(282)  # XResolution (numerator, denominator) pixels per unit
    pixels_per_unit = None
    if isinstance(xres, tuple) and len(xres) == 2 and xres[0] > 0 and xres[1] > 0:
        pixels_per_unit = xres[0] / xres[1]
    elif isinstance(xres, int | float) and xres > 0:
        pixels_per_unit = float(xres)
    if pixels_per_unit is None:
        return None, None
    unit = _imagej_unit(tif.pages[0].description or description)
    if unit is not None:
        factor = length_unit_um(unit)
        mpp = _plausible(factor / pixels_per_unit, "ImageJ resolution", name) if factor else None
        if mpp is not None:
            return mpp, f"ImageJ resolution ({unit.strip()})"
    res_unit = int(tags.valueof(296, 2))  # ResolutionUnit; TIFF default is inch
    unit_um = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(res_unit)
    if unit_um is None:
        return None, None
    mpp = _plausible(unit_um / pixels_per_unit, "TIFF resolution", name)
    if mpp is None:
        return None, None
    unit_name = {2: "inch", 3: "cm", 4: "mm", 5: "µm"}[res_unit]
    return mpp, f"TIFF resolution tags ({unit_name})"


def _ome_mpp(xml_text: str, name: str) -> float | None:
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        logger.warning("%s: OME-XML cannot be parsed; resolution unknown", name)
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels":
            size = element.get("PhysicalSizeX")
            unit = element.get("PhysicalSizeXUnit", "µm")  # OME's default unit
            if size is None:
                return None
            factor = length_unit_um(unit)
            try:
                value = float(size)
            except ValueError:
                return None
            if factor is None or value <= 0:
                logger.warning("%s: OME PhysicalSizeX unit %r not understood", name, unit)
                return None
            return value * factor
    return None


# --------------------------------------------------------------------------------------------
# Factory, folder listing, inspection
# --------------------------------------------------------------------------------------------


def _check_mpp(mpp: float | None) -> float | None:
    if mpp is None:
        return None
    value = float(mpp)
    if not (math.isfinite(value) and value > 0):
        msg = f"mpp must be a positive number of µm per pixel, got {mpp=}"
        raise ValueError(msg)
    return value


def _sniff(head: bytes) -> str | None:
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM":
        return "bmp"
    return None


def open_slide(path: str | Path | np.ndarray, *, mpp: float | None = None) -> Slide:
    """Open a slide or image file, or an image already in memory.

    Parameters
    ----------
    path : str, Path or ndarray
        Slide file: ``.svs``, ``.ndpi``, ``.tif``/``.tiff`` (OME-TIFF, BigTIFF pyramids, flat),
        ``.btf``, ``.png``, ``.jpg``/``.jpeg``, ``.bmp``; ``.mrxs``, ``.scn``, ``.czi``,
        ``.vms``, ``.vmu``, ``.bif`` (and Philips, Leica, Ventana TIFFs) with OpenSlide;
        DICOM WSI: a ``.dcm`` file (with the other files of its pyramid beside it) or a folder
        of them, with wsidicom. An RGB array (as
        :class:`ArraySlide` takes it) needs ``mpp``.
    mpp : float, optional
        Level-0 µm per pixel overriding the file's metadata (all levels scale with their
        downsample). When neither the file nor this gives a resolution the slide opens with
        ``mpp=None``; call :func:`require_mpp` where a resolution is needed.

    Returns
    -------
    Slide
        An open reader; use it as a context manager or call ``close()``.

    Raises
    ------
    SlideReadError
        Missing, empty, unsupported, corrupt or truncated file (the message names the file).
    ValueError
        ``mpp`` is not a positive number, or missing for an array.
    """
    if isinstance(path, np.ndarray):
        if mpp is None:
            msg = "an image array has no resolution: give mpp (µm per pixel)"
            raise ValueError(msg)
        return ArraySlide(path, mpp)
    path = Path(path)
    override = _check_mpp(mpp)
    name = path.name
    suffix = path.suffix.lower()
    if not path.exists():
        msg = f"{name}: file not found ({path})"
        raise SlideReadError(msg)
    if path.is_dir():
        if _holds_dicom(path):
            return _open_with("wsidicom", path, override)
        msg = f"{name}: is a folder, not a slide file (nor a folder of DICOM .dcm files)"
        raise SlideReadError(msg)
    for reader, (_module, suffixes) in READER_MODULES.items():
        if suffix in suffixes:
            return _open_with(reader, path, override)
    if suffix not in SUPPORTED_SUFFIXES:
        supported = " ".join(sorted(SUPPORTED_SUFFIXES))
        msg = f"{name}: unsupported file type {suffix or '(no suffix)'!r} (supported: {supported})"
        raise SlideReadError(msg)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        msg = f"{name}: cannot read file ({exc.strerror or exc})"
        raise SlideReadError(msg) from exc
    if size == 0:
        msg = f"{name}: empty file (0 bytes)"
        raise SlideReadError(msg)
    expected = _SUFFIX_KIND[suffix]
    kind = _sniff(head)
    if kind is None:
        msg = f"{name}: not a {_FORMAT_NAMES[expected]} file (unrecognised content {head[:8]!r})"
        raise SlideReadError(msg)
    if kind != expected:
        logger.warning("%s: file content is %s, not %s; reading it as %s",
                       name, _FORMAT_NAMES[kind], _FORMAT_NAMES[expected], _FORMAT_NAMES[kind])
    if kind == "tiff":
        try:
            return _TiffSlide(path, size, override)
        except _OtherReader as other:
            logger.debug("%s: %s", name, other)
            return _open_with(other.reader, path, override)
    return _ImageSlide(path, kind, size, override)


def _open_with(reader: str, path: Path, override: float | None) -> Slide:
    """Open ``path`` with a reader of :data:`READER_MODULES` (imported on first use)."""
    import importlib

    module = importlib.import_module(READER_MODULES[reader][0])
    slide: Slide = module.open_path(path, override)
    return slide


def _holds_dicom(folder: Path) -> bool:
    """Whether a folder directly holds ``.dcm`` files (a DICOM WSI folder)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.is_file() and Path(e.name).suffix.lower() in DICOM_SUFFIXES
                       for e in entries)
    except OSError:
        return False


def is_output_folder(folder: str | Path, names: list[str] | None = None) -> bool:
    """Whether a folder is a fibroquant output folder (its overlays and plots are not slides).

    It is when it holds the results store or the run lock (:data:`OUTPUT_MARKERS`), or a
    ``run.json`` written by ``fibroquant analyze``.

    Parameters
    ----------
    folder : str or Path
    names : list of str, optional
        The folder's file names, when already listed (saves a lookup per marker).
    """
    folder = Path(folder)
    if names is None:
        present = {m for m in (*OUTPUT_MARKERS, "run.json") if (folder / m).is_file()}
    else:
        present = set(names)
    if present & set(OUTPUT_MARKERS):
        return True
    if "run.json" not in present:
        return False
    try:
        with (folder / "run.json").open("rb") as fh:
            data = json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.keys() >= _RUN_JSON_KEYS


def list_slides(folder: str | Path) -> list[Path]:
    """List slide files under a folder.

    Recursive, sorted, by suffix (case-insensitive, :data:`SUPPORTED_SUFFIXES`); hidden files and
    folders (name starting with ``.``) are skipped, and so are the ``.jpg`` parts of Hamamatsu
    ``.vms``/``.vmu`` slides (folders holding a ``.vms``/``.vmu`` file list only that file), the files of a
DICOM WSI beyond its level-0 file (one ``.dcm`` file per series, see
:func:`fibroquant.read_dicom.representatives`), and
    every sub-folder that is a fibroquant output folder (:func:`is_output_folder`), e.g. the
    results of an earlier run kept inside the slides folder.

    Parameters
    ----------
    folder : str or Path
        Folder to search.

    Returns
    -------
    list of Path
        Paths below ``folder`` (joined to it), sorted.

    Raises
    ------
    SlideReadError
        ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"{folder.name or folder}: slides folder not found or not a folder"
        raise SlideReadError(msg)
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        if root != str(folder) and is_output_folder(root, files):
            logger.info("%s: a fibroquant output folder, not searched for slides", root)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = [f for f in files if not f.startswith(".")]
        suffixes = {Path(f).suffix.lower() for f in names}
        has_vms = bool(suffixes & {".vms", ".vmu"})
        dicom = [Path(root) / f for f in names if Path(f).suffix.lower() in DICOM_SUFFIXES]
        if dicom:  # one slide per DICOM series: its level-0 file
            from fibroquant.read_dicom import representatives

            found.extend(representatives(dicom))
        for fname in names:
            suffix = Path(fname).suffix.lower()
            if suffix not in SUPPORTED_SUFFIXES or suffix in DICOM_SUFFIXES:
                continue
            if has_vms and suffix in (".jpg", ".jpeg"):
                continue
            found.append(Path(root) / fname)
    return sorted(found)


def inspect_slide(path: str | Path, mpp: float | None = None) -> dict[str, Any]:
    """Describe a slide file without reading its pixels (flat images are not decoded).

    Parameters
    ----------
    path : str or Path
        Slide file.
    mpp : float, optional
        Level-0 µm per pixel overriding the file's metadata.

    Returns
    -------
    dict
        ``path`` (str), ``name``, ``format``, ``reader`` (the library reading the file:
        ``tifffile``, ``openslide``, ``wsidicom``, ``opencv``), ``vendor`` (str or None),
        ``mpp`` (level-0 µm per
        pixel or None), ``mpp_source`` (where the resolution came from, or None),
        ``levels`` (list of dicts with ``shape`` [height, width] in pixels, ``downsample`` and
        ``mpp``), ``compression`` (str or None), ``tile_size`` ([height, width] in pixels, or
        None for strips and flat images) and ``file_size_bytes`` (int).

    Raises
    ------
    SlideReadError
        As :func:`open_slide`.
    """
    path = Path(path)
    with open_slide(path, mpp=mpp) as slide:
        tile = getattr(slide, "tile_size", None)
        return {
            "path": str(path),
            "name": path.name,
            "format": slide.format,
            "reader": getattr(slide, "reader", None),
            "vendor": getattr(slide, "vendor", None),
            "mpp": slide.mpp,
            "mpp_source": getattr(slide, "mpp_source", None),
            "levels": [
                {"shape": list(level.shape), "downsample": level.downsample, "mpp": level.mpp}
                for level in slide.levels
            ],
            "compression": getattr(slide, "compression", None),
            "tile_size": list(tile) if tile else None,
            "file_size_bytes": _size_bytes(path),
        }


def _size_bytes(path: Path) -> int:
    """A file's size, or the total size of the files directly in a folder (a DICOM WSI)."""
    if path.is_dir():
        with os.scandir(path) as entries:
            return sum(e.stat().st_size for e in entries if e.is_file())
    return path.stat().st_size
