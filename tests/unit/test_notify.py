"""Unit tests for libra_worker.notify: the sd_notify datagrams, progress and the watchdog.

The notify socket is a real AF_UNIX datagram socket (a path, and an abstract name); the
clock of `Progress` is a fake one, so no test depends on how fast this machine is.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from libra_worker.notify import (
    Notifier,
    Progress,
    ServiceMonitor,
    listened_socket,
    watchdog_interval,
)


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield str(tmp_path / "notify"), sock
    sock.close()


def test_ready_reaches_a_socket_path(listener):
    path, sock = listener
    Notifier(path).ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_an_abstract_socket_name_starts_with_at():
    name = f"lw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier("@" + name).send("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_no_socket_means_no_notification_and_a_gone_socket_is_not_fatal(tmp_path):
    assert not Notifier(None).send("READY=1")
    assert not Notifier(str(tmp_path / "nobody-listens")).send("READY=1")


def test_the_environment_is_taken_so_children_do_not_notify():
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
               "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    assert Notifier.from_environment(environ).address == "/run/systemd/notify"
    assert watchdog_interval(environ) == 30.0
    assert environ == {"PATH": "/bin"}


@pytest.mark.parametrize("environ", [
    {}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"},
    {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"},  # meant for another process
])
def test_no_watchdog_unless_it_is_ours(environ):
    assert watchdog_interval(dict(environ)) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(clock: FakeClock) -> Progress:
    return Progress(limit=10, reconcile_interval=1, job_limit=120, clock=clock)


def test_both_loops_moving_is_healthy():
    clock = FakeClock()
    watched = progress(clock)
    for _ in range(5):
        clock.now += 9
        watched.polled()
        watched.reconciled()
        assert watched.stalled() is None


def test_a_job_loop_without_polls_is_stalled():
    clock = FakeClock()
    watched = progress(clock)
    clock.now += 11
    watched.reconciled()
    assert "job loop" in watched.stalled()


def test_a_reconciler_without_rounds_is_stalled_after_limit_plus_interval():
    clock = FakeClock()
    watched = progress(clock)
    clock.now += 10.5
    watched.polled()
    assert watched.stalled() is None
    clock.now += 1
    watched.polled()
    assert "reconciler" in watched.stalled()
    watched.reconciler_stopped = True  # after SIGTERM only the drain matters
    assert watched.stalled() is None


def test_a_job_before_the_first_poll_counts_as_progress_for_both_loops():
    """Restoring the desired state at start-up, before the job loop runs."""
    clock = FakeClock()
    watched = progress(clock)
    with watched.job():
        clock.now += 100
        assert watched.stalled() is None
        clock.now += 21
        assert "job has been running for 121 s" in watched.stalled()


def test_once_the_loop_polls_a_job_excuses_only_the_reconciler():
    """The Gearman loop polls beside a running job: it must keep polling meanwhile."""
    clock = FakeClock()
    watched = progress(clock)
    watched.polled()
    with watched.job():
        clock.now += 50
        watched.polled()
        assert watched.stalled() is None  # the reconciler waits for the job's lock
        clock.now += 61
        assert "the job loop has made no progress" in watched.stalled()


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__("unused")
        self.sent: list[str] = []

    def send(self, *lines: str) -> bool:
        self.sent.extend(lines)
        return True


def test_the_monitor_pings_only_while_healthy_and_sends_status_on_change():
    clock = FakeClock()
    watched = progress(clock)
    notifier = RecordingNotifier()
    monitor = ServiceMonitor(notifier, watched, lambda: "serving; LB ACTIVE", 20.0, threading.Event())
    monitor.tick()
    monitor.tick()
    assert notifier.sent == ["WATCHDOG=1", "STATUS=serving; LB ACTIVE", "WATCHDOG=1"]

    notifier.sent.clear()
    clock.now += 30
    watched.polled()
    monitor.tick()
    assert notifier.sent == ["STATUS=not pinging the watchdog: the reconciler has made no progress for 30 s"]

    notifier.sent.clear()
    watched.reconciled()
    monitor.tick()
    assert notifier.sent == ["WATCHDOG=1", "STATUS=serving; LB ACTIVE"]


def test_a_failing_status_does_not_stop_the_pings():
    def broken() -> str:
        raise OSError("state.json unreadable")

    notifier = RecordingNotifier()
    ServiceMonitor(notifier, progress(FakeClock()), broken, 20.0, threading.Event()).tick()
    assert notifier.sent == ["WATCHDOG=1", "STATUS=status unavailable: state.json unreadable"]


LISTENED = """
import os, socket
from libra_worker.notify import listened_socket
sock = listened_socket()
print(sock.type == socket.SOCK_DGRAM, sock.getsockname(), "LISTEN_PID" in os.environ)
"""


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_the_socket_a_socket_unit_passes_is_taken_and_the_variables_dropped(tmp_path):
    path = str(tmp_path / "sink.sock")
    activator = subprocess.Popen(
        ["systemd-socket-activate", "--datagram", "-l", path, sys.executable, "-c", LISTENED],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2])
    try:
        # It starts the program at the first datagram, as systemd does.
        while not os.path.exists(path):
            assert activator.poll() is None, activator.communicate()
            threading.Event().wait(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"<134>a line", path)
        out, err = activator.communicate(timeout=60)
    finally:
        activator.kill()
    assert out.split() == ["True", path, "False"], err


def test_no_socket_when_the_variables_name_another_process():
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listened_socket(environ) is None
    assert environ == {}
