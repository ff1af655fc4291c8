"""The table of excluded-area classes (:mod:`fibroquant.exclusions`) and what reads it: the
tile kernel's per-bit counts, the counts and measurements, the column schema, the confidence
flag, the overlays, and a new class added to the table alone, measured end to end."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

import fibroquant
from fibroquant import exclusions, kernels, schema, tiles
from fibroquant.collagen import CollagenRule
from fibroquant.confidence import qc_flags
from fibroquant.config import Settings
from fibroquant.errors import FibroquantError
from fibroquant.exclusions import CLASSES, Excluded
from fibroquant.measure import Measurements, TileCounts
from fibroquant.report import EXCLUSION_COLOURS, _exclusion_masks
from fibroquant.stains import od_lut
from fibroquant.synthetic import SectionParams, make_section


def test_the_schema_has_one_exclusion_column_per_class_in_table_order():
    cols = [c for c in schema.SLIDES if c.kind == "exclusion"]
    assert [c.name for c in cols] == [c.column for c in CLASSES]
    for col, cls in zip(cols, CLASSES, strict=True):
        assert (col.unit, col.label, col.description) == ("mm²", f"{cls.name} mm²",
                                                          cls.description)
    assert {c.name: c.colour for c in CLASSES} == EXCLUSION_COLOURS


def test_bits_are_single_distinct_and_the_kernel_roles_are_filled():
    bits = [c.bit for c in CLASSES if c.rule != "tiles"]
    assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 and 1 < b < 256 for b in bits)
    assert (exclusions.BAND.bit, exclusions.WALL.bit) == (kernels.FLAG_BAND, kernels.FLAG_WALL)
    with pytest.raises(ValueError, match="distinct single bits"):
        exclusions._check((*CLASSES, Excluded("x", "x", (0, 0, 0), 8)))
    with pytest.raises(ValueError, match="rule band"):
        exclusions._check((*CLASSES, Excluded("x", "x", (0, 0, 0), 128, "wall")))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.key)
def test_large_exclusions_count_only_the_marked_classes(cls):
    # 0.2 mm² excluded beside 1 mm² of tissue: 17 % of the section, over the 10 % limit
    record = {"status": "ok", "tissue_area_mm2": 1.0, cls.column: 0.2}
    assert ("large exclusions" in qc_flags(record)) == cls.large
    assert {c.key for c in CLASSES if c.large} == {"fold", "bubble", "unfocused"}


def _class_tile(fl_cells: np.ndarray, cell: int = 4):
    """A uniform grey tile over a class map of ``fl_cells`` (cell x cell pixels a cell) whose
    threshold no pixel passes: every count is known from the class bits alone."""
    th, tw = fl_cells.shape
    rgb = np.full((th * cell, tw * cell, 3), 180, np.uint8)
    lut = od_lut((240.0, 240.0, 240.0))
    unmix = np.array([0.2, 0.9, 0.3], np.float32)
    thr = np.full((th, tw), np.inf, np.float32)
    rows = tiles.index_map(0, th * cell, cell, th)
    cols = tiles.index_map(0, tw * cell, cell, tw)
    return rgb, lut, unmix, fl_cells, thr, rows, cols


def test_the_kernel_counts_every_class_from_its_bit():
    # lumen+fold overlap (both counted), capsule band, walls in and outside the band
    values = np.array([0, 1, 1 | 2, 1 | 4, 1 | 2 | 4, 4, 8, 16, 32, 8 | 16, 2], np.uint8)
    cells = np.random.default_rng(3).choice(values, (23, 17))
    rgb, lut, unmix, fl, thr, rows, cols = _class_tile(cells)
    px = 16  # pixels a cell
    want = {"tissue_px": px * int(((fl & 1) != 0).sum() - ((fl & 5) == 5).sum()),
            "collagen_px": 0, "capsule_px": 0,
            "vessel_wall_px": px * int(((fl & 5) == 5).sum())}  # no collagen: band walls too
    for c in exclusions.by_rule("area"):
        want[c.count] = px * int(((fl & c.bit) != 0).sum())
    assert want["lumen_px"] > 0 and want["fold_px"] > 0 and want["bubble_px"] > 0
    fused = kernels.measure_tile_fused(rgb, lut, unmix, (), 0.0, fl, thr, rows, cols, 4, 0)
    rule = CollagenRule(lut, unmix, (), 0.0, 0, 0, 0)
    ref = tiles.measure_tile_reference(rgb, rule, fl, thr, rows, cols, 4, 0)
    assert fused.counts == want
    assert ref.counts == want


def test_an_unfocused_tile_keeps_its_areas_and_gives_up_its_tissue():
    tile = TileCounts(100, 7, 3.5, {"capsule": 5, "vessel_wall": 6, "lumen": 2, "bubble": 1})
    out = tile.out_of_focus()
    assert (out.tissue_px, out.collagen_px, out.collagen_od_sum) == (0, 0, 0.0)
    assert out.excluded_px == {"lumen": 2, "bubble": 1, "unfocused": 111}
    total = tile + out
    assert total.excluded_px["lumen"] == 4 and total.tissue_px == 100


def test_measurements_have_a_column_per_class():
    counts = TileCounts(1000, 100, 50.0, {"fold": 40, "lumen": 10})
    m = Measurements.from_counts(counts, 2.0)
    cols = m.columns()
    assert list(cols) == ["tissue_area_mm2", "collagen_area_mm2", "cpa_percent",
                          "collagen_od_mean", *(c.column for c in CLASSES)]
    assert cols["fold_area_mm2"] == m.fold_area_mm2 == pytest.approx(40 * 4 / 1e6)
    assert m.capsule_area_mm2 == 0.0 and m.cpa_percent == 10.0
    with pytest.raises(AttributeError, match="pigment_area_mm2"):
        _ = m.pigment_area_mm2
    assert pickle.loads(pickle.dumps(m)) == m


def _pigment(rgb, od, mpp, tissue):
    return od.min(axis=-1) > 0.6  # black in every channel


@pytest.mark.slow
def test_a_class_added_to_the_table_is_measured_end_to_end(monkeypatch):
    """A new class is one table entry with a detector: found on the thumbnail, taken out of
    tissue, counted by the kernel, measured in mm², flagged, drawn and hashed."""
    rgb, truth = make_section(SectionParams(shape=(512, 512), mpp=0.5), rng=1)
    dist = ndi.distance_transform_edt(truth.tissue_mask)
    cy, cx = np.unravel_index(np.argmax(dist), dist.shape)  # deep inside the tissue
    yy, xx = np.mgrid[:512, :512]
    pigment = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 20**2) & truth.tissue_mask
    assert pigment.sum() > 1000
    rgb = rgb.copy()
    rgb[pigment] = (40, 35, 30)
    before = fibroquant.analyze(rgb, mpp=0.5)
    hash_before = Settings().settings_hash()
    new = Excluded("pigment", "black pigment", (0, 160, 120), 64, large=True,
                   detect=_pigment)
    monkeypatch.setattr(exclusions, "CLASSES", (*CLASSES, new))
    after = fibroquant.analyze(rgb, mpp=0.5)
    area = int(pigment.sum()) * 0.25 / 1e6
    assert after.measurements.pigment_area_mm2 == pytest.approx(area, rel=0.02)
    assert after.to_record()["pigment_area_mm2"] == after.measurements.pigment_area_mm2
    assert after.measurements.tissue_area_mm2 == pytest.approx(
        before.measurements.tissue_area_mm2 - area, rel=0.002)
    assert "large exclusions" in qc_flags({"tissue_area_mm2": area, "pigment_area_mm2": area})
    shown = _exclusion_masks(after.flags, after.excluded_mask)
    assert shown["pigment"].sum() == pytest.approx(pigment.sum(), rel=0.05)
    assert Settings().settings_hash() != hash_before  # stored results are measured anew
    black = rgb.copy()
    black[truth.section_mask] = (40, 35, 30)
    with pytest.raises(FibroquantError, match=r"all excluded: pigment [\d,]+ µm²"):
        fibroquant.analyze(black, mpp=0.5)
    assert replace(new, detect=None) not in exclusions.detected()


def test_overlay_names_no_unfocused_tiles_a_slide_does_not_have():
    """Excluded pixels no class bit claims (the bits are coarser than the masks) are the tiles
    left out only when there are some; else they join the class beside them, or the largest."""
    from fibroquant.exclusions import by_rule

    lumen = next(c for c in CLASSES if c.name == "lumen")
    flags = np.zeros((40, 40), np.uint8)
    flags[10:20, 10:20] = lumen.bit
    excluded = np.zeros((40, 40), bool)
    excluded[9:21, 9:21] = True  # a pixel wider than the lumen's bits all round
    excluded[35:37, 35:37] = True  # far from any class
    shown = _exclusion_masks(flags, excluded, tiles_left_out=False)
    assert list(shown) == ["lumen"]
    assert shown["lumen"].sum() == excluded.sum()
    tiles = by_rule("tiles")[0].name
    assert set(_exclusion_masks(flags, excluded)) == {"lumen", tiles}
    assert _exclusion_masks(flags, excluded)[tiles].sum() == 12 * 12 - 100 + 4
