"""bench/soak.py's judgement, on made-up samples (--rejudge) and made-up jobs.

A soak takes hours; what it concludes from its samples must still be right: a flat series
with sampling noise and a worker restart is flat, a slow leak inside each life is not,
and the read-only pool filling up to its size is no thread leak. A job that FAILs saying
HAProxy is not running while a HAProxy kill -9 is being recovered from is explained; the
same FAIL at another time, or any other FAIL during the kill, is not. Lines in Swift that
no reply reported are explained only by an ARCHIVE whose reply was lost.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from libra_worker.lanes import READERS

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
LIFE = 1500.0  # seconds between two worker restarts
SAMPLE_EVERY = 10.0


def samples(rss_per_hour: float = 0.0, extra_threads: int = 0) -> list[dict[str, float]]:
    """Two worker lives of made-up samples; RSS restarts low after the restart."""
    noise = random.Random(4)
    rows = []
    t = 0.0
    while t < 2 * LIFE:
        life = 1 if t < LIFE else 2
        age = t - (life - 1) * LIFE
        rows.append({
            "t": t, "incarnation": life, "sink pid": 100,
            "worker RSS MiB": 44.0 + rss_per_hour * age / 3600 + noise.uniform(-0.05, 0.05),
            "worker fds": 10 + noise.choice((0, 1, 2)),
            # The pool's first thread comes with the first read-only job, more later on.
            "worker threads": 6 + (extra_threads if age > LIFE / 2 else 0),
            "log sink RSS MiB": 17.0, "HAProxy processes": 2 + noise.choice((0, 0, 0, 1)),
            "state_dir MiB": 1.0 + (t % 180) / 60, "load": 1.0,
        })
        t += SAMPLE_EVERY
    return rows


def rejudge(tmp_path: Path, rows: list[dict[str, float]]) -> subprocess.CompletedProcess[str]:
    raw = tmp_path / "soak-raw.json"
    raw.write_text(json.dumps({"t0": 0.0, "samples": rows, "args": {"warmup": "120.0"},
                               "faults": [{"kind": "worker", "start": LIFE, "end": LIFE + 3}]}))
    return subprocess.run([sys.executable, str(SOAK), "--rejudge", str(raw), "--no-plot"],
                          capture_output=True, text=True, timeout=60)


def row(output: str, series: str) -> list[str]:
    [line] = [line for line in output.splitlines() if line.startswith(f"| {series} ")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_flat_series_with_noise_and_a_restart_are_flat(tmp_path: Path) -> None:
    result = rejudge(tmp_path, samples())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Target flat: met" in result.stdout
    assert row(result.stdout, "worker RSS MiB")[-1] == "yes"


def test_a_slow_leak_inside_each_life_is_caught(tmp_path: Path) -> None:
    # 3 MiB/h within each life; the restart brings RSS back down in between.
    result = rejudge(tmp_path, samples(rss_per_hour=3.0))
    assert result.returncode == 1, result.stdout + result.stderr
    rss = row(result.stdout, "worker RSS MiB")
    assert rss[-1] == "NO" and 2.5 < float(rss[3]) < 3.5, rss
    assert "**MISSED**" in result.stdout


def test_the_read_only_pool_filling_is_no_thread_leak_but_more_is(tmp_path: Path) -> None:
    filling = rejudge(tmp_path, samples(extra_threads=READERS - 1))
    assert row(filling.stdout, "worker threads")[-1] == "yes", filling.stdout
    leaking = rejudge(tmp_path, samples(extra_threads=READERS))
    assert row(leaking.stdout, "worker threads")[-1] == "NO", leaking.stdout
    assert leaking.returncode == 1


@pytest.fixture(scope="module")
def soak_module():
    sys.path.insert(0, str(SOAK.parent))  # soak.py imports bench/_common.py
    try:
        spec = importlib.util.spec_from_file_location("soak_under_test", SOAK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SOAK.parent))
    return module


def judged_jobs(soak_module, jobs) -> list[str]:
    """The targets Report.jobs() misses for `jobs` around one HAProxy kill at t=100 s
    that was recovered from 0.8 s later."""
    soak = SimpleNamespace(
        t0=0.0, args=SimpleNamespace(archive_timeout=10.0),
        faults=[soak_module.Fault("haproxy", 100.0, 100.8)],
        jobs=[soak_module.JobRecord(kind, f"u{index}", sent, answered, outcome, detail)
              for index, (kind, sent, answered, outcome, detail) in enumerate(jobs)])
    report = soak_module.Report(soak)
    report.jobs()
    return report.missed


NOT_RUNNING = "HAProxy is not running (the load balancer is ACTIVE)."


def test_a_job_failing_for_a_killed_haproxy_while_it_recovers_is_explained(soak_module):
    assert judged_jobs(soak_module, [
        ("STATS", 100.3, 100.4, "FAIL", NOT_RUNNING),
        # Sent just before the kill, answered during it.
        ("UPDATE full (algorithm)", 99.8, 100.1, "FAIL", "HAProxy's master process is not running."),
        ("STATS", 103.0, 103.1, "PASS", ""),
    ]) == []


@pytest.mark.parametrize("job", [
    ("STATS", 130.0, 130.1, "FAIL", NOT_RUNNING),  # long after HAProxy was back
    # The worker hung on a job until its timeout while HAProxy was killed: a fault in itself.
    ("UPDATE full (algorithm)", 99.9, 220.0, "FAIL", "UPDATE did not finish within its 120 s timeout."),
])
def test_other_failures_near_a_haproxy_kill_are_not(soak_module, job):
    assert judged_jobs(soak_module, [job]) == ["jobs answered once, failures explained"]


def judged_metrics(soak_module, billed: int) -> list[str]:
    """Report.metrics() for one HTTP client that received 1,000,000 bytes of whole answers,
    6,000 of them header lines HAProxy added (its set-cookie, connection), no fault."""
    loop = SimpleNamespace(protocol="http", whole_bytes=1_000_000, added_bytes=6_000,
                           bytes_between=lambda start, end: 0)
    reply = {"hpcs_response": "PASS", "utc_start": "2026-12-07 10:00:00.000000",
             "utc_end": "2026-12-07 10:01:00.000000",
             "loadBalancers": [{"protocol": "http", "bytes_out": billed}]}
    job = soak_module.JobRecord("METRICS", "u", 0.0, 1.0, "PASS", "", reply)
    report = soak_module.Report(SimpleNamespace(jobs=[job], faults=[], traffic=[loop]))
    report.metrics()
    return report.missed


def test_metrics_are_judged_without_the_headers_haproxy_adds(soak_module):
    # HAProxy bills what it forwards, not the headers it adds itself (docs/protocol.rst).
    assert judged_metrics(soak_module, billed=994_000) == []
    assert judged_metrics(soak_module, billed=993_500) == []  # within 0.1%
    assert judged_metrics(soak_module, billed=992_000) == ["METRICS total within 0.1%"]
    assert judged_metrics(soak_module, billed=1_000_000) == ["METRICS total within 0.1%"]


@pytest.mark.parametrize("downloaded, reported, replies_lost, expected", [
    (1000, 1000, 0, True),
    (1000, 360, 1, True),  # an ARCHIVE's objects in Swift, its reply lost with gearmand
    (1000, 360, 0, False),  # lines nobody reported, and no reply lost to explain them
    (1000, 1040, 1, False),  # replies reported more than Swift holds
    (900, 900, 0, False),  # lines missing outside any log-sink gap
])
def test_archived_lines_against_the_replies(soak_module, downloaded, reported, replies_lost,
                                            expected):
    # 1,000 requests served, 20 of them during a log-sink gap, 5 cut by a HAProxy kill.
    assert soak_module.archive_as_expected(downloaded, reported, replies_lost, served=1000,
                                           in_sink_gaps=20, cut=5) is expected
