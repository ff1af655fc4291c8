"""Agreement statistics against reference implementations, and against synthetic truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance

from fibroquant.agreement import (
    PixelCounts,
    concordance,
    dice,
    icc2_1,
    image_agreement,
    insert_section,
    iou,
    lins_ccc,
    majority,
    summarise,
)
from fibroquant.annotations import Annotation
from fibroquant.synthetic import (
    SectionParams,
    make_section,
    simulated_annotators,
    sparse_strokes,
)


@pytest.fixture(scope="module")
def section():
    return make_section(SectionParams(shape=(384, 384), fibrosis=0.8, fine_fibres=0.3), rng=5)


def _dense(person, mask):
    return Annotation(person, "img", Path(f"{person}.png"), mask, np.ones(mask.shape, bool),
                      None, True)


def test_dice_and_iou_match_scipy():
    g = np.random.default_rng(0)
    a = g.random((50, 40)) < 0.3
    b = g.random((50, 40)) < 0.4
    assert dice(a, b) == pytest.approx(1 - distance.dice(a.ravel(), b.ravel()), abs=1e-12)
    assert iou(a, b) == pytest.approx(1 - distance.jaccard(a.ravel(), b.ravel()), abs=1e-12)
    scored = g.random((50, 40)) < 0.5
    ref = 1 - distance.dice(a[scored], b[scored])
    assert dice(a, b, scored) == pytest.approx(ref, abs=1e-12)
    assert math.isnan(dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)))


def test_pixel_counts_add_and_percentages():
    c = PixelCounts(2, 1, 3, 10) + PixelCounts(1, 0, 0, 10)
    assert (c.tp, c.fp, c.fn, c.n) == (3, 1, 3, 20)
    assert c.test_percent == pytest.approx(20.0)
    assert c.reference_percent == pytest.approx(30.0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
def test_icc2_1_matches_pingouin():
    pg = pytest.importorskip("pingouin")
    g = np.random.default_rng(1)
    truth = g.normal(8, 3, 15)
    ratings = np.column_stack([truth + g.normal(0, 1, 15), truth + 1.5 + g.normal(0, 1, 15),
                               truth * 1.1 + g.normal(0, 1, 15)])
    long = pd.DataFrame({"target": np.repeat(np.arange(15), 3), "rater": np.tile([0, 1, 2], 15),
                         "score": ratings.ravel()})
    ref = pg.intraclass_corr(long, "target", "rater", "score").set_index("Type")
    assert icc2_1(ratings) == pytest.approx(ref.loc["ICC(A,1)", "ICC"], abs=1e-10)
    assert icc2_1(ratings[:, :2]) == pytest.approx(
        pg.intraclass_corr(long[long.rater < 2], "target", "rater", "score")
        .set_index("Type").loc["ICC(A,1)", "ICC"], abs=1e-10)


def test_lins_ccc_known_answers():
    x = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    assert lins_ccc(x, x) == pytest.approx(1.0)
    shift = 2.0  # y = x + c: 2 s² / (2 s² + c²) with population variance s²
    assert lins_ccc(x, x + shift) == pytest.approx(2 * x.var() / (2 * x.var() + shift**2))
    assert lins_ccc(x, -x) == pytest.approx(-2 * x.var() / (2 * x.var() + 4 * x.mean() ** 2))
    # ccc = pearson r times the bias correction factor (Lin 1989)
    y = 0.7 * x + 1 + np.array([0.3, -0.2, 0.1, 0.4, -0.5])
    r = stats.pearsonr(x, y).statistic
    v = x.std() / y.std()
    u = (x.mean() - y.mean()) / math.sqrt(x.std() * y.std())
    assert lins_ccc(x, y) == pytest.approx(r * 2 / (v + 1 / v + u**2))


def test_concordance_bland_altman_against_statsmodels():
    sm = pytest.importorskip("statsmodels.graphics.agreement")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.random.default_rng(2)
    ref = g.uniform(1, 20, 12)
    test = ref + 0.8 + g.normal(0, 0.6, 12)
    c = concordance(test, ref)
    fig = sm.mean_diff_plot(test, ref)
    lines = sorted(line.get_ydata()[0] for line in fig.axes[0].get_lines())
    plt.close(fig)
    # statsmodels draws the bias and bias ± 1.96 SD with the population SD (ddof=0); the
    # Bland-Altman limits use the sample SD: the half-widths differ by sqrt(n / (n - 1))
    assert c["bias_pp"] == pytest.approx(lines[1])
    half = (c["loa_high_pp"] - c["loa_low_pp"]) / 2
    assert half == pytest.approx((lines[2] - lines[0]) / 2 * math.sqrt(12 / 11))
    assert c["pearson_r"] == pytest.approx(stats.pearsonr(test, ref).statistic)
    assert c["spearman_r"] == pytest.approx(stats.spearmanr(test, ref).statistic)
    assert c["mae_pp"] == pytest.approx(np.abs(test - ref).mean())


def test_majority_of_three_edge_habits_is_the_truth(section):
    """Grown, shrunk and exact edges: the majority is the exact one; the people's pairwise Dice
    is below 1 and the tool equal to the truth beats every person."""
    _, truth = section
    people = simulated_annotators(truth.collagen_mask, mpp=truth.params.mpp, rng=0)
    people["exact"] = truth.collagen_mask
    anns = [_dense(p, m) for p, m in people.items() if p != "jitter"]
    maj, labelled = majority(anns)
    assert labelled.all()
    np.testing.assert_array_equal(maj, truth.collagen_mask)
    rows, counts = image_agreement("img", truth.collagen_mask, truth.tissue_mask, anns)
    by = {r["reference"]: r for r in rows}
    assert by["majority"]["dice"] == 1.0
    assert by["majority"]["error_pp"] == 0.0
    wide, tight = people["wide"], people["tight"]
    assert by["wide~tight"]["dice"] == pytest.approx(dice(wide, tight))
    assert by["wide"]["test_cpa_percent"] < by["wide"]["reference_cpa_percent"]
    assert by["tight"]["test_cpa_percent"] > by["tight"]["reference_cpa_percent"]
    # the tool is scored inside its own tissue, people with each other everywhere
    assert by["wide"]["scored_px"] == truth.tissue_mask.sum()
    assert by["wide~tight"]["scored_px"] == truth.tissue_mask.size
    s = summarise(rows, counts)
    assert s["dice_vs_majority_mean"] == 1.0
    pair_dice = [dice(people[a], people[b]) for a, b in
                 (("wide", "tight"), ("wide", "exact"), ("tight", "exact"))]
    assert s["people_pairwise_dice_mean"] == pytest.approx(np.mean(pair_dice))
    assert 0.5 < s["people_pairwise_dice_mean"] < 0.95


def test_sparse_strokes_score_only_labelled_pixels(section):
    """Strokes drawn from the truth: a tool mask equal to the truth inside them scores Dice 1
    whatever it says elsewhere; one that misses the collagen strokes scores 0."""
    _, truth = section
    labels = sparse_strokes(truth.collagen_mask, truth.tissue_mask, mpp=truth.params.mpp,
                            n_strokes=30, rng=4)
    labelled = labels > 0
    assert 0 < labelled.mean() < 0.2
    assert (labels == 2).any()
    assert (labels == 1).any()
    ann = Annotation("p", "img", Path("p.png"), labels == 2, labelled, None, False)
    noisy = truth.collagen_mask.copy()
    noisy[~labelled] = np.random.default_rng(0).random(int((~labelled).sum())) < 0.5
    rows, _ = image_agreement("img", noisy, truth.tissue_mask, [ann])
    assert rows[0]["dice"] == 1.0
    assert rows[0]["scored_px"] == (labelled & truth.tissue_mask).sum()
    rows, _ = image_agreement("img", truth.collagen_mask & ~labelled, truth.tissue_mask, [ann])
    assert rows[0]["dice"] == 0.0


def test_drawn_tissue_is_the_scored_region():
    col = np.zeros((10, 10), bool)
    col[2:4, 2:4] = True
    tissue = np.zeros((10, 10), bool)
    tissue[:5] = True
    ann = Annotation("p", "img", Path("p.geojson"), col, tissue, tissue, False)
    tool = col.copy()
    tool[8, 8] = True  # outside the drawn tissue: not scored
    rows, _ = image_agreement("img", tool, np.ones((10, 10), bool), [ann])
    assert rows[0]["dice"] == 1.0
    assert rows[0]["scored_px"] == 50
    assert rows[0]["scored_region"] == "drawn tissue"


def test_report_section_replaced_not_duplicated():
    page = '<html><body><main><section id="settings">s</section></main></body></html>'
    once = insert_section(page, "<p>A</p>")
    twice = insert_section(once, "<p>B</p>")
    assert once.index("<p>A</p>") < once.index('id="settings"')
    assert "<p>A</p>" not in twice
    assert twice.count("<p>B</p>") == 1
