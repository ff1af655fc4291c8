"""Tests of fibroquant.stats against scipy/statsmodels computed independently here."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.oneway import anova_oneway

from fibroquant.stats import (
    GROUP_COLUMNS,
    compare_groups,
    mixed_model,
    mixed_model_with_reason,
    omnibus_tests,
    pairwise_holm,
    summary_sentence,
)

TOL = 1e-9

# Fixed reference data: per-mouse CPA (%) of three groups (5, 6, 7 mice).
CONTROL = np.array([6.1, 7.2, 8.0, 6.9, 7.5, 8.3])
MSC = np.array([4.0, 4.4, 3.9, 5.1, 4.7])
MSC_HIGH = np.array([5.0, 5.5, 6.1, 5.8, 5.2, 6.3, 5.9])


def make_mice(groups: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for g, values in groups.items():
        for i, v in enumerate(values):
            rows.append({"mouse": f"{g}-{i}", "group": g, "cpa_percent": float(v)})
    return pd.DataFrame(rows)


@pytest.fixture
def three_groups() -> pd.DataFrame:
    return make_mice({"MSC": MSC, "control": CONTROL, "MSC high": MSC_HIGH})


def row(df: pd.DataFrame, group: str) -> pd.Series:
    return df.loc[df["group"] == group].iloc[0]


def hand_hedges(x: np.ndarray, c: np.ndarray) -> tuple[float, float, float]:
    n1, n2 = len(x), len(c)
    sp = math.sqrt(((n1 - 1) * x.var(ddof=1) + (n2 - 1) * c.var(ddof=1)) / (n1 + n2 - 2))
    d = (x.mean() - c.mean()) / sp
    j = 1 - 3 / (4 * (n1 + n2) - 9)
    g = j * d
    se = math.sqrt(j**2 * ((n1 + n2) / (n1 * n2) + d**2 / (2 * (n1 + n2))))
    return g, g - 1.959963984540054 * se, g + 1.959963984540054 * se


# ----------------------------------------------------------------------------- compare_groups


def test_columns_and_order(three_groups: pd.DataFrame) -> None:
    out = compare_groups(three_groups, n_boot=500)
    assert tuple(out.columns) == GROUP_COLUMNS
    assert list(out["group"]) == ["control", "MSC", "MSC high"]
    assert out.attrs["control"] == "control"
    assert list(out["is_control"]) == [True, False, False]
    assert "Dunnett" in out.attrs["note"]


def test_descriptives_match_numpy(three_groups: pd.DataFrame) -> None:
    out = compare_groups(three_groups, n_boot=100)
    for name, x in (("control", CONTROL), ("MSC", MSC), ("MSC high", MSC_HIGH)):
        r = row(out, name)
        assert r["n_mice"] == len(x)
        assert r["cpa_mean_percent"] == pytest.approx(x.mean(), abs=TOL)
        assert r["cpa_sd"] == pytest.approx(x.std(ddof=1), abs=TOL)
        assert r["cpa_sem"] == pytest.approx(x.std(ddof=1) / math.sqrt(len(x)), abs=TOL)
        assert r["cpa_median"] == pytest.approx(np.median(x), abs=TOL)
        assert r["cpa_min"] == x.min()
        assert r["cpa_max"] == x.max()


def test_control_row_comparisons_empty(three_groups: pd.DataFrame) -> None:
    out = compare_groups(three_groups, n_boot=100)
    ctrl = row(out, "control")
    assert ctrl[list(GROUP_COLUMNS[9:])].isna().all()


@pytest.mark.parametrize(("name", "x"), [("MSC", MSC), ("MSC high", MSC_HIGH)])
def test_two_sample_statistics_match_scipy(
    three_groups: pd.DataFrame, name: str, x: np.ndarray
) -> None:
    out = compare_groups(three_groups, n_boot=100)
    r = row(out, name)
    welch = sps.ttest_ind(x, CONTROL, equal_var=False)
    ci = welch.confidence_interval(0.95)
    mw = sps.mannwhitneyu(x, CONTROL, alternative="two-sided", method="auto")
    diff = x.mean() - CONTROL.mean()
    assert r["diff_vs_control_pp"] == pytest.approx(diff, abs=TOL)
    assert r["change_vs_control_percent"] == pytest.approx(100 * diff / CONTROL.mean(), abs=TOL)
    assert r["welch_t"] == pytest.approx(welch.statistic, abs=TOL)
    assert r["welch_df"] == pytest.approx(welch.df, abs=TOL)
    assert r["welch_p"] == pytest.approx(welch.pvalue, abs=TOL)
    assert r["diff_ci_low_pp"] == pytest.approx(ci.low, abs=TOL)
    assert r["diff_ci_high_pp"] == pytest.approx(ci.high, abs=TOL)
    assert r["mannwhitney_u"] == pytest.approx(mw.statistic, abs=TOL)
    assert r["mannwhitney_p"] == pytest.approx(mw.pvalue, abs=TOL)
    g, lo, hi = hand_hedges(x, CONTROL)
    assert r["hedges_g"] == pytest.approx(g, abs=TOL)
    assert r["hedges_g_ci_low"] == pytest.approx(lo, abs=TOL)
    assert r["hedges_g_ci_high"] == pytest.approx(hi, abs=TOL)


def test_welch_ci_by_hand() -> None:
    """The Welch CI is diff ± t(0.975, Welch–Satterthwaite df) · SE, independently of scipy."""
    out = compare_groups(make_mice({"control": CONTROL, "MSC": MSC}), n_boot=100)
    r = row(out, "MSC")
    v1, v2 = MSC.var(ddof=1) / len(MSC), CONTROL.var(ddof=1) / len(CONTROL)
    df = (v1 + v2) ** 2 / (v1**2 / (len(MSC) - 1) + v2**2 / (len(CONTROL) - 1))
    half = sps.t.ppf(0.975, df) * math.sqrt(v1 + v2)
    diff = MSC.mean() - CONTROL.mean()
    assert r["welch_df"] == pytest.approx(df, abs=TOL)
    assert r["diff_ci_low_pp"] == pytest.approx(diff - half, abs=TOL)
    assert r["diff_ci_high_pp"] == pytest.approx(diff + half, abs=TOL)


def test_hedges_g_hand_numbers() -> None:
    """A tiny example worked by hand: x = 1,2,3 ; c = 3,4,5 → d = −2, J = 1 − 3/15 = 0.8."""
    out = compare_groups(make_mice({"control": np.array([3.0, 4, 5]), "t": np.array([1.0, 2, 3])}),
                         n_boot=50)
    r = row(out, "t")
    assert r["hedges_g"] == pytest.approx(-1.6, abs=TOL)
    var = 0.8**2 * (6 / 9 + 4 / 12)
    assert r["hedges_g_ci_low"] == pytest.approx(-1.6 - 1.959963984540054 * math.sqrt(var), abs=TOL)


def test_multiple_groups_dunnett_and_holm(three_groups: pd.DataFrame) -> None:
    out = compare_groups(three_groups, n_boot=100, rng=7)
    dun = sps.dunnett(MSC, MSC_HIGH, control=CONTROL, rng=7)
    assert row(out, "MSC")["dunnett_p"] == pytest.approx(dun.pvalue[0], abs=TOL)
    assert row(out, "MSC high")["dunnett_p"] == pytest.approx(dun.pvalue[1], abs=TOL)
    p = [sps.ttest_ind(x, CONTROL, equal_var=False).pvalue for x in (MSC, MSC_HIGH)]
    holm = multipletests(p, method="holm")[1]
    assert row(out, "MSC")["holm_welch_p"] == pytest.approx(holm[0], abs=TOL)
    assert row(out, "MSC high")["holm_welch_p"] == pytest.approx(holm[1], abs=TOL)


def test_two_groups_have_no_multiplicity_columns() -> None:
    out = compare_groups(make_mice({"control": CONTROL, "MSC": MSC}), n_boot=100)
    assert out["dunnett_p"].isna().all()
    assert out["holm_welch_p"].isna().all()
    assert "Welch" in out.attrs["note"]


@pytest.mark.slow
def test_bootstrap_reproducible_and_sensible(three_groups: pd.DataFrame) -> None:
    a = compare_groups(three_groups, n_boot=2000, rng=3)
    b = compare_groups(three_groups, n_boot=2000, rng=3)
    c = compare_groups(three_groups, n_boot=2000, rng=4)
    boot = ["diff_boot_ci_low_pp", "diff_boot_ci_high_pp", "change_ci_low_percent",
            "change_ci_high_percent"]
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a[boot].iloc[1:], c[boot].iloc[1:])
    r = row(a, "MSC")
    assert r["diff_boot_ci_low_pp"] < r["diff_vs_control_pp"] < r["diff_boot_ci_high_pp"]
    assert r["change_ci_low_percent"] < r["change_vs_control_percent"]
    assert r["change_vs_control_percent"] < r["change_ci_high_percent"]
    # Generators work too, and the same seed gives the same numbers.
    d = compare_groups(three_groups, n_boot=2000, rng=np.random.default_rng(5))
    e = compare_groups(three_groups, n_boot=2000, rng=np.random.default_rng(5))
    pd.testing.assert_frame_equal(d, e)


def test_bootstrap_matches_documented_algorithm() -> None:
    mice = make_mice({"control": CONTROL, "MSC": MSC})
    out = compare_groups(mice, n_boot=3000, rng=11)
    gen = np.random.default_rng(np.random.SeedSequence(11).spawn(2)[0])
    bx = MSC[gen.integers(0, len(MSC), size=(3000, len(MSC)))].mean(axis=1)
    bc = CONTROL[gen.integers(0, len(CONTROL), size=(3000, len(CONTROL)))].mean(axis=1)
    lo, hi = np.percentile(bx - bc, [2.5, 97.5])
    clo, chi = np.percentile(100 * (bx - bc) / bc, [2.5, 97.5])
    r = row(out, "MSC")
    assert r["diff_boot_ci_low_pp"] == pytest.approx(lo, abs=TOL)
    assert r["diff_boot_ci_high_pp"] == pytest.approx(hi, abs=TOL)
    assert r["change_ci_low_percent"] == pytest.approx(clo, abs=TOL)
    assert r["change_ci_high_percent"] == pytest.approx(chi, abs=TOL)


def test_control_choice() -> None:
    mice = make_mice({"vehicle": CONTROL, "MSC": MSC})
    out = compare_groups(mice, n_boot=50)
    assert out.attrs["control"] is None
    assert out[list(GROUP_COLUMNS[9:])].isna().all().all()
    assert "No control group" in out.attrs["note"]
    out = compare_groups(mice, control="vehicle", n_boot=50)
    assert list(out["group"]) == ["vehicle", "MSC"]
    assert row(out, "MSC")["welch_p"] < 0.05
    with pytest.raises(ValueError, match=r"'placebo' not found; groups available: 'MSC', 'vehicle'"):
        compare_groups(mice, control="placebo")
    upper = make_mice({"CONTROL": CONTROL, "MSC": MSC})
    assert compare_groups(upper, n_boot=50).attrs["control"] == "CONTROL"


def test_nan_mice_dropped_and_small_groups_nan() -> None:
    mice = make_mice({"control": CONTROL, "MSC": MSC, "one": np.array([5.0]),
                      "none": np.array([np.nan])})
    mice.loc[0, "cpa_percent"] = np.nan
    out = compare_groups(mice, n_boot=200)
    assert row(out, "control")["n_mice"] == len(CONTROL) - 1
    assert row(out, "none")["n_mice"] == 0
    assert row(out, "none")[list(GROUP_COLUMNS[3:])].isna().all()
    one = row(out, "one")
    assert one["n_mice"] == 1
    assert one["cpa_mean_percent"] == 5.0
    assert np.isnan(one["cpa_sd"]) and np.isnan(one["cpa_sem"])
    for col in ("welch_p", "welch_t", "diff_ci_low_pp", "hedges_g", "diff_boot_ci_low_pp"):
        assert np.isnan(one[col])
    assert one["diff_vs_control_pp"] == pytest.approx(5.0 - CONTROL[1:].mean(), abs=TOL)
    assert 0 < one["mannwhitney_p"] <= 1
    assert "2 mice without a cpa_percent value left out" in out.attrs["note"]
    # Dunnett over the comparisons made: a one-mouse group has none, so control vs MSC is the
    # only one, and Welch's test is its (unadjusted) p
    assert np.isnan(row(out, "MSC")["dunnett_p"]) and np.isnan(row(out, "one")["dunnett_p"])
    assert "Compared with control 'control': Welch" in out.attrs["note"]
    assert "'one' (one mouse) not tested, nor counted among the comparisons." in out.attrs["note"]


def test_constant_groups_do_not_warn() -> None:
    mice = make_mice({"control": np.array([5.0, 5.0, 5.0]), "t": np.array([5.0, 5.0])})
    out = compare_groups(mice, n_boot=100)
    assert np.isnan(row(out, "t")["welch_p"])
    assert np.isnan(row(out, "t")["hedges_g"])
    assert row(out, "t")["diff_vs_control_pp"] == 0


def test_simulated_reduction_is_detected() -> None:
    detected = 0
    for seed in range(50):
        gen = np.random.default_rng(seed)
        n_c, n_t = gen.integers(5, 9, size=2)
        control = gen.normal(8.0, 1.0, n_c)
        treated = gen.normal(8.0 * 0.6, 1.0, n_t)
        out = compare_groups(make_mice({"control": control, "MSC": treated}), n_boot=200,
                             rng=seed)
        r = row(out, "MSC")
        detected += r["welch_p"] < 0.05
        assert r["diff_vs_control_pp"] < 0
    assert detected >= 45


@pytest.mark.slow
def test_null_pvalues_are_uniform() -> None:
    pvals = []
    for seed in range(200):
        gen = np.random.default_rng(1000 + seed)
        n_c, n_t = gen.integers(5, 9, size=2)
        mice = make_mice({"control": gen.normal(8.0, 1.0, n_c), "MSC": gen.normal(8.0, 1.0, n_t)})
        pvals.append(row(compare_groups(mice, n_boot=1, rng=seed), "MSC")["welch_p"])
    pvals_arr = np.array(pvals)
    assert sps.kstest(pvals_arr, "uniform").pvalue > 0.01
    assert 0.02 <= np.mean(pvals_arr < 0.05) <= 0.09


# ----------------------------------------------------------------------------- omnibus / pairwise


def test_omnibus_matches_libraries(three_groups: pd.DataFrame) -> None:
    res = omnibus_tests(three_groups)
    samples = [CONTROL, MSC, MSC_HIGH]
    assert res["groups"] == ["control", "MSC", "MSC high"]
    f = sps.f_oneway(*samples)
    assert res["anova"]["statistic"] == pytest.approx(f.statistic, abs=TOL)
    assert res["anova"]["p"] == pytest.approx(f.pvalue, abs=TOL)
    assert res["anova"]["df_denom"] == len(CONTROL) + len(MSC) + len(MSC_HIGH) - 3
    w = anova_oneway(samples, use_var="unequal")
    assert res["welch_anova"]["statistic"] == pytest.approx(w.statistic, abs=TOL)
    assert res["welch_anova"]["p"] == pytest.approx(w.pvalue, abs=TOL)
    assert res["welch_anova"]["df_denom"] == pytest.approx(w.df_denom, abs=TOL)
    k = sps.kruskal(*samples)
    assert res["kruskal"]["statistic"] == pytest.approx(k.statistic, abs=TOL)
    assert res["kruskal"]["p"] == pytest.approx(k.pvalue, abs=TOL)
    lev = sps.levene(*samples, center="median")
    assert res["levene"]["p"] == pytest.approx(lev.pvalue, abs=TOL)
    for name, x in (("control", CONTROL), ("MSC", MSC), ("MSC high", MSC_HIGH)):
        assert res["shapiro"][name]["p"] == pytest.approx(sps.shapiro(x).pvalue, abs=TOL)
    assert "f_oneway" in res["anova"]["test"]
    assert "unequal" in res["welch_anova"]["test"]
    assert "not used" in res["note"]


def test_omnibus_small_groups() -> None:
    res = omnibus_tests(make_mice({"a": np.array([1.0, 2.0]), "b": np.array([3.0])}))
    assert res["shapiro"]["a"]["reason"] == "needs ≥ 3 mice"
    assert np.isnan(res["welch_anova"]["p"])
    assert np.isfinite(res["anova"]["p"])
    res = omnibus_tests(make_mice({"a": np.array([1.0, 2.0])}))
    assert np.isnan(res["anova"]["p"]) and res["kruskal"]["reason"]


@pytest.mark.slow
def test_pairwise_holm(three_groups: pd.DataFrame) -> None:
    out = pairwise_holm(three_groups)
    assert len(out) == 3
    pairs = list(zip(out["group_a"], out["group_b"], strict=True))
    data = {"control": CONTROL, "MSC": MSC, "MSC high": MSC_HIGH}
    welch = [sps.ttest_ind(data[a], data[b], equal_var=False).pvalue for a, b in pairs]
    mw = [sps.mannwhitneyu(data[a], data[b], alternative="two-sided").pvalue for a, b in pairs]
    np.testing.assert_allclose(out["welch_p"], welch, atol=TOL, rtol=0)
    np.testing.assert_allclose(out["welch_p_holm"], multipletests(welch, method="holm")[1],
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(out["mannwhitney_p"], mw, atol=TOL, rtol=0)
    np.testing.assert_allclose(out["mannwhitney_p_holm"], multipletests(mw, method="holm")[1],
                               atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- mixed model


def make_sections(seed: int = 1, sections: int = 3) -> pd.DataFrame:
    gen = np.random.default_rng(seed)
    rows = []
    for g, mu in (("control", 8.0), ("MSC", 4.8), ("MSC high", 6.0)):
        for m in range(6):
            mouse_mean = mu + gen.normal(0, 1)
            for s in range(sections):
                rows.append({"slide": f"{g}{m}_{s}.tif", "mouse": f"{g}-{m}", "group": g,
                             "status": "ok", "cpa_percent": mouse_mean + gen.normal(0, 0.5)})
    return pd.DataFrame(rows)


def test_mixed_model_matches_statsmodels() -> None:
    slides = make_sections()
    failed = pd.DataFrame([{"slide": "x.tif", "mouse": "control-0", "group": "control",
                            "status": "failed", "cpa_percent": np.nan}])
    res = mixed_model(pd.concat([slides, failed], ignore_index=True))
    assert res is not None and res["converged"]
    ref = smf.mixedlm("cpa_percent ~ C(group, Treatment(reference='control'))", slides,
                      groups=slides["mouse"]).fit(reml=True)
    ci = ref.conf_int()
    for g in ("MSC", "MSC high"):
        term = f"C(group, Treatment(reference='control'))[T.{g}]"
        assert res["groups"][g]["coef_pp"] == pytest.approx(ref.params[term], abs=TOL)
        assert res["groups"][g]["se"] == pytest.approx(ref.bse[term], abs=TOL)
        assert res["groups"][g]["p"] == pytest.approx(ref.pvalues[term], abs=TOL)
        assert res["groups"][g]["ci_low"] == pytest.approx(ci.loc[term, 0], abs=TOL)
        assert res["groups"][g]["ci_high"] == pytest.approx(ci.loc[term, 1], abs=TOL)
    assert res["n_mice"] == 18 and res["n_sections"] == 54
    assert res["groups"]["MSC"]["coef_pp"] < 0


def test_mixed_model_unavailable_cases() -> None:
    one_section = make_sections(sections=1)
    result, reason = mixed_model_with_reason(one_section)
    assert result is None and "fewer than 2 mice" in reason
    assert mixed_model(one_section) is None
    no_control = make_sections().replace({"group": {"control": "vehicle"}})
    result, reason = mixed_model_with_reason(no_control)
    assert result is None and "no control" in reason
    with pytest.raises(ValueError, match="groups available"):
        mixed_model(make_sections(), control="nope")


# ----------------------------------------------------------------------------- sentence


def test_summary_sentence_format() -> None:
    groups = pd.DataFrame([
        {"group": "control", "is_control": True, "n_mice": 6, "cpa_mean_percent": 6.9,
         "cpa_sd": 1.1},
        {"group": "MSC", "is_control": False, "n_mice": 5, "cpa_mean_percent": 4.1,
         "cpa_sd": 0.8, "diff_vs_control_pp": -2.8, "diff_ci_low_pp": -4.1,
         "diff_ci_high_pp": -1.5, "change_vs_control_percent": -40.4, "welch_p": 0.0021,
         "hedges_g": -2.61},
    ])
    assert summary_sentence(groups) == (
        "CPA in MSC was 4.1 ± 0.8 % (mean ± SD, n = 5 mice) vs 6.9 ± 1.1 % (n = 6 mice) in "
        "control: −2.8 pp (95% CI −4.1 to −1.5), −40 %, Welch p = 0.00210, Hedges' g = −2.6."
    )


def test_summary_sentence_from_compare_groups(three_groups: pd.DataFrame) -> None:
    text = summary_sentence(compare_groups(three_groups, n_boot=100))
    assert text.count("CPA in ") == 2
    assert "Dunnett-adjusted p" in text
    assert "in control" in text
    assert "Welch" not in text  # the unadjusted test is not the headline's with 3 groups
    none = summary_sentence(compare_groups(make_mice({"a": MSC, "b": CONTROL}), n_boot=10))
    assert "no comparison" in none


def test_mixed_model_convergence_problems_are_caught_not_warned() -> None:
    """No between-mouse variation: statsmodels struggles; nothing escapes as a warning."""
    gen = np.random.default_rng(3)
    slides = make_sections()
    slides["cpa_percent"] = slides["group"].map({"control": 8.0, "MSC": 5.0, "MSC high": 6.0})
    slides["cpa_percent"] += gen.normal(0, 0.5, len(slides))
    result, reason = mixed_model_with_reason(slides)
    if result is None:
        assert "did not converge" in reason
        loose = mixed_model(slides, allow_unconverged=True)
        assert loose is not None and loose["converged"] is False
    else:  # a statsmodels version that copes: then it must say it is on the boundary or fine
        assert result["converged"]


def test_edit_distance_counts_a_swap_as_one_edit() -> None:
    from fibroquant.stats import edit_distance

    assert edit_distance("MCS", "MSC") == 1  # two neighbours swapped
    assert edit_distance("control", "Contrl") == 1
    assert edit_distance("MSC", "MSC-high") == 5
    assert edit_distance("abc", "cab") == 2
    assert edit_distance("", "ab") == 2


def test_misspelt_one_mouse_group_gets_no_p_value_in_the_headline() -> None:
    """Issue 23: `MCS` for `MSC` made a one-mouse group the headline called significant."""
    from fibroquant.stats import group_warnings

    mice = make_mice({"control": CONTROL, "MSC": MSC, "MCS": [2.0]})
    groups = compare_groups(mice, n_boot=50)
    assert np.isfinite(groups.set_index("group").loc["MCS", "mannwhitney_p"])  # in the table
    text = summary_sentence(groups)
    mcs = next(s for s in text.split(". CPA in ") if s.startswith(("MCS", "CPA in MCS")))
    assert "no p value: 1 mouse (fewer than 3), one edit from 'MSC'" in mcs
    assert "p =" not in mcs and "p <" not in mcs
    # MSC vs control is then the only comparison made: its Welch p, not one adjusted for a
    # comparison the headline does not make (Dunnett's counted MCS: 0.09 against Welch's 0.04)
    assert "Dunnett" not in text
    welch = sps.ttest_ind(np.asarray(MSC), np.asarray(CONTROL), equal_var=False).pvalue
    assert groups.set_index("group").loc["MSC", "welch_p"] == pytest.approx(welch)
    assert "Welch p" in text
    lines = group_warnings(mice)
    assert lines == [("group 'MCS': 1 mouse (fewer than 3), one edit from 'MSC' (a misspelt "
                     "group name?): no p value in the headline")]


def test_dunnett_headline_gives_dunnetts_simultaneous_interval() -> None:
    """With more than two groups the headline's p is Dunnett's: its interval beside it is
    Dunnett's simultaneous one (scipy), not Welch's unadjusted one, which can exclude zero
    where the adjusted p is above 0.05."""
    third = np.array([5.5, 6.1, 4.9, 5.8])
    groups = compare_groups(make_mice({"control": CONTROL, "MSC": MSC, "B": third}), n_boot=50)
    dun = sps.dunnett(MSC, third, control=CONTROL, rng=0).confidence_interval(0.95)
    by = groups.set_index("group")
    for k, g in enumerate(("MSC", "B")):
        assert by.loc[g, "dunnett_ci_low_pp"] == pytest.approx(dun.low[k], abs=1e-3)
        assert by.loc[g, "dunnett_ci_high_pp"] == pytest.approx(dun.high[k], abs=1e-3)
    text = summary_sentence(groups)
    msc = next(s for s in text.split(". ") if "in MSC" in s)
    lo, hi = by.loc["MSC", ["dunnett_ci_low_pp", "dunnett_ci_high_pp"]]
    assert f"(95% CI {lo:.1f} to {hi:.1f})".replace("-", "\u2212") in msc
    assert "Dunnett-adjusted p" in msc


def test_small_control_flags_every_comparison() -> None:
    mice = make_mice({"control": CONTROL[:2], "MSC": MSC})
    text = summary_sentence(compare_groups(mice, n_boot=50))
    assert "no p value: the control 'control' has 2 mice (fewer than 3)" in text
    assert "Welch" not in text
