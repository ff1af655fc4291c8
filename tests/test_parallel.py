"""One slide on several threads in the run's own process: skan compiled beside the slide,
the garbage collector's pace (issue 25, items 1 and 4)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fibroquant import executor, pipeline
from fibroquant import traits as tr
from fibroquant.config import Settings
from fibroquant.cores import GC_GEN0_THRESHOLD, tune_gc
from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff
from fibroquant.tasks import SlideTask

#: the 5 x 5 cross :func:`fibroquant.traits.warm_skan` compiles skan on
_CROSS_SHAPE = (5, 5)


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    """A small fibrotic section as a pyramid TIFF (0.5 µm/px: traits at 2.5 µm/px)."""
    rgb, _ = make_section(SectionParams(shape=(1024, 1024), mpp=0.5, fibrosis=0.8,
                                        fine_fibres=0.3), rng=21)
    path = tmp_path_factory.mktemp("slide") / "liver.tif"
    write_pyramid_tiff(path, rgb, 0.5, min_level_px=128)
    return path


def _task(path: Path, out: Path, threads: int) -> SlideTask:
    out.mkdir(parents=True, exist_ok=True)
    return SlideTask(path=str(path), slide=path.name, fingerprint="f", mpp=None,
                     fallback_mpp=None, settings_json=Settings().model_dump_json(),
                     out_dir=str(out), write_masks=False, threads=threads)


def _without_seconds(record: dict) -> dict:
    """A slide's record but its ``seconds``, NaN as None (NaN != NaN)."""
    return {k: None if isinstance(v, float) and np.isnan(v) else v
            for k, v in record.items() if k != "seconds"}


def _not_compiled(monkeypatch) -> None:
    """This process as if skan were not compiled yet (the next warm_skan compiles it)."""
    monkeypatch.setattr(tr, "_skan_warm", False)
    monkeypatch.setattr(tr, "_skan_thread", None)


def test_the_slide_waits_for_skan_compiled_beside_it_outside_its_seconds(
        slide_file, tmp_path, monkeypatch):
    """With 2 threads the compile runs on a thread of its own while the slide is measured; the
    traits wait for it (here: until 1.5 s after the tiles are done), that wait is not in the
    slide's ``seconds``, and every number equals the 1-thread run's (compiled before)."""
    one = executor.run_in_process(_task(slide_file, tmp_path / "one", 1))
    assert one["status"] == "ok", one.get("error")

    _not_compiled(monkeypatch)
    tiles_done = threading.Event()
    compile_threads: list[str] = []
    real_graph, real_tiles = tr._skan_graph, pipeline.measure_tiles

    def slow_graph(skel, half):
        if skel.shape == _CROSS_SHAPE:  # the warm-up: a compile that ends after the tiles
            compile_threads.append(threading.current_thread().name)
            assert tiles_done.wait(timeout=30)
            time.sleep(1.5)
        return real_graph(skel, half)

    def tiles(*args, **kwargs):
        out = real_tiles(*args, **kwargs)
        tiles_done.set()
        return out

    real_warm = tr.warm_skan
    waits: dict[str, float] = {}

    def timed_warm():
        t = time.perf_counter()
        real_warm()
        waits[threading.current_thread().name] = time.perf_counter() - t

    monkeypatch.setattr(tr, "_skan_graph", slow_graph)
    monkeypatch.setattr(tr, "warm_skan", timed_warm)
    monkeypatch.setattr(pipeline, "measure_tiles", tiles)
    t0 = time.perf_counter()
    two = executor.run_in_process(_task(slide_file, tmp_path / "two", 2))
    elapsed = time.perf_counter() - t0
    assert two["status"] == "ok", two.get("error")
    assert compile_threads == ["fibroquant-skan"]  # compiled beside the slide, once
    assert tr._skan_warm
    slide_wait = waits[threading.current_thread().name]  # the traits waited for it...
    assert slide_wait > 0.5
    assert elapsed - two["seconds"] >= slide_wait  # ...outside the slide's time
    assert _without_seconds(two) == _without_seconds(one)
    assert np.isfinite(two["fibre_width_median_um"])


def test_a_failed_background_compile_fails_the_slide_with_its_error(
        slide_file, tmp_path, monkeypatch):
    """A compile that fails on its thread is compiled again by the traits, whose error fails
    the slide's row (named), promptly: nothing waits for ever."""
    _not_compiled(monkeypatch)
    real_graph = tr._skan_graph
    calls: list[str] = []

    def broken(skel, half):
        if skel.shape == _CROSS_SHAPE:
            calls.append(threading.current_thread().name)
            raise RuntimeError("LLVM is missing")
        return real_graph(skel, half)

    monkeypatch.setattr(tr, "_skan_graph", broken)
    t0 = time.perf_counter()
    rec = executor.run_in_process(_task(slide_file, tmp_path / "o", 2))
    assert time.perf_counter() - t0 < 60
    assert rec["status"] == "failed"
    assert "LLVM is missing" in rec["error"]
    assert calls[0] == "fibroquant-skan" and len(calls) == 2  # then the slide's own try
    assert not tr._skan_warm


def test_start_warm_skan_starts_one_thread_and_none_once_compiled(monkeypatch):
    _not_compiled(monkeypatch)
    release = threading.Event()
    real_graph = tr._skan_graph

    def held(skel, half):
        assert release.wait(timeout=30)
        return real_graph(skel, half)

    monkeypatch.setattr(tr, "_skan_graph", held)
    first = tr.start_warm_skan()
    assert first is not None and first.daemon
    assert tr.start_warm_skan() is None  # one compile at a time
    release.set()
    first.join(timeout=30)
    assert tr._skan_warm
    assert tr.start_warm_skan() is None  # compiled: nothing to start


def test_one_thread_compiles_before_the_slide_on_its_own_thread(slide_file, tmp_path,
                                                                 monkeypatch):
    """``--workers 1`` uses one core: skan is compiled on the slide's thread, before it."""
    _not_compiled(monkeypatch)
    names: list[str] = []
    real_graph = tr._skan_graph

    def graph(skel, half):
        if skel.shape == _CROSS_SHAPE:
            names.append(threading.current_thread().name)
        return real_graph(skel, half)

    monkeypatch.setattr(tr, "_skan_graph", graph)
    task = _task(slide_file, tmp_path / "o", 1)
    assert executor.run_in_process(task)["status"] == "ok"
    assert names == [threading.current_thread().name]


def test_tune_gc_raises_only_a_lower_youngest_threshold():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, 10, 10)
        gc.set_threshold(GC_GEN0_THRESHOLD * 2, 5, 5)
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD * 2, 5, 5)
        gc.set_threshold(0, 10, 10)  # collection switched off by threshold: left so
        tune_gc()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*saved)
