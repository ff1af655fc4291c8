"""Sample sheets and per-mouse aggregation.

The sample sheet ties every slide file to a mouse and a group. It is validated completely before
any slide is analysed, so a typo costs seconds, not an overnight run. After measurement,
:func:`aggregate_mice` turns the per-slide table (``slides.csv``) into one row per mouse
(``mice.csv``): the mouse, not the section, is the experimental unit.

Row numbers in error messages count as a spreadsheet does: the header is row 1, the first data
row is row 2.
"""

from __future__ import annotations

import csv
import datetime
import difflib
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from fibroquant import schema
from fibroquant.errors import SampleSheetError, name_list
from fibroquant.slides import mpp_problem
from fibroquant.traits import TRAIT_COLUMNS

__all__ = ["MICE_COLUMNS", "RECORD_COLUMNS", "RESERVED_COLUMNS", "aggregate_mice",
           "read_sample_sheet", "sheet_without_samples"]

logger = logging.getLogger(__name__)

#: Required sample-sheet columns (header names are matched case-insensitively).
REQUIRED_COLUMNS: tuple[str, ...] = ("slide", "mouse", "group")

#: Columns of ``mice.csv`` written by :func:`aggregate_mice`, before any carried sheet columns.
MICE_COLUMNS: tuple[str, ...] = tuple(c.name for c in schema.MICE if not c.optional)

#: Keys of a slide's stored record (``fibroquant.pipeline`` measures them; the store adds
#: the fingerprint and settings hash). ``mpp`` is both: a sheet may set it (it is then what was
#: measured with). tests/test_schema.py checks this list against a real record.
RECORD_COLUMNS: frozenset[str] = schema.record_keys()

#: Names a sheet may not use for extra columns: they would collide with measured columns of
#: ``slides.csv`` / ``mice.csv`` when the sheet is joined to the results.
RESERVED_COLUMNS: frozenset[str] = frozenset(
    {*RECORD_COLUMNS, *MICE_COLUMNS[2:]} - {"mpp"}
)

#: Columns of ``slides.csv`` that are per-slide measurements or bookkeeping, never carried into
#: ``mice.csv`` when the carried columns are inferred (see :func:`aggregate_mice`).
_SLIDE_ONLY_COLUMNS: frozenset[str] = frozenset(
    {"slide", "mouse", "group", "status", "error", "mpp", "analysis_mpp", "fingerprint",
     "settings_hash", "path", "width_px", "height_px", "seconds", "version"}
)
_MEASUREMENT_SUFFIXES: tuple[str, ...] = ("_mm2", "_um2", "_percent", "_px", "_um", "_od")

_SUFFIXES_TSV = {".tsv", ".tab"}
_SUFFIXES_XLSX = {".xlsx", ".xlsm"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``M2`` before ``M10`` (digits compared as numbers)."""
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(p)) if p.isdigit() else (1, p.casefold()) for p in parts if p != "")


def _relative_slide(path: Path, slides_dir: Path) -> str:
    """Return ``path`` as a POSIX path relative to ``slides_dir``.

    Accepts paths under ``slides_dir`` (lexically or after resolving) and paths that are already
    relative to it.
    """
    try:
        return path.relative_to(slides_dir).as_posix()
    except ValueError:
        pass
    if path.is_absolute():
        try:
            return path.resolve().relative_to(slides_dir.resolve()).as_posix()
        except ValueError:
            return path.as_posix()
    return PurePosixPath(path.as_posix()).as_posix()


def _normalise_slide_name(raw: str) -> str:
    """Normalise a sheet's ``slide`` entry to a clean POSIX relative path.

    Windows separators are accepted (``sub\\a.tif`` → ``sub/a.tif``) and ``./`` prefixes dropped.
    """
    text = raw.strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    return "/".join(parts)


class _SheetParseError(Exception):
    """Internal: a text sheet is not valid delimited text (message is user-facing)."""


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise _SheetParseError("binary data; expected a CSV/TSV text file or .xlsx")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:  # Excel on Windows saves "CSV" in the ANSI code page
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        raise _SheetParseError("not UTF-8 or Windows-1252 text") from None
    logger.info("sample sheet %s: not UTF-8, read as Windows-1252", path.name)
    return text


def _read_delimited(path: Path, sep: str | None) -> pd.DataFrame:
    """Parse a delimited text sheet strictly: ragged rows and broken quotes are errors."""
    text = _decode(path)
    if sep is None:
        first = text.split("\n", 1)[0]
        # Excel in many locales writes ';'-separated "CSV": accept it when ',' is absent.
        sep = ";" if ("," not in first and ";" in first) else ","
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True))
    except csv.Error as exc:
        raise _SheetParseError(f"{exc}") from None
    if not records or all(not "".join(r).strip() for r in records):
        raise pd.errors.EmptyDataError
    header, body = records[0], records[1:]
    if not "".join(header).strip():
        raise _SheetParseError("the first row (the header) is empty")
    width = len(header)
    rows: list[list[str]] = []
    for number, record in enumerate(body, start=2):
        if len(record) > width:
            if "".join(record[width:]).strip():
                raise _SheetParseError(
                    f"row {number} has {len(record)} values but the header has {width} columns"
                )
            record = record[:width]
        rows.append(record + [""] * (width - len(record)))
    return pd.DataFrame(rows, columns=pd.Index(header), dtype=object)


def _read_table(path: Path) -> pd.DataFrame:
    """Read the sheet as text cells (no NA guessing: ``NA`` is a name, ``001`` stays ``001``)."""
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES_XLSX:
        return pd.read_excel(
            path, sheet_name=0, dtype=object, keep_default_na=False, na_filter=False,
            engine="openpyxl",
        )
    return _read_delimited(path, "\t" if suffix in _SUFFIXES_TSV else None)


def _cell_text(value: object) -> str:
    """A sheet cell as stripped text; missing cells (None/NaN from Excel) become ``""``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # Excel stores 7 as 7.0
    if isinstance(value, datetime.datetime) and value.time() == datetime.time(0):
        return value.date().isoformat()  # an Excel date: 2026-10-01, not "... 00:00:00"
    return str(value).strip()


# --------------------------------------------------------------------------------------------
# sample sheets
# --------------------------------------------------------------------------------------------


def read_sample_sheet(path: Path, slides_dir: Path, slide_files: Sequence[Path], *,
                      allow_unlisted: bool = False, allow_missing: bool = False) -> pd.DataFrame:
    """Read and validate a sample sheet against the slides folder.

    Parameters
    ----------
    path : Path
        The sheet: ``.csv`` (comma-separated; ``;`` accepted when the header has no comma),
        ``.tsv``/``.tab`` (tab-separated) or ``.xlsx`` (first worksheet, read with openpyxl).
        Text files are read as UTF-8 (a byte-order mark is allowed).
    slides_dir : Path
        The folder the ``slide`` column is relative to.
    slide_files : sequence of Path
        The slide files discovered in ``slides_dir`` (absolute, under ``slides_dir``, or relative
        to it). Every one of them must appear in the sheet, unless ``allow_unlisted``.
    allow_unlisted : bool
        Files not in the sheet are no problem: they are named in ``frame.attrs["unlisted"]``
        (scans that arrived before the sheet lists them, in a scheduled run).
    allow_missing : bool
        Rows whose slide is not in ``slides_dir`` (no such file) are no problem: they stay in
        the frame and ``frame.attrs["missing"]`` maps each to a hint (``"; did you mean
        'x'?"`` for a file whose name differs only in case, or a near name the sheet does not
        list; else ``""``): slides the sheet plans that are not scanned yet.

    Returns
    -------
    pandas.DataFrame
        One row per slide with columns ``slide`` (POSIX path relative to ``slides_dir``),
        ``mouse`` and ``group`` (dtype ``str``), then the sheet's extra columns in their original
        order. Extra columns whose non-empty values are all numbers become numeric (empty cells
        NaN); others stay text (empty cells NaN). An ``mpp`` column (µm per pixel) becomes float,
        NaN where empty (the slide's own metadata is then used).

    Raises
    ------
    SampleSheetError
        If the file is missing, empty or unparseable; a required column is missing or has an
        empty value; a slide is listed twice; a listed slide does not exist in ``slides_dir`` or
        is not one of ``slide_files``; a file of ``slide_files`` is not listed; a mouse is
        assigned to two groups; ``mpp`` is not a positive number; or an extra column uses a name
        reserved for measured columns.

    Notes
    -----
    Header names and all values are stripped of surrounding whitespace; the required headers
    are matched case-insensitively. Rows that are completely empty are ignored. Values are read
    literally: ``NA`` or ``None`` in the ``mouse`` column is a mouse called ``NA``.
    """
    name = path.name
    if not path.is_file():
        raise SampleSheetError(f"sample sheet {path}: file not found")
    if path.stat().st_size == 0:
        raise SampleSheetError(f"sample sheet {name}: file is empty")
    try:
        raw = _read_table(path)
    except pd.errors.EmptyDataError:
        raise SampleSheetError(f"sample sheet {name}: file is empty (no header row)") from None
    except _SheetParseError as exc:
        raise SampleSheetError(f"sample sheet {name}: cannot be parsed ({exc})") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SampleSheetError(f"sample sheet {name}: cannot be parsed ({detail})") from None
    except Exception as exc:  # noqa: BLE001 - openpyxl/zipfile raise a zoo of types on corrupt workbooks
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise SampleSheetError(
            f"sample sheet {name}: cannot be parsed ({type(exc).__name__}: {detail})"
        ) from None

    # -- headers ---------------------------------------------------------------------------
    frame = raw.map(_cell_text)
    headers = [_cell_text(c) for c in raw.columns]
    keep: list[int] = []
    for pos, header in enumerate(headers):
        if header == "" or re.fullmatch(r"Unnamed: \d+", header):
            # Header-less columns (stray trailing separators) are ignored when empty.
            if (frame.iloc[:, pos] != "").any():
                raise SampleSheetError(
                    f"sample sheet {name}: column {pos + 1} has values but no header"
                )
            continue
        keep.append(pos)
    frame = frame.iloc[:, keep]
    canonical = [
        h.lower() if h.lower() in (*REQUIRED_COLUMNS, "mpp") else h
        for h in (headers[pos] for pos in keep)
    ]
    seen: dict[str, int] = {}
    for h in canonical:
        seen[h.lower()] = seen.get(h.lower(), 0) + 1
    duplicated = sorted(k for k, v in seen.items() if v > 1)
    if duplicated:
        raise SampleSheetError(
            f"sample sheet {name}: duplicate column header(s) {name_list(duplicated, 5)}"
        )
    frame.columns = pd.Index(canonical)
    absent = [c for c in REQUIRED_COLUMNS if c not in canonical]
    if absent:
        raise SampleSheetError(
            f"sample sheet {name}: missing required column(s) {', '.join(absent)} "
            f"(found: {', '.join(canonical) or 'none'}; "
            f"required: {', '.join(REQUIRED_COLUMNS)})"
        )
    reserved = [h for h in canonical if h in RESERVED_COLUMNS]
    if reserved:
        hint = (" (the stain is set for the whole run: --stain or the config; analyse each "
                "stain into its own output folder)") if "stain" in reserved else ""
        raise SampleSheetError(
            f"sample sheet {name}: column(s) {', '.join(reserved)} are reserved for measured "
            f"values; rename them{hint}"
        )

    # -- values ----------------------------------------------------------------------------
    frame.index = pd.RangeIndex(2, 2 + len(frame))  # spreadsheet row numbers
    frame = frame.loc[~(frame == "").all(axis=1)]
    if frame.empty:
        raise SampleSheetError(f"sample sheet {name}: no data rows below the header")

    # every problem below is collected, so one run of the command shows them all
    problems: list[str] = []
    for col in REQUIRED_COLUMNS:
        empty_rows = frame.index[frame[col] == ""].tolist()
        if empty_rows:
            problems.append(f"empty value in column '{col}' at row "
                            f"{name_list(empty_rows, 5, quote=False)}")

    frame["slide"] = frame["slide"].map(_normalise_slide_name)
    bad_paths = {
        row: s for row, s in frame["slide"].items()
        if s.startswith("/") or ".." in s.split("/") or re.match(r"^[A-Za-z]:", s)
    }
    problems += [f"slide '{s}' at row {row} must be a path relative to {slides_dir} (no "
                 "absolute paths or '..')" for row, s in bad_paths.items()]

    named = frame["slide"] != ""
    dup_mask = frame["slide"].duplicated(keep=False) & named
    for slide in dict.fromkeys(frame.loc[dup_mask, "slide"]):
        rows = frame.index[frame["slide"] == slide].tolist()
        problems.append(f"slide '{slide}' is listed more than once "
                        f"(rows {', '.join(map(str, rows))})")

    # -- sheet vs folder -------------------------------------------------------------------
    discovered = sorted({_relative_slide(Path(p), slides_dir) for p in slide_files})
    discovered_set = set(discovered)
    by_folded: dict[str, str] = {d.casefold(): d for d in discovered}
    missing: dict[str, str] = {}
    listed = set(frame["slide"])
    for row, slide in frame["slide"].items():
        if slide in discovered_set or row in bad_paths or not slide:
            continue
        hint = ""
        if slide.casefold() in by_folded:
            hint = f"; did you mean '{by_folded[slide.casefold()]}'?"
        else:
            close = difflib.get_close_matches(slide, discovered, n=1, cutoff=0.8)
            hint = f"; did you mean '{close[0]}'?" if close else ""
        if (slides_dir / slide).is_file():
            problems.append(f"slide '{slide}' at row {row} exists in {slides_dir} but is not "
                            f"a recognised slide file{hint}")
        elif allow_missing:  # a planned scan, or a typo: hint at a name differing in case
            # or at a near file the sheet does not list (a study's listed names differ by a
            # digit: each would be a near name of the next scan)
            near = difflib.get_close_matches(slide, [d for d in discovered if d not in listed],
                                             n=1, cutoff=0.8)
            missing[slide] = (hint if slide.casefold() in by_folded
                              else f"; did you mean '{near[0]}'?" if near else "")
        else:
            problems.append(f"slide '{slide}' at row {row} does not exist in "
                            f"{slides_dir}{hint} (--allow-missing keeps it in the tables as "
                            "not measured until it is scanned)")
    unlisted = [d for d in discovered if d not in listed]
    if unlisted and not allow_unlisted:
        problems.append(f"{len(unlisted)} slide file(s) in {slides_dir} are not in the sheet: "
                        f"{name_list(unlisted, 5)} (--allow-unlisted measures them and leaves "
                        "them out of the tables until the sheet lists them)")

    # -- mouse ↔ group ---------------------------------------------------------------------
    assigned = frame[(frame["mouse"] != "") & (frame["group"] != "")]
    groups_per_mouse = assigned.groupby("mouse", sort=False)["group"].unique()
    conflicting = groups_per_mouse[groups_per_mouse.map(len) > 1]
    for mouse, groups in conflicting.items():
        rows = frame.index[frame["mouse"] == mouse].tolist()
        problems.append(
            f"mouse '{mouse}' is assigned to more than one group "
            f"({', '.join(repr(str(g)) for g in sorted(map(str, groups)))}; rows "
            f"{', '.join(map(str, rows))})")

    # -- optional and extra columns --------------------------------------------------------
    extra = [c for c in frame.columns if c not in REQUIRED_COLUMNS]
    for col in extra:
        values = frame[col]
        if col == "mpp":
            numeric = pd.to_numeric(values.where(values != ""), errors="coerce")
            bad = (values != "") & ~(numeric.gt(0) & np.isfinite(numeric))
            problems += [f"mpp '{values[row]}' at row {row} (slide '{frame.at[row, 'slide']!s}') "
                         "is not a positive number of µm per pixel"
                         for row in bad.index[bad.to_numpy()]]
            for row in numeric.index[(numeric.gt(0) & np.isfinite(numeric)).to_numpy()]:
                why = mpp_problem(float(numeric[row]), f"row {row}")
                if why:  # (a value in nm, or mm, typed as µm)
                    problems.append(f"mpp of slide '{frame.at[row, 'slide']!s}': {why}")
            frame[col] = numeric.astype(float)
            continue
        present = values != ""
        numeric = pd.to_numeric(values.where(present), errors="coerce")
        if present.any() and numeric[present].notna().all():
            frame[col] = numeric
        else:
            frame[col] = values.where(present, np.nan)
    if problems:
        head = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise SampleSheetError(f"sample sheet {name}: {head}" + "; ".join(problems))

    frame = frame[[*REQUIRED_COLUMNS, *extra]].reset_index(drop=True)
    frame["mouse"] = frame["mouse"].astype(str)
    frame["group"] = frame["group"].astype(str)
    frame["slide"] = frame["slide"].astype(str)
    frame.attrs["unlisted"] = unlisted
    frame.attrs["missing"] = missing
    logger.info(
        "sample sheet %s: %d slides, %d mice, %d groups",
        name, len(frame), frame["mouse"].nunique(), frame["group"].nunique(),
    )
    return frame


def _slide_stem(relative: str) -> str:
    """File name without its extension; ``.ome.tif(f)`` counts as one extension."""
    base = PurePosixPath(relative).name
    lowered = base.lower()
    for double in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if lowered.endswith(double):
            return base[: -len(double)]
    return PurePosixPath(base).stem


def sheet_without_samples(slide_files: Iterable[Path], slides_dir: Path) -> pd.DataFrame:
    """Build the sheet used when none is given: every slide is its own mouse, no groups.

    Parameters
    ----------
    slide_files : iterable of Path
        Slide files found in ``slides_dir`` (absolute, under it, or relative to it).
    slides_dir : Path
        The slides folder.

    Returns
    -------
    pandas.DataFrame
        Columns ``slide`` (POSIX path relative to ``slides_dir``), ``mouse`` (the file's stem)
        and ``group`` (``""``), sorted by slide. When two files in different sub-folders share
        a stem, their mouse is the relative path without extension, so they stay apart; files
        that still share it (``a.tif`` and ``a.png``) keep their extension.
    """
    slides = sorted({_relative_slide(Path(p), slides_dir) for p in slide_files}, key=_natural_key)
    stems = [_slide_stem(s) for s in slides]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    mice = [
        stem if counts[stem] == 1 else str(PurePosixPath(s).parent / stem)
        for s, stem in zip(slides, stems, strict=True)
    ]
    while True:  # ids still shared (a.tif, a.png) become the slide path, which is unique
        taken: dict[str, int] = {}
        for mouse in mice:
            taken[mouse] = taken.get(mouse, 0) + 1
        clash = [i for i, m in enumerate(mice) if taken[m] > 1 and m != slides[i]]
        if not clash:
            break
        for i in clash:
            mice[i] = slides[i]
    return pd.DataFrame(
        {
            "slide": pd.Series(slides, dtype=str),
            "mouse": pd.Series(mice, dtype=str),
            "group": pd.Series([""] * len(slides), dtype=str),
        }
    )


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------


def _is_inferred_extra(column: str) -> bool:
    if column in _SLIDE_ONLY_COLUMNS or column in MICE_COLUMNS:
        return False
    return not column.endswith(_MEASUREMENT_SUFFIXES)


def aggregate_mice(
    slides: pd.DataFrame, *, extra_columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """Aggregate per-slide results into one row per mouse (area-weighted CPA).

    Parameters
    ----------
    slides : pandas.DataFrame
        The ``slides.csv`` table: at least ``slide, mouse, group, status, tissue_area_mm2,
        collagen_area_mm2, cpa_percent`` (areas in mm², CPA in %), plus any sheet columns.
        Only rows with ``status == "ok"`` are measured values.
    extra_columns : sequence of str, optional
        Sheet columns to carry into the mouse table when their value is constant within every
        mouse. By default they are inferred: every column except the known per-slide ones
        (``slide, status, error, mpp, …``) and those named like measurements (ending in
        ``_mm2, _um2, _percent, _px, _um, _od``). Pass the sample sheet's extra columns to be
        explicit.

    Returns
    -------
    pandas.DataFrame
        One row per mouse, sorted by group then mouse (numbers in names compared as numbers):
        ``mouse, group, n_slides`` (ok slides), ``tissue_area_mm2, collagen_area_mm2`` (sums over
        ok slides), ``cpa_percent`` (``100 × Σ collagen / Σ tissue``: area-weighted, computed
        from sums), ``cpa_mean_of_slides_percent`` (unweighted mean of the slides' CPA),
        ``cpa_sd_of_slides`` (SD, ddof = 1; NaN with fewer than 2 ok slides),
        ``n_failed_slides``, then the carried sheet columns. A mouse whose slides all failed
        keeps its row, with ``n_slides = 0`` and NaN areas and CPA.

    Raises
    ------
    ValueError
        If a required column is missing or a mouse appears in more than one group.

    Notes
    -----
    A carried column is dropped entirely (for all mice) when it varies within any mouse, e.g. a
    per-section ``session`` column when one mouse's sections were imaged on two days.
    """
    required = ("slide", "mouse", "group", "status", "tissue_area_mm2", "collagen_area_mm2",
                "cpa_percent")
    missing = [c for c in required if c not in slides.columns]
    if missing:
        msg = f"slides table lacks column(s) {', '.join(missing)}"
        raise ValueError(msg)

    data = slides.copy()
    data["mouse"] = data["mouse"].astype(str)
    data["group"] = data["group"].fillna("").astype(str)
    ok = data["status"].astype(str).str.strip().str.lower().eq("ok")
    for col in ("tissue_area_mm2", "collagen_area_mm2", "cpa_percent"):
        data[col] = pd.to_numeric(data[col], errors="coerce").astype(float)

    n_groups = data.groupby("mouse", sort=False)["group"].nunique()
    if (n_groups > 1).any():
        mouse = n_groups.index[n_groups > 1][0]
        groups = sorted(data.loc[data["mouse"] == mouse, "group"].unique())
        msg = f"mouse '{mouse}' appears in more than one group: {', '.join(map(repr, groups))}"
        raise ValueError(msg)

    if extra_columns is None:
        candidates = [c for c in data.columns if _is_inferred_extra(str(c))]
    else:
        absent = [c for c in extra_columns if c not in data.columns]
        if absent:
            msg = f"extra column(s) {', '.join(absent)} not in the slides table"
            raise ValueError(msg)
        candidates = [c for c in extra_columns if c not in required and c not in MICE_COLUMNS]
    carried = [
        c for c in candidates
        if (data.groupby("mouse", sort=False)[c].nunique(dropna=False) <= 1).all()
    ]

    rows: list[dict[str, object]] = []
    for mouse, block in data.groupby("mouse", sort=False):
        good = block.loc[ok.loc[block.index]]
        n_ok = len(good)
        row: dict[str, object] = {"mouse": str(mouse), "group": str(block["group"].iloc[0])}
        row["n_slides"] = n_ok
        if n_ok:
            tissue = float(good["tissue_area_mm2"].sum(skipna=False))
            collagen = float(good["collagen_area_mm2"].sum(skipna=False))
            cpa = 100.0 * collagen / tissue if tissue > 0 else math.nan
            per_slide = good["cpa_percent"].to_numpy(dtype=float)
            mean_slides = float(per_slide.mean())
            sd_slides = float(per_slide.std(ddof=1)) if n_ok >= 2 else math.nan
        else:
            tissue = collagen = cpa = mean_slides = sd_slides = math.nan
        row.update(
            tissue_area_mm2=tissue,
            collagen_area_mm2=collagen,
            cpa_percent=cpa,
            cpa_mean_of_slides_percent=mean_slides,
            cpa_sd_of_slides=sd_slides,
            n_failed_slides=len(block) - n_ok,
        )
        for col in carried:
            row[col] = block[col].iloc[0]
        rows.append(row)

    columns = [*MICE_COLUMNS, *carried]
    if not rows:
        empty = pd.DataFrame({c: pd.Series(dtype=slides[c].dtype if c in carried else float)
                              for c in columns})
        empty["mouse"] = empty["mouse"].astype(str)
        empty["group"] = empty["group"].astype(str)
        empty["n_slides"] = empty["n_slides"].astype(int)
        empty["n_failed_slides"] = empty["n_failed_slides"].astype(int)
        return empty
    mice = pd.DataFrame(rows, columns=columns)
    order = sorted(
        range(len(mice)),
        key=lambda i: (_natural_key(str(mice.at[i, "group"])),
                       _natural_key(str(mice.at[i, "mouse"]))),
    )
    mice = mice.iloc[order].reset_index(drop=True)
    mice["mouse"] = mice["mouse"].astype(str)
    mice["group"] = mice["group"].astype(str)
    mice["n_slides"] = mice["n_slides"].astype(int)
    mice["n_failed_slides"] = mice["n_failed_slides"].astype(int)
    for col in columns[3:8]:
        mice[col] = mice[col].astype(float)
    if any(c in data.columns for c in TRAIT_COLUMNS):  # fibre traits, pooled per mouse
        from fibroquant.traits import mouse_traits

        pooled = mouse_traits(data.loc[ok]).set_index("mouse")
        for col in pooled.columns:  # the schema's (empty) trait columns, filled
            mice[col] = mice["mouse"].map(pooled[col]).astype(float)
    return mice
