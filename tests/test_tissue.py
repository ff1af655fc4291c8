"""Tissue detection: pale parenchyma against the glass threshold, with known answers."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from fibroquant.config import TissueSettings, load_settings
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide
from fibroquant.stains import SIRIUS_RED_VECTOR, od_to_rgb
from fibroquant.synthetic import SectionParams, make_section
from fibroquant.tissue import (
    TissueMask,
    capsule_rays,
    capsule_seed_depth,
    detect_tissue,
    edge_distance,
    glass_floor,
    glass_threshold,
    pale_tissue,
    with_capsule,
)

GLASS = (240.0, 238.0, 236.0)
GREY = np.array([0.577, 0.577, 0.577], np.float32)  # a neutral stain: summed OD = 1.73 x conc.


RED = np.array(SIRIUS_RED_VECTOR, np.float32) / np.linalg.norm(SIRIUS_RED_VECTOR)


def _field(conc: np.ndarray, noise_sd: float = 1.5, seed: int = 0,
           pale: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB image of a neutral stain with concentration ``conc`` on ``GLASS``; where
    ``pale`` is given, the stain is Sirius red instead (summed OD = 1.50 x conc)."""
    od = conc[..., None].astype(np.float32) * GREY
    if pale is not None:
        od[pale] = conc[pale][:, None] * RED
    rgb = od_to_rgb(od, GLASS).astype(np.float32)
    rgb += np.random.default_rng(seed).normal(0.0, noise_sd, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Glass with: a dark block; pale tissue (summed OD 0.07) touching it; the same faint OD
    as an isolated smear far away; a 1-px faint ring around the block (a blur halo)."""
    conc = np.zeros((400, 400), np.float32)
    parts = {k: np.zeros(conc.shape, bool) for k in ("dark", "pale", "smear", "halo")}
    parts["dark"][100:300, 40:140] = True
    parts["halo"][99:301, 39:141] = True
    parts["pale"][100:300, 140:230] = True
    parts["halo"] &= ~parts["dark"] & ~parts["pale"]
    yy, xx = np.mgrid[:400, :400]
    parts["smear"] = (yy - 200) ** 2 + (xx - 330) ** 2 < 40**2
    conc[parts["halo"] | parts["pale"] | parts["smear"]] = 0.07 / 1.50
    conc[parts["dark"]] = 0.4
    return _field(conc, pale=parts["halo"] | parts["pale"] | parts["smear"]), parts


def test_pale_tissue_joins_the_section_a_smear_and_a_halo_do_not():
    rgb, parts = _scene()
    tm = detect_tissue(rgb, 1.0, TissueSettings(), GLASS)
    assert tm.glass_od == pytest.approx(TissueSettings().glass_od_min)
    assert tm.section[parts["dark"]].mean() > 0.99
    assert tm.section[parts["pale"]].mean() > 0.95  # pale tissue connected to the section
    assert tm.section[parts["smear"]].mean() < 0.01  # an isolated faint smear stays glass
    assert tm.section[parts["halo"]].mean() < 0.05  # the thin halo is not added
    off = detect_tissue(rgb, 1.0, TissueSettings(pale_tissue_sd=0), GLASS)
    assert off.glass_od > 0.075  # Otsu's threshold, above the pale tissue's OD
    assert off.section[parts["pale"]].mean() < 0.05
    fixed = detect_tissue(rgb, 1.0, TissueSettings(glass_od=0.1), GLASS)  # the user's choice
    assert fixed.glass_od == 0.1 and fixed.section[parts["pale"]].mean() < 0.05


def test_grey_glass_beside_the_section_is_not_grown_into():
    """Glass darkened by uneven light (grey, summed OD 0.07) next to the section is not pale
    tissue: pale tissue carries its stain's colour."""
    _, parts = _scene()
    conc = np.zeros(parts["dark"].shape, np.float32)
    conc[parts["dark"]] = 0.4
    conc[parts["pale"]] = 0.07 / 1.73  # grey, where the scene has pale red tissue
    tm = detect_tissue(_field(conc), 1.0, TissueSettings(), GLASS)
    assert tm.glass_od < 0.05  # the floor is there, but nothing grey grows into it
    assert tm.section[parts["pale"]].mean() < 0.05
    assert tm.section[parts["dark"]].mean() > 0.99


def test_smear_joined_by_a_thin_thread_stays_glass():
    """The opening cuts the faint thread; the smear it joined must not stay as an island."""
    _, parts = _scene()
    conc = np.zeros(parts["dark"].shape, np.float32)
    conc[parts["dark"]] = 0.4
    conc[parts["smear"]] = 0.07 / 1.50
    conc[198:202, 140:292] = 0.07 / 1.50  # a 4-px thread from the block to the smear
    tm = detect_tissue(_field(conc, pale=conc < 0.1), 1.0, TissueSettings(), GLASS)
    assert tm.section[parts["smear"]].mean() < 0.01
    assert tm.section[parts["dark"]].mean() > 0.99


def test_pale_tissue_is_a_hysteresis_threshold():
    """Without the opening (radius 0) it is a hysteresis threshold, 8-connected (scikit-image's
    ``apply_hysteresis_threshold`` is 4-connected: on noisy data they differ)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    od = cv2.GaussianBlur(rng.random((200, 300)).astype(np.float32), (0, 0), 1)
    hi, lo = float(np.quantile(od, 0.9)), float(np.quantile(od, 0.5))
    labels, _n = ndi.label(od > lo, structure=np.ones((3, 3)))
    ref = np.isin(labels, np.unique(labels[od > hi])) & (labels > 0)
    assert np.array_equal(pale_tissue(od, hi, lo, 0.0), ref)
    opened = pale_tissue(od, hi, lo, 3.0)
    assert np.array_equal(opened & (od > hi), od > hi)  # never loses a pixel above threshold
    assert (opened <= ref).all()


def test_glass_floor_follows_the_glass_noise():
    s = TissueSettings()
    rng = np.random.default_rng(1)
    pale = rng.normal(0.07, 0.01, 20000)
    quiet = np.concatenate([rng.normal(0.0, 0.002, 20000), pale]).astype(np.float32)
    noisy = np.concatenate([rng.normal(0.0, 0.006, 20000), pale]).astype(np.float32)
    assert glass_floor(quiet.reshape(200, 200), 0.1, s) == pytest.approx(s.glass_od_min)
    # 8 robust SDs of the glass: 0.048 +/- a histogram bin
    assert glass_floor(noisy.reshape(200, 200), 0.1, s) == pytest.approx(0.048, abs=0.004)
    # no glass and no lumen below the threshold (a field covered by tissue): unchanged
    covered = rng.normal(0.5, 0.05, 40000).astype(np.float32).reshape(200, 200)
    t = glass_threshold(covered, s)
    assert glass_floor(covered, t, s) == t
    assert glass_floor(quiet.reshape(200, 200), 0.1, TissueSettings(pale_tissue_sd=0)) == 0.1


def _run(rgb, truth, stain, tissue=None):
    ov = {"stains": {"stain": stain}, "tissue": tissue or {}}
    return analyze_slide("s.png", load_settings(overrides=ov),
                         slide=ArraySlide(rgb, truth.params.mpp))


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_barely_counterstained_parenchyma_is_tissue(stain):
    """No counterstain at all: the parenchyma's summed OD (non-specific collagen stain and
    nuclei) is under the glass threshold's 0.1 clip. Half of it was taken for glass and CPA
    read 4.8-10.8 pp off (-7 pp here); grown from the section down to the glass noise, it is measured."""
    p = replace(SectionParams(stain=stain), shape=(768, 768), counterstain_od=0.0)
    rgb, truth = make_section(p, rng=2)
    a = _run(rgb, truth, stain)
    assert a.to_record()["tissue_area_mm2"] == pytest.approx(truth.tissue_area_mm2, rel=0.05)
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) < 0.6
    b = _run(rgb, truth, stain, {"pale_tissue_sd": 0})
    assert b.to_record()["tissue_area_mm2"] < 0.85 * truth.tissue_area_mm2
    assert abs(b.to_record()["cpa_percent"] - truth.cpa_percent) > 2.0


@pytest.mark.slow
def test_blurred_section_keeps_its_capsule():
    """Optical blur spreads a faint halo around the section; the edge must stay where the
    capsule can be found (the halo moved it 4 px out and the capsule read as collagen, +18 pp,
    before the opening)."""
    p = replace(SectionParams(), shape=(768, 768), blur_um=1.5)
    rgb, truth = make_section(p, rng=1)
    a = _run(rgb, truth, "sirius-red")
    assert a.to_record()["capsule_area_mm2"] > 0.5 * truth.capsule_mask.sum() * p.mpp**2 / 1e6
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) < 0.6


def test_glass_strip_along_the_frame_is_glass_a_vein_cut_by_it_a_lumen():
    """A field whose section leaves a strip of glass along one side (touching three sides of
    the frame) has an edge there, and a capsule can be found on it; before, the strip was
    taken for a vessel lumen cut by the frame (under the 60,000 µm² lumen limit), the section
    had no edge on that side, and its capsule counted as collagen (+6.9 pp on a synthetic
    section). A vein cut by the frame is still a lumen."""
    conc = np.full((400, 400), 0.25, np.float32)
    conc[:, :30] = 0.0  # glass strip along the left side: 12,000 px
    yy, xx = np.mgrid[:400, :400]
    vein = (yy - 200) ** 2 + (xx - 399) ** 2 < 60**2  # half disc at the right frame
    conc[vein] = 0.0
    tm = detect_tissue(_field(conc), 1.0, TissueSettings(), GLASS)
    assert not tm.section[:, :28].any()  # the strip is glass
    assert tm.lumen[vein].mean() > 0.95 and tm.section[vein].all()  # the vein is a lumen
    assert tm.capsule_band[:, 30:40].any()  # the strip's side is an edge: capsule searched


# ------------------------------------------------------------------------------------------
# Capsule: collagen on straight paths from the glass, septa cut at the local thickness
# ------------------------------------------------------------------------------------------


def _capsule_scene(halo_px: int = 0):
    """A section below glass (rows < 20), 0.5 µm/px, with known collagen:

    * a capsule along the edge, 24 px (12 µm) thick, 36 px (18 µm) over columns 300-399;
    * a septum 30 px wide running straight into the capsule (columns 100-129), to the bottom;
    * a septum running beside the capsule behind a 10-px strip of parenchyma, joined to it
      only at its end (columns 180-279, rows 54-73; joined over columns 270-279);
    * a fibre running 46 px below the capsule (columns 460-463, to 70 px deep).

    ``halo_px``: the collagen starts that far below the tissue edge (a blurred edge).
    """
    h, w = 160, 600
    section = np.zeros((h, w), bool)
    section[20:] = True
    top = 20 + halo_px
    col = np.zeros((h, w), bool)
    col[top : top + 24] = True
    col[top : top + 36, 300:400] = True
    col[top:, 100:130] = True
    col[top + 34 : top + 54, 180:280] = True
    col[top : top + 54, 270:280] = True
    col[top : top + 70, 460:464] = True
    tm = TissueMask(mpp=0.5, section=section, tissue=section.copy(),
                    lumen=np.zeros_like(section), fold=np.zeros_like(section),
                    capsule_band=section & (edge_distance(section) * 0.5 <= 30.0),
                    vessel_wall=np.zeros_like(section), glass_od=0.03)
    return tm, col, top


@pytest.mark.parametrize("halo_px", [0, 4])
def test_capsule_is_the_layer_septa_lose_only_its_thickness(halo_px):
    tm, col, top = _capsule_scene(halo_px)
    cap = with_capsule(tm, col).capsule_band
    # the layer is capsule, the thicker stretch whole (not cut at the thin stretch's depth)
    assert cap[top : top + 24, 20:90].all()
    assert cap[top : top + 24, 500:580].all()
    assert cap[top : top + 36, 310:390].all()
    # the septum running into the capsule: capsule down to the thickness nearby + ~2 px
    depth = np.nonzero(cap[:, 110:120].all(axis=1))[0].max() - top + 1
    assert 24 <= depth <= 28
    assert not cap[top + 30 :, 100:130].any()
    # the septum behind the strip of parenchyma is not capsule, except where it joins it
    assert not cap[top + 34 : top + 54, 180:262].any()
    # so is the fibre
    assert not cap[top + 28 :, 460:464].any()


def test_capsule_seed_depth_follows_a_blurred_edge():
    depths = np.concatenate([np.full(50, 4.0), np.full(800, 5.0), np.arange(6.0, 40.0).repeat(600)])
    assert capsule_seed_depth(depths, 0.5) == 6.5  # collagen starts 4-5 px in
    assert capsule_seed_depth(np.arange(1.0, 40.0).repeat(600), 0.5) == 3.5  # at the edge
    assert capsule_seed_depth(np.arange(8.0, 40.0).repeat(600), 0.5) == 9.5
    assert capsule_seed_depth(np.arange(9.0, 40.0).repeat(600), 0.5) == 10.0  # at most 5 µm
    assert capsule_seed_depth(np.arange(25.0, 40.0).repeat(600), 0.5) == 3.5  # none to seed
    assert capsule_seed_depth(np.zeros(0), 0.5) == 3.5


def test_capsule_rays_pass_round_a_nucleus_not_through_parenchyma():
    tm, col, top = _capsule_scene()
    col[top + 6 : top + 12, 40:46] = False  # a nucleus inside the capsule
    col[top + 10 : top + 16, 500:506] = False  # and one without the hole filling: 6 x 6 px
    ys, xs, _, _ = capsule_rays(col & tm.capsule_band, edge_distance(tm.section))
    on = np.zeros_like(col)
    on[ys, xs] = True
    assert on[top + 22 : top + 24, 500:506].all()  # the rays close in behind it
    # behind the parenchyma strip no ray, except within 45° of where the septum joins
    assert not on[top + 34 : top + 54, 180:245].any()
    cap = with_capsule(tm, col).capsule_band  # holes the size of a nucleus are filled
    assert cap[top : top + 24, 40:46].all()
    assert cap[top : top + 24, 500:506].all()


def test_row_nanquantile_equals_numpy():
    from fibroquant.tissue import _row_nanquantile

    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.gamma(2.0, 5.0, (int(rng.integers(1, 40)), int(rng.integers(1, 30))))
        a[rng.random(a.shape) < rng.uniform(0, 0.7)] = np.nan
        a[:, 0] = rng.gamma(2.0, 5.0, a.shape[0])  # every row holds a number
        q = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.77, 1.0]))
        np.testing.assert_array_equal(_row_nanquantile(a, q), np.nanquantile(a, q, axis=1))
