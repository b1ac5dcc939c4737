#!/usr/bin/env python3
"""UPDATE latency (job submitted -> reply received, through gearmand) by node count.

For each size (default 1, 100, 1000, 10000 nodes on 127.0.0.x; the nodes need not listen,
health checks run every 60 s) the real libra-worker gets, interleaved:

* full changes: the algorithm flips ROUND_ROBIN <-> LEAST_CONNECTIONS, which needs a reload;
* node-only changes, which the Runtime API applies without a reload: one node's weight
  flips 1 <-> 2, one node is added, and the same node removed again. Whether the worker
  reloaded is read from HAProxy's master CLI (did the worker pid change?) and reported as
  the path taken.

The floor, measured in the same run and interleaved with the above: the worker's own
HAProxy driven straight, between UPDATEs, on the file the worker last rendered:
`haproxy -c -q -f cfg`, then `reload` on its master CLI and polling `show proc` every 2 ms
(as the worker does) until a new worker is listed. Also reported, not judged: the same
steps on a second HAProxy started from the same text (rendered by the worker's own
renderer, sockets in another dir), the floor of earlier runs. Driven the same way, two
HAProxys do not reload a 10,000-node file equally fast (measured: ~1.25 s vs ~1.6 s, each
instance keeping its speed across reloads; the time goes to HAProxy 2.6's pairwise check
of dynamic cookies), so only the worker's own HAProxy is a floor for the worker.

Targets (issue 18): full change p50 <= 1.2x the floor's p50 at every size; each node-only
change p50 <= one `haproxy -c` of the same config (the floor's check p50) at 1,000 nodes,
reported at every size (the message parsing of all nodes included: the latency is the
whole job, through gearmand).

`--busy-core CPU` plays a slow machine: this script and everything it starts (gearmand,
the worker, both HAProxys) run on that one CPU only, and a Python busy loop runs there too
for the whole run, so every process gets about half of one core.

Usage: python bench/update_latency.py [--sizes 1,100,1000,10000] [--iterations 20]
       [--large-iterations 6] [--busy-core CPU] [--out-dir DIR] [--no-plot]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

FULL_TARGET = 1.2
# A node-only change, as a multiple of one `haproxy -c`, and the size it is judged at.
NODE_TARGET = 1.0
NODE_TARGET_SIZE = 1000
NODE_SERIES = (("node", "1 weight"), ("add", "1 added"), ("remove", "1 removed"))
LARGE = 5000
ALGORITHMS = ("ROUND_ROBIN", "LEAST_CONNECTIONS")
FLOOR_POLL = 0.002  # the worker's own poll (drivers/haproxy/process.py)


def message(size: int, port: int, algorithm: str, first_weight: int,
            extra_node: bool = False) -> dict[str, Any]:
    nodes = [
        {"id": f"n{i}", "address": f"127.0.0.{1 + i % 250}", "port": 20000 + i // 250,
         "weight": first_weight if i == 0 else 1}
        for i in range(size + extra_node)
    ]
    return {
        "hpcs_action": "UPDATE",
        "loadbalancers": [{
            "protocol": "HTTP", "port": port, "algorithm": algorithm, "nodes": nodes,
            "monitor": {"type": "CONNECT", "delay": 60, "timeout": 60, "attempts": 2},
        }],
    }


class DirectReload:
    """A master-worker HAProxy driven directly: the least a check and reload can cost."""

    def __init__(self, config: Path, master_socket: Path) -> None:
        self.config = config
        self.master_socket = master_socket

    def _workers(self) -> tuple[int, ...]:
        answer = c.send_command(self.master_socket, "show proc", 10.0)
        return c.ProcessTable.parse(answer).worker_pids

    def _workers_retrying(self, deadline: float) -> tuple[int, ...]:
        while True:
            try:
                return self._workers()
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(FLOOR_POLL)

    def check_and_reload(self) -> tuple[float, float]:
        """(seconds for `haproxy -c`, seconds for the reload until a new worker is listed)."""
        before = self._workers()
        started = time.perf_counter()
        result = subprocess.run(["haproxy", "-c", "-q", "-f", str(self.config)],
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        checked = time.perf_counter()
        if result.returncode != 0:
            raise RuntimeError(f"floor config rejected: {result.stderr[:500]!r}")
        deadline = time.monotonic() + 60
        while True:
            try:
                c.send_command(self.master_socket, "reload", 10.0)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(FLOOR_POLL)
        while True:
            workers = self._workers_retrying(deadline)
            if workers and set(workers).isdisjoint(before):
                break
            if time.monotonic() >= deadline:
                raise RuntimeError("the floor HAProxy did not reload")
            time.sleep(FLOOR_POLL)
        return checked - started, time.perf_counter() - checked


class SecondHAProxy(DirectReload):
    """Another HAProxy, started from the text the worker renders (own sockets and port)."""

    def __init__(self, root: Path, port: int) -> None:
        self.dir = root / "second"
        self.dir.mkdir()
        super().__init__(self.dir / "haproxy.cfg", self.dir / "master.sock")
        self.pid_file = self.dir / "haproxy.pid"
        self.port = port

    def write(self, msg: dict[str, Any]) -> None:
        moved = json.loads(json.dumps(msg))
        moved["loadbalancers"][0]["port"] = self.port
        self.config.write_text(c.render_config(moved, self.dir, self.dir / "log.sock"))

    def start(self) -> None:
        subprocess.run(["haproxy", "-W", "-D", "-p", str(self.pid_file),
                        "-S", f"{self.master_socket},mode,600", "-f", str(self.config)],
                       stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=60)
        deadline = time.monotonic() + 30
        c.wait_until(lambda: self._workers_retrying(deadline), 30, "the second HAProxy")

    def stop(self) -> None:
        c.haproxy_handle(self.pid_file, self.config, self.master_socket).stop()


def timed_update(client: c.RawClient, worker: c.Worker, msg: dict[str, Any]) -> tuple[float, bool]:
    """(seconds from submit to reply, whether HAProxy's worker processes were replaced)."""
    payload = json.dumps(msg).encode()
    before = _pids_or_none(worker) or ()  # HAProxy is not running before the first UPDATE
    started = time.perf_counter()
    answer = client.submit(worker.function, payload)
    elapsed = time.perf_counter() - started
    if b'"hpcs_response": "PASS"' not in answer:
        raise RuntimeError(f"UPDATE failed: {answer[-500:]!r}")
    after = c.wait_until(lambda: _pids_or_none(worker), 30, "the master CLI")
    return elapsed, set(after).isdisjoint(before)


def _pids_or_none(worker: c.Worker) -> tuple[int, ...] | None:
    try:
        return worker.haproxy_worker_pids() or None
    except (OSError, c.WorkerError):  # not started yet, or re-executing
        return None


def measure_size(size: int, iterations: int, client: c.RawClient, worker: c.Worker,
                 second: SecondHAProxy, lb_port: int, first: bool) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"check": [], "reload": [], "floor": [], "second": [],
                                       "full": [], **{key: [] for key, _ in NODE_SERIES}}
    reloaded = {"full": 0, **{key: 0 for key, _ in NODE_SERIES}}
    # Between UPDATEs nothing else changes the worker's HAProxy, nor its live file.
    floor = DirectReload(worker.state_dir / "haproxy.cfg", worker.master_socket)
    msg = message(size, lb_port, ALGORITHMS[0], 1)
    second.write(msg)
    if first:
        timed_update(client, worker, msg)  # starts HAProxy
        second.start()
    # Unmeasured warm-up at this size: the first UPDATE changes every server line.
    for turn in range(2):
        timed_update(client, worker, message(size, lb_port, ALGORITHMS[turn % 2], 1))
        floor.check_and_reload()
        second.write(message(size, lb_port, ALGORITHMS[turn % 2], 1))
        second.check_and_reload()
    for i in range(iterations):
        # The warm-up ended on ALGORITHMS[1]: every full change flips the algorithm.
        algorithm = ALGORITHMS[i % 2]
        elapsed, replaced = timed_update(client, worker, message(size, lb_port, algorithm, 1))
        samples["full"].append(elapsed)
        reloaded["full"] += replaced
        elapsed, replaced = timed_update(client, worker, message(size, lb_port, algorithm, 2))
        samples["node"].append(elapsed)
        reloaded["node"] += replaced
        # Back to weight 1 so that the next full change differs only by the algorithm.
        timed_update(client, worker, message(size, lb_port, algorithm, 1))
        for key, extra in (("add", True), ("remove", False)):
            elapsed, replaced = timed_update(client, worker,
                                             message(size, lb_port, algorithm, 1, extra))
            samples[key].append(elapsed)
            reloaded[key] += replaced
        # The live file now serves `algorithm` with as many server lines as the full
        # change rendered (the node removed left its slot empty, not gone).
        check_s, reload_s = floor.check_and_reload()
        samples["check"].append(check_s)
        samples["reload"].append(reload_s)
        samples["floor"].append(check_s + reload_s)
        second.write(message(size, lb_port, algorithm, 1))
        samples["second"].append(sum(second.check_and_reload()))
    return {"size": size, "samples": samples, "reloaded": reloaded, "iterations": iterations}


def path_label(reloads: int, iterations: int) -> str:
    if reloads == iterations:
        return "reload"
    if reloads == 0:
        return "no reload"
    return f"reload {reloads}/{iterations}"


def rows_for(result: dict[str, Any]) -> list[list[str]]:
    s = result["samples"]
    floor_p50 = c.median(s["floor"])
    check_p50 = c.median(s["check"])
    n = result["iterations"]
    rows = []
    for key, label, path in (
        ("check", "floor: haproxy -c", "-"),
        ("reload", "floor: master-worker reload", "-"),
        ("floor", "floor: check + reload", "-"),
        ("second", "second HAProxy: check + reload", "-"),
        ("full", "worker: full change (algorithm)", path_label(result["reloaded"]["full"], n)),
        *((key, f"worker: node-only ({label})", path_label(result["reloaded"][key], n))
          for key, label in NODE_SERIES),
    ):
        p50 = c.median(s[key])
        rows.append([str(result["size"]), label, str(len(s[key])), c.fmt_ms(p50),
                     c.fmt_ms(c.percentile(s[key], 99)),
                     c.fmt_ratio(c.ratio(p50, floor_p50)) if key not in ("check", "reload") else "",
                     c.fmt_ratio(c.ratio(p50, check_p50))
                     if key not in ("reload", "floor", "second") else "",
                     path])
    return rows


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for result in results:
        s = result["samples"]
        ratio = c.ratio(c.median(s["full"]), c.median(s["floor"]))
        lines.append(f"- {result['size']} nodes, full change: p50 {c.fmt_ms(c.median(s['full']))} ms "
                     f"= {c.fmt_ratio(ratio)} the floor; target <= {FULL_TARGET}x: "
                     f"{'MET' if ratio <= FULL_TARGET else 'MISSED'}.")
    for result in results:
        check = c.median(result["samples"]["check"])
        for key, label in NODE_SERIES:
            p50 = c.median(result["samples"][key])
            ratio = c.ratio(p50, check)
            path = path_label(result["reloaded"][key], result["iterations"])
            met = ratio <= NODE_TARGET and path == "no reload"
            verdict = (f"target <= {NODE_TARGET}x and no reload: {'MET' if met else 'MISSED'}"
                       if result["size"] == NODE_TARGET_SIZE
                       else f"{'within' if met else 'beyond'} {NODE_TARGET}x, reported only")
            lines.append(f"- {result['size']} nodes, node-only change ({label}): p50 "
                         f"{c.fmt_ms(p50)} ms = {c.fmt_ratio(ratio)} one `haproxy -c` "
                         f"({c.fmt_ms(check)} ms; path: {path}); {verdict}.")
    return lines


def plot(results: list[dict[str, Any]], plt, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    sizes = [r["size"] for r in results]
    for key, label, style in (("floor", "floor: haproxy -c + reload", "k--"),
                              ("full", "worker: full change", "o-"),
                              ("node", "worker: node-only, 1 weight", "s-"),
                              ("add", "worker: node-only, 1 added", "^-"),
                              ("remove", "worker: node-only, 1 removed", "v-")):
        p50 = [c.median(r["samples"][key]) * 1000 for r in results]
        p99 = [c.percentile(r["samples"][key], 99) * 1000 for r in results]
        line, = axis.plot(sizes, p50, style, label=f"{label} (p50)")
        axis.plot(sizes, p99, linestyle=":", marker="x", color=line.get_color(),
                  label=f"{label} (p99)")
    check = [c.median(r["samples"]["check"]) * NODE_TARGET * 1000 for r in results]
    axis.plot(sizes, check, "r+", markersize=12, label="node-only target: haproxy -c (p50)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("nodes")
    axis.set_ylabel("UPDATE latency, ms (log)")
    axis.set_title("UPDATE latency through gearmand vs HAProxy floor")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    c.save_figure(plt, figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--sizes", default="1,100,1000,10000")
    parser.add_argument("--iterations", type=int, default=20, help="samples per series and size")
    parser.add_argument("--large-iterations", type=int, default=6,
                        help=f"samples per series for sizes >= {LARGE}")
    c.add_busy_core_option(parser)
    args = parser.parse_args(argv)
    sizes = [int(item) for item in args.sizes.split(",") if item.strip()]

    info = c.machine_info()
    results = []
    with c.Run() as run:
        if args.busy_core is not None:
            c.busy_core(run, args.busy_core)
        gearmand = run.own(c.Gearmand(run.root).start())
        second = run.own(SecondHAProxy(run.root, c.free_port()))
        worker = run.own(c.Worker(run.root, gearmand).start())
        client = run.own(c.RawClient(gearmand.address, timeout=300))
        worker_port = c.free_port()
        for index, size in enumerate(sizes):
            iterations = args.large_iterations if size >= LARGE else args.iterations
            started = time.monotonic()
            result = measure_size(size, iterations, client, worker, second, worker_port,
                                  first=index == 0)
            results.append(result)
            print(f"{size} nodes: {iterations} iterations in {time.monotonic() - started:.1f} s",
                  flush=True)

    headers = ["nodes", "series", "n", "p50 ms", "p99 ms", "p50 vs floor", "p50 vs haproxy -c",
               "path taken"]
    text = c.markdown_table(headers, [row for result in results for row in rows_for(result)])
    print(text)
    lines = verdicts(results)
    print("\n".join(lines))
    notes = (
        "Latency is measured by the client: SUBMIT_JOB sent -> WORK_COMPLETE received, on one "
        "kept-open raw-socket Gearman connection, one job at a time. 'path taken' says whether "
        "HAProxy's worker processes were replaced (read from the master CLI's `show proc` "
        "before and after each UPDATE). The floor is the worker's own HAProxy driven directly "
        "between UPDATEs on the file the worker last rendered: `haproxy -c`, then `reload` on "
        f"its master CLI, polling `show proc` every {FLOOR_POLL * 1000:.0f} ms (as the worker "
        "does) until a new worker is listed. 'second HAProxy' is the same on another HAProxy "
        "started from the same text (own sockets and port), reported only: two HAProxys do not "
        "reload a large file equally fast. With "
        f"{args.iterations} samples (or {args.large_iterations} at >= {LARGE} nodes) p99 is "
        "close to the maximum."
    )
    if args.busy_core is not None:
        notes += (f" Slow-machine run: everything (this script, gearmand, the worker, both "
                  f"HAProxys) on CPU {args.busy_core} only, beside a Python busy loop on it.")
    c.publish(args, "update_latency", "UPDATE latency by node count",
              [text, "\n".join(lines), notes], info, "UPDATE latency",
              lambda plt, path: plot(results, plt, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
