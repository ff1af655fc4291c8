"""Bad inputs through the CLI, sample-sheet errors, ``status``, ``watch --once`` and a fuzz test."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from fibroquant.cli import app
from fibroquant.cli_ops import Settler
from fibroquant.config import Settings
from fibroquant.executor import SlideTask, run_slide
from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

REPO = Path(__file__).resolve().parents[1]
MPP = 0.5
DPI = 25400 / MPP  # pixels per inch for 0.5 µm per pixel


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return make_section(SectionParams(shape=(384, 384)), rng=7)[0]


def _png(path: Path, array: np.ndarray, *, dpi: bool = True, mode: str | None = None) -> None:
    img = Image.fromarray(array)
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    img.save(path, dpi=(DPI, DPI)) if dpi else img.save(path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "fibroquant", *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def invoke(*args: str):
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def bad_study(rgb: np.ndarray, tmp_path_factory: pytest.TempPathFactory):
    """A folder of good, odd and broken files, analysed once (real process)."""
    d = tmp_path_factory.mktemp("bad") / "slides"
    odd = d / "dossier ü é"  # spaces and non-ASCII in the path
    odd.mkdir(parents=True)
    write_pyramid_tiff(d / "good.tif", rgb, MPP)
    write_pyramid_tiff(odd / "lame n°2.tif", rgb, MPP)
    (d / "empty.tif").write_bytes(b"")
    (d / "random.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    full = (d / "good.tif").read_bytes()
    (d / "truncated.tif").write_bytes(full[: len(full) // 2])
    (d / "text.png").write_text("not an image\n")
    tifffile.imwrite(d / "sixteen.tif", rgb.astype(np.uint16) * 257, photometric="rgb",
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    _png(d / "rgba.png", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    _png(d / "grey.png", np.asarray(Image.fromarray(rgb).convert("L")))
    Image.fromarray(rgb).convert("L").convert("P").save(d / "grey-palette.png", dpi=(DPI, DPI))
    _png(d / "palette.png", rgb, mode="P")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(
        d / "palette.tif", dpi=(DPI, DPI))
    write_pyramid_tiff(d / "glass.tif", np.full((384, 384, 3), 244, np.uint8), MPP)
    _png(d / "nores.png", rgb, dpi=False)
    out = d.parent / "out"
    res = run_cli("analyze", str(d), "--out", str(out), "--workers", "1")
    table = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    return d, out, res, table


EXPECT = {  # slide -> (status, words the one-line error must contain)
    "good.tif": ("ok", []),
    "dossier ü é/lame n°2.tif": ("ok", []),
    "empty.tif": ("failed", ["empty.tif", "empty"]),
    "random.svs": ("failed", ["random.svs", "not a TIFF"]),
    "truncated.tif": ("failed", ["truncated.tif", "truncated"]),
    "text.png": ("failed", ["text.png", "not a PNG"]),
    "sixteen.tif": ("ok", []),
    "rgba.png": ("ok", []),
    "grey.png": ("failed", ["grey.png: greyscale image, not a colour-stained section"]),
    "grey-palette.png": ("failed", ["grey-palette.png: greyscale image"]),
    "palette.png": ("ok", []),
    "palette.tif": ("ok", []),
    "glass.tif": ("failed", ["glass.tif", "no tissue"]),
    "nores.png": ("failed", ["nores.png", "--mpp"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("slide", sorted(EXPECT))
def test_bad_inputs_one_row_each(bad_study, slide: str) -> None:
    _, _, res, table = bad_study
    assert res.returncode == 1, res.stderr  # some slides failed, tables still written
    status, words = EXPECT[slide]
    row = table.loc[slide]
    assert row["status"] == status, row["error"]
    if status == "ok":
        assert row["error"] == "" and float(row["cpa_percent"]) > 0
    else:
        assert "\n" not in row["error"]
        for w in words:
            assert w in row["error"]
        assert row["error"] in one_line(res.stderr)  # the same line was shown on stderr


@pytest.mark.slow
def test_bad_inputs_warnings_and_table(bad_study) -> None:
    _, out, res, table = bad_study
    assert set(table.index) == set(EXPECT)
    err = one_line(res.stderr)
    assert "sixteen.tif: 16-bit image scaled to 8 bit" in err
    assert "grey.png" in err and "grey" in err.split("grey.png", 1)[1][:200].lower()
    run = json.loads((out / "run.json").read_text())
    assert run["failed"] == sum(s == "failed" for s, _ in EXPECT.values())


@pytest.mark.slow
def test_missing_resolution_with_mpp_is_ok(rgb: np.ndarray, tmp_path: Path) -> None:
    d = tmp_path / "slides"
    d.mkdir()
    _png(d / "nores.png", rgb, dpi=False)
    res = invoke("analyze", str(d), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--mpp", "0.5")
    assert res.exit_code == 0, res.output
    row = pd.read_csv(tmp_path / "out" / "slides.csv").iloc[0]
    assert row["status"] == "ok" and row["mpp"] == 0.5


# -- sample sheet problems: exit 2 before any slide is measured ------------------------------


@pytest.fixture(scope="module")
def two_slides(rgb: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sheet") / "slides"
    d.mkdir()
    for name in ("a.tif", "b.tif"):
        write_pyramid_tiff(d / name, rgb, MPP)
    return d


SHEETS = {
    "missing column": ("slide,mouse\na.tif,m1\nb.tif,m2\n", ["group"]),
    "duplicate slide": ("slide,mouse,group\na.tif,m1,c\na.tif,m1,c\nb.tif,m2,t\n",
                        ["a.tif", "more than once"]),
    "unknown slide": ("slide,mouse,group\na.tif,m1,c\nb.tif,m2,t\nzz.tif,m3,t\n",
                      ["zz.tif", "does not exist"]),
    "slide not in sheet": ("slide,mouse,group\na.tif,m1,c\n", ["b.tif", "not in the sheet"]),
    "mouse in two groups": ("slide,mouse,group\na.tif,m1,c\nb.tif,m1,t\n",
                            ["m1", "more than one group"]),
}


@pytest.mark.parametrize("problem", sorted(SHEETS))
def test_sample_sheet_problems_exit_2(two_slides: Path, tmp_path: Path, problem: str) -> None:
    text, words = SHEETS[problem]
    sheet = tmp_path / "my samples.csv"
    sheet.write_text(text)
    out = tmp_path / "out"
    res = invoke("analyze", str(two_slides), "--out", str(out), "--samples", str(sheet))
    assert res.exit_code == 2, res.output
    msg = one_line(res.output)
    assert "my samples.csv" in msg
    for w in words:
        assert w in msg
    assert not (out / "slides.csv").exists()
    assert not (out / "fibroquant.sqlite").exists()


def _listing_a_only(slides: Path, tmp_path: Path, *more: str):
    """``analyze --allow-unlisted`` with a sheet listing a.tif alone: (result, sheet, out)."""
    sheet = tmp_path / "samples.csv"
    sheet.write_text("slide,mouse,group\na.tif,m1,c\n")
    out = tmp_path / "out"
    res = invoke("analyze", str(slides), "--out", str(out), "--samples", str(sheet),
                 "--allow-unlisted", "--workers", "1", *more)
    assert res.exit_code == 0, res.output
    return res, sheet, out


def test_allow_unlisted_measures_new_scans_and_tables_them_once_listed(
        two_slides: Path, tmp_path: Path) -> None:
    """A nightly run while the sheet lags the scanner: the unlisted scan is measured and
    stored, out of the tables with a warning; listed later, it enters them without being
    measured again (without the option it is an error: test_sample_sheet_problems_exit_2)."""
    res, sheet, out = _listing_a_only(two_slides, tmp_path)
    text = one_line(res.output)
    assert ("1 slide file(s) not in the sample sheet ('b.tif'): measured, their results kept, "
            "left out of the tables until the sheet lists them") in text
    assert list(pd.read_csv(out / "slides.csv")["slide"]) == ["a.tif"]
    assert "not in the sample sheet ('b.tif')" in html.unescape((out / "report.html").read_text())
    assert "--allow-unlisted" in json.loads((out / "run.json").read_text())["command"]
    sheet.write_text("slide,mouse,group\na.tif,m1,c\nb.tif,m2,t\n")
    res = invoke("analyze", str(two_slides), "--out", str(out), "--samples", str(sheet),
                 "--allow-unlisted", "--workers", "1", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["processed"], info["skipped"]) == (0, 2)
    assert not any("sample sheet" in w for w in info["warnings"])
    assert list(pd.read_csv(out / "slides.csv")["slide"]) == ["a.tif", "b.tif"]


def _a_alone(two_slides: Path, tmp_path: Path, rows: str, *flags: str,
             extra: dict[str, bytes] | None = None) -> tuple[Path, Path, Path, Any]:
    """A folder holding a copy of a.tif (and ``extra`` files), a sheet of ``rows`` and one
    ``analyze`` run with ``flags``: (folder, sheet, out, result)."""
    import shutil

    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy2(two_slides / "a.tif", d / "a.tif")
    for name, data in (extra or {}).items():
        (d / name).write_bytes(data)
    sheet = tmp_path / "samples.csv"
    sheet.write_text("slide,mouse,group\n" + rows)
    out = tmp_path / "out"
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet), *flags,
                 "--workers", "1")
    return d, sheet, out, res


def test_allow_missing_keeps_unscanned_rows_as_not_measured(two_slides: Path, rgb: np.ndarray,
                                                            tmp_path: Path) -> None:
    """A nightly run while the scanner lags the sheet: the row of the scan not yet there is
    ``not-measured`` with why, named in a warning, left out of the mouse's slides; exit 0.
    When the scan lands, the next run measures it alone."""
    import shutil

    d, sheet, out, res = _a_alone(two_slides, tmp_path, "a.tif,m1,c\nb.tif,m2,t\n",
                                  "--allow-missing")
    assert res.exit_code == 0, res.output
    text = one_line(res.output)
    assert "not measured 1 (not in the folder yet)" in text
    assert "1 slide(s) of the sample sheet not in" in text and "('b.tif')" in text
    slides = pd.read_csv(out / "slides.csv").set_index("slide")
    assert slides.loc["b.tif", "status"] == "not-measured"
    assert "not in the slides folder yet" in slides.loc["b.tif", "error"]
    assert slides.loc["a.tif", "status"] == "ok"
    mice = pd.read_csv(out / "mice.csv").set_index("mouse")
    assert (mice.loc["m2", "n_slides"], mice.loc["m2", "n_failed_slides"]) == (0, 1)
    report = html.unescape((out / "report.html").read_text())
    assert "not in the slides folder yet" in report
    assert "t (n = 0 mice; 1 more without a measured slide)" in report  # as groups.csv counts
    assert '<a href="#failed">Not measured</a>' in report
    # status with the sheet: the row waiting for its scan, and a file the sheet does not list
    (d / "extra.tif").write_bytes((d / "a.tif").read_bytes())
    res = invoke("status", str(out), "--slides", str(d), "--samples", str(sheet), "--json")
    assert json.loads(res.output)["sheet"] | {"samples": ""} == {
        "samples": "", "rows": 2, "waiting": [{"slide": "b.tif", "hint": ""}], "gone": [],
        "gone_other_settings": [], "unlisted": ["extra.tif"]}
    text = one_line(invoke("status", str(out), "--slides", str(d), "--samples", str(sheet))
                    .output)
    assert "1 waiting for a scan" in text and "waiting for a scan: b.tif" in text
    assert "not in the sheet: extra.tif" in text
    (d / "extra.tif").unlink()
    res = invoke("status", str(out), "--samples", str(sheet))
    assert res.exit_code == 2 and "needs --slides" in res.output
    write_pyramid_tiff(d / "b.tif", np.ascontiguousarray(rgb[::-1]), MPP)  # another scan
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet),
                 "--allow-missing", "--workers", "1", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["processed"], info["skipped"], info["not_measured"]) == (1, 1, 0)
    assert set(pd.read_csv(out / "slides.csv")["status"]) == {"ok"}
    before = pd.read_csv(out / "slides.csv").set_index("slide")
    # a.tif leaves the folder (a half-mounted share): its measurement and overlay stay
    shutil.move(d / "a.tif", tmp_path / "a.tif")
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet),
                 "--allow-missing", "--workers", "1")
    assert res.exit_code == 0, res.output
    assert ("1 slide(s) of the sample sheet measured before are no longer in" in
            one_line(res.output))
    after = pd.read_csv(out / "slides.csv").set_index("slide")
    assert after.loc["a.tif", "status"] == "ok"
    assert after.loc["a.tif", "cpa_percent"] == before.loc["a.tif", "cpa_percent"]
    assert (out / "qc" / "a.jpg").is_file()
    res = invoke("status", str(out), "--slides", str(d), "--samples", str(sheet), "--json")
    assert json.loads(res.output)["sheet"]["gone"] == ["a.tif"]
    # a rescan of b.tif rewrites the tables while a.tif is gone: provenance names a.tif's
    # input (its stored fingerprint), so a rebuilt store keeps its result
    write_pyramid_tiff(d / "b.tif", np.ascontiguousarray(rgb[:, ::-1]), MPP)
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet),
                 "--allow-missing", "--workers", "1", "--json")
    assert json.loads(res.stdout)["processed"] == 1
    inputs = {i["slide"]: i for i in json.loads((out / "provenance.json").read_text())["inputs"]}
    assert inputs["a.tif"]["file_gone"] is True and "file_gone" not in inputs["b.tif"]
    assert inputs["a.tif"]["fingerprint"] and inputs["a.tif"]["size_bytes"] is None
    assert invoke("store", "rebuild", str(out)).exit_code == 0
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet),
                 "--allow-missing", "--workers", "1", "--json")
    assert json.loads(res.stdout)["processed"] == 0
    rebuilt = pd.read_csv(out / "slides.csv").set_index("slide")
    assert rebuilt.loc["a.tif", "status"] == "ok"
    assert rebuilt.loc["a.tif", "cpa_percent"] == before.loc["a.tif", "cpa_percent"]
    # other settings: nothing of a.tif to keep; its row says why, not "interrupted"
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet),
                 "--allow-missing", "--workers", "1", "--no-traits")
    assert res.exit_code == 0, res.output
    assert "were measured with other settings only" in one_line(res.output)
    other = pd.read_csv(out / "slides.csv").set_index("slide")
    assert other.loc["a.tif", "status"] == "not-measured"
    info = json.loads(invoke("status", str(out), "--slides", str(d), "--samples", str(sheet),
                             "--json").output)
    assert (info["sheet"]["gone"], info["sheet"]["gone_other_settings"]) == ([], ["a.tif"])
    assert "a.tif" not in info["folder"]["removed"]  # listed: not removed (as analyze says)
    assert other.loc["a.tif", "error"] == ("a.tif: no longer in the slides folder, and measured "
                                           "with other settings only")
    shutil.move(tmp_path / "a.tif", d / "a.tif")  # back, unchanged: not measured again
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet),
                 "--allow-missing", "--workers", "1", "--json")
    info = json.loads(res.stdout)
    assert (info["processed"], info["skipped"], info["removed"]) == (0, 2, 0)
    # dropped from the sheet and the folder: removed, and named
    (d / "a.tif").unlink()
    sheet.write_text("slide,mouse,group\nb.tif,m2,t\n")
    res = invoke("analyze", str(d), "--out", str(out), "--samples", str(sheet),
                 "--allow-missing", "--workers", "1")
    assert "removed: 'a.tif' (no longer in the folder)" in one_line(res.output)
    assert json.loads((out / "run.json").read_text())["removed_slides"] == ["a.tif"]


def test_a_sheet_mpp_that_is_not_the_files_is_flagged(two_slides: Path, tmp_path: Path) -> None:
    """The sheet's µm/px is the one measured with; where the file states another (areas
    scale with its square) the slide is flagged and the file's value kept beside it."""
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"slide,mouse,group,mpp\na.tif,m1,c,{MPP / 2}\nb.tif,m2,t,{MPP * 1.01}\n")
    out = tmp_path / "out"
    res = invoke("analyze", str(two_slides), "--out", str(out), "--samples", str(sheet),
                 "--workers", "1")
    assert res.exit_code == 0, res.output
    text = one_line(res.output)
    assert "doubtful: a.tif: little tissue; µm/px not the file's" in text
    assert "2 resolutions" not in text  # traits at 1 and 1.01 µm/px: comparable
    slides = pd.read_csv(out / "slides.csv").set_index("slide")
    assert list(slides["mpp"]) == pytest.approx([MPP / 2, MPP * 1.01])
    assert list(slides["file_mpp"]) == pytest.approx([MPP, MPP])
    assert "µm/px not the file's" in slides.loc["a.tif", "qc_flags"]
    assert slides.loc["b.tif", "qc_flags"] == "little tissue"  # 1 %: within the tolerance


def test_an_unlisted_slide_that_fails_counts_as_failed(two_slides: Path,
                                                       tmp_path: Path) -> None:
    """Out of the tables, but not out of the failed count and the exit code: a nightly job's
    exit status tells that a scan did not measure."""
    _, _, out, res = _a_alone(two_slides, tmp_path, "a.tif,m1,c\n", "--allow-unlisted",
                              extra={"b.tif": b"II*\x00 not a tiff"})
    assert res.exit_code == 1, res.output
    text = one_line(res.output)
    assert "failed 1," in text and "(1 of them failed: 'b.tif')" in text
    assert list(pd.read_csv(out / "slides.csv")["slide"]) == ["a.tif"]


def test_allow_unlisted_keeps_a_listed_slides_overlay_in_the_report(
        two_slides: Path, tmp_path: Path) -> None:
    """An unlisted a.tiff beside a listed a.tif gives both their own overlay names; the report
    finds a.tif's under the name it was written with."""
    import shutil

    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy2(two_slides / "a.tif", d / "a.tif")
    shutil.copy2(two_slides / "b.tif", d / "a.tiff")
    _, _, out = _listing_a_only(d, tmp_path)
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["a.tif.jpg", "a.tiff.jpg"]
    assert "no QC overlay" not in (out / "report.html").read_text()


# -- status and watch ------------------------------------------------------------------------


@pytest.mark.slow
def test_status(bad_study, tmp_path: Path) -> None:
    d, out, _, _ = bad_study
    res = invoke("status", str(out), "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    n_failed = sum(s == "failed" for s, _ in EXPECT.values())
    assert info["slides"] == {"stored": len(EXPECT), "ok": len(EXPECT) - n_failed,
                              "failed": n_failed}
    assert {f["slide"] for f in info["failed"]} == {s for s, (st_, _) in EXPECT.items()
                                                   if st_ == "failed"}
    assert info["runs"][0]["exit_code"] == 1 and info["runs"][0]["state"] == "finished"
    assert "analyze" in info["runs"][0]["command"]
    text = invoke("status", str(out)).output
    assert "  text.png: " in text and "text.png: text.png" not in text  # named once
    assert info["tables"] == "complete" and "tables: incomplete" not in text

    # tables left part-written (a second Ctrl-C while they were written) or edited: said
    import shutil

    half = tmp_path / "half"
    shutil.copytree(out, half)
    with open(half / "mice.csv", "a") as fh:
        fh.write("\n")
    assert json.loads(invoke("status", str(half), "--json").output)["tables"] == "incomplete"
    assert "tables: incomplete" in one_line(invoke("status", str(half)).output)
    (half / "slides.csv").unlink()  # the others left: still a part-set
    assert json.loads(invoke("status", str(half), "--json").output)["tables"] == "incomplete"

    # with --slides, on a copy of the folder with one slide new and one gone
    copy = tmp_path / "slides"
    shutil.copytree(d, copy, copy_function=shutil.copy2)
    shutil.copy2(copy / "good.tif", copy / "newcomer.tif")
    (copy / "palette.tif").unlink()
    res = invoke("status", str(out), "--slides", str(copy), "--json")
    folder = json.loads(res.output)["folder"]
    assert folder["new"] == ["newcomer.tif"] and folder["removed"] == ["palette.tif"]
    # without palette.tif, palette.png's outputs are named "palette", no longer "palette.png":
    # the next run writes them (measures it) again
    assert folder["outputs_missing"] == ["palette.png"]
    # failed slides are measured again by the next run (the run's own plan says so)
    retried = sorted(s for s, (st_, _) in EXPECT.items()
                     if st_ == "failed" and s not in ("palette.tif", "palette.png"))
    assert sorted(folder["failed_before"]) == retried
    assert folder["changed"] == []
    assert folder["unchanged"] == len(EXPECT) - 2 - len(retried)

    res = invoke("status", str(out), "--slides", str(copy))
    assert res.exit_code == 0
    assert "new: newcomer.tif" in res.output and "removed: palette.tif" in res.output
    assert "empty.tif: empty file" in res.output

    # a measured slide renamed: listed as renamed (the next run keeps its measurement), not as
    # one new and one removed; a failed one renamed is new (measured again)
    (copy / "sub").mkdir(exist_ok=True)
    shutil.move(copy / "sixteen.tif", copy / "sub" / "sixteen-renamed.tif")
    shutil.move(copy / "glass.tif", copy / "glass2.tif")
    folder = json.loads(invoke("status", str(out), "--slides", str(copy), "--json").output)[
        "folder"]
    assert folder["renamed"] == [{"from": "sixteen.tif", "to": "sub/sixteen-renamed.tif"}]
    assert folder["new"] == ["glass2.tif", "newcomer.tif"]
    assert folder["removed"] == ["glass.tif", "palette.tif"]
    res = invoke("status", str(out), "--slides", str(copy))
    assert "renamed: sixteen.tif -> sub/sixteen-renamed.tif (measurement kept)" in res.output

    # an overlay deleted from (a copy of) the output folder: the next run measures that slide
    # again, and status says so
    from fibroquant.tasks import output_files

    out2 = tmp_path / "out2"
    shutil.copytree(out, out2)
    output_files(out2, "good", ("qc",))["qc"].unlink()
    folder = json.loads(invoke("status", str(out), "--slides", str(d), "--json").output)["folder"]
    assert folder["outputs_missing"] == []
    assert folder["unchanged"] == len(EXPECT) - n_failed  # failed ones: measured again
    folder = json.loads(invoke("status", str(out2), "--slides", str(d), "--json").output)["folder"]
    assert folder["outputs_missing"] == ["good.tif"]
    assert folder["unchanged"] == len(EXPECT) - n_failed - 1
    res = invoke("status", str(out2), "--slides", str(d))
    assert "overlay missing or outdated (measured again): good.tif" in res.output
    assert "nothing new" not in res.output

    res = invoke("status", str(tmp_path / "nothing here"))
    assert res.exit_code == 2
    assert "nothing here" in one_line(res.output) and "no results store" in res.output


@pytest.mark.slow
def test_watch_once(two_slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke("watch", str(two_slides), "--out", str(out), "--settle", "0.2", "--once",
                 "--workers", "1")
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out / "slides.csv")) == 2


@pytest.mark.slow
def test_watch_once_takes_analyze_options_and_does_not_wait_for_settled_files(
        two_slides: Path, tmp_path: Path) -> None:
    """Files unchanged for longer than --settle are analysed at once; --masks, --no-traits and
    --zoom reach analyze (and its recorded command line)."""
    import time

    old = time.time() - 3600
    for f in two_slides.iterdir():
        os.utime(f, (old, old))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = invoke("watch", str(two_slides), "--out", str(out), "--settle", "20", "--once",
                 "--workers", "1", "--masks", "--analysis-mpp", "1.0", "--force",
                 "--no-traits", "--zoom")
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - t0 < 20  # no 20 s quiet period for files an hour old
    assert len(list((out / "masks").glob("*.collagen.png"))) == 2
    assert (pd.read_csv(out / "slides.csv")["analysis_mpp"] == 1.0).all()
    assert len(list((out / "zoom").glob("*.html"))) == 2
    command = json.loads((out / "run.json").read_text())["command"]
    assert "--no-traits" in command and "--zoom" in command


def test_settler_waits_for_size_to_stop_changing(tmp_path: Path) -> None:
    now = [0.0]
    s = Settler(5.0, clock=lambda: now[0])
    f = tmp_path / "x.tif"
    f.write_bytes(b"a")
    s.touch(f)
    assert not s.poll()
    now[0] = 4.0
    assert not s.poll()
    with f.open("ab") as fh:  # still being copied
        fh.write(b"more")
    now[0] = 8.0
    assert not s.poll()  # quiet period restarts at 8
    now[0] = 12.9
    assert not s.poll()
    now[0] = 13.1
    assert s.poll()
    assert s.take() == [f] and not s.poll()
    s.deleted(f)
    assert s.poll()  # a deletion needs a run (slide removed) but no settling


# -- fuzz: mutated/truncated JPEG-tiled TIFFs never raise or hang -----------------------------


@pytest.fixture(scope="module")
def small_tiff(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    rgb = make_section(SectionParams(shape=(256, 256)), rng=3)[0]
    p = tmp_path_factory.mktemp("fuzz") / "base.tif"
    write_pyramid_tiff(p, rgb, MPP, tile=128)
    return p.read_bytes()


def _run_with_timeout(task: SlideTask, seconds: float) -> dict:
    box: dict = {}

    def target() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                box["rec"] = run_slide(task)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"run_slide hung for more than {seconds} s"
    assert "exc" not in box, f"run_slide raised {box.get('exc')!r}"
    return box["rec"]


@pytest.mark.slow
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_tiff(small_tiff: bytes, tmp_path_factory, data) -> None:
    buf = bytearray(small_tiff)
    for _ in range(data.draw(st.integers(0, 12), label="n_mutations")):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf)), label="cut")]
    d = tmp_path_factory.mktemp("fz")
    path = d / "mutant.tif"
    path.write_bytes(bytes(buf))
    task = SlideTask(path=str(path), slide="mutant.tif", fingerprint="f", mpp=None,
                     fallback_mpp=MPP, settings_json=Settings().model_dump_json(),
                     out_dir=str(d), write_masks=False)
    rec = _run_with_timeout(task, 20.0)
    assert rec["status"] in ("ok", "failed")
    if rec["status"] == "failed":
        assert rec["error"] and "\n" not in rec["error"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_run_whose_process_is_a_zombie_is_not_running() -> None:
    """``status`` and the workers share one liveness test: a killed run's process that its
    parent has not reaped yet (a zombie) is gone; another host's cannot be told."""
    import time

    from fibroquant.cli_ops import _pid_alive
    from fibroquant.cores import process_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 20
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not process_alive(child.pid)
    assert _pid_alive(child.pid, None) is False
    child.wait()
    assert not process_alive(child.pid)
    assert process_alive(os.getpid()) and _pid_alive(os.getpid(), None) is True
    assert _pid_alive(os.getpid(), "another-host.example") is None
    assert _pid_alive(None, None) is False


def test_unlisted_note_names_the_unlisted_slides_that_failed() -> None:
    from fibroquant.run import unlisted_note

    assert unlisted_note([]) == []
    (line,) = unlisted_note(["a.tif", "b.tif", "c.tif", "d.tif"], failed=["c.tif"])
    assert line.startswith("4 slide file(s) not in the sample sheet ('a.tif', 'b.tif', "
                           "'c.tif' and 1 more): measured")
    assert line.endswith("(1 of them failed: 'c.tif')")


def test_doubt_lines_name_the_measured_slides_each_flag_marks() -> None:
    from fibroquant.run import doubt_lines

    slides = pd.DataFrame({
        "slide": ["a.tif", "b.tif", "c.tif", "d.tif", "e.tif"],
        "status": ["ok", "ok", "failed", "wrong-stain", "ok"],
        "qc_flags": ["little tissue", "faint stain; little tissue", "little tissue",
                     "wrong stain; little tissue", np.nan]})
    tail = ": look at their overlays before trusting their CPA"
    # (a faint stain has each slide's stain warning line: not repeated)
    assert doubt_lines(slides) == ["doubtful (little tissue): 2 slide(s), 'a.tif', 'b.tif'" + tail]
    assert doubt_lines(slides.drop(columns="qc_flags")) == []
    from fibroquant.confidence import FLAGS
    from fibroquant.run import STAIN_FLAGS

    assert set(STAIN_FLAGS) < set(FLAGS)
