
"""The one column schema of fibroquant's tables: ``slides.csv``, ``mice.csv``, ``groups.csv``.

Every column is declared once here, with its unit, meaning, kind, display precision and whether
it is carried into ``mice.csv``. The CSV column order, the README's column tables
(``tests/test_schema.py`` checks them), the xlsx headers and number formats and the report's
labels all derive from it. A new per-slide column is one :class:`Column` in :data:`SLIDES`
(and the record key that produces it); the excluded-area columns come from
:data:`fibroquant.exclusions.CLASSES`.

Rounding applies to the CSV tables and the report only; the results store and the xlsx keep
full precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from fibroquant.exclusions import CLASSES

__all__ = [
    "GROUPS", "MICE", "SLIDES", "TABLES", "Column", "column", "label", "markdown_table",
    "names", "record_keys", "round_table", "round_traits", "round_value",
]

Kind = Literal["id", "sheet", "status", "measure", "exclusion", "stain", "threshold", "qc",
               "read", "stat", "p", "count", "bookkeeping", "trait"]
Source = Literal["sheet", "record", "store", "derived"]


@dataclass(frozen=True)
class Column:
    """One column of a fibroquant table.

    Attributes
    ----------
    name : str
        The column name (physical unit as a suffix: ``_mm2``, ``_percent``, ``_pp``, ``_od``...).
    unit : str
        Unit as shown to people (``"mm²"``, ``"%"``, ``"pp"``, ``"OD"``; ``""`` for none).
    description : str
        One line: what the value is.
    kind : str
        What sort of value (``measure``, ``exclusion``, ``p``...): groups the report's columns.
    label : str
        Short header for the report and the xlsx summary (unit included).
    sig : int, optional
        Round to this many significant digits in CSV tables and the report.
    decimals : int, optional
        Round to this many decimals in CSV tables and the report (``0``: an integer).
    to_mice : bool
        Whether ``mice.csv`` carries an aggregate of it (areas summed, CPA area-weighted).
    source : str
        ``record`` (the slide's measurement), ``store`` (added when stored), ``sheet`` or
        ``derived`` (computed from other rows: mice and groups tables).
    optional : bool
        Produced only in some runs (e.g. a column another module adds when it applies).
    """

    name: str
    unit: str
    description: str
    kind: Kind
    label: str
    sig: int | None = None
    decimals: int | None = None
    to_mice: bool = False
    source: Source = "record"
    optional: bool = False

    @property
    def excel_format(self) -> str:
        """An Excel number format showing the displayed precision (the cell keeps all digits)."""
        if self.decimals == 0:
            return "0"
        if self.decimals is not None:
            return "0." + "0" * self.decimals
        if self.sig is not None:
            return "0.000" if self.kind == "p" else "0.0000"
        return "General"


def _c(name: str, unit: str, label: str, description: str, kind: Kind, **kw: object) -> Column:
    return Column(name=name, unit=unit, label=label, description=description, kind=kind,
                  **kw)  # type: ignore[arg-type]


_AREA = {"sig": 4}
_CPA = {"decimals": 2}
_P = {"sig": 3}

#: ``slides.csv``: one row per slide, in this column order (sample-sheet extras follow ``group``).
SLIDES: tuple[Column, ...] = (
    _c("slide", "", "slide", "path of the slide file relative to the slides folder", "id",
       source="sheet"),
    _c("mouse", "", "mouse", "the animal (from the sample sheet; the file name without one)",
       "id", source="sheet"),
    _c("group", "", "group", "treatment group (from the sample sheet)", "id", source="sheet"),
    _c("status", "", "status", "`ok`, `wrong-stain` (measured, but the colours show another "
       "stain: left out of mice and groups unless `--keep-wrong-stain`), `failed`, or "
       "`not-measured` (the run was interrupted before it, and the next run measures it; or "
       "with `--allow-missing`, the sheet lists it but its file is not in the folder yet)",
       "status"),
    _c("error", "", "error", "why a failed slide failed, or why it was not measured, one line naming the file", "status"),
    _c("mpp", "µm/px", "µm/px", "µm per pixel of the file (or the sheet's / `--mpp`'s)",
       "read", sig=6),
    _c("file_mpp", "µm/px", "file µm/px", "µm per pixel in the file's metadata when the sample "
       "sheet gave the slide's (empty otherwise, or when the file states none)", "read", sig=6,
       optional=True),
    _c("analysis_mpp", "µm/px", "analysis µm/px", "µm per pixel of the analysis", "read",
       sig=6),
    _c("tissue_area_mm2", "mm²", "tissue mm²",
       "countable tissue: section minus glass and every exclusion below", "measure",
       to_mice=True, **_AREA),
    _c("collagen_area_mm2", "mm²", "collagen mm²", "collagen within countable tissue",
       "measure", to_mice=True, **_AREA),
    _c("cpa_percent", "%", "CPA %",
       "100 × collagen area / tissue area, from pixel sums over the whole section", "measure",
       to_mice=True, **_CPA),
    _c("collagen_od_mean", "OD", "collagen OD",
       "mean collagen-stain concentration over collagen pixels", "measure", sig=4),
    *(_c(c.column, "mm²", f"{c.name} mm²", c.description, "exclusion", **_AREA)
      for c in CLASSES),
    _c("stain", "", "stain", "the stain protocol measured with", "stain"),
    _c("stain_source", "", "vectors",
       "`estimated` per slide, `partly-estimated`, or the `preset` vectors", "stain"),
    _c("stain_angle_deg", "°", "stain angle °",
       "angle of the collagen stain's vector from its preset", "stain", decimals=1),
    _c("collagen_od_share", "", "collagen share",
       "the collagen stain's share of all stain in the tissue", "stain", sig=4),
    _c("stain_warning", "", "stain warning",
       "plain-language stain QC: implausible vectors, faint or missing collagen stain, "
       "wrong stain?", "qc"),
    _c("qc_flags", "", "doubtful because",
       "what makes the slide's CPA doubtful, `;`-separated: wrong stain, faint stain, pale "
       "counterstain, large exclusions, little tissue, few collagen pixels to calibrate "
       "(empty: nothing)", "qc"),
    _c("stain_guess", "", "stain guess",
       "the protocol the slide's colours show: sirius-red, masson, masson-light-green, h&e, "
       "fluorescence, grey (not a colour stain) or unknown", "stain"),
    _c("threshold_method", "", "decided by", "what decided collagen: the threshold's method "
       "(relative, fixed-od, otsu) or `classifier` (the pixel classifier named in `classifier`; "
       "the threshold columns then only decide the capsule)", "threshold"),
    _c("classifier", "", "classifier",
       "the pixel classifier that decided collagen (`fibroquant train`), as `FILE#SHA256`: its "
       "file name and the first 16 hex digits of its SHA-256; empty: the collagen threshold "
       "above decided", "threshold"),
    _c("threshold_od", "OD", "threshold OD", "the collagen-stain threshold", "threshold",
       sig=4),
    _c("parenchyma_od", "OD", "parenchyma OD",
       "collagen-stain level of the parenchyma (non-specific uptake)", "threshold", sig=4),
    _c("collagen_level_od", "OD", "collagen level OD",
       "collagen-stain level of collagen-dominated pixels", "threshold", sig=4),
    _c("share_guard", "", "share guard",
       "least collagen-stain share of a collagen pixel", "threshold", sig=4),
    _c("parenchyma_share", "", "parenchyma share",
       "the parenchyma's own collagen-stain share the guard counts from", "threshold", sig=4),
    _c("blob_max_area_um2", "µm²", "blob rule µm²",
       "largest compact blob not counted as collagen, as decided for the slide (0 = off)",
       "threshold", sig=4),
    _c("glass_od", "OD", "glass OD", "the lowest summed OD taken as tissue", "qc", sig=4),
    _c("background_rgb", "", "background RGB",
       "glass intensity used for optical density (JSON R, G, B)", "qc"),
    _c("background_source", "", "background from", "where the glass intensity came from",
       "qc"),
    _c("shading_od", "OD", "shading OD",
       "range of the uneven illumination divided out (0 = none corrected)", "qc", sig=4),
    _c("channel_shift_px", "px", "channel shift px",
       "colour-plane misregistration moved back, level-0 pixels (0 = none)", "qc", sig=4),
    _c("mask_mpp", "µm/px", "mask µm/px", "µm per pixel of the masks and overlay", "read",
       sig=6),
    _c("level", "", "level", "pyramid level read (0 = full resolution)", "read", decimals=0),
    _c("width_px", "px", "width px", "width of the analysed image", "read", decimals=0),
    _c("height_px", "px", "height px", "height of the analysed image", "read", decimals=0),
    _c("format", "", "format", "file format as read", "read"),
    _c("seconds", "s", "seconds", "time to measure the slide", "bookkeeping", decimals=2),
    _c("fingerprint", "", "fingerprint",
       "size + hash of the file's first and last MiB (the rerun key)", "bookkeeping",
       source="store"),
    _c("stain_vectors", "", "stain vectors",
       "the stain vectors used (JSON, R,G,B unit OD per stain)", "stain"),
    _c("stain_angles_deg", "°", "stain angles °",
       "angle of every stain's vector from its preset (JSON)", "stain"),
    _c("stain_fit", "", "stain fit",
       "how well each known protocol explains the slide's colours (JSON, mean relative "
       "residual; the wrong-stain check)", "stain"),
    _c("wrong_stain", "", "wrong stain",
       "whether the colours fit another protocol clearly better (the store keeps such a "
       "slide `ok`; the tables show `wrong-stain`)", "stain"),
)

#: ``mice.csv``: one row per mouse (sheet columns constant within the mouse follow).
MICE: tuple[Column, ...] = (
    _c("mouse", "", "mouse", "the animal", "id", source="derived"),
    _c("group", "", "group", "its treatment group", "id", source="derived"),
    _c("n_slides", "", "n slides", "slides measured (status ok)", "count", decimals=0,
       source="derived"),
    _c("tissue_area_mm2", "mm²", "tissue mm²", "Σ tissue area of its ok slides", "measure",
       source="derived", **_AREA),
    _c("collagen_area_mm2", "mm²", "collagen mm²", "Σ collagen area of its ok slides",
       "measure", source="derived", **_AREA),
    _c("cpa_percent", "%", "CPA %",
       "area-weighted: 100 × Σ collagen / Σ tissue (the value groups compare)", "measure",
       source="derived", **_CPA),
    _c("cpa_mean_of_slides_percent", "%", "mean of slides %",
       "unweighted mean of its slides' CPA", "measure", source="derived", **_CPA),
    _c("cpa_sd_of_slides", "pp", "SD of slides", "SD of its slides' CPA (ddof 1)", "measure",
       source="derived", **_CPA),
    _c("n_failed_slides", "", "n left out", "slides left out: failed, not measured yet, or of "
       "another stain (wrong-stain; kept with --keep-wrong-stain)", "count", decimals=0,
       source="derived"),
)

_G = {"source": "derived"}

#: ``groups.csv``: one row per group; comparison columns are empty on the control row.
GROUPS: tuple[Column, ...] = (
    _c("group", "", "group", "treatment group", "id", **_G),
    _c("is_control", "", "control", "whether this is the control group", "id", **_G),
    _c("n_mice", "", "n mice", "mice with a measured CPA", "count", decimals=0, **_G),
    _c("cpa_mean_percent", "%", "mean CPA %", "mean of the mice's CPA", "stat", **_CPA, **_G),
    _c("cpa_sd", "pp", "SD", "SD of the mice's CPA", "stat", **_CPA, **_G),
    _c("cpa_sem", "pp", "SEM", "standard error of the mean", "stat", **_CPA, **_G),
    _c("cpa_median", "%", "median", "median of the mice's CPA", "stat", **_CPA, **_G),
    _c("cpa_min", "%", "min", "lowest mouse CPA", "stat", **_CPA, **_G),
    _c("cpa_max", "%", "max", "highest mouse CPA", "stat", **_CPA, **_G),
    _c("diff_vs_control_pp", "pp", "diff vs control pp",
       "group mean − control mean, percentage points", "stat", **_CPA, **_G),
    _c("diff_ci_low_pp", "pp", "95 % CI low", "Welch 95 % CI of the difference, low", "stat",
       **_CPA, **_G),
    _c("diff_ci_high_pp", "pp", "95 % CI high", "Welch 95 % CI of the difference, high",
       "stat", **_CPA, **_G),
    _c("diff_boot_ci_low_pp", "pp", "boot CI low", "bootstrap 95 % CI of the difference, low",
       "stat", **_CPA, **_G),
    _c("diff_boot_ci_high_pp", "pp", "boot CI high",
       "bootstrap 95 % CI of the difference, high", "stat", **_CPA, **_G),
    _c("change_vs_control_percent", "%", "change %",
       "relative change: 100 × diff / control mean", "stat", decimals=1, **_G),
    _c("change_ci_low_percent", "%", "change CI low", "bootstrap 95 % CI of the change, low",
       "stat", decimals=1, **_G),
    _c("change_ci_high_percent", "%", "change CI high",
       "bootstrap 95 % CI of the change, high", "stat", decimals=1, **_G),
    _c("welch_t", "", "Welch t", "Welch's t statistic", "stat", sig=4, **_G),
    _c("welch_df", "", "Welch df", "Welch–Satterthwaite degrees of freedom", "stat", sig=4,
       **_G),
    _c("welch_p", "", "Welch p", "Welch's t-test p, two-sided, unadjusted", "p", **_P, **_G),
    _c("mannwhitney_u", "", "Mann–Whitney U", "Mann–Whitney U statistic", "stat", sig=4,
       **_G),
    _c("mannwhitney_p", "", "Mann–Whitney p", "Mann–Whitney p, two-sided, unadjusted", "p",
       **_P, **_G),
    _c("hedges_g", "", "Hedges' g", "standardised mean difference, small-sample corrected",
       "stat", decimals=2, **_G),
    _c("hedges_g_ci_low", "", "g CI low", "95 % CI of Hedges' g, low", "stat", decimals=2,
       **_G),
    _c("hedges_g_ci_high", "", "g CI high", "95 % CI of Hedges' g, high", "stat",
       decimals=2, **_G),
    _c("dunnett_p", "", "Dunnett p",
       "Dunnett's test against control (more than two groups): adjusted for the comparisons",
       "p", **_P, **_G),
    _c("dunnett_ci_low_pp", "pp", "Dunnett CI low",
       "Dunnett's simultaneous 95 % CI of the difference (more than two groups), low", "stat",
       **_CPA, **_G),
    _c("dunnett_ci_high_pp", "pp", "Dunnett CI high",
       "Dunnett's simultaneous 95 % CI of the difference (more than two groups), high",
       "stat", **_CPA, **_G),
    _c("holm_welch_p", "", "Welch p (Holm)",
       "Welch p, Holm-adjusted over the comparisons (more than two groups)", "p", **_P, **_G),
)

def _trait_unit(name: str) -> tuple[str, dict[str, int]]:
    """Unit and display precision of a fibre-trait column, from its name."""
    for suffix, unit in (("_mm_per_mm2", "mm/mm²"), ("_per_mm2", "/mm²"), ("_area_mm2", "mm²"),
                         ("_percent", "%"), ("_um", "µm"), ("_mpp", "µm/px")):
        if name.endswith(suffix):
            return unit, ({"decimals": 2} if unit == "%" else {"sig": 4})
    if name.endswith("_vessels"):
        return "", {"decimals": 0}
    return "", {"sig": 4}


def _trait_columns(source: Source, **kw: object) -> tuple[Column, ...]:
    """Fibre-architecture columns (:data:`fibroquant.traits.TRAIT_COLUMNS`): per slide, and
    pooled per mouse; absent with ``--no-traits``."""
    from fibroquant.traits import TRAIT_COLUMNS

    out = []
    for name, description in TRAIT_COLUMNS.items():
        unit, precision = _trait_unit(name)
        label = name.replace("_percent", " %").replace("_um", " µm").replace("_", " ")
        out.append(Column(name=name, unit=unit, description=description, kind="trait",
                          label=label, optional=True, source=source,
                          **precision, **kw))  # type: ignore[arg-type]
    return tuple(out)


SLIDES = SLIDES + _trait_columns("record")
MICE = MICE + tuple(c for c in _trait_columns("derived", to_mice=True) if c.name != "traits_mpp")

TABLES: dict[str, tuple[Column, ...]] = {"slides": SLIDES, "mice": MICE, "groups": GROUPS}

_BY_NAME: dict[str, dict[str, Column]] = {t: {c.name: c for c in cols}
                                          for t, cols in TABLES.items()}


def names(table: str) -> list[str]:
    """Column names of ``table`` (``slides``, ``mice`` or ``groups``) in output order."""
    return [c.name for c in TABLES[table]]


def column(table: str, name: str) -> Column | None:
    """The schema entry of a column, or None for a column the schema does not know (a sample
    sheet's extra column)."""
    return _BY_NAME[table].get(name)


def label(table: str, name: str) -> str:
    """A person's header for a column: the schema's label, else the name itself."""
    col = column(table, name)
    return col.label if col else name


def record_keys() -> frozenset[str]:
    """Keys a slide's stored record may carry (measured columns and store bookkeeping).

    The record also carries ``settings_hash`` and ``version`` (store bookkeeping, never in a
    table).
    """
    return frozenset({c.name for c in SLIDES if c.source in ("record", "store")}
                     | {"settings_hash", "version"})


def round_value(value: float, col: Column) -> float:
    """``value`` rounded as ``col`` says (unchanged when it says nothing or is not finite)."""
    if not math.isfinite(value):
        return value
    if col.decimals is not None:
        return round(value, col.decimals)
    if col.sig is not None and value != 0:
        return round(value, col.sig - 1 - math.floor(math.log10(abs(value))))
    return value


def round_table(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """A copy of ``frame`` with its schema columns rounded for reading (CSV, report).

    Integer columns (``decimals=0``) become nullable integers, so ``level`` reads ``0``, not
    ``0.0``. Columns the schema does not know are left as they are.
    """
    out = frame.copy()
    for name in out.columns:
        col = column(table, str(name))
        if col is None or (col.decimals is None and col.sig is None):
            continue
        values = pd.to_numeric(out[name], errors="coerce")
        if values.notna().sum() < out[name].notna().sum():  # not a numeric column: leave it
            continue
        if col.decimals == 0:
            out[name] = values.round().astype("Int64")
            continue
        arr = values.to_numpy(dtype=float)
        out[name] = np.array([round_value(float(v), col) for v in arr], dtype=float)
    return out


def _trait_precision(trait: str) -> Column:
    """The display precision of a fibre trait's values: its ``slides`` column's (4 significant
    digits for a trait the schema does not know)."""
    return column("slides", trait) or _c(trait, "", trait, "", "trait", sig=4)


def round_traits(frame: pd.DataFrame, table: Literal["traits", "trait_groups"]) -> pd.DataFrame:
    """A copy of ``traits.csv`` or ``trait_groups.csv`` (long form: one row per trait) rounded
    for reading as the other tables are: each value at its trait's precision (an integer
    count reads ``3``, a percentage 0.01, other traits 4 significant digits); in
    ``trait_groups`` also differences and CIs at the trait's precision, p values at 3
    significant digits, Hedges' g at 2 decimals, ``n_mice`` as an integer.

    The results store and the xlsx keep full precision.
    """
    out = frame.copy()
    if "trait" not in out.columns or out.empty:
        return out
    value_cols = (["value"] if table == "traits" else
                  ["mean", "sd", "diff_vs_control", "diff_ci_low", "diff_ci_high"])
    fixed = {} if table == "traits" else {
        **{c: _c(c, "", c, "", "p", **_P) for c in ("welch_p", "mannwhitney_p", "holm_welch_p")},
        **{c: _c(c, "", c, "", "stat", decimals=2)
           for c in ("hedges_g", "hedges_g_ci_low", "hedges_g_ci_high")},
    }
    cols = [c for c in value_cols if c in out.columns]
    objects = {c: out[c].astype(object) for c in cols}
    for i, trait in zip(out.index, out["trait"].astype(str), strict=True):
        col = _trait_precision(trait)
        for c in cols:
            v = pd.to_numeric(pd.Series([out.at[i, c]]), errors="coerce").iloc[0]
            if pd.isna(v):
                continue
            r = round_value(float(v), col)
            objects[c].at[i] = int(r) if col.decimals == 0 else r
    for c in cols:
        out[c] = objects[c]
    for c, col in fixed.items():
        if c in out.columns:
            arr = pd.to_numeric(out[c], errors="coerce").to_numpy(dtype=float)
            out[c] = np.array([round_value(float(v), col) for v in arr], dtype=float)
    if "n_mice" in out.columns:
        out["n_mice"] = pd.to_numeric(out["n_mice"], errors="coerce").round().astype("Int64")
    return out


def ordered(columns: Iterable[str], table: str, first_extra: Sequence[str] = ()) -> list[str]:
    """``columns`` in the schema's order: the ids, then ``first_extra`` (sheet columns), then
    the schema's, then any others sorted."""
    present = list(dict.fromkeys(columns))
    schema = [n for n in names(table) if n in present]
    ids = [n for n in schema if column(table, n).kind == "id"]  # type: ignore[union-attr]
    rest = [n for n in schema if n not in ids]
    extra = [c for c in first_extra if c in present and c not in schema]
    others = sorted(c for c in present if c not in schema and c not in extra)
    return [*ids, *extra, *rest, *others]


def markdown_table(table: str) -> str:
    """The README's column table for ``table``: one row per column, name, unit, meaning."""
    lines = ["| column | unit | meaning |", "|---|---|---|"]
    for c in TABLES[table]:
        meaning = c.description + (" (optional)" if c.optional else "")
        lines.append(f"| `{c.name}` | {c.unit} | {meaning} |")
    return "\n".join(lines)


def update_readme(text: str) -> str:
    """``text`` with every block between ``<!-- schema:TABLE -->`` and ``<!-- /schema:TABLE -->``
    replaced by :func:`markdown_table` of that table (``python -m fibroquant.schema README.md``
    rewrites the README; ``tests/test_schema.py`` checks it is current)."""
    for table in TABLES:
        start, end = f"<!-- schema:{table} -->", f"<!-- /schema:{table} -->"
        i, j = text.find(start), text.find(end)
        if i < 0 or j < i:
            continue
        text = text[: i + len(start)] + "\n" + markdown_table(table) + "\n" + text[j:]
    return text


if __name__ == "__main__":  # pragma: no cover - a maintainer's tool
    import sys
    from pathlib import Path

    for arg in sys.argv[1:]:
        path = Path(arg)
        path.write_text(update_readme(path.read_text(encoding="utf-8")), encoding="utf-8")
