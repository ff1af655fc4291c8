"""The unit of work sent to a worker and the names of its output files, free of heavy imports.

``fibroquant.run`` plans a run (which slides are new) with these alone, so a rerun with nothing
new never imports the image-analysis stack (numba, scipy, scikit-image).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fibroquant import __version__
from fibroquant.errors import FibroquantError

#: The per-slide output files, by kind (see :func:`output_files`).
OUTPUT_KINDS = ("qc", "collagen", "tissue", "geojson")
#: The kinds written only with ``--masks``.
MASK_KINDS = ("collagen", "tissue", "geojson")
#: Folder and file-name ending of each kind.
_OUTPUT_PLACES = {"qc": ("qc", ".jpg"), "collagen": ("masks", ".collagen.png"),
                  "tissue": ("masks", ".tissue.png"), "geojson": ("geojson", ".geojson")}


@dataclass(frozen=True)
class SlideTask:
    """One slide to analyse, as sent to a worker."""

    path: str
    slide: str  # relative name in the slides folder
    fingerprint: str
    mpp: float | None
    fallback_mpp: float | None
    settings_json: str
    out_dir: str
    write_masks: bool
    threads: int = 1
    stem: str = ""  # output stem planned for the run ("" means output_stem(slide))


def failed_record(task: SlideTask, error: str) -> dict[str, Any]:
    """A ``failed`` row for a slide that could not be measured."""
    return {"slide": task.slide, "fingerprint": task.fingerprint, "status": "failed",
            "error": error, "version": __version__}


def output_stem(slide: str) -> str:
    """File stem for a slide's outputs: its relative path without suffix, '/' as '__'.

    ``slide`` is a relative POSIX path as the run makes them (no ``.`` or empty parts); string
    operations only, as a rerun of thousands of slides computes it for each.
    """
    head, _, name = slide.rpartition("/")
    low = name.lower()
    if low.endswith(".ome.tiff"):
        name = name[:-9]
    elif low.endswith(".ome.tif"):
        name = name[:-8]
    else:
        name = PurePosixPath(name).stem
    return f"{head.replace('/', '__')}__{name}" if head else name


def task_stem(task: SlideTask) -> str:
    """The output stem of a task: the one planned for its run, else :func:`output_stem`."""
    return task.stem or output_stem(task.slide)


def output_stems(slides: Iterable[str]) -> dict[str, str]:
    """Distinct output stems for the slides of one run.

    Each slide keeps :func:`output_stem` (``sub/a.svs`` -> ``sub__a``) unless another slide of
    the run has the same stem (compared case-insensitively, as some file systems do): those
    keep their extension (``a.tif`` -> ``a.tif``, ``a.png`` -> ``a.png``), and any still alike
    also get 8 hex digits of a hash of the slide path (``a.tif-1f3c9a0b``).

    Parameters
    ----------
    slides : iterable of str
        Slide paths relative to the slides folder (POSIX), each once.

    Returns
    -------
    dict of str to str
        Slide path -> stem of its ``qc/``, ``masks/`` and ``geojson/`` files; the same whatever
        the order of ``slides``.
    """
    names = sorted(set(slides))
    forms = [output_stem, _stem_with_extension, _stem_with_hash]
    level = dict.fromkeys(names, 0)
    while True:
        stems = {s: forms[level[s]](s) for s in names}
        groups: dict[str, list[str]] = {}
        for s, stem in stems.items():
            groups.setdefault(stem.casefold(), []).append(s)
        clashing = [s for g in groups.values() if len(g) > 1 for s in g
                    if level[s] < len(forms) - 1]
        if not clashing:
            return stems
        for s in clashing:
            level[s] += 1


def _stem_with_extension(slide: str) -> str:
    """``sub/a.tif`` -> ``sub__a.tif``: the relative path with '/' as '__'."""
    return "__".join(Path(slide).parts)


def _stem_with_hash(slide: str) -> str:
    digest = hashlib.sha256(slide.encode("utf-8")).hexdigest()[:8]
    return f"{_stem_with_extension(slide)}-{digest}"


def output_files(
    out_dir: str | Path, stem: str, kinds: Iterable[str] = OUTPUT_KINDS
) -> dict[str, Path]:
    """The files a slide's measurement writes into an output folder, by kind.

    Parameters
    ----------
    out_dir : str or Path
        The output folder.
    stem : str
        The slide's output stem (:func:`output_stems`).
    kinds : iterable of str
        Which of :data:`OUTPUT_KINDS` to name (all by default; a rerun of thousands of slides
        asks only for the overlay).

    Returns
    -------
    dict of str to Path
        ``qc`` (``qc/STEM.png``, always written) and, with ``--masks``, ``collagen``
        (``masks/STEM.collagen.png``), ``tissue`` (``masks/STEM.tissue.png``) and ``geojson``
        (``geojson/STEM.geojson``).
    """
    return {k: Path(os.path.join(out_dir, _OUTPUT_PLACES[k][0], stem + _OUTPUT_PLACES[k][1]))
            for k in kinds}


def remove_files(paths: Iterable[Path]) -> None:
    """Delete files; those already absent are fine.

    Parameters
    ----------
    paths : iterable of Path

    Raises
    ------
    FibroquantError
        ``cannot remove PATH: reason`` for the first file that exists but cannot be deleted.
    """
    for path in paths:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):  # absent, or its folder is a file
            continue
        except OSError as exc:
            msg = f"cannot remove {path}: {exc.strerror or exc}"
            raise FibroquantError(msg) from exc


def discard_outputs(out_dir: str | Path, stem: str) -> str | None:
    """Delete every output file of one slide stem, as far as possible (never raises).

    Used when a slide fails or leaves the folder, so no overlay, mask or GeoJSON of an earlier
    measurement stays next to a table that no longer shows it.

    Returns
    -------
    str or None
        Why a file could not be removed (one line), or ``None`` when all are gone.
    """
    problem = None
    for path in output_files(out_dir, stem).values():
        try:
            remove_files([path])
        except FibroquantError as exc:
            problem = problem or str(exc)
    try:
        remove_zoom(out_dir, stem)
    except FibroquantError as exc:
        problem = problem or str(exc)
    return problem


def remove_zoom(out_dir: str | Path, stem: str) -> None:
    """Delete a slide stem's zoomable QC view (``zoom/STEM.html``, ``.dzi``, ``_files/``);
    those already absent (or without a ``zoom`` folder) are fine.

    Raises
    ------
    FibroquantError
        ``cannot remove PATH: reason`` for a page that exists but cannot be deleted.
    """
    import shutil

    zoom_dir = Path(out_dir) / "zoom"
    remove_files(zoom_dir / f"{stem}{suffix}" for suffix in (".html", ".dzi"))
    shutil.rmtree(zoom_dir / f"{stem}_files", ignore_errors=True)


def move_outputs(out_dir: str | Path, old_stem: str, new_stem: str, new_slide: str, *,
                 masks: bool) -> bool:
    """Give a renamed slide the output files of its old name (the same content, measured).

    The overlay (its slide name redrawn) and, with ``masks``, the masks and the GeoJSON (whose
    annotation names are rewritten to ``new_slide``) are moved from ``old_stem`` to ``new_stem``: the images by
    ``os.replace``, the GeoJSON rewritten atomically (fsynced) and its old file removed last.
    Without ``masks``, masks and GeoJSON left at ``new_stem`` by an earlier content are
    removed, as a measurement without ``--masks`` would.

    Returns
    -------
    bool
        True when everything was moved; False, with nothing moved, when a needed file of the
        old name is missing or its GeoJSON is not a FeatureCollection this can rename (then
        the slide is measured instead).

    Raises
    ------
    OSError, FibroquantError
        When a file cannot be moved, read or written part way; the caller measures the slide,
        which rewrites its files.
    """
    from fibroquant.store import atomic_write_text

    kinds = OUTPUT_KINDS if masks else ("qc",)
    remove_zoom(out_dir, old_stem)  # its page names the old stem's tiles: made again with --force
    src = output_files(out_dir, old_stem, kinds)
    dst = output_files(out_dir, new_stem, kinds)
    if not all(path.is_file() for path in src.values()):
        return False
    geojson = None
    if masks:  # renamed in memory first: an odd file leaves everything where it was
        geojson = _renamed_geojson(src["geojson"].read_text(encoding="utf-8"), new_slide)
        if geojson is None:
            return False
    else:
        remove_files(output_files(out_dir, new_stem, MASK_KINDS).values())
    for kind, path in src.items():
        if kind != "geojson":
            dst[kind].parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dst[kind])
    if geojson is not None:
        dst["geojson"].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dst["geojson"], geojson)
        remove_files([src["geojson"]])
    from fibroquant.report import retitle_qc

    retitle_qc(dst["qc"], new_slide)  # the overlay names its slide
    return True


def _renamed_geojson(text: str, new_slide: str) -> str | None:
    """A FeatureCollection of :func:`fibroquant.report.mask_to_geojson` with its annotation
    names (``"SLIDE tissue"``, ``"SLIDE collagen"``) given ``new_slide``; None when the text is
    not such a collection."""
    try:
        fc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(fc, dict) or not isinstance(fc.get("features"), list):
        return None
    for feature in fc["features"]:
        props = feature.get("properties") if isinstance(feature, dict) else None
        cls = props.get("classification") if isinstance(props, dict) else None
        name = cls.get("name") if isinstance(cls, dict) else None
        if not isinstance(props, dict) or not isinstance(name, str) or "name" not in props:
            return None
        props["name"] = f"{new_slide} {name.lower()}"
    return json.dumps(fc, separators=(",", ":"), ensure_ascii=False)
