"""The numba kernels equal the numpy reference (``pipeline.collagen_concentration``)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fibroquant import kernels
from fibroquant.pipeline import collagen_concentration
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


def _check(rgb: np.ndarray, background, col: np.ndarray) -> np.ndarray:
    lut = od_lut(background)
    ref = collagen_concentration(rgb, lut, col)
    fast = kernels.collagen_concentration_fast(rgb, lut, col)
    assert fast.dtype == ref.dtype == np.float32
    assert fast.shape == rgb.shape[:2]
    np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-6)
    if kernels.HAVE_NUMBA:  # same float32 operations in the same order: bit for bit
        np.testing.assert_array_equal(fast, ref)
    return ref


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rgb=tiles, background=backgrounds, col=unit_vectors)
def test_equals_reference(rgb, background, col):
    _check(rgb, background, col)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rgb=tiles,
    background=backgrounds,
    col=unit_vectors,
    threshold=st.floats(-0.5, 1.5, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_mask_equals_reference(rgb, background, col, threshold, seed):
    lut = od_lut(background)
    tissue = np.random.default_rng(seed).random(rgb.shape[:2]) < 0.7
    ref = collagen_concentration(rgb, lut, col)
    conc, mask = kernels.collagen_concentration_and_mask(rgb, lut, col, threshold, tissue)
    np.testing.assert_allclose(conc, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mask, (ref > threshold) & tissue)
    # thresholds sitting exactly on a pixel's value, and numpy float64 scalars
    for t in (float(ref.flat[0]), np.float64(ref.flat[0]), np.float64(threshold),
              np.float32(threshold)):
        _, m = kernels.collagen_concentration_and_mask(rgb, lut, col, t, tissue)
        np.testing.assert_array_equal(m, (ref > t) & tissue)


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
    ref = _check(rgb, (240.0, 235.0, 230.0), _unit([0.2, 0.9, 0.4]))
    assert np.isfinite(ref).all()


def test_non_contiguous_inputs():
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
        ref = _check(rgb, (250.0, 245.0, 240.0), col)
        tissue = np.ones(rgb.shape[1::-1], bool).T  # non-contiguous tissue mask too
        conc, mask = kernels.collagen_concentration_and_mask(
            rgb, od_lut((250.0, 245.0, 240.0)), col, 0.05, tissue
        )
        np.testing.assert_array_equal(conc, ref)
        np.testing.assert_array_equal(mask, (ref > 0.05) & tissue)


def test_empty_tile():
    rgb = np.zeros((0, 4, 3), np.uint8)
    lut = od_lut((240.0, 240.0, 240.0))
    col = _unit([1, 0, 0])
    assert kernels.collagen_concentration_fast(rgb, lut, col).shape == (0, 4)
    conc, mask = kernels.collagen_concentration_and_mask(rgb, lut, col, 0.1, np.zeros((0, 4), bool))
    assert conc.shape == mask.shape == (0, 4)


def test_other_dtypes_fall_back_to_reference():
    rgb = np.random.default_rng(2).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    lut = od_lut((240.0, 240.0, 240.0)).astype(np.float64)
    col = np.array([0.5, 0.5, 0.7], np.float64)
    ref = collagen_concentration(rgb, lut, col)
    out = kernels.collagen_concentration_fast(rgb, lut, col)
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)
    pixels = rgb.reshape(-1, 3)  # (N, 3): not a tile, still the reference's answer
    np.testing.assert_array_equal(
        kernels.collagen_concentration_fast(pixels, od_lut((240.0,) * 3), _unit([1, 1, 1])),
        collagen_concentration(pixels, od_lut((240.0,) * 3), _unit([1, 1, 1])),
    )


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.warmup()
        rng = np.random.default_rng(3)
        rgbs = [rng.integers(0, 256, (128, 96, 3), dtype=np.uint8) for _ in range(8)]
        lut = od_lut((245.0, 243.0, 239.0))
        col = _unit([0.1, 0.8, 0.6])
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda a: kernels.collagen_concentration_fast(a, lut, col), rgbs))
    for rgb, out in zip(rgbs, outs, strict=True):
        np.testing.assert_array_equal(out, collagen_concentration(rgb, lut, col))


def _block_reduce_ref(mask: np.ndarray, f: int) -> np.ndarray:  # as pipeline._block_reduce
    if f == 1:
        return mask
    h, w = mask.shape
    hh, ww = -(-h // f) * f, -(-w // f) * f
    padded = np.zeros((hh, ww), np.float32)
    padded[:h, :w] = mask
    return padded.reshape(hh // f, f, ww // f, f).mean(axis=(1, 3)) >= 0.5


@settings(max_examples=80, deadline=None)
@given(
    hw=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    f=st.integers(1, 9),
    p=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_majority_equals_block_reduce(hw, f, p, seed):
    mask = np.random.default_rng(seed).random(hw) < p
    np.testing.assert_array_equal(kernels.block_majority(mask, f), _block_reduce_ref(mask, f))
    np.testing.assert_array_equal(
        kernels.block_majority(mask[::-1, ::2], f), _block_reduce_ref(mask[::-1, ::2], f)
    )


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
