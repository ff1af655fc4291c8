"""Fibre architecture of a slide's collagen: width, length, branching, holes, compartments.

CPA says how much collagen there is; these traits say in what form and where. They are
computed from the binary collagen mask (and the countable-tissue mask) at one resolution
``mpp``, tile by tile with a halo, and summed in a :class:`TraitCounts` accumulator (``+`` like
:class:`fibroquant.measure.TileCounts`); :meth:`TraitCounts.traits` turns the totals into the
per-slide values (µm, mm⁻², %). Ownership makes the result independent of the tiling:

* every per-pixel quantity (skeleton length, widths, thin/thick areas, orientation coherence,
  compartment areas, boxes of the fractal dimension) is counted only in the tile whose core
  holds the pixel, and computed on the tile plus a halo wide enough for its neighbourhood;
* connected objects (collagen, 8-connected) and holes (non-collagen, 4-connected) are labelled
  in each core and joined across core borders (:func:`scipy.sparse.csgraph.connected_components`
  over the label pairs that touch), so a fibre crossing a border is one object;
* skeleton branches (:mod:`skan` paths) are cut to each core and their pieces joined across
  core borders by the skeleton steps that cross them, so a branch crossing tiles is measured
  whole (length and end-to-end chord).

Compartments: collagen within ``ring_um`` of a vessel lumen (the tissue mask's lumens) is
perivascular; of the rest, wide fibre (local width ≥ ``septum_min_width_um``) in objects that
bridge two vessels or run longer than ``septum_min_length_um`` is septal; the remainder is
pericellular. Lumens are told portal (thick collagen collar and another lumen nearby) or
central (thin collar, alone) by the rule in :func:`classify_vessels`.
"""

from __future__ import annotations

import logging
import math
import threading
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import cv2
import numpy as np

from fibroquant.errors import name_list

# scipy, scikit-image and skan are imported where used: cohort/run import the column names

logger = logging.getLogger(__name__)

_ORTHO = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.float32)
_DIAG = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1]], np.float32)
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


@dataclass(frozen=True)
class TraitParams:
    """Scales of the traits, in µm (see ``config.TraitSettings`` for their meaning)."""

    mpp: float
    thin_um: float = 3.0
    thick_um: float = 10.0
    hole_min_um2: float = 100.0
    hole_max_um2: float = 1000.0
    aggregate_um2: float = 5000.0
    coherence_sigma_um: float = 4.0
    ring_um: float = 50.0
    septum_min_width_um: float = 4.0
    septum_min_length_um: float = 300.0
    band_um: float = 5.0
    band_density: float = 0.5
    portal_collar_share: float = 0.3
    central_collar_share: float = 0.1
    cluster_um: float = 150.0
    lining_um: float = 4.0
    lining_min_share: float = 0.05
    box_sizes_px: tuple[int, ...] = (2, 4, 8, 16, 32)

    def halo_px(self) -> int:
        """Overlap a tile needs: the largest fibre half-width we measure exactly, the
        structure tensor's Gaussian support and the largest fractal box, with a margin."""
        fibre = 2.0 * self.thick_um / self.mpp + 4
        tensor = 4.0 * self.coherence_sigma_um / self.mpp + 2
        band = self.band_um / self.mpp + 2
        return math.ceil(max(fibre, tensor, band, max(self.box_sizes_px), 16))


@dataclass(frozen=True)
class VesselMap:
    """Lumens as seen by the trait tiles (built once per slide by :func:`vessel_map`).

    Attributes
    ----------
    distance_um : ndarray of float32
        Distance of every pixel of the lumen image to the nearest lumen, µm.
    nearest : ndarray of int32
        Label (1..n) of that nearest lumen.
    scale : float
        Lumen-image pixels per trait pixel.
    n : int
        Number of lumens.
    neighbours : ndarray of int64
        Per lumen (index 0 unused): other lumens within ``cluster_um`` (edge to edge), lined
        or not (a portal tract's bile duct counts).
    unlined : int
        Lumens left out as no vessel: no collagen lines them (:func:`lumen_lining`).
    vessel_neighbours : ndarray of int64, optional
        As ``neighbours``, counting the vessels (lined lumens) alone: a central vein is
        alone among vessels, whatever fat vacuoles lie beside it; None: ``neighbours``.
    outlines : tuple of ndarray
        Outline of each lumen of the map (label k at index k - 1), then of each unlined one:
        float32 ``(m, 2)`` x, y in µm of the slide (pixel centres), for the QC overlay.
    """

    distance_um: np.ndarray
    nearest: np.ndarray
    scale: float
    n: int
    neighbours: np.ndarray
    unlined: int = 0
    vessel_neighbours: np.ndarray | None = None
    outlines: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    _rings: dict[float, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def ring_labels(self, ring_um: float) -> np.ndarray:
        """int32 image of the lumen grid: the nearest lumen's label where it is at most
        ``ring_um`` away, else 0 (computed once per ring width)."""
        if ring_um not in self._rings:
            if not self.distance_um.size:
                msg = f"this vessel map keeps the rings of {sorted(self._rings)} µm only"
                raise ValueError(msg)
            self._rings[ring_um] = np.where(self.distance_um <= ring_um, self.nearest, 0
                                            ).astype(np.int32, copy=False)
        return self._rings[ring_um]

    @classmethod
    def without_vessels(cls, unlined: int = 0, outlines: tuple[np.ndarray, ...] = ()
                        ) -> VesselMap:
        """A map of no vessel (no lumen, or ``unlined`` lumens that are all unlined, with
        their ``outlines``): no ring anywhere, so the trait tiles skip it, and the slide's
        vessel counts read 0."""
        return cls(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32), 1.0, 0,
                   np.zeros(1, np.int64), unlined, outlines=outlines)

    def for_ring(self, ring_um: float) -> VesselMap:
        """This map keeping only the ring labels of ``ring_um`` (all the trait tiles read):
        the distance and nearest-lumen images are dropped (empty), two thirds of its memory
        (32 MB of a 4-MP lumen image)."""
        rings = self.ring_labels(ring_um)
        return VesselMap(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32), self.scale,
                         self.n, self.neighbours, self.unlined, self.vessel_neighbours,
                         self.outlines, {ring_um: rings})


@dataclass(frozen=True)
class Lining:
    """What :func:`vessel_map` needs to leave out unlined lumens: the slide's collagen and
    countable-tissue masks at the trait resolution (arrays or bit masks, sliced by rows), the
    width of the lining band (µm) and the collagen share that makes a lumen a vessel."""

    collagen: Any
    tissue: Any
    band_um: float
    min_share: float


def vessel_map(lumen: np.ndarray, lumen_mpp: float, trait_mpp: float, cluster_um: float,
               *, max_mpp: float = 2.0, lining: Lining | None = None) -> VesselMap | None:
    """Label the lumens of a lumen mask and measure the distance of every pixel to them.

    Masks finer than ``max_mpp`` are first reduced to about it, by the integer factor nearest
    ``max_mpp / lumen_mpp`` (any lumen pixel in a block counts), so the cost does not grow with
    the mask's resolution (a 1.02 µm/px lumen mask is reduced 2x, not kept). Two lumens are
    neighbours when the distances to them of two adjacent pixels that lie on their border of
    influence add up to at most ``cluster_um`` (their edge-to-edge distance, without a pairwise
    search). With ``lining``, lumens whose lining band holds less collagen than its
    ``min_share`` are no vessels (fat vacuoles, epithelial lumens, tears: :func:`lumen_lining`);
    they stay neighbours of the others. Returns None when there is no lumen.
    """
    factor = max(1, round(max_mpp / lumen_mpp))
    if factor > 1:
        h, w = lumen.shape
        pad = np.zeros((-(-h // factor) * factor, -(-w // factor) * factor), bool)
        pad[:h, :w] = lumen
        lumen = _block_any(pad, factor)
        lumen_mpp *= factor
    if not lumen.any():
        return None
    # OpenCV labels the lumens (8-connected, numbered in raster order as scipy's label would)
    # and gives every pixel the label of the nearest one
    dist, nearest = cv2.distanceTransformWithLabels(
        np.ascontiguousarray(~lumen).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5,
        labelType=cv2.DIST_LABEL_CCOMP)
    n = int(nearest.max())
    outlines = lumen_outlines(lumen, nearest, n, lumen_mpp)
    dist_um = np.multiply(dist, np.float32(lumen_mpp), out=dist)  # float32, in place
    neighbours = _neighbour_counts(nearest, dist_um, n, cluster_um)
    scale = trait_mpp / lumen_mpp
    if lining is None:
        return VesselMap(dist_um, nearest, scale, n, neighbours, outlines=outlines)
    share = lumen_lining(dist_um, nearest, n, lumen_mpp, scale, lining)
    lined = np.concatenate([[False], ~(share < lining.min_share)])  # (NaN: no tissue: lined)
    unlined = n - int(lined.sum())
    if unlined == 0:
        return VesselMap(dist_um, nearest, scale, n, neighbours, outlines=outlines)
    # the lined lumens' outlines first (in label order, as they are labelled again below)
    outlines = (tuple(o for o, k in zip(outlines, lined[1:], strict=True) if k)
                + tuple(o for o, k in zip(outlines, lined[1:], strict=True) if not k))
    if unlined == n:
        return VesselMap.without_vessels(unlined, outlines)
    # the lined lumens labelled again (in raster order, as before: the k-th kept label is k)
    lumen = lumen & lined[nearest]  # (not in place: the caller's mask at factor 1)
    dist, nearest = cv2.distanceTransformWithLabels(
        np.ascontiguousarray(~lumen).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5,
        labelType=cv2.DIST_LABEL_CCOMP)
    dist_um = np.multiply(dist, np.float32(lumen_mpp), out=dist)
    return VesselMap(dist_um, nearest, scale, n - unlined,
                     np.concatenate([[0], neighbours[1:][lined[1:]]]), unlined,
                     _neighbour_counts(nearest, dist_um, n - unlined, cluster_um), outlines)


def lumen_outlines(lumen: np.ndarray, labels: np.ndarray, n: int, mpp: float
                   ) -> tuple[np.ndarray, ...]:
    """The outer outline of each of ``n`` labelled lumens (label k at index k - 1): float32
    ``(m, 2)`` x, y in µm, through the centres of its border pixels (``mpp`` µm/px); the
    largest outline when a label has several parts. A lumen inside another's hole (in a
    tissue island within a vein) has its own."""
    contours, hierarchy = cv2.findContours(np.ascontiguousarray(lumen).view(np.uint8),
                                           cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    best: list[np.ndarray] = [np.zeros((0, 2), np.float32)] * n
    for c, (_, _, _, parent) in zip(contours, hierarchy[0] if len(contours) else (),
                                    strict=True):
        if parent >= 0:  # a hole's boundary (CCOMP: every part's outer boundary is on top)
            continue
        x, y = c[0, 0]
        k = int(labels[y, x]) - 1
        if 0 <= k < n and len(c) > len(best[k]):
            best[k] = ((c[:, 0, :].astype(np.float32) + 0.5) * np.float32(mpp))
    return tuple(best)


def _neighbour_counts(nearest: np.ndarray, dist_um: np.ndarray, n: int,
                      cluster_um: float) -> np.ndarray:
    """Per lumen (index 0 unused) the other lumens within ``cluster_um`` edge to edge, from the
    nearest-lumen labels and distances (:func:`vessel_map`)."""
    pairs = []
    for a, b, da, db in ((nearest[:, :-1], nearest[:, 1:], dist_um[:, :-1], dist_um[:, 1:]),
                         (nearest[:-1], nearest[1:], dist_um[:-1], dist_um[1:])):
        close = (a != b) & (da + db <= cluster_um)
        pairs.append(np.column_stack([a[close], b[close]]))
    both = np.concatenate(pairs)
    both = np.unique(np.concatenate([both, both[:, ::-1]]), axis=0)
    counts = np.bincount(both[:, 0], minlength=n + 1) if len(both) else np.zeros(n + 1, int)
    return counts.astype(np.int64)


def lumen_lining(dist_um: np.ndarray, nearest: np.ndarray, n: int, lumen_mpp: float,
                 scale: float, lining: Lining) -> np.ndarray:
    """Collagen share of the countable tissue in each lumen's lining band, (n,) float64.

    The band is the lumen grid's pixels within ``lining.band_um`` of a lumen (at least its
    8-neighbours); each takes the trait pixels whose centres fall in it (``scale``: lumen
    pixels per trait pixel), as the trait tiles assign rings (:meth:`VesselMap.ring_labels`).
    A vessel is lined by its wall, which Sirius red and Masson's trichrome stain for collagen;
    a fat vacuole, an epithelial lumen or a tear is lined by cells (share about 0:
    ``docs/decisions.md#unlined-lumens``). A lumen with no countable tissue in its band (its
    wall excluded: ``tissue.exclude_vessel_walls_above_um2``, a fold, the capsule band) has
    share NaN: nothing says it is unlined.
    """
    h, w = nearest.shape
    band = (dist_um > 0) & (dist_um <= max(lining.band_um, 1.5 * lumen_mpp))
    sums = {"collagen": np.zeros(n + 1), "tissue": np.zeros(n + 1)}
    height, width = lining.collagen.shape
    # the lumen row (column) of every trait row (column), and each lumen row's (column's)
    # first trait row (column): a lumen pixel holding no trait pixel centre sums to 0
    row_edge = np.searchsorted(
        np.minimum(((np.arange(height) + 0.5) * scale).astype(np.int64), h - 1), np.arange(h + 1))
    col_edge = np.searchsorted(
        np.minimum(((np.arange(width) + 0.5) * scale).astype(np.int64), w - 1), np.arange(w + 1))
    band_rows = np.flatnonzero(band.any(axis=1))
    chunk = max(1, int(256 * scale))  # lumen rows at a time: about 256 trait rows
    i = 0
    while i < len(band_rows):  # only the rows holding a band, a chunk at a time
        r0 = int(band_rows[i])
        r1 = min(r0 + chunk, h)
        i = int(np.searchsorted(band_rows, r1))
        t0, t1 = int(row_edge[r0]), int(row_edge[r1])
        at = band[r0:r1]
        label = nearest[r0:r1][at]
        tis = np.asarray(lining.tissue[t0:t1, 0:width], bool)
        col = np.asarray(lining.collagen[t0:t1, 0:width], bool) & tis
        for name, mask in (("collagen", col), ("tissue", tis)):
            blocks = _block_sums(mask, row_edge[r0 : r1 + 1] - t0, col_edge)
            sums[name] += np.bincount(label, weights=blocks[at], minlength=n + 1)
    coll, tiss = sums["collagen"][1:], sums["tissue"][1:]
    return np.divide(coll, tiss, out=np.full(n, np.nan), where=tiss > 0)


def _block_sums(mask: np.ndarray, row_edge: np.ndarray, col_edge: np.ndarray) -> np.ndarray:
    """Pixels set in each block of a bool mask cut at ``row_edge`` x ``col_edge`` (sorted
    edges, empty blocks allowed): (len(row_edge) - 1, len(col_edge) - 1), from OpenCV's
    summed-area table."""
    depth = cv2.CV_32S if mask.size < 2**31 else cv2.CV_64F
    sat = cv2.integral(np.ascontiguousarray(mask).view(np.uint8), sdepth=depth)
    rows = np.diff(sat[row_edge], axis=0)  # (the rows first: fewer, and contiguous)
    return rows[:, col_edge[1:]] - rows[:, col_edge[:-1]]


def _block_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """Whether each ``factor`` x ``factor`` block of a mask (shape a multiple of ``factor``)
    holds a True pixel; strided ORs, 20x faster than ``reshape(...).any(axis=(1, 3))``."""
    rows = mask[0::factor].copy()
    for i in range(1, factor):
        rows |= mask[i::factor]
    out = rows[:, 0::factor].copy()
    for j in range(1, factor):
        out |= rows[:, j::factor]
    return out


@dataclass
class _Part:
    """One tile's labelled objects and holes, kept for stitching across core borders."""

    box: tuple[int, int, int, int]  # core, trait pixels (y0, x0, y1, x1)
    obj_edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # top, bottom, left, right
    hole_edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    obj: dict[str, np.ndarray]  # per object label (index 0 = none)
    hole: dict[str, np.ndarray]  # per hole label
    obj_vessel: np.ndarray  # (k, 2) local object label, vessel label
    obj_width: np.ndarray  # (k, 3) local object label, d2 of wide free skeleton, pixels
    branches: _BranchPieces | None = None  # skan paths cut to the core


@dataclass
class TraitCounts:
    """Additive trait sums of one tile or many (``+``); :meth:`traits` gives the slide values.

    Counts are in trait pixels of ``mpp``; lengths in pixel steps (diagonal √2).
    """

    mpp: float
    collagen_px: int = 0
    tissue_px: int = 0
    skeleton_length_px: float = 0.0
    end_points: int = 0
    branch_points: int = 0
    thin_px: int = 0
    medium_px: int = 0
    thick_px: int = 0
    coherence_sum: float = 0.0
    coherence_px: int = 0
    perivascular_px: int = 0
    width_sq_hist: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    vessel_ring_px: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    vessel_ring_collagen_px: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    parts: list[_Part] = field(default_factory=list)

    def __add__(self, other: TraitCounts) -> TraitCounts:
        if not isinstance(other, TraitCounts):
            return NotImplemented
        out: dict[str, Any] = {"mpp": self.mpp}
        for name in ("collagen_px", "tissue_px", "skeleton_length_px", "end_points",
                     "branch_points", "thin_px", "medium_px", "thick_px", "coherence_sum",
                     "coherence_px", "perivascular_px"):
            out[name] = getattr(self, name) + getattr(other, name)
        for name in ("width_sq_hist", "boxes", "vessel_ring_px", "vessel_ring_collagen_px"):
            out[name] = _add_arrays(getattr(self, name), getattr(other, name))
        out["parts"] = self.parts + other.parts
        return TraitCounts(**out)

    def __radd__(self, other: object) -> TraitCounts:
        if other == 0:
            return self
        return NotImplemented

    def traits(self, params: TraitParams, vessels: VesselMap | None = None) -> dict[str, float]:
        """The slide's traits (see :data:`TRAIT_COLUMNS` for names and units)."""
        return slide_traits(self, params, vessels)


def _add_arrays(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(len(a), len(b))
    out = np.zeros(n, np.result_type(a, b))
    out[: len(a)] += a
    out[: len(b)] += b
    return out


# ------------------------------------------------------------------------------------------
# one tile
# ------------------------------------------------------------------------------------------


def measure_tile(
    collagen: np.ndarray,
    tissue: np.ndarray,
    core: tuple[int, int, int, int],
    origin: tuple[int, int],
    slide_shape: tuple[int, int],
    params: TraitParams,
    vessels: VesselMap | None = None,
) -> TraitCounts:
    """Trait sums of one tile.

    Parameters
    ----------
    collagen, tissue : ndarray of bool
        The tile with its halo (a window of the slide at ``params.mpp``); collagen within tissue.
    core : (y0, x0, y1, x1)
        The tile's own pixels, in window coordinates.
    origin : (y, x)
        Slide coordinates of the window's first pixel.
    slide_shape : (height, width)
        Of the whole slide at ``params.mpp`` (objects touching its edge are not holes).
    params : TraitParams
    vessels : VesselMap, optional
        Lumens; without them nothing is perivascular and no object bridges vessels.
    """

    collagen = collagen & tissue
    cy0, cx0, cy1, cx1 = core
    cs = (slice(cy0, cy1), slice(cx0, cx1))
    mpp = params.mpp
    tis_c = tissue[cs]
    col_c = collagen[cs]
    counts = TraitCounts(mpp, collagen_px=int(np.count_nonzero(col_c)),
                         tissue_px=int(np.count_nonzero(tis_c)))
    # the core and a 1-pixel frame: what the hole walls' 4-neighbourhood needs
    fy0, fx0 = max(cy0 - 1, 0), max(cx0 - 1, 0)
    fy1, fx1 = min(cy1 + 1, collagen.shape[0]), min(cx1 + 1, collagen.shape[1])
    frame = (slice(fy0, fy1), slice(fx0, fx1))
    col_f = np.ascontiguousarray(collagen[frame])
    pieces = None
    fibres = None
    box = _bounding_box(collagen, math.ceil(4 * params.coherence_sigma_um / mpp) + 3)
    if box is not None and col_f.any():
        # the fibre measures on the window's collagen and a margin around it, not on the
        # whole window: beyond the margin nothing depends on collagen
        by0, bx0, by1, bx1 = box
        fibres = _fibre_measures(collagen[by0:by1, bx0:bx1],
                                 (cy0 - by0, cx0 - bx0, cy1 - by0, cx1 - bx0),
                                 (origin[0] + by0, origin[1] + bx0), slide_shape, params)
    # the fibre measures of the frame (skeleton, widths, squared half-widths, neighbours):
    # views of the box's when it holds the frame, else the box's part copied into zeros
    # (allocated once the box's own are done: peak memory)
    frame_arrays: tuple[np.ndarray, ...]
    if box is not None and fibres is not None:
        by0, bx0, by1, bx1 = box
        # the box's part of the frame, in the box's and the frame's coordinates
        oy0, ox0 = max(by0, fy0), max(bx0, fx0)
        oy1, ox1 = min(by1, fy1), min(bx1, fx1)
        src = (slice(oy0 - by0, oy1 - by0), slice(ox0 - bx0, ox1 - bx0))
        if (oy0, ox0, oy1, ox1) == (fy0, fx0, fy1, fx1):
            frame_arrays = tuple(arr[src] for arr in fibres[:5])
        else:
            frame_arrays = _zeros_frame(col_f.shape)
            dst = (slice(oy0 - fy0, oy1 - fy0), slice(ox0 - fx0, ox1 - fx0))
            for out, arr in zip(frame_arrays, fibres[:5], strict=True):
                out[dst] = arr[src]
        pieces, sums = fibres[5], fibres[6]
        for name, value in sums.items():
            setattr(counts, name, value)
        del fibres
    else:
        frame_arrays = _zeros_frame(col_f.shape)
    skel, width_um, d2, n_ortho, n_diag = frame_arrays
    del frame_arrays
    inner = (slice(cy0 - fy0, cy1 - fy0), slice(cx0 - fx0, cx1 - fx0))
    w_c = width_um[inner][col_c]
    counts.thin_px = int(np.count_nonzero(w_c < params.thin_um))
    counts.thick_px = int(np.count_nonzero(w_c > params.thick_um))
    counts.medium_px = counts.collagen_px - counts.thin_px - counts.thick_px
    sk_c = skel[inner]
    # --- box counting, on the slide's box grid (boxes owned by their first pixel)
    counts.boxes = _box_counts(collagen, core, origin, params.box_sizes_px, box)
    # --- vessels: perivascular pixels, collar of each lumen
    vessel_c = np.zeros(col_c.shape, np.int32)
    peri_c = np.zeros(col_c.shape, bool)
    if vessels is not None:
        # each core pixel looks up the lumen pixel holding its centre: rows and columns of
        # lumen pixels repeated (the lumen grid is coarser)
        rings = vessels.ring_labels(params.ring_um)
        rows = np.minimum(((np.arange(cy0, cy1) + origin[0] + 0.5) * vessels.scale).astype(int),
                          rings.shape[0] - 1)
        cols = np.minimum(((np.arange(cx0, cx1) + origin[1] + 0.5) * vessels.scale).astype(int),
                          rings.shape[1] - 1)
        rings = rings[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        # np.take, unlike np.repeat, releases the GIL: the trait tiles run on several threads
        vessel_c = rings.take(rows - rows[0], axis=0).take(cols - cols[0], axis=1)
        ring = vessel_c > 0
        peri_c = col_c & ring
        counts.perivascular_px = int(np.count_nonzero(peri_c))
        counts.vessel_ring_px = np.bincount(vessel_c[ring & tis_c], minlength=vessels.n + 1)
        counts.vessel_ring_collagen_px = np.bincount(vessel_c[peri_c], minlength=vessels.n + 1)
    # --- objects and holes of the core, for stitching
    # hole walls: non-collagen pixels next to collagen, thin when that collagen is thin
    cross = _CROSS.view(np.uint8)
    border = (~col_f & cv2.dilate(col_f.view(np.uint8), cross).view(bool))[inner]
    near_w = cv2.dilate(width_um, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)[inner]
    thin_border = border & (near_w > 0) & (near_w < params.thin_um)
    del near_w
    counts.parts = [_part(col_c, tis_c, width_um[inner], sk_c, d2[inner], n_ortho[inner],
                          n_diag[inner], peri_c, vessel_c, border, thin_border,
                          (origin[0] + cy0, origin[1] + cx0), slide_shape, params, pieces,
                          band=in_band(collagen, params, core))]
    return counts


def in_band(collagen: np.ndarray, params: TraitParams,
            core: tuple[int, int, int, int]) -> np.ndarray:
    """Where collagen covers at least ``band_density`` of the square of side
    ``2 band_um`` (+ 1 px) around a pixel: a septum drawn as a band of fine fibres, whose
    own widths are under ``septum_min_width_um`` (bool, of the window's ``core`` (y0, x0, y1,
    x1), filtered on it and the square's reach around it; beyond the window counts as no
    collagen)."""
    h, w = collagen.shape
    y0, x0, y1, x1 = core
    r = round(params.band_um / params.mpp)
    wy0, wx0, wy1, wx1 = max(y0 - r, 0), max(x0 - r, 0), min(y1 + r, h), min(x1 + r, w)
    crop = np.ascontiguousarray(collagen[wy0:wy1, wx0:wx1]).view(np.uint8)
    # pixel counts (exact integers; k² ≤ 65535 for any band under 127 px) against the least
    # count that reaches the share
    k = 2 * r + 1
    counts = cv2.boxFilter(crop, cv2.CV_16U if k * k < 65536 else cv2.CV_32F, (k, k),
                           normalize=False, borderType=cv2.BORDER_CONSTANT)
    least = math.ceil(params.band_density * k * k - 1e-9)
    return counts[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] >= least


def _zeros_frame(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Empty skeleton (bool), widths (float32 µm), squared half-widths (int32) and
    neighbour counts (uint8, orthogonal and diagonal) of a frame."""
    return (np.zeros(shape, bool), np.zeros(shape, np.float32), np.zeros(shape, np.int32),
            np.zeros(shape, np.uint8), np.zeros(shape, np.uint8))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) of the mask's True pixels grown by ``margin``, within the mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (max(int(rows[0]) - margin, 0), max(int(cols[0]) - margin, 0),
            min(int(rows[-1]) + 1 + margin, h), min(int(cols[-1]) + 1 + margin, w))


def _fibre_measures(
    collagen: np.ndarray, core: tuple[int, int, int, int], origin: tuple[int, int],
    slide_shape: tuple[int, int], params: TraitParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
           _BranchPieces | None, dict[str, Any]]:
    """Skeleton, widths, branches and texture of a window's collagen, given cropped to its
    bounding box plus the structure tensor's reach (all beyond is background); ``core`` and
    ``origin`` as in :func:`measure_tile`, in the crop's coordinates.

    Returns the skeleton, the width of every collagen pixel (µm, that of its nearest skeleton
    pixel), the squared distance to the background of the skeleton pixels (int32, pixels²),
    the skeleton pixels' orthogonal and diagonal neighbour counts, the branch pieces in the
    core, and the core's sums (:class:`TraitCounts` fields).
    """
    cy0, cx0, cy1, cx1 = core
    cs = (slice(max(cy0, 0), max(cy1, 0)), slice(max(cx0, 0), max(cx1, 0)))
    mpp = params.mpp
    sums: dict[str, Any] = {}
    # exact Euclidean distance to the background (OpenCV's precise mask: Felzenszwalb's
    # algorithm, 3x faster than scipy's here); squared distances of pixel centres are integers.
    # Beyond the window is background (collagen filling a window has a finite width)
    framed = cv2.copyMakeBorder(collagen.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT,
                                value=0)
    half = cv2.distanceTransform(framed, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    skel, graphs = _skeleton(collagen, half)
    # --- widths: 2 x distance to background at skeleton pixels; every collagen pixel takes
    # the width of its nearest skeleton pixel
    width_um = np.zeros(collagen.shape, np.float32)
    d2_img = np.zeros(collagen.shape, np.int32)
    if skel.any():
        # raster order, as OpenCV numbers the skeleton pixels below (1-D, then divided: faster
        # than np.nonzero of a 2-D mask)
        yy, xx = np.divmod(np.flatnonzero(skel), skel.shape[1])
        d2 = np.rint(half[yy, xx].astype(np.float64) ** 2).astype(np.int64)
        d2_img[yy, xx] = d2
        widths = ((2.0 * np.sqrt(d2) - 0.5) * mpp).astype(np.float32)
        _, nearest = cv2.distanceTransformWithLabels(
            (~skel).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL)
        width_um[collagen] = widths[nearest[collagen] - 1]
        own = (yy >= cy0) & (yy < cy1) & (xx >= cx0) & (xx < cx1)
        sums["width_sq_hist"] = np.bincount(d2[own])
        del nearest
    del half
    # --- skeleton length, end and branch points (per owned skeleton pixel / junction cluster)
    sk8 = skel.astype(np.uint8)
    n_ortho = cv2.filter2D(sk8, -1, _ORTHO, borderType=cv2.BORDER_CONSTANT)
    n_diag = cv2.filter2D(sk8, -1, _DIAG, borderType=cv2.BORDER_CONSTANT)
    sk_c = skel[cs]
    sums["skeleton_length_px"] = float(
        (n_ortho[cs][sk_c].sum() + math.sqrt(2) * n_diag[cs][sk_c].sum()) / 2.0)
    degree = n_ortho + n_diag
    sums["end_points"] = int(np.count_nonzero(sk_c & (degree[cs] == 1)))
    junction = skel & (degree >= 3)
    nj, jl = cv2.connectedComponents(junction.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if nj > 1:  # a cluster of junction pixels is one branch point, owned by its first pixel
        at = np.flatnonzero(junction)  # the labelled pixels (a bool scan, not an int32 one)
        _, first = np.unique(jl.ravel()[at], return_index=True)
        cy, cx = np.divmod(at[first], jl.shape[1])
        sums["branch_points"] = int(np.count_nonzero(
            (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)))
    del sk8, degree, junction, jl  # (peak memory: the structure tensor below is the largest)
    # --- branches (skan): their pieces in the core, joined into whole branches per slide
    pieces = None
    if graphs and sk_c.any():
        pieces = _branch_pieces(graphs, core, origin, slide_shape[1])
    # --- orientation coherence of the collagen texture
    col_c = collagen[cs]
    if col_c.any():
        a, b, c = _structure_tensor(collagen, params.coherence_sigma_um / mpp, (cs, col_c))
        trace = a + c
        ok = trace > 1e-6
        coh = np.sqrt((a - c) ** 2 + 4 * b * b)[ok] / trace[ok]
        sums["coherence_sum"] = float(coh.sum(dtype=np.float64))
        sums["coherence_px"] = int(ok.sum())
    return skel, width_um, d2_img, n_ortho, n_diag, pieces, sums


#: A skan graph of part of a skeleton: (graph, paths to use or None for all, offset (y, x) of
#: the graph's image in the skeleton's)
_Graph = tuple[Any, "np.ndarray | None", tuple[int, int]]


def _skan_graph(skel: np.ndarray, half_px: np.ndarray) -> _Graph | None:
    """skan's paths of a skeleton, built on the skeleton's bounding box (skan pads and scans
    the whole image it is given), with the half-widths as pixel values; None without a path.

    The paths are skan's (traced by its own code, compiled once per machine:
    :func:`fibroquant.skanpaths.trace_paths`); the pixel graph it traces is
    :func:`_pixel_graph`, the one ``skan.Skeleton`` builds, without its per-pixel Python loops.
    """
    from fibroquant.skanpaths import trace_paths

    box = _bounding_box(skel, 0)
    if box is None or np.count_nonzero(skel) < 2:
        return None
    y0, x0, y1, x1 = box
    sub = np.ascontiguousarray(skel[y0:y1, x0:x1])
    adj, nodes = _pixel_graph(sub)
    yx = np.column_stack(np.unravel_index(nodes, sub.shape))
    try:
        paths = trace_paths(adj, half_px[y0:y1, x0:x1][sub].astype(np.float32))
    except ValueError:  # isolated pixels only
        return None
    return _SkanPaths(paths, yx, np.diff(adj.indptr)), None, (y0, x0)


_skan_warm = False
_skan_warm_lock = threading.Lock()
_skan_thread: threading.Thread | None = None
_skan_start_lock = threading.Lock()


def warm_skan() -> bool:
    """Load skan's path tracing (:mod:`fibroquant.skanpaths`), once per process; True when
    this call loaded it (numba's LLVM mapped its code, or compiled it on a first run: see
    ``cores.release_code_pages``).

    numba compiles it on a machine's first run (~1.5 s CPU) and loads it from its disk cache
    after (~0.15 s). The pipeline calls this outside a slide's ``seconds``, and the local
    workers' forkserver imports :mod:`fibroquant.warm_skan`, which calls it, so that the
    workers forked from it inherit the loaded code. Starts no thread. Thread-safe: a call
    made while :func:`start_warm_skan`'s thread loads it waits for it, and tries again
    (raising its error) when that failed.
    """
    global _skan_warm
    if _skan_warm:
        return False
    with _skan_warm_lock:
        if _skan_warm:
            return False
        skel = np.zeros((5, 5), bool)
        skel[2, 1:4] = skel[1:4, 2] = True  # a cross: a junction and four free ends
        _skan_graph(skel, np.ones(skel.shape, np.float32))
        _skan_warm = True
        return True


def start_warm_skan() -> threading.Thread | None:
    """Load skan's path tracing (:func:`warm_skan`) on a daemon thread of its own, once per
    process.

    For a slide measured on several threads in this process: the load (or a first run's
    compile, about half of it LLVM's, which releases the GIL) runs beside the slide's
    single-threaded calibration instead of before it. The slide's traits
    call :func:`warm_skan`, which waits for it. A failure here is logged and left to that
    call, which tries again and raises it on the slide's thread.

    Returns
    -------
    threading.Thread or None
        The thread; None when skan is loaded already or a thread is loading it.
    """
    global _skan_thread
    with _skan_start_lock:
        if _skan_warm or (_skan_thread is not None and _skan_thread.is_alive()):
            return None
        _skan_thread = threading.Thread(target=_warm_skan_quietly, name="fibroquant-skan",
                                        daemon=True)
        _skan_thread.start()
        return _skan_thread


def _warm_skan_quietly() -> None:
    try:
        warm_skan()
        # numba's LLVM is not run again by the slide: its code pages go back now, not when
        # the traits start (~50 MB through the rest of the calibration and the tiles)
        from fibroquant.cores import release_code_pages

        release_code_pages()
    except Exception:  # noqa: BLE001 - raised again by the slide's own warm_skan call
        logger.debug("loading skan in the background failed:\n%s", traceback.format_exc())


@dataclass(frozen=True)
class _SkanPaths:
    """What the traits use of a skan skeleton (the attributes of ``skan.Skeleton``)."""

    paths: Any  # scipy CSR (paths x pixels): the pixels of each path, the half-width as data
    coordinates: np.ndarray  # int64 (pixels, 2), y and x in the graph's image
    degrees: np.ndarray  # int, neighbours of each pixel in the graph

    @property
    def n_paths(self) -> int:
        return int(self.paths.shape[0])

    def path_means(self) -> np.ndarray:
        """Mean pixel value (half-width) along each path, as ``Skeleton.path_means``."""
        sums = np.add.reduceat(self.paths.data, self.paths.indptr[:-1])
        return sums / np.diff(self.paths.indptr)

    @cached_property
    def steps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:func:`_path_steps` and the coordinates of every entry (int64, (n, 2)), computed
        once: the spur test and the branch pieces both walk the first graph's paths."""
        ptr, idx = self.paths.indptr, self.paths.indices
        pid = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
        yx = self.coordinates[idx]
        step = np.zeros(len(idx))
        if len(idx) > 1:
            d = np.diff(yx, axis=0)
            step[:-1] = np.hypot(d[:, 0], d[:, 1])
            step[ptr[1:] - 1] = 0.0
        return idx, pid, step, yx


def _pixel_graph(skel: np.ndarray) -> tuple[Any, np.ndarray]:
    """The 8-connected pixel graph of a skeleton with junction clusters reduced to their
    minimum spanning tree: what ``skan.csr.skeleton_to_csgraph`` returns (the same CSR
    matrix, entry for entry: skan's ``pixel_graph`` then ``_mst_junctions``), built from a
    lookup image and masks instead of skimage's ``map_array`` and loops over the pixels, and
    with the spanning tree taken on the junction pixels' subgraph (the same edges in the same
    order: scipy's tree is the same).

    Returns the CSR adjacency (edge lengths 1 or √2) and the raveled index of every node.
    """
    from scipy import sparse
    from scipy.sparse import csgraph

    padded = np.pad(skel, 1)
    nodes_padded = np.flatnonzero(padded)
    n = len(nodes_padded)
    pw = padded.shape[1]
    # neighbours in raveled order, so each row's columns come sorted (canonical CSR)
    offsets = np.array([-pw - 1, -pw, -pw + 1, -1, 1, pw - 1, pw, pw + 1])
    steps = np.array([math.sqrt(2), 1.0, math.sqrt(2), 1.0, 1.0, math.sqrt(2), 1.0,
                      math.sqrt(2)])
    lookup = np.full(padded.size, -1, np.int32)
    lookup[nodes_padded] = np.arange(n, dtype=np.int32)
    neighbours = lookup[nodes_padded[:, None] + offsets]
    # the (node, direction) of every edge, row-major: rows sorted, columns sorted within a row
    rows, direction = np.nonzero(neighbours >= 0)
    indices = neighbours[rows, direction]
    data = steps[direction]
    degree = np.bincount(rows, minlength=n)
    # junction clusters (edges between pixels of degree >= 3) reduced to a spanning tree
    junction = degree >= 3
    among = np.flatnonzero(junction[rows] & junction[indices])
    if len(among):
        jn = np.flatnonzero(junction)
        sub = np.full(n, -1, np.int64)
        sub[jn] = np.arange(len(jn))
        r, c = sub[rows[among]], sub[indices[among]]
        sub_ptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=len(jn)))])
        tree = csgraph.minimum_spanning_tree(
            sparse.csr_matrix((data[among], c, sub_ptr), shape=(len(jn), len(jn)))).tocoo()
        t_row, t_col = tree.row.astype(np.int64), tree.col.astype(np.int64)  # keys: no overflow
        # the subgraph's entries are in raveled (row, column) order: find the tree's edges,
        # both ways, by bisection; the other edges between junction pixels go
        in_tree = np.zeros(len(among), bool)
        in_tree[np.searchsorted(r * len(jn) + c, np.concatenate(
            [t_row * len(jn) + t_col, t_col * len(jn) + t_row]))] = True
        keep = np.ones(len(indices), bool)
        keep[among[~in_tree]] = False
        indices, data, rows = indices[keep], data[keep], rows[keep]
        degree = np.bincount(rows, minlength=n)
    indptr = np.concatenate([[0], np.cumsum(degree)]).astype(np.int32)
    graph = sparse.csr_matrix((np.ascontiguousarray(data), indices, indptr), shape=(n, n))
    rr, cc = np.divmod(nodes_padded, pw)
    return graph, (rr - 1) * skel.shape[1] + (cc - 1)


def _skeleton(collagen: np.ndarray, half_px: np.ndarray) -> tuple[np.ndarray, list[_Graph]]:
    """Skeleton of the collagen with boundary spurs pruned, and skan graphs covering it.

    A spur (a branch from a junction to a free end) shorter than twice its mean half-width
    plus a pixel is a bump of the fibre's outline, not a fibre: removed (once). The skeleton's
    connected parts that had a spur get a new graph (on their own bounding box); the paths
    of the others are kept from the first graph (a part's paths depend on it alone).
    """
    from skimage.morphology import skeletonize

    skel = skeletonize(collagen)
    first_graph = _skan_graph(skel, half_px)
    if first_graph is None:
        return skel, []
    graph, _, offset = first_graph
    oyx = np.array(offset)
    first, last = _path_ends(graph)
    ends = (graph.degrees[first] == 1) ^ (graph.degrees[last] == 1)  # junction to free end
    spur = ends & (_path_lengths(graph) < 2 * graph.path_means() + 1)
    if not spur.any():
        return skel, [first_graph]
    # the skeleton's parts (8-connected, as skan links pixels) and those holding a spur
    _, part = cv2.connectedComponents(skel.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    ids = graph.paths[np.flatnonzero(spur)].indices
    rc = graph.coordinates[ids] + oyx  # (integer pixel coordinates)
    changed = np.zeros(part.max() + 1, bool)
    changed[part[rc[:, 0], rc[:, 1]]] = True
    # the spurs' pixels, junctions kept (what skan's prune_paths wipes, without its second
    # skeletonize of the whole tile)
    keep_px = graph.degrees[ids] <= 2
    skel = skel.copy()
    skel[rc[keep_px, 0], rc[keep_px, 1]] = False
    # paths of the first graph in unchanged parts
    ptr, idx = graph.paths.indptr, graph.paths.indices
    start = graph.coordinates[idx[ptr[:-1]]] + oyx
    graphs: list[_Graph] = [(graph, ~changed[part[start[:, 0], start[:, 1]]], offset)]
    second = _skan_graph(skel & changed[part], half_px)
    if second is not None:
        graphs.append(second)
    return skel, graphs


def _structure_tensor(mask: np.ndarray, sigma_px: float,
                      at: tuple[tuple[slice, slice], np.ndarray] | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Structure tensor (rr, rc, cc) of a mask: Sobel gradients, products smoothed by a
    Gaussian of ``sigma_px`` truncated at 4 sigma — what ``skimage.feature.structure_tensor``
    computes, with OpenCV's filters (8x faster on these tiles).

    With ``at = (window, pick)``, only the values at ``pick`` (bool) within ``window`` (a
    pair of slices) are returned, as 1-D arrays: the three smoothed images are never held at
    once (a trait tile's largest temporaries)."""
    img = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)  # 0/1: the same gradients
    gr = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    gc = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    k = 2 * math.ceil(4 * sigma_px) + 1

    def smooth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = cv2.GaussianBlur(x * y, (k, k), sigma_px, borderType=cv2.BORDER_REFLECT)
        return out if at is None else out[at[0]][at[1]]

    # one smoothed product at a time (with ``at``, only its picked values are kept)
    return smooth(gr, gr), smooth(gr, gc), smooth(gc, gc)


def _path_ends(graph: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pixel indices of the first and last pixel of every skan path."""
    ptr, idx = graph.paths.indptr, graph.paths.indices
    return idx[ptr[:-1]], idx[ptr[1:] - 1]


def _path_steps(graph: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries of skan's paths (pixel index, path of each entry) and the length of the step
    from each entry to the next one of its path (1 or √2; 0 after a path's last entry).

    The sums of the steps per path are skan's ``path_lengths()``, from the coordinates with
    NumPy: skan's own jit function is compiled anew in every process (0.4 s CPU).
    """
    idx, pid, step, _ = graph.steps
    return idx, pid, step


def _path_lengths(graph: Any) -> np.ndarray:
    """Length of every skan path (what ``Skeleton.path_lengths`` returns)."""
    _, pid, step = _path_steps(graph)
    return np.bincount(pid, weights=step, minlength=graph.n_paths)


@dataclass
class _BranchPieces:
    """The parts of skan's branches (paths) that lie in one tile's core, for stitching.

    A branch is cut into pieces where it crosses a core border; each crossing step is a key
    shared by the two pieces it joins (its first pixel's slide index x 4 + the step's
    direction), and each piece holds half of the step's length. The branch ends in the core
    (junctions and free ends, ``degree != 2``) are the pieces' nodes; a closed loop is joined
    at its start pixel by a negative key.
    """

    length_px: np.ndarray  # float64, per piece
    key_piece: np.ndarray  # int64, the piece of each key
    key: np.ndarray  # int64
    node_piece: np.ndarray  # int64, the piece of each node
    node_yx: np.ndarray  # int64 (n, 2), slide coordinates of each node


def _branch_pieces(graphs: list[_Graph], core: tuple[int, int, int, int],
                   origin: tuple[int, int], slide_width: int) -> _BranchPieces:
    """Cut skan's paths of a tile window to the runs of their pixels in the core."""
    parts = []
    for graph, use, offset in graphs:
        idx, pid, step, yx = graph.steps
        ptr = graph.paths.indptr
        n = len(idx)
        first = np.zeros(n, bool)
        first[ptr[:-1]] = True
        last = np.zeros(n, bool)
        last[ptr[1:] - 1] = True
        rc = yx + offset
        node = graph.degrees[idx] != 2
        if use is not None:
            sel = use[pid]
            first, last, rc, node, step = first[sel], last[sel], rc[sel], node[sel], step[sel]
        parts.append((first, last, rc, node, step))
    first, last, rc, node, step = (np.concatenate(a) for a in zip(*parts, strict=True))
    cy0, cx0, cy1, cx1 = core
    inc = (rc[:, 0] >= cy0) & (rc[:, 0] < cy1) & (rc[:, 1] >= cx0) & (rc[:, 1] < cx1)
    n = len(rc)
    prev_in = np.zeros(n, bool)
    prev_in[1:] = inc[:-1]
    prev_in &= ~first
    start = inc & ~prev_in
    run = np.cumsum(start) - 1  # run of every entry in the core
    n_runs = int(start.sum())
    next_in = np.zeros(n, bool)
    next_in[:-1] = inc[1:]
    next_in &= ~last
    # steps inside the core count whole; steps across its border half, on the inner side
    full = inc & next_in
    out_step = inc & ~last & ~next_in  # entry e in the core, e + 1 outside
    in_step = np.zeros(n, bool)  # entry e + 1 in the core, e outside
    in_step[:-1] = ~inc[:-1] & inc[1:] & ~last[:-1]
    weights = np.where(full, step, 0.0) + np.where(out_step, step / 2, 0.0)
    length = np.bincount(run[inc], weights=weights[inc], minlength=n_runs)
    e_in = np.flatnonzero(in_step)
    np.add.at(length, run[e_in + 1], step[e_in] / 2)
    # keys of the crossing steps, on the slide's pixel grid
    e_out = np.flatnonzero(out_step)
    a = np.concatenate([e_out, e_in])
    b = np.concatenate([e_out + 1, e_in + 1])
    inner = np.concatenate([e_out, e_in + 1])
    ga = rc[a] + origin
    gb = rc[b] + origin
    swap = (gb[:, 0] < ga[:, 0]) | ((gb[:, 0] == ga[:, 0]) & (gb[:, 1] < ga[:, 1]))
    lo = np.where(swap[:, None], gb, ga)
    hi = np.where(swap[:, None], ga, gb)
    d = hi - lo  # (0, 1), (1, -1), (1, 0) or (1, 1): direction code dy x (dx + 2) = 0..3
    keys = ((lo[:, 0] * slide_width + lo[:, 1]) * 4 + d[:, 0] * (d[:, 1] + 2)).astype(np.int64)
    # path ends in the core: nodes (degree != 2), or the start of a closed loop
    ends = np.flatnonzero(inc & (first | last))
    is_node = node[ends]
    loop_end = ends[~is_node]
    loop_keys = -1 - ((rc[loop_end, 0] + origin[0]) * slide_width + rc[loop_end, 1] + origin[1])
    return _BranchPieces(
        length_px=length,
        key_piece=np.concatenate([run[inner], run[loop_end]]).astype(np.int64),
        key=np.concatenate([keys, loop_keys]).astype(np.int64),
        node_piece=run[ends[is_node]].astype(np.int64),
        node_yx=(rc[ends[is_node]] + origin).astype(np.int64),
    )


def _stitch_branches(pieces: list[_BranchPieces]) -> tuple[int, float, float, float]:
    """Whole branches from the tiles' pieces: (number, Σ length, Σ chord, Σ length of the
    branches with a chord), lengths in pixel steps. A branch's chord joins its two nodes;
    a loop (no node, or both ends at one junction) has none."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    sizes = [len(p.length_px) for p in pieces]
    total = int(sum(sizes))
    if total == 0:
        return 0, 0.0, 0.0, 0.0
    offs = np.cumsum([0, *sizes])[:-1]
    length = np.concatenate([p.length_px for p in pieces])
    key = np.concatenate([p.key for p in pieces])
    kp = np.concatenate([p.key_piece + o for p, o in zip(pieces, offs, strict=True)])
    order = np.argsort(key, kind="stable")
    key, kp = key[order], kp[order]
    same = np.flatnonzero(key[1:] == key[:-1])
    graph = coo_matrix((np.ones(len(same)), (kp[same], kp[same + 1])), shape=(total, total))
    n, comp = connected_components(graph, directed=False)
    branch_len = np.bincount(comp, weights=length, minlength=n)
    node_comp = comp[np.concatenate([p.node_piece + o for p, o in zip(pieces, offs, strict=True)])]
    node_yx = np.concatenate([p.node_yx for p in pieces]).astype(np.float64)
    n_nodes = np.bincount(node_comp, minlength=n)
    chord = np.zeros(n)
    two = np.flatnonzero(n_nodes[node_comp] == 2)
    if len(two):
        order2 = np.argsort(node_comp[two], kind="stable")
        pair = node_yx[two[order2]].reshape(-1, 2, 2)
        chord[node_comp[two[order2]][::2]] = np.hypot(*(pair[:, 0] - pair[:, 1]).T)
    has = chord > 0
    return n, float(branch_len.sum()), float(chord[has].sum()), float(branch_len[has].sum())


def _box_counts(collagen: np.ndarray, core: tuple[int, int, int, int], origin: tuple[int, int],
                sizes: tuple[int, ...], bbox: tuple[int, int, int, int] | None
                ) -> np.ndarray:
    """Boxes of each size (powers of two) on the slide's box grid that hold collagen and whose
    first pixel lies in the core. One pass at the finest size, then 2 x 2 pooling: a box of
    size 2s is four boxes of size s on the same grid. ``bbox`` (window coordinates) holds all
    the collagen: boxes starting too far before it or after it are empty and not looked at."""
    out = np.zeros(len(sizes), np.int64)
    if bbox is None:
        return out
    top = max(sizes)
    cy0, cx0 = max(core[0], bbox[0] - top + 1), max(core[1], bbox[1] - top + 1)
    cy1, cx1 = min(core[2], bbox[2]), min(core[3], bbox[3])
    if cy1 <= cy0 or cx1 <= cx0:
        return out
    # a region starting on the coarsest grid line at or before the core, ending after it
    gy0 = ((origin[0] + cy0) // top) * top - origin[0]
    gx0 = ((origin[1] + cx0) // top) * top - origin[1]
    ny, nx = -(-(cy1 - gy0) // top) * top, -(-(cx1 - gx0) // top) * top
    region = np.zeros((ny, nx), bool)
    ys, xs = max(gy0, 0), max(gx0, 0)
    part = collagen[ys : gy0 + ny, xs : gx0 + nx]
    region[ys - gy0 : ys - gy0 + part.shape[0], xs - gx0 : xs - gx0 + part.shape[1]] = part
    level, size = region, 1
    for i, s in enumerate(sizes):
        while size < s:
            level = _block_any(level, 2)
            size *= 2
        # box (i, j) starts at gy0 + i*s: count those starting inside the core
        iy0, ix0 = -(-(cy0 - gy0) // s), -(-(cx0 - gx0) // s)
        iy1, ix1 = -(-(cy1 - gy0) // s), -(-(cx1 - gx0) // s)
        out[i] = int(np.count_nonzero(level[iy0:iy1, ix0:ix1]))
    return out


def _part(col: np.ndarray, tis: np.ndarray, width_um: np.ndarray, skel: np.ndarray,
          d2: np.ndarray, n_ortho: np.ndarray, n_diag: np.ndarray, peri: np.ndarray,
          vessel: np.ndarray,
          border: np.ndarray, thin_border: np.ndarray, origin: tuple[int, int],
          slide_shape: tuple[int, int], params: TraitParams,
          branches: _BranchPieces | None, *, band: np.ndarray | None = None) -> _Part:
    """Label the core's objects (8-connected) and holes (4-connected) with their sums, and
    histogram the squared half-widths (``d2``) of each object's wide skeleton outside the
    vessel rings (the septal widths, once the object is known septal). Collagen in
    ``band`` (:func:`in_band`) counts as septal-wide whatever its own width."""
    h, w = col.shape
    n_obj, obj = cv2.connectedComponents(np.ascontiguousarray(col).view(np.uint8), connectivity=8,
                                         ltype=cv2.CV_32S)
    n_hole, hole = cv2.connectedComponents(np.ascontiguousarray(~col).view(np.uint8),
                                           connectivity=4, ltype=cv2.CV_32S)
    n_obj, n_hole = n_obj - 1, n_hole - 1
    obj_sums, obj_width, pairs = _object_sums(col, obj, n_obj, width_um, skel, d2, n_ortho,
                                              n_diag, peri, vessel, params, band)
    # holes: open when they hold non-tissue or touch the slide's edge. One pass counts each
    # hole's pixels split by tissue (bin 2 x label + 1: not tissue)
    split = hole * 2
    split += ~tis  # (in place: one label-sized temporary, not two)
    by_tissue = np.bincount(split.ravel(), minlength=2 * (n_hole + 1))
    del split
    open_px = by_tissue[1::2].copy()
    for at_edge, line in ((origin[0] == 0, hole[0]), (origin[1] == 0, hole[:, 0]),
                          (origin[0] + h == slide_shape[0], hole[-1]),
                          (origin[1] + w == slide_shape[1], hole[:, -1])):
        if at_edge:
            open_px += np.bincount(line, minlength=n_hole + 1)
    hole_sums = {
        "area": by_tissue[0::2] + by_tissue[1::2],
        "open": open_px,
        "border": np.bincount(hole[border], minlength=n_hole + 1),
        "thin_border": np.bincount(hole[thin_border], minlength=n_hole + 1),
    }
    y0, x0 = origin
    return _Part((y0, x0, y0 + h, x0 + w),
                 (obj[0].copy(), obj[-1].copy(), obj[:, 0].copy(), obj[:, -1].copy()),
                 (hole[0].copy(), hole[-1].copy(), hole[:, 0].copy(), hole[:, -1].copy()),
                 obj_sums, hole_sums, pairs, obj_width, branches)


def _object_sums(col: np.ndarray, obj: np.ndarray, n_obj: int, width_um: np.ndarray,
                 skel: np.ndarray, d2: np.ndarray, n_ortho: np.ndarray, n_diag: np.ndarray,
                 peri: np.ndarray, vessel: np.ndarray, params: TraitParams,
                 band: np.ndarray | None = None,
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """:func:`_part`'s per-object sums (area, septal-wide collagen outside the rings, its
    skeleton length), the (object, d2, pixels) rows of its wide free skeleton and its
    (object, vessel) pairs. Septal-wide: a fibre at least ``septum_min_width_um`` wide, or
    collagen in ``band``; the widths rows are the wide fibres' alone (the septa's width).

    Sparse collagen (under 1/8 of the core, e.g. a whole slide's tiles) is gathered once at its
    pixels (1-D scan, 2-D indices into the frame's views); dense collagen (full-tissue fields)
    by whole-core masks, where a mask scan is cheaper than gathers by index. Same sums."""
    t = params.septum_min_width_um
    if 8 * np.count_nonzero(col) < col.size:
        at = np.divmod(np.flatnonzero(col), col.shape[1])  # raster order, as a mask gathers
        obj_at = obj[at]
        fibre = width_um[at] >= t
        wide = fibre if band is None else fibre | band[at]
        free_at = ~peri[at]
        sk_at = skel[at]
        on = sk_at & wide
        on_at = (at[0][on], at[1][on])
        step = (n_ortho[on_at] + math.sqrt(2) * n_diag[on_at]) / 2.0
        obj_wide, obj_on = obj_at[wide & free_at], obj_at[on]
        free = fibre & free_at & sk_at
        obj_free, d2_free = obj_at[free], d2[at[0][free], at[1][free]]
        ves_at = vessel[at]
        near = ves_at > 0
        obj_near, ves_near = obj_at[near], ves_at[near]
    else:
        obj_at = obj[col]
        fibre_2d = col & (width_um >= t)
        wide_2d = fibre_2d if band is None else fibre_2d | (col & band)
        on_2d = skel & wide_2d
        step = (n_ortho[on_2d] + math.sqrt(2) * n_diag[on_2d]) / 2.0
        obj_wide, obj_on = obj[wide_2d & ~peri], obj[on_2d]
        free_2d = skel & fibre_2d & ~peri
        obj_free, d2_free = obj[free_2d], d2[free_2d]
        near_2d = col & (vessel > 0)
        obj_near, ves_near = obj[near_2d], vessel[near_2d]
    sums = {
        "area": np.bincount(obj_at, minlength=n_obj + 1),
        "wide_free": np.bincount(obj_wide, minlength=n_obj + 1),
        "wide_length": np.bincount(obj_on, weights=step, minlength=n_obj + 1),
    }
    ow, ow_px = np.unique(obj_free.astype(np.int64) << 32 | d2_free.astype(np.int64),
                          return_counts=True)
    key = np.unique(obj_near.astype(np.int64) << 32 | ves_near.astype(np.int64))
    return (sums, np.column_stack([ow >> 32, ow & 0xFFFFFFFF, ow_px]),
            np.column_stack([key >> 32, key & 0xFFFFFFFF]))


# ------------------------------------------------------------------------------------------
# stitching and the slide's traits
# ------------------------------------------------------------------------------------------


def _stitch(parts: list[_Part], kind: str) -> tuple[np.ndarray, int, list[int]]:
    """Join the tiles' labels into slide-wide objects (``"obj"``, 8-connected) or holes
    (``"hole"``, 4-connected). Returns the component of every tile label (concatenated in
    part order, local label l of part i at ``offsets[i] + l - 1``), their number and the
    offsets. Hole labels on a core edge with no neighbouring tile are marked open."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    diagonal = kind == "obj"
    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += len(getattr(p, kind)["area"]) - 1
    by_start = {(p.box[0], p.box[1]): i for i, p in enumerate(parts)}
    by_end_x = {(p.box[0], p.box[3]): i for i, p in enumerate(parts)}
    by_end_y = {(p.box[2], p.box[1]): i for i, p in enumerate(parts)}
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    opened: list[np.ndarray] = []

    def link(a: np.ndarray, oa: int, b: np.ndarray, ob: int, shifts: tuple[int, ...]) -> None:
        n = len(a)
        for d in shifts:
            aa = a[max(0, -d) : n - max(0, d)]
            bb = b[max(0, d) : n - max(0, -d)]
            ok = (aa > 0) & (bb > 0)
            src.append(aa[ok] + oa - 1)
            dst.append(bb[ok] + ob - 1)

    shifts = (-1, 0, 1) if diagonal else (0,)
    for i, p in enumerate(parts):
        edges = getattr(p, f"{kind}_edges")
        y0, x0, y1, x1 = p.box
        right = by_start.get((y0, x1))
        below = by_start.get((y1, x0))
        if right is not None:
            link(edges[3], offsets[i], getattr(parts[right], f"{kind}_edges")[2], offsets[right], shifts)
        if below is not None:
            link(edges[1], offsets[i], getattr(parts[below], f"{kind}_edges")[0], offsets[below], shifts)
        if diagonal:
            d = by_start.get((y1, x1))
            if d is not None:
                link(edges[1][-1:], offsets[i], parts[d].obj_edges[0][:1], offsets[d], (0,))
            e = by_end_x.get((y1, x0))
            if e is not None:
                link(edges[1][:1], offsets[i], parts[e].obj_edges[0][-1:], offsets[e], (0,))
        else:
            left = by_end_x.get((y0, x0))
            above = by_end_y.get((y0, x0))
            for edge, nb in ((edges[3], right), (edges[1], below), (edges[2], left), (edges[0], above)):
                if nb is None:
                    lab = edge[edge > 0]
                    opened.append(lab + offsets[i] - 1)
    if total == 0:
        return np.zeros(0, np.int64), 0, offsets
    s = np.concatenate(src) if src else np.zeros(0, np.int64)
    t = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(s)), (s, t)), shape=(total, total))
    n, comp = connected_components(graph, directed=False)
    if not diagonal:
        for p in parts:  # remember edges without a neighbour as open
            p.hole.setdefault("edge_open", np.zeros(len(p.hole["area"])))
        if opened:
            flat = np.concatenate(opened)
            extra = np.zeros(total)
            extra[flat] = 1
            for i, p in enumerate(parts):
                p.hole["edge_open"] = np.concatenate(
                    [[0.0], extra[offsets[i] : offsets[i] + len(p.hole["area"]) - 1]])
    return comp, n, offsets


def _component_sums(parts: list[_Part], kind: str, comp: np.ndarray, n: int) -> dict[str, np.ndarray]:
    keys = getattr(parts[0], kind).keys() if parts else []
    out = {}
    for k in keys:
        vals = np.concatenate([getattr(p, kind)[k][1:] for p in parts]).astype(np.float64)
        out[k] = np.bincount(comp, weights=vals, minlength=n)
    return out


def classify_vessels(ring_px: np.ndarray, ring_collagen_px: np.ndarray, neighbours: np.ndarray,
                     params: TraitParams, vessel_neighbours: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Portal (1), central (-1) or undecided (0) for every lumen, with a confidence (0-1).

    A portal tract has a thick collagen collar (collagen share of the ring of ``ring_um``
    around the lumen at least ``portal_collar_share``) and clustered lumens (vein, artery,
    bile duct: another lumen within ``cluster_um``); a central vein a thin collar (below
    ``central_collar_share``) and no vessel nearby (``vessel_neighbours``, default
    ``neighbours``: an unlined lumen, a fat vacuole, does not make a central vein portal-like).
    Anything else is undecided. The confidence grows with the distance of the collar share
    from the undecided band.
    """
    alone = (neighbours if vessel_neighbours is None else vessel_neighbours) == 0
    share = np.divide(ring_collagen_px, ring_px, out=np.zeros(len(ring_px)), where=ring_px > 0)
    portal = (share >= params.portal_collar_share) & (neighbours > 0)
    central = (share < params.central_collar_share) & alone & (ring_px > 0)
    kind = np.where(portal, 1, np.where(central, -1, 0))
    conf = np.zeros(len(share))
    conf[portal] = np.clip(share[portal] / (2 * params.portal_collar_share), 0.5, 1.0)
    conf[central] = np.clip(1 - share[central] / (2 * params.central_collar_share), 0.5, 1.0)
    return kind, conf


def _quantile_from_sq_hist(hist: np.ndarray, q: float) -> float:
    cum = np.cumsum(hist)
    k = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return float(k)


def slide_traits(counts: TraitCounts, params: TraitParams, vessels: VesselMap | None = None
                 ) -> dict[str, float]:
    """Per-slide traits from the summed counts (names and units: :data:`TRAIT_COLUMNS`).

    NaN where a trait is undefined (no collagen, no skeleton, no hole, no vessel decided).
    """
    nan = float("nan")
    mpp = params.mpp
    tissue_mm2 = counts.tissue_px * mpp * mpp / 1e6
    col = counts.collagen_px
    out: dict[str, float] = dict.fromkeys(TRAIT_COLUMNS, nan)
    out["traits_mpp"] = mpp
    if tissue_mm2 <= 0:
        return out
    hist = counts.width_sq_hist
    if hist.sum() > 0:
        def width(q: float) -> float:
            return (2.0 * math.sqrt(_quantile_from_sq_hist(hist, q)) - 0.5) * mpp
        out["fibre_width_median_um"] = width(0.5)
        out["fibre_width_iqr_um"] = width(0.75) - width(0.25)
    thin_seen = thin_fibres_resolved(mpp, params.thin_um)
    if col:
        if thin_seen:  # else no fibre can read thin: the thin ones are among the medium
            out["thin_fibre_share_percent"] = 100.0 * counts.thin_px / col
            out["medium_fibre_share_percent"] = 100.0 * counts.medium_px / col
        out["thick_fibre_share_percent"] = 100.0 * counts.thick_px / col
        out["orientation_coherence"] = (counts.coherence_sum / counts.coherence_px
                                        if counts.coherence_px else nan)
    out["fibre_length_density_mm_per_mm2"] = counts.skeleton_length_px * mpp / 1000 / tissue_mm2
    out["branch_points_per_mm2"] = counts.branch_points / tissue_mm2
    out["end_points_per_mm2"] = counts.end_points / tissue_mm2
    n_branches, branch_px, chord_px, path_px = _stitch_branches(
        [p.branches for p in counts.parts if p.branches is not None])
    if n_branches:
        out["branch_length_mean_um"] = branch_px * mpp / n_branches
    if chord_px > 0:
        out["tortuosity"] = path_px / chord_px
    boxes = counts.boxes
    sizes = np.asarray(params.box_sizes_px[: len(boxes)], float)
    good = boxes > 0
    if good.sum() >= 3:
        out["fractal_dimension"] = float(-np.polyfit(np.log(sizes[good]), np.log(boxes[good]), 1)[0])
    parts = counts.parts
    px_um2 = mpp * mpp
    if parts and col:
        comp, n, _ = _stitch(parts, "obj")
        obj = _component_sums(parts, "obj", comp, n)
        big = obj["area"] * px_um2 > params.aggregate_um2
        out["aggregated_collagen_percent"] = 100.0 * obj["area"][big].sum() / col
        vcount: np.ndarray = np.zeros(n)
        if vessels is not None:
            offs = np.cumsum([0] + [len(p.obj["area"]) - 1 for p in parts])[:-1]
            pairs = [np.column_stack([comp[p.obj_vessel[:, 0] + o - 1], p.obj_vessel[:, 1]])
                     for p, o in zip(parts, offs, strict=True) if len(p.obj_vessel)]
            if pairs:
                uniq = np.unique(np.concatenate(pairs), axis=0)
                vcount = np.bincount(uniq[:, 0], minlength=n)
        wide_len_um = obj["wide_length"] * mpp
        septal = (wide_len_um >= params.septum_min_length_um) | (
            (vcount >= 2) & (wide_len_um >= 2 * params.ring_um))
        septal_px = float(obj["wide_free"][septal].sum())
        offs = np.cumsum([0] + [len(p.obj["area"]) - 1 for p in parts])[:-1]
        sw_comp = np.concatenate([comp[p.obj_width[:, 0] + o - 1]
                                  for p, o in zip(parts, offs, strict=True)])
        sw = np.concatenate([p.obj_width for p in parts])
        keep = septal[sw_comp]
        if keep.any():
            hist = np.bincount(sw[keep, 1], weights=sw[keep, 2])
            out["septal_width_median_um"] = (
                2.0 * math.sqrt(_quantile_from_sq_hist(hist, 0.5)) - 0.5) * mpp
        peri_px = float(counts.perivascular_px)
        out["perivascular_collagen_percent"] = 100.0 * peri_px / col
        out["septal_collagen_percent"] = 100.0 * septal_px / col
        out["pericellular_collagen_percent"] = 100.0 * (col - peri_px - septal_px) / col
        for name, px in (("perivascular", peri_px), ("septal", septal_px),
                         ("pericellular", col - peri_px - septal_px)):
            out[f"{name}_collagen_area_mm2"] = px * px_um2 / 1e6
    if parts:
        comp, n, _ = _stitch(parts, "hole")
        hole = _component_sums(parts, "hole", comp, n)
        closed = (hole["open"] == 0) & (hole.get("edge_open", 0) == 0)
        out["holes_per_mm2"] = float(closed.sum()) / tissue_mm2
        area_um2 = hole["area"] * px_um2
        sized = closed & (area_um2 >= params.hole_min_um2)
        if sized.any() and thin_seen:
            thin = hole["thin_border"] >= 0.5 * np.maximum(hole["border"], 1)
            wire = sized & (area_um2 <= params.hole_max_um2) & thin
            out["chicken_wire_index_percent"] = 100.0 * wire.sum() / sized.sum()
    parts3 = [out[k] for k in ARCHITECTURE_PARTS]
    if all(math.isfinite(v) for v in parts3):
        out["architecture_score"] = float(np.mean(parts3))
    if vessels is not None:
        out["unlined_lumens"] = float(vessels.unlined)
    if vessels is not None and (len(counts.vessel_ring_px) or not vessels.n):
        ring, ring_col, kind, conf = _vessel_kinds(counts, params, vessels)
        seen = ring > 0
        out["portal_vessels"] = float((kind == 1).sum())
        out["central_vessels"] = float((kind == -1).sum())
        out["undecided_vessels"] = float(((kind == 0) & seen).sum())
        if (kind != 0).any() and col:
            out["vessel_type_confidence"] = float(conf[kind != 0].mean())
            out["portal_collagen_percent"] = 100.0 * ring_col[kind == 1].sum() / col
            out["central_collagen_percent"] = 100.0 * ring_col[kind == -1].sum() / col
    return out


def _vessel_kinds(counts: TraitCounts, params: TraitParams, vessels: VesselMap
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per vessel of ``vessels``: its ring's tissue and collagen pixels, and its kind and
    confidence (:func:`classify_vessels`)."""
    ring = _add_arrays(counts.vessel_ring_px, np.zeros(vessels.n + 1, np.int64))[1:]
    ring_col = _add_arrays(counts.vessel_ring_collagen_px, np.zeros(vessels.n + 1, np.int64))[1:]
    kind, conf = classify_vessels(
        ring, ring_col, vessels.neighbours[1:], params,
        None if vessels.vessel_neighbours is None else vessels.vessel_neighbours[1:])
    return ring, ring_col, kind, conf


@dataclass(frozen=True)
class VesselCall:
    """What the traits made of one lumen, for the QC overlay.

    Attributes
    ----------
    kind : str
        ``portal``, ``central``, ``undecided`` (a vessel of neither kind) or ``unlined`` (no
        collagen lines it: not a vessel, :func:`lumen_lining`).
    confidence : float
        Of a portal or central call (0.5-1); NaN otherwise.
    outline_um : ndarray of float32
        ``(m, 2)`` x, y in µm of the slide.
    """

    kind: str
    confidence: float
    outline_um: np.ndarray = field(repr=False)


def vessel_calls(counts: TraitCounts, params: TraitParams, vessels: VesselMap | None
                 ) -> tuple[VesselCall, ...]:
    """Every lumen of ``vessels`` with its call (:class:`VesselCall`); a vessel with no tissue
    in its ring (not counted as undecided in the traits) is left out."""
    if vessels is None or not vessels.outlines:
        return ()
    calls = []
    if vessels.n:
        ring, _, kind, conf = _vessel_kinds(counts, params, vessels)
        names = {1: "portal", -1: "central", 0: "undecided"}
        for k in range(vessels.n):
            if ring[k] > 0:
                calls.append(VesselCall(names[int(kind[k])],
                                        float(conf[k]) if kind[k] else float("nan"),
                                        vessels.outlines[k]))
    calls += [VesselCall("unlined", float("nan"), o) for o in vessels.outlines[vessels.n :]]
    return tuple(c for c in calls if len(c.outline_um))


def thin_fibres_resolved(mpp: float, thin_um: float) -> bool:
    """Whether a mask at ``mpp`` µm/px can show a fibre thinner than ``thin_um``: the thinnest
    fibre it holds, one pixel wide, reads 1.5 px (twice its 1-px distance to the background,
    less the half pixel of the width formula)."""
    return 1.5 * mpp < thin_um


#: Traits left empty when the traits' resolution cannot show a thin fibre
#: (:func:`thin_fibres_resolved`).
THIN_TRAITS = ("thin_fibre_share_percent", "medium_fibre_share_percent",
               "chicken_wire_index_percent")


def resolution_warning(slides: Any, settings: Any) -> str | None:
    """One line when fibre traits of a run's ok slides were measured too coarsely to show thin
    fibres (their :data:`THIN_TRAITS` are then empty), or at several resolutions (widths and
    shares are then not comparable between the slides); None otherwise.

    Parameters
    ----------
    slides : pandas.DataFrame
        ``slides.csv``'s rows (``status``, ``traits_mpp``, ``analysis_mpp``, ``width_px``,
        ``height_px``).
    settings : config.Settings
    """
    import pandas as pd

    if "traits_mpp" not in slides.columns:
        return None
    ok = slides[slides["status"].astype(str) == "ok"]
    tmpp = pd.to_numeric(ok["traits_mpp"], errors="coerce")
    ok, tmpp = ok[tmpp.notna()], tmpp[tmpp.notna()]
    if not len(ok):
        return None
    thin_um = settings.traits.thin_um
    coarse = ok[[not thin_fibres_resolved(m, thin_um) for m in tmpp]]
    levels = sorted({round(float(m), 3) for m in tmpp})
    if not len(coarse):
        if levels[-1] <= levels[0] * (1 + MPP_SPREAD):  # one resolution, as calibrated
            return None
        return (f"fibre traits were measured at {len(levels)} resolutions "
                f"({levels[0]:g}-{levels[-1]:g} µm/px; column traits_mpp): widths and fibre "
                "shares are not comparable between those slides")
    worst = float(pd.to_numeric(coarse["traits_mpp"]).max())
    if len(coarse) == 1:
        line = f"fibre traits of {coarse['slide'].iloc[0]} were measured at {worst:g} µm/px"
    else:
        names = name_list(list(coarse["slide"]), quote=False)
        line = (f"fibre traits of {len(coarse)} slides ({names}) were measured at up to "
                f"{worst:g} µm/px")
    line += (f", where no fibre reads thinner than {1.5 * worst:g} µm: their thin- and "
             "medium-fibre shares and chicken-wire index are left empty")
    # the slides' mask was reduced for memory (tiling.mask_max_mpx): say what keeps it fine
    want = settings.traits.mpp
    amp = pd.to_numeric(coarse["analysis_mpp"], errors="coerce")
    px = (pd.to_numeric(coarse["width_px"], errors="coerce")
          * pd.to_numeric(coarse["height_px"], errors="coerce"))
    fine = amp.map(lambda m: thin_fibres_resolved(m, thin_um)).astype(bool) & px.notna()
    if thin_fibres_resolved(want, thin_um) and fine.any():
        # masks at traits.mpp, or as fine as the largest allowed (MAX_MASK_MPX) keeps them
        factor = np.maximum(np.maximum(np.floor(want / amp[fine] + 1e-9), 1),
                            np.ceil(np.sqrt(px[fine] / (MAX_MASK_MPX * 1e6))))
        need = min(math.ceil(float((px[fine] / factor**2 / 1e6).max())), MAX_MASK_MPX)
        at = float((amp[fine] * factor).max())
        if thin_fibres_resolved(at, thin_um):
            line += (f"; tiling: {{mask_max_mpx: {need}}} in a --config file keeps their "
                     f"masks at {at:g} µm/px (the traits' time grows with their pixels: "
                     f"{(worst / at) ** 2:.0f}x)")
    return line


def width_floor_warning(slides: Any, thin_um: float = 3.0) -> str | None:
    """One line when the median fibre width of measured slides is the least their trait mask
    can read (a one-pixel fibre: 1.5 x ``traits_mpp``): most of their fibres are a pixel wide
    or less there, so the median is a bound, not a measure (the real Masson hearts and
    livers at 1 µm/px: 1.5 µm, IQR 0). Names ``traits.mpp`` when the analysis is finer."""
    import pandas as pd

    need = ("traits_mpp", "fibre_width_median_um", "analysis_mpp")
    if any(c not in slides.columns for c in need):
        return None
    ok = slides[slides["status"].astype(str) == "ok"]
    tmpp, width, amp = (pd.to_numeric(ok[c], errors="coerce") for c in need)
    resolved = tmpp.map(lambda m: thin_fibres_resolved(m, thin_um)).astype(bool)
    floor = (width <= 1.5 * tmpp * (1 + 1e-6)) & resolved  # (coarser: resolution_warning's)
    if not floor.any():
        return None
    at = ok[floor]
    worst = float(tmpp[floor].max())
    line = (f"median fibre width of {len(at)} slide(s) ({name_list(list(at['slide']))}) is the "
            f"least their trait mask reads ({1.5 * worst:g} µm: one pixel at {worst:g} µm/px): "
            "most of their fibres are that thin or thinner, so it bounds their width rather "
            "than measures it")
    finest = float(amp[floor].max())
    if math.isfinite(finest) and finest <= worst / 2:
        line += (f"; traits: {{mpp: {finest:g}}} in a --config file measures them at "
                 f"{finest:g} µm/px (the traits' time grows with their pixels: "
                 f"{(worst / finest) ** 2:.0f}x)")
    return line


#: The largest ``tiling.mask_max_mpx`` a config may set (config.TilingSettings).
MAX_MASK_MPX = 1024
#: Relative spread of the slides' trait resolutions still read as one (scanners calibrated
#: apart by a percent measure alike; widths differ by that much at most).
MPP_SPREAD = 0.05


#: Per-slide trait columns of ``slides.csv``, with their meaning.
TRAIT_COLUMNS: dict[str, str] = {
    "traits_mpp": "µm/px of the mask the traits were measured on",
    "fibre_width_median_um": "median fibre width along the skeleton (2 x distance to background)",
    "fibre_width_iqr_um": "interquartile range of the fibre width along the skeleton",
    "septal_width_median_um": "median fibre width along the skeleton of the septal collagen "
                              "(the septa's width; the median of all fibres follows the thin "
                              "pericellular ones)",
    "thin_fibre_share_percent": "collagen area in thin fibres (< thin_um), % of collagen; empty "
                                "when traits_mpp cannot show a thin fibre (1.5 x traits_mpp >= "
                                "thin_um)",
    "medium_fibre_share_percent": "collagen area in medium fibres, % of collagen (empty as the "
                                  "thin share)",
    "thick_fibre_share_percent": "collagen area in thick fibres (> thick_um), % of collagen",
    "fibre_length_density_mm_per_mm2": "skeleton length per tissue area",
    "branch_points_per_mm2": "skeleton junctions per tissue area",
    "end_points_per_mm2": "skeleton end points per tissue area",
    "branch_length_mean_um": "mean skeleton branch length (skan)",
    "tortuosity": "summed branch path length / summed end-to-end distance (skan)",
    "holes_per_mm2": "holes enclosed by collagen (non-collagen components inside tissue)",
    "chicken_wire_index_percent": "holes of hole_min-hole_max µm² walled by thin fibres, % of "
                                  "holes ≥ hole_min µm² (empty as the thin share)",
    "aggregated_collagen_percent": "collagen in objects larger than aggregate_um2, % of collagen",
    "orientation_coherence": "mean structure-tensor coherence over collagen pixels (0-1)",
    "fractal_dimension": "box-counting dimension of the collagen mask",
    "perivascular_collagen_percent": "collagen within ring_um of a vessel lumen, % of collagen",
    "septal_collagen_percent": "wide collagen of bridging/long objects outside rings, % of collagen",
    "pericellular_collagen_percent": "the rest of the collagen, % of collagen",
    "perivascular_collagen_area_mm2": "perivascular collagen area: its share of the slide's "
                                      "collagen_area_mm2",
    "septal_collagen_area_mm2": "septal collagen area: its share of collagen_area_mm2",
    "pericellular_collagen_area_mm2": "pericellular collagen area: its share of "
                                      "collagen_area_mm2",
    "portal_vessels": "lumens classified portal (thick collar, clustered lumens)",
    "central_vessels": "lumens classified central (thin collar, alone)",
    "undecided_vessels": "lumens neither portal nor central",
    "unlined_lumens": "lumens no collagen lines (fat vacuoles, epithelial lumens, tears): no "
                      "vessel, left out of the rings and vessel counts",
    "vessel_type_confidence": "mean confidence of the portal/central calls (0.5-1)",
    "portal_collagen_percent": "collagen in the rings of portal lumens, % of collagen",
    "central_collagen_percent": "collagen in the rings of central lumens, % of collagen",
    "architecture_score": "mean of thick-fibre, septal and aggregated collagen shares (0-100; "
                          "docs/traits.md)",
}

#: The three shares (% of collagen) averaged into ``architecture_score``: each rises as
#: collagen gathers into thick, septal, connected structures and falls as septa thin and break.
ARCHITECTURE_PARTS = ("thick_fibre_share_percent", "septal_collagen_percent",
                      "aggregated_collagen_percent")


def measure_masks(
    collagen: Any,
    tissue: Any,
    params: TraitParams,
    *,
    tile_px: int = 1024,
    vessels: VesselMap | None = None,
    workers: int = 1,
    gate: threading.Semaphore | None = None,
) -> TraitCounts:
    """Trait sums of a whole slide's masks, read tile by tile with a halo.

    ``collagen`` and ``tissue`` may be any 2-D array-likes that can be sliced (NumPy arrays,
    memory maps, zarr arrays): only ``2 x workers`` windows of ``tile_px + 2 x halo`` pixels are
    in memory at a time. Tiles whose core holds no tissue are skipped. ``workers`` threads
    measure tiles at once (OpenCV, scikit-image and scipy release the GIL); the sums are added
    in tile order, so the result does not depend on ``workers``. Each tile holds ``gate``,
    when given, while it is measured: fewer tiles at once than threads while the semaphore
    has fewer permits (work running beside the traits takes a thread's place, and its memory).
    """
    h, w = collagen.shape
    halo = params.halo_px()
    boxes = [(y, x, min(y + tile_px, h), min(x + tile_px, w))
             for y in range(0, h, tile_px) for x in range(0, w, tile_px)]

    def one(box: tuple[int, int, int, int]) -> TraitCounts | None:
        y, x, y1, x1 = box
        if not np.asarray(tissue[y:y1, x:x1]).any():
            return None
        wy0, wx0 = max(y - halo, 0), max(x - halo, 0)
        wy1, wx1 = min(y1 + halo, h), min(x1 + halo, w)
        col = np.asarray(collagen[wy0:wy1, wx0:wx1], bool)
        tis = np.asarray(tissue[wy0:wy1, wx0:wx1], bool)
        return measure_tile(col, tis, (y - wy0, x - wx0, y1 - wy0, x1 - wx0), (wy0, wx0),
                            (h, w), params, vessels)

    total = TraitCounts(params.mpp)
    if workers <= 1 or len(boxes) < 2:
        results: Any = map(one, boxes)
        for r in results:
            total = total if r is None else total + r
        return total
    from concurrent.futures import ThreadPoolExecutor

    from fibroquant import cores

    # the tile threads use the cores: OpenCV's own pool inside each call would oversubscribe
    # them (as in the CPA tile loop); inside a local pool, the slide's share of its cores
    tile = one if not cores.in_pool() else cores.gated(one, workers)
    if gate is not None:
        tile = _holding(gate, tile)
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = [pool.submit(tile, b) for b in boxes[: 2 * workers]]
            for nxt in [*boxes[2 * workers :], None]:
                r = pending.pop(0).result()
                total = total if r is None else total + r
                if nxt is not None:
                    pending.append(pool.submit(tile, nxt))
            for fut in pending:
                r = fut.result()
                total = total if r is None else total + r
    finally:
        cv2.setNumThreads(cv_threads)
    return total


def _holding(gate: threading.Semaphore, fn: Any) -> Any:
    """``fn`` called while holding a permit of ``gate``."""
    def run(*args: Any) -> Any:
        with gate:
            return fn(*args)

    return run


def reduce_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Majority vote over ``factor``² blocks (edge blocks padded with False; a tie is False)."""
    if factor <= 1:
        return np.asarray(mask, bool)
    h, w = mask.shape
    hh, ww = -(-h // factor), -(-w // factor)
    # 0/254: a tie averages to exactly 127, any majority (≥ 1/256 above it) to ≥ 128
    src = np.asarray(mask, bool).view(np.uint8) * np.uint8(254)
    framed = cv2.copyMakeBorder(src, 0, hh * factor - h, 0, ww * factor - w, cv2.BORDER_CONSTANT,
                                value=0)
    return cv2.resize(framed, (ww, hh), interpolation=cv2.INTER_AREA) > 127


def params_for(settings: Any, mpp: float) -> TraitParams:
    """:class:`TraitParams` from ``config.TraitSettings`` at a mask resolution of ``mpp``."""
    return TraitParams(
        mpp=mpp, thin_um=settings.thin_um, thick_um=settings.thick_um, ring_um=settings.ring_um,
        septum_min_width_um=settings.septum_min_width_um,
        septum_min_length_um=settings.septum_min_length_um, aggregate_um2=settings.aggregate_um2,
    )


def measure_slide(
    collagen: Any,
    tissue: Any,
    mask_mpp: float,
    settings: Any,
    *,
    lumen: np.ndarray | None = None,
    lumen_mpp: float | None = None,
    workers: int = 1,
    gate: threading.Semaphore | None = None,
    calls: list[VesselCall] | None = None,
) -> dict[str, float]:
    """The traits of one slide from its collagen and countable-tissue masks.

    Parameters
    ----------
    collagen, tissue : ndarray of bool or BitMask
        At ``mask_mpp``; majority-reduced to ``settings.mpp`` (or kept, when already coarser).
    mask_mpp : float
    settings : config.TraitSettings
    lumen : ndarray of bool, optional
        Vessel lumens at ``lumen_mpp`` (any resolution covering the same extent).
    workers : int
        Threads over trait tiles.
    gate : threading.Semaphore, optional
        Held by each trait tile while it is measured (:func:`measure_masks`).
    calls : list, optional
        Given, the call made of each lumen is appended to it (:func:`vessel_calls`; none
        without ``lumen``), for the QC overlay.
    """
    factor = max(1, round(settings.mpp / mask_mpp))
    mpp = mask_mpp * factor
    # kept as given at factor 1 (e.g. as bits: fibroquant.bitmask), read window by window
    col = reduce_mask(collagen, factor) if factor > 1 else collagen
    tis = reduce_mask(tissue, factor) if factor > 1 else tissue
    params = params_for(settings, mpp)
    vessels = None
    if lumen is not None and lumen_mpp is not None:  # looked for: none is no vessel (0)
        vessels = vessel_map(lumen, lumen_mpp, mpp, params.cluster_um,
                             lining=Lining(col, tis, params.lining_um, params.lining_min_share)
                             ) or VesselMap.without_vessels()
        if vessels.n:
            vessels = vessels.for_ring(params.ring_um)
    counts = measure_masks(col, tis, params, tile_px=settings.tile_px,
                           vessels=vessels if vessels is not None and vessels.n else None,
                           workers=workers, gate=gate)
    if calls is not None:
        calls.extend(vessel_calls(counts, params, vessels))
    return {k: float(v) for k, v in slide_traits(counts, params, vessels).items()}


# ------------------------------------------------------------------------------------------
# tables: per mouse, long form, group comparisons
# ------------------------------------------------------------------------------------------

#: Traits shown in the report's small multiple (the issue's list and the composite score).
KEY_TRAITS = ("fibre_width_median_um", "fibre_width_iqr_um", "septal_width_median_um",
              "thin_fibre_share_percent", "thick_fibre_share_percent",
              "fibre_length_density_mm_per_mm2",
              "branch_points_per_mm2", "perivascular_collagen_percent", "septal_collagen_percent",
              "pericellular_collagen_percent", "architecture_score")

_SUMMED = ("perivascular_collagen_area_mm2", "septal_collagen_area_mm2",
           "pericellular_collagen_area_mm2", "portal_vessels", "central_vessels",
           "undecided_vessels", "unlined_lumens")


#: The collagen compartments, each a ``{name}_collagen_percent`` and ``_area_mm2`` trait.
COMPARTMENTS = ("perivascular", "septal", "pericellular")


def in_slide_areas(traits: dict[str, float], collagen_area_mm2: float) -> dict[str, float]:
    """The traits with each compartment's area its share of the slide's collagen area (the
    CPA's, at the analysis resolution), not of the trait mask's: that mask is reduced to
    ``traits.mpp``, where the finest fibres thin or vanish (0.5 -> 1 µm/px dropped 15-27 % of
    the real hearts' collagen), so its areas would not add up to ``collagen_area_mm2``."""
    out = dict(traits)
    for name in COMPARTMENTS:
        share = out.get(f"{name}_collagen_percent", math.nan)
        out[f"{name}_collagen_area_mm2"] = (share / 100.0 * collagen_area_mm2
                                            if math.isfinite(share) else math.nan)
    return out


def trait_unit(name: str) -> str:
    """Unit of a trait column, from its name."""
    for suffix, unit in (("_mm_per_mm2", "mm/mm²"), ("_per_mm2", "1/mm²"), ("_area_mm2", "mm²"),
                         ("_percent", "%"), ("_um", "µm"), ("_mpp", "µm/px")):
        if name.endswith(suffix):
            return unit
    return "1"


def trait_weight(name: str) -> str | None:
    """How a trait is pooled over a mouse's slides: the column weighting the slides' values
    (``tissue_area_mm2`` for densities per tissue area, ``collagen_area_mm2`` for properties of
    the collagen), or None for counts and areas, which are summed."""
    if name in _SUMMED:
        return None
    if name.endswith("_per_mm2"):
        return "tissue_area_mm2"
    return "collagen_area_mm2"


def mouse_traits(slides: Any) -> Any:
    """One row per mouse with every trait column of ``slides`` pooled over its slides.

    Densities are weighted by tissue area, collagen properties by collagen area (so a mouse's
    value is what one section holding all its tissue would give, as CPA is computed from sums),
    areas and vessel counts summed. Slides without a value (NaN) are left out of the mouse's
    value. ``slides`` holds only the slides to use (``status == "ok"``).
    """
    import pandas as pd

    cols = [c for c in TRAIT_COLUMNS if c in slides.columns and c != "traits_mpp"]
    rows = []
    for mouse, block in slides.groupby(slides["mouse"].astype(str), sort=False):
        row: dict[str, Any] = {"mouse": str(mouse)}
        for c in cols:
            v = pd.to_numeric(block[c], errors="coerce").to_numpy(float)
            weight = trait_weight(c)
            if weight is None:
                row[c] = float(np.nansum(v)) if np.isfinite(v).any() else float("nan")
                continue
            w = pd.to_numeric(block[weight], errors="coerce").to_numpy(float)
            ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
            row[c] = float(np.average(v[ok], weights=w[ok])) if ok.any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=["mouse", *cols])


def traits_long(slides: Any) -> Any:
    """``traits.csv``: one row per ok slide and trait (``slide, mouse, group, trait, value,
    unit``), in the slides' order and :data:`TRAIT_COLUMNS` order."""
    import pandas as pd

    cols = [c for c in TRAIT_COLUMNS if c in slides.columns]
    ok = slides["status"].astype(str).str.lower().eq("ok") if "status" in slides else True
    keep = slides.loc[ok] if cols else slides.iloc[:0]
    ids = [c for c in ("slide", "mouse", "group") if c in keep.columns]
    if not cols:
        return pd.DataFrame(columns=["slide", "mouse", "group", "trait", "value", "unit"])
    long = keep[ids + cols].melt(id_vars=ids, var_name="trait", value_name="value")
    order = {c: i for i, c in enumerate(cols)}
    long["_t"] = long["trait"].map(order)
    long["_r"] = np.tile(np.arange(len(keep)), len(cols))
    long = long.sort_values(["_r", "_t"]).drop(columns=["_r", "_t"]).reset_index(drop=True)
    long["unit"] = long["trait"].map(trait_unit)
    return long


#: Columns of ``trait_groups.csv`` (:func:`compare_traits`).
TRAIT_GROUP_COLUMNS = ("trait", "unit", "group", "is_control", "n_mice", "mean", "sd",
                       "diff_vs_control", "diff_ci_low", "diff_ci_high", "welch_p",
                       "mannwhitney_p", "hedges_g", "hedges_g_ci_low", "hedges_g_ci_high",
                       "holm_welch_p")


def compare_traits(mice: Any, *, control: str | None = None, n_boot: int = 2000,
                   rng: int = 0) -> Any:
    """Every trait of ``mice`` compared between groups as CPA is (:func:`stats.compare_groups`:
    Welch, Mann-Whitney, Hedges' g with CIs, one value per mouse), in long form, with Welch
    p-values Holm-adjusted over the traits within each group (``holm_welch_p``)."""
    import pandas as pd
    from statsmodels.stats.multitest import multipletests

    from fibroquant import stats

    frames = []
    for trait in (c for c in TRAIT_COLUMNS if c in mice.columns and c != "traits_mpp"):
        values = pd.to_numeric(mice[trait], errors="coerce")
        if values.notna().sum() == 0:
            continue
        table = stats.compare_groups(mice.assign(**{trait: values}), value=trait,
                                     control=control, n_boot=n_boot, rng=rng)
        frames.append(pd.DataFrame({
            "trait": trait, "unit": trait_unit(trait), "group": table["group"],
            "is_control": table["is_control"], "n_mice": table["n_mice"],
            "mean": table["cpa_mean_percent"], "sd": table["cpa_sd"],
            "diff_vs_control": table["diff_vs_control_pp"],
            "diff_ci_low": table["diff_ci_low_pp"], "diff_ci_high": table["diff_ci_high_pp"],
            "welch_p": table["welch_p"], "mannwhitney_p": table["mannwhitney_p"],
            "hedges_g": table["hedges_g"], "hedges_g_ci_low": table["hedges_g_ci_low"],
            "hedges_g_ci_high": table["hedges_g_ci_high"],
        }))
    if not frames:
        return pd.DataFrame(columns=list(TRAIT_GROUP_COLUMNS))
    out = pd.concat(frames, ignore_index=True)
    out["holm_welch_p"] = np.nan
    for idx in out.groupby("group", sort=False).groups.values():
        p = out.loc[idx, "welch_p"]
        good = p.notna()
        if good.any():
            out.loc[p[good].index, "holm_welch_p"] = multipletests(p[good], method="holm")[1]
    return out[list(TRAIT_GROUP_COLUMNS)]
