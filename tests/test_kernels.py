"""The fused tile kernel decides collagen by ``collagen.CollagenRule``, bit for bit."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fibroquant import kernels
from fibroquant.collagen import CollagenRule, collagen_concentration, is_collagen
from fibroquant.stains import od_lut


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


backgrounds = st.tuples(*[st.floats(120.0, 255.0, allow_nan=False)] * 3)
unit_vectors = st.tuples(*[st.floats(-1.0, 1.0, allow_nan=False)] * 3).filter(
    lambda v: float(np.linalg.norm(v)) > 1e-3
).map(_unit)
tiles = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda hw: arrays(np.uint8, (*hw, 3))
)


def _kernel_decision(rgb: np.ndarray, threshold: np.ndarray, rule: CollagenRule):
    """The kernel's per-pixel collagen mask and OD sum: every pixel its own low-resolution
    cell of plain tissue, blocks of 1 px, no specks."""
    h, w = rgb.shape[:2]
    flags = np.ones((h, w), np.uint8)
    rows, cols = np.arange(h, dtype=np.intp), np.arange(w, dtype=np.intp)
    out = kernels.measure_tile_fused(rgb, rule.lut, rule.unmix_col, rule.other_cols,
                                     rule.share_guard, flags, threshold, rows, cols, 1, 0)
    return out.blocks[0] == 1, out.collagen_od_sum


def _check(rgb, background, col, threshold, others=(), guard=0.0):
    rule = CollagenRule(od_lut(background), col, others, guard)
    conc, ref = is_collagen(rgb, threshold, rule)
    assert conc.dtype == np.float32
    assert ref.shape == rgb.shape[:2]
    if not kernels.HAVE_NUMBA:
        pytest.skip("numba missing: no kernel")
    mask, od_sum = _kernel_decision(rgb, threshold, rule)
    np.testing.assert_array_equal(mask, ref)
    assert od_sum == pytest.approx(float(conc[ref].sum(dtype=np.float64)), rel=1e-9, abs=1e-9)
    return conc, ref


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rgb=tiles, background=backgrounds, col=unit_vectors,
       threshold=st.floats(-0.5, 1.5, allow_nan=False), guard=st.sampled_from([0.0, 0.35, 0.9]),
       n_other=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_kernel_decides_by_the_rule(rgb, background, col, threshold, guard, n_other, seed):
    """Random tiles, glass colours, unmixing columns, threshold maps and share guards: the
    kernel's collagen pixels are :func:`collagen.is_collagen`'s, including thresholds sitting
    exactly on a pixel's concentration."""
    rng = np.random.default_rng(seed)
    others = tuple(_unit(rng.normal(size=3)) for _ in range(n_other))
    thr = (threshold + rng.normal(0, 0.2, rgb.shape[:2])).astype(np.float32)
    conc, _ = _check(rgb, background, col, thr, others, guard)
    _check(rgb, background, col, conc.copy(), others, guard)  # ties: > is strict


@pytest.mark.parametrize(
    "rgb",
    [
        np.array([[[12, 200, 99]]], np.uint8),  # 1x1
        np.zeros((7, 5, 3), np.uint8),  # all black (OD at its maximum)
        np.full((5, 7, 3), 255, np.uint8),  # all white (OD 0)
    ],
    ids=["1x1", "black", "white"],
)
def test_edge_tiles(rgb):
    thr = np.full(rgb.shape[:2], 0.1, np.float32)
    conc, _ = _check(rgb, (240.0, 235.0, 230.0), _unit([0.2, 0.9, 0.4]), thr)
    assert np.isfinite(conc).all()


@pytest.mark.slow
def test_non_contiguous_tiles():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (64, 90, 4), dtype=np.uint8)
    col = _unit([0.3, -0.8, 0.5])
    views = [
        big[::2, 1::3, :3],  # strided rows and columns
        big[::-1, :, 2::-1],  # reversed rows, BGR view of the first three channels
        np.asfortranarray(big[..., :3]),
        big[..., :3].transpose(1, 0, 2),
    ]
    for rgb in views:
        assert not rgb.flags.c_contiguous
        _check(rgb, (250.0, 245.0, 240.0), col, np.full(rgb.shape[:2], 0.05, np.float32))


def test_collagen_concentration_is_one_dot_product_in_float32():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    lut, col = od_lut((240.0, 238.0, 236.0)), _unit([0.5, 0.5, 0.7])
    conc = collagen_concentration(rgb, lut, col)
    od = np.stack([lut[c][rgb[..., c]] for c in range(3)], axis=-1).astype(np.float64)
    assert conc.dtype == np.float32
    np.testing.assert_allclose(conc, od @ col.astype(np.float64), rtol=1e-5, atol=1e-6)


def test_fused_ok_refuses_what_the_kernel_cannot_take():
    rgb = np.zeros((4, 4, 3), np.uint8)
    lut, col = od_lut((240.0,) * 3), _unit([1, 0, 0])
    flags, thr = np.ones((2, 2), np.uint8), np.zeros((2, 2), np.float32)
    idx = np.array([0, 0, 1, 1], np.intp)
    assert kernels.fused_ok(rgb, lut, col, (), flags, thr, idx, idx) == kernels.HAVE_NUMBA
    assert not kernels.fused_ok(rgb, lut.astype(np.float64), col, (), flags, thr, idx, idx)
    assert not kernels.fused_ok(rgb, lut, col, (), flags, thr, idx + 1, idx)  # out of range
    with pytest.raises(ValueError, match="cannot take"):
        kernels.measure_tile_fused(rgb, lut, col, (), 0.0, flags, thr, idx + 1, idx, 1, 0)


def test_threshold_as_float32_matches_numpy():
    x = np.array([0.1, np.float32(0.1), np.nextafter(np.float32(0.1), 1)], np.float32)
    for t in (0.1, np.float64(0.1), np.float32(0.1), 1e300, np.float64(1e300), -np.inf,
              np.float64(-1e300), float("inf"), float("nan"), np.float64("nan")):
        t32 = kernels.threshold_as_float32(x.dtype, t)
        assert t32.dtype == np.float32
        with np.errstate(over="ignore"):  # numpy warns when casting 1e300 to float32
            expected = x > t
        np.testing.assert_array_equal(x > t32, expected)


def test_threads_and_no_warnings():
    """Threads share the compiled kernel; no numba warning escapes (pytest: warnings = error)."""
    if not kernels.HAVE_NUMBA:
        pytest.skip("numba missing: no kernel")
    rng = np.random.default_rng(3)
    rgbs = [rng.integers(0, 256, (128, 96, 3), dtype=np.uint8) for _ in range(8)]
    rule = CollagenRule(od_lut((245.0, 243.0, 239.0)), _unit([0.1, 0.8, 0.6]),
                        (_unit([0.7, 0.2, 0.1]),), 0.35)
    thr = np.full((128, 96), 0.1, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.warmup_fused()
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda a: _kernel_decision(a, thr, rule)[0], rgbs))
    for rgb, out in zip(rgbs, outs, strict=True):
        np.testing.assert_array_equal(out, is_collagen(rgb, thr, rule)[1])


@settings(max_examples=80, deadline=None)
@given(
    hw=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    start=st.integers(-20, 20),
    n=st.tuples(st.integers(0, 60), st.integers(0, 60)),
    factor=st.floats(0.3, 8.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_lookup_nearest_equals_ix(hw, start, n, factor, seed):
    mask = np.random.default_rng(seed).random(hw) < 0.5

    def index_map(a, b, size):  # as pipeline._index_map
        idx = np.floor((np.arange(a, b) + 0.5) / factor).astype(np.intp)
        return np.clip(idx, 0, size - 1)

    rows = index_map(start, start + n[0], hw[0])
    cols = index_map(start, start + n[1], hw[1])
    np.testing.assert_array_equal(
        kernels.lookup_nearest(mask, rows, cols), mask[np.ix_(rows, cols)]
    )
    bad = np.array([hw[0]], np.intp)  # out of range: same IndexError as numpy
    with pytest.raises(IndexError):
        kernels.lookup_nearest(mask, bad, cols if len(cols) else np.zeros(1, np.intp))
