import cv2
import numpy as np
import pytest

from fibroquant.focus import block_sharpness, unfocused
from fibroquant.stains import rgb_to_od
from fibroquant.synthetic import SectionParams, make_section


def _blocks(rgb, tissue, size=128):
    od = rgb_to_od(rgb).sum(-1)
    out = []
    for y in range(0, rgb.shape[0], size):
        for x in range(0, rgb.shape[1], size):
            out.append(block_sharpness(od[y:y + size, x:x + size], tissue[y:y + size, x:x + size]))
    return np.array(out)


def test_blurred_quadrant_is_flagged_and_sharp_slide_is_not():
    rgb, truth = make_section(SectionParams(shape=(768, 768), field_of_view=True), rng=3)
    sharp = _blocks(rgb, truth.tissue_mask)
    assert not unfocused(sharp, factor=0.35).any()
    blurred = rgb.copy()
    blurred[:384, :384] = cv2.GaussianBlur(rgb, (0, 0), 6)[:384, :384]
    s = _blocks(blurred, truth.tissue_mask).reshape(6, 6)
    flags = unfocused(s.ravel(), factor=0.35).reshape(6, 6)
    assert flags[:3, :3].sum() >= 7  # the blurred quadrant (9 blocks), allowing an edge block
    assert not flags[3:, :].any() and not flags[:, 3:].any()


def test_contrast_does_not_count_as_focus():
    rng = np.random.default_rng(0)
    tex = rng.random((128, 128)).astype(np.float32)
    t = np.ones((128, 128), bool)
    assert abs(block_sharpness(tex, t) - block_sharpness(0.2 * tex, t)) < 1e-3


def test_too_few_blocks_or_no_tissue():
    assert not unfocused(np.array([1.0, 0.01]), factor=0.5).any()
    assert np.isnan(block_sharpness(np.ones((64, 64), np.float32), np.zeros((64, 64), bool)))


@pytest.mark.parametrize("seed", range(8))
def test_one_pass_moments_equal_opencv_laplacian_and_variances(seed, monkeypatch):
    """The numba moments give OpenCV's sharpness (float32 Laplacian image + meanStdDev) to
    ~1e-6 (OpenCV's float32 Laplacian is the less precise of the two), for whole-tissue
    blocks, masked blocks, odd shapes and OD levels away from zero."""
    from fibroquant import kernels

    rng = np.random.default_rng(seed)
    h, w = rng.integers(8, 90, 2)
    od = (rng.random((h, w)) * rng.uniform(0.05, 2) + rng.uniform(0, 3)).astype(np.float32)
    od = cv2.GaussianBlur(od, (0, 0), rng.uniform(0.3, 2))
    tissue = np.ones((h, w), bool) if seed % 2 else rng.random((h, w)) < 0.8
    fast = block_sharpness(od, tissue)
    assert kernels.focus_moments(od, tissue) is not None or not kernels.HAVE_NUMBA
    lap = cv2.Laplacian(od, cv2.CV_32F, ksize=3)
    inner = tissue.copy()
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    ref = float("nan")
    if inner.any() and np.count_nonzero(tissue) >= 0.5 * tissue.size:
        var = [float(cv2.meanStdDev(a, mask=m.view(np.uint8))[1][0, 0]) ** 2
               for a, m in ((od, tissue), (lap, inner))]
        ref = var[1] / var[0] if var[0] > 1e-8 else ref
    assert fast == pytest.approx(ref, rel=1e-5, nan_ok=True)
    monkeypatch.setattr(kernels, "focus_moments", lambda *a: None)  # no numba: numpy moments
    assert block_sharpness(od, tissue) == pytest.approx(ref, rel=1e-5, nan_ok=True)
