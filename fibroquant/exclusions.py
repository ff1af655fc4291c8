"""The excluded-area classes: one table that every consumer reads.

Each :class:`Excluded` names a kind of area left out of both tissue and collagen (capsule,
lumens, folds...), its bit in the per-pixel class map the tile kernel counts, how the kernel
treats it, its ``slides.csv`` column, its overlay colour and whether it counts toward the
``large exclusions`` flag. The tile kernel (:mod:`fibroquant.kernels`), the counts and
measurements (:mod:`fibroquant.measure`), the column schema, the confidence flags, the QC
overlays and the report all read :data:`CLASSES`.

A new excluded area found on the slide's thumbnail is one :class:`Excluded` with a free bit
and a ``detect`` function (called by :func:`fibroquant.tissue.detect_tissue`); then
``python -m fibroquant.schema README.md`` regenerates the README's column table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["CLASSES", "FLAG_TISSUE", "Excluded", "area_bits", "by_rule", "detected", "large_columns", "painted"]

#: Class bit of countable tissue (before the capsule and vessel walls are taken out).
FLAG_TISSUE = 1

#: How the tile kernel counts a class: ``area`` pixels are excluded whatever they show;
#: ``band`` (the capsule) is decided pixel by pixel: collagen there is excluded, the rest stays
#: tissue (or wall); ``wall`` excludes the tissue under it outside the band; ``tiles`` is not a
#: pixel class (whole tiles left out after they were measured: ``bit`` 0).
Rule = Literal["area", "band", "wall", "tiles"]

#: ``detect(rgb, od, mpp, tissue) -> mask``: bool (H, W) of the thumbnail (uint8 RGB, its
#: optical density float32 (H, W, 3), µm per pixel, the countable tissue found so far).
Detector = Callable[[np.ndarray, np.ndarray, float, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Excluded:
    """One class of excluded area.

    Attributes
    ----------
    key : str
        Identifier: the count ``KEY_px``, the column ``KEY_area_mm2``, the overlay's name
        (``_`` read as a space).
    description : str
        One line for the column tables.
    colour : tuple of 3 int
        RGB of the class in the QC overlays and their legends.
    bit : int
        Its bit in the per-pixel class map (uint8; 0 for ``tiles``).
    rule : str
        How the kernel counts it (:data:`Rule`).
    large : bool
        Counts toward the ``large exclusions`` confidence flag (:mod:`fibroquant.confidence`).
    paint : int
        Precedence where classes overlap in an overlay (lower wins).
    detect : callable, optional
        Finds the class on the thumbnail (:data:`Detector`); ``None`` for the built-in classes,
        found by :mod:`fibroquant.tissue` and :mod:`fibroquant.focus`.
    """

    key: str
    description: str
    colour: tuple[int, int, int]
    bit: int
    rule: Rule = "area"
    large: bool = False
    paint: int = 9
    detect: Detector | None = None

    @property
    def column(self) -> str:
        """Its ``slides.csv`` column (mm²)."""
        return f"{self.key}_area_mm2"

    @property
    def count(self) -> str:
        """Its pixel count's name in a tile's counts."""
        return f"{self.key}_px"

    @property
    def name(self) -> str:
        """Its name in overlays and legends."""
        return self.key.replace("_", " ")


#: Every excluded-area class, in the order of their ``slides.csv`` columns.
CLASSES: tuple[Excluded, ...] = (
    Excluded("capsule", "Glisson capsule, excluded", (204, 0, 204), 2, "band", paint=4),
    Excluded("lumen", "vessel lumens and other large holes, excluded", (110, 110, 110), 8,
             paint=0),
    Excluded("fold", "folded tissue (a double layer), excluded", (90, 60, 220), 16, large=True,
             paint=2),
    Excluded("vessel_wall", "walls of large vessels, excluded", (150, 85, 25), 4, "wall",
             paint=3),
    Excluded("unfocused", "tissue in tiles far blurrier than the rest of the slide, excluded",
             (240, 120, 0), 0, "tiles", large=True),
    Excluded("bubble", "section under air bubbles, excluded", (140, 140, 0), 32, large=True,
             paint=1),
)


def by_rule(rule: Rule) -> tuple[Excluded, ...]:
    """The classes the kernel counts by ``rule``, in table order."""
    return tuple(c for c in CLASSES if c.rule == rule)


def detected() -> tuple[Excluded, ...]:
    """The classes found by a ``detect`` function of their own."""
    return tuple(c for c in CLASSES if c.detect is not None)


def painted() -> tuple[Excluded, ...]:
    """The classes with a bit, in the order they are painted on an overlay (the first one
    takes a pixel where classes overlap)."""
    return tuple(sorted((c for c in CLASSES if c.bit), key=lambda c: c.paint))


def area_bits() -> int:
    """The bits of the classes excluded whatever the pixel shows (rule ``area``), or-ed."""
    return sum(c.bit for c in by_rule("area"))  # distinct single bits: the sum is their or


def large_columns() -> tuple[str, ...]:
    """Columns of the classes that count toward the ``large exclusions`` flag."""
    return tuple(c.column for c in CLASSES if c.large)


def _check(classes: tuple[Excluded, ...]) -> None:
    bits = [c.bit for c in classes if c.rule != "tiles"]
    if any(b & (b - 1) or not 1 < b < 256 for b in bits) or len(set(bits)) != len(bits):
        msg = f"excluded classes need distinct single bits 2..128 of a uint8: {bits}"
        raise ValueError(msg)
    roles = {r: [c.bit for c in classes if c.rule == r] for r in ("band", "wall", "tiles")}
    if roles != {"band": [2], "wall": [4], "tiles": [0]}:  # the tile kernel's fixed bits
        msg = f"one class each with rule band (bit 2), wall (bit 4) and tiles (bit 0): {roles}"
        raise ValueError(msg)


_check(CLASSES)

#: The capsule band's bit, the vessel walls' bit and the tile-level class.
BAND, WALL, TILES = by_rule("band")[0], by_rule("wall")[0], by_rule("tiles")[0]
