"""Tissue folds: the generator's known answers, and the fold detector against them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fibroquant.config import load_settings
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, fold_flaps, make_section, random_params


def test_fold_flap_doubles_the_layer_and_leaves_glass_behind():
    """A flap folded across a straight line: its stain lands mirrored on the section (both
    layers add), its old place is glass, and the total amount of stain is unchanged."""
    h, w = 200, 300
    section = np.zeros((h, w), bool)
    section[50:150, 50:250] = True
    conc = np.zeros((h, w, 2), np.float32)
    conc[section] = (0.2, 0.3)
    conc[60:70, 200:250, 0] = 1.0  # a stripe on the flap's side
    out, sec, fold = fold_flaps(conc, section, 1, rng=3)
    assert sec.sum() < section.sum()
    assert np.allclose(out[~sec], 0.0)
    assert (fold <= sec).all()
    # the flap lands on the section (a sliver past a corner of the rectangle lands on glass)
    assert fold.sum() >= 0.95 * (section.sum() - sec.sum())
    np.testing.assert_allclose(out[fold].mean(axis=0), 2 * np.float32((0.2, 0.3)), atol=0.05)
    np.testing.assert_allclose(out.sum(axis=(0, 1)), conc.sum(axis=(0, 1)), rtol=0.05)
    np.testing.assert_allclose(out[sec & ~fold], conc[sec & ~fold])


def test_folded_section_truth_excludes_the_fold():
    p = replace(SectionParams(shape=(768, 768)), folds=2)
    rgb, truth = make_section(p, rng=5)
    plain, t0 = make_section(replace(p, folds=0), rng=5)
    assert truth.fold_mask.any()
    assert not (truth.tissue_mask & truth.fold_mask).any()
    assert not (truth.collagen_mask & truth.fold_mask).any()
    assert truth.section_mask.sum() < t0.section_mask.sum()
    # the fold is darker than the same place unfolded: every stain's density adds
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1) / 255).sum(axis=-1)
    od0 = -np.log10(np.maximum(plain.astype(np.float32), 1) / 255).sum(axis=-1)
    assert np.median(od[truth.fold_mask]) > 1.5 * np.median(od0[truth.fold_mask])


_MISSED = pytest.mark.xfail(
    reason="known gap: a fold is started only where the parenchyma's counterstain reads above "
    "1.8x its median over 1,000 um2 (below that, uneven section thickness gave false folds); "
    "on 0.4-mm sections a thin folded flap often stays below it, and its doubled collagen "
    "reads +1-4 pp", strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [42, 43, pytest.param(40, marks=_MISSED),
                                  pytest.param(45, marks=_MISSED)])
def test_fold_is_excluded(seed):
    """A flap folded over a 0.4-mm section: most of the double layer is found and left out,
    and CPA reads within 1 pp (before the parenchyma-only detector: no fold found, +1-5 pp)."""
    p = replace(random_params(seed, shape=(768, 768)), field_of_view=False, folds=1)
    rgb, truth = make_section(p, rng=seed)
    a = analyze_slide("s.png", load_settings(overrides={"stains": {"stain": p.stain}}),
                      slide=ArraySlide(rgb, p.mpp))
    true_fold = truth.fold_mask.sum() * p.mpp**2 / 1e6
    assert a.to_record()["fold_area_mm2"] > 0.5 * true_fold
    assert abs(a.to_record()["cpa_percent"] - truth.cpa_percent) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [40, 41, 42, 43])
def test_no_false_folds_on_sections_without_them(seed):
    p = replace(random_params(seed, shape=(768, 768)), field_of_view=False)
    rgb, _ = make_section(p, rng=seed)
    a = analyze_slide("s.png", load_settings(overrides={"stains": {"stain": p.stain}}),
                      slide=ArraySlide(rgb, p.mpp))
    assert a.to_record()["fold_area_mm2"] == 0.0
