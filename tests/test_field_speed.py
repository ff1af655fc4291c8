"""A field's shortcuts equal the direct computation they replace: the stain refinement, the
QC overlay's drawing and the tissue pixels sampled for the stain calibration."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fibroquant import exclusions, report, stains, tiles
from fibroquant.config import Settings
from fibroquant.synthetic import make_section, random_params


def _refine_reference(x, unit, start, preset, settings, n_iter, min_count, limit=None):
    """:func:`fibroquant.stains._refine` as first written (whole share matrix, numpy sums)."""
    names = preset.names
    vectors = np.array(start, np.float64)
    counts = dict.fromkeys(names, 0)
    for _ in range(n_iter):
        current = preset.with_vectors(vectors)
        conc = np.maximum(x @ current.unmixing, 0.0)
        total = conc.sum(axis=1)
        total[total == 0] = 1.0
        share = conc / total[:, None]
        new = vectors.copy()
        for i, name in enumerate(names):
            sel = share[:, i] > settings.min_share
            counts[name] = int(sel.sum())
            if counts[name] < min_count:
                new[i] = preset.vectors[i]
                continue
            purity = share[sel, i]
            purest = purity >= np.quantile(purity, 0.8)
            if purest.sum() < min_count:
                purest = np.ones_like(purity, dtype=bool)
            direction = np.median(unit[sel][purest], axis=0)
            new[i] = stains._unit(np.maximum(direction, 1e-6))
        if limit is not None and counts[names[1]] >= min_count:
            new[1] = stains.limit_toward(new[1], preset.vectors[1], new[0], limit)
        if np.allclose(new, vectors, atol=1e-4):
            vectors = new
            break
        vectors = new
    return vectors, counts


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_stain_refinement_equals_the_whole_share_matrix(seed, stain):
    s = Settings.model_validate({"stains": {"stain": stain}})
    p = random_params(seed, shape=(256, 256), mpp=0.5, stain=stain)
    rgb, _ = make_section(p, rng=seed)
    preset = stains.preset_for(s.stains)
    od = stains.rgb_to_od(rgb.reshape(-1, 3), (250.0, 250.0, 250.0))
    x = od[np.linalg.norm(od, axis=1) > s.stains.od_floor]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for limit in (None, 5.0):
        got = stains._refine(x, unit, preset.vectors, preset, s.stains, 4, 50, limit)
        ref = _refine_reference(x, unit, preset.vectors, preset, s.stains, 4, 50, limit)
        assert np.array_equal(got[0], ref[0]) and got[1] == ref[1]


def _qc_fill_reference(rgb, tissue, collagen, excl, colour):
    """:func:`fibroquant.report.qc_fill` as first written (whole-image lookups, numpy
    boolean assignment)."""
    rgb = rgb.copy()

    def tint(mask, c, alpha):
        if mask.any():
            mixed = ((1 - alpha) * np.arange(256, dtype=np.float32)[:, None]
                     + alpha * np.array(c, np.float32))
            table = np.clip(np.rint(mixed), 0, 255).astype(np.uint8).reshape(1, 256, 3)
            cv2.copyTo(cv2.LUT(rgb, table), mask.view(np.uint8), rgb)

    for name, m in excl.items():
        c = report.EXCLUSION_COLOURS.get(name, report._OTHER_EXCLUSION_RGB)
        tint(m, c, report._EXCLUSION_ALPHA)
        rgb[report._inner_boundary(m, 1)] = c
    tint(collagen, colour, report._COLLAGEN_ALPHA)
    rgb[report._inner_boundary(tissue, max(1, round(max(tissue.shape) / 900)))] = \
        report.TISSUE_OUTLINE_RGB
    return rgb


@pytest.mark.parametrize("seed", range(4))
def test_qc_fill_and_exclusions_equal_the_whole_image_drawing(seed):
    """Sparse lumens and unfocused tiles (drawn in their box, outlines by point list),
    dense collagen and tissue: the same overlay pixels; exclusion classes the slide does
    not have are skipped, the split is the same."""
    rng = np.random.default_rng(seed)
    h, w = 300 + 37 * seed, 420 - 23 * seed
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    tissue = np.ones((h, w), bool)
    tissue[rng.integers(0, h, 40), rng.integers(0, w, 40)] = False
    tissue[: 20 + seed] = False
    collagen = tissue & (rng.random((h, w)) < 0.3)
    excluded = np.zeros((h, w), bool)
    excluded[50:70, 60:95] = True  # a lumen
    excluded[h - 5 :, w - 7 :] = True  # an unfocused corner
    flags = np.zeros((h // 3, w // 3), np.uint8)
    lumen = next(c for c in exclusions.painted() if c.name == "lumen")
    flags[15:25, 18:33] = lumen.bit
    if seed % 2:
        flags[: 10, : 10] |= exclusions.painted()[-1].bit  # a class with no excluded pixel
    excl = report._exclusion_masks(flags, excluded)
    big = cv2_resize_nearest(flags, (h, w))
    ref_split = {}
    left = excluded.copy()
    for c in exclusions.painted():
        m = left & ((big & np.uint8(c.bit)) != 0)
        if m.any():
            ref_split[c.name] = m
            left &= ~m
    if left.any():
        ref_split[exclusions.TILES.name] = left
    assert excl.keys() == ref_split.keys()
    assert all(np.array_equal(excl[k], ref_split[k]) for k in excl)
    got = report.qc_fill(rgb, tissue, collagen, excl, (0, 255, 255))
    assert np.array_equal(got, _qc_fill_reference(rgb, tissue, collagen, excl, (0, 255, 255)))
    fold = np.zeros((h, w), bool)  # a fold over a third of the image: drawn in its box
    fold[h // 3 : h - 10, 40 : w // 2] = True
    excl = {**excl, "fold": fold & ~excluded}
    got = report.qc_fill(rgb, tissue, collagen, excl, (255, 255, 0))
    assert np.array_equal(got, _qc_fill_reference(rgb, tissue, collagen, excl, (255, 255, 0)))


def cv2_resize_nearest(a, shape):
    return cv2.resize(a, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def test_qc_panel_band_drawn_alone_equals_the_full_canvas():
    """The legend band drawn on its own and put under the overlay: the panel PIL drew on a
    canvas holding the overlay, pixel for pixel."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1)
    overlay = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    got = report.qc_panel(overlay, title="slide µ 7", mpp=1.37, collagen_rgb=(0, 255, 255),
                          exclusions=["lumen", "unfocused"])
    h, w = overlay.shape[:2]
    size, pad, band = report._band_geometry(w)
    font = report._panel_font(size)
    canvas = Image.new("RGB", (w, h + band), (255, 255, 255))
    canvas.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y1 = h + pad
    draw.text((pad, y1), "slide µ 7", fill=(0, 0, 0), font=font)
    bar_um = report._scale_bar_um(w * 1.37)
    bar_px = max(1, round(bar_um / 1.37))
    label = f"{bar_um:g} µm" if bar_um < 1000 else f"{bar_um / 1000:g} mm"
    lw = draw.textlength(label, font=font)
    x_end = w - pad
    draw.rectangle([x_end - bar_px, y1 + size // 3, x_end, y1 + size // 3 + max(3, size // 4)],
                   fill=(0, 0, 0))
    draw.text((x_end - bar_px - lw - pad, y1), label, fill=(0, 0, 0), font=font)
    x, y2 = pad, y1 + size + pad
    items = [("collagen", (0, 255, 255)), ("tissue outline", report.TISSUE_OUTLINE_RGB)]
    items += [(n, report.EXCLUSION_COLOURS.get(n, report._OTHER_EXCLUSION_RGB))
              for n in ("lumen", "unfocused")]
    for name, colour in items:
        draw.rectangle([x, y2 + 2, x + 2 * size, y2 + size - 1], fill=colour, outline=(0, 0, 0))
        x += 2 * size + pad // 2
        draw.text((x, y2), name, fill=(0, 0, 0), font=font)
        x += int(draw.textlength(name, font=font)) + 2 * pad
    assert np.array_equal(got, np.asarray(canvas))


@pytest.mark.slow
def test_calibration_pixels_are_the_tissue_pixels_in_order():
    """The sampled pixels (before the random pick) are the boolean-mask selection of every
    second row and column of the picked tiles."""
    from fibroquant import pipeline
    from fibroquant.slides import ArraySlide

    p = random_params(2, shape=(640, 640), mpp=0.5)
    rgb, _ = make_section(p, rng=2)
    slide = ArraySlide(rgb, 0.5)
    cal = pipeline.calibrate_slide(slide, Settings())
    covered = tiles.tissue_boxes(cal.tissue, cal.geometry.height / cal.thumbnail.shape[0],
                                 cal.geometry.width / cal.thumbnail.shape[1],
                                 tiles.tile_grid(cal.geometry, 256))
    got = tiles.calibration_pixels(slide, cal.geometry, cal.tissue, covered, 10**9)
    ref = []
    for _, (y0, x0, y1, x1), rows, cols in covered:  # every tile, every pixel: 10**9 asked
        px = tiles.read_analysis(slide, cal.geometry, y0, x0, y1 - y0, x1 - x0)
        ref.append(px[cal.tissue.tissue[np.ix_(rows, cols)]])
    assert len(covered) > 4 and np.array_equal(got, np.concatenate(ref))


@pytest.mark.parametrize("seed", range(3))
def test_grey_and_chroma_and_dark_share_equal_numpy_reductions(seed):
    from fibroquant.shading import grey_and_chroma

    rng = np.random.default_rng(seed)
    od = (rng.standard_normal((61, 47, 3)) * 0.3).astype(np.float32)
    od[:3] = 0.0
    mean, chroma = grey_and_chroma(od)
    ref = od.mean(axis=-1)
    assert mean.dtype == np.float32 and np.array_equal(mean, ref)
    assert np.array_equal(chroma, np.abs(od - ref[..., None]).max(axis=-1))
    px = rng.integers(0, 256, (5000, 3), dtype=np.uint8)
    assert stains.dark_share(px) == float(np.mean(px.max(axis=1) < stains.DARK_PIXEL_MAX))


@pytest.mark.parametrize("field_of_view", [False, True])
def test_glass_colour_from_the_shading_fits_reduction_equals_its_own(field_of_view):
    """The shading fit's reduced thumbnail, when it has the glass detection's size, is the
    same image: the glass colour is the same."""
    import cv2

    from fibroquant import pipeline
    from fibroquant.shading import fit_image

    p = random_params(3, shape=(500, 500), mpp=4.0, field_of_view=field_of_view)
    rgb = cv2.resize(make_section(p, rng=3)[0], (2000, 2000), interpolation=cv2.INTER_LINEAR)
    s = Settings()
    bg, _ = pipeline._background(rgb, s)
    small = fit_image(rgb)
    assert small.shape[:2] == (500, 500)
    own = pipeline._glass_background(rgb, 1.0, s, bg)
    assert pipeline._glass_background(rgb, 1.0, s, bg, small) == own
    assert (own is None) == field_of_view


@pytest.mark.parametrize("grey", [False, True])
def test_colour_jpeg_decoded_straight_to_rgb_equals_the_bgr_decode_swapped(tmp_path, grey):
    """An 8-bit three-component JPEG is decoded to RGB by libjpeg (the same pixels as the BGR
    decode swapped); a one-component JPEG still reads as greyscale."""
    from fibroquant.slides import _jpeg_frame, open_slide

    rgb, _ = make_section(random_params(3, shape=(96, 128), mpp=1.0), rng=3)
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if grey else rgb[..., ::-1]
    path = tmp_path / "f.jpg"
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert _jpeg_frame(path.read_bytes()[:4096]) == (8, 1 if grey else 3)
    with open_slide(path, mpp=1.0) as slide:
        if grey:
            with pytest.warns(UserWarning, match="greyscale image expanded"):
                got = slide.read_region(0, 0, 0, 96, 128)
        else:
            got = slide.read_region(0, 0, 0, 96, 128)
        assert slide.greyscale is grey
    decoded = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    want = np.repeat(decoded[..., None], 3, axis=2) if grey else decoded[..., ::-1]
    assert got.dtype == np.uint8 and np.array_equal(got, want)


@pytest.mark.parametrize("orientation", [3, 6])
def test_rgb_jpeg_decode_ignores_exif_orientation_as_before(tmp_path, orientation):
    """A JPEG whose EXIF says "rotate" reads as stored, as the BGR decode read it (the
    pixels of the header's size, not turned)."""
    import io

    from PIL import Image

    from fibroquant.slides import open_slide

    rgb, _ = make_section(random_params(5, shape=(64, 96), mpp=1.0), rng=5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    path = tmp_path / "turned.jpg"
    path.write_bytes(buf.getvalue())
    with open_slide(path, mpp=1.0) as slide:
        got = slide.read_region(0, 0, 0, 64, 96)
    stored = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(got, stored[..., ::-1])


@pytest.mark.parametrize("seed", range(3))
def test_field_masks_resampled_bilinearly_differ_from_area_only_at_edges(seed):
    """A 2048² field's masks reach the 2000-px QC overlay bilinearly: every overlay pixel
    decided differently from the area rule (at least half covered) is one the area rule
    sees partly covered, i.e. on the mask's edge; a 2x or larger reduction keeps the area
    rule."""
    rng = np.random.default_rng(seed)
    blobs = cv2.GaussianBlur(rng.random((2048, 2048)).astype(np.float32), (0, 0), 6)
    mask = np.where(blobs > np.median(blobs), np.uint8(255), np.uint8(0))
    scale = 2000 / 2048
    area = cv2.resize(mask, (2000, 2000), interpolation=cv2.INTER_AREA)
    got = cv2.resize(mask, (2000, 2000), interpolation=report._mask_interpolation(scale))
    differ = (got >= 128) != (area >= 128)
    assert report._mask_interpolation(scale) == cv2.INTER_LINEAR
    assert report._mask_interpolation(0.5) == cv2.INTER_AREA
    assert differ.any() and not differ[(area == 0) | (area == 255)].any()
    assert differ.mean() < 0.01


def test_thumbnail_of_a_decoded_image_is_its_own_and_leaves_the_image_alone(tmp_path):
    """A flat image's thumbnail is resized from its decoded pixels without a copy: the same
    pixels as from a copy, a writeable array of its own, and the slide reads as before."""
    from fibroquant.slides import open_slide

    rgb, _ = make_section(random_params(4, shape=(300, 260), mpp=1.0), rng=4)
    path = tmp_path / "f.png"
    assert cv2.imwrite(str(path), rgb[..., ::-1])
    with open_slide(path, mpp=1.0) as slide:
        thumb = slide.thumbnail(2.6)
        assert thumb.shape == (115, 100, 3) and thumb.flags.writeable
        assert np.array_equal(thumb, cv2.resize(rgb, (100, 115), interpolation=cv2.INTER_AREA))
        thumb[:] = 0
        same = slide.thumbnail(1.0)  # native: a copy
        same[:] = 0
        assert np.array_equal(slide.read_region(0, 0, 0, 300, 260), rgb)
    with pytest.raises(ValueError, match="closed"):
        slide.thumbnail(2.6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_001])
def test_median_by_one_selection_equals_numpys_to_the_bit(dtype, n):
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * 0.2 + 0.3) if dtype != np.int64 else \
        rng.integers(0, 50, n)  # ties
    values = values.astype(dtype)
    before = values.copy()
    got = stains.median(values)
    assert isinstance(got, float) and got == float(np.median(values))
    assert np.array_equal(values, before)  # the input is not partitioned
    if dtype != np.int64:
        values[n // 3] = np.nan
        assert np.isnan(stains.median(values))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_norm_equals_numpys_to_the_bit(dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((20_000, 3)) * rng.choice([1e-3, 1.0, 30.0], (20_000, 1)))
    x = x.astype(dtype)
    x[:5] = 0.0
    x[5:10] = -0.0
    assert np.array_equal(stains.row_norm(x), np.linalg.norm(x, axis=1))
    assert stains.row_norm(x).dtype == dtype
    assert np.array_equal(stains.row_norm(x, keepdims=True),
                          np.linalg.norm(x, axis=1, keepdims=True))
