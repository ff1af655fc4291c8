"""End-to-end speed: the whole ``fibroquant analyze`` command against decoding alone and liverquant.

Usage::

    python benchmarks/speed.py [--fields 100] [--repeats 1] [--workdir /tmp/fq-speed]

Prints, from one run (every command in a fresh process, so imports and kernel loading count):

(a) a 1.07-gigapixel SVS-like slide (32768², JPEG q85 256-px tiles, SubIFD pyramid,
    0.5 µm/px, about half tissue: a mirror-tiled synthetic section with glass around it) —
    ``fibroquant analyze DIR --stain sirius-red --workers 1`` and ``--workers 2`` against
    decoding every level-0 tile alone (tifffile + imagecodecs, 2 threads);
(b) ``--fields`` fields of 2048² (JPEG copies of one real PSR field, each mirrored differently)
    — ``fibroquant analyze`` against liverquant's documented call on the same images, and against
    reading them alone (OpenCV, one process);
(c) peak RSS of every command (the child's ``ru_maxrss``) and its CPU seconds (user + system;
    not for fields on 2 workers, whose worker processes are not the command's children).

The slide and fields are written once into ``--workdir`` and reused. Ratios are within the same
run; the machine (cores, load average before and after) is printed with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fibroquant, here and in the commands run
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
FIELD_SOURCE = ROOT.parent / "shared" / "data" / "psr-liver-liverquant" / "tile02_PSR.jpg"
SLIDE_PX = 32768
SECTION_PX = 4096
MPP = 0.5
TILE = 256
QUALITY = 85


# ------------------------------------------------------------------------------------------
# Inputs (written once, reused)
# ------------------------------------------------------------------------------------------


def _blocks(section: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """A seamless period (the section and its mirror images, 2x its size) for every level."""
    import cv2

    top = np.concatenate([section, section[:, ::-1]], axis=1)
    blocks = [np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))]
    for _ in range(1, n_levels):
        b = blocks[-1]
        blocks.append(cv2.resize(b, (b.shape[1] // 2, b.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    return blocks


def _tiles(block: np.ndarray, size: int, tile: int):
    p = block.shape[0]
    for y in range(0, size, tile):
        for x in range(0, size, tile):
            if p % tile == 0:
                yield block[y % p : y % p + tile, x % p : x % p + tile]
            else:
                yield block[np.ix_(np.arange(y, y + tile) % p, np.arange(x, x + tile) % p)]


def make_slide(path: Path) -> Path:
    """Write the 1.07-GP slide (bounded memory: tiles come from a generator); reuse it."""
    if path.exists():
        return path
    from fibroquant.synthetic import SectionParams, make_section

    section, _ = make_section(SectionParams(shape=(SECTION_PX, SECTION_PX), mpp=MPP), rng=5)
    return write_mirror_slide(path, section, SLIDE_PX)


def write_mirror_slide(path: Path, section: np.ndarray, size: int, mpp: float = MPP) -> Path:
    """Write a ``size``² SVS-like slide of ``section`` and its mirror images tiled seamlessly:
    256-px JPEG tiles, a SubIFD pyramid down to 512 px, ``mpp`` µm/px (memory bounded: tiles
    come from a generator; written to a ``.part`` file, then renamed)."""
    import tifffile

    sizes = [size]
    while sizes[-1] // 2 >= 512:
        sizes.append(sizes[-1] // 2)
    blocks = _blocks(section, len(sizes))
    ppcm = 1e4 / mpp
    tmp = path.with_suffix(".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, (n, block) in enumerate(zip(sizes, blocks, strict=True)):
            extra = {"subifds": len(sizes) - 1} if i == 0 else {"subfiletype": 1}
            tw.write(_tiles(block, n, TILE), shape=(n, n, 3), dtype=np.uint8,
                     tile=(TILE, TILE), compression="jpeg", compressionargs={"level": QUALITY},
                     photometric="rgb", resolution=(ppcm / 2**i,) * 2,
                     resolutionunit="CENTIMETER", maxworkers=2, **extra)
    tmp.replace(path)
    return path


def make_fields(folder: Path, n: int) -> list[Path]:
    """``n`` 2048² JPEG fields (q95): the real PSR field, each a different flip/rotation and
    circular shift of it (so no two files are byte-identical); reused when present."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    src = None
    paths = []
    for i in range(n):
        path = folder / f"field{i:03d}.jpg"
        if not path.exists():
            if src is None:
                src = cv2.imread(str(FIELD_SOURCE), cv2.IMREAD_COLOR)
            img = np.rot90(src, i % 4)
            img = img[:, ::-1] if (i // 4) % 2 else img
            img = np.roll(img, (i // 8) * 97, axis=(0, 1))
            cv2.imwrite(str(path), np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------
# Commands, each in a fresh process
# ------------------------------------------------------------------------------------------

DECODE = """
import os, sys
from concurrent.futures import ThreadPoolExecutor
import tifffile
path, threads = sys.argv[1], int(sys.argv[2])
tif = tifffile.TiffFile(path)
page = tif.pages[0]
fd = os.open(path, os.O_RDONLY)
kw = {"jpegtables": page.jpegtables, "jpegheader": getattr(page, "jpegheader", None)}
offsets, counts = page.dataoffsets, page.databytecounts
def work(chunk):
    for i in chunk:
        page.decode(os.pread(fd, counts[i], offsets[i]), i, **kw)
idx = list(range(len(offsets)))
with ThreadPoolExecutor(threads) as pool:
    list(pool.map(work, [idx[k::threads] for k in range(threads)]))
"""

READ = """
import sys, cv2
for p in sys.argv[1:]:
    cv2.imread(p, cv2.IMREAD_COLOR)
"""

LIVERQUANT = """
import sys, cv2 as cv
from liverquant import segment_fibrosis
for p in sys.argv[1:]:
    img = cv.cvtColor(cv.imread(p), cv.COLOR_BGR2RGB)
    cpa, mask, roi = segment_fibrosis(img, lowerb=[-10, 50, 100], upperb=[10, 255, 255],
                                      resolution=1.0124)
"""


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB, the largest process of the command) and CPU seconds (user +
    system, with the worker processes it waited for) of one command. On a shared machine the
    CPU seconds are the steadier figure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd[:4])} ...\n{err[-2000:]}")
    return secs, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def fibroquant(folder: Path, workers: int, *extra: str) -> tuple[float, float, float]:
    out = Path(tempfile.mkdtemp(prefix="fq-speed-out-"))
    try:
        return run([sys.executable, "-m", "fibroquant", "analyze", str(folder), "--stain",
                    "sirius-red", "--out", str(out), "--workers", str(workers), *extra])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def best(fn, repeats: int) -> tuple[float, float, float]:
    """Fastest of ``repeats`` runs (seconds), the largest peak RSS (MB) and the least CPU
    seconds."""
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=100, help="number of 2048² fields (b)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each command (fastest kept)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fq-speed",
                    help="where the slide and fields are written once and reused")
    ap.add_argument("--skip-slide", action="store_true")
    ap.add_argument("--skip-fields", action="store_true")
    args = ap.parse_args(argv)
    py = sys.executable
    env_note = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    print(f"# fibroquant end to end — {env_note}; load average (1/5/15 min) {load()}")
    if not args.skip_slide:
        slide = make_slide(args.workdir / "slide" / "liver1gp.tif")
        mp = SLIDE_PX * SLIDE_PX / 1e6
        dec = best(lambda: run([py, "-c", DECODE, str(slide), "2"]), args.repeats)
        w1 = best(lambda: fibroquant(slide.parent, 1), args.repeats)
        w2 = best(lambda: fibroquant(slide.parent, 2), args.repeats)
        print(f"\n(a) {slide.name}: {mp:.0f} MP, {TILE}-px JPEG tiles, {MPP} µm/px; load {load()}")
        print(f"  decode-only, level-0 tiles, 2 threads  {dec[0]:7.2f} s  {dec[1]:6.0f} MB"
              f"  CPU {dec[2]:6.2f} s")
        for name, (secs, rss, cpu) in (("fibroquant analyze --workers 1", w1),
                                       ("fibroquant analyze --workers 2", w2)):
            print(f"  {name:38s} {secs:7.2f} s  {rss:6.0f} MB  CPU {cpu:6.2f} s"
                  f"  = {dec[0] / secs:.2f}x decode")
        print(f"  --workers 2 vs 1: {w1[0] / w2[0]:.2f}x (one slide)")
    if not args.skip_fields:
        if not FIELD_SOURCE.exists():
            print(f"\n(b) skipped: {FIELD_SOURCE} not found")
            return 0
        fields = make_fields(args.workdir / f"fields{args.fields}", args.fields)
        folder = fields[0].parent
        names = [str(p) for p in fields]
        rd = best(lambda: run([py, "-c", READ, *names]), args.repeats)
        lq = best(lambda: run([py, "-c", LIVERQUANT, *names]), args.repeats)
        rows = [("read alone (OpenCV, 1 process)", rd), ("liverquant segment_fibrosis", lq)]
        for w in (1, 2):
            rows.append((f"fibroquant --workers {w}", best(
                lambda w=w: fibroquant(folder, w, "--mpp", "1.0124"), args.repeats)))
            rows.append((f"fibroquant --workers {w} --no-traits", best(
                lambda w=w: fibroquant(folder, w, "--mpp", "1.0124", "--no-traits"),
                args.repeats)))
        n = len(fields)
        print(f"\n(b) {n} fields of 2048² (JPEG, PSR liver); load {load()}")
        print(f"  {'command':38s} {'s/image':>8s} {'peak MB':>8s} {'CPU s/image':>12s} "
              f"{'x liverquant':>13s}")
        for name, (secs, rss, cpu) in rows:
            # worker processes are the forkserver's children: their CPU is not the command's
            cpu_text = "n/a" if "--workers 2" in name else f"{cpu / n:.3f}"
            print(f"  {name:38s} {secs / n:8.3f} {rss:8.0f} {cpu_text:>12s} "
                  f"{lq[0] / secs:13.2f}")
    print(f"\nload average at the end {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
