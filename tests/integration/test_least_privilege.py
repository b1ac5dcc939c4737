"""Least privilege on disk and in ARCHIVE: what the real worker leaves behind it.

A real worker, through real gearmand, runs the jobs of a device's ordinary life (UPDATE,
traffic, STATS, a failed and a successful ARCHIVE to the real test Swift, SUSPEND,
ENABLE); then the test walks its state dir and reads every file in it, and the worker's
log. ARCHIVE's allow-list is proven with a listening socket that must see no connection.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from tests.integration.support import (
    LOOPBACK,
    HTTPBackend,
    Worker,
    free_port,
    lb,
    request_once,
    update,
    wait_until,
)
from tests.swift_server import SwiftServer

CONTAINER = "privlogs"
# Files holding the device's configuration, state, journal or tenant access logs.
PRIVATE_FILES = ("state.json", "jobs.journal", "haproxy.cfg", "cookie.key", "logs/http.log",
                 "logs/haproxy-events.log")
OWNER_ONLY_SOCKETS = ("haproxy-stats.sock", "haproxy-master.sock", "logs/haproxy.sock")
# Written 0644 by HAProxy and python-daemon; harmless, and unreachable inside state_dir.
PUBLIC_PID_FILES = ("haproxy.pid", "worker.pid")


def archive_message(swift: SwiftServer, lb_id: str, token: str | None = None,
                    endpoint: str | None = None) -> dict[str, Any]:
    return {
        "hpcs_action": "ARCHIVE",
        "hpcs_object_store_type": "swift",
        "hpcs_object_store_basepath": CONTAINER,
        "hpcs_object_store_endpoint": endpoint or swift.endpoint,
        "hpcs_object_store_token": token or swift.token,
        "loadBalancers": [{"id": lb_id, "protocol": "HTTP"}],
    }


def outcome(reply: dict[str, Any], expected: str) -> dict[str, Any]:
    assert reply["hpcs_response"] == expected, reply
    return reply


class Device:
    """A worker serving one HTTP load balancer whose access lines can be made on demand."""

    def __init__(self, worker: Worker, web: HTTPBackend) -> None:
        self.worker = worker
        self.web = web
        self.port = free_port()
        self.lb_id = "lp-" + uuid.uuid4().hex[:8]
        outcome(worker.submit(update(lb("HTTP", self.port, [web.node()], id=self.lb_id))), "PASS")

    def requests(self, count: int) -> None:
        log = self.worker.state_dir / "logs" / "http.log"
        before = len(log.read_bytes().splitlines()) if log.exists() else 0
        for number in range(count):
            assert request_once(f"http://{LOOPBACK}:{self.port}/lp-{number}") == self.web.name
        wait_until(lambda: log.exists() and len(log.read_bytes().splitlines()) >= before + count,
                   10, f"{count} access lines")


@pytest.fixture
def device(worker_factory, http_backend) -> Device:
    return Device(worker_factory(log_level="DEBUG"), http_backend("lp-web"))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_modes_after_a_devices_ordinary_life(device, swift):
    worker = device.worker
    device.requests(2)
    outcome(worker.submit("STATS"), "PASS")
    outcome(worker.submit(archive_message(swift, device.lb_id, token="AUTH_tk_wrong")), "FAIL")
    outcome(worker.submit(archive_message(swift, device.lb_id)), "PASS")
    device.requests(1)  # an active access log again, beside the archived one
    outcome(worker.submit("SUSPEND"), "PASS")
    outcome(worker.submit("ENABLE"), "PASS")
    outcome(worker.submit("STATS"), "PASS")

    state_dir = worker.state_dir
    assert mode_of(state_dir) & ~0o750 == 0, oct(mode_of(state_dir))
    for name in PRIVATE_FILES:
        assert mode_of(state_dir / name) & ~0o640 == 0, (name, oct(mode_of(state_dir / name)))
    for name in OWNER_ONLY_SOCKETS:
        path = state_dir / name
        assert stat.S_ISSOCK(path.lstat().st_mode), name
        assert mode_of(path) == 0o600, (name, oct(mode_of(path)))
        assert path.lstat().st_uid == os.getuid(), name
    walked = [state_dir, *state_dir.rglob("*")]
    assert len(walked) > 10
    for path in walked:
        info = path.lstat()
        assert not info.st_mode & stat.S_IWOTH, f"{path} is world-writable"
        assert info.st_uid == os.getuid(), f"{path} belongs to uid {info.st_uid}"
        if stat.S_ISDIR(info.st_mode):
            assert mode_of(path) & ~0o750 == 0, (path, oct(mode_of(path)))
        elif path.name not in PUBLIC_PID_FILES:
            assert mode_of(path) & 0o007 == 0, f"{path} is open to others: {oct(mode_of(path))}"


def test_a_wider_state_dir_is_tightened_at_start(worker_factory):
    worker = worker_factory(start=False)
    worker.state_dir.mkdir(mode=0o777)
    os.chmod(worker.state_dir, 0o777)  # mkdir's mode is cut by the umask

    worker.start()

    assert mode_of(worker.state_dir) == 0o750


def test_the_swift_token_never_reaches_disk(device, swift):
    """After an ARCHIVE that failed (the right token, a wrong account) and one that
    succeeded, no file in the state dir and no line of the worker's log holds the token."""
    worker = device.worker
    device.requests(1)
    failed = worker.submit(archive_message(swift, device.lb_id,
                                           endpoint=swift.endpoint + "-missing-account"))
    assert outcome(failed, "FAIL")["hpcs_error"] and swift.token not in failed["hpcs_error"]
    outcome(worker.submit(archive_message(swift, device.lb_id)), "PASS")

    token = swift.token.encode()
    assert len(token) >= 16
    files = [path for path in worker.state_dir.rglob("*") if path.is_file()]
    assert {"jobs.journal", "state.json", "haproxy.cfg"} <= {path.name for path in files}
    for path in [*files, worker.log_file]:
        content = path.read_bytes()
        assert token not in content and token[:16] not in content, path
    log = worker.log_text()
    assert "ARCHIVE" in log and "DEBUG" in log, "the log did not record the archive at DEBUG"


# --------------------------------------------------------------------------- allow-list


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket on a loopback port; any connection attempt stays pending on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((LOOPBACK, free_port()))
        server.listen(8)
        yield server


def saw_a_connection(server: socket.socket, wait: float = 0.5) -> bool:
    readable, _, _ = select.select([server], [], [], wait)
    if readable:
        server.accept()[0].close()
    return bool(readable)


def test_the_listener_would_see_a_connection(listener):
    # The check below can fail: a connection to the listener is seen.
    with socket.create_connection(listener.getsockname(), timeout=2):
        assert saw_a_connection(listener)
    assert not saw_a_connection(listener, wait=0.1)


def test_archive_uploads_only_to_allowed_endpoints(worker_factory, http_backend, swift, listener):
    worker = worker_factory(settings={"archive": {"allowed_endpoints": swift.endpoint}})
    device = Device(worker, http_backend("allow-web"))
    device.requests(1)
    port = listener.getsockname()[1]
    # The same host and path as the allowed endpoint, on another port.
    elsewhere = urlsplit(swift.endpoint)._replace(netloc=f"{LOOPBACK}:{port}").geturl()

    refused = outcome(worker.submit(archive_message(swift, device.lb_id, endpoint=elsewhere)), "FAIL")

    assert "[archive] allowed_endpoints" in refused["hpcs_error"], refused
    assert not saw_a_connection(listener)
    # The allowed endpoint still works, and shipped the line the refused ARCHIVE kept.
    shipped = outcome(worker.submit(archive_message(swift, device.lb_id)), "PASS")
    assert shipped["archive"]["lines"] == 1


def test_archive_refuses_plain_http_unless_allowed(worker_factory, http_backend, swift, listener):
    worker = worker_factory(settings={"archive": {"allow_plain_http": "false"}})
    device = Device(worker, http_backend("https-web"))
    device.requests(1)
    port = listener.getsockname()[1]

    refused = outcome(worker.submit(archive_message(
        swift, device.lb_id, endpoint=f"http://{LOOPBACK}:{port}/v1/AUTH_test")), "FAIL")

    assert "allow_plain_http" in refused["hpcs_error"], refused
    assert not saw_a_connection(listener)
