#!/usr/bin/env python3
"""Peak memory of ARCHIVE against a real Swift: streaming vs. a read-all baseline.

Builds a synthetic HAProxy access log (default ~300 MB) in a temp state dir,
starts the all-in-one test Swift (tests/swift_server.py) and measures, each in
a fresh child process, the peak RSS (VmHWM) before and after:

* ``archive_logs`` on a small log and on the big log: the peak must not grow
  with the log size;
* a naive read-all + gzip.compress + PUT of the small log: the baseline whose
  peak grows with the log size.

Usage: python bench/archive_memory.py [--size-mb 300] [--small-mb 16]
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
import tempfile
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


def run(size_mb: int, small_mb: int) -> None:
    from tests.swift_server import SwiftServer

    swift = SwiftServer.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="libra-bench-") as temp:
            scenarios = [("naive read-all", "naive", small_mb),
                         ("archive_logs", "archive", small_mb),
                         ("archive_logs", "archive", size_mb)]
            for number, (label, mode, log_mb) in enumerate(scenarios):
                state_dir = Path(temp) / f"state-{number}"
                build_log(state_dir, log_mb)
                raw_mb = (state_dir / "logs" / "http.log").stat().st_size / MB
                stats = measure(mode, state_dir, swift, f"bench-{number}")
                rows.append((label, raw_mb, stats))
    finally:
        swift.stop()
    print_table(rows)


def print_table(rows: list[tuple[str, float, dict]]) -> None:
    header = ("scenario", "log MiB", "gz MiB", "RSS before", "peak RSS", "growth",
              "seconds")
    print("%-16s %9s %8s %11s %10s %8s %8s" % header)
    for label, raw_mb, stats in rows:
        print("%-16s %9.1f %8.1f %10.1fM %9.1fM %7.1fM %8.1f" % (
            label, raw_mb, stats["compressed"] / MB, stats["before"], stats["peak"],
            stats["peak"] - stats["before"], stats["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=300, help="big log size")
    parser.add_argument("--small-mb", type=int, default=None,
                        help="log size for the naive baseline (default: min(size, 16))")
    parser.add_argument("--child", choices=["archive", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--lb-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.state_dir, args.endpoint, args.lb_id)
        return
    run(args.size_mb, args.small_mb or min(args.size_mb, 16))


if __name__ == "__main__":
    main()
