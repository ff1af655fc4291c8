"""Purple (under-differentiated) Masson trichrome: the share guard counted from the parenchyma.

Hepatocyte cytoplasm that took up aniline blue as well as the red dye is purple; without a guard
relative to the slide's own parenchyma, part of it passes for collagen (real Masson liver tiles
read 7-13 % CPA where little collagen is visible).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from fibroquant.collagen import (
    BAND_SHARE_SIGMA_UM,
    PURPLE_PARENCHYMA_SHARE,
    calibrate_threshold,
    pale_band_weight,
    share_guard,
)
from fibroquant.config import CollagenSettings, Settings, load_settings
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, make_section

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: a liver with little collagen and a dark purple counterstain: cells take up 0.4x (median,
#: log-SD 0.35 between cells) as much aniline blue as red dye
PURPLE = SectionParams(stain="masson", shape=(768, 768), fibrosis=0.3, fine_fibres=0.3,
                       counterstain_od=0.5, nonspecific=0.02, cytoplasm_blue=0.4,
                       cytoplasm_blue_cv=0.35, blur_um=0.3, jpeg_quality=90)


def _masson(rgb: np.ndarray, mpp: float, **collagen: object):
    s = load_settings(overrides={"stains": {"stain": "masson"}, "collagen": dict(collagen)})
    return analyze_slide("s.png", s, slide=ArraySlide(rgb, mpp))


# ------------------------------------------------------------------------------------------
# the guard itself
# ------------------------------------------------------------------------------------------


def test_guard_is_min_share_for_a_clean_counterstain():
    share = np.r_[np.zeros(900), np.full(100, 0.9)].astype(np.float32)
    assert share_guard(share, CollagenSettings(), from_parenchyma=True) == (0.35, 0.0)
    assert share_guard(share, CollagenSettings(), from_parenchyma=False) == (0.35, 0.0)


def test_guard_counts_from_the_bluest_parenchyma():
    share = np.r_[np.full(900, 0.15), np.full(100, 0.9)].astype(np.float32)
    guard, p = share_guard(share, CollagenSettings(), from_parenchyma=True)
    assert p == pytest.approx(0.15)
    assert guard == pytest.approx(0.225 + 0.35 * 0.775)  # p_hi = 1.5 p
    # spread 1: counted from the median parenchyma
    g1, _ = share_guard(share, CollagenSettings(parenchyma_share_spread=1.0),
                        from_parenchyma=True)
    assert g1 == pytest.approx(0.15 + 0.35 * 0.85)
    # min_share 0 switches the guard off whatever the parenchyma
    assert share_guard(share, CollagenSettings(min_share=0.0), from_parenchyma=True)[0] == 0.0
    # the counted-from point never exceeds 0.5 (parenchyma is share < 0.5 by definition)
    heavy = np.full(1000, 0.45, np.float32)
    assert share_guard(heavy, CollagenSettings(), from_parenchyma=True)[0] == pytest.approx(
        0.5 + 0.35 * 0.5)


def test_guard_ignores_unstained_pixels_and_needs_enough_parenchyma():
    share = np.r_[np.full(500, 0.4), np.full(500, 0.1)].astype(np.float32)
    stained = np.r_[np.zeros(500, bool), np.ones(500, bool)]  # the 0.4s are near-glass noise
    _, p = share_guard(share, CollagenSettings(), stained=stained, from_parenchyma=True)
    assert p == pytest.approx(0.1)
    few = np.full(40, 0.2, np.float32)
    assert share_guard(few, CollagenSettings(), from_parenchyma=True) == (0.35, 0.0)


def _cells(shape: tuple[int, int], cell_px: int, median: float, log_sd: float,
           rng: np.random.Generator) -> np.ndarray:
    """A share per square cell (log-normal, as cytoplasm varies from cell to cell)."""
    n = (-(-shape[0] // cell_px), -(-shape[1] // cell_px))
    per_cell = np.minimum(median * np.exp(log_sd * rng.standard_normal(n)), 0.69)
    return np.kron(per_cell, np.ones((cell_px, cell_px)))[: shape[0], : shape[1]]


def test_pale_band_weight_finds_a_band_and_not_purple_cells():
    """At 0.5 µm/px: red cells (share 0.1) crossed by a 60 µm band of faint collagen stain
    (share 0.45, its septum-like pure pixels aside) weigh 1 inside the band and 0 two band
    widths away; purple cells (share 0.35, varying from cell to cell) weigh 0 everywhere."""
    rng = np.random.default_rng(0)
    shape, sigma_px = (400, 400), BAND_SHARE_SIGMA_UM / 0.5
    red = _cells(shape, 40, 0.1, 0.3, rng).astype(np.float32)
    band = np.abs(np.arange(400) - 200) < 60
    share = red.copy()
    share[:, band] = np.clip(0.45 + 0.1 * rng.standard_normal((400, band.sum())), 0, 1)
    share[::7, band] = 0.95  # fibres of pure collagen stain inside the band
    stained = np.ones(shape, bool)
    w = pale_band_weight(share.astype(np.float32), stained, 0.1, sigma_px)
    assert w.dtype == np.float32
    assert w[:, 180:221].min() == 1.0
    assert w[:, :20].max() == 0.0
    assert w[:, -20:].max() == 0.0
    purple = _cells(shape, 40, 0.35, 0.35, rng).astype(np.float32)
    assert pale_band_weight(purple, stained, 0.35, sigma_px).max() == 0.0
    # unstained pixels are no evidence: the band over glass is not a band
    assert pale_band_weight(share.astype(np.float32), ~band[None, :].repeat(400, 0), 0.1,
                            sigma_px)[:, 190:211].max() == 0.0


def test_purple_parenchyma_is_reported():
    rng = np.random.default_rng(0)
    share = np.r_[np.full(9000, 0.3), np.full(1000, 0.9)].astype(np.float32)
    conc = np.r_[rng.normal(0.1, 0.02, 9000), rng.normal(0.6, 0.05, 1000)].astype(np.float32)
    thr = calibrate_threshold(conc, share, CollagenSettings(), share_from_parenchyma=True)
    assert thr.parenchyma_share >= PURPLE_PARENCHYMA_SHARE
    assert "purple parenchyma" in thr.note
    assert thr.share_guard == pytest.approx(0.45 + 0.35 * 0.55)  # p_hi = 1.5 p
    plain = calibrate_threshold(conc, share, CollagenSettings())
    assert plain.note == "" and plain.share_guard == 0.35
    # the threshold on concentration does not depend on the guard
    assert plain.threshold_od == thr.threshold_od


@pytest.mark.parametrize(("stain", "baseline", "fitted", "expected"), [
    ("masson", "auto", True, True),
    ("masson", "auto", False, False),  # preset/study vectors: purple may be a vector misfit
    ("sirius-red", "auto", True, False),
    ("sirius-red", "parenchyma", False, True),
    ("masson", "zero", True, False),
])
def test_share_baseline_resolution(stain, baseline, fitted, expected):
    s = Settings(stains={"stain": stain}, collagen={"share_baseline": baseline})
    assert s.share_from_parenchyma(fitted) is expected


# ------------------------------------------------------------------------------------------
# synthetic sections with known truth
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_purple_cytoplasm_changes_staining_not_anatomy():
    base = replace(PURPLE, cytoplasm_blue=0.0)
    rgb0, t0 = make_section(base, rng=3)
    rgb1, t1 = make_section(PURPLE, rng=3)
    assert np.array_equal(t0.collagen_mask, t1.collagen_mask)
    assert np.array_equal(t0.tissue_mask, t1.tissue_mask)
    assert not np.array_equal(rgb0, rgb1)
    # without purple the variation parameter draws nothing: same pixels as ever
    rgb2, _ = make_section(replace(base, cytoplasm_blue_cv=0.9), rng=3)
    assert np.array_equal(rgb0, rgb2)


@pytest.fixture(scope="module")
def purple_sections():
    return [make_section(PURPLE, rng=seed) for seed in (100, 102, 103)]


@pytest.mark.slow
def test_purple_masson_cpa_within_1pp(purple_sections):
    for rgb, truth in purple_sections:
        a = _masson(rgb, PURPLE.mpp)
        assert a.to_record()["parenchyma_share"] > 0.05  # the purple was seen ...
        assert a.to_record()["share_guard"] > 0.4  # ... and the guard raised
        assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 1.0


@pytest.mark.slow
def test_purple_masson_overcounted_with_the_absolute_guard(purple_sections):
    """The same sections with min_share counted from zero (the previous rule) over-count."""
    errors = []
    for rgb, truth in purple_sections:
        a = _masson(rgb, PURPLE.mpp, share_baseline="zero")
        assert a.to_record()["share_guard"] == 0.35
        errors.append(a.to_record()["cpa_percent"] - truth.cpa_percent)
    assert np.mean(errors) > 1.0


@pytest.mark.slow
def test_clean_red_counterstain_keeps_the_absolute_guard():
    rgb, truth = make_section(replace(PURPLE, cytoplasm_blue=0.0, nonspecific=0.0), rng=4)
    a = _masson(rgb, PURPLE.mpp)
    assert a.to_record()["share_guard"] == pytest.approx(0.35, abs=0.02)
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 1.0


@pytest.mark.slow
def test_sirius_red_unchanged():
    rgb, _truth = make_section(SectionParams(shape=(512, 512), fibrosis=0.6, nonspecific=0.12),
                              rng=8)
    runs = [analyze_slide("s.png", load_settings(overrides={"collagen": {"share_baseline": b}}),
                          slide=ArraySlide(rgb, 0.5)) for b in ("auto", "zero")]
    assert runs[0].to_record()["share_guard"] == 0.35
    assert runs[0].to_record()["cpa_percent"] == runs[1].to_record()["cpa_percent"]
    assert np.array_equal(runs[0].collagen_mask, runs[1].collagen_mask)


@pytest.mark.slow
def test_fixed_vectors_keep_the_absolute_guard():
    rgb, _ = make_section(replace(PURPLE, vector_drift_deg=8.0), rng=5)
    s = load_settings(overrides={"stains": {"stain": "masson", "estimate": "preset"}})
    a = analyze_slide("s.png", s, slide=ArraySlide(rgb, PURPLE.mpp))
    assert a.to_record()["share_guard"] == 0.35 and a.to_record()["parenchyma_share"] == 0.0


# ------------------------------------------------------------------------------------------
# real Masson tiles (skipped when ../shared/data is absent)
# ------------------------------------------------------------------------------------------

LIVER_TILES = [
    ("masson-liver-heinemann", "16_224_606_43_42.png"),
    ("masson-liver-heinemann", "16_224_606_47_24.png"),
    ("masson-liver-boehringer", "114_10_19.png"),
]
HEART_FIELDS = ["1_heart_1022472553.png", "1_heart_2473238609.png", "1_heart_4439400826.png"]


def _real(folder: str, name: str) -> np.ndarray:
    path = SHARED / folder / name
    if not path.is_file():
        pytest.skip(f"real image {folder}/{name} not present (../shared/data)")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "name"), LIVER_TILES)
def test_real_purple_masson_liver_has_little_collagen(folder, name):
    """Little collagen by eye (thin fibres, one portal tract); 7-13 % before the fix."""
    a = _masson(_real(folder, name), 0.44)
    assert a.to_record()["parenchyma_share"] > 0.1  # purple cytoplasm recognised
    assert a.to_record()["cpa_percent"] < 6.0
    assert a.to_record()["cpa_percent"] > 0.5  # the visible blue fibres are still found


@pytest.mark.slow
@pytest.mark.parametrize("name", HEART_FIELDS)
def test_real_masson_heart_keeps_its_collagen(name):
    """Red myocardium: the guard stays near min_share and interstitial collagen is kept."""
    a = _masson(_real("masson-heart-autoslide", name), 0.44)
    assert a.to_record()["share_guard"] < 0.4
    assert 2.0 < a.to_record()["cpa_percent"] < 8.0
