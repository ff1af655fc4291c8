"""Colour-plane misregistration: measured to ~0.1 px, undone, and CPA of a misregistered
image equals that of the registered one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibroquant.config import load_settings
from fibroquant.pipeline import analyze_slide
from fibroquant.registration import estimate_channel_shifts, plane_shift, shift_channels
from fibroquant.shading import CorrectedSlide
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, make_section

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def field():
    rgb, _ = make_section(SectionParams(shape=(768, 768), field_of_view=True, steatosis=0.2),
                          rng=1)
    return rgb


def _move(rgb: np.ndarray, red: tuple[float, float], blue: tuple[float, float]) -> np.ndarray:
    """Move the red and blue planes' content by (dy, dx) (Lanczos, as an optical shift)."""
    out = rgb.copy()
    h, w = rgb.shape[:2]
    for c, (dy, dx) in ((0, red), (2, blue)):
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        out[..., c] = cv2.warpAffine(rgb[..., c], m, (w, h), flags=cv2.INTER_LANCZOS4,
                                     borderMode=cv2.BORDER_REFLECT)
    return out


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.floats(-1.5, 1.5), st.floats(-1.5, 1.5), st.floats(-1.5, 1.5), st.floats(-1.5, 1.5))
def test_plane_shift_is_measured_to_a_tenth_of_a_pixel(field, ry, rx, by, bx):
    moved = _move(field, (ry, rx), (by, bx))
    est = plane_shift(np.ascontiguousarray(moved[128:640, 128:640]))
    assert np.abs(est - [[ry, rx], [by, bx]]).max() < 0.1


@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.6, -0.35), (-1.2, 0.8)])
def test_plane_shift_with_green_transformed_once_equals_skimage_direct(field, shift):
    """The green plane's FFT shared by both correlations gives skimage's own shifts, to the
    bit (its ``space="real"`` call, written out here)."""
    from skimage.registration import phase_cross_correlation

    from fibroquant.registration import _gradient

    crop = np.ascontiguousarray(_move(field, shift, (-shift[0], 0.5))[200:456, 300:556])
    g = _gradient(crop[..., 1])
    direct = np.array([-phase_cross_correlation(g, _gradient(crop[..., c]), upsample_factor=20,
                                                normalization=None)[0] for c in (0, 2)])
    assert np.array_equal(plane_shift(crop), direct)


def test_registered_images_are_left_alone(field):
    assert estimate_channel_shifts([field]) is None
    small = _move(field, (0.1, -0.1), (-0.1, 0.1))
    assert estimate_channel_shifts([small]) is None  # below MIN_SHIFT_PX


def test_shift_is_estimated_and_undone(field):
    moved = _move(field, (0.5, 0.4), (-0.5, -0.4))
    est = estimate_channel_shifts([moved])
    assert est is not None
    assert np.abs(est - [[0.5, 0.4], [-0.5, -0.4]]).max() < 0.1
    back = shift_channels(moved, est)
    inner = (slice(8, -8), slice(8, -8))
    err_before = np.abs(moved[inner].astype(int) - field[inner]).mean()
    err_after = np.abs(back[inner].astype(int) - field[inner]).mean()
    assert err_after < 0.6 * err_before  # two resamplings (Lanczos, cubic) smooth the noise
    assert np.array_equal(back[..., 1], moved[..., 1])  # green is the reference


def test_corrected_slide_reads_equal_the_whole_image_corrected(field):
    moved = _move(field, (0.7, -0.3), (-0.7, 0.3))
    shifts = np.array([[0.7, -0.3], [-0.7, 0.3]])
    whole = shift_channels(moved, shifts)
    sl = CorrectedSlide(ArraySlide(moved, 0.5, levels=3), shifts=shifts)
    for y, x, h, w in ((100, 200, 256, 300), (0, 0, 64, 64), (700, 700, 68, 68)):
        # OpenCV's fixed-point interpolation weights depend on the offset's float rounding:
        # a grey level apart at a few pixels
        diff = np.abs(sl.read_region(0, y, x, h, w).astype(int) - whole[y : y + h, x : x + w])
        assert diff.max() <= 1
        assert np.count_nonzero(diff) < 0.001 * diff.size
    # level 1: half the shift; level 2 (a quarter: 0.19 px) still resampled, finer than 0.05
    assert np.allclose(sl.level_shifts(1), shifts / 2)
    assert sl.level_shifts(2) is not None
    assert CorrectedSlide(ArraySlide(moved, 0.5, levels=8), shifts=shifts).level_shifts(5) is None


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_cpa_of_a_misregistered_image_equals_the_registered_one(stain):
    settings_ = load_settings(overrides={"stains": {"stain": stain}})
    p = SectionParams(stain=stain, shape=(768, 768), steatosis=0.2)
    flat, _ = make_section(p, rng=3)
    moved, _ = make_section(replace(p, channel_shift_px=1.0), rng=3)
    a = analyze_slide("a.png", settings_, slide=ArraySlide(flat, 0.5)).to_record()
    b = analyze_slide("b.png", settings_, slide=ArraySlide(moved, 0.5)).to_record()
    assert a["channel_shift_px"] == 0.0
    assert b["channel_shift_px"] == pytest.approx(1.0, abs=0.1)
    assert abs(b["cpa_percent"] - a["cpa_percent"]) < 0.45
    off = load_settings(overrides={"stains": {"stain": stain},
                                   "tissue": {"register_channels": False}})
    c = analyze_slide("b.png", off, slide=ArraySlide(moved, 0.5)).to_record()
    assert c["channel_shift_px"] == 0.0
    assert abs(c["cpa_percent"] - a["cpa_percent"]) > abs(b["cpa_percent"] - a["cpa_percent"])


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "masson-liver-heinemann").is_dir(),
                    reason="shared real-image data not present")
def test_real_images_shifts():
    """The heinemann tiles have their blue plane ~0.6 px off the red one (fringed vacuoles);
    the other real images are registered."""
    for path in sorted(SHARED_DATA.glob("*/*.png")) + sorted(SHARED_DATA.glob("*/*.jpg")):
        rgb = cv2.imread(str(path))[..., ::-1].copy()
        est = estimate_channel_shifts([rgb])
        if "heinemann" in path.parent.name:
            assert est is not None, path.name
            assert 0.45 < np.hypot(*(est[1] - est[0])) < 0.8, path.name
        else:
            assert est is None, path.name


def test_flat_crops_give_no_shift(field):
    """Saturated glass has no edges: its correlation peak is meaningless (skimage reports
    0.75 px) and must not be taken for a misregistration."""
    blank = np.full((512, 512, 3), 255, np.uint8)
    assert estimate_channel_shifts([blank, blank, field[:512, :512].copy()]) is None
    half = field[:512, :512].copy()
    half[:, 256:] = 255
    assert estimate_channel_shifts([half] * 3) is None


def test_a_level_too_small_to_correlate_is_skipped():
    rgb, _ = make_section(SectionParams(shape=(768, 768), field_of_view=True), rng=1)
    settings_ = load_settings(overrides={"tiling": {"analysis_mpp": 2.0}})
    rec = analyze_slide("thin.png", settings_, slide=ArraySlide(rgb[400:403], 0.5, levels=2))
    assert rec.to_record()["channel_shift_px"] == 0.0
