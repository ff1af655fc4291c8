"""Accuracy against synthetic truth, tiling invariance, resolution handling."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibroquant.collagen import collagen_concentration
from fibroquant.config import load_settings
from fibroquant.measure import Measurements, TileCounts
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide
from fibroquant.stains import SIRIUS_RED, od_lut, rgb_to_od
from fibroquant.synthetic import SectionParams, make_section, random_params
from fibroquant.tasks import output_stem


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _run(rgb, truth, stain, **overrides):
    ov = {"stains": {"stain": "masson" if stain.startswith("masson") else stain}}
    if stain == "masson-light-green":
        ov["stains"]["masson_collagen"] = "light-green"
    for k, v in overrides.items():
        ov.setdefault(k, {}).update(v)
    return analyze_slide("s.png", load_settings(overrides=ov),
                         slide=ArraySlide(rgb, truth.params.mpp))


_HARD = pytest.mark.xfail(
    reason="known gap (issue 4): faint thin fibres under heavy non-specific uptake, and a "
    "portal tract fused with the capsule, are under-counted by >1 pp", strict=True)
# seed 22: a portal tract lying along the capsule (was -1.0 to -1.3 pp while the capsule's
# local depth was the median of its neighbours' rays; see tissue.CAPSULE_TYPICAL_QUANTILE)
CASES = [(stain, seed) for stain in ("sirius-red", "masson") for seed in (22, 25, 26, 27)]
_HARD_CASES = [("sirius-red", 24), ("sirius-red", 28), ("masson", 24), ("masson", 28)]
HARD = [pytest.param(stain, seed, marks=_HARD) for stain, seed in _HARD_CASES]


@pytest.fixture(scope="module")
def results():
    out = {}
    for stain, seed in [*CASES, *_HARD_CASES]:
        p = random_params(seed, stain=stain, shape=(768, 768))
        rgb, truth = make_section(p, rng=seed)
        out[stain, seed] = (truth, _run(rgb, truth, stain))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("stain", "seed"), [*CASES, *HARD])
def test_cpa_and_dice_against_truth(results, stain, seed):
    truth, a = results[stain, seed]
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 1.0
    assert dice(a.collagen_mask, truth.collagen_mask) >= 0.85
    assert dice(a.tissue_mask, truth.tissue_mask) >= 0.95
    assert a.to_record()["tissue_area_mm2"] == pytest.approx(truth.tissue_area_mm2, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_mean_error_over_variation(results, stain):
    errs = [abs(results[s, seed][1].to_record()["cpa_percent"] - results[s, seed][0].cpa_percent)
            for s, seed in CASES if s == stain]
    assert np.mean(errs) <= 1.0


@pytest.mark.slow
def test_weaker_collagen_stain_does_not_change_cpa():
    """The confound in miniature: same section, collagen stain 35 % weaker."""
    base = SectionParams(shape=(640, 640), fibrosis=0.8, fine_fibres=0.2)
    rgb1, t1 = make_section(base, rng=5)
    rgb2, t2 = make_section(
        SectionParams(**{**base.__dict__, "collagen_intensity": 0.65}), rng=5)
    assert t1.cpa_percent == t2.cpa_percent
    c1 = _run(rgb1, t1, "sirius-red").to_record()["cpa_percent"]
    c2 = _run(rgb2, t2, "sirius-red").to_record()["cpa_percent"]
    assert abs(c1 - c2) < 0.5
    fixed = {"collagen": {"method": "fixed-od", "fixed_od": 0.35}}
    f1 = _run(rgb1, t1, "sirius-red", **fixed).to_record()["cpa_percent"]
    f2 = _run(rgb2, t2, "sirius-red", **fixed).to_record()["cpa_percent"]
    assert abs(c1 - c2) < abs(f1 - f2)  # the relative threshold is the robust one


@pytest.mark.slow
def test_tiling_does_not_change_counts(sirius_section):
    rgb, truth = sirius_section
    recs = []
    for tile in (128, 256, 1024):
        a = _run(rgb, truth, "sirius-red", tiling={"tile_px": tile})
        recs.append(a.to_record())
    for r in recs[1:]:
        assert r["tissue_area_mm2"] == pytest.approx(recs[0]["tissue_area_mm2"], rel=1e-9)
        assert r["collagen_area_mm2"] == pytest.approx(recs[0]["collagen_area_mm2"], rel=2e-3)


@pytest.mark.slow
def test_threads_give_identical_results(sirius_section):
    rgb, _truth = sirius_section
    s = load_settings(overrides={"tiling": {"tile_px": 256}})
    a1 = analyze_slide("s.png", s, slide=ArraySlide(rgb, 0.5), workers=1)
    a2 = analyze_slide("s.png", s, slide=ArraySlide(rgb, 0.5), workers=2)
    assert a1.to_record()["cpa_percent"] == a2.to_record()["cpa_percent"]
    assert np.array_equal(a1.collagen_mask, a2.collagen_mask)


@pytest.mark.slow
def test_analysis_resolution_close_to_native():
    p = SectionParams(shape=(1024, 1024), mpp=0.5, fibrosis=0.8, fine_fibres=0.0)
    rgb, truth = make_section(p, rng=3)
    native = _run(rgb, truth, "sirius-red")
    coarse = analyze_slide("s.tif", load_settings(overrides={"tiling": {"analysis_mpp": 1.0}}),
                           slide=ArraySlide(rgb, 0.5, levels=3))
    assert coarse.to_record()["analysis_mpp"] == pytest.approx(1.0)
    assert coarse.to_record()["level"] == 0  # read 2x finer (read_oversample) and downsampled
    assert coarse.collagen_mask.shape == (512, 512)
    assert abs(coarse.to_record()["cpa_percent"] - native.to_record()["cpa_percent"]) < 0.5
    assert coarse.to_record()["tissue_area_mm2"] == pytest.approx(
        native.to_record()["tissue_area_mm2"], rel=0.02)
    own_level = analyze_slide(
        "s.tif", load_settings(overrides={"tiling": {"analysis_mpp": 1.0, "read_oversample": 1}}),
        slide=ArraySlide(rgb, 0.5, levels=3))
    assert own_level.to_record()["level"] == 1
    assert abs(own_level.to_record()["cpa_percent"] - native.to_record()["cpa_percent"]) < 0.5


def _jpeg_pyramid(path, rgb: np.ndarray, mpp: float, n_levels: int) -> None:
    """A scanner-like pyramid: each level area-averaged from the last, JPEG q85 (4:2:0)."""
    import tifffile

    levels = [rgb]
    for _ in range(n_levels - 1):
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            extra = {"subifds": n_levels - 1} if i == 0 else {"subfiletype": 1}
            tw.write(lv, tile=(256, 256), compression="jpeg", compressionargs={"level": 85},
                     photometric="rgb", resolution=(1e4 / mpp / 2**i,) * 2,
                     resolutionunit="CENTIMETER", **extra)


@pytest.mark.slow
def test_analysis_mpp_on_jpeg_pyramid_reads_a_finer_level(tmp_path):
    # A JPEG level at 1 µm/px keeps chroma at 2 µm/px and drops thin fibres; reading the
    # 0.5 µm/px level and averaging it 2x2 stays within 0.3 pp of native (issue 5's target).
    rgb, _ = make_section(SectionParams(shape=(2048, 2048), mpp=0.25, field_of_view=True), rng=1)
    path = tmp_path / "s.tif"
    _jpeg_pyramid(path, rgb, 0.25, 3)

    def cpa(**tiling):
        return analyze_slide(path, load_settings(overrides={"tiling": tiling}), workers=2).to_record()

    native = cpa()["cpa_percent"]
    finer = cpa(analysis_mpp=1.0)
    own = cpa(analysis_mpp=1.0, read_oversample=1)
    assert (finer["level"], own["level"]) == (1, 2)
    assert abs(finer["cpa_percent"] - native) <= 0.3
    assert abs(finer["cpa_percent"] - native) < abs(own["cpa_percent"] - native)


@pytest.mark.slow
def test_masson_light_green():
    from dataclasses import replace

    # random_params draws the counterstain from 0.05-0.4 OD since session 6; this section's
    # 0.16 is the weak case below, so the usual ponceau (0.25 OD) is set here
    p = replace(random_params(31, stain="masson-light-green", shape=(768, 768)),
                counterstain_od=0.25)
    rgb, truth = make_section(p, rng=31)
    a = _run(rgb, truth, "masson-light-green")
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 1.0


@pytest.mark.slow
def test_masson_light_green_weak_ponceau():
    """Under a weak ponceau (0.16 OD) the parenchyma's non-specific light green raises its
    share and with it the share guard: -1.49 pp with the guard counted from 2 times that share
    (0.63), -0.85 pp from 1.5 times (0.56)."""
    p = random_params(31, stain="masson-light-green", shape=(768, 768))
    rgb, truth = make_section(p, rng=31)
    a = _run(rgb, truth, "masson-light-green")
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 1.0


@pytest.mark.slow
def test_exclusions_reported_in_mm2(sirius_section):
    rgb, truth = sirius_section
    a = _run(rgb, truth, "sirius-red")
    lumen_true = truth.lumen_mask.sum() * 0.25 / 1e6
    # lumens that open onto the section edge are glass, not lumens: the detected area is lower
    assert 0.6 * lumen_true <= a.to_record()["lumen_area_mm2"] <= 1.1 * lumen_true
    assert a.to_record()["capsule_area_mm2"] > 0


def test_no_tissue_is_an_error():
    from fibroquant.errors import FibroquantError

    glass = np.full((300, 300, 3), 242, np.uint8)
    with pytest.raises(FibroquantError, match="no tissue"):
        analyze_slide("glass.png", load_settings(), slide=ArraySlide(glass, 0.5,
                                                                     path="glass.png"))


def test_greyscale_image_is_refused_not_measured(sirius_section):
    """A greyscale copy of a stained section is not measured as CPA 0 % (it carries no stain)."""
    from fibroquant.errors import FibroquantError

    rgb, _ = sirius_section
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    with pytest.warns(UserWarning, match="greyscale"):
        slide = ArraySlide(grey, 0.5, path="grey.tif")
    with pytest.raises(FibroquantError,
                       match=r"^grey\.tif: greyscale image, not a colour-stained section$"):
        analyze_slide("grey.tif", load_settings(), slide=slide)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6),
                          st.floats(0, 1e3)), max_size=6))
def test_tile_counts_add_up(parts):
    tiles = [TileCounts(tissue_px=t + c, collagen_px=c, collagen_od_sum=o) for t, c, o in parts]
    total = sum(tiles, TileCounts())
    assert total.tissue_px == sum(t.tissue_px for t in tiles)
    m = Measurements.from_counts(total, 0.5)
    if total.tissue_px:
        assert m.cpa_percent == pytest.approx(100 * total.collagen_px / total.tissue_px)
        assert m.tissue_area_mm2 == pytest.approx(total.tissue_px * 0.25e-6)


def test_fast_concentration_matches_reference():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    bg = (240.0, 235.0, 230.0)
    ref = rgb_to_od(rgb, bg) @ SIRIUS_RED.unmixing[:, 0]
    got = collagen_concentration(rgb, od_lut(bg), SIRIUS_RED.unmixing[:, 0].copy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "stem"), [
    ("a.tif", "a"), ("sub/b.svs", "sub__b"), ("c.ome.tif", "c"), ("Maus 1/ü.png", "Maus 1__ü"),
])
def test_output_stem(name, stem):
    assert output_stem(name) == stem


def test_output_stems_unchanged_without_collisions():
    from fibroquant.tasks import output_stems

    names = ["a.tif", "sub/b.svs", "c.ome.tif", "Maus 1/ü.png"]
    assert output_stems(names) == {n: output_stem(n) for n in names}


@pytest.mark.parametrize(("names", "expected"), [
    (["a.tif", "a.png", "b.tif"], {"a.tif": "a.tif", "a.png": "a.png", "b.tif": "b"}),
    (["x.ome.tif", "x.png", "sub/x.tif"],
     {"x.ome.tif": "x.ome.tif", "x.png": "x.png", "sub/x.tif": "sub__x"}),
    (["s/a.tif", "s/a.ndpi", "s__a.svs"],
     {"s/a.tif": "s__a.tif", "s/a.ndpi": "s__a.ndpi", "s__a.svs": "s__a.svs"}),
])
def test_output_stems_keep_the_extension_when_stems_collide(names, expected):
    from fibroquant.tasks import output_stems

    assert output_stems(names) == expected
    assert output_stems(reversed(names)) == expected  # independent of order


@pytest.mark.parametrize("names", [
    ["A.tif", "a.tif"],  # one file name on case-insensitive file systems
    ["a.tif", "a.png", "a.tif.png"],  # a.tif's fallback is a.tif.png's stem
    ["s/a.tif", "s__a.tif"],  # the same name once '/' becomes '__'
])
def test_output_stems_always_distinct(names):
    from fibroquant.tasks import output_stems

    stems = output_stems(names)
    assert sorted(stems) == sorted(names)
    assert len({s.casefold() for s in stems.values()}) == len(names), stems
    assert all("/" not in s for s in stems.values())


@pytest.mark.slow
def test_out_of_focus_tiles_are_excluded_and_reported():
    p = SectionParams(shape=(1024, 1024), field_of_view=True, fibrosis=0.6, fine_fibres=0.2)
    rgb, truth = make_section(p, rng=9)
    small_tiles = {"tiling": {"tile_px": 256}}
    sharp = _run(rgb, truth, "sirius-red", **small_tiles)
    assert sharp.to_record()["unfocused_area_mm2"] == 0
    blurred = rgb.copy()
    blurred[:512, :512] = cv2.GaussianBlur(rgb, (0, 0), 6)[:512, :512]
    a = _run(blurred, truth, "sirius-red", **small_tiles)
    quadrant_mm2 = 512 * 512 * 0.25 / 1e6
    assert a.to_record()["unfocused_area_mm2"] == pytest.approx(quadrant_mm2, rel=0.3)
    assert not a.tissue_mask[:512, :512].any() and a.excluded_mask[:512, :512].mean() > 0.7
    # the rest of the slide is measured as before
    assert a.to_record()["tissue_area_mm2"] == pytest.approx(
        sharp.to_record()["tissue_area_mm2"] - quadrant_mm2, rel=0.1)


@pytest.mark.slow
@pytest.mark.parametrize(("stain", "counter", "nonspecific"), [("sirius-red", 0.1, 0.15),
                                                               ("sirius-red", 0.0, 0.15),
                                                               ("masson", 0.05, 0.12)])
def test_pale_counterstain_does_not_make_parenchyma_collagen(stain, counter, nonspecific,
                                                              monkeypatch):
    """Picric acid washed out (or a faded ponceau): the parenchyma's own collagen-stain uptake
    dominates its colour, so colour alone no longer tells it from collagen. The candidates'
    median fell to the parenchyma's level and CPA read +6..+54 pp; split by intensity, it is
    within 1 pp."""
    from dataclasses import replace

    import fibroquant.collagen as collagen_mod

    p = replace(SectionParams(stain=stain), shape=(768, 768), field_of_view=True,
                counterstain_od=counter, nonspecific=nonspecific)
    rgb, truth = make_section(p, rng=2)
    a = _run(rgb, truth, stain)
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) < 1.0
    assert "pale counterstain" in a.to_record()["stain_warning"]
    monkeypatch.setattr(collagen_mod, "_pale_counterstain_split", lambda c, level: None)
    b = _run(rgb, truth, stain)
    assert b.to_record()["cpa_percent"] - truth.cpa_percent > 5.0


def test_pale_counterstain_split_leaves_ordinary_slides_alone():
    from fibroquant.collagen import _pale_counterstain_split

    rng = np.random.default_rng(0)
    collagen = rng.lognormal(np.log(0.8), 0.3, 5000)  # septa, fibres, edges
    assert _pale_counterstain_split(collagen, float(np.median(collagen))) is None
    pink = rng.lognormal(np.log(0.12), 0.25, 20000)  # parenchyma above the floor
    mixed = np.r_[pink, collagen]
    split = _pale_counterstain_split(mixed, float(np.median(mixed)))
    assert split is not None
    assert 0.2 < split < 0.6


@pytest.mark.slow
def test_blue_purple_nuclei_are_not_aniline_blue_collagen():
    """Masson with a plain haematoxylin (Ruifrok & Johnston's blue-purple) instead of Weigert's
    near-black iron haematoxylin: the nuclei's colour is a mixture of aniline blue and ponceau,
    which no deconvolution separates; they are compact round blobs, and the blob rule takes
    them out. It is chosen automatically: no pixel is mostly iron haematoxylin (+2.2 pp with
    the rule off)."""
    from dataclasses import replace

    p = replace(SectionParams(stain="masson"), shape=(768, 768), field_of_view=True,
                nuclear_stain="haematoxylin")
    rgb, truth = make_section(p, rng=2)
    a = _run(rgb, truth, "masson")
    assert a.to_record()["blob_max_area_um2"] == 80.0
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) < 0.6
    b = _run(rgb, truth, "masson", collagen={"blob_max_area_um2": 0})
    assert b.to_record()["blob_max_area_um2"] == 0
    assert b.to_record()["cpa_percent"] - truth.cpa_percent > 1.5
    # the decision survives JPEG's chroma smear (faint grey fringes round the nuclei) and
    # near-black debris (twenty 7-px specks of dust), neither of which is an iron nucleus
    _ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 85])
    jpeg = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert _run(jpeg, truth, "masson").to_record()["blob_max_area_um2"] == 80.0
    dusty = rgb.copy()
    for y, x in np.random.default_rng(1).integers(20, 748, (20, 2)):
        cv2.circle(dusty, (int(x), int(y)), 3, (12, 10, 14), -1)
    assert _run(dusty, truth, "masson").to_record()["blob_max_area_um2"] == 80.0


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["masson", "sirius-red"])
def test_blob_rule_stays_off_with_iron_haematoxylin(stain):
    """Weigert's iron haematoxylin (the synthetic default, and every real Masson image in the
    workspace): nuclei do not read as collagen, so the rule that would also take compact
    interstitial collagen is not used; nor on Sirius red."""
    from dataclasses import replace

    p = replace(SectionParams(stain=stain), shape=(512, 512), field_of_view=True, nuclear_od=0.3)
    rgb, truth = make_section(p, rng=3)
    assert _run(rgb, truth, stain).to_record()["blob_max_area_um2"] == 0
    forced = _run(rgb, truth, stain, collagen={"blob_max_area_um2": 50.0})
    assert forced.to_record()["blob_max_area_um2"] == 50.0


def test_auto_blob_area_reads_the_nuclear_stain():
    from fibroquant.collagen import AUTO_BLOB_AREA_UM2, auto_blob_area
    from fibroquant.stains import HAEMATOXYLIN_VECTOR, MASSON, SIRIUS_RED, mix

    rng = np.random.default_rng(0)
    conc = rng.uniform(0.0, 0.6, (20000, 3)).astype(np.float32)
    conc[:, 2] = 0.0  # collagen and cytoplasm only
    nuclei = np.zeros((2000, 3), np.float32)
    nuclei[:, 2] = rng.uniform(0.3, 0.9, 2000)

    def stained(od, stains):  # as the pipeline passes them: stained pixels, unmixed, >= 0
        od = od[np.linalg.norm(od, axis=1) > 0.15]
        return np.maximum(od @ stains.unmixing, 0)

    iron = np.concatenate([mix(conc, MASSON), mix(nuclei, MASSON)])
    assert auto_blob_area(stained(iron, MASSON), MASSON) == 0.0
    plain = np.concatenate([mix(conc, MASSON),
                            nuclei[:, 2:] * np.float32(HAEMATOXYLIN_VECTOR) / 1.0])
    assert auto_blob_area(stained(plain, MASSON), MASSON) == AUTO_BLOB_AREA_UM2
    # Masson (aniline blue) only
    assert auto_blob_area(stained(plain, SIRIUS_RED), SIRIUS_RED) == 0.0
    # too few pixels to tell
    assert auto_blob_area(stained(plain[:500], MASSON), MASSON) == 0.0


_REAL_MASSON = sorted((Path(__file__).resolve().parents[2] / "shared" / "data").glob("masson-*/*.png"))


@pytest.mark.slow
@pytest.mark.skipif(not _REAL_MASSON, reason="shared real-image data not present")
def test_blob_rule_on_the_real_masson_images():
    """The rat-heart fields and the human liver tile have dark iron-haematoxylin nuclei (3-44 %
    of stained pixels): the automatic rule, which would take compact interstitial collagen from
    the heart fields, is not used. The two rodent liver tiles' nuclei are faint and purple
    (0.01-0.02 %): it is used, and moves their CPA by less than 0.5 pp (0.21, 0.30)."""
    for path in _REAL_MASSON:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        a = analyze_slide(path.name, load_settings(overrides={"stains": {"stain": "masson"}}),
                          slide=ArraySlide(rgb, 0.44))
        if "heinemann" not in str(path):
            assert a.to_record()["blob_max_area_um2"] == 0, path.name
            continue
        assert a.to_record()["blob_max_area_um2"] == 80, path.name
        off = analyze_slide(path.name, load_settings(overrides={
            "stains": {"stain": "masson"}, "collagen": {"blob_max_area_um2": 0}}),
            slide=ArraySlide(rgb, 0.44))
        assert 0 <= off.to_record()["cpa_percent"] - a.to_record()["cpa_percent"] < 0.5, path.name


def test_tissue_image_of_fields_is_an_integer_reduction_slides_unchanged():
    """A 2048² field finer than 2.5 µm/px detects tissue at half its resolution; images under
    4 MP and whole slides keep the tissue image they had (as coarse as 4 MP needs)."""
    from fibroquant.pipeline import tissue_image_mpp

    def old(ext, a):
        return max(a, (ext[0] * ext[1] / 4e6) ** 0.5)

    assert tissue_image_mpp((2048 * 1.0124, 2048 * 1.0124), 1.0124, 4.0) == 2 * 1.0124
    assert tissue_image_mpp((4096 * 0.5, 4096 * 0.5), 0.5, 4.0) == 2.0  # 16.8 MP: k = 4
    assert tissue_image_mpp((8192 * 0.5, 8192 * 0.5), 0.5, 4.0) == 2.5  # k = 5 (2.5 µm/px)
    # a user asking for a 16-MP tissue image gets the field at full resolution again
    assert tissue_image_mpp((2048 * 1.0124, 2048 * 1.0124), 1.0124, 16.0) == 1.0124
    for ext, a in [((1440.0, 904.0), 1.0), ((299 * 0.44, 299 * 0.44), 0.44),
                   ((706 * 0.5, 706 * 0.5), 0.5), ((16384.0, 16384.0), 0.5),
                   ((2048 * 3.0, 2048 * 3.0), 3.0), ((1999.0, 1999.0), 1.0)]:
        assert tissue_image_mpp(ext, a, 4.0) == pytest.approx(old(ext, a), rel=1e-12)


@pytest.mark.slow
def test_field_on_the_half_resolution_tissue_image_measures_as_at_full():
    """A 2048² microscope field (tissue fills the frame): CPA and tissue area with the tissue
    found at 1 µm/px (the old default) and at 2 µm/px (the default now) agree within 0.2 pp
    and 0.5 %, and both are near the truth."""
    p = random_params(3, stain="sirius-red", shape=(2048, 2048))
    p = type(p)(**{**p.__dict__, "mpp": 1.0, "field_of_view": True})
    rgb, truth = make_section(p, rng=3)
    coarse = _run(rgb, truth, "sirius-red", traits={"enabled": False})
    fine = _run(rgb, truth, "sirius-red", traits={"enabled": False},
                tissue={"tissue_mpp": 1.0})
    # the QC overlay's image is read at the overlay's size (2000 px), not the 1024² tissue image
    assert coarse.thumbnail.shape[:2] == (2000, 2000)
    a, b = coarse.to_record(), fine.to_record()
    assert abs(a["cpa_percent"] - b["cpa_percent"]) <= 0.2
    assert a["tissue_area_mm2"] == pytest.approx(b["tissue_area_mm2"], rel=0.005)
    assert abs(a["cpa_percent"] - truth.cpa_percent) <= 1.5
