"""`fibroquant compare` and `fibroquant stains`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from typer.testing import CliRunner

from fibroquant.cli import app
from fibroquant.config import load_settings

runner = CliRunner()


@pytest.fixture(scope="module")
def analyzed(study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    res = runner.invoke(app, ["analyze", str(study), "--out", str(out), "--samples",
                              str(study / "samples.csv"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_compare_reproduces_groups_without_reading_slides(analyzed, tmp_path):
    res = runner.invoke(app, ["compare", str(analyzed), "--save", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(tmp_path / "c" / "groups.csv").set_index("group")
    stored = pd.read_csv(analyzed / "groups.csv").set_index("group")
    assert got.loc["MSC", "welch_p"] == stored.loc["MSC", "welch_p"]  # both rounded alike
    assert "Welch p" in res.output
    assert (tmp_path / "c" / "cpa_groups.png").stat().st_size > 0
    record = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert record["by"] == "group"
    assert record["where"] == []
    # from the store at full precision: the run's own statistics to the last digit
    js = runner.invoke(app, ["compare", str(analyzed), "--json"])
    full = pd.read_excel(analyzed / "results.xlsx", sheet_name="groups").set_index("group")
    assert pd.DataFrame(json.loads(js.output)).set_index("group").loc["MSC", "welch_p"] \
        == pytest.approx(full.loc["MSC", "welch_p"], rel=1e-12)


@pytest.mark.slow
def test_compare_keeps_wrong_stain_slides_only_when_asked(analyzed, tmp_path):
    """As analyze: a wrong-stain slide is left out of its mouse unless --keep-wrong-stain."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(analyzed, out)
    slides = pd.read_csv(out / "slides.csv")
    whole = runner.invoke(app, ["compare", str(out), "--json"])
    first = slides.index[slides["status"] == "ok"][0]
    group = slides.loc[first, "group"]
    alone = (slides["mouse"] == slides.loc[first, "mouse"]).sum() == 1
    slides.loc[first, "status"] = "wrong-stain"
    slides.to_csv(out / "slides.csv", index=False)
    table = {}
    for flag in ((), ("--keep-wrong-stain",)):
        res = runner.invoke(app, ["compare", str(out), "--json", *flag])
        assert res.exit_code == 0, res.output
        table[flag] = pd.DataFrame(json.loads(res.output)).set_index("group")
    kept = table[("--keep-wrong-stain",)]
    assert kept.equals(pd.DataFrame(json.loads(whole.output)).set_index("group"))
    left_out = table[()]
    assert left_out.loc[group, "n_mice"] == kept.loc[group, "n_mice"] - alone
    assert left_out.loc[group, "cpa_mean_percent"] != kept.loc[group, "cpa_mean_percent"]
    # a slides table without its status column: the same one-line error with the flag
    slides.drop(columns="status").to_csv(out / "slides.csv", index=False)
    for flag in ((), ("--keep-wrong-stain",)):
        res = runner.invoke(app, ["compare", str(out), *flag])
        assert res.exit_code == 2 and "lacks column(s) status" in res.output, res.output


@pytest.mark.slow
def test_compare_save_never_writes_into_a_run(analyzed):
    """Issue 23: --save OUT_DIR overwrote the study's own groups.csv with a subset."""
    before = (analyzed / "groups.csv").read_bytes()
    res = runner.invoke(app, ["compare", str(analyzed), "--where", "session=A",
                              "--save", str(analyzed)])
    assert res.exit_code == 2
    assert "holds an analyze run's tables" in res.output
    assert (analyzed / "groups.csv").read_bytes() == before


@pytest.mark.slow
def test_compare_by_another_column_and_subset(analyzed):
    res = runner.invoke(app, ["compare", str(analyzed), "--by", "dose", "--control", "0",
                              "--json"])
    assert res.exit_code == 0, res.output
    table = pd.DataFrame(json.loads(res.output))
    assert sorted(table["group"].astype(str)) == ["0", "1", "2"]
    mice = pd.read_excel(analyzed / "results.xlsx", sheet_name="mice")  # full precision
    ctrl = mice.loc[mice["group"] == "control", "cpa_percent"]
    dose2 = mice.loc[mice["mouse"].isin(["t2", "t3"]), "cpa_percent"]
    row = table.set_index(table["group"].astype(str)).loc["2"]
    assert row["welch_p"] == pytest.approx(sps.ttest_ind(dose2, ctrl, equal_var=False).pvalue)

    sub = runner.invoke(app, ["compare", str(analyzed), "--where", "session=A", "--json"])
    assert sub.exit_code == 0, sub.output
    n = pd.DataFrame(json.loads(sub.output)).set_index("group")["n_mice"]
    assert n["control"] == 3 and n["MSC"] == 3
    # a number matches as a number: dose 0 is 0, 0.0 or 0.00
    for zero in ("0", "0.0", "0.00"):
        res = runner.invoke(app, ["compare", str(analyzed), "--where", f"dose={zero}",
                                  "--json"])
        assert res.exit_code == 0, res.output
        assert list(pd.DataFrame(json.loads(res.output))["group"]) == ["control"]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "match"), [
    (["--by", "session"], "differs between slides of mouse c1"),
    (["--by", "nope"], "no such column"),
    (["--where", "session"], "expected COLUMN=VALUE"),
    (["--where", "session=Z"], "no slides left after --where session=Z (its values: 'A', 'B')"),
])
def test_compare_errors(analyzed, args, match):
    res = runner.invoke(app, ["compare", str(analyzed), *args])
    assert res.exit_code == 2
    assert match in " ".join(res.output.split())


@pytest.mark.slow
def test_stains_prints_vectors_and_writes_study_config(study, tmp_path):
    cfg = tmp_path / "study.yaml"
    res = runner.invoke(app, ["stains", str(study), "--write", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "sirius-red" in res.output and "from preset" in res.output
    data = yaml.safe_load(cfg.read_text())
    assert data["stains"]["estimate"] == "preset"
    settings = load_settings(cfg)  # the written file is a valid config
    assert set(settings.stains.vectors) == {"sirius-red", "picric-acid", "iron-haematoxylin"}


@pytest.mark.slow
def test_stains_leaves_wrong_stain_slides_out_of_the_study_vectors(study, tmp_path):
    """A Masson slide among Sirius red slides is flagged and not part of the median."""
    from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

    d = tmp_path / "mixed"
    d.mkdir()
    for name in ("c1_s1.tif", "t1_s1.tif", "c2_s1.tif"):
        (d / name).write_bytes((study / name).read_bytes())
    rgb, _ = make_section(SectionParams(stain="masson", shape=(384, 384), mpp=1.5), rng=3)
    write_pyramid_tiff(d / "masson.tif", rgb, 1.5, min_level_px=128)
    cfg = tmp_path / "study.yaml"
    res = runner.invoke(app, ["stains", str(d), "--write", str(cfg)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "left out of the study vectors (wrong stain?)" in text
    assert "median of 3 slide estimates" in cfg.read_text()
