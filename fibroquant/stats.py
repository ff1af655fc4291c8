"""Group comparisons of per-mouse CPA: descriptive statistics, tests and effect sizes.

Pure functions: a DataFrame in, a DataFrame, dict or string out; no printing, no files. The
mouse is the experimental unit: every comparison uses one value per mouse (``mice.csv``'s
``cpa_percent``), except :func:`mixed_model`, which uses every section with a random intercept
per mouse.

Conventions (stated so a reader can reproduce every number):

* SD uses ddof = 1; SEM = SD / √n.
* Differences are *group − control*, in percentage points (pp); relative change is
  ``100 × difference / control mean``.
* Welch: ``scipy.stats.ttest_ind(group, control, equal_var=False)``; its 95 % CI is the Welch
  t interval (Welch–Satterthwaite df).
* Mann–Whitney U: ``scipy.stats.mannwhitneyu(group, control, alternative="two-sided",
  method="auto")`` (exact distribution for n ≤ 8 per group without ties, as Prism does; normal
  approximation with tie and continuity correction otherwise). U is the statistic of *group*.
* Hedges' g: (mean_group − mean_control) / pooled SD × J with the common approximation
  J = 1 − 3 / (4(n₁ + n₂) − 9) (Hedges 1981), not the exact gamma-function form. Its 95 % CI is
  the normal approximation g ± 1.96·√V with V = J² · [(n₁ + n₂)/(n₁n₂) + d²/(2(n₁ + n₂))], d the
  uncorrected standardised difference (Borenstein et al., *Introduction to Meta-Analysis*, 2009,
  eqs. 4.20 and 4.24).
* Bootstrap: percentile intervals (2.5th and 97.5th percentiles, numpy's linear interpolation)
  over ``n_boot`` resamples of mice with replacement, separately within each group.
* Multiplicity (more than two groups): Dunnett's test against the control
  (``scipy.stats.dunnett``, which pools the variance over all groups) and, alongside, Holm's
  adjustment of the Welch p-values over the comparisons against the control.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from fibroquant import schema

__all__ = [
    "GROUP_COLUMNS",
    "compare_groups",
    "edit_distance",
    "group_problems",
    "hedges_g",
    "mixed_model",
    "mixed_model_with_reason",
    "omnibus_tests",
    "pairwise_holm",
    "resolve_control",
    "summary_sentence",
]

logger = logging.getLogger(__name__)

_Z975 = float(sps.norm.ppf(0.975))

#: Columns of the table returned by :func:`compare_groups`, in order.
GROUP_COLUMNS: tuple[str, ...] = tuple(schema.names("groups"))

_COMPARISON_COLUMNS = GROUP_COLUMNS[GROUP_COLUMNS.index("diff_vs_control_pp"):]

RngLike = int | np.random.Generator | None


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(p)) if p.isdigit() else (1, p.casefold()) for p in parts if p != "")


def _group_values(
    mice: pd.DataFrame, value: str, group_col: str
) -> tuple[dict[str, np.ndarray], int]:
    """Per-group float arrays of ``value`` with NaN dropped, in natural group order.

    Returns the mapping (groups whose every value is NaN map to an empty array) and the number
    of mice dropped for a missing value.
    """
    for col in (value, group_col):
        if col not in mice.columns:
            msg = f"mice table lacks column '{col}' (columns: {', '.join(map(str, mice.columns))})"
            raise ValueError(msg)
    groups = mice[group_col].fillna("").astype(str)
    values = pd.to_numeric(mice[value], errors="coerce").astype(float)
    names = sorted(groups.unique(), key=_natural_key)
    out = {g: values[groups == g].dropna().to_numpy(dtype=float) for g in names}
    n_dropped = int(values.isna().sum())
    return out, n_dropped


def resolve_control(groups: Sequence[str], control: str | None) -> str | None:
    """Choose the control group.

    Parameters
    ----------
    groups : sequence of str
        Group names present in the data.
    control : str or None
        Requested control group. When None, a group called ``control`` (case-insensitive,
        surrounding whitespace ignored) is used if there is exactly one.

    Returns
    -------
    str or None
        The control group's name, or None when there is no control (no comparison is made).

    Raises
    ------
    ValueError
        If ``control`` is not one of ``groups``, or several groups are spelled ``control``.
    """
    available = ", ".join(repr(g) for g in groups) or "none"
    if control is not None:
        if control in groups:
            return control
        folded = [g for g in groups if g.strip().casefold() == control.strip().casefold()]
        hint = f"; did you mean {folded[0]!r}?" if len(folded) == 1 else ""
        msg = f"control group {control!r} not found; groups available: {available}{hint}"
        raise ValueError(msg)
    matches = [g for g in groups if g.strip().casefold() == "control"]
    if len(matches) > 1:
        msg = f"several groups are named like 'control' ({available}); choose one explicitly"
        raise ValueError(msg)
    return matches[0] if matches else None


def _child_generators(rng: RngLike, n: int) -> list[np.random.Generator]:
    """``n`` independent generators derived from ``rng`` (reproducible for an int seed)."""
    if isinstance(rng, np.random.Generator):
        return list(rng.spawn(n))
    return [np.random.default_rng(s) for s in np.random.SeedSequence(rng).spawn(n)]


def _bootstrap_means(x: np.ndarray, n_boot: int, gen: np.random.Generator) -> np.ndarray:
    idx = gen.integers(0, len(x), size=(n_boot, len(x)))
    return x[idx].mean(axis=1)


def _welch(x: np.ndarray, c: np.ndarray) -> dict[str, float]:
    """Welch t-test of x vs c with its 95 % CI of mean(x) − mean(c); NaN when undefined."""
    nan = {"welch_t": math.nan, "welch_df": math.nan, "welch_p": math.nan,
           "diff_ci_low_pp": math.nan, "diff_ci_high_pp": math.nan}
    if len(x) < 2 or len(c) < 2:
        return nan
    if np.var(x, ddof=1) + np.var(c, ddof=1) == 0:
        return nan  # both groups constant: t is undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.ttest_ind(x, c, equal_var=False)
        ci = res.confidence_interval(0.95)
    return {"welch_t": float(res.statistic), "welch_df": float(res.df),
            "welch_p": float(res.pvalue), "diff_ci_low_pp": float(ci.low),
            "diff_ci_high_pp": float(ci.high)}


def _mannwhitney(x: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    if len(x) < 1 or len(c) < 1:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.mannwhitneyu(x, c, alternative="two-sided", method="auto")
    return float(res.statistic), float(res.pvalue)


def hedges_g(x: np.ndarray, c: np.ndarray) -> tuple[float, float, float]:
    """Hedges' g of ``x`` minus ``c`` with its normal-approximation 95 % CI.

    Parameters
    ----------
    x, c : numpy.ndarray
        Per-mouse values of the group and of the control (any unit; g is unitless).

    Returns
    -------
    g, ci_low, ci_high : float
        NaN when either group has fewer than 2 values or the pooled SD is 0.

    Notes
    -----
    ``s_p = √[((n₁−1)s₁² + (n₂−1)s₂²)/(n₁+n₂−2)]``, ``d = (x̄ − c̄)/s_p``,
    ``J = 1 − 3/(4(n₁+n₂) − 9)``, ``g = J·d``,
    ``V = J²·[(n₁+n₂)/(n₁n₂) + d²/(2(n₁+n₂))]``, CI ``g ± z₀.₉₇₅·√V``.
    """
    n1, n2 = len(x), len(c)
    if n1 < 2 or n2 < 2:
        return math.nan, math.nan, math.nan
    s1, s2 = np.var(x, ddof=1), np.var(c, ddof=1)
    sp = math.sqrt(((n1 - 1) * s1 + (n2 - 1) * s2) / (n1 + n2 - 2))
    if sp == 0:
        return math.nan, math.nan, math.nan
    d = (float(np.mean(x)) - float(np.mean(c))) / sp
    j = 1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0)
    g = j * d
    var_g = j**2 * ((n1 + n2) / (n1 * n2) + d**2 / (2.0 * (n1 + n2)))
    half = _Z975 * math.sqrt(var_g)
    return g, g - half, g + half


def _percentile_ci(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) < len(values) or len(finite) == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------
# group comparison
# --------------------------------------------------------------------------------------------


def compare_groups(
    mice: pd.DataFrame,
    *,
    value: str = "cpa_percent",
    group_col: str = "group",
    control: str | None = None,
    n_boot: int = 10000,
    rng: RngLike = 0,
) -> pd.DataFrame:
    """Describe each group and compare it with the control group, one value per mouse.

    Parameters
    ----------
    mice : pandas.DataFrame
        One row per mouse (``mice.csv``), with ``value`` and ``group_col``.
    value : str, default "cpa_percent"
        Column compared, in % (CPA); differences are then in percentage points (pp).
    group_col : str, default "group"
        Column naming each mouse's group.
    control : str, optional
        The control group. By default the group called ``control`` (case-insensitive); when
        there is none, only descriptive columns are filled.
    n_boot : int, default 10000
        Bootstrap resamples for the bootstrap CIs.
    rng : int, numpy.random.Generator or None, default 0
        Seed or generator for the bootstrap and for Dunnett's integration. With an int the
        result is reproducible; each treated group gets its own child stream
        (``SeedSequence(rng).spawn``, in row order), and Dunnett's test is called with
        ``rng=rng`` (or a child generator when a Generator is passed).

    Returns
    -------
    pandas.DataFrame
        One row per group (the control first, the others in natural name order) with the
        columns :data:`GROUP_COLUMNS`. Comparison columns are NaN on the control row, on every
        row when there is no control, and wherever a statistic is undefined (e.g. Welch,
        bootstrap and Hedges' g need ≥ 2 mice in both groups; ``dunnett_p`` and
        ``holm_welch_p`` are filled only with more than two groups). ``attrs["control"]`` holds
        the control's name (or None) and ``attrs["note"]`` a sentence on what was (not)
        compared and how.

    Raises
    ------
    ValueError
        If ``control`` names no group (the message lists the groups), or a column is missing.

    Notes
    -----
    Mice with a missing ``value`` (e.g. every slide failed) are dropped; ``n_mice`` counts the
    mice that remain, and a group left with none keeps its row with ``n_mice = 0``. Dunnett's
    p-values come from scipy's randomised numerical integration (absolute error ~1e-4), hence
    the seed.
    """
    if n_boot < 1:
        msg = f"n_boot must be ≥ 1, got {n_boot=}"
        raise ValueError(msg)
    data, n_dropped = _group_values(mice, value, group_col)
    names = list(data)
    ctrl = resolve_control(names, control)
    order = ([ctrl] if ctrl is not None else []) + [g for g in names if g != ctrl]

    rows: list[dict[str, Any]] = []
    for g in order:
        x = data[g]
        n = len(x)
        sd = float(np.std(x, ddof=1)) if n >= 2 else math.nan
        row: dict[str, Any] = {
            "group": g,
            "is_control": g == ctrl,
            "n_mice": n,
            "cpa_mean_percent": float(np.mean(x)) if n else math.nan,
            "cpa_sd": sd,
            "cpa_sem": sd / math.sqrt(n) if n >= 2 else math.nan,
            "cpa_median": float(np.median(x)) if n else math.nan,
            "cpa_min": float(np.min(x)) if n else math.nan,
            "cpa_max": float(np.max(x)) if n else math.nan,
        }
        row.update(dict.fromkeys(_COMPARISON_COLUMNS, math.nan))
        rows.append(row)

    notes: list[str] = []
    if n_dropped:
        who = "1 mouse" if n_dropped == 1 else f"{n_dropped} mice"
        notes.append(f"{who} without a {value} value left out.")
    if ctrl is None:
        notes.append(
            "No control group (none given and no group named 'control'): groups are described "
            "but not compared."
        )
    elif len(data[ctrl]) == 0:
        notes.append(f"The control group {ctrl!r} has no mice with a value: nothing is compared.")
    treated = [g for g in order if g != ctrl]
    if ctrl is not None and not treated:
        notes.append(f"Only the control group {ctrl!r} is present: nothing is compared.")

    if ctrl is not None and len(data[ctrl]) and treated:
        c = data[ctrl]
        gens = _child_generators(rng, len(treated) + 1)
        c_mean = float(np.mean(c))
        for k, g in enumerate(treated, start=1):
            x = data[g]
            row = rows[k]
            if len(x) == 0:
                continue
            diff = float(np.mean(x)) - c_mean
            row["diff_vs_control_pp"] = diff
            row["change_vs_control_percent"] = 100.0 * diff / c_mean if c_mean != 0 else math.nan
            row.update(_welch(x, c))
            row["mannwhitney_u"], row["mannwhitney_p"] = _mannwhitney(x, c)
            row["hedges_g"], row["hedges_g_ci_low"], row["hedges_g_ci_high"] = hedges_g(x, c)
            if len(x) >= 2 and len(c) >= 2:
                gen = gens[k - 1]
                bx = _bootstrap_means(x, n_boot, gen)
                bc = _bootstrap_means(c, n_boot, gen)
                bdiff = bx - bc
                row["diff_boot_ci_low_pp"], row["diff_boot_ci_high_pp"] = _percentile_ci(bdiff)
                with np.errstate(divide="ignore", invalid="ignore"):
                    bchange = 100.0 * bdiff / bc
                low, high = _percentile_ci(bchange)
                row["change_ci_low_percent"], row["change_ci_high_percent"] = low, high

        # the comparisons made: a group of one mouse has no test (Welch needs two), so it is
        # not one of the comparisons the adjustment counts
        comparable = [g for g in treated if len(data[g]) >= 2]
        single = [g for g in treated if len(data[g]) == 1]
        if single:
            notes.append(", ".join(repr(g) for g in single) + " (one mouse) not tested, nor "
                         "counted among the comparisons.")
        n_groups_with_data = 1 + len(comparable)
        if n_groups_with_data > 2:
            index = {g: i for i, g in enumerate(order)}
            dunnett_seed: Any = rng if not isinstance(rng, np.random.Generator) else gens[-1]
            total_df = sum(len(data[g]) - 1 for g in [ctrl, *comparable])
            if total_df > 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    res = sps.dunnett(*[data[g] for g in comparable], control=c,
                                      rng=dunnett_seed)
                    ci = res.confidence_interval(confidence_level=0.95)
                for g, p, lo, hi in zip(comparable, np.atleast_1d(res.pvalue),
                                        np.atleast_1d(ci.low), np.atleast_1d(ci.high),
                                        strict=True):
                    rows[index[g]].update({"dunnett_p": float(p), "dunnett_ci_low_pp": float(lo),
                                           "dunnett_ci_high_pp": float(hi)})
            pvals = [(g, rows[index[g]]["welch_p"]) for g in comparable]
            finite = [(g, p) for g, p in pvals if np.isfinite(p)]
            if finite:
                from statsmodels.stats.multitest import multipletests

                adjusted = multipletests([p for _, p in finite], method="holm")[1]
                for (g, _), p_adj in zip(finite, adjusted, strict=True):
                    rows[index[g]]["holm_welch_p"] = float(p_adj)
            notes.append(
                f"{len(comparable)} groups vs control {ctrl!r}: Dunnett's test "
                "(scipy.stats.dunnett) and Holm-adjusted Welch p-values are reported; "
                "welch_p and mannwhitney_p are unadjusted."
            )
        else:
            notes.append(
                f"Compared with control {ctrl!r}: Welch's t-test, Mann–Whitney U (two-sided), "
                "Hedges' g; one value per mouse."
            )

    out = pd.DataFrame(rows, columns=list(GROUP_COLUMNS))
    out["group"] = out["group"].astype(str)
    out["is_control"] = out["is_control"].astype(bool)
    out["n_mice"] = out["n_mice"].astype(int)
    for col in GROUP_COLUMNS[3:]:
        out[col] = out[col].astype(float)
    out.attrs["control"] = ctrl
    out.attrs["note"] = " ".join(notes)
    return out


# --------------------------------------------------------------------------------------------
# omnibus and pairwise tests
# --------------------------------------------------------------------------------------------


def _nan_result(test: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"test": test, "statistic": math.nan, "p": math.nan, "reason": reason, **extra}


def omnibus_tests(
    mice: pd.DataFrame, *, value: str = "cpa_percent", group_col: str = "group"
) -> dict[str, Any]:
    """Tests across all groups at once, plus assumption checks that are reported, not acted on.

    Parameters
    ----------
    mice : pandas.DataFrame
        One row per mouse with ``value`` and ``group_col``; NaN values are dropped.
    value : str, default "cpa_percent"
        Column tested (CPA, %).
    group_col : str, default "group"
        Grouping column.

    Returns
    -------
    dict
        ``groups`` (names, natural order), ``n`` (mice per group), and one entry per test, each a
        dict with ``test`` (its name and the function used), ``statistic``, ``p`` and, when it
        could not be computed, ``reason``:

        * ``anova``: one-way ANOVA, ``scipy.stats.f_oneway`` (+ ``df_num``, ``df_denom``);
        * ``welch_anova``: Welch's ANOVA, ``statsmodels.stats.oneway.anova_oneway(
          use_var="unequal")`` (+ ``df_num``, ``df_denom``);
        * ``kruskal``: Kruskal–Wallis H, ``scipy.stats.kruskal``;
        * ``shapiro``: a dict per group, Shapiro–Wilk (``scipy.stats.shapiro``), n ≥ 3;
        * ``levene``: Brown–Forsythe/Levene, ``scipy.stats.levene(center="median")``.

        Shapiro–Wilk and Levene are checks to report only: they never choose the test (with
        5–10 mice per group they have little power, and choosing a test from the data distorts
        its error rate). Groups with no values are left out.
    """
    data, _ = _group_values(mice, value, group_col)
    data = {g: x for g, x in data.items() if len(x)}
    samples = list(data.values())
    k = len(samples)
    n_total = sum(len(x) for x in samples)
    out: dict[str, Any] = {"groups": list(data), "n": {g: len(x) for g, x in data.items()}}

    anova_name = "one-way ANOVA (scipy.stats.f_oneway)"
    welch_name = "Welch's ANOVA (statsmodels anova_oneway, use_var='unequal')"
    kruskal_name = "Kruskal-Wallis H test (scipy.stats.kruskal)"
    levene_name = "Levene's test, median-centred / Brown-Forsythe (scipy.stats.levene)"

    if k < 2:
        reason = "fewer than 2 groups with data"
        out["anova"] = _nan_result(anova_name, reason, df_num=math.nan, df_denom=math.nan)
        out["welch_anova"] = _nan_result(welch_name, reason, df_num=math.nan, df_denom=math.nan)
        out["kruskal"] = _nan_result(kruskal_name, reason)
        out["levene"] = _nan_result(levene_name, reason)
    else:
        # one-way ANOVA
        if n_total - k < 1 or all(np.var(x) == 0 for x in samples):
            out["anova"] = _nan_result(anova_name, "no within-group variation or df",
                                       df_num=float(k - 1), df_denom=float(n_total - k))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = sps.f_oneway(*samples)
            out["anova"] = {"test": anova_name, "statistic": float(res.statistic),
                            "p": float(res.pvalue), "df_num": float(k - 1),
                            "df_denom": float(n_total - k)}
        # Welch ANOVA
        if any(len(x) < 2 or np.var(x, ddof=1) == 0 for x in samples):
            out["welch_anova"] = _nan_result(
                welch_name, "needs ≥ 2 mice and non-zero SD in every group",
                df_num=math.nan, df_denom=math.nan,
            )
        else:
            from statsmodels.stats.oneway import anova_oneway

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res_w = anova_oneway(samples, use_var="unequal")
            out["welch_anova"] = {"test": welch_name, "statistic": float(res_w.statistic),
                                  "p": float(res_w.pvalue), "df_num": float(res_w.df_num),
                                  "df_denom": float(res_w.df_denom)}
        # Kruskal-Wallis
        pooled = np.concatenate(samples)
        if np.all(pooled == pooled[0]):
            out["kruskal"] = _nan_result(kruskal_name, "all values are identical")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res_k = sps.kruskal(*samples)
            out["kruskal"] = {"test": kruskal_name, "statistic": float(res_k.statistic),
                              "p": float(res_k.pvalue), "df": float(k - 1)}
        # Levene
        if n_total - k < 1 or all(len(x) < 2 for x in samples):
            out["levene"] = _nan_result(levene_name, "needs groups with ≥ 2 mice")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res_l = sps.levene(*samples, center="median")
            stat, p = float(res_l.statistic), float(res_l.pvalue)
            out["levene"] = {"test": levene_name, "statistic": stat, "p": p}
            if not np.isfinite(p):
                out["levene"]["reason"] = "undefined (no spread around the group medians)"

    shapiro: dict[str, dict[str, Any]] = {}
    shapiro_name = "Shapiro-Wilk (scipy.stats.shapiro)"
    for g, x in data.items():
        if len(x) < 3:
            shapiro[g] = _nan_result(shapiro_name, "needs ≥ 3 mice", n=len(x))
        elif np.all(x == x[0]):
            shapiro[g] = _nan_result(shapiro_name, "all values identical", n=len(x))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res_s = sps.shapiro(x)
            shapiro[g] = {"test": shapiro_name, "statistic": float(res_s.statistic),
                          "p": float(res_s.pvalue), "n": len(x)}
    out["shapiro"] = shapiro
    out["note"] = ("Shapiro-Wilk and Levene are reported as checks only; they were not used to "
                   "choose between tests.")
    return out


def pairwise_holm(
    mice: pd.DataFrame, *, value: str = "cpa_percent", group_col: str = "group"
) -> pd.DataFrame:
    """All pairwise group comparisons with Holm-adjusted Welch and Mann–Whitney p-values.

    Parameters
    ----------
    mice : pandas.DataFrame
        One row per mouse with ``value`` (%) and ``group_col``; NaN values are dropped.
    value : str, default "cpa_percent"
        Column compared.
    group_col : str, default "group"
        Grouping column.

    Returns
    -------
    pandas.DataFrame
        One row per pair (``group_a`` before ``group_b`` in natural order) with ``n_a, n_b,
        diff_pp`` (mean a − mean b), ``welch_t, welch_df, welch_p, welch_p_holm,
        mannwhitney_u, mannwhitney_p, mannwhitney_p_holm``. Holm's adjustment
        (``statsmodels.stats.multitest.multipletests(method="holm")``) runs separately for each
        test over the pairs where that test could be computed; the others stay NaN.
    """
    from statsmodels.stats.multitest import multipletests

    data, _ = _group_values(mice, value, group_col)
    rows: list[dict[str, Any]] = []
    for a, b in combinations(list(data), 2):
        x, y = data[a], data[b]
        w = _welch(x, y)
        u, p_u = _mannwhitney(x, y)
        rows.append({
            "group_a": a, "group_b": b, "n_a": len(x), "n_b": len(y),
            "diff_pp": float(np.mean(x) - np.mean(y)) if len(x) and len(y) else math.nan,
            "welch_t": w["welch_t"], "welch_df": w["welch_df"], "welch_p": w["welch_p"],
            "welch_p_holm": math.nan,
            "mannwhitney_u": u, "mannwhitney_p": p_u, "mannwhitney_p_holm": math.nan,
        })
    columns = ["group_a", "group_b", "n_a", "n_b", "diff_pp", "welch_t", "welch_df", "welch_p",
               "welch_p_holm", "mannwhitney_u", "mannwhitney_p", "mannwhitney_p_holm"]
    out = pd.DataFrame(rows, columns=columns)
    for raw_col, adj_col in (("welch_p", "welch_p_holm"), ("mannwhitney_p", "mannwhitney_p_holm")):
        finite = out[raw_col].notna() & np.isfinite(out[raw_col].astype(float))
        if finite.any():
            adjusted = multipletests(out.loc[finite, raw_col].to_numpy(float), method="holm")[1]
            out.loc[finite, adj_col] = adjusted
    for col in columns[4:]:
        out[col] = out[col].astype(float)
    out["n_a"] = out["n_a"].astype(int)
    out["n_b"] = out["n_b"].astype(int)
    return out


# --------------------------------------------------------------------------------------------
# mixed model
# --------------------------------------------------------------------------------------------

_BOUNDARY = "boundary of the parameter space"


def mixed_model_with_reason(
    slides: pd.DataFrame,
    *,
    control: str | None = None,
    group_col: str = "group",
    value: str = "cpa_percent",
    allow_unconverged: bool = False,
) -> tuple[dict[str, Any] | None, str]:
    """Fit the random-intercept model and say why not when it cannot be fitted.

    Same as :func:`mixed_model`, but returns ``(result, reason)``: ``reason`` is ``""`` when a
    result is returned, else a one-line explanation (too few mice with several sections, no
    control, fit failed or did not converge).
    """
    for col in ("mouse", "status", group_col, value):
        if col not in slides.columns:
            return None, f"slides table lacks column '{col}'"
    ok = slides["status"].astype(str).str.strip().str.lower().eq("ok")
    data = slides.loc[ok, ["mouse", group_col, value]].copy()
    data[value] = pd.to_numeric(data[value], errors="coerce").astype(float)
    data = data.dropna(subset=[value])
    data["mouse"] = data["mouse"].astype(str)
    data[group_col] = data[group_col].fillna("").astype(str)
    if data.empty:
        return None, "no measured (ok) slides"

    names = sorted(data[group_col].unique(), key=_natural_key)
    ctrl = resolve_control(names, control)
    if ctrl is None:
        return None, "no control group, so there is no contrast to estimate"
    if len(names) < 2:
        return None, "only one group has measured slides"
    sections = data.groupby("mouse")[value].size()
    if int((sections >= 2).sum()) < 2:
        return None, ("fewer than 2 mice have ≥ 2 measured sections; the per-mouse comparison "
                      "already uses all the information")

    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    # Safe codes keep arbitrary group names (quotes, spaces) out of the formula.
    codes = {g: f"g{i}" for i, g in enumerate([ctrl, *[n for n in names if n != ctrl]])}
    data["_group"] = data[group_col].map(codes)
    data["_y"] = data[value]
    formula = "_y ~ C(_group, Treatment(reference='g0'))"
    caught: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model = smf.mixedlm(formula, data, groups=data["mouse"])
            fit = model.fit(reml=True)
            caught = [f"{w.category.__name__}: {w.message}" for w in record]
            convergence = [str(w.message) for w in record
                           if issubclass(w.category, ConvergenceWarning)]
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError) as exc:
        return None, f"mixed model fit failed ({type(exc).__name__}: {exc})"

    on_boundary = any(_BOUNDARY in m for m in convergence)
    serious = [m for m in convergence if _BOUNDARY not in m]
    converged = bool(getattr(fit, "converged", False)) and not serious
    params, bse, pvalues = fit.fe_params, fit.bse, fit.pvalues
    conf = fit.conf_int(alpha=0.05)
    if not np.all(np.isfinite(bse[params.index])):
        converged = False
    if not converged and not allow_unconverged:
        detail = serious[0] if serious else "optimiser reported no convergence"
        reason = f"mixed model did not converge (statsmodels: {detail})"
        try:
            tiny = float(np.asarray(fit.cov_re)[0, 0]) < 1e-6 * float(fit.scale)
        except (TypeError, ValueError, IndexError):
            tiny = False
        if tiny:
            reason += "; the between-mouse variance is estimated near 0"
        return None, reason

    inverse = {v: k for k, v in codes.items()}
    groups_out: dict[str, dict[str, float]] = {}
    for term in params.index:
        match = re.search(r"\[T\.(g\d+)\]", term)
        if not match:
            continue
        groups_out[inverse[match.group(1)]] = {
            "coef_pp": float(params[term]),
            "se": float(bse[term]),
            "ci_low": float(conf.loc[term, 0]),
            "ci_high": float(conf.loc[term, 1]),
            "p": float(pvalues[term]),
        }
    result: dict[str, Any] = {
        "model": (f"{value} ~ group + (1 | mouse): linear mixed model, random intercept per "
                  "mouse, REML (statsmodels MixedLM); coefficients are group − control in pp, "
                  "Wald z tests and 95% CIs"),
        "control": ctrl,
        "control_mean_pp": float(params["Intercept"]),
        "groups": groups_out,
        "mouse_variance": float(np.asarray(fit.cov_re)[0, 0]),
        "residual_variance": float(fit.scale),
        "n_mice": int(data["mouse"].nunique()),
        "n_sections": len(data),
        "converged": converged,
        "on_boundary": on_boundary,
        "warnings": caught,
    }
    return result, ""


def mixed_model(
    slides: pd.DataFrame,
    *,
    control: str | None = None,
    group_col: str = "group",
    value: str = "cpa_percent",
    allow_unconverged: bool = False,
) -> dict[str, Any] | None:
    """Linear mixed model over sections: fixed group effect, random intercept per mouse.

    Parameters
    ----------
    slides : pandas.DataFrame
        ``slides.csv``: rows with ``status == "ok"`` and a ``value`` are used; needs ``mouse``
        and ``group_col``. Sections are nested in mice.
    control : str, optional
        Reference group; by default the group called ``control`` (case-insensitive).
    group_col : str, default "group"
        Grouping column.
    value : str, default "cpa_percent"
        Per-section CPA (%).
    allow_unconverged : bool, default False
        Return the fit with ``converged=False`` instead of None when the optimiser did not
        converge (estimates are then unreliable).

    Returns
    -------
    dict or None
        ``model`` (description), ``control``, ``control_mean_pp``, ``groups`` (per group vs the
        control: ``coef_pp, se, ci_low, ci_high, p``), ``mouse_variance``,
        ``residual_variance``, ``n_mice``, ``n_sections``, ``converged``, ``on_boundary``
        (the between-mouse variance was estimated at 0, the model then equals ordinary least
        squares on sections) and ``warnings`` (captured, never emitted). None when fewer than
        2 mice have ≥ 2 sections, there is no control or no other group, or the fit fails or
        does not converge; the reason is logged at INFO level, and
        :func:`mixed_model_with_reason` returns it.

    Raises
    ------
    ValueError
        If ``control`` names no group.

    Notes
    -----
    Fitted as ``smf.mixedlm("cpa_percent ~ C(group, Treatment(reference=control))", data,
    groups=data["mouse"]).fit(reml=True)`` (group names are recoded internally so any name is
    safe in the formula). ConvergenceWarnings are caught; apart from the "boundary" one, they
    mark the fit as not converged.
    """
    result, reason = mixed_model_with_reason(
        slides, control=control, group_col=group_col, value=value,
        allow_unconverged=allow_unconverged,
    )
    if result is None:
        logger.info("mixed model not reported: %s", reason)
    return result


# --------------------------------------------------------------------------------------------
# groups a headline must not give a p value for
# --------------------------------------------------------------------------------------------

#: Fewest mice in a group for a p value in the headline (with fewer, one animal decides).
MIN_MICE_FOR_P = 3


def edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) from ``a`` to ``b``, ignoring
    case: the optimal-string-alignment distance, so ``MCS`` is one edit from ``MSC``."""
    a, b = a.casefold(), b.casefold()
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


def group_problems(n_mice: dict[str, int], control: str | None = None,
                   min_mice: int = MIN_MICE_FOR_P) -> dict[str, str]:
    """Groups whose comparison a headline must not give a p value for, with the reason.

    Parameters
    ----------
    n_mice : dict of str to int
        Mice with a value per group.
    control : str, optional
        The control group: when it is too small, every comparison is flagged.
    min_mice : int
        Fewest mice for a p value.

    Returns
    -------
    dict of str to str
        Group -> reason, e.g. ``"1 mouse (fewer than 3)"`` or ``"one edit from 'MSC' (a
        misspelt group name?)"``. Of two names one edit apart, the group with fewer mice is
        flagged (both when they have as many).
    """
    out: dict[str, str] = {}
    names = [g for g in n_mice if g]
    for g in names:
        n = n_mice[g]
        if 0 < n < min_mice:
            out[g] = f"{n} mouse" if n == 1 else f"{n} mice"
            out[g] += f" (fewer than {min_mice})"
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if edit_distance(a, b) != 1:
                continue
            for g, other in ((a, b), (b, a)):
                if n_mice[g] <= n_mice[other] and g != control:
                    why = f"one edit from {other!r} (a misspelt group name?)"
                    out[g] = f"{out[g]}, {why}" if g in out else why
    if control is not None and control in out:
        reason = f"the control {control!r} has {out[control]}"
        out.update({g: reason for g in names if g != control and g not in out})
    return out


def group_warnings(mice: pd.DataFrame, control: str | None = None, *,
                   value: str = "cpa_percent", group_col: str = "group") -> list[str]:
    """One console/report line per group a headline gives no p value (:func:`group_problems`)."""
    if group_col not in mice.columns or mice[group_col].nunique() < 2:
        return []
    data, _ = _group_values(mice, value, group_col)
    ctrl = resolve_control(list(data), control) if control is None or control in data else None
    problems = group_problems({g: len(x) for g, x in data.items()}, ctrl)
    return [f"group {g!r}: {why}: no p value in the headline" for g, why in problems.items()]


# --------------------------------------------------------------------------------------------
# sentence
# --------------------------------------------------------------------------------------------

_MINUS = "\u2212"


def _num(x: float, digits: int) -> str:
    text = f"{x:.{digits}f}"
    if text.startswith("-"):
        text = _MINUS + text[1:]
    if set(text) <= set("0.\u2212") and text.startswith(_MINUS):
        text = text[1:]  # no "−0.0"
    return text


def _p(p: float) -> str:
    """As the tables and the report print p (three significant digits, ``< 0.001``)."""
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:#.3g}"


def _describe(row: pd.Series) -> str:
    n = int(row["n_mice"])
    mice = "mouse" if n == 1 else "mice"
    if n == 0:
        return "not measured (n = 0 mice)"
    if np.isfinite(row["cpa_sd"]):
        return (f"{_num(row['cpa_mean_percent'], 1)} ± {_num(row['cpa_sd'], 1)} % "
                f"(mean ± SD, n = {n} {mice})")
    return f"{_num(row['cpa_mean_percent'], 1)} % (n = {n} {mice})"


def summary_sentence(groups_df: pd.DataFrame) -> str:
    """One plain-English sentence per treated group, ready for a results section.

    Parameters
    ----------
    groups_df : pandas.DataFrame
        The table from :func:`compare_groups` (or ``groups.csv`` read back; the control is the
        row with ``is_control`` true, else the row whose comparison columns are empty).

    Returns
    -------
    str
        E.g. "CPA in MSC was 4.1 ± 0.8 % (mean ± SD, n = 5 mice) vs 6.9 ± 1.1 % in control:
        −2.8 pp (95% CI −4.1 to −1.5), −40 %, Welch p = 0.002, Hedges' g = −2.6." With more
        than two groups the Dunnett-adjusted p replaces Welch's. A group with fewer than
        :data:`MIN_MICE_FOR_P` mice, or named one edit from another (:func:`group_problems`),
        gets the reason instead of a p value. Without a control, the groups are described and
        the sentence says no comparison was made. Undefined numbers are left out.
    """
    if groups_df.empty:
        return "No groups to describe."
    df = groups_df.reset_index(drop=True)
    ctrl_idx: int | None = None
    if "is_control" in df.columns:
        flags = df["is_control"].astype(str).str.lower().isin(["true", "1"])
        if flags.any():
            ctrl_idx = int(np.flatnonzero(flags.to_numpy())[0])
    elif df.attrs.get("control") is not None:
        hits = np.flatnonzero((df["group"].astype(str) == df.attrs["control"]).to_numpy())
        ctrl_idx = int(hits[0]) if len(hits) else None
    if ctrl_idx is None:
        parts = [f"{_describe(r)} in {r['group'] or 'all slides'}" for _, r in df.iterrows()]
        return "CPA was " + "; ".join(parts) + ". No control group, so no comparison was made."

    ctrl = df.iloc[ctrl_idx]
    ctrl_text = _describe(ctrl).replace(" (mean ± SD, ", " (")
    problems = group_problems({str(r["group"]): int(r["n_mice"]) for _, r in df.iterrows()},
                              str(ctrl["group"]))
    # more than two groups: the comparison-adjusted test is the headline's, named
    adjusted = "dunnett_p" in df.columns and bool(df["dunnett_p"].notna().any())
    sentences = []
    for i, row in df.iterrows():
        if i == ctrl_idx:
            continue
        text = f"CPA in {row['group']} was {_describe(row)} vs {ctrl_text} in {ctrl['group']}"
        diff = row.get("diff_vs_control_pp", math.nan)
        pieces = []
        if pd.notna(diff):
            piece = f"{_num(diff, 1)} pp"
            # the interval of the headline's test: Dunnett's simultaneous one beside its p
            ci_cols = (("dunnett_ci_low_pp", "dunnett_ci_high_pp") if adjusted
                       else ("diff_ci_low_pp", "diff_ci_high_pp"))
            lo, hi = row.get(ci_cols[0], math.nan), row.get(ci_cols[1], math.nan)
            if pd.notna(lo) and pd.notna(hi):
                piece += f" (95% CI {_num(lo, 1)} to {_num(hi, 1)})"
            pieces.append(piece)
        change = row.get("change_vs_control_percent", math.nan)
        if pd.notna(change):
            pieces.append(f"{_num(change, 0)} %")
        why = problems.get(str(row["group"]))
        if why and pd.notna(diff):
            pieces.append(f"no p value: {why}")
        elif adjusted:
            if pd.notna(row.get("dunnett_p", math.nan)):
                pieces.append(f"Dunnett-adjusted {_p(row['dunnett_p'])}")
        elif pd.notna(row.get("welch_p", math.nan)):
            pieces.append(f"Welch {_p(row['welch_p'])}")
        if pd.notna(row.get("hedges_g", math.nan)) and not why:
            pieces.append(f"Hedges' g = {_num(row['hedges_g'], 1)}")
        if pieces:
            text += ": " + ", ".join(pieces)
        else:
            text += " (too few mice to compare)"
        sentences.append(text + ".")
    if not sentences:
        return f"CPA in {ctrl['group']} was {_describe(ctrl)}. No other group to compare."
    return " ".join(sentences)
