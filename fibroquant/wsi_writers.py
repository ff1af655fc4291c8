"""Write one in-memory pyramid as the whole-slide formats fibroquant reads.

The same levels written as an Aperio-like SVS, an OME-TIFF (both with tifffile) and a DICOM WSI
(with wsidicom), losslessly, so that every reader should return exactly the same pixels, µm per
pixel and level geometry: the fixtures of ``tests/test_readers.py``, and a way to hand a
synthetic section (:mod:`fibroquant.synthetic`) to another tool in its format.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = ["pyramid_levels", "write_dicom_wsi", "write_ome_tiff", "write_svs_like"]


def pyramid_levels(rgb: np.ndarray, *, min_level_px: int = 256) -> list[np.ndarray]:
    """Halve ``rgb`` (``cv2.INTER_AREA``, sides floor-divided by 2) while the shorter side stays
    at least ``min_level_px``; return the levels, finest first (uint8 RGB)."""
    levels: list[np.ndarray] = [np.ascontiguousarray(rgb, dtype=np.uint8)]
    while min(levels[-1].shape[:2]) // 2 >= min_level_px:
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    return levels


def write_svs_like(path: str | Path, levels: Sequence[np.ndarray], mpp: float, *,
                   tile: int = 256, compression: str = "zlib") -> None:
    """Write an Aperio-like SVS: tiled levels as pages with an Aperio ImageDescription (``MPP``).

    As Aperio lays them out: level 0, then a small stripped thumbnail page, then the reduced
    levels (readers of SVS take the second page for the thumbnail).

    Parameters
    ----------
    path : str or Path
    levels : sequence of numpy.ndarray
        uint8 RGB levels, finest first.
    mpp : float
        Level-0 µm per pixel (the ``MPP =`` field).
    tile : int
        Tile side in pixels (multiple of 16).
    compression : str
        tifffile compression: lossless ``"zlib"`` (default) or ``"none"``; ``"jpeg"`` as real
        Aperio files.
    """
    import tifffile

    h, w = levels[0].shape[:2]
    header = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile})"
    opts: dict[str, Any] = {"photometric": "rgb", "metadata": None, "tile": (tile, tile),
                            "compression": None if compression == "none" else compression}
    with tifffile.TiffWriter(path, bigtiff=levels[0].size > 2**31) as tw:
        tw.write(levels[0], description=f"{header}|AppMag = 20|MPP = {mpp:.6f}", **opts)
        thumb = levels[-1][::2, ::2]
        tw.write(np.ascontiguousarray(thumb), description=f"{header} -> thumbnail",
                 photometric="rgb", metadata=None)
        for level in levels[1:]:
            lh, lw = level.shape[:2]
            tw.write(level, description=f"{header} -> {lw}x{lh}|MPP = {mpp:.6f}",
                     subfiletype=0, **opts)


def write_ome_tiff(path: str | Path, levels: Sequence[np.ndarray], mpp: float, *,
                   tile: int = 256, compression: str = "zlib") -> None:
    """Write a pyramidal OME-TIFF (reduced levels as SubIFDs, ``PhysicalSizeX`` in µm).

    Parameters are those of :func:`write_svs_like`.
    """
    import tifffile

    opts: dict[str, Any] = {"photometric": "rgb", "tile": (tile, tile),
                            "compression": None if compression == "none" else compression}
    with tifffile.TiffWriter(path, bigtiff=levels[0].size > 2**31, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1,
                 metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                           "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}, **opts)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **opts)


def write_dicom_wsi(folder: str | Path, levels: Sequence[np.ndarray], mpp: float, *,
                    tile: int = 256, name: str = "section") -> list[Path]:
    """Write a pyramid as a DICOM WSI (one uncompressed file per level) with wsidicom.

    Uncompressed (Explicit VR Little Endian) so that every reader returns exactly the pixels
    given: fixtures for comparing readers on identical content.

    Parameters
    ----------
    folder : str or Path
        Output folder (created).
    levels : sequence of numpy.ndarray
        uint8 RGB ``(h, w, 3)`` levels, finest first; level ``i`` covers the same area as
        level 0 (its pixel spacing is ``mpp`` times level 0's width over its width).
    mpp : float
        Level-0 µm per pixel, written as PixelSpacing.
    tile : int
        Tile side in pixels.
    name : str
        Slide identifier written in the metadata.

    Returns
    -------
    list of Path
        The files written.
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from wsidicom import WsiDicom  # type: ignore[import-untyped]
    from wsidicom.codec import Encoder  # type: ignore[import-untyped]
    from wsidicom.geometry import Size, SizeMm  # type: ignore[import-untyped]
    from wsidicom.instance import ImageData, WsiInstance  # type: ignore[import-untyped]
    from wsidicom.metadata import (  # type: ignore[import-untyped]
        Equipment,
        Image,
        Label,
        OpticalPath,
        Patient,
        Pyramid,
        Series,
        Slide,
        Study,
        WsiMetadata,
    )
    from wsidicom.metadata.image import ImageType  # type: ignore[import-untyped]
    from wsidicom.metadata.sample import SlideSample  # type: ignore[import-untyped]
    from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema  # type: ignore[import-untyped]
    from wsidicom.source import Source  # type: ignore[import-untyped]

    class _ArrayLevel(ImageData):
        """One uncompressed level served tile by tile from memory."""

        transfer_syntax = ExplicitVRLittleEndian
        samples_per_pixel = 3
        photometric_interpretation = "RGB"
        bits = 8
        image_coordinate_system = None
        thread_safe = True
        lossy_compression = None
        transcoder = None
        imaged_size = None

        def __init__(self, rgb: np.ndarray, level_mpp: float) -> None:
            self.rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            self.level_mpp = level_mpp
            super().__init__(Encoder.create(ExplicitVRLittleEndian, 8, "RGB"))

        @property
        def image_size(self) -> Any:
            return Size(self.rgb.shape[1], self.rgb.shape[0])

        @property
        def tile_size(self) -> Any:
            return Size(tile, tile)

        @property
        def pixel_spacing(self) -> Any:
            return SizeMm(self.level_mpp / 1000.0, self.level_mpp / 1000.0)

        def get_decoded_tile(self, tile_point: Any, z: float, path: str,
                             cache: bool = True) -> np.ndarray:
            out = np.full((tile, tile, 3), 255, np.uint8)  # edge tiles padded with white
            y, x = tile_point.y * tile, tile_point.x * tile
            part = self.rgb[y : y + tile, x : x + tile]
            out[: part.shape[0], : part.shape[1]] = part
            return out

        def get_encoded_tile(self, tile: Any, z: float, path: str) -> bytes:
            return self.get_decoded_tile(tile, z, path).tobytes()

    metadata = WsiMetadata(
        study=Study(uid=generate_uid()), series=Series(uid=generate_uid()),
        patient=Patient(), equipment=Equipment(),
        slide=Slide(identifier=name, samples=[SlideSample(identifier=name, uid=generate_uid())]),
        pyramid=Pyramid(image=Image(), optical_paths=[OpticalPath()], uid=generate_uid()),
        label=Label(), frame_of_reference_uid=generate_uid(),
        dimension_organization_uids=[generate_uid()],
    )
    base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)
    width0 = levels[0].shape[1]
    instances = [
        WsiInstance.create_instance(_ArrayLevel(rgb, mpp * width0 / rgb.shape[1]),
                                    copy.deepcopy(base), ImageType.VOLUME, i)
        for i, rgb in enumerate(levels)
    ]

    class _Levels(Source):
        base_dataset = base
        level_instances = instances
        label_instances: list[Any] = []  # noqa: RUF012
        overview_instances: list[Any] = []  # noqa: RUF012
        thumbnail_instances: list[Any] = []  # noqa: RUF012
        annotation_instances: list[Any] = []  # noqa: RUF012

        @property
        def metadata(self) -> Any:
            return metadata

        def close(self) -> None:
            pass

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with WsiDicom(_Levels()) as wsi:
        written = wsi.save(folder)
    return [Path(str(p)) for p in written]
