"""Slides measured on a Dask cluster (a LocalCluster on loopback) give the local run's tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fibroquant.cli import app
from fibroquant.config import load_settings
from fibroquant.errors import FibroquantError
from fibroquant.run import analyze_folder

distributed = pytest.importorskip("distributed")

TIMING = ["seconds"]  # per-slide wall time: the only run-dependent column of slides.csv
TABLES = ("slides", "mice", "groups")


@pytest.fixture(scope="module")
def cluster():
    """Two single-thread worker processes on 127.0.0.1 (no dashboard)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def study_with_bad(study, tmp_path_factory) -> Path:
    """The seven-slide study plus a truncated TIFF (a slide that must fail, not stop the run)."""
    d = tmp_path_factory.mktemp("dask_study")
    for f in study.iterdir():
        shutil.copy2(f, d / f.name)
    data = (d / "c1_s1.tif").read_bytes()
    (d / "cut.tif").write_bytes(data[: len(data) // 3])
    sheet = pd.read_csv(d / "samples.csv")
    extra = sheet.iloc[[0]].assign(slide="cut.tif", mouse="c9")
    pd.concat([sheet, extra]).to_csv(d / "samples.csv", index=False)
    return d


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    frames = {t: pd.read_csv(out / f"{t}.csv") for t in TABLES}
    frames["slides"] = frames["slides"].drop(columns=TIMING)
    return frames


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for t in TABLES:
        pd.testing.assert_frame_equal(a[t], b[t], check_exact=True, obj=t)


@pytest.fixture(scope="module")
def local_run(study_with_bad, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    summary = analyze_folder(study_with_bad, out, load_settings(),
                             samples=study_with_bad / "samples.csv", workers=1)
    assert summary.processed == 8 and summary.failed == 1
    return out


@pytest.mark.slow
def test_cluster_object_gives_the_local_tables(cluster, study_with_bad, local_run, tmp_path):
    out = tmp_path / "out"
    clients_before = len(cluster.scheduler.clients)
    with distributed.Client(cluster) as watcher, distributed.get_task_stream(watcher) as stream:
        summary = analyze_folder(study_with_bad, out, load_settings(),
                                 samples=study_with_bad / "samples.csv", scheduler=cluster)
    assert summary.processed == 8 and summary.failed == 1
    # the slides ran on the cluster, through a client of the run's own, closed at the end
    assert len([t for t in stream.data if str(t["key"]).startswith("slide-")]) == 8
    assert len(cluster.scheduler.clients) == clients_before
    assert cluster.status.name == "running"
    _assert_same(_tables(local_run), _tables(out))
    slides = pd.read_csv(out / "slides.csv").set_index("slide")
    assert slides.loc["cut.tif", "status"] == "failed"
    assert "cut.tif" in slides.loc["cut.tif", "error"]
    assert (slides.drop(index="cut.tif")["status"] == "ok").all()
    for stem in ("c1_s1", "t3_s1"):
        assert (out / "qc" / f"{stem}.jpg").stat().st_size > 0


@pytest.mark.slow
def test_scheduler_address_on_the_command_line(cluster, study_with_bad, local_run, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "analyze", str(study_with_bad), "--out", str(out), "--samples",
        str(study_with_bad / "samples.csv"), "--scheduler", cluster.scheduler_address])
    assert res.exit_code == 1, res.output  # one slide failed: the run says so
    assert "cut.tif" in res.output and "Traceback" not in res.output
    _assert_same(_tables(local_run), _tables(out))


@pytest.mark.slow
def test_client_object_and_tasks_spread_over_workers(cluster, study, tmp_path):
    with distributed.Client(cluster) as client:
        client.wait_for_workers(2)
        with distributed.get_task_stream(client) as stream:
            summary = analyze_folder(study, tmp_path / "out", load_settings(),
                                     samples=study / "samples.csv", scheduler=client)
        assert summary.processed == 7 and summary.failed == 0
        ran = [t for t in stream.data if str(t["key"]).startswith("slide-")]
        assert len(ran) == 7
        assert len({t["worker"] for t in ran}) == 2  # both worker processes measured slides
        assert client.status == "running"  # a client given by the caller is left open


def test_wrong_scheduler_object_is_a_clear_error(study, tmp_path):
    with pytest.raises(FibroquantError, match=r"expected an address .* got int"):
        analyze_folder(study, tmp_path / "o", load_settings(), scheduler=8786)


def _task(tmp_path, threads: int, name: str = "x.tif"):
    from fibroquant.tasks import SlideTask

    return SlideTask(path=name, slide=name, fingerprint="f", mpp=None, fallback_mpp=None,
                     settings_json="{}", out_dir=str(tmp_path), write_masks=False,
                     threads=threads)


def _pools():
    import cv2
    from threadpoolctl import threadpool_info

    return [p["num_threads"] for p in threadpool_info()], cv2.getNumThreads()


@pytest.mark.parametrize("offset", [1, 2])
def test_worker_task_pins_blas_and_opencv_threads(monkeypatch, tmp_path, offset):
    # Worker processes share the machine: a task's BLAS / OpenMP pools (threadpoolctl) and
    # OpenCV's pool are limited to its threads while it runs, and restored afterwards. The
    # task's count differs from what the pools start with, so the pinning shows.
    from fibroquant import executor

    before = _pools()
    threads = max([*before[0], before[1]]) + offset
    seen = {}

    def fake_run_slide(task):
        seen["pools"] = _pools()
        return {"slide": task.slide, "status": "ok"}

    monkeypatch.setattr(executor, "run_slide", fake_run_slide)
    assert executor.run_slide_pinned(_task(tmp_path, threads))["status"] == "ok"
    pools, cv = seen["pools"]
    assert pools and all(n == threads for n in pools) and cv == threads
    assert _pools() == before


def test_overlapping_tasks_in_one_worker_share_the_pinning(monkeypatch, tmp_path):
    # A Dask worker with several threads runs tasks side by side: the pools stay pinned
    # until the last task ends (A enters, B enters, A ends, B ends), then are restored.
    import threading

    from fibroquant import executor

    before = _pools()
    threads = max([*before[0], before[1]]) + 1
    gates = {"A": threading.Event(), "B": threading.Event()}
    inside = threading.Barrier(2)
    seen = {}

    def fake_run_slide(task):
        inside.wait(timeout=10)
        gates[task.slide].wait(timeout=10)
        seen[task.slide] = _pools()
        return {"slide": task.slide, "status": "ok"}

    monkeypatch.setattr(executor, "run_slide", fake_run_slide)
    runs = {k: threading.Thread(target=executor.run_slide_pinned,
                                args=(_task(tmp_path, threads, k),)) for k in "AB"}
    for t in runs.values():
        t.start()
    gates["A"].set()
    runs["A"].join(timeout=10)
    assert _pools()[1] == threads  # B still running: still pinned
    gates["B"].set()
    runs["B"].join(timeout=10)
    assert seen["A"][1] == seen["B"][1] == threads
    assert _pools() == before


@pytest.mark.slow
def test_local_worker_processes_give_the_serial_tables(study_with_bad, local_run, tmp_path):
    # --workers 2 on a folder: slides in two spawned worker processes, one thread each
    out = tmp_path / "out"
    summary = analyze_folder(study_with_bad, out, load_settings(),
                             samples=study_with_bad / "samples.csv", workers=2)
    assert summary.processed == 8 and summary.failed == 1
    _assert_same(_tables(local_run), _tables(out))


@pytest.mark.slow
def test_unreachable_scheduler_is_a_clear_error(study, tmp_path, monkeypatch):
    import socket

    from fibroquant import executor

    monkeypatch.setattr(executor, "DASK_CONNECT_TIMEOUT", "2s")
    with socket.socket() as s:  # a free port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(app, ["analyze", str(study), "--out", str(tmp_path / "o"),
                                   "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert res.exit_code == 2, res.output
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o" / "slides.csv").exists()


@pytest.mark.slow
def test_relative_paths_from_python(cluster, study, tmp_path, monkeypatch):
    # analyze_folder given relative str paths (as in a notebook), on the cluster: the same
    # slides measured as from the command line, whose paths are absolute
    work = tmp_path / "work"
    shutil.copytree(study, work / "slides")
    monkeypatch.chdir(work)
    summary = analyze_folder("slides", "out", load_settings(), samples="slides/samples.csv",
                             scheduler=cluster)
    assert summary.processed == 7 and summary.failed == 0
    slides = pd.read_csv(work / "out" / "slides.csv")
    assert (slides["status"] == "ok").all() and len(slides) == 7


def test_largest_slides_are_started_first(tmp_path):
    from fibroquant.executor import largest_first

    sizes = {"a.tif": 10, "b.tif": 300, "c.tif": 10, "d.tif": 50}
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"x" * n)
    tasks = [_task(tmp_path, 1, str(tmp_path / n)) for n in [*sizes, "gone.tif"]]
    order = [Path(t.path).name for t in largest_first(tasks)]
    assert order == ["b.tif", "d.tif", "a.tif", "c.tif", "gone.tif"]  # ties keep their order


class _Count:
    """A stand-in for the pool's shared counter (multiprocessing.Value)."""

    def __init__(self, value: int) -> None:
        import threading

        self.value = value
        self._lock = threading.Lock()

    def get_lock(self):
        return self._lock


@pytest.mark.parametrize(("running", "cores", "cap", "expected"),
                         [(None, 0, 3, 3), (1, 2, 2, 2), (2, 2, 2, 1), (3, 4, 4, 1),
                          (2, 4, 4, 2), (1, 8, 2, 2), (0, 2, 2, 2)])
def test_tile_threads_are_the_slides_share_of_the_pools_cores(monkeypatch, running, cores,
                                                              cap, expected):
    from fibroquant import cores as pool_cores

    monkeypatch.setattr(pool_cores, "_running", None if running is None else _Count(running))
    monkeypatch.setattr(pool_cores, "_pool_cores", cores)
    assert pool_cores.tile_threads(cap) == expected


@pytest.mark.slow
def test_a_slide_left_alone_in_a_pool_takes_the_freed_cores(monkeypatch, tmp_path):
    """In a local pool the tile loop runs as many tiles at once as its share of the cores:
    one while another slide runs, two once it has finished (the count read after each tile);
    the tiles come back in order. A pinned task reads the count the run keeps (it does not
    change it: a worker killed mid-slide would leave it counted)."""
    import threading
    import time

    from fibroquant import cores, executor, tiles

    count = _Count(2)  # this slide and another one
    monkeypatch.setattr(cores, "_running", count)
    monkeypatch.setattr(cores, "_pool_cores", 2)
    lock = threading.Lock()
    now = {"n": 0}
    most = []

    def fake_tile(slide, job, box):
        with lock:
            now["n"] += 1
            most.append((box, now["n"]))
        time.sleep(0.02)
        with lock:
            now["n"] -= 1
        return box

    monkeypatch.setattr(tiles, "measure_box", fake_tile)
    out = []
    for box in tiles.map_tiles(None, None, list(range(20)), 2):
        out.append(box)
        if box == 9:
            count.value = 1  # the other slide has finished
    assert out == list(range(20))
    early = [n for box, n in most if box <= 9]
    late = [n for box, n in most if box >= 12]
    assert max(early) == 1
    assert max(late) == 2

    seen = {}

    def fake_run_slide(task):
        seen["n"] = count.value
        return {"slide": task.slide, "status": "ok"}

    monkeypatch.setattr(executor, "run_slide", fake_run_slide)
    count.value = 1  # set by the run that sent the slide (executor._run_local), read here
    assert executor.run_slide_pinned(_task(tmp_path, 2))["status"] == "ok"
    assert seen["n"] == 1 and count.value == 1
