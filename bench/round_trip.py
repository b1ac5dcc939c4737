#!/usr/bin/env python3
"""DISCOVER and STATS round trips through a real gearmand, against a raw echo worker,
and DISCOVER over mutual TLS (stunnel in front of the same gearmand) against plain DISCOVER.

Starts gearmand, the real libra-worker (configured with one HTTP load balancer so STATS
reads HAProxy's stats socket) and, as the floor, a minimal Gearman worker written here on
raw sockets (CAN_DO, GRAB_JOB_UNIQ, PRE_SLEEP, NOOP, JOB_ASSIGN[_UNIQ], WORK_COMPLETE) that
answers the message with `hpcs_response: PASS` added. One client, a raw-socket Gearman
client on one kept-open connection (SUBMIT_JOB -> JOB_CREATED -> WORK_COMPLETE), sends
jobs one at a time to all three series, interleaved in blocks so noise hits them alike.

The TLS series is a second libra-worker configured with [gearman] ssl_ca/ssl_cert/ssl_key,
reaching gearmand through stunnel (etc/stunnel-gearman.conf, TLS 1.3, client certificates
required), and the same raw client speaking TLS to stunnel; certificates are made for the run.

Targets (issue 18): DISCOVER p50 <= 2x and STATS p50 <= 3x the echo worker's p50, same
gearmand, same run. Each ratio is the median over the blocks of the block's p50 against the
echo worker's p50 in the same block, so that load from outside (a shared machine) that comes
and goes weighs on both sides of each ratio; the overall p50s are shown too. The TLS series
is a measurement (the cost of TLS per job), with no target.

`--busy-core CPU` plays a slow machine (as bench/update_latency.py's): this script and
everything it starts run on that one CPU only, beside a Python busy loop.

Usage: python bench/round_trip.py [--jobs 3000] [--blocks 10] [--busy-core CPU]
       [--out-dir DIR] [--no-plot]
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from tests.tls_support import CertificateAuthority, Stunnel, gearman_tls_options  # noqa: E402

SERIES = ("DISCOVER (libra-worker)", "STATS (libra-worker)", "echo worker (floor)",
          "DISCOVER over TLS (libra-worker)")
FLOOR = SERIES[2]
TARGETS = {SERIES[0]: 2.0, SERIES[1]: 3.0}  # p50 vs the floor's (issue 18)


def run_echo_worker(addresses: str, function: str) -> None:
    """The floor: the least a Gearman worker can do per job, one connection per job server
    (`addresses` comma-separated), served from one select loop."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    readers = {}
    for address in addresses.split(","):
        host, _, port = address.strip().rpartition(":")
        conn = socket.create_connection((host, int(port)))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(c.pack(c.CAN_DO, function.encode()) + c.pack(c.GRAB_JOB_UNIQ))
        readers[conn] = c.PacketReader(conn)
    while readers:
        ready, _, _ = select.select(list(readers), [], [])
        for conn in ready:
            try:
                _echo_one(conn, readers[conn])
                while readers[conn].buffer:  # packets that came in the same read
                    _echo_one(conn, readers[conn])
            except (OSError, RuntimeError):  # that job server is gone: serve the others
                readers.pop(conn).conn.close()


def _echo_one(conn: socket.socket, reader: c.PacketReader) -> None:
    kind, body = reader.read()
    if kind in (c.JOB_ASSIGN_UNIQ, 11):  # 11 is JOB_ASSIGN (no unique id)
        parts = body.split(b"\0", 3 if kind == c.JOB_ASSIGN_UNIQ else 2)
        answer = json.loads(parts[-1])
        answer["hpcs_response"] = "PASS"
        conn.sendall(c.pack(c.WORK_COMPLETE, parts[0], json.dumps(answer).encode())
                     + c.pack(c.GRAB_JOB_UNIQ))
    elif kind == c.NO_JOB:
        conn.sendall(c.pack(c.PRE_SLEEP))
    elif kind == c.NOOP:
        conn.sendall(c.pack(c.GRAB_JOB_UNIQ))


def start_echo_worker(gearmand: c.Gearmand, root: Path, function: str = "lwb-echo",
                      addresses: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """An echo worker registered at `addresses` (default: `gearmand`'s), once it is there."""
    with open(root / "echo.out", "ab") as output:
        process = subprocess.Popen(
            [sys.executable, __file__, "--echo-worker", addresses or gearmand.address, function],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        c.wait_until(lambda: process.poll() is not None or c.has_workers(gearmand, function),
                     c.START_TIMEOUT, "the echo worker")
        if process.poll() is not None:
            raise RuntimeError("the echo worker exited: " + (root / "echo.out").read_text())
    except BaseException:
        c.stop_child(process)
        raise
    return process, function


def start_tls_path(run: c.Run, gearmand: c.Gearmand) -> tuple[c.Worker, c.RawClient]:
    """stunnel in front of `gearmand`, a TLS worker behind it, a TLS client in front of it."""
    authority = CertificateAuthority(run.root / "pki", "bench-ca")
    jobserver, worker_cert = authority.issue("jobserver"), authority.issue("worker")
    tunnel = run.own(Stunnel(run.root, c.free_port(), gearmand.port, jobserver, authority.ca).start())
    (run.root / "tls-worker").mkdir()
    worker = run.own(c.Worker(run.root / "tls-worker", gearmand, servers=tunnel.address,
                              gearman_options=gearman_tls_options(authority.ca, worker_cert)).start())
    context = ssl.create_default_context(cafile=str(authority.ca))
    context.load_cert_chain(str(worker_cert.cert), str(worker_cert.key))
    return worker, run.own(c.RawClient(tunnel.address, tls=context))


def measure(targets: dict[str, tuple[c.RawClient, str, bytes]], jobs: int,
            blocks: int) -> dict[str, dict[str, list[Any]]]:
    """Per series: each block's job latencies, and each block's wall time (for jobs/s)."""
    results: dict[str, dict[str, list[Any]]] = {name: {"blocks": [], "wall": []} for name in targets}
    per_block = max(1, jobs // blocks)
    for _ in range(blocks):
        for name, (client, function, payload) in targets.items():
            latencies = []
            started_block = time.perf_counter()
            for _ in range(per_block):
                started = time.perf_counter()
                answer = client.submit(function, payload)
                latencies.append(time.perf_counter() - started)
                if b'"PASS"' not in answer:
                    raise RuntimeError(f"{name}: unexpected reply {answer[:300]!r}")
            results[name]["wall"].append(time.perf_counter() - started_block)
            results[name]["blocks"].append(latencies)
    return results


def latencies(results: dict[str, dict[str, list[Any]]], name: str) -> list[float]:
    return [value for block in results[name]["blocks"] for value in block]


def summarize(results: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    floor_blocks = [c.median(block) for block in results[FLOOR]["blocks"]]
    rows = []
    for name in SERIES:
        latency = latencies(results, name)
        rows.append({
            "name": name,
            "jobs": len(latency),
            "jobs_per_s": len(latency) / sum(results[name]["wall"]),
            "p50": c.median(latency),
            "p99": c.percentile(latency, 99),
            "ratio": c.median([c.ratio(c.median(block), floor) for block, floor
                               in zip(results[name]["blocks"], floor_blocks)]),
            "target": TARGETS.get(name),
        })
    return rows


def table(rows: list[dict[str, Any]], machine: str) -> str:
    return c.markdown_table(
        ["series", "jobs", "jobs/s", "p50 ms", "p99 ms", "p50 vs floor", "target", "machine"],
        [[r["name"], r["jobs"], f"{r['jobs_per_s']:.0f}", f"{r['p50'] * 1000:.2f}",
          f"{r['p99'] * 1000:.2f}", c.fmt_ratio(r["ratio"]),
          f"<= {r['target']:g}x" if r["target"] else "-", machine] for r in rows])


def verdict(rows: list[dict[str, Any]]) -> str:
    judged = [f"{r['name'].split()[0]} {c.fmt_ratio(r['ratio'])} "
              f"{'MET' if r['ratio'] <= r['target'] else 'MISSED'} (target <= {r['target']:g}x)"
              for r in rows if r["target"]]
    tls_cost = rows[3]["p50"] - rows[0]["p50"]
    return (f"p50 vs the echo worker's p50 (median of the blocks' ratios): {'; '.join(judged)}. "
            f"TLS: DISCOVER p50 {c.fmt_ratio(c.ratio(rows[3]['p50'], rows[0]['p50']))} plain "
            f"DISCOVER ({tls_cost * 1000:+.2f} ms per job).")


def moves_to_readers(log: Path) -> int:
    """How often the worker sent an action's pings to reader threads for a while (a
    ping that held its Gearman loop past the bound): the run then measured both paths."""
    return log.read_text(errors="replace").count("go to reader threads")


def machine(info: dict[str, str], busy_core: int | None) -> str:
    """The machine for the table: CPU model (as lscpu names it) and CPU count, or the one
    busy CPU everything ran on."""
    if busy_core is not None:
        return f"{info['cpu']}, 1 busy CPU of {info['nproc']}"
    return f"{info['cpu']}, {info['nproc']} CPUs"


def plot(results: dict[str, dict[str, list[Any]]], plt, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for name in SERIES:
        values = sorted(v * 1000 for v in latencies(results, name))
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        axis.plot(values, fractions, label=name)
    axis.set_xscale("log")
    axis.set_xlabel("round trip, ms (log)")
    axis.set_ylabel("fraction of jobs")
    axis.set_title("Gearman round trip: libra-worker vs raw echo worker")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    c.save_figure(plt, figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per series")
    parser.add_argument("--blocks", type=int, default=10, help="interleaved blocks")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured jobs per series")
    c.add_busy_core_option(parser)
    parser.add_argument("--echo-worker", nargs=2, metavar=("ADDRESS", "FUNCTION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_worker:
        run_echo_worker(*args.echo_worker)
        return 0

    info = c.machine_info()
    with c.Run() as run:
        if args.busy_core is not None:
            c.busy_core(run, args.busy_core)
        gearmand = run.own(c.Gearmand(run.root).start())
        worker = run.own(c.Worker(run.root, gearmand).start())
        echo, echo_function = start_echo_worker(gearmand, run.root)
        run.callback(c.stop_child, echo)
        client = run.own(c.RawClient(gearmand.address))
        c.configure_http_lb(client, worker)
        tls_worker, tls_client = start_tls_path(run, gearmand)
        discover = json.dumps({"hpcs_action": "DISCOVER"}).encode()
        stats = json.dumps({"hpcs_action": "STATS"}).encode()
        targets = {
            SERIES[0]: (client, worker.function, discover),
            SERIES[1]: (client, worker.function, stats),
            SERIES[2]: (client, echo_function, discover),
            SERIES[3]: (tls_client, tls_worker.function, discover),
        }
        measure(targets, min(args.warmup, args.jobs), 1)
        results = measure(targets, args.jobs, min(args.blocks, args.jobs))
        moved = sum(moves_to_readers(w.root / "worker.log") for w in (worker, tls_worker))

    rows = summarize(results)
    text = table(rows, machine(info, args.busy_core))
    judged = f"{verdict(rows)} Pings moved off the Gearman loop during the run: {moved}."
    print(text)
    print(judged)
    notes = (
        "Client: a raw-socket Gearman client (bench/_common.py `RawClient`) on one kept-open "
        "TCP connection, one job at a time, the same client for the three plain series; series "
        f"interleaved in {min(args.blocks, args.jobs)} blocks; `p50 vs floor` is the median "
        "of the blocks' p50 ratios. jobs/s is sequential "
        "(one job in flight), so it is about 1/mean latency. The worker runs with its default "
        "INFO logging to a file, where a passed ping's line is at DEBUG and one INFO line a "
        "minute counts them (docs/operations.rst, Logs); each job is in its job journal, "
        "written after the answer. DISCOVER and STATS run in place on the "
        "worker's Gearman loop unless one held it more than 50 ms (the count above). "
        "STATS reads HAProxy's stats socket "
        "(one HTTP load balancer, 2 nodes). DISCOVER over TLS: client and worker each on one "
        "kept-open TLS 1.3 connection to stunnel (client certificates required), which "
        "forwards to the same gearmand; the handshakes happen before the measurement, so "
        "the figure is the per-job cost (encryption and the extra stunnel hop)."
    )
    c.publish(args, "round_trip", "Gearman round trip: DISCOVER and STATS",
              [text, judged, notes], info, "round trip CDF",
              lambda plt, path: plot(results, plt, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
