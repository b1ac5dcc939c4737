#!/usr/bin/env python3
"""The worker's resident memory (VmRSS) at idle and over 10,000 DISCOVER/STATS jobs.

Starts gearmand and the real libra-worker, configures one HTTP load balancer (so STATS
reads HAProxy's stats socket), then sends jobs one at a time, alternating DISCOVER and
STATS, reading /proc/<pid>/status VmRSS every `--sample-every` jobs. No growth is expected
once the first jobs have warmed the caches.

Baseline, same run: a bare interpreter that imports what the worker imports
(`libra_worker.cli`, which pulls in the driver, jinja2, gearman and python-daemon) and
sleeps: the memory any worker written on these libraries starts from.

Usage: python bench/rss.py [--jobs 10000] [--sample-every 500] [--out-dir DIR] [--no-plot]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

# Growth allowed between the warm sample and the last one before we call it growth.
GROWTH_TOLERANCE_KIB = 512


def import_floor_rss() -> int:
    code = "import libra_worker.cli, sys, time; print('ready', flush=True); time.sleep(30)"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=str(c.REPO),
                               env=dict(os.environ, PYTHONPATH=str(c.REPO)),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        time.sleep(0.3)
        return c.rss_kib(process.pid)
    finally:
        c.stop_child(process)


def run_jobs(worker: c.Worker, client: c.RawClient, jobs: int, every: int) -> list[tuple[int, int]]:
    """(jobs done, VmRSS KiB) samples, the first at 0 jobs."""
    discover = json.dumps({"hpcs_action": "DISCOVER"}).encode()
    stats = json.dumps({"hpcs_action": "STATS"}).encode()
    samples = [(0, c.rss_kib(worker.pid))]
    for done in range(1, jobs + 1):
        answer = client.submit(worker.function, discover if done % 2 else stats)
        if b'"PASS"' not in answer:
            raise RuntimeError(f"unexpected reply {answer[:300]!r}")
        if done % every == 0 or done == jobs:
            samples.append((done, c.rss_kib(worker.pid)))
    return samples


def plot(samples: list[tuple[int, int]], floor_kib: int, plt, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([s[0] for s in samples], [s[1] / 1024 for s in samples], marker=".",
              label="libra-worker VmRSS")
    axis.axhline(floor_kib / 1024, color="grey", linestyle="--", label="import floor")
    axis.set_xlabel("jobs done (DISCOVER/STATS alternating)")
    axis.set_ylabel("VmRSS, MiB")
    axis.set_ylim(bottom=0)
    axis.set_title("libra-worker resident memory over jobs")
    axis.grid(True, alpha=0.3)
    axis.legend()
    c.save_figure(plt, figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--sample-every", type=int, default=250)
    args = parser.parse_args(argv)

    info = c.machine_info()
    with c.Run() as run:
        floor_kib = import_floor_rss()
        gearmand = run.own(c.Gearmand(run.root).start())
        worker = run.own(c.Worker(run.root, gearmand).start())
        time.sleep(0.5)
        idle_kib = c.rss_kib(worker.pid)
        client = run.own(c.RawClient(gearmand.address))
        c.configure_http_lb(client, worker)
        samples = run_jobs(worker, client, args.jobs, max(1, args.sample_every))
        time.sleep(0.5)
        idle_after_kib = c.rss_kib(worker.pid)

    # Warm = halfway: the first ~1500 jobs grow the allocator's arenas and caches, then the
    # curve is flat; growth over the second half is what a leak would show.
    warm_index = max(1, len(samples) // 2)
    warm_jobs, warm_kib = samples[warm_index]
    last_jobs, last_kib = samples[-1]
    growth = last_kib - warm_kib
    rows = [
        ["import floor (bare interpreter importing libra_worker.cli)", f"{floor_kib / 1024:.1f}", "-"],
        ["worker idle, after start", f"{idle_kib / 1024:.1f}", f"{idle_kib - floor_kib:+d}"],
        ["worker after UPDATE (0 jobs measured)", f"{samples[0][1] / 1024:.1f}", f"{samples[0][1] - floor_kib:+d}"],
        [f"worker after {warm_jobs} jobs (warm)", f"{warm_kib / 1024:.1f}", f"{warm_kib - floor_kib:+d}"],
        [f"worker after {last_jobs} jobs", f"{last_kib / 1024:.1f}", f"{last_kib - floor_kib:+d}"],
        [f"worker idle 0.5 s after {last_jobs} jobs", f"{idle_after_kib / 1024:.1f}", f"{idle_after_kib - floor_kib:+d}"],
    ]
    text = c.markdown_table(["sample", "VmRSS MiB", "KiB vs floor"], rows)
    met = "MET" if growth <= GROWTH_TOLERANCE_KIB else "MISSED"
    verdict = (f"Growth from job {warm_jobs} to job {last_jobs}: {growth:+d} KiB "
               f"({growth / max(1, last_jobs - warm_jobs) * 1024:.1f} bytes/job). "
               f"Target no growth (<= {GROWTH_TOLERANCE_KIB} KiB): {met}.")
    print(text)
    print(verdict)
    notes = ("Jobs alternate DISCOVER and STATS, one at a time, on one kept-open raw-socket "
             f"Gearman connection; VmRSS from /proc/<pid>/status every {args.sample_every} jobs.")
    c.publish(args, "rss", "Worker resident memory (VmRSS)", [text, verdict, notes], info,
              "RSS over jobs", lambda plt, path: plot(samples, floor_kib, plt, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
