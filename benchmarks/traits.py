"""Cost of the fibre traits: the default analysis of a whole section with and without them.

Usage::

    python benchmarks/traits.py [--size 4096] [--mpp 0.5] [--runs 3] [--trait-mpp 1.0 2.0]

A whole synthetic section (``make_section``, glass, capsule, lumens) held in memory as a
4-level pyramid (no decoding, so the ratio is the worst case: reading a real slide's JPEG tiles
adds time to both), analysed with ``Settings()`` and ``traits: false`` in alternation, one tile
thread (``--workers``), after a warm-up of each (imports, kernels, skan's per-process jit
compile). Prints the median wall and CPU seconds per slide, the traits' share of the default
time (issue 27's target: ≤ 30 %) both as the difference of medians and as the traits' own
seconds over the rest of the same run ("within", robust to a busy shared machine), the load
average, and the same for other trait resolutions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fibroquant import pipeline, traits
from fibroquant.config import Settings
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, make_section

_TRAIT_SECONDS: list[tuple[float, float]] = []  # (wall, CPU) of each measure_slide call
_measure_slide = traits.measure_slide


def _timed_measure_slide(*args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    out = _measure_slide(*args, **kwargs)
    _TRAIT_SECONDS.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


traits.measure_slide = _timed_measure_slide  # the pipeline imports it at call time


def _seconds(slide: ArraySlide, settings: Settings, workers: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of one analysis."""
    t0, c0 = time.perf_counter(), time.process_time()
    pipeline.analyze_slide("section.png", settings, slide=slide, workers=workers)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="section edge, px")
    ap.add_argument("--mpp", type=float, default=0.5, help="µm/px of the section")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--trait-mpp", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--workers", type=int, default=1, help="tile (and trait tile) threads")
    ap.add_argument("--field-of-view", action="store_true",
                    help="tissue fills the frame (no glass, no capsule): the cheapest analysis")
    args = ap.parse_args(argv)
    rgb, truth = make_section(SectionParams(shape=(args.size, args.size), mpp=args.mpp,
                                            field_of_view=args.field_of_view), rng=5)
    slide = ArraySlide(rgb, args.mpp, levels=4)
    kind = "field of view" if args.field_of_view else "whole section"
    print(f"# {kind} {args.size}² at {args.mpp} µm/px ({args.size**2 / 1e6:.1f} MP), "
          f"true CPA {truth.cpa_percent:.3f} %, {args.workers} tile thread(s), median of {args.runs}")
    off = Settings.model_validate({"traits": False})
    variants = {f"traits at {m:g} µm/px": Settings.model_validate({"traits": {"mpp": m}})
                for m in args.trait_mpp}
    for s in (off, *variants.values()):
        pipeline.analyze_slide("section.png", s, slide=slide)  # imports, kernels, caches
    wall: dict[str, list[float]] = {"traits off": [], **{k: [] for k in variants}}
    cpu: dict[str, list[float]] = {"traits off": [], **{k: [] for k in variants}}
    # share of the traits within each run: the rest of that same run is its baseline, so a
    # busy period of the (shared) machine slows both alike
    within_wall: dict[str, list[float]] = {k: [] for k in variants}
    within_cpu: dict[str, list[float]] = {k: [] for k in variants}
    loads = [os.getloadavg()[0]]
    for _ in range(args.runs):  # interleaved: a slow period of the machine hits all alike
        for k, s in {"traits off": off, **variants}.items():
            _TRAIT_SECONDS.clear()
            w, c = _seconds(slide, s, args.workers)
            wall[k].append(w)
            cpu[k].append(c)
            if k in variants:
                tw, tc = _TRAIT_SECONDS[0]
                within_wall[k].append(tw / (w - tw))
                within_cpu[k].append(tc / (c - tc))
        loads.append(os.getloadavg()[0])
    med = statistics.median
    base_w, base_c = med(wall["traits off"]), med(cpu["traits off"])
    print(f"# load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'variant':<22} {'wall s':>7} {'CPU s':>7} {'added wall':>11} {'added CPU':>10} "
          f"{'within wall':>12} {'within CPU':>11}")
    for k in wall:
        line = (f"{k:<22} {med(wall[k]):7.2f} {med(cpu[k]):7.2f} "
                f"{100 * (med(wall[k]) / base_w - 1):10.1f} % {100 * (med(cpu[k]) / base_c - 1):8.1f} %")
        if k in variants:
            line += f" {100 * med(within_wall[k]):10.1f} % {100 * med(within_cpu[k]):9.1f} %"
        print(line)
    rec = pipeline.analyze_slide("section.png", Settings(), slide=slide).to_record()
    print(f"# default traits: width median {rec['fibre_width_median_um']:.2f} µm, length density "
          f"{rec['fibre_length_density_mm_per_mm2']:.2f} mm/mm², traits_mpp {rec['traits_mpp']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
