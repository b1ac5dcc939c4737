#!/usr/bin/env python3
"""Read-only jobs while a mutating job stalls: DISCOVER, STATS, METRICS, DIAGNOSTICS latency.

Starts gearmand and the real libra-worker with one HTTP load balancer, then sends the four
read-only actions round-robin, one at a time on their own connection, in three conditions:

* idle: nothing else runs (the baseline);
* ARCHIVE stalled: an ARCHIVE whose Swift endpoint accepts the connection and never
  answers (tests.integration.support.SilentEndpoint) holds the mutating lane until
  ``[archive] timeout`` (``--stall`` seconds);
* UPDATE of ``--nodes`` nodes: UPDATEs of that size (each one a whole new configuration:
  render, ``haproxy -c``, reload) run back to back.

Target: read-only p99 < 1 s while the mutating job runs.

Usage: python bench/read_only_latency.py [--stall 10] [--nodes 10000] [--out-dir DIR] [--no-plot]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import update_latency  # noqa: E402
from tests.integration.support import HTTPBackend, SilentEndpoint, request_once  # noqa: E402

TARGET_P99 = 1.0
READ_ONLY = ("DISCOVER", "STATS", "METRICS", "DIAGNOSTICS")
CONDITIONS = ("idle", "ARCHIVE stalled", "UPDATE of N nodes")


def sample_while(client: c.RawClient, function: str, busy: Callable[[], bool],
                 latencies: dict[str, list[float]], limit: int | None = None) -> None:
    """Round-robin read-only jobs while `busy()` (or `limit` jobs); each must PASS."""
    sent = 0
    while busy() and (limit is None or sent < limit):
        action = READ_ONLY[sent % len(READ_ONLY)]
        started = time.perf_counter()
        answer = client.submit_json(function, {"hpcs_action": action})
        latencies[action].append(time.perf_counter() - started)
        if answer.get("hpcs_response") != "PASS":
            raise RuntimeError(f"{action}: {answer}")
        sent += 1


def in_background(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(work()), daemon=True)
    thread.start()
    return thread, outcome


def archive_message(endpoint: str, lb_id: str) -> dict[str, Any]:
    return {"hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
            "hpcs_object_store_basepath": "lbaaslogs", "hpcs_object_store_endpoint": endpoint,
            "hpcs_object_store_token": "bench", "loadBalancers": [{"id": lb_id, "protocol": "HTTP"}]}


def main(argv: list[str] | None = None) -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--stall", type=float, default=10.0, help="[archive] timeout, seconds")
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--updates", type=int, default=3, help="UPDATEs of --nodes in a row")
    parser.add_argument("--idle-jobs", type=int, default=200)
    args = parser.parse_args(argv)
    info = c.machine_info()
    results = {condition: {action: [] for action in READ_ONLY} for condition in CONDITIONS}
    held: dict[str, float] = {}

    with c.Run() as run:
        gearmand = run.own(c.Gearmand(run.root).start())
        worker = run.own(c.Worker(run.root, gearmand,
                                  # The silent endpoint is plain http, on loopback.
                                  more_config=f"[archive]\ntimeout = {args.stall:g}\n"
                                              "allow_plain_http = true\n").start())
        backend = run.own(HTTPBackend("read-only-backend").start())
        mutating = run.own(c.RawClient(gearmand.address, timeout=600))
        reader = run.own(c.RawClient(gearmand.address))
        port = c.free_port()
        answer = mutating.submit_json(worker.function, {"hpcs_action": "UPDATE", "loadbalancers": [
            {"id": "lb-1", "protocol": "HTTP", "port": port, "nodes": [backend.node()]}]})
        if answer.get("hpcs_response") != "PASS":
            raise RuntimeError(f"UPDATE failed: {answer}")
        request_once(f"http://{c.LOOPBACK}:{port}/")  # an access line for ARCHIVE to ship

        sample_while(reader, worker.function, lambda: True, results["idle"], args.idle_jobs)

        silent = SilentEndpoint()
        run.callback(silent.close)
        started = time.perf_counter()
        thread, outcome = in_background(
            lambda: mutating.submit_json(worker.function, archive_message(silent.url, "lb-1")))
        c.wait_until(lambda: silent.accepted, 30, "the ARCHIVE to reach the silent endpoint")
        sample_while(reader, worker.function, thread.is_alive, results["ARCHIVE stalled"])
        thread.join()
        held["ARCHIVE stalled"] = time.perf_counter() - started
        if outcome[0].get("hpcs_response") != "FAIL":
            raise RuntimeError(f"the stalled ARCHIVE answered {outcome[0]}")

        def updates() -> None:
            for turn in range(args.updates):
                # Another algorithm each time: a whole new configuration and a reload.
                algorithm = ("LEAST_CONNECTIONS", "ROUND_ROBIN")[turn % 2]
                big = update_latency.message(args.nodes, port, algorithm, first_weight=1)
                reply = mutating.submit_json(worker.function, big)
                if reply.get("hpcs_response") != "PASS":
                    raise RuntimeError(f"UPDATE of {args.nodes} nodes: {reply}")

        started = time.perf_counter()
        thread, _ = in_background(updates)
        sample_while(reader, worker.function, thread.is_alive, results["UPDATE of N nodes"])
        thread.join()
        held["UPDATE of N nodes"] = time.perf_counter() - started

    rows, worst = [], 0.0
    for condition in CONDITIONS:
        every = [v for values in results[condition].values() for v in values]
        p99 = c.percentile(every, 99)
        if condition != "idle":
            worst = max(worst, p99)
        label = condition.replace("N nodes", f"{args.nodes} nodes")
        rows.append([label, f"{held[condition]:.1f}" if condition in held else "-", len(every),
                     c.fmt_ms(c.median(every)), c.fmt_ms(p99), c.fmt_ms(max(every)),
                     *(c.fmt_ms(c.percentile(results[condition][a], 99)) for a in READ_ONLY)])
    text = c.markdown_table(["while", "mutating job held s", "read-only jobs", "p50 ms", "p99 ms",
                             "max ms", *(f"{a} p99 ms" for a in READ_ONLY)], rows)
    verdict = (f"Target read-only p99 < {TARGET_P99 * 1000:.0f} ms while a mutating job runs: "
               f"{'MET' if worst < TARGET_P99 else 'MISSED'} (worst p99 {c.fmt_ms(worst)} ms).")
    print(text)
    print(verdict)
    notes = (
        "One client connection sends the read-only jobs one after the other (DISCOVER, STATS, "
        "METRICS, DIAGNOSTICS, round-robin) while another holds the mutating job. "
        "DIAGNOSTICS probes the job server (ECHO round trip) and HAProxy each time. "
        f"The ARCHIVE stalls on a socket that accepts and never answers until [archive] "
        f"timeout = {args.stall:g} s; the UPDATE series is {args.updates} UPDATEs of "
        f"{args.nodes} nodes back to back (each: validate, render, haproxy -c, reload).")
    c.publish(args, "read_only_latency", "Read-only jobs while a mutating job stalls",
              [text, verdict, notes], info, "read-only latency CDF",
              lambda plt, path: plot(results, plt, path))
    return 0


def plot(results: dict[str, dict[str, list[float]]], plt: Any, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for condition in CONDITIONS:
        values = sorted(v * 1000 for series in results[condition].values() for v in series)
        axis.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=condition)
    axis.set_xscale("log")
    axis.set_xlabel("read-only job round trip, ms (log)")
    axis.set_ylabel("fraction of jobs")
    axis.set_title("DISCOVER/STATS/METRICS/DIAGNOSTICS while a mutating job runs")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    c.save_figure(plt, figure, path)


if __name__ == "__main__":
    sys.exit(main())
