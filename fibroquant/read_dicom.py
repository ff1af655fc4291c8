"""The DICOM whole-slide reader (``wsidicom``).

A DICOM WSI is a set of files (one or more per pyramid level, plus label and overview images)
sharing a series. fibroquant opens either a folder of them or one of its ``.dcm`` files (then the
files of the same series beside it make the pyramid), and lists a folder of DICOM files as one
slide per series, named by its level-0 file (:func:`representatives`), whose content the results
store fingerprints.

The resolution is the level-0 ``PixelSpacing`` (mm, stored in the file), converted to µm per
pixel; a pyramid without it has no resolution (``mpp=None``), never a guessed one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fibroquant.errors import SlideReadError
from fibroquant.slides import DICOM_SUFFIXES, SlideBase, _PixelFormat, _short

__all__ = ["READER", "WSI_SOP_CLASS", "DicomSlide", "open_path", "representatives"]

logger = logging.getLogger(__name__)

READER = "wsidicom"
"""The reader's name, as ``fibroquant inspect`` reports it."""
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage: the SOP class of DICOM WSI files."""
_RGB = _PixelFormat()


def _dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES)


def _header(path: Path) -> Any | None:
    """The DICOM header of a WSI file (pixels not read), or None for any other file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SeriesInstanceUID", "ImageType",
                                            "TotalPixelMatrixColumns", "TotalPixelMatrixRows"])
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        logger.info("%s: not a readable DICOM file (%s)", path.name, _short(exc))
        return None
    if str(getattr(ds, "SOPClassUID", "")) != WSI_SOP_CLASS:
        return None
    return ds


def _series_files(path: Path) -> tuple[list[Path], str | None]:
    """The files of the DICOM WSI series of ``path`` in its folder, and the series UID."""
    header = _header(path)
    if header is None:
        msg = f"{path.name}: not a DICOM whole-slide image (VL Whole Slide Microscopy) file"
        raise SlideReadError(msg)
    series = str(getattr(header, "SeriesInstanceUID", "") or "") or None
    if series is None:
        return [path], None
    files = []
    for other in _dcm_files(path.parent):
        h = header if other == path else _header(other)
        if h is not None and str(getattr(h, "SeriesInstanceUID", "")) == series:
            files.append(other)
    return files, series


def representatives(files: Iterable[Path]) -> list[Path]:
    """One file per DICOM WSI series among ``files``: the largest volume (level-0) image.

    Parameters
    ----------
    files : iterable of Path
        ``.dcm`` files of one folder.

    Returns
    -------
    list of Path
        Sorted; files that are not DICOM WSI are left out (logged).
    """
    best: dict[str, tuple[int, Path]] = {}
    for path in files:
        h = _header(path)
        if h is None:
            continue
        if "VOLUME" not in [str(v).upper() for v in (getattr(h, "ImageType", None) or [])]:
            continue  # label, overview, thumbnail
        area = int(getattr(h, "TotalPixelMatrixColumns", 0)) * int(
            getattr(h, "TotalPixelMatrixRows", 0))
        key = str(getattr(h, "SeriesInstanceUID", "") or path)
        if key not in best or area > best[key][0]:
            best[key] = (area, path)
    return sorted(p for _, p in best.values())


class DicomSlide(SlideBase):
    """A DICOM WSI pyramid read through wsidicom (whose file readers lock their own handles).

    Parameters
    ----------
    path : Path
        A folder of DICOM files, or one ``.dcm`` file of the pyramid (its series is opened).
    override : float or None
        Level-0 µm per pixel given by the user, replacing the file's.

    Raises
    ------
    SlideReadError
        wsidicom cannot open the files, or they hold no pyramid.
    """

    reader = READER
    format = "dicom"
    vendor = None

    def __init__(self, path: Path, override: float | None) -> None:
        from wsidicom import WsiDicom  # type: ignore[import-untyped]

        self.path = path
        files: list[Path] | Path = path if path.is_dir() else _series_files(path)[0]
        try:
            self._wsi = WsiDicom.open(files)
        except Exception as exc:
            msg = f"{path.name}: wsidicom cannot open this DICOM WSI ({_short(exc)})"
            raise SlideReadError(msg) from exc
        try:
            levels = list(self._wsi.levels)
            if not levels:
                msg = f"{path.name}: DICOM WSI without a pyramid (no VOLUME images)"
                raise SlideReadError(msg)
            base = levels[0]
            self._pyramid_levels = [int(lv.level) for lv in levels]
            spacing = base.pixel_spacing  # mm per pixel, from PixelSpacing
            mpp: float | None = None
            if spacing is not None and float(spacing.width) > 0:
                mpp = float(spacing.width) * 1000.0
            source = "DICOM PixelSpacing"
            if override is not None:
                mpp, source = override, "given"
            syntax = base.default_instance.image_data.transfer_syntax
            self.compression = getattr(syntax, "name", str(syntax))
            tile = base.tile_size
            self.tile_size = (int(tile.height), int(tile.width))
            self._set_levels([(int(lv.size.height), int(lv.size.width)) for lv in levels],
                             mpp, source)
        except SlideReadError:
            self._wsi.close()
            raise
        except Exception as exc:
            self._wsi.close()
            msg = f"{path.name}: damaged or unsupported DICOM WSI ({_short(exc)})"
            raise SlideReadError(msg) from exc

    def _read_inside(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        try:
            array = self._wsi.read_region((x0, y0), self._pyramid_levels[level],
                                          (x1 - x0, y1 - y0), as_array=True)
        except Exception as exc:
            msg = f"{self.path.name}: DICOM read failed at level {level} ({_short(exc)})"
            raise SlideReadError(msg) from exc
        return _RGB.convert(np.asarray(array))

    def close(self) -> None:
        """Close the DICOM files."""
        if not self._closed:
            self._closed = True
            self._wsi.close()


def open_path(path: Path, override: float | None) -> DicomSlide:
    """Open a DICOM WSI file or folder (the registry's entry point, see ``slides.open_slide``)."""
    return DicomSlide(path, override)
