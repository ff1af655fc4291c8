"""Reading people's annotations: masks, QuPath GeoJSON, annotator layouts."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from fibroquant.annotations import (
    AnnotationError,
    discover,
    read_annotation,
    read_geojson,
    read_mask,
    resample_nearest,
)
from fibroquant.report import mask_to_geojson
from fibroquant.synthetic import SectionParams, make_section


@pytest.fixture(scope="module")
def section():
    return make_section(SectionParams(shape=(256, 256), fibrosis=0.7, n_lumens=3), rng=3)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


@pytest.mark.parametrize("on", [1, 255])
def test_dense_mask_0_1_and_0_255(tmp_path, on):
    truth = np.zeros((20, 30), bool)
    truth[5:9, 3:20] = True
    a = read_mask(_png(tmp_path / "x.png", truth.astype(np.uint8) * on), person="AB")
    np.testing.assert_array_equal(a.collagen, truth)
    assert a.labelled.all()
    assert a.dense
    assert a.tissue is None
    assert a.person == "AB"


def test_sparse_label_image(tmp_path):
    labels = np.zeros((10, 10), np.uint8)
    labels[1:3, 1:5] = 2  # 8 collagen px
    labels[6:9, 2:4] = 1  # 6 not-collagen px
    a = read_mask(_png(tmp_path / "x.png", labels))
    assert a.collagen.sum() == 8
    assert a.labelled.sum() == 14
    assert not a.dense


def test_tiff_mask(tmp_path):
    import tifffile

    truth = np.eye(12, dtype=bool)
    tifffile.imwrite(tmp_path / "x.tif", truth.astype(np.uint8) * 255)
    np.testing.assert_array_equal(read_annotation(tmp_path / "x.tif").collagen, truth)


def test_bad_masks_name_the_file(tmp_path):
    grey = np.arange(100, dtype=np.uint8).reshape(10, 10)
    with pytest.raises(AnnotationError, match=r"x\.png: a mask must hold 0/1 or 0/255"):
        read_mask(_png(tmp_path / "x.png", grey))
    colour = np.zeros((5, 5, 3), np.uint8)
    colour[..., 2] = 255
    with pytest.raises(AnnotationError, match=r"c\.png: a mask must be single-channel"):
        read_mask(_png(tmp_path / "c.png", colour))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AnnotationError, match=r"broken\.png: not a readable PNG"):
        read_mask(tmp_path / "broken.png")
    (tmp_path / "bad.geojson").write_text("{", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"bad\.geojson: not a readable GeoJSON"):
        read_geojson(tmp_path / "bad.geojson", (5, 5))
    with pytest.raises(AnnotationError, match=r"a GeoJSON annotation needs the image's size"):
        read_annotation(tmp_path / "bad.geojson")


@pytest.mark.parametrize("scale", [1, 4])
def test_geojson_round_trip_with_holes(tmp_path, section, scale):
    """analyze's QuPath export read back gives the same masks, lumens (holes) included."""
    _, truth = section
    tissue = truth.tissue_mask
    collagen = truth.collagen_mask
    assert (~tissue & truth.section_mask).any()  # lumens make holes
    doc = mask_to_geojson(tissue, collagen, scale=scale, slide_name="s", min_area_px=0)
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(doc), encoding="utf-8")
    a = read_geojson(path, tissue.shape, scale=scale)
    np.testing.assert_array_equal(a.tissue, tissue | collagen)
    np.testing.assert_array_equal(a.collagen, collagen & tissue)
    np.testing.assert_array_equal(a.labelled, tissue | collagen)  # dense inside the tissue
    assert not a.dense


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_qupath_features_list_multipolygon_and_classes(tmp_path):
    """A list of QuPath features: a MultiPolygon of collagen with a hole, a 'Not collagen'
    region, an 'Ignore' region over part of it; full-resolution coordinates, grid 2x coarser."""
    feats = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [_square(0, 0, 20, 20), _square(4, 4, 8, 8)], [_square(40, 0, 60, 20)]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Collagen"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            _square(0, 40, 40, 60)]},
         "properties": {"classification": {"name": "Not collagen", "color": [1, 2, 3]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            _square(0, 40, 10, 60)]}, "properties": {"classification": {"name": "Ignore"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]},
         "properties": {"classification": {"name": "Collagen"}}},
    ]
    path = tmp_path / "img.geojson"
    path.write_text(json.dumps(feats), encoding="utf-8")
    a = read_geojson(path, (40, 40), scale=2.0)
    # collagen: 10x10 minus the 2x2 hole, plus 10x10 (grid px); labelled adds 20x10 - 5x10
    assert a.collagen.sum() == 100 - 4 + 100
    assert a.labelled.sum() == 196 + 200 - 50
    assert not a.dense
    assert a.tissue is None
    assert not a.collagen[2:4, 2:4].any()  # the hole


def test_geojson_collagen_only_is_dense(tmp_path):
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(2, 2, 5, 6)]},
         "properties": {"classification": {"name": "collagen"}}}]}
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(doc), encoding="utf-8")
    a = read_geojson(path, (10, 10))
    assert a.dense
    assert a.labelled.all()
    assert a.collagen.sum() == 12


def test_resample_nearest_exact_on_integer_factors():
    m = np.zeros((4, 6), bool)
    m[1, 2] = True
    up = resample_nearest(m, (8, 12))
    np.testing.assert_array_equal(up, np.kron(m, np.ones((2, 2), bool)))
    np.testing.assert_array_equal(resample_nearest(up, (4, 6)), m)


def test_discover_layouts(tmp_path):
    m = np.zeros((4, 4), np.uint8)
    stems = ["s1", "s1.b", "s2"]
    # one folder per person
    for who in ("AB", "CD"):
        _png(tmp_path / "people" / who / "s1.png", m)
        _png(tmp_path / "people" / who / "s1.b.png", m)
    _png(tmp_path / "people" / "AB" / "s2.png", m)
    (tmp_path / "people" / "AB" / "notes.txt").write_text("x")
    found = discover(tmp_path / "people", stems)
    assert list(found) == ["s1", "s1.b", "s2"]
    assert set(found["s1"]) == {"AB", "CD"}
    assert set(found["s2"]) == {"AB"}
    assert found["s1.b"]["CD"].name == "s1.b.png"  # the longer stem wins
    # a single person's flat folder: the person is the folder
    _png(tmp_path / "JK" / "s2.png", m)
    assert discover(tmp_path / "JK", stems) == {"s2": {"JK": tmp_path / "JK" / "s2.png"}}
    # a file suffix per person
    for who in ("AB", "CD"):
        _png(tmp_path / "flat" / f"s2_{who}.png", m)
    assert set(discover(tmp_path / "flat", stems)["s2"]) == {"AB", "CD"}


def test_discover_errors(tmp_path):
    with pytest.raises(AnnotationError, match="annotation folder not found"):
        discover(tmp_path / "missing", ["a"])
    m = np.zeros((4, 4), np.uint8)
    _png(tmp_path / "AB" / "a.png", m)
    (tmp_path / "AB" / "a.geojson").write_text("[]")
    with pytest.raises(AnnotationError, match=r"a second annotation of 'a' by 'AB'"):
        discover(tmp_path, ["a"])
