"""Smoke runs of every benchmark in bench/ with tiny sizes, so the scripts never rot.

Each script starts real gearmand, libra-worker and HAProxy processes (archive_memory and
soak: the test Swift of tests/swift_server.py; the set-up installs them all) and must exit
0, print its table and write its results file. Only the plot is optional here: without
matplotlib the scripts run with --no-plot.

The soak runs for two minutes with eight faults (every kind at least once), on a new seed
each time: it must meet every target a short run can judge (all but the resource slopes,
which need ten minutes). When it does not, the failure starts with its `Missed:` line,
then what it found, and names the directory with the worker's and the log sink's logs.
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

CASES = {
    "archive_memory": (["--size-mb", "4", "--small-mb", "2"], "peak RSS MiB"),
    "fuzz": (["--messages", "20"], "growth / payload"),
    "fleet": (["--devices", "3", "--rounds", "1", "--idle-seconds", "0.5"], "total vs floor"),
    "read_only_latency": (["--stall", "2", "--nodes", "100", "--updates", "2", "--idle-jobs", "8"],
                          "read-only jobs"),
    "round_trip": (["--jobs", "200", "--blocks", "2", "--warmup", "20"], "p50 vs floor"),
    "rss": (["--jobs", "200", "--sample-every", "50"], "VmRSS MiB"),
    "update_latency": (["--sizes", "1,10", "--iterations", "2", "--large-iterations", "1"],
                       "floor: check + reload"),
    "traffic_during_changes": (["--duration", "2", "--connections", "4", "--threads", "1",
                                "--backends", "2", "--rounds", "1"], "req/s vs baseline"),
}


# About 140 s: two minutes of jobs, traffic and eight faults, then the last jobs and the
# report. The smaller periods give a short run every kind of job several times.
SOAK = ["--duration", "120", "--warmup", "8", "--tail", "10", "--fault-every", "15",
        "--swift-down", "8", "--update-every", "2", "--stats-every", "3", "--metrics-every", "10",
        "--archive-every", "16", "--diagnostics-every", "20", "--restart-delay", "2",
        "--sample-every", "2"]


def run_script(name: str, arguments: list[str], tmp_path: Path,
               timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(BENCH / f"{name}.py"), *arguments, "--out-dir", str(tmp_path)]
    if not HAVE_MATPLOTLIB:
        command.append("--no-plot")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: soak.py stops what it started on it.
            process.terminate()
            stdout, stderr = process.communicate(timeout=60)
            pytest.fail(f"bench/{name}.py did not finish within {timeout:g} s:\n"
                        f"{stdout[-3000:]}{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def check_results_file(name: str, table_marker: str, tmp_path: Path) -> None:
    report = (tmp_path / f"{name}.md").read_text()
    assert table_marker in report
    assert "Machine:" in report
    if HAVE_MATPLOTLIB:
        assert (tmp_path / f"{name}.png").stat().st_size > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_runs(name: str, tmp_path: Path) -> None:
    arguments, table_marker = CASES[name]
    result = run_script(name, arguments, tmp_path, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert table_marker in result.stdout
    check_results_file(name, table_marker, tmp_path)


def test_soak_smoke_meets_every_target(tmp_path: Path) -> None:
    seed = random.randrange(1_000_000)
    # Room for a run whose faults were not recovered from (each waited for 60 s, a job for
    # its timeout) to still judge and say what it missed.
    result = run_script("soak", [*SOAK, "--seed", str(seed)], tmp_path, timeout=600)
    missed = [line for line in result.stdout.splitlines() if line.startswith("Missed:")]
    # What it found: the faults, failed requests and unexplained jobs come first in the report.
    found = result.stdout[result.stdout.find("## Faults"):][:12000]
    assert result.returncode == 0, (
        f"soak --seed {seed}: {' '.join(missed) or 'no verdict'}\n"
        f"worker and log-sink logs: {tmp_path / 'soak-logs'}\n\n{found}\n{result.stderr[-3000:]}")
    assert "All met." in result.stdout
    check_results_file("soak", "METRICS total", tmp_path)
