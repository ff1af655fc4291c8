"""Boolean masks held as bits: a slide's full-resolution masks at an eighth of their size.

A 1-GP slide's collagen, tissue and excluded masks at 2.5 µm/px are 6554² pixels: 43 MB
each as NumPy bool, 5.4 MB as bits. :class:`BitMask` keeps them packed (``np.packbits``
along rows) while the tiles fill them and the fibre traits and the QC overlay read them,
and unpacks only the windows asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Rows unpacked at a time into a caller's buffer (:meth:`BitMask.unpack`).
_BAND_ROWS = 256


class BitMask:
    """A 2-D boolean mask stored 8 pixels to a byte (``np.packbits(mask, axis=1)``).

    Slicing with two unit-step slices reads or writes a window as a bool ndarray (what the
    tile loop and the trait windows do, with NumPy's semantics for slices within the mask);
    :meth:`unpack` and ``np.asarray`` give the whole mask.

    Parameters
    ----------
    shape : tuple of 2 int
        Height and width, pixels.
    bits : ndarray of uint8, optional
        Packed rows, shape ``(height, ceil(width / 8))``; all False by default.

    Examples
    --------
    >>> m = BitMask((3, 10))
    >>> m[1:3, 4:9] = True
    >>> m.unpack().astype(int)[1]
    array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    >>> bool((np.asarray(m) == BitMask.pack(np.asarray(m)).unpack()).all())
    True
    """

    __slots__ = ("bits", "shape")
    ndim = 2
    dtype = np.dtype(bool)

    def __init__(self, shape: tuple[int, int], bits: np.ndarray | None = None) -> None:
        h, w = (int(shape[0]), int(shape[1]))
        self.shape = (h, w)
        self.bits = np.zeros((h, -(-w // 8)), np.uint8) if bits is None else bits
        if self.bits.shape != (h, -(-w // 8)) or self.bits.dtype != np.uint8:
            msg = f"bits of shape {self.bits.shape} ({self.bits.dtype}) do not hold a {h}x{w} mask"
            raise ValueError(msg)

    @classmethod
    def pack(cls, mask: np.ndarray) -> BitMask:
        """The bits of a 2-D bool mask."""
        mask = np.asarray(mask, bool)
        return cls(mask.shape, np.packbits(mask, axis=1))

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return int(self.bits.nbytes)

    @property
    def size(self) -> int:
        """Pixels of the mask."""
        return self.shape[0] * self.shape[1]

    def unpack(self, value: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """The whole mask: bool, or uint8 0/``value`` when ``value`` is not 1 (e.g. 255 for
        an image, without a bool copy first).

        ``out`` (uint8, the mask's shape) is filled and returned instead of a new array, band
        by band: one buffer serves several masks in turn."""
        if out is None:
            full = np.unpackbits(self.bits, axis=1, count=self.shape[1])
            if value != 1:
                full *= np.uint8(value)
            return full.view(bool) if value == 1 else full
        if out.shape != self.shape or out.dtype != np.uint8:
            msg = f"out must be uint8 of shape {self.shape}, not {out.dtype} {out.shape}"
            raise ValueError(msg)
        for y in range(0, self.shape[0], _BAND_ROWS):
            band = out[y : y + _BAND_ROWS]
            band[...] = np.unpackbits(self.bits[y : y + _BAND_ROWS], axis=1, count=self.shape[1])
            if value != 1:
                band *= np.uint8(value)
        return out.view(bool) if value == 1 else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.unpack()
        return out if dtype is None else out.astype(dtype, copy=False)

    def any(self) -> bool:
        """Whether any pixel is True (padding bits are always False)."""
        return bool(self.bits.any())

    def count(self) -> int:
        """True pixels."""
        return int(np.bitwise_count(self.bits).sum()) if hasattr(np, "bitwise_count") else \
            int(np.unpackbits(self.bits).sum())

    def _window(self, key: Any) -> tuple[int, int, int, int] | None:
        """(y0, y1, x0, x1) of a pair of unit-step slices, clipped as NumPy clips them;
        None for any other key."""
        if not (isinstance(key, tuple) and len(key) == 2
                and all(isinstance(k, slice) for k in key)):
            return None
        (y0, y1, sy), (x0, x1, sx) = (k.indices(n) for k, n in zip(key, self.shape, strict=True))
        if sy != 1 or sx != 1:
            return None
        return y0, max(y1, y0), x0, max(x1, x0)

    def __getitem__(self, key: Any) -> np.ndarray:
        win = self._window(key)
        if win is None:
            return self.unpack()[key]
        y0, y1, x0, x1 = win
        b0 = x0 // 8
        out = np.unpackbits(self.bits[y0:y1, b0 : -(-x1 // 8)], axis=1)
        return np.ascontiguousarray(out[:, x0 - 8 * b0 : x1 - 8 * b0]).view(bool)

    def __setitem__(self, key: Any, value: Any) -> None:
        win = self._window(key)
        if win is None:
            msg = "a BitMask is written through two unit-step slices"
            raise TypeError(msg)
        y0, y1, x0, x1 = win
        if y1 == y0 or x1 == x0:
            return
        b0, b1 = x0 // 8, -(-x1 // 8)
        block = np.unpackbits(self.bits[y0:y1, b0:b1], axis=1)
        block[:, x0 - 8 * b0 : x1 - 8 * b0] = np.asarray(value, bool)
        self.bits[y0:y1, b0:b1] = np.packbits(block, axis=1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitMask):
            return NotImplemented
        return self.shape == other.shape and bool(np.array_equal(self.bits, other.bits))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BitMask({self.shape[0]}x{self.shape[1]}, {self.count()} set)"
