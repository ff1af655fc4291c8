"""Whole runs (``analyze_folder``): what a run leaves on disk matches its tables.

Greyscale slides fail instead of entering the statistics; masks, GeoJSON and QC overlays are
rewritten or removed with each (re-)measurement and removal; a write failure fails one slide,
not the run; old output folders inside the slides folder are not slides; slides that share a
stem keep their own outputs and mice.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from fibroquant.config import Settings
from fibroquant.run import analyze_folder
from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

MPP = 0.5


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny sections (different seeds), made once per module."""
    d = tmp_path_factory.mktemp("bank")
    for i in range(3):
        rgb, _ = make_section(SectionParams(shape=(384, 384)), rng=200 + i)
        write_pyramid_tiff(d / f"s{i}.tif", rgb, MPP)
        np.save(d / f"s{i}.npy", rgb)
    return d


def run(slides: Path, out: Path, **kw):
    """``analyze_folder`` with default settings and one worker, slide warnings not errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze_folder(slides, out, Settings(), workers=1, **kw)


def table(out: Path, name: str = "slides.csv") -> pd.DataFrame:
    return pd.read_csv(out / name, keep_default_na=False)


# -- 1. greyscale slides ---------------------------------------------------------------------


def test_greyscale_slide_fails_and_others_carry_on(bank: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy2(bank / "s0.tif", slides / "s0.tif")
    rgb = np.load(bank / "s1.npy")
    grey = (rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])).astype(np.uint8)
    tifffile.imwrite(slides / "grey.tif", grey, photometric="minisblack",
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    summary = run(slides, out)
    assert summary.exit_code == 1 and summary.failed == 1
    rows = table(out).set_index("slide")
    assert rows.loc["s0.tif", "status"] == "ok"
    assert rows.loc["grey.tif", "status"] == "failed"
    assert rows.loc["grey.tif", "error"] == (
        "grey.tif: greyscale image, not a colour-stained section")
    mice = table(out, "mice.csv").set_index("mouse")
    assert mice.loc["grey", "n_slides"] == 0 and mice.loc["grey", "cpa_percent"] == ""
    assert mice.loc["s0", "n_slides"] == 1
    assert not (out / "qc" / "grey.png").exists()
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["failed_slides"] == [
        {"slide": "grey.tif", "error": "grey.tif: greyscale image, not a colour-stained section"}]
