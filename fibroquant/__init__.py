"""fibroquant: collagen proportionate area (CPA) of stained liver sections.

Slides in, per-mouse fibrosis tables and a treated-versus-control comparison out.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fibroquant")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
