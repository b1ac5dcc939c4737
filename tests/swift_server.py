"""A real, throw-away, all-in-one OpenStack Swift for tests and benchmarks.

One replica, one device directory, tempauth and memcached, every server bound to
127.0.0.1 on a free port in 20000-32000, everything under one ``tempfile`` dir.
The servers are Debian's ``python3-swift`` run by ``/usr/bin/python3`` (not the
project's interpreter), through a tiny launcher that points Swift at the test's
own ``swift.conf`` so ``/etc/swift`` is never read or written.

Usage::

    swift = SwiftServer.start()
    try:
        swift.endpoint, swift.token   # preauthurl / preauthtoken for swiftclient
        swift.stop_proxy(); swift.start_proxy()   # simulate an unreachable Swift
    finally:
        swift.stop()
"""

from __future__ import annotations

import contextlib
import getpass
import gzip
import http.client
import http.server
import logging
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

LOG = logging.getLogger(__name__)

SYSTEM_PYTHON = "/usr/bin/python3"
PORT_RANGE = (20000, 32000)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
SERVER_KINDS = ("account", "container", "object")
AUTH_USER = "test:tester"
AUTH_KEY = "testing"

# Swift reads swift.conf from a module-level path fixed at import time; patch it
# before the server loads anything else, and reload the storage policies that
# were already parsed from the default path on import.
_LAUNCHER = """
import sys
from swift.common import storage_policy, utils
utils.set_swift_dir(sys.argv[1])
storage_policy.reload_storage_policies()
from swift.common.wsgi import run_wsgi
sys.exit(run_wsgi(sys.argv[2], sys.argv[3]))
"""

_RING_BUILDER = """
import sys
from swift.common.ring import RingBuilder
etc = sys.argv[1]
for kind, port in zip(("account", "container", "object"), sys.argv[2:]):
    builder = RingBuilder(6, 1, 1)
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1",
                     "port": int(port), "device": "d1", "weight": 1.0})
    builder.rebalance()
    builder.get_ring().save("%s/%s.ring.gz" % (etc, kind))
"""


def free_port(taken: set[int]) -> int:
    """Return a loopback TCP port in PORT_RANGE that is free right now."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port in %d-%d" % PORT_RANGE)


def wait_for_port(port: int, deadline: float) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("nothing listening on 127.0.0.1:%d" % port)


def _common_conf(port: int, etc: Path, root: Path, log_port: int) -> str:
    # Swift logs to syslog, falling back to UDP localhost:514; send it to an
    # explicit loopback port nobody reads so nothing leaves the machine.
    return (
        "[DEFAULT]\n"
        "bind_ip = 127.0.0.1\n"
        f"bind_port = {port}\n"
        "workers = 0\n"
        f"user = {getpass.getuser()}\n"
        f"swift_dir = {etc}\n"
        f"devices = {root / 'srv'}\n"
        "mount_check = false\n"
        "log_udp_host = 127.0.0.1\n"
        f"log_udp_port = {log_port}\n"
    )


def _storage_conf(kind: str, port: int, etc: Path, root: Path, log_port: int) -> str:
    return _common_conf(port, etc, root, log_port) + (
        "\n[pipeline:main]\n"
        f"pipeline = {kind}-server\n"
        f"\n[app:{kind}-server]\n"
        f"use = egg:swift#{kind}\n"
    )


def _proxy_conf(port: int, memcached_port: int, etc: Path, root: Path,
                log_port: int) -> str:
    # error_suppression_interval = 0: otherwise one refused memcached
    # connection during start-up makes auth answer 503 for a minute.
    return _common_conf(port, etc, root, log_port) + (
        "\n[pipeline:main]\n"
        "pipeline = catch_errors proxy-logging cache tempauth proxy-logging"
        " proxy-server\n"
        "\n[app:proxy-server]\n"
        "use = egg:swift#proxy\n"
        "account_autocreate = true\n"
        "\n[filter:tempauth]\n"
        "use = egg:swift#tempauth\n"
        "user_test_tester = testing .admin\n"
        "\n[filter:cache]\n"
        "use = egg:swift#memcache\n"
        f"memcache_servers = 127.0.0.1:{memcached_port}\n"
        "error_suppression_interval = 0\n"
        "\n[filter:catch_errors]\n"
        "use = egg:swift#catch_errors\n"
        "\n[filter:proxy-logging]\n"
        "use = egg:swift#proxy_logging\n"
    )


SWIFT_CONF = """[swift-hash]
swift_hash_path_suffix = libra-worker-tests
swift_hash_path_prefix = libra-worker-tests

[storage-policy:0]
name = Policy-0
default = yes
"""


@dataclass
class SwiftServer:
    """Handle on a running test Swift; every process is tracked by pid."""

    root: Path
    ports: dict[str, int]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    token: str = ""
    storage_url: str = ""

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def auth_url(self) -> str:
        return "http://127.0.0.1:%d/auth/v1.0" % self.ports["proxy"]

    @property
    def endpoint(self) -> str:
        """The storage URL (``.../v1/AUTH_test``): swiftclient's preauthurl."""
        return self.storage_url

    @classmethod
    def start(cls) -> "SwiftServer":
        """Configure and start memcached and the four servers; wait for a PUT."""
        root = Path(tempfile.mkdtemp(prefix="libra-swift-"))
        taken: set[int] = set()
        ports = {name: free_port(taken) for name in
                 ("memcached", "proxy", "syslog") + SERVER_KINDS}
        server = cls(root=root, ports=ports)
        try:
            server._write_config()
            server._build_rings()
            server._start_all()
            server._wait_until_writable(time.monotonic() + START_TIMEOUT)
        except BaseException:
            server.stop()
            raise
        return server

    def _write_config(self) -> None:
        (self.root / "srv" / "d1").mkdir(parents=True)
        self.etc.mkdir()
        (self.etc / "swift.conf").write_text(SWIFT_CONF)
        log_port = self.ports["syslog"]
        for kind in SERVER_KINDS:
            (self.etc / f"{kind}-server.conf").write_text(
                _storage_conf(kind, self.ports[kind], self.etc, self.root, log_port))
        (self.etc / "proxy-server.conf").write_text(_proxy_conf(
            self.ports["proxy"], self.ports["memcached"], self.etc, self.root,
            log_port))

    def _build_rings(self) -> None:
        args = [str(self.ports[kind]) for kind in SERVER_KINDS]
        subprocess.run([SYSTEM_PYTHON, "-c", _RING_BUILDER, str(self.etc), *args],
                       check=True, capture_output=True, timeout=60)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.out", "ab") as output:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, cwd=self.root)

    def _start_swift_server(self, kind: str) -> None:
        conf = self.etc / f"{kind}-server.conf"
        self._spawn(kind, [SYSTEM_PYTHON, "-c", _LAUNCHER, str(self.etc),
                           str(conf), f"{kind}-server"])

    def _start_all(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        self._spawn("memcached", ["memcached", "-l", "127.0.0.1",
                                  "-p", str(self.ports["memcached"]), "-U", "0",
                                  "-u", getpass.getuser(), "-m", "16"])
        wait_for_port(self.ports["memcached"], deadline)
        for kind in SERVER_KINDS + ("proxy",):
            self._start_swift_server(kind)
        for kind in SERVER_KINDS + ("proxy",):
            self._wait_for_server(kind, deadline)

    def _wait_for_server(self, kind: str, deadline: float) -> None:
        try:
            wait_for_port(self.ports[kind], deadline)
        except TimeoutError:
            output = (self.root / f"{kind}.out").read_text(errors="replace")
            raise RuntimeError(f"swift {kind} server did not start:\n{output}")

    def authenticate(self) -> None:
        """Fetch a fresh tempauth token and storage URL."""
        response = requests.get(self.auth_url, timeout=5, headers={
            "X-Auth-User": AUTH_USER, "X-Auth-Key": AUTH_KEY})
        response.raise_for_status()
        self.token = response.headers["X-Auth-Token"]
        self.storage_url = response.headers["X-Storage-Url"]

    def _wait_until_writable(self, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.authenticate()
                url = self.storage_url + "/startup-probe"
                headers = {"X-Auth-Token": self.token}
                requests.put(url, headers=headers, timeout=5).raise_for_status()
                requests.put(url + "/probe", data=b"ok", headers=headers,
                             timeout=5).raise_for_status()
                requests.delete(url + "/probe", headers=headers, timeout=5)
                requests.delete(url, headers=headers, timeout=5)
                return
            except (requests.RequestException, KeyError) as error:
                last_error = error
                time.sleep(0.3)
        raise TimeoutError(f"swift never accepted a PUT: {last_error}")

    def stop_proxy(self) -> None:
        """Stop only the proxy server: clients now get connection refused."""
        self._stop_process("proxy")

    def start_proxy(self) -> None:
        """Restart the proxy server stopped by :meth:`stop_proxy`."""
        self._start_swift_server("proxy")
        self._wait_for_server("proxy", time.monotonic() + START_TIMEOUT)

    def _stop_process(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop every process this server started (by pid) and delete its files."""
        for name in list(self.processes):
            self._stop_process(name)
        shutil.rmtree(self.root, ignore_errors=True)


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    server: "_FrontServer"

    def _forward(self) -> None:
        front = self.server.front
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # /v1/<account>/<container>/<object>: only object PUTs follow the plan.
        is_object_put = self.command == "PUT" and self.path.count("/") >= 4
        step = front.next_step() if is_object_put else PASS
        if step == FAIL_AFTER_BODY:
            front.record(step, self.path)
            return self._answer(503, {}, b"")
        if step == HOLD_REQUEST:
            front.record(step, self.path)
            front.released.wait(60)
            return  # never forwarded: the store never saw it
        upstream = http.client.HTTPConnection("127.0.0.1", front.swift.ports["proxy"], timeout=30)
        try:
            headers = {key: value for key, value in self.headers.items()
                       if key.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            answer = response.read()
            status, reply_headers = response.status, dict(response.getheaders())
        finally:
            upstream.close()
        front.record(step, self.path, status)
        if step == HOLD_ANSWER:
            front.released.wait(60)
        if step == FAIL_AFTER_STORING:
            status, answer = 503, b""
        self._answer(status, reply_headers, answer)

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        with contextlib.suppress(OSError):  # a killed client is gone
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() not in ("connection", "transfer-encoding", "content-length",
                                       "date", "server"):
                    self.send_header(key, value)
            length = headers.get("Content-Length", str(len(body))) if self.command == "HEAD" \
                else str(len(body))
            self.send_header("Content-Length", length)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


class _FrontServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    front: "SwiftFront"


PASS = "pass"
HOLD_ANSWER = "hold-answer"          # forwarded (Swift keeps the object), answer held
HOLD_REQUEST = "hold-request"        # body read, held, never forwarded
FAIL_AFTER_BODY = "fail-after-body"  # body read, 503, never forwarded
FAIL_AFTER_STORING = "fail-after-storing"  # forwarded (Swift keeps it), then 503


class SwiftFront:
    """An object store that misbehaves on cue: an HTTP front on 127.0.0.1 for the test
    Swift, forwarding every request, except that object PUTs follow `plan` (one step
    each, then PASS). `events` gets (step, path, Swift's status or None) per object PUT
    handled; held requests and answers wait for `release()`."""

    def __init__(self, swift: SwiftServer) -> None:
        self.swift = swift
        self.plan: list[str] = []
        self.events: list[tuple[str, str, int | None]] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._server = _FrontServer(("127.0.0.1", free_port(set())), _FrontHandler)
        self._server.front = self
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        """The test Swift's storage URL, through this front."""
        path = self.swift.endpoint.split("/", 3)[3]
        return f"http://127.0.0.1:{self._server.server_address[1]}/{path}"

    def next_step(self) -> str:
        with self._lock:
            return self.plan.pop(0) if self.plan else PASS

    def record(self, step: str, path: str, status: int | None = None) -> None:
        with self._lock:
            self.events.append((step, path, status))

    def wait_for(self, step: str, timeout: float = 30.0) -> tuple[str, str, int | None]:
        """The first event of `step`, once it happened (for HOLD_ANSWER: Swift answered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [event for event in self.events if event[0] == step]
            if found:
                return found[0]
            time.sleep(0.02)
        raise TimeoutError(f"no object PUT reached step {step} within {timeout:g} s")

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


def container_lines(swift: SwiftServer, container: str, prefix: str) -> dict[str, list[bytes]]:
    """Every object under `prefix` in `container`, gunzipped: name -> its lines."""
    import swiftclient.client

    connection = swiftclient.client.Connection(
        preauthurl=swift.endpoint, preauthtoken=swift.token, retries=0, timeout=10)
    try:
        _headers, listing = connection.get_container(container, prefix=prefix, full_listing=True)
        return {item["name"]: gzip.decompress(connection.get_object(container, item["name"])[1])
                .splitlines() for item in listing}
    finally:
        connection.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    started = time.monotonic()
    swift = SwiftServer.start()
    try:
        print("started in %.1fs: %s" % (time.monotonic() - started, swift.endpoint))
    finally:
        swift.stop()
