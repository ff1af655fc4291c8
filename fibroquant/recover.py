"""Checking and rebuilding an output folder's results store (``fibroquant store check`` and
``fibroquant store rebuild``).

The store is the memory of reruns; the tables are its last printout. When the store is lost
(deleted WAL after a crash, a truncated or replaced file, tables dropped), the measurements
can be re-derived from ``slides.csv`` (every record column) and ``provenance.json`` (each
slide's fingerprint and the settings hash), so the next run measures nothing it had measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fibroquant import __version__
from fibroquant.errors import StoreError
from fibroquant.layout import STORE_NAME
from fibroquant.outdir import OutputLock, atomic_write_text
from fibroquant.store import ResultStore


def check_store(out_dir: Path) -> list[str]:
    """Problems of an output folder's store, one line each (empty: the store is sound and
    holds every slide of ``slides.csv``).

    Checks that it opens (not empty, not another program's, tables present), SQLite's
    ``quick_check``, and that each slide of the last tables has its result stored.
    """
    out_dir = Path(out_dir)
    path = out_dir / STORE_NAME
    if not path.is_file():
        return [f"{path}: no results store here"]
    problems: list[str] = []
    try:
        with ResultStore(path, timeout=10.0, read_only=True) as store:
            store.check()
            prov = _provenance(out_dir)
            if prov is not None:
                shash = str(prov.get("settings_hash", ""))
                known = store.known(shash)
                missing = [i["slide"] for i in prov.get("inputs", [])
                           if known.get(i.get("fingerprint")) is None]
                if missing:
                    problems.append(
                        f"{path}: {len(missing)} slide(s) of the last tables have no stored "
                        f"result (e.g. {missing[0]}); run 'fibroquant store rebuild {out_dir}'")
    except StoreError as exc:
        problems.append(str(exc))
    return problems


def _provenance(out_dir: Path) -> dict[str, Any] | None:
    try:
        prov = json.loads((out_dir / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return prov if isinstance(prov, dict) else None


def _record(row: dict[str, Any], sheet_cols: set[str]) -> dict[str, Any]:
    """A store record from a ``slides.csv`` row: the sheet's columns left out, empty cells as
    missing values, an ok row's error as None."""
    rec: dict[str, Any] = {}
    for key, value in row.items():
        if key in sheet_cols or key in ("mouse", "group"):
            continue
        if isinstance(value, float) and math.isnan(value):
            value = None if key == "error" else value
        rec[key] = value
    if rec.get("status") == "ok" and not rec.get("error"):
        rec["error"] = None
    return rec


def _with_full_precision(slides: Any, xlsx: Path) -> Any:
    """``slides.csv`` with its numbers replaced by ``results.xlsx``'s full-precision ones.

    The CSV is rounded for reading (areas to 4 significant digits, CPA to 0.01), so a store
    rebuilt from it alone would give mice and groups that differ in their last digit. Numeric
    columns are taken from the xlsx's ``slides`` sheet when it holds the same slides in the same
    order; text columns stay the CSV's (the xlsx shortens very long cells). Without a readable
    xlsx the CSV is used as it is.
    """
    import pandas as pd

    try:
        full = pd.read_excel(xlsx, sheet_name="slides")
    except Exception:  # noqa: BLE001 - missing, unreadable or without the sheet: keep the CSV
        return slides
    same_slides = full["slide"].astype(str).tolist() == slides["slide"].astype(str).tolist() \
        if len(full) == len(slides) and "slide" in full and "slide" in slides else False
    if list(full.columns) != list(slides.columns) or not same_slides:
        return slides
    slides = slides.copy()
    for col in slides.columns:
        if pd.api.types.is_numeric_dtype(slides[col]) and pd.api.types.is_numeric_dtype(full[col]):
            slides[col] = full[col].to_numpy()
    return slides


def rebuild_store(out_dir: Path) -> tuple[int, Path | None]:
    """Re-derive an output folder's store from its ``slides.csv`` and ``provenance.json``.

    The store file in place (if any), with its ``-wal`` and ``-shm``, is moved aside to
    ``fibroquant.sqlite.broken-TIMESTAMP`` (nothing is deleted); a new store gets one result per
    slide of ``slides.csv``, keyed by the fingerprint and settings hash ``provenance.json``
    names, as a run ``fibroquant store rebuild``. Taken under the folder's lock.

    Returns
    -------
    n_results : int
        Slides whose result was re-derived.
    moved_to : Path or None
        Where the old store went.

    Raises
    ------
    StoreError
        Without a readable ``slides.csv`` and ``provenance.json`` (nothing to rebuild from).
    """
    import pandas as pd

    out_dir = Path(out_dir)
    prov = _provenance(out_dir)
    if prov is None or not isinstance(prov.get("inputs"), list):
        msg = f"{out_dir}: no readable provenance.json to rebuild the results store from"
        raise StoreError(msg)
    try:
        slides = pd.read_csv(out_dir / "slides.csv", keep_default_na=True)
    except (OSError, ValueError) as exc:
        msg = f"{out_dir / 'slides.csv'}: cannot read it to rebuild the results store ({exc})"
        raise StoreError(msg) from None
    slides = _with_full_precision(slides, out_dir / "results.xlsx")
    cols = list(slides.columns)
    try:
        sheet_cols = set(cols[cols.index("group") + 1 : cols.index("status")])
    except ValueError:
        msg = f"{out_dir / 'slides.csv'}: not a fibroquant slides table (no group/status columns)"
        raise StoreError(msg) from None
    fingerprints = {i.get("slide"): i.get("fingerprint") for i in prov["inputs"]
                    if isinstance(i, dict)}
    shash = str(prov.get("settings_hash") or "")
    if not shash:
        msg = f"{out_dir / 'provenance.json'}: no settings_hash to rebuild the results store with"
        raise StoreError(msg)
    path = out_dir / STORE_NAME
    with OutputLock(out_dir):
        moved = None
        if path.exists():
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            moved = path.with_name(f"{STORE_NAME}.broken-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{path}{suffix}")
                if src.exists():
                    os.replace(src, Path(f"{moved}{suffix}"))
        n = 0
        try:
            with ResultStore(path) as store:
                run_id = store.start_run(
                    command=f"fibroquant store rebuild {out_dir}", version=__version__,
                    settings_hash=shash,
                    settings_json=json.dumps(prov.get("settings", {}), sort_keys=True))
                keys = {}
                for row in slides.to_dict("records"):
                    fp = fingerprints.get(row["slide"])
                    if not isinstance(fp, str) or not fp:
                        continue
                    rec = _record(row, sheet_cols)
                    rec.update(fingerprint=fp, settings_hash=shash)
                    store.put_result(rec, run_id=run_id)
                    keys[row["slide"]] = fp
                    n += 1
                store.link_slides(keys, run_id=run_id)
                store.finish_run(run_id, processed=n, skipped=0,
                                 failed=int((slides["status"] != "ok").sum()), removed=0,
                                 exit_code=0, seconds=0.0)
            run_json = out_dir / "run.json"  # names the store's run now (see analyze)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                info = json.loads(run_json.read_text(encoding="utf-8"))
                info["run_id"] = run_id
                atomic_write_text(run_json, json.dumps(info, indent=2) + "\n")
        except sqlite3.Error as exc:  # pragma: no cover - ResultStore wraps these
            raise StoreError(f"{path}: cannot rebuild: {exc}") from None
    return n, moved
