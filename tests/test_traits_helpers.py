"""The trait tile's helpers against straightforward references: the same arrays, bit for bit."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fibroquant import synthetic_fibres as sf
from fibroquant import traits as tr


def _blobs(rng: np.random.Generator, shape: tuple[int, int], smooth: float,
           share: float) -> np.ndarray:
    """A random bool mask of blobs and strands (smoothed noise above a quantile)."""
    noise = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), smooth)
    return noise > np.quantile(noise, 1.0 - share)


def _reference_part(col, tis, width_um, skel, d2, n_ortho, n_diag, peri, vessel, border,
                    thin_border, origin, slide_shape, params, band):
    """``traits._part``'s sums written plainly: a whole-core mask and a bincount per sum."""
    h, w = col.shape
    n_obj, obj = cv2.connectedComponents(col.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    n_hole, hole = cv2.connectedComponents((~col).view(np.uint8), connectivity=4,
                                           ltype=cv2.CV_32S)
    fibre = col & (width_um >= params.septum_min_width_um)
    wide = fibre | (col & band)
    on = skel & wide
    step = (n_ortho[on] + math.sqrt(2) * n_diag[on]) / 2.0
    obj_sums = {"area": np.bincount(obj[col], minlength=n_obj),
                "wide_free": np.bincount(obj[wide & ~peri], minlength=n_obj),
                "wide_length": np.bincount(obj[on], weights=step, minlength=n_obj)}
    open_px = np.bincount(hole[~tis], minlength=n_hole)
    for at_edge, line in ((origin[0] == 0, hole[0]), (origin[1] == 0, hole[:, 0]),
                          (origin[0] + h == slide_shape[0], hole[-1]),
                          (origin[1] + w == slide_shape[1], hole[:, -1])):
        if at_edge:
            open_px += np.bincount(line, minlength=n_hole)
    hole_sums = {"area": np.bincount(hole.ravel(), minlength=n_hole), "open": open_px,
                 "border": np.bincount(hole[border], minlength=n_hole),
                 "thin_border": np.bincount(hole[thin_border], minlength=n_hole)}
    free = skel & fibre & ~peri
    widths = sorted(zip(obj[free].tolist(), d2[free].tolist(), strict=True))
    keys, counts = np.unique(np.array(widths, np.int64).reshape(-1, 2), axis=0,
                             return_counts=True)
    obj_width = np.column_stack([keys, counts]) if len(widths) else np.zeros((0, 3), np.int64)
    near = col & (vessel > 0)
    pairs = np.unique(np.column_stack([obj[near], vessel[near]]).astype(np.int64), axis=0)
    return obj_sums, hole_sums, obj_width, pairs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(8, 70), w=st.integers(8, 70),
       share=st.floats(0.05, 0.7), at_edge=st.booleans())
def test_part_sums_equal_a_plain_reference(seed, h, w, share, at_edge):
    """Objects, holes, septal widths and vessel pairs of a core, from views into a larger
    frame (as measure_tile passes them), equal the plain whole-mask sums."""
    _check_part(seed, h, w, share, at_edge)


@pytest.mark.parametrize("share", [0.03, 0.08, 0.3, 0.6])
def test_part_sums_sparse_and_dense_collagen(share):
    """Both ways of gathering the object sums (by index under 1/8 collagen, by mask above)."""
    _check_part(11, 64, 80, share, False)


def _check_part(seed: int, h: int, w: int, share: float, at_edge: bool) -> None:
    rng = np.random.default_rng(seed)
    params = tr.TraitParams(mpp=1.0)
    frame = (h + 2, w + 2)
    col_f = _blobs(rng, frame, 1.5, share)
    inner = (slice(1, h + 1), slice(1, w + 1))
    col = col_f[inner]
    tis = ~(_blobs(rng, (h, w), 2.0, 0.2)) | col
    skel_f = col_f & (rng.random(frame) < 0.3)
    width_f = np.where(col_f, rng.uniform(0.5, 12.0, frame), 0).astype(np.float32)
    d2_f = np.where(skel_f, rng.integers(1, 40, frame), 0).astype(np.int32)
    n_ortho_f = rng.integers(0, 5, frame).astype(np.uint8)
    n_diag_f = rng.integers(0, 5, frame).astype(np.uint8)
    vessel = np.where(rng.random((h, w)) < 0.3, rng.integers(1, 4, (h, w)), 0).astype(np.int32)
    peri = col & (vessel > 0)
    border = ~col & (rng.random((h, w)) < 0.3)
    thin_border = border & (rng.random((h, w)) < 0.5)
    origin = (0, 0) if at_edge else (5, 7)
    slide_shape = (h, w) if at_edge else (h + 20, w + 20)
    args = (col, tis, width_f[inner], skel_f[inner], d2_f[inner], n_ortho_f[inner],
            n_diag_f[inner], peri, vessel, border, thin_border, origin, slide_shape, params)
    band = col & (rng.random((h, w)) < 0.3)
    part = tr._part(*args, None, band=band)
    obj_sums, hole_sums, obj_width, pairs = _reference_part(np.ascontiguousarray(col),
                                                            *args[1:], band)
    for got, want in ((part.obj, obj_sums), (part.hole, hole_sums)):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(part.obj_width.reshape(-1, 3), obj_width)
    np.testing.assert_array_equal(part.obj_vessel.reshape(-1, 2), pairs.reshape(-1, 2))


@pytest.mark.parametrize("seed", [1, 2])
def test_path_steps_are_skan_path_lengths(seed):
    """Steps computed once per graph from integer coordinates: their sums per path are
    skan's ``path_lengths`` and the cached coordinates are the paths' own pixels."""
    import skan
    from skimage.morphology import skeletonize

    skel = skeletonize(sf.pericellular_network(rng=seed).collagen)
    graph, _, (y0, x0) = tr._skan_graph(skel, np.ones(skel.shape, np.float32))
    _, _, step, yx = graph.steps
    assert graph.steps is graph.steps  # computed once
    assert yx.dtype.kind == "i"
    np.testing.assert_array_equal(yx, graph.coordinates[graph.paths.indices])
    y1, x1 = y0 + graph.coordinates[:, 0].max() + 1, x0 + graph.coordinates[:, 1].max() + 1
    ref = skan.Skeleton(skel[y0:y1, x0:x1].astype(np.float32))
    np.testing.assert_allclose(tr._path_lengths(graph), ref.path_lengths(), rtol=1e-12)
    assert set(np.unique(step)) <= {0.0, 1.0, math.sqrt(2)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.integers(1, 12),
       st.integers(0, 2**32 - 1))
def test_block_sums_equal_a_loop(h, w, bh, bw, seed):
    """Pixels per block for any sorted cut, empty blocks included (a lumen pixel that holds
    no trait pixel centre)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < 0.4
    row_edge = np.sort(rng.integers(0, h + 1, bh + 1))
    col_edge = np.sort(rng.integers(0, w + 1, bw + 1))
    got = tr._block_sums(mask, row_edge, col_edge)
    want = np.array([[mask[row_edge[i]:row_edge[i + 1], col_edge[j]:col_edge[j + 1]].sum()
                      for j in range(bw)] for i in range(bh)])
    np.testing.assert_array_equal(got, want)
