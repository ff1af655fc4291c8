"""The library face: ``fibroquant.analyze`` and its typed result."""

from __future__ import annotations

import dataclasses
import doctest
import json

import numpy as np
import pytest

import fibroquant
from fibroquant.config import Settings
from fibroquant.pipeline import analyze_slide, calibrate_slide
from fibroquant.slides import ArraySlide, open_slide
from fibroquant.synthetic import SectionParams, make_section


@pytest.fixture(scope="module")
def section():
    return make_section(SectionParams(shape=(512, 512), mpp=0.5), rng=1)


def test_analyze_docstring_example_runs():
    result = doctest.testmod(fibroquant, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4
    assert result.failed == 0


@pytest.mark.slow
def test_array_path_and_slide_give_one_result(section, tmp_path):
    import cv2

    rgb, truth = section
    png = tmp_path / "s.png"
    cv2.imwrite(str(png), rgb[..., ::-1])
    results = [fibroquant.analyze(rgb, mpp=0.5), fibroquant.analyze(png, mpp=0.5),
               fibroquant.analyze(ArraySlide(rgb, 0.5))]
    records = [json.dumps({k: v for k, v in r.to_record().items()
                           if k not in ("seconds", "format")}) for r in results]  # NaN == NaN
    assert records[1] == records[0]
    assert records[2] == records[0]
    r = results[0]
    assert r.measurements.cpa_percent == pytest.approx(truth.cpa_percent, abs=1.5)
    assert r.collagen_mask.shape == r.tissue_mask.shape == (512, 512)
    assert r.mask_mpp == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seconds = 0.0  # type: ignore[misc]


def test_record_is_flat_and_matches_the_typed_fields(section):
    rgb, _ = section
    r = fibroquant.analyze(rgb, mpp=0.5, settings=Settings())
    rec = r.to_record()
    assert all(isinstance(v, int | float | str) for v in rec.values())
    assert rec["tissue_area_mm2"] == r.measurements.tissue_area_mm2
    assert rec["threshold_od"] == r.threshold.threshold_od
    assert rec["level"] == r.geometry.level
    assert rec["stain_source"] == r.stains.source
    assert rec["stain_warning"] == "; ".join(r.warnings)


def test_stain_argument_and_bad_inputs(section):
    rgb, _ = section
    masson = fibroquant.analyze(rgb, mpp=0.5, stain="masson")
    assert masson.stain == "masson"
    assert masson.stains.stains.collagen == "aniline-blue"
    with pytest.raises(ValueError, match="give mpp"):
        fibroquant.analyze(rgb)
    with pytest.raises(ValueError, match="stain"):
        fibroquant.analyze(rgb, mpp=0.5, stain="h&e")
    with pytest.raises(ValueError, match="give mpp"):
        open_slide(rgb)
    with pytest.raises(ValueError, match="its own resolution"):
        fibroquant.analyze(ArraySlide(rgb, 0.5), mpp=0.25)
    assert open_slide(rgb, mpp=0.25).mpp == 0.25


@pytest.mark.slow
def test_calibration_alone_gives_the_analysis_calibration(section):
    """``fibroquant stains`` reads the calibration step only: it equals the full analysis's."""
    rgb, _ = section
    s = Settings()
    cal = calibrate_slide(ArraySlide(rgb, 0.5), s)
    full = analyze_slide("x.png", s, slide=ArraySlide(rgb, 0.5))
    assert cal.threshold == full.threshold
    assert cal.qc == full.qc
    np.testing.assert_array_equal(cal.stains.stains.vectors, full.stains.stains.vectors)
    assert cal.warnings == full.warnings
