"""Run a study's slides on a batch cluster (SLURM, PBS, SGE) through dask-jobqueue.

``fibroquant analyze --cluster slurm`` (or ``cluster: {kind: slurm}`` in the YAML settings)
starts a Dask scheduler in the submitting process and submits ``jobs`` batch jobs, each one Dask
worker of ``cores`` threads (:class:`fibroquant.config.ClusterSettings`). The run hands that
cluster to :func:`fibroquant.pipeline.run_tasks` like any Dask scheduler: workers measure slides
and return each slide's record; the submitting process alone writes them into the results store
(no SQLite file is shared over NFS). Slides and the output folder must be on a disk the nodes
see (workers read the slides and write QC overlays and masks there).

``local`` builds a :class:`distributed.LocalCluster` of the same shape on this machine (for
trying a configuration, or a large node used as one machine).
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fibroquant.config import ClusterSettings
from fibroquant.errors import ConfigError, FibroquantError

__all__ = ["CLUSTER_KINDS", "cluster_for", "job_script", "make_cluster"]

CLUSTER_KINDS = ("slurm", "pbs", "sge", "local")
"""Batch systems ``--cluster`` accepts."""


def _job_kwargs(kind: str, cfg: ClusterSettings) -> dict[str, Any]:
    """dask-jobqueue keyword arguments of one job, from the settings."""
    kwargs: dict[str, Any] = {
        "cores": cfg.cores,
        "processes": 1,  # one worker per job; its threads run one slide each
        "memory": cfg.memory,
        "walltime": cfg.walltime,
        "queue": cfg.queue,
        "job_extra_directives": list(cfg.job_extra_directives),
        "job_script_prologue": list(cfg.job_script_prologue),
        "python": cfg.python or sys.executable,
        "job_name": "fibroquant",
        # the scheduler lives in the submitting process: its dashboard on a free port
        "scheduler_options": {"dashboard_address": ":0"},
    }
    if cfg.account is not None:
        kwargs["account" if kind in ("slurm", "pbs") else "project"] = cfg.account
    for key in ("interface", "local_directory", "log_directory"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


def make_cluster(kind: str, cfg: ClusterSettings) -> Any:
    """Build (not yet scale) a Dask cluster of ``kind`` shaped by ``cfg``.

    Parameters
    ----------
    kind : {"slurm", "pbs", "sge", "local"}
    cfg : ClusterSettings

    Returns
    -------
    dask_jobqueue.JobQueueCluster or distributed.LocalCluster

    Raises
    ------
    ConfigError
        Unknown kind, or settings dask-jobqueue refuses.
    """
    if kind not in CLUSTER_KINDS:
        msg = f"--cluster {kind!r}: expected one of {', '.join(CLUSTER_KINDS)}"
        raise ConfigError(msg)
    if kind == "local":
        from distributed import LocalCluster

        return LocalCluster(n_workers=0, threads_per_worker=cfg.cores, processes=True,
                            dashboard_address=":0",
                            **({"interface": cfg.interface} if cfg.interface else {}))
    import dask_jobqueue

    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
           "sge": dask_jobqueue.SGECluster}[kind]
    try:
        return cls(**_job_kwargs(kind, cfg))
    except (ValueError, TypeError) as exc:
        msg = f"cluster settings ({kind}): {exc}"
        raise ConfigError(msg) from None


def job_script(kind: str, cfg: ClusterSettings) -> str:
    """The batch script one job runs (``#SBATCH`` lines and the Dask worker command).

    Starts and stops a scheduler to fill in its address; shown by ``--cluster ... --dry-run``
    style checks and by the tests.
    """
    cluster = make_cluster(kind, cfg)
    try:
        return str(cluster.job_script()) if hasattr(cluster, "job_script") else ""
    finally:
        cluster.close()


@contextmanager
def cluster_for(kind: str, cfg: ClusterSettings) -> Iterator[Any]:
    """A cluster scaled to ``cfg.jobs`` jobs for the time of a run, then closed (jobs cancelled).

    Parameters
    ----------
    kind : {"slurm", "pbs", "sge", "local"}
    cfg : ClusterSettings

    Yields
    ------
    cluster
        Pass it as ``scheduler=`` to :func:`fibroquant.run.analyze_folder`.

    Raises
    ------
    FibroquantError
        The batch system is missing or refused the jobs (e.g. a wrong partition): the message
        is the submit command's own error line.
    """
    levels: dict[str, int] = {}
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # no --verbose: the scheduler
        import distributed  # noqa: F401 - sets up its loggers   # in this process logs every
        for name in ["distributed", *logging.root.manager.loggerDict]:  # connection at INFO
            if name.startswith("distributed"):
                log = logging.getLogger(name)
                levels[name] = log.level
                log.setLevel(max(log.level, logging.WARNING))
    try:
        cluster = make_cluster(kind, cfg)
        try:
            if kind == "local":
                cluster.scale(cfg.jobs)
            else:
                _submit(cluster, kind, cfg.jobs)
            yield cluster
        finally:
            cluster.close()
    finally:
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)


class _SubmitErrors(logging.Handler):
    """Collects the submit command's error lines that dask-jobqueue only logs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + " " + str(record.exc_info[1] if record.exc_info else "")
        self.lines += [ln.strip() for ln in text.splitlines() if "error" in ln.lower()
                       and "Command exited" not in ln and "Exception in callback" not in ln]


def _submit(cluster: Any, kind: str, jobs: int) -> None:
    """Submit the jobs now and raise if the batch system refused one.

    ``scale`` only schedules the submission; a refused job would leave the run waiting forever
    for a worker. Jobs that got no job id are marked failed (nothing to cancel), so that
    closing the cluster works.
    """
    tool = cluster.job_cls.submit_command.split()[0]
    if shutil.which(tool) is None:
        msg = f"--cluster {kind}: {tool} not found (run fibroquant on the cluster's login node)"
        raise FibroquantError(msg)
    catcher = _SubmitErrors()
    loggers = [logging.getLogger(n) for n in ("tornado.application", "distributed.deploy.spec",
                                              "dask_jobqueue")]
    propagate = [lg.propagate for lg in loggers]
    for lg in loggers:  # the refusal is reported once, below, not as a logged traceback
        lg.addHandler(catcher)
        lg.propagate = False
    try:
        cluster.scale(jobs=jobs)
        cluster.sync(cluster._correct_state)  # waits for the submissions scale scheduled
    finally:
        for lg, prop in zip(loggers, propagate, strict=True):
            lg.removeHandler(catcher)
            lg.propagate = prop
    refused = [name for name, job in cluster.workers.items()
               if getattr(job, "job_id", None) is None]
    if refused:
        from distributed.core import Status

        for name in refused:  # never started: nothing to cancel when the cluster closes
            cluster.workers[name].status = Status.failed
        reason = catcher.lines[-1] if catcher.lines else "no message"
        msg = f"--cluster {kind}: {tool} refused {len(refused)} of {jobs} job(s): {reason}"
        raise FibroquantError(msg[:500])
