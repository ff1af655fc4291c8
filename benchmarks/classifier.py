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

``--whole-slide PX [--classifier FILE]`` instead times the whole ``fibroquant analyze``
command (a fresh process each run, one worker) on a PX² SVS-like Masson slide (JPEG q85
256-px tiles, SubIFD pyramid, 0.5 µm/px: a 4096² synthetic section with glass around it,
mirror-tiled; written once into ``--workdir``), with and without ``--classifier``,
interleaved for ``--rounds`` rounds (:func:`whole_slide`). Without ``--classifier`` it first
trains one on the held-out cohort (steps 1-2).
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def write_masson_slide(path: Path, size: int, section_px: int = 4096) -> float:
    """A ``size``² SVS-like Masson slide: a ``section_px``² synthetic section (glass, capsule,
    lumens) and its mirror images tiled seamlessly, 256-px JPEG q85 tiles, a SubIFD pyramid
    down to 512 px, 0.5 µm/px (memory bounded: tiles come from a generator). Reused when
    present. Returns the section's true CPA (%) (the slide's, up to the mirror seams)."""
    import json

    truth_file = path.parent.parent / f"{path.stem}.truth.json"
    if path.exists() and truth_file.exists():
        return float(json.loads(truth_file.read_text())["cpa_percent"])
    from speed import write_mirror_slide  # this folder's whole-slide benchmark

    section, truth = make_section(SectionParams(stain="masson", shape=(section_px,) * 2,
                                                mpp=0.5), rng=5)
    write_mirror_slide(path, section, size, mpp=0.5)
    truth_file.write_text(json.dumps({"cpa_percent": truth.cpa_percent}))
    return float(truth.cpa_percent)


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the process and its children) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        sys.exit(f"{' '.join(cmd[:5])} ... failed:\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def whole_slide(clf_path: Path, work: Path, size: int, rounds: int = 2,
                traits: bool = True) -> None:
    """The whole ``fibroquant analyze`` command on a ``size``² Masson slide (one worker, a
    fresh process each run: imports, kernel loading and the QC outputs count), with and
    without ``--classifier``, interleaved for ``rounds`` rounds; every run's wall and CPU
    seconds, the medians' ratio (default / classifier: the issue's bar is >= 1/3), the
    classifier's added CPU seconds per megapixel of tissue, and the load average."""
    slide_dir = work / f"slide{size}"
    truth = write_masson_slide(slide_dir / f"masson{size}.tif", size)
    base = [sys.executable, "-m", "fibroquant", "analyze", str(slide_dir), "--stain", "masson",
            "--workers", "1", "--force", *([] if traits else ["--no-traits"])]
    paths = {"default": [], "classifier": ["--classifier", str(clf_path)]}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
    load0 = os.getloadavg()
    for r in range(rounds):
        for name, extra in paths.items():
            out = work / f"ws_out_{name}"
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu = _timed([*base, "--out", str(out), *extra])
            times[name].append((wall, cpu))
            rec = pd.read_csv(out / "slides.csv").iloc[0]
            print(f"  round {r + 1} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, CPA "
                  f"{rec['cpa_percent']:.2f} % (truth {truth:.2f} %), tissue "
                  f"{rec['tissue_area_mm2']:.1f} mm², load {os.getloadavg()[0]:.1f}",
                  flush=True)
    load1 = os.getloadavg()
    wall = {k: float(np.median([t[0] for t in v])) for k, v in times.items()}
    cpu = {k: float(np.median([t[1] for t in v])) for k, v in times.items()}
    tissue_mpx = float(rec["tissue_area_mm2"]) / (0.5e-3) ** 2 / 1e6
    added = (cpu["classifier"] - cpu["default"]) / tissue_mpx
    ratio, cpu_ratio = wall["default"] / wall["classifier"], cpu["default"] / cpu["classifier"]
    print(f"{size}² Masson slide ({size * size / 1e6:.0f} MPx, {tissue_mpx:.0f} MPx tissue), "
          f"traits {'on' if traits else 'off'}, 1 worker, median of {rounds}, load average "
          f"{load0[0]:.1f}/{load0[1]:.1f} -> {load1[0]:.1f}/{load1[1]:.1f}: default "
          f"{wall['default']:.1f} s ({cpu['default']:.1f} s CPU), classifier "
          f"{wall['classifier']:.1f} s ({cpu['classifier']:.1f} s CPU) -> speed ratio "
          f"{ratio:.3f} wall, {cpu_ratio:.3f} CPU (target >= 0.333: "
          f"{'met' if min(ratio, cpu_ratio) >= 1 / 3 else 'not met'}); the classifier adds "
          f"{added:.3f} s CPU per MPx of tissue", flush=True)


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
    ap.add_argument("--whole-slide", type=int, default=None, metavar="PX",
                    help="only time the whole command on a PX² Masson slide")
    ap.add_argument("--classifier", type=Path, default=None,
                    help="with --whole-slide: this classifier (else one is trained first)")
    a = ap.parse_args(argv)
    if a.whole_slide is not None:
        work = a.workdir or Path(tempfile.mkdtemp(prefix="fq-clf-"))
        clf = a.classifier
        if clf is None:
            cohort(work, a.n, a.train, a.fraction, a.size)
            clf = work / "study.classifier"
            _run(["train", str(work / "ann"), "--slides", str(work / "train"), "--stain",
                  "masson", "--mpp", "0.5", "--out", str(clf)])
        whole_slide(clf, work, a.whole_slide, rounds=a.rounds, traits=not a.no_traits)
        return 0
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
