"""The zoomable full-resolution QC view: DeepZoom pyramid geometry, content, the same collagen
decision as the measurement, bounded reads, the viewer page, and the CLI's --zoom."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from fibroquant import pipeline, zoom
from fibroquant.config import Settings
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, make_section
from fibroquant.tasks import discard_outputs
from fibroquant.tiles import tile_grid

MPP = 0.5


@pytest.fixture(scope="module")
def section() -> np.ndarray:
    rgb, _ = make_section(SectionParams(shape=(700, 1100), mpp=MPP), rng=5)
    return rgb


def _run(rgb: np.ndarray, out: Path, captured: dict | None = None, **settings_kw) -> object:
    settings = Settings.model_validate({"tiling": {"zoom": True, **settings_kw}})
    writer = zoom.zoom_writer(out, "s", settings, "s.png")

    def after(cal, result, decide) -> None:
        if captured is not None:
            captured["cal"] = cal
        writer(cal, result, decide)

    return pipeline.analyze_slide("s.png", settings, slide=ArraySlide(rgb, MPP), after=after)


def _assemble(files: Path, level: int, size: tuple[int, int]) -> np.ndarray:
    """A DeepZoom level put together from its tiles (overlap cut off), RGB."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    for path in (files / str(level)).glob("*.jpg"):
        col, row = map(int, path.stem.split("_"))
        tile = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        y0, x0 = row * zoom.TILE_PX, col * zoom.TILE_PX
        oy, ox = (zoom.OVERLAP_PX if row else 0), (zoom.OVERLAP_PX if col else 0)
        th, tw = min(zoom.TILE_PX, h - y0), min(zoom.TILE_PX, w - x0)
        img[y0 : y0 + th, x0 : x0 + tw] = tile[oy : oy + th, ox : ox + tw]
    return img


def test_dzi_levels_halve_with_ceiling() -> None:
    """Level sizes as the DeepZoom format defines them: ceil(size / 2^(top - level))."""
    levels = zoom.dzi_levels(1100, 700)
    assert len(levels) == math.ceil(math.log2(1100)) + 1
    assert levels[0] == (1, 1)
    assert levels[-1] == (1100, 700)
    assert levels[-2] == (550, 350)
    assert levels[-4] == (138, 88)


def test_pyramid_tiles_overlap_and_content(section: np.ndarray, tmp_path: Path) -> None:
    """Every level has its tiles, each 254 px + 1 px overlap on inner sides; the top level is
    the slide with the collagen tinted; a lower level is the upper one halved."""
    captured: dict = {}
    result = _run(section, tmp_path, captured)
    files = tmp_path / "zoom" / "s_files"
    levels = zoom.dzi_levels(1100, 700)
    for level, (w, h) in enumerate(levels):
        names = {p.name for p in (files / str(level)).glob("*.jpg")}
        cols, rows = -(-w // zoom.TILE_PX), -(-h // zoom.TILE_PX)
        assert names == {f"{c}_{r}.jpg" for c in range(cols) for r in range(rows)}
        last = cv2.imread(str(files / str(level) / f"{cols - 1}_{rows - 1}.jpg"))
        exp_w = w - (cols - 1) * zoom.TILE_PX + (zoom.OVERLAP_PX if cols > 1 else 0)
        exp_h = h - (rows - 1) * zoom.TILE_PX + (zoom.OVERLAP_PX if rows > 1 else 0)
        assert last.shape[:2] == (exp_h, exp_w), level
    top = _assemble(files, len(levels) - 1, levels[-1]).astype(int)
    # the same collagen decision as the measurement, at full resolution
    cal = captured["cal"]
    collagen = np.zeros((700, 1100), bool)
    for y0, x0, y1, x1 in tile_grid(cal.geometry, Settings().tiling.tile_px):
        c, *_ = zoom._classify(cal, np.ascontiguousarray(section[y0:y1, x0:x1]),
                               (y0, x0, y1, x1), None)
        collagen[y0:y1, x0:x1] = c
    counted = collagen.sum() * MPP * MPP / 1e6
    assert counted == pytest.approx(result.measurements.collagen_area_mm2, rel=1e-12)
    # edge pixels of the counted collagen strongly tinted, the inside lightly
    edge = collagen & ~ndimage.binary_erosion(collagen, ndimage.generate_binary_structure(2, 1),
                                              iterations=zoom.EDGE_PX, border_value=1)
    for where, alpha in ((edge, zoom.COLLAGEN_EDGE_ALPHA), (collagen & ~edge, zoom.COLLAGEN_ALPHA)):
        fill = alpha * np.array((0, 229, 255)) + (1 - alpha) * section[where].astype(float)
        err_fill = np.abs(top[where] - fill).mean()
        err_raw = np.abs(top[where] - section[where].astype(int)).mean()
        assert err_raw > 2.5 * err_fill  # tinted as said, not left as it is (JPEG q75 errors)
    glass = ~cv2.dilate(result.tissue_mask.astype(np.uint8) | result.excluded_mask.astype(
        np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.abs(top[glass] - section[glass].astype(int)).mean() < 3  # glass left as it is
    half = _assemble(files, len(levels) - 2, levels[-2]).astype(float)
    halved = cv2.resize(top.astype(np.uint8), (550, 350), interpolation=cv2.INTER_AREA)
    assert np.abs(half - halved).mean() < 4  # both JPEG


def test_blocks_bound_the_reads_and_match_one_block(section: np.ndarray, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With blocks smaller than the slide, no read is larger than a block and its margin,
    and the pyramid (coarse levels from the small canvas included) matches one block's."""
    _run(section, tmp_path / "one")
    reads: list[tuple[int, int]] = []
    real = zoom.read_analysis

    def spy(slide, geo, y, x, h, w):
        reads.append((h, w))
        return real(slide, geo, y, x, h, w)

    monkeypatch.setattr(zoom, "BLOCK_LEVELS", 2)
    monkeypatch.setattr(zoom, "BLOCK_PX", zoom.TILE_PX * 4)
    monkeypatch.setattr(zoom, "read_analysis", spy)
    _run(section, tmp_path / "many")
    assert len(reads) == 2  # 1100 x 700 in 1016-px blocks: one row of two
    assert max(max(r) for r in reads) <= zoom.BLOCK_PX + 2 * 4
    levels = zoom.dzi_levels(1100, 700)
    for level in (len(levels) - 1, len(levels) - 3, len(levels) - 5, 2):
        a = _assemble(tmp_path / "one" / "zoom" / "s_files", level, levels[level])
        b = _assemble(tmp_path / "many" / "zoom" / "s_files", level, levels[level])
        assert np.abs(a.astype(int) - b).mean() < 1.5, level


def test_wants_zoom_for_slides_larger_than_the_overlay() -> None:
    """Auto: a whole slide (larger than the QC overlay, or masks reduced) gets a view, a
    microscope field does not; True / False decide."""
    field = SimpleNamespace(width=1500, height=1200, mask_factor=1)
    slide = SimpleNamespace(width=40000, height=30000, mask_factor=5)
    assert not zoom.wants_zoom(None, field, 2000)
    assert zoom.wants_zoom(None, slide, 2000)
    assert zoom.wants_zoom(None, SimpleNamespace(width=2100, height=900, mask_factor=1), 2000)
    assert zoom.wants_zoom(True, field, 2000)
    assert not zoom.wants_zoom(False, slide, 2000)
    # off unless asked for: on a whole slide the view costs more than the analysis itself
    from fibroquant.config import Settings

    assert not zoom.wants_zoom(Settings().tiling.zoom, slide, 2000)


def test_page_opens_the_tiles_offline_and_discard_removes_all(section: np.ndarray,
                                                              tmp_path: Path) -> None:
    """The page loads the bundled OpenSeadragon and its licence sits beside it; the tile
    source is inline (file:// cannot fetch the .dzi), nothing comes from the network; a
    killed run's half-written tiles are removed; a failed slide's view is removed with its
    other outputs."""
    (tmp_path / "zoom" / ".s_files.k1ll3d").mkdir(parents=True)  # a killed run's tiles
    _run(section, tmp_path)
    zdir = tmp_path / "zoom"
    assert not (zdir / ".s_files.k1ll3d").exists()
    page = (zdir / "s.html").read_text(encoding="utf-8")
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs == ["openseadragon/openseadragon.min.js"]
    assert (zdir / srcs[0]).stat().st_size > 100_000
    assert "Redistribution and use" in (zdir / "openseadragon" /
                                        "LICENSE-openseadragon.txt").read_text()
    assert (zdir / "openseadragon" / "images" / "zoomin_rest.png").is_file()
    assert not re.search(r"https?://(?!schemas\.microsoft\.com)", page)
    source = json.loads(re.search(r"tileSources: (\{.*?\}\}\})", page).group(1))
    assert source["Image"]["Url"] == "s_files/"
    assert source["Image"]["Size"] == {"Width": "1100", "Height": "700"}
    assert 'Width="1100" Height="700"' in (zdir / "s.dzi").read_text()
    discard_outputs(tmp_path, "s")
    assert sorted(p.name for p in zdir.iterdir()) == ["openseadragon"]


@pytest.mark.slow
def test_cli_zoom_flag_and_report_link(tmp_path: Path, repo_root: Path) -> None:
    """``analyze --zoom`` on a field writes the view and the report's card links to it;
    ``--no-zoom`` on the rerun removes it."""
    from typer.testing import CliRunner

    from fibroquant.cli import app
    from fibroquant.synthetic import write_pyramid_tiff

    slides = tmp_path / "slides"
    slides.mkdir()
    rgb, _ = make_section(SectionParams(shape=(400, 500), mpp=MPP), rng=2)
    write_pyramid_tiff(slides / "a.tif", rgb, MPP)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(slides), "-o", str(out), "--zoom",
                                   "--no-traits", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "zoom" / "a.html").is_file()
    assert f"zoomable QC views: {out / 'zoom'} (1 slide(s)" in res.stdout
    report = (out / "report.html").read_text(encoding="utf-8")
    assert 'href="zoom/a.html"' in report
    res = CliRunner().invoke(app, ["analyze", str(slides), "-o", str(out), "--no-zoom",
                                   "--force", "--no-traits", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert not (out / "zoom" / "a.html").exists()
    assert 'href="zoom/a.html"' not in (out / "report.html").read_text(encoding="utf-8")
    # a view that cannot be written fails its slide, as an overlay that cannot be written
    shutil.rmtree(out / "zoom")
    (out / "zoom").write_text("in the way")
    res = CliRunner().invoke(app, ["analyze", str(slides), "-o", str(out), "--zoom",
                                   "--force", "--no-traits", "--workers", "1"])
    assert res.exit_code == 1, res.output
    row = pd.read_csv(out / "slides.csv").iloc[0]
    assert row["status"] == "failed"
    assert "a.tif: cannot write outputs: zoom view:" in row["error"]


def test_pixel_classifier_decides_the_views_collagen(tmp_path: Path) -> None:
    """With a pixel classifier, the view shows its decision (read with its halo), as the
    measurement counts it: collagen is the classifier's pixels within the counted tissue."""
    rgb, _ = make_section(SectionParams(shape=(300, 400), mpp=MPP, field_of_view=True), rng=3)
    halos: list[int] = []

    class LeftHalf:
        def halo_px(self, mpp: float) -> int:
            return 6

        def predict_tile(self, wide, halo, stains, *, mpp, tissue=None):
            halos.append(wide.shape[1] - tissue.shape[1])
            out = np.zeros(tissue.shape, bool)
            out[:, : 200] = True
            return out

    captured: dict = {}

    def after(cal, result, decide) -> None:
        captured["cal"] = cal

    result = pipeline.analyze_slide("f.png", Settings(), slide=ArraySlide(rgb, MPP),
                                    decide=LeftHalf(), after=after)
    collagen, tissue, _, _ = zoom._classify(captured["cal"], rgb, (0, 0, 300, 400), LeftHalf())
    assert halos[-1] == 12
    assert not collagen[:, 200:].any()
    assert collagen[:, :200].sum() == tissue[:, :200].sum() > 0
    assert collagen.sum() * MPP * MPP / 1e6 == pytest.approx(
        result.measurements.collagen_area_mm2, rel=1e-12)


@pytest.mark.slow
def test_viewer_opens_offline_in_headless_chromium(section: np.ndarray, tmp_path: Path) -> None:
    """From file:// with every host unresolvable, the page opens the tiles: the scale bar
    follows the zoom (550 µm across 800 px: 50 µm at 1x, 20 µm at 4x), the viewer shows a
    picture (no background showing through inside the slide) and the slide's corner is its
    glass colour."""
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here")
    _run(section, tmp_path)
    page = (tmp_path / "zoom" / "s.html").as_uri()
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=800,600",
            "--virtual-time-budget=8000"]

    def label(zoom_to: float) -> str:
        dom = subprocess.run([*base, "--dump-dom", f"{page}#z={zoom_to}"], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        return re.search(r'id="barlabel">([^<]*)<', dom).group(1)

    assert label(1) == "50 µm"
    assert label(4) == "20 µm"
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", page], capture_output=True, timeout=120,
                   check=True)
    img = cv2.cvtColor(cv2.imread(str(shot)), cv2.COLOR_BGR2RGB).astype(float)
    middle = img[150:520, 60:600]  # inside the fitted slide, below the header and navigator
    background = (np.abs(middle - 34) <= 10).all(axis=2)  # the viewer's #222
    assert background.mean() < 0.01
    assert middle.std() > 20  # a picture, not a flat placeholder
    # the slide's top-left corner: from the middle row, its left edge, then up that column
    bg = (np.abs(img - 34) <= 10).all(axis=2)
    left = int(np.argmin(bg[400])) + 3
    top = 400 - int(np.argmax(bg[400::-1, left]))
    glass = np.median(section[:40, :40].reshape(-1, 3), axis=0)  # the slide's corner: glass
    corner = img[top + 3 : top + 13, left : left + 10].reshape(-1, 3).mean(axis=0)
    assert np.abs(corner - glass).max() < 12


def test_page_quotes_odd_slide_names() -> None:
    """A stem with a space, '#' or '</script>' reaches the tiles by a quoted URL and cannot
    end the page's script."""
    page = zoom.viewer_page("a b#</script>", "a b#</script>.svs", 10, 10, 0.5, (0, 229, 255))
    source = json.loads(re.search(r"tileSources: (\{.*?\}\}\})", page).group(1))
    assert source["Image"]["Url"] == "a%20b%23%3C/script%3E_files/"
    assert page.count("</script>") == 2  # the two script elements' own
