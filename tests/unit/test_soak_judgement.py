"""bench/soak.py's judgement of resource slopes, on made-up samples (--rejudge).

A soak takes hours; what it concludes from its samples must still be right: a flat series
with sampling noise and a worker restart is flat, a slow leak inside each life is not,
and the read-only pool filling up to its size is no thread leak.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

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
