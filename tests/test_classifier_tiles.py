"""A classifier's tile mask counted by the fused kernel equals the numpy reference."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fibroquant import tiles
from fibroquant.collagen import CollagenRule
from fibroquant.stains import od_lut
from fibroquant.synthetic import SectionParams, make_section


def _inputs(seed: int, band: bool, guard_map: bool = False):
    """A tile inside a larger class map (its cells start at row 3, column 2), random classes
    (tissue, walls, lumens, folds...; the capsule band only when ``band``), a random mask;
    with ``guard_map``, a share guard per cell (lowered in places, as in pale collagen)."""
    rng = np.random.default_rng(seed)
    rgb, _ = make_section(SectionParams(stain="masson", shape=(203, 187), mpp=0.5), rng=seed)
    lut = od_lut((246.0, 244.0, 240.0))
    rule = CollagenRule(lut, rng.normal(size=3).astype(np.float32),
                        tuple(rng.normal(size=3).astype(np.float32) for _ in range(2)), 0.35,
                        12)
    bits = [0, 1, 1, 1, 1 | 4, 8, 16, 32, 8 | 16] + ([1 | 2, 1 | 2 | 4] if band else [])
    flags = rng.choice(np.array(bits, np.uint8), (24, 19))
    thr = rng.uniform(-0.05, 0.3, flags.shape).astype(np.float32)
    rows = tiles.index_map(0, rgb.shape[0], rgb.shape[0] / 17, 17) + 3
    cols = tiles.index_map(0, rgb.shape[1], rgb.shape[1] / 13, 13) + 2
    decided = rng.random(rgb.shape[:2]) < 0.2
    if guard_map:
        rule = replace(rule, guard_map=rng.uniform(0.0, 0.35, flags.shape).astype(np.float32))
    return rgb, rule, flags, thr, rows, cols, decided


@pytest.mark.parametrize(("band", "guard_map"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("f", "stride"), [(1, 0), (3, 2), (4, 3)])
def test_decided_mask_by_the_kernel_equals_the_reference(seed, f, stride, band, guard_map):
    """Counts (every class, the rule's capsule in the band), collagen OD sum (bit for bit),
    block counts and focus moments of a decided mask: the fused kernel with an infinite
    threshold outside the band plus the mask's own count equal
    :func:`tiles.measure_tile_reference` with ``decided`` (one share guard, or a map)."""
    rgb, rule, flags, thr, rows, cols, decided = _inputs(seed, band=band, guard_map=guard_map)
    a = tiles.measure_decided_fused(rgb, rule, flags, thr, rows, cols, f, stride, decided)
    b = tiles.measure_tile_reference(rgb, rule, flags, thr, rows, cols, f, stride,
                                     decided=decided)
    assert a.counts == b.counts
    assert a.counts["collagen_px"] > 1000  # the mask really was counted
    if band:
        assert a.counts["capsule_px"] > 100
    # (in float64 in pixel order, as the fused kernel; the reference sums pairwise)
    assert a.collagen_od_sum == pytest.approx(b.collagen_od_sum, rel=1e-9)
    np.testing.assert_array_equal(a.blocks, b.blocks)
    if stride:
        np.testing.assert_array_equal(a.focus, b.focus)
    assert a.focus_shape == b.focus_shape
    c = tiles.measure_tile(rgb, rule, flags, thr, rows, cols, f, stride, decided=decided)
    assert c.counts == b.counts and c.collagen_od_sum == a.collagen_od_sum


def test_whole_analysis_with_a_classifier_by_the_kernel_equals_the_reference(monkeypatch):
    """A whole analysis decided by a classifier (tiles of 256 px: capsule band, lumens, glass
    edges, features on the tissue's box) counts the same with the fused kernel as with its
    numpy reference: same record and masks."""

    from fibroquant import classifier as C
    from fibroquant import pipeline
    from fibroquant.config import load_settings
    from fibroquant.slides import ArraySlide

    p = SectionParams(stain="masson", shape=(480, 640), mpp=0.5, n_lumens=3)
    rgb, _ = make_section(p, rng=4)
    other, truth = make_section(replace(p, shape=(300, 300), field_of_view=True), rng=5)
    features = C.pixel_features(other, truth.stains, 0.5)
    clf = C.fit([C.sample_pixels(features, truth.collagen_mask, truth.tissue_mask, stem="t",
                                 max_train_px=5000)], gate_col=len(truth.stains.names) + 1)
    s = load_settings(overrides={"stains": {"stain": "masson"}, "tiling": {"tile_px": 256},
                                 "traits": {"enabled": False}})
    fast = pipeline.analyze_slide("x.png", s, slide=ArraySlide(rgb, 0.5), decide=clf)
    monkeypatch.setattr(tiles.kernels, "fused_ok", lambda *a: False)
    ref = pipeline.analyze_slide("x.png", s, slide=ArraySlide(rgb, 0.5), decide=clf)
    got, want = fast.to_record(), ref.to_record()
    assert want["capsule_area_mm2"] > 0 and want["cpa_percent"] > 0.5
    for k, v in want.items():
        if k == "seconds":
            continue
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-9, nan_ok=True), k
        else:
            assert got[k] == v, k
    for m in ("collagen_mask", "tissue_mask", "excluded_mask"):
        np.testing.assert_array_equal(getattr(fast, m), getattr(ref, m))
