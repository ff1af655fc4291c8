"""The staining protocols fibroquant measures and the stains of each (no heavy imports, so
the command line can list them).

A new protocol is a member of :class:`Stain` and its stain names in :data:`STAIN_NAMES` here,
its vectors in :data:`fibroquant.stains.PRESETS`, and a settings file in ``configs/``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["STAIN_NAMES", "Stain"]


class Stain(StrEnum):
    """Staining protocols fibroquant knows (``--stain``, ``stains.stain``); the names labs use
    for them are accepted too, in any case (``PSR``, ``picrosirius``, ``trichrome``...)."""

    SIRIUS_RED = "sirius-red"
    MASSON = "masson"

    @classmethod
    def _missing_(cls, value: object) -> Stain | None:
        key = "".join(ch for ch in str(value).casefold() if ch.isalnum())
        return _STAIN_ALIASES.get(key)


#: Other names of each protocol, as :meth:`Stain._missing_` folds them (letters and digits).
_STAIN_ALIASES = {
    **dict.fromkeys(("siriusred", "sirius", "psr", "picrosirius", "picrosiriusred", "sr"),
                    Stain.SIRIUS_RED),
    **dict.fromkeys(("masson", "massons", "massontrichrome", "massonstrichrome", "trichrome",
                     "mt"), Stain.MASSON),
}


#: Stain names of each protocol's colour-deconvolution matrix, collagen stain first, by the
#: protocol's name; ``masson-light-green`` is Masson's variant chosen by ``masson_collagen``.
STAIN_NAMES: dict[str, tuple[str, ...]] = {
    "sirius-red": ("sirius-red", "picric-acid", "iron-haematoxylin"),
    "masson": ("aniline-blue", "ponceau-fuchsin", "iron-haematoxylin"),
    "masson-light-green": ("light-green", "ponceau-fuchsin", "iron-haematoxylin"),
}
