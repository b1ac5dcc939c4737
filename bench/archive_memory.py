#!/usr/bin/env python3
"""Peak memory of ARCHIVE against a real Swift: streaming vs. a read-all baseline.

Builds a synthetic HAProxy access log (default ~300 MB) in a temp state dir,
starts the all-in-one test Swift (tests/swift_server.py) and measures, each in
a fresh child process, the peak RSS (VmHWM) before and after:

* ``archive_logs`` on a small log and on the big log: the peak must not grow
  with the log size;
* a naive read-all + gzip.compress + PUT of the small log: the baseline whose
  peak grows with the log size.

The log lives in a temp dir from ``tempfile.mkdtemp(prefix="lwb-")``, deleted afterwards;
the Swift of tests/swift_server.py makes and deletes its own dir and stops its processes
by pid. The children import only what they measure (not bench/_common.py), so "RSS
before" is the interpreter plus swiftclient and libra_worker.archive.

Target: the peak of ``archive_logs`` does not grow with the log size (the growth at
``--size-mb`` stays within 16 MiB of the growth at ``--small-mb``).

Usage: python bench/archive_memory.py [--size-mb 300] [--small-mb 16] [--out-dir DIR]
       [--no-plot]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKEN_ENV = "BENCH_SWIFT_TOKEN"
CHILD_TIMEOUT = 600
MB = 1024 * 1024
# Varied addresses, timings and session ids keep gzip from finding trivial repeats.
LINE = (b"Nov 25 20:40:%02d haproxy[4242]: 10.0.%d.%d:%d [25/Nov/2026:20:40:%02d.%03d] "
        b"lb-http pool-http/node-%d 0/0/%d/%d/%d 200 %d - - ---- 3/3/0/0/0 0/0 "
        b'"GET /api/v1/items/%d?session=%s HTTP/1.1"\n')


def vm_hwm_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def build_log(state_dir: Path, size_mb: int) -> Path:
    """Write ~size_mb of realistic httplog lines as the active HTTP log."""
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "http.log"
    target = size_mb * MB
    with open(path, "wb") as out:
        written = 0
        for n in itertools.count():
            # 5000 lines per write: fast to build, small enough to stay cheap.
            batch = b"".join(
                LINE % (i % 60, i % 250, i % 199, 1024 + i % 60000, i % 60,
                                i % 1000, i % 7, i % 5, i % 97, i % 211, i % 9000,
                                i, hashlib.md5(b"%d" % i).hexdigest().encode())
                for i in range(n * 5000, (n + 1) * 5000))
            out.write(batch)
            written += len(batch)
            if written >= target:
                return path
    raise AssertionError("unreachable")


def child(mode: str, state_dir: Path, endpoint: str, lb_id: str) -> None:
    """Run one measurement in this (fresh) process and print it as JSON."""
    import swiftclient.client

    from libra_worker.archive import archive_logs

    token = os.environ[TOKEN_ENV]
    before = vm_hwm_mb()
    started = time.monotonic()
    if mode == "archive":
        result = archive_logs(state_dir, protocol="HTTP", lb_id=lb_id,
                              basepath="bench", endpoint=endpoint, token=token,
                              timeout=60)
        compressed = result["compressed_bytes"]
    else:
        data = gzip.compress((state_dir / "logs" / "http.log").read_bytes())
        connection = swiftclient.client.Connection(preauthurl=endpoint,
                                                   preauthtoken=token, timeout=60)
        connection.put_container("bench")
        connection.put_object("bench", f"{lb_id}/naive.log.gz", data,
                              etag=hashlib.md5(data).hexdigest())
        compressed = len(data)
    print(json.dumps({"before": before, "peak": vm_hwm_mb(),
                      "seconds": time.monotonic() - started,
                      "compressed": compressed}))


def measure(mode: str, state_dir: Path, swift, lb_id: str) -> dict:
    env = dict(os.environ, **{TOKEN_ENV: swift.token})
    completed = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--state-dir", str(state_dir),
         "--endpoint", swift.endpoint, "--lb-id", lb_id],
        capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


GROWTH_TOLERANCE_MB = 16.0


def run(size_mb: int, small_mb: int) -> list[tuple[str, float, dict]]:
    import _common as c
    from tests.swift_server import SwiftServer

    scenarios = [("naive read-all", "naive", small_mb),
                 ("archive_logs", "archive", small_mb),
                 ("archive_logs", "archive", size_mb)]
    rows = []
    with c.Run() as bench_run:
        swift = bench_run.own(SwiftServer.start())
        for number, (label, mode, log_mb) in enumerate(scenarios):
            state_dir = bench_run.root / f"state-{number}"
            build_log(state_dir, log_mb)
            raw_mb = (state_dir / "logs" / "http.log").stat().st_size / MB
            stats = measure(mode, state_dir, swift, f"bench-{number}")
            rows.append((label, raw_mb, stats))
            # Only one log on disk at a time.
            (state_dir / "logs" / "http.log").unlink(missing_ok=True)
    return rows


def table(rows: list[tuple[str, float, dict]]) -> str:
    import _common as c

    return c.markdown_table(
        ["scenario", "log MiB", "gz MiB", "RSS before MiB", "peak RSS MiB", "growth MiB",
         "seconds"],
        [[label, f"{raw_mb:.1f}", f"{stats['compressed'] / MB:.1f}", f"{stats['before']:.1f}",
          f"{stats['peak']:.1f}", f"{stats['peak'] - stats['before']:.1f}",
          f"{stats['seconds']:.1f}"] for label, raw_mb, stats in rows])


def verdict(rows: list[tuple[str, float, dict]]) -> str:
    (_, naive_mb, naive), (_, small_mb, small), (_, big_mb, big) = rows
    small_growth = small["peak"] - small["before"]
    big_growth = big["peak"] - big["before"]
    met = "MET" if big_growth - small_growth <= GROWTH_TOLERANCE_MB else "MISSED"
    return (f"archive_logs peak growth: {small_growth:.1f} MiB at {small_mb:.0f} MiB of log, "
            f"{big_growth:.1f} MiB at {big_mb:.0f} MiB; the naive read-all baseline grows "
            f"{naive['peak'] - naive['before']:.1f} MiB at only {naive_mb:.0f} MiB of log. "
            f"Target peak independent of the log size (within {GROWTH_TOLERANCE_MB:g} MiB): "
            f"{met}.")


def plot(rows: list[tuple[str, float, dict]], plt, path: Path) -> None:
    import _common as c

    figure, axis = plt.subplots(figsize=(7, 4))
    labels = [f"{label}\n{raw_mb:.0f} MiB log" for label, raw_mb, _ in rows]
    bars = axis.bar(labels, [stats["peak"] - stats["before"] for _, _, stats in rows])
    axis.bar_label(bars, fmt="%.1f")
    axis.set_ylabel("peak RSS growth, MiB")
    axis.set_title("ARCHIVE peak memory: streaming vs read-all")
    axis.grid(True, axis="y", alpha=0.3)
    c.save_figure(plt, figure, path)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as c

    parser = c.argument_parser(__doc__)
    parser.add_argument("--size-mb", type=int, default=300, help="big log size")
    parser.add_argument("--small-mb", type=int, default=None,
                        help="log size for the naive baseline (default: min(size, 16))")
    args = parser.parse_args(argv)
    info = c.machine_info()
    rows = run(args.size_mb, args.small_mb or min(args.size_mb, 16))
    text = table(rows)
    print(text)
    print(verdict(rows))
    notes = ("Each scenario runs in a fresh child process; RSS is VmHWM (peak resident set) "
             "before the call and after it. The naive baseline reads the whole log, "
             "gzip.compress()es it and PUTs it, so its peak grows with the log; it runs on the "
             "small log only. Swift: the all-in-one test Swift of tests/swift_server.py on "
             "loopback.")
    c.publish(args, "archive_memory", "ARCHIVE peak memory", [text, verdict(rows), notes], info,
              "ARCHIVE peak memory", lambda plt, path: plot(rows, plt, path))
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:  # a measurement: keep the child free of bench imports
        child_parser = argparse.ArgumentParser(description="one measurement (internal)")
        child_parser.add_argument("--child", choices=["archive", "naive"], required=True)
        child_parser.add_argument("--state-dir", type=Path)
        child_parser.add_argument("--endpoint")
        child_parser.add_argument("--lb-id")
        child_args = child_parser.parse_args()
        child(child_args.child, child_args.state_dir, child_args.endpoint, child_args.lb_id)
        sys.exit(0)
    sys.exit(main())
