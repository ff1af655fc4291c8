"""Collagen masks of known fibre architecture, to test :mod:`fibroquant.traits` against truth.

Fibres are drawn from centre lines whose length is known exactly, dilated to a known width
(pixels within ``width / 2`` of the line), so the drawn widths, lengths, branch points, hole
sizes and compartment areas are the truth the traits must recover. :func:`render` turns a mask
into a Sirius-red-like RGB image (Beer-Lambert) for end-to-end runs of the pipeline.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from fibroquant.stains import SIRIUS_RED


@dataclass
class FibreTruth:
    """A drawn collagen mask and what was drawn (lengths in µm, areas in µm²).

    Attributes
    ----------
    collagen, tissue : ndarray of bool
    mpp : float
    length_um : float
        Total centre-line length drawn.
    width_px_class : ndarray of float32
        Drawn width (µm) of the fibre each collagen pixel belongs to (0 elsewhere).
    lumen : ndarray of bool
        Vessel lumens (not tissue).
    septal : ndarray of bool
        Collagen pixels of septa (bridges between vessels).
    extra : dict
        Generator-specific truth (branch points, hole area, ...).
    """

    collagen: np.ndarray
    tissue: np.ndarray
    mpp: float
    length_um: float
    width_px_class: np.ndarray
    lumen: np.ndarray = field(repr=False)
    septal: np.ndarray = field(repr=False)
    extra: dict = field(default_factory=dict)

    @property
    def tissue_mm2(self) -> float:
        return float(self.tissue.sum()) * self.mpp ** 2 / 1e6

    @property
    def cpa_percent(self) -> float:
        return 100.0 * float(self.collagen.sum()) / float(self.tissue.sum())

    def length_density_mm_per_mm2(self) -> float:
        return self.length_um / 1000 / self.tissue_mm2

    def share_percent(self, lo_um: float, hi_um: float) -> float:
        """Collagen area drawn with widths in [lo, hi), % of collagen."""
        w = self.width_px_class[self.collagen]
        return 100.0 * float(((w >= lo_um) & (w < hi_um)).sum()) / len(w)


class _Canvas:
    """Centre lines drawn into per-width layers; widths resolved by distance transform."""

    def __init__(self, shape: tuple[int, int], mpp: float) -> None:
        self.shape = shape
        self.mpp = mpp
        self.lines: dict[float, np.ndarray] = {}
        self.length_um = 0.0

    def line(self, p0: tuple[float, float], p1: tuple[float, float], width_um: float) -> None:
        """A straight centre line between two points (µm), clipped to the image."""
        layer = self.lines.setdefault(width_um, np.zeros(self.shape, bool))
        (y0, x0), (y1, x1) = p0, p1
        n = math.ceil(math.hypot(y1 - y0, x1 - x0) / self.mpp * 2) + 1
        ys = np.rint(np.linspace(y0, y1, n) / self.mpp).astype(int)
        xs = np.rint(np.linspace(x0, x1, n) / self.mpp).astype(int)
        ok = (ys >= 0) & (ys < self.shape[0]) & (xs >= 0) & (xs < self.shape[1])
        layer[ys[ok], xs[ok]] = True
        self.length_um += math.hypot(y1 - y0, x1 - x0) * ok.mean()

    def polyline(self, pts: np.ndarray, width_um: float) -> None:
        for a, b in itertools.pairwise(pts):
            self.line(tuple(a), tuple(b), width_um)

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(collagen, drawn width of each collagen pixel in µm)."""
        collagen = np.zeros(self.shape, bool)
        width = np.zeros(self.shape, np.float32)
        best = np.full(self.shape, np.inf, np.float32)
        for w_um, layer in sorted(self.lines.items()):
            d = ndi.distance_transform_edt(~layer) * self.mpp
            # pixel centres within w/2 of a digital line cover ~0.6 px more than w: trimmed
            inside = d <= w_um / 2.0 - 0.3 * self.mpp
            closer = inside & (d < best)
            width[closer] = w_um
            best[closer] = d[closer]
            collagen |= inside
        return collagen, width


def _walk(rng: np.random.Generator, start: np.ndarray, length_um: float, step_um: float,
          bend_deg: float, heading: float | None = None) -> np.ndarray:
    n = max(int(length_um / step_um), 1)
    a = rng.uniform(0, 2 * np.pi) if heading is None else heading
    turns = np.cumsum(rng.normal(0, np.deg2rad(bend_deg), n)) + a
    steps = np.column_stack([np.sin(turns), np.cos(turns)]) * step_um
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def fibre_field(
    shape: tuple[int, int] = (1024, 1024),
    mpp: float = 0.5,
    widths_um: tuple[float, ...] = (2.0, 6.0, 14.0),
    n_per_width: tuple[int, ...] = (40, 12, 4),
    length_um: float = 120.0,
    bend_deg: float = 6.0,
    branches: int = 0,
    rng: int | np.random.Generator | None = None,
) -> FibreTruth:
    """Separate, gently curved fibres of known widths and lengths in tissue filling the frame.

    ``branches`` side branches (half the parent's length, same width) start from random points
    of the fibres, each adding one branch point (a T junction).
    """
    g = np.random.default_rng(rng)
    canvas = _Canvas(shape, mpp)
    extent = np.array(shape, float) * mpp
    n_branch = 0
    for w, n in zip(widths_um, n_per_width, strict=True):
        for _ in range(n):
            margin = length_um * 0.1 + w
            start = g.uniform(margin, extent - margin)
            pts = _walk(g, start, length_um, 4.0, bend_deg)
            pts = np.clip(pts, w, extent - w)
            canvas.polyline(pts, w)
            if n_branch < branches:
                i = int(g.integers(len(pts) // 4, 3 * len(pts) // 4))
                d = pts[i + 1] - pts[i]
                heading = math.atan2(d[0], d[1]) + g.choice([-1, 1]) * np.pi / 2
                side = _walk(g, pts[i], length_um / 2, 4.0, bend_deg, heading)
                side = np.clip(side, w, extent - w)
                canvas.polyline(side, w)
                n_branch += 1
    collagen, width = canvas.masks()
    tissue = np.ones(shape, bool)
    empty = np.zeros(shape, bool)
    return FibreTruth(collagen, tissue, mpp, canvas.length_um, width, empty, empty,
                      {"branch_points": n_branch, "fibres": int(sum(n_per_width))})


def pericellular_network(
    shape: tuple[int, int] = (1024, 1024),
    mpp: float = 0.5,
    cell_um: float = 20.0,
    wall_um: float = 1.5,
    jitter: float = 0.25,
    rng: int | np.random.Generator | None = None,
) -> FibreTruth:
    """Chicken-wire: thin walls around jittered square cells of ``cell_um`` (holes ≈ cell²)."""
    g = np.random.default_rng(rng)
    extent = np.array(shape, float) * mpp
    canvas = _Canvas(shape, mpp)
    ny, nx = int(extent[0] // cell_um) + 1, int(extent[1] // cell_um) + 1
    grid = np.stack(np.meshgrid(np.arange(ny + 1), np.arange(nx + 1), indexing="ij"), -1)
    pts = grid * cell_um + g.uniform(-jitter, jitter, grid.shape) * cell_um
    for i in range(ny + 1):
        canvas.polyline(pts[i, :, :], wall_um)
    for j in range(nx + 1):
        canvas.polyline(pts[:, j, :], wall_um)
    collagen, width = canvas.masks()
    tissue = np.ones(shape, bool)
    holes, _ = ndi.label(~collagen)
    inner = np.setdiff1d(np.unique(holes), np.unique(np.concatenate(
        [holes[0], holes[-1], holes[:, 0], holes[:, -1]])))
    areas = ndi.sum_labels(np.ones(shape), holes, inner) * mpp * mpp
    empty = np.zeros(shape, bool)
    # the walls cross at every grid node: lines overlap there, count that length once
    return FibreTruth(collagen, tissue, mpp, canvas.length_um, width, empty, empty,
                      {"holes": len(inner), "hole_area_median_um2": float(np.median(areas))})


def vessels_and_septa(
    shape: tuple[int, int] = (1536, 1536),
    mpp: float = 1.0,
    n_vessels: int = 6,
    lumen_um: float = 40.0,
    collar_um: float = 10.0,
    septum_um: float = 12.0,
    fine_um: float = 2.0,
    n_fine: int = 60,
    bridges: int = 4,
    extra_septa_um: float = 0.0,
    rng: int | np.random.Generator | None = None,
) -> FibreTruth:
    """Vessel lumens with a collagen collar, septa bridging pairs of them, fine fibres between.

    Septa run between the vessels' centres (truth: ``septal`` pixels outside every collar ring),
    fine fibres are short random walks. ``extra_septa_um`` adds that length of septa that cross
    the field without touching a vessel (to balance CPA in a cohort); they are drawn last, so
    the vessels and fine fibres of a seed do not depend on it.
    """
    g = np.random.default_rng(rng)
    extent = np.array(shape, float) * mpp
    canvas = _Canvas(shape, mpp)
    # vessels on a jittered ring, far from the edges and from each other
    centre = extent / 2
    radius = 0.32 * extent.min()
    ang = np.linspace(0, 2 * np.pi, n_vessels, endpoint=False) + g.uniform(0, 0.3)
    vc = centre + radius * np.column_stack([np.sin(ang), np.cos(ang)])
    order = list(range(n_vessels))
    pairs = [(order[i], order[(i + 1) % n_vessels]) for i in range(min(bridges, n_vessels))]
    for a, b in pairs:
        canvas.line(tuple(vc[a]), tuple(vc[b]), septum_um)
    septa_length = canvas.length_um
    for _ in range(n_fine):
        start = g.uniform(0.05 * extent, 0.95 * extent)
        canvas.polyline(np.clip(_walk(g, start, 60.0, 4.0, 8.0), 2, extent - 2), fine_um)
    if extra_septa_um > 0:
        before = canvas.length_um
        left = extra_septa_um
        while left > 0:
            y = g.uniform(0.08, 0.92) * extent[0]
            ln = min(left, 0.8 * extent[1])
            x0 = g.uniform(0.05 * extent[1], extent[1] - ln - 0.05 * extent[1])
            canvas.line((y, x0), (y, x0 + ln), septum_um)
            left -= ln
        septa_length += canvas.length_um - before
    collagen, width = canvas.masks()
    yy, xx = np.mgrid[: shape[0], : shape[1]] * mpp
    lumen = np.zeros(shape, bool)
    collar = np.zeros(shape, bool)
    for y, x in vc:
        r = np.hypot(yy - y, xx - x)
        lumen |= r <= lumen_um / 2
        collar |= r <= lumen_um / 2 + collar_um
    septal = collagen & (width == septum_um)
    collagen = (collagen | collar) & ~lumen
    width[collar & ~lumen] = np.maximum(width[collar & ~lumen], collar_um)
    tissue = ~lumen
    return FibreTruth(collagen, tissue, mpp, canvas.length_um, width, lumen, septal,
                      {"vessel_centres_um": vc, "septa_length_um": septa_length,
                       "bridges": len(pairs), "septum_um": septum_um})


def render(truth: FibreTruth, *, rng: int | None = 0, collagen_od: float = 0.8,
           counter_od: float = 0.25, background: tuple[float, float, float] = (245, 243, 240)
           ) -> np.ndarray:
    """A Sirius-red-like uint8 RGB image of a mask (Beer-Lambert, mild noise); lumens are glass."""
    g = np.random.default_rng(rng)
    vec = SIRIUS_RED.vectors
    conc_c = truth.collagen.astype(np.float32) * collagen_od
    conc_k = (truth.tissue & ~truth.collagen).astype(np.float32) * counter_od
    od = conc_c[..., None] * vec[0] + conc_k[..., None] * vec[1]
    rgb = np.asarray(background, np.float32) * 10.0 ** (-od)
    rgb += g.normal(0, 1.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def regression_cohort(
    n_mice: int = 5,
    *,
    shape: tuple[int, int] = (1024, 1024),
    mpp: float = 1.0,
    septum_um: float = 12.0,
    thinning: float = 0.4,
    width_jitter: float = 0.1,
    rng: int | None = 0,
) -> list[tuple[str, str, FibreTruth]]:
    """Two groups of mice whose septa differ in width only: ``control`` septa of ``septum_um``,
    ``regression`` septa ``thinning`` (40 %) thinner, at equal CPA.

    Mouse ``i`` of each group shares its vessels, fine fibres (their number varies between
    mice, and so does CPA) and untreated septum width (``septum_um`` times a uniform factor
    within ``± width_jitter``): the regression mouse is the control mouse after treatment.
    Its thinner septa are completed by septa that cross the field without bridging vessels,
    as long as needed for the untreated collagen area (to ±0.5 % of it), so CPA is equal
    mouse for mouse. Returns ``(mouse, group, truth)`` per mouse, controls first.
    """
    g = np.random.default_rng(rng)
    control, regression = [], []
    for i in range(n_mice):
        seed = int(g.integers(2**31))
        n_fine = int(g.integers(30, 90))  # mice differ in their fine fibres (and CPA)
        own_um = septum_um * float(g.uniform(1 - width_jitter, 1 + width_jitter))
        untreated = vessels_and_septa(shape, mpp, septum_um=own_um, n_fine=n_fine, rng=seed)
        control.append((f"c{i + 1}", "control", untreated))
        width = own_um * (1.0 - thinning)
        target = int(untreated.collagen.sum())
        # first guess: the area the septa lost, at the new width; then corrected by the area
        # still missing (an extra septum adds about its width per µm)
        extra = untreated.extra["septa_length_um"] * (own_um - width) / width
        for _ in range(4):
            treated = vessels_and_septa(shape, mpp, septum_um=width, n_fine=n_fine,
                                        extra_septa_um=extra, rng=seed)
            missing = target - int(treated.collagen.sum())
            if abs(missing) <= 0.005 * target:
                break
            extra = max(0.0, extra + missing * mpp * mpp / width)
        regression.append((f"r{i + 1}", "regression", treated))
    return control + regression
