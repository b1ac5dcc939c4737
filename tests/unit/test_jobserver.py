"""Unit tests for libra_worker.jobserver and the job-server health in transport: the TLS read
that must not spin, keepalive on every socket, timed answers, state changes logged once."""

from __future__ import annotations

import array
import contextlib
import json
import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from gearman.errors import ConnectionError as GearmanConnectionError
from gearman.errors import ProtocolError
from gearman.protocol import (
    GEARMAN_COMMAND_CAN_DO,
    GEARMAN_COMMAND_ECHO_REQ,
    GEARMAN_COMMAND_ECHO_RES,
    GEARMAN_COMMAND_GRAB_JOB_UNIQ,
    GEARMAN_COMMAND_JOB_ASSIGN,
    GEARMAN_COMMAND_JOB_ASSIGN_UNIQ,
    GEARMAN_COMMAND_NO_JOB,
    GEARMAN_COMMAND_NOOP,
    GEARMAN_COMMAND_PRE_SLEEP,
    GEARMAN_COMMAND_WORK_COMPLETE,
    pack_binary_command,
    parse_binary_command,
)

from libra_worker import transport
from libra_worker.config import GearmanSettings
from libra_worker.jobserver import JobServerConnection, open_socket
from libra_worker.messages import SNIFF_BYTES, Oversized
from libra_worker.tls import client_context
from libra_worker.transport import JobServerHealth
from tests.integration.support import free_port
from tests.tls_support import CertificateAuthority

HANG_GUARD = 10.0  # seconds; a spinning read never returns at all
NOOP_PACKET = b"\0RES" + (6).to_bytes(4, "big") + (0).to_bytes(4, "big")


class TLSServer:
    """A loopback TLS server: handshakes (TLS 1.3 sends session tickets right after), then
    sends only what the test tells it to, and ends the connection as it is told (`end`)."""

    def __init__(self, cert, key, version: ssl.TLSVersion) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = self.context.maximum_version = version
        self.context.load_cert_chain(str(cert), str(key))
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.outgoing: list[bytes] = []
        self.send_now = threading.Event()
        self.ending: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        with self.context.wrap_socket(raw, server_side=True) as connection:
            while not self.done.is_set():
                if self.send_now.wait(0.05):
                    self.send_now.clear()
                    if self.outgoing:
                        connection.sendall(self.outgoing.pop(0))
                    if self.ending:
                        self._end(connection, self.ending)
                        return

    @staticmethod
    def _end(connection: ssl.SSLSocket, how: str) -> None:
        if how == "close_notify":
            connection.setblocking(False)  # send it, do not wait for the client's
            with contextlib.suppress(ssl.SSLWantReadError):
                connection.unwrap()
            connection.close()
        elif how == "reset":  # SO_LINGER 0: an RST, as from a terminator that drops at once
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            connection.close()
        else:  # a FIN without TLS's close_notify
            connection.shutdown(socket.SHUT_RDWR)

    def send(self, data: bytes) -> None:
        self.outgoing.append(data)
        self.send_now.set()

    def end(self, how: str) -> None:
        self.ending = how
        self.send_now.set()

    def close(self) -> None:
        self.done.set()
        self.thread.join(HANG_GUARD)
        self.listener.close()


@pytest.fixture
def pki(tmp_path):
    authority = CertificateAuthority(tmp_path, "unit-ca")
    return authority, authority.issue("server"), authority.issue("client")


def settings_for(port: int, authority, issued, **extra) -> GearmanSettings:
    return GearmanSettings(servers=(("127.0.0.1", port),), function="lb-unit", ssl_ca=authority.ca,
                           ssl_cert=issued.cert, ssl_key=issued.key, **extra)


def read_in_thread(connection: JobServerConnection) -> list[object]:
    outcome: list[object] = []
    reader = threading.Thread(target=lambda: outcome.append(connection.read_data_from_socket()),
                              daemon=True)
    reader.start()
    reader.join(HANG_GUARD)
    assert not reader.is_alive(), "read_data_from_socket did not return (spinning on WANT_READ)"
    return outcome


def connected(server: TLSServer, authority: Any, client_cert: Any) -> JobServerConnection:
    """The worker's connection to `server`, TLS handshake done."""
    settings = settings_for(server.port, authority, client_cert)
    connection = JobServerConnection("127.0.0.1", server.port, settings, client_context(settings))
    connection.connect()
    return connection


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["TLSv1.3", "TLSv1.2"])
def test_a_tls_record_without_data_does_not_make_the_read_spin(pki, version):
    authority, server_cert, client_cert = pki
    server = TLSServer(server_cert.cert, server_cert.key, version)
    try:
        connection = connected(server, authority, client_cert)
        assert connection.gearman_socket.version() == version.name.replace("v1_", "v1.")
        if version is ssl.TLSVersion.TLSv1_3:
            # The session tickets make the socket readable with nothing in them for us.
            readable, _, _ = select.select([connection.gearman_socket], [], [], HANG_GUARD)
            assert readable
            assert read_in_thread(connection) == [0]
        server.send(NOOP_PACKET)
        select.select([connection.gearman_socket], [], [], HANG_GUARD)
        assert read_in_thread(connection) == [len(NOOP_PACKET)]
        assert connection.read_commands_from_buffer() == 1
        connection.close()
    finally:
        server.close()


def connection_end(server: TLSServer, connection: JobServerConnection, how: str) -> str:
    """End the server's side `how`; the error the connection's next read raises."""
    server.end(how)
    with pytest.raises(GearmanConnectionError) as lost:
        while True:  # TLS 1.3: session tickets may come first
            select.select([connection.gearman_socket], [], [], HANG_GUARD)
            connection.read_data_from_socket()
    assert not connection.connected and connection.last_error is not None
    assert str(lost.value) == f"127.0.0.1:{server.port}: {connection.last_error}"
    return connection.last_error


@pytest.mark.parametrize("how", ["close_notify", "fin", "reset"])
def test_a_tls13_session_ended_before_any_answer_is_named_a_refused_certificate(pki, how):
    """TLS 1.3: our handshake completes before the terminator checks our certificate; its
    refusal's alert can be lost, and the first read sees only the end of the session."""
    authority, server_cert, client_cert = pki
    server = TLSServer(server_cert.cert, server_cert.key, ssl.TLSVersion.TLSv1_3)
    try:
        connection = connected(server, authority, client_cert)
        assert connection_end(server, connection, how) == (
            f"TLS: the job server refused our certificate, ssl_cert {client_cert.cert} (most "
            f"likely: it ended the TLS 1.3 session right after the handshake, before any "
            f"answer, and its alert was lost)")
    finally:
        server.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["TLSv1.3", "TLSv1.2"])
def test_a_session_ended_after_an_answer_or_on_tls12_is_not_called_a_refusal(pki, version):
    """After an answer the certificate was accepted; with TLS 1.2 a refusal fails the
    handshake itself."""
    authority, server_cert, client_cert = pki
    server = TLSServer(server_cert.cert, server_cert.key, version)
    try:
        connection = connected(server, authority, client_cert)
        if version is ssl.TLSVersion.TLSv1_3:
            server.send(NOOP_PACKET)
            while not connection.answered:
                select.select([connection.gearman_socket], [], [], HANG_GUARD)
                connection.read_data_from_socket()
        assert connection_end(server, connection, "close_notify") == "the job server closed the connection"
    finally:
        server.close()


def packet(kind: int, body: bytes) -> bytes:
    return b"\0RES" + kind.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


def send_until_closed(server_side: socket.socket, stream: bytes) -> None:
    with contextlib.suppress(OSError):  # the client may end the connection first
        server_side.sendall(stream)


def commands_received(port: int, stream: bytes, max_job_bytes: int, count: int):
    """A job server on `port` sends `stream`; the first `count` commands the connection
    reads, and the most it held in its buffer at once."""
    listener = socket.create_server(("127.0.0.1", port))
    settings = GearmanSettings(servers=(("127.0.0.1", port),), function="lb-unit")
    connection = JobServerConnection("127.0.0.1", port, settings, None, max_job_bytes=max_job_bytes)
    try:
        connection.connect()
        server_side, _ = listener.accept()
        threading.Thread(target=send_until_closed, args=(server_side, stream), daemon=True).start()
        commands, most_held = [], 0
        while len(commands) < count:
            select.select([connection.gearman_socket], [], [], HANG_GUARD)
            most_held = max(most_held, connection.read_data_from_socket())
            connection.read_commands_from_buffer()
            while (command := connection.read_command()) is not None:
                commands.append(command)
        server_side.close()
        return commands, most_held
    finally:
        connection.close()
        listener.close()


def test_a_job_over_the_limit_is_drained_as_it_arrives_and_handed_on_oversized():
    data = b'{"hpcs_action": "UPDATE", "pad": "' + b"p" * 3_000_000 + b'"}'
    job = packet(GEARMAN_COMMAND_JOB_ASSIGN_UNIQ, b"H:vm:1\0lb-unit\0unique-1\0" + data)
    commands, most_held = commands_received(
        free_port(), job + packet(GEARMAN_COMMAND_NOOP, b""), max_job_bytes=100_000, count=2)
    assert commands == [
        (GEARMAN_COMMAND_JOB_ASSIGN_UNIQ, {"job_handle": b"H:vm:1", "task": b"lb-unit",
                                           "unique": b"unique-1",
                                           "data": Oversized(len(data), data[:SNIFF_BYTES])}),
        (GEARMAN_COMMAND_NOOP, {}),
    ]
    assert most_held < 100_000  # never the job whole, nor up to the limit


def test_a_job_within_the_limit_is_handed_on_whole():
    data = b"x" * 100_000
    job = packet(GEARMAN_COMMAND_JOB_ASSIGN_UNIQ, b"H:vm:2\0lb-unit\0unique-2\0" + data)
    commands, _ = commands_received(free_port(), job, max_job_bytes=100_000, count=1)
    assert commands[0][1]["data"] == data


def test_packets_are_parsed_as_pygearman_parses_them():
    stream = [packet(GEARMAN_COMMAND_NOOP, b""),
              packet(GEARMAN_COMMAND_JOB_ASSIGN_UNIQ, b"H:vm:3\0lb-unit\0u-3\0da\0ta"),
              packet(GEARMAN_COMMAND_JOB_ASSIGN, b"H:vm:4\0lb-unit\0"),
              packet(GEARMAN_COMMAND_NO_JOB, b""),
              packet(GEARMAN_COMMAND_ECHO_RES, b"probe")]
    commands, _ = commands_received(free_port(), b"".join(stream), max_job_bytes=None,
                                    count=len(stream))
    expected = []
    for raw in stream:
        kind, arguments, size = parse_binary_command(array.array("b", raw), is_response=True)
        assert size == len(raw)
        expected.append((kind, arguments))
    assert commands == expected


def test_a_packet_that_is_not_a_response_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="Malformed Magic"):
        commands_received(free_port(), b"\0REQ" + packet(GEARMAN_COMMAND_NOOP, b"")[4:],
                          max_job_bytes=None, count=1)


@pytest.mark.parametrize("kind, arguments", [
    (GEARMAN_COMMAND_GRAB_JOB_UNIQ, {}),
    (GEARMAN_COMMAND_PRE_SLEEP, {}),
    (GEARMAN_COMMAND_WORK_COMPLETE, {"job_handle": b"H:vm:5", "data": b'{"a": "\0"}'}),
    (GEARMAN_COMMAND_CAN_DO, {"task": "lb-unit"}),  # text: pygearman's own packing
    (GEARMAN_COMMAND_ECHO_REQ, {"data": b"libra-worker registered"}),
])
def test_packets_are_packed_as_pygearman_packs_them(kind, arguments):
    settings = GearmanSettings(servers=(("127.0.0.1", 1),), function="lb-unit")
    connection = JobServerConnection("127.0.0.1", 1, settings, None)
    connection._is_server_side = False
    assert connection._pack_command(kind, dict(arguments)) == pack_binary_command(
        kind, dict(arguments), is_response=False)


def test_a_null_byte_before_the_last_argument_is_refused_as_pygearman_refuses_it():
    settings = GearmanSettings(servers=(("127.0.0.1", 1),), function="lb-unit")
    connection = JobServerConnection("127.0.0.1", 1, settings, None)
    connection._is_server_side = False
    with pytest.raises(ProtocolError, match="NULL byte"):
        connection._pack_command(GEARMAN_COMMAND_WORK_COMPLETE,
                                 {"job_handle": b"H:\0", "data": b"{}"})


def test_an_oversized_packet_that_is_no_job_ends_the_connection():
    echo_res = 17
    with pytest.raises(GearmanConnectionError, match="announced a 3000000-byte packet of type 17"):
        commands_received(free_port(), packet(echo_res, b"e" * 3_000_000), max_job_bytes=100_000,
                          count=1)


def test_keepalive_and_user_timeout_on_every_socket():
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    settings = GearmanSettings(servers=(("127.0.0.1", port),), function="lb-unit",
                               keepidle=7, keepintvl=3, keepcnt=4)
    try:
        with open_socket("127.0.0.1", port, settings, None) as connection:
            assert connection.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 19000
        with open_socket("127.0.0.1", port, replace(settings, keepalive=False), None) as connection:
            assert connection.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        listener.close()


def test_health_logs_each_change_once_and_publishes_it(tmp_path, caplog, monkeypatch):
    status_file = tmp_path / "gearman.status"
    health = JobServerHealth(["a:1", "b:2"], status_file)
    caplog.set_level(logging.INFO, logger="libra_worker.transport")

    def published():
        return json.loads(status_file.read_text())["servers"]

    assert {a: s["state"] for a, s in published().items()} == {"a:1": "connecting", "b:2": "connecting"}
    health.up("a:1")
    health.down("b:2", "Connection refused")
    for _ in range(5):
        health.down("b:2", "Connection refused")
    assert published()["b:2"] == {"state": "down", "since": published()["b:2"]["since"],
                                  "error": "Connection refused"}
    monkeypatch.setattr(transport, "DOWN_REMINDER_INTERVAL", 0.0)
    health.down("b:2", "Connection refused")
    health.up("b:2")
    health.down("a:1", None)

    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["Registered at job server a:1",
                            "Job server b:2 unreachable: Connection refused; retrying"]
    assert messages[2].startswith("Job server b:2 still down after")
    assert messages[2].endswith("(7 failed attempts): Connection refused")
    assert messages[3].startswith("Job server b:2 is back after")
    assert messages[4:] == ["Job server a:1 lost: connection lost; retrying"]
    assert published()["b:2"]["state"] == "up" and published()["a:1"]["state"] == "down"


def test_a_question_counts_as_answered_once_the_answer_waits_in_the_socket():
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    settings = GearmanSettings(servers=(("127.0.0.1", port),), function="lb-unit")
    connection = JobServerConnection("127.0.0.1", port, settings, None)
    try:
        connection.connect()
        server_side, _ = listener.accept()
        assert not connection.overdue(0)  # nothing asked yet
        connection.send_command(GEARMAN_COMMAND_ECHO_REQ, {"data": b"ping"})
        assert not connection.overdue(100)
        connection.question_since -= 100  # as if asked 100 s ago, while a long job ran
        assert connection.overdue(99)

        server_side.sendall(NOOP_PACKET)
        select.select([connection.gearman_socket], [], [], HANG_GUARD)
        assert not connection.overdue(99)  # not read yet, but there
        connection.read_data_from_socket()
        assert connection.question_since is None
        server_side.close()
    finally:
        connection.close()
        listener.close()


class RecordingPoller:
    """An epoll stand-in that records what the worker asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.registered: set[int] = set()

    def register(self, fileno: int, events: int) -> None:
        if fileno in self.registered:
            raise FileExistsError(fileno)
        self.registered.add(fileno)
        self.calls.append(("register", fileno, events))

    def modify(self, fileno: int, events: int) -> None:
        self.calls.append(("modify", fileno, events))


class SameNumber:
    """A socket object that is not the one registered, under the same descriptor number."""

    def __init__(self, fileno: int) -> None:
        self._fileno = fileno

    def fileno(self) -> int:
        return self._fileno


class PolledConnection:
    """What the worker's registration reads of a connection."""

    def __init__(self, gearman_socket: Any) -> None:
        self.gearman_socket = gearman_socket
        self.pending = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self.pending


@pytest.fixture
def unit_worker(tmp_path):
    """A JobServerWorker whose job server is never connected, and its lanes."""
    from libra_worker.controller import LBaaSController
    from libra_worker.jobs import JobRunner
    from libra_worker.journal import Journal
    from libra_worker.lanes import JobLanes

    settings = GearmanSettings(servers=(("127.0.0.1", free_port()),), function="lb-unit")
    lanes = JobLanes(JobRunner(LBaaSController(driver=None), Journal(tmp_path / "jobs.journal")))
    worker = transport.JobServerWorker(settings, lanes, threading.Event())
    try:
        yield worker, lanes
    finally:
        worker.shutdown()
        lanes.close()


def test_passed_pings_are_logged_at_debug_and_counted_in_one_info_line_a_period(
        unit_worker, caplog):
    worker, _lanes = unit_worker
    caplog.set_level(logging.DEBUG, logger="libra_worker.transport")
    worker._answered += [("H:1", "DISCOVER", "PASS", 0.31), ("H:2", "STATS", "FAIL", 0.52),
                         ("H:3", "UPDATE", "PASS", 30.0), ("H:4", "STATS", "PASS", 0.94),
                         ("H:5", "INVALID", "FAIL", 0.1), ("H:6", "STATS", "PASS", 0.4)]
    worker.after_poll(True)

    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "Job H:1 DISCOVER answered PASS in 0.3 ms"),
        ("INFO", "Job H:2 STATS answered FAIL in 0.5 ms"),
        ("INFO", "Job H:3 UPDATE answered PASS in 30.0 ms"),
        ("DEBUG", "Job H:4 STATS answered PASS in 0.9 ms"),
        ("INFO", "Job H:5 INVALID answered FAIL in 0.1 ms"),
        ("DEBUG", "Job H:6 STATS answered PASS in 0.4 ms"),
    ]
    caplog.clear()
    period_end = time.monotonic() + transport.PING_SUMMARY_INTERVAL
    worker.pings.log_if_due(period_end)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "Pings passed in the last 60 s: DISCOVER 1, STATS 2; the slowest took 0.9 ms")]

    caplog.clear()  # a period without a passed ping says nothing
    worker.pings.log_if_due(period_end + transport.PING_SUMMARY_INTERVAL)
    assert caplog.records == []


def test_connections_are_registered_once_per_poller_and_modified_only_on_change(unit_worker):
    from gearman.io import READ, WRITE

    worker, lanes = unit_worker
    first, second = socket.socketpair()
    try:
        connection = PolledConnection(first)
        poller = RecordingPoller()
        worker._register_connections_with_poller({connection}, poller)
        assert poller.calls == [("register", lanes.wakeup_fd, READ), ("register", first.fileno(), READ)]

        poller.calls.clear()
        worker._register_connections_with_poller({connection}, poller)  # nothing changed
        assert poller.calls == []
        connection.pending = True
        worker._register_connections_with_poller({connection}, poller)
        connection.pending = False
        worker._register_connections_with_poller({connection}, poller)
        assert poller.calls == [("modify", first.fileno(), READ | WRITE),
                                ("modify", first.fileno(), READ)]

        # Another socket under the same descriptor number (the first one closed, a new
        # one opened) is registered anew, whatever the poller still holds for the number.
        poller.calls.clear()
        connection.gearman_socket = SameNumber(first.fileno())
        worker._register_connections_with_poller({connection}, poller)
        assert poller.calls == [("modify", first.fileno(), READ)]  # register said it exists

        # The next work() round polls with a new poller: everything is registered on it.
        fresh = RecordingPoller()
        connection.gearman_socket = first
        worker._register_connections_with_poller({connection}, fresh)
        assert fresh.calls == [("register", lanes.wakeup_fd, READ), ("register", first.fileno(), READ)]
    finally:
        first.close()
        second.close()
