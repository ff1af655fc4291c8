"""``fibroquant agree``, ``train`` and ``analyze --classifier`` end to end in a tmp folder."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fibroquant.agreement import dice
from fibroquant.cli import app
from fibroquant.outdir import standard_json
from fibroquant.synthetic import SectionParams, make_section, simulated_annotators

runner = CliRunner()


def test_json_output_is_standard_json():
    """``--json`` output: NaN and ±inf as null, numpy values and dates as JSON's own types."""
    value = {"nan": float("nan"), "values": (np.float32(0.5), np.int64(3), -np.inf),
             "array": np.array([1, 2]), "set": {2, 1}, "day": date(2024, 1, 2)}

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    parsed = json.loads(standard_json(value), parse_constant=refuse)
    assert parsed == {"nan": None, "values": [0.5, 3, None], "array": [1, 2], "set": [1, 2],
                      "day": "2024-01-02"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three Masson sections and three simulated people's dense masks of each."""
    root = tmp_path_factory.mktemp("agree")
    truths = {}
    for i, fib in enumerate((0.4, 0.7, 0.9)):
        rgb, truth = make_section(SectionParams(stain="masson", shape=(384, 384), mpp=0.5,
                                                fibrosis=fib, field_of_view=True), rng=40 + i)
        (root / "slides").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "slides" / f"s{i}.png"), rgb[..., ::-1])
        for who, mask in simulated_annotators(truth.collagen_mask, mpp=0.5, rng=i).items():
            (root / "ann" / who).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "ann" / who / f"s{i}.png"), mask.astype(np.uint8) * 255)
        truths[f"s{i}"] = truth
    return root, truths


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_agree_train_and_classifier_end_to_end(study):
    root, truths = study
    out = root / "out"
    _ok(runner.invoke(app, ["analyze", str(root / "slides"), "--out", str(out), "--stain",
                            "masson", "--mpp", "0.5", "--masks", "--no-traits"]))
    res = _ok(runner.invoke(app, ["agree", str(out), "--annotations", str(root / "ann"),
                                  "--json"]))
    summary = json.loads(res.stdout)
    # the people's pairwise Dice, computed independently from their files
    pairs = []
    for s in truths:
        masks = {w: cv2.imread(str(root / "ann" / w / f"{s}.png"), 0) > 0
                 for w in ("jitter", "tight", "wide")}
        pairs += [dice(masks["jitter"], masks["tight"]), dice(masks["jitter"], masks["wide"]),
                  dice(masks["tight"], masks["wide"])]
    assert summary["people_pairwise_dice_mean"] == pytest.approx(np.mean(pairs), abs=1e-12)
    assert summary["people"] == ["jitter", "tight", "wide"]
    assert 0.8 < summary["dice_vs_majority_mean"] <= 1.0
    table = pd.read_csv(out / "agreement.csv")
    assert set(table["kind"]) == {"tool_vs_person", "tool_vs_majority", "person_vs_person"}
    assert len(table) == 3 * (3 + 1 + 3)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('id="agreement"') == 1
    assert (out / "plots" / "agreement_bland_altman.png").is_file()

    clf = root / "study.classifier"
    res = _ok(runner.invoke(app, ["train", str(root / "ann"), "--slides", str(root / "slides"),
                                  "--stain", "masson", "--mpp", "0.5", "--out", str(clf),
                                  "--max-pixels", "8000", "--json"]))
    trained = json.loads(res.stdout)
    assert [r["image"] for r in trained["cross_validation"]] == ["s0", "s1", "s2"]
    assert trained["cv_dice_vs_majority_mean"] > 0.8
    assert not any("annotated image" in w for w in trained["warnings"])  # 3 are enough

    out_c = root / "out_c"
    args = ["analyze", str(root / "slides"), "--out", str(out_c), "--stain", "masson",
            "--mpp", "0.5", "--no-traits", "--classifier", str(clf)]
    _ok(runner.invoke(app, args))
    got = pd.read_csv(out_c / "slides.csv").set_index("slide")
    base = pd.read_csv(out / "slides.csv").set_index("slide")
    # slides.csv names the classifier that decided each slide; empty for the threshold
    assert set(got["classifier"]) == {f"study.classifier#{trained['sha256']}"}
    assert base["classifier"].isna().all()
    assert set(got["threshold_method"]) == {"classifier"}
    assert set(base["threshold_method"]) == {"relative"}
    for s, truth in truths.items():
        error = got.loc[f"{s}.png", "cpa_percent"] - truth.cpa_percent
        assert abs(error) < max(1.5, 0.1 * truth.cpa_percent), (s, error)
        # the same tissue is counted whichever decides collagen
        assert got.loc[f"{s}.png", "tissue_area_mm2"] == base.loc[f"{s}.png", "tissue_area_mm2"]
    res = _ok(runner.invoke(app, args))
    assert "0 slide(s) to measure" in res.output
    # another classifier file (same name) changes the settings hash: everything is re-measured
    _ok(runner.invoke(app, ["train", str(root / "ann"), "--slides", str(root / "slides"),
                            "--stain", "masson", "--mpp", "0.5", "--out", str(clf),
                            "--max-pixels", "5000"]))
    res = _ok(runner.invoke(app, args))
    assert "3 slide(s) to measure" in res.output


@pytest.mark.slow
def test_classifier_refusals_are_one_line(tmp_path, study):
    root, _ = study
    bad = tmp_path / "old.classifier"
    bad.write_bytes(b'fibroquant-classifier {"format_version": 0}\n')
    res = runner.invoke(app, ["analyze", str(root / "slides"), "--out", str(tmp_path / "o"),
                              "--stain", "masson", "--classifier", str(bad)])
    assert res.exit_code == 2
    assert "old.classifier: classifier format version 0 is not supported" in res.output
    (tmp_path / "cfg.yaml").write_text("classifier: old.classifier\n", encoding="utf-8")
    res = runner.invoke(app, ["analyze", str(root / "slides"), "--out", str(tmp_path / "o"),
                              "--config", str(tmp_path / "cfg.yaml")])
    assert res.exit_code == 2
    assert str(bad) in res.output.replace("\n", "")


@pytest.mark.slow
def test_agree_without_masks_or_annotations(tmp_path, study):
    root, _ = study
    res = runner.invoke(app, ["agree", str(tmp_path), "--annotations", str(root / "ann")])
    assert res.exit_code == 2
    assert "slides.csv: not found" in res.output.replace("\n", "")


@pytest.mark.slow
def test_train_without_matching_images(tmp_path, study):
    root, _ = study
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["train", str(root / "ann"), "--slides", str(tmp_path / "empty"),
                              "--out", str(tmp_path / "x.classifier")])
    assert res.exit_code == 2
    assert "no annotation file is named after an image" in res.output.replace("\n", "")
    assert not Path(tmp_path / "x.classifier").exists()


def test_agreement_section_survives_a_later_analyze(tmp_path, study):
    """``agree`` stores its result; every later report renders it, marked stale once a slide
    it scored was re-measured to another mask or an annotation changed."""
    import shutil

    root, _ = study
    slides, ann, out = tmp_path / "slides", tmp_path / "ann", tmp_path / "out"
    shutil.copytree(root / "slides", slides)
    shutil.copytree(root / "ann", ann)
    analyze = ["analyze", str(slides), "--out", str(out), "--stain", "masson",
               "--mpp", "0.5", "--masks", "--no-traits"]
    _ok(runner.invoke(app, analyze))
    _ok(runner.invoke(app, ["agree", str(out), "--annotations", str(ann)]))
    stored = json.loads((out / "agreement_summary.json").read_text(encoding="utf-8"))
    assert sorted(stored["measurements"]) == ["s0", "s1", "s2"]

    res = _ok(runner.invoke(app, analyze))  # nothing re-measured; report.html rewritten
    assert "0 slide(s) to measure" in res.output
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('id="agreement"') == 1
    assert f"<b>{stored['summary']['dice_vs_majority_mean']:.3f}</b>" in html
    assert "Stale" not in html

    image = slides / "s1.png"  # s1 rescanned (mirrored): re-measured to another mask
    cv2.imwrite(str(image), cv2.imread(str(image))[:, ::-1])
    res = _ok(runner.invoke(app, analyze))
    assert "1 slide(s) to measure" in res.output
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('id="agreement"') == 1
    assert ("since this agreement was computed, 1 of its 3 slide(s) were re-measured to "
            "another result or removed (s1)") in html
    assert "annotations in" not in html

    cv2.imwrite(str(image), cv2.imread(str(image))[:, ::-1])  # back as it was
    _ok(runner.invoke(app, analyze))
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Stale" not in html  # re-measured to the very masks it scored: current again

    person = ann / "tight" / "s2.png"  # an annotation corrected, nothing re-measured
    cv2.imwrite(str(person), 255 - cv2.imread(str(person), 0))
    res = _ok(runner.invoke(app, analyze))
    assert "0 slide(s) to measure" in res.output
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "re-measured" not in html
    assert f"the annotations in {ann} changed" in html
