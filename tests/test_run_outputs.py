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
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.slow
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
    assert not (out / "qc" / "grey.jpg").exists()
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["failed_slides"] == [
        {"slide": "grey.tif", "error": "grey.tif: greyscale image, not a colour-stained section"}]


# -- 3. a write failure fails one slide, not the run ----------------------------------------


def _two_slides(bank: Path, slides: Path, names: tuple[str, ...] = ("s0", "s1")) -> Path:
    slides.mkdir(parents=True)
    for n in names:
        shutil.copy2(bank / f"{n}.tif", slides / f"{n}.tif")
    return slides


@pytest.mark.slow
def test_write_failure_fails_that_slide_and_the_run_carries_on(bank: Path,
                                                               tmp_path: Path) -> None:
    slides = _two_slides(bank, tmp_path / "slides")
    out = tmp_path / "out"
    (out / "qc" / "s1.jpg").mkdir(parents=True)  # a folder where s1's overlay must go
    summary = run(slides, out)
    assert summary.exit_code == 1 and summary.processed == 2 and summary.failed == 1
    rows = table(out).set_index("slide")
    assert rows.loc["s0.tif", "status"] == "ok"
    err = rows.loc["s1.tif", "error"]
    assert rows.loc["s1.tif", "status"] == "failed"
    assert err.startswith("s1.tif: cannot write outputs: ") and "qc/s1.jpg" in err, err
    assert "\n" not in err
    run_json = json.loads((out / "run.json").read_text())  # this run's, not a previous one
    assert (run_json["processed"], run_json["failed"], run_json["exit_code"]) == (2, 1, 1)
    assert run_json["failed_slides"] == [{"slide": "s1.tif", "error": err}]
    # once the folder is out of the way, the next run measures s1 again (and only s1)
    (out / "qc" / "s1.jpg").rmdir()
    summary = run(slides, out)
    assert (summary.exit_code, summary.processed, summary.skipped) == (0, 1, 1)
    assert (out / "qc" / "s1.jpg").is_file()


@pytest.mark.slow
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


def _qc_folder_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every write into ``qc/`` fail with EROFS (as root, chmod cannot)."""
    import errno

    import fibroquant.report

    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if "/qc/" in str(dst):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(fibroquant.report.os, "replace", replace)


@pytest.mark.slow
def test_read_only_file_system_simulated(bank: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS on the QC overlays only (as root, chmod cannot make a folder read-only)."""
    _qc_folder_read_only(monkeypatch)
    slides = _two_slides(bank, tmp_path / "slides", ("s0",))
    out = tmp_path / "out"
    summary = run(slides, out)
    assert (summary.exit_code, summary.failed) == (1, 1)
    err = table(out).loc[0, "error"]
    assert err == f"s0.tif: cannot write outputs: {out / 'qc' / 's0.jpg'}: Read-only file system"
    assert not list((out / "qc").iterdir())  # no temporary file left behind


@pytest.mark.slow
def test_outputs_written_beside_the_traits_equal_those_written_after(
        bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One slide on two threads writes its QC overlay and masks while the fibre traits are
    measured: the same files and record as one thread (which writes them after), and a write
    error there fails the slide just the same."""
    import threading

    from fibroquant import executor

    writers: list[str] = []  # the thread each slide's outputs were written on
    real_write = executor._write_outputs

    def spy(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(executor, "_write_outputs", spy)
    slides = _two_slides(bank, tmp_path / "slides", ("s0",))
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = analyze_folder(slides, out, Settings(), workers=workers, masks=True)
        assert summary.exit_code == 0
        outs[workers] = out
    assert writers == [threading.main_thread().name, "fibroquant-masks-ready"]
    for name in ("qc/s0.jpg", "masks/s0.collagen.png", "masks/s0.tissue.png",
                 "geojson/s0.geojson"):
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    rows = [table(o).drop(columns=["seconds"]) for o in outs.values()]
    pd.testing.assert_frame_equal(rows[0], rows[1])
    assert rows[0].loc[0, "fibre_width_median_um"] != ""  # traits were measured

    _qc_folder_read_only(monkeypatch)
    out = tmp_path / "out-ro"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = analyze_folder(slides, out, Settings(), workers=2)
    assert (summary.exit_code, summary.failed) == (1, 1)
    err = table(out).loc[0, "error"]
    assert err == f"s0.tif: cannot write outputs: {out / 'qc' / 's0.jpg'}: Read-only file system"


def test_write_error_text() -> None:
    from fibroquant.errors import FibroquantError
    from fibroquant.executor import write_error

    assert write_error(FibroquantError("cannot write /o/qc/a.png: Read-only file system")) == (
        "/o/qc/a.png: Read-only file system")
    assert write_error(PermissionError(13, "Permission denied")) == "[Errno 13] Permission denied"
    assert write_error(TypeError("bad\nsecond line")) == "unexpected TypeError: bad"


# -- 2. masks, GeoJSON and overlays follow each (re-)measurement and removal -----------------


def _outputs(out: Path, stem: str) -> dict[str, Path]:
    return {"qc": out / "qc" / f"{stem}.jpg",
            "collagen": out / "masks" / f"{stem}.collagen.png",
            "tissue": out / "masks" / f"{stem}.tissue.png",
            "geojson": out / "geojson" / f"{stem}.geojson"}


def _bytes(paths: dict[str, Path]) -> dict[str, bytes | None]:
    return {k: p.read_bytes() if p.exists() else None for k, p in paths.items()}


def _same_picture(a: bytes | None, b: bytes | None) -> bool:
    """Two QC overlays show the same picture (above the band that names the slide; a renamed
    slide's overlay is re-encoded with its new name)."""
    import cv2

    from fibroquant.report import qc_picture_height

    if a is None or b is None:
        return a is b
    ia, ib = (cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_COLOR) for x in (a, b))
    if ia.shape != ib.shape:
        return False
    top = qc_picture_height(*ia.shape[:2])
    return float(np.abs(ia[:top].astype(int) - ib[:top].astype(int)).mean()) < 1.5


@pytest.mark.slow
def test_masks_follow_remeasurement_and_removal(bank: Path, tmp_path: Path) -> None:
    # what s2's content gives, measured fresh under the name s0.tif (the known answer)
    ref_slides = tmp_path / "ref"
    ref_slides.mkdir()
    shutil.copy2(bank / "s2.tif", ref_slides / "s0.tif")
    assert run(ref_slides, tmp_path / "ref-out", masks=True).exit_code == 0
    s2_as_s0 = _bytes(_outputs(tmp_path / "ref-out", "s0"))
    assert all(v is not None for v in s2_as_s0.values())

    slides = _two_slides(bank, tmp_path / "slides")
    out = tmp_path / "out"
    assert run(slides, out, masks=True).exit_code == 0
    first = {s: _bytes(_outputs(out, s)) for s in ("s0", "s1")}
    assert all(v is not None for f in first.values() for v in f.values())

    # s0 changes; a run without --masks re-measures it: its old masks and GeoJSON go
    shutil.copy2(bank / "s2.tif", slides / "s0.tif")
    summary = run(slides, out)
    assert (summary.processed, summary.skipped) == (1, 1)
    now = _bytes(_outputs(out, "s0"))
    assert now == {**s2_as_s0, "collagen": None, "tissue": None, "geojson": None}
    assert _bytes(_outputs(out, "s1")) == first["s1"]  # not re-measured: kept as they were

    # --masks again: s0's masks are missing, so it is measured again and they are s2's
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.skipped) == (1, 1)
    assert _bytes(_outputs(out, "s0")) == s2_as_s0

    # s0 changes again, now with --masks: rewritten, not left as they were
    shutil.copy2(bank / "s1.tif", slides / "s0.tif")
    assert run(slides, out, masks=True).processed == 1
    now = _bytes(_outputs(out, "s0"))  # the GeoJSON and the overlay name their slide
    assert {k: v for k, v in now.items() if k in ("collagen", "tissue")} == {
        k: v for k, v in first["s1"].items() if k in ("collagen", "tissue")}
    assert _same_picture(now["qc"], first["s1"]["qc"])
    geo = json.loads(_outputs(out, "s0")["geojson"].read_text())
    geo1 = json.loads(first["s1"]["geojson"])
    assert [f["geometry"] for f in geo["features"]] == [f["geometry"] for f in geo1["features"]]

    # s1 turns into a broken file: failed, and its old overlay, masks and GeoJSON go
    (slides / "s1.tif").write_bytes(b"II*\x00 not really a tiff")
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.failed) == (1, 1)
    assert all(v is None for v in _bytes(_outputs(out, "s1")).values())

    # s0 is removed from the folder: the run records the removal and drops its outputs
    shutil.copy2(bank / "s1.tif", slides / "s1.tif")
    assert run(slides, out, masks=True).exit_code == 0
    assert all(v is not None for v in _bytes(_outputs(out, "s1")).values())
    (slides / "s0.tif").unlink()
    summary = run(slides, out, masks=True)
    assert (summary.removed, summary.processed, summary.skipped) == (1, 0, 1)
    assert all(v is None for v in _bytes(_outputs(out, "s0")).values())
    assert all(v is not None for v in _bytes(_outputs(out, "s1")).values())
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["s1.jpg"]


@pytest.mark.slow
def test_back_to_earlier_settings_reuses_the_stored_results(bank: Path, tmp_path: Path) -> None:
    """Results of the first settings are still stored and are used again without measuring
    (the rerun contract); the files still show the last settings measured until --force."""
    slides = _two_slides(bank, tmp_path / "slides", ("s0",))
    out = tmp_path / "out"
    strict = Settings.model_validate({"collagen": {"relative_threshold": 0.5}})
    assert run(slides, out, masks=True).processed == 1
    default = _bytes(_outputs(out, "s0"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert analyze_folder(slides, out, strict, workers=1, masks=True).processed == 1
    strict_files = _bytes(_outputs(out, "s0"))
    assert strict_files["collagen"] != default["collagen"]
    summary = run(slides, out, masks=True)  # the default settings again
    assert (summary.processed, summary.skipped) == (0, 1)
    assert _bytes(_outputs(out, "s0")) == strict_files
    summary = analyze_folder(slides, out, Settings(), workers=1, masks=True, force=True)
    assert summary.processed == 1 and _bytes(_outputs(out, "s0")) == default


@pytest.mark.slow
def test_renamed_slide_keeps_its_measurement_and_outputs(bank: Path, tmp_path: Path) -> None:
    """A slide renamed or moved into a subfolder since it was measured is not measured again:
    its stored result stands under the new name, its overlay, masks and GeoJSON (annotation
    names rewritten) move with it, and the tables show the new name only. A copy (the old
    name still there) and a rename onto a changed content are measured."""
    slides = _two_slides(bank, tmp_path / "slides")
    out = tmp_path / "out"
    assert run(slides, out, masks=True).processed == 2
    before = table(out).set_index("slide")
    files = _bytes(_outputs(out, "s0"))

    (slides / "sub").mkdir()
    shutil.move(slides / "s0.tif", slides / "sub" / "mouse7.tif")
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.skipped, summary.removed) == (0, 2, 0)  # moved, not gone
    assert summary.renamed == [("s0.tif", "sub/mouse7.tif")] and summary.removed_slides == []
    after = table(out).set_index("slide")
    assert sorted(after.index) == ["s1.tif", "sub/mouse7.tif"]
    assert after.loc["sub/mouse7.tif", "cpa_percent"] == before.loc["s0.tif", "cpa_percent"]
    moved = _outputs(out, "sub__mouse7")
    assert all(v is None for v in _bytes(_outputs(out, "s0")).values())
    assert {k: moved[k].read_bytes() for k in ("collagen", "tissue")} == {
        k: files[k] for k in ("collagen", "tissue")}
    assert _same_picture(moved["qc"].read_bytes(), files["qc"])  # renamed under the picture
    geo = json.loads(moved["geojson"].read_text())
    old_geo = json.loads(files["geojson"])
    assert [f["geometry"] for f in geo["features"]] == [f["geometry"] for f in old_geo["features"]]
    assert {f["properties"]["name"] for f in geo["features"]} == {
        "sub/mouse7.tif tissue", "sub/mouse7.tif collagen"}
    assert json.loads((out / "run.json").read_text())["renamed"] == [
        {"from": "s0.tif", "to": "sub/mouse7.tif"}]

    # nothing new now: skipped as any measured slide
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.skipped, summary.renamed) == (0, 2, [])

    # a copy keeps the original in place: the copy has no outputs of its own, so it is measured
    shutil.copy2(slides / "s1.tif", slides / "s1-copy.tif")
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.renamed) == (1, [])
    assert _outputs(out, "s1")["qc"].exists() and _outputs(out, "s1-copy")["qc"].exists()
    assert ("identical files counted as separate slides (the same scan under two names?): "
            "s1-copy.tif = s1.tif") in (out / "report.html").read_text()

    # renamed and changed: another content, measured
    shutil.move(slides / "s1-copy.tif", slides / "s9.tif")
    shutil.copy2(bank / "s2.tif", slides / "s9.tif")
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.renamed) == (1, [])


@pytest.mark.slow
def test_renamed_twice_never_takes_files_of_another_slide(bank: Path, tmp_path: Path) -> None:
    """A slide renamed twice while its first name's stem was taken by another slide: the
    second rename takes the files of its last name (the only old name considered is one the
    last run saw), never those of the slide that took the stem."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    shutil.copy2(bank / "s0.tif", slides / "a.tif")
    run(slides, out)
    qc_a = _outputs(out, "a")["qc"].read_bytes()
    shutil.move(slides / "a.tif", slides / "b.tif")
    assert run(slides, out).renamed == [("a.tif", "b.tif")]
    shutil.copy2(bank / "s1.tif", slides / "a.tiff")  # another content, stem "a"
    assert run(slides, out).processed == 1
    qc_other = _outputs(out, "a")["qc"].read_bytes()
    shutil.move(slides / "b.tif", slides / "c.tif")
    shutil.move(slides / "a.tiff", slides / "z.tiff")
    summary = run(slides, out)
    assert sorted(summary.renamed) == [("a.tiff", "z.tiff"), ("b.tif", "c.tif")]
    assert _same_picture(_outputs(out, "c")["qc"].read_bytes(), qc_a)
    assert _same_picture(_outputs(out, "z")["qc"].read_bytes(), qc_other)


@pytest.mark.slow
def test_renamed_slide_is_measured_when_its_old_files_do_not_fit(bank: Path,
                                                                tmp_path: Path) -> None:
    """The old name's files are taken only when they show this content with these settings
    and hold what the run writes: measured with other settings last, measured without masks
    (now wanted), or a GeoJSON that is not a FeatureCollection: measured, the run goes on.
    A rename without masks removes masks an earlier content left at the new name; an old name
    that kept its extension (a stem clash) is found."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    shutil.copy2(bank / "s0.tif", slides / "a.tif")
    strict = Settings.model_validate({"collagen": {"relative_threshold": 0.5}})
    run(slides, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyze_folder(slides, out, strict, workers=1)  # its files show other settings now
    shutil.move(slides / "a.tif", slides / "b.tif")
    summary = run(slides, out)
    assert (summary.processed, summary.renamed) == (1, [])

    shutil.move(slides / "b.tif", slides / "c.tif")  # measured without masks; now wanted
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.renamed) == (1, [])

    shutil.move(slides / "c.tif", slides / "d.tif")
    _outputs(out, "c")["geojson"].write_text('{"type": "FeatureCollection", "features": [1]}')
    summary = run(slides, out, masks=True)
    assert (summary.processed, summary.renamed, summary.exit_code) == (1, [], 0)
    assert all(v is not None for v in _bytes(_outputs(out, "d")).values())

    shutil.copy2(bank / "s1.tif", slides / "e.tif")  # masks of another content at stem "e"
    assert run(slides, out, masks=True).processed == 1
    (slides / "e.tif").unlink()
    run(slides, out, masks=True)
    assert _outputs(out, "e")["collagen"].exists() is False
    for kind in ("collagen", "tissue", "geojson"):  # planted: as if left by that content
        _outputs(out, "e")[kind].parent.mkdir(exist_ok=True)
        _outputs(out, "e")[kind].write_bytes(b"old")
    shutil.move(slides / "d.tif", slides / "e.tif")
    summary = run(slides, out)  # without masks
    assert summary.renamed == [("d.tif", "e.tif")]
    assert _bytes(_outputs(out, "e"))["collagen"] is None
    assert _bytes(_outputs(out, "e"))["geojson"] is None

    shutil.copy2(bank / "s1.tif", slides / "e.png")  # stems clash: "e.tif" and "e.png"
    run(slides, out)
    qc = _outputs(out, "e.tif")["qc"].read_bytes()
    shutil.move(slides / "e.tif", slides / "f.tif")
    assert run(slides, out).renamed == [("e.tif", "f.tif")]
    assert _same_picture(_outputs(out, "f")["qc"].read_bytes(), qc)


@pytest.mark.slow
def test_rename_never_takes_a_stem_a_present_slide_writes(bank: Path, tmp_path: Path) -> None:
    """a.tif becomes b.tiff while b.tif becomes c.tif: b.tiff takes a's files, and c.tif is
    measured rather than take the files at stem "b" (b.tiff's now). A move that fails (a folder
    where the overlay must go) is measured instead, and the run goes on."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    shutil.copy2(bank / "s0.tif", slides / "a.tif")
    shutil.copy2(bank / "s1.tif", slides / "b.tif")
    run(slides, out)
    qc_a = _outputs(out, "a")["qc"].read_bytes()
    qc_b = _outputs(out, "b")["qc"].read_bytes()
    shutil.move(slides / "b.tif", slides / "c.tif")
    shutil.move(slides / "a.tif", slides / "b.tiff")
    summary = run(slides, out)
    assert (summary.processed, summary.renamed) == (1, [("a.tif", "b.tiff")])
    assert _same_picture(_outputs(out, "b")["qc"].read_bytes(), qc_a)
    assert _same_picture(_outputs(out, "c")["qc"].read_bytes(), qc_b)  # measured again

    _outputs(out, "d")["qc"].mkdir()  # c.tif -> d.tif cannot move its overlay there
    shutil.move(slides / "c.tif", slides / "d.tif")
    summary = run(slides, out)
    assert (summary.processed, summary.failed, summary.renamed) == (1, 1, [])
    assert "cannot write outputs" in table(out).set_index("slide").loc["d.tif", "error"]


def test_identical_files_warning() -> None:
    from fibroquant.run import identical_files

    a, b = "a" * 64, "b" * 64
    df = pd.DataFrame({"slide": ["x.tif", "y.tif", "z.tif", "w.tif", "u.tif", "v.tif"],
                       "fingerprint": [a, b, a + "-mpp0.5", b, "unreadable-123",
                                       "unreadable-123"]})
    assert identical_files(df) == ("identical files counted as separate slides (the same scan "
                                   "under two names?): w.tif = y.tif; x.tif = z.tif")
    assert identical_files(df.iloc[:2]) is None
    assert identical_files(df.iloc[4:]) is None  # unreadable files are not compared
    assert identical_files(df.drop(columns="fingerprint")) is None


@pytest.mark.slow
def test_renamed_slide_without_its_old_overlay_is_measured(bank: Path, tmp_path: Path) -> None:
    """When the old name's overlay is gone (deleted by hand), the renamed slide is measured;
    without --masks the new name gets no masks from the old one."""
    slides = _two_slides(bank, tmp_path / "slides", ("s0",))
    out = tmp_path / "out"
    assert run(slides, out, masks=True).processed == 1
    shutil.move(slides / "s0.tif", slides / "a.tif")
    _outputs(out, "s0")["qc"].unlink()
    summary = run(slides, out)
    assert (summary.processed, summary.renamed) == (1, [])
    assert _outputs(out, "a")["qc"].exists()
    assert all(v is None for v in _bytes(_outputs(out, "s0")).values())

    shutil.move(slides / "a.tif", slides / "b.tif")  # measured without masks: only the overlay
    summary = run(slides, out)
    assert (summary.processed, summary.renamed) == (0, [("a.tif", "b.tif")])
    got = _bytes(_outputs(out, "b"))
    assert got["qc"] is not None and got["collagen"] is None and got["geojson"] is None


# -- 5. slides with one stem and two extensions ----------------------------------------------


def _png_slide(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    dpi = 25400 / MPP
    Image.fromarray(rgb).save(path, dpi=(dpi, dpi))


@pytest.mark.slow
def test_same_stem_other_extension_two_mice_two_sets_of_outputs(bank: Path,
                                                                tmp_path: Path) -> None:
    slides = _two_slides(bank, tmp_path / "slides", ("s0",))
    shutil.move(slides / "s0.tif", slides / "a.tif")
    out = tmp_path / "out"
    assert run(slides, out, masks=True).exit_code == 0
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["a.jpg"]  # unchanged naming
    alone = _bytes(_outputs(out, "a"))

    _png_slide(slides / "a.png", np.load(bank / "s1.npy"))
    summary = run(slides, out, masks=True)
    # a.tif is measured again: its files move to the a.tif stem, and a.tif's old ones go
    assert (summary.exit_code, summary.processed, summary.skipped) == (0, 2, 0)
    rows = table(out).set_index("slide")
    assert rows.loc["a.tif", "mouse"] == "a.tif" and rows.loc["a.png", "mouse"] == "a.png"
    mice = table(out, "mice.csv").set_index("mouse")
    assert sorted(mice.index) == ["a.png", "a.tif"]
    assert (mice["n_slides"] == 1).all()
    assert mice.loc["a.tif", "cpa_percent"] == pytest.approx(rows.loc["a.tif", "cpa_percent"])
    assert mice.loc["a.png", "cpa_percent"] == pytest.approx(rows.loc["a.png", "cpa_percent"])
    assert rows.loc["a.tif", "cpa_percent"] != rows.loc["a.png", "cpa_percent"]
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["a.png.jpg", "a.tif.jpg"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "a.png.collagen.png", "a.png.tissue.png", "a.tif.collagen.png", "a.tif.tissue.png"]
    assert sorted(p.name for p in (out / "geojson").iterdir()) == [
        "a.png.geojson", "a.tif.geojson"]
    tif_files = _bytes(_outputs(out, "a.tif"))
    assert tif_files["qc"] == alone["qc"] and tif_files["collagen"] == alone["collagen"]
    assert _bytes(_outputs(out, "a.png"))["collagen"] != alone["collagen"]

    # a.png goes again: a.tif is back to the plain stem
    (slides / "a.png").unlink()
    summary = run(slides, out, masks=True)
    assert (summary.removed, summary.processed) == (1, 1)
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["a.jpg"]
    assert _bytes(_outputs(out, "a")) == alone
    assert table(out, "mice.csv")["mouse"].tolist() == ["a"]


# -- 4. an old output folder inside the slides folder ----------------------------------------


@pytest.mark.slow
def test_old_output_folder_inside_the_slides_folder_is_not_analysed(bank: Path,
                                                                    tmp_path: Path) -> None:
    slides = _two_slides(bank, tmp_path / "m01b", ("s0",))
    assert run(slides, slides / "results").exit_code == 0  # an earlier run, output inside
    assert (slides / "results" / "qc" / "s0.jpg").exists()
    assert (slides / "results" / "plots" / "cpa_slides.png").exists()
    (slides / "results" / "fibroquant.sqlite").rename(tmp_path / "moved.sqlite")
    (slides / "results" / ".fibroquant.lock").unlink()  # run.json alone still marks it
    summary = run(slides, tmp_path / "res")
    assert (summary.exit_code, summary.processed, summary.failed) == (0, 1, 0)
    assert table(tmp_path / "res")["slide"].tolist() == ["s0.tif"]


def test_remove_files_and_discard_outputs(tmp_path: Path) -> None:
    from fibroquant.errors import FibroquantError
    from fibroquant.tasks import discard_outputs, output_files, remove_files

    (tmp_path / "a-file").write_bytes(b"x")
    remove_files([tmp_path / "absent.png", tmp_path / "a-file" / "under-a-file.png"])
    files = output_files(tmp_path, "s")
    for p in files.values():
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    assert discard_outputs(tmp_path, "s") is None
    assert not any(p.exists() for p in files.values())
    files["qc"].mkdir()  # cannot be unlinked
    with pytest.raises(FibroquantError, match=r"^cannot remove .*qc/s\.jpg: "):
        remove_files([files["qc"]])
    assert discard_outputs(tmp_path, "s").startswith("cannot remove ")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="aB.-_ x", min_size=1, max_size=6).filter(
    lambda part: part not in (".", "..")), min_size=1, max_size=3),
    st.sampled_from(["", ".tif", ".svs", ".ome.tif", ".OME.TIFF", ".tar.gz", "."]))
def test_output_stem_by_string_operations_equals_the_pathlib_definition(parts, suffix):
    """output_stem works on strings (fast on reruns of thousands of slides); it gives what
    the path-object definition gives: parent parts and the name without its suffix."""
    from pathlib import PurePosixPath

    from fibroquant.tasks import output_stem

    slide = "/".join([*parts[:-1], parts[-1] + suffix])
    p = PurePosixPath(slide)
    low = p.name.lower()
    if low.endswith((".ome.tiff", ".ome.tif")):
        name = p.name[: -len(".ome.tiff" if low.endswith(".ome.tiff") else ".ome.tif")]
    else:
        name = p.stem
    assert output_stem(slide) == "__".join([*p.parent.parts, name] if p.parent.parts else [name])


# -- the automatic blob rule decided per slide ------------------------------------------------


@pytest.mark.slow
def test_blob_rule_used_on_some_slides_only_is_a_run_warning(tmp_path: Path) -> None:
    """One Masson slide with blue-purple (plain haematoxylin) nuclei, one with iron
    haematoxylin: the automatic rule is used on the first only, so the run warns that the
    slides were measured differently (on the console and in the report); a consistent run
    does not."""
    from fibroquant.run import blob_rule_mixed

    slides = tmp_path / "slides"
    slides.mkdir()
    for name, nuclei in (("plain", "haematoxylin"), ("iron", "iron-haematoxylin")):
        p = SectionParams(stain="masson", shape=(512, 512), field_of_view=True,
                          nuclear_stain=nuclei)
        rgb, _ = make_section(p, rng=5)
        write_pyramid_tiff(slides / f"{name}.tif", rgb, MPP)
    masson = Settings.model_validate({"stains": {"stain": "masson"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = analyze_folder(slides, tmp_path / "out", masson, workers=1)
    df = table(tmp_path / "out").set_index("slide")
    assert df.loc["plain.tif", "blob_max_area_um2"] == 80
    assert df.loc["iron.tif", "blob_max_area_um2"] == 0
    assert "not counted as collagen (automatic)" in df.loc["plain.tif", "stain_warning"]
    assert any("used on 1 of 2 slides" in w for w in summary.warnings)  # the console's
    assert "used on 1 of 2 slides" in (tmp_path / "out" / "report.html").read_text()
    # fixed for the study, or the same on every slide: no warning
    fixed = Settings.model_validate({"stains": {"stain": "masson"},
                                     "collagen": {"blob_max_area_um2": 80}})
    assert blob_rule_mixed(df.reset_index(), fixed) is None
    assert blob_rule_mixed(df.reset_index().iloc[:1], masson) is None


def test_ctrl_c_before_any_slide_is_stored_ends_without_writing_tables(
        bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the first slide: nothing new to show, so the run ends at once (no
    tables, plots or report to draw: seconds at start-up) and the next run writes them."""
    from fibroquant import executor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield  # a generator, as run_tasks

    monkeypatch.setattr(executor, "run_tasks", interrupted)
    slides = _two_slides(bank, tmp_path / "slides", ("s0",))
    out = tmp_path / "out"
    summary = run(slides, out)
    assert summary.interrupted and summary.exit_code == 130 and summary.processed == 0
    assert summary.comparison.startswith("interrupted before any slide was stored")
    assert not (out / "slides.csv").exists() and not (out / "report.html").exists()
    monkeypatch.undo()
    summary = run(slides, out)
    assert (summary.exit_code, summary.processed) == (0, 1)
    assert (out / "slides.csv").exists() and (out / "report.html").exists()


def test_ctrl_c_after_one_slide_marks_the_rest_not_measured_not_failed(
        bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slides an interrupted run never reached are ``not-measured``: not counted as failed
    (console, run.json, report), left out of the mice, measured by the next run."""
    from fibroquant import executor

    real = executor.run_tasks

    def one_then_interrupted(tasks, **kwargs):
        yield next(iter(real(tasks[:1], **kwargs)))
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "run_tasks", one_then_interrupted)
    slides = _two_slides(bank, tmp_path / "slides")
    out = tmp_path / "out"
    summary = run(slides, out)
    assert summary.interrupted and summary.exit_code == 130
    assert (summary.failed, summary.not_measured, summary.failed_slides) == (0, 1, [])
    df = table(out).set_index("slide")
    assert df.loc["s1.tif", "status"] == "not-measured"
    assert "not measured yet" in df.loc["s1.tif", "error"]
    assert table(out, "mice.csv").set_index("mouse").loc["s1", "n_slides"] == 0
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Slides not measured" in report and "slides failed" in report
    assert json.loads((out / "run.json").read_text())["not_measured"] == 1
    monkeypatch.undo()
    summary = run(slides, out)
    assert (summary.processed, summary.not_measured) == (1, 0)
    assert set(table(out)["status"]) == {"ok"}


def test_console_names_no_tables_an_interrupted_run_did_not_write(
        bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fibroquant import executor
    from fibroquant.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield  # a generator, as run_tasks

    monkeypatch.setattr(executor, "run_tasks", interrupted)
    slides = _two_slides(bank, tmp_path / "slides")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(slides), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 130, res.output
    assert "interrupted before any slide was stored: tables not updated" in res.output
    assert "report:" not in res.output and "tables:" not in res.output
    assert "failed:" not in res.output and "failed 0, not measured 2 (interrupted)" in res.output
    assert "2 not measured yet; rerun to continue" in res.output
    res = CliRunner().invoke(app, ["analyze", str(slides), "--out", str(out), "--workers", "1",
                                   "--json"])
    info = json.loads(res.stdout)
    assert (info["tables_written"], info["files"], info["not_measured"]) == (False, {}, 2)
