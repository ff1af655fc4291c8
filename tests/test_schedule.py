"""The README's cron line and docs/systemd's service run as written, in the bare environment
cron and systemd give a job (``env -i``: HOME and PATH=/usr/bin:/bin only), on a tiny study.

Only the study's and the installation's paths are replaced (by ones under a temporary folder,
``/opt/fibroquant/.venv/bin/fibroquant`` by a script that runs this checkout's fibroquant as an
installed console script would); the command strings are otherwise the documented ones.
"""

from __future__ import annotations

import getpass
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

STUDY = "/data/liver-study"
INSTALL = "/opt/fibroquant"


def _cron_line(readme: str) -> str:
    block = readme.split("```cron\n", 1)[1].split("```", 1)[0]
    (line,) = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    return line


def _unit_lines(text: str, key: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(key + "=")]


@pytest.fixture
def place(tmp_path: Path, repo_root: Path) -> tuple[Path, dict[str, str]]:
    """A study of two tiny slides with a sample sheet, no results folder, and an installed-
    looking ``fibroquant``; returns the root and the bare environment."""
    study = tmp_path / STUDY.lstrip("/")
    study.mkdir(parents=True)
    for i, name in enumerate(("m1.tif", "m2.tif")):
        rgb, _ = make_section(SectionParams(shape=(256, 320), mpp=0.5), rng=10 + i)
        write_pyramid_tiff(study / name, rgb, 0.5)
    (study / "samples.csv").write_text("slide,mouse,group\nm1.tif,m1,control\nm2.tif,m2,MSC\n")
    exe = tmp_path / INSTALL.lstrip("/") / ".venv" / "bin" / "fibroquant"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(repo_root))} exec "
                   f"{shlex.quote(sys.executable)} -m fibroquant \"$@\"\n")
    exe.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return tmp_path, {"HOME": str(home), "PATH": "/usr/bin:/bin"}


def _env_i(env: dict[str, str]) -> list[str]:
    """``env -i HOME=... PATH=/usr/bin:/bin``: nothing of this process's environment."""
    return ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())]


def _here(text: str, root: Path) -> str:
    return text.replace(STUDY, f"{root}{STUDY}").replace(INSTALL, f"{root}{INSTALL}")


def _tables_written(root: Path) -> None:
    results = root / STUDY.lstrip("/") / "results"
    for name in ("slides.csv", "mice.csv", "groups.csv", "results.xlsx", "report.html"):
        assert (results / name).is_file(), name
    assert (results / "slides.csv").read_text().count(",ok,") == 2


@pytest.mark.slow
def test_readme_cron_line_runs_in_crons_environment(repo_root: Path, place) -> None:
    """cron runs the line with /bin/sh in HOME, PATH=/usr/bin:/bin: the results folder is
    made, the tables appear, and cron.log has the run's timestamped lines."""
    root, env = place
    line = _cron_line((repo_root / "README.md").read_text(encoding="utf-8"))
    fields = line.split(None, 5)
    assert fields[:5] == ["0", "2", "*", "*", "*"]
    assert "%" not in fields[5]  # cron would cut the command there
    run = subprocess.run([*_env_i(env), "/bin/sh", "-c", _here(fields[5], root)],
                         cwd=env["HOME"], capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    _tables_written(root)
    log = (root / STUDY.lstrip("/") / "results" / "cron.log").read_text(encoding="utf-8")
    assert "measured 2, failed 0" in log
    assert log.lstrip()[:2] == "20"  # lines start with an ISO timestamp when not a terminal


@pytest.mark.slow
def test_systemd_service_runs_as_written(repo_root: Path, place) -> None:
    """The service's ExecStartPre and ExecStart, split as systemd splits them and run with
    only HOME and PATH, write the tables; ``systemd-analyze verify`` accepts the unit pair."""
    root, env = place
    units = repo_root / "docs" / "systemd"
    service = (units / "fibroquant-liver.service").read_text(encoding="utf-8")
    commands = _unit_lines(service, "ExecStartPre") + _unit_lines(service, "ExecStart")
    assert len(commands) == 2
    for command in commands:
        run = subprocess.run([*_env_i(env), *shlex.split(_here(command, root))], cwd="/",
                             capture_output=True, text=True, timeout=240, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
    _tables_written(root)
    timer = (units / "fibroquant-liver.timer").read_text(encoding="utf-8")
    assert _unit_lines(timer, "OnCalendar") == ["*-*-* 02:00"]
    if shutil.which("systemd-analyze") is None:
        return
    local = root / "units"
    local.mkdir()
    (local / "fibroquant-liver.service").write_text(
        _here(service, root).replace("User=fibroquant", f"User={getpass.getuser()}"))
    (local / "fibroquant-liver.timer").write_text(timer)
    verify = subprocess.run(["systemd-analyze", "verify", str(local / "fibroquant-liver.service"),
                             str(local / "fibroquant-liver.timer")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
