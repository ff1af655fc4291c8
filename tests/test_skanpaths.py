"""skan's path tracing compiled against a cacheable graph: the same paths as skan's own
``PathGraph``, and loaded from numba's disk cache by the next process instead of compiled."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import sparse

from fibroquant import skanpaths, traits


def _skan_paths(adj, values):
    from skan.csr import PathGraph

    return PathGraph.from_graph(adj=adj, node_coordinates=np.zeros((adj.shape[0], 2)),
                                node_values=values).paths


def _lines_and_rings(seed: int) -> np.ndarray:
    """A skeleton with end points, junctions, isolated rings (no end point) and a lone pixel."""
    rng = np.random.default_rng(seed)
    skel = np.zeros((80, 90), bool)
    for _ in range(6):  # straight and diagonal segments, crossing each other
        y, x = rng.integers(5, 70), rng.integers(5, 60)
        n = int(rng.integers(5, 25))
        if rng.random() < 0.5:
            skel[y, x:x + n] = True
        else:
            skel[np.arange(y, min(y + n, 79)), np.arange(x, x + min(n, 79 - y))] = True
    skel[60:66, 70] = skel[60:66, 75] = skel[60, 70:76] = skel[65, 70:76] = True  # a ring
    skel[2, 2:5] = skel[4, 2:5] = skel[3, 2] = skel[3, 4] = True  # a small ring
    skel[78, 88] = True  # a lone pixel
    return skel


@pytest.mark.parametrize("seed", range(4))
def test_trace_paths_equals_skan_with_rings_and_junctions(seed):
    adj, nodes = traits._pixel_graph(_lines_and_rings(seed))
    values = np.random.default_rng(seed).uniform(1, 5, len(nodes)).astype(np.float32)
    got, want = skanpaths.trace_paths(adj, values), _skan_paths(adj, values)
    assert got.shape == want.shape and got.shape[0] > 2
    for name in ("indptr", "indices", "data"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_trace_paths_raises_as_skan_without_a_path():
    adj = sparse.csr_matrix((3, 3))  # three isolated pixels
    with pytest.raises(ValueError, match="index pointer"):
        _skan_paths(adj, np.ones(3))
    with pytest.raises(ValueError, match="index pointer"):
        skanpaths.trace_paths(adj, np.ones(3))


def test_the_next_process_loads_the_path_tracing_from_the_cache():
    from numba.core.caching import NullCache

    if isinstance(getattr(skanpaths.build_paths, "_cache", NullCache()), NullCache):
        pytest.skip("no writable numba cache here (kernels._jit compiled without one)")
    traits._skan_graph(_lines_and_rings(0), np.ones((80, 90), np.float32))  # compiled, saved
    code = ("from fibroquant import skanpaths, traits\n"
            "traits.warm_skan()\n"
            "stats = skanpaths.build_paths.stats\n"
            "assert stats.cache_hits and not stats.cache_misses, stats\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_cache_file_changes_with_this_module_and_the_code_is_skans():
    """numba checks a cache against skan's file only: the cached function's name carries a hash
    of fibroquant/skanpaths.py (an edit to its overloads compiles anew); the code is skan's."""
    import hashlib
    from pathlib import Path

    from skan import csr

    fn = getattr(skanpaths.build_paths, "py_func", skanpaths.build_paths)
    skans = getattr(csr._build_paths, "py_func", csr._build_paths)  # (NUMBA_DISABLE_JIT)
    assert fn.__code__ is skans.__code__
    assert fn.__globals__ is skans.__globals__
    tag = hashlib.sha1(Path(skanpaths.__file__).read_bytes()).hexdigest()[:12]
    assert skanpaths._module_tag() == tag
    assert fn.__qualname__ == f"_build_paths_fibroquant_{tag}"


def test_the_graph_methods_leave_other_named_tuples_alone():
    """The overloads belong to CSRGraph's own numba type: another named tuple's field called
    ``edge`` is still a field in compiled code."""
    from collections import namedtuple

    from fibroquant import kernels

    if not kernels.HAVE_NUMBA:
        pytest.skip("no numba")
    import numba

    pair = namedtuple("pair", ["edge", "x"])

    @numba.njit
    def first(p):
        return p.edge + p.x

    assert first(pair(2, 3)) == 5
