"""Soak: one worker under Libra's steady mix of jobs, real traffic and faults, for hours.

One real worker (supervising HAProxy and its log sink itself: ``[haproxy] supervisor``
unset), real gearmand and the real test Swift (tests/swift_server.py), an HTTP and a TCP
load balancer with three real backends each. For ``--duration`` seconds:

* jobs as Libra's servers send them: UPDATE every few seconds, alternating a node-only
  change (a weight, a node added, the same node removed) and a full change (the
  algorithm), always the whole device; STATS every few seconds, METRICS every minute,
  ARCHIVE of each load balancer every few minutes, DIAGNOSTICS now and then; each job has
  its own unique id, and every reply is matched to its job;
* client traffic through both load balancers (HTTP keep-alive, HTTP with
  ``Connection: close``, TCP), every byte received counted, every failure timestamped;
* faults at seeded random times: ``kill -9`` of all HAProxy processes (by pid), of the log
  sink, of the worker (started again a few seconds later, as systemd would), gearmand
  restarted, the Swift proxy down for a while.

Then: failed requests per fault (gaps measured), jobs submitted vs answered per action,
the METRICS total vs the bytes clients received, lines archived in Swift (every object
downloaded and counted) vs lines served, and the slope of the worker's RSS, fds and
threads, the log sink's RSS, HAProxy's process count and the state_dir size. The exit
status is 1 when a target is missed.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import _common as c  # noqa: E402
from libra_worker.lanes import READERS  # noqa: E402
from tests.integration.support import HTTPBackend, TCPBackend, lb, update  # noqa: E402
from tests.swift_server import SwiftServer  # noqa: E402

CONTAINER = "soak"
ANSWER_PADDING = 8192  # bytes after a backend's name: answers far larger than HAProxy's 1-byte slack
METRICS_TOLERANCE = 0.001
# Header lines HAProxy adds to an HTTP answer and does not count in the bytes it logs.
HAPROXY_ADDED_HEADERS = ("set-cookie:", "connection:")
# Target slopes per hour (judged only on a fit window of at least MIN_FIT_SECONDS); the
# worker's threads are judged against the read-only pool's ceiling instead (see slopes()).
# The smallest leaks worth catching: 1 KiB per job is ~1.6 MiB/h at this job rate; one fd
# per periodic job (DIAGNOSTICS, the rarest) is 30/h, while the fds sampled swing by 2-3
# with the sockets open at that moment, a sawtooth that fits up to ~3/h in a 20-minute life.
SLOPE_BOUNDS = {
    "worker RSS MiB": 2.0,
    "worker fds": 5.0,
    "worker threads": 1.0,
    "log sink RSS MiB": 2.0,
    "HAProxy processes": 0.5,
    "state_dir MiB": 8.0,
}
MIN_FIT_SECONDS = 600.0
FAULT_KINDS = ("haproxy", "logsink", "worker", "gearmand", "swift")
# Faults after which client requests may fail (documented: HAProxy restarts from nothing).
FAULTS_THAT_CUT_TRAFFIC = {"haproxy"}
RECOVERY_TIMEOUT = 60.0
# How far before a sink kill its counts may be lost (its flush interval, with a margin)
# and after it came back that lines may still be missing (HAProxy's next datagram).
SINK_FLUSH_MARGIN = 1.5
SINK_BACK_MARGIN = 1.0


def now() -> float:
    return time.time()


# --------------------------------------------------------------------------- faults


@dataclasses.dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0  # recovered (or, for Swift, back up)
    detail: str = ""
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start if self.end else float("nan")


# --------------------------------------------------------------------------- traffic


class Traffic:
    """Requests back to back (a short pause between) in a thread; every byte counted.

    `whole` bytes belong to answers that arrived complete (HTTP: status 200 and the
    Content-Length read; TCP: the backend's whole answer up to EOF); `added` bytes are the
    header lines of those answers that HAProxy adds itself and, as documented, does not
    bill (docs/protocol.rst, METRICS): its `set-cookie` (the clients never send the
    cookie back, so every answer gets one) and `connection`. A keep-alive request
    that fails on a reused connection before any byte came back is sent again once on a
    new connection, as HTTP clients do (RFC 9112 9.3.1): its time is kept in `retries`.
    """

    def __init__(self, mode: str, port: int, names: set[str], pause: float) -> None:
        self.mode = mode  # "http-keepalive", "http-close", "tcp"
        self.protocol = "tcp" if mode == "tcp" else "http"
        self.port = port
        self.names = names
        self.pause = pause
        self.ok = 0
        self.whole_bytes = 0
        self.partial_bytes = 0
        self.added_bytes = 0
        self.retries: list[float] = []
        self.failures: list[tuple[float, str]] = []
        self.seconds: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # second -> [answers, bytes]
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{mode}", daemon=True)
        self._count = 0

    def start(self) -> "Traffic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._close()

    @property
    def failed(self) -> int:
        return len(self.failures)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._count += 1
            try:
                size = self._one()
            except (OSError, ValueError) as exc:
                self._close()
                self.failures.append((now(), f"{type(exc).__name__}: {exc}"[:160]))
            else:
                self.ok += 1
                self.whole_bytes += size
                bucket = self.seconds[int(now())]
                bucket[0] += 1
                bucket[1] += size
            self._stop.wait(self.pause)

    def _one(self) -> int:
        if self.mode == "tcp":
            return self._tcp()
        reused = self._conn is not None
        try:
            return self._http()
        except _NothingBack:
            self._close()
            if not reused:
                raise ConnectionError("the connection closed before any answer")
            self.retries.append(now())
            return self._http()

    def _connect(self) -> socket.socket:
        conn = socket.create_connection((c.LOOPBACK, self.port), timeout=10)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _tcp(self) -> int:
        data = b""
        try:
            with self._connect() as conn:
                conn.sendall(f"soak-{self._count}\n".encode())
                while chunk := conn.recv(65536):
                    data += chunk
            name = data.rstrip(b".").decode(errors="replace")
            if name not in self.names or len(data) != len(name) + ANSWER_PADDING:
                raise ValueError(f"a cut TCP answer: {len(data)} bytes, {data[:20]!r}")
        except BaseException:
            self.partial_bytes += len(data)
            raise
        return len(data)

    def _http(self) -> int:
        keepalive = self.mode == "http-keepalive"
        if self._conn is None:
            self._conn = self._connect()
        request = (f"GET /soak-{self._count} HTTP/1.1\r\nHost: soak\r\n"
                   + ("" if keepalive else "Connection: close\r\n") + "\r\n")
        received = b""
        try:
            self._conn.sendall(request.encode())
            while b"\r\n\r\n" not in received:
                chunk = self._conn.recv(65536)
                if not chunk:
                    if not received:
                        raise _NothingBack()
                    raise ConnectionError("the connection closed inside the headers")
                received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            # The backends (Python's http.server) answer HTTP/1.0; HAProxy passes that on.
            if not (lines[0].startswith("HTTP/1.") and lines[0][8:13] == " 200 "):
                raise ValueError(f"answer {lines[0]!r}")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}
            length = int(headers["content-length"])
            while len(body) < length:
                chunk = self._conn.recv(65536)
                if not chunk:
                    raise ConnectionError(f"the body was cut at {len(body)} of {length} bytes")
                body += chunk
                received += chunk
        except BaseException:
            self.partial_bytes += len(received)
            raise
        if not keepalive or headers.get("connection", "").lower() == "close":
            self._close()
        if body.rstrip(b".").decode(errors="replace") not in self.names:
            raise ValueError(f"unexpected body {body[:20]!r}")
        # The backends (Python's http.server) send neither header.
        self.added_bytes += sum(len(line) + 2 for line in lines[1:]
                                if line.lower().startswith(HAPROXY_ADDED_HEADERS))
        return len(received)

    def bytes_between(self, start: float, end: float) -> int:
        return sum(b for second, (_, b) in self.seconds.items() if start - 1 <= second <= end)

    def answers_between(self, start: float, end: float) -> int:
        return sum(n for second, (n, _) in self.seconds.items() if start - 1 <= second <= end)


class _NothingBack(ConnectionError):
    """The server closed a connection before sending a byte of the answer."""


# --------------------------------------------------------------------------- jobs


@dataclasses.dataclass
class JobRecord:
    kind: str  # the action, for UPDATE with the kind of change: "UPDATE full (algorithm)"
    unique: str
    sent: float
    answered: float = 0.0
    outcome: str = ""  # PASS, FAIL, lost, unsent
    detail: str = ""
    reply: dict[str, Any] | None = None

    @property
    def action(self) -> str:
        return self.kind.split()[0]


class SoakClient:
    """A Gearman client as Libra's servers use it: one job at a time, reconnecting.

    Each job carries a fresh unique id; the reply must name the handle the job server gave
    that job (JOB_CREATED), so a stray or repeated answer is caught.
    """

    def __init__(self, gearmand: c.Gearmand, timeout: float) -> None:
        self.gearmand = gearmand
        self.timeout = timeout
        self.conn: socket.socket | None = None
        self.reader: c.PacketReader | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _connected(self) -> bool:
        """A connection to the job server, a fresh one if the old one was closed meanwhile
        (a restarted gearmand: an idle client only sees that on its next job)."""
        if self.conn is not None:
            # Readable while no job is out: the server closed it (or sent junk).
            if select.select([self.conn], [], [], 0)[0]:
                self.close()
        if self.conn is None:
            try:
                self.conn = socket.create_connection((c.LOOPBACK, self.gearmand.port), timeout=self.timeout)
            except OSError:
                return False
            self.reader = c.PacketReader(self.conn)
        return True

    def submit(self, function: str, record: JobRecord, message: dict[str, Any]) -> None:
        """Submit and wait; a job the server never created (no JOB_CREATED: the connection
        broke first) is sent once more on a new connection, as it is no job yet."""
        payload = json.dumps(message).encode()
        for _ in range(2):
            if not self._connected():
                record.outcome, record.detail = "unsent", "job server unreachable"
                break
            if self._submit_once(function, record, payload):
                break
        record.answered = now()

    def _submit_once(self, function: str, record: JobRecord, payload: bytes) -> bool:
        """True when the job was created (answered or lost), False when it never was."""
        assert self.conn is not None and self.reader is not None
        handle = None
        try:
            self.conn.sendall(c.pack(c.SUBMIT_JOB, function.encode(), record.unique.encode(), payload))
            while True:
                kind, body = self.reader.read()
                if kind == c.JOB_CREATED:
                    handle = body
                    continue
                if kind in (c.WORK_COMPLETE, c.WORK_FAIL, c.WORK_EXCEPTION):
                    job_handle, _, result = body.partition(b"\0")
                    if job_handle != handle:
                        raise ConnectionError(f"an answer for job {job_handle!r}, not {handle!r}")
                    if kind != c.WORK_COMPLETE:
                        raise ConnectionError(f"job ended with packet {kind}: {result[:100]!r}")
                    reply = json.loads(result)
                    record.reply = reply
                    record.outcome = reply.get("hpcs_response", "?")
                    record.detail = str(reply.get("hpcs_error", ""))[:160]
                    return True
                if kind == c.ERROR:
                    raise ConnectionError(f"job server error {body[:100]!r}")
        except (OSError, ValueError) as exc:
            self.close()
            record.outcome, record.detail = "lost", f"{type(exc).__name__}: {exc}"[:160]
            if handle is None:
                record.outcome = "unsent"
            return handle is not None


class Device:
    """The load balancers Libra's API server keeps for this device, and its UPDATEs."""

    def __init__(self, http_port: int, tcp_port: int, http_nodes: list[HTTPBackend],
                 tcp_nodes: list[TCPBackend]) -> None:
        self.http_port, self.tcp_port = http_port, tcp_port
        self.http_nodes, self.tcp_nodes = http_nodes, tcp_nodes
        self.ids = {"HTTP": "soak-http-" + uuid.uuid4().hex[:6],
                    "TCP": "soak-tcp-" + uuid.uuid4().hex[:6]}
        self.algorithm = "ROUND_ROBIN"
        self.weight = 1
        self.third_node = False
        self._node_changes = itertools.cycle(("weight", "add", "remove"))
        self._full = False

    def _nodes(self, backends: list[Any]) -> list[dict[str, Any]]:
        in_use = backends[:3 if self.third_node else 2]
        return [node.node(weight=self.weight if i == 1 else 1) for i, node in enumerate(in_use)]

    def message(self) -> dict[str, Any]:
        """The whole device, as Libra's API server sends it in every UPDATE."""
        return update(
            lb("HTTP", self.http_port, self._nodes(self.http_nodes), id=self.ids["HTTP"],
               algorithm=self.algorithm),
            lb("TCP", self.tcp_port, self._nodes(self.tcp_nodes), id=self.ids["TCP"],
               algorithm=self.algorithm),
        )

    def next_change(self) -> tuple[str, dict[str, Any]]:
        """Alternately a node-only change and a full change: "UPDATE <kind>" and the message."""
        self._full = not self._full
        if self._full:
            self.algorithm = "LEAST_CONNECTIONS" if self.algorithm == "ROUND_ROBIN" else "ROUND_ROBIN"
            return "UPDATE full (algorithm)", self.message()
        change = next(self._node_changes)
        if change == "weight":
            self.weight = 3 if self.weight == 1 else 1
        else:
            self.third_node = change == "add"
        return f"UPDATE node-only ({change})", self.message()

    def archive(self, protocol: str, swift: SwiftServer) -> dict[str, Any]:
        return {
            "hpcs_action": "ARCHIVE",
            "hpcs_object_store_basepath": CONTAINER,
            "hpcs_object_store_endpoint": swift.endpoint,
            "hpcs_object_store_token": swift.token,
            "hpcs_object_store_type": "swift",
            "loadBalancers": [{"id": self.ids[protocol], "name": f"soak {protocol}",
                               "protocol": protocol}],
        }


class Schedule(threading.Thread):
    """One of Libra's servers: jobs on fixed periods, one at a time, on one connection."""

    def __init__(self, name: str, soak: "Soak",
                 jobs: list[tuple[float, Callable[[], tuple[str, dict[str, Any]]]]]) -> None:
        super().__init__(name=name, daemon=True)
        self.soak = soak
        self.jobs = jobs
        self.client = SoakClient(soak.gearmand, timeout=soak.args.job_timeout)
        self.stopping = threading.Event()

    def run(self) -> None:
        due = [self.soak.t0 + 0.5 * index for index in range(len(self.jobs))]
        while not self.stopping.is_set():
            index = min(range(len(due)), key=due.__getitem__)
            if self.stopping.wait(max(0.0, due[index] - now())):
                break
            period, make = self.jobs[index]
            # After a job that waited (a worker restarting), no burst of catch-up jobs.
            due[index] = max(due[index] + period, now())
            kind, message = make()
            self.soak.submit(self.client, kind, message)
        self.client.close()


# --------------------------------------------------------------------------- samples


def proc_fields(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(value.split()[0])
    values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


def tree_bytes(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass
    return total


def fit_slope(points: list[tuple[float, float, int]], warmup: float) -> float:
    """Least-squares slope of (t, y) per second, with one intercept per group: a worker
    (or sink) restart starts a new process, so only the growth inside each life is a slope,
    and each life's first `warmup` seconds (imports, first jobs, caches) are left out."""
    groups: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for t, y, group in points:
        groups[group].append((t, y))
    top = bottom = 0.0
    for members in groups.values():
        born = members[0][0]
        members = [(t, y) for t, y in members if t - born >= warmup]
        if len(members) < 2:
            continue
        mean_t = statistics.fmean(t for t, _ in members)
        mean_y = statistics.fmean(y for _, y in members)
        top += sum((t - mean_t) * (y - mean_y) for t, y in members)
        bottom += sum((t - mean_t) ** 2 for t, _ in members)
    return top / bottom if bottom else float("nan")


# --------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, args: Any, run: c.Run) -> None:
        self.args = args
        self.run = run
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.jobs: list[JobRecord] = []
        self.faults: list[Fault] = []
        self.samples: list[dict[str, float]] = []
        self.worker_starts = 0
        self.worker_ready = threading.Event()
        self.t0 = now()

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        args, run = self.args, self.run
        self.swift = run.own(SwiftServer.start())
        self.gearmand = run.own(c.Gearmand(run.root).start())
        self.http_nodes = [run.own(HTTPBackend(f"web{i}", padding=ANSWER_PADDING).start()) for i in range(3)]
        self.tcp_nodes = [run.own(TCPBackend(f"raw{i}", padding=ANSWER_PADDING).start()) for i in range(3)]
        self.device = Device(c.free_port(), c.free_port(), self.http_nodes, self.tcp_nodes)
        self.worker = c.Worker(
            run.root, self.gearmand,
            gearman_options={"reconnect_delay_max": "1.0"},
            # (c.Worker gives it a peers port of its own.)
            more_config=("[archive]\nallow_plain_http = true\n"
                         f"timeout = {args.archive_timeout}\n"),
        )
        self.worker.start()
        run.own(self.worker)
        self.worker_starts = 1
        self.worker_ready.set()
        first = SoakClient(self.gearmand, args.job_timeout)
        self.submit(first, "UPDATE first (HAProxy and the log sink start)", self.device.message())
        first.close()
        if self.jobs[-1].outcome != "PASS":
            raise RuntimeError(f"the first UPDATE failed: {self.jobs[-1]}")
        names_http = {n.name for n in self.http_nodes}
        names_tcp = {n.name for n in self.tcp_nodes}
        self.traffic = [
            Traffic("http-keepalive", self.device.http_port, names_http, args.pause),
            Traffic("http-close", self.device.http_port, names_http, args.pause),
            Traffic("tcp", self.device.tcp_port, names_tcp, args.pause),
        ]
        self.t0 = now()
        for loop in self.traffic:
            run.own(loop.start())

    # ------------------------------------------------------------------ jobs

    def submit(self, client: SoakClient, kind: str, message: dict[str, Any]) -> JobRecord:
        record = JobRecord(kind, uuid.uuid4().hex, now())
        with self.lock:
            self.jobs.append(record)
        client.submit(self.worker.function, record, message)
        return record

    def schedules(self) -> list[Schedule]:
        args, device = self.args, self.device
        protocols = itertools.cycle(("HTTP", "TCP"))
        api = Schedule("api", self, [
            (args.update_every, device.next_change),
            (args.archive_every / 2, lambda: self.archive_job(next(protocols))),
        ])
        admin = Schedule("admin", self, [
            (args.stats_every, lambda: ("STATS", {"hpcs_action": "STATS"})),
            (args.metrics_every, lambda: ("METRICS", {"hpcs_action": "METRICS"})),
            (args.diagnostics_every, lambda: ("DIAGNOSTICS", {"hpcs_action": "DIAGNOSTICS"})),
        ])
        return [api, admin]

    def archive_job(self, protocol: str) -> tuple[str, dict[str, Any]]:
        """The job's kind, "ARCHIVE <protocol>" (a lost reply must still name its LB), and
        its message."""
        return f"ARCHIVE {protocol}", self.device.archive(protocol, self.swift)

    # ------------------------------------------------------------------ faults

    def fault_times(self) -> list[tuple[float, str]]:
        args = self.args
        count = max(1, int(args.duration // args.fault_every))
        first, last = args.warmup, args.duration - args.tail
        times = sorted(self.rng.uniform(first, last) for _ in range(count))
        kinds: list[str] = []
        while len(kinds) < count:
            batch = list(FAULT_KINDS)
            self.rng.shuffle(batch)
            kinds.extend(batch)
        return list(zip(times, kinds))

    def run_faults(self, stopping: threading.Event) -> None:
        for offset, kind in self.fault_times():
            if stopping.wait(max(0.0, self.t0 + offset - now())):
                return
            fault = Fault(kind, now())
            with self.lock:
                self.faults.append(fault)
            try:
                getattr(self, f"fault_{kind}")(fault)
            except Exception as exc:  # noqa: BLE001 - reported as a missed target
                fault.error = f"{type(exc).__name__}: {exc}"[:300]
                fault.end = fault.end or now()

    def fault_haproxy(self, fault: Fault) -> None:
        pids = self.worker.haproxy.our_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        fault.detail = f"pids {','.join(map(str, sorted(pids)))}"
        c.wait_until(lambda: not any(c.process_alive(pid) for pid in pids), RECOVERY_TIMEOUT,
                     "HAProxy to die")

        def serving() -> bool:
            fresh = set(self.worker.haproxy.our_pids()) - set(pids)
            return len(fresh) >= 2 and all(c.port_accepts(port) for port in
                                           (self.device.http_port, self.device.tcp_port))

        c.wait_until(serving, RECOVERY_TIMEOUT, "HAProxy started again", interval=0.02)
        fault.end = now()

    def fault_logsink(self, fault: Fault) -> None:
        sink = c.LogSink(self.worker.state_dir)
        pid = sink.pid()
        if pid is None:
            raise RuntimeError("no log sink running")
        os.kill(pid, signal.SIGKILL)
        fault.detail = f"pid {pid}"
        c.wait_until(lambda: (sink.pid() or pid) != pid and sink.is_running(), RECOVERY_TIMEOUT,
                     "the log sink started again", interval=0.02)
        fault.end = now()

    def fault_worker(self, fault: Fault) -> None:
        process = self.worker.process
        assert process is not None
        self.worker_ready.clear()
        fault.detail = f"pid {process.pid}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        time.sleep(self.args.restart_delay)
        self.worker.start()
        self.worker_starts += 1
        self.worker_ready.set()
        fault.end = now()

    def fault_gearmand(self, fault: Fault) -> None:
        self.gearmand.stop()
        time.sleep(1.0)
        self.gearmand.start()
        c.wait_until(lambda: c.has_workers(self.gearmand, self.worker.function), RECOVERY_TIMEOUT,
                     "the worker to register again")
        fault.end = now()

    def fault_swift(self, fault: Fault) -> None:
        self.swift.stop_proxy()
        fault.detail = f"{self.args.swift_down:g} s"
        time.sleep(self.args.swift_down)
        self.swift.start_proxy()
        fault.end = now()

    # ------------------------------------------------------------------ samples

    def sample(self) -> None:
        if not self.worker_ready.is_set():
            return
        try:
            worker = proc_fields(self.worker.pid)
            sink_pid = c.LogSink(self.worker.state_dir).pid()
            sink_rss = proc_fields(sink_pid)["VmRSS"] / 1024 if sink_pid else float("nan")
            sample = {
                "t": now() - self.t0,
                "incarnation": self.worker_starts,
                "worker RSS MiB": worker["VmRSS"] / 1024,
                "worker fds": worker["fds"],
                "worker threads": worker["Threads"],
                "log sink RSS MiB": sink_rss,
                "sink pid": sink_pid or 0,
                "HAProxy processes": len(self.worker.haproxy.our_pids()),
                "state_dir MiB": tree_bytes(self.worker.state_dir) / 1048576,
                "load": os.getloadavg()[0],
            }
        except (OSError, ValueError, KeyError):
            return  # a process between two lives (a zombie has no VmRSS): the next sample
        self.samples.append(sample)

    # ------------------------------------------------------------------ the run

    def soak(self) -> None:
        schedules = self.schedules()
        stopping = threading.Event()
        faults = threading.Thread(target=self.run_faults, args=(stopping,), name="faults", daemon=True)
        for thread in (*schedules, faults):
            thread.start()
        end = self.t0 + self.args.duration
        next_report = self.t0 + 60
        while now() < end:
            self.sample()
            if now() >= next_report:
                next_report += 300 if self.args.duration > 900 else 60
                self.progress()
            time.sleep(min(self.args.sample_every, max(0.0, end - now())))
        stopping.set()
        for schedule in schedules:
            schedule.stopping.set()
        faults.join(timeout=self.args.swift_down + RECOVERY_TIMEOUT * 2)
        for schedule in schedules:
            schedule.join(timeout=self.args.job_timeout + 10)
        self.worker_ready.wait(timeout=RECOVERY_TIMEOUT)
        self.t_end = now()
        for loop in self.traffic:
            loop.stop()

    def progress(self) -> None:
        failed = sum(loop.failed for loop in self.traffic)
        ok = sum(loop.ok for loop in self.traffic)
        outcomes = Counter(job.outcome for job in self.jobs)
        print(f"[{now() - self.t0:7.0f} s] requests {ok} ok, {failed} failed; jobs {dict(outcomes)}; "
              f"faults {len(self.faults)}; load {os.getloadavg()[0]:.1f}", flush=True)

    def finish(self) -> None:
        """After the traffic stopped: the last METRICS and ARCHIVEs, with everything counted."""
        time.sleep(2.5)  # the sink writes its counts every second
        client = SoakClient(self.gearmand, self.args.job_timeout)
        c.wait_until(lambda: self.swift.processes.get("proxy") is not None, RECOVERY_TIMEOUT, "Swift")
        for protocol in ("HTTP", "TCP"):
            self.submit(client, *self.archive_job(protocol))
        self.submit(client, "METRICS", {"hpcs_action": "METRICS"})
        client.close()


# --------------------------------------------------------------------------- analysis


def in_windows(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(start <= t <= end for start, end in windows)


def overlaps(first: float, last: float, windows: list[tuple[float, float]]) -> bool:
    return any(first <= end and start <= last for start, end in windows)


def archive_as_expected(downloaded: int, reported: int, replies_lost: int, served: int,
                        in_sink_gaps: int, cut: int) -> bool:
    """One LB's lines in Swift against the requests served and the ARCHIVE replies."""
    if not served - in_sink_gaps <= downloaded <= served + cut:
        return False
    return downloaded == reported or (replies_lost > 0 and reported < downloaded)


def utc_seconds(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


class Report:
    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.missed: list[str] = []
        self.sections: list[str] = []
        self.fits: dict[str, tuple[float, float]] = {}

    def target(self, name: str, met: bool) -> str:
        if not met:
            self.missed.append(name)
        return "met" if met else "**MISSED**"

    # fault windows: what each fault may explain
    def windows(self, kind: str, before: float = 0.0, after: float = 0.0) -> list[tuple[float, float]]:
        return [(f.start - before, (f.end or f.start) + after) for f in self.soak.faults if f.kind == kind]

    def build(self) -> None:
        for section in (self.faults_and_failures, self.jobs, self.metrics, self.archive, self.slopes):
            try:
                section()
            except Exception:  # noqa: BLE001 - hours of soak still get the other sections
                self.sections.append(f"## {section.__name__}: the analysis failed\n\n```\n"
                                     f"{traceback.format_exc()}```")
                self.missed.append(f"{section.__name__} analysed")

    def faults_and_failures(self) -> None:
        soak = self.soak
        failures = sorted((t, loop.mode, error) for loop in soak.traffic for t, error in loop.failures)
        rows, explained = [], set()
        for index, fault in enumerate(soak.faults):
            following = soak.faults[index + 1].start if index + 1 < len(soak.faults) else soak.t_end
            window_end = min(following, (fault.end or fault.start) + 10)
            mine = [f for f in failures if fault.start - 0.5 <= f[0] <= window_end]
            explained.update(mine if fault.kind in FAULTS_THAT_CUT_TRAFFIC else [])
            gap = (mine[-1][0] - mine[0][0]) if mine else 0.0
            by_mode = Counter(mode for _, mode, _ in mine)
            rows.append([f"{fault.start - soak.t0:.0f}", fault.kind, fault.detail,
                         f"{fault.seconds:.2f}", len(mine), f"{gap:.2f}",
                         ", ".join(f"{m} {n}" for m, n in sorted(by_mode.items())) or "-",
                         fault.error or "-"])
        unexplained = [f for f in failures if f not in explained]
        fault_errors = [f for f in soak.faults if f.error]
        self.sections.append("## Faults and failed requests\n\n" + c.markdown_table(
            ["t s", "fault", "detail", "recovery s", "failed requests", "gap s (first-last failure)",
             "by client", "fault error"], rows))
        traffic_rows = [[loop.mode, loop.ok, loop.failed, len(loop.retries), loop.whole_bytes,
                         loop.partial_bytes] for loop in soak.traffic]
        lines = [c.markdown_table(["client", "answers", "failed", "retried (reused keep-alive)",
                                   "bytes (whole answers)", "bytes (cut answers)"], traffic_rows)]
        lines.append(
            f"\nFailed requests outside the documented gaps (a HAProxy kill -9, until it serves "
            f"again): {len(unexplained)}: "
            + self.target("no failed request outside documented gaps", not unexplained))
        for t, mode, error in unexplained[:20]:
            lines.append(f"- t={t - soak.t0:.1f} s {mode}: {error}")
        lines.append(f"\nEvery fault recovered: " + self.target("faults recovered", not fault_errors))
        lines.append(self.retries_after_reloads())
        self.sections.append("\n".join(lines))

    def retries_after_reloads(self) -> str:
        """How many keep-alive retries followed a reload (a full UPDATE, or the reload that
        makes runtime-added servers file servers, 0.1 s after a node-only add)."""
        retries = [t for loop in self.soak.traffic for t in loop.retries]
        reloads = [(job.answered - 0.5, job.answered + 1.5) for job in self.soak.jobs
                   if job.kind.startswith(("UPDATE full", "UPDATE node-only (add)"))]
        near = sum(1 for t in retries if in_windows(t, reloads))
        return (f"\nKeep-alive requests sent again on a new connection: {len(retries)}, of which "
                f"{near} within 1.5 s of an UPDATE that reloads HAProxy ({len(reloads)} such "
                "UPDATEs): the old HAProxy process closes its idle client connections when it "
                "stops, and a request sent at that moment gets no answer on that connection.")

    def jobs(self) -> None:
        soak = self.soak
        gearmand_windows = self.windows("gearmand", before=0.5, after=1.0)
        swift_windows = self.windows("swift", before=self.soak.args.archive_timeout + 5, after=1.0)
        haproxy_windows = self.windows("haproxy", before=0.5, after=1.0)
        uniques = Counter(job.unique for job in soak.jobs)
        rows, notes = [], []
        bad = 0
        order = ("UPDATE", "STATS", "METRICS", "ARCHIVE", "DIAGNOSTICS")
        for kind in sorted({job.kind for job in soak.jobs}, key=lambda k: (order.index(k.split()[0]), k)):
            records = [job for job in soak.jobs if job.kind == kind]
            action = kind.split()[0]
            outcome = Counter(job.outcome for job in records)
            lost_explained = fail_explained = 0
            for job in records:
                if job.outcome == "lost" and in_windows(job.answered, gearmand_windows):
                    lost_explained += 1
                elif job.outcome == "FAIL" and action == "ARCHIVE" and in_windows(job.sent, swift_windows):
                    fail_explained += 1
                elif (job.outcome == "FAIL" and job.detail.startswith("HAProxy")
                      and overlaps(job.sent, job.answered, haproxy_windows)):
                    fail_explained += 1
                elif job.outcome == "unsent" and in_windows(job.sent, gearmand_windows):
                    pass
                elif job.outcome != "PASS":
                    bad += 1
                    notes.append(f"- {kind} {job.unique} sent t={job.sent - soak.t0:.1f} s: "
                                 f"{job.outcome} {job.detail}")
            answered = outcome["PASS"] + outcome["FAIL"]
            rows.append([kind, len(records) - outcome["unsent"], answered, outcome["PASS"],
                         f"{outcome['FAIL']} ({fail_explained} explained)",
                         f"{outcome['lost']} ({lost_explained} explained)", outcome["unsent"]])
        duplicates = [u for u, n in uniques.items() if n > 1]
        text = ["## Jobs\n", c.markdown_table(
            ["job", "submitted", "answered", "PASS", "FAIL", "lost", "not sent (gearmand down)"], rows)]
        text.append("\nExplained: an ARCHIVE that FAILs while Swift is down (its lines ship with a "
                    "later one); a job that FAILs saying HAProxy is not running while it recovers "
                    "from a kill -9 (0.5 s before to 1 s after); a job lost with gearmand "
                    "(restarted with an in-memory queue: the client's connection drops with the "
                    "job); a job not sent because gearmand was down (as Libra's servers, the soak "
                    "sends the next one on its period).")
        text.append(f"\nEvery job answered exactly once (each reply matched to its job's handle; "
                    f"unique ids reused: {len(duplicates)}); every FAIL and loss explained: "
                    + self.target("jobs answered once, failures explained", bad == 0 and not duplicates))
        text.extend(notes[:30])
        self.sections.append("\n".join(text))

    def metrics(self) -> None:
        soak = self.soak
        replies = [job.reply for job in soak.jobs if job.action == "METRICS" and job.reply
                   and job.reply.get("hpcs_response") == "PASS"]
        replies.sort(key=lambda r: r["utc_start"])
        billed: Counter[str] = Counter()
        for reply in replies:
            for entry in reply["loadBalancers"]:
                billed[entry["protocol"]] += entry["bytes_out"]
        # Periods whose reply never reached us (lost with gearmand): their bytes are gone.
        holes = []
        for previous, following in zip(replies, replies[1:]):
            if following["utc_start"] != previous["utc_end"]:
                holes.append((utc_seconds(previous["utc_end"]), utc_seconds(following["utc_start"])))
        sink_windows = self.windows("logsink", before=SINK_FLUSH_MARGIN, after=SINK_BACK_MARGIN)
        rows, ok = [], True
        for protocol in ("http", "tcp"):
            loops = [loop for loop in soak.traffic if loop.protocol == protocol]
            received = sum(loop.whole_bytes for loop in loops)
            added = sum(loop.added_bytes for loop in loops)
            billable = received - added
            in_sink_gaps = sum(loop.bytes_between(s, e) for loop in loops for s, e in sink_windows)
            in_holes = sum(loop.bytes_between(s, e) for loop in loops for s, e in holes)
            low = (billable - in_sink_gaps - in_holes) * (1 - METRICS_TOLERANCE)
            high = billable * (1 + METRICS_TOLERANCE)
            met = low <= billed[protocol] <= high
            ok = ok and met
            outside = billable - in_sink_gaps - in_holes
            rows.append([protocol, received, added, in_sink_gaps, in_holes, billed[protocol],
                         f"{(billed[protocol] - billable) / billable * 100:+.4f}%" if billable else "n/a",
                         f"{(billed[protocol] - outside) / outside * 100:+.4f}%" if outside else "n/a",
                         "yes" if met else "NO"])
        self.sections.append("## METRICS vs bytes received\n\n" + c.markdown_table(
            ["protocol", "bytes received (whole answers)", "of which headers HAProxy adds",
             "of which in log-sink gaps", "of which in lost METRICS periods", "METRICS total",
             "vs received less added headers", "vs that outside gaps", "within 0.1%"], rows)
            + f"\n\n{len(replies)} METRICS replies; periods not following the previous reply: "
              f"{len(holes)}. Target: the total within 0.1% of the bytes received less the "
              "header lines HAProxy adds and does not bill (`set-cookie`, `connection`), bytes during "
              f"log-sink gaps ({SINK_FLUSH_MARGIN:g} s before a kill to {SINK_BACK_MARGIN:g} s after "
              "it is back) and lost periods allowed missing: "
            + self.target("METRICS total within 0.1%", ok))

    def archive(self) -> None:
        import swiftclient.client

        soak = self.soak
        connection = swiftclient.client.Connection(preauthurl=soak.swift.endpoint,
                                                   preauthtoken=soak.swift.token, retries=2, timeout=30)
        lines: Counter[str] = Counter()
        objects: Counter[str] = Counter()
        try:
            _, listing = connection.get_container(CONTAINER, full_listing=True)
            for item in listing:
                protocol = "HTTP" if item["name"].startswith(soak.device.ids["HTTP"]) else "TCP"
                _, body = connection.get_object(CONTAINER, item["name"])
                lines[protocol] += len(gzip.decompress(body).splitlines())
                objects[protocol] += 1
        finally:
            connection.close()
        reported = Counter()
        for job in soak.jobs:
            if job.action == "ARCHIVE" and job.reply and job.reply.get("hpcs_response") == "PASS":
                protocol = job.reply["loadBalancers"][0]["protocol"].upper()
                reported[protocol] += job.reply["archive"]["lines"]
        lost = Counter(job.kind.split()[-1] for job in soak.jobs
                       if job.action == "ARCHIVE" and job.outcome == "lost")
        sink_windows = self.windows("logsink", before=SINK_FLUSH_MARGIN, after=SINK_BACK_MARGIN)
        rows, ok = [], True
        for protocol in ("HTTP", "TCP"):
            loops = [loop for loop in soak.traffic if loop.protocol == protocol.lower()]
            served = sum(loop.ok for loop in loops)
            cut = self.windows("haproxy", before=0.5, after=10.0)
            failed = sum(1 for loop in loops for t, _ in loop.failures if in_windows(t, cut))
            in_gaps = sum(loop.answers_between(s, e) for loop in loops for s, e in sink_windows)
            met = archive_as_expected(lines[protocol], reported[protocol], lost[protocol],
                                      served, in_gaps, failed)
            ok = ok and met
            rows.append([protocol, objects[protocol], lines[protocol], reported[protocol],
                         lost[protocol], served, in_gaps, failed, served - lines[protocol],
                         "yes" if met else "NO"])
        self.sections.append("## Archived lines vs lines served\n\n" + c.markdown_table(
            ["LB", "objects in Swift", "lines downloaded", "lines the replies reported",
             "replies lost with gearmand", "requests served", "of which in log-sink gaps",
             "cut by a HAProxy kill", "served - archived", "as expected"], rows)
            + "\n\nExpected: every request served has its line in Swift (those served during a "
              "log-sink gap may be missing; a request cut by a HAProxy kill may have one), and "
              "the lines downloaded equal the lines the PASS replies reported (more when an "
              "ARCHIVE's reply was lost with gearmand: its objects are in Swift, its count never "
              "came back): "
            + self.target("archived lines match", ok)
            + self.dropped_lines())

    def dropped_lines(self) -> str:
        """What DIAGNOSTICS said about log lines lost on the way to the sink."""
        devices = [job.reply.get("device", {}) for job in self.soak.jobs
                   if job.action == "DIAGNOSTICS" and job.reply]
        dropped = max((d.get("haproxy_dropped_logs") or 0 for d in devices), default=0)
        unreadable = max((d.get("unreadable_access_lines") or 0 for d in devices), default=0)
        return (f"\n\nDIAGNOSTICS ({len(devices)} replies): HAProxy's DroppedLogs at most {dropped}, "
                f"lines the sink could not read at most {unreadable}.")

    def slopes(self) -> None:
        soak = self.soak
        warmup = soak.args.warmup
        warm = [s for s in soak.samples if s["t"] >= warmup]
        span = (warm[-1]["t"] - warm[0]["t"]) if len(warm) > 1 else 0.0
        judged = span >= MIN_FIT_SECONDS
        rows, ok = [], True
        for name, bound in SLOPE_BOUNDS.items():
            group_key = {"worker": "incarnation", "log": "sink pid"}.get(name.split()[0])
            # The first life's first sample is at t=0: its warm-up is the run's.
            points = [(s["t"], s[name], int(s[group_key]) if group_key else 0)
                      for s in soak.samples if s[name] == s[name]]
            slope = fit_slope(points, warmup) * 3600 if len(points) > 2 else float("nan")
            points = [p for p in points if p[0] >= warmup]
            values = [p[1] for p in points]
            within = abs(slope) <= bound  # False for a NaN slope (too few samples)
            limit = f"{bound:g} per hour"
            if name == "worker threads" and values:
                # The read-only lane's pool starts threads on demand, up to READERS: a step
                # up to that ceiling is the pool filling, not a leak; above it would be one.
                # After the warm-up the fewest seen already include the pool's first thread.
                ceiling = min(values) + READERS - 1
                within = max(values) <= ceiling
                limit = f"at most {ceiling:g} (the read-only pool grows to {READERS})"
            if judged:
                ok = ok and within
            self.fits[name] = (slope, bound)
            rows.append([name, f"{min(values, default=float('nan')):.1f}",
                         f"{max(values, default=float('nan')):.1f}", f"{slope:+.3f}", limit,
                         ("yes" if within else "NO") if judged else "not judged"])
        loads = [s["load"] for s in soak.samples]
        text = ("## Slopes\n\n" + c.markdown_table(
            ["series", "min", "max", "slope per hour", "bound (abs)", "within"], rows)
            + f"\n\nFitted on {len(warm)} samples from t={soak.args.warmup:g} s on ({span / 60:.1f} min); "
              "least squares with one intercept per process lifetime (worker restarts, sink "
              f"restarts), each life's first {warmup:g} s left out, so only growth within a "
              "settled life is a slope. ")
        if judged:
            text += "Target flat: " + self.target("slopes flat", ok)
        else:
            text += f"Not judged: the fit window is shorter than {MIN_FIT_SECONDS / 60:g} minutes."
        if loads:
            text += (f"\n\n1-minute load average during the run: min {min(loads):.1f}, median "
                     f"{statistics.median(loads):.1f}, max {max(loads):.1f} (2 CPUs, shared).")
        self.sections.append(text)

    def save_raw(self, path: Path) -> None:
        """Every sample, fault, job and failed request, for a second look at a long run."""
        soak = self.soak
        path.write_text(json.dumps({
            "t0": soak.t0, "t_end": soak.t_end, "args": {k: str(v) for k, v in vars(soak.args).items()},
            "samples": soak.samples,
            "faults": [dataclasses.asdict(f) for f in soak.faults],
            "jobs": [{**dataclasses.asdict(j), "reply": j.reply if j.action == "METRICS" else None}
                     for j in soak.jobs],
            "traffic": {loop.mode: {"failures": loop.failures, "ok": loop.ok, "retries": loop.retries,
                                    "whole_bytes": loop.whole_bytes, "partial_bytes": loop.partial_bytes,
                                    "added_bytes": loop.added_bytes,
                                    "seconds": loop.seconds} for loop in soak.traffic},
        }))

    def parameters(self) -> str:
        a = self.soak.args
        return ("## Parameters\n\n"
                f"`--duration {a.duration:g} --seed {a.seed} --fault-every {a.fault_every:g} "
                f"--warmup {a.warmup:g} --update-every {a.update_every:g} --stats-every {a.stats_every:g} "
                f"--metrics-every {a.metrics_every:g} --archive-every {a.archive_every:g} "
                f"--diagnostics-every {a.diagnostics_every:g} --swift-down {a.swift_down:g} "
                f"--restart-delay {a.restart_delay:g} --pause {a.pause:g}`; answers of "
                f"{ANSWER_PADDING} bytes plus the node's name; 3 HTTP and 3 TCP backends, 2 or 3 "
                "in use; clients: HTTP keep-alive, HTTP `Connection: close`, TCP.")

    def plot(self, plt: Any, path: Path) -> None:
        soak = self.soak
        names = list(SLOPE_BOUNDS)
        figure, axes = plt.subplots(2, 3, figsize=(14, 7))
        for axis, name in zip(axes.flat, names):
            ts = [s["t"] / 60 for s in soak.samples]
            axis.plot(ts, [s[name] for s in soak.samples], ".", markersize=2)
            slope, bound = self.fits.get(name, (float("nan"), 0))
            axis.set_title(f"{name}: {slope:+.2f}/h (bound {bound:g})", fontsize=9)
            axis.set_xlabel("minutes")
            for fault in soak.faults:
                axis.axvline((fault.start - soak.t0) / 60, linewidth=0.5, alpha=0.5,
                             color="red" if fault.kind == "haproxy" else "grey")
        figure.suptitle("soak: samples (faults as vertical lines, red = HAProxy kill -9)")
        c.save_figure(plt, figure, path)


def keep_logs(root: Path, into: Path) -> None:
    """The worker's and the log sink's own logs of a run that missed a target: the run's
    directory goes with the run, and they tell what the worker did meanwhile."""
    into.mkdir(parents=True, exist_ok=True)
    sink = root / "state" / "logs"
    for log in (root / "worker.log", root / "worker.out", *sink.glob("logsink.log*"),
                sink / "logsink.stderr"):
        if log.is_file():
            shutil.copyfile(log, into / log.name)


def rejudge(args: Any) -> int:
    """The Slopes section (and the plot) again from a saved run's soak-raw.json, with this
    version's bounds."""
    raw = json.loads(args.rejudge.read_text())
    soak = SimpleNamespace(samples=raw["samples"], t0=raw["t0"],
                           faults=[Fault(**fault) for fault in raw["faults"]],
                           args=SimpleNamespace(warmup=float(raw["args"]["warmup"])))
    report = Report(soak)  # type: ignore[arg-type]
    report.slopes()
    print(report.sections[-1])
    plt = None if args.no_plot else c.pyplot_or_none(required=True)
    if plt is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        report.plot(plt, args.out_dir / "soak.png")
    return 1 if report.missed else 0


def main() -> int:
    parser = c.argument_parser(__doc__)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of soak")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-every", type=float, default=300.0, help="mean seconds between faults")
    parser.add_argument("--warmup", type=float, default=120.0, help="no faults and no slope fit before")
    parser.add_argument("--tail", type=float, default=60.0, help="no fault starts in the last seconds")
    parser.add_argument("--update-every", type=float, default=3.0)
    parser.add_argument("--stats-every", type=float, default=5.0)
    parser.add_argument("--metrics-every", type=float, default=60.0)
    parser.add_argument("--archive-every", type=float, default=180.0, help="each LB this often")
    parser.add_argument("--diagnostics-every", type=float, default=120.0)
    parser.add_argument("--swift-down", type=float, default=240.0, help="seconds Swift is down")
    parser.add_argument("--restart-delay", type=float, default=3.0, help="seconds before the worker restarts")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between a client's requests")
    parser.add_argument("--archive-timeout", type=float, default=10.0)
    parser.add_argument("--job-timeout", type=float, default=150.0)
    parser.add_argument("--rejudge", type=Path, metavar="RAW_JSON",
                        help="only judge the slopes of a saved run again (and redraw its plot)")
    args = parser.parse_args()
    if args.rejudge:
        return rejudge(args)
    random.seed(args.seed)
    # `kill PID` of a soak in the background (where SIGINT is ignored) still stops
    # everything it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = c.machine_info()
    with c.Run() as run:
        soak = Soak(args, run)
        soak.start()
        soak.soak()
        soak.finish()
        report = Report(soak)
        report.build()
        if report.missed:
            keep_logs(run.root, args.out_dir / "soak-logs")
    summary = ("## Targets\n\n" + ("All met." if not report.missed else
               "Missed: " + "; ".join(report.missed) + "."))
    sections = [report.parameters(), summary, *report.sections]
    print("\n\n".join(sections))
    c.publish(args, "soak", "Soak: one worker for hours under Libra's jobs, traffic and faults",
              sections, info, "soak samples", report.plot)
    report.save_raw(args.out_dir / "soak-raw.json")
    return 1 if report.missed else 0


if __name__ == "__main__":
    sys.exit(main())
