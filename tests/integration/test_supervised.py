"""`[haproxy] supervisor = systemd`, outside systemd: HAProxy and the log sink started the
way their units start them (the units' own commands, the sink on a socket handed over by
systemd's `systemd-socket-activate`), each a child of this test, the worker beside them.

The worker must never start, stop or signal either process: SUSPEND and DELETE leave
HAProxy running idle, ENABLE and UPDATE reload it through its master CLI, and whatever
happens to the worker, the load balancer keeps serving. The same units under a real
systemd are tests/system.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from libra_worker.drivers.haproxy.process import find_binary
from libra_worker.logsink import LogSink
from tests.integration.support import (
    REPO_ROOT,
    TrafficLoop,
    Worker,
    WorkerFactory,
    connection_refused,
    lb,
    stop_child,
    traffic,
    update,
    wait_until,
)

SUPERVISED = {"haproxy": {"supervisor": "systemd"}}


class Units:
    """What libra-haproxy.service and libra-logsink.socket/.service run, as children."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.sink: subprocess.Popen[bytes] | None = None

    def ctl(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "libra_worker.cli", "ctl", "--config",
                str(self.worker.config_path), *arguments]

    def start_sink(self) -> None:
        socket_path = LogSink(self.worker.state_dir).socket_path
        socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sink = subprocess.Popen(
            [shutil.which("systemd-socket-activate") or "systemd-socket-activate",
             "--datagram", "-l", str(socket_path), *self.ctl("logsink")],
            cwd=REPO_ROOT, env=self.worker.environment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(socket_path.exists, 10, "the sink's socket")

    def start_haproxy(self) -> None:
        """ExecStartPre (ctl haproxy-config), then ExecStart in the foreground (-Ws)."""
        subprocess.run(self.ctl("haproxy-config"), cwd=REPO_ROOT, env=self.worker.environment(),
                       check=True, capture_output=True, timeout=60)
        files = self.worker.state_dir
        self.haproxy = subprocess.Popen(
            [find_binary(), "-Ws", "-f", str(files / "haproxy.cfg"),
             "-p", str(files / "haproxy.pid"), "-S", f"{files / 'haproxy-master.sock'},mode,600"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.worker.haproxy.is_running(), 10, "HAProxy's master")

    def stop(self) -> None:
        for process in (self.haproxy, self.sink):
            stop_child(process)


@pytest.fixture
def units(worker_factory: WorkerFactory) -> Iterator[Units]:
    worker = worker_factory(start=False, settings=SUPERVISED)
    worker.state_dir.mkdir(mode=0o750)
    started = Units(worker)
    try:
        started.start_sink()
        started.start_haproxy()
        worker.start()
        yield started
    finally:
        stop_child(worker.process)
        started.stop()


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


def test_haproxy_starts_idle_and_every_action_reloads_the_same_master(units, http_backend, free_port):
    worker = units.worker
    master = worker.haproxy.master_pid()
    assert "\nfrontend " not in worker.haproxy_config()  # no load balancer yet: no listener
    backend = http_backend("node-a")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [backend.node()])))["hpcs_response"] == "PASS"
    assert traffic(url(port), 5) == ({"node-a": 5}, 0)

    assert worker.submit("SUSPEND")["hpcs_response"] == "PASS"
    assert connection_refused(port)
    assert worker.haproxy.master_pid() == master
    stats = worker.submit("STATS")
    assert (stats["hpcs_response"], stats["status"]) == ("FAIL", "SUSPENDED")
    # An UPDATE while suspended is checked and kept; nothing listens until ENABLE.
    second = http_backend("node-b")
    assert worker.submit(update(lb("HTTP", port, [second.node()])))["hpcs_response"] == "PASS"
    assert connection_refused(port)

    assert worker.submit("ENABLE")["hpcs_response"] == "PASS"
    assert traffic(url(port), 4) == ({"node-b": 4}, 0)
    assert worker.submit("DELETE")["hpcs_response"] == "PASS"
    assert connection_refused(port)
    assert "\nfrontend " not in worker.haproxy_config()
    assert worker.haproxy.master_pid() == master == units.haproxy.pid
    assert units.sink.poll() is None, "DELETE stopped the sink of libra-logsink.service"

    # After DELETE the device is built again on the same HAProxy.
    assert worker.submit(update(lb("HTTP", port, [backend.node()])))["hpcs_response"] == "PASS"
    assert traffic(url(port), 3) == ({"node-a": 3}, 0)


def test_the_load_balancer_keeps_serving_while_the_worker_is_killed_and_restarted(
        units, http_backend, free_port):
    worker = units.worker
    backend = http_backend("node-a")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [backend.node()])))["hpcs_response"] == "PASS"
    master = worker.haproxy.master_pid()
    with TrafficLoop(url(port)) as loop:
        worker.kill()
        served = loop.total
        wait_until(lambda: loop.total > served + 20, 10, "traffic while the worker is dead")
        worker.start()
        assert worker.submit(update(lb("HTTP", port, [backend.node(weight=2)])))[
            "hpcs_response"] == "PASS"
        served = loop.total
        wait_until(lambda: loop.total > served + 20, 10, "traffic after the restart")
    assert loop.errors == []
    assert worker.haproxy.master_pid() == master
    assert units.sink.poll() is None


def test_a_restarted_haproxy_is_noticed_not_restarted_and_serves_the_last_update(
        units, http_backend, free_port):
    """libra-haproxy.service (here: the test) restarts a dead HAProxy; the worker only
    reports it (STATS restarts, last_error), and the next UPDATE reloads the new master."""
    worker = units.worker
    backend = http_backend("node-a")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [backend.node()])))["hpcs_response"] == "PASS"
    worker.kill_haproxy()
    stop_child(units.haproxy)
    wait_until(lambda: connection_refused(port), 5, "the dead HAProxy's port to close")
    # The worker's reconciler does not bring it back: that is the unit's job.
    assert worker.haproxy.master_pid() is None
    units.start_haproxy()
    assert traffic(url(port), 3) == ({"node-a": 3}, 0)
    wait_until(lambda: worker.submit("STATS").get("restarts") == 1, 10, "the restart in STATS")
    assert "libra-haproxy.service" in worker.submit("STATS")["last_error"]
    assert worker.submit(update(lb("HTTP", port, [backend.node(), http_backend("node-b").node()])))[
        "hpcs_response"] == "PASS"
    assert set(traffic(url(port), 6)[0]) == {"node-a", "node-b"}


def test_haproxy_config_puts_back_a_torn_live_file(units, http_backend, free_port):
    """A power cut can leave haproxy.cfg torn (it is not fsynced; state.json is the commit
    point): the unit's ExecStartPre renders it again before HAProxy starts."""
    worker = units.worker
    backend = http_backend("node-a")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [backend.node()])))["hpcs_response"] == "PASS"
    expected = worker.haproxy_config()
    stop_child(worker.process)
    stop_child(units.haproxy)
    live = Path(worker.state_dir / "haproxy.cfg")
    live.write_text(expected[: len(expected) // 2])
    units.start_haproxy()
    # The same text, the HTTP cookie key included: ctl reads the worker's cookie.key.
    assert worker.haproxy_config() == expected and "dynamic-cookie-key " in expected
    assert traffic(url(port), 3) == ({"node-a": 3}, 0)


def test_haproxy_config_leaves_the_file_to_a_worker_that_holds_the_lock(units):
    """A worker changing the configuration holds the driver's lock; the unit's
    ExecStartPre (`-`: its failure is tolerated) gives up after a few seconds instead of
    waiting for a worker that may itself wait for HAProxy."""
    lock = os.open(units.worker.state_dir / "driver.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(units.ctl("haproxy-config"), cwd=REPO_ROOT,
                                env=units.worker.environment(), capture_output=True, text=True,
                                timeout=60)
    finally:
        os.close(lock)
    assert result.returncode == 1
    assert "stayed locked" in result.stderr and result.stderr.count("\n") == 1, result.stderr
