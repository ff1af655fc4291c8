"""The command line end to end in a temporary folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fibroquant import stats
from fibroquant.cli import app

runner = CliRunner()


def _analyze(study: Path, out: Path, *extra: str):
    return runner.invoke(app, ["analyze", str(study), "--out", str(out), "--samples",
                               str(study / "samples.csv"), "--workers", "1", *extra])


@pytest.mark.slow
def test_analyze_end_to_end(study, tmp_path):
    out = tmp_path / "out"
    res = _analyze(study, out, "--masks")
    assert res.exit_code == 0, res.output
    slides = pd.read_csv(out / "slides.csv")
    for col in ["slide", "mouse", "group", "status", "error", "mpp", "tissue_area_mm2",
                "collagen_area_mm2", "cpa_percent", "sex", "stain_vectors", "stain_warning"]:
        assert col in slides.columns
    assert list(slides.columns[:4]) == ["slide", "mouse", "group", "sex"]
    assert (slides["status"] == "ok").all() and len(slides) == 7
    assert np.allclose(slides["mpp"], 1.5)
    mice = pd.read_csv(out / "mice.csv")
    assert len(mice) == 6
    assert mice["cpa_percent"].round(2).equals(mice["cpa_percent"])  # rounded for reading
    # full precision in the xlsx
    xlsx = pd.read_excel(out / "results.xlsx", sheet_name=None, dtype={"mouse": str})
    mice, full_slides = xlsx["mice"], xlsx["slides"]
    c1 = mice.set_index("mouse").loc["c1"]
    s_c1 = full_slides[full_slides["mouse"] == "c1"]
    assert c1["n_slides"] == 2
    assert c1["cpa_percent"] == pytest.approx(
        100 * s_c1["collagen_area_mm2"].sum() / s_c1["tissue_area_mm2"].sum())
    groups = xlsx["groups"].set_index("group")
    for col in ["n_mice", "cpa_mean_percent", "cpa_sd", "cpa_sem", "cpa_median",
                "diff_vs_control_pp", "change_vs_control_percent", "welch_p", "mannwhitney_p",
                "hedges_g"]:
        assert col in groups.columns
    assert np.isnan(groups.loc["control", "welch_p"])
    ctrl = mice.loc[mice["group"] == "control", "cpa_percent"].to_numpy()
    trt = mice.loc[mice["group"] == "MSC", "cpa_percent"].to_numpy()
    from scipy import stats as sps

    assert groups.loc["MSC", "welch_p"] == pytest.approx(
        sps.ttest_ind(trt, ctrl, equal_var=False).pvalue, rel=1e-9)
    assert groups.loc["MSC", "diff_vs_control_pp"] < 0  # less collagen in treated mice
    for stem in ["c1_s1", "c1_s2", "t3_s1"]:
        assert (out / "qc" / f"{stem}.jpg").stat().st_size > 0
        for kind in ("collagen", "tissue"):
            m = out / "masks" / f"{stem}.{kind}.png"
            import cv2

            img = cv2.imread(str(m), cv2.IMREAD_UNCHANGED)
            assert img.shape == (512, 512) and set(np.unique(img)) <= {0, 255}
    import shapely.geometry

    fc = json.loads((out / "geojson" / "c1_s1.geojson").read_text())
    areas = {f["properties"]["classification"]["name"]: shapely.geometry.shape(f["geometry"]).area
             for f in fc["features"]}
    row = slides.set_index("slide").loc["c1_s1.tif"]
    px_mm2 = (1.5e-3) ** 2  # level-0 pixel area in mm²
    assert areas["Collagen"] * px_mm2 == pytest.approx(row["collagen_area_mm2"], rel=0.01)
    assert areas["Tissue"] * px_mm2 == pytest.approx(row["tissue_area_mm2"], rel=0.01)
    run = json.loads((out / "run.json").read_text())
    assert run["processed"] == 7 and run["skipped"] == 0 and run["failed"] == 0
    assert run["version"] and "analyze" in run["command"]
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["inputs"]) == 7 and prov["settings"]["stains"]["stain"] == "sirius-red"
    assert all(set(i["stain_vectors"]) >= {"sirius-red", "picric-acid"} for i in prov["inputs"])
    assert (out / "report.html").read_text().count("c1_s2.tif") >= 1
    assert (out / "results.xlsx").stat().st_size > 0

    again = _analyze(study, out, "--masks")
    assert again.exit_code == 0, again.output
    run2 = json.loads((out / "run.json").read_text())
    assert run2["processed"] == 0 and run2["skipped"] == 7
    pd.testing.assert_frame_equal(pd.read_csv(out / "slides.csv"), slides)


@pytest.mark.slow
def test_no_sample_sheet_means_no_comparison(study, tmp_path):
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o"),
                              "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "no groups are compared" in res.output
    mice = pd.read_csv(tmp_path / "o" / "mice.csv")
    assert len(mice) == 7  # each slide its own mouse
    assert len(pd.read_csv(tmp_path / "o" / "groups.csv")) == 0


@pytest.mark.slow
def test_failed_slide_recorded_and_others_carry_on(study, tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    for name in ["c1_s1.tif", "t1_s1.tif"]:
        (d / name).write_bytes((study / name).read_bytes())
    (d / "broken.tif").write_bytes(b"II*\x00garbage")
    pd.DataFrame({"slide": ["c1_s1.tif", "t1_s1.tif", "broken.tif"], "mouse": ["a", "b", "c"],
                  "group": ["control", "MSC", "MSC"]}).to_csv(d / "s.csv", index=False)
    res = runner.invoke(app, ["analyze", str(d), "--out", str(tmp_path / "o"), "--samples",
                              str(d / "s.csv"), "--workers", "1"])
    assert res.exit_code == 1, res.output
    slides = pd.read_csv(tmp_path / "o" / "slides.csv").set_index("slide")
    assert slides.loc["broken.tif", "status"] == "failed"
    assert "broken.tif" in slides.loc["broken.tif", "error"]
    assert (slides.drop("broken.tif")["status"] == "ok").all()
    assert "broken.tif" in res.output
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["failed"] == 1


@pytest.mark.slow
def test_sheet_mpp_column_sets_the_measured_mpp(study, tmp_path):
    """A sheet's mpp (README) is what each slide is measured with; an empty cell leaves the
    file's own; slides.csv has one mpp column."""
    sheet = pd.read_csv(study / "samples.csv")
    sheet["mpp"] = [3.0 if i % 2 else None for i in range(len(sheet))]
    f = tmp_path / "s.csv"
    sheet.to_csv(f, index=False)
    out = tmp_path / "o"
    res = runner.invoke(app, ["analyze", str(study), "--out", str(out), "--samples", str(f),
                              "--workers", "1"])
    assert res.exit_code == 0, res.output
    slides = pd.read_csv(out / "slides.csv")
    assert list(slides.columns).count("mpp") == 1
    want = sheet.set_index("slide")["mpp"].fillna(1.5)  # the files say 1.5 µm/px
    got = slides.set_index("slide")["mpp"]
    assert np.allclose(got[want.index], want)
    assert (slides["status"] == "ok").all() and (out / "mice.csv").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("column", ["stain", "level", "seconds", "threshold_od"])
def test_sheet_column_named_like_a_measurement_stops_before_work(study, tmp_path, column):
    sheet = pd.read_csv(study / "samples.csv")
    sheet[column] = "x"
    f = tmp_path / "s.csv"
    sheet.to_csv(f, index=False)
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o"),
                              "--samples", str(f), "--workers", "1"])
    assert res.exit_code == 2, res.output
    assert f"column(s) {column} are reserved" in res.output
    assert not (tmp_path / "o" / "slides.csv").exists()


@pytest.mark.parametrize(("sheet", "match"), [
    ("slide,mouse\nc1_s1.tif,a\n", "group"),
    ("slide,mouse,group\nnope.tif,a,control\n", "nope.tif"),
])
def test_bad_sheet_is_usage_error_before_work(study, tmp_path, sheet, match):
    f = tmp_path / "sheet.csv"
    f.write_text(sheet)
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o"),
                              "--samples", str(f)])
    assert res.exit_code == 2
    assert match in res.output and "sheet.csv" in res.output
    assert not (tmp_path / "o" / "slides.csv").exists()


def test_bad_config_exit_2(study, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("collagen:\n  methd: otsu\n")
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o"),
                              "--config", str(f)])
    assert res.exit_code == 2
    assert "collagen.methd" in res.output


def test_empty_folder_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no slide files" in res.output


def test_inspect(study):
    res = runner.invoke(app, ["inspect", str(study / "c1_s1.tif"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["mpp"] == pytest.approx(1.5)
    assert info["stain_guess"].startswith("sirius-red")
    assert "stain_check" not in info


@pytest.mark.parametrize(("stain", "verdict"), [("sirius-red", "sirius-red fits"),
                                                 ("masson", "wrong stain")])
def test_inspect_checks_the_expected_stain(study, stain, verdict):
    res = runner.invoke(app, ["inspect", str(study / "c1_s1.tif"), "--json", "--stain", stain])
    assert res.exit_code == 0, res.output
    assert verdict in json.loads(res.output)["stain_check"]


def test_group_columns_contract():
    for col in ["group", "n_mice", "cpa_mean_percent", "cpa_sd", "cpa_sem", "cpa_median",
                "diff_vs_control_pp", "change_vs_control_percent", "welch_p", "mannwhitney_p",
                "hedges_g"]:
        assert col in stats.GROUP_COLUMNS


def test_unknown_control_group_stops_before_work(study, tmp_path):
    res = _analyze(study, tmp_path / "o", "--control", "Ctrl")
    assert res.exit_code == 2, res.output
    assert "control group 'Ctrl' is not a group of samples.csv" in res.output
    assert "'MSC'" in res.output and "slide(s) to measure" not in res.output
    assert not (tmp_path / "o" / "slides.csv").exists()


def test_config_for_another_stain_stops_before_work(study, tmp_path):
    f = tmp_path / "study.yaml"
    f.write_text("stains:\n  vectors:\n    sirius-red: [0.14, 0.83, 0.54]\n")
    res = _analyze(study, tmp_path / "o", "--config", str(f), "--stain", "masson")
    assert res.exit_code == 2, res.output
    assert "stains: vectors" in res.output and "not stains of masson" in res.output
    assert not (tmp_path / "o" / "slides.csv").exists()


@pytest.mark.parametrize("address", ["notaurl", "tcp://host", "http://h:1", "tcp://:8786"])
def test_bad_scheduler_address_is_a_usage_error(study, tmp_path, address):
    res = _analyze(study, tmp_path / "o", "--scheduler", address)
    assert res.exit_code == 2, res.output
    assert "--scheduler" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_run_json_records_the_command_with_its_arguments(study, tmp_path):
    out = tmp_path / "o"
    res = _analyze(study, out, "--mpp", "1.5")
    assert res.exit_code == 0, res.output
    command = json.loads((out / "run.json").read_text())["command"]
    assert command.startswith("fibroquant analyze " + str(study))
    for part in ("--out", str(out), "--samples", "--mpp 1.5", "--workers 1"):
        assert part in command


@pytest.mark.slow
def test_warnings_and_tifffile_log_are_one_line_on_stderr(tmp_path):
    """Without -v, a warning is one 'warning: ...' line (no source line) and tifffile's own
    log of a damaged file is silent (fibroquant's one-line error says it)."""
    import subprocess
    import sys

    import tifffile

    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(d / "deep.tif", (rng.random((200, 200, 3)) * 60000).astype(np.uint16),
                     photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    good = tifffile.imread(d / "deep.tif")
    tifffile.imwrite(d / "cut.tif", good, photometric="rgb", tile=(64, 64))
    (d / "cut.tif").write_bytes((d / "cut.tif").read_bytes()[:3000])
    res = subprocess.run([sys.executable, "-m", "fibroquant", "analyze", str(d), "--out",
                          str(tmp_path / "o"), "--workers", "2"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 1, res.stderr
    assert "warning: deep.tif: 16-bit image scaled to 8 bit" in res.stderr
    assert "UserWarning" not in res.stderr and "ERROR tifffile" not in res.stderr
    assert "cut.tif" in res.stderr


@pytest.mark.slow
def test_analysis_mpp_on_the_command_line(study, tmp_path):
    out = tmp_path / "o"
    res = _analyze(study, out, "--analysis-mpp", "3.0")
    assert res.exit_code == 0, res.output
    slides = pd.read_csv(out / "slides.csv")
    assert np.allclose(slides["analysis_mpp"], 3.0) and np.allclose(slides["mpp"], 1.5)
    assert (slides["width_px"] == 256).all()  # 512 px at 1.5 µm/px measured at 3 µm/px
    assert "--analysis-mpp 3.0" in json.loads((out / "run.json").read_text())["command"]
    # finer than the scan: measured at the scan's own resolution, level 0
    res = _analyze(study, tmp_path / "fine", "--analysis-mpp", "0.5")
    assert res.exit_code == 0, res.output
    fine = pd.read_csv(tmp_path / "fine" / "slides.csv")
    assert np.allclose(fine["analysis_mpp"], 1.5) and (fine["level"] == 0).all()
    assert (fine["width_px"] == 512).all()
    res = _analyze(study, tmp_path / "bad", "--analysis-mpp", "20")
    assert res.exit_code == 2 and "--analysis-mpp" in res.output


def test_workers_default_to_the_cores_this_process_may_use(study, tmp_path, monkeypatch):
    import os

    from fibroquant import cli, run
    from fibroquant.errors import FibroquantError

    seen = {}

    def spy(*args, **kwargs):
        seen["workers"] = kwargs["workers"]
        raise FibroquantError("stop here")

    monkeypatch.setattr(run, "analyze_folder", spy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "stop here" in res.output
    assert seen["workers"] == 3  # the cores this process may run on
    monkeypatch.delattr(os, "sched_getaffinity")  # not on Linux: the machine's count
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o")])
    assert seen["workers"] == cli.available_cores() == 6


def test_ctrl_c_while_planning_is_a_clean_exit_130(study, tmp_path, monkeypatch):
    """Ctrl-C before any slide is measured (fingerprinting, moving a renamed slide's files):
    one line and exit code 130, no traceback (Ctrl-C while measuring: tests/test_rerun.py)."""
    from fibroquant import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "analyze_folder", interrupted)
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o")])
    assert res.exit_code == 130
    assert "interrupted: slides finished so far are stored" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(("on_disk", "to_measure", "told"),
                         [(False, 3, True), (True, 3, False), (None, 3, False), (False, 0, False)])
def test_a_machines_first_run_says_the_kernels_are_compiling(study, tmp_path, monkeypatch,
                                                             on_disk, to_measure, told):
    """The first run on a machine waits 10-40 s for numba before its first slide: the console
    says why, once, and only when there is something to measure and the cache is known cold."""
    from fibroquant import kernels, run

    def plan_then_stop(*args, on_plan=None, **kwargs):
        on_plan(to_measure, 0)
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "kernels_on_disk", lambda: on_disk)
    monkeypatch.setattr(run, "analyze_folder", plan_then_stop)
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o")])
    assert res.exit_code == 130
    assert ("compiling the image kernels for this machine" in res.output) == told


@pytest.mark.slow  # compiles the tile kernel when kernels.py changed since the last run
def test_kernels_on_disk_tells_a_cold_cache_from_a_warm_one(tmp_path):
    import subprocess
    import sys

    from fibroquant import kernels

    if not kernels.HAVE_NUMBA:
        pytest.skip("no numba")
    kernels.warmup_fused()
    code = "from fibroquant import kernels; print(kernels.kernels_on_disk())"
    warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "nb")})
    if warm.stdout.strip() == "None":
        pytest.skip("no writable numba cache here")
    assert (warm.stdout.strip(), cold.stdout.strip()) == ("True", "False")


def test_kernels_on_disk_wants_code_for_this_cpu(monkeypatch):
    """A cache holding only another machine's code (a shared home folder) is a first run."""
    from fibroquant import kernels

    if not kernels.HAVE_NUMBA:
        pytest.skip("no numba")
    kernels.warmup_fused()
    if kernels.kernels_on_disk() is not True:
        pytest.skip("no writable numba cache here")
    codegen = kernels._tile_nb.targetctx.codegen()
    monkeypatch.setattr(codegen, "magic_tuple", lambda: ("x86_64-unknown-linux-gnu", "other", ""))
    assert kernels.kernels_on_disk() is False


@pytest.mark.slow
def test_progress_bar_on_a_terminal(study, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from fibroquant import cli_common as cli
    from fibroquant import console

    buf = io.StringIO()
    terminal = Console(file=buf, force_terminal=True, width=120)
    monkeypatch.setattr(cli, "err", terminal)  # the progress bar's console
    monkeypatch.setattr(console, "err", terminal)  # progress and warning lines
    res = _analyze(study, tmp_path / "o")
    assert res.exit_code == 0, res.output
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())  # colours, cursor moves
    assert "7 slide(s) to measure, 0 already measured" in text
    assert "analyze" in text and "7/7" in text  # the bar, complete
    assert "measured 7, failed 0" in text


def test_progress_bar_leaves_stdout_alone(study, tmp_path, monkeypatch):
    # the live bar is on stderr; sys.stdout stays the caller's during the run
    import io
    import sys

    from rich.console import Console
    from rich.file_proxy import FileProxy

    from fibroquant import cli_common as cli
    from fibroquant import run
    from fibroquant.errors import FibroquantError

    monkeypatch.setattr(cli, "err", Console(file=io.StringIO(), force_terminal=True))
    seen = {}

    def spy(*args, on_plan, **kwargs):
        on_plan(3, 0)  # the bar is live from here
        seen["stdout"] = sys.stdout
        raise FibroquantError("stop here")

    monkeypatch.setattr(run, "analyze_folder", spy)
    res = runner.invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert not isinstance(seen["stdout"], FileProxy)


@pytest.mark.slow
def test_workers_start_when_the_working_folder_holds_a_fibroquant_folder(tmp_path):
    """Issue 23: run from one level above the clone (a `fibroquant/` folder in the working
    folder), with the package found by a finder that is not on PYTHONPATH (as an editable
    install is), every forkserver worker imported the empty folder and failed."""
    import subprocess
    import sys

    import cv2

    from fibroquant.synthetic import SectionParams, make_section

    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(2):
        rgb, _ = make_section(SectionParams(shape=(256, 256), mpp=1.0), rng=i)
        cv2.imwrite(str(slides / f"s{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / "fibroquant" / "fibroquant").mkdir(parents=True)  # the clone, seen from above
    repo = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(repo)!r}); from fibroquant.cli import run; "
            "sys.argv = ['fibroquant', '-q', 'analyze', 'slides', '--out', 'out', '--mpp', "
            "'1.0', '--workers', '2']; run()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "slides.csv")
    assert (table["status"] == "ok").all(), table["error"].tolist()


@pytest.mark.parametrize(("given", "stain"), [
    ("PSR", "sirius-red"), ("Picro-Sirius red", "sirius-red"), ("MASSON", "masson"),
    ("trichrome", "masson")])
def test_stain_takes_the_names_labs_use(given, stain):
    from fibroquant.cli_common import parse_stain

    assert parse_stain(given).value == stain


def test_unknown_stain_is_one_line_naming_the_choices(tmp_path):
    res = runner.invoke(app, ["analyze", str(tmp_path), "--out", str(tmp_path / "o"),
                              "--stain", "H&E"])
    assert res.exit_code == 2
    text = " ".join(res.output.replace("│", " ").split())
    assert "'H&E' is not a stain fibroquant measures: sirius-red (also PSR, picrosirius) or " \
           "masson (also trichrome)" in text


@pytest.mark.parametrize(("args", "words"), [
    (["analyze", "/no/such/folder", "--out", "o"], ["'slides_dir'", "/no/such/folder",
                                                     "does not exist", "fibroquant analyze -h"]),
    (["analyze", ".", "--workers", "two"], ["'--workers'", "fibroquant analyze -h"]),
    (["analyse"], ["No such command 'analyse'", "fibroquant -h"]),
])
def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path, args, words):
    """As the console script runs it (the test runner's invoke bypasses the app's own
    error handling): one ``error:`` line naming what is wrong, no usage block, no box."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "fibroquant", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0]
    ok = subprocess.run([sys.executable, "-m", "fibroquant", "analyze", "-h"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120, check=True)
    assert ok.returncode == 0 and "--workers" in ok.stdout
