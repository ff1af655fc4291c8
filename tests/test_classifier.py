"""The per-study pixel classifier: features, compiled ensemble, file format, accuracy."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from fibroquant import classifier as C
from fibroquant.synthetic import SectionParams, make_section


@pytest.fixture(scope="module")
def batches():
    """Two Masson staining batches: paler blue on a cool glass, darker blue (+35 %) on a warm
    one, drifted vectors; the classifier must read their concentrations, not their colours.
    (Trained on one intensity alone, a 1.7-fold darker batch is over-called by ~2 pp: train
    on slides spanning the study's staining, as the benchmark does.)"""
    base = SectionParams(stain="masson", shape=(512, 512), mpp=0.5, fine_fibres=0.3,
                         field_of_view=True)
    a = [make_section(replace(base, fibrosis=f, collagen_intensity=0.85,
                              background_rgb=(238.0, 242.0, 248.0), vector_drift_deg=3.0),
                      rng=10 + i) for i, f in enumerate((0.3, 0.7))]
    b = [make_section(replace(base, fibrosis=f, collagen_intensity=1.15,
                              background_rgb=(250.0, 244.0, 232.0), vector_drift_deg=3.0),
                      rng=20 + i) for i, f in enumerate((0.4, 0.8))]
    return a, b


@pytest.fixture(scope="module")
def trained(batches):
    a, _ = batches
    images = []
    for i, (rgb, truth) in enumerate(a):
        f = C.pixel_features(rgb, truth.stains, truth.params.mpp)
        images.append(C.sample_pixels(f, truth.collagen_mask, truth.tissue_mask, stem=f"a{i}",
                                      max_train_px=10_000, rng=i))
    return C.fit(images, gate_col=len(a[0][1].stains.names) + 1, header={"note": "test"})


def test_hessian_eigenvalues_match_skimage():
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals

    g = np.random.default_rng(0)
    img = g.random((64, 64)).astype(np.float32)
    import cv2

    smooth = cv2.GaussianBlur(img, (0, 0), 2.0, borderType=cv2.BORDER_REFLECT)
    hi, lo = C.hessian_eigenvalues(smooth)
    ref = hessian_matrix_eigvals(hessian_matrix(img, sigma=2.0, order="rc", mode="reflect",
                                                use_gaussian_derivatives=False))
    core = (slice(10, -10), slice(10, -10))
    np.testing.assert_allclose(hi[core], ref[0][core], atol=2e-3 * np.abs(ref[0]).max())
    np.testing.assert_allclose(lo[core], ref[1][core], atol=2e-3 * np.abs(ref[1]).max())


def test_features_are_sized_in_um(batches):
    """The same section at half the resolution gives about the same smoothed features."""
    import cv2

    rgb, truth = batches[0][0]
    names = C.feature_names(truth.stains.names, C.DEFAULT_SCALES_UM)
    fine = C.pixel_features(rgb, truth.stains, 0.5)
    small = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA)
    coarse = C.pixel_features(small, truth.stains, 1.0)
    assert fine.shape == (len(names), 512, 512)
    assert fine.dtype == np.float32
    i = names.index("aniline-blue_gauss_4um")
    down = cv2.resize(fine[i], (256, 256), interpolation=cv2.INTER_AREA)
    inner = (slice(20, -20), slice(20, -20))
    assert np.corrcoef(down[inner].ravel(), coarse[i][inner].ravel())[0, 1] > 0.98


@pytest.mark.slow
def test_compiled_ensemble_equals_sklearn(trained, batches):
    rgb, truth = batches[1][0]
    f = C.pixel_features(rgb, truth.stains, 0.5)
    idx = np.flatnonzero(truth.tissue_mask.ravel())[::7]
    rows = C.rows_at(f, np.isin(np.arange(truth.tissue_mask.size), idx).reshape(512, 512))
    comp = C.CompiledEnsemble(trained.model)
    raw = comp.raw(f, idx)
    np.testing.assert_allclose(raw, trained.model.decision_function(rows), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_array_equal(comp.decide(f, idx),
                                  trained.model.predict_proba(rows)[:, 1] >= 0.5)


@pytest.mark.slow
def test_predict_tile_with_halo_equals_whole_image(trained, batches):
    rgb, truth = batches[1][1]
    whole = trained.predict_tile(rgb, 0, truth.stains, mpp=0.5, tissue=truth.tissue_mask)
    halo = trained.halo_px(0.5)
    y0, x0, h, w = 200, 150, 96, 128
    crop = rgb[y0 - halo : y0 + h + halo, x0 - halo : x0 + w + halo]
    part = trained.predict_tile(crop, halo, truth.stains, mpp=0.5,
                                tissue=truth.tissue_mask[y0 : y0 + h, x0 : x0 + w])
    # the features of the core see the same pixels as in the whole image (up to float error)
    assert (part != whole[y0 : y0 + h, x0 : x0 + w]).mean() < 1e-3


@pytest.mark.slow
def test_trained_on_one_batch_scored_on_another(trained, batches):
    """Known answer: the truth's collagen on a differently stained batch."""
    errors, dices = [], []
    for rgb, truth in batches[1]:
        pred = trained.predict_tile(rgb, 0, truth.stains, mpp=0.5, tissue=truth.tissue_mask)
        cpa = 100 * pred.sum() / truth.tissue_mask.sum()
        errors.append(cpa - truth.cpa_percent)
        dices.append(2 * (pred & truth.collagen_mask).sum()
                     / (pred.sum() + truth.collagen_mask.sum()))
    assert max(abs(e) for e in errors) < 1.0, errors
    assert min(dices) > 0.9, dices


@pytest.mark.slow
def test_file_round_trip_and_refusals(tmp_path, trained, batches):
    path = tmp_path / "study.classifier"
    digest = C.save(trained, path)
    assert digest == C.file_hash(path)
    back = C.load(path)
    assert back.sha256 == digest
    assert back.gate_od == trained.gate_od
    header = C.read_header(path)
    assert header["format_version"] == C.FORMAT_VERSION
    assert header["note"] == "test"
    assert header["stain_calibration"] == C.STAIN_RULE
    rgb, truth = batches[1][0]
    np.testing.assert_array_equal(
        back.predict_tile(rgb, 0, truth.stains, mpp=0.5),
        trained.predict_tile(rgb, 0, truth.stains, mpp=0.5))
    # another format version, another scikit-learn, not a classifier, damaged model
    data = path.read_bytes()
    head, body = data.split(b"\n", 1)
    h = json.loads(head[len(b"fibroquant-classifier ") :])
    for key, value, message in (("format_version", 99, "format version 99 is not supported"),
                                ("sklearn_version", "0.1.0", "made with scikit-learn 0.1.0")):
        bad = tmp_path / f"{key}.classifier"
        bad.write_bytes(b"fibroquant-classifier " + json.dumps({**h, key: value}).encode()
                        + b"\n" + body)
        with pytest.raises(C.ClassifierError, match=rf"{key}\.classifier: .*{message}"):
            C.load(bad)
    other = tmp_path / "x.classifier"
    other.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(C.ClassifierError, match=r"x\.classifier: not a fibroquant classifier"):
        C.load(other)
    cut = tmp_path / "cut.classifier"
    cut.write_bytes(head + b"\n" + body[:50])
    with pytest.raises(C.ClassifierError, match=r"cut\.classifier: damaged classifier model"):
        C.load(cut)


def test_training_problems():
    f = np.zeros((10, 3), np.float32)
    one = C.TrainingImage("a", f, np.zeros(10, bool), f, np.zeros(10, bool), 10)
    errors, _ = C.training_problems([one])
    assert errors == ["one class is missing: no pixel labelled collagen"]
    with pytest.raises(C.ClassifierError, match="cannot train: one class is missing"):
        C.fit([one])
    both = C.TrainingImage("b", f, np.arange(10) < 5, f, np.arange(10) < 5, 10)
    errors, warns = C.training_problems([one, both])
    assert not errors
    assert any("only 2 annotated image(s)" in w for w in warns)
    assert any("few labelled pixels" in w for w in warns)
    assert "a: only not-collagen pixels labelled" in warns


@pytest.mark.slow
def test_cross_validation_in_agree_terms(batches):
    a, b = batches
    images = []
    for i, (rgb, truth) in enumerate([*a, *b]):
        f = C.pixel_features(rgb, truth.stains, 0.5)
        images.append(C.sample_pixels(f, truth.collagen_mask, truth.tissue_mask, stem=str(i),
                                      max_train_px=8000, max_eval_px=20_000, rng=i))
    rows = C.cross_validate(images, gate_col=4)
    assert [r["image"] for r in rows] == ["0", "1", "2", "3"]
    for r, (_, truth) in zip(rows, [*a, *b], strict=False):
        assert r["kind"] == "classifier_vs_majority"
        assert r["evaluated_px"] == 20_000
        assert r["dice"] > 0.85
        assert abs(r["reference_cpa_percent"] - truth.cpa_percent) < 0.6  # a 20k-px sample
        assert math.isclose(r["error_pp"], r["test_cpa_percent"] - r["reference_cpa_percent"])


@pytest.mark.slow
def test_classifier_file_joins_the_settings_hash(tmp_path, trained):
    import shutil

    from fibroquant.config import Settings

    plain = Settings.model_validate({"stains": {"stain": "masson"}})
    assert "classifier_sha256" not in plain.measurement_dict()  # default hash unchanged
    a = tmp_path / "a.classifier"
    C.save(trained, a)
    with_a = Settings.model_validate({"stains": {"stain": "masson"}, "classifier": str(a)})
    assert with_a.settings_hash() != plain.settings_hash()
    moved = tmp_path / "moved.classifier"
    shutil.copy(a, moved)  # the content counts, not the name
    same = Settings.model_validate({"stains": {"stain": "masson"}, "classifier": str(moved)})
    assert same.settings_hash() == with_a.settings_hash()
    b = tmp_path / "b.classifier"
    C.save(C.PixelClassifier(trained.model, {**trained.header, "note": "other"},
                             trained.gate_od), b)
    other = Settings.model_validate({"stains": {"stain": "masson"}, "classifier": str(b)})
    assert other.settings_hash() != with_a.settings_hash()


def test_slide_record_names_the_classifier(tmp_path, trained, batches):
    """slides.csv's ``classifier``: the file's name and SHA-256 (16 hex digits) when a
    classifier decided collagen, empty on the default threshold path; ``threshold_method``
    says which decided."""
    from fibroquant import pipeline
    from fibroquant.config import Settings
    from fibroquant.slides import ArraySlide

    path = tmp_path / "study.classifier"
    digest = C.save(trained, path)
    rgb, _ = batches[1][0]
    plain = Settings.model_validate({"stains": {"stain": "masson"}})
    by_clf = Settings.model_validate({"stains": {"stain": "masson"}, "classifier": str(path)})
    rec = pipeline.analyze_slide("x.png", plain, slide=ArraySlide(rgb, 0.5)).to_record()
    rec_c = pipeline.analyze_slide("x.png", by_clf, slide=ArraySlide(rgb, 0.5)).to_record()
    assert rec["classifier"] == ""
    assert rec_c["classifier"] == f"study.classifier#{digest}"
    # what decided collagen: the threshold's scale, or the classifier
    assert (rec["threshold_method"], rec_c["threshold_method"]) == ("relative", "classifier")
    assert len(digest) == 16
    assert rec_c["cpa_percent"] != rec["cpa_percent"]  # the classifier really decided


def test_scale_levels_keep_a_gaussian_of_at_least_one_pixel():
    """σ = 1, 2, 4 µm at 0.5 µm/px is 2, 4, 8 px: computed on 2-, 4- and 8-fold reduced
    planes (σ 1 px there); at 1 µm/px on 1-, 2- and 4-fold; never coarser than 8-fold."""
    assert C.scale_levels((1.0, 2.0, 4.0), 0.5) == [2, 4, 8]
    assert C.scale_levels((1.0, 2.0, 4.0), 1.0) == [1, 2, 4]
    assert C.scale_levels((16.0,), 0.25) == [C.MAX_LEVEL]
    assert C.scale_levels((1.0, 2.0, 4.0), 0.5, min_sigma_px=2.0) == [1, 2, 4]


def test_reduced_resolution_features_match_full_resolution(batches):
    """Scales computed on reduced planes and upsampled are the full-resolution features up to
    interpolation: the smoothed planes closely, gradients and Hessian eigenvalues (second
    differences of a 1-px Gaussian on the 8-fold plane) less so. The classifier's accuracy
    is the same either way (benchmarks/README.md)."""
    rgb, truth = batches[0][0]
    names = C.feature_names(truth.stains.names, C.DEFAULT_SCALES_UM)
    fast = C.pixel_features(rgb, truth.stains, 0.5)
    full = C.pixel_features(rgb, truth.stains, 0.5, min_sigma_px=None)
    inner = (slice(40, -40), slice(40, -40))
    for i, name in enumerate(names[4:], start=4):
        r = np.corrcoef(fast[i][inner].ravel(), full[i][inner].ravel())[0, 1]
        kind = name.split("_")[1]
        assert r > {"gauss": 0.99, "gradient": 0.95, "hessian": 0.85}[kind], (name, r)
    i = names.index("aniline-blue_gauss_2um")
    assert np.abs(fast[i][inner] - full[i][inner]).mean() < 0.005  # OD
    np.testing.assert_array_equal(fast[:4], full[:4])  # the unsmoothed planes: untouched


@pytest.mark.slow
def test_walk_reads_reduced_planes_as_upsampled(trained, batches):
    """The tree walk reading the reduced planes bilinearly decides as on the upsampled
    planes that training sees."""
    rgb, truth = batches[1][1]
    planes = C.feature_planes(rgb, truth.stains, 0.5)
    assert set(planes.factor.tolist()) == {1, 2, 4, 8}
    upsampled = C.pixel_features(rgb, truth.stains, 0.5)
    for k in (4, 20, 33):
        np.testing.assert_allclose(planes.full(k), upsampled[k], rtol=0, atol=0)
    idx = np.flatnonzero(truth.tissue_mask.ravel())
    comp = trained._compiled
    same = comp.decide(planes, idx) == comp.decide(upsampled, idx)
    assert same.mean() > 0.9999


def test_from_coarse_fills_agreeing_cells_and_asks_for_the_rest():
    """Known answer on a 5x5 tile: the even-grid pixels are decided; a pixel between agreeing
    ones takes their decision, one between disagreeing ones is asked for."""
    todo = np.ones((5, 5), bool)
    todo[4, 3] = False
    out = np.zeros((5, 5), bool)
    out[0, 0] = out[0, 2] = out[2, 0] = out[2, 2] = True  # a collagen cell at the top left
    need = C._from_coarse(todo, out)
    # between collagen corners: collagen without asking
    assert out[1, 1] and out[0, 1] and out[1, 0] and out[1, 2] and out[2, 1]
    # between collagen (row / column 2) and not collagen (row / column 4): asked for
    asked = {divmod(int(i), 5) for i in need}
    assert asked == {(0, 3), (1, 3), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)}
    assert (4, 3) not in asked and not out[4, 3]  # outside todo: not collagen
    assert not out[3, 4] and (3, 4) not in asked  # between four not-collagen corners
    assert not out[[0, 1, 2, 3], 3].any()  # asked pixels are left to the model


@pytest.mark.slow
def test_coarse_to_fine_agrees_with_every_pixel(trained, batches):
    rgb, truth = batches[1][0]
    fine = replace(trained, header={**trained.header, "settings": {
        **trained.header["settings"], "coarse_to_fine": False}})
    a = trained.predict_tile(rgb, 0, truth.stains, mpp=0.5, tissue=truth.tissue_mask)
    b = fine.predict_tile(rgb, 0, truth.stains, mpp=0.5, tissue=truth.tissue_mask)
    assert trained.coarse_to_fine and not fine.coarse_to_fine
    assert (a != b).mean() < 2e-3
    assert abs(a.sum() - b.sum()) / truth.tissue_mask.sum() < 1e-3  # CPA within 0.1 pp


def test_features_relative_to_the_slide_collagen_level(batches):
    """Dividing the collagen stain by a level divides exactly its own feature columns (they
    are linear in it); apply_references does that to raw rows, with the others' median for a
    slide without a level; for_slide binds the level, or the fallback."""
    rgb, truth = batches[0][0]
    names = C.feature_names(truth.stains.names, C.DEFAULT_SCALES_UM)
    raw = C.pixel_features(rgb, truth.stains, 0.5)
    rel = C.pixel_features(rgb, truth.stains, 0.5, reference_od=0.5)
    col = [i for i, n in enumerate(names) if n.startswith("aniline-blue")]
    other = [i for i in range(len(names)) if i not in col]
    assert len(col) == 13
    np.testing.assert_allclose(rel[col], raw[col] / 0.5, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(rel[other], raw[other])
    mask = truth.tissue_mask
    ims = [C.sample_pixels(raw, truth.collagen_mask, mask, stem=s, max_train_px=500,
                           max_eval_px=500, rng=0) for s in "abc"]
    for im, level in zip(ims, (0.5, 0.7, math.nan), strict=True):
        im.reference_od = level
    before = ims[2].features.copy()
    assert C.apply_references(ims, truth.stains.names) == pytest.approx(0.6)
    np.testing.assert_allclose(ims[0].features[:, col], before[:, col] / 0.5, rtol=1e-6)
    np.testing.assert_allclose(ims[2].features[:, col], before[:, col] / 0.6, rtol=1e-6)
    np.testing.assert_array_equal(ims[2].features[:, other], before[:, other])
    clf = C.PixelClassifier(None, {"settings": {"reference": C.REFERENCE,
                                                "reference_fallback_od": 0.6}})
    assert clf.for_slide(0.8).reference_od == 0.8
    assert clf.for_slide(math.nan).reference_od == 0.6
    plain = C.PixelClassifier(None, {"settings": {}})
    assert plain.for_slide(0.8) is plain


@pytest.mark.slow
def test_darker_collagen_stain_batch_reads_alike(batches):
    """Known answer: trained on one batch, a batch whose collagen stain is twice as dark is
    measured within 0.5 pp of its true CPA through analyze (the slide's collagen level binds
    the classifier); trained on raw concentrations, the same classifier over-calls it."""
    from copy import deepcopy

    from fibroquant import pipeline
    from fibroquant.config import Settings
    from fibroquant.slides import ArraySlide

    settings = Settings.model_validate({"stains": {"stain": "masson"},
                                        "traits": {"enabled": False}})
    a, _ = batches
    dark = [make_section(replace(t.params, collagen_intensity=2 * t.params.collagen_intensity),
                         rng=30 + i) for i, (_, t) in enumerate(a)]
    g = np.random.default_rng(0)
    raw = []
    for i, (rgb, truth) in enumerate(a):
        rec = pipeline.analyze_slide("a.png", settings, slide=ArraySlide(rgb, 0.5)).to_record()
        f = C.pixel_features(rgb, C.stains_of_record(rec), 0.5)
        labelled = truth.tissue_mask & (g.random(truth.tissue_mask.shape) < 0.05)
        im = C.sample_pixels(f, truth.collagen_mask, labelled, stem=str(i), rng=i)
        im.reference_od = rec[C.REFERENCE]
        raw.append(im)
    rel = deepcopy(raw)
    fallback = C.apply_references(rel, a[0][1].stains.names)
    by_raw = C.fit(raw, gate_col=4)
    by_rel = C.fit(rel, gate_col=4, header={"settings": {
        "reference": C.REFERENCE, "reference_fallback_od": fallback}})
    errors: dict[str, list[float]] = {"raw": [], "relative": []}
    for rgb, truth in dark:
        for name, clf in (("raw", by_raw), ("relative", by_rel)):
            rec = pipeline.analyze_slide("d.png", settings, slide=ArraySlide(rgb, 0.5),
                                         decide=clf).to_record()
            errors[name].append(rec["cpa_percent"] - truth.cpa_percent)
    assert max(abs(e) for e in errors["relative"]) < 0.5, errors
    assert min(errors["raw"]) > 0.5, errors


def test_exit_margins_known_answer():
    """After each check, the least margin beyond which at most ``tolerance`` of the pixels
    end on the other side of 0 (at least ``least``): the largest |score| of the pixels that
    flip, past the ones allowed to."""
    final = np.array([5.0, -5.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0])
    after4 = np.array([6.0, -6.0, -3.5, 2.5, 1.0, -1.0, 3.0, -3.0, 4.0, -4.0])  # 2 flip
    after8 = final.copy()
    after8[[2, 3, 4]] = (-7.0, 0.5, -0.2)  # 3 flip, one far out
    partial = np.stack([np.full(10, -0.1), after4, after8, final])
    assert C.exit_margins(partial, tolerance=0.0, least=0.0) == [3.5, 7.0]
    assert C.exit_margins(partial, tolerance=0.1, least=0.0) == [2.5, 0.5]  # one may flip
    assert C.exit_margins(partial, tolerance=0.25, least=0.0) == [0.0, 0.2]
    assert C.exit_margins(partial, tolerance=0.1, least=1.0) == [2.5, 1.0]


@pytest.mark.slow
def test_trained_exit_margins_decide_as_the_whole_ensemble(trained, batches):
    """The walk with the trained exit margins decides all but a few in 10⁴ of a held-out
    batch's pixels as the whole ensemble does (the exact bound decides every one alike)."""
    margins = trained.header["settings"]["exit_margins"]
    every = trained.header["settings"]["exit_every"]
    assert every == trained._compiled.exit_every == C.EXIT_EVERY
    assert len(margins) == -(-len(trained._compiled.offsets) // every) - 1
    assert min(margins) >= C.MIN_EXIT_MARGIN
    np.testing.assert_array_equal(trained._compiled.exit_margins, margins)
    exact = C.CompiledEnsemble(trained.model)
    assert exact.exit_margins == []
    differ = total = 0
    for rgb, truth in batches[1]:
        planes = C.feature_planes(rgb, truth.stains, 0.5)
        idx = np.flatnonzero(truth.tissue_mask.ravel())
        a = trained._compiled.decide(planes, idx)
        b = exact.decide(planes, idx)
        differ += np.count_nonzero(a != b)
        total += idx.size
        full = C.pixel_features(rgb, truth.stains, 0.5)
        same = b == (exact.raw(full, idx) >= 0)
        assert same.mean() > 0.9999
    assert differ / total < 5e-4, differ / total
