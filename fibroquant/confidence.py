"""Per-slide confidence: what makes a slide's CPA doubtful, named in a ``qc_flags`` column.

Every flag is a short phrase a reader acts on (look at the overlay, re-stain, exclude the
slide); none changes the measurement. They are joined with ``"; "`` in ``slides.csv`` and
shown in the report and on the console.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fibroquant.exclusions import large_columns

#: Collagen level (OD) below which the collagen stain is faint: its threshold lies within a
#: few tenths of OD of the parenchyma, where stain noise moves CPA by points.
FAINT_COLLAGEN_OD = 0.2
#: Exclusions (the classes marked ``large`` in :data:`fibroquant.exclusions.CLASSES`: folds,
#: bubbles, unfocused tiles) above this share of the section (%): the measured area may not
#: represent the section.
LARGE_EXCLUSIONS_PERCENT = 10.0
#: Tissue below this area (mm²): a few lobules at most, too little to stand for a liver.
LITTLE_TISSUE_MM2 = 0.05

#: The flags, in the order they are listed.
FLAGS = ("wrong stain", "faint stain", "pale counterstain", "large exclusions",
         "little tissue", "few collagen pixels to calibrate", "µm/px not the file's")
#: Relative difference between the sample sheet's µm/px and the file's own above which the
#: slide is flagged (areas scale with its square: 5 % is 10 % of every area).
MPP_MISMATCH = 0.05


def _number(record: Mapping[str, Any], key: str) -> float:
    try:
        value = float(record.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value


def qc_flags(record: Mapping[str, Any], *, pale_counterstain: bool = False) -> list[str]:
    """What makes one measured slide's CPA doubtful (names from :data:`FLAGS`).

    Parameters
    ----------
    record : mapping
        The slide's row: ``status`` or ``wrong_stain``, ``threshold_method``, ``collagen_level_od`` (OD),
        ``tissue_area_mm2`` and the excluded areas marked ``large`` in
        :data:`fibroquant.exclusions.CLASSES` (``fold_area_mm2``, ``bubble_area_mm2``,
        ``unfocused_area_mm2``; mm²), ``mpp`` and ``file_mpp`` (the sample sheet's µm/px and
        the file's own); missing values count as unknown (no flag).
    pale_counterstain : bool
        The collagen levels were taken by intensity because the counterstain is too pale to
        tell parenchyma from collagen by colour.

    Returns
    -------
    list of str
        Empty for a slide with nothing doubtful.

    Examples
    --------
    >>> qc_flags({"status": "ok", "threshold_method": "relative", "collagen_level_od": 0.15,
    ...           "tissue_area_mm2": 2.0, "fold_area_mm2": 0.5})
    ['faint stain', 'large exclusions']
    """
    flags = []
    if record.get("wrong_stain") is True or str(record.get("status", "")) == "wrong-stain":
        flags.append("wrong stain")
    level = _number(record, "collagen_level_od")
    relative = record.get("threshold_method") == "relative"
    if relative and math.isfinite(level) and level < FAINT_COLLAGEN_OD:
        flags.append("faint stain")
    if pale_counterstain:
        flags.append("pale counterstain")
    tissue = _number(record, "tissue_area_mm2")
    excluded = sum(v for v in (_number(record, k) for k in large_columns()) if math.isfinite(v))
    if math.isfinite(tissue) and excluded > LARGE_EXCLUSIONS_PERCENT / 100 * (tissue + excluded):
        flags.append("large exclusions")
    if math.isfinite(tissue) and tissue < LITTLE_TISSUE_MM2:
        flags.append("little tissue")
    if relative and not math.isfinite(level):
        flags.append("few collagen pixels to calibrate")
    given, own = _number(record, "mpp"), _number(record, "file_mpp")
    if math.isfinite(given) and math.isfinite(own) and own > 0 and \
            abs(given / own - 1) > MPP_MISMATCH:
        flags.append("µm/px not the file's")
    return flags
