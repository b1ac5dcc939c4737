#!/usr/bin/env python3
"""A fleet on one machine: N devices behind 2 job servers, swept by libra-client's fan-out.

Starts 2 gearmand and N devices. Each device is a real libra-worker with its own
state_dir, registered at both job servers, serving one HTTP load balancer on its own
loopback address (127.0.1.x, the same port everywhere, as real devices have their own IP)
with one real backend. The floor is N raw echo workers (bench/round_trip.py's, one
process per device, registered at both job servers).

Measured with the fan-out of libra-client (`libra_worker.client.submit_many`: one
message to all N at once, as Libra's admin server pings its fleet):

* a STATS sweep of all N, against the same sweep of the echo workers (interleaved rounds):
  total time and per-device p50/p99;
* a METRICS sweep;
* UPDATE to all N (the first starts HAProxy, the second changes the node: runtime API);
* a STATS sweep during which one gearmand is killed (SIGKILL): the devices whose job was
  on it are swept again, through the other, and every device must answer;
* memory per device (worker + HAProxy master and worker + log sink RSS), and the idle
  CPU of the fleet.

Target: STATS sweep time within 2x the echo-worker floor at N = 100.

Usage: python bench/fleet.py [--devices 100] [--rounds 5] [--out-dir DIR] [--no-plot]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import round_trip  # noqa: E402
from libra_worker import client  # noqa: E402
from tests.integration.support import HTTPBackend  # noqa: E402

TARGET_RATIO = 2.0
SWEEP_TIMEOUT = 60.0
# Starting ~100 Python processes at once on a small machine: a few at a time.
START_PARALLELISM = 4
PROVISION_BATCH = 10
STATS, METRICS = json.dumps({"hpcs_action": "STATS"}), json.dumps({"hpcs_action": "METRICS"})


def device_address(index: int) -> str:
    return f"127.0.1.{index + 1}"


def start_devices(run: c.Run, gearmands: list[c.Gearmand], count: int) -> list[c.Worker]:
    servers = ", ".join(g.address for g in gearmands)

    def start(index: int) -> c.Worker:
        root = run.root / f"device-{index}"
        root.mkdir()
        return c.Worker(root, gearmands[0], servers=servers,
                        bind_address=device_address(index)).start()

    devices: list[c.Worker] = []
    with ThreadPoolExecutor(START_PARALLELISM) as pool:
        for device in pool.map(start, range(count)):
            devices.append(run.own(device))
    return devices


def start_echo_workers(run: c.Run, gearmands: list[c.Gearmand],
                       count: int) -> tuple[list[str], list[int]]:
    """The echo workers' function names and pids."""
    addresses = ",".join(g.address for g in gearmands)
    root = run.root / "echo"
    root.mkdir()

    def start(index: int) -> tuple[str, int]:
        process, function = round_trip.start_echo_worker(
            gearmands[0], root, function=f"lwb-echo-{index}", addresses=addresses)
        run.callback(c.stop_child, process)
        return function, process.pid

    with ThreadPoolExecutor(START_PARALLELISM) as pool:
        started = list(pool.map(start, range(count)))
    return [function for function, _ in started], [pid for _, pid in started]


def sweep(servers: str, functions: list[str], message: str,
          timeout: float = SWEEP_TIMEOUT) -> tuple[float, list[client.Result]]:
    started = time.perf_counter()
    results = client.submit_many(servers, functions, message, timeout, require_worker=True)
    return time.perf_counter() - started, results


def checked(name: str, results: list[client.Result], outcome: str = client.PASS) -> None:
    wrong = [r for r in results if r.outcome != outcome]
    if wrong:
        raise RuntimeError(f"{name}: {len(wrong)} devices did not answer {outcome}: "
                           f"{[r.line() for r in wrong[:5]]}")


def series_row(name: str, totals: list[float], results: list[client.Result],
               floor_total: float | None = None) -> list[str]:
    per_device = [r.ms / 1000 for r in results]
    return [name, str(len(totals)), c.fmt_ms(c.median(totals)), c.fmt_ms(max(totals)),
            c.fmt_ms(c.median(per_device)), c.fmt_ms(c.percentile(per_device, 99)),
            c.fmt_ratio(c.ratio(c.median(totals), floor_total)) if floor_total else "-"]


def update_message(backend: HTTPBackend, port: int, weight: int,
                   algorithm: str = "ROUND_ROBIN") -> str:
    return json.dumps({"hpcs_action": "UPDATE", "loadBalancers": [{
        "protocol": "HTTP", "port": port, "algorithm": algorithm,
        "nodes": [backend.node(weight=weight)]}]})


def provision(servers: str, functions: list[str], message: str) -> tuple[float, list[client.Result]]:
    """The first UPDATE, a batch of devices at a time: each starts HAProxy and a Python log
    sink, and ~100 interpreters starting at once overrun the sink's 10 s start-up limit
    on a small machine."""
    started, results = time.perf_counter(), []
    for first in range(0, len(functions), PROVISION_BATCH):
        _, batch = sweep(servers, functions[first:first + PROVISION_BATCH], message)
        results += batch
    return time.perf_counter() - started, results


def sweep_through_a_gearmand_kill(servers: str, devices: list[str], doomed: c.Gearmand,
                                  kill_after: float) -> dict[str, Any]:
    """A STATS sweep during which `doomed` is killed; the silent devices are asked again."""
    killer = threading.Timer(kill_after, doomed.process.kill)
    killer.start()
    try:
        first_total, first = sweep(servers, devices, STATS, timeout=10)
    finally:
        killer.join()
    doomed.process.wait(10)
    missing = [r.worker for r in first if r.outcome != client.PASS]
    retry_total, retried = sweep(servers, missing, STATS) if missing else (0.0, [])
    checked("STATS retried after the gearmand kill", retried)
    return {"first": first_total, "answered_first": len(devices) - len(missing),
            "retried": len(missing), "retry": retry_total,
            "answered": len(devices) - len(missing) + len(retried)}


def pids_of(device: c.Worker) -> list[int]:
    pids = [device.pid]
    master = device.haproxy.master_pid()
    if master:
        pids += [master, *device.haproxy_worker_pids()]
    sink = c.LogSink(device.state_dir).pid()
    return pids + ([sink] if sink else [])


def memory_per_device(devices: list[c.Worker]) -> dict[str, float]:
    """Median RSS (MiB) per device of each part, and the whole."""
    parts: dict[str, list[float]] = {"worker": [], "haproxy": [], "log sink": [], "device": []}
    for device in devices:
        worker = c.rss_kib(device.pid) / 1024
        master = device.haproxy.master_pid()
        haproxy = sum(c.rss_kib(pid) for pid in [master, *device.haproxy_worker_pids()]) / 1024
        sink_pid = c.LogSink(device.state_dir).pid()
        sink = c.rss_kib(sink_pid) / 1024 if sink_pid else 0.0
        for name, value in (("worker", worker), ("haproxy", haproxy), ("log sink", sink),
                            ("device", worker + haproxy + sink)):
            parts[name].append(value)
    return {name: c.median(values) for name, values in parts.items()}


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def idle_cpu_percent(devices: list[c.Worker], seconds: float) -> float:
    """The whole idle fleet's CPU use, in % of one core."""
    pids = [pid for device in devices for pid in pids_of(device)]
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds * 100


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def plot(samples: dict[str, list[float]], plt: Any, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, values in samples.items():
        ordered = sorted(v * 1000 for v in values)
        axis.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    axis.set_xlabel("reply time within a sweep, ms")
    axis.set_ylabel("fraction of devices")
    axis.set_title("Fan-out sweep of the fleet: per-device reply time")
    axis.grid(True, alpha=0.3)
    axis.legend()
    c.save_figure(plt, figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="sweeps per series")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    info = c.machine_info()
    memory_before = available_mib()

    with c.Run() as run:
        gearmands = [run.own(c.Gearmand(run.root).start()) for _ in range(2)]
        servers = ",".join(g.address for g in gearmands)
        backend = run.own(HTTPBackend("fleet-backend").start())
        started = time.perf_counter()
        devices = start_devices(run, gearmands, args.devices)
        start_time = time.perf_counter() - started
        echoes, echo_pids = start_echo_workers(run, gearmands, args.devices)
        functions = [device.function for device in devices]
        lb_port = c.free_port()

        update_totals: list[tuple[str, float, list[client.Result]]] = []
        first = f"UPDATE (starts HAProxy + log sink), {PROVISION_BATCH} devices at a time"
        total, results = provision(servers, functions, update_message(backend, lb_port, 1))
        checked(first, results)
        update_totals.append((first, total, results))
        for label, weight, algorithm in (
                ("UPDATE to all at once (node weight: runtime API)", 2, "ROUND_ROBIN"),
                ("UPDATE to all at once (algorithm: reload)", 2, "LEAST_CONNECTIONS")):
            total, results = sweep(servers, functions,
                                   update_message(backend, lb_port, weight, algorithm))
            checked(label, results)
            update_totals.append((label, total, results))
        for index in (0, args.devices - 1):
            answer = c.support.request_once(f"http://{device_address(index)}:{lb_port}/")
            if answer != backend.name:
                raise RuntimeError(f"device {index} LB answered {answer!r}")

        totals: dict[str, list[float]] = {"echo": [], "STATS": [], "METRICS": []}
        # CPU seconds the series cost: its workers (devices: worker, HAProxy, sink) and gearmand.
        cpu = dict.fromkeys(totals, 0.0)
        device_pids = [pid for device in devices for pid in pids_of(device)]
        gearmand_pids = [g.process.pid for g in gearmands]
        per_device: dict[str, list[client.Result]] = {name: [] for name in totals}
        sweep(servers, echoes, STATS)  # warm-up: connections, caches
        sweep(servers, functions, STATS)
        for _ in range(args.rounds):
            for name, targets, message in (("echo", echoes, STATS), ("STATS", functions, STATS),
                                           ("METRICS", functions, METRICS)):
                pids = (echo_pids if name == "echo" else device_pids) + gearmand_pids
                before = cpu_seconds(pids)
                total, results = sweep(servers, targets, message)
                cpu[name] += cpu_seconds(pids) - before
                checked(name, results)
                totals[name].append(total)
                per_device[name].extend(results)
        memory = memory_per_device(devices)
        idle_cpu = idle_cpu_percent(devices, args.idle_seconds)
        kill = sweep_through_a_gearmand_kill(servers, functions, gearmands[1],
                                             kill_after=c.median(totals["STATS"]) / 2)

    floor = c.median(totals["echo"])
    rows = [
        series_row("STATS, echo workers (floor)", totals["echo"], per_device["echo"]),
        series_row("STATS, libra-worker", totals["STATS"], per_device["STATS"], floor),
        series_row("METRICS, libra-worker", totals["METRICS"], per_device["METRICS"], floor),
        *(series_row(label, [total], results) for label, total, results in update_totals),
    ]
    sweeps = c.markdown_table(["sweep of all devices", "sweeps", "total p50 ms", "total max ms",
                               "per-device p50 ms", "per-device p99 ms", "total vs floor"], rows)
    ratio = c.ratio(c.median(totals["STATS"]), floor)
    verdict = (f"Target STATS sweep <= {TARGET_RATIO:g}x the echo floor at N = {args.devices}: "
               f"{'MET' if ratio <= TARGET_RATIO else 'MISSED'} ({c.fmt_ratio(ratio)}).")
    kill_text = (
        f"One gearmand killed (SIGKILL) {c.fmt_ms(c.median(totals['STATS']) / 2)} ms into a "
        f"STATS sweep: {kill['answered_first']} of {args.devices} answered in that sweep "
        f"({c.fmt_ms(kill['first'])} ms, the others' jobs died with the job server), "
        f"{kill['retried']} asked again through the other one ({c.fmt_ms(kill['retry'])} ms): "
        f"{kill['answered']} of {args.devices} answered, none lost.")
    jobs = args.rounds * args.devices
    cpu_text = ("CPU per job (worker side and gearmand, summed over the sweeps): "
                + ", ".join(f"{name} {cpu[name] / jobs * 1000:.2f} ms" for name in totals)
                + f"; {os.cpu_count()} CPUs. A sweep of all devices at once is CPU-bound: "
                  "its time is about the devices' CPU per job times N over the CPUs.")
    fleet_size = int(memory_before / memory["device"]) if memory["device"] else 0
    resources = c.markdown_table(
        ["per device (median)", "MiB"],
        [[name, f"{value:.1f}"] for name, value in memory.items()]
        + [["idle CPU of the whole fleet, % of one core", f"{idle_cpu:.1f}"],
           [f"time to start {args.devices} devices, s", f"{start_time:.1f}"]])
    capacity = (
        f"Memory: {memory['device']:.1f} MiB per device; with {memory_before:.0f} MiB available "
        f"before the run this machine holds about {fleet_size} devices by memory. The cost "
        "that grows with N is the sweep itself (one Gearman job per device through the job "
        "servers; compare the floor) and the start-up (one Python process per device); an "
        "idle fleet costs what its poll loops and HAProxy health checks cost (idle CPU above).")
    print(sweeps, verdict, cpu_text, kill_text, resources, capacity, sep="\n\n")
    notes = (
        f"Client: libra-client's fan-out (`libra_worker.client.submit_many`) in the bench process: "
        f"one SUBMIT_JOB per device spread over both job servers, replies awaited together, "
        f"after the admin `status` check of both job servers (part of every sweep). "
        f"{args.rounds} rounds, echo / STATS / METRICS interleaved. Per-device time: from the "
        f"start of the sweep to that device's reply. Devices: real libra-worker, HAProxy and "
        f"log sink each; the LB on 127.0.1.x:{lb_port} with one real HTTP backend.")
    c.publish(args, "fleet", f"A fleet of {args.devices} devices on one machine",
              [sweeps, verdict, cpu_text, kill_text, resources, capacity, notes], info,
              "per-device reply time in a sweep",
              lambda plt, path: plot({"echo workers (floor)": [r.ms / 1000 for r in per_device["echo"]],
                                      "STATS": [r.ms / 1000 for r in per_device["STATS"]],
                                      "METRICS": [r.ms / 1000 for r in per_device["METRICS"]]},
                                     plt, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
