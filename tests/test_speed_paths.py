"""The tile kernel equals its numpy reference; the fast image operations and thumbnail
statistics equal the library functions they stand in for."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.morphology import remove_small_holes, remove_small_objects

from fibroquant import cores, exclusions, kernels, pipeline, tiles
from fibroquant.collagen import (
    CollagenRule,
    blob_limits,
    is_collagen,
    parenchyma_background,
)
from fibroquant.kernels import gaussian_blur
from fibroquant.stains import estimate_background, od_lut, stain_fit, tissue_pixels
from fibroquant.synthetic import SectionParams, make_section
from fibroquant.tiles import measure_tile_reference


@pytest.mark.parametrize("seed", range(40))
def test_remove_small_objects_and_holes_fast(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 90, 2)
    mask = rng.random((h, w)) < rng.random()
    min_px = int(rng.integers(0, 40))
    for conn in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = remove_small_objects(mask, max_size=max(min_px - 1, 0), connectivity=conn)
            ref_h = remove_small_holes(mask, max_size=max(min_px - 1, 0), connectivity=conn)
        np.testing.assert_array_equal(kernels.remove_small_objects_fast(mask, min_px, conn), ref)
        np.testing.assert_array_equal(kernels.remove_small_holes_fast(mask, min_px, conn), ref_h)


def test_remove_small_objects_fast_empty_and_offset():
    mask = np.zeros((50, 60), bool)
    assert not kernels.remove_small_objects_fast(mask, 5, 2).any()
    mask[40:42, 50:53] = True  # 6 px, far from the origin: bbox cropping must keep place
    mask[3, 3] = True
    out = kernels.remove_small_objects_fast(mask, 5, 2)
    assert out[40:42, 50:53].all() and not out[3, 3] and out.sum() == 6


def test_lookup_nearest_float_map():
    m = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    rows = np.clip(np.arange(-3, 70) // 2, 0, 39).astype(np.intp)
    cols = np.clip(np.arange(0, 90) // 2, 0, 49).astype(np.intp)
    np.testing.assert_array_equal(kernels.lookup_nearest(m, rows, cols), m[np.ix_(rows, cols)])


@pytest.mark.parametrize("fill", [None, 0, 1])
def test_lookup_any_equals_lookup(fill):
    rng = np.random.default_rng(3)
    mask = rng.random((30, 40)) < 0.1 if fill is None else np.full((30, 40), bool(fill))
    mask[:5] = False
    for factor in (0.7, 1.0, 3.3):
        rows = tiles.index_map(0, 20, factor, 30)
        cols = tiles.index_map(5, 60, factor, 40)
        np.testing.assert_array_equal(
            tiles.lookup_any(mask, rows, cols), mask[np.ix_(rows, cols)]
        )


@pytest.mark.parametrize("density", [0.0, 0.002, 0.1, 1.0])
def test_touches_equals_any_of_the_lookup(density):
    rng = np.random.default_rng(4)
    mask = rng.random((30, 40)) < density
    for factor in (0.45, 0.7, 1.0, 3.3):  # finer masks skip cells: the gather decides there
        for y0, x0 in ((0, 5), (7, 0), (11, 23)):
            rows = tiles.index_map(y0, y0 + 9, factor, 30)
            cols = tiles.index_map(x0, x0 + 13, factor, 40)
            assert tiles.touches(mask, rows, cols) == bool(mask[np.ix_(rows, cols)].any())


def test_tiff_segments_are_decoded_once_over_a_grid_of_unaligned_regions(tmp_path):
    """The tile loop's reads (a grid not aligned with the file's 64-px tiles, on two threads)
    decode every segment once, give the pixels of the file, and leave nothing cached."""
    import tifffile

    from fibroquant import slides

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    path = tmp_path / "grid.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with slides.open_slide(path) as slide:
        # room for every segment: a thread that races ahead under load must not push out a
        # segment the other still needs (a count bound is a speed matter, not tested here)
        slide.cache.max_items = 64
        level = slide._levels[0]
        decoded: list[int] = []
        raw = level.raw_segment

        def counting(index):
            decoded.append(index)
            return raw(index)

        level.raw_segment = counting
        boxes = [(y, x, min(y + 100, 300), min(x + 100, 420))
                 for y in range(0, 300, 100) for x in range(0, 420, 100)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            parts = list(pool.map(lambda b: slide.read_region(0, b[0], b[1], b[2] - b[0],
                                                              b[3] - b[1]), boxes))
        for (y0, x0, y1, x1), part in zip(boxes, parts, strict=True):
            np.testing.assert_array_equal(part, image[y0:y1, x0:x1])
        assert sorted(decoded) == list(range(level.total))
        assert slide.cache._bytes == 0


def test_gaussian_blur_fft_matches_opencv():
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.random((700, 650), dtype=np.float32), (0, 0), 3)
    for sigma in (2.0, 40.0):
        ref = cv2.GaussianBlur(img, (0, 0), sigma)
        np.testing.assert_allclose(gaussian_blur(img, sigma), ref, rtol=0, atol=2e-6)
    w = (rng.random((700, 650)) < 0.6)
    out = parenchyma_background(img, w, 40.0, 0.1)
    assert out.dtype == np.float32 and out.shape == img.shape


def _thumbs():
    rgb, _ = make_section(SectionParams(shape=(384, 384), mpp=1.0), rng=5)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (97, 61, 3), dtype=np.uint8)
    dark = (rng.random((50, 50, 3)) * 120).astype(np.uint8)
    return [rgb, noise, dark, rgb[:1, :1], rgb[:10]]


@pytest.mark.parametrize("i", range(5))
def test_estimate_background_equals_numpy_median_and_quantile(i):
    """The histogram medians and quantile are numpy's (the definition, written out here)."""
    img = _thumbs()[i]
    px = img.reshape(-1, 3)

    def expected(glass, min_pixels):
        if glass is not None and np.count_nonzero(glass) >= min_pixels:
            bg = np.median(px[glass.reshape(-1)], axis=0)
            if bg.min() >= 120:
                return tuple(float(max(b, 1.0)) for b in bg), "glass"
        brightness = px.astype(np.int32).sum(axis=1)
        bg = np.median(px[brightness >= np.quantile(brightness, 0.995)], axis=0)
        if bg.min() >= 170 and (bg.max() - bg.min()) <= 0.25 * bg.max():
            return tuple(float(b) for b in bg), "brightest"
        return (255.0, 255.0, 255.0), "default"

    assert estimate_background(img) == expected(None, 500)
    rng = np.random.default_rng(i)
    for p in (0.0, 0.01, 0.3, 0.9):
        glass = rng.random(img.shape[:2]) < p
        for mp in (1, 500):
            assert estimate_background(img, glass_mask=glass, min_pixels=mp) == expected(glass, mp)


@pytest.mark.parametrize("i", range(5))
def test_stain_fit_samples_as_numpy_choice_of_the_stained_pixels(i):
    """The chunked sampling picks numpy's ``choice`` of the stained pixels (written out here)."""
    from fibroquant import stains as st_mod

    img = _thumbs()[i]
    for kwargs in ({}, {"max_pixels": 500}, {"od_floor": 0.05}):
        od_floor, n = kwargs.get("od_floor", 0.15), kwargs.get("max_pixels", 200_000)
        px = img.reshape(-1, 3)
        bg, _ = estimate_background(px)
        od = st_mod.rgb_to_od(px, bg).astype(np.float64)
        od = od[np.linalg.norm(od, axis=1) > od_floor]
        if len(od) > n:
            od = od[np.random.default_rng(0).choice(len(od), n, replace=False)]
        fit = stain_fit(img, **kwargs)
        if len(od) < 100:
            assert fit == {}
            continue
        # the residuals (and colour evidence) of exactly those pixels
        assert fit == st_mod.protocol_fit(od, st_mod.dark_share(px))
        candidates = {name: st_mod.StainMatrix(m.names[:2], m.vectors[:2]) for name, m in (
            ("sirius-red", st_mod.SIRIUS_RED), ("masson", st_mod.MASSON),
            ("masson-light-green", st_mod.MASSON_LIGHT_GREEN))} | {"h&e": st_mod.H_AND_E_REAL}
        assert {k: fit[k] for k in candidates} == {
            k: round(float(np.mean(st_mod._pixel_residuals(od, v))), 4)
            for k, v in candidates.items()}


@pytest.mark.parametrize("fallback", [0.1, 0.0733, np.float64(0.05123), np.float32(0.3), 0])
def test_parenchyma_background_in_place_equals_reference(fallback):
    rng = np.random.default_rng(7)
    conc = rng.random((300, 400), dtype=np.float32)
    mask = rng.random((300, 400)) < 0.1
    w = mask.astype(np.float32)
    num = cv2.GaussianBlur(conc * w, (0, 0), 12.5)
    den = cv2.GaussianBlur(w, (0, 0), 12.5)
    weight = np.clip(den / 0.05, 0.0, 1.0)
    ref = (weight * (num / np.maximum(den, 1e-6)) + (1.0 - weight) * fallback).astype(np.float32)
    np.testing.assert_array_equal(parenchyma_background(conc, mask, 12.5, fallback), ref)


# ------------------------------------------------------------------------------------------
# The fused whole-slide tile kernel
# ------------------------------------------------------------------------------------------


def _fused_inputs(seed):
    rng = np.random.default_rng(seed)
    rgb, _ = make_section(SectionParams(shape=(203, 187), mpp=0.5), rng=seed)
    if seed % 2:  # strided tile (a view into a larger read)
        rgb = np.pad(rgb, ((0, 0), (3, 0), (0, 0)))[:, 3:]
    lut = od_lut((246.0, 244.0, 240.0))
    unmix = rng.normal(size=3).astype(np.float32)
    others = tuple(rng.normal(size=3).astype(np.float32) for _ in range(2))
    th, tw = 17, 13
    bits = np.array([0, 1, 1, 1, 1 | 2, 1 | 4, 8, 16, 32, 1 | 2 | 4, 8 | 16], np.uint8)
    flags = rng.choice(bits, (th, tw))
    thr = rng.uniform(-0.05, 0.3, (th, tw)).astype(np.float32)
    rows = tiles.index_map(0, rgb.shape[0], rgb.shape[0] / th, th)
    cols = tiles.index_map(0, rgb.shape[1], rgb.shape[1] / tw, tw)
    return rgb, lut, unmix, others, flags, thr, rows, cols


def _reference(rgb, lut, unmix, others, min_share, flags, thr, rows, cols, f, stride,
               min_px=0, blob_px=0, blob_side=0):
    """:func:`tiles.measure_tile_reference` on the kernel's arguments (``min_share`` a value or
    a guard map)."""
    guard_map = None
    if np.ndim(min_share):
        guard_map, min_share = min_share, float(np.max(min_share))
    rule = CollagenRule(lut, unmix, tuple(others), min_share, min_px, blob_px, blob_side,
                        guard_map)
    return measure_tile_reference(rgb, rule, flags, thr, rows, cols, f, stride)


def _fused_equals_reference(*args):
    """Run the fused kernel and its numpy reference on the same arguments; assert they agree
    (counts, OD sum, blocks, focus moments) and return the fused result."""
    a = kernels.measure_tile_fused(*args)
    b = _reference(*args)
    assert a.counts == b.counts
    assert a.collagen_od_sum == pytest.approx(b.collagen_od_sum, rel=1e-9, abs=1e-9)
    np.testing.assert_array_equal(a.blocks, b.blocks)
    if a.focus is None:
        assert b.focus is None
    else:
        np.testing.assert_array_equal(a.focus, b.focus)
    assert a.focus_shape == b.focus_shape
    return a


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("f", [1, 3, 4])
@pytest.mark.parametrize("stride", [0, 2])
@pytest.mark.parametrize("min_share", [0.0, 0.35])
@pytest.mark.parametrize("min_px", [0, 12])
def test_measure_tile_fused_equals_reference(seed, f, stride, min_share, min_px):
    rgb, lut, unmix, others, flags, thr, rows, cols = _fused_inputs(seed)
    a = _fused_equals_reference(
        rgb, lut, unmix, others, min_share, flags, thr, rows, cols, f, stride, min_px)
    # every pixel is counted once as tissue, capsule, wall or outside; blocks add up
    assert a.blocks[1].sum() == a.counts["tissue_px"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("f", [1, 4])
@pytest.mark.parametrize("min_px", [0, 12])
def test_measure_tile_fused_takes_a_guard_map(seed, f, min_px):
    """A share guard per low-resolution cell (lowered in diffuse pale collagen): the kernel
    equals the reference; a map of one value equals that value bit for bit, and a lower guard
    in some cells finds more collagen (and capsule)."""
    rgb, lut, unmix, others, flags, thr, rows, cols = _fused_inputs(seed)
    rng = np.random.default_rng(seed + 50)
    guard = np.full(flags.shape, 0.45, np.float32)
    low = rng.random(flags.shape) < 0.4
    guard[low] = rng.uniform(0.0, 0.3, np.count_nonzero(low))
    a = _fused_equals_reference(rgb, lut, unmix, others, guard, flags, thr, rows, cols, f, 2,
                                min_px)
    one = kernels.measure_tile_fused(rgb, lut, unmix, others, np.full_like(guard, 0.45), flags,
                                     thr, rows, cols, f, 2, min_px)
    scalar = kernels.measure_tile_fused(rgb, lut, unmix, others, 0.45, flags, thr, rows, cols,
                                        f, 2, min_px)
    assert one.counts == scalar.counts
    assert one.collagen_od_sum == scalar.collagen_od_sum
    np.testing.assert_array_equal(one.blocks, scalar.blocks)
    assert a.counts["collagen_px"] >= scalar.counts["collagen_px"]
    assert a.counts[exclusions.BAND.count] >= scalar.counts[exclusions.BAND.count]  # capsule
    assert a.blocks[0].sum() == a.counts["collagen_px"] <= a.counts["tissue_px"]


@pytest.mark.parametrize("shape", [(1, 1), (2, 9), (5, 3), (17, 40), (40, 17), (97, 66)])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_fused_focus_moments_equal_the_sampled_grids(shape, stride):
    """The kernel's running focus moments (three sampled rows kept) are focus_moments of the
    whole sampled grid, bit for bit, and give block_sharpness's value."""
    from fibroquant import focus

    rgb, lut, unmix, others, flags, thr, rows, cols = _fused_inputs(1)
    flags = flags | kernels.FLAG_TISSUE  # every sampled pixel tissue: the moments are not 0
    h, w = shape
    rgb, rows, cols = rgb[:h, :w], rows[:h], cols[:w]
    a = _fused_equals_reference(rgb, lut, unmix, others, 0.35, flags, thr, rows, cols, 2,
                                stride)
    sub = rgb[::stride, ::stride]
    od = lut[0][sub[..., 0]] + lut[1][sub[..., 1]] + lut[2][sub[..., 2]]
    tis = ((flags[np.ix_(rows, cols)] & kernels.FLAG_TISSUE) != 0)[::stride, ::stride]
    assert a.focus_shape == od.shape
    assert a.focus[0] == od.size and (a.focus[1] != 0 or od.size == 1)  # 1 px: its own ref
    if kernels.HAVE_NUMBA:
        np.testing.assert_array_equal(a.focus, kernels.focus_moments(od, tis))
    expected = focus.block_sharpness(od, tis)
    got = focus.sharpness_from_moments(a.focus, a.focus_shape)
    assert got == pytest.approx(expected, rel=1e-6, nan_ok=True)


@pytest.mark.parametrize("seed", range(8))
def test_measure_tile_fused_equals_reference_on_every_class_bit_combination(seed):
    """All 64 combinations of class bits (tissue with a lumen bit, a band without tissue, a
    wall without tissue, ...), shuffled low-resolution rows and columns, and blob removal."""
    rgb, lut, unmix, others, flags, thr, rows, cols = _fused_inputs(seed)
    rng = np.random.default_rng(200 + seed)
    flags = rng.integers(0, 64, flags.shape).astype(np.uint8)
    rows, cols = rng.permutation(rows), rng.permutation(cols)
    for f, stride, min_px, blob in ((1, 0, 0, (0, 0)), (3, 2, 12, (30, 8)), (4, 3, 1, (0, 0))):
        _fused_equals_reference(rgb, lut, unmix, others, 0.35, flags, thr, rows, cols, f,
                                stride, min_px, *blob)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("f", [1, 5])
def test_measure_tile_fused_equals_reference_on_row_structured_classes(seed, f):
    """Whole low-resolution rows of glass, of plain tissue, of special classes only, and
    mixtures: each row kind takes its own branch of the kernel."""
    rgb, lut, unmix, others, flags, thr, rows, cols = _fused_inputs(seed)
    rng = np.random.default_rng(100 + seed)
    kinds = [np.zeros(flags.shape[1], np.uint8), np.ones(flags.shape[1], np.uint8),
             np.full(flags.shape[1], 8, np.uint8), np.full(flags.shape[1], 1 | 2, np.uint8),
             rng.choice(np.array([0, 1], np.uint8), flags.shape[1]), flags[0]]
    flags = np.stack([kinds[i % len(kinds)] for i in range(flags.shape[0])])
    _fused_equals_reference(rgb, lut, unmix, others, 0.35, flags, thr, rows, cols, f, 2, 12)


def test_fused_speck_removal_with_overlapping_speck_boxes():
    """Long diagonal specks whose bounding boxes together exceed the tile take the kernel's
    full-tile branch; the result is the reference's."""
    lut = od_lut((250.0, 250.0, 250.0))
    unmix = np.array([1.0, 0.0, 0.0], np.float32)
    rgb = np.full((96, 96, 3), 250, np.uint8)
    for k in range(6):  # 6 diagonals of 40 px (8-connected), boxes 40x40 each
        for d in range(40):
            rgb[5 + d, 3 + 8 * k + d, 0] = 60
    flags = np.ones((6, 6), np.uint8)
    thr = np.full((6, 6), 0.2, np.float32)
    rows = (np.arange(96) // 16).astype(np.intp)
    cols = (np.arange(96) // 16).astype(np.intp)
    args = (rgb, lut, unmix, (), 0.0, flags, thr, rows, cols, 4, 0, 50)
    a = kernels.measure_tile_fused(*args)
    b = _reference(*args)
    assert a.counts == b.counts and a.counts["collagen_px"] == 0
    np.testing.assert_array_equal(a.blocks, b.blocks)
    assert kernels.measure_tile_fused(*args[:-1], 30).counts["collagen_px"] == 240  # kept


@pytest.mark.parametrize("density", [0.04, 0.3, 0.55])
@pytest.mark.parametrize(("min_px", "blob"), [(2, (0, 0)), (5, (0, 0)), (40, (0, 0)),
                                              (5, (60, 12)), (0, (30, 9))])
@pytest.mark.parametrize("seed", range(3))
def test_fused_speck_removal_on_random_masks(density, min_px, blob, seed):
    """Speck removal by row runs and union-find equals OpenCV's labelling in the reference on
    random masks: thousands of components of every shape (the run table grows past its first
    capacity at the higher densities), specks at and off the tile's edge, classes mixed in."""
    rng = np.random.default_rng(seed)
    h, w = 260, 331
    col = rng.random((h, w)) < density
    col |= cv2.dilate(rng.random((h, w)).astype(np.float32), np.ones((3, 3))) > 0.995  # blobs
    rgb = np.full((h, w, 3), 235, np.uint8)
    rgb[col] = (170, 60, 90)
    rgb[..., 1] = np.clip(rgb[..., 1].astype(int) + rng.integers(-40, 40, (h, w)), 0, 255)
    lut = od_lut((240.0, 240.0, 240.0))
    unmix = np.array([0.1, 1.0, -0.2], np.float32)
    flags = rng.choice(np.array([1, 1, 1, 1, 1 | 2, 1 | 4, 8, 0], np.uint8), (10, 7))
    thr = rng.uniform(0.1, 0.5, (10, 7)).astype(np.float32)
    rows = tiles.index_map(0, h, h / 10, 10)
    cols = tiles.index_map(0, w, w / 7, 7)
    for f in (1, 3):
        a = _fused_equals_reference(rgb, lut, unmix, (np.array([1.0, -0.3, 0.2], np.float32),),
                                    0.3, flags, thr, rows, cols, f, 2, min_px, *blob)
        assert a.blocks[0].sum() == a.counts["collagen_px"]


def test_a_decided_mask_is_counted_with_the_rules_capsule():
    """A PixelDecider's mask replaces the rule's collagen (specks and all) outside the capsule
    band; in the band the capsule stays the rule's, so the tissue counted does not change."""
    rgb, lut, unmix, others, flags, thr, rows, cols = _fused_inputs(2)
    rule = CollagenRule(lut, unmix, others, 0.35, 12)
    decided = np.random.default_rng(0).random(rgb.shape[:2]) < 0.3
    own = measure_tile_reference(rgb, rule, flags, thr, rows, cols, 1, 0)
    dec = measure_tile_reference(rgb, rule, flags, thr, rows, cols, 1, 0, decided=decided)
    fl = flags[np.ix_(rows, cols)]
    tissue, band, wall = ((fl & b) != 0 for b in (1, 2, 4))
    capsule = is_collagen(rgb, thr[np.ix_(rows, cols)], rule)[1] & tissue & band
    counted = tissue & ~capsule & ~wall  # band pixels the rule leaves are tissue
    assert dec.counts["collagen_px"] == np.count_nonzero(decided & counted)
    for k in ("tissue_px", "capsule_px", "vessel_wall_px", "lumen_px"):
        assert dec.counts[k] == own.counts[k], k
    no_band = flags & ~np.uint8(2)  # no capsule band: the rule is not needed at all
    dec = measure_tile_reference(rgb, rule, no_band, thr, rows, cols, 1, 0, decided=decided)
    assert dec.counts["capsule_px"] == 0
    assert dec.counts["collagen_px"] == np.count_nonzero(decided & ((fl & 5) == 1))


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_whole_analysis_by_the_kernel_equals_the_numpy_reference(stain, monkeypatch):
    """A whole analysis with the fused kernel and with its numpy reference (as without numba)
    gives the same record and masks."""
    from fibroquant.config import load_settings
    from fibroquant.slides import ArraySlide

    p = SectionParams(stain=stain, shape=(700, 900), mpp=0.5, n_lumens=4)
    rgb, _ = make_section(p, rng=4)
    s = load_settings(overrides={"stains": {"stain": stain}, "tiling": {"tile_px": 256},
                                 "collagen": {"blob_max_area_um2": 20}})
    fast = pipeline.analyze_slide("x.png", s, slide=ArraySlide(rgb, 0.5))
    monkeypatch.setattr(tiles.kernels, "fused_ok", lambda *a: False)
    ref = pipeline.analyze_slide("x.png", s, slide=ArraySlide(rgb, 0.5))
    for k, v in ref.to_record().items():
        if k == "seconds":
            continue
        if isinstance(v, float):
            assert fast.to_record()[k] == pytest.approx(v, rel=1e-9, nan_ok=True), k
        else:
            assert fast.to_record()[k] == v, k
    for m in ("collagen_mask", "tissue_mask", "excluded_mask"):
        np.testing.assert_array_equal(getattr(fast, m), getattr(ref, m))
    assert fast.to_record()["capsule_area_mm2"] > 0 and fast.to_record()["lumen_area_mm2"] > 0


@pytest.mark.parametrize("sigma", [16.0, 40.0, 90.0])
def test_parenchyma_background_coarse_grid_close_to_exact(sigma):
    from fibroquant.collagen import _normalised_blur

    rng = np.random.default_rng(3)
    _yy, xx = np.mgrid[0:500, 0:600]
    conc = (0.05 + 0.03 * np.sin(xx / 150) + 0.02 * rng.random((500, 600))).astype(np.float32)
    mask = rng.random((500, 600)) < 0.7
    mask[200:260] = False  # a band without parenchyma: the fallback blends in
    coarse = parenchyma_background(conc, mask, sigma, 0.04)
    w = mask.astype(np.float32)
    exact = _normalised_blur(conc * w, w, sigma, 0.04)  # on the full grid
    assert coarse.dtype == np.float32 and coarse.shape == conc.shape
    # the map has no detail finer than sigma: the coarse grid is within 2 % of its range
    assert np.abs(coarse - exact).max() < 0.003


def test_fused_speck_removal_keeps_fibres_and_edge_components():
    """Isolated specks below the size go; a long thin fibre, a big blob and a speck cut by the
    tile edge stay; the counts, OD sum and blocks follow."""
    lut = od_lut((250.0, 250.0, 250.0))
    unmix = np.array([1.0, 0.0, 0.0], np.float32)  # "collagen" = OD of the red channel
    rgb = np.full((64, 80, 3), 250, np.uint8)
    dark = np.uint8(60)
    rgb[10:12, 10:12, 0] = dark  # 4 px speck: removed
    rgb[30, 5:70, 0] = dark  # 1-px-wide fibre, 65 px: kept
    rgb[40:50, 20:30, 0] = dark  # 100 px blob: kept
    rgb[0:2, 50:52, 0] = dark  # 4 px speck on the tile edge: kept
    rgb[55, 60, 0] = dark  # 1 px: removed
    flags = np.ones((4, 5), np.uint8)
    thr = np.full((4, 5), 0.2, np.float32)
    rows = (np.arange(64) // 16).astype(np.intp)
    cols = (np.arange(80) // 16).astype(np.intp)
    args = (rgb, lut, unmix, (), 0.0, flags, thr, rows, cols, 4, 0)
    kept = kernels.measure_tile_fused(*args, 10)
    ref = _reference(*args, 10)
    raw = kernels.measure_tile_fused(*args, 0)
    assert raw.counts["collagen_px"] == 4 + 65 + 100 + 4 + 1
    assert kept.counts["collagen_px"] == 65 + 100 + 4 == ref.counts["collagen_px"]
    per_px = raw.collagen_od_sum / raw.counts["collagen_px"]
    assert kept.collagen_od_sum == pytest.approx(per_px * 169, rel=1e-6)
    np.testing.assert_array_equal(kept.blocks, ref.blocks)
    assert kept.blocks[0].sum() == 169 and kept.counts["tissue_px"] == 64 * 80


@pytest.mark.parametrize(
    ("user_env", "max_mmap", "expected", "calls"),
    [
        (False, 1 << 40, True, [(-3, 64 << 20), (-1, 256 << 20)]),
        (False, 32 << 20, True, [(-3, 64 << 20), (-3, 32 << 20), (-1, 256 << 20)]),  # old glibc
        (False, 0, False, [(-3, 64 << 20), (-3, 32 << 20)]),  # refused: trim left alone
        (True, 1 << 40, False, []),  # the user's MALLOC_MMAP_THRESHOLD_ wins
    ],
)
def test_tune_malloc_once_per_process(monkeypatch, user_env, max_mmap, expected, calls):
    import ctypes
    import platform

    seen = []

    class FakeLibc:
        def mallopt(self, param, value):
            seen.append((param, value))
            return int(param != -3 or value <= max_mmap)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(cores, "_malloc_tuned", None)
    if user_env:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    else:
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert cores.tune_malloc() is expected
    assert cores.tune_malloc() is expected
    assert seen == calls  # once per process


def test_tune_malloc_leaves_other_c_libraries_alone(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(cores, "_malloc_tuned", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert cores.tune_malloc() is False


def test_kernel_warmup_failure_is_raised_on_the_callers_thread(monkeypatch):
    import threading

    from fibroquant.config import Settings
    from fibroquant.slides import ArraySlide

    if not kernels.HAVE_NUMBA:
        pytest.skip("no numba: nothing is loaded in the background")
    threads = []

    def boom():
        threads.append(threading.current_thread().name)
        raise RuntimeError("no kernels")

    monkeypatch.setattr(kernels, "_warm_fused", False)
    monkeypatch.setattr(kernels, "warmup_fused", boom)
    rgb, _ = make_section(SectionParams(shape=(256, 256), mpp=0.5), rng=1)
    with pytest.raises(RuntimeError, match="no kernels"):
        pipeline.analyze_slide("x.png", Settings(), slide=ArraySlide(rgb, 0.5))
    for t in threading.enumerate():
        if t.name == "fibroquant-warmup":
            t.join(timeout=10)
    assert sorted(threads) == sorted(["fibroquant-warmup", threading.current_thread().name])


def test_kernel_loading_is_not_counted_in_the_slides_seconds(monkeypatch):
    """A slide whose tile kernels are still compiling (here: 1.5 s) does not count the wait."""
    import threading
    import time

    from fibroquant.config import Settings
    from fibroquant.slides import ArraySlide

    done = threading.Event()

    def slow():
        if not done.is_set():
            time.sleep(1.5)
            done.set()
        return True

    monkeypatch.setattr(kernels, "_warm_fused", False)
    monkeypatch.setattr(kernels, "warmup_fused", slow)
    rgb, _ = make_section(SectionParams(shape=(256, 256), mpp=0.5), rng=1)
    t0 = time.perf_counter()
    seconds = pipeline.analyze_slide("x.png", Settings(traits=False),
                                     slide=ArraySlide(rgb, 0.5)).seconds
    elapsed = time.perf_counter() - t0
    assert elapsed >= 1.5
    assert seconds <= elapsed - 1.0


# ------------------------------------------------------------------------------------------
# OpenCV stand-ins for scipy.ndimage on the tissue thumbnail
# ------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 90), st.integers(1, 90), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_edt_and_fill_holes_equal_scipy(h, w, density, seed):
    from scipy import ndimage as ndi

    from fibroquant.tissue import edt, fill_holes

    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < density
    if rng.random() < 0.5:  # blobs and rings as well as salt and pepper
        mask = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2.0) > 0.5
    np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    got, ref = edt(mask), ndi.distance_transform_edt(mask)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, ref)


def test_edt_far_from_background_within_a_thousandth_of_a_pixel():
    from scipy import ndimage as ndi

    from fibroquant.tissue import edt

    mask = np.ones((2500, 2500), bool)
    mask[0, 0] = False  # distances up to 3,500 px
    assert np.abs(edt(mask) - ndi.distance_transform_edt(mask)).max() < 1e-3


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.floats(0.1, 0.9), st.integers(0, 2**31 - 1))
def test_capsule_propagation_and_dilation_equal_scipy(h, w, density, seed):
    from scipy import ndimage as ndi

    from fibroquant.tissue import _components_with

    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < density
    seeds = mask & (rng.random((h, w)) < 0.03)
    ref = ndi.binary_propagation(seeds, mask=mask, structure=np.ones((3, 3)))
    np.testing.assert_array_equal(_components_with(mask, seeds), ref)
    dilated = cv2.dilate(np.ascontiguousarray(seeds).view(np.uint8), np.ones((3, 3), np.uint8))
    np.testing.assert_array_equal(dilated.view(bool),
                                  ndi.binary_dilation(seeds, structure=np.ones((3, 3))))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("field_of_view", [False, True])
def test_glass_colour_from_a_small_detection_equals_the_full_size_one(seed, field_of_view):
    """The glass mask of the background estimate comes from a 4x smaller tissue detection;
    the glass colour (and its source) is the one a full-size detection gives."""
    from fibroquant.config import Settings
    from fibroquant.shading import estimate_shading
    from fibroquant.synthetic import random_params
    from fibroquant.tissue import detect_tissue

    p = random_params(seed, shape=(1024, 1024), mpp=1.0, field_of_view=field_of_view)
    rgb, _ = make_section(p, rng=seed)
    s = Settings()
    bg, _ = pipeline._background(rgb, s)
    shading = estimate_shading(rgb, bg, s.tissue)
    if shading is not None:  # as the pipeline does: the glass colour of the evenly lit image
        rgb = shading.apply(rgb, rgb.shape[:2])
        bg, _ = pipeline._background(rgb, s)
    full = estimate_background(
        rgb, glass_mask=~detect_tissue(rgb, 1.0, s.tissue, bg).section)
    assert pipeline._glass_background(rgb, 1.0, s, bg) == (full[0] if full[1] == "glass"
                                                           else None)
    assert (full[1] == "glass") != field_of_view


def test_compact_blobs_are_removed_and_fibres_kept():
    """A nucleus-sized disc is not collagen; a fibre of the same area, a disc larger than the
    limit and a disc cut by the tile's edge are (the fused kernel and its reference)."""
    h, w = 120, 160
    col = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    col |= (yy - 30) ** 2 + (xx - 30) ** 2 <= 5**2  # disc, 81 px: a blob
    col[60:62, 20:61] = True  # fibre, 82 px
    col |= (yy - 80) ** 2 + (xx - 110) ** 2 <= 9**2  # disc, 253 px: too large
    col |= (yy - 0) ** 2 + (xx - 140) ** 2 <= 5**2  # disc at the edge: may continue
    blob_px, blob_side = blob_limits(80 * 0.25, 0.5)  # 80 px, 16 px at 0.5 µm/px
    assert (blob_px, blob_side) == (80, 16)
    blob_px = 90
    rgb = np.full((h, w, 3), 235, np.uint8)
    rgb[col] = (170, 60, 90)
    lut = od_lut((240.0, 240.0, 240.0))
    unmix = np.array([0.1, 1.0, -0.2], np.float32)
    flags = np.ones((4, 4), np.uint8)
    thr = np.full((4, 4), 0.2, np.float32)
    rows = tiles.index_map(0, h, h / 4, 4)
    cols = tiles.index_map(0, w, w / 4, 4)
    args = (rgb, lut, unmix, (), 0.0, flags, thr, rows, cols, 1, 0, 0, blob_px, blob_side)
    a = _fused_equals_reference(*args[:11], 0, blob_px, blob_side)
    disc = int(((yy - 30) ** 2 + (xx - 30) ** 2 <= 25).sum())
    assert a.counts["collagen_px"] == int(col.sum()) - disc
    off = kernels.measure_tile_fused(*args[:11], 0, 0, 0)
    assert off.counts["collagen_px"] == int(col.sum())


def test_focus_moments_reference_without_numba_matches(monkeypatch):
    """The numpy fallback of the focus moments (no numba) agrees with the kernel's."""
    rng = np.random.default_rng(5)
    od = (rng.gamma(2.0, 0.3, (61, 47)) + 0.4).astype(np.float32)
    tissue = rng.random(od.shape) < 0.8
    fast = kernels.focus_moments(od, tissue)
    monkeypatch.setattr(kernels, "focus_moments", lambda *a: None)
    slow = kernels.focus_moments_reference(od, tissue)
    if fast is not None:
        np.testing.assert_allclose(slow, fast, rtol=1e-6)
    assert slow[0] == np.count_nonzero(tissue)
    assert slow[3] == np.count_nonzero(tissue[1:-1, 1:-1])


def test_stain_fit_pixels_subsampled_only_on_large_images():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    mask = rng.random(small.shape[:2]) < 0.7
    np.testing.assert_array_equal(tissue_pixels(small, mask, 500_000), small[mask])
    big = rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    full = np.ones(big.shape[:2], bool)
    px = tissue_pixels(big, full, 500_000)
    assert 250_000 < len(px) <= 500_000  # every 3rd row and column: 683² pixels
    np.testing.assert_array_equal(px, big[::3, ::3].reshape(-1, 3))


@pytest.mark.parametrize("w", [1, 7, 8, 9, 31, 32, 33, 257, 300, 1001])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_hit_list_equals_nonzero_compiled_and_pure_python(w, density):
    # the tile kernel's listing of a row's collagen columns (uint8 flags in a padded uint64
    # buffer), compiled and as plain Python: rows of more than 256 hits included
    rng = np.random.default_rng(w)
    words = np.zeros((w + 31) // 32 * 4, np.uint64)
    hit = words.view(np.uint8)
    hit[:w] = rng.random(w) < density
    expected = np.nonzero(hit[:w])[0]
    for fn in (kernels._hit_list_py, kernels._hit_list_nb):
        hits = np.full(w, -1, np.int64)
        m = fn(words, hit, w, hits)
        assert m == len(expected)
        np.testing.assert_array_equal(hits[:m], expected)


# The word path of the tile kernel: rows of width 8k read as uint64 words, pair tables
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [8, 16, 64, 1024])
def test_word_rows_equal_the_byte_formula_compiled_and_pure_python(w):
    """Red and green as one 16-bit field of a word, blue as one byte: every pixel of the row
    (and every even one) gets the reference's float32 sum, bit for bit, at every pixel
    position within its 3-word group; all 2^24 colours are reachable."""
    rng = np.random.default_rng(w)
    rgb = rng.integers(0, 256, (3, w, 3), dtype=np.uint8)
    rgb[1, : min(w, 8)] = [[255, 255, 255], [0, 0, 0], [255, 0, 255], [0, 255, 0],
                           [1, 254, 128], [254, 1, 127], [128, 127, 1], [7, 200, 93]][: min(w, 8)]
    tables = rng.normal(size=(3, 256)).astype(np.float32)
    t01 = kernels.pair_table(tables)
    words = kernels._words(rgb)
    assert words.size == rgb.size // 8
    expected = (tables[0][rgb[..., 0]] + tables[1][rgb[..., 1]]) + tables[2][rgb[..., 2]]
    for conc_row, even_row in ((kernels._conc_row_words_py, kernels._even_row_words_py),
                               (kernels._conc_row_words_nb, kernels._even_row_words_nb)):
        for i in range(rgb.shape[0]):
            out = np.full(w, np.nan, np.float32)
            conc_row(words, i * (3 * w // 8), w, t01, tables[2], out)
            np.testing.assert_array_equal(out, expected[i])
            even = np.full(w // 2, np.nan, np.float32)
            even_row(words, i * (3 * w // 8), w, t01, tables[2], even)
            np.testing.assert_array_equal(even, expected[i, ::2])


def test_pair_table_is_the_references_first_addition():
    rng = np.random.default_rng(3)
    tables = rng.normal(size=(3, 256)).astype(np.float32)
    t01 = kernels.pair_table(tables)
    assert t01.dtype == np.float32 and t01.shape == (65536,) and t01.flags.c_contiguous
    r, g = rng.integers(0, 256, 1000), rng.integers(0, 256, 1000)
    np.testing.assert_array_equal(t01[(g << 8) | r], tables[0][r] + tables[1][g])


def test_words_only_for_c_contiguous_aligned_tiles_of_width_8k():
    rgb = np.zeros((4, 16, 3), np.uint8)
    assert kernels._words(rgb).size == 4 * 16 * 3 // 8
    assert kernels._words(rgb[:, :12]).size == 0  # not C-contiguous
    assert kernels._words(np.zeros((4, 12, 3), np.uint8)).size == 0  # width not 8k
    assert kernels._words(np.zeros((0, 8, 3), np.uint8)).size == 0  # empty
    buf = np.zeros(4 * 16 * 3 + 16, np.uint8)
    offset = (1 - buf.ctypes.data) % 8 or 1  # the buffer's address + offset is not 8k
    misaligned = buf[offset : offset + 4 * 16 * 3].reshape(4, 16, 3)
    assert misaligned.ctypes.data % 8 != 0 and misaligned.flags.c_contiguous
    assert kernels._words(misaligned).size == 0


def _word_tile_inputs(seed, w):
    _, lut, unmix, others, flags, thr, rows, cols = _fused_inputs(seed)
    rgb, _ = make_section(SectionParams(shape=(150, w), mpp=0.5), rng=seed)
    rows = tiles.index_map(0, rgb.shape[0], rgb.shape[0] / flags.shape[0], flags.shape[0])
    cols = tiles.index_map(0, w, w / flags.shape[1], flags.shape[1])
    assert kernels._words(rgb).size
    return rgb, lut, unmix, others, flags, thr, rows, cols


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("w", [8, 104, 256])
@pytest.mark.parametrize(("stride", "min_px"), [(0, 0), (2, 12), (3, 1)])
def test_word_path_equals_byte_path_and_reference(seed, w, stride, min_px, monkeypatch):
    """A tile of width 8k takes the word path (concentration, and the focus samples at
    stride 2); the same tile by bytes gives the same counts, blocks, focus moments and OD
    sum, bit for bit (the OD sums of the removed specks are taken from the pixels again)."""
    rgb, lut, unmix, others, flags, thr, rows, cols = _word_tile_inputs(seed, w)
    args = (rgb, lut, unmix, others, 0.35, flags, thr, rows, cols, 3, stride, min_px, 30, 8)
    a = _fused_equals_reference(*args)
    monkeypatch.setattr(kernels, "_words", lambda rgb: kernels._NO_WORDS)
    b = kernels.measure_tile_fused(*args)
    assert a.counts == b.counts and a.collagen_od_sum == b.collagen_od_sum
    np.testing.assert_array_equal(a.blocks, b.blocks)
    if stride:
        np.testing.assert_array_equal(a.focus, b.focus)


@pytest.mark.slow
@pytest.mark.parametrize("n_other", [1, 2])
def test_word_path_on_dense_random_masks(n_other, monkeypatch):
    """Dense collagen on a tile of width 8k: the run table grows past its first capacity, many
    specks and blobs are removed (their OD sums taken from the pixels again), the share guard
    with one and with two other stains; word path = byte path = reference, read-only too."""
    rng = np.random.default_rng(n_other)
    h, w = 300, 336
    col = rng.random((h, w)) < 0.55
    rgb = np.full((h, w, 3), 235, np.uint8)
    rgb[col] = (170, 60, 90)
    rgb[..., 1] = np.clip(rgb[..., 1].astype(int) + rng.integers(-40, 40, (h, w)), 0, 255)
    lut = od_lut((240.0, 240.0, 240.0))
    unmix = np.array([0.1, 1.0, -0.2], np.float32)
    others = (np.array([1.0, -0.3, 0.2], np.float32), np.array([-0.2, 0.1, 0.9], np.float32))
    flags = rng.choice(np.array([1, 1, 1, 1, 1 | 2, 1 | 4, 8, 0], np.uint8), (10, 7))
    thr = rng.uniform(0.1, 0.5, (10, 7)).astype(np.float32)
    rows = tiles.index_map(0, h, h / 10, 10)
    cols = tiles.index_map(0, w, w / 7, 7)
    args = (rgb, lut, unmix, others[:n_other], 0.3, flags, thr, rows, cols, 3, 2, 5, 60, 12)
    assert kernels._words(rgb).size
    a = _fused_equals_reference(*args)
    readonly = rgb.copy()
    readonly.flags.writeable = False
    c = kernels.measure_tile_fused(readonly, *args[1:])
    monkeypatch.setattr(kernels, "_words", lambda rgb: kernels._NO_WORDS)
    b = kernels.measure_tile_fused(*args)
    for other in (b, c):
        assert a.counts == other.counts and a.collagen_od_sum == other.collagen_od_sum
        np.testing.assert_array_equal(a.blocks, other.blocks)
        np.testing.assert_array_equal(a.focus, other.focus)


def test_tile_kernel_as_plain_python_equals_compiled(monkeypatch):
    """The kernel and all its helpers run as plain Python (numpy scalars: uint64 words and
    counts) give the compiled kernel's result, on the word path and on the byte path."""
    if not kernels.HAVE_NUMBA:
        pytest.skip("numba missing: the kernel is not compiled")
    plain = {name: getattr(kernels, name[:-3] + "_py") for name in dir(kernels)
             if name.startswith("_") and name.endswith("_nb")
             and hasattr(kernels, name[:-3] + "_py")}
    assert {"_tile_nb", "_conc_row_words_nb", "_hit_list_nb", "_focus_total_nb"} <= set(plain)
    for w in (64, 60):
        rgb, lut, unmix, others, flags, thr, rows, cols = _word_tile_inputs(1, 64)
        rgb = np.ascontiguousarray(rgb[:40, :w])
        rows, cols = rows[:40], cols[:w]
        args = (rgb, lut, unmix, others, 0.35, flags, thr, rows, cols, 3, 2, 6, 30, 8)
        a = kernels.measure_tile_fused(*args)
        with monkeypatch.context() as m:
            for name, fn in plain.items():
                m.setattr(kernels, name, fn)
            b = kernels.measure_tile_fused(*args)
        assert a.counts == b.counts and a.collagen_od_sum == b.collagen_od_sum
        assert a.counts["collagen_px"] > 0
        np.testing.assert_array_equal(a.blocks, b.blocks)
        np.testing.assert_array_equal(a.focus, b.focus)
