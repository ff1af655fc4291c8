"""Faults a lab's cron job meets: kills while measuring and while writing the tables, a full
disk, a killed worker process, SIGTERM, symlink loops, named pipes, absurd µm/px, a lost store
and bad settings files. Each is reproduced for real (subprocesses, real files) and checked the
way a user would: a plain rerun gives the tables of a clean run, and no process is left.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from fibroquant.cli import app
from fibroquant.config import Settings
from fibroquant.errors import SampleSheetError, one_line
from fibroquant.run import TABLES_MANIFEST, analyze_folder
from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

REPO = Path(__file__).resolve().parents[1]
TABLES = ("slides.csv", "mice.csv", "groups.csv")
#: a small section that still holds a few lobules (as tests/conftest.py's SMALL)
SMALL = SectionParams(shape=(384, 384), mpp=1.5, lobule_um=250, septum_width_um=12,
                      fine_fibres=0.0, n_lumens=2)
LAYOUT = [("c1", "control", 0.8), ("c2", "control", 0.9), ("t1", "MSC", 0.35),
          ("t2", "MSC", 0.4)]


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny slides (two control, two treated mice) and their sample sheet."""
    d = tmp_path_factory.mktemp("faults_bank")
    rows = []
    for i, (mouse, group, fib) in enumerate(LAYOUT):
        rgb, _ = make_section(SectionParams(**{**SMALL.__dict__, "fibrosis": fib}), rng=100 + i)
        write_pyramid_tiff(d / f"{mouse}.tif", rgb, SMALL.mpp, min_level_px=128)
        rows.append({"slide": f"{mouse}.tif", "mouse": mouse, "group": group})
    pd.DataFrame(rows).to_csv(d / "samples.csv", index=False)
    return d


def _copy(bank: Path, dest: Path) -> Path:
    shutil.copytree(bank, dest, copy_function=shutil.copy2)
    return dest


def run(slides: Path, out: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze_folder(slides, out, Settings(), workers=1, **kw)


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code, res.output


def tables(out: Path) -> dict[str, pd.DataFrame]:
    """The three tables, without the per-slide wall time (the only run-dependent column)."""
    frames = {n: pd.read_csv(out / n) for n in TABLES}
    frames["slides.csv"] = frames["slides.csv"].drop(columns=["seconds"], errors="ignore")
    return frames


def assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in TABLES:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True, obj=name)


def assert_consistent(out: Path) -> None:
    """Every output of the folder shows the run that wrote slides.csv: the workbook's sheets
    equal the CSV tables, run.json and provenance.json name the same slides and failures,
    the report carries the comparison sentence, and the manifest says the tables are whole."""
    slides = pd.read_csv(out / "slides.csv", keep_default_na=False)
    book = pd.read_excel(out / "results.xlsx", sheet_name=None, keep_default_na=False)
    for name in TABLES:
        csv = pd.read_csv(out / name, keep_default_na=False)
        sheet = book[name.removesuffix(".csv")]
        assert list(sheet.columns) == list(csv.columns), name
        assert len(sheet) == len(csv), name
        assert list(sheet.iloc[:, 0].astype(str)) == list(csv.iloc[:, 0].astype(str)), name
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["failed"] == int((slides["status"] != "ok").sum())
    prov = json.loads((out / "provenance.json").read_text())
    assert sorted(i["slide"] for i in prov["inputs"]) == sorted(slides["slide"])
    manifest = json.loads((out / TABLES_MANIFEST).read_text())
    assert manifest["tables_key"] == prov["tables_key"]
    assert run_json["comparison"] == manifest["comparison"]
    assert manifest["comparison"].split(":")[0] in (out / "report.html").read_text()


# -- subprocesses, tagged so that every process they start can be found --------------------

_MAIN = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "sys.argv[0] = 'fibroquant'; runpy.run_module('fibroquant', run_name='__main__')")


#: Faults injected into the processes of a spawned run (its worker processes too, through the
#: fork server, which imports the same ``sitecustomize``): opening the slide named by
#: FQ_TEST_CRASH_ON segfaults (a crash in a decoder), opening FQ_TEST_HANG_ON never returns (a
#: hung network share; its process notes its pid in the folder FQ_TEST_HANG_NOTE).
_FAULT_HOOK = """
import os
if os.environ.get("FQ_TEST_CRASH_ON") or os.environ.get("FQ_TEST_HANG_ON"):
    import ctypes, time
    import fibroquant.slides as _slides
    _real = _slides.open_slide
    def open_slide(path, *args, **kwargs):
        if str(path).endswith(os.environ.get("FQ_TEST_CRASH_ON") or "//"):
            ctypes.string_at(0)
        if str(path).endswith(os.environ.get("FQ_TEST_HANG_ON") or "//"):
            if os.environ.get("FQ_TEST_HANG_NOTE"):
                open(os.path.join(os.environ["FQ_TEST_HANG_NOTE"], str(os.getpid())), "w").close()
            time.sleep(3600)
        return _real(path, *args, **kwargs)
    _slides.open_slide = open_slide
"""


def fault_hook(tmp_path: Path) -> str:
    """A folder holding the fault-injecting ``sitecustomize.py``, for PYTHONPATH."""
    folder = tmp_path / "fault_hook"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_FAULT_HOOK)
    return str(folder)


def spawn(tag: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    extra = dict(env or {})
    path = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", ""), str(REPO),
                                       os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, FIBROQUANT_TEST_TAG=tag, PYTHONWARNINGS="ignore", **extra)
    env["PYTHONPATH"] = path
    return subprocess.Popen([sys.executable, "-c", _MAIN, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes started (directly or not) by a spawn with this tag."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FIBROQUANT_TEST_TAG") == tag and proc.status() != "zombie":
                found.append(proc)
        except psutil.Error:
            continue
    return found


def assert_none_left(tag: str, within: float = 5.0) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not tagged(tag):
            return
        time.sleep(0.1)
    left = tagged(tag)
    for proc in left:  # clean up before failing
        proc.kill()
    pytest.fail(f"{len(left)} process(es) left {within} s after the run ended: "
                f"{[p.cmdline()[:3] for p in left]}")


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    """Send ``sig`` to a spawned run; its exit code and stderr."""
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the spawned run holds OUT_DIR's lock (its pid in the lock file)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((out / ".fibroquant.lock").read_text()).get("pid") == proc.pid:
                return
        time.sleep(0.02)
    pytest.fail("the run never took the lock")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Wait for a spawned run to end by itself; its exit code and stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s: {err[-2000:]}")
    return proc.returncode, err


# -- 1. tables: written as one set, any interruption repaired by the next plain run ---------


@pytest.mark.slow
def test_kills_while_writing_tables_are_repaired_by_a_plain_rerun(bank, tmp_path):
    """Five kill -9 at random moments of runs that only rewrite the tables (the sample sheet
    changed): each plain rerun leaves every output consistent with slides.csv and equal to a
    clean run's. Before the manifest, provenance.json's key was written first and a rerun
    trusted tables left from the previous run."""
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    assert run(slides, out, samples=slides / "samples.csv").exit_code == 0
    sheet = pd.read_csv(slides / "samples.csv")
    rng = random.Random(24)
    t0 = time.monotonic()
    proc = spawn("timing", "analyze", str(slides), "--out", str(out), "--samples",
                 str(slides / "samples.csv"), "--workers", "1")
    proc.communicate(timeout=300)
    full = time.monotonic() - t0  # a subprocess run that rewrites nothing
    refs = {}  # two sample sheets, taken in turn (each run rewrites the tables), and for each
    for batch in ("b0", "b1"):  # the tables of a run that nothing interrupted (same store)
        sheet.assign(batch=batch).to_csv(slides / "samples.csv", index=False)
        refs[batch] = _copy(out, tmp_path / f"ref-{batch}")
        for f in refs[batch].glob("*.csv"):
            f.unlink()
        (refs[batch] / TABLES_MANIFEST).unlink()
        assert run(slides, refs[batch], samples=slides / "samples.csv").exit_code == 0
    for k in range(5):
        batch = f"b{k % 2}"
        sheet.assign(batch=batch).to_csv(slides / "samples.csv", index=False)
        tag = uuid.uuid4().hex
        proc = spawn(tag, "analyze", str(slides), "--out", str(out), "--samples",
                     str(slides / "samples.csv"), "--workers", "1")
        time.sleep(rng.uniform(0.5 * full, 1.5 * full + 1.0))  # imports, then the tables
        stop(proc, signal.SIGKILL)
        assert_none_left(tag)
        assert run(slides, out, samples=slides / "samples.csv").exit_code == 0  # plain rerun
        assert_consistent(out)
        assert_same_tables(out, refs[batch])
        assert pd.read_csv(out / "mice.csv")["batch"].eq(batch).all()


@pytest.mark.slow
def test_full_disk_while_writing_the_report_is_repaired_by_the_next_run(bank, tmp_path,
                                                                          monkeypatch):
    """The disk fills while report.html is written: exit 4 with one line naming the file;
    no manifest, so the next run (disk freed) writes every table again."""
    from fibroquant import outdir

    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    assert run(slides, out, samples=slides / "samples.csv").exit_code == 0
    sheet = pd.read_csv(slides / "samples.csv")
    sheet.assign(batch="new").to_csv(slides / "samples.csv", index=False)
    real = outdir._write_all
    full = {"on": True}

    def write_all(fd: int, data: bytes) -> None:
        if full["on"] and data.lstrip().startswith(b"<!DOCTYPE html"):
            os.close(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(outdir, "_write_all", write_all)
    code, output = cli("analyze", str(slides), "--out", str(out), "--samples",
                       str(slides / "samples.csv"), "--workers", "1")
    assert code == 4, output
    assert "report.html: No space left on device" in output
    assert "Traceback" not in output
    assert not (out / TABLES_MANIFEST).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".fibroquant-tmp")]
    full["on"] = False
    code, output = cli("analyze", str(slides), "--out", str(out), "--samples",
                       str(slides / "samples.csv"), "--workers", "1")
    assert code == 0, output
    assert_consistent(out)
    assert "batch" in (out / "report.html").read_text()


@pytest.mark.slow
def test_an_edited_or_deleted_table_is_rewritten_by_a_rerun(bank, tmp_path):
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    run(slides, out, samples=slides / "samples.csv")
    good = (out / "groups.csv").read_bytes()
    (out / "groups.csv").write_bytes(good[: len(good) // 2])
    (out / "report.html").unlink()
    summary = run(slides, out, samples=slides / "samples.csv")
    assert summary.processed == 0
    assert (out / "groups.csv").read_bytes() == good
    assert (out / "report.html").is_file()
    assert_consistent(out)


# -- 2. statistics never stop the tables ----------------------------------------------------


@pytest.mark.slow
def test_a_control_group_whose_slides_all_failed_still_gets_tables(bank, tmp_path):
    """Both control slides truncated: the run used to stop with "control group 'control'
    not found" from the mixed model, write no table, and do so on every rerun."""
    slides = _copy(bank, tmp_path / "slides")
    for name in ("c1.tif", "c2.tif"):
        data = (slides / name).read_bytes()
        (slides / name).write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    summary = run(slides, out, samples=slides / "samples.csv")
    assert summary.exit_code == 1
    assert summary.failed == 2
    for name in (*TABLES, "results.xlsx", "report.html"):
        assert (out / name).is_file(), name
    groups = pd.read_csv(out / "groups.csv").set_index("group")
    assert groups.loc["control", "n_mice"] == 0
    assert groups.loc["MSC", "n_mice"] == 2
    assert np.isnan(groups.loc["MSC", "diff_vs_control_pp"])
    assert "control" in summary.comparison
    assert_consistent(out)


@pytest.mark.slow
def test_any_statistics_failure_leaves_the_comparison_empty_with_a_reason(bank, tmp_path,
                                                                           monkeypatch):
    from fibroquant import stats

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(stats, "compare_groups", broken)
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    summary = run(slides, out, samples=slides / "samples.csv")
    assert summary.exit_code == 0
    assert summary.comparison == "No group comparison: Singular matrix."
    groups = pd.read_csv(out / "groups.csv")
    assert len(groups) == 0
    assert "diff_vs_control_pp" in groups.columns
    assert len(pd.read_csv(out / "mice.csv")) == 4
    assert "No group comparison: Singular matrix." in (out / "report.html").read_text()


# -- 3. µm per pixel from every source is checked --------------------------------------------


@pytest.mark.slow
def test_absurd_mpp_from_any_source_fails_one_row_within_seconds(bank, tmp_path):
    """A sheet mpp of 0.0005 used to segfault; a TIFF tag of 1e-5 µm/px grew to 12 GB. The
    file's tags fail their own row at once, naming where the value came from, the others are
    measured; the sheet's is a sheet problem, listed with the others before any work."""
    slides = _copy(bank, tmp_path / "slides")
    rgb, _ = make_section(SMALL, rng=5)
    write_pyramid_tiff(slides / "tiny.tif", rgb, 1e-5)
    write_pyramid_tiff(slides / "huge.tif", rgb, 1e6)
    sheet = pd.read_csv(slides / "samples.csv")
    extra = pd.DataFrame([{"slide": "tiny.tif", "mouse": "x1", "group": "MSC"},
                          {"slide": "huge.tif", "mouse": "x2", "group": "MSC"}])
    pd.concat([sheet, extra]).to_csv(slides / "samples.csv", index=False)
    t0 = time.perf_counter()
    summary = run(slides, tmp_path / "out", samples=slides / "samples.csv")
    elapsed = time.perf_counter() - t0
    rows = pd.read_csv(tmp_path / "out" / "slides.csv", keep_default_na=False).set_index("slide")
    assert summary.failed == 2
    assert elapsed < 60
    assert rows.loc["tiny.tif", "error"].startswith(
        "tiny.tif: 1e-05 µm/px from TIFF resolution tags")
    assert rows.loc["huge.tif", "error"].startswith("huge.tif: ")  # refused, not measured
    assert (rows.loc[["c1.tif", "c2.tif", "t1.tif", "t2.tif"], "status"] == "ok").all()
    sheet["mpp"] = [0.0005, None, None, None]
    pd.concat([sheet, extra]).to_csv(slides / "samples.csv", index=False)
    with pytest.raises(SampleSheetError, match=r"mpp of slide 'c1\.tif': 0\.0005 µm/px from "
                       r"row 2 is implausible for bright-field microscopy"):
        run(slides, tmp_path / "out2", samples=slides / "samples.csv")


def test_absurd_mpp_option_is_a_usage_error(bank, tmp_path):
    code, output = cli("analyze", str(bank), "--out", str(tmp_path / "o"), "--mpp", "0.001")
    assert code == 2
    assert "Traceback" not in output


# -- 4. processes: a dead worker, kills and SIGTERM ----------------------------------------


@pytest.mark.slow
def test_a_dead_worker_fails_only_its_slide_and_the_pool_carries_on(bank, tmp_path):
    """A worker process killed in the middle of a slide (as the out-of-memory killer does)
    fails that slide, named with the signal; the other slides are measured on a new
    process; no process outlives the run. It used to turn every slide in flight or pending
    into "BrokenProcessPool". The worker is caught inside the slide (its open never returns,
    it notes its pid) so that the kill cannot land between two slides."""
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    notes = tmp_path / "hanging"
    notes.mkdir()
    tag = uuid.uuid4().hex
    proc = spawn(tag, "analyze", str(slides), "--out", str(out), "--samples",
                 str(slides / "samples.csv"), "--workers", "2",
                 env={"PYTHONPATH": fault_hook(tmp_path), "FQ_TEST_HANG_ON": "t1.tif",
                      "FQ_TEST_HANG_NOTE": str(notes)})
    end = time.monotonic() + 120
    while not list(notes.iterdir()) and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    (pid,) = [int(p.name) for p in notes.iterdir()]
    os.kill(pid, signal.SIGKILL)
    code, err = finish(proc)
    assert code == 1, err
    assert_none_left(tag)
    rows = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    assert rows.loc["t1.tif", "error"] == (
        "t1.tif: worker process killed by SIGKILL (out of memory?) while measuring this slide")
    assert (rows.drop(index="t1.tif")["status"] == "ok").all()
    assert_consistent(out)


def test_worker_death_message_names_the_slide_and_signal():
    from fibroquant.executor import crash_message
    from fibroquant.tasks import SlideTask

    t = SlideTask(path="/s/big.svs", slide="big.svs", fingerprint="f", mpp=None,
                  fallback_mpp=None, settings_json="{}", out_dir="/o", write_masks=False)
    assert crash_message(t, -signal.SIGKILL) == (
        "big.svs: worker process killed by SIGKILL (out of memory?) while measuring this slide")
    assert crash_message(t, -signal.SIGSEGV) == (
        "big.svs: worker process killed by SIGSEGV while measuring this slide")


@pytest.mark.slow
def test_a_slide_that_crashed_its_worker_twice_is_not_retried(bank, tmp_path, monkeypatch):
    from fibroquant import executor
    from fibroquant.tasks import failed_record

    calls: list[str] = []

    def crashing(tasks, **kwargs):
        for t in tasks:
            calls.append(t.slide)
            if t.slide == "t1.tif":
                yield failed_record(t, executor.crash_message(t, -11)) | {"crashed": True}
            else:
                yield executor.run_slide(t)

    monkeypatch.setattr(executor, "run_tasks", crashing)
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    for _ in range(2):
        assert run(slides, out).failed == 1
    calls.clear()
    summary = run(slides, out)
    assert calls == []
    assert summary.crashed == ["t1.tif"]
    assert summary.failed == 1
    assert "crashed" not in pd.read_csv(out / "slides.csv").columns
    run(slides, out, force=True)
    assert "t1.tif" in calls


@pytest.mark.slow
def test_a_slide_that_crashes_the_run_itself_is_recorded_and_then_skipped(bank, tmp_path):
    """With --workers 1 slides are measured in the run's own process, so a segfault there (a
    decoder or a kernel) ends the run: nothing could record the slide and every rerun crashed
    again on it. Now the next run records the crash, measures the slide again in a process of
    its own (where a second crash fails only its row) and the others; the run after that
    skips it, as for a slide that crashed its worker process twice."""
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    env = {"PYTHONPATH": fault_hook(tmp_path), "FQ_TEST_CRASH_ON": "c1.tif"}
    args = ("analyze", str(slides), "--out", str(out), "--samples",
            str(slides / "samples.csv"), "--workers", "1")
    tag = uuid.uuid4().hex
    code, err = finish(spawn(tag, *args, env=env))
    assert code == -signal.SIGSEGV, err  # the crash is real: the run itself died
    code, output = cli("status", str(out))
    assert code == 0, output
    assert "crashed (Segmentation fault) while measuring c1.tif" in output
    code, err = finish(spawn(tag, *args, env=env))
    assert code == 1, err
    assert "c1.tif: fibroquant crashed (Segmentation fault) while measuring this slide" in err
    assert "Traceback" not in err
    rows = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    assert rows.loc["c1.tif", "error"] == (
        "c1.tif: worker process killed by SIGSEGV while measuring this slide")
    assert (rows.drop(index="c1.tif")["status"] == "ok").all()
    assert_consistent(out)
    assert_none_left(tag)
    code, err = finish(spawn(tag, *args, env=env))
    assert code == 1, err  # not measured: measuring it in this process would have crashed
    assert "not measured again: c1.tif" in err
    assert not (out / ".fibroquant-measuring").exists()


def test_the_measuring_marker_names_the_fatal_signal_and_only_that(tmp_path):
    """What a run that died while measuring in its own process leaves: the fatal signal when
    it crashed, none when it was killed (kill -9 says nothing about the slide); nothing when
    the block ended normally or by an exception."""
    from fibroquant.outdir import measuring_marker, take_measuring_marker

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for crash, fatal in (("ctypes.string_at(0)", "Segmentation fault"),
                         ("os.kill(os.getpid(), signal.SIGKILL)", None)):
        code = ("import ctypes, os, signal; from pathlib import Path; "
                "from fibroquant.outdir import measuring_marker\n"
                f"with measuring_marker(Path({str(tmp_path)!r}), {{'slide': 'a.tif'}}): {crash}")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              timeout=60, check=False)
        assert proc.returncode < 0
        info = take_measuring_marker(tmp_path)
        assert info == {"slide": "a.tif", "fatal": fatal}
        assert take_measuring_marker(tmp_path) is None  # taken once
    seen = []

    def measure() -> None:
        with measuring_marker(tmp_path, {"slide": "b.tif"}):
            seen.append((tmp_path / ".fibroquant-measuring").is_file())
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        measure()
    assert seen == [True]  # there while measuring
    assert take_measuring_marker(tmp_path) is None


@pytest.mark.slow
def test_kills_and_sigterm_while_measuring_leave_no_process_and_rerun_is_clean(bank, tmp_path):
    """kill -9 (five times, at random moments) and SIGTERM of a --workers 2 run: no worker,
    fork server or resource tracker is left 5 s later (they used to live on with ppid 1),
    SIGTERM exits 143 with one line, and a plain rerun gives the clean run's tables."""
    ref = tmp_path / "ref"
    slides = _copy(bank, tmp_path / "slides")
    assert run(slides, ref, samples=slides / "samples.csv").exit_code == 0
    out = tmp_path / "out"
    rng = random.Random(5)
    for k in range(6):
        tag = uuid.uuid4().hex
        proc = spawn(tag, "analyze", str(slides), "--out", str(out), "--samples",
                     str(slides / "samples.csv"), "--workers", "2", "--force")
        if k < 5:  # kill -9 at any moment
            time.sleep(rng.uniform(1.0, 6.0))
            stop(proc, signal.SIGKILL)
        else:  # SIGTERM once the run holds OUT_DIR: not while Python starts or ends, where
            # no program can answer it (CI once saw -15 from a SIGTERM landing after the run)
            wait_for_lock(out, proc)
            code, err = stop(proc, signal.SIGTERM)
            assert code == 143, err
            assert "Traceback" not in err, err
        assert_none_left(tag)
    assert run(slides, out, samples=slides / "samples.csv").exit_code == 0
    assert_same_tables(out, ref)
    assert_consistent(out)


# -- 5. input files that block or loop --------------------------------------------------------


@pytest.mark.slow
def test_symlink_loop_and_named_pipe_fail_one_row_each(bank, tmp_path):
    """A named pipe used to hang the run for ever (holding the lock); a symlink loop gave a
    60-line traceback and nothing measured, in analyze and in status --slides."""
    slides = _copy(bank, tmp_path / "slides")
    (slides / "loop.tif").symlink_to("loop.tif")
    os.mkfifo(slides / "pipe.tif")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    summary = run(slides, out)
    assert time.perf_counter() - t0 < 60
    rows = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    assert summary.failed == 2
    assert (rows["status"] == "ok").sum() == 4
    assert "Too many levels of symbolic links" in rows.loc["loop.tif", "error"]
    assert rows.loc["pipe.tif", "error"].endswith("pipe.tif: not a regular file (a named pipe)")
    code, output = cli("status", str(out), "--slides", str(slides))
    assert code == 0, output
    assert "unreadable" in output
    assert "named pipe" in output
    assert "symbolic links" in output


@pytest.mark.slow
def test_a_slide_that_blocks_on_open_fails_its_row_after_the_timeout(bank, tmp_path,
                                                                    monkeypatch):
    """Opening a slide had no time limit (only its fingerprint had): a file on a hung network
    share held the run, and its lock, for ever. Now it fails its own row after
    tiling.input_timeout_s and the other slides are measured."""
    import threading

    from fibroquant import executor

    release = threading.Event()
    real = executor.open_slide

    def hung(path, *args, **kwargs):
        if str(path).endswith("c2.tif"):
            release.wait(120)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(executor, "open_slide", hung)
    settings = Settings.model_validate({"tiling": {"input_timeout_s": 3}})
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = analyze_folder(bank, tmp_path / "out", settings, workers=1)
    finally:
        release.set()
    assert time.perf_counter() - t0 < 60
    rows = pd.read_csv(tmp_path / "out" / "slides.csv", keep_default_na=False).set_index("slide")
    assert summary.failed == 1
    assert rows.loc["c2.tif", "error"] == (
        f"{bank / 'c2.tif'}: opening the slide: no answer after 3 s (a hung network share?)")
    assert (rows.drop(index="c2.tif")["status"] == "ok").all()


@pytest.mark.slow
def test_a_slide_that_blocks_on_open_in_a_worker_fails_its_row_and_leaves_no_process(
        bank, tmp_path):
    """The same in a worker process (where a test cannot monkeypatch): its row fails after the
    timeout, the other slides are measured, and the worker stuck in the open is ended with the
    run."""
    slides = _copy(bank, tmp_path / "slides")
    (tmp_path / "c.yaml").write_text("tiling:\n  input_timeout_s: 5\n")
    tag = uuid.uuid4().hex
    code, err = finish(spawn(
        tag, "analyze", str(slides), "--out", str(tmp_path / "out"), "--workers", "2",
        "--config", str(tmp_path / "c.yaml"),
        env={"PYTHONPATH": fault_hook(tmp_path), "FQ_TEST_HANG_ON": "t2.tif"}))
    assert code == 1, err
    assert_none_left(tag)
    rows = pd.read_csv(tmp_path / "out" / "slides.csv", keep_default_na=False).set_index("slide")
    assert rows.loc["t2.tif", "error"] == (
        f"{slides / 't2.tif'}: opening the slide: no answer after 5 s (a hung network share?)")
    assert (rows.drop(index="t2.tif")["status"] == "ok").all()


@pytest.mark.slow
def test_a_slide_that_stalls_in_a_worker_fails_after_the_slide_time_limit(bank, tmp_path):
    """A read that hangs mid-slide (past the bounded open) used to hold its worker for ever:
    after tiling.slide_timeout_s the slide fails (counted as a crash, so reruns do not wait
    on it again and again), its worker is replaced and the other slides are measured."""
    slides = _copy(bank, tmp_path / "slides")
    (tmp_path / "c.yaml").write_text("tiling:\n  input_timeout_s: 600\n  slide_timeout_s: 10\n")
    tag = uuid.uuid4().hex
    t0 = time.monotonic()
    code, err = finish(spawn(
        tag, "analyze", str(slides), "--out", str(tmp_path / "out"), "--workers", "2",
        "--config", str(tmp_path / "c.yaml"),
        env={"PYTHONPATH": fault_hook(tmp_path), "FQ_TEST_HANG_ON": "t2.tif"}))
    assert code == 1, err
    assert time.monotonic() - t0 < 120
    assert_none_left(tag)
    rows = pd.read_csv(tmp_path / "out" / "slides.csv", keep_default_na=False).set_index("slide")
    assert rows.loc["t2.tif", "error"] == (
        "t2.tif: not finished after 10 s (a read that hangs? tiling.slide_timeout_s); its "
        "worker process was ended")
    assert (rows.drop(index="t2.tif")["status"] == "ok").all()


@pytest.mark.slow
def test_a_slide_that_stalls_the_run_itself_ends_it_and_is_recorded(bank, tmp_path):
    """With --workers 1 the slide is measured in the run's own process, where no thread can
    stop a read that hangs: after tiling.slide_timeout_s the process ends (faulthandler's
    watchdog) leaving the marker, and the next run records the stall and measures the slide
    again in a process of its own."""
    from fibroquant.outdir import read_measuring_marker

    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    (tmp_path / "c.yaml").write_text("tiling:\n  input_timeout_s: 600\n  slide_timeout_s: 5\n")
    tag = uuid.uuid4().hex
    t0 = time.monotonic()
    code, err = finish(spawn(
        tag, "analyze", str(slides), "--out", str(out), "--workers", "1",
        "--config", str(tmp_path / "c.yaml"),
        env={"PYTHONPATH": fault_hook(tmp_path), "FQ_TEST_HANG_ON": "t2.tif"}))
    assert code == 1, err
    assert time.monotonic() - t0 < 90
    assert_none_left(tag)
    marker = read_measuring_marker(out)
    assert marker is not None and marker["slide"] == "t2.tif" and marker["stalled_s"] == 5
    code, err = cli("analyze", str(slides), "--out", str(out), "--workers", "1",
                    "--config", str(tmp_path / "c.yaml"))
    assert code == 0, err
    assert "t2.tif: the last run" not in err
    rows = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    assert (rows["status"] == "ok").all()
    assert read_measuring_marker(out) is None


@pytest.mark.slow
def test_watch_keeps_watching_after_its_event_handler_raises(bank, tmp_path, monkeypatch):
    """An exception in watch's file-event handler used to kill the watcher thread: the process
    stayed alive and never analysed again. Now it is logged and the next new slide is
    analysed."""
    import _thread
    import threading

    from fibroquant import cli_ops

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy2(bank / "c1.tif", slides / "c1.tif")
    out = tmp_path / "out"
    real_is_slide, real_run = cli_ops._is_slide, cli_ops.run_analyze
    raised: list[Path] = []

    def is_slide(path: Path, out_dir: Path) -> bool:  # a handler bug, once, on its thread
        if threading.current_thread() is not threading.main_thread() and not raised:
            raised.append(path)
            raise RuntimeError("a bug in the handler")
        return real_is_slide(path, out_dir)

    def run_analyze(*args, **kwargs):
        code = real_run(*args, **kwargs)
        measured = set(pd.read_csv(out / "slides.csv")["slide"])
        if measured == {"c1.tif"}:  # the first run: an event that makes the handler raise
            (slides / "notes.txt").write_text("not a slide")
            end = time.monotonic() + 30
            while not raised and time.monotonic() < end:
                time.sleep(0.05)
            shutil.copy2(bank / "t1.tif", slides / "t1.tif")  # then a new slide
        elif "t1.tif" in measured:
            raise KeyboardInterrupt  # analysed: stop watching
        return code

    monkeypatch.setattr(cli_ops, "_is_slide", is_slide)
    monkeypatch.setattr(cli_ops, "run_analyze", run_analyze)
    deadline = threading.Timer(120, _thread.interrupt_main)  # never analysed: stop the test
    deadline.start()
    try:
        code, output = cli("watch", str(slides), "--out", str(out), "--settle", "0.2",
                           "--workers", "1")
    finally:
        deadline.cancel()
    assert [p.name for p in raised] == ["notes.txt"]
    assert "notes.txt: a bug in the handler" in output
    rows = pd.read_csv(out / "slides.csv").set_index("slide")
    assert list(rows.index) == ["c1.tif", "t1.tif"]
    assert (rows["status"] == "ok").all()
    assert code == 130, output  # stopped by the test during its last run


# -- 6. the store ------------------------------------------------------------------------------


@pytest.mark.slow
def test_wal_deleted_during_a_run_loses_nothing(bank, tmp_path):
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    seen = []

    def on_result(rec):
        seen.append(rec["slide"])
        if len(seen) == 2:
            (out / "fibroquant.sqlite-wal").unlink()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = analyze_folder(slides, out, Settings(), workers=1, on_result=on_result)
    assert summary.exit_code == 0
    again = run(slides, out)
    assert again.processed == 0
    assert again.skipped == 4


@pytest.mark.slow
def test_zero_byte_store_is_refused_and_rebuilt_from_the_tables(bank, tmp_path):
    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    run(slides, out, samples=slides / "samples.csv")
    before = tables(out)
    (out / "fibroquant.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(f"{out / 'fibroquant.sqlite'}{suffix}").unlink(missing_ok=True)
    code, output = cli("analyze", str(slides), "--out", str(out), "--samples",
                       str(slides / "samples.csv"), "--workers", "1")
    assert code == 4
    assert "empty (0 bytes)" in output
    assert "store rebuild" in output
    assert cli("store", "check", str(out))[0] == 4
    code, output = cli("store", "rebuild", str(out))
    assert code == 0, output
    assert "rebuilt with 4 slide result(s)" in output
    assert cli("store", "check", str(out))[0] == 0
    summary = run(slides, out, samples=slides / "samples.csv")
    assert summary.processed == 0
    assert summary.skipped == 4
    after = tables(out)
    for name in TABLES:
        pd.testing.assert_frame_equal(before[name], after[name], obj=name)


@pytest.mark.slow
def test_a_store_that_lost_its_last_run_or_its_tables_is_refused(bank, tmp_path):
    import sqlite3

    slides = _copy(bank, tmp_path / "slides")
    out = tmp_path / "out"
    run(slides, out)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "run_id": 99}))
    code, output = cli("analyze", str(slides), "--out", str(out), "--workers", "1")
    assert code == 4
    assert "lost run #99" in output
    (out / "run.json").write_text(json.dumps(info))
    with sqlite3.connect(out / "fibroquant.sqlite") as conn:
        conn.execute("DROP TABLE history")
    code, output = cli("analyze", str(slides), "--out", str(out), "--workers", "1")
    assert code == 4
    assert "lost its tables (history)" in output


@contextlib.contextmanager
def read_only(folder: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``folder`` seen read-only: through a read-only bind mount (skips where the test cannot
    mount; chmod does not stop root), or with every write under it failing with EROFS."""
    if how == "inject":
        real_open, real_mkdir = os.open, os.mkdir
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def under(path) -> bool:
            return Path(os.fsdecode(path)).absolute().is_relative_to(folder)

        def ro_open(path, flags, *args, **kwargs):
            if flags & writes and under(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        def ro_mkdir(path, *args, **kwargs):
            if under(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", ro_open)
        monkeypatch.setattr(os, "mkdir", ro_mkdir)
        yield folder
        return
    view = folder.with_name(folder.name + "-ro")
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True,
                             check=False).returncode == 0
    try:
        if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", str(view)],
                                         capture_output=True, check=False).returncode != 0:
            pytest.skip("cannot mount a read-only view here")
        yield view
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(view)], capture_output=True, check=False)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["mount", "inject"])
def test_a_read_only_output_folder_is_one_line_exit_4_and_nothing_written(bank, tmp_path,
                                                                          monkeypatch, how):
    """A new OUT inside a read-only file system used to end in a traceback, and status on a
    read-only OUT called an intact store unreadable. Now analyze exits 4 with one line naming
    the folder, writes nothing, and status reads the store."""
    disk = tmp_path / "disk"
    run(bank, disk / "out", samples=bank / "samples.csv")
    before = _snapshot(disk)
    with read_only(disk, how, monkeypatch) as ro:
        code, output = cli("analyze", str(bank), "--out", str(ro / "out"), "--workers", "1")
        assert code == 4, output
        assert [line for line in output.splitlines() if "error" in line] == [
            line for line in output.splitlines() if line.strip()]
        assert (f"{ro / 'out' / '.fibroquant.lock'}: cannot open the output folder's lock "
                "file: Read-only file system") in output
        code, output = cli("analyze", str(bank), "--out", str(ro / "new"), "--workers", "1")
        assert code == 4, output
        assert f"cannot create the output folder {ro / 'new'}: Read-only file system" in output
        assert "Traceback" not in output
        if how == "mount":  # SQLite itself meets the read-only file system
            code, output = cli("status", str(ro / "out"))
            assert code == 0, output
            assert "4 slide(s) stored, 4 ok, 0 failed" in output
    assert _snapshot(disk) == before


# -- 7. exit codes and settings files --------------------------------------------------------


def test_an_internal_error_exits_4_with_one_line(bank, tmp_path, monkeypatch):
    from fibroquant import run as run_module

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(run_module, "write_tables", bug)
    code, output = cli("analyze", str(bank), "--out", str(tmp_path / "o"), "--workers", "1")
    assert code == 4, output
    assert "internal error: ZeroDivisionError: division by zero" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(("text", "message"), [
    ("collagen:\n  min_contrast_od: [0.1\n  x: 2\n", "c.yaml:3:4: not a readable YAML file"),
    ("collagen:\n  min_contrast_od: 0.1\ncollagen:\n  min_contrast_od: 0.2\n",
     "c.yaml:3:1: not a readable YAML file (key 'collagen' given twice)"),
    ("collagen:\n  relative_threshold: .nan\n",
     "collagen.relative_threshold: should be a finite number"),
    ("stains:\n  background_rgb: [300, -5, 255]\n",
     ("stains.background_rgb.0: should be less than or equal to 255; "
      "stains.background_rgb.1: should be greater than 0")),
    ("tiling:\n  mask_max_mpx: 1e12\n", "tiling.mask_max_mpx: should be less than"),
])
def test_bad_settings_files_are_one_line_usage_errors(tmp_path, text, message):
    from fibroquant.config import load_settings
    from fibroquant.errors import ConfigError

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.yaml")
    assert message in str(info.value)


def test_sigterm_outside_the_run_block_exits_143_with_one_line():
    """A SIGTERM that lands after the tables are written (the process ending) used to be a
    bare signal death (-15) instead of the documented 143 (seen once in CI)."""
    code = ("import os, signal, time; from fibroquant.errors import exit_143_on_sigterm; "
            "exit_143_on_sigterm(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 143
    assert proc.stderr.strip() == "terminated (SIGTERM)"


def test_a_slides_folder_that_does_not_answer_is_one_line_not_a_hang(bank, tmp_path,
                                                                      monkeypatch):
    """Listing a slides folder on a hung network share used to hang the run for ever, holding
    OUT_DIR's lock (every later cron run then exits 3, "locked"): now it gives up after
    tiling.input_timeout_s with one line and exit 2, and the next run can take the lock."""
    import threading

    from fibroquant import run as run_module

    release = threading.Event()
    real = run_module.list_slides
    monkeypatch.setattr(run_module, "list_slides",
                        lambda folder: (release.wait(60), real(folder))[1])
    slides = _copy(bank, tmp_path / "slides")
    (tmp_path / "c.yaml").write_text("tiling:\n  input_timeout_s: 1\n")
    t0 = time.monotonic()
    code, output = cli("analyze", str(slides), "--out", str(tmp_path / "out"), "--workers", "1",
                       "--config", str(tmp_path / "c.yaml"))
    release.set()
    assert code == 2, output
    assert time.monotonic() - t0 < 30
    assert f"{slides}: listing the slides folder: no answer after 1 s" in one_line(output)
    monkeypatch.setattr(run_module, "list_slides", real)
    code, output = cli("analyze", str(slides), "--out", str(tmp_path / "out"), "--workers", "1")
    assert code == 0, output


def test_a_failure_after_sigterm_still_exits_143(bank, tmp_path, monkeypatch):
    """A SIGTERM that cuts an import in two can make a later import of the same package fail
    (CI saw "Module 'scipy' has no attribute '_lib'" and exit 4): once interrupted, the
    command says so and exits 143 whatever fails after."""
    from fibroquant import run as run_module

    def interrupted_then_broken(*args, **kwargs):
        with contextlib.suppress(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise AttributeError("Module 'scipy' has no attribute '_lib'")

    monkeypatch.setattr(run_module, "analyze_folder", interrupted_then_broken)
    code, output = cli("analyze", str(bank), "--out", str(tmp_path / "out"), "--workers", "1")
    assert code == 143, output
    assert "interrupted" in output and "internal error" not in output
