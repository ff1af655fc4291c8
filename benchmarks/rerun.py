"""Benchmark: ``fibroquant analyze`` on a folder of 1,000 already-measured slides (nothing new).

Builds 1,000 tiny PNG files (64x64, no resolution: ``--mpp 0.5``), stores an ``ok`` record for
each through the ResultStore API (same keys analyze_folder would use, so no slide is measured),
then times the real CLI in a subprocess, twice, and prints the figures. Target: < 2 s.

    python benchmarks/rerun.py [--n 1000] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(root: Path, n: int) -> tuple[Path, Path]:
    from fibroquant import __version__
    from fibroquant.config import load_settings
    from fibroquant.store import FingerprintCache, ResultStore
    from fibroquant.tasks import output_stem

    slides, out = root / "slides", root / "out"
    slides.mkdir()
    (out / "qc").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(slides / f"s{i:04d}.png")
    old = time.time() - 60  # older than the cache's racy window
    for p in slides.iterdir():
        os.utime(p, (old, old))
    settings = load_settings(None, {})
    shash = settings.settings_hash()
    qc = out / "qc" / "blank.png"
    Image.new("RGB", (4, 4)).save(qc)
    with ResultStore(out / "fibroquant.sqlite") as store:
        run_id = store.start_run(command="benchmark setup", version=__version__,
                                 settings_hash=shash, settings_json="{}")
        with FingerprintCache(store, slides) as cache:
            for p in sorted(slides.iterdir()):
                fp = f"{cache.fingerprint(p)}-fallbackmpp0.5"
                rel = p.name
                store.put_result({
                    "slide": rel, "fingerprint": fp, "settings_hash": shash, "status": "ok",
                    "error": None, "version": __version__, "mpp": 0.5, "analysis_mpp": 0.5,
                    "tissue_area_mm2": 0.001, "collagen_area_mm2": 0.00005,
                    "cpa_percent": float(rng.uniform(1, 10)), "stain": "sirius-red",
                    "stain_warning": "", "seconds": 0.1,
                }, run_id=run_id)
                os.link(qc, out / "qc" / f"{output_stem(rel)}.png")
        store.finish_run(run_id, processed=n, skipped=0, failed=0, removed=0, exit_code=0,
                         seconds=0.0)
    return slides, out


def rerun(slides: Path, out: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "fibroquant", "analyze", str(slides), "--out", str(out),
         "--mpp", "0.5", "--workers", "1"], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 1):
        raise SystemExit(f"analyze failed ({res.returncode}):\n{res.stderr}")
    return wall, json.loads((out / "run.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--profile", action="store_true", help="cProfile one in-process rerun")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        slides, out = build(Path(tmp), args.n)
        print(f"built {args.n} stored slides in {time.perf_counter() - t0:.1f} s")
        for i in range(2):
            wall, run = rerun(slides, out)
            print(f"rerun {i + 1}: wall {wall:.2f} s (process incl. imports), "
                  f"analyze_folder {run['seconds']:.2f} s, processed {run['processed']}, "
                  f"skipped {run['skipped']}")
            assert run["processed"] == 0, run
            assert run["skipped"] == args.n, run
        if args.profile:
            import cProfile
            import pstats

            from fibroquant.cli import app

            sys.argv = ["fibroquant", "analyze", str(slides), "--out", str(out), "--mpp", "0.5",
                        "--workers", "1"]
            prof = cProfile.Profile()
            prof.enable()
            with contextlib.suppress(SystemExit):
                app()
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(r"fibroquant", 25)


if __name__ == "__main__":
    main()
