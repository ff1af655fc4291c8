"""Reruns, crashes and concurrent runs of ``fibroquant analyze`` on tiny synthetic slides.

Real runs, no mocks: in-process through the Typer app where a clean run is enough (fast), and
``python -m fibroquant`` subprocesses for SIGKILL, SIGINT and two runs racing for one OUT_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fibroquant.cli import app
from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

N_SLIDES = 4
TIMING = ["seconds"]  # per-slide timing: the only run-dependent column of slides.csv
REPO = Path(__file__).resolve().parents[1]


def _slide(path: Path, seed: int, size: int = 384) -> None:
    rgb, _ = make_section(SectionParams(shape=(size, size)), rng=seed)
    write_pyramid_tiff(path, rgb, 0.5)


@pytest.fixture(scope="module")
def slide_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny slides made once per module (copied into each test's folder)."""
    bank = tmp_path_factory.mktemp("bank")
    for i in range(N_SLIDES + 2):
        _slide(bank / f"s{i}.tif", seed=100 + i)
    return bank


def _folder(bank: Path, dest: Path, n: int = N_SLIDES) -> Path:
    dest.mkdir(parents=True)
    for i in range(n):
        shutil.copy2(bank / f"s{i}.tif", dest / f"s{i}.tif")
    return dest


def analyze(slides: Path, out: Path, *extra: str) -> tuple[int, dict]:
    """Run ``fibroquant analyze`` in this process; return exit code and run.json."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # a slide's UserWarning must not fail the slide
        res = CliRunner().invoke(
            app, ["analyze", str(slides), "--out", str(out), "--workers", "1", *extra]
        )
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    return res.exit_code, run


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return env


#: ``python -m fibroquant`` with Ctrl-C raising KeyboardInterrupt even when the test process
#: ignores SIGINT (an ignored signal is inherited, and Python then installs no handler).
_MAIN = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "sys.argv[0] = 'fibroquant'; runpy.run_module('fibroquant', run_name='__main__')")


def spawn(slides: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _MAIN, "analyze", str(slides), "--out", str(out),
         "--workers", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True,
    )


def n_stored(out: Path) -> int:
    """Results committed so far (read like `status` does: no lock, tolerant of no file yet)."""
    db = out / "fibroquant.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
    except sqlite3.Error:
        return 0


def wait_for(cond, timeout: float = 60.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return False


def slides_table(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out / "slides.csv")
    return df.drop(columns=TIMING).sort_values("slide").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(slide_bank: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run over the standard folder."""
    root = tmp_path_factory.mktemp("ref")
    slides = _folder(slide_bank, root / "slides")
    code, run = analyze(slides, root / "out")
    assert code == 0 and run["processed"] == N_SLIDES
    return root / "out"


# --------------------------------------------------------------------------------------------


def _copy_reference(reference: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the reference study (slides keep their mtimes: the cache still applies)."""
    shutil.copytree(reference.parent, dest, copy_function=shutil.copy2)
    return dest / "slides", dest / "out"


@pytest.mark.slow
def test_rerun_nothing_new_is_identical_and_cheap(reference: Path, tmp_path: Path) -> None:
    slides, out = _copy_reference(reference, tmp_path / "study")
    first = json.loads((out / "run.json").read_text())
    assert first["processed"] == N_SLIDES and first["skipped"] == 0
    before = {n: (out / n).read_bytes() for n in ("slides.csv", "mice.csv", "groups.csv")}
    prov1 = json.loads((out / "provenance.json").read_text())
    qc_mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "qc").iterdir()}

    code, again = analyze(slides, out)
    assert code == 0
    assert (again["processed"], again["skipped"], again["failed"], again["removed"]) == (
        0, N_SLIDES, 0, 0)
    for name, data in before.items():
        assert (out / name).read_bytes() == data, f"{name} changed on a rerun with nothing new"
    prov2 = json.loads((out / "provenance.json").read_text())
    for run_specific in ("started_utc", "command", "slides_dir"):  # slides_dir: the copy
        prov1.pop(run_specific)
        prov2.pop(run_specific)
    assert prov1 == prov2
    # skipped slides are not re-measured: their QC overlays were not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (out / "qc").iterdir()} == qc_mtimes


@pytest.mark.slow
def test_changed_removed_new_force_and_settings(
    slide_bank: Path, reference: Path, tmp_path: Path
) -> None:
    slides, out = _copy_reference(reference, tmp_path / "study")
    base = slides_table(out).set_index("slide")

    # a changed file (other content, same name) is re-measured, and only it; a removed slide
    # disappears from slides.csv and is counted as removed
    _slide(slides / "s1.tif", seed=999)
    (slides / "s2.tif").unlink()
    code, run = analyze(slides, out)
    assert (code, run["processed"], run["skipped"], run["removed"]) == (0, 1, N_SLIDES - 2, 1)
    now = slides_table(out).set_index("slide")
    assert now.loc["s1.tif", "fingerprint"] != base.loc["s1.tif", "fingerprint"]
    assert now.loc["s1.tif", "cpa_percent"] != base.loc["s1.tif", "cpa_percent"]
    assert "s2.tif" not in now.index
    keep = [s for s in now.index if s != "s1.tif"]
    pd.testing.assert_frame_equal(now.loc[keep], base.loc[keep])
    assert "s2.tif" in json.loads((out / "provenance.json").read_text())["removed_slides"]

    # a new slide is processed alone
    shutil.copy2(slide_bank / f"s{N_SLIDES}.tif", slides / "new.tif")
    code, run = analyze(slides, out)
    assert (code, run["processed"], run["skipped"]) == (0, 1, N_SLIDES - 1)
    assert "new.tif" in set(pd.read_csv(out / "slides.csv")["slide"])

    # --force redoes all
    code, run = analyze(slides, out, "--force")
    assert (code, run["processed"], run["skipped"]) == (0, N_SLIDES, 0)

    # other settings re-measure everything, with another settings hash
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("collagen:\n  relative_threshold: 0.35\n")
    code, run2 = analyze(slides, out, "--config", str(cfg))
    assert run2["processed"] == N_SLIDES and run2["skipped"] == 0
    assert run2["settings_hash"] != run["settings_hash"]
    assert not any("QC overlays" in w for w in run2["warnings"])
    # back to the first settings: their stored results, without measuring; the overlays show
    # the strict settings' until redrawn, and the run says so
    code, run3 = analyze(slides, out)
    assert (run3["processed"], run3["skipped"]) == (0, N_SLIDES)
    assert any(w.startswith(f"{N_SLIDES} slide(s) (") and "their QC overlays (and masks) show "
               "the last settings measured with; --force redraws them" in w
               for w in run3["warnings"])


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(
    slide_bank: Path, reference: Path, tmp_path: Path
) -> None:
    """Kill -9 at three points (after 1, 2 and 3 stored slides); the rerun completes."""
    slides = _folder(slide_bank, tmp_path / "slides")
    out = tmp_path / "out"
    for k in (1, 2, 3):
        proc = spawn(slides, out)
        try:
            assert wait_for(lambda k=k, proc=proc: n_stored(out) >= k or proc.poll() is not None)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        stored = n_stored(out)
        assert k <= stored < N_SLIDES, f"kill point {k}: {stored} stored"
    code, run = analyze(slides, out)
    assert code == 0
    assert run["processed"] == N_SLIDES - stored and run["skipped"] == stored
    got, want = slides_table(out), slides_table(reference)
    assert got["slide"].is_unique and len(got) == N_SLIDES
    pd.testing.assert_frame_equal(got, want)
    with sqlite3.connect(out / "fibroquant.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == N_SLIDES
        killed = conn.execute("SELECT count(*) FROM runs WHERE finished_at IS NULL").fetchone()
        assert killed[0] == 3
    assert not list(out.glob("*.fibroquant-tmp*"))


@pytest.mark.slow
def test_second_run_is_refused_or_waits(slide_bank: Path, tmp_path: Path) -> None:
    slides = _folder(slide_bank, tmp_path / "slides")
    out = tmp_path / "out"
    out.mkdir()
    first = spawn(slides, out)
    try:
        assert wait_for(lambda: n_stored(out) >= 1 or first.poll() is not None)
        assert first.poll() is None, "first run ended before the second started"
        # refused at once: exit 3, naming the folder and --wait
        code_res = CliRunner().invoke(app, ["analyze", str(slides), "--out", str(out)])
        assert code_res.exit_code == 3
        msg = " ".join(code_res.output.split())
        assert str(out) in msg.replace("\n", "") or out.name in msg
        assert "--wait" in msg
        # queued: completes after the first
        second = spawn(slides, out, "--wait")
        _, err2 = second.communicate(timeout=120)
    finally:
        first.communicate(timeout=120)
    with sqlite3.connect(out / "fibroquant.sqlite") as conn:
        rows = conn.execute("SELECT started_at, finished_at FROM runs ORDER BY run_id").fetchall()
    assert len(rows) == 2
    assert rows[0][1] is not None and rows[0][1] <= rows[1][0], "--wait run overlapped the first"
    assert first.returncode == 0
    assert second.returncode == 0, err2
    run = json.loads((out / "run.json").read_text())
    assert (run["processed"], run["skipped"]) == (0, N_SLIDES)


@pytest.mark.slow
def test_ctrl_c_stops_keeps_store_and_rerun_completes(
    slide_bank: Path, reference: Path, tmp_path: Path
) -> None:
    slides = _folder(slide_bank, tmp_path / "slides")
    out = tmp_path / "out"
    proc = spawn(slides, out)
    try:
        assert wait_for(lambda: n_stored(out) >= 2 or proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - t0 < 20
    assert proc.returncode in (130, 1), err
    stored = n_stored(out)
    assert 2 <= stored <= N_SLIDES
    with sqlite3.connect(out / "fibroquant.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    code, run = analyze(slides, out)
    assert code == 0 and run["processed"] == N_SLIDES - stored
    pd.testing.assert_frame_equal(slides_table(out), slides_table(reference))
