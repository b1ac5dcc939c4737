"""Which reload failures are retried: only those another attempt can cure.

The fakes stand in for HAProxy's master CLI (unit tests may use fakes; the real master
is exercised in tests/integration/test_faults.py). What is asserted is how many attempts
were made and what was raised, never how long it took.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from libra_worker.drivers.haproxy import sockets
from libra_worker.drivers.haproxy.process import HAProxyProcess, ReloadUnsettled
from libra_worker.errors import ActionTimeout, ReloadFailed


def haproxy(tmp_path: Path) -> HAProxyProcess:
    return HAProxyProcess(
        binary="/usr/sbin/haproxy", config_file=tmp_path / "haproxy.cfg",
        pid_file=tmp_path / "haproxy.pid", master_socket=tmp_path / "master.sock",
        reload_attempts=3, reload_retry_wait=0,
    )


class Attempts:
    """A `_reload_once` that raises each of `failures` in turn, then succeeds."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        if self.failures:
            raise self.failures.pop(0)


@pytest.mark.parametrize("failure", [
    ReloadUnsettled("no new worker yet"),
    ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    FileNotFoundError(errno.ENOENT, "No such file or directory"),
])
def test_a_transient_failure_is_retried(tmp_path, monkeypatch, failure):
    target = haproxy(tmp_path)
    attempts = Attempts(failure, failure)
    monkeypatch.setattr(target, "_reload_once", attempts)

    target.reload()

    assert attempts.count == 3


def test_a_transient_failure_on_every_attempt_fails_after_the_last(tmp_path, monkeypatch):
    target = haproxy(tmp_path)
    attempts = Attempts(*[ReloadUnsettled("no new worker")] * 5)
    monkeypatch.setattr(target, "_reload_once", attempts)

    with pytest.raises(ReloadFailed, match="after 3 attempts"):
        target.reload()
    assert attempts.count == 3


def test_the_jobs_timeout_is_never_swallowed(tmp_path, monkeypatch):
    target = haproxy(tmp_path)
    attempts = Attempts(ActionTimeout("UPDATE did not finish within its 2 s timeout."))
    monkeypatch.setattr(target, "_reload_once", attempts)

    with pytest.raises(ActionTimeout, match="UPDATE did not finish"):
        target.reload()
    assert attempts.count == 1


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.ENOTSOCK, errno.ENOTDIR])
def test_an_error_no_retry_can_cure_fails_at_once(tmp_path, monkeypatch, code):
    target = haproxy(tmp_path)
    attempts = Attempts(OSError(code, "refused for good"))
    monkeypatch.setattr(target, "_reload_once", attempts)

    with pytest.raises(ReloadFailed, match="retrying cannot help"):
        target.reload()
    assert attempts.count == 1


def test_the_socket_retry_gives_up_at_once_on_a_permanent_error(tmp_path, monkeypatch):
    # A path through a regular file: ENOTDIR on every try, which would last to the deadline.
    blocker = tmp_path / "file"
    blocker.write_text("")
    calls = []
    real = sockets.send_command

    def counting(path, command, timeout=5.0):
        calls.append(path)
        return real(path, command, timeout)

    monkeypatch.setattr(sockets, "send_command", counting)
    with pytest.raises(NotADirectoryError):
        sockets.send_command_retrying(blocker / "master.sock", "show proc", time.monotonic() + 3600)
    assert len(calls) == 1


def test_the_socket_retry_rides_out_a_refused_connection_until_the_deadline(tmp_path, monkeypatch):
    calls = []

    def refused(path, command, timeout=5.0):
        calls.append(path)
        if len(calls) < 4:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return "answer"

    monkeypatch.setattr(sockets, "send_command", refused)
    assert sockets.send_command_retrying(tmp_path / "m.sock", "show proc", time.monotonic() + 3600) == "answer"
    assert len(calls) == 4


def test_request_reload_sends_one_reload_and_does_not_wait(tmp_path):
    target = haproxy(tmp_path)
    received = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(target.master_socket))
        server.listen(1)

        def answer_once():
            connection, _ = server.accept()
            with connection:
                received.append(connection.recv(100))

        thread = threading.Thread(target=answer_once)
        thread.start()
        target.request_reload()
        thread.join(5)
    assert received == [b"reload\n"]


def test_a_master_killed_before_the_reload_fails_it_at_once(tmp_path, monkeypatch):
    # HAProxy killed between the UPDATE's look at it and the reload: the pid file names a
    # dead process and the master socket refuses. No retry can bring it back, and the
    # caller holds the device lock the reconciler needs to start HAProxy again.
    process = HAProxyProcess(
        binary="/usr/sbin/haproxy", config_file=tmp_path / "haproxy.cfg",
        pid_file=tmp_path / "haproxy.pid", master_socket=tmp_path / "master.sock",
        command_timeout=0.5, reload_attempts=3, reload_retry_wait=0,
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "haproxy.pid").write_text(f"{dead.pid}\n")
    asked = []

    def refused(path, command, timeout):
        asked.append(command)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(sockets, "send_command", refused)
    with pytest.raises(ReloadFailed, match="master process is not running"):
        process.reload()
    assert asked == []
