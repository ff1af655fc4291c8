"""File names inside a fibroquant output folder, for modules that must not import the store.

:mod:`fibroquant.slides` needs them to skip output folders inside a slides folder without
pulling in :mod:`fibroquant.store` (SQLite, ``fcntl``); the store re-exports them.
"""

from __future__ import annotations

#: File name of the results store inside the output folder.
STORE_NAME = "fibroquant.sqlite"
#: File name of the lock file inside the output folder.
LOCK_NAME = ".fibroquant.lock"

#: File naming the slide measured in the run's own process right now (see
#: :func:`fibroquant.outdir.measuring_marker`); left behind only by a run that crashed.
MEASURING_NAME = ".fibroquant-measuring"

__all__ = ["LOCK_NAME", "MEASURING_NAME", "STORE_NAME"]
