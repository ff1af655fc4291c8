"""Where the submitting process of a cluster run becomes the bottleneck (docs/cluster.md).

`python benchmarks/cluster_scale.py [--slides 120] [--workers 4 8] [--records 2000]`

1. The results store alone: ``--records`` records (copies of a real slide record with their own
   slide name and fingerprint) written with ``ResultStore.put_result`` one transaction each, as
   the run writes them: records per second.
2. A simulated cluster: a ``distributed.LocalCluster`` of N single-thread worker processes on
   127.0.0.1 (warmed with one slide each first, like a long-lived cluster) measures ``--slides``
   tiny synthetic sections (256 x 256 px) through ``analyze_folder(..., scheduler=cluster)``.
   The scheduler runs inside the submitting process, as with dask-jobqueue, so the submitter's
   CPU time between the plan and the last record (``time.process_time``: scheduler, client,
   store writes) divided by the records is what each record costs it; its inverse is the most
   records per second one submitting process can take, whatever the number of workers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fibroquant.config import load_settings
from fibroquant.layout import STORE_NAME
from fibroquant.run import analyze_folder
from fibroquant.store import ResultStore
from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff


def make_slides(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, _ = make_section(SectionParams(shape=(256, 256), mpp=1.0), rng=1000 + i)
        write_pyramid_tiff(folder / f"s{i:04d}.tif", rgb, 1.0, min_level_px=128)


def store_rate(record: dict, n: int, workdir: Path) -> float:
    with ResultStore(workdir / "bench-store.sqlite") as store:
        run_id = store.start_run(command="bench", version="bench", settings_hash="h" * 16,
                                 settings_json="{}")
        t0 = time.perf_counter()
        for i in range(n):
            store.put_result({**record, "slide": f"s{i:05d}.tif", "fingerprint": f"{i:064x}",
                              "settings_hash": "h" * 16}, run_id=run_id)
        return n / (time.perf_counter() - t0)


def cluster_run(slides: Path, out: Path, workers: int) -> dict[str, float]:
    import distributed

    marks: dict[str, float] = {}

    def on_plan(n: int, _skipped: int) -> None:
        marks["n"] = n
        marks["cpu0"], marks["t0"] = time.process_time(), time.perf_counter()

    def on_result(_rec: dict) -> None:
        marks["cpu1"], marks["t1"] = time.process_time(), time.perf_counter()

    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        warm = slides.parent / "warm"
        make_slides(warm, workers)
        analyze_folder(warm, out.parent / f"warm{workers}", load_settings(), scheduler=cluster)
        analyze_folder(slides, out, load_settings(), scheduler=cluster, on_plan=on_plan,
                       on_result=on_result)
    n = marks["n"]
    return {"workers": workers, "slides": n, "wall_s": marks["t1"] - marks["t0"],
            "slides_per_s": n / (marks["t1"] - marks["t0"]),
            "submitter_cpu_ms_per_record": 1000 * (marks["cpu1"] - marks["cpu0"]) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=120)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--records", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fq-cluster-") as tmp:
        work = Path(tmp)
        make_slides(work / "slides", args.slides)
        rows = [cluster_run(work / "slides", work / f"out{w}", w) for w in args.workers]
        with ResultStore(work / f"out{args.workers[0]}" / STORE_NAME) as store:
            current = store.current_results(load_settings().settings_hash())
            record = next(r for r in current if r.get("status") == "ok")
        rate = store_rate(record, args.records, work)
    print(json.dumps({"store_records_per_s": round(rate, 1),
                      "record_json_bytes": len(json.dumps(record)),
                      "cluster": [{k: round(v, 3) for k, v in r.items()} for r in rows]},
                     indent=2))


if __name__ == "__main__":
    main()
