#!/usr/bin/env python3
"""HTTP traffic through the load balancer while UPDATEs arrive every 0.5 s.

Real pieces, all on loopback: gearmand, the real libra-worker, an HTTP load balancer over
small real backends (one helper HAProxy answering `http-request return` on 127.0.0.2-4,
one port each: fast enough to keep the LB, not the backends, the bottleneck on 2 cores),
and wrk generating load for `--duration` seconds, once with keep-alive and once with
`Connection: close`. Meanwhile a schedule sends a change every `--interval` seconds,
alternating between node sets {be0, be1} and {be1, be2}.

Two modes, same config text (rendered by the worker's own renderer), same schedule,
interleaved in `--rounds` rounds (worker, baseline, worker, baseline, ...) whose requests
and durations are summed, so that the other load of a shared machine hits both alike:

* worker: UPDATE jobs through gearmand to libra-worker, which applies them its own way
  (master-worker reload through the master CLI, or the Runtime API when only nodes change);
* baseline: what the 2013 Libra did: write the file, `haproxy -c`, then
  `haproxy -f cfg -p pid -D -sf <oldpid>` (daemon mode, no master-worker).

Reported per mode: requests, failed requests (wrk's connect/read/write errors and
timeouts), HTTP errors (status >= 400, which wrk counts as non-2xx/3xx; the backends only
answer 200 and nothing here redirects), requests/s, and the latency of each change.
Targets: 0 failed requests for libra-worker; keep-alive requests/s >= 0.95x the baseline's
in the same run (issue 11: no throughput tax).

Usage: python bench/traffic_during_changes.py [--duration 30] [--interval 0.5]
       [--connections 32] [--threads 2] [--out-dir DIR] [--no-plot]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

WRK = "/usr/bin/wrk"
BACKEND_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
CONNECTION_MODES = ("keep-alive", "close")
LB_MODES = ("libra-worker", "baseline: haproxy -D -sf")
THROUGHPUT_TARGET = 0.95

# wrk calls done() once, after the run: print the summary as one JSON line.
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class Backends:
    """One helper HAProxy (daemon mode, our pidfile) answering 200 on one port per backend."""

    def __init__(self, root: Path, count: int) -> None:
        self.dir = root / "backends"
        self.dir.mkdir()
        self.pid_file = self.dir / "haproxy.pid"
        self.addresses = [(BACKEND_HOSTS[i], c.free_port(BACKEND_HOSTS[i])) for i in range(count)]

    def start(self) -> "Backends":
        lines = ["global", "    maxconn 8000", "    nbthread 1",
                 "defaults", "    mode http", "    timeout connect 5s", "    timeout client 30s",
                 "    timeout server 30s", "    timeout http-keep-alive 30s"]
        for i, (host, port) in enumerate(self.addresses):
            lines += [f"frontend be{i}", f"    bind {host}:{port}",
                      f'    http-request return status 200 content-type text/plain string "be{i}"']
        config = self.dir / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        subprocess.run(["haproxy", "-D", "-p", str(self.pid_file), "-f", str(config)],
                       stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=30)
        for host, port in self.addresses:
            c.wait_until(lambda: c.port_accepts(port, host), 10, f"backend {host}:{port}")
        return self

    def nodes(self, indexes: tuple[int, ...]) -> list[dict[str, Any]]:
        return [{"id": f"be{i}", "address": self.addresses[i][0], "port": self.addresses[i][1]}
                for i in indexes]

    def stop(self) -> None:
        c.haproxy_handle(self.pid_file).stop()


def node_sets(backends: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if backends <= 2:
        return (0, 1), (1,)
    return tuple(range(backends - 1)), tuple(range(1, backends))


def update_message(port: int, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"hpcs_action": "UPDATE",
            "loadbalancers": [{"protocol": "HTTP", "port": port, "nodes": nodes}]}


class WorkerMode:
    """Changes go to the real libra-worker as UPDATE jobs through gearmand."""

    name = LB_MODES[0]

    def __init__(self, worker: c.Worker, client: c.RawClient, port: int) -> None:
        self.worker = worker
        self.client = client
        self.port = port
        self.failures: list[str] = []

    def apply(self, nodes: list[dict[str, Any]]) -> None:
        answer = self.client.submit_json(self.worker.function, update_message(self.port, nodes))
        if answer.get("hpcs_response") != "PASS":
            self.failures.append(str(answer.get("hpcs_error")))


class BaselineMode:
    """The 2013 way: write, `haproxy -c`, `haproxy -f cfg -p pid -D -sf <oldpid>`."""

    name = LB_MODES[1]

    def __init__(self, root: Path, port: int) -> None:
        self.dir = root / "baseline"
        self.dir.mkdir()
        self.config = self.dir / "haproxy.cfg"
        self.pid_file = self.dir / "haproxy.pid"
        self.port = port
        self.failures: list[str] = []
        # Same config text means the same access logging: the same sink the worker runs.
        self.sink = c.LogSink(self.dir)
        self.sink.ensure_running()

    def apply(self, nodes: list[dict[str, Any]]) -> None:
        candidate = self.dir / "haproxy.cfg.new"
        candidate.write_text(c.render_config(update_message(self.port, nodes), self.dir,
                                             self.sink.socket_path))
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(candidate)],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if check.returncode != 0:
            self.failures.append(check.stderr.decode(errors="replace")[:300])
            return
        os.replace(candidate, self.config)
        command = ["haproxy", "-f", str(self.config), "-p", str(self.pid_file), "-D"]
        old = self._pids_in_file()
        if old:
            command += ["-sf", *map(str, old)]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if result.returncode != 0:
            self.failures.append(result.stderr.decode(errors="replace")[:300])

    def _pids_in_file(self) -> list[int]:
        try:
            return [int(word) for word in self.pid_file.read_text().split()]
        except (OSError, ValueError):
            return []

    def stop(self) -> None:
        """The last daemon soft-stops; old ones still draining (`-sf`) are killed by pid."""
        try:
            c.haproxy_handle(self.pid_file, self.config).stop()
        finally:
            self.sink.stop()


def worker_log_size(root: Path) -> int:
    try:
        return (root / "worker.log").stat().st_size
    except OSError:
        return 0


def update_paths(root: Path, offset: int) -> dict[str, int]:
    """How the worker applied each UPDATE since `offset`, from its INFO log lines."""
    with open(root / "worker.log", "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode("utf-8", "replace")
    paths: dict[str, int] = {}
    for line in text.splitlines():
        if "UPDATE applied at runtime" in line:
            key = "runtime"
        elif "UPDATE reloaded HAProxy" in line:
            key = "reload: " + line.split("UPDATE reloaded HAProxy:", 1)[-1].strip()[:90]
        elif "HAProxy reloaded" in line and "UPDATE" not in line:
            continue
        else:
            continue
        paths[key] = paths.get(key, 0) + 1
    return paths


def run_wrk(root: Path, port: int, duration: float, connections: int, threads: int,
            close: bool, timeout_s: float) -> subprocess.Popen[str]:
    script = root / "summary.lua"
    script.write_text(WRK_SCRIPT)
    command = [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s",
               "--timeout", f"{timeout_s:g}s", "-s", str(script)]
    if close:
        command += ["-H", "Connection: close"]
    command.append(f"http://{c.LOOPBACK}:{port}/")
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def one_run(mode: Any, sets: tuple[list[dict[str, Any]], list[dict[str, Any]]], root: Path,
            args: argparse.Namespace, close: bool) -> dict[str, Any]:
    mode.apply(sets[0])  # a known starting point, outside the measurement
    time.sleep(0.5)
    wrk = run_wrk(root, mode.port, args.duration, args.connections, args.threads, close,
                  args.request_timeout)
    latencies = []
    log_offset = worker_log_size(root)
    started = time.monotonic()
    scheduled = int(args.duration / args.interval) - 1
    tick = 0
    # Bounded: at most one change per slot; a slot missed while a change was still running
    # is skipped, not made up for in a burst.
    while tick < scheduled and wrk.poll() is None:
        now = time.monotonic() - started
        tick = int(now / args.interval) + 1
        time.sleep(max(0.0, tick * args.interval - now))
        if wrk.poll() is not None or time.monotonic() - started > args.duration - 0.2:
            break
        begun = time.perf_counter()
        mode.apply(sets[tick % 2])
        latencies.append(time.perf_counter() - begun)
    output, _ = wrk.communicate(timeout=args.duration + 30)
    summary = next((json.loads(line[len("WRKJSON "):]) for line in output.splitlines()
                    if line.startswith("WRKJSON ")), None)
    if summary is None:
        raise RuntimeError(f"wrk gave no summary:\n{output}")
    failed = summary["connect"] + summary["read"] + summary["write"] + summary["timeout"]
    return {
        "connection": "close" if close else "keep-alive",
        "mode": mode.name,
        "requests": summary["requests"],
        "failed": failed,
        "errors": {k: summary[k] for k in ("connect", "read", "write", "timeout")},
        "http_errors": summary["status"],
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "seconds": summary["duration_us"] / 1e6,
        "latencies": latencies,
        "latency_p50_ms": summary["p50_us"] / 1000,
        "latency_p99_ms": summary["p99_us"] / 1000,
        "changes": len(latencies),
        "scheduled": scheduled,
        "paths": update_paths(root, log_offset) if isinstance(mode, WorkerMode) else {},
        "change_failures": len(mode.failures),
        "change_p50": c.median(latencies),
        "change_p99": c.percentile(latencies, 99),
    }


def combined(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one result: counts and seconds summed, request latency as the
    median of the rounds' p50 and the worst p99, each round's req/s kept for the spread."""
    latencies = [seconds for r in rounds for seconds in r["latencies"]]
    paths: dict[str, int] = {}
    for r in rounds:
        for key, count in r["paths"].items():
            paths[key] = paths.get(key, 0) + count
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    return {
        **{key: rounds[0][key] for key in ("connection", "mode")},
        **{key: sum(r[key] for r in rounds)
           for key in ("requests", "failed", "http_errors", "changes", "scheduled", "change_failures")},
        "errors": {kind: sum(r["errors"][kind] for r in rounds) for kind in rounds[0]["errors"]},
        "rps": requests / seconds,
        "round_rps": [r["rps"] for r in rounds],
        "seconds": seconds,
        "latency_p50_ms": c.median([r["latency_p50_ms"] for r in rounds]),
        "latency_p99_ms": max(r["latency_p99_ms"] for r in rounds),
        "paths": paths,
        "change_p50": c.median(latencies),
        "change_p99": c.percentile(latencies, 99),
    }


def round_ratios(results: list[dict[str, Any]]) -> str:
    """Per round, libra-worker's req/s over the baseline's run right after it."""
    lines = ["req/s vs baseline, round by round (the spread is the machine's noise):"]
    for connection in CONNECTION_MODES:
        worker, baseline = (next(r for r in results if r["mode"] == mode and r["connection"] == connection)
                            for mode in LB_MODES)
        ratios = [c.fmt_ratio(c.ratio(w, b)) for w, b in zip(worker["round_rps"], baseline["round_rps"])]
        lines.append(f"- {connection}: {', '.join(ratios)}")
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    baseline = {r["connection"]: r["rps"] for r in results if r["mode"] == LB_MODES[1]}
    rows = []
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items() if v) or "-"
        rows.append([
            r["connection"], r["mode"], r["requests"], r["failed"], errors, r["http_errors"],
            f"{r['rps']:.0f}", c.fmt_ratio(c.ratio(r["rps"], baseline.get(r["connection"], 0))),
            f"{r['latency_p50_ms']:.2f} / {r['latency_p99_ms']:.2f}",
            f"{r['changes']}/{r['scheduled']} ({r['change_failures']} failed)",
            f"{c.fmt_ms(r['change_p50'])} / {c.fmt_ms(r['change_p99'])}",
        ])
    return c.markdown_table(
        ["connection", "mode", "requests", "failed", "failed by kind", "HTTP >= 400", "req/s",
         "req/s vs baseline", "req p50/p99 ms", "changes done/scheduled", "change p50/p99 ms"],
        rows)


def paths_text(results: list[dict[str, Any]]) -> str:
    lines = ["How libra-worker applied the UPDATEs (from its log):"]
    for r in results:
        if r["mode"] == LB_MODES[0]:
            described = "; ".join(f"{k}: {v}" for k, v in sorted(r["paths"].items())) or "unknown"
            lines.append(f"- {r['connection']}: {described}")
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> str:
    worker = [r for r in results if r["mode"] == LB_MODES[0]]
    failed = sum(r["failed"] + r["http_errors"] for r in worker)
    bad_changes = sum(r["change_failures"] for r in worker)
    met = "MET" if failed == 0 and bad_changes == 0 else "MISSED"
    rps = {(r["mode"], r["connection"]): r["rps"] for r in results}
    tax = c.ratio(rps.get((LB_MODES[0], "keep-alive"), 0), rps.get((LB_MODES[1], "keep-alive"), 0))
    return (f"Target 0 failed requests for libra-worker: {met} ({failed} failed or HTTP >= 400 "
            f"over {sum(r['requests'] for r in worker)} requests; {bad_changes} UPDATEs failed). "
            f"Target keep-alive req/s >= {THROUGHPUT_TARGET:g}x the baseline: "
            f"{'MET' if tax >= THROUGHPUT_TARGET else 'MISSED'} ({c.fmt_ratio(tax)}).")


def plot(results: list[dict[str, Any]], plt, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    width = 0.38
    for offset, mode in ((-width / 2, LB_MODES[0]), (width / 2, LB_MODES[1])):
        rows = [next(r for r in results if r["mode"] == mode and r["connection"] == conn)
                for conn in CONNECTION_MODES]
        xs = [i + offset for i in range(len(CONNECTION_MODES))]
        left.bar(xs, [r["rps"] for r in rows], width, label=mode)
        bars = right.bar(xs, [r["failed"] + r["http_errors"] for r in rows], width, label=mode)
        right.bar_label(bars)
    for axis, title in ((left, "requests/s"), (right, "failed + HTTP >= 400 requests")):
        axis.set_xticks(range(len(CONNECTION_MODES)), CONNECTION_MODES)
        axis.set_title(title)
        axis.grid(True, axis="y", alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle("HTTP load during a change every 0.5 s")
    c.save_figure(plt, figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved runs per mode and connection mode, summed")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between changes")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", type=int, default=3, choices=(2, 3))
    parser.add_argument("--request-timeout", type=float, default=2.0)
    args = parser.parse_args(argv)

    info = c.machine_info()
    results = []
    with c.Run() as run:
        backends = run.own(Backends(run.root, args.backends).start())
        gearmand = run.own(c.Gearmand(run.root).start())
        worker = run.own(c.Worker(run.root, gearmand).start())
        client = run.own(c.RawClient(gearmand.address))
        baseline = run.own(BaselineMode(run.root, c.free_port()))
        first, second = node_sets(args.backends)
        sets = (backends.nodes(first), backends.nodes(second))
        modes = (WorkerMode(worker, client, c.free_port()), baseline)
        # Interleaved: worker, baseline, worker, baseline, so drift hits both alike.
        for close in (False, True):
            rounds: dict[str, list[dict[str, Any]]] = {mode.name: [] for mode in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    result = one_run(mode, sets, run.root, args, close)
                    rounds[mode.name].append(result)
                    print(f"{result['connection']:10} {result['mode']:26} {result['requests']:8d} "
                          f"requests, {result['failed']} failed, {result['rps']:.0f} req/s", flush=True)
            results += [combined(rounds[mode.name]) for mode in modes]

    text = table(results)
    print(text)
    print(verdict(results))
    print(round_ratios(results))
    print(paths_text(results))
    notes = (
        f"wrk {args.threads} threads, {args.connections} connections, {args.rounds} interleaved "
        f"rounds of {args.duration:g} s per mode, "
        f"--timeout {args.request_timeout:g}s; a change every {args.interval:g} s alternating "
        f"node sets; {args.backends} backends (one helper HAProxy, `http-request return`). "
        "'failed' = wrk's connect + read + write errors + timeouts. 'change' latency is the "
        "UPDATE round trip through gearmand for libra-worker, and write + `haproxy -c` + "
        "`haproxy -D -sf` for the baseline. A noisy 2-CPU machine: compare the summed ratios "
        "and their per-round spread, not absolute req/s. Both modes log every request to a libra-worker log sink "
        "(same config text)."
    )
    c.publish(args, "traffic_during_changes", "HTTP traffic during changes every 0.5 s",
              [text, verdict(results), round_ratios(results), paths_text(results), notes], info,
              "traffic",
              lambda plt, path: plot(results, plt, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
