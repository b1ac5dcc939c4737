"""Unit tests for libra_worker.diagnostics with small loopback servers standing in for gearmand."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable, Iterator

import pytest

from libra_worker.config import DiagnosticsSettings
from libra_worker.diagnostics import Diagnostics, gearman_echo, tcp_connect

HEADER = struct.Struct(">4sII")


@pytest.fixture
def answering_server() -> Iterator[Callable[[Callable[[bytes], bytes]], int]]:
    """`answering_server(answer)` -> a port whose server replies `answer(request)` once."""
    listeners: list[socket.socket] = []

    def start(answer: Callable[[bytes], bytes]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                magic, kind, size = HEADER.unpack(connection.recv(HEADER.size, socket.MSG_WAITALL))
                payload = connection.recv(size, socket.MSG_WAITALL)
                connection.sendall(answer(HEADER.pack(magic, kind, size) + payload))

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        listener.close()


def echo_response(request: bytes) -> bytes:
    magic, kind, size = HEADER.unpack(request[:HEADER.size])
    assert (magic, kind) == (b"\0REQ", 16)
    return HEADER.pack(b"\0RES", 17, size) + request[HEADER.size:]


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return listener.getsockname()[1]


def test_echo_passes_when_the_same_bytes_come_back(answering_server):
    assert gearman_echo("127.0.0.1", answering_server(echo_response), timeout=5)


@pytest.mark.parametrize("answer", [
    lambda request: echo_response(request)[:-1] + b"X",  # different payload
    # another packet type (19 is ERROR) around the same payload
    lambda request: HEADER.pack(b"\0RES", 19, len(request) - HEADER.size) + request[HEADER.size:],
    lambda request: b"",  # closed without an answer
    lambda request: echo_response(request)[:10],  # cut short
])
def test_echo_fails_on_any_other_answer(answering_server, answer):
    assert not gearman_echo("127.0.0.1", answering_server(answer), timeout=5)


def test_a_closed_port_fails_both_probes():
    port = closed_port()
    assert not gearman_echo("127.0.0.1", port, timeout=5)
    assert not tcp_connect("127.0.0.1", port, timeout=5)


def test_network_target_defaults_to_the_first_job_server():
    servers = (("127.0.0.1", 4730), ("127.0.0.2", 4731))
    assert Diagnostics(servers).network_target == ("127.0.0.1", 4730)
    settings = DiagnosticsSettings(network_target=("::1", 443))
    assert Diagnostics(servers, settings).network_target == ("::1", 443)


def test_one_entry_per_job_server_in_order(answering_server):
    live = answering_server(echo_response)
    dead = closed_port()
    diagnostics = Diagnostics((("127.0.0.1", dead), ("127.0.0.1", live)),
                              DiagnosticsSettings(network_target=("::1", closed_port())))

    def health() -> None:
        raise RuntimeError("the device probe failed")

    result = diagnostics.run(health)
    assert result == {
        "network": "FAIL",
        "gearman": [{"host": "127.0.0.1", "port": dead, "status": "FAIL"},
                    {"host": "127.0.0.1", "port": live, "status": "PASS"}],
        "network_target": f"[::1]:{diagnostics.network_target[1]}",
        "device": None,
    }
    assert diagnostics.failed_fields() == {
        "network": "FAIL",
        "gearman": [{"host": "127.0.0.1", "port": dead, "status": "FAIL"},
                    {"host": "127.0.0.1", "port": live, "status": "FAIL"}],
    }
