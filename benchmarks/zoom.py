"""Cost of the zoomable QC view (:mod:`fibroquant.zoom`) on a large synthetic slide.

Usage::

    python benchmarks/zoom.py [--size 32768] [--threads 2] [--workdir DIR] [--analysis-mpp 1]

Writes an SVS-like pyramid (``benchmarks/wsi.py``'s slide: a mirror-tiled synthetic field at
0.25 µm/px, tissue everywhere, so the worst case for the view) of ``size`` × ``size`` pixels,
then measures it once with the default settings and the view on, in this process, and prints
the analysis seconds, the view's seconds, MB and tiles, and the peak RSS. The slide is deleted
at the end unless ``--workdir`` is given.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--analysis-mpp", type=float, default=None,
                    help="analysis resolution (default: native, 0.25 µm/px)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import wsi

    from fibroquant import pipeline, zoom
    from fibroquant.config import Settings

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fq-zoom-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide{args.size}.tif"
    if not slide.exists():
        sec, _ = wsi.section(work)
        print(f"writing {slide.name}: {wsi.write_slide(slide, args.size, sec):.1f} s")
    settings = Settings.model_validate({"tiling": {"analysis_mpp": args.analysis_mpp}})
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    times: dict[str, float] = {}

    def after(cal, result, decide) -> None:
        times["analysis_s"] = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        times.update(zoom.write_zoom(out, "slide", cal, result, settings, title=slide.name,
                                     colour=(0, 229, 255), decide=decide,
                                     threads=args.threads))
        times["zoom_s"] = time.perf_counter() - t1
        times["zoom_cpu_s"] = time.process_time() - c1

    t0 = time.perf_counter()
    result = pipeline.analyze_slide(slide, settings, workers=args.threads, after=after)
    g = result.geometry
    print(f"slide {g.width} x {g.height} px ({g.width * g.height / 1e9:.2f} GP) at "
          f"{g.analysis_mpp} µm/px, {args.threads} threads: analysis {times['analysis_s']:.1f} s, "
          f"zoom view {times['zoom_s']:.1f} s ({times['zoom_cpu_s']:.1f} s CPU), "
          f"{times['zoom_mb']:.0f} MB in "
          f"{times['zoom_tiles']:.0f} tiles, peak RSS {wsi._vmhwm_mb():.0f} MB")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
