#!/usr/bin/env python3
"""Hostile input at volume, and the worker's memory for the largest messages it accepts.

1. The fuzz campaign of tests/integration/test_fuzz.py at full size (10,000 generated
   messages through real gearmand to the real worker; CI runs 300): run as that very test,
   with ``LIBRA_FUZZ_MESSAGES``, so the checks after it are the test's own (every job one
   strict-JSON reply, DISCOVER in < 2 s, no injected line in any rendered configuration,
   traffic to every node of a final UPDATE, RSS within 20% of where it started).
2. The worker's peak memory (VmHWM) for the largest messages it accepts: an 8 MiB
   DISCOVER (the ``[worker] max_message_bytes`` default, echoed whole in the reply) and the
   largest UPDATE supported (two load balancers of 10,000 nodes with 64-character ids,
   pretty-printed), against the same worker's peak after a small UPDATE.

Usage: python bench/fuzz.py [--messages 10000] [--out-dir DIR] [--no-plot]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from tests.integration.support import (  # noqa: E402
    HTTPBackend,
    Worker,
    backends,
    gearmand_server,
    lb,
    rss_kib,
    update,
)


def campaign(messages: int) -> tuple[bool, list[str], float]:
    """The fuzz test at `messages`; (passed, its `fuzz:` summary lines, seconds)."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
         "tests/integration/test_fuzz.py"],
        cwd=c.REPO, env=dict(os.environ, LIBRA_FUZZ_MESSAGES=str(messages)),
        capture_output=True, text=True, timeout=6 * 3600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("fuzz:")]
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-2000:])
    return result.returncode == 0, lines, time.monotonic() - started


def largest_update(http_port: int, tcp_port: int) -> bytes:
    def nodes(prefix: str) -> list[dict]:
        return [{"id": f"{prefix}{index:063d}", "address": "127.0.0.1", "port": 1 + index,
                 "weight": 256, "backup": False, "condition": "DISABLED"}
                for index in range(10_000)]
    document = update(lb("HTTP", http_port, nodes("h")), lb("TCP", tcp_port, nodes("t")))
    return json.dumps(document, indent=2).encode()


def peak_after(worker: Worker, payload: bytes) -> tuple[str, int]:
    reply = json.loads(worker.submit_raw(payload, timeout=600))
    if reply["hpcs_response"] != "PASS":
        print(f"{len(payload)} bytes: {reply['hpcs_error']}")
    return reply["hpcs_response"], rss_kib(worker.process.pid, "VmHWM")


def largest_messages(run: c.Run) -> list[list[str]]:
    rows = []
    with gearmand_server() as gearmand, backends(HTTPBackend("big-web")) as (web,):
        for name in ("8 MiB DISCOVER", "largest UPDATE"):
            root = run.root / name.replace(" ", "-")
            root.mkdir()
            worker = Worker(root, [gearmand.address])
            run.own(worker, worker.cleanup)
            worker.start()
            http_port, tcp_port = c.free_port(), c.free_port()
            small = json.dumps(update(lb("HTTP", http_port, [web.node()]))).encode()
            _, small_peak = peak_after(worker, small)
            payload = (b'{"hpcs_action": "DISCOVER", "pad": "' + b"p" * (8 * 1024 * 1024 - 40)
                       + b'"}') if name.startswith("8") else largest_update(http_port, tcp_port)
            outcome, peak = peak_after(worker, payload)
            rows.append([name, f"{len(payload) / 2**20:.1f}", outcome, f"{small_peak / 1024:.1f}",
                         f"{peak / 1024:.1f}", f"{(peak - small_peak) / len(payload) * 1024:.1f}x"])
            worker.cleanup()
    return rows


def plot_peaks(rows: list[list[str]]) -> Callable[[Any, Path], None]:
    def plot(plt: Any, path: Path) -> None:
        figure, axes = plt.subplots(figsize=(6, 3.5))
        names = ["small UPDATE"] + [row[0] for row in rows]
        peaks = [float(rows[0][3])] + [float(row[4]) for row in rows]
        axes.bar(names, peaks, color=["#888"] + ["#c44"] * len(rows))
        axes.set_ylabel("worker peak RSS (MiB)")
        axes.set_title("Worker memory for the largest accepted messages")
        c.save_figure(plt, figure, path)
    return plot


def main() -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    info = c.machine_info()
    passed, lines, seconds = campaign(args.messages)
    sections = [f"Campaign of {args.messages} messages: **{'passed' if passed else 'FAILED'}** "
                f"in {seconds:.0f} s (pytest, including set-up).",
                "\n".join(f"- {line.removeprefix('fuzz: ')}" for line in lines)]
    print("\n".join(sections))
    with c.Run() as run:
        rows = largest_messages(run)
    table = c.markdown_table(
        ["message", "MiB", "reply", "peak after a small UPDATE (MiB)", "peak after it (MiB)",
         "growth / payload"], rows)
    print(table)
    sections.append("Worker peak memory (VmHWM) for the largest accepted messages:\n\n" + table)
    c.publish(args, "fuzz", "Hostile input at volume", sections, info,
              "worker peak memory for the largest accepted messages", plot_peaks(rows))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
