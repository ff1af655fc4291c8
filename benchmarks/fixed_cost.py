"""Per-slide fixed cost: a whole synthetic section with glass, capsule and lumens.

Usage::

    python benchmarks/fixed_cost.py [--size 4096] [--runs 4]

A mouse liver slide is mostly a low-resolution pass (thumbnail, tissue, bubbles, capsule,
background, stain estimation, threshold maps) before any tile is read. ``wsi.py`` measures a
field of view with no glass, where that pass is cheapest; this script measures a whole section
(``make_section(field_of_view=False)``, 0.5 µm/px) held in memory as a 4-level pyramid, so no
decoding is involved: it prints the seconds per slide for 1 and 2 tile threads (after one
warm-up run) and the time of each low-resolution step of one run (a step called inside
another, like the background estimate inside the stain fit, counts in both).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fibroquant import pipeline
from fibroquant.config import Settings
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, make_section

STEPS = ("detect_tissue", "estimate_background", "calibration_pixels", "estimate_stains",
         "with_folds", "parenchyma_background", "with_capsule", "stain_fit", "measure_tiles")


def _timed(name: str, fn, totals: dict[str, float]):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        return out

    return wrapper


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="section edge, px (0.5 µm/px)")
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args(argv)
    rgb, truth = make_section(SectionParams(shape=(args.size, args.size), mpp=0.5), rng=5)
    slide = ArraySlide(rgb, 0.5, levels=4)
    mp = args.size**2 / 1e6
    print(f"# whole section {args.size}² at 0.5 µm/px ({mp:.1f} MP), true CPA "
          f"{truth.cpa_percent:.3f} %")
    pipeline.analyze_slide("section.png", Settings(), slide=slide)  # imports, kernels, caches
    for workers in (1, 2):
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            rec = pipeline.analyze_slide("section.png", Settings(), slide=slide,
                                         workers=workers).to_record()
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"workers={workers}: min {times[0]:.2f} s, median {times[len(times) // 2]:.2f} s "
              f"per slide ({mp / times[0]:.1f} MP/s), CPA {rec['cpa_percent']:.3f} %")
    totals: dict[str, float] = {}
    originals = {name: getattr(pipeline, name) for name in STEPS}
    try:
        for name, fn in originals.items():
            setattr(pipeline, name, _timed(name, fn, totals))
        t0 = time.perf_counter()
        pipeline.analyze_slide("section.png", Settings(), slide=slide, workers=1)
        total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(pipeline, name, fn)
    print(f"one run, workers=1: {total:.2f} s")
    for name in STEPS:
        label = "tiles (read + measure)" if name == "measure_tiles" else name
        print(f"  {label:28s} {totals.get(name, 0.0):6.3f} s")
    print(f"  {'everything else':28s} {total - sum(totals.values()):6.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
