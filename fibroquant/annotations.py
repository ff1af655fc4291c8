"""People's collagen annotations: mask images and QuPath GeoJSON, one or several annotators.

An annotation says, for the pixels a person labelled, whether each is collagen. Dense masks
(a 0/1 or 0/255 PNG/TIFF on the image's pixel grid) label every pixel; sparse ones (strokes or
regions, as drawn in QuPath or ilastik) label only some, and only those are scored.

Accepted files, named after the image's stem:

* ``STEM.png`` / ``.tif`` / ``.tiff`` with values {0, 1} or {0, 255}: a dense collagen mask;
  with values within {0, 1, 2} and some 2: a sparse label image (0 not labelled, 1 not
  collagen, 2 collagen; ilastik's convention);
* ``STEM.geojson`` / ``.json``: QuPath's *Export objects* (a FeatureCollection or a list of
  features; Polygon and MultiPolygon with holes; ``properties.classification.name``; full
  resolution pixel coordinates). Class names, case-insensitive: ``Collagen`` (also
  ``Fibrosis``); ``Tissue``; ``Exclude`` / ``Ignore`` / ``Artefact`` / ``Artifact``; every
  other class (``Not collagen``, ``Background``, ``Other``, ``Parenchyma``, ...) labels
  its pixels as not collagen. A ``Tissue`` region is dense inside (what is not collagen there
  is not collagen); with only ``Collagen`` drawn, the whole image is taken as annotated
  (dense); ``Collagen`` with other classes and no ``Tissue`` is sparse.

Layouts of an annotation folder (:func:`discover`): one sub-folder per person
(``annotations/AB/STEM.png``); a single person's folder or a flat folder (``STEM.png``, the
person named after the folder); or a file suffix per person (``STEM.AB.png``, ``STEM_AB.png``,
``STEM-AB.png``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fibroquant.errors import FibroquantError

__all__ = [
    "MASK_SUFFIXES",
    "Annotation",
    "AnnotationError",
    "discover",
    "fingerprint",
    "read_annotation",
    "read_geojson",
    "read_mask",
    "resample_nearest",
]

MASK_SUFFIXES = (".png", ".tif", ".tiff")
GEOJSON_SUFFIXES = (".geojson", ".json")
_COLLAGEN = {"collagen", "fibrosis"}
_TISSUE = {"tissue"}
_EXCLUDE = {"exclude", "excluded", "ignore", "artefact", "artifact"}


class AnnotationError(FibroquantError, ValueError):
    """An annotation file that cannot be read or does not fit its image."""


@dataclass(frozen=True)
class Annotation:
    """One person's annotation of one image, on one pixel grid.

    Attributes
    ----------
    person, stem : str
    path : Path
    collagen : ndarray of bool, (H, W)
        Pixels labelled collagen.
    labelled : ndarray of bool, (H, W)
        Pixels the person labelled (collagen or not); only these are scored.
    tissue : ndarray of bool or None
        Tissue the person drew, or None when no tissue was drawn (then the tool's tissue is
        the scored region).
    dense : bool
        Every pixel labelled (a plain mask, or GeoJSON with only collagen drawn).
    """

    person: str
    stem: str
    path: Path
    collagen: np.ndarray
    labelled: np.ndarray
    tissue: np.ndarray | None
    dense: bool

    @property
    def shape(self) -> tuple[int, int]:
        """Pixel grid ``(H, W)``."""
        return self.collagen.shape

    def resampled(self, shape: tuple[int, int]) -> Annotation:
        """The same annotation on another grid (nearest neighbour), covering the same image."""
        if tuple(shape) == self.shape:
            return self
        tissue = None if self.tissue is None else resample_nearest(self.tissue, shape)
        return Annotation(self.person, self.stem, self.path,
                          resample_nearest(self.collagen, shape),
                          resample_nearest(self.labelled, shape), tissue, self.dense)


def resample_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resampled to ``shape`` by nearest neighbour (pixel centres), bool."""
    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    h, w = shape
    rows = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.intp),
                      mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.intp),
                      mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            img = tifffile.imread(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            msg = f"{path}: not a readable TIFF mask ({type(exc).__name__}: {exc})"
            raise AnnotationError(msg) from None
    else:
        try:
            buf = np.fromfile(path, np.uint8)  # cv2.imread cannot open non-ASCII paths
        except OSError as exc:
            msg = f"{path}: cannot read ({exc.strerror or exc})"
            raise AnnotationError(msg) from None
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
        if decoded is None:
            msg = f"{path}: not a readable PNG mask"
            raise AnnotationError(msg)
        img = decoded
    img = np.asarray(img)
    if img.ndim == 3:
        if img.shape[2] in (3, 4) and np.array_equal(img[..., 0], img[..., 1]) and (
                np.array_equal(img[..., 0], img[..., 2])):
            img = img[..., 0]
        else:
            msg = f"{path}: a mask must be single-channel (grey), got shape {img.shape}"
            raise AnnotationError(msg)
    if img.ndim != 2:
        msg = f"{path}: a mask must be 2-D, got shape {img.shape}"
        raise AnnotationError(msg)
    return img


def read_mask(path: str | Path, *, person: str = "", stem: str | None = None) -> Annotation:
    """Read a mask image: dense 0/1 or 0/255, or a sparse {0, 1, 2} label image.

    Raises
    ------
    AnnotationError
        Unreadable file, colour image, or values other than those two conventions.
    """
    path = Path(path)
    img = _read_image(path)
    values = np.unique(img)
    stem = stem if stem is not None else path.stem
    if values.size and set(values.tolist()) <= {0, 1, 2} and 2 in values:
        labelled = img > 0
        return Annotation(person, stem, path, img == 2, labelled, None, bool(labelled.all()))
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        collagen = img > 0
        return Annotation(person, stem, path, collagen, np.ones(img.shape, bool), None, True)
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
    msg = (f"{path}: a mask must hold 0/1 or 0/255 (dense) or 0/1/2 labels (sparse), "
           f"got values {shown}")
    raise AnnotationError(msg)


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, list):
        feats = data
    else:
        feats = None
    if not isinstance(feats, list):
        msg = f"{path}: expected a GeoJSON FeatureCollection or a list of features"
        raise AnnotationError(msg)
    return [f for f in feats if isinstance(f, dict)]


def _class_name(feature: Mapping[str, Any]) -> str:
    props = feature.get("properties") or {}
    cls = props.get("classification") or {}
    name = cls.get("name") if isinstance(cls, dict) else cls
    if not name:  # QuPath 0.1-0.2 wrote a flat "classification" string or only a name
        name = props.get("name") or ""
    return str(name).strip().lower()


def _rings(geometry: Mapping[str, Any], path: Path) -> list[list[np.ndarray]]:
    """Polygons (exterior first, then holes) of a Polygon or MultiPolygon, as (N, 2) x/y."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    polys: Any
    if kind == "Polygon":
        polys = [coords]
    elif kind == "MultiPolygon":
        polys = coords
    elif kind == "GeometryCollection":
        return [r for g in geometry.get("geometries", []) for r in _rings(g, path)]
    else:  # points and lines mark no area
        return []
    out = []
    try:
        for poly in polys:
            rings = [np.asarray(r, np.float64).reshape(-1, 2) for r in poly]
            if rings:
                out.append(rings)
    except (TypeError, ValueError):
        msg = f"{path}: a {kind} with malformed coordinates"
        raise AnnotationError(msg) from None
    return out


def _fill(rings: list[np.ndarray], shape: tuple[int, int], scale: float) -> np.ndarray:
    """Pixels of the grid whose centres lie inside the exterior ring and outside the holes.

    Coordinates are full-resolution pixel *edges* (QuPath's and
    :func:`fibroquant.report.mask_to_geojson`'s convention): grid pixel ``(r, c)`` covers
    ``[c, c+1] x [r, r+1]`` times ``scale``, its centre ``(c + 0.5, r + 0.5) * scale``.
    """
    from skimage.draw import polygon

    out = np.zeros(shape, bool)
    for i, ring in enumerate(rings):
        if len(ring) < 3:
            continue
        rr, cc = polygon(ring[:, 1] / scale - 0.5, ring[:, 0] / scale - 0.5, shape=shape)
        out[rr, cc] = i == 0
    return out


def read_geojson(
    path: str | Path, shape: tuple[int, int], *, scale: float = 1.0, person: str = "",
    stem: str | None = None,
) -> Annotation:
    """Rasterise a QuPath GeoJSON export onto a pixel grid.

    Parameters
    ----------
    path : str or Path
    shape : tuple of int
        ``(H, W)`` of the grid.
    scale : float
        Full-resolution pixels per grid pixel (1: the image's own grid).

    Raises
    ------
    AnnotationError
        Not JSON, not GeoJSON features, or no polygon of any class.
    """
    path = Path(path)
    if not (math.isfinite(scale) and scale > 0):
        msg = f"scale must be a positive number of full-resolution pixels, got {scale=}"
        raise ValueError(msg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path}: not a readable GeoJSON file ({type(exc).__name__})"
        raise AnnotationError(msg) from None
    masks: dict[str, np.ndarray] = {}
    for feat in _features(data, path):
        geom = feat.get("geometry") or {}
        name = _class_name(feat)
        kind = ("collagen" if name in _COLLAGEN else "tissue" if name in _TISSUE
                else "exclude" if name in _EXCLUDE else "other")
        for rings in _rings(geom, path):
            m = _fill(rings, shape, scale)
            masks[kind] = masks[kind] | m if kind in masks else m
    if not masks:
        msg = f"{path}: no Polygon or MultiPolygon annotation in it"
        raise AnnotationError(msg)
    empty = np.zeros(shape, bool)
    collagen = masks.get("collagen", empty)
    tissue = masks.get("tissue")
    other = masks.get("other", empty)
    exclude = masks.get("exclude", empty)
    if tissue is None and "other" not in masks:
        labelled = np.ones(shape, bool)  # only collagen drawn: everything else is not
        dense = True
    else:
        labelled = collagen | other | (tissue if tissue is not None else empty)
        dense = False
    labelled = labelled & ~exclude
    collagen = collagen & labelled
    if tissue is not None:
        tissue = (tissue | collagen) & ~exclude
    return Annotation(person, stem if stem is not None else path.stem.split(".")[0], path,
                      collagen, labelled, tissue, dense)


def read_annotation(
    path: str | Path, *, shape: tuple[int, int] | None = None, scale: float = 1.0,
    person: str = "", stem: str | None = None,
) -> Annotation:
    """Read a mask image or a GeoJSON file (``shape`` and ``scale`` are needed for GeoJSON).

    A mask image is returned on its own grid (``shape`` is ignored: see
    :meth:`Annotation.resampled`).
    """
    path = Path(path)
    if path.suffix.lower() in GEOJSON_SUFFIXES:
        if shape is None:
            msg = f"{path}: a GeoJSON annotation needs the image's size to be rasterised"
            raise AnnotationError(msg)
        return read_geojson(path, shape, scale=scale, person=person, stem=stem)
    if path.suffix.lower() in MASK_SUFFIXES:
        return read_mask(path, person=person, stem=stem)
    msg = f"{path}: not an annotation file (expected {', '.join(MASK_SUFFIXES + GEOJSON_SUFFIXES)})"
    raise AnnotationError(msg)


def _is_annotation(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in MASK_SUFFIXES + GEOJSON_SUFFIXES


def _match(name: str, stems: list[str]) -> tuple[str, str] | None:
    """(stem, person suffix) of a file name without extension, longest stem first."""
    for stem in stems:
        if name == stem:
            return stem, ""
        if name.startswith(stem) and len(name) > len(stem) + 1 and name[len(stem)] in "._-":
            return stem, name[len(stem) + 1 :]
    return None


def _name_without_suffix(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def discover(folder: str | Path, stems: Iterable[str]) -> dict[str, dict[str, Path]]:
    """Find the annotation files of each image, by person.

    Parameters
    ----------
    folder : str or Path
        The annotation folder (one sub-folder per person, or one person's flat folder, or
        files with a person suffix).
    stems : iterable of str
        The images' stems (output stems of a run, or slide file stems).

    Returns
    -------
    dict
        ``{stem: {person: path}}`` for the stems that have at least one annotation, in the
        order of ``stems``.

    Raises
    ------
    AnnotationError
        The folder does not exist, or two files give the same person and image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"{folder}: annotation folder not found"
        raise AnnotationError(msg)
    ordered = list(dict.fromkeys(stems))
    by_length = sorted(ordered, key=len, reverse=True)
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    people_dirs = [d for d in subdirs if any(_is_annotation(p) for p in d.iterdir())]
    sources = [(d, d.name) for d in people_dirs] if people_dirs else [(folder, folder.name)]
    found: dict[str, dict[str, Path]] = {}
    for directory, person in sources:
        for path in sorted(directory.iterdir()):
            if not _is_annotation(path):
                continue
            hit = _match(_name_without_suffix(path), by_length)
            if hit is None:
                continue
            stem, suffix = hit
            who = suffix if suffix and not people_dirs else person
            if suffix and people_dirs:
                who = f"{person}.{suffix}"
            slot = found.setdefault(stem, {})
            if who in slot:
                msg = (f"{path}: a second annotation of {stem!r} by {who!r} "
                       f"(the first is {slot[who].name})")
                raise AnnotationError(msg)
            slot[who] = path
    return {s: dict(sorted(found[s].items())) for s in ordered if s in found}


def fingerprint(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes: annotation provenance."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
