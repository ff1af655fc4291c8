"""Tests of fibroquant.cohort: sample-sheet validation and per-mouse aggregation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fibroquant.cohort import (
    MICE_COLUMNS,
    aggregate_mice,
    read_sample_sheet,
    sheet_without_samples,
)
from fibroquant.errors import FibroquantError, SampleSheetError

SLIDES = ["c1_s1.tif", "c1_s2.tif", "m1_s1.tif", "sub/m2_s1.ndpi"]


@pytest.fixture
def slides_dir(tmp_path: Path) -> Path:
    root = tmp_path / "slides"
    for name in SLIDES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return root


@pytest.fixture
def slide_files(slides_dir: Path) -> list[Path]:
    return [slides_dir / s for s in SLIDES]


SLIDES_IN_GOOD = ["c1_s1.tif", "c1_s2.tif", "m1_s1.tif", "sub/m2_s1.ndpi"]

GOOD = """slide,mouse,group,sex
c1_s1.tif,C1,control,F
c1_s2.tif,C1,control,F
m1_s1.tif,M1,MSC,M
sub/m2_s1.ndpi,M2,MSC,M
"""


def mpp_sheet(*mpps: str) -> str:
    lines = ["slide,mouse,group,mpp"]
    for slide, mouse, mpp in zip(SLIDES, ["C1", "C1", "M1", "M2"], mpps, strict=True):
        lines.append(f"{slide},{mouse},g,{mpp}")
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, text: str, name: str = "sheet.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- good sheets


def test_reads_good_sheet(tmp_path: Path, slides_dir: Path, slide_files: list[Path]) -> None:
    sheet = read_sample_sheet(write(tmp_path, GOOD), slides_dir, slide_files)
    assert list(sheet.columns) == ["slide", "mouse", "group", "sex"]
    assert list(sheet["slide"]) == SLIDES
    assert list(sheet["mouse"]) == ["C1", "C1", "M1", "M2"]
    assert pd.api.types.is_string_dtype(sheet["mouse"])
    assert pd.api.types.is_string_dtype(sheet["group"])


def test_whitespace_case_and_paths(tmp_path: Path, slides_dir: Path,
                                   slide_files: list[Path]) -> None:
    text = (" Slide , MOUSE ,Group,dose\n"
            " ./c1_s1.tif , 001 , control ,0\n"
            "c1_s2.tif,001,control,0\n"
            "m1_s1.tif,002,MSC,1.5\n"
            "sub\\m2_s1.ndpi,003,MSC,1.5\n"
            ",,,\n")
    relative = [Path(s) for s in SLIDES]  # slide_files may also be relative to slides_dir
    sheet = read_sample_sheet(write(tmp_path, text), slides_dir, relative)
    assert list(sheet.columns) == ["slide", "mouse", "group", "dose"]
    assert list(sheet["slide"]) == SLIDES
    assert list(sheet["mouse"]) == ["001", "001", "002", "003"]  # ids stay text, zeros kept
    assert list(sheet["group"]) == ["control", "control", "MSC", "MSC"]
    assert sheet["dose"].tolist() == [0, 0, 1.5, 1.5]


def test_tsv_and_xlsx(tmp_path: Path, slides_dir: Path, slide_files: list[Path]) -> None:
    tsv = write(tmp_path, GOOD.replace(",", "\t"), "sheet.tsv")
    a = read_sample_sheet(tsv, slides_dir, slide_files)
    xlsx = tmp_path / "sheet.xlsx"
    frame = pd.read_csv(tmp_path / write(tmp_path, GOOD).name, dtype=str)
    frame["mouse"] = [1, 1, 2, 3]  # numbers in Excel cells
    frame["session"] = pd.to_datetime(["2026-10-01"] * 3 + ["2026-10-08 14:30"], format="ISO8601")
    frame.to_excel(xlsx, index=False)
    b = read_sample_sheet(xlsx, slides_dir, slide_files)
    assert list(a["mouse"]) == ["C1", "C1", "M1", "M2"]
    assert list(b["mouse"]) == ["1", "1", "2", "3"]
    assert list(b["slide"]) == SLIDES
    assert list(b["sex"]) == ["F", "F", "M", "M"]
    # a date reads as the date (what --where session=2026-10-01 names), a time kept
    assert list(b["session"]) == ["2026-10-01"] * 3 + ["2026-10-08 14:30:00"]


def test_mpp_column(tmp_path: Path, slides_dir: Path, slide_files: list[Path]) -> None:
    text = "slide,mouse,group,MPP\n" + "\n".join(
        f"{s},{m},g,{mpp}" for s, m, mpp in zip(SLIDES, "AABC", ["0.5", "", "0.25", "1"],
                                                strict=True))
    sheet = read_sample_sheet(write(tmp_path, text), slides_dir, slide_files)
    assert sheet["mpp"].dtype == float
    assert sheet["mpp"].tolist()[0] == 0.5 and math.isnan(sheet["mpp"].tolist()[1])
    # nm typed as µm is a sheet problem, listed with the others before any work (exit 2)
    bad = text.replace(",0.25", ",250").replace(",1\n", ",-1\n").rstrip("1") + "-1"
    with pytest.raises(SampleSheetError, match=r"2 problems: .*mpp '-1' at row 5.*"
                       r"mpp of slide 'm1_s1\.tif': 250 µm/px from row 4 is implausible"):
        read_sample_sheet(write(tmp_path, bad), slides_dir, slide_files)


def test_sheet_without_samples(slides_dir: Path, slide_files: list[Path]) -> None:
    (slides_dir / "other").mkdir()
    (slides_dir / "other" / "m1_s1.tif").write_bytes(b"x")
    (slides_dir / "x.ome.tif").write_bytes(b"x")
    files = [*slide_files, slides_dir / "other" / "m1_s1.tif", slides_dir / "x.ome.tif"]
    sheet = sheet_without_samples(files, slides_dir)
    assert list(sheet.columns) == ["slide", "mouse", "group"]
    mice = dict(zip(sheet["slide"], sheet["mouse"], strict=True))
    assert mice["c1_s1.tif"] == "c1_s1"
    assert mice["sub/m2_s1.ndpi"] == "m2_s1"
    assert mice["x.ome.tif"] == "x"
    # two files with the same stem in different folders stay two mice
    assert mice["m1_s1.tif"] != mice["other/m1_s1.tif"]
    assert (sheet["group"] == "").all()


def test_sheet_without_samples_same_stem_other_extension(tmp_path: Path) -> None:
    """Without a sheet every slide is its own mouse, also ``a.tif`` beside ``a.png``."""
    names = ["a.tif", "a.png", "sub/a.tif", "b.tif", "other/b.svs"]
    sheet = sheet_without_samples([tmp_path / n for n in names], tmp_path)
    mice = dict(zip(sheet["slide"], sheet["mouse"], strict=True))
    assert mice == {"a.tif": "a.tif", "a.png": "a.png", "sub/a.tif": "sub/a",
                    "b.tif": "b", "other/b.svs": "other/b"}
    assert sheet["mouse"].is_unique
    # a stem that looks like another slide's file name
    names = ["a.tif", "a.png", "a.tif.png"]
    sheet = sheet_without_samples([tmp_path / n for n in names], tmp_path)
    assert dict(zip(sheet["slide"], sheet["mouse"], strict=True)) == {
        "a.tif": "a.tif", "a.png": "a.png", "a.tif.png": "a.tif.png"}


# ----------------------------------------------------------------------------- sheet errors


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", r"sheet\.csv: file is empty"),
        ("\n\n", r"sheet\.csv: .*(empty|no data|missing)"),
        ("slide,mouse,group\n", r"sheet\.csv: no data rows"),
        ('slide,mouse,group\n"c1_s1.tif,C1,control\n', r"sheet\.csv: cannot be parsed"),
        ("slide,animal,cohort\nc1_s1.tif,C1,control\n",
         r"sheet\.csv: missing required column\(s\) mouse, group"),
        (GOOD.replace("m1_s1.tif,M1,MSC", "m1_s1.tif,,MSC"),
         r"sheet\.csv: empty value in column 'mouse' at row 4"),
        (GOOD.replace("c1_s2.tif,C1,control", "c1_s2.tif,C1, "),
         r"sheet\.csv: empty value in column 'group' at row 3"),
        (GOOD + "c1_s1.tif,C9,control,F\n",
         r"sheet\.csv: slide 'c1_s1\.tif' is listed more than once \(rows 2, 6\)"),
        (GOOD + "missing.tif,C9,control,F\n",
         r"sheet\.csv: slide 'missing\.tif' at row 6 does not exist in .*slides"),
        (GOOD + "C1_S1.TIF,C9,control,F\n",
         r"slide 'C1_S1\.TIF' at row 6 does not exist.*did you mean 'c1_s1\.tif'"),
        (GOOD.replace("m1_s1.tif,M1,MSC", "m1_s1.tif,C1,MSC"),
         (r"sheet\.csv: mouse 'C1' is assigned to more than one group \('MSC', 'control'; "
         r"rows 2, 3, 4\)")),
        (mpp_sheet("abc", "0.5", "0.5", "0.5"),
         r"sheet\.csv: mpp 'abc' at row 2 \(slide 'c1_s1\.tif'\) is not a positive number"),
        (mpp_sheet("0.5", "", "-1", "0.5"),
         r"sheet\.csv: mpp '-1' at row 4 \(slide 'm1_s1\.tif'\) is not a positive number"),
        (mpp_sheet("0.5", "0.5", "0", "0.5"), r"mpp '0' at row 4"),
        (mpp_sheet("0.5", "0.5", "0.5", "inf"), r"mpp 'inf' at row 5"),
        (GOOD.replace("sex", "cpa_percent"), r"sheet\.csv: column\(s\) cpa_percent are reserved"),
        (GOOD.replace("sex", "Slide"), r"sheet\.csv: duplicate column header\(s\) 'slide'"),
        (GOOD + "../outside.tif,C9,control,F\n", r"slide '\.\./outside\.tif' at row 6 must be"),
        (GOOD + "m9.tif,M9,MSC,F,oops\n",
         r"sheet\.csv: cannot be parsed \(row 6 has 5 values but the header has 4 columns\)"),
        (GOOD.replace("group,sex", "group,sex,").replace(",F\nc1_s2", ",F,x\nc1_s2"),
         r"sheet\.csv: column 5 has values but no header"),
    ],
)
def test_sheet_errors(tmp_path: Path, slides_dir: Path, slide_files: list[Path], text: str,
                      pattern: str) -> None:
    with pytest.raises(SampleSheetError, match=pattern):
        read_sample_sheet(write(tmp_path, text), slides_dir, slide_files)


def test_missing_file(tmp_path: Path, slides_dir: Path, slide_files: list[Path]) -> None:
    with pytest.raises(SampleSheetError, match=r"nope\.csv: file not found"):
        read_sample_sheet(tmp_path / "nope.csv", slides_dir, slide_files)


def test_binary_and_windows_encodings(tmp_path: Path, slides_dir: Path,
                                      slide_files: list[Path]) -> None:
    binary = tmp_path / "sheet.csv"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(SampleSheetError, match=r"sheet\.csv: cannot be parsed \(binary data"):
        read_sample_sheet(binary, slides_dir, slide_files)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(GOOD.replace("control", "contrôle").encode("cp1252"))
    sheet = read_sample_sheet(latin, slides_dir, slide_files)
    assert sheet["group"].iloc[0] == "contrôle"
    trailing = write(tmp_path, GOOD.replace("\n", ",,\r\n"))  # Excel-style stray separators
    assert list(read_sample_sheet(trailing, slides_dir, slide_files).columns) == [
        "slide", "mouse", "group", "sex"]


def test_corrupt_xlsx(tmp_path: Path, slides_dir: Path, slide_files: list[Path]) -> None:
    bad = tmp_path / "sheet.xlsx"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(SampleSheetError, match=r"sheet\.xlsx: cannot be parsed"):
        read_sample_sheet(bad, slides_dir, slide_files)


def test_unlisted_slides_named(tmp_path: Path, slides_dir: Path, slide_files: list[Path]) -> None:
    extra = [slides_dir / f"extra{i}.tif" for i in range(7)]
    for p in extra:
        p.write_bytes(b"x")
    with pytest.raises(
        SampleSheetError,
        match=(r"sheet\.csv: 7 slide file\(s\) in .* are not in the sheet: 'extra0\.tif', "
               r"'extra1\.tif', 'extra2\.tif', 'extra3\.tif', 'extra4\.tif' and 2 more "
               r"\(--allow-unlisted measures them .*\)$"),
    ):
        read_sample_sheet(write(tmp_path, GOOD), slides_dir, [*slide_files, *extra])
    sheet = read_sample_sheet(write(tmp_path, GOOD), slides_dir, [*slide_files, *extra],
                              allow_unlisted=True)
    assert sheet.attrs["unlisted"] == [f"extra{i}.tif" for i in range(7)]
    assert read_sample_sheet(write(tmp_path, GOOD), slides_dir,
                             slide_files).attrs["unlisted"] == []


def test_missing_slides_kept_with_allow_missing(tmp_path: Path, slides_dir: Path,
                                                slide_files: list[Path]) -> None:
    """A sheet planned ahead of the scanner: rows whose file has not landed are an error that
    names the option, or, with it, rows of the frame named in ``attrs["missing"]`` (hinting at a
    file whose name differs only in case: a study's names differ by a digit, so a near name is
    no sign of a typo there); a listed file that is not a slide stays an error."""
    text = GOOD + "m3_s1.tif,M3,MSC,F\nC1_S2.TIF,C1,control,F\n"
    with pytest.raises(SampleSheetError, match=r"'m3_s1\.tif' at row 6 does not exist .*"
                       r"\(--allow-missing keeps it"):
        read_sample_sheet(write(tmp_path, text), slides_dir, slide_files)
    sheet = read_sample_sheet(write(tmp_path, text), slides_dir, slide_files, allow_missing=True)
    assert list(sheet["slide"]) == [*SLIDES_IN_GOOD, "m3_s1.tif", "C1_S2.TIF"]
    assert sheet.attrs["missing"] == {"m3_s1.tif": "",
                                      "C1_S2.TIF": "; did you mean 'c1_s2.tif'?"}
    assert read_sample_sheet(write(tmp_path, GOOD), slides_dir, slide_files,
                             allow_missing=True).attrs["missing"] == {}
    # a renamed scan (or a typo): the near file the sheet does not list is named
    renamed = slides_dir / "m1_s1b.tif"
    renamed.write_bytes(b"x")
    sheet = read_sample_sheet(write(tmp_path, text), slides_dir, [*slide_files, renamed],
                              allow_missing=True, allow_unlisted=True)
    assert sheet.attrs["missing"]["m3_s1.tif"] == "; did you mean 'm1_s1b.tif'?"
    renamed.unlink()
    (slides_dir / "notes.txt").write_text("hello")
    with pytest.raises(SampleSheetError, match=r"'notes\.txt' at row 6 exists .* not a "):
        read_sample_sheet(write(tmp_path, GOOD + "notes.txt,M9,MSC,F\n"), slides_dir,
                          slide_files, allow_missing=True)


def test_listed_file_not_a_slide(tmp_path: Path, slides_dir: Path,
                                 slide_files: list[Path]) -> None:
    (slides_dir / "notes.txt").write_text("hello")
    with pytest.raises(SampleSheetError, match=r"'notes\.txt' at row 6 exists .* not a recognised"):
        read_sample_sheet(write(tmp_path, GOOD + "notes.txt,C9,control,F\n"), slides_dir,
                          slide_files)


def test_errors_are_one_line_and_project_errors(tmp_path: Path, slides_dir: Path,
                                                slide_files: list[Path]) -> None:
    with pytest.raises(SampleSheetError) as info:
        read_sample_sheet(write(tmp_path, GOOD + "missing.tif,C9,control,F\n"), slides_dir,
                          slide_files)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, FibroquantError) and isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------- aggregation


def slides_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [
            # mouse C1: 1 mm² at 10 % and 3 mm² at 2 % → area-weighted 4 %, mean of slides 6 %
            {"slide": "c1_s1.tif", "mouse": "C1", "group": "control", "status": "ok",
             "tissue_area_mm2": 1.0, "collagen_area_mm2": 0.10, "cpa_percent": 10.0,
             "sex": "F", "session": "s1", "mpp": 0.5},
            {"slide": "c1_s2.tif", "mouse": "C1", "group": "control", "status": "ok",
             "tissue_area_mm2": 3.0, "collagen_area_mm2": 0.06, "cpa_percent": 2.0,
             "sex": "F", "session": "s2", "mpp": 0.5},
            {"slide": "c1_s3.tif", "mouse": "C1", "group": "control", "status": "failed",
             "tissue_area_mm2": np.nan, "collagen_area_mm2": np.nan, "cpa_percent": np.nan,
             "sex": "F", "session": "s2", "mpp": 0.5},
            {"slide": "m10.tif", "mouse": "M10", "group": "MSC", "status": "ok",
             "tissue_area_mm2": 2.0, "collagen_area_mm2": 0.1, "cpa_percent": 5.0,
             "sex": "M", "session": "s1", "mpp": 0.5},
            {"slide": "m2.tif", "mouse": "M2", "group": "MSC", "status": "failed",
             "tissue_area_mm2": np.nan, "collagen_area_mm2": np.nan, "cpa_percent": np.nan,
             "sex": "M", "session": "s1", "mpp": 0.5},
        ]
    )


def test_aggregate_area_weighted_vs_mean_of_slides() -> None:
    mice = aggregate_mice(slides_frame())
    assert list(mice.columns) == [*MICE_COLUMNS, "sex"]  # session varies within C1; mpp skipped
    assert list(mice["mouse"]) == ["C1", "M2", "M10"]  # by group then mouse (M2 before M10)
    c1 = mice.iloc[0]
    assert c1["n_slides"] == 2 and c1["n_failed_slides"] == 1
    assert c1["tissue_area_mm2"] == pytest.approx(4.0)
    assert c1["collagen_area_mm2"] == pytest.approx(0.16)
    assert c1["cpa_percent"] == pytest.approx(4.0)  # 0.16 / 4 × 100, not (10 + 2) / 2
    assert c1["cpa_mean_of_slides_percent"] == pytest.approx(6.0)
    assert c1["cpa_sd_of_slides"] == pytest.approx(np.std([10.0, 2.0], ddof=1))
    assert c1["sex"] == "F"
    m10 = mice.set_index("mouse").loc["M10"]
    assert m10["n_slides"] == 1 and math.isnan(m10["cpa_sd_of_slides"])
    assert m10["cpa_percent"] == pytest.approx(5.0)


def test_aggregate_all_failed_mouse_kept() -> None:
    mice = aggregate_mice(slides_frame()).set_index("mouse")
    m2 = mice.loc["M2"]
    assert m2["n_slides"] == 0 and m2["n_failed_slides"] == 1
    assert math.isnan(m2["cpa_percent"]) and math.isnan(m2["tissue_area_mm2"])
    assert m2["group"] == "MSC" and m2["sex"] == "M"


def test_aggregate_explicit_extra_columns() -> None:
    frame = slides_frame()
    frame.loc[frame["mouse"] == "C1", "session"] = "s1"
    mice = aggregate_mice(frame, extra_columns=["session", "mpp"])
    assert list(mice.columns) == [*MICE_COLUMNS, "session", "mpp"]
    assert (mice["session"] == "s1").all()
    with pytest.raises(ValueError, match="not in the slides table"):
        aggregate_mice(frame, extra_columns=["dose"])


def test_aggregate_input_errors() -> None:
    with pytest.raises(ValueError, match="lacks column"):
        aggregate_mice(slides_frame().drop(columns="status"))
    bad = slides_frame()
    bad.loc[0, "group"] = "MSC"
    with pytest.raises(ValueError, match="mouse 'C1' appears in more than one group"):
        aggregate_mice(bad)


def test_aggregate_without_groups(slides_dir: Path, slide_files: list[Path]) -> None:
    sheet = sheet_without_samples(slide_files, slides_dir)
    frame = sheet.assign(status="ok", tissue_area_mm2=2.0, collagen_area_mm2=0.1, cpa_percent=5.0)
    mice = aggregate_mice(frame)
    assert len(mice) == len(SLIDES)
    assert (mice["group"] == "").all()
    assert (mice["cpa_percent"] == 5.0).all()


def test_record_columns_name_every_column_of_a_measured_record() -> None:
    """RECORD_COLUMNS (the names a sheet may not use) stays in step with the pipeline."""
    from fibroquant import pipeline
    from fibroquant.cohort import RECORD_COLUMNS, RESERVED_COLUMNS
    from fibroquant.config import Settings
    from fibroquant.slides import ArraySlide
    from fibroquant.synthetic import SectionParams, make_section

    rgb, _ = make_section(SectionParams(shape=(384, 384), mpp=0.5), rng=1)
    record = pipeline.analyze_slide("x.png", Settings(), slide=ArraySlide(rgb, 0.5)).to_record()
    assert set(record) <= RECORD_COLUMNS
    assert "mpp" not in RESERVED_COLUMNS and "stain" in RESERVED_COLUMNS


def test_every_sheet_problem_is_reported_at_once(tmp_path: Path, slides_dir: Path,
                                                 slide_files: list[Path]) -> None:
    """Issue 23: a sheet with four mistakes costs one run, not four."""
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("slide,mouse,group,mpp\n"
                     "c1_s1.tif,C1,control,0.5\n"
                     "c1_s2.tif,C1,MSC,0.5\n"          # C1 in two groups
                     "m1_s1.tif,M1,,0.5\n"              # empty group
                     "sub/m2_s1.ndpi,M2,MSC,abc\n"      # bad mpp
                     "sub/m3_s1.ndpi,M3,MSC,0.5\n")     # no such file
    with pytest.raises(SampleSheetError) as info:
        read_sample_sheet(sheet, slides_dir, slide_files)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("sample sheet sheet.csv: 4 problems: ")
    for part in ("empty value in column 'group' at row 4",
                 "slide 'sub/m3_s1.ndpi' at row 6 does not exist",
                 "did you mean 'sub/m2_s1.ndpi'?",
                 "mouse 'C1' is assigned to more than one group ('MSC', 'control'; rows 2, 3)",
                 "mpp 'abc' at row 5"):
        assert part in text, part
