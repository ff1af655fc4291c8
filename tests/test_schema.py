"""The one column schema (fibroquant.schema) against what the code really produces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fibroquant import schema

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def record() -> dict:
    from fibroquant import pipeline
    from fibroquant.config import Settings
    from fibroquant.slides import ArraySlide
    from fibroquant.synthetic import SectionParams, make_section

    rgb, _ = make_section(SectionParams(shape=(384, 384), mpp=0.5), rng=1)
    return pipeline.analyze_slide("x.png", Settings(), slide=ArraySlide(rgb, 0.5)).to_record()


def test_every_record_key_is_in_the_schema(record: dict) -> None:
    unknown = set(record) - schema.record_keys()
    assert not unknown, f"record keys the schema does not declare: {sorted(unknown)}"


def test_every_measured_schema_column_is_produced_or_optional(record: dict) -> None:
    produced = set(record) | {"fingerprint"}  # the store adds the fingerprint
    missing = [c.name for c in schema.SLIDES
               if c.source == "record" and not c.optional and c.name not in produced]
    assert not missing, f"schema columns no record carries (mark them optional): {missing}"


def test_names_are_unique_and_carry_units() -> None:
    for table, cols in schema.TABLES.items():
        names = [c.name for c in cols]
        assert len(names) == len(set(names)), table
        for c in cols:
            if c.unit == "mm²":
                assert c.name.endswith("_mm2"), c.name
            if c.name.endswith("_mm2") and "_per_" not in c.name:
                assert c.unit == "mm²", c.name


def test_mice_columns_carried_from_slides_exist_in_mice() -> None:
    mice = set(schema.names("mice"))
    assert {c.name for c in schema.SLIDES if c.to_mice} <= mice


def test_readme_tables_are_generated_from_the_schema() -> None:
    text = README.read_text(encoding="utf-8")
    for table in schema.TABLES:
        assert f"<!-- schema:{table} -->" in text, table
    assert schema.update_readme(text) == text, "run: python -m fibroquant.schema README.md"


def test_round_table_rounds_as_declared() -> None:
    frame = pd.DataFrame({
        "slide": ["a", "b"], "level": [0.0, 2.0], "tissue_area_mm2": [0.8947685000000001, 12345.67],
        "cpa_percent": [5.109056357602746, np.nan], "sheet_note": [1.23456789, 2.0],
        "stain_vectors": ['{"x": 1}', None],
    })
    out = schema.round_table(frame, "slides")
    assert out["level"].tolist() == [0, 2]
    assert str(out["level"].dtype) == "Int64"
    assert out["tissue_area_mm2"].tolist() == [0.8948, 12350.0]
    assert out["cpa_percent"].iloc[0] == 5.11
    assert math.isnan(out["cpa_percent"].iloc[1])
    assert out["sheet_note"].tolist() == [1.23456789, 2.0]  # not in the schema: untouched
    assert out["stain_vectors"].iloc[0] == '{"x": 1}'
    groups = schema.round_table(pd.DataFrame({"welch_p": [0.0123456, 0.000012345]}), "groups")
    assert groups["welch_p"].tolist() == [0.0123, 0.0000123]
    assert frame["tissue_area_mm2"].iloc[0] == 0.8947685000000001  # input unchanged


def test_slides_table_order_follows_the_schema() -> None:
    from fibroquant.run import build_slides_table

    sheet = pd.DataFrame({"slide": ["a.tif"], "mouse": ["M1"], "group": ["ctl"], "sex": ["f"]})
    rec = {"slide": "a.tif", "status": "ok", "stain_fit": "{}", "cpa_percent": 1.0,
           "zz_new": 1, "tissue_area_mm2": 2.0}
    df = build_slides_table(sheet, [rec])
    cols = list(df.columns)
    assert cols[:4] == ["slide", "mouse", "group", "sex"]
    assert cols.index("tissue_area_mm2") < cols.index("cpa_percent") < cols.index("stain_fit")
    assert cols[-1] == "zz_new"


def test_mice_table_carries_trait_columns_once() -> None:
    """Optional schema columns (fibre traits) are not written as empty mouse columns, so the
    traits' own pooling adds them once (no `_x`/`_y` twins)."""
    from fibroquant.cohort import MICE_COLUMNS, aggregate_mice

    assert "fibre_width_median_um" not in MICE_COLUMNS
    slides = pd.DataFrame({"slide": ["a", "b"], "mouse": ["m1", "m1"], "group": ["g", "g"],
                           "status": ["ok", "ok"], "tissue_area_mm2": [1.0, 3.0],
                           "collagen_area_mm2": [0.1, 0.1], "cpa_percent": [10.0, 10 / 3],
                           "fibre_width_median_um": [2.0, 4.0]})
    mice = aggregate_mice(slides)
    assert not [c for c in mice.columns if c.endswith(("_x", "_y"))]
    assert "fibre_width_median_um" in mice.columns
    assert schema.column("mice", "fibre_width_median_um").to_mice


def test_trait_tables_round_each_trait_at_its_precision() -> None:
    """traits.csv: each value at its trait's precision (counts as integers, % at 0.01, other
    traits 4 significant digits); trait_groups.csv: stats at the trait's, p at 3 significant
    digits, g at 2 decimals, n_mice an integer. Missing values stay missing."""
    long = pd.DataFrame({
        "slide": ["a"] * 4, "trait": ["fibre_width_median_um", "portal_vessels",
                                      "thin_fibre_share_percent", "tortuosity"],
        "value": [3.141592653, 7.0, 12.345678, np.nan], "unit": ["µm", "1", "%", "1"],
    })
    out = schema.round_traits(long, "traits")
    assert out["value"].tolist()[:3] == [3.142, 7, 12.35]
    assert isinstance(out["value"].iloc[1], int)
    assert pd.isna(out["value"].iloc[3])
    groups = pd.DataFrame({
        "trait": ["fibre_length_density_mm_per_mm2"], "group": ["MSC"], "n_mice": [4.0],
        "mean": [1234.56789], "sd": [0.000123456], "diff_vs_control": [-45.678912],
        "welch_p": [0.0123456], "holm_welch_p": [0.98765432], "hedges_g": [-1.23456],
    })
    g = schema.round_traits(groups, "trait_groups")
    assert g.loc[0, ["mean", "sd", "diff_vs_control"]].tolist() == [1235.0, 0.0001235, -45.68]
    assert g.loc[0, ["welch_p", "holm_welch_p", "hedges_g"]].tolist() == [0.0123, 0.988, -1.23]
    assert str(g["n_mice"].dtype) == "Int64"
    assert groups.loc[0, "mean"] == 1234.56789  # input unchanged
