"""Rendering of results: QC overlays, plots, spreadsheets, GeoJSON and the HTML report.

Everything here is pure rendering from the tables the pipeline writes (``slides.csv``,
``mice.csv``, ``groups.csv``) and from small low-resolution masks; no image analysis happens
here. Every file is written atomically (a temporary file in the destination folder, then
:func:`os.replace`), so a crash never leaves a half-written output behind.

Conventions
-----------
* Images are uint8 RGB ``(H, W, 3)``; masks are bool ``(H, W)``.
* Mask pixel ``(row, col)`` covers the square ``[col, col + 1] x [row, row + 1]`` (pixel-corner
  convention); GeoJSON coordinates are ``x = col * scale``, ``y = row * scale`` in full-resolution
  pixels of the slide, which is what QuPath expects when importing annotations.
* Colours come from the Okabe-Ito palette, which stays distinguishable with colour-vision
  deficiencies.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd

from fibroquant import exclusions, schema
from fibroquant.bitmask import BitMask
from fibroquant.cores import release_free_heap
from fibroquant.errors import FibroquantError
from fibroquant.outdir import atomic_write_bytes, json_default

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from shapely.geometry.base import BaseGeometry

__all__ = [
    "COLLAGEN_OUTLINE_ON_BLUE_RGB",
    "COLLAGEN_OUTLINE_ON_RED_RGB",
    "OKABE_ITO",
    "TISSUE_OUTLINE_RGB",
    "format_p",
    "mask_to_geojson",
    "plot_groups",
    "plot_slides",
    "plot_stain_qc",
    "qc_overlay",
    "write_geojson",
    "write_mask_geojson",
    "write_png",
    "write_report_html",
    "write_xlsx",
]

#: Okabe & Ito (2008) colour-blind-safe palette, in the order used for groups.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

#: Tissue outline: black contrasts with white glass and lumens, yellow picric-acid cytoplasm
#: (Sirius red) and red cytoplasm (Masson trichrome).
TISSUE_OUTLINE_RGB: tuple[int, int, int] = (0, 0, 0)
#: Collagen outline on red collagen (Sirius red): Okabe-Ito bluish green.
COLLAGEN_OUTLINE_ON_RED_RGB: tuple[int, int, int] = (0, 158, 115)
#: Collagen outline on blue or green collagen (Masson trichrome): Okabe-Ito yellow.
COLLAGEN_OUTLINE_ON_BLUE_RGB: tuple[int, int, int] = (240, 228, 66)
_EXCLUDED_TINT_RGB = np.array([128, 128, 128], dtype=np.float32)
_EXCLUDED_HATCH_RGB = (70, 70, 70)

#: QuPath classification colours of the GeoJSON annotations.
_GEOJSON_CLASSES: dict[str, tuple[int, int, int]] = {
    "Tissue": (0, 114, 178),
    "Collagen": (213, 94, 0),
}

_Y_LABEL = "CPA (% of tissue area)"
_FONT_PT = 10
_DPI = 200
_ILLEGAL_XLSX_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


# --------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with the output folder's one writer
    (:func:`fibroquant.outdir.atomic_write_bytes`; raises ``cannot write PATH: reason``)."""
    atomic_write_bytes(path, data)


def _stem_path(out_stem: Path, suffix: str) -> Path:
    """``out/plots/groups`` -> ``out/plots/groups.png`` (keeps dots inside the stem)."""
    out_stem = Path(out_stem)
    return out_stem.with_name(out_stem.name + suffix)


def _is_missing(value: Any) -> bool:
    """True for None, NaN, NA and NaT scalars."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays, lists, dicts
        return False


def _text(value: Any) -> str:
    """Display string of a table cell (empty for missing values)."""
    return "" if _is_missing(value) else str(value)


def _as_float(value: Any) -> float:
    """Float of a cell, NaN when missing or not numeric."""
    if _is_missing(value):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _has_warning(value: Any) -> bool:
    """True when a ``stain_warning``-like cell holds a real warning."""
    if _is_missing(value):
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip()
    return text.lower() not in {"", "nan", "none", "false", "0", "ok"}


def format_p(p: Any) -> str:
    """Format a p-value for tables and plots.

    Parameters
    ----------
    p : float or None
        The p-value (dimensionless).

    Returns
    -------
    str
        ``"<0.001"`` below 0.001, otherwise three significant digits (``"0.0123"``,
        ``"0.500"``); an en dash for a missing value.

    Examples
    --------
    >>> format_p(0.01234), format_p(0.0004), format_p(float("nan"))
    ('0.0123', '<0.001', '–')
    """
    value = _as_float(p)
    if not math.isfinite(value):
        return "–"
    if value < 0.001:
        return "<0.001"
    return f"{value:#.3g}"


def _p_label(p: float) -> str:
    text = format_p(p)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def _ordered_groups(control: str | None, *frames_columns: Iterable[Any]) -> list[str]:
    """Group names, control first, then in order of first appearance."""
    seen: list[str] = []
    for column in frames_columns:
        for value in column:
            if _is_missing(value):
                continue
            name = str(value)
            if name not in seen:
                seen.append(name)
    if control is not None and control in seen:
        seen.remove(control)
        seen.insert(0, control)
    return seen


# --------------------------------------------------------------------------------------------
# QC overlay and PNG output
# --------------------------------------------------------------------------------------------
def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        msg = f"thumb must be uint8, got dtype={arr.dtype}"
        raise ValueError(msg)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[:, :, :3])
    msg = f"thumb must be (H, W), (H, W, 3) or (H, W, 4), got shape={arr.shape}"
    raise ValueError(msg)


def _fit_mask(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    """Bool mask resized (nearest neighbour) to ``shape`` when needed."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        msg = f"{name} must be a 2-D mask, got shape={arr.shape}"
        raise ValueError(msg)
    arr = arr.astype(bool, copy=False)
    if arr.shape != shape:
        resized = cv2.resize(
            arr.view(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST
        )
        arr = resized.astype(bool)
    return arr


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _inner_boundary(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Foreground pixels within ``thickness`` 4-connected steps of the background.

    The image border is not treated as background, so a mask that fills a microscope field
    gets no outline along the field edge. With ``thickness=1`` this equals
    ``skimage.segmentation.find_boundaries(mask, mode="inner")``.
    """
    if not mask.any():
        return np.zeros_like(mask)
    eroded = cv2.erode(
        mask.view(np.uint8), _CROSS, iterations=thickness, borderType=cv2.BORDER_REPLICATE
    )
    return mask & ~eroded.astype(bool)


def qc_overlay(
    thumb: np.ndarray,
    tissue_mask: np.ndarray,
    collagen_mask: np.ndarray,
    *,
    excluded_mask: np.ndarray | None = None,
    tissue_color: tuple[int, int, int] | None = None,
    collagen_color: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Draw what was measured on top of a slide thumbnail.

    Parameters
    ----------
    thumb : numpy.ndarray
        uint8 RGB ``(H, W, 3)`` thumbnail (grey ``(H, W)`` and RGBA are accepted).
    tissue_mask : numpy.ndarray
        bool ``(h, w)``; tissue counted in the denominator of CPA.
    collagen_mask : numpy.ndarray
        bool ``(h, w)``; collagen counted in the numerator.
    excluded_mask : numpy.ndarray, optional
        bool ``(h, w)``; regions left out (capsule, lumens, folds...), tinted grey and
        hatched.
    tissue_color, collagen_color : tuple of int, optional
        Outline colours (R, G, B). By default the tissue outline is black and the collagen
        outline is Okabe-Ito green on red collagen, Okabe-Ito yellow on blue/green collagen
        (chosen from the mean colour of the collagen pixels).

    Returns
    -------
    numpy.ndarray
        uint8 RGB ``(H, W, 3)``, a new array (``thumb`` is not modified).

    Notes
    -----
    Masks whose shape differs from the thumbnail are resized with nearest-neighbour
    interpolation. Outlines are drawn on the *inner* boundary of each mask (pixels of the mask
    with a 4-connected neighbour outside it), so every coloured pixel was counted. The collagen
    outline is 1 px; the tissue outline is 1 px up to 1000 px thumbnails and thicker above
    (3 px at 2000 px) so it stays visible when the image is shown downscaled.
    """
    rgb = _as_rgb_uint8(thumb).copy()
    shape = (rgb.shape[0], rgb.shape[1])
    tissue = _fit_mask(tissue_mask, shape, "tissue_mask")
    collagen = _fit_mask(collagen_mask, shape, "collagen_mask")

    if excluded_mask is not None:
        excluded = _fit_mask(excluded_mask, shape, "excluded_mask")
        if excluded.any():
            blended = 0.5 * rgb[excluded].astype(np.float32) + 0.5 * _EXCLUDED_TINT_RGB
            rgb[excluded] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
            spacing = max(6, round(max(shape) / 150))
            rows, cols = np.indices(shape, dtype=np.int32)
            hatch = excluded & ((rows + cols) % spacing == 0)
            rgb[hatch] = _EXCLUDED_HATCH_RGB

    if collagen_color is None:
        collagen_color = COLLAGEN_OUTLINE_ON_RED_RGB
        if collagen.any():
            mean = rgb[collagen].astype(np.float64).mean(axis=0)
            if mean[2] > mean[0]:  # blue / green collagen: Masson trichrome
                collagen_color = COLLAGEN_OUTLINE_ON_BLUE_RGB
    if tissue_color is None:
        tissue_color = TISSUE_OUTLINE_RGB

    rgb[_inner_boundary(collagen, 1)] = collagen_color
    thickness = max(1, round(max(shape) / 700))
    rgb[_inner_boundary(tissue, thickness)] = tissue_color
    return rgb


#: Collagen fill of the QC overlays, chosen against the stain: cyan on red (Sirius red,
#: Masson's red variants), yellow on blue/green collagen (Masson's aniline blue / light green).
COLLAGEN_FILL_ON_RED_RGB: tuple[int, int, int] = (0, 229, 255)
COLLAGEN_FILL_ON_BLUE_RGB: tuple[int, int, int] = (255, 214, 0)
_COLLAGEN_ALPHA = 0.6

#: Each excluded area's colour in the QC overlays and their legend (name, RGB; from
#: :data:`fibroquant.exclusions.CLASSES`); strong enough (alpha 0.7) that an excluded
#: capsule's red does not read as collagen.
EXCLUSION_COLOURS: dict[str, tuple[int, int, int]] = {
    c.name: c.colour for c in exclusions.CLASSES}
#: The colour of an excluded area of no known class (the tiles left out).
_OTHER_EXCLUSION_RGB = exclusions.TILES.colour
_EXCLUSION_ALPHA = 0.7


#: The collagen fill of each stain protocol: the same for every slide of a study, so a reader
#: compares like with like (a fill chosen per image flipped on a Masson slide whose detected
#: collagen was mostly purple-red).
STAIN_FILL_RGB: dict[str, tuple[int, int, int]] = {
    "sirius-red": COLLAGEN_FILL_ON_RED_RGB,
    "masson": COLLAGEN_FILL_ON_BLUE_RGB,
}


_STAIN_NAMES = {"sirius-red": "Sirius red", "masson": "Masson trichrome"}


def collagen_fill_for_stain(stain: str) -> tuple[int, int, int]:
    """The collagen fill against a protocol's collagen dye: cyan on Sirius red, yellow on
    Masson's aniline blue or light green (:data:`STAIN_FILL_RGB`; cyan for another)."""
    return STAIN_FILL_RGB.get(str(stain), COLLAGEN_FILL_ON_RED_RGB)


def collagen_fill_colour(rgb: np.ndarray, collagen: np.ndarray) -> tuple[int, int, int]:
    """The fill colour that stands out against the slide's collagen stain: cyan when the
    collagen pixels are red, yellow when they are blue or green."""
    if collagen.any():
        mean = rgb[collagen].astype(np.float64).mean(axis=0)
        if max(mean[1], mean[2]) > mean[0]:
            return COLLAGEN_FILL_ON_BLUE_RGB
    return COLLAGEN_FILL_ON_RED_RGB


def qc_fill(thumb: np.ndarray, tissue_mask: np.ndarray, collagen_mask: np.ndarray,
            exclusions: Mapping[str, np.ndarray] | None = None,
            collagen_rgb: tuple[int, int, int] | None = None) -> np.ndarray:
    """The QC overlay a pathologist reads: collagen filled semi-transparently in a colour
    chosen against the stain (:func:`collagen_fill_colour`), each excluded area tinted in its
    own colour (:data:`EXCLUSION_COLOURS`) and the tissue outlined in black.

    Parameters
    ----------
    thumb : numpy.ndarray
        uint8 RGB ``(H, W, 3)``.
    tissue_mask, collagen_mask : numpy.ndarray
        bool ``(h, w)`` (resized to the thumbnail, nearest neighbour).
    exclusions : mapping of str to numpy.ndarray, optional
        Name (a key of :data:`EXCLUSION_COLOURS`) to bool mask.
    collagen_rgb : tuple of int, optional
        The collagen fill; chosen from the image by default.

    Returns
    -------
    numpy.ndarray
        uint8 RGB ``(H, W, 3)``, a new array.
    """
    rgb = _as_rgb_uint8(thumb).copy()
    shape = (rgb.shape[0], rgb.shape[1])
    tissue = _fit_mask(tissue_mask, shape, "tissue_mask")
    collagen = _fit_mask(collagen_mask, shape, "collagen_mask")
    colour = collagen_rgb or collagen_fill_colour(rgb, collagen)

    def tint(mask: np.ndarray, c: tuple[int, int, int], alpha: float) -> None:
        if mask.any():
            # the blend of every channel value, tabulated (the same float32 arithmetic as on
            # the pixels), copied where the mask is: 10-20x faster than blending the masked
            # pixels' float copy
            mixed = ((1 - alpha) * np.arange(256, dtype=np.float32)[:, None]
                     + alpha * np.array(c, np.float32))
            table = np.clip(np.rint(mixed), 0, 255).astype(np.uint8).reshape(1, 256, 3)
            m8 = np.ascontiguousarray(mask).view(np.uint8)
            if cv2.countNonZero(m8) <= m8.size // 16:  # few pixels (a field's lumens): by
                p = cv2.findNonZero(m8).reshape(-1, 2)  # their points, not the whole image
                ys, xs = p[:, 1], p[:, 0]
                rgb[ys, xs] = table[0][rgb[ys, xs], np.arange(3)]
                return
            x, y, bw, bh = cv2.boundingRect(m8)  # only the mask's box is looked up (a few
            if bw * bh < m8.size // 2:  # unfocused tiles: not the whole image)
                box = rgb[y : y + bh, x : x + bw]
                np.copyto(box, cv2.LUT(np.ascontiguousarray(box), table),
                          where=mask[y : y + bh, x : x + bw, None])
            else:
                cv2.copyTo(cv2.LUT(rgb, table), m8, rgb)

    for name, mask in (exclusions or {}).items():
        m = _fit_mask(mask, shape, name)
        c = EXCLUSION_COLOURS.get(name, _OTHER_EXCLUSION_RGB)
        tint(m, c, _EXCLUSION_ALPHA)
        _paint(rgb, _inner_boundary(m, 1), c)
    tint(collagen, colour, _COLLAGEN_ALPHA)
    _paint(rgb, _inner_boundary(tissue, max(1, round(max(shape) / 900))), TISSUE_OUTLINE_RGB)
    return rgb


def _paint(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """``rgb[mask] = colour`` in place; a thin outline's pixels are found by OpenCV (0.5 ms
    rather than numpy's 10 ms scan of a 4-MP mask)."""
    m8 = np.ascontiguousarray(mask).view(np.uint8)
    if mask.ndim == 2 and 0 < cv2.countNonZero(m8) <= mask.size // 8:
        p = cv2.findNonZero(m8).reshape(-1, 2)
        rgb[p[:, 1], p[:, 0]] = colour
    else:
        rgb[mask] = colour


def _scale_bar_um(width_um: float) -> float:
    """A round scale-bar length, about a fifth of the image width (1, 2 or 5 × 10^k µm)."""
    target = max(width_um / 5, 1e-3)
    k = math.floor(math.log10(target))
    return max(m * 10**k for m in (1, 2, 5) if m * 10**k <= target)


@functools.lru_cache(maxsize=8)
def _panel_font(size: int) -> Any:
    """DejaVu Sans (bundled with matplotlib, has µ) at ``size`` px, else Pillow's default
    (loaded once per size: a run draws many panels of one width).

    The font file is found in matplotlib's package data without importing matplotlib: a
    slide's QC overlay would otherwise load it (~20 MB, 0.2 s) beside the trait tiles."""
    import importlib.util

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            return ImageFont.truetype(
                str(Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _band_geometry(width: int) -> tuple[int, int, int]:
    """Font size, padding and height (px) of the band :func:`qc_panel` adds below an overlay
    ``width`` pixels wide."""
    size = max(12, round(width / 70))
    pad = size // 2
    return size, pad, 2 * (size + pad) + pad


def qc_picture_height(height: int, width: int) -> int:
    """Rows of a QC overlay JPEG (``height`` × ``width``) above its legend band."""
    return height - _band_geometry(width)[2]


def retitle_qc(path: Path, title: str) -> None:
    """Write another slide name under a QC overlay (a renamed slide keeps its overlay), in
    place and atomically; the picture and the legend stay as they were."""
    from PIL import Image, ImageDraw

    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        msg = f"{path}: not a readable QC overlay"
        raise FibroquantError(msg)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    size, pad, _ = _band_geometry(width)
    top = qc_picture_height(height, width)
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, top, int(width * 0.6), top + size + pad], fill=(255, 255, 255))
    draw.text((pad, top + pad), title, fill=(0, 0, 0), font=_panel_font(size))
    write_jpeg(path, np.asarray(canvas))


def qc_panel(overlay: np.ndarray, *, title: str, mpp: float,
             collagen_rgb: tuple[int, int, int], exclusions: Sequence[str],
             marks: Sequence[str] = ()) -> np.ndarray:
    """The overlay with a white band below it: the slide name, a legend of the colours shown
    (fills, then the outlines of ``marks``: keys of :data:`VESSEL_MARK_RGB`) and a scale bar
    (``mpp``: µm per overlay pixel).

    Returns
    -------
    numpy.ndarray
        uint8 RGB ``(H + band, W, 3)``.
    """
    from PIL import Image, ImageDraw

    w = overlay.shape[1]
    size, pad, band = _band_geometry(w)
    font = _panel_font(size)
    items = [("collagen", collagen_rgb), ("tissue outline", TISSUE_OUTLINE_RGB)]
    items += [(name, EXCLUSION_COLOURS.get(name, _OTHER_EXCLUSION_RGB))
              for name in exclusions]
    # the band is drawn alone and put under the overlay (no copy of the overlay into PIL and
    # back: 33 -> 4 ms for a 2000² overlay; the same pixels)
    canvas = Image.new("RGB", (w, band), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y1 = pad
    draw.text((pad, y1), title, fill=(0, 0, 0), font=font)
    # scale bar at the right of the first line
    bar_um = _scale_bar_um(w * mpp)
    bar_px = max(1, round(bar_um / mpp))
    label = f"{bar_um:g} µm" if bar_um < 1000 else f"{bar_um / 1000:g} mm"
    lw = draw.textlength(label, font=font)
    x_end = w - pad
    draw.rectangle([x_end - bar_px, y1 + size // 3, x_end, y1 + size // 3 + max(3, size // 4)],
                   fill=(0, 0, 0))
    draw.text((x_end - bar_px - lw - pad, y1), label, fill=(0, 0, 0), font=font)
    # legend on the second line, in smaller type when it would not fit (a narrow field)
    entries = [*((n, c, False) for n, c in items),
               *((VESSEL_MARK_LABELS[n], VESSEL_MARK_RGB[n], True) for n in marks)]

    def swatch_and_name(name: str, small: int, font: Any) -> tuple[int, int]:
        """An entry's swatch width with its gap, and its name's with the gap after it."""
        return 2 * small + small // 4, int(draw.textlength(name, font=font)) + 2 * (small // 2)

    small = size
    while small > 8 and pad + sum(sum(swatch_and_name(n, small, _panel_font(small)))
                                  for n, _, _ in entries) > w:
        small -= 1
    font = _panel_font(small)
    x, y2 = pad, y1 + size + pad + (size - small) // 2
    line = max(2, small // 5)
    for name, colour, hollow in entries:
        box = [x, y2 + 2, x + 2 * small, y2 + small - 1]
        if hollow:  # an outline, drawn as on the overlay (framed in black: white shows)
            draw.rectangle(box, outline=(0, 0, 0))
            draw.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1], outline=colour,
                           width=line)
        else:
            draw.rectangle(box, fill=colour, outline=(0, 0, 0))
        to_name, to_next = swatch_and_name(name, small, font)
        x += to_name
        draw.text((x, y2), name, fill=(0, 0, 0), font=font)
        x += to_next
    return np.concatenate([_as_rgb_uint8(overlay), np.asarray(canvas)], axis=0)


#: Outline colour of each kind of lumen call (:class:`fibroquant.traits.VesselCall`) on the QC
#: overlays, and its legend label: apart from the fills and each other (green, blue, pink;
#: white for a lumen no collagen lines, not taken as a vessel).
VESSEL_MARK_RGB: dict[str, tuple[int, int, int]] = {
    "portal": (0, 170, 0), "central": (40, 80, 255), "undecided": (255, 60, 160),
    "unlined": (255, 255, 255)}
VESSEL_MARK_LABELS = {"portal": "portal vessel", "central": "central vein",
                      "undecided": "vessel, type undecided", "unlined": "unlined lumen"}


def draw_vessel_marks(rgb: np.ndarray, vessels: Sequence[Any], mpp: float) -> list[str]:
    """Outline each lumen call (:class:`fibroquant.traits.VesselCall`) on an overlay of
    ``mpp`` µm per pixel, in place, in its :data:`VESSEL_MARK_RGB` colour; returns the kinds
    drawn, in the legend's order."""
    thickness = max(2, round(max(rgb.shape[:2]) / 700))
    drawn = set()
    for call in vessels:
        pts = np.rint(call.outline_um / np.float32(mpp) - 0.5).astype(np.int32)
        cv2.polylines(rgb, [pts.reshape(-1, 1, 2)], True, VESSEL_MARK_RGB[call.kind],
                      thickness if call.kind != "unlined" else thickness // 2 + 1)
        drawn.add(call.kind)
    return [k for k in VESSEL_MARK_RGB if k in drawn]


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 88) -> None:
    """Write an RGB image as JPEG, atomically."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(_as_rgb_uint8(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        msg = f"{path}: could not encode JPEG"
        raise FibroquantError(msg)
    _atomic_write_bytes(Path(path), buf.tobytes())


def write_png(path: Path, rgb_or_mask: np.ndarray) -> None:
    """Write an RGB image or a mask as PNG, atomically.

    Parameters
    ----------
    path : pathlib.Path
        Destination; parent folders are created. Non-ASCII names are fine.
    rgb_or_mask : numpy.ndarray
        uint8 ``(H, W, 3)`` RGB, uint8 ``(H, W, 4)`` RGBA, uint8 ``(H, W)`` grey, or a bool
        ``(H, W)`` mask (saved as single-channel 0/255).

    Raises
    ------
    ValueError
        For another dtype or shape.
    FibroquantError
        When the file cannot be written.
    """
    arr = np.asarray(rgb_or_mask)
    if arr.dtype == bool:
        if arr.ndim != 2:
            msg = f"a bool mask must be 2-D, got shape={arr.shape} for {path}"
            raise ValueError(msg)
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        msg = f"write_png needs uint8 or bool, got dtype={arr.dtype} for {path}"
        raise ValueError(msg)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    elif arr.ndim != 2:
        msg = f"write_png needs (H, W), (H, W, 3) or (H, W, 4), got shape={arr.shape} for {path}"
        raise ValueError(msg)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:  # pragma: no cover - cv2 fails only on absurd inputs
        msg = f"cannot encode PNG for {path}"
        raise FibroquantError(msg)
    _atomic_write_bytes(Path(path), buf.tobytes())


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _new_figure(width_in: float, height_in: float) -> Figure:
    """A matplotlib Figure bound to an Agg canvas (no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style_axes(ax: Axes) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.tick_params(labelsize=_FONT_PT)
    ax.yaxis.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def _save_figure(fig: Figure, out_stem: Path) -> list[Path]:
    """Save ``fig`` as PNG (dpi 200) and SVG next to ``out_stem``, atomically."""
    paths = []
    for suffix, kwargs in (
        (".png", {"dpi": _DPI, "metadata": {"Software": None}}),
        (".svg", {"metadata": {"Date": None}}),
    ):
        buf = io.BytesIO()
        fig.savefig(buf, format=suffix[1:], facecolor="white", **kwargs)
        path = _stem_path(out_stem, suffix)
        _atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _subtitle(fig: Figure, ax: Axes, text: str) -> None:
    """Small grey note above the axes, wrapped to the figure width."""
    width_chars = max(20, int(fig.get_figwidth() * 13))
    ax.set_title(textwrap.fill(text, width_chars), fontsize=_FONT_PT - 1, color="#444444",
                 loc="left")


def _no_data(ax: Axes, message: str) -> None:
    ax.text(
        0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=_FONT_PT
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _wrap(label: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(label, width=width, break_long_words=True)) or label


def p_value_column(groups: pd.DataFrame) -> tuple[str, str]:
    """The p-value column a study's headline, plot and table use, and the test's name:
    ``dunnett_p`` (adjusted for the comparisons) when there are more than two groups, else
    ``welch_p``."""
    if "dunnett_p" in groups.columns and pd.to_numeric(groups["dunnett_p"],
                                                       errors="coerce").notna().any():
        return "dunnett_p", "Dunnett's test (adjusted)"
    return "welch_p", "Welch's t-test"


def _group_problems(groups: pd.DataFrame, control: str | None) -> dict[str, str]:
    if "group" not in groups.columns or "n_mice" not in groups.columns or groups.empty:
        return {}  # no groups (no sample sheet): nothing to flag, and no statistics import
    from fibroquant.stats import group_problems
    n = {_text(g): int(v) for g, v in zip(groups["group"], pd.to_numeric(
        groups["n_mice"], errors="coerce").fillna(0), strict=True)}
    return group_problems(n, control)


def plot_groups(
    mice: pd.DataFrame,
    groups: pd.DataFrame,
    out_stem: Path,
    *,
    control: str | None,
) -> list[Path]:
    """Per-mouse CPA by group, with mean ± SD and p-values against the control group.

    The p-values are the headline's (:func:`p_value_column`): Dunnett-adjusted with more than
    two groups, else Welch's; a group given no p value by :func:`fibroquant.stats.group_problems`
    (fewer than 3 mice, a name one edit from another) gets no bracket.

    Parameters
    ----------
    mice : pandas.DataFrame
        ``mice.csv``: needs ``group`` and ``cpa_percent`` (% of tissue area), one row per mouse.
    groups : pandas.DataFrame
        ``groups.csv``: ``group`` and, when present, ``cpa_mean_percent``, ``cpa_sd`` (percent)
        and ``welch_p`` / ``dunnett_p``.
    out_stem : pathlib.Path
        Output path without suffix; ``.png`` (200 dpi) and ``.svg`` are written.
    control : str or None
        Name of the control group (drawn first; brackets compare to it). No brackets when None.

    Returns
    -------
    list of pathlib.Path
        The PNG and SVG paths.
    """
    mice_groups = mice["group"] if "group" in mice.columns else pd.Series(dtype=object)
    group_col = groups["group"] if "group" in groups.columns else pd.Series(dtype=object)
    order = _ordered_groups(control, group_col, mice_groups)
    cpa = (
        pd.to_numeric(mice["cpa_percent"], errors="coerce")
        if "cpa_percent" in mice.columns
        else pd.Series(np.nan, index=mice.index)
    )
    by_group = {name: cpa[(mice_groups.astype(str) == name).to_numpy()].dropna() for name in order}
    group_rows = {
        str(row["group"]): row for _, row in groups.iterrows() if not _is_missing(row.get("group"))
    }

    fig = _new_figure(max(3.6, 1.25 * len(order) + 1.6), 4.4)
    ax = fig.add_subplot()
    _style_axes(ax)
    if not order or all(v.empty for v in by_group.values()):
        _no_data(ax, "No per-mouse CPA values")
        return _save_figure(fig, out_stem)

    rng = np.random.default_rng(0)
    top = 0.0
    for i, name in enumerate(order):
        values = by_group[name].to_numpy(dtype=float)
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        if values.size:
            jitter = rng.uniform(-0.13, 0.13, size=values.size)
            ax.scatter(
                i + jitter, values, s=38, color=colour, edgecolor="black", linewidth=0.6,
                alpha=0.9, zorder=3,
            )
            top = max(top, float(values.max()))
        row = group_rows.get(name)
        mean = _as_float(row.get("cpa_mean_percent")) if row is not None else math.nan
        sd = _as_float(row.get("cpa_sd")) if row is not None else math.nan
        if not math.isfinite(mean) and values.size:
            mean = float(values.mean())
        if not math.isfinite(sd) and values.size > 1:
            sd = float(values.std(ddof=1))
        if math.isfinite(mean):
            ax.hlines(mean, i - 0.28, i + 0.28, color="black", linewidth=2.0, zorder=4)
            if math.isfinite(sd):
                ax.errorbar(
                    i + 0.2, mean, yerr=sd, color="black", capsize=4, linewidth=1.2, zorder=4
                )
                top = max(top, mean + sd)

    span = top if top > 0 else 1.0
    n_brackets = 0
    p_col, test_name = p_value_column(groups)
    problems = _group_problems(groups, control)
    if control is not None and control in order:
        x0 = order.index(control)
        step = 0.11 * span
        for i, name in enumerate(order):
            row = group_rows.get(name)
            if name == control or row is None or name in problems:
                continue
            p = _as_float(row.get(p_col))
            if not math.isfinite(p):
                continue
            y = top + step * (0.6 + n_brackets)
            tick = 0.025 * span
            ax.plot([x0, x0, i, i], [y - tick, y, y, y - tick], color="black", linewidth=0.9)
            ax.text((x0 + i) / 2, y + 0.01 * span, _p_label(p), ha="center", va="bottom",
                    fontsize=_FONT_PT - 1)
            n_brackets += 1
    upper = top + 0.11 * span * (n_brackets + 0.9) if n_brackets else top * 1.12 + 0.05
    ax.set_ylim(0, upper)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xticks(
        range(len(order)),
        [f"{_wrap(name)}\n(n = {by_group[name].size})" for name in order],
        fontsize=_FONT_PT,
    )
    ax.set_ylabel(_Y_LABEL, fontsize=_FONT_PT + 1)
    note = "One point per mouse; bar = mean ± SD"
    if n_brackets:
        note += f"; {test_name} vs control"
    _subtitle(fig, ax, note)
    return _save_figure(fig, out_stem)


def _ok_rows(slides: pd.DataFrame, statuses: Sequence[str] = ("ok",)) -> pd.DataFrame:
    """The rows of ``slides`` whose status is one of ``statuses`` (all without a status)."""
    if "status" in slides.columns:
        return slides[slides["status"].astype(str).str.lower().isin(statuses).to_numpy()]
    return slides


def _trait_title(name: str, unit: str) -> str:
    """A trait's panel title: its name without the unit suffix, then the unit
    (``fibre_length_density_mm_per_mm2`` -> ``fibre length density (mm/mm²)``)."""
    for suffix in ("_mm_per_mm2", "_per_mm2", "_percent", "_um", "_mpp"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    label = _wrap(name.replace("_", " "), 24)
    return label if unit in ("", "1") else f"{label} ({unit})"


def plot_traits(
    mice: pd.DataFrame,
    trait_groups: pd.DataFrame,
    out_stem: Path,
    *,
    control: str | None,
    traits: Sequence[str] | None = None,
) -> list[Path]:
    """Small multiple of fibre traits: per-mouse values by group, one panel per trait, each
    titled with the largest Hedges' g against the control (and its Holm-adjusted Welch p).

    Parameters
    ----------
    mice : pandas.DataFrame
        ``mice.csv`` with ``group`` and the trait columns.
    trait_groups : pandas.DataFrame
        ``trait_groups.csv`` (:func:`fibroquant.traits.compare_traits`).
    out_stem : pathlib.Path
        Output path without suffix (``.png`` and ``.svg``).
    control : str or None
        Drawn first.
    traits : sequence of str, optional
        Panels; default :data:`fibroquant.traits.KEY_TRAITS` present in ``mice``.
    """
    from fibroquant.traits import KEY_TRAITS, trait_unit

    names = [t for t in (traits or KEY_TRAITS) if t in mice.columns]
    groups = _ordered_groups(control, mice["group"].astype(str))
    # balanced rows of at most 4 panels (11 traits: 4 + 4 + 3, not 5 + 5 + 1)
    nrow = max(1, -(-len(names) // 4))
    ncol = max(1, -(-len(names) // nrow))
    fig = _new_figure(2.2 * ncol, 2.1 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):  # spare axes stay empty
        _style_axes(ax)
        if pd.to_numeric(mice[name], errors="coerce").isna().all():
            # e.g. thin-fibre shares of masks too coarse to show a thin fibre: said, not drawn
            ax.set_yticks([])
            ax.set_xlim(-0.5, len(groups) - 0.5)
            ax.text(0.5, 0.5, "no value\nfor any mouse", transform=ax.transAxes,
                    ha="center", va="center", fontsize=_FONT_PT - 2, color="0.35")
        for i, g in enumerate(groups):
            v = pd.to_numeric(mice.loc[mice["group"].astype(str) == g, name],
                              errors="coerce").dropna().to_numpy(float)
            x = np.full(len(v), float(i)) + np.linspace(-0.12, 0.12, len(v))
            ax.plot(x, v, "o", ms=3.5, alpha=0.8, color=f"C{i % 10}")
            if len(v):
                ax.hlines(v.mean(), i - 0.25, i + 0.25, color="black", lw=1.2)
        ax.set_xticks(range(len(groups)), [_wrap(g, 10) for g in groups], fontsize=_FONT_PT - 2)
        title = _trait_title(name, trait_unit(name))
        rows = trait_groups[(trait_groups["trait"] == name) & ~trait_groups["is_control"].astype(bool)] \
            if len(trait_groups) else trait_groups
        rows = rows[pd.to_numeric(rows["hedges_g"], errors="coerce").notna()] if len(rows) else rows
        if len(rows):
            best = rows.iloc[int(np.argmax(pd.to_numeric(rows["hedges_g"]).abs().to_numpy()))]
            p_text = format_p(best["holm_welch_p"])
            title += (f"\ng = {float(best['hedges_g']):+.2f}, Holm p "
                      f"{p_text if p_text.startswith('<') else '= ' + p_text}")
        ax.set_title(title, fontsize=_FONT_PT - 2)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    return _save_figure(fig, out_stem)


#: Most mice whose columns :func:`plot_slides` names (beyond, the labels would not be read).
MAX_MOUSE_LABELS = 48


def plot_slides(slides: pd.DataFrame, out_stem: Path) -> list[Path]:
    """CPA of every section, grouped by group and mouse, coloured by mouse.

    Parameters
    ----------
    slides : pandas.DataFrame
        ``slides.csv``: ``slide, mouse, group, cpa_percent`` and optionally ``status``,
        ``tissue_area_mm2``, ``collagen_area_mm2`` (mm²). Only ``status == "ok"`` rows are drawn.
    out_stem : pathlib.Path
        Output path without suffix; ``.png`` (200 dpi) and ``.svg`` are written.

    Returns
    -------
    list of pathlib.Path
        The PNG and SVG paths.

    Notes
    -----
    Each mouse gets its own x position, grouped under its group; a short black line marks the
    mouse's area-weighted CPA (total collagen / total tissue area) when both areas are given.
    """
    ok = _ok_rows(slides).copy()
    ok["_cpa"] = (
        pd.to_numeric(ok["cpa_percent"], errors="coerce") if "cpa_percent" in ok else np.nan
    )
    ok["_group"] = ok["group"].map(_text) if "group" in ok else ""
    who = "mouse" if "mouse" in ok else "slide" if "slide" in ok else None
    ok["_mouse"] = ok[who].map(_text) if who else ""
    ok = ok[np.isfinite(ok["_cpa"].to_numpy(dtype=float))]

    order = _ordered_groups(None, ok["_group"])
    mice_per_group = {
        g: sorted(ok.loc[ok["_group"].eq(g).to_numpy(), "_mouse"].unique()) for g in order
    }
    n_mice = sum(len(m) for m in mice_per_group.values())
    fig = _new_figure(min(16.0, max(4.0, 0.32 * n_mice + 0.5 * len(order) + 1.8)), 4.4)
    ax = fig.add_subplot()
    _style_axes(ax)
    if ok.empty:
        _no_data(ax, "No measured slides")
        return _save_figure(fig, out_stem)

    x = 0.0
    j = -1
    centres: list[float] = []
    mouse_x: list[tuple[float, str]] = []
    for g in order:
        start = x
        for mouse in mice_per_group[g]:
            j += 1
            mouse_x.append((x, mouse))
            rows = ok[(ok["_group"].eq(g) & ok["_mouse"].eq(mouse)).to_numpy()]
            colour = OKABE_ITO[j % len(OKABE_ITO)]
            marker = "osD^v"[(j // len(OKABE_ITO)) % 5]
            offsets = np.linspace(-0.12, 0.12, len(rows)) if len(rows) > 1 else np.zeros(1)
            ax.scatter(
                x + offsets, rows["_cpa"], s=30, color=colour, marker=marker,
                edgecolor="black", linewidth=0.5, zorder=3,
            )
            if {"collagen_area_mm2", "tissue_area_mm2"} <= set(rows.columns):
                tissue = pd.to_numeric(rows["tissue_area_mm2"], errors="coerce").sum()
                collagen = pd.to_numeric(rows["collagen_area_mm2"], errors="coerce").sum()
                if tissue > 0:
                    ax.hlines(100 * collagen / tissue, x - 0.3, x + 0.3, color="black",
                              linewidth=1.4, zorder=4)
            x += 1
        centres.append((start + x - 1) / 2)
        if g != order[-1]:
            ax.axvline(x - 0.25, color="#bbbbbb", linewidth=0.8)
        x += 0.5

    groups_axis: Any = ax
    if len(mouse_x) <= MAX_MOUSE_LABELS:
        # each column named by its mouse; the groups below them, on an axis of their own
        names = [m[:6] + "…" + m[-8:] if len(m) > 15 else m for _, m in mouse_x]
        ax.set_xticks([p for p, _ in mouse_x], names, rotation=90, fontsize=_FONT_PT - 3)
        groups_axis = ax.secondary_xaxis("bottom")
        groups_axis.spines["bottom"].set_visible(False)
        groups_axis.tick_params(axis="x", length=0,
                                pad=8 + 0.62 * (_FONT_PT - 3) * max(len(n) for n in names))
    groups_axis.set_xticks(centres, [_wrap(g) for g in order], fontsize=_FONT_PT)
    ax.tick_params(axis="x", length=0)
    ax.set_xlim(-0.7, x - 0.8)
    ax.set_ylim(0, float(ok["_cpa"].max()) * 1.1 + 0.05)
    ax.set_ylabel(_Y_LABEL, fontsize=_FONT_PT + 1)
    _subtitle(fig, ax, "One point per section, one column per mouse; "
              "line = mouse CPA (area-weighted)")
    return _save_figure(fig, out_stem)


def plot_stain_qc(slides: pd.DataFrame, out_stem: Path) -> list[Path]:
    """Stain QC: collagen stain angle versus collagen stain intensity, one point per slide.

    Parameters
    ----------
    slides : pandas.DataFrame
        ``slides.csv``: ``stain_angle_deg`` (degrees between the slide's collagen vector and
        the preset) and ``collagen_level_od`` (the slide's collagen level) or, failing that,
        ``collagen_od_mean``; ``stain_warning`` marks slides to check; ``group`` colours points.
    out_stem : pathlib.Path
        Output path without suffix; ``.png`` (200 dpi) and ``.svg`` are written.

    Returns
    -------
    list of pathlib.Path
        The PNG and SVG paths.

    Notes
    -----
    Groups stained on different days show up as separate clusters here, the most common source
    of false treatment effects; slides with a stain warning are ringed in vermillion and named.
    """
    # every measured slide: those of another stain are the ones this plot exists to show
    ok = _ok_rows(slides, ("ok", "wrong-stain"))
    y_col = next((c for c in ("collagen_level_od", "collagen_od_mean") if c in ok), None)
    fig = _new_figure(5.6, 4.4)
    ax = fig.add_subplot()
    _style_axes(ax)
    if y_col is None or "stain_angle_deg" not in ok:
        _no_data(ax, "No stain QC columns in the slides table")
        return _save_figure(fig, out_stem)
    xs = pd.to_numeric(ok["stain_angle_deg"], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(ok[y_col], errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(xs) & np.isfinite(ys)
    if not finite.any():
        _no_data(ax, "No stain QC values")
        return _save_figure(fig, out_stem)
    groups = ok["group"].map(_text).to_numpy() if "group" in ok else np.array([""] * len(ok))
    warned = (
        ok["stain_warning"].map(_has_warning).to_numpy(dtype=bool)
        if "stain_warning" in ok
        else np.zeros(len(ok), dtype=bool)
    )
    names = ok["slide"].map(_text).to_numpy() if "slide" in ok else np.array([""] * len(ok))
    for i, g in enumerate(_ordered_groups(None, groups)):
        sel = finite & (groups == g)
        ax.scatter(xs[sel], ys[sel], s=32, color=OKABE_ITO[i % len(OKABE_ITO)],
                   edgecolor="black", linewidth=0.5, label=g or "(no group)", zorder=3)
    sel = finite & warned
    if sel.any():
        ax.scatter(xs[sel], ys[sel], s=130, facecolor="none", edgecolor="#D55E00",
                   linewidth=1.8, label="stain warning", zorder=4)
        for xv, yv, name in zip(xs[sel], ys[sel], names[sel], strict=True):
            ax.annotate(name[:30], (xv, yv), xytext=(6, 5), textcoords="offset points",
                        fontsize=_FONT_PT - 1, color="#D55E00")
    ax.set_xlabel("Collagen stain angle to preset (degrees)", fontsize=_FONT_PT + 1)
    y_label = ("Collagen level (OD, median of collagen pixels)" if y_col == "collagen_level_od"
               else "Mean collagen OD")
    ax.set_ylabel(y_label, fontsize=_FONT_PT + 1)
    ax.legend(fontsize=_FONT_PT - 1, frameon=False, loc="best")
    _subtitle(fig, ax, "Stain QC, one point per slide")
    return _save_figure(fig, out_stem)


# --------------------------------------------------------------------------------------------
# spreadsheets
# --------------------------------------------------------------------------------------------
def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings to ``(dotted.key, value)`` rows."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, name))
        else:
            rows.append((name, value))
    return rows


def _cell_value(value: Any) -> Any:
    """A value openpyxl stores literally (no formulas, no illegal characters)."""
    if isinstance(value, (Mapping, list, tuple, set, frozenset, np.ndarray)):
        return json.dumps(value, default=json_default, ensure_ascii=False)
    if _is_missing(value):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if isinstance(value, (bool, int, float, date)):
        return value
    return _ILLEGAL_XLSX_CHARS.sub("", str(value))


def _write_sheet(wb: Any, title: str, header: Sequence[str], rows: Iterable[Sequence[Any]],
                 *, table: str | None = None) -> int:
    """One sheet: bold frozen header with an autofilter, text kept as text, and (with
    ``table``, a :mod:`fibroquant.schema` table) each column's number format and a header
    comment with its unit and meaning. Cells keep full precision."""
    from openpyxl.comments import Comment
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    ws = wb.create_sheet(title)
    widths = [len(str(h)) for h in header]
    ws.append([_cell_value(h) for h in header])
    formats: list[str | None] = [None] * len(header)
    if table is not None:
        for k, name in enumerate(header):
            col = schema.column(table, str(name))
            if col is not None:
                formats[k] = col.excel_format
                unit = f" ({col.unit})" if col.unit else ""
                ws.cell(row=1, column=k + 1).comment = Comment(
                    f"{col.label}{unit}: {col.description}", "fibroquant")
    n = 0
    for row in rows:
        n += 1
        values = [_cell_value(v) for v in row]
        for col_i, value in enumerate(values, start=1):
            cell = ws.cell(row=n + 1, column=col_i)
            cell.value = value
            if isinstance(value, str):
                cell.data_type = "s"  # never a formula, even when text starts with "="
            elif formats[col_i - 1] and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                cell.number_format = formats[col_i - 1]
            widths[col_i - 1] = max(widths[col_i - 1], min(60, len(str(value or ""))))
    for cell in ws[1]:
        cell.font = Font(bold=True)
    ws.freeze_panes = "A2"
    if header:
        ws.auto_filter.ref = f"A1:{get_column_letter(len(header))}{n + 1}"
    for col_i, width in enumerate(widths, start=1):
        ws.column_dimensions[get_column_letter(col_i)].width = max(8, min(width, 40) + 2)
    return n


#: Longest text written into one xlsx cell; Excel's limit is 32,767 characters, and a longer
#: value (the inputs of a large study) is written to its own sheet or left to provenance.json.
_XLSX_CELL_MAX = 2000


def _study_counts(slides: pd.DataFrame, mice: pd.DataFrame,
                  groups: pd.DataFrame) -> dict[str, int]:
    """The study's counts, as the report's summary and the xlsx ``summary`` sheet give them:
    slides measured (``ok``), of another stain (``wrong-stain``: measured, left out of mice
    and groups unless kept), not measured yet (an interrupted run, or not in the folder yet),
    failed (the rest); mice
    with a measured slide (without a sheet a failed file is a "mouse" of its own); groups."""
    status = (slides["status"].map(_text).str.lower() if "status" in slides
              else pd.Series("ok", index=slides.index))
    ok, wrong = int(status.eq("ok").sum()), int(status.eq("wrong-stain").sum())
    pending = int(status.eq("not-measured").sum())
    return {"ok": ok, "wrong_stain": wrong, "not_measured": pending,
            "failed": len(slides) - ok - wrong - pending, "mice": int(_measured(mice).sum()),
            "groups": len(_group_names(groups, mice))}


def _measured(mice: pd.DataFrame) -> pd.Series:
    """The mice with a measured slide (bool; every row without ``n_slides``)."""
    if "n_slides" not in mice:
        return pd.Series(True, index=mice.index)
    return pd.to_numeric(mice["n_slides"], errors="coerce").fillna(0) > 0


def _failed_heading(n_failed: int, n_pending: int, *, short: bool = False) -> str:
    """The report's section of slides without a result, as its heading (or nav link) says."""
    if not n_pending:
        return "Failed" if short else "Failed slides"
    if not n_failed:
        return "Not measured" if short else "Slides not measured"
    return "Failed, not measured" if short else "Failed and unmeasured slides"


def _group_names(groups: pd.DataFrame, mice: pd.DataFrame) -> list[str]:
    """The study's groups in display order (none without a sheet: its group is "")."""
    return [g for g in _ordered_groups(None, groups.get("group", []), mice.get("group", []))
            if g]


def _summary_rows(slides: pd.DataFrame, mice: pd.DataFrame, groups: pd.DataFrame,
                  summary: str, warnings: Sequence[str],
                  provenance: Mapping[str, Any]) -> list[tuple[str, Any]]:
    n = _study_counts(slides, mice, groups)
    rows: list[tuple[str, Any]] = [
        ("run date (UTC)", _text(provenance.get("started_utc", ""))),
        ("fibroquant", _text(provenance.get("fibroquant_version", ""))),
        ("slides measured", n["ok"]),
        *([("slides of another stain", n["wrong_stain"])] if n["wrong_stain"] else []),
        ("slides failed", n["failed"]),
        *([("slides not measured yet (see their error)", n["not_measured"])]
          if n["not_measured"] else []),
        ("mice", n["mice"]), ("groups", n["groups"]),
        ("comparison", summary),
    ]
    rows += [(f"warning {k}", w) for k, w in enumerate(warnings, start=1)]
    rows.append(("provenance", "provenance.json (versions, settings, every input's fingerprint)"))
    return rows


def write_xlsx(
    path: Path,
    *,
    slides: pd.DataFrame,
    mice: pd.DataFrame,
    groups: pd.DataFrame,
    settings: Mapping[str, Any],
    provenance: Mapping[str, Any],
    summary: str = "",
    warnings: Sequence[str] = (),
) -> None:
    """Write the result tables, settings and provenance to one Excel workbook, atomically.

    Parameters
    ----------
    path : pathlib.Path
        Destination ``.xlsx``.
    slides, mice, groups : pandas.DataFrame
        The tables at full precision (one sheet each, the CSV's columns, missing values as empty
        cells, number formats from :mod:`fibroquant.schema`).
    settings, provenance : mapping
        Nested mappings written as ``key`` / ``value`` rows with dotted keys
        (``tissue.min_area_um2``); provenance's ``inputs`` get their own sheet, and a value too
        long for a cell points to ``provenance.json`` (beside the workbook) instead of being cut.
    summary : str
        The comparison sentence, on the first sheet (``summary``) with the counts and warnings.
    warnings : sequence of str
        Run-level warnings.

    Notes
    -----
    Text cells are always stored as text, so a slide named ``=HYPERLINK(...)`` cannot become a
    formula in the recipient's spreadsheet. A ``columns`` sheet lists every column's unit and
    meaning.
    """
    from openpyxl import Workbook

    wb = Workbook()
    if wb.active is not None:  # a new workbook's empty default sheet
        wb.remove(wb.active)
    for title, frame in (("slides", slides), ("mice", mice), ("groups", groups)):
        columns = [str(c) for c in frame.columns]
        _write_sheet(wb, title, columns, frame.itertuples(index=False, name=None), table=title)
    _write_sheet(wb, "summary", ["item", "value"],
                 _summary_rows(slides, mice, groups, summary, warnings, provenance))
    wb.move_sheet("summary", offset=-3)
    prov = dict(provenance)
    inputs = prov.pop("inputs", None)
    rows = []
    for key, value in _flatten(prov):
        text = value if not isinstance(value, (list, tuple, Mapping)) else json.dumps(
            value, default=json_default, ensure_ascii=False)
        if isinstance(text, str) and len(text) > _XLSX_CELL_MAX:
            text = f"{len(text):,} characters: see provenance.json"
        rows.append((key, text))
    _write_sheet(wb, "settings", ["key", "value"], _flatten(settings))
    _write_sheet(wb, "provenance", ["key", "value"], rows)
    if isinstance(inputs, list) and inputs and all(isinstance(r, Mapping) for r in inputs):
        keys = list(dict.fromkeys(k for r in inputs for k in r))
        _write_sheet(wb, "inputs", keys, ([r.get(k) for k in keys] for r in inputs))
    _write_sheet(wb, "columns", ["table", "column", "unit", "meaning"],
                 [(t, c.name, c.unit, c.description) for t, cols in schema.TABLES.items()
                  for c in cols])
    buf = io.BytesIO()
    wb.save(buf)
    _atomic_write_bytes(Path(path), buf.getvalue())


# --------------------------------------------------------------------------------------------
# GeoJSON (QuPath annotations)
# --------------------------------------------------------------------------------------------
def _closure_grid(mask: np.ndarray) -> np.ndarray:
    """The ``(2H + 1, 2W + 1)`` uint8 cell grid of :func:`_pixel_edge_polygons`: 1 on every
    foreground pixel (odd, odd), on its edges and on its corners.

    What ``cv2.dilate`` of the grid holding the pixels alone by a 3 x 3 square gives, written
    in place from the mask (an edge cell is set when a pixel on either side is, a corner cell
    when one of its four pixels is): one grid in memory instead of two (2 x 4 bytes per mask
    pixel: ~170 MB each for a 43-MP slide mask)."""
    h, w = mask.shape
    grid = np.zeros((2 * h + 1, 2 * w + 1), dtype=np.uint8)
    m = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).view(np.uint8)
    grid[1::2, 1::2] = m  # pixels
    grid[0, 1::2] = m[0]  # horizontal edges: the pixel above or below
    grid[-1, 1::2] = m[-1]
    np.bitwise_or(m[:-1], m[1:], out=grid[2:-1:2, 1::2])
    grid[:, 0] = grid[:, 1]  # vertical edges and corners: the column left or right
    grid[:, -1] = grid[:, -2]
    np.bitwise_or(grid[:, 1:-2:2], grid[:, 3::2], out=grid[:, 2:-1:2])
    return grid


def _pixel_edge_polygons(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Valid polygons whose edges run along pixel edges, in mask pixel units.

    The mask is embedded in a ``(2H + 1, 2W + 1)`` cell grid where odd/odd cells are pixels,
    mixed cells are pixel edges and even/even cells are pixel corners; the closure of the
    foreground (pixels with their edges and corners) is traced with ``cv2.findContours``. Its
    border cells lie exactly on the pixel-edge boundary, except that OpenCV cuts concave corners
    diagonally: each diagonal step is split at the corner cell it skipped, which makes the
    polygons exact (area == pixel count). All contours are processed at once with numpy, and
    the polygons are built with shapely's vectorised constructors.

    Returns
    -------
    numpy.ndarray
        1-D object array of shapely Polygons (valid, non-empty).
    """
    import shapely

    contours, hierarchy = cv2.findContours(_closure_grid(mask), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_NONE)  # (the grid is freed here)
    if hierarchy is None or not contours:
        return np.empty(0, dtype=object)
    hier = hierarchy[0]
    n_rings = len(contours)
    lengths = np.fromiter((len(c) for c in contours), dtype=np.int64, count=n_rings)
    pts = np.concatenate(contours).reshape(-1, 2)  # (x, y) cell indices, int32
    del contours
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cid = np.repeat(np.arange(n_rings), lengths)

    def neighbours(
        ids: np.ndarray, first: np.ndarray, count: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the next and previous point of each point within its own ring."""
        idx = np.arange(len(ids))
        local = idx - first[ids]
        nxt = first[ids] + (local + 1) % count[ids]
        prev = first[ids] + (local - 1) % count[ids]
        return nxt, prev

    nxt_i, _ = neighbours(cid, starts, lengths)
    nxt = pts[nxt_i]
    diag = np.all(np.abs(nxt - pts) == 1, axis=1)
    # split each diagonal step at the (even, even) corner cell between the two points
    cand_a = np.stack([pts[:, 0], nxt[:, 1]], axis=1)
    cand_b = np.stack([nxt[:, 0], pts[:, 1]], axis=1)
    corner = np.where(np.all(cand_a % 2 == 0, axis=1)[:, None], cand_a, cand_b)
    shift = np.concatenate([[0], np.cumsum(diag)[:-1]])
    pos = np.arange(len(pts)) + shift
    out = np.empty((len(pts) + int(diag.sum()), 2), dtype=pts.dtype)
    out_cid = np.empty(len(out), dtype=np.int64)
    out[pos] = pts
    out_cid[pos] = cid
    out[pos[diag] + 1] = corner[diag]
    out_cid[pos[diag] + 1] = cid[diag]
    out_len = np.bincount(out_cid, minlength=n_rings)
    out_start = np.concatenate([[0], np.cumsum(out_len)[:-1]])
    o_nxt, o_prev = neighbours(out_cid, out_start, out_len)
    d1 = out - out[o_prev]
    d2 = out[o_nxt] - out
    turn = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) != 0  # drop collinear points
    coords = out[turn].astype(np.float64) / 2.0
    ring_id = out_cid[turn]
    n_vertices = np.bincount(ring_id, minlength=n_rings)
    if np.any(n_vertices < 4):  # pragma: no cover - every pixel-edge ring has >= 4 corners
        msg = "internal error: degenerate pixel-edge ring"
        raise RuntimeError(msg)
    rings = shapely.linearrings(coords, indices=ring_id)

    # order rings shell-first per polygon: polygon id = own index (shell) or parent (hole)
    parent = hier[:, 3]
    owner = np.where(parent == -1, np.arange(n_rings), parent)
    order = np.lexsort((parent != -1, owner))
    _, poly_index = np.unique(owner[order], return_inverse=True)
    polys = shapely.polygons(rings[order], indices=poly_index)
    if min_area_px > 0:  # per 8-connected component, before corner-touching parts are split
        polys = polys[shapely.area(polys) >= min_area_px]
    invalid = ~shapely.is_valid(polys)
    if invalid.any():  # parts touching at a corner make self-touching rings
        fixed = shapely.make_valid(polys[invalid], method="structure", keep_collapsed=False)
        parts = shapely.get_parts(fixed)
        parts = parts[shapely.get_type_id(parts) == 3]
        polys = np.concatenate([polys[~invalid], parts])
    return polys[~shapely.is_empty(polys)]


def mask_to_geojson(
    tissue_mask: np.ndarray | BitMask,
    collagen_mask: np.ndarray | BitMask,
    *,
    scale: float,
    slide_name: str,
    min_area_px: int = 4,
) -> dict[str, Any]:
    """Tissue and collagen masks as a QuPath-importable GeoJSON FeatureCollection.

    Parameters
    ----------
    tissue_mask, collagen_mask : numpy.ndarray or BitMask
        bool ``(H, W)`` masks at analysis or thumbnail resolution (a :class:`BitMask` is
        unpacked only while its own outlines are traced).
    scale : float
        Full-resolution slide pixels per mask pixel (e.g. 16 for a mask at level downsample 16).
    slide_name : str
        Used in the annotation names.
    min_area_px : int, optional
        8-connected parts smaller than this many *mask* pixels (net of their holes) are
        dropped; holes are always kept. Use 0 to keep everything.

    Returns
    -------
    dict
        A FeatureCollection with one ``Tissue`` and one ``Collagen`` annotation (each a Polygon
        or MultiPolygon; a class with an empty mask is left out). Properties follow QuPath:
        ``{"objectType": "annotation", "classification": {"name", "color"}, "name"}``.

    Notes
    -----
    Polygons follow pixel edges (mask pixel ``(r, c)`` is the square ``[c, c+1] x [r, r+1]``,
    then multiplied by ``scale``), so their area equals the pixel count × ``scale``² exactly
    (apart from dropped small parts); holes (lumens) are preserved and every geometry is valid
    (``shapely.make_valid`` repairs parts that touch at a corner).
    """
    features = [
        {"type": "Feature", "geometry": json.loads(geometry), "properties": properties}
        for properties, geometry in _geojson_features(
            tissue_mask, collagen_mask, scale=scale, slide_name=slide_name,
            min_area_px=min_area_px)
    ]
    return {"type": "FeatureCollection", "features": features}


def write_mask_geojson(
    path: Path,
    tissue_mask: np.ndarray | BitMask,
    collagen_mask: np.ndarray | BitMask,
    *,
    scale: float,
    slide_name: str,
    min_area_px: int = 4,
    vessels: Sequence[Any] = (),
    mpp: float = 1.0,
) -> None:
    """Write :func:`mask_to_geojson`'s FeatureCollection atomically, one class at a time,
    then the lumen calls ``vessels`` (:func:`vessel_features`; ``mpp``: level-0 µm/px).

    Each geometry goes to the file as shapely's GeoJSON text, never as Python lists of
    floats, and a class's mask and outlines are freed before the next is traced: on a 1-GP
    slide's 43-MP masks the peak is one class's outline grid (~2 x 170 MB), not both classes
    and their coordinates as Python objects.
    """
    parts = [
        _feature_text(properties, geometry)
        for properties, geometry in _geojson_features(
            tissue_mask, collagen_mask, scale=scale, slide_name=slide_name,
            min_area_px=min_area_px)
    ]
    parts += vessel_features(vessels, mpp, slide_name)
    text = '{"type":"FeatureCollection","features":[' + ",".join(parts) + "]}"
    del parts
    _atomic_write_bytes(Path(path), text.encode("utf-8"))


def _feature_text(properties: Mapping[str, Any], geometry: str) -> str:
    return ('{"type":"Feature","geometry":' + geometry + ',"properties":'
            + json.dumps(properties, separators=(",", ":"), ensure_ascii=False) + "}")


def vessel_features(vessels: Sequence[Any], mpp: float, slide_name: str) -> list[str]:
    """GeoJSON Feature texts (QuPath annotations, level-0 pixels of ``mpp`` µm) of the lumen
    calls (:class:`fibroquant.traits.VesselCall`): each outline a polygon classified as its
    kind (the overlay's colour), with the call's confidence as a measurement."""
    import shapely

    out = []
    for call in vessels:
        if len(call.outline_um) < 3:  # a lumen a pixel or two across: no polygon
            continue
        # a contour through pixel centres touches itself where the lumen is a pixel wide (a
        # branching cleft): made valid, its polygonal parts kept
        geom = shapely.make_valid(shapely.Polygon(
            (call.outline_um / np.float32(mpp)).astype(np.float64).round(2)))
        if geom.geom_type == "GeometryCollection":
            geom = shapely.union_all([g for g in shapely.get_parts(geom)
                                      if g.geom_type in ("Polygon", "MultiPolygon")])
        if geom.is_empty or geom.area == 0:
            continue
        cls = VESSEL_MARK_LABELS[call.kind].capitalize()
        properties: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": cls, "color": list(VESSEL_MARK_RGB[call.kind])},
            "name": f"{slide_name} {cls.lower()}", "isLocked": False}
        if math.isfinite(call.confidence):
            properties["measurements"] = {"confidence": round(call.confidence, 4)}
        out.append(_feature_text(properties, shapely.to_geojson(shapely.orient_polygons(geom))))
    return out


def add_geojson_features(path: Path, features: Sequence[str]) -> None:
    """Add Feature texts to a FeatureCollection :func:`write_mask_geojson` wrote (its text
    spliced, not parsed again: a whole slide's is tens of MB), atomically."""
    if not features:
        return
    data = Path(path).read_bytes()
    if not data.endswith(b"]}"):
        msg = f"{path}: not a GeoJSON FeatureCollection fibroquant wrote"
        raise FibroquantError(msg)
    sep = b"" if data.endswith(b"[]}") else b","
    _atomic_write_bytes(Path(path), data[:-2] + sep + ",".join(features).encode("utf-8") + b"]}")


def _geojson_features(
    tissue_mask: np.ndarray | BitMask,
    collagen_mask: np.ndarray | BitMask,
    *,
    scale: float,
    slide_name: str,
    min_area_px: int,
) -> Iterable[tuple[dict[str, Any], str]]:
    """The (properties, geometry as GeoJSON text) of :func:`mask_to_geojson`'s features,
    class by class (a class with an empty mask yields nothing)."""
    import shapely
    from shapely import affinity

    if not (isinstance(scale, (int, float, np.number)) and math.isfinite(scale) and scale > 0):
        msg = (
            "scale must be a positive number of full-resolution pixels per mask pixel, "
            f"got {scale=}"
        )
        raise ValueError(msg)
    for cls, mask in (("Tissue", tissue_mask), ("Collagen", collagen_mask)):
        arr = mask.unpack() if isinstance(mask, BitMask) else np.asarray(mask)
        if arr.ndim != 2:
            msg = f"{cls.lower()}_mask must be 2-D, got shape={arr.shape}"
            raise ValueError(msg)
        polys = _pixel_edge_polygons(arr.astype(bool, copy=False), min_area_px)
        del arr
        if len(polys) == 0:
            continue
        # one geometry (shapely's stubs type multipolygons of a 1-D array as an array)
        geom = cast("BaseGeometry", polys[0] if len(polys) == 1 else shapely.multipolygons(polys))
        del polys
        if scale != 1:
            geom = affinity.scale(geom, xfact=float(scale), yfact=float(scale), origin=(0, 0))
        geom = shapely.orient_polygons(geom)
        properties = {
            "objectType": "annotation",
            "classification": {"name": cls, "color": list(_GEOJSON_CLASSES[cls])},
            "name": f"{slide_name} {cls.lower()}",
            "isLocked": False,
        }
        text = shapely.to_geojson(geom)
        del geom
        # the outline grid and contours stay in the C heap (cores.tune_malloc) and the next
        # class would trace beside them: given back first
        release_free_heap()
        yield properties, text


def write_geojson(path: Path, fc: Mapping[str, Any]) -> None:
    """Write a GeoJSON FeatureCollection atomically (UTF-8, compact).

    Parameters
    ----------
    path : pathlib.Path
        Destination, usually ``<slide stem>.geojson``.
    fc : mapping
        The FeatureCollection, e.g. from :func:`mask_to_geojson`.
    """
    text = json.dumps(fc, separators=(",", ":"), ensure_ascii=False, default=json_default)
    _atomic_write_bytes(Path(path), text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------
_CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d8dee4; --bg:#f6f8fa; --accent:#0072B2;
        --warn:#9a3b00; --warnbg:#fff4e5; --bad:#a40e26; --badbg:#ffebe9; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: var(--ink); margin: 0; background: #fff; }
main { max-width: 1360px; margin: 0 auto; padding: 28px 32px 60px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 8px; }
.sub { color: var(--muted); margin: 0; }
nav { margin: 12px 0 0; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
.kpis { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0; }
.kpi { flex: 1 1 140px; background: var(--bg); border: 1px solid var(--line); border-radius: 8px;
       padding: 10px 14px; }
.kpi .v { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.kpi .l { color: var(--muted); font-size: 13px; }
.summary { font-size: 16px; background: #eef6fc; border-left: 4px solid var(--accent);
           padding: 10px 14px; border-radius: 4px; }
.callout { background: var(--warnbg); border-left: 4px solid #E69F00; padding: 8px 14px;
           border-radius: 4px; margin: 12px 0; }
.callout ul { margin: 4px 0; padding-left: 20px; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; margin: 8px 0 4px; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { background: var(--bg); font-weight: 600; min-width: 3.5em; }
thead th { vertical-align: bottom; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.id { white-space: nowrap; }
td.text { min-width: 26em; }
tbody tr:nth-child(even) { background: #fbfcfd; }
.note { color: var(--muted); font-size: 13px; }
figure { margin: 12px 16px 20px 0; display: inline-table; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; display: table-caption; caption-side: bottom; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 16px; }
.card { border: 1px solid var(--line); border-radius: 8px; overflow: hidden; background: #fff;
        break-inside: avoid; }
.card img { display: block; width: 100%; height: auto; background: var(--bg); }
.card .noimg { height: 120px; display: flex; align-items: center; justify-content: center;
               color: var(--muted); background: var(--bg); font-size: 13px; }
.card .body { padding: 8px 12px 10px; font-size: 13.5px; }
.card .name { font-weight: 600; word-break: break-all; }
.card .meta { color: var(--muted); }
.card .links { margin-top: 2px; }
.card .cpa { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .cpa.void { font-weight: 400; color: #888; text-decoration: line-through; }
.badge { display: inline-block; font-size: 12px; padding: 1px 8px; border-radius: 10px;
         background: var(--warnbg); color: var(--warn); margin-top: 4px; }
.badge.bad { background: var(--badbg); color: var(--bad); }
.legend { display: flex; flex-wrap: wrap; gap: 18px; font-size: 13px; color: var(--muted);
          margin: 4px 0 12px; }
.sw { display: inline-block; width: 22px; height: 10px; vertical-align: middle; margin-right: 6px;
      border: 1px solid #888; }
.sw.ring { width: 16px; height: 4px; border-width: 3px; border-style: solid;
           box-shadow: 0 0 0 1px #000; background: #fff; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 12px;
      font-size: 12.5px; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px;
         border-top: 1px solid var(--line);
         padding-top: 10px; }
@media (max-width: 900px) { main { padding: 16px 14px 40px; } table { font-size: 12.5px; }
  th, td { padding: 4px 5px; } }
@media print { main { max-width: none; padding: 0; } .card, figure, table { break-inside: avoid; } }
"""

_e = html.escape


def _fmt_cell(column: str, value: Any) -> tuple[str, bool]:
    """Formatted (escaped) cell text and whether it is numeric."""
    if _is_missing(value):
        return "", False
    col = column.lower()
    if isinstance(value, (bool, np.bool_)):
        return _e(str(bool(value))), False
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}".replace(",", "\u202f"), True
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return _e(str(v)), True
        known = next((c for t in schema.TABLES if (c := schema.column(t, column))), None)
        if known is not None and known.kind == "p":
            return _e(format_p(v)), True
        if known is not None and known.decimals is not None:
            return f"{v:.{known.decimals}f}", True
        if known is not None and known.sig is not None:
            return f"{schema.round_value(v, known):g}", True
        if col == "p" or col.endswith(("_p", "p_value", "pvalue")) or col.startswith("p_"):
            return _e(format_p(v)), True
        if col.startswith("n_") or col == "n":
            return (f"{v:.0f}" if v.is_integer() else f"{v:.2f}"), True
        if "cpa" in col or col.endswith(("_percent", "_pp", "hedges_g")) or col in {"sd", "sem"}:
            return f"{v:.2f}", True
        if col.endswith(("_mm2", "_od_mean", "_od")) or "_od" in col:
            return f"{v:.3f}", True
        if col.endswith("_deg") or col == "seconds":
            return f"{v:.1f}", True
        return f"{v:.4g}", True
    return _e(str(value)), False


#: Columns of sentences: a table gives them a reading width, not the narrowest wrap.
_TEXT_COLUMNS = frozenset({"error", "stain_warning", "qc_flags", "stain_guess"})


def _html_table(frame: pd.DataFrame, columns: Sequence[str] | None = None,
                labels: Mapping[str, str] | None = None) -> str:
    cols = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    labels = labels or {}
    head = "".join(f"<th>{_e(labels.get(str(c), str(c)))}</th>" for c in cols)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            text, numeric = _fmt_cell(str(c), row[c])
            cls = ("num" if numeric else "id" if str(c) in ("slide", "mouse", "group", "status")
                   else "text" if str(c) in _TEXT_COLUMNS else "")
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _kv_table(data: Mapping[str, Any]) -> str:
    rows = []
    for key, value in _flatten(data):
        leaf = key.rsplit(".", 1)[-1]
        if isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, bool):
            text, _ = _fmt_cell(leaf, value)
        elif isinstance(value, (list, tuple, Mapping)):
            text = _e(json.dumps(value, default=json_default, ensure_ascii=False))
        else:
            text = _e(_text(value))
        rows.append(f"<tr><th>{_e(key)}</th><td>{text}</td></tr>")
    return f'<div class="tablewrap"><table><tbody>{"".join(rows)}</tbody></table></div>'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _read_image(path: Path, min_width: int | None = None) -> np.ndarray | None:
    """An image file as BGR (None when unreadable); a JPEG at least ``min_width`` wide is
    decoded at 1/2, 1/4 or 1/8 of its size when that is still at least ``min_width`` (the
    decoder skips the detail: a 2000-px QC overlay for a 480-px thumbnail in ~1/8 the time)."""
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if raw.size == 0:
        return None
    flag = cv2.IMREAD_COLOR
    if min_width is not None and raw[:2].tobytes() == b"\xff\xd8":
        width = _jpeg_width(raw)
        for k, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                           (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if width is not None and width // k >= min_width:
                flag = reduced
                break
    return cv2.imdecode(raw, flag)  # BGR, or None when undecodable


def _jpeg_width(data: np.ndarray) -> int | None:
    """Pixel width from a JPEG's start-of-frame marker (in its first 64 KiB), None when not
    found."""
    buf = data[:65536].tobytes()
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(buf[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(buf[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def _thumb_jpeg_uri(path: Path, max_width: int = 480) -> str | None:
    img = _read_image(path, max_width)
    if img is None:
        return None
    h, w = img.shape[:2]
    if w > max_width:
        img = cv2.resize(img, (max_width, max(1, round(h * max_width / w))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return _data_uri(buf.tobytes(), "image/jpeg") if ok else None


def _png_width(data: bytes) -> int | None:
    """Pixel width from a PNG header, None when ``data`` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big")


def _plot_uris(plots: Sequence[Path]) -> list[tuple[Path, str, int | None]]:
    """Data URIs of plots and their display width in CSS px (PNG preferred over SVG)."""
    by_stem: dict[str, Path] = {}
    for p in map(Path, plots):
        key = str(p.with_suffix(""))
        if p.suffix.lower() == ".png" or key not in by_stem:
            by_stem[key] = p
    out = []
    for p in by_stem.values():
        try:
            data = p.read_bytes()
        except OSError:
            continue
        mime = "image/svg+xml" if p.suffix.lower() == ".svg" else "image/png"
        px = _png_width(data)
        # plots are saved at 200 dpi; show them at ~110 CSS px per inch (fonts >= 9 pt at 1x)
        out.append((p, _data_uri(data, mime), round(px * 110 / _DPI) if px else None))
    return out


def _figure(uri: str, caption: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return (f'<figure><img src="{uri}"{size} alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


_PLOT_CAPTIONS = {
    "trait_groups": "Fibre traits per mouse by group (bar = mean); each panel's title gives the "
                    "largest Hedges' g against control and its Welch p, Holm-adjusted over the "
                    "traits (trait_groups.csv; formulas in docs/traits.md).",
    "groups": "Per-mouse CPA by group (mean ± SD; p-values of {test} against control).",
    "slides": "CPA of every section, one column per mouse.",
    "stain_qc": "Stain QC: collagen stain angle and intensity per slide; ringed slides have a "
                "stain warning.",
}


def _omnibus_table(omnibus: Mapping[str, Any]) -> str:
    """The omnibus tests as one row each: test, statistic, degrees of freedom, p, note."""
    rows = []
    for key in ("anova", "welch_anova", "kruskal", "levene"):
        res = omnibus.get(key)
        if isinstance(res, Mapping):
            df = "" if _is_missing(res.get("df_num")) else (
                f"{_as_float(res['df_num']):.0f}, {_as_float(res.get('df_denom')):.3g}")
            rows.append({"test": res.get("test", key), "statistic": res.get("statistic"),
                         "df": df, "p": res.get("p"), "note": res.get("reason", "")})
    shapiro = omnibus.get("shapiro")
    if isinstance(shapiro, Mapping):
        for g, res in shapiro.items():
            if isinstance(res, Mapping):
                rows.append({"test": f"Shapiro–Wilk normality, {g}",
                             "statistic": res.get("statistic"), "df": "", "p": res.get("p"),
                             "note": res.get("reason", "")})
    return _html_table(pd.DataFrame(rows), ["test", "statistic", "df", "p", "note"]) if rows \
        else ""


def _stats_notes(groups: pd.DataFrame, omnibus: Mapping[str, Any] | None,
                 mixed: Mapping[str, Any] | None) -> str:
    items = [
        ("<li><b>The mouse is the experimental unit.</b> Each mouse's CPA is area-weighted over "
        "its sections (total collagen area / total tissue area); group statistics use one value "
        "per mouse, so sections are never counted as independent animals.</li>"),
        "<li>Group summaries are mean, SD, SEM and median of the per-mouse CPA.</li>",
    ]
    cols = set(groups.columns)
    if "welch_p" in cols:
        items.append("<li>Welch's two-sample t-test (unequal variances) against the control "
                     "group; <code>diff_vs_control_pp</code> is the difference of means in "
                     "percentage points"
                     + (" with its 95 % confidence interval" if "diff_ci_low_pp" in cols else "")
                     + ".</li>")
    if "mannwhitney_p" in cols:
        items.append("<li>Mann–Whitney U test (two-sided) against control, robust to skew and "
                     "small n.</li>")
    if "hedges_g" in cols:
        items.append("<li>Effect size: Hedges' g (standardised mean difference with small-sample "
                     "correction).</li>")
    def filled(col: str) -> bool:
        return col in cols and bool(pd.to_numeric(groups[col], errors="coerce").notna().any())

    if filled("dunnett_p"):
        items.append("<li>Dunnett's test: each group against control, adjusted for the number of "
                     "comparisons.</li>")
    if filled("holm_welch_p"):
        items.append("<li>Holm-adjusted Welch p-values across the comparisons with control.</li>")
    out = "<ul>" + "".join(items) + "</ul>"
    if omnibus:
        out += ("<h3>Across all groups</h3>"
                '<p class="note">One test of whether any group differs; Shapiro–Wilk and '
                "Levene are reported as checks, they do not choose the test.</p>"
                + _omnibus_table(omnibus))
    if mixed:
        out += ("<h3>Linear mixed model (random intercept per mouse)</h3>"
                '<p class="note">Uses every section while counting mice correctly. Its Wald z '
                "p-values assume many mice: with a few mice per group they come out smaller than "
                "an exact test would give, so the per-mouse Welch test above is the primary "
                "result and this model a check on it.</p>"
                + _kv_table(mixed))
    return out


def _slide_card(row: pd.Series, uri: str | None, href: str | None = None,
                zoom_href: str | None = None, keep_wrong_stain: bool = False) -> str:
    name = _text(row.get("slide"))
    img = (f'<img src="{uri}" alt="QC overlay of {_e(name)}" loading="lazy">' if uri
           else '<div class="noimg">no QC overlay</div>')
    target = zoom_href or href
    if uri and target:
        tip = "zoom into the full-resolution overlay" if zoom_href else "open the full overlay"
        img = (f'<a href="{_e(quote(target))}" target="_blank" rel="noopener" '
               f'title="{tip}">{img}</a>')
    links = []  # only with a zoomable view: otherwise the picture opens the one overlay
    if zoom_href:
        links.append(f'<a href="{_e(quote(zoom_href))}" target="_blank" rel="noopener">'
                     "zoom (full resolution)</a>")
        if href:
            links.append(f'<a href="{_e(quote(href))}" target="_blank" rel="noopener">'
                         "overlay</a>")
    cpa = _as_float(row.get("cpa_percent"))
    tissue = _as_float(row.get("tissue_area_mm2"))
    status = _text(row.get("status")).lower() or "ok"
    badges = []
    if status != "ok":
        error = _text(row.get("error"))
        badges.append(f'<span class="badge bad">{_e(status)}{": " if error else ""}{_e(error)}'
                      "</span>")
    if _has_warning(row.get("stain_warning")):
        badges.append(f'<span class="badge">{_e(_text(row.get("stain_warning")))}</span>')
    if _has_warning(row.get("qc_flags")):
        badges.append(f'<span class="badge">doubtful: {_e(_text(row.get("qc_flags")))}</span>')
    cpa_text = f"{cpa:.2f} % CPA" if math.isfinite(cpa) else "CPA –"
    # a slide of another stain is measured, not a CPA: shown struck through, not in bold
    # (unless --keep-wrong-stain counts it in its mouse and group)
    cpa_class = "cpa void" if status == "wrong-stain" and not keep_wrong_stain else "cpa"
    tissue_text = f"{tissue:.2f} mm² tissue" if math.isfinite(tissue) else ""
    return (
        f'<div class="card">{img}<div class="body">'
        f'<div class="name">{_e(name)}</div>'
        f'<div class="meta">mouse {_e(_text(row.get("mouse")))}'
        + (f' · {_e(_text(row.get("group")))}' if _text(row.get("group")) else "") + "</div>"
        f'<div><span class="{cpa_class}">{cpa_text}</span> <span class="meta">{tissue_text}'
        "</span></div>"
        + (f'<div class="links">{" · ".join(links)}</div>' if links else "")
        + f'{"".join(badges)}</div></div>'
    )


def _groups_note(test_name: str, p_col: str) -> str:
    """The note under the group table: units, the tests of its p values, who gets none."""
    return ('<p class="note">CPA in % of tissue area; differences in percentage points (pp); '
            "comparisons against the control group (empty on the control row); p values of "
            f"{_e(test_name)}"
            + (", the primary test with more than two groups; Welch p (Holm) is Welch's "
               "t-test Holm-adjusted" if p_col == "dunnett_p" else
               " and the Mann–Whitney U test, two-sided")
            + ". Groups with fewer than 3 mice or a name one edit from another get no p "
            "value. Every statistic is in <code>groups.csv</code> and "
            "<code>results.xlsx</code>.</p>")


def write_report_html(
    path: Path,
    *,
    title: str,
    slides: pd.DataFrame,
    mice: pd.DataFrame,
    groups: pd.DataFrame,
    omnibus: Mapping[str, Any] | None,
    mixed: Mapping[str, Any] | None,
    summary: str,
    qc_images: Mapping[str, Path],
    plots: Sequence[Path],
    settings: Mapping[str, Any],
    provenance: Mapping[str, Any],
    warnings: Sequence[str],
    keep_wrong_stain: bool = False,
) -> None:
    """Write the study report: one self-contained HTML file, atomically.

    Parameters
    ----------
    path : pathlib.Path
        Destination, usually ``OUT_DIR/report.html``.
    title : str
        Page title.
    slides, mice, groups : pandas.DataFrame
        The tables as in ``slides.csv``, ``mice.csv`` and ``groups.csv``.
    omnibus : mapping or None
        Omnibus test results (e.g. ANOVA / Kruskal-Wallis), shown as key/value rows.
    mixed : mapping or None
        Linear mixed model results, shown as key/value rows.
    summary : str
        One or two sentences stating the result.
    qc_images : mapping of str to pathlib.Path
        Slide name (as in ``slides["slide"]``) to its QC overlay PNG; downscaled to at most
        800 px wide and embedded as JPEG.
    plots : sequence of pathlib.Path
        Plot files (PNG preferred over the SVG of the same stem), embedded in the order given;
        a plot whose stem ends in ``groups`` is shown with the group table.
    settings, provenance : mapping
        Shown as pretty-printed JSON.
    warnings : sequence of str
        Run-level warnings, listed at the top.
    keep_wrong_stain : bool
        Slides of status ``wrong-stain`` count in their mice and groups (``--keep-wrong-stain``):
        their cards show the CPA as any other's, not struck through.

    Notes
    -----
    Images are embedded as base64 data URIs; CSS is inline; there is no script and no external
    URL, so the file can be mailed or archived as is. Every string taken from the data is
    HTML-escaped.
    """
    status = (slides["status"].map(_text).str.lower() if "status" in slides
              else pd.Series("ok", index=slides.index))
    ok_mask = status.eq("ok").to_numpy()
    wrong_mask = status.eq("wrong-stain").to_numpy()  # measured, left out of mice and groups
    n = _study_counts(slides, mice, groups)
    n_ok, n_wrong, n_pending, n_failed = n["ok"], n["wrong_stain"], n["not_measured"], n["failed"]
    group_names = _group_names(groups, mice)

    plot_uris = _plot_uris(plots)
    group_plots = [(p, u, w) for p, u, w in plot_uris if p.stem.endswith("groups")]
    other_plots = [(p, u, w) for p, u, w in plot_uris if not p.stem.endswith("groups")]

    p_col, test_name = p_value_column(groups)

    def caption(p: Path) -> str:
        for key, text in _PLOT_CAPTIONS.items():
            if p.stem.endswith(key):
                return text.format(test=test_name)
        return p.stem

    parts: list[str] = []
    run_date = _text(provenance.get("started_utc", "")).replace("T", " ")[:16]
    version = _text(provenance.get("fibroquant_version", provenance.get("version", "")))
    study = Path(_text(provenance.get("slides_dir", ""))).name
    parts.append(
        f"<header><h1>{_e(title)}</h1>"
        + (f'<p class="sub"><b>{_e(study)}</b>' + (f" · run {_e(run_date)} UTC" if run_date
                                                   else "")
           + (f" · fibroquant {_e(version)}" if version else "") + "</p>"
           if study or run_date else "")
        + '<p class="sub">Collagen proportionate area (CPA) = collagen area / tissue area × 100, '
        "per section, per mouse and per group.</p>"
        '<nav><a href="#summary">Summary</a>'
        + ('<a href="#groups">Groups</a>' if len(groups) or group_plots else "")
        + ('<a href="#statistics">Statistics</a>' if len(groups) else "")
        + '<a href="#mice">Mice</a>'
        '<a href="#slides">Slides</a><a href="#qc">QC gallery</a>'
        + (f'<a href="#failed">{_failed_heading(n_failed, n_pending, short=True)}</a>'
           if n_failed + n_pending else "")
        + '<a href="#settings">Settings</a></nav></header>'
    )

    n_mice = n["mice"]
    kpis = [
        (str(n_ok), "slide measured" if n_ok == 1 else "slides measured"),
        *([(str(n_wrong), "slide of another stain" if n_wrong == 1
            else "slides of another stain")] if n_wrong else []),
        (str(n_failed), "slide failed" if n_failed == 1 else "slides failed"),
        *([(str(n_pending), "not measured yet")] if n_pending else []),
        (str(n_mice), "mouse" if n_mice == 1 else "mice"),
        (str(n["groups"]), "group" if n["groups"] == 1 else "groups"),
    ]
    parts.append('<section id="summary"><h2>Study summary</h2><div class="kpis">'
                 + "".join(f'<div class="kpi"><div class="v">{_e(v)}</div>'
                           f'<div class="l">{_e(label)}</div></div>' for v, label in kpis)
                 + "</div>")
    if group_names:  # mice as the groups table counts them: those with a measured slide
        group_of = mice["group"].map(_text) if "group" in mice else pd.Series(dtype=str)
        n_by_group = group_of[_measured(mice)].value_counts()
        n_listed = group_of.value_counts()

        def counted(g: str) -> str:
            n, more = int(n_by_group.get(g, 0)), int(n_listed.get(g, 0) - n_by_group.get(g, 0))
            return (f"{_e(g)} (n = {n} {'mouse' if n == 1 else 'mice'}"
                    + (f"; {more} more without a measured slide" if more > 0 else "") + ")")

        parts.append('<p class="note">Groups: ' + ", ".join(counted(g) for g in group_names)
                     + "</p>")
    if summary:
        parts.append(f'<p class="summary">{_e(summary)}</p>')
    if warnings:
        parts.append('<div class="callout"><b>Warnings</b><ul>'
                     + "".join(f"<li>{_e(str(w))}</li>" for w in warnings) + "</ul></div>")
    parts.append("</section>")

    group_labels = {c.name: c.label for c in schema.GROUPS}
    # the table a reader needs; every column is in groups.csv and the xlsx
    dunnett = p_col == "dunnett_p"  # its p beside its simultaneous interval
    p_cols = ["dunnett_p", "holm_welch_p"] if dunnett else ["welch_p", "mannwhitney_p"]
    ci_cols = (["dunnett_ci_low_pp", "dunnett_ci_high_pp"] if dunnett
               else ["diff_ci_low_pp", "diff_ci_high_pp"])
    group_cols = ["group", "n_mice", "cpa_mean_percent", "cpa_sd", "cpa_sem", "cpa_median",
                  "diff_vs_control_pp", *ci_cols, "change_vs_control_percent", *p_cols,
                  "hedges_g"]
    ctrl_name = next((_text(g) for g, c in zip(groups.get("group", []),
                                                groups.get("is_control", []), strict=False)
                      if str(c).lower() in ("true", "1")), None)
    shown = groups.copy()
    for g in _group_problems(groups, ctrl_name):  # no p value for these (see the warnings)
        for c in p_cols:
            if c in shown.columns:
                shown.loc[shown["group"].map(_text) == g, c] = math.nan
    if len(groups) or group_plots:  # (a sheet's trait plot even when CPA's comparison failed)
        parts.append('<section id="groups"><h2>Groups</h2>')
        parts.append(_html_table(shown, group_cols, group_labels) + _groups_note(test_name, p_col)
                     if len(groups) else '<p class="note">No group table (see the summary).</p>')
        parts.extend(_figure(u, caption(p), w) for p, u, w in group_plots)
        parts.append("</section>")
    if len(groups):
        parts.append('<section id="statistics"><h2>Statistics notes</h2>'
                     + _stats_notes(groups, omnibus, mixed) + "</section>")

    mouse_labels = {c.name: c.label for c in schema.MICE}
    traits = {c.name for c in schema.MICE if c.kind == "trait"}
    mouse_cols = [c for c in mice.columns if c not in traits]  # traits: their own section
    parts.append('<section id="mice"><h2>Per-mouse results</h2>'
                 + (_html_table(mice, mouse_cols, mouse_labels) if len(mice)
                    else '<p class="note">No mice.</p>')
                 + '<p class="note">CPA % is area-weighted over the mouse\'s sections; '
                   "this is the value the group comparison uses."
                 + (" Fibre traits per mouse: <code>mice.csv</code> and "
                    "<code>results.xlsx</code>." if traits & set(mice.columns) else "")
                 + "</p></section>")

    slide_cols = [c.name for c in schema.SLIDES
                  if (c.kind in ("id", "status", "measure", "exclusion") and c.name != "error")
                  or c.name in ("mpp", "stain_angle_deg", "stain_warning", "qc_flags")]
    slide_cols = schema.ordered([c for c in slide_cols if c in slides.columns], "slides")
    slide_labels = {c.name: c.label for c in schema.SLIDES}
    parts.append('<section id="slides"><h2>Per-slide results</h2>')
    parts.extend(_figure(u, caption(p), w) for p, u, w in other_plots)
    parts.append("<details open><summary>Table of all slides</summary>"
                 + _html_table(slides, slide_cols, slide_labels)
                 + "</details>"
                   '<p class="note">Excluded areas ('
                 + ", ".join(c.name for c in exclusions.CLASSES)
                 + ") are outside both tissue and collagen area.</p></section>")

    # the slides table's order, gathered by group (groups as they first appear; within a
    # group as listed: a stable sort)
    if "group" in slides.columns:
        names = slides["group"].map(_text)
        rank = {g: i for i, g in enumerate(dict.fromkeys(names))}
        ordered = slides.iloc[np.argsort(names.map(rank).to_numpy(), kind="stable")]
    else:
        ordered = slides
    cards = []
    for _, row in ordered.iterrows():
        if _text(row.get("status", "ok")).lower() not in ("", "ok", "wrong-stain"):
            continue  # failed: no overlay (a wrong stain keeps its overlay, for inspection)
        qc_path = qc_images.get(_text(row.get("slide")))
        href = zoom_href = None
        if qc_path and Path(qc_path).is_file():
            here = Path(path).resolve().parent
            href = Path(os.path.relpath(Path(qc_path).resolve(), here)).as_posix()
            page = Path(qc_path).parent.parent / "zoom" / f"{Path(qc_path).stem}.html"
            if page.is_file():  # written by fibroquant.zoom for whole slides
                zoom_href = Path(os.path.relpath(page.resolve(), here)).as_posix()
        cards.append(_slide_card(row, _thumb_jpeg_uri(Path(qc_path)) if qc_path else None,
                                 href, zoom_href, keep_wrong_stain))
    sw = '<span class="sw" style="background:{}"></span>'
    present = set(slides["stain"].map(_text)) if "stain" in slides else set()
    stains_shown = [st for st in STAIN_FILL_RGB if st in present] or list(STAIN_FILL_RGB)
    calls = "unlined_lumens" in slides  # measured with the fibre traits: lumens outlined
    legend = ('<div class="legend">' + "".join(
        f"<span>{sw.format('rgb({},{},{})'.format(*rgb))}{_e(name)}</span>" for name, rgb in (
            *((f"collagen ({_STAIN_NAMES.get(st, st)})", STAIN_FILL_RGB[st])
              for st in stains_shown),
            ("tissue outline", TISSUE_OUTLINE_RGB), *EXCLUSION_COLOURS.items()))
        + "".join(
            '<span><span class="sw ring" style="border-color:rgb({},{},{})"></span>{}</span>'
            .format(*VESSEL_MARK_RGB[kind], _e(VESSEL_MARK_LABELS[kind]))
            for kind in (VESSEL_MARK_RGB if calls else ()))
        + '</div><p class="note">Each card opens its full-size overlay (<code>qc/</code>), '
        "with a scale bar and legend; a whole slide's card opens a zoomable view at the "
        "analysis resolution (<code>zoom/</code>, OpenSeadragon, works offline). Check that "
        "every filled area is collagen and that nothing else is"
        + (", and that each outlined lumen is what its outline calls it (the fibre traits' "
           "portal and central counts and collagen shares rest on these calls)" if calls
           else "") + ".</p>")
    parts.append('<section id="qc"><h2>QC gallery</h2>' + legend
                 + (f'<div class="gallery">{"".join(cards)}</div>' if cards
                    else '<p class="note">No measured slides.</p>') + "</section>")

    if n_failed + n_pending:
        failed = slides[~ok_mask & ~wrong_mask]
        heading = _failed_heading(n_failed, n_pending)
        parts.append(f'<section id="failed"><h2>{heading}</h2>'
                     + _html_table(failed, ["slide", "mouse", "group", "status", "error"])
                     + "</section>")

    def pretty(obj: Mapping[str, Any]) -> str:
        return _e(json.dumps(obj, indent=2, sort_keys=True, default=json_default,
                             ensure_ascii=False))

    brief = {k: v for k, v in provenance.items()
             if not isinstance(v, (list, tuple, dict)) and k != "settings"}
    versions = provenance.get("versions")
    parts.append('<section id="settings"><h2>Settings and versions</h2>'
                 f"{_kv_table(brief)}"
                 '<p class="note">The full record, with the fingerprint of every input file: '
                 '<a href="provenance.json">provenance.json</a>.</p>'
                 + ("<details><summary>Package versions</summary>"
                    f"{_kv_table(versions)}</details>" if isinstance(versions, Mapping) else "")
                 + "<details><summary>Settings (as in results.xlsx)</summary>"
                 f"<pre>{pretty(settings)}</pre></details></section>")
    parts.append(f"<footer>Generated by fibroquant {_e(version)}. "
                 "Images are embedded; the full-size overlays (qc/) and provenance.json are beside "
                 "this file.</footer>")

    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "\n".join(parts)
        + "</main></body></html>\n"
    )
    _atomic_write_bytes(Path(path), doc.encode("utf-8"))


#: ``slides.csv``'s column of the tiles left out as unfocused (mm²).
_TILES_COLUMN = exclusions.TILES.column


def _exclusion_masks(flags: np.ndarray | None, excluded: np.ndarray,
                     tiles_left_out: bool = True) -> dict[str, np.ndarray]:
    """Split the slide's excluded area by what it is, from the low-resolution class bits
    (:func:`fibroquant.tiles.class_flags`, resized to ``excluded``; where classes overlap, the
    one that paints first in :data:`fibroquant.exclusions.CLASSES`); the rest is the tiles
    left out (``unfocused``). Without tiles left out, the rest (pixels along the classes'
    edges the coarser bits miss) joins the class next to it, else the largest: a legend must
    not name a class the slide does not have."""
    rest = exclusions.TILES.name
    if flags is None or not excluded.any():
        return {rest: excluded} if excluded.any() else {}
    shape = excluded.shape
    # the classes the slide has at all (a field's few: each other class was a full-size pass)
    present = int(np.bitwise_or.reduce(flags, axis=None)) if flags.size else 0
    if flags.shape != shape:
        flags = cv2.resize(flags, (shape[1], shape[0]),
                           interpolation=cv2.INTER_NEAREST).astype(np.uint8, copy=False)
    out: dict[str, np.ndarray] = {}
    left = excluded.copy()
    for c in exclusions.painted():
        if not present & c.bit:
            continue
        m = left & ((flags & np.uint8(c.bit)) != 0)
        if m.any():
            out[c.name] = m
            left &= ~m
    if left.any() and (tiles_left_out or not out):
        out[rest] = left
    elif left.any():
        near = np.ones((3, 3), np.uint8)
        for name, m in out.items():
            got = left & cv2.dilate(m.view(np.uint8), near, iterations=2).view(bool)
            out[name] = m | got
            left &= ~got
        if left.any():
            largest = max(out, key=lambda k: int(np.count_nonzero(out[k])))
            out[largest] = out[largest] | left
    return out


def _result_mask(analysis: Any, name: str) -> BitMask | np.ndarray:
    """A result's ``name`` mask as it holds it: its bits (``collagen_bits``, ...) when it
    has them, else its bool array (``collagen_mask``, ...)."""
    bits = getattr(analysis, f"{name}_bits", None)
    return bits if isinstance(bits, BitMask) else getattr(analysis, f"{name}_mask")


def _mask_interpolation(scale: float) -> int:
    """How a 0/255 mask is resampled to the QC overlay by ``scale`` (<= 1): by its area
    (``INTER_AREA``: a pixel at least half covered) when it is reduced 2x or more; bilinearly
    when less (a 2048² field's masks to the 2000-px overlay): every overlay pixel then lies
    within 2 x 2 mask pixels, so the two differ only along mask edges, and OpenCV's area
    resampling by a non-integer factor costs ~5x as much (15 ms per mask)."""
    return cv2.INTER_AREA if scale <= 0.5 else cv2.INTER_LINEAR


def write_qc(path: Path, analysis: Any, *, max_px: int = 2000, title: str = "") -> None:
    """Write a slide's QC overlay as JPEG: collagen filled, exclusions in their colours, the
    traits' lumen calls outlined, a legend, a scale bar and the slide name (:func:`qc_fill`,
    :func:`draw_vessel_marks`, :func:`qc_panel`).

    Parameters
    ----------
    path : pathlib.Path
        JPEG to write (atomically).
    analysis : fibroquant.measure.SlideResult
        Its ``thumbnail``, masks, ``mask_mpp``, ``vessels`` and, when it has them, ``flags``
        (low-resolution class bits that tell the exclusions apart); the image is scaled so
        its longest side is at most ``max_px``.
    max_px : int
        Longest side of the overlay, pixels.
    title : str
        Shown under the image (default: the file name without ``.jpg``).
    """
    write_qc_draft(path, qc_draft(analysis, max_px=max_px, title=title or Path(path).stem),
                   getattr(analysis, "vessels", ()))


@dataclass
class QcDraft:
    """A QC overlay before its lumen calls and legend (:func:`qc_draft`): the filled image
    (uint8 RGB), its µm per pixel, the slide name, the collagen fill and the exclusions
    shown."""

    overlay: np.ndarray = field(repr=False)
    mpp: float
    title: str
    collagen_rgb: tuple[int, int, int]
    exclusions: list[str]


def write_qc_draft(path: Path, draft: QcDraft, vessels: Sequence[Any] = ()) -> None:
    """Finish a :class:`QcDraft` (its overlay is drawn on, in place) with the lumen calls
    ``vessels`` and the legend band, and write it as JPEG, atomically."""
    marks = draw_vessel_marks(draft.overlay, vessels, draft.mpp) if vessels else []
    panel = qc_panel(draft.overlay, title=draft.title, mpp=draft.mpp,
                     collagen_rgb=draft.collagen_rgb, exclusions=draft.exclusions, marks=marks)
    write_jpeg(path, panel)


def qc_draft(analysis: Any, *, max_px: int = 2000, title: str) -> QcDraft:
    """The costly part of :func:`write_qc` (the masks scaled to the overlay and filled in),
    which needs no fibre trait: written beside them, finished once their calls are known."""
    thumb = analysis.thumbnail
    mh, mw = _result_mask(analysis, "collagen").shape
    scale = min(1.0, max_px / max(mh, mw))
    size = (max(round(mw * scale), 1), max(round(mh * scale), 1))
    if (thumb.shape[1], thumb.shape[0]) != size:
        interp = cv2.INTER_AREA if thumb.shape[1] > size[0] else cv2.INTER_LINEAR
        thumb = cv2.resize(thumb, size, interpolation=interp)

    buffer: list[np.ndarray] = []  # one full-size 0/255 image for the three masks in turn

    def fit(name: str) -> np.ndarray:
        # overlay pixels at least half covered by the mask; the share is resampled as uint8
        # (0/255, >= 128 when >= 0.5): a quarter of a float32 copy (43 MB rather than 172 MB
        # for a 1-GP slide's masks), unpacked straight to 0/255 from bits
        mask = _result_mask(analysis, name)
        if mask.shape == (size[1], size[0]):
            return np.asarray(mask, bool)
        if isinstance(mask, BitMask):
            if not buffer:
                buffer.append(np.empty(mask.shape, np.uint8))
            full = mask.unpack(255, out=buffer[0])
        else:
            full = np.multiply(mask, np.uint8(255), dtype=np.uint8)
        return cv2.resize(full, size, interpolation=_mask_interpolation(scale)) >= 128

    collagen = fit("collagen")
    excluded = fit("excluded")
    tissue = fit("tissue")
    if buffer:
        buffer.clear()
        release_free_heap()  # its pages back before the overlay's own (peak memory)
    measured = getattr(analysis, "measurements", None)
    left_out = getattr(measured, "excluded_area_mm2", {}).get(_TILES_COLUMN, None)
    exclusions = _exclusion_masks(getattr(analysis, "flags", None), excluded,
                                  tiles_left_out=left_out is None or left_out > 0)
    rgb = _as_rgb_uint8(thumb)
    stain = getattr(analysis, "stain", "")
    colour = (collagen_fill_for_stain(stain) if stain in STAIN_FILL_RGB
              else collagen_fill_colour(rgb, collagen))
    overlay = qc_fill(rgb, tissue, collagen, exclusions, colour)
    names = list(exclusions)
    del thumb, rgb, tissue, collagen, excluded, exclusions  # (peak memory)
    mpp = float(getattr(analysis, "mask_mpp", 0) or 0) * (mh / size[1])
    return QcDraft(overlay, mpp or 1.0, title, colour, names)
