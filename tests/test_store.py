"""Tests of the results store: round trips, reruns, crash safety, locking and concurrency.

Crash and concurrency tests run real child processes (``sys.executable -c``) and SIGKILL them;
nothing is mocked.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fibroquant.store as fq_store
from fibroquant.errors import SlideReadError, StoreError, StoreLockedError
from fibroquant.store import (
    FINGERPRINT_CHUNK,
    LOCK_NAME,
    SCHEMA_VERSION,
    STORE_NAME,
    TEMP_SUFFIX,
    FingerprintCache,
    OutputLock,
    ResultStore,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    fingerprint,
    remove_stale_temp_files,
)

REPO = Path(__file__).resolve().parents[1]
H = "settings-hash-1"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def record(slide: str, fp: str, settings_hash: str = H, **extra: Any) -> dict[str, Any]:
    """A minimal valid record."""
    return {
        "slide": slide,
        "fingerprint": fp,
        "settings_hash": settings_hash,
        "status": "ok",
        "error": None,
        **extra,
    }


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN and keeps bool/int/float types apart."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    with ResultStore(tmp_path / STORE_NAME) as s:
        yield s


@pytest.fixture
def run_id(store: ResultStore) -> int:
    return store.start_run(command="fibroquant analyze s --out o", version="0.1.0",
                           settings_hash=H, settings_json="{}")


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``python -c code args…`` with the package importable and stdout piped."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def expect_line(proc: subprocess.Popen[str], expected: str) -> None:
    """Read one line from a child and check it; show its stderr when it died instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child said {line!r}, expected {expected!r}; stderr:\n{err}")


def reap(proc: subprocess.Popen[str], *, kill: bool = True) -> int:
    """SIGKILL (optionally) and wait for a child, closing its pipes."""
    if kill and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return proc.returncode


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------


def test_fingerprint_depends_on_content_and_size(tmp_path: Path) -> None:
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(b"slide" * 1000)
    b.write_bytes(b"slide" * 1000)
    assert fingerprint(a) == fingerprint(b) == fingerprint(a, size=5000)
    assert len(fingerprint(a)) == 64
    b.write_bytes(b"slide" * 999 + b"slidX")
    assert fingerprint(a) != fingerprint(b)
    b.write_bytes(b"slide" * 1001)
    assert fingerprint(a) != fingerprint(b)


def test_fingerprint_of_large_file_reads_only_the_ends(tmp_path: Path) -> None:
    big = tmp_path / "big.svs"
    size = 5 * FINGERPRINT_CHUNK
    with big.open("wb") as fh:
        fh.truncate(size)  # sparse: cheap on disk
    before = fingerprint(big)
    with big.open("r+b") as fh:  # the middle is not sampled (documented limitation)
        fh.seek(size // 2)
        fh.write(b"x")
    assert fingerprint(big) == before
    with big.open("r+b") as fh:  # the last MiB is
        fh.seek(size - 10)
        fh.write(b"x")
    assert fingerprint(big) != before
    with big.open("r+b") as fh:  # and so is the first
        fh.write(b"y")
    assert fingerprint(big) not in (before,)


def test_fingerprint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SlideReadError, match=r"missing\.svs"):
        fingerprint(tmp_path / "missing.svs")
    short = tmp_path / "copying.svs"
    short.write_bytes(b"abc")
    with pytest.raises(SlideReadError, match=r"copying\.svs.*shorter"):
        fingerprint(short, size=10)


def test_fingerprint_cache_skips_unchanged_files(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    (slides / "sub").mkdir(parents=True)
    f = slides / "sub" / "a.svs"
    f.write_bytes(b"content")
    old = time.time() - 3600
    os.utime(f, (old, old))
    with ResultStore(tmp_path / STORE_NAME) as store:
        with FingerprintCache(store, slides) as cache:
            fp = cache.fingerprint(f)
            assert cache.fingerprint(Path("sub/a.svs")) == fp
            assert (cache.hits, cache.misses) == (1, 1)
        st_ = f.stat()
        assert store.fingerprint_cache_get("sub/a.svs", st_.st_size, st_.st_mtime_ns) == fp
        assert store.fingerprint_cache_get("sub/a.svs", st_.st_size + 1, st_.st_mtime_ns) is None
        with FingerprintCache(store, slides) as cache:  # a new run: read from the table
            assert cache.fingerprint(f) == fp
            assert (cache.hits, cache.misses) == (1, 0)
            f.write_bytes(b"CONTENT")  # same size, new mtime -> re-hashed
            os.utime(f, (old + 1, old + 1))
            assert cache.fingerprint(f) != fp
            assert cache.misses == 1


def test_fingerprint_cache_does_not_trust_just_modified_files(tmp_path: Path) -> None:
    f = tmp_path / "fresh.svs"
    f.write_bytes(b"still being copied")
    with ResultStore(tmp_path / STORE_NAME) as store:
        with FingerprintCache(store, tmp_path, racy_seconds=60) as cache:
            cache.fingerprint(f)
            cache.fingerprint(f)
            assert cache.misses == 2  # never cached while within the racy window
        st_ = f.stat()
        assert store.fingerprint_cache_get("fresh.svs", st_.st_size, st_.st_mtime_ns) is None


# ---------------------------------------------------------------------------------------------
# results store: behaviour
# ---------------------------------------------------------------------------------------------


def test_put_get_round_trip_and_upsert(store: ResultStore, run_id: int) -> None:
    rec = record("a.svs", "fp-a", cpa_percent=3.25, tissue_area_mm2=12.5, n=3, note="süß ✓")
    store.put_result(rec, run_id=run_id)
    assert store.get_result("fp-a", H) == rec
    assert store.get_result("fp-a", "other-settings") is None
    assert store.known(H) == {"fp-a": "ok"}

    failed = record("a.svs", "fp-a", status="failed")
    failed["error"] = "a.svs: truncated"
    store.put_result(failed, run_id=run_id)
    store.put_result(rec, run_id=run_id)  # retried and now ok: upserted, not duplicated
    assert store.known(H) == {"fp-a": "ok"}
    assert store.current_results(H) == [rec]
    assert [r["status"] for r in store.history(H)] == ["ok", "failed", "ok"]


def test_changed_file_replaces_current_row_but_history_keeps_both(
    store: ResultStore, run_id: int
) -> None:
    store.put_result(record("a.svs", "fp-old", cpa_percent=1.0), run_id=run_id)
    store.put_result(record("b.svs", "fp-b", cpa_percent=2.0), run_id=run_id)
    store.put_result(record("a.svs", "fp-new", cpa_percent=9.0), run_id=run_id)

    current = store.current_results(H)
    assert [(r["slide"], r["cpa_percent"]) for r in current] == [("a.svs", 9.0), ("b.svs", 2.0)]
    assert [r["fingerprint"] for r in store.history(H, slide="a.svs")] == ["fp-old", "fp-new"]
    assert store.get_result("fp-old", H) is not None  # the old content's result is kept
    assert set(store.known(H)) == {"fp-old", "fp-new", "fp-b"}


def test_current_results_filters_removed_slides(store: ResultStore, run_id: int) -> None:
    for name in ("a.svs", "b.svs", "c.svs"):
        store.put_result(record(name, f"fp-{name}"), run_id=run_id)
    present = {"a.svs", "c.svs", "new.svs"}
    assert [r["slide"] for r in store.current_results(H, present)] == ["a.svs", "c.svs"]
    assert store.removed_slides(present) == ["b.svs"]
    assert len(store.history(H)) == 3  # history keeps the removed slide
    assert [r["slide"] for r in store.current_results(H)] == ["a.svs", "b.svs", "c.svs"]


def test_current_results_are_per_settings_hash(store: ResultStore, run_id: int) -> None:
    store.put_result(record("a.svs", "fp-a", settings_hash="h1", v=1), run_id=run_id)
    store.put_result(record("a.svs", "fp-a", settings_hash="h2", v=2), run_id=run_id)
    assert [r["v"] for r in store.current_results("h1")] == [1]
    assert [r["v"] for r in store.current_results("h2")] == [2]
    assert set(store.settings_hashes()) == {H, "h1", "h2"}


def test_link_slides_tracks_files_skipped_by_the_planner(store: ResultStore, run_id: int) -> None:
    store.put_result(record("a.svs", "fp-1", v="first"), run_id=run_id)
    store.put_result(record("b.svs", "fp-2", v="second"), run_id=run_id)
    # a.svs now has b.svs's content (already measured, so skipped) and b.svs new, unmeasured content
    store.link_slides({"a.svs": "fp-2", "b.svs": "fp-3"}, run_id=run_id)
    current = store.current_results(H)
    assert [(r["slide"], r["v"]) for r in current] == [("a.svs", "second")]


def test_last_measured_and_slide_paths(store: ResultStore, run_id: int) -> None:
    assert store.last_measured() == {} and store.slide_paths() == []
    store.put_result(record("a.svs", "fp-1"), run_id=run_id)
    store.put_result(record("b.svs", "fp-2", settings_hash="h2"), run_id=run_id)
    store.put_result(record("a.svs", "fp-3", settings_hash="h2"), run_id=run_id)
    store.put_result({**record("b.svs", "fp-2"), "status": "failed", "error": "b.svs: x"},
                     run_id=run_id)
    store.put_result(record("a.svs", "fp-1"), run_id=run_id)  # back to the first
    assert store.last_measured() == {"a.svs": ("fp-1", H, "ok"), "b.svs": ("fp-2", H, "failed")}
    store.link_slides({"c.svs": "fp-9"}, run_id=run_id)  # planned, not measured
    assert store.slide_paths() == ["a.svs", "b.svs", "c.svs"]
    assert "c.svs" not in store.last_measured()
    store.forget_slides(["a.svs"])
    assert store.slide_paths() == ["b.svs", "c.svs"]
    assert store.last_measured()["a.svs"] == ("fp-1", H, "ok")  # the history stays


def test_record_move_points_the_new_path_at_the_stored_result(store: ResultStore,
                                                               run_id: int) -> None:
    """A renamed slide: the new path shows the stored result, the history says so, the result
    row itself (and the run that measured it) is untouched; only an ok result can be moved."""
    store.put_result(record("old.svs", "fp-1", cpa_percent=4.5), run_id=run_id)
    store.put_result({**record("bad.svs", "fp-2"), "status": "failed", "error": "x"},
                     run_id=run_id)
    before = store._db.execute("SELECT slide, run_id, record_json FROM results").fetchall()
    later = store.start_run(command="t", version="0", settings_hash=H, settings_json="{}")
    store.record_move("sub/new.svs", "fp-1", H, run_id=later)
    assert store.last_measured()["sub/new.svs"] == ("fp-1", H, "ok")
    current = {r["slide"]: r for r in store.current_results(H, present={"sub/new.svs"})}
    assert current["sub/new.svs"]["cpa_percent"] == 4.5
    assert store._db.execute("SELECT slide, run_id, record_json FROM results").fetchall() == before
    row = store._db.execute("SELECT slide, run_id, status FROM history ORDER BY id DESC"
                            " LIMIT 1").fetchone()
    assert tuple(row) == ("sub/new.svs", later, "ok")
    assert tuple(store._db.execute("SELECT fingerprint, run_id FROM slides WHERE slide = ?",
                                   ("sub/new.svs",)).fetchone()) == ("fp-1", later)
    with pytest.raises(StoreError, match="no measured result"):
        store.record_move("b2.svs", "fp-2", H, run_id=later)
    with pytest.raises(StoreError, match="no measured result"):
        store.record_move("c.svs", "fp-9", H, run_id=later)


def test_failed_last_runs_and_settings(store: ResultStore, run_id: int) -> None:
    bad = record("bad.svs", "fp-bad", status="failed")
    bad["error"] = "bad.svs: not a TIFF"
    store.put_result(bad, run_id=run_id)
    store.put_result(record("good.svs", "fp-good"), run_id=run_id)
    assert [r["slide"] for r in store.failed_last(H)] == ["bad.svs"]
    store.finish_run(run_id, processed=2, skipped=0, failed=1, removed=0, exit_code=1, seconds=1.5)
    second = store.start_run(command="c2", version="0.1.0", settings_hash="h2", settings_json="{}")
    runs = store.runs()
    assert [r["run_id"] for r in runs] == [second, run_id]
    assert runs[1]["failed"] == 1 and runs[1]["exit_code"] == 1 and runs[1]["seconds"] == 1.5
    assert runs[0]["finished_at"] is None
    assert len(store.runs(limit=1)) == 1
    with pytest.raises(StoreError, match="no run with id 999"):
        store.finish_run(999, processed=0, skipped=0, failed=0, removed=0, exit_code=0, seconds=0)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"slide": "a.svs", "fingerprint": "f", "settings_hash": H, "status": "ok"}, "without error"),
        (record("a.svs", "f", status="done"), "status 'done'"),
        (record("", "f"), "'slide' must be"),
        (record("a.svs", "f", blob=object()), "cannot store the record"),
    ],
)
def test_put_result_rejects_bad_records(
    store: ResultStore, run_id: int, bad: dict[str, Any], match: str
) -> None:
    with pytest.raises(StoreError, match=match):
        store.put_result(bad, run_id=run_id)
    assert store.known(H) == {}


def test_nan_and_inf_round_trip(store: ResultStore, run_id: int) -> None:
    rec = record("a.svs", "f", cpa=float("nan"), hi=float("inf"), lo=float("-inf"), z=-0.0)
    store.put_result(rec, run_id=run_id)
    assert same(store.get_result("f", H), rec)


text_keys = st.text(min_size=1, max_size=20).filter(
    # the record's own keys, and the history's metadata keys (never in pipeline records)
    lambda k: k not in {"slide", "fingerprint", "settings_hash", "status", "error", "_run_id",
                        "_written_at"}
)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ResultStore, int]]:
    with ResultStore(tmp_path_factory.mktemp("hypothesis") / STORE_NAME) as store:
        run = store.start_run(command="c", version="v", settings_hash=H, settings_json="{}")
        yield store, run


_unique = itertools.count()


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(
    slide=st.text(min_size=1, max_size=30),
    status=st.sampled_from(["ok", "failed"]),
    error=st.one_of(st.none(), st.text(max_size=30)),
    extra=st.dictionaries(text_keys, values, max_size=8),
)
def test_arbitrary_records_round_trip(
    shared_store: tuple[ResultStore, int],
    slide: str,
    status: str,
    error: str | None,
    extra: dict[str, Any],
) -> None:
    store, run = shared_store
    rec = {"slide": slide, "fingerprint": f"fp-{next(_unique)}", "settings_hash": H,
           "status": status, "error": error, **extra}
    store.put_result(rec, run_id=run)
    assert same(store.get_result(rec["fingerprint"], H), rec)
    (current,) = store.current_results(H, {slide})
    assert same(current, rec)
    last = store.history(H, slide=slide)[-1]
    assert last.pop("_run_id") == run
    assert isinstance(last.pop("_written_at"), str)
    assert same(last, rec)


# ---------------------------------------------------------------------------------------------
# results store: opening, schema, bad files
# ---------------------------------------------------------------------------------------------


def test_reopen_is_idempotent_and_sets_schema(tmp_path: Path) -> None:
    path = tmp_path / STORE_NAME
    with ResultStore(path) as store:
        run = store.start_run(command="c", version="v", settings_hash=H, settings_json="{}")
        store.put_result(record("a.svs", "f"), run_id=run)
        assert store.journal_mode == "wal"
    with ResultStore(path) as store:
        assert store.known(H) == {"f": "ok"}
        store.check()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_NAME
    ResultStore(path).close()
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    finally:
        conn.close()
    with pytest.raises(StoreError, match=rf"{STORE_NAME}: written by a newer fibroquant"):
        ResultStore(path)


def test_corrupt_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / STORE_NAME
    garbage = b"this is not sqlite " * 500
    path.write_bytes(garbage)
    with pytest.raises(StoreError, match=rf"{STORE_NAME}: not a readable fibroquant results store"):
        ResultStore(path)
    assert path.read_bytes() == garbage


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_NAME
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE lab_notes (x)")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(StoreError, match="another program's SQLite database"):
        ResultStore(path)


def test_network_file_system_uses_a_rollback_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fq_store, "_filesystem_type", lambda path: "nfs4")
    with ResultStore(tmp_path / STORE_NAME) as store:
        assert store.journal_mode == "delete"
        run = store.start_run(command="c", version="v", settings_hash=H, settings_json="{}")
        store.put_result(record("a.svs", "f"), run_id=run)
    assert not (tmp_path / f"{STORE_NAME}-wal").exists()


def test_local_file_system_is_detected(tmp_path: Path) -> None:
    assert fq_store._filesystem_type(tmp_path) not in (None, "nfs", "nfs4", "cifs")


def test_missing_folder_and_closed_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ResultStore(tmp_path / "nope" / STORE_NAME)
    store = ResultStore(tmp_path / STORE_NAME)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.known(H)


# ---------------------------------------------------------------------------------------------
# crash safety
# ---------------------------------------------------------------------------------------------

WRITER = r"""
import hashlib, sys
from pathlib import Path
from fibroquant.store import ResultStore
with ResultStore(Path(sys.argv[1])) as store:
    i = len(store.known("h"))
    run = store.start_run(command="writer", version="0", settings_hash="h", settings_json="{}")
    print("ready", flush=True)
    while True:
        payload = ("%07d|" % i) * 1500
        rec = {"slide": "s%07d.svs" % i, "fingerprint": "fp%07d" % i, "settings_hash": "h",
               "status": "ok", "error": None, "i": i, "payload": payload,
               "digest": hashlib.sha256(payload.encode()).hexdigest(), "nan": float("nan")}
        rec.update({"m%02d" % j: j / 7 for j in range(40)})
        store.put_result(rec, run_id=run)
        store.fingerprint_cache_put("s%07d.svs" % i, i, i, "fp%07d" % i)
        i += 1
"""


def check_writer_store(path: Path) -> int:
    """Open the store a killed writer left, check every record, and return how many there are."""
    with ResultStore(path) as store:
        store.check()
        known = store.known("h")
        current = store.current_results("h")
        history = store.history("h")
    n = len(known)
    # one transaction per record: results, slides and history always agree, with no gaps
    assert len(current) == len(history) == n
    assert sorted(known) == [f"fp{i:07d}" for i in range(n)]
    keys = {"slide", "fingerprint", "settings_hash", "status", "error", "i", "payload",
            "digest", "nan"} | {f"m{j:02d}" for j in range(40)}
    for i, rec in enumerate(current):
        assert set(rec) == keys
        assert rec["i"] == i and rec["fingerprint"] == f"fp{i:07d}"
        assert hashlib.sha256(rec["payload"].encode()).hexdigest() == rec["digest"]
        assert math.isnan(rec["nan"])
    return n


@pytest.mark.slow
def test_killed_writer_never_leaves_a_half_written_record(tmp_path: Path) -> None:
    path = tmp_path / STORE_NAME
    rng = random.Random(20240611)
    counts = [0]
    delays = [0.0, 0.005, 0.02] + [rng.uniform(0.0, 0.25) for _ in range(7)]
    for n_iter, delay in enumerate(delays):
        proc = spawn(WRITER, str(path))
        if n_iter >= 2:  # the first kills may land while the schema is being created
            expect_line(proc, "ready")
        time.sleep(delay)
        reap(proc)
        n = check_writer_store(path)
        assert n >= counts[-1], f"record count went down: {counts} -> {n}"
        counts.append(n)
    assert counts[-1] > 0, "the writer never got to write: the kills proved nothing"


def test_killed_lock_holder_releases_the_lock(tmp_path: Path) -> None:
    holder = spawn(
        "import sys, time\nfrom pathlib import Path\nfrom fibroquant.store import OutputLock\n"
        "with OutputLock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n",
        str(tmp_path),
    )
    try:
        expect_line(holder, "locked")
        with pytest.raises(StoreLockedError, match=rf"pid {holder.pid}, started "):
            OutputLock(tmp_path).acquire()
    finally:
        reap(holder)
    start = time.monotonic()
    with OutputLock(tmp_path) as lock:
        assert lock.locked
    assert time.monotonic() - start < 1.0
    assert (tmp_path / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------------------------

HOLD_THEN_RELEASE = r"""
import sys, time
from pathlib import Path
from fibroquant.store import OutputLock
lock = OutputLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
print("released", flush=True)
time.sleep(60)
"""


def test_second_run_is_refused_at_once_without_wait(tmp_path: Path) -> None:
    holder = spawn(HOLD_THEN_RELEASE, str(tmp_path), "60")
    try:
        expect_line(holder, "locked")
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as info, OutputLock(tmp_path):
            pass
        assert time.monotonic() - start < 0.5
        message = str(info.value)
        assert message.startswith(f"{tmp_path}: another fibroquant run (pid {holder.pid}, started ")
        assert message.endswith("is using this output folder; use --wait to queue behind it")
        assert "\n" not in message
        with pytest.raises(StoreLockedError, match=r"after waiting 0\.3 s"):
            OutputLock(tmp_path, wait=True, timeout=0.3).acquire()
    finally:
        reap(holder)


def test_waiting_run_says_once_that_it_waits(tmp_path: Path, caplog) -> None:
    holder = spawn(HOLD_THEN_RELEASE, str(tmp_path), "60")
    try:
        expect_line(holder, "locked")
        with (caplog.at_level("WARNING", logger="fibroquant.store"),
              pytest.raises(StoreLockedError)):
            OutputLock(tmp_path, wait=True, timeout=0.5).acquire()
        waits = [r.getMessage() for r in caplog.records if "waiting for another" in r.getMessage()]
        assert len(waits) == 1 and f"pid {holder.pid}" in waits[0]
    finally:
        reap(holder)


def test_second_run_with_wait_gets_the_lock_after_release(tmp_path: Path) -> None:
    holder = spawn(HOLD_THEN_RELEASE, str(tmp_path), "0.6")
    try:
        expect_line(holder, "locked")
        start = time.monotonic()
        with OutputLock(tmp_path, wait=True, timeout=20) as lock:
            waited = time.monotonic() - start
            assert lock.locked
            expect_line(holder, "released")  # the holder is still alive: it released, not died
            assert holder.poll() is None
        assert 0.3 < waited < 10
    finally:
        reap(holder)


CONCURRENT_WRITER = r"""
import sys, time
from pathlib import Path
from fibroquant.store import ResultStore
path, tag, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
with ResultStore(path) as store:
    run = store.start_run(command=tag, version="0", settings_hash="h", settings_json="{}")
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    for i in range(250):
        store.put_result({"slide": "%s-%d.svs" % (tag, i), "fingerprint": "%s-%d" % (tag, i),
                          "settings_hash": "h", "status": "ok", "error": None, "i": i}, run_id=run)
        if i % 50 == 0:
            store.known("h")
    store.finish_run(run, processed=250, skipped=0, failed=0, removed=0, exit_code=0, seconds=0)
"""


def test_two_processes_writing_one_store_lose_no_rows(tmp_path: Path) -> None:
    path, go = tmp_path / STORE_NAME, tmp_path / "go"
    ResultStore(path).close()
    procs = [spawn(CONCURRENT_WRITER, str(path), tag, str(go)) for tag in ("A", "B")]
    try:
        for proc in procs:
            expect_line(proc, "ready")
        go.touch()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    finally:
        codes = [reap(proc, kill=False) for proc in procs]
    assert codes == [0, 0]
    with ResultStore(path) as store:
        known = store.known("h")
        assert len(known) == 500
        assert len(store.history("h")) == 500
        assert len(store.current_results("h")) == 500
        assert all(r["exit_code"] == 0 for r in store.runs())


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    atomic_write_text(target, '{"processed": 1}\n')
    atomic_write_text(target, '{"processed": 2}\n')
    assert target.read_text() == '{"processed": 2}\n'
    df = pd.DataFrame({"slide": ["ä.svs", "b.svs"], "cpa_percent": [1.5, float("nan")]})
    atomic_write_csv(tmp_path / "slides.csv", df)
    back = pd.read_csv(tmp_path / "slides.csv")
    pd.testing.assert_frame_equal(back, df)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "slides.csv"]


def test_remove_stale_temp_files_only_removes_ours(tmp_path: Path) -> None:
    stale = tmp_path / f".slides.csv.abc123{TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    (tmp_path / "slides.csv").write_bytes(b"whole")
    (tmp_path / ".hidden").write_bytes(b"user file")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "slides.csv"]


def test_atomic_write_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    new = tmp_path / "new.csv"
    atomic_write_bytes(new, b"x")
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    new.chmod(0o640)
    atomic_write_bytes(new, b"y")
    assert new.stat().st_mode & 0o777 == 0o640


def test_atomic_write_failure_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(StoreError, match=r"cannot write .*a_file/x\.csv"):
        atomic_write_bytes(tmp_path / "a_file" / "x.csv", b"x")  # its folder is a file
    target = tmp_path / "a_dir"
    target.mkdir()
    with pytest.raises(StoreError, match=r"cannot write .*a_dir: "):
        atomic_write_bytes(target, b"x")  # cannot replace a directory with a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]


def test_one_temp_name_pattern_and_every_writers_leftovers_cleaned(tmp_path: Path) -> None:
    # a report writer killed mid-write used to leave .NAME.XXXXXXXX.tmp in qc/, which the
    # cleanup never removed; every writer now uses one pattern, and both are cleaned
    from fibroquant import report
    from fibroquant.outdir import clean_output_folder

    qc = tmp_path / "qc"
    report.write_png(qc / "a.png", np.zeros((4, 4), bool))
    old = qc / ".a.png.k3j_x9q2.tmp"
    old.write_bytes(b"half")
    new = qc / f".a.png.abcd1234{TEMP_SUFFIX}"
    new.write_bytes(b"half")
    (qc / "notes.tmp").write_bytes(b"a user's file")
    removed = clean_output_folder(tmp_path)
    assert sorted(p.name for p in removed) == sorted([old.name, new.name])
    assert sorted(p.name for p in qc.iterdir()) == ["a.png", "notes.tmp"]


ATOMIC_WRITER = r"""
import sys
from pathlib import Path
from fibroquant.store import atomic_write_bytes
target = Path(sys.argv[1])
print("ready", flush=True)
k = 1
while True:
    atomic_write_bytes(target, ("%08d\n" % k).encode() * 300_000)
    k += 1
"""


@pytest.mark.slow
def test_killed_atomic_writer_leaves_old_or_new_content(tmp_path: Path) -> None:
    target = tmp_path / "slides.csv"
    target.write_bytes(b"%08d\n" % 0 * 300_000)
    rng = random.Random(7)
    for _ in range(6):
        proc = spawn(ATOMIC_WRITER, str(target))
        expect_line(proc, "ready")
        time.sleep(rng.uniform(0.01, 0.3))
        reap(proc)
        data = target.read_bytes()
        first = data[:9]
        assert data == first * 300_000, "partial or mixed content"
    leftovers = remove_stale_temp_files(tmp_path)
    assert all(p.name.endswith(TEMP_SUFFIX) for p in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slides.csv"]


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_planning_1000_slides_is_fast(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    old = time.time() - 3600
    paths = []
    for i in range(1000):
        p = slides / f"slide_{i:04d}.svs"
        p.write_bytes(b"%d" % i * 50)
        os.utime(p, (old, old))
        paths.append(p)
    with ResultStore(tmp_path / STORE_NAME) as store:
        run = store.start_run(command="c", version="v", settings_hash=H, settings_json="{}")
        with FingerprintCache(store, slides) as cache:
            fps = [cache.fingerprint(p) for p in paths]
        for p, fp in zip(paths, fps, strict=True):
            store.put_result(record(p.name, fp, cpa_percent=1.0), run_id=run)

        start = time.perf_counter()
        with FingerprintCache(store, slides) as cache:
            again = [cache.fingerprint(p) for p in paths]
        known = store.known(H)
        todo = [fp for fp in again if known.get(fp) != "ok"]
        elapsed = time.perf_counter() - start
    assert again == fps
    assert cache.hits == 1000 and cache.misses == 0
    assert todo == []
    assert elapsed < 2.0, f"planning 1000 slides took {elapsed:.2f} s"
