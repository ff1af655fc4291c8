"""Tests of fibroquant.report: overlays, PNG/xlsx/GeoJSON writers, plots and the HTML report."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pandas as pd
import pytest
from shapely.geometry import shape
from skimage.segmentation import find_boundaries

from fibroquant.report import (
    COLLAGEN_OUTLINE_ON_BLUE_RGB,
    COLLAGEN_OUTLINE_ON_RED_RGB,
    TISSUE_OUTLINE_RGB,
    format_p,
    mask_to_geojson,
    plot_groups,
    plot_slides,
    plot_stain_qc,
    qc_overlay,
    write_geojson,
    write_mask_geojson,
    write_png,
    write_report_html,
    write_xlsx,
)

NASTY = '<b>&"x"'


# --------------------------------------------------------------------------------------------
# fixtures: small hand-made tables
# --------------------------------------------------------------------------------------------
@pytest.fixture
def slides() -> pd.DataFrame:
    rows = [
        # slide, mouse, group, status, error, cpa, tissue, angle, collagen level, warning
        ("c1_s1.tif", "C1", "control", "ok", "", 8.1, 20.0, 2.0, 0.55, ""),
        ("c1_s2.tif", "C1", "control", "ok", "", 7.5, 18.0, 3.1, 0.52, ""),
        ("c2_s1.tif", "C2", "control", "ok", "", 9.3, 22.0, 1.5, 0.58, ""),
        ("c3_s1.tif", "C3", "control", "ok", "", 6.9, 25.0, 2.2, 0.50, ""),
        ("t1_s1.tif", "T1", "MSC", "ok", "", 4.2, 21.0, 2.7, 0.49, ""),
        (NASTY, "T1", "MSC", "ok", "", 4.8, 19.0, 11.5, 0.31, "stain angle 11.5° > 8°"),
        ("t2_s1.tif", "T2", "MSC", "ok", "", 5.1, 23.0, 2.9, 0.53, ""),
        ("t3_s1.tif", "T3", "MSC", "ok", "", 3.9, 20.5, 1.9, 0.51, ""),
        ("broken.ndpi", "T3", "MSC", "failed", "truncated file <EOF>", math.nan, math.nan,
         math.nan, math.nan, ""),
    ]
    cols = ["slide", "mouse", "group", "status", "error", "cpa_percent", "tissue_area_mm2",
            "stain_angle_deg", "collagen_level_od", "stain_warning"]
    df = pd.DataFrame(rows, columns=cols)
    df["collagen_area_mm2"] = df["cpa_percent"] * df["tissue_area_mm2"] / 100
    df["mpp"] = 0.46
    df["analysis_mpp"] = 1.84
    df["collagen_od_mean"] = df["collagen_level_od"] * 1.1
    df["lumen_area_mm2"] = 0.8
    df["capsule_area_mm2"] = 0.3
    for name in ("fold", "vessel_wall", "unfocused", "bubble"):  # every exclusion column
        df[f"{name}_area_mm2"] = 0.0
    df["stain"] = "sirius-red"
    df["seconds"] = 12.3
    df["batch"] = "2024-05"  # extra sample-sheet column
    return df


@pytest.fixture
def mice(slides: pd.DataFrame) -> pd.DataFrame:
    ok = slides[slides["status"] == "ok"]
    agg = ok.groupby(["mouse", "group"], sort=False).agg(
        n_slides=("slide", "size"),
        tissue_area_mm2=("tissue_area_mm2", "sum"),
        collagen_area_mm2=("collagen_area_mm2", "sum"),
        cpa_mean_of_slides_percent=("cpa_percent", "mean"),
        cpa_sd_of_slides=("cpa_percent", "std"),
    ).reset_index()
    agg["cpa_percent"] = 100 * agg["collagen_area_mm2"] / agg["tissue_area_mm2"]
    return agg


@pytest.fixture
def groups() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "group": ["control", "MSC"],
            "n_mice": [3, 3],
            "cpa_mean_percent": [7.9, 4.4],
            "cpa_sd": [1.2, 0.6],
            "cpa_sem": [0.69, 0.35],
            "cpa_median": [7.8, 4.4],
            "diff_vs_control_pp": [math.nan, -3.5],
            "diff_ci_low_pp": [math.nan, -5.9],
            "diff_ci_high_pp": [math.nan, -1.1],
            "change_vs_control_percent": [math.nan, -44.3],
            "welch_p": [math.nan, 0.0213],
            "mannwhitney_p": [math.nan, 0.1],
            "hedges_g": [math.nan, -2.9],
        }
    )


SETTINGS = {"stain": {"preset": "sirius-red", "vector": [0.14, 0.83, 0.54]},
            "tissue": {"min_area_um2": 5000.0, "exclude_capsule": True},
            "collagen": {"threshold_od": 0.2}}
PROVENANCE = {"fibroquant_version": "0.1.0", "python": "3.11.7",
              "packages": {"numpy": "2.4", "opencv": "5.0"}, "settings_hash": "abc123"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def test_format_p() -> None:
    assert format_p(0.01234) == "0.0123"
    assert format_p(0.5) == "0.500"
    assert format_p(0.00099) == "<0.001"
    assert format_p(float("nan")) == "–"
    assert format_p(None) == "–"


# --------------------------------------------------------------------------------------------
# qc_overlay / write_png
# --------------------------------------------------------------------------------------------
def _colour_mask(img: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(img == np.array(colour, dtype=np.uint8), axis=2)


def test_qc_overlay_outlines_exactly_on_mask_boundaries() -> None:
    thumb = np.full((40, 50, 3), 200, dtype=np.uint8)
    tissue = np.zeros((40, 50), dtype=bool)
    tissue[5:35, 6:44] = True
    collagen = np.zeros_like(tissue)
    collagen[15:25, 18:30] = True
    out = qc_overlay(thumb, tissue, collagen)

    assert out.shape == thumb.shape
    assert out.dtype == np.uint8
    assert np.array_equal(_colour_mask(out, TISSUE_OUTLINE_RGB),
                          find_boundaries(tissue, mode="inner"))
    assert np.array_equal(_colour_mask(out, COLLAGEN_OUTLINE_ON_RED_RGB),
                          find_boundaries(collagen, mode="inner"))
    # everything else untouched, and the input is not modified
    drawn = find_boundaries(tissue, mode="inner") | find_boundaries(collagen, mode="inner")
    assert np.all(out[~drawn] == 200)
    assert np.all(thumb == 200)


def test_qc_overlay_resizes_masks_hatches_exclusions_and_picks_colour_for_blue() -> None:
    thumb = np.full((80, 100, 3), 230, dtype=np.uint8)
    thumb[20:40, 20:40] = (40, 60, 170)  # blue collagen (Masson trichrome)
    tissue = np.zeros((40, 50), dtype=bool)  # half resolution
    tissue[5:35, 5:45] = True
    collagen = np.zeros_like(tissue)
    collagen[10:20, 10:20] = True
    excluded = np.zeros_like(tissue)
    excluded[25:35, 30:45] = True
    out = qc_overlay(thumb, tissue, collagen, excluded_mask=excluded)

    assert out.shape == (80, 100, 3)
    assert out.dtype == np.uint8
    big_collagen = np.zeros((80, 100), dtype=bool)
    big_collagen[20:40, 20:40] = True
    assert np.array_equal(_colour_mask(out, COLLAGEN_OUTLINE_ON_BLUE_RGB),
                          find_boundaries(big_collagen, mode="inner"))
    region = out[52:68, 62:88]  # inside the excluded block, away from the tissue outline
    assert np.all(region < 230)  # tinted towards grey
    assert len(np.unique(region.reshape(-1, 3), axis=0)) == 2  # tint + hatch lines


def test_qc_overlay_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="dtype"):
        qc_overlay(np.zeros((4, 4, 3), np.float32), np.ones((4, 4), bool), np.ones((4, 4), bool))


@pytest.mark.parametrize("name", ["mask.png", "maske_überprüft_µ.png"])
def test_write_png_roundtrip_rgb_and_mask(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    mask = rng.random((17, 23)) > 0.5
    write_png(tmp_path / "sub" / f"rgb_{name}", rgb)
    write_png(tmp_path / "sub" / name, mask)

    back = cv2.imdecode(np.fromfile(tmp_path / "sub" / f"rgb_{name}", np.uint8),
                        cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back[:, :, ::-1], rgb)
    back_mask = cv2.imdecode(np.fromfile(tmp_path / "sub" / name, np.uint8),
                             cv2.IMREAD_UNCHANGED)
    assert back_mask.ndim == 2
    assert back_mask.dtype == np.uint8
    assert set(np.unique(back_mask)) <= {0, 255}
    assert np.array_equal(back_mask == 255, mask)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted([name, f"rgb_{name}"])


def test_write_png_rejects_float(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        write_png(tmp_path / "x.png", np.zeros((3, 3), np.float32))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------
def _masks_with_holes() -> tuple[np.ndarray, np.ndarray]:
    tissue = np.zeros((60, 80), dtype=bool)
    tissue[5:55, 5:45] = True  # part 1
    tissue[20:30, 15:25] = False  # lumen (hole)
    tissue[22:28, 17:23] = True  # island in the lumen
    tissue[40:42, 30:33] = False  # small hole
    tissue[10:50, 55:75] = True  # part 2
    tissue[12:20, 60:62] = False  # hole touching nothing
    collagen = np.zeros_like(tissue)
    collagen[8:12, 8:40] = True  # septum
    collagen[35:50, 8:11] = True
    collagen[36:49, 9:10] = False  # slit hole inside it
    yy, xx = np.mgrid[0:60, 0:80]
    collagen |= ((yy - 30) ** 2 + (xx - 65) ** 2 < 36) & tissue  # disc
    for k in range(6):  # diagonal fibre: pixels touching at corners only
        collagen[45 + k, 58 + k] = True
    return tissue, collagen


@pytest.mark.parametrize("scale", [1, 4, 2.5])
def test_mask_to_geojson_areas_holes_validity_and_coordinates(scale: float) -> None:
    tissue, collagen = _masks_with_holes()
    fc = mask_to_geojson(tissue, collagen, scale=scale, slide_name=NASTY, min_area_px=0)
    json.dumps(fc, allow_nan=False)  # serialisable, no NaN
    assert fc["type"] == "FeatureCollection"
    by_class = {f["properties"]["classification"]["name"]: f for f in fc["features"]}
    assert set(by_class) == {"Tissue", "Collagen"}
    h, w = tissue.shape
    for name, mask in (("Tissue", tissue), ("Collagen", collagen)):
        feature = by_class[name]
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert len(props["classification"]["color"]) == 3
        assert NASTY in props["name"]
        geom = shape(feature["geometry"])
        assert geom.is_valid
        expected = mask.sum() * scale**2
        assert geom.area == pytest.approx(expected, rel=0.01)
        ys, xs = np.nonzero(mask)
        minx, miny, maxx, maxy = geom.bounds
        assert (minx, miny) == pytest.approx((xs.min() * scale, ys.min() * scale))
        assert (maxx, maxy) == pytest.approx(((xs.max() + 1) * scale, (ys.max() + 1) * scale))
        assert maxx <= w * scale
        assert maxy <= h * scale
    tissue_geom = shape(by_class["Tissue"]["geometry"])
    holes = sum(len(p.interiors) for p in getattr(tissue_geom, "geoms", [tissue_geom]))
    assert holes == 3
    # the lumen is empty, the island inside it is tissue (full-resolution coordinates)
    from shapely.geometry import Point
    assert not tissue_geom.contains(Point(16 * scale, 21 * scale))
    assert tissue_geom.contains(Point(20 * scale, 25 * scale))


def test_mask_to_geojson_random_masks_are_exact() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        mask = rng.random((30, 40)) < rng.uniform(0.2, 0.8)
        fc = mask_to_geojson(mask, mask, scale=3, slide_name="r", min_area_px=0)
        for feature in fc["features"]:
            geom = shape(feature["geometry"])
            assert geom.is_valid
            assert geom.area == pytest.approx(mask.sum() * 9, rel=1e-9)


@pytest.mark.parametrize("shape_px", [(1, 1), (1, 6), (5, 1), (2, 2), (31, 40)])
def test_closure_grid_is_the_dilated_pixel_grid(shape_px: tuple[int, int]) -> None:
    # the grid built in place equals the 3 x 3 dilation of the grid holding the pixels alone
    from fibroquant.report import _closure_grid

    rng = np.random.default_rng(3)
    for p in (0.0, 0.15, 0.5, 0.85, 1.0):
        mask = rng.random(shape_px) < p
        h, w = shape_px
        ref = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
        ref[1::2, 1::2] = mask
        ref = cv2.dilate(ref, np.ones((3, 3), np.uint8))
        np.testing.assert_array_equal(_closure_grid(mask), ref)


def test_mask_to_geojson_min_area_and_empty() -> None:
    tissue = np.zeros((20, 20), dtype=bool)
    tissue[2:18, 2:18] = True
    collagen = np.zeros_like(tissue)
    collagen[5, 5] = True  # 1 px speck: dropped
    collagen[10:12, 10:12] = True  # 4 px: kept
    fc = mask_to_geojson(tissue, collagen, scale=1, slide_name="s", min_area_px=4)
    col = next(f for f in fc["features"] if f["properties"]["classification"]["name"] == "Collagen")
    assert shape(col["geometry"]).area == pytest.approx(4)
    fc = mask_to_geojson(tissue, np.zeros_like(tissue), scale=1, slide_name="s")
    assert [f["properties"]["classification"]["name"] for f in fc["features"]] == ["Tissue"]
    with pytest.raises(ValueError, match="scale"):
        mask_to_geojson(tissue, collagen, scale=0, slide_name="s")


def test_write_geojson_roundtrip(tmp_path: Path) -> None:
    tissue, collagen = _masks_with_holes()
    fc = mask_to_geojson(tissue, collagen, scale=2, slide_name="s1")
    path = tmp_path / "s1.geojson"
    write_geojson(path, fc)
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(fc))
    assert [p.name for p in tmp_path.iterdir()] == ["s1.geojson"]


@pytest.mark.parametrize("packed", [False, True])
def test_write_mask_geojson_equals_the_feature_collection(tmp_path: Path, packed: bool) -> None:
    """The streamed file is mask_to_geojson's FeatureCollection, from arrays or bits; a class
    with an empty mask is left out of both."""
    from fibroquant.bitmask import BitMask

    tissue, collagen = _masks_with_holes()
    path = tmp_path / "s1.geojson"
    for col in (collagen, np.zeros_like(collagen)):
        fc = mask_to_geojson(tissue, col, scale=2.5, slide_name="s1 é")
        given = (BitMask.pack(tissue), BitMask.pack(col)) if packed else (tissue, col)
        write_mask_geojson(path, *given, scale=2.5, slide_name="s1 é")
        assert json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(fc))
    assert len(fc["features"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s1.geojson"]
    with pytest.raises(ValueError, match="scale"):
        write_mask_geojson(path, tissue, collagen, scale=float("nan"), slide_name="s")


# --------------------------------------------------------------------------------------------
# xlsx
# --------------------------------------------------------------------------------------------
def test_write_xlsx_sheets_and_rows(tmp_path: Path, slides: pd.DataFrame, mice: pd.DataFrame,
                                    groups: pd.DataFrame) -> None:
    evil = slides.copy()
    evil.loc[0, "slide"] = "=HYPERLINK(\"x\")"
    path = tmp_path / "results.xlsx"
    evil.loc[1, "cpa_percent"] = 7.123456789012  # full precision kept
    many = [{"slide": f"s{i:04d}.svs", "fingerprint": "f" * 64, "size_bytes": 10**9}
            for i in range(400)]  # a large study: its inputs' JSON is over Excel's cell limit
    path = tmp_path / "results.xlsx"
    write_xlsx(path, slides=evil, mice=mice, groups=groups, settings=SETTINGS,
               provenance={**PROVENANCE, "inputs": many}, summary="MSC lower.",
               warnings=["group 'MCS': 1 mouse"])
    wb = openpyxl.load_workbook(path)
    assert wb.sheetnames == ["summary", "slides", "mice", "groups", "settings", "provenance",
                             "inputs", "columns"]
    assert wb["slides"]["A2"].data_type == "s"  # not a formula
    ws = wb["slides"]
    assert ws.freeze_panes == "A2"
    assert ws.auto_filter.ref == f"A1:{openpyxl.utils.get_column_letter(ws.max_column)}10"
    header = [c.value for c in ws[1]]
    cpa = ws.cell(row=3, column=header.index("cpa_percent") + 1)
    assert cpa.value == 7.123456789012
    assert cpa.number_format == "0.00"
    assert "collagen area / tissue area" in ws.cell(row=1, column=header.index("cpa_percent")
                                                    + 1).comment.text
    summary = dict(zip(*zip(*[(r[0].value, r[1].value) for r in wb["summary"].iter_rows(
        min_row=2)], strict=True), strict=True))
    assert summary["comparison"] == "MSC lower."
    assert summary["warning 1"] == "group 'MCS': 1 mouse"
    assert summary["slides failed"] == 1
    assert wb["inputs"].max_row == 401
    assert max(len(str(c.value or "")) for row in wb["provenance"].iter_rows() for c in row) \
        < 32767

    sheets = pd.read_excel(path, sheet_name=None)
    assert len(sheets["slides"]) == len(slides)
    assert len(sheets["mice"]) == len(mice)
    assert len(sheets["groups"]) == len(groups)
    assert list(sheets["slides"].columns) == list(slides.columns)
    assert sheets["slides"]["slide"].iloc[5] == NASTY
    assert sheets["slides"]["cpa_percent"].iloc[0] == pytest.approx(8.1)
    assert pd.isna(sheets["groups"]["welch_p"].iloc[0])
    settings = dict(zip(sheets["settings"]["key"], sheets["settings"]["value"], strict=True))
    assert settings["tissue.min_area_um2"] == 5000
    assert settings["collagen.threshold_od"] == pytest.approx(0.2)
    assert json.loads(settings["stain.vector"]) == [0.14, 0.83, 0.54]
    prov = dict(zip(sheets["provenance"]["key"], sheets["provenance"]["value"], strict=True))
    assert prov["packages.numpy"] == 2.4 or str(prov["packages.numpy"]) == "2.4"
    assert len(sheets["provenance"]) == 5
    columns = sheets["columns"]
    assert set(columns["column"]) >= {"cpa_percent", "fold_area_mm2", "dunnett_p"}


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _assert_plot_files(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".png", ".svg"]
    png, svg = paths
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[0] > 400
    assert img.std() > 5  # not a blank canvas
    text = svg.read_text(encoding="utf-8")
    assert "<svg" in text
    assert len(text) > 2000


def test_plot_groups(tmp_path: Path, mice: pd.DataFrame, groups: pd.DataFrame) -> None:
    paths = plot_groups(mice, groups, tmp_path / "plots" / "cpa.groups", control="control")
    assert paths == [tmp_path / "plots" / "cpa.groups.png", tmp_path / "plots" / "cpa.groups.svg"]
    _assert_plot_files(paths)
    svg = paths[1].read_text(encoding="utf-8")
    assert "0.0213" in svg  # the Welch p bracket
    assert "CPA (% of tissue area)" in svg


def test_plot_groups_without_control_or_data(tmp_path: Path, mice: pd.DataFrame,
                                              groups: pd.DataFrame) -> None:
    _assert_plot_files(plot_groups(mice, groups, tmp_path / "a", control=None))
    empty = mice.iloc[0:0]
    paths = plot_groups(empty, groups.iloc[0:0], tmp_path / "b", control="control")
    assert all(p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize(("n", "grid"), [(11, (3, 4)), (5, (2, 3)), (4, (1, 4)), (1, (1, 1))])
def test_plot_traits_lays_panels_out_in_balanced_rows(tmp_path: Path, n: int,
                                                      grid: tuple[int, int]) -> None:
    """At most 4 panels a row, rows as even as they can be (11 traits: 4 + 4 + 3): the PNG's
    size is the grid's (2.2 x 2.1 in a panel at the plots' dpi)."""
    from fibroquant import report

    names = [f"trait_{i}_um" for i in range(n)]
    rng = np.random.default_rng(n)
    mice = pd.DataFrame({"mouse": [f"m{i}" for i in range(6)],
                         "group": ["control"] * 3 + ["MSC"] * 3,
                         **{t: rng.uniform(1, 5, 6) for t in names}})
    png = report.plot_traits(mice, pd.DataFrame(), tmp_path / "t", control="control",
                             traits=names)[0]
    h, w = cv2.imread(str(png)).shape[:2]
    rows, cols = grid
    assert (round(w / (2.2 * report._DPI)), round(h / (2.1 * report._DPI))) == (cols, rows)


def test_plot_traits_says_when_a_trait_has_no_value(tmp_path: Path) -> None:
    """A trait empty for every mouse (thin shares of masks too coarse to show a thin fibre)
    keeps its panel, saying so, instead of an empty axis with made-up ticks."""
    from fibroquant import report

    mice = pd.DataFrame({"mouse": ["a", "b", "c", "d"], "group": ["control"] * 2 + ["MSC"] * 2,
                         "thin_fibre_share_percent": np.nan,
                         "thick_fibre_share_percent": [40.0, 42.0, 30.0, 31.0]})
    svg = report.plot_traits(mice, pd.DataFrame(), tmp_path / "t", control="control")[1]
    assert svg.read_text(encoding="utf-8").count("no value") == 1


@pytest.mark.slow
def test_plot_slides_and_stain_qc(tmp_path: Path, slides: pd.DataFrame) -> None:
    _assert_plot_files(plot_slides(slides, tmp_path / "slides"))
    paths = plot_stain_qc(slides, tmp_path / "stain_qc")
    _assert_plot_files(paths)
    assert "stain warning" in paths[1].read_text(encoding="utf-8")
    # missing optional columns still give a (placeholder) figure
    bare = slides[["slide", "mouse", "group", "cpa_percent"]]
    assert all(p.stat().st_size > 0 for p in plot_stain_qc(bare, tmp_path / "bare_qc"))
    assert all(p.stat().st_size > 0 for p in plot_slides(bare, tmp_path / "bare_slides"))


def test_plot_slides_names_each_mouse_column(tmp_path: Path, slides: pd.DataFrame) -> None:
    svg = plot_slides(slides, tmp_path / "s")[1].read_text(encoding="utf-8")
    for label in ("C1", "C2", "C3", "T1", "T2", "T3", "control", "MSC"):  # (text as paths)
        assert f"<!-- {label} -->" in svg, label


def test_stain_qc_plot_shows_slides_of_another_stain(tmp_path: Path, slides: pd.DataFrame
                                                     ) -> None:
    """The slide with the stain warning is the point the plot exists for: a wrong-stain slide
    (measured, left out of the groups) is drawn and named; a failed one has no values."""
    he = slides.iloc[[0]].assign(slide="he_slide.svs", status="wrong-stain",
                                 stain_angle_deg=31.0, stain_warning="colours fit h&e")
    svg = plot_stain_qc(pd.concat([slides, he], ignore_index=True), tmp_path / "q")[1]
    text = svg.read_text(encoding="utf-8")
    assert "he_slide.svs" in text and "broken.ndpi" not in text


# --------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------
@pytest.fixture
def report_path(tmp_path: Path, slides: pd.DataFrame, mice: pd.DataFrame,
                groups: pd.DataFrame) -> Path:
    rng = np.random.default_rng(3)
    qc = {}
    for i, name in enumerate(slides.loc[slides["status"] == "ok", "slide"]):
        if i == 2:
            continue  # one slide without an overlay
        thumb = np.full((300, 1200, 3), 245, np.uint8)
        cv2.ellipse(thumb, (600, 150), (500, 120), 0, 0, 360, (235, 200, 120), -1)
        tissue = np.all(thumb != 245, axis=2)
        collagen = tissue & (rng.random(tissue.shape) < 0.03)
        thumb[collagen] = (190, 30, 60)
        path = tmp_path / "qc" / f"slide{i}.png"
        write_png(path, qc_overlay(thumb, tissue, collagen))
        qc[name] = path
    plots = plot_groups(mice, groups, tmp_path / "plots" / "groups", control="control")
    plots += plot_slides(slides, tmp_path / "plots" / "slides")
    plots += plot_stain_qc(slides, tmp_path / "plots" / "stain_qc")
    out = tmp_path / "report.html"
    write_report_html(
        out,
        title="CCl4 + MSC study <pilot>",
        slides=slides,
        mice=mice,
        groups=groups,
        omnibus={"test": "Welch ANOVA", "statistic": 12.3, "p": 0.0042},
        mixed={"method": "REML", "fixed": {"MSC": -3.4}, "p": 0.018, "n_mice": 6},
        summary="MSC-treated mice had 44 % less collagen than controls (Welch p = 0.021).",
        qc_images=qc,
        plots=plots,
        settings=SETTINGS,
        provenance=PROVENANCE,
        warnings=["1 slide failed & was left out", "stain angle high on <b>&\"x\""],
    )
    return out


@pytest.mark.slow
def test_report_html_self_contained_escaped_and_complete(report_path: Path,
                                                         slides: pd.DataFrame) -> None:
    text = report_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "http://" not in text
    assert "https://" not in text
    assert "<script" not in text.lower()
    assert NASTY not in text  # raw name never appears
    assert html.escape(NASTY) in text
    assert "<b>&" not in text
    for name in slides["slide"]:
        assert html.escape(name) in text
    assert "truncated file &lt;EOF&gt;" in text  # failed slide with its error
    assert text.count('<div class="card">') == (slides["status"] == "ok").sum()
    assert text.count("data:image/jpeg;base64,") == 7  # 8 ok slides, one without overlay
    assert text.count("data:image/png;base64,") == 3  # PNG plots preferred over SVG
    assert "0.0213" in text  # p-values with 3 significant digits
    assert "7.90" in text  # CPA with 2 dp
    assert "Mouse is the experimental unit".lower() in text.lower()
    assert "abc123" in text  # provenance
    from fibroquant import schema

    for col in schema.SLIDES:  # every exclusion column, under its schema label
        if col.kind == "exclusion":
            assert f"<th>{html.escape(col.label)}</th>" in text, col.name
    assert [p.name for p in report_path.parent.glob(".report.html*")] == []


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium binary on PATH (apt-get install chromium) to render "
                           "report.html")
def test_report_html_renders_in_headless_chromium(report_path: Path, slides: pd.DataFrame,
                                                  tmp_path: Path) -> None:
    binary = _chromium()
    assert binary is not None
    common = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"]
    dom = subprocess.run([*common, "--dump-dom", report_path.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in slides["slide"]:
        assert html.escape(name, quote=False) in dom.stdout, name
    assert "<b>&" not in dom.stdout
    shot = tmp_path / "report.png"
    run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000",
                          report_path.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img is not None
    assert img.shape[:2] == (3000, 1200)
    assert img.std() > 10  # something was drawn


def test_report_html_with_empty_tables(tmp_path: Path) -> None:
    empty = pd.DataFrame()
    out = tmp_path / "empty.html"
    write_report_html(out, title="empty", slides=pd.DataFrame({"slide": []}), mice=empty,
                      groups=empty, omnibus=None, mixed=None, summary="", qc_images={},
                      plots=[], settings={}, provenance={}, warnings=[])
    text = out.read_text(encoding="utf-8")
    assert "No measured slides" in text
    write_xlsx(tmp_path / "empty.xlsx", slides=empty, mice=empty, groups=empty, settings={},
               provenance={})
    assert openpyxl.load_workbook(tmp_path / "empty.xlsx").sheetnames[:2] == ["summary", "slides"]


def test_wrong_stain_slides_are_counted_apart_from_failed_ones(tmp_path: Path,
                                                               slides: pd.DataFrame,
                                                               mice: pd.DataFrame,
                                                               groups: pd.DataFrame) -> None:
    """A slide of another stain is measured and left out, not failed: its own count in the
    report and the xlsx summary, its card badge without an empty reason, no failed row."""
    he = slides.iloc[[0]].assign(slide="he.svs", status="wrong-stain", error="", group="")
    both = pd.concat([slides, he], ignore_index=True)
    out = tmp_path / "r.html"
    write_report_html(out, title="t", slides=both, mice=mice, groups=groups, omnibus=None,
                      mixed=None, summary="", qc_images={}, plots=[], settings={},
                      provenance={}, warnings=[])
    text = out.read_text(encoding="utf-8")
    kpi = re.findall(r'<div class="v">(\d+)</div><div class="l">([^<]+)</div>', text)
    assert ("1", "slide of another stain") in kpi and ("1", "slide failed") in kpi
    failed = text[text.index('id="failed"'):]
    assert "broken.ndpi" in failed and "he.svs" not in failed
    assert '<span class="badge bad">wrong-stain</span>' in text
    card = text[text.index('<div class="name">he.svs</div>'):]
    assert re.search(r'<span class="cpa void">[\d.]+ % CPA</span>', card[:600])  # struck
    assert text.count('class="cpa void"') == 1
    write_report_html(out, title="t", slides=both, mice=mice, groups=groups, omnibus=None,
                      mixed=None, summary="", qc_images={}, plots=[], settings={},
                      provenance={}, warnings=[], keep_wrong_stain=True)  # counted: not struck
    assert 'class="cpa void"' not in out.read_text(encoding="utf-8")
    assert "mouse C1</div>" in text  # no group: no trailing separator
    write_xlsx(tmp_path / "r.xlsx", slides=both, mice=mice, groups=groups, settings={},
               provenance={})
    rows = {r[0].value: r[1].value for r in
            openpyxl.load_workbook(tmp_path / "r.xlsx")["summary"].iter_rows(min_row=2)}
    assert rows["slides failed"] == 1
    assert rows["slides of another stain"] == 1


def test_report_without_groups_has_no_statistics_and_counts_measured_mice(
        tmp_path: Path, slides: pd.DataFrame, mice: pd.DataFrame) -> None:
    """Without a sheet there is nothing compared: no Groups or Statistics sections; a failed
    file (its own "mouse" without a sheet) is not counted among the mice."""
    unmeasured = pd.DataFrame([{"mouse": "broken", "group": "", "n_slides": 0}])
    out = tmp_path / "r.html"
    write_report_html(out, title="t", slides=slides, mice=pd.concat([mice, unmeasured]),
                      groups=pd.DataFrame(), omnibus=None, mixed=None, summary="No sheet.",
                      qc_images={}, plots=[], settings={}, provenance={}, warnings=[])
    text = out.read_text(encoding="utf-8")
    assert 'id="statistics"' not in text and 'id="groups"' not in text
    assert 'href="#statistics"' not in text
    assert f'<div class="v">{len(mice)}</div><div class="l">mice</div>' in text


def test_write_qc_fills_collagen_colours_each_exclusion_and_adds_legend(tmp_path: Path) -> None:
    """Collagen filled in a colour against the stain, each exclusion its own colour, a band
    with name, legend and scale bar below the image; a JPEG."""
    from types import SimpleNamespace

    from fibroquant.exclusions import CLASSES
    from fibroquant.report import COLLAGEN_FILL_ON_RED_RGB, EXCLUSION_COLOURS, write_qc

    h, w = 200, 300
    thumb = np.full((h, w, 3), 240, np.uint8)
    tissue = np.zeros((h, w), bool)
    tissue[20:180, 20:280] = True
    collagen = np.zeros((h, w), bool)
    collagen[60:80, 40:260] = True
    thumb[collagen] = (200, 30, 60)  # Sirius-red collagen
    thumb[tissue & ~collagen] = (235, 190, 120)
    excluded = np.zeros((h, w), bool)
    excluded[120:160, 40:100] = True  # a lumen
    excluded[120:160, 200:260] = True  # an unfocused tile (no class bit)
    flags = np.zeros((h // 4, w // 4), np.uint8)  # low resolution, as the pipeline keeps it
    flags[30:40, 10:25] = next(c.bit for c in CLASSES if c.key == "lumen")
    analysis = SimpleNamespace(thumbnail=thumb, collagen_mask=collagen,
                               tissue_mask=tissue & ~excluded, excluded_mask=excluded,
                               mask_mpp=2.0, flags=flags)
    path = tmp_path / "qc" / "s1.jpg"
    write_qc(path, analysis, title="s1.svs")
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(int)
    assert img.shape[1] == w
    assert img.shape[0] > h + 20  # the legend band

    def near(px: np.ndarray, rgb: tuple[int, int, int], tol: float) -> bool:
        return bool(np.abs(px - np.array(rgb)).max() <= tol)

    fill = 0.4 * np.array([200, 30, 60]) + 0.6 * np.array(COLLAGEN_FILL_ON_RED_RGB)
    assert near(img[70, 150], tuple(fill), 12)
    base = 0.3 * np.array([235, 190, 120])
    lumen = base + 0.7 * np.array(EXCLUSION_COLOURS["lumen"])
    assert near(img[140, 70], tuple(lumen), 12)
    unfocused = base + 0.7 * np.array(EXCLUSION_COLOURS["unfocused"])
    assert near(img[140, 230], tuple(unfocused), 12)
    assert near(img[100, 150], (235, 190, 120), 12)  # parenchyma untouched
    band = img[h:]
    assert (band < 80).all(axis=2).sum() > 200  # text and the scale bar drawn in black


def test_write_qc_outlines_each_lumen_call_in_its_colour(tmp_path: Path) -> None:
    """The fibre traits' call on each lumen is outlined where the lumen lies (µm of the slide
    to overlay pixels), in its kind's colour, and the kinds drawn join the legend; a
    draft finished later (the overlay drawn beside the traits) is the same picture."""
    from types import SimpleNamespace

    from fibroquant.report import VESSEL_MARK_RGB, qc_draft, write_qc, write_qc_draft
    from fibroquant.traits import VesselCall

    h, w = 200, 300
    thumb = np.full((h, w, 3), 240, np.uint8)
    tissue = np.zeros((h, w), bool)
    tissue[10:190, 10:290] = True
    thumb[tissue] = (235, 190, 120)

    def square(x0: float, y0: float, side: float) -> np.ndarray:  # µm, mask_mpp 2
        return np.array([(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)],
                        np.float32)

    calls = (VesselCall("portal", 0.8, square(101, 101, 80)),      # px 50..90
             VesselCall("central", 0.7, square(301, 101, 80)),     # px 150..190
             VesselCall("unlined", float("nan"), square(103, 243, 60)))  # px 51..81, 121..151
    analysis = SimpleNamespace(thumbnail=thumb, collagen_mask=np.zeros((h, w), bool),
                               tissue_mask=tissue, excluded_mask=np.zeros((h, w), bool),
                               mask_mpp=2.0, vessels=calls)
    path = tmp_path / "s.jpg"
    write_qc(path, analysis, title="s")
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(int)

    def near(px: np.ndarray, rgb: tuple[int, int, int]) -> bool:
        return bool(np.abs(px - np.array(rgb)).max() <= 40)

    assert near(img[50, 70], VESSEL_MARK_RGB["portal"])  # top edge of the first square
    assert near(img[70, 90], VESSEL_MARK_RGB["portal"])  # its right edge
    assert near(img[70, 150], VESSEL_MARK_RGB["central"])
    assert near(img[121, 65], VESSEL_MARK_RGB["unlined"])
    assert near(img[70, 70], (235, 190, 120))  # inside: untouched
    # placed to the pixel: the unlined square's left edge runs through pixel column 51 (µm
    # 103 at 2 µm/px is the centre of pixel 51), a 3-px line (thickness 2) centred on it
    row = np.abs(img[135, 40:65] - np.array(VESSEL_MARK_RGB["unlined"])).max(axis=1) <= 12
    assert 40 + np.flatnonzero(row).mean() == pytest.approx(51, abs=0.34)
    band = img[h:]
    for kind in ("portal", "central", "unlined"):
        assert (np.abs(band - np.array(VESSEL_MARK_RGB[kind])).max(axis=2) <= 40).sum() > 10
    assert (np.abs(band - np.array(VESSEL_MARK_RGB["undecided"])).max(axis=2) <= 30).sum() == 0
    later = tmp_path / "later.jpg"
    draft = qc_draft(analysis, title="s")
    write_qc_draft(later, draft, calls)
    assert later.read_bytes() == path.read_bytes()


def test_retitle_qc_redraws_only_the_name(tmp_path: Path) -> None:
    """A renamed slide keeps its overlay under its new name: the name line changes, the
    picture does not (beyond JPEG re-encoding)."""
    from types import SimpleNamespace

    from fibroquant.report import qc_picture_height, retitle_qc, write_qc

    thumb = np.full((150, 420, 3), 235, np.uint8)
    tissue = np.zeros((150, 420), bool)
    tissue[20:130, 20:400] = True
    analysis = SimpleNamespace(thumbnail=thumb, collagen_mask=np.zeros_like(tissue),
                               tissue_mask=tissue, excluded_mask=np.zeros_like(tissue),
                               mask_mpp=1.0)
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    write_qc(a, analysis, title="old-name.tif")
    write_qc(b, analysis, title="a-much-longer-new-name.tif")
    retitle_qc(a, "a-much-longer-new-name.tif")
    ia, ib = (cv2.imread(str(p)).astype(int) for p in (a, b))
    top = qc_picture_height(*ia.shape[:2])
    assert top == 150
    assert np.abs(ia[:top] - ib[:top]).mean() < 1.5
    name_line = slice(top, top + 20)
    assert np.abs(ia[name_line] - ib[name_line]).mean() < 3  # now shows the new name


def test_report_thumbnail_of_a_large_jpeg_is_decoded_reduced_and_480_wide(tmp_path: Path) -> None:
    import base64

    import cv2

    from fibroquant.report import _jpeg_width, _read_image, _thumb_jpeg_uri, write_jpeg

    rng = np.random.default_rng(1)
    path = tmp_path / "qc.jpg"
    write_jpeg(path, rng.integers(0, 256, (1000, 2000, 3), dtype=np.uint8))
    assert _jpeg_width(np.fromfile(str(path), np.uint8)) == 2000
    assert _read_image(path, 480).shape == (250, 500, 3)  # 1/4: the smallest still >= 480
    assert _read_image(path).shape == (1000, 2000, 3)
    uri = _thumb_jpeg_uri(path)
    assert uri is not None
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8),
                         cv2.IMREAD_COLOR)
    assert thumb.shape == (240, 480, 3)


def test_gallery_follows_the_slides_table_gathered_by_group(tmp_path: Path,
                                                            slides: pd.DataFrame,
                                                            mice: pd.DataFrame,
                                                            groups: pd.DataFrame) -> None:
    """The QC cards in the table's order, gathered by group in the order the groups first
    appear (a run without a sheet lists 16_x before 114_x, naturally; sorted as text the
    gallery put 114_x first)."""
    shuffled = slides.iloc[[4, 0, 2, 7, 1]].assign(group=["MSC", "control", "control", "MSC",
                                                          "control"])
    out = tmp_path / "r.html"
    write_report_html(out, title="t", slides=shuffled, mice=mice, groups=groups, omnibus=None,
                      mixed=None, summary="", qc_images={}, plots=[], settings={},
                      provenance={}, warnings=[])
    names = re.findall(r'<div class="name">([^<]+)</div>', out.read_text(encoding="utf-8"))
    assert names == ["t1_s1.tif", "t3_s1.tif", "c1_s1.tif", "c2_s1.tif", "c1_s2.tif"]
    write_report_html(out, title="t", slides=shuffled.iloc[1:], mice=mice, groups=groups,
                      omnibus=None, mixed=None, summary="", qc_images={}, plots=[],
                      settings={}, provenance={}, warnings=[])
    names = re.findall(r'<div class="name">([^<]+)</div>', out.read_text(encoding="utf-8"))
    assert names == ["c1_s1.tif", "c2_s1.tif", "c1_s2.tif", "t3_s1.tif"]


def test_vessel_features_join_the_mask_geojson(tmp_path: Path) -> None:
    """Lumen calls as QuPath annotations in level-0 pixels, written with the masks or added
    later (spliced into the file): the same collection either way."""
    from fibroquant.errors import FibroquantError
    from fibroquant.report import (
        add_geojson_features,
        vessel_features,
        write_mask_geojson,
    )
    from fibroquant.traits import VesselCall

    tissue = np.zeros((40, 40), bool)
    tissue[5:35, 5:35] = True
    square = np.array([(20, 20), (40, 20), (40, 40), (20, 40)], np.float32)  # µm
    calls = [VesselCall("portal", 0.75, square), VesselCall("unlined", float("nan"), square),
             VesselCall("central", 0.9, square[:2])]  # two points: no polygon
    at_once, later = tmp_path / "a.geojson", tmp_path / "b.geojson"
    write_mask_geojson(at_once, tissue, np.zeros_like(tissue), scale=4.0, slide_name="s",
                       vessels=calls, mpp=0.5)
    write_mask_geojson(later, tissue, np.zeros_like(tissue), scale=4.0, slide_name="s")
    add_geojson_features(later, vessel_features(calls, 0.5, "s"))
    fc = json.loads(at_once.read_text())
    assert fc == json.loads(later.read_text())
    portal, unlined = fc["features"][1:]
    assert portal["properties"]["classification"]["name"] == "Portal vessel"
    assert portal["properties"]["measurements"] == {"confidence": 0.75}
    assert portal["properties"]["name"] == "s portal vessel"
    assert "measurements" not in unlined["properties"]
    assert portal["geometry"]["coordinates"][0][:2] == [[40.0, 40.0], [80.0, 40.0]]  # µm / 0.5
    empty = tmp_path / "c.geojson"
    write_mask_geojson(empty, np.zeros_like(tissue), np.zeros_like(tissue), scale=1.0,
                       slide_name="s")
    add_geojson_features(empty, vessel_features(calls[:1], 0.5, "s"))
    assert len(json.loads(empty.read_text())["features"]) == 1
    (tmp_path / "odd.geojson").write_text("{}")
    with pytest.raises(FibroquantError, match="not a GeoJSON FeatureCollection"):
        add_geojson_features(tmp_path / "odd.geojson", vessel_features(calls[:1], 0.5, "s"))
