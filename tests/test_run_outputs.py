"""Whole runs (``analyze_folder``): what a run leaves on disk matches its tables.

Greyscale slides fail instead of entering the statistics; masks, GeoJSON and QC overlays are
rewritten or removed with each (re-)measurement and removal; a write failure fails one slide,
not the run; old output folders inside the slides folder are not slides; slides that share a
stem keep their own outputs and mice.
"""

from __future__ import annotations

import json
import os
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


# -- 3. a write failure fails one slide, not the run ----------------------------------------


def _two_slides(bank: Path, slides: Path, names: tuple[str, ...] = ("s0", "s1")) -> Path:
    slides.mkdir(parents=True)
    for n in names:
        shutil.copy2(bank / f"{n}.tif", slides / f"{n}.tif")
    return slides


def test_write_failure_fails_that_slide_and_the_run_carries_on(bank: Path,
                                                               tmp_path: Path) -> None:
    slides = _two_slides(bank, tmp_path / "slides")
    out = tmp_path / "out"
    (out / "qc" / "s1.png").mkdir(parents=True)  # a folder where s1's overlay must go
    summary = run(slides, out)
    assert summary.exit_code == 1 and summary.processed == 2 and summary.failed == 1
    rows = table(out).set_index("slide")
    assert rows.loc["s0.tif", "status"] == "ok"
    err = rows.loc["s1.tif", "error"]
    assert rows.loc["s1.tif", "status"] == "failed"
    assert err.startswith("s1.tif: cannot write outputs: ") and "qc/s1.png" in err, err
    assert "\n" not in err
    run_json = json.loads((out / "run.json").read_text())  # this run's, not a previous one
    assert (run_json["processed"], run_json["failed"], run_json["exit_code"]) == (2, 1, 1)
    assert run_json["failed_slides"] == [{"slide": "s1.tif", "error": err}]
    # once the folder is out of the way, the next run measures s1 again (and only s1)
    (out / "qc" / "s1.png").rmdir()
    summary = run(slides, out)
    assert (summary.exit_code, summary.processed, summary.skipped) == (0, 1, 1)
    assert (out / "qc" / "s1.png").is_file()


def test_read_only_qc_folder_fails_slides_not_the_run(bank: Path, tmp_path: Path) -> None:
    slides = _two_slides(bank, tmp_path / "slides")
    out = tmp_path / "out"
    qc = out / "qc"
    qc.mkdir(parents=True)
    qc.chmod(0o555)
    try:
        if os.access(qc, os.W_OK):
            pytest.skip("chmod does not make a folder read-only here (running as root)")
        summary = run(slides, out)
    finally:
        qc.chmod(0o755)
    assert summary.exit_code == 1 and summary.failed == 2
    errors = table(out)["error"]
    assert all(e.startswith(f"s{i}.tif: cannot write outputs: ") for i, e in enumerate(errors))
    assert json.loads((out / "run.json").read_text())["failed"] == 2


def test_read_only_file_system_simulated(bank: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS on the QC overlays only (as root, chmod cannot make a folder read-only)."""
    import errno

    import fibroquant.report

    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if "/qc/" in str(dst):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(fibroquant.report.os, "replace", replace)
    slides = _two_slides(bank, tmp_path / "slides", ("s0",))
    out = tmp_path / "out"
    summary = run(slides, out)
    assert (summary.exit_code, summary.failed) == (1, 1)
    err = table(out).loc[0, "error"]
    assert err == f"s0.tif: cannot write outputs: {out / 'qc' / 's0.png'}: Read-only file system"
    assert not list((out / "qc").iterdir())  # no temporary file left behind


def test_write_error_text() -> None:
    from fibroquant.errors import FibroquantError
    from fibroquant.pipeline import write_error

    assert write_error(FibroquantError("cannot write /o/qc/a.png: Read-only file system")) == (
        "/o/qc/a.png: Read-only file system")
    assert write_error(PermissionError(13, "Permission denied")) == "[Errno 13] Permission denied"
    assert write_error(TypeError("bad\nsecond line")) == "unexpected TypeError: bad"
