"""Imported by the local workers' forkserver (:func:`fibroquant.executor._worker_context`)
when fibre traits are on: loads skan's path tracing there (:func:`fibroquant.traits.warm_skan`;
compiled on a machine's first run), once per run, so that every worker forked from the server
inherits it instead of loading it itself. Starts no thread (the server forks every worker). A
failure here is left to the workers: each loads skan itself and reports its own error on its
slide."""

import contextlib

from fibroquant.cores import tune_gc
from fibroquant.traits import warm_skan

tune_gc()  # the load's or compile's allocations (and those of the workers forked from here)
with contextlib.suppress(Exception):  # the server must start whatever happens here
    warm_skan()
