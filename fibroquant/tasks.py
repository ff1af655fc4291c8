"""The unit of work sent to a worker, kept free of heavy imports.

``fibroquant.run`` plans a run (which slides are new) with these alone, so a rerun with nothing
new never imports the image-analysis stack (numba, scipy, scikit-image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fibroquant import __version__


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


def failed_record(task: SlideTask, error: str) -> dict[str, Any]:
    """A ``failed`` row for a slide that could not be measured."""
    return {"slide": task.slide, "fingerprint": task.fingerprint, "status": "failed",
            "error": error, "version": __version__}


def output_stem(slide: str) -> str:
    """File stem for a slide's outputs: its relative path without suffix, '/' as '__'."""
    p = Path(slide)
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = p.stem
    parts = [*p.parent.parts, name] if str(p.parent) != "." else [name]
    return "__".join(parts)
