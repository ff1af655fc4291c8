"""skan's path tracing, compiled once per machine instead of once per process.

skan traces a skeleton graph's paths with a numba function (``skan.csr._build_paths``) over a
``jitclass`` graph. numba cannot cache a function of a ``jitclass`` on disk (the class's type is
keyed by its address), so every process compiled it again: 1.6-2.2 s of CPU per run, a third of
what the fibre traits add to a slide. Here skan's own function (its ``py_func``) is compiled
with ``cache=True`` against :class:`CSRGraph`, a named tuple of the same arrays whose methods
(``neighbors``, ``edge``, ``set_edge``) are skan's ``jitclass`` methods, calling skan's own CSR
helpers. The path tracing is skan's, unchanged; loading it from the cache takes ~0.15 s.

:func:`trace_paths` returns what ``skan.csr.PathGraph.from_graph(...).paths`` returns, entry
for entry (tested against it).
"""

from __future__ import annotations

import hashlib
import types as pytypes
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numba import njit, types
from numba.core.datamodel.models import TupleModel
from numba.extending import overload_method, register_model, typeof_impl
from scipy import sparse
from skan import csr as _skan


class CSRGraph(NamedTuple):
    """A CSR graph with a value per node: the fields and methods of skan's ``NBGraph``.

    The methods serve pure Python (``NUMBA_DISABLE_JIT``) and, registered as overloads of
    :class:`CSRGraphType` below, compiled code.
    """

    indptr: np.ndarray  # int32 (nodes + 1,)
    indices: np.ndarray  # int32 (edges,)
    data: np.ndarray  # float64 edge lengths, or bool "visited" flags
    shape: np.ndarray  # int32 (2,)
    node_properties: np.ndarray  # float64 (nodes,)

    def neighbors(self: CSRGraph, row: int) -> np.ndarray:
        return self.indices[self.indptr[row]:self.indptr[row + 1]]

    def edge(self: CSRGraph, i: int, j: int) -> Any:
        return _skan._csrget(self.indices, self.indptr, self.data, i, j)

    def set_edge(self: CSRGraph, i: int, j: int, value: Any) -> None:
        _skan._csrset(self.indices, self.indptr, self.data, i, j, value)


class CSRGraphType(types.NamedTuple):
    """numba's type of a :class:`CSRGraph`: a named tuple type of its own, so that the methods
    below belong to it alone (overloads on every named tuple would shadow the fields of any
    other named tuple with a field called ``edge``, ``neighbors`` or ``set_edge``)."""


@typeof_impl.register(CSRGraph)
def _typeof_graph(val: CSRGraph, c: Any) -> CSRGraphType:
    return CSRGraphType([typeof_impl(v, c) for v in val], CSRGraph)


register_model(CSRGraphType)(TupleModel)


# compiled code runs the class's own methods: each overload returns one as its implementation
# (numba compares the two signatures, annotations included)
@overload_method(CSRGraphType, "neighbors")
def _neighbors(self: CSRGraph, row: int) -> Any:
    return CSRGraph.neighbors


@overload_method(CSRGraphType, "edge")
def _edge(self: CSRGraph, i: int, j: int) -> Any:
    return CSRGraph.edge


@overload_method(CSRGraphType, "set_edge")
def _set_edge(self: CSRGraph, i: int, j: int, value: Any) -> Any:
    return CSRGraph.set_edge


def _module_tag() -> str:
    """A hash of this module's source (its overloads and compile options), or of fibroquant's
    version where the source cannot be read (a zip or bytecode-only install)."""
    try:
        text = Path(__file__).read_bytes()
    except OSError:
        from fibroquant import __version__

        text = __version__.encode()
    return hashlib.sha1(text).hexdigest()[:12]


def _tagged(fn: pytypes.FunctionType) -> pytypes.FunctionType:
    """skan's function under a name that carries :func:`_module_tag`.

    numba's disk cache is checked against the source file of the function alone (skan's, here),
    so an edit to the overloads or options above would otherwise keep loading code compiled
    before it; the cache file's name comes from the function's qualified name, which now
    changes with this file. The code object and globals are skan's own.
    """
    out = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                               fn.__closure__)
    out.__qualname__ = f"{fn.__qualname__}_fibroquant_{_module_tag()}"
    out.__module__ = fn.__module__
    return out


def _compiled(fn: pytypes.FunctionType) -> Any:
    """``fn`` compiled (the options here, so that :func:`_module_tag` covers them) and cached
    on disk; without a cache where no cache directory is writable (compiled once per process,
    as skan's own)."""
    try:
        return njit(cache=True, nogil=True, fastmath=False)(fn)
    except RuntimeError:  # "cannot cache function ... no locator available" (read-only install)
        return njit(cache=False, nogil=True, fastmath=False)(fn)


#: skan's ``_build_paths``, compiled against :class:`CSRGraph` and cached on disk
build_paths = _compiled(_tagged(getattr(_skan._build_paths, "py_func", _skan._build_paths)))


def trace_paths(adj: Any, node_values: np.ndarray) -> Any:
    """skan's paths of a pixel graph: ``PathGraph.from_graph(adj=adj, ...).paths``.

    Parameters
    ----------
    adj : scipy.sparse CSR matrix
        The skeleton's pixel graph (edge lengths as data), as ``skan.csr.skeleton_to_csgraph``.
    node_values : numpy.ndarray
        A value per node, kept as each path entry's data (float64).

    Returns
    -------
    scipy.sparse.csr_matrix
        Paths x nodes: the nodes of each path in order, the node values as data.

    Raises
    ------
    ValueError
        When the graph has no path (isolated pixels only), as skan does.
    """
    indptr = adj.indptr.astype(np.int32, copy=False)
    indices = adj.indices.astype(np.int32, copy=False)
    shape = np.array(adj.shape, dtype=np.int32)
    values = node_values.astype(np.float64)
    graph = CSRGraph(indptr, indices, adj.data, shape, values)
    visited = CSRGraph(indptr, indices, np.zeros(adj.data.shape, bool), shape, values)
    degrees = np.diff(adj.indptr)
    end_degrees = degrees[degrees != 2]
    # skan's buffers: a path per end of every end point or junction, and at most one isolated
    # cycle per four edges (a cycle repeats its first node)
    cycles = indices.size // 4
    path_indptr = np.zeros(int(end_degrees.sum()) + cycles, dtype=int)
    n_entries = indices.size + int(np.maximum(0, end_degrees - 1).sum()) + cycles
    path_indices = np.zeros(n_entries, dtype=int)
    path_data = np.zeros(n_entries, dtype=float)
    m, n = build_paths(graph, path_indptr, path_indices, path_data, visited, degrees)
    return sparse.csr_matrix((path_data[:n], path_indices[:n], path_indptr[:m]),
                             shape=(m - 1, n))
