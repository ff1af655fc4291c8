"""The OpenSlide reader: vendor formats tifffile does not read (or not correctly).

MIRAX (``.mrxs``), Leica (``.scn``), Zeiss (``.czi``), Hamamatsu VMS/VMU, Ventana BIF and Philips
TIFF go through `OpenSlide <https://openslide.org>`_ (the ``openslide-python`` package with the
``openslide-bin`` wheel, both regular dependencies). Aperio SVS, NDPI and OME/generic TIFFs keep
the tifffile fast path of :mod:`fibroquant.slides`; ``tests/test_readers.py`` checks that both
readers give the same levels, µm per pixel and pixels on the same files.

The resolution is OpenSlide's ``openslide.mpp-x`` property, which OpenSlide fills only from
the vendor's metadata; without it the slide opens with ``mpp=None`` (never a guess).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fibroquant.errors import SlideReadError
from fibroquant.slides import SlideBase, _PixelFormat, _short

__all__ = ["READER", "SUFFIXES", "OpenSlideSlide", "open_path"]

READER = "openslide"
"""The reader's name, as ``fibroquant inspect`` reports it."""
SUFFIXES = frozenset({".mrxs", ".scn", ".czi", ".vms", ".vmu", ".bif"})
"""File suffixes that always go through OpenSlide."""

_FORMATS = {"aperio": "svs", "hamamatsu": "ndpi", "mirax": "mrxs", "leica": "scn", "zeiss": "czi",
            "ventana": "bif", "philips": "philips-tiff", "generic-tiff": "tiff", "dicom": "dicom",
            "sakura": "svslide", "trestle": "trestle-tiff"}
"""The ``format`` reported for each OpenSlide vendor (the file format, as tifffile's reader
names it where both read the file)."""
_RGBA = _PixelFormat(alpha="straight")  # openslide-python un-premultiplies ARGB for us


def _openslide(path: Path) -> Any:
    """Import openslide, or say what to install (the wheels cover Linux, macOS and Windows)."""
    try:
        import openslide
    except (ImportError, OSError) as exc:
        msg = (
            f"{path.name}: {path.suffix.lower() or 'this file'} needs OpenSlide, which did not "
            f"load ({_short(exc)}): pip install openslide-python openslide-bin"
        )
        raise SlideReadError(msg) from exc
    return openslide


class OpenSlideSlide(SlideBase):
    """A slide read through OpenSlide (thread-safe itself: no lock needed).

    Parameters
    ----------
    path : Path
        The slide file (for MIRAX the ``.mrxs`` file beside its data folder).
    override : float or None
        Level-0 µm per pixel given by the user, replacing the file's.

    Raises
    ------
    SlideReadError
        OpenSlide is missing or cannot open the file.
    """

    reader = READER

    def __init__(self, path: Path, override: float | None) -> None:
        self.path = path
        openslide = _openslide(path)
        try:
            self._osr = openslide.OpenSlide(str(path))
        except Exception as exc:
            msg = f"{path.name}: openslide cannot open this {path.suffix.lower()} file ({_short(exc)})"
            raise SlideReadError(msg) from exc
        props = self._osr.properties
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self.format = _FORMATS.get(self.vendor or "", self.vendor or "openslide")
        if self.vendor == "hamamatsu":  # NDPI, or VMS/VMU (a set of JPEG files)
            self.format = path.suffix.lower().lstrip(".") or self.format
        tile_w = props.get("openslide.level[0].tile-width")
        tile_h = props.get("openslide.level[0].tile-height")
        if tile_w and tile_h:
            self.tile_size = (int(tile_h), int(tile_w))
        mpp: float | None
        if override is not None:
            mpp, source = override, "given"
        else:
            mpp, source = metadata_mpp(props), f"openslide mpp-x ({self.vendor})"
        dims = self._osr.level_dimensions
        self._downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self._set_levels([(int(h), int(w)) for w, h in dims], mpp, source)

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        # OpenSlide takes the region's corner in level-0 pixels and its size in level pixels
        ds = self._downsamples[level]
        try:
            image = self._osr.read_region(
                (round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0)
            )
        except Exception as exc:
            msg = f"{self.path.name}: openslide read failed at level {level} ({_short(exc)})"
            raise SlideReadError(msg) from exc
        return _RGBA.convert(np.asarray(image))

    def close(self) -> None:
        """Close the OpenSlide handle."""
        if not self._closed:
            self._closed = True
            self._osr.close()


def metadata_mpp(properties: Any) -> float | None:
    """Level-0 µm per pixel from OpenSlide's ``openslide.mpp-x`` property, or None.

    Parameters
    ----------
    properties : mapping of str to str
        ``OpenSlide.properties``.
    """
    try:
        value = float(properties.get("openslide.mpp-x", "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def open_path(path: Path, override: float | None) -> OpenSlideSlide:
    """Open ``path`` with OpenSlide (the registry's entry point, see :func:`slides.open_slide`)."""
    return OpenSlideSlide(path, override)
