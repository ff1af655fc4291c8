"""Fibre traits against drawn truth (fibroquant.synthetic_fibres), tiling and the pipeline."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats as sps
from skimage.measure import euler_number, label, regionprops

from fibroquant import synthetic_fibres as sf
from fibroquant import traits as tr
from fibroquant.config import Settings, TraitSettings

#: float sums in another order (length along the skeleton, branch lengths and chords,
#: coherence): equal to ~1e-10 whatever the tiling; every other trait to the last digit
ROUNDED = ("fibre_length_density_mm_per_mm2", "branch_length_mean_um", "tortuosity",
           "orientation_coherence")


def _traits(truth: sf.FibreTruth, tile_px: int = 4096, **kw) -> dict[str, float]:
    params = tr.TraitParams(mpp=truth.mpp, **kw)
    vessels = None
    if truth.lumen.any():
        vessels = tr.vessel_map(truth.lumen, truth.mpp, truth.mpp, params.cluster_um)
    counts = tr.measure_masks(truth.collagen, truth.tissue, params, tile_px=tile_px,
                              vessels=vessels)
    return counts.traits(params, vessels)


@pytest.mark.slow
@pytest.mark.parametrize(("width_um", "seed"), [(2.0, 5), (5.0, 6), (8.0, 7), (16.0, 8)])
def test_width_and_length_density_match_drawn_fibres(width_um, seed):
    truth = sf.fibre_field(widths_um=(width_um,), n_per_width=(int(240 / width_um) + 4,),
                           length_um=100.0, rng=seed)
    got = _traits(truth)
    assert got["fibre_width_median_um"] == pytest.approx(width_um, rel=0.15)
    assert got["fibre_length_density_mm_per_mm2"] == pytest.approx(
        truth.length_density_mm_per_mm2(), rel=0.15)


@pytest.mark.slow
def test_thin_medium_thick_shares_match_drawn_areas():
    truth = sf.fibre_field(widths_um=(1.5, 6.0, 13.0), n_per_width=(50, 10, 5), rng=21)
    got = _traits(truth)
    assert got["thin_fibre_share_percent"] == pytest.approx(truth.share_percent(0, 3), abs=5)
    assert got["medium_fibre_share_percent"] == pytest.approx(truth.share_percent(3, 10), abs=5)
    assert got["thick_fibre_share_percent"] == pytest.approx(truth.share_percent(10, 1e9), abs=5)


def test_side_branches_add_branch_points():
    plain = sf.fibre_field(widths_um=(3.0,), n_per_width=(12,), bend_deg=2, rng=3)
    branched = sf.fibre_field(widths_um=(3.0,), n_per_width=(12,), bend_deg=2, branches=12, rng=3)
    added = (_traits(branched)["branch_points_per_mm2"] - _traits(plain)["branch_points_per_mm2"])
    drawn = 12 / branched.tissue_mm2
    assert added == pytest.approx(drawn, rel=0.35)


def test_holes_equal_objects_minus_euler_number_and_chicken_wire():
    truth = sf.pericellular_network(cell_um=20.0, wall_um=1.5, rng=4)
    got = _traits(truth)
    # closed holes = objects - Euler number (8-connected collagen), minus the holes that touch
    # the frame (open: they are not enclosed here) — none in this drawing's interior count
    n_obj = label(truth.collagen, connectivity=2).max()
    holes_all = n_obj - euler_number(truth.collagen, connectivity=2)
    assert got["holes_per_mm2"] * truth.tissue_mm2 == pytest.approx(truth.extra["holes"])
    assert truth.extra["holes"] <= holes_all
    # every drawn cell (~400 µm²) is a thin-walled hepatocyte-sized hole
    assert 100 < truth.extra["hole_area_median_um2"] < 1000
    assert got["chicken_wire_index_percent"] > 90
    assert got["thin_fibre_share_percent"] > 90


def test_big_cells_are_not_chicken_wire():
    truth = sf.pericellular_network(cell_um=45.0, wall_um=1.5, rng=4)
    assert _traits(truth)["chicken_wire_index_percent"] < 10


@pytest.mark.slow
def test_aggregation_equals_whole_image_labelling():
    truth = sf.fibre_field(widths_um=(2.0, 8.0), n_per_width=(30, 10), rng=9)
    got = _traits(truth, tile_px=200)
    areas = np.array([r.area for r in regionprops(label(truth.collagen, connectivity=2))])
    big = areas * truth.mpp**2 > 5000
    assert got["aggregated_collagen_percent"] == pytest.approx(
        100 * areas[big].sum() / truth.collagen.sum(), abs=1e-9)


_TILE_CASES = {
    "septa": lambda: sf.vessels_and_septa((900, 900), 1.0, n_fine=80, rng=12),
    # fibres (300 µm) and side branches far longer than the halo (44 px), crossing many tiles
    "long fibres": lambda: sf.fibre_field((1024, 1024), 0.5, widths_um=(2.0, 6.0, 9.0),
                                          n_per_width=(30, 12, 6), length_um=300.0,
                                          branches=20, rng=3),
    "network": lambda: sf.pericellular_network((600, 600), cell_um=20.0, wall_um=1.5, rng=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_TILE_CASES))
def test_traits_do_not_depend_on_the_tile_size(case):
    truth = _TILE_CASES[case]()
    whole = _traits(truth)
    assert whole["branch_length_mean_um"] > 0 and whole["tortuosity"] > 1
    for tile_px in (150, 256, 333):
        tiled = _traits(truth, tile_px=tile_px)
        for k, v in whole.items():
            if k in ROUNDED:
                assert tiled[k] == pytest.approx(v, rel=1e-10), (tile_px, k)
            else:
                assert tiled[k] == v or (math.isnan(tiled[k]) and math.isnan(v)), (tile_px, k)


def test_a_ring_across_tiles_is_one_closed_branch():
    # a closed fibre (r = 100 px, 3 px wide) cut by 64-px tiles into pieces in 12 tiles: one
    # branch of its whole length (8-connected steps overestimate a circle by ~5 %), no chord
    yy, xx = np.mgrid[:256, :256]
    collagen = np.abs(np.hypot(yy - 127.5, xx - 127.5) - 100) <= 1.5
    params = tr.TraitParams(mpp=1.0)
    whole, tiled = (tr.measure_masks(collagen, np.ones_like(collagen), params, tile_px=t
                                     ).traits(params) for t in (4096, 64))
    assert tiled["branch_length_mean_um"] == pytest.approx(2 * np.pi * 100, rel=0.06)
    assert tiled["branch_length_mean_um"] == pytest.approx(whole["branch_length_mean_um"],
                                                           rel=1e-12)
    assert math.isnan(tiled["tortuosity"]) and math.isnan(whole["tortuosity"])


def test_compartments_match_drawn_septa_and_collars():
    truth = sf.vessels_and_septa((1200, 1200), 1.0, n_fine=70, rng=14)
    got = _traits(truth)
    ring = ndi.distance_transform_edt(~truth.lumen) * truth.mpp <= 50
    col = truth.collagen.sum()
    # the lumens are looked up at 2 µm/px (vessel_map): the ring's edge moves by ≤ 2 µm
    assert got["perivascular_collagen_percent"] == pytest.approx(
        100 * (truth.collagen & ring).sum() / col, abs=1.5)
    assert got["septal_collagen_percent"] == pytest.approx(
        100 * (truth.septal & ~ring).sum() / col, abs=5)
    assert got["pericellular_collagen_percent"] == pytest.approx(
        100 - got["perivascular_collagen_percent"] - got["septal_collagen_percent"])


def test_no_bridges_no_septa():
    truth = sf.vessels_and_septa((900, 900), 1.0, bridges=0, rng=15)
    assert _traits(truth)["septal_collagen_percent"] == pytest.approx(0.0, abs=1.0)


def test_portal_and_central_vessels_are_told_apart():
    # two clustered lumens with thick collars (portal) and two solitary thin-collared ones
    shape, mpp = (800, 800), 1.0
    yy, xx = np.mgrid[: shape[0], : shape[1]] * mpp
    lumen = np.zeros(shape, bool)
    collagen = np.zeros(shape, bool)
    for (y, x), collar in (((200, 200), 30), ((200, 290), 30), ((600, 600), 3), ((600, 200), 3)):
        r = np.hypot(yy - y, xx - x)
        lumen |= r <= 15
        collagen |= (r > 15) & (r <= 15 + collar)
    truth = sf.FibreTruth(collagen & ~lumen, ~lumen, mpp, 0.0, np.zeros(shape, np.float32),
                          lumen, np.zeros(shape, bool))
    got = _traits(truth)
    assert (got["portal_vessels"], got["central_vessels"]) == (2.0, 2.0)
    assert 0.5 <= got["vessel_type_confidence"] <= 1.0


def test_a_septum_of_fine_fibres_is_septal_and_a_pericellular_net_is_not():
    """A bridging septum is often a band of fibres each finer than ``septum_min_width_um``
    (the real PSR field tile02_PSR: by fibre width alone half of each septum read as
    pericellular). Collagen covering half of its 11-µm neighbourhood is septal-wide; a
    chicken-wire net of 1.5-µm walls around 20-µm cells covers a sixth of it and stays
    pericellular."""
    shape, mpp = (800, 800), 1.0
    collagen = np.zeros(shape, bool)
    for y in range(300, 360, 3):  # 20 fibres 2 µm wide, 1 µm apart, 600 µm long
        collagen[y : y + 2, 100:700] = True
    net = np.zeros(shape, bool)
    net[450:800:20, :] = net[451:800:20, :] = True
    net[450:800, ::20] = net[450:800, 1::20] = True
    collagen |= net
    tissue = np.ones(shape, bool)
    band_share = 100.0 * collagen[:400].sum() / collagen.sum()
    for density in (0.5, 2.0):  # 2.0: by fibre width alone
        params = tr.TraitParams(mpp=mpp, band_density=density)
        got = tr.measure_masks(collagen, tissue, params, tile_px=256).traits(params)
        septal = got["septal_collagen_percent"]
        if density < 1:  # the band's outer fibres and its ends see less collagen around
            assert 0.85 * band_share <= septal <= band_share, septal
        else:
            assert septal == 0.0
        assert got["pericellular_collagen_percent"] == pytest.approx(100 - septal)
        assert math.isnan(got["septal_width_median_um"])  # no fibre is 4 µm wide


def _vessels_and_vacuoles(vacuoles: bool, duct: bool = False):
    """Two clustered thick-collared lumens (portal) and two solitary thin-collared ones
    (central), optionally with three round fat vacuoles in the parenchyma (no collagen around
    them), and a third thick-collared lumen whose only partner is an epithelial duct lumen
    (collagen 8 µm beyond its edge)."""
    shape, mpp = (900, 900), 1.0
    yy, xx = np.mgrid[: shape[0], : shape[1]] * mpp
    lumen = np.zeros(shape, bool)
    collagen = np.zeros(shape, bool)
    vessels = [((200, 200), 30), ((200, 290), 30), ((650, 650), 3), ((650, 200), 3)]
    if duct:
        vessels.append(((420, 650), 30))
    for (y, x), collar in vessels:
        r = np.hypot(yy - y, xx - x)
        lumen |= r <= 15
        collagen |= (r > 15) & (r <= 15 + collar)
    if duct:
        r = np.hypot(yy - 420, xx - 740)
        lumen |= r <= 15
        collagen |= (r > 23) & (r <= 40)
    if vacuoles:
        for y, x in ((420, 420), (800, 420), (420, 110)):
            lumen |= np.hypot(yy - y, xx - x) <= 22
    return collagen & ~lumen, ~lumen, lumen, mpp


@pytest.mark.parametrize("lumen_factor", [1, 4])
def test_unlined_lumens_are_no_vessels(lumen_factor):
    """A fat vacuole is a lumen-sized hole no collagen lines: on the real steatotic PSR field
    (tile02_PSR) all eight lumens were vacuoles, read as central veins with 92 % confidence.
    Left out of the vessels, the portal and central calls and the perivascular collagen are
    those of the same tissue without vacuoles, also on a lumen grid 4x coarser (a whole
    slide's tissue image)."""
    settings = TraitSettings(mpp=1.0, tile_px=512)
    got = {}
    for vacuoles in (False, True):
        collagen, tissue, lumen, mpp = _vessels_and_vacuoles(vacuoles)
        coarse = tr._block_any(lumen, lumen_factor) if lumen_factor > 1 else lumen
        got[vacuoles] = tr.measure_slide(collagen, tissue, mpp, settings, lumen=coarse,
                                         lumen_mpp=mpp * lumen_factor)
    assert (got[True]["portal_vessels"], got[True]["central_vessels"]) == (2.0, 2.0)
    assert got[True]["undecided_vessels"] == 0.0
    assert (got[True]["unlined_lumens"], got[False]["unlined_lumens"]) == (3.0, 0.0)
    for name in ("perivascular_collagen_percent", "portal_collagen_percent",
                 "central_collagen_percent", "vessel_type_confidence"):
        assert got[True][name] == pytest.approx(got[False][name]), name


@pytest.mark.parametrize("lumen_factor", [1, 4])
def test_every_lumen_is_called_where_it_lies(lumen_factor):
    """The calls the QC overlay outlines: one per lumen, at the lumen (its outline's centre
    within a lumen-grid pixel of the drawn centre), of the kind the traits counted it as."""
    collagen, tissue, lumen, mpp = _vessels_and_vacuoles(True)
    coarse = tr._block_any(lumen, lumen_factor) if lumen_factor > 1 else lumen
    calls: list[tr.VesselCall] = []
    traits = tr.measure_slide(collagen, tissue, mpp, TraitSettings(mpp=1.0, tile_px=512),
                              lumen=coarse, lumen_mpp=mpp * lumen_factor, calls=calls)
    truth = {(200, 200): "portal", (200, 290): "portal", (650, 650): "central",
             (650, 200): "central", (420, 420): "unlined", (800, 420): "unlined",
             (420, 110): "unlined"}
    assert len(calls) == len(truth)
    grid = max(2.0, lumen_factor * mpp)  # the lumen grid's µm/px (reduced to about 2 µm/px)
    for call in calls:
        m = cv2.moments(call.outline_um)
        x, y = m["m10"] / m["m00"], m["m01"] / m["m00"]
        (cy, cx), kind = min(truth.items(), key=lambda t: math.hypot(t[0][0] - y, t[0][1] - x))
        assert math.hypot(cy - y, cx - x) <= grid, (cy, cx)
        assert call.kind == kind
        assert 0.5 <= call.confidence <= 1.0 if kind != "unlined" else math.isnan(call.confidence)
        # the outline runs along the lumen's edge (radius 15 or 22 µm), through the centres
        # of its border pixels
        radius = np.hypot(call.outline_um[:, 0] - cx, call.outline_um[:, 1] - cy)
        assert np.abs(radius - (22 if kind == "unlined" else 15)).max() <= grid
    counted = {k: traits[f"{k}_vessels" if k != "unlined" else "unlined_lumens"]
               for k in ("portal", "central", "undecided", "unlined")}
    assert counted == {k: float(sum(c.kind == k for c in calls)) for k in counted}
    # all lumens unlined: each still called (and outlined) as such; no lumen, no call
    only = lumen & ~ndi.binary_dilation(_vessels_and_vacuoles(False)[2], iterations=2)
    unlined: list[tr.VesselCall] = []
    tr.measure_slide(np.zeros_like(collagen), ~only, mpp, TraitSettings(), lumen=only,
                     lumen_mpp=mpp, calls=unlined)
    assert [c.kind for c in unlined] == ["unlined"] * 3
    none: list[tr.VesselCall] = []
    tr.measure_slide(collagen, tissue, mpp, TraitSettings(), calls=none)
    assert none == []


def test_lumen_outlines_run_through_border_pixel_centres():
    """Exactly: x, y of the lumen grid's border pixel centres in µm, per label, also for a
    lumen inside another's hole (a vein holding a tissue island with a lumen of its own)."""
    lumen = np.zeros((40, 40), bool)
    lumen[3:8, 5:12] = True  # label 1: rows 3-7, columns 5-11
    lumen[15:35, 15:35] = True
    lumen[20:30, 20:30] = False  # an island in the big lumen (label 2)...
    lumen[24:26, 24:27] = True  # ...holding a lumen (label 3)
    n, labels = cv2.connectedComponents(lumen.view(np.uint8), connectivity=8)
    out = tr.lumen_outlines(lumen, labels, n - 1, 2.0)
    assert len(out) == 3 and all(len(o) for o in out)
    for k, (x0, y0, x1, y1) in enumerate([(5, 3, 11, 7), (15, 15, 34, 34), (24, 24, 26, 25)]):
        xs, ys = out[k][:, 0] / 2.0 - 0.5, out[k][:, 1] / 2.0 - 0.5
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1), k


def test_a_vacuole_beside_a_central_vein_leaves_it_central():
    """Zone-3 steatosis puts fat vacuoles beside central veins: an unlined lumen is no vessel
    neighbour, so the vein is still alone among vessels (a bile duct beside a thick-collared
    vein still makes it portal: test_an_unlined_duct_still_makes_its_vein_portal)."""
    collagen, tissue, lumen, mpp = _vessels_and_vacuoles(False)
    yy, xx = np.mgrid[: lumen.shape[0], : lumen.shape[1]] * mpp
    vacuole = np.hypot(yy - 650, xx - 720) <= 22  # 33 µm from the central vein's edge
    got = tr.measure_slide(collagen, tissue & ~vacuole, mpp, TraitSettings(mpp=1.0),
                           lumen=lumen | vacuole, lumen_mpp=mpp)
    assert (got["portal_vessels"], got["central_vessels"], got["unlined_lumens"]) == (2, 2, 1)


def test_a_lumen_whose_lining_is_excluded_stays_a_vessel():
    """With vessel walls excluded from the countable tissue
    (``tissue.exclude_vessel_walls_above_um2``) the lining band holds no tissue: nothing says
    the lumen is unlined, so it stays a vessel."""
    collagen, tissue, lumen, mpp = _vessels_and_vacuoles(False)
    walls = ndi.binary_dilation(lumen, iterations=25) & ~lumen
    vessels = tr.vessel_map(lumen, mpp, mpp, 150.0,
                            lining=tr.Lining(collagen & ~walls, tissue & ~walls, 4.0, 0.05))
    assert vessels is not None and (vessels.n, vessels.unlined) == (4, 0)


def test_vacuoles_alone_leave_no_vessel_and_no_call():
    collagen, tissue, lumen, mpp = _vessels_and_vacuoles(True)
    vessels_only, _, _, _ = _vessels_and_vacuoles(False)
    lumen &= ~ndi.binary_fill_holes(ndi.binary_dilation(vessels_only, iterations=2))
    tissue = ~lumen
    vessels = tr.vessel_map(lumen, mpp, mpp, 150.0,
                            lining=tr.Lining(collagen, tissue, 4.0, 0.05))
    assert vessels is not None and (vessels.n, vessels.unlined) == (0, 3)
    got = tr.measure_slide(collagen, tissue, mpp, TraitSettings(mpp=1.0), lumen=lumen,
                           lumen_mpp=mpp)
    assert got["unlined_lumens"] == 3.0
    assert got["portal_vessels"] == got["central_vessels"] == got["undecided_vessels"] == 0.0
    assert got["perivascular_collagen_percent"] == 0.0
    assert math.isnan(got["vessel_type_confidence"])
    # no lumen at all reads the same: no vessel (0), not an unknown (NaN); without a lumen
    # mask the counts are unknown
    none = tr.measure_slide(collagen, tissue, mpp, TraitSettings(mpp=1.0),
                            lumen=np.zeros_like(lumen), lumen_mpp=mpp)
    assert [none[k] for k in ("portal_vessels", "central_vessels", "undecided_vessels",
                              "unlined_lumens")] == [0.0] * 4
    assert math.isnan(tr.measure_slide(collagen, tissue, mpp, TraitSettings(mpp=1.0))[
        "portal_vessels"])


def test_an_unlined_duct_still_makes_its_vein_portal():
    """Vein, artery and bile duct cluster in a portal tract: a duct lumen lined by epithelium
    is no vessel, yet it is the thick-collared lumen's neighbour."""
    collagen, tissue, lumen, mpp = _vessels_and_vacuoles(False, duct=True)
    got = tr.measure_slide(collagen, tissue, mpp, TraitSettings(mpp=1.0), lumen=lumen,
                           lumen_mpp=mpp)
    assert got["unlined_lumens"] == 1.0
    assert (got["portal_vessels"], got["central_vessels"]) == (3.0, 2.0)


def test_undecidable_vessels_leave_the_split_empty():
    truth = sf.vessels_and_septa((700, 700), 1.0, n_vessels=3, collar_um=8, rng=2)
    got = _traits(truth)
    if got["portal_vessels"] + got["central_vessels"] == 0:
        assert math.isnan(got["portal_collagen_percent"])
        assert math.isnan(got["vessel_type_confidence"])
    assert got["undecided_vessels"] + got["portal_vessels"] + got["central_vessels"] == 3


def test_empty_collagen_gives_nan_traits_not_errors():
    tissue = np.ones((300, 300), bool)
    got = tr.measure_slide(np.zeros_like(tissue), tissue, 1.0, TraitSettings())
    assert math.isnan(got["fibre_width_median_um"])
    assert got["fibre_length_density_mm_per_mm2"] == 0.0


@pytest.mark.parametrize(("mpp", "resolved"), [(1.0, True), (1.5, True), (2.0, False),
                                            (2.5, False)])
def test_thin_traits_are_empty_where_no_fibre_can_read_thin(mpp, resolved):
    """At 2 µm/px a one-pixel fibre reads 3 µm: a thin share would be 0 by construction,
    not by the tissue (the 1-GP slide's masks at 2.5 µm/px read 0.00 %). Left empty."""
    truth = sf.pericellular_network(cell_um=20.0, wall_um=1.5, rng=4)
    got = tr.measure_slide(truth.collagen, truth.tissue, truth.mpp,
                           TraitSettings(mpp=mpp, tile_px=512))
    assert got["traits_mpp"] == mpp
    assert tr.thin_fibres_resolved(mpp, 3.0) == resolved
    assert tr.thin_fibres_resolved(1.999, 3.0)
    for name in tr.THIN_TRAITS:
        assert math.isnan(got[name]) != resolved, name
    assert math.isfinite(got["thick_fibre_share_percent"])
    assert math.isfinite(got["fibre_width_median_um"])
    if resolved:
        assert got["thin_fibre_share_percent"] > 50


def test_resolution_warning_names_coarse_slides_and_the_setting_that_keeps_them_fine():
    import pandas as pd

    settings = Settings()
    row = {"status": "ok", "analysis_mpp": 0.5, "width_px": 32768, "height_px": 32768}
    fine = pd.DataFrame([{**row, "slide": "a", "traits_mpp": 1.0},
                         {**row, "slide": "b", "traits_mpp": 1.0},
                         {**row, "slide": "c", "traits_mpp": 2.5, "status": "failed"}])
    assert tr.resolution_warning(fine, settings) is None
    assert tr.resolution_warning(fine.drop(columns="traits_mpp"), settings) is None
    mixed = fine.assign(traits_mpp=[1.0, 1.5, 2.5])
    assert "2 resolutions (1-1.5 µm/px" in tr.resolution_warning(mixed, settings)
    coarse = fine.assign(traits_mpp=[1.0, 2.5, 2.5])
    line = tr.resolution_warning(coarse, settings)
    assert line.startswith("fibre traits of b were measured at 2.5 µm/px, where no fibre "
                           "reads thinner than 3.75 µm")
    many = tr.resolution_warning(pd.concat([coarse] * 2, ignore_index=True), settings)
    assert many.startswith("fibre traits of 2 slides (b, b) were measured at up to 2.5 µm/px")
    # 32768² px at 0.5 µm/px: masks at 1 µm/px are 16384² = 268.4 MP
    assert "mask_max_mpx: 269}" in line and "6x" in line
    # tiles.plan_geometry's mask factor: 2 (1 µm/px) at 269 MP, 3 at 268
    from types import SimpleNamespace

    from fibroquant.tiles import plan_geometry

    level = SimpleNamespace(mpp=0.5, shape=(32768, 32768, 3))
    big = SimpleNamespace(mpp=0.5, levels=[level], path="big.svs")
    assert plan_geometry(big, None, 269).mask_mpp == 1.0  # type: ignore[arg-type]
    assert plan_geometry(big, None, 268).mask_mpp == 1.5  # type: ignore[arg-type]
    # a slide whose masks at 1 µm/px would pass the largest setting: its finest masks named
    huge = coarse.assign(analysis_mpp=0.25, width_px=200_000, height_px=200_000)
    assert "{mask_max_mpx: 817} in a --config file keeps their masks at 1.75 µm/px" in (
        tr.resolution_warning(huge, settings))
    assert plan_geometry(SimpleNamespace(mpp=0.25, levels=[SimpleNamespace(
        mpp=0.25, shape=(200_000, 200_000, 3))], path="huge.svs"),  # type: ignore[arg-type]
        None, 817).mask_mpp == 1.75
    from fibroquant.config import TilingSettings

    assert TilingSettings.model_fields["mask_max_mpx"].metadata[-1].le == tr.MAX_MASK_MPX
    # an image that is itself too coarse: no setting helps, none is named
    field = coarse.assign(analysis_mpp=2.5, width_px=2048, height_px=2048)
    line = tr.resolution_warning(field, settings)
    assert "left empty" in line and "mask_max_mpx" not in line


def test_width_floor_warning_names_slides_whose_median_is_one_pixel():
    """The real Masson hearts at 1 µm/px read a median width of 1.5 µm, IQR 0: one pixel."""
    import pandas as pd

    slides = pd.DataFrame({
        "slide": ["h1.png", "h2.png", "liver.png", "failed.png"],
        "status": ["ok", "ok", "ok", "failed"],
        "traits_mpp": [1.0, 1.0, 1.0, 1.0], "analysis_mpp": [0.5, 0.5, 0.5, 0.5],
        "fibre_width_median_um": [1.5, 1.5, 3.2, 1.5]})
    line = tr.width_floor_warning(slides)
    assert line.startswith("median fibre width of 2 slide(s) ('h1.png', 'h2.png') is the "
                           "least their trait mask reads (1.5 µm: one pixel at 1 µm/px)")
    assert line.endswith("traits: {mpp: 0.5} in a --config file measures them at 0.5 µm/px "
                         "(the traits' time grows with their pixels: 4x)")
    assert tr.width_floor_warning(slides.iloc[2:]) is None
    # too coarse for thin fibres anyway: resolution_warning's line, not this one
    assert tr.width_floor_warning(slides.assign(traits_mpp=2.5, fibre_width_median_um=3.75)) is None


@pytest.mark.slow
def test_regression_cohort_width_traits_differ_cpa_does_not():
    import pandas as pd

    rows = []
    for mouse, group, truth in sf.regression_cohort(5, shape=(900, 900), rng=27):
        got = tr.measure_slide(truth.collagen, truth.tissue, truth.mpp, TraitSettings(),
                               lumen=truth.lumen, lumen_mpp=truth.mpp)
        # the septal width is the drawn septum's (the all-fibre median follows the fine ones)
        assert got["septal_width_median_um"] == pytest.approx(truth.extra["septum_um"],
                                                              rel=0.15), mouse
        rows.append({"mouse": mouse, "group": group, "cpa_percent": truth.cpa_percent, **got})
    mice = pd.DataFrame(rows)
    by_group = mice.groupby("group")["cpa_percent"].mean()
    assert abs(by_group["control"] - by_group["regression"]) < 0.5
    # compared as the tables compare them: Welch's t-test on one value per mouse
    cmp = tr.compare_traits(mice, n_boot=200).set_index(["trait", "group"])
    assert sps.ttest_ind(*(mice.loc[mice["group"] == g, "cpa_percent"] for g in
                           ("control", "regression")), equal_var=False).pvalue > 0.05
    for key in ("septal_width_median_um", "thick_fibre_share_percent", "fibre_width_iqr_um"):
        row = cmp.loc[(key, "regression")]
        assert row["welch_p"] < 0.01 and row["diff_vs_control"] < 0, key


def test_traits_switch_off_keeps_the_settings_hash():
    assert Settings.model_validate({"traits": False}).settings_hash() != Settings().settings_hash()
    off = Settings.model_validate({"traits": {"enabled": False, "mpp": 2.0}})
    assert off.settings_hash() == Settings.model_validate({"traits": False}).settings_hash()


@pytest.fixture(scope="module")
def fibre_study(tmp_path_factory):
    """Rendered regression cohort (3 + 3 mice) as lossless TIFFs with a sample sheet."""
    import pandas as pd

    from fibroquant.synthetic import write_pyramid_tiff

    d = tmp_path_factory.mktemp("fibre_slides")
    rows = []
    for mouse, group, truth in sf.regression_cohort(3, shape=(600, 600), rng=5):
        name = f"{mouse}.tif"
        write_pyramid_tiff(d / name, sf.render(truth), truth.mpp, min_level_px=128,
                           compression="zlib")
        rows.append({"slide": name, "mouse": mouse, "group": group})
    pd.DataFrame(rows).to_csv(d / "samples.csv", index=False)
    return d


@pytest.mark.slow
def test_cli_writes_trait_columns_tables_and_comparisons(fibre_study, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from fibroquant.cli import app

    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["analyze", str(fibre_study), "--out", str(out), "--samples",
                                   str(fibre_study / "samples.csv"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    tables = next(line for line in res.output.splitlines() if line.startswith("tables: "))
    assert f"{out / 'traits.csv'}, {out / 'trait_groups.csv'}, " in tables
    slides = pd.read_csv(out / "slides.csv")
    for col in ("fibre_width_median_um", "fibre_width_iqr_um", "thin_fibre_share_percent",
                "thick_fibre_share_percent", "fibre_length_density_mm_per_mm2",
                "branch_points_per_mm2", "perivascular_collagen_percent",
                "septal_collagen_percent", "pericellular_collagen_percent", "architecture_score"):
        assert slides[col].notna().all(), col
    ctrl = slides["group"] == "control"
    assert (slides.loc[ctrl, "thick_fibre_share_percent"].min()
            > slides.loc[~ctrl, "thick_fibre_share_percent"].max())
    mice = pd.read_csv(out / "mice.csv")
    c1 = slides[slides["mouse"] == "c1"]
    assert mice.set_index("mouse").loc["c1", "branch_points_per_mm2"] == pytest.approx(
        float(c1["branch_points_per_mm2"].iloc[0]))
    long = pd.read_csv(out / "traits.csv")
    assert set(long["slide"]) == set(slides["slide"])
    assert long.loc[long["trait"] == "fibre_width_median_um", "unit"].eq("µm").all()
    groups = pd.read_csv(out / "trait_groups.csv")
    thick = groups[(groups["trait"] == "thick_fibre_share_percent") & ~groups["is_control"]]
    assert float(thick["hedges_g"].iloc[0]) < -2
    assert (out / "plots" / "trait_groups.png").is_file()
    assert "Fibre traits per mouse by group" in (out / "report.html").read_text()
    # the same folder without the sheet: no comparison, and none of the last run's left
    res = CliRunner().invoke(app, ["analyze", str(fibre_study), "--out", str(out),
                                   "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert not (out / "trait_groups.csv").exists() and (out / "traits.csv").exists()
    assert sorted(p.stem for p in (out / "plots").glob("*.png")) == ["cpa_slides", "stain_qc"]
    assert "trait_groups.csv" not in res.output

    off = tmp_path / "off"
    res = CliRunner().invoke(app, ["analyze", str(fibre_study), "--out", str(off), "--samples",
                                   str(fibre_study / "samples.csv"), "--no-traits",
                                   "--workers", "1"])
    assert res.exit_code == 0, res.output
    plain = pd.read_csv(off / "slides.csv")
    assert "fibre_width_median_um" not in plain.columns
    assert not (off / "traits.csv").exists()
    pd.testing.assert_series_equal(plain["cpa_percent"], slides["cpa_percent"])


@pytest.mark.slow
def test_cli_warns_when_masks_too_coarse_for_thin_fibres(fibre_study, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from fibroquant.cli import app

    cfg = tmp_path / "coarse.yaml"
    out = tmp_path / "o"

    def run(mask_max_mpx: float):
        cfg.write_text(f"tiling:\n  mask_max_mpx: {mask_max_mpx}\n")
        res = CliRunner().invoke(app, ["analyze", str(fibre_study), "--out", str(out),
                                       "--config", str(cfg), "--workers", "1"])
        assert res.exit_code == 0, res.output
        return res, pd.read_csv(out / "slides.csv")

    res, slides = run(0.09)  # 600² px at 1 µm/px: masks at 2 µm/px
    assert (slides["traits_mpp"] == 2.0).all()
    assert slides["thin_fibre_share_percent"].isna().all()
    assert slides["thick_fibre_share_percent"].notna().all()
    text = " ".join(res.output.split())
    assert "where no fibre reads thinner than 3 µm" in text
    assert "tiling: {mask_max_mpx: 1} in a --config file" in text
    assert "where no fibre reads thinner than 3" in (out / "report.html").read_text()
    # following the advice measures the slides again (the kept masks' size is in the hash)
    res, slides = run(1)
    assert (slides["traits_mpp"] == 1.0).all()
    assert slides["thin_fibre_share_percent"].notna().all()
    assert "no fibre reads thinner" not in res.output


def test_threads_give_the_same_sums():
    truth = sf.vessels_and_septa((700, 700), 1.0, rng=3)
    params = tr.TraitParams(mpp=1.0)
    one = tr.measure_masks(truth.collagen, truth.tissue, params, tile_px=200).traits(params)
    two = tr.measure_masks(truth.collagen, truth.tissue, params, tile_px=200, workers=2)
    assert two.traits(params) == pytest.approx(one, nan_ok=True)


@pytest.mark.parametrize(("shape_kind", "dimension"), [("line", 1.0), ("plane", 2.0)])
def test_fractal_dimension_of_a_line_and_a_plane(shape_kind, dimension):
    tissue = np.ones((512, 512), bool)
    collagen = np.zeros_like(tissue)
    if shape_kind == "line":
        collagen[200, :] = True
    else:
        collagen[:] = True
    params = tr.TraitParams(mpp=1.0)
    got = tr.measure_masks(collagen, tissue, params, tile_px=200).traits(params)
    assert got["fractal_dimension"] == pytest.approx(dimension, abs=0.02)


def test_mice_pool_densities_by_tissue_and_shares_by_collagen():
    import pandas as pd

    from fibroquant.cohort import aggregate_mice

    slides = pd.DataFrame({
        "slide": ["a", "b", "c"], "mouse": ["m1", "m1", "m2"], "group": ["g", "g", "g"],
        "status": ["ok", "ok", "ok"], "tissue_area_mm2": [1.0, 3.0, 2.0],
        "collagen_area_mm2": [0.3, 0.1, 0.2], "cpa_percent": [30.0, 10 / 3, 10.0],
        "branch_points_per_mm2": [100.0, 20.0, 50.0],
        "thick_fibre_share_percent": [40.0, 80.0, 10.0],
        "portal_vessels": [2.0, 3.0, 1.0],
    })
    mice = aggregate_mice(slides).set_index("mouse")
    assert mice.loc["m1", "branch_points_per_mm2"] == pytest.approx((100 * 1 + 20 * 3) / 4)
    assert mice.loc["m1", "thick_fibre_share_percent"] == pytest.approx((40 * .3 + 80 * .1) / .4)
    assert mice.loc["m1", "portal_vessels"] == 5.0
    assert mice.loc["m2", "branch_points_per_mm2"] == 50.0


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_reduce_mask_is_a_majority_vote(factor):
    rng = np.random.default_rng(factor)
    mask = rng.random((50, 61)) < 0.5
    got = tr.reduce_mask(mask, factor)
    pad = np.zeros((-(-50 // factor) * factor, -(-61 // factor) * factor), bool)
    pad[:50, :61] = mask
    votes = pad.reshape(pad.shape[0] // factor, factor, -1, factor).sum(axis=(1, 3))
    np.testing.assert_array_equal(got, 2 * votes > factor * factor)


@pytest.mark.parametrize("factor", [2, 3])
def test_block_any_is_an_or_over_blocks(factor):
    mask = np.random.default_rng(factor).random((6 * factor, 4 * factor)) < 0.05
    want = mask.reshape(6, factor, 4, factor).any(axis=(1, 3))
    np.testing.assert_array_equal(tr._block_any(mask, factor), want)


def test_vessel_map_labels_lumens_8_connected_with_exact_distances():
    lumen = np.zeros((60, 80), bool)
    lumen[10, 10] = lumen[11, 11] = True  # diagonal neighbours: one lumen
    lumen[40:44, 50:55] = True
    lumen[5, 70] = True
    labels, n = ndi.label(lumen, structure=np.ones((3, 3)))
    vm = tr.vessel_map(lumen, 1.0, 1.0, cluster_um=10.0, max_mpp=1.0)
    assert vm is not None and vm.n == n == 3
    np.testing.assert_array_equal(vm.nearest[lumen], labels[lumen])
    # every pixel's distance is its distance to the lumen whose label it carries (5x5 mask)
    exact = ndi.distance_transform_edt(~lumen)
    assert np.abs(vm.distance_um - exact).max() < 0.05 * exact.max()
    assert tr.vessel_map(np.zeros_like(lumen), 1.0, 1.0, cluster_um=10.0) is None


@pytest.mark.parametrize("seed", [3, 4])
def test_skan_paths_equal_skan_skeleton(seed):
    """The paths traced on :func:`traits._pixel_graph` are skan's own (``skan.Skeleton``):
    same pixels in the same order, same half-widths, degrees and coordinates, on branched
    fibres and a pericellular network (junction clusters, loops)."""
    import skan
    from skimage.morphology import skeletonize

    for truth in (sf.fibre_field(widths_um=(3.0, 8.0), n_per_width=(10, 4), branches=10,
                                 rng=seed),
                  sf.pericellular_network(rng=seed)):
        skel = skeletonize(truth.collagen)
        half = np.random.default_rng(seed).uniform(1, 5, skel.shape).astype(np.float32)
        got = tr._skan_graph(skel, half)
        assert got is not None
        graph, _, (y0, x0) = got
        y1, x1 = y0 + graph.coordinates[:, 0].max() + 1, x0 + graph.coordinates[:, 1].max() + 1
        ref = skan.Skeleton(np.where(skel, half, 0)[y0:y1, x0:x1].astype(np.float32))
        assert graph.n_paths == ref.n_paths > 20
        for name in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(graph.paths, name), getattr(ref.paths, name))
        np.testing.assert_array_equal(graph.coordinates, ref.coordinates)
        np.testing.assert_array_equal(graph.degrees, ref.degrees)
        np.testing.assert_array_equal(graph.path_means(), ref.path_means())


def test_skan_paths_equal_skan_skeleton_on_a_dense_lattice():
    """66,600 junction pixels (a lattice of 1-px lines 2 px apart): the junction subgraph's
    edge keys exceed int32, and the paths are still skan's."""
    import skan

    yy, xx = np.mgrid[:300, :300]
    skel = ((yy % 2 == 0) | (xx % 2 == 0)) & (yy > 0) & (yy < 299) & (xx > 0) & (xx < 299)
    graph = tr._skan_graph(skel, np.ones(skel.shape, np.float32))[0]
    ref = skan.Skeleton(skel[1:-1, 1:-1].astype(np.float32))
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(graph.paths, name), getattr(ref.paths, name))
    np.testing.assert_array_equal(graph.degrees, ref.degrees)


def test_skan_compiles_once_in_the_forkserver_when_traits_are_on():
    """With traits on, the workers' forkserver imports fibroquant.warm_skan, which compiles
    skan's numba code there (workers forked from it inherit it) and starts no thread."""
    import dataclasses
    import multiprocessing as mp
    import subprocess
    import sys
    from pathlib import Path

    from fibroquant import executor
    from fibroquant.tasks import SlideTask

    if "forkserver" in mp.get_all_start_methods():
        from multiprocessing import forkserver

        for skan in (True, False):
            executor._worker_context(mp, skan=skan)
            assert ("fibroquant.warm_skan" in forkserver._forkserver._preload_modules) == skan
    task = SlideTask(path="x.svs", slide="x.svs", fingerprint="f", mpp=None, fallback_mpp=None,
                     settings_json=Settings().model_dump_json(), out_dir=".", write_masks=False)
    off = dataclasses.replace(task, settings_json=Settings.model_validate(
        {"traits": False}).model_dump_json())
    assert executor._traits_on([task]) and not executor._traits_on([off])
    if not Path("/proc/self/task").is_dir():
        pytest.skip("no /proc to count threads")
    code = ("import os, fibroquant.executor, fibroquant.report\n"
            "n = len(os.listdir('/proc/self/task'))\n"
            "import fibroquant.warm_skan\n"
            "from fibroquant import traits\n"
            "assert traits._skan_warm\n"
            "assert len(os.listdir('/proc/self/task')) == n\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_the_overlay_drawn_beside_the_traits_shows_their_lumen_calls(tmp_path):
    """On two threads the QC overlay is drawn while the traits are measured and finished
    with their lumen calls: the same overlay as on one thread, lumens outlined."""
    from fibroquant.executor import run_slide
    from fibroquant.report import VESSEL_MARK_RGB, qc_picture_height
    from fibroquant.synthetic import SectionParams, make_section
    from fibroquant.tasks import SlideTask

    rgb, _ = make_section(SectionParams(shape=(1024, 1024), mpp=0.5), rng=3)
    path = tmp_path / "s.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    images, geojson = [], []
    for threads in (1, 2):
        out = tmp_path / f"out{threads}"
        task = SlideTask(path=str(path), slide="s.png", fingerprint="f", mpp=0.5,
                         fallback_mpp=None, settings_json=Settings().model_dump_json(),
                         out_dir=str(out), write_masks=True, threads=threads)
        rec = run_slide(task)
        assert rec["status"] == "ok", rec.get("error")
        images.append(cv2.cvtColor(cv2.imread(str(out / "qc" / "s.jpg")), cv2.COLOR_BGR2RGB))
        geojson.append(json.loads((out / "geojson" / "s.geojson").read_text()))
    assert np.array_equal(images[0], images[1])
    # the calls are QuPath annotations too (level-0 pixels), added after the traits alike
    assert geojson[0] == geojson[1]
    names = [f["properties"]["classification"]["name"] for f in geojson[0]["features"]]
    calls = names[2:]
    assert names[:2] == ["Tissue", "Collagen"] and len(calls) == (
        rec["portal_vessels"] + rec["central_vessels"] + rec["undecided_vessels"]
        + rec["unlined_lumens"])
    assert set(calls) <= {"Portal vessel", "Central vein", "Vessel, type undecided",
                          "Unlined lumen"}
    import shapely.geometry

    for f in geojson[0]["features"][2:]:
        shape = shapely.geometry.shape(f["geometry"])
        assert shape.is_valid and shape.area > 0
        assert min(shape.bounds) >= 0 and max(shape.bounds) <= 1024
        assert f["properties"]["name"] == f"s.png {f['properties']['classification']['name'].lower()}"
    lumens = rec["portal_vessels"] + rec["central_vessels"] + rec["undecided_vessels"]
    assert lumens + rec["unlined_lumens"] > 0
    picture = images[0][: qc_picture_height(*images[0].shape[:2])].astype(int)
    marked = [kind for kind, colour in VESSEL_MARK_RGB.items() if kind != "unlined"
              and (np.abs(picture - np.array(colour)).max(axis=2) <= 30).sum() > 20]
    assert marked


def test_the_qc_image_is_freed_before_the_traits_finish(monkeypatch):
    """On two threads the overlay thread holds the QC image alone: once it has drawn, the
    image is freed while the traits still run (not held through their memory peak)."""
    import gc
    import time
    import weakref

    from fibroquant.pipeline import analyze_slide
    from fibroquant.slides import ArraySlide
    from fibroquant.synthetic import SectionParams, make_section

    rgb, _ = make_section(SectionParams(shape=(768, 768), mpp=0.5), rng=4)
    refs: list[weakref.ref] = []
    freed: list[bool] = []
    measure = tr.measure_slide

    def traits_when_drawn(*args, **kwargs):
        end = time.monotonic() + 5.0  # the overlay thread draws meanwhile: until it is done
        while time.monotonic() < end:
            gc.collect()
            if refs and refs[0]() is None:
                break
            time.sleep(0.01)
        freed.append(bool(refs) and refs[0]() is None)
        return measure(*args, **kwargs)

    monkeypatch.setattr(tr, "measure_slide", traits_when_drawn)
    result = analyze_slide("s.png", Settings(), slide=ArraySlide(rgb, 0.5), workers=2,
                           masks_ready=lambda partial: refs.append(weakref.ref(partial.thumbnail)))
    assert freed == [True]
    assert result.thumbnail.size == 0 and result.traits
