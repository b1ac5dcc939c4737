"""ARCHIVE end to end: real HAProxy -> LogSink process -> archive_logs -> real Swift.

Everything listens on 127.0.0.1 only.  Swift starts once for the module; each
test gets its own state dir, sink, HAProxy and load balancer id.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import logging
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import swiftclient.client

from libra_worker.archive import archive_logs
from libra_worker.errors import ArchiveFailed
from libra_worker.logsink import LogSink
from tests.swift_server import (HOLD_ANSWER, SwiftFront, SwiftServer, container_lines,
                                free_port, wait_for_port)

CONTAINER = "lbaaslogs"

HAPROXY_CFG = """\
global
    log {socket} len 8192 local0

defaults
    log global
    # The readiness probe's empty connection must not become an access line.
    option dontlognull
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend lb-http
    mode http
    option httplog
    bind 127.0.0.1:{http_port}
    default_backend pool-http

frontend lb-tcp
    mode tcp
    option tcplog
    bind 127.0.0.1:{tcp_port}
    default_backend pool-tcp

backend pool-http
    mode http
    server node-1 127.0.0.1:{backend_port}

backend pool-tcp
    mode tcp
    server node-1 127.0.0.1:{backend_port}
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the name http.server dispatches to
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port(set())), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@dataclass
class Balancer:
    """One HAProxy with its log sink; the ``lb_id`` is unique per test."""

    sink: LogSink
    http_port: int
    tcp_port: int
    haproxy: subprocess.Popen
    lb_id: str

    def http_request(self, path: str) -> None:
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=5) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: lb\r\n\r\n".encode())
            assert b" 200 " in _read_all(conn)

    def tcp_connection(self, path: str) -> None:
        with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=5) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            assert b" 200 " in _read_all(conn)

    def reload(self) -> None:
        self.haproxy.send_signal(signal.SIGUSR2)

    def stored_lines(self, protocol: str) -> list[bytes]:
        store = self.sink.store
        paths = [*store.pending_paths(protocol), store.active_path(protocol)]
        return [line for path in paths if path.exists()
                for line in path.read_bytes().splitlines()]

    def wait_for_lines(self, protocol: str, count: int, timeout: float = 5.0) -> None:
        """HAProxy logs after the response; wait until the sink wrote them."""
        deadline = time.monotonic() + timeout
        while len(self.stored_lines(protocol)) < count:
            assert time.monotonic() < deadline, self.stored_lines(protocol)
            time.sleep(0.02)

    def archive(self, swift: SwiftServer, protocol: str, token: str | None = None,
                endpoint: str | None = None) -> dict:
        return archive_logs(self.sink.state_dir, protocol=protocol, lb_id=self.lb_id,
                            basepath=CONTAINER, endpoint=endpoint or swift.endpoint,
                            token=token or swift.token)


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _start_haproxy(config: Path, http_port: int) -> subprocess.Popen:
    check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True,
                           text=True, timeout=10)
    assert check.returncode == 0, check.stdout + check.stderr
    # -W master-worker as in production; -db keeps the master in the foreground
    # so its pid is ours to signal.
    process = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(config)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_port(http_port, time.monotonic() + 10)
    return process


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def balancer(request: pytest.FixtureRequest, tmp_path: Path,
             backend_port: int) -> Iterator[Balancer]:
    max_bytes = getattr(request, "param", 1024 * 1024)
    sink = LogSink(tmp_path / "state", max_bytes=max_bytes)
    sink.ensure_running()
    taken: set[int] = {backend_port}
    http_port, tcp_port = free_port(taken), free_port(taken)
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(socket=sink.socket_path, http_port=http_port,
                                         tcp_port=tcp_port, backend_port=backend_port))
    haproxy = _start_haproxy(config, http_port)
    try:
        yield Balancer(sink, http_port, tcp_port, haproxy, uuid.uuid4().hex[:12])
    finally:
        _stop(haproxy)
        sink.stop()


def download(swift: SwiftServer, result: dict) -> list[bytes]:
    container, name = result["object"].split("/", 1)
    connection = swiftclient.client.Connection(
        preauthurl=swift.endpoint, preauthtoken=swift.token, retries=0, timeout=10)
    try:
        headers, body = connection.get_object(container, name)
    finally:
        connection.close()
    return gzip.decompress(body).splitlines()


def requested_paths(lines: list[bytes]) -> list[str]:
    assert all(b"\"GET " in line for line in lines), lines
    return [line.split(b'"GET ')[1].split(b" ")[0].decode() for line in lines]


def shipped_paths(swift: SwiftServer, balancer: Balancer) -> list[str]:
    """The requested paths of every object of the balancer, objects in name order."""
    objects = container_lines(swift, CONTAINER, balancer.lb_id + "/")
    return [path for name in sorted(objects) for path in requested_paths(objects[name])]


def assert_no_temp_files(balancer: Balancer) -> None:
    names = [path.name for path in balancer.sink.log_dir.iterdir()]
    assert not [name for name in names if name.startswith(".") or "tmp" in name], names
    assert not [path for path in balancer.sink.state_dir.iterdir()
                if path.name != "logs"]


def test_each_protocol_ships_its_own_lines_exactly_once(
        swift: SwiftServer, balancer: Balancer) -> None:
    for number in range(3):
        balancer.http_request(f"/http-{number}")
    balancer.tcp_connection("/tcp-0")
    balancer.tcp_connection("/tcp-1")
    balancer.wait_for_lines("http", 3)
    balancer.wait_for_lines("tcp", 2)

    http_result = balancer.archive(swift, "HTTP")
    http_lines = download(swift, http_result)
    assert requested_paths(http_lines) == ["/http-0", "/http-1", "/http-2"]
    assert all(b"] lb-http pool-http/node-1 " in line for line in http_lines)
    assert not http_lines[0].startswith(b"<")
    assert http_result["lines"] == 3 and http_result["dropped"] == 0

    tcp_result = balancer.archive(swift, "TCP")
    tcp_lines = download(swift, tcp_result)
    assert len(tcp_lines) == 2 and tcp_result["lines"] == 2
    assert all(b"] lb-tcp pool-tcp/node-1 " in line for line in tcp_lines)

    balancer.http_request("/http-3")
    balancer.wait_for_lines("http", 1)
    newer = balancer.archive(swift, "HTTP")
    assert newer["object"] != http_result["object"]
    assert requested_paths(download(swift, newer)) == ["/http-3"]
    with pytest.raises(ArchiveFailed, match="no new TCP log lines"):
        balancer.archive(swift, "TCP")
    assert_no_temp_files(balancer)


def test_wrong_token_fails_and_loses_nothing(swift: SwiftServer,
                                             balancer: Balancer) -> None:
    balancer.http_request("/before")
    balancer.wait_for_lines("http", 1)
    bad_token = "AUTH_tk" + "0" * 32
    with pytest.raises(ArchiveFailed, match="authorization") as failure:
        balancer.archive(swift, "HTTP", token=bad_token)
    assert bad_token not in str(failure.value)

    balancer.http_request("/after")
    balancer.wait_for_lines("http", 2)
    result = balancer.archive(swift, "HTTP")
    assert len(result["objects"]) == 2  # the lines set aside by the failed ARCHIVE, the newer
    assert shipped_paths(swift, balancer) == ["/before", "/after"]
    assert_no_temp_files(balancer)


def test_unreachable_swift_fails_fast_and_retries_later(
        swift: SwiftServer, balancer: Balancer) -> None:
    balancer.http_request("/during-outage")
    balancer.wait_for_lines("http", 1)
    swift.stop_proxy()
    try:
        started = time.monotonic()
        with pytest.raises(ArchiveFailed, match="Could not reach") as failure:
            balancer.archive(swift, "HTTP")
        assert time.monotonic() - started < 15
        assert swift.token not in str(failure.value)
    finally:
        swift.start_proxy()
    balancer.http_request("/after-outage")
    balancer.wait_for_lines("http", 2)
    balancer.archive(swift, "HTTP")
    assert shipped_paths(swift, balancer) == ["/during-outage", "/after-outage"]
    assert_no_temp_files(balancer)


def test_token_never_reaches_the_logs(swift: SwiftServer, balancer: Balancer,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    balancer.http_request("/logged")
    balancer.wait_for_lines("http", 1)
    balancer.archive(swift, "HTTP")
    balancer.http_request("/logged-again")
    balancer.wait_for_lines("http", 1)
    with pytest.raises(ArchiveFailed):
        balancer.archive(swift, "HTTP", endpoint=swift.endpoint + "-missing-account")
    assert any(record.name == "swiftclient" for record in caplog.records)
    assert swift.token not in caplog.text
    assert swift.token[:16] not in caplog.text


@pytest.mark.parametrize("balancer", [2000], indirect=True)
def test_size_cap_counts_dropped_lines(swift: SwiftServer, balancer: Balancer) -> None:
    for number in range(20):
        balancer.http_request(f"/flood-{number}")
    store = balancer.sink.store

    def accounted() -> int:
        return len(balancer.stored_lines("http")) + store.dropped_total("http")

    deadline = time.monotonic() + 5
    while accounted() < 20:
        assert time.monotonic() < deadline, accounted()
        time.sleep(0.05)
    assert store.stored_bytes("http") <= 2000

    result = balancer.archive(swift, "HTTP")
    assert result["dropped"] > 0
    assert result["lines"] + result["dropped"] == 20
    assert requested_paths(download(swift, result)) == [
        f"/flood-{number}" for number in range(result["lines"])]

    balancer.http_request("/after-archive")
    balancer.wait_for_lines("http", 1)
    later = balancer.archive(swift, "HTTP")
    assert (later["lines"], later["dropped"]) == (1, 0)


def test_collection_survives_haproxy_reload_and_sink_restart(
        swift: SwiftServer, balancer: Balancer) -> None:
    balancer.http_request("/before-reload")
    balancer.reload()
    time.sleep(0.5)
    balancer.http_request("/after-reload")
    balancer.wait_for_lines("http", 2)
    balancer.sink.stop()
    balancer.sink.ensure_running()
    balancer.http_request("/after-sink-restart")
    balancer.wait_for_lines("http", 3)
    result = balancer.archive(swift, "HTTP")
    assert requested_paths(download(swift, result)) == [
        "/before-reload", "/after-reload", "/after-sink-restart"]


def test_an_upload_whose_answer_never_came_is_not_shipped_again(
        swift: SwiftServer, balancer: Balancer) -> None:
    """Swift keeps the object, its 201 is held past the ARCHIVE's timeout: the next
    ARCHIVE finds it under the same name (412, HEAD) and ships only the newer lines."""
    connection = swiftclient.client.Connection(
        preauthurl=swift.endpoint, preauthtoken=swift.token, retries=0, timeout=10)
    connection.put_container(CONTAINER)
    front = SwiftFront(swift)
    try:
        balancer.http_request("/held")
        balancer.wait_for_lines("http", 1)
        front.plan = [HOLD_ANSWER]
        with pytest.raises(ArchiveFailed, match="Could not reach"):
            archive_logs(balancer.sink.state_dir, protocol="HTTP", lb_id=balancer.lb_id,
                         basepath=CONTAINER, endpoint=front.endpoint, token=swift.token,
                         timeout=2)
        assert front.wait_for(HOLD_ANSWER)[2] == 201
    finally:
        front.close()
    balancer.http_request("/newer")
    balancer.wait_for_lines("http", 2)

    result = balancer.archive(swift, "HTTP")

    objects = container_lines(swift, CONTAINER, balancer.lb_id + "/")
    assert [requested_paths(objects[name]) for name in sorted(objects)] == [["/held"], ["/newer"]]
    assert [f"{CONTAINER}/{name}" for name in sorted(objects)] == result["objects"]
    try:
        headers = connection.head_object(CONTAINER, result["object"].split("/", 1)[1])
    finally:
        connection.close()
    assert headers["x-object-meta-lines-md5"] == hashlib.md5(b"".join(
        line + b"\n" for line in objects[result["object"].split("/", 1)[1]])).hexdigest()
    assert_no_temp_files(balancer)
