"""Real components for the worker's integration tests, and the helpers that drive them.

Everything here listens on 127.0.0.1 only, on ports picked in 20000-32000 (below the
kernel's ephemeral range), and every process is started, tracked and stopped by pid:
gearmand runs in the foreground as our child; the worker is our child; HAProxy and the
log sink daemonize themselves, so they are found through the worker's state dir
(`haproxy.pid`, `HAProxyProcess.our_pids()`, `LogSink.pid()`) and stopped by pid too.
"""

from __future__ import annotations

import collections
import configparser
import contextlib
import grp
import http.client
import http.server
import json
import os
import pwd
import random
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from libra_worker import client
from libra_worker.drivers.haproxy.process import HAProxyProcess, find_binary, process_alive
from libra_worker.journal import JOURNAL_NAME
from libra_worker.logsink import LogSink

REPO_ROOT = Path(__file__).resolve().parents[2]
GEARMAND = "/usr/sbin/gearmand"
PORT_RANGE = (20000, 32000)
LOOPBACK = "127.0.0.1"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

_taken_ports: set[int] = set()
_ports_lock = threading.Lock()


# --------------------------------------------------------------------------- ports, polls


def free_port() -> int:
    """A loopback TCP port below the ephemeral range, free now and not handed out before."""
    with _ports_lock:
        for _ in range(500):
            port = random.randint(*PORT_RANGE)
            if port in _taken_ports:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((LOOPBACK, port))
                except OSError:
                    continue
            _taken_ports.add(port)
            return port
    raise RuntimeError("no free port in %d-%d" % PORT_RANGE)


def free_privileged_port() -> int | None:
    """A loopback port below 1024 that nothing listens on, or None."""
    for port in range(1023, 600, -1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    return None


def make_temp_dir() -> Path:
    """Short on purpose: unix socket paths inside it must stay under 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="lw-"))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def port_accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def connection_refused(port: int, host: str = LOOPBACK) -> bool:
    """True only for an explicit refusal (RST), not for a timeout or other error."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory in KiB (`field="VmHWM"`: its peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


# --------------------------------------------------------------------------- gearmand


class Gearmand:
    """One gearmand in the foreground, our child, stopped by pid."""

    def __init__(self, root: Path, port: int | None = None, host: str = LOOPBACK,
                 command_prefix: tuple[str, ...] = ()) -> None:
        self.root = root
        self.port = port or free_port()
        # A gearmand in a network namespace: ("ip", "netns", "exec", NAME) and its address there.
        self.host = host
        self.command_prefix = command_prefix
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def accepts(self) -> bool:
        return port_accepts(self.port, self.host)

    def start(self) -> "Gearmand":
        self.starts += 1
        tag = f"{self.port}-{self.starts}"
        config = self.root / f"gearmand-{self.port}.conf"
        config.touch()  # gearmand refuses to start if its config file is missing
        command = [
            *self.command_prefix, GEARMAND, "--listen", self.host, "--port", str(self.port),
            "--threads", "1", "--queue-type", "builtin",
            "--log-file", str(self.root / f"gearmand-{tag}.log"),
            "--pid-file", str(self.root / f"gearmand-{tag}.pid"),
            "--config-file", str(config),
        ]
        self.process = start_server_child(command, self.root / f"gearmand-{tag}.out",
                                          self.accepts, f"gearmand on port {self.port}")
        return self

    def stop(self) -> None:
        stop_child(self.process)

    def admin(self, command: str) -> str:
        """A text-protocol admin command ("status", "workers"); the answer ends with '.'."""
        with socket.create_connection((self.host, self.port), timeout=5) as conn:
            conn.sendall(command.encode() + b"\n")
            data = b""
            while not data.endswith(b".\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.decode()

    def function_status(self, function: str) -> tuple[int, int, int]:
        """(queued, running, available workers) for `function`, zeros if unknown."""
        for line in self.admin("status").splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[0] == function:
                return int(parts[1]), int(parts[2]), int(parts[3])
        return 0, 0, 0


def start_server_child(command: list[str], output_path: Path, accepts: Callable[[], bool],
                       what: str) -> subprocess.Popen[bytes]:
    """Start a server in the foreground as our child, its output in `output_path`, and wait
    until it accepts connections; if it exits first, fail with what it said."""
    with open(output_path, "ab") as output:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is not None or accepts(), START_TIMEOUT, what)
        assert process.poll() is None, (
            f"{what} exited with {process.returncode}: "
            + output_path.read_text(errors="replace")[-4000:])
    except BaseException:
        stop_child(process)
        raise
    return process


def stop_child(process: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> int | None:
    """Signal a child by pid, wait, force it if needed; its exit status."""
    if process is None:
        return None
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    return process.returncode


# --------------------------------------------------------------------------- backends


class _NamedHTTPHandler(http.server.BaseHTTPRequestHandler):
    server: "_NamedHTTPServer"

    def do_GET(self) -> None:  # the name http.server dispatches to
        backend = self.server.backend
        backend.request_lines.append(self.raw_requestline)
        if self.path.split("?")[0] == backend.health_path:
            backend.health_checks += 1
            status, body = backend.health_status, f"{backend.name} health\n".encode()
        else:
            backend.record(self.path)
            status, body = 200, backend.answer()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _NamedHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    backend: "HTTPBackend"


class _NamedTCPHandler(socketserver.BaseRequestHandler):
    server: "_NamedTCPServer"

    def handle(self) -> None:
        backend = self.server.backend
        self.request.settimeout(5)
        try:
            data = self.request.recv(4096)
            if not data:
                return  # a CONNECT health check: connect, then close
            backend.record(data.decode(errors="replace").strip())
            self.request.sendall(backend.answer())
        except OSError:
            pass


class _NamedTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    backend: "TCPBackend"


@dataclass
class Backend:
    """A node on 127.0.0.1 that answers its own name; what it was sent is recorded."""

    name: str
    port: int = 0
    received: list[str] = field(default_factory=list)
    padding: int = 0  # bytes added after the name, for answers of a known, larger size
    _server: socketserver.BaseServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _make_server(self) -> socketserver.BaseServer:
        raise NotImplementedError

    def start(self) -> "Backend":
        self.port = self.port or free_port()
        self._server = self._make_server()
        self._server.backend = self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                         name=f"backend-{self.name}", daemon=True).start()
        return self

    def answer(self) -> bytes:
        return self.name.encode() + b"." * self.padding

    def record(self, item: str) -> None:
        with self._lock:
            self.received.append(item)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def node(self, **extra: Any) -> dict[str, Any]:
        return {"id": self.name, "address": LOOPBACK, "port": self.port, **extra}


@dataclass
class HTTPBackend(Backend):
    """An HTTP node answering its own name; `health_status` is what /health answers.

    `request_lines` keeps every request line exactly as it came, bytes and CRLF included.
    """

    health_path: str = "/health"
    health_status: int = 200
    health_checks: int = 0
    request_lines: list[bytes] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return self.received

    def _make_server(self) -> socketserver.BaseServer:
        return _NamedHTTPServer((LOOPBACK, self.port), _NamedHTTPHandler)


@dataclass
class TCPBackend(Backend):
    """A TCP node: reads one line, answers its own name, closes."""

    @property
    def lines(self) -> list[str]:
        return self.received

    def _make_server(self) -> socketserver.BaseServer:
        return _NamedTCPServer((LOOPBACK, self.port), _NamedTCPHandler)


# --------------------------------------------------------------------------- traffic


class SilentEndpoint:
    """Accepts connections and never says a word (a Swift that hangs)."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listener.getsockname()[1]}/v1/AUTH_stalled"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


class AnswerCatcher:
    """A TCP relay between a worker and gearmand that, once armed, keeps the worker's
    next answer (WORK_COMPLETE, WORK_FAIL or WORK_EXCEPTION) from reaching gearmand.

    The job has run; gearmand never hears of it. Kill the worker then, and gearmand
    hands the same job (same handle and unique id) to the next worker: a job delivered
    twice. Only the worker's connections go through it; clients talk to gearmand.
    """

    _MAGIC = b"\0REQ"
    _ANSWERS = (13, 14, 25)  # WORK_COMPLETE, WORK_FAIL, WORK_EXCEPTION

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server((LOOPBACK, free_port()))
        self.caught = threading.Event()
        self._armed = threading.Event()
        threading.Thread(target=self._accept, name="answer-catcher", daemon=True).start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.listener.getsockname()[1]}"

    def arm(self) -> None:
        self.caught.clear()
        self._armed.set()

    def _accept(self) -> None:
        while True:
            try:
                worker_side, _ = self.listener.accept()
            except OSError:
                return
            try:
                server_side = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                worker_side.close()
                continue
            server_side.settimeout(None)
            threading.Thread(target=self._copy, args=(server_side, worker_side), daemon=True).start()
            threading.Thread(target=self._relay_worker, args=(worker_side, server_side),
                             daemon=True).start()

    @staticmethod
    def _copy(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def _relay_worker(self, worker_side: socket.socket, server_side: socket.socket) -> None:
        """Forward the worker's packets whole; after a caught answer, nothing more."""
        buffer, forwarding = b"", True
        with contextlib.suppress(OSError):
            while chunk := worker_side.recv(65536):
                buffer += chunk
                while forwarding and len(buffer) >= 12:
                    if not buffer.startswith(self._MAGIC):  # not a binary packet: pass it on
                        server_side.sendall(buffer)
                        buffer = b""
                        break
                    kind, size = struct.unpack(">II", buffer[4:12])
                    if len(buffer) < 12 + size:
                        break
                    packet, buffer = buffer[:12 + size], buffer[12 + size:]
                    if kind in self._ANSWERS and self._armed.is_set():
                        self._armed.clear()
                        forwarding = False
                        self.caught.set()
                    else:
                        server_side.sendall(packet)
        # The worker is gone (killed): so is its connection, for gearmand too. Shut down,
        # not only closed: `_copy` blocks in recv on it, and while it does a close alone
        # leaves the connection open, so gearmand would never give the job out again.
        with contextlib.suppress(OSError):
            server_side.shutdown(socket.SHUT_RDWR)
        server_side.close()
        worker_side.close()

    def close(self) -> None:
        self.listener.close()


def request_once(url: str, timeout: float = 5.0) -> str:
    """One request on a fresh connection; the name of the node that answered.

    `http://127.0.0.1:P/path` sends a GET (which must answer 200);
    `tcp://127.0.0.1:P/tag` sends the line "tag" and reads to EOF.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or LOOPBACK, parts.port
    if parts.scheme == "http":
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            connection.request("GET", parts.path or "/", headers={"Connection": "close"})
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
            if response.status != 200:
                raise OSError(f"HTTP {response.status}: {body[:80]!r}")
            return body
        finally:
            connection.close()
    if parts.scheme == "tcp":
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall((parts.path.lstrip("/") or "hello").encode() + b"\n")
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace")
        if not answer:
            raise OSError("the connection closed without an answer")
        return answer
    raise ValueError(f"unsupported URL {url!r}")


def traffic(url: str, n: int) -> tuple[collections.Counter[str], int]:
    """`n` requests; a Counter of the node names that answered, and the number of failures."""
    answered: collections.Counter[str] = collections.Counter()
    failures = 0
    for _ in range(n):
        try:
            answered[request_once(url)] += 1
        except (OSError, http.client.HTTPException):
            failures += 1
    return answered, failures


class TrafficLoop:
    """Requests back to back in a thread until stopped: proves there is no gap."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._turn = threading.Lock()  # held for each request; `paused` takes it
        self._thread = threading.Thread(target=self._run, name="traffic-loop", daemon=True)

    @property
    def total(self) -> int:
        return sum(self.answered.values()) + len(self.errors)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._turn:
                try:
                    self.answered[request_once(self.url)] += 1
                except (OSError, http.client.HTTPException) as exc:
                    self.errors.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
            time.sleep(0.005)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No request of the loop's in flight until the block ends. A check of which nodes
        answer needs it under LEAST_CONNECTIONS: a loop request always holding one server
        would steer every one of the check's requests to another."""
        with self._turn:
            yield

    def __enter__(self) -> "TrafficLoop":
        self._thread.start()
        # At least one answer before the caller acts, so the loop proves continuity.
        wait_until(lambda: self.total > 0, 10, "the first request of the traffic loop")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# --------------------------------------------------------------------------- the worker


def lb(protocol: str, port: int, nodes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"protocol": protocol, "port": port, "nodes": nodes, **extra}


def update(*loadbalancers: dict[str, Any]) -> dict[str, Any]:
    return {"hpcs_action": "UPDATE", "loadbalancers": list(loadbalancers)}


def http_monitor(path: str = "/health", delay: int = 1, timeout: int = 1, attempts: int = 2) -> dict[str, Any]:
    return {"type": "HTTP", "delay": delay, "timeout": timeout, "attempts": attempts, "path": path}


def strict_json(data: bytes | str) -> Any:
    """Parse JSON as other languages' parsers would: NaN and Infinity are not JSON."""
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON token {token} in {str(data)[:200]}")

    return json.loads(data, parse_constant=refuse)


def node_statuses(reply: dict[str, Any]) -> dict[str, str]:
    assert reply.get("hpcs_response") == "PASS", reply
    return {node["id"]: node["status"] for node in reply["nodes"]}


class Worker:
    """The real worker process (`python -m libra_worker.cli --foreground`) on one state dir.

    It can be stopped, killed and started again on the same state dir; `cleanup` stops
    everything it led to (worker, HAProxy, log sink) by pid.
    """

    # Set on an instance to add variables to the worker's environment (NOTIFY_SOCKET...).
    env: Mapping[str, str] = MappingProxyType({})
    # The directory the worker is started from.
    cwd: Path = REPO_ROOT

    def __init__(self, root: Path, servers: list[str], *, function: str | None = None,
                 poll_timeout: float = 0.3, archive_timeout: float | None = None,
                 log_level: str = "INFO", launcher: tuple[str, ...] = (),
                 python: str = sys.executable,
                 settings: dict[str, dict[str, Any]] | None = None,
                 gearman_options: dict[str, str] | None = None,
                 client_tls: client.TLSFiles | None = None) -> None:
        self.root = root
        # A command the worker runs under (e.g. AS_NOBODY), and the Python it runs with.
        self.launcher = launcher
        self.python = python
        self.servers = list(servers)
        self.function = function or f"lw-{uuid.uuid4().hex[:10]}"
        self.state_dir = root / "state"
        self.config_path = root / "worker.ini"
        self.log_file = root / "worker.log"
        self.output_file = root / "worker.out"
        self.poll_timeout = poll_timeout
        self.archive_timeout = archive_timeout
        self.log_level = log_level
        # Extra INI values, e.g. {"timeouts": {"update": "0.5"}}; they win over the above,
        # and None removes an option.
        self.settings = settings or {}
        # Extra [gearman] options (TLS, keepalive) and the TLS files submit() uses.
        self.gearman_options = dict(gearman_options or {})
        self.client_tls = client_tls
        # Its own, kept across restarts: the default port is one per host, and workers of
        # other tests (and other test runs) share this host.
        self.peers_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config()

    # ------------------------------------------------------------------ config

    def write_config(self) -> None:
        lines = [
            "[gearman]",
            f"servers = {', '.join(self.servers)}",
            f"function = {self.function}",
            f"poll_timeout = {self.poll_timeout}",
            "reconnect_delay_max = 1.0",
            *(f"{key} = {value}" for key, value in self.gearman_options.items()),
            "",
            "[worker]",
            f"state_dir = {self.state_dir}",
            f"log_file = {self.log_file}",
            f"log_level = {self.log_level}",
            "",
            "[haproxy]",
            f"bind_address = {LOOPBACK}",
            "command_timeout = 15",
            "stop_grace = 3",
            f"peers_address = {LOOPBACK}:{self.peers_port}",
            "",
            "[archive]",
            # The test Swift (tests/swift_server.py) speaks plain http on loopback.
            "allow_plain_http = true",
        ]
        if self.archive_timeout is not None:
            lines.append(f"timeout = {self.archive_timeout}")
        parser = configparser.ConfigParser()
        parser.read_string("\n".join(lines) + "\n")
        for section, values in self.settings.items():
            if not parser.has_section(section):
                parser.add_section(section)
            for key, value in values.items():
                if value is None:
                    parser.remove_option(section, key)
                else:
                    parser.set(section, key, str(value))
        with open(self.config_path, "w") as handle:
            parser.write(handle)

    # ------------------------------------------------------------------ process

    def command(self) -> list[str]:
        """The checkout's worker, with the test environment's dependencies."""
        return [*self.launcher, self.python, "-m", "libra_worker.cli", "--config",
                str(self.config_path), "--foreground"]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the worker process without waiting for it to serve."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.output_file, "ab") as output:
            self.process = subprocess.Popen(
                self.command(), cwd=self.cwd, env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            )
        return self.process

    def environment(self) -> dict[str, str]:
        """The worker's environment: `environment_for` its Python, `env` on top."""
        return {**environment_for(self.python), **self.env}

    def start(self, ready_timeout: float = START_TIMEOUT) -> "Worker":
        """Start the worker and wait until it answers DISCOVER through the job server, and
        its job journal has the line of that DISCOVER (written just after the answer)."""
        journaled = self._journal_lines()
        self.spawn()
        deadline = time.monotonic() + ready_timeout
        while True:
            assert self.is_running(), f"the worker exited with {self.process.returncode}:\n{self.output()}"
            try:
                answer = self.submit("DISCOVER", timeout=2)
            except client.TransportError:
                answer = None
            if answer is not None:
                assert answer["hpcs_response"] == "PASS", answer
                wait_until(lambda: self._journal_lines() > journaled, 10,
                           "the journal line of the DISCOVER that found the worker ready")
                return self
            assert time.monotonic() < deadline, f"the worker never answered:\n{self.output()}"

    def _journal_lines(self) -> int:
        try:
            return (self.state_dir / JOURNAL_NAME).read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """SIGTERM: the warm shutdown (finish the job in hand, then exit)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status."""
        return stop_child(self.process)

    def kill(self) -> None:
        stop_child(self.process, signal.SIGKILL)

    def restart(self) -> "Worker":
        code = self.stop()
        assert code == 0, f"the worker exited with {code}:\n{self.output()}"
        return self.start()

    def output(self) -> str:
        parts = []
        for path in (self.output_file, self.log_file):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-6000:])
        return "\n".join(parts)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # ------------------------------------------------------------------ jobs

    def submit(self, message: str | dict[str, Any], timeout: float = 30.0,
               servers: list[str] | None = None) -> dict[str, Any]:
        """Send an action name, a dict, or raw text through the job server; the reply."""
        if isinstance(message, dict):
            text = json.dumps(message)
        elif message.upper() in client.Action.__members__:
            text = json.dumps({"hpcs_action": message.upper()})
        else:
            text = message
        return client.submit(",".join(servers or self.servers), self.function, text, timeout,
                             self.client_tls)

    def submit_bytes(self, payload: bytes, timeout: float = 30.0) -> dict[str, Any]:
        """Send raw bytes (not necessarily UTF-8) as the job payload; the reply, read as
        strict JSON (a NaN or Infinity token in it fails the test)."""
        return strict_json(self.submit_raw(payload, timeout))

    def submit_raw(self, payload: bytes, timeout: float = 30.0) -> bytes:
        """Send raw bytes as the job payload; the reply's bytes, after a WORK_COMPLETE."""
        import gearman

        job_client = gearman.GearmanClient(self.servers)
        try:
            request = job_client.submit_job(self.function.encode(), payload, poll_timeout=timeout)
        finally:
            job_client.shutdown()
        assert request.complete and not request.timed_out, f"no reply (state {request.state})"
        assert request.state == gearman.constants.JOB_COMPLETE, f"job ended {request.state}"
        return request.result

    # ------------------------------------------------------------------ what it runs

    @property
    def haproxy(self) -> HAProxyProcess:
        return HAProxyProcess(
            binary=find_binary(),
            config_file=self.state_dir / "haproxy.cfg",
            pid_file=self.state_dir / "haproxy.pid",
            master_socket=self.state_dir / "haproxy-master.sock",
            command_timeout=10,
            stop_grace=3,
        )

    @property
    def logsink(self) -> LogSink:
        return LogSink(self.state_dir)

    def haproxy_config(self) -> str:
        return (self.state_dir / "haproxy.cfg").read_text()

    def kill_haproxy(self) -> list[int]:
        """SIGKILL every HAProxy process of this state dir, by pid; the pids killed."""
        pids = self.haproxy.our_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(process_alive(pid) for pid in pids), STOP_TIMEOUT,
                   f"HAProxy pids {pids} to die")
        return pids

    def cleanup(self) -> None:
        """Stop the worker, then HAProxy and the log sink it started, all by pid."""
        try:
            stop_child(self.process)  # tests that care assert the exit status themselves
        finally:
            with contextlib.suppress(Exception):
                self.haproxy.stop()
            with contextlib.suppress(Exception):
                self.kill_haproxy()
            with contextlib.suppress(Exception):
                self.logsink.stop()


# The tests run as root; this runs a command as an unprivileged service user would.
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def start_as_nobody(factory: "WorkerFactory", python: str, **options: Any) -> Worker:
    """A worker running as nobody:nogroup from `python` (see `install_checkout`), its temp
    dir (and so its state_dir) nobody's."""
    worker = factory(start=False, launcher=AS_NOBODY, python=python, **options)
    for path in [worker.root, *worker.root.rglob("*")]:
        os.chown(path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    return worker.start()


def install_checkout(directory: Path) -> str:
    """This checkout installed in `directory` as a deployment installs it, where any user
    may run it; the Python to run it with.

    What runs as another user cannot run from the checkout: a clone under /root or under a
    `mktemp -d` directory (0700) is closed to others, and so is its .venv, and maybe the
    test environment's interpreter (a pyenv build under /root). So: a virtualenv of the
    system's Python of this version, this environment's packages copied into it (no
    network), and the checkout installed from a wheel built from a copy of it (building
    writes build/ and *.egg-info next to the sources).
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system_python = Path(f"/usr/bin/python{version}")
    if not system_python.exists():
        raise RuntimeError(f"{system_python} is missing: it runs the checkout as another user")
    directory.chmod(0o755)
    venv = directory / "venv"
    subprocess.run([str(system_python), "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    installed = venv / "lib" / f"python{version}" / "site-packages"
    for packages in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
        shutil.copytree(packages, installed, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "libra_worker", "libra_worker-*", "__editable__*"))
    source = directory / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".tox", "build", "dist", "*.egg-info", "__pycache__", "run"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(directory / "wheel"), str(source)], check=True, timeout=300)
    (wheel,) = (directory / "wheel").glob("libra_worker-*.whl")
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    shutil.rmtree(source)
    return str(venv / "bin" / "python")


def environment_for(python: str) -> dict[str, str]:
    """Our environment for a command run with `python`: the checkout first on the path when
    it is this test environment's Python; an installed copy runs what was installed."""
    env = dict(os.environ)
    if python == sys.executable:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class WorkerFactory:
    """Makes workers on fresh temp dirs and cleans all of them up afterwards."""

    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.workers: list[Worker] = []
        self.roots: list[Path] = []

    def __call__(self, *, start: bool = True, servers: list[str] | None = None,
                 **options: Any) -> Worker:
        root = make_temp_dir()
        self.roots.append(root)
        worker = Worker(root, servers or self.servers, **options)
        self.workers.append(worker)
        return worker.start() if start else worker

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.cleanup()
        for root in self.roots:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def gearmand_server(port: int | None = None) -> Iterator[Gearmand]:
    root = make_temp_dir()
    server = Gearmand(root, port)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def backends(*items: HTTPBackend | TCPBackend) -> Iterator[tuple[HTTPBackend | TCPBackend, ...]]:
    started = []
    try:
        for item in items:
            started.append(item.start())
        yield tuple(started)
    finally:
        for item in started:
            item.stop()
