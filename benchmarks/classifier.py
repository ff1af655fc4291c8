"""Pixel classifier: accuracy on held-out synthetic slides, and speed against the default path.

``python benchmarks/classifier.py [--n 9] [--train 3] [--fraction 0.05] [--size 1024]
[--speed-size 2048 4096] [--rounds 3] [--workdir DIR] [--no-traits]
[--speed-only CLASSIFIER] [--people-only]``

1. Draws ``--n`` Masson sections over realistic staining and imaging variation
   (:func:`fibroquant.synthetic.random_params`), written as lossless PNGs.
2. Labels ``--fraction`` of the true tissue pixels of the first ``--train`` slides (a sparse
   label image: 2 collagen, 1 not collagen, from the truth) and runs ``fibroquant train``.
3. Measures the other slides with the default path and with ``--classifier``; prints each
   slide's CPA against the truth and the MAE of both (pp).
4. Simulated people: a classifier trained on half of eight fields' three-person masks,
   scored by ``agree`` on the other half against the people's majority (:func:`people`).
5. Times ``analyze_slide`` on a ``--speed-size``² field (one thread, after a warm-up) on the
   default path and with the classifier, interleaved for ``--rounds`` rounds (medians).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fibroquant.config import Settings
from fibroquant.pipeline import analyze_slide
from fibroquant.slides import ArraySlide
from fibroquant.synthetic import SectionParams, make_section, random_params


def _run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "fibroquant", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    print(done.stdout.strip())


def cohort(work: Path, n: int, n_train: int, fraction: float, size: int) -> pd.DataFrame:
    rows = []
    g = np.random.default_rng(0)
    for i in range(n):
        params = random_params(1000 + i, stain="masson", shape=(size, size), mpp=0.5)
        rgb, truth = make_section(params, rng=1000 + i)
        part = "train" if i < n_train else "test"
        (work / part).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(work / part / f"m{i}.png"), rgb[..., ::-1])
        if part == "train":
            labels = np.zeros(truth.tissue_mask.shape, np.uint8)
            pick = truth.tissue_mask & (g.random(truth.tissue_mask.shape) < fraction)
            labels[pick] = np.where(truth.collagen_mask[pick], 2, 1)
            (work / "ann" / "sim").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(work / "ann" / "sim" / f"m{i}.png"), labels)
        rows.append({"slide": f"m{i}.png", "part": part, "truth_cpa_percent": truth.cpa_percent,
                     "collagen_intensity": params.collagen_intensity,
                     "stain_intensity": params.stain_intensity})
    return pd.DataFrame(rows)


def speed(clf_path: Path, sizes: list[int], traits: bool = True, rounds: int = 3) -> None:
    """Whole-field ``analyze_slide`` (one thread) on the default path and with the classifier,
    interleaved round by round after a warm-up; medians of wall and CPU seconds, the ratio of
    the two paths' speeds and the load average (the machine is shared)."""
    common = {"stains": {"stain": "masson"}, "traits": {"enabled": traits}}
    paths = {"default": Settings.model_validate(common),
             "classifier": Settings.model_validate({**common, "classifier": str(clf_path)})}
    print(f"fibre traits {'on (the default)' if traits else 'off'}:")
    for size in sizes:
        rgb, _ = make_section(SectionParams(stain="masson", shape=(size, size), mpp=0.5,
                                            field_of_view=True, fibrosis=0.6), rng=7)
        load0 = os.getloadavg()[0]
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
        cpa = {}
        for r in range(rounds + 1):  # round 0 warms the kernels and caches
            for name, settings in paths.items():
                slide = ArraySlide(rgb, 0.5, path="speed.png")
                t0, c0 = time.perf_counter(), time.process_time()
                rec = analyze_slide("speed.png", settings, slide=slide, workers=1).to_record()
                if r:
                    times[name].append((time.perf_counter() - t0, time.process_time() - c0))
                cpa[name] = rec["cpa_percent"]
        load1 = os.getloadavg()[0]
        wall = {k: float(np.median([t[0] for t in v])) for k, v in times.items()}
        cpu = {k: float(np.median([t[1] for t in v])) for k, v in times.items()}
        ratio, cpu_ratio = wall["default"] / wall["classifier"], cpu["default"] / cpu["classifier"]
        print(f"{size}x{size} px, load average {load0:.1f}-{load1:.1f}, median of {rounds}: "
              f"default {wall['default']:.2f} s ({cpu['default']:.2f} s CPU, CPA "
              f"{cpa['default']:.2f} %), classifier {wall['classifier']:.2f} s "
              f"({cpu['classifier']:.2f} s CPU, CPA {cpa['classifier']:.2f} %) -> speed ratio "
              f"{ratio:.3f} wall, {cpu_ratio:.3f} CPU (target >= 0.333: "
              f"{'met' if min(ratio, cpu_ratio) >= 1 / 3 else 'not met'})", flush=True)


def people(work: Path, n: int = 8, size: int = 768) -> None:
    """The issue's bar on simulated people: three annotators with different edge habits
    (:func:`fibroquant.synthetic.simulated_annotators`) draw dense masks of ``n`` Masson
    fields over the staining range; a classifier trained on the first half's masks is applied
    to the second half, and ``agree`` compares it with the people's majority there (target:
    its Dice at least the people's own mean pairwise Dice)."""
    import json

    from fibroquant.synthetic import simulated_annotators

    for i in range(n):
        params = random_params(2000 + i, stain="masson", shape=(size, size), mpp=0.5)
        rgb, truth = make_section(replace(params, field_of_view=True), rng=2000 + i)
        half = "train" if i < n // 2 else "test"
        for who, mask in simulated_annotators(truth.collagen_mask, mpp=0.5, rng=i).items():
            (work / f"ann_{half}" / who).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(work / f"ann_{half}" / who / f"p{i}.png"),
                        mask.astype(np.uint8) * 255)
        (work / f"people_{half}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(work / f"people_{half}" / f"p{i}.png"), rgb[..., ::-1])
    clf = work / "people.classifier"
    _run(["train", str(work / "ann_train"), "--slides", str(work / "people_train"),
          "--stain", "masson", "--mpp", "0.5", "--out", str(clf)])
    for name, extra in (("default", []), ("classifier", ["--classifier", str(clf)])):
        out = work / f"people_out_{name}"
        _run(["analyze", str(work / "people_test"), "--out", str(out), "--stain", "masson",
              "--mpp", "0.5", "--force", "--masks", "--no-traits", *extra])
        cmd = [sys.executable, "-m", "fibroquant", "agree", str(out), "--annotations",
               str(work / "ann_test"), "--json"]
        got = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                        check=False).stdout)
        dice, people_dice = got["dice_vs_majority_mean"], got["people_pairwise_dice_mean"]
        print(f"{name} on the held-out half: Dice vs the people's majority {dice:.3f}, the "
              f"people's mean pairwise Dice {people_dice:.3f} (target: at least that: "
              f"{'met' if dice >= people_dice else 'not met'})", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=9)
    ap.add_argument("--train", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--speed-size", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-traits", action="store_true", help="time without fibre traits")
    ap.add_argument("--speed-only", type=Path, default=None, metavar="CLASSIFIER",
                    help="only time the whole-slide runs with this classifier file")
    ap.add_argument("--people-only", action="store_true",
                    help="only the simulated people's half/half agreement")
    a = ap.parse_args(argv)
    if a.people_only:
        people(a.workdir or Path(tempfile.mkdtemp(prefix="fq-clf-")))
        return 0
    if a.speed_only is not None:
        speed(a.speed_only, a.speed_size, traits=not a.no_traits, rounds=a.rounds)
        return 0
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fq-clf-"))
    truth = cohort(work, a.n, a.train, a.fraction, a.size)
    clf = work / "study.classifier"
    _run(["train", str(work / "ann"), "--slides", str(work / "train"), "--stain", "masson",
          "--mpp", "0.5", "--out", str(clf)])
    results = {}
    for name, extra in (("default", []), ("classifier", ["--classifier", str(clf)])):
        out = work / f"out_{name}"
        _run(["analyze", str(work / "test"), "--out", str(out), "--stain", "masson",
              "--mpp", "0.5", "--force", *extra])
        results[name] = pd.read_csv(out / "slides.csv")[["slide", "cpa_percent"]]
    table = truth[truth.part == "test"].copy()
    for name, df in results.items():
        table = table.merge(df.rename(columns={"cpa_percent": f"{name}_cpa_percent"}),
                            on="slide")
        table[f"{name}_error_pp"] = table[f"{name}_cpa_percent"] - table["truth_cpa_percent"]
    pd.set_option("display.width", 160)
    print(table.round(3).to_string(index=False))
    for name in results:
        mae = table[f"{name}_error_pp"].abs().mean()
        print(f"{name}: CPA MAE {mae:.3f} pp over {len(table)} held-out slides"
              + (f" (target <= 0.5 pp: {'met' if mae <= 0.5 else 'not met'})"
                 if name == "classifier" else ""))
    people(work)
    speed(clf, a.speed_size, traits=not a.no_traits, rounds=a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
