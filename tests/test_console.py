"""The command line as a person and a script meet it: streams, log lines, warnings, help,
the README's schedule recipe (issue 23)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fibroquant.cli import app

REPO = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
COMMANDS = ["analyze", "demo", "inspect", "status", "watch", "compare", "stains", "agree", "train"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_short_flagged_and_plain(command: str | None) -> None:
    args = ([command] if command else []) + ["-h"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output
    assert "<bool>" not in res.output  # flags take no value
    assert "``" not in res.output
    assert ":func:" not in res.output
    if command is None:
        assert "--install-completion" in res.output


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "fibroquant", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_results_on_stdout_diagnostics_on_stderr_and_warnings_counted(study: Path,
                                                                       tmp_path: Path) -> None:
    """A misspelt group (`MCS` for `MSC`, one mouse) is warned about on the console, counted,
    and given no p value; stderr lines in a log are timestamped and unwrapped."""
    slides = tmp_path / "slides"
    shutil.copytree(study, slides)
    sheet = pd.read_csv(slides / "samples.csv")
    sheet.loc[sheet["mouse"] == "t3", "group"] = "MCS"
    sheet.to_csv(slides / "samples.csv", index=False)
    out = tmp_path / "a-long-output-folder-name-so-that-paths-exceed-eighty-columns" / "results"
    args = ["analyze", str(slides), "--samples", str(slides / "samples.csv"), "--out", str(out),
            "--workers", "1"]
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "CPA in MCS was" in res.stdout
    assert "no p value: 1 mouse (fewer than 3), one edit from 'MSC'" in res.stdout
    # MCS, MSC left with 2 mice, and the tiny sections' one-pixel fibres (width floor)
    assert "3 warning(s)" in res.stdout
    assert f"report: {out / 'report.html'}" in res.stdout.splitlines()  # one unwrapped line
    err_lines = res.stderr.splitlines()
    assert err_lines
    assert all(STAMP.match(line) for line in err_lines), err_lines[:3]
    assert any("slide(s) to measure" in line for line in err_lines)
    assert any(line.endswith(".tif: CPA " + line.rsplit("CPA ", 1)[-1]) for line in err_lines
               if "measured c1_s1.tif" in line)
    warn = [line for line in err_lines if "warning:" in line]
    assert len(warn) == 3
    assert "median fibre width of" in warn[0]
    assert "group 'MCS': 1 mouse (fewer than 3), one edit from 'MSC'" in warn[1]
    assert "group 'MSC': 2 mice (fewer than 3)" in warn[2]
    assert "CPA in" not in res.stderr

    quiet = _cli(*args, "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0
    assert "to measure" not in quiet.stderr
    assert "warning: group 'MCS'" in quiet.stderr  # warnings still reach the console
    assert "CPA in MSC was" in quiet.stdout
    assert "no p value: 2 mice (fewer than 3)" in quiet.stdout

    as_json = _cli(*args, "--json", cwd=tmp_path)
    data = json.loads(as_json.stdout)
    assert data["exit_code"] == 0
    assert data["skipped"] == 7
    assert len(data["warnings"]) == 3
    assert {g["group"] for g in data["groups"]} == {"control", "MSC", "MCS"}

    verbose = _cli("-v", *args, cwd=tmp_path)
    assert verbose.returncode == 0
    assert "matplotlib" not in verbose.stderr
    assert "PIL" not in verbose.stderr


@pytest.mark.slow
def test_readme_cron_line_works_in_crons_environment(tmp_path: Path) -> None:
    """The README's cron line, run as cron runs it (sh, a near-empty environment, PATH
    /usr/bin:/bin), with results/ not there yet."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```cron\n(.*?)```", text, re.DOTALL)
    assert block is not None
    line = next(x for x in block.group(1).splitlines() if x and not x.startswith("#"))
    command = line.split(None, 5)[5]  # after the five time fields
    assert "%" not in command  # cron would cut the line there
    from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

    study = tmp_path / "data" / "liver-study"
    study.mkdir(parents=True)
    rows = []
    for i, group in enumerate(["control", "control", "MSC"]):
        rgb, _ = make_section(SectionParams(shape=(256, 256), mpp=1.0), rng=i)
        write_pyramid_tiff(study / f"s{i}.tif", rgb, 1.0, min_level_px=128)
        rows.append({"slide": f"s{i}.tif", "mouse": f"m{i}", "group": group})
    pd.DataFrame(rows).to_csv(study / "samples.csv", index=False)
    # the README's install location and data folder, mapped onto this machine
    fibroquant_bin = shutil.which("fibroquant") or str(Path(sys.executable).parent / "fibroquant")
    if not Path(fibroquant_bin).exists():
        pytest.skip("no fibroquant console script installed")
    command = (command.replace("/opt/fibroquant/.venv/bin/fibroquant", fibroquant_bin)
               .replace("/data/liver-study", str(study)))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": "/bin/sh",
           "PYTHONPATH": str(REPO)}  # PYTHONPATH only so that this checkout is what runs
    res = subprocess.run(["/bin/sh", "-c", command], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    log = (study / "results" / "cron.log").read_text()
    assert "CPA in MSC was" in log
    assert (study / "results" / "slides.csv").is_file()


@pytest.mark.slow
def test_mpp_is_remembered_per_slide_for_a_rerun_without_it(tmp_path: Path) -> None:
    """Issue 23: a cron rerun without --mpp failed the good rows of files without µm/px."""
    import cv2

    from fibroquant.synthetic import SectionParams, make_section

    slides = tmp_path / "slides"
    slides.mkdir()
    rgb, _ = make_section(SectionParams(shape=(256, 256), mpp=1.0), rng=3)
    cv2.imwrite(str(slides / "a.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # no µm/px
    out = tmp_path / "out"
    runner = CliRunner()
    first = runner.invoke(app, ["analyze", str(slides), "--out", str(out), "--mpp", "1.0",
                                "--workers", "1", "--json"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["analyze", str(slides), "--out", str(out), "--workers", "1",
                                "--json"])
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert (data["processed"], data["skipped"], data["failed"]) == (0, 1, 0)
    assert pd.read_csv(out / "slides.csv")["mpp"].tolist() == [1.0]
    # a new file without µm/px still needs --mpp: nothing is guessed for it
    cv2.imwrite(str(slides / "b.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    third = runner.invoke(app, ["analyze", str(slides), "--out", str(out), "--workers", "1",
                                "--json"])
    table = pd.read_csv(out / "slides.csv").set_index("slide")
    assert third.exit_code == 1
    assert table.loc["a.png", "status"] == "ok"
    assert table.loc["b.png", "status"] == "failed"


@pytest.mark.slow
def test_analyze_one_image_file(tmp_path: Path) -> None:
    """`analyze slide.png` measures that image alone (issue 23: a single image was refused)."""
    import cv2

    from fibroquant.synthetic import SectionParams, make_section

    rgb, _ = make_section(SectionParams(shape=(256, 256), mpp=1.0), rng=5)
    for name in ("one.png", "other.png"):
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "one.png"), "--out", str(out),
                                   "--mpp", "1.0", "--workers", "1"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "slides.csv")
    assert table["slide"].tolist() == ["one.png"]
    assert table["status"].tolist() == ["ok"]
    bad = CliRunner().invoke(app, ["analyze", str(tmp_path / "out" / "slides.csv"), "--out",
                                   str(tmp_path / "o2")])
    assert bad.exit_code == 2
    assert "not a slide file" in bad.output
