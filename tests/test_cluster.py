"""A study run through dask-jobqueue's SLURM path gives the local run's tables.

A fake ``sbatch``/``squeue``/``scancel`` on PATH records each job script and runs it on this
machine (the Dask worker command, on loopback), so the run goes through SLURMCluster exactly as
on a cluster: job script, submission, workers joining the scheduler of the submitting process,
jobs cancelled at the end.
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fibroquant.cli import app
from fibroquant.cluster import job_script, make_cluster
from fibroquant.config import ClusterSettings, load_settings
from fibroquant.errors import ConfigError
from fibroquant.run import analyze_folder

TABLES = ("slides", "mice", "groups")

FAKE_SBATCH = """\
#!/usr/bin/env bash
# fake sbatch: keep the job script, run it here in its own process group
set -eu
n=$(ls "$FAKE_SLURM_DIR" | grep -c '^job-.*\\.sh$' || true)
id=$((4200 + n))
cp "$1" "$FAKE_SLURM_DIR/job-$id.sh"
setsid bash "$FAKE_SLURM_DIR/job-$id.sh" > "$FAKE_SLURM_DIR/job-$id.log" 2>&1 < /dev/null &
echo $! > "$FAKE_SLURM_DIR/job-$id.pid"
echo "Submitted batch job $id"
"""
FAKE_SCANCEL = """\
#!/usr/bin/env bash
# fake scancel: stop the job's process group (the one the fake sbatch started)
for id in "$@"; do
  echo "$id" >> "$FAKE_SLURM_DIR/cancelled"
  pid=$(cat "$FAKE_SLURM_DIR/job-$id.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
done
"""
FAKE_SQUEUE = """\
#!/usr/bin/env bash
echo "JOBID PARTITION NAME USER ST TIME NODES"
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """A folder where the fake SLURM keeps job scripts, logs and pids; its tools on PATH."""
    jobs = tmp_path / "slurm"
    bin_dir = tmp_path / "bin"
    jobs.mkdir()
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL),
                       ("squeue", FAKE_SQUEUE)):
        tool = bin_dir / name
        tool.write_text(text)
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(jobs))
    return jobs


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    frames = {t: pd.read_csv(out / f"{t}.csv") for t in TABLES}
    frames["slides"] = frames["slides"].drop(columns=["seconds"])  # wall time per slide
    return frames


def test_slurm_job_script_from_the_settings() -> None:
    cfg = ClusterSettings(cores=8, memory="32GB", walltime="12:00:00", queue="short",
                          account="liverlab", job_extra_directives=["--qos=normal"],
                          job_script_prologue=["module load python/3.11"], interface="lo")
    script = job_script("slurm", cfg)
    for line in ("#SBATCH -p short", "#SBATCH -A liverlab", "#SBATCH -n 1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH -t 12:00:00", "#SBATCH --qos=normal",
                 "module load python/3.11"):
        assert line in script
    assert "--nthreads 8" in script
    assert "--nworkers" not in script  # one worker process per job


def test_pbs_and_sge_scripts() -> None:
    cfg = ClusterSettings(cores=4, memory="8GB", queue="batch", account="p1", interface="lo")
    assert "#PBS -q batch" in job_script("pbs", cfg)
    assert "#PBS -A p1" in job_script("pbs", cfg)
    sge = job_script("sge", cfg)
    assert "#$ -q batch" in sge
    assert "#$ -P p1" in sge
    with pytest.raises(ConfigError, match="expected one of slurm, pbs, sge, local"):
        make_cluster("lsf", cfg)


def test_cluster_section_does_not_change_the_settings_hash(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("cluster:\n  kind: slurm\n  cores: 16\n  jobs: 10\n")
    settings = load_settings(config)
    assert (settings.cluster.kind, settings.cluster.cores, settings.cluster.jobs) == (
        "slurm", 16, 10)
    assert settings.settings_hash() == load_settings().settings_hash()
    config.write_text("cluster:\n  kind: slurm\n  corez: 16\n")
    with pytest.raises(ConfigError, match=r"cluster\.corez: unknown setting; did you mean cluster\.cores\?"):
        load_settings(config)


@pytest.mark.slow
def test_slurm_run_gives_the_local_tables(study, fake_slurm: Path, tmp_path: Path,
                                          monkeypatch) -> None:
    """The whole CLI through SLURMCluster + fake sbatch; the submitter alone writes the store."""
    from fibroquant import store as store_module

    local = tmp_path / "local"
    analyze_folder(study, local, load_settings(), samples=study / "samples.csv", workers=1)

    writers: list[int] = []  # process ids that put a record into the store
    put = store_module.ResultStore.put_result

    def spy(self, rec, **kw):
        writers.append(os.getpid())
        return put(self, rec, **kw)

    monkeypatch.setattr(store_module.ResultStore, "put_result", spy)
    config = tmp_path / "cluster.yaml"
    config.write_text(textwrap.dedent("""\
        cluster:
          cores: 2
          memory: 2GB
          walltime: "00:10:00"
          queue: debug
          account: liverlab
          jobs: 1
          interface: lo
          job_extra_directives: ["--qos=test"]
        """))
    out = tmp_path / "slurm-out"
    res = CliRunner().invoke(app, ["analyze", str(study), "--out", str(out), "--samples",
                                   str(study / "samples.csv"), "--config", str(config),
                                   "--cluster", "slurm"])
    assert res.exit_code == 0, res.output
    scripts = sorted(fake_slurm.glob("job-*.sh"))
    assert len(scripts) == 1  # one job, as configured
    script = scripts[0].read_text()
    assert "#SBATCH -p debug" in script
    assert "#SBATCH --qos=test" in script
    assert "distributed.cli.dask_worker tcp://127.0.0.1:" in script
    log = scripts[0].with_suffix(".log").read_text()
    assert "Starting Worker" in log or "Start worker" in log
    assert (fake_slurm / "cancelled").read_text().split() == [scripts[0].stem[4:]]
    # the slides were measured in the job's worker; only this process wrote records
    n_slides = len(pd.read_csv(study / "samples.csv"))
    assert len(writers) == n_slides
    assert set(writers) == {os.getpid()}
    local_t, slurm_t = _tables(local), _tables(out)
    for t in TABLES:
        pd.testing.assert_frame_equal(local_t[t], slurm_t[t], check_exact=True, obj=t)


def test_refused_job_is_a_one_line_error(study, tmp_path: Path, monkeypatch) -> None:
    """sbatch refusing the job ends the run with its message, instead of waiting for workers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/usr/bin/env bash\n"
                      "echo 'sbatch: error: invalid partition specified: bogus' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "c.yaml"
    config.write_text("cluster:\n  queue: bogus\n  interface: lo\n")
    out = tmp_path / "out"
    args = ["analyze", str(study), "--out", str(out), "--config", str(config)]
    res = CliRunner().invoke(app, [*args, "--cluster", "slurm"])
    assert res.exit_code == 2
    assert ("error: --cluster slurm: sbatch refused 1 of 1 job(s): sbatch: error: invalid "
            "partition specified: bogus") in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, [*args, "--cluster", "slurm", "--scheduler", "tcp://h:8786"])
    assert res.exit_code == 2
    assert "--cluster and --scheduler: give one of them, not both" in res.output
