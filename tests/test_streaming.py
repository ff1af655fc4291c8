"""Tile streaming: tissue found at low resolution first, then only the tiles that touch it are
read at full resolution, and memory does not grow with the slide."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fibroquant.config import load_settings
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, make_section

MPP = 0.5
TILE = 256


class SpySlide(ArraySlide):
    """An in-memory slide that records every region it is asked for: (level, h, w)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, int, int]] = []

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        self.reads.append((level, y1 - y0, x1 - x0))
        return super()._read_inside(level, y0, x0, y1, x1)


@pytest.fixture(scope="module")
def section():
    rgb, truth = make_section(SectionParams(shape=(768, 768), mpp=MPP, fibrosis=0.7,
                                            fine_fibres=0.2), rng=5)
    return rgb, truth


def _on_glass(rgb: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """``rgb`` pasted near the top-left corner of a ``size``² slide of glass (its own corner
    colour, with a little noise)."""
    rng = np.random.default_rng(seed)
    glass = np.median(np.concatenate([rgb[:8].reshape(-1, 3), rgb[-8:].reshape(-1, 3)]), axis=0)
    noise = rng.normal(0, 1.5, (size, size, 3)).astype(np.float32)
    canvas = np.clip(noise + glass.astype(np.float32), 0, 255).astype(np.uint8)
    canvas[100 : 100 + rgb.shape[0], 100 : 100 + rgb.shape[1]] = rgb
    return canvas


def _settings(tissue: dict, collagen: dict | None = None, **tiling):
    return load_settings(overrides={"tiling": {"tile_px": TILE, **tiling}, "tissue": tissue,
                                    "collagen": collagen or {}})


class _Threshold:
    """A stand-in pixel classifier (tiles.PixelDecider) with a halo of 8 µm: collagen is a
    red-green contrast; it checks the halo and tissue it is given."""

    def halo_px(self, mpp: float) -> int:
        return round(8.0 / mpp)

    def predict_tile(self, rgb, halo_px, stains, *, mpp, tissue=None):
        assert halo_px == 16 and mpp == MPP and stains.collagen == "sirius-red"
        core = rgb[halo_px:-halo_px, halo_px:-halo_px].astype(np.int16)
        assert tissue is not None and tissue.shape == core.shape[:2]
        return (core[..., 1] < core[..., 0] - 40) & tissue


#: the rule's decision (default), and a decider reading each tile with a halo
PATHS = {"fused": None, "halo": _Threshold()}


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_only_tiles_touching_tissue_are_read(section, path):
    rgb, _ = section
    size = 3072
    slide = SpySlide(_on_glass(rgb, size), MPP, levels=4)
    # the tissue image at 2 µm/px on both slides (by default its resolution follows the
    # slide's size, which moves a small section's edge and capsule band)
    settings = _settings({"tissue_mpp": 2.0}, mask_max_mpx=1.0)
    a = analyze_slide("big.png", settings, slide=slide, workers=1, decide=PATHS[path])
    alone = analyze_slide("small.png", settings, decide=PATHS[path],
                          slide=ArraySlide(_on_glass(rgb, 968), MPP, levels=4), workers=1)
    level0 = [(h, w) for lev, h, w in slide.reads if lev == 0]
    assert level0, "the tiles are read at full resolution"
    # every full-resolution read is bounded (a tile, or a 512² patch for the channel
    # registration): never a whole level
    assert max(h * w for h, w in level0) <= 512 * 512
    # the section covers 6 % of the slide: the 16 tiles touching it, the registration
    # patches and the stain calibration's sample are all that is read at full resolution
    touching = (-(-(100 + 768) // TILE)) ** 2 * TILE * TILE
    if path == "halo":  # each tile is read with its halo of 16 px
        touching = (-(-(100 + 768) // TILE)) ** 2 * (TILE + 32) ** 2
    read = sum(h * w for h, w in level0)
    assert touching * 0.8 <= read <= touching + 4 * 512 * 512
    assert read < 0.3 * size * size
    # the tissue-detection image comes from a low level, not from level 0
    assert all(h * w <= 1024 * 1024 for lev, h, w in slide.reads if lev > 0)
    # masks are written at low resolution (mask_max_mpx), in physical units
    assert a.collagen_mask.size <= 1.0e6 and a.collagen_mask.shape == a.tissue_mask.shape
    assert a.mask_mpp == pytest.approx(MPP * size / a.collagen_mask.shape[1], rel=0.01)
    # the glass around adds nothing: the section's tissue and collagen, as measured on the
    # section with a narrow border
    rgb, truth = section
    for r in (a.to_record(), alone.to_record()):
        assert r["tissue_area_mm2"] == pytest.approx(truth.tissue_area_mm2, rel=0.05)
    assert a.to_record()["tissue_area_mm2"] == pytest.approx(alone.to_record()["tissue_area_mm2"],
                                                        rel=0.005)
    assert a.to_record()["cpa_percent"] == pytest.approx(alone.to_record()["cpa_percent"], abs=0.1)


def _peak_bytes(rgb: np.ndarray, size: int, workers: int) -> int:
    slide = ArraySlide(_on_glass(rgb, size), MPP, levels=5)  # in memory before tracing
    settings = _settings({"max_thumbnail_mpx": 0.25}, mask_max_mpx=0.25)
    analyze_slide("warm.png", settings, slide=slide, workers=workers)  # imports, kernels
    tracemalloc.start()
    try:
        analyze_slide("s.png", settings, slide=slide, workers=workers)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_peak_memory_does_not_grow_with_the_slide(section, workers):
    # The same section on a 2048² and on a 4096² slide (4x the pixels): what the analysis
    # allocates stays the same; a full-resolution mask or concentration image of the larger
    # slide alone would be 16-64 MB. With two tile threads, at most a bounded window of
    # tiles is in flight.
    rgb, _ = section
    small = _peak_bytes(rgb, 2048, workers)
    large = _peak_bytes(rgb, 4096, workers)
    assert large < 1.25 * small + 2e6, (small, large)


@pytest.mark.slow
def test_tiff_reader_decodes_only_the_tiles_touching_the_section(section, tmp_path,
                                                                  monkeypatch):
    # a real JPEG-tiled pyramidal TIFF: level-0 tiles decoded are those under the section
    # (256² file tiles under 256² analysis tiles) and the few the registration patches take
    from fibroquant import slides as slides_mod
    from fibroquant.synthetic import write_pyramid_tiff

    rgb, truth = section
    size = 3072
    path = tmp_path / "big.tif"
    write_pyramid_tiff(path, _on_glass(rgb, size), MPP, tile=256, min_level_px=256)
    decoded: list[tuple[int, int]] = []
    level_cls = slides_mod._TiffLevel
    raw = level_cls.raw_segment

    def spy(self, index):
        decoded.append((self.index, index))
        return raw(self, index)

    monkeypatch.setattr(level_cls, "raw_segment", spy)
    a = analyze_slide(path, _settings({"tissue_mpp": 2.0}, mask_max_mpx=1.0), workers=1)
    assert a.to_record()["status"] == "ok" and a.to_record()["level"] == 0
    level0 = {i for lev, i in decoded if lev == 0}
    grid = size // 256
    ys, xs = np.nonzero(truth.tissue_mask)
    under = {(100 + y) // 256 * grid + (100 + x) // 256 for y, x in zip(ys, xs, strict=True)}
    pasted = {r * grid + c for r in range(4) for c in range(4)}  # tiles under the 768² paste
    assert under <= level0  # every tile with tissue was read
    assert len(level0 - pasted) <= 8  # little else: the registration patches
    assert len(level0) < 0.15 * grid * grid
