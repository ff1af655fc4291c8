"""A zoomable full-resolution QC view of a slide: a DeepZoom pyramid and its OpenSeadragon page.

The QC overlay JPEG is at most ``tiling.qc_max_px`` pixels (2,000 by default), so on a whole
slide a fine fibre is a fraction of a pixel there and cannot be judged. This module draws the
overlay (counted collagen outlined and lightly tinted, so its own stain stays visible; each
exclusion in its own colour) at the analysis resolution,
block by block while the slide is still open, with the same collagen decision as the
measurement (:func:`fibroquant.tiles.measure_tile` at mask factor 1), and writes it as a
DeepZoom pyramid (``zoom/STEM.dzi`` and ``zoom/STEM_files/LEVEL/COL_ROW.jpg``) with a page
``zoom/STEM.html`` that opens it in OpenSeadragon (bundled in ``fibroquant/viewer``, BSD-3-Clause,
no network needed, works from ``file://``: the tile source is given inline, not fetched).

Memory is bounded by one block (:data:`BLOCK_PX` analysis pixels square, about 50 MB of RGB),
whatever the slide's size: each block gives the tiles of the :data:`BLOCK_LEVELS` finest levels
by halving, and a canvas 2^BLOCK_LEVELS times smaller than the analysis image (1/256 of its
pixels) gives the coarser levels.
"""

from __future__ import annotations

import glob
import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import cv2
import numpy as np

from fibroquant import exclusions, kernels
from fibroquant.errors import FibroquantError
from fibroquant.tasks import remove_zoom
from fibroquant.tiles import (
    index_map,
    measure_tile,
    read_analysis,
    tile_grid,
    touches,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fibroquant.config import Settings
    from fibroquant.measure import SlideResult
    from fibroquant.pipeline import Calibration

__all__ = ["TILE_PX", "dzi_levels", "remove_zoom", "wants_zoom", "write_zoom", "zoom_writer"]

#: DeepZoom tile edge and overlap, px (the DeepZoom defaults: 254 + 2 × 1 = 256).
TILE_PX = 254
OVERLAP_PX = 1
#: Levels each block gives by halving; a block is TILE_PX × 2**BLOCK_LEVELS analysis pixels.
BLOCK_LEVELS = 4
BLOCK_PX = TILE_PX * 2**BLOCK_LEVELS
#: JPEG quality of the tiles; the finest level keeps full-resolution colour (4:4:4), so a
#: one-pixel fibre's fill is not smeared over its neighbours by chroma subsampling (q75 4:4:4
#: is ~10 % larger than q82 4:2:0 on tissue).
JPEG_QUALITY = 75
#: Collagen fill opacity at full resolution: light, so the fibre's own stain stays visible
#: under it; the fill's edge (:data:`COLLAGEN_EDGE_ALPHA`, :data:`EDGE_PX`) marks what was
#: counted.
COLLAGEN_ALPHA = 0.15
COLLAGEN_EDGE_ALPHA = 0.8
#: Width of that edge, px (2: still a line on the level below, half the resolution).
EDGE_PX = 2
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
EXCLUSION_ALPHA = 0.55
_VIEWER_ASSETS = "openseadragon"


def wants_zoom(setting: bool | None, geometry: Any, qc_max_px: int) -> bool:
    """Whether a slide gets a zoomable view.

    ``setting`` True or False decides; None (the default) writes one when the QC overlay is
    coarser than the analysis (the analysis image is larger than ``qc_max_px`` or the masks
    are reduced): a whole slide, not a microscope field already shown at full resolution.
    """
    if setting is not None:
        return setting
    return max(geometry.width, geometry.height) > qc_max_px or geometry.mask_factor > 1


def dzi_levels(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every DeepZoom level, level 0 (1 × 1) first."""
    top = math.ceil(math.log2(max(width, height, 1)))
    return [(-(-width // 2 ** (top - lev)), -(-height // 2 ** (top - lev)))
            for lev in range(top + 1)]


def _halve(img: np.ndarray) -> np.ndarray:
    """2 × 2 mean (the last row / column repeated when odd): the next DeepZoom level."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    return cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2),
                      interpolation=cv2.INTER_AREA)


def _write_tiles(files: Path, level: int, img: np.ndarray, origin: tuple[int, int],
                 core: tuple[int, int, int, int], size: tuple[int, int],
                 pool: ThreadPoolExecutor, *, full: bool = False) -> int:
    """Write the tiles of one level whose cores lie in ``core`` (y0, x0, y1, x1, level px).

    ``img`` holds level pixels from ``origin`` (y, x) on, with at least ``OVERLAP_PX`` of
    margin past ``core`` wherever the level goes on; ``size`` is the level's (width, height);
    ``full``: the finest level (JPEG without chroma subsampling). Returns the bytes written.
    """
    folder = files / str(level)
    folder.mkdir(exist_ok=True)
    y0, x0, y1, x1 = core
    oy, ox = origin
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    if full:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]

    def encode(rc: tuple[int, int]) -> int:
        row, col = rc
        ty0 = max(row * TILE_PX - OVERLAP_PX, 0)
        tx0 = max(col * TILE_PX - OVERLAP_PX, 0)
        ty1 = min((row + 1) * TILE_PX + OVERLAP_PX, size[1])
        tx1 = min((col + 1) * TILE_PX + OVERLAP_PX, size[0])
        ok, buf = cv2.imencode(".jpg", bgr[ty0 - oy : ty1 - oy, tx0 - ox : tx1 - ox], params)
        if not ok:  # pragma: no cover - cv2 fails only on empty arrays
            msg = f"cannot encode tile {level}/{col}_{row}"
            raise FibroquantError(msg)
        (folder / f"{col}_{row}.jpg").write_bytes(buf.tobytes())
        return int(buf.size)

    cells = [(row, col) for row in range(y0 // TILE_PX, -(-y1 // TILE_PX))
             for col in range(x0 // TILE_PX, -(-x1 // TILE_PX))]
    return sum(pool.map(encode, cells))


def _tint(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> None:
    """Blend ``colour`` into ``rgb`` (in place) where ``mask``, with opacity ``alpha``."""
    if mask.any():
        ramp = np.arange(256, dtype=np.float32) * np.float32(1 - alpha)
        lut = np.stack([np.clip(np.rint(ramp + np.float32(alpha * c)), 0, 255) for c in colour],
                       axis=-1).astype(np.uint8)[None]
        cv2.copyTo(cv2.LUT(rgb, lut), mask.view(np.uint8), rgb)  # rgb: C-contiguous


def _blurry_boxes(result: SlideResult, settings: Settings) -> list[tuple[int, int, int, int]]:
    """Analysis tiles left out as unfocused: no counted tissue left in the masks, some
    excluded (their tissue was moved to the excluded mask)."""
    if not settings.tissue.exclude_unfocused:
        return []
    geo = result.geometry
    f = geo.mask_factor
    boxes = []
    for y0, x0, y1, x1 in tile_grid(geo, settings.tiling.tile_px):
        ys, xs = slice(y0 // f, -(-y1 // f)), slice(x0 // f, -(-x1 // f))
        if result.excluded_bits[ys, xs].any() and not result.tissue_bits[ys, xs].any():
            boxes.append((y0, x0, y1, x1))
    return boxes


def _classify(cal: Calibration, rgb: np.ndarray, box: tuple[int, int, int, int],
              decide: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Collagen, tissue and excluded masks (bool, full resolution) and class bits of one
    analysis box whose pixels are ``rgb``: the measurement's decision (mask factor 1)."""
    geo = cal.geometry
    y0, x0, y1, x1 = box
    th, tw = cal.flags.shape
    fy, fx = geo.height / cal.thumbnail.shape[0], geo.width / cal.thumbnail.shape[1]
    rows, cols = index_map(y0, y1, fy, th), index_map(x0, x1, fx, tw)
    fl = cal.flags[np.ix_(rows, cols)]
    decided = None
    if decide is not None:
        halo = decide.halo_px(geo.analysis_mpp)
        wide = read_analysis(cal.slide, geo, y0 - halo, x0 - halo, y1 - y0 + 2 * halo,
                             x1 - x0 + 2 * halo)
        decided = np.asarray(decide.predict_tile(
            wide, halo, cal.stains.stains, mpp=geo.analysis_mpp,
            tissue=(fl & kernels.FLAG_TISSUE) != 0), bool)
    out = measure_tile(rgb, cal.rule, cal.flags, cal.threshold_map, rows, cols, 1, 0,
                       decided=decided)
    collagen, tissue, excluded = (b > 0 for b in out.blocks[:, : y1 - y0, : x1 - x0])
    return collagen, tissue, excluded, fl


#: Edge of the boxes a block is classified in (bounds the kernel's temporaries).
_CLASSIFY_PX = 1024


def _draw_block(cal: Calibration, box: tuple[int, int, int, int],
                blurry: list[tuple[int, int, int, int]], colour: tuple[int, int, int],
                decide: Any, pool: ThreadPoolExecutor) -> np.ndarray:
    """The QC overlay of one box of the analysis image (y0, x0, y1, x1), uint8 RGB."""
    geo = cal.geometry
    y0, x0, y1, x1 = box
    rgb = np.ascontiguousarray(read_analysis(cal.slide, geo, y0, x0, y1 - y0, x1 - x0))
    fy, fx = geo.height / cal.thumbnail.shape[0], geo.width / cal.thumbnail.shape[1]
    th, tw = cal.flags.shape

    def draw(sub: tuple[int, int, int, int]) -> None:
        rows = index_map(sub[0], sub[2], fy, th)
        cols = index_map(sub[1], sub[3], fx, tw)
        if not touches(cal.tissue.section, rows, cols):
            return  # glass: shown as it is
        view = rgb[sub[0] - y0 : sub[2] - y0, sub[1] - x0 : sub[3] - x0]
        win = np.ascontiguousarray(view)
        collagen, tissue, excluded, fl = _classify(cal, win, sub, decide)
        unfocused = np.zeros_like(tissue)
        for by0, bx0, by1, bx1 in blurry:
            if by0 < sub[2] and by1 > sub[0] and bx0 < sub[3] and bx1 > sub[1]:
                unfocused[max(by0 - sub[0], 0) : by1 - sub[0],
                          max(bx0 - sub[1], 0) : bx1 - sub[1]] = True
        unfocused &= tissue
        left = excluded.copy()
        for c in exclusions.painted():  # every excluded pixel has its class's bit
            m = left & ((fl & np.uint8(c.bit)) != 0)
            _tint(win, m, c.colour, EXCLUSION_ALPHA)
            left &= ~m
        _tint(win, unfocused, exclusions.TILES.colour, EXCLUSION_ALPHA)
        counted = collagen & ~unfocused
        edge = counted & ~cv2.erode(counted.view(np.uint8), _CROSS, iterations=EDGE_PX,
                                    borderType=cv2.BORDER_REPLICATE).astype(bool)
        _tint(win, counted & ~edge, colour, COLLAGEN_ALPHA)
        _tint(win, edge, colour, COLLAGEN_EDGE_ALPHA)
        view[...] = win

    subs = [(sy, sx, min(sy + _CLASSIFY_PX, y1), min(sx + _CLASSIFY_PX, x1))
            for sy in range(y0, y1, _CLASSIFY_PX) for sx in range(x0, x1, _CLASSIFY_PX)]
    list(pool.map(draw, subs))  # disjoint windows of rgb
    return rgb


def write_zoom(out_dir: Path, stem: str, cal: Calibration, result: SlideResult,
               settings: Settings, *, title: str, colour: tuple[int, int, int],
               decide: Any = None, threads: int = 1) -> dict[str, float]:
    """Write ``zoom/STEM.dzi``, ``zoom/STEM_files/`` and ``zoom/STEM.html`` for one slide.

    Parameters
    ----------
    out_dir : pathlib.Path
        The run's output folder.
    stem : str
        The slide's output stem.
    cal : fibroquant.pipeline.Calibration
        The slide's calibration, its slide still open.
    result : fibroquant.measure.SlideResult
        The measurement (its masks tell the unfocused tiles).
    settings : fibroquant.config.Settings
    title : str
        The slide's name, shown on the page.
    colour : tuple of int
        Collagen fill (R, G, B), the QC overlay's.
    decide : PixelDecider, optional
        The pixel classifier the slide was measured with.
    threads : int
        Threads drawing and encoding (the slide's share of the cores).

    Returns
    -------
    dict
        ``zoom_mb`` (tiles written, MB) and ``zoom_tiles`` (their number).

    Notes
    -----
    The tiles go to a temporary folder renamed into place at the end, and the page is
    written last, so an interrupted slide leaves no page pointing at missing tiles.
    """
    geo = cal.geometry
    width, height = geo.width, geo.height
    levels = dzi_levels(width, height)
    top = len(levels) - 1
    k = min(BLOCK_LEVELS, top)
    margin = 2**k
    zoom_dir = Path(out_dir) / "zoom"
    zoom_dir.mkdir(parents=True, exist_ok=True)
    for stale in zoom_dir.glob(f".{glob.escape(stem)}_files.*"):  # of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}_files.", dir=zoom_dir))
    blurry = _blurry_boxes(result, settings)
    canvas = np.zeros((levels[top - k][1], levels[top - k][0], 3), np.uint8)
    nbytes = 0
    n_tiles = 0
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fq-zoom")
    try:
        for by in range(0, height, BLOCK_PX):
            for bx in range(0, width, BLOCK_PX):
                ry0, rx0 = max(by - margin, 0), max(bx - margin, 0)
                ry1, rx1 = min(by + BLOCK_PX + margin, height), min(bx + BLOCK_PX + margin, width)
                img = _draw_block(cal, (ry0, rx0, ry1, rx1), blurry, colour, decide, pool)
                for j in range(k + 1):
                    if j:
                        img = _halve(img)
                    s = 2**j
                    size = levels[top - j]
                    core = (by // s, bx // s, min(-(-(by + BLOCK_PX) // s), size[1]),
                            min(-(-(bx + BLOCK_PX) // s), size[0]))
                    nbytes += _write_tiles(tmp, top - j, img, (ry0 // s, rx0 // s), core, size,
                                          pool, full=j == 0)
                    n_tiles += (-(-(core[2] - core[0]) // TILE_PX)) * \
                        (-(-(core[3] - core[1]) // TILE_PX))
                cy, cx = by // 2**k, bx // 2**k
                oy, ox = ry0 // 2**k, rx0 // 2**k
                ch = min(BLOCK_PX // 2**k, canvas.shape[0] - cy)
                cw = min(BLOCK_PX // 2**k, canvas.shape[1] - cx)
                canvas[cy : cy + ch, cx : cx + cw] = img[cy - oy : cy - oy + ch,
                                                         cx - ox : cx - ox + cw]
        img = canvas
        for lev in range(top - k - 1, -1, -1):
            img = _halve(img)
            w, h = levels[lev]
            nbytes += _write_tiles(tmp, lev, img, (0, 0), (0, 0, h, w), (w, h), pool)
            n_tiles += -(-h // TILE_PX) * -(-w // TILE_PX)
        files = zoom_dir / f"{stem}_files"
        shutil.rmtree(files, ignore_errors=True)
        os.replace(tmp, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.shutdown()
    _write_text(zoom_dir / f"{stem}.dzi", _dzi_xml(width, height))
    install_viewer(zoom_dir)
    _write_text(zoom_dir / f"{stem}.html",
                viewer_page(stem, title, width, height, geo.analysis_mpp, colour,
                            cpa_percent=result.measurements.cpa_percent))
    return {"zoom_mb": nbytes / 1e6, "zoom_tiles": float(n_tiles)}


def zoom_writer(out_dir: Path, stem: str, settings: Settings, title: str,
                threads: int = 1) -> Callable[[Calibration, SlideResult, Any], None]:
    """The ``after`` step of :func:`fibroquant.pipeline.analyze_slide` that writes a slide's
    zoomable view when :func:`wants_zoom` (and removes one of an earlier run otherwise).

    A view that cannot be written raises :class:`FibroquantError` (``cannot write
    outputs: ...``): the slide fails like one whose QC overlay cannot be written.
    """
    def after(cal: Calibration, result: SlideResult, decide: Any) -> None:
        from fibroquant.report import collagen_fill_for_stain

        try:
            if not wants_zoom(settings.tiling.zoom, cal.geometry, settings.tiling.qc_max_px):
                remove_zoom(out_dir, stem)
                return
            write_zoom(out_dir, stem, cal, result, settings, title=title,
                       colour=collagen_fill_for_stain(result.stain), decide=decide,
                       threads=threads)
        except OSError as exc:
            msg = f"{title}: cannot write outputs: zoom view: {exc.strerror or exc}"
            raise FibroquantError(msg) from exc

    return after


def _write_text(path: Path, text: str) -> None:
    from fibroquant.outdir import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def _dzi_xml(width: int, height: int) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpg" '
            f'Overlap="{OVERLAP_PX}" TileSize="{TILE_PX}"><Size Width="{width}" '
            f'Height="{height}"/></Image>\n')


def install_viewer(zoom_dir: Path) -> None:
    """Copy OpenSeadragon (script, button images, licence) into ``zoom_dir/openseadragon``
    when it is not there yet (copied to a temporary folder and renamed, so workers writing
    at once never see half of it)."""
    dest = Path(zoom_dir) / _VIEWER_ASSETS
    if (dest / "openseadragon.min.js").is_file():
        return
    src = resources.files("fibroquant") / "viewer"
    tmp = Path(tempfile.mkdtemp(prefix=".openseadragon.", dir=zoom_dir))
    try:
        with resources.as_file(src) as folder:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another worker put it there first
            if not (dest / "openseadragon.min.js").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def viewer_page(stem: str, title: str, width: int, height: int, mpp: float,
                colour: tuple[int, int, int], *, cpa_percent: float | None = None,
                legend: Mapping[str, tuple[int, int, int]] | None = None) -> str:
    """The HTML page that opens ``STEM_files`` in OpenSeadragon, with a legend, a scale bar
    that follows the zoom (``mpp``: µm per analysis pixel) and links back to the report and
    the slide's QC overlay."""
    from fibroquant.report import EXCLUSION_COLOURS

    source = {"Image": {"xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                        "Url": f"{quote(stem)}_files/", "Format": "jpg",
                        "Overlap": str(OVERLAP_PX), "TileSize": str(TILE_PX),
                        "Size": {"Width": str(width), "Height": str(height)}}}
    items = {"collagen (outlined, lightly tinted)": colour, **(legend or EXCLUSION_COLOURS)}
    swatches = "".join(
        f'<span class="key"><i style="background:rgb{c}"></i>{html.escape(n)}</span>'
        for n, c in items.items())
    cpa = (f" · CPA {cpa_percent:.2f} %" if cpa_percent is not None
           and math.isfinite(cpa_percent) else "")
    return _PAGE.format(
        title=html.escape(title), stem_url=html.escape(quote(stem)), cpa=cpa, keys=swatches,
        mpp=json.dumps(float(mpp)),
        source=json.dumps(source).replace("</", "<\\/"),
        size=f"{width:,} × {height:,} px at {mpp:.3g} µm/px")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · zoomable QC overlay</title>
<style>
html,body{{margin:0;height:100%;font:14px/1.4 system-ui,sans-serif;background:#222;color:#eee}}
body{{display:flex;flex-direction:column}}
header{{padding:6px 12px;background:#111;display:flex;flex-wrap:wrap;gap:4px 16px;
align-items:center}}
h1{{font-size:16px;margin:0}} .meta{{color:#bbb}} a{{color:#8cf}}
.key{{white-space:nowrap}} .key i{{display:inline-block;width:14px;height:14px;
border:1px solid #fff;margin-right:4px;vertical-align:-2px}}
#wrap{{flex:1;position:relative;min-height:0}} #view{{position:absolute;inset:0}}
#bar{{position:absolute;left:12px;bottom:12px;z-index:5;background:rgba(255,255,255,.85);
color:#000;padding:2px 6px;border-radius:3px;font-size:12px}}
#bar div{{height:4px;background:#000;margin-top:2px}}
</style></head><body>
<header><a href="../report.html">← report</a><h1>{title}</h1>
<span class="meta">{size}{cpa}</span>{keys}<a href="../qc/{stem_url}.jpg">overlay</a>
<span class="meta">scroll or pinch to zoom, drag to pan</span></header>
<div id="wrap"><div id="view"></div>
<div id="bar"><span id="barlabel"></span><div id="barline"></div></div></div>
<script src="openseadragon/openseadragon.min.js"></script>
<script>
var MPP = {mpp};
var viewer = OpenSeadragon({{id: "view", prefixUrl: "openseadragon/images/",
  tileSources: {source}, showNavigator: true, maxZoomPixelRatio: 4,
  animationTime: 0.4, crossOriginPolicy: false}});
function scaleBar() {{
  var item = viewer.world.getItemAt(0); if (!item) return;
  var z = item.viewportToImageZoom(viewer.viewport.getZoom(true));
  var umPerScreenPx = MPP / z, target = 120 * umPerScreenPx;
  var p = Math.pow(10, Math.floor(Math.log10(target))), um = p;
  [1, 2, 5].forEach(function (m) {{ if (m * p <= target) um = m * p; }});
  document.getElementById("barline").style.width = (um / umPerScreenPx) + "px";
  document.getElementById("barlabel").textContent = um >= 1000 ? (um / 1000) + " mm" : um + " µm";
}}
viewer.addHandler("open", function () {{
  // #z=8&x=0.5&y=0.4 opens at 8x, centred at that fraction of the width and height
  var q = {{}}; location.hash.slice(1).split("&").forEach(function (kv) {{
    var p = kv.split("="); q[p[0]] = parseFloat(p[1]); }});
  if (q.z > 0) {{
    var item = viewer.world.getItemAt(0), s = item.getContentSize();
    viewer.viewport.zoomTo(q.z, null, true);
    viewer.viewport.panTo(item.imageToViewportCoordinates(
      (isNaN(q.x) ? 0.5 : q.x) * s.x, (isNaN(q.y) ? 0.5 : q.y) * s.y), true);
  }}
  scaleBar();
}});
viewer.addHandler("animation", scaleBar);
</script></body></html>
"""
