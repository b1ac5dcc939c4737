"""DIAGNOSTICS against a live gearmand, a dead one and blackholed ones, all on loopback.

A dead job server is a closed port (refused at once). Two kinds of blackhole: a listener
that never accepts, so the kernel completes the connect but nothing ever answers the
ECHO_REQ; and a listener whose backlog is full, so a connect gets no answer at all.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any, Iterator

import pytest

from tests.integration.support import LOOPBACK, HTTPBackend, backends, lb, update

PROMISED_SECONDS = 5.0


def passed(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["hpcs_response"] == "PASS", answer
    return answer


def libra_marks_offline_device_failed(reply: dict[str, Any]) -> bool:
    """The decision Libra's admin server takes from a DIAGNOSTICS reply (offline check)."""
    if reply["network"] == "FAIL":
        return True
    failed = sum(1 for entry in reply["gearman"] if entry["status"] == "FAIL")
    return failed > len(reply["gearman"]) / 3


@contextlib.contextmanager
def silent_listener(port: int) -> Iterator[int]:
    """Connects complete (the kernel's backlog), nothing is ever read or answered."""
    with socket.create_server((LOOPBACK, port), backlog=16):
        yield port


@contextlib.contextmanager
def full_backlog_listener(port: int) -> Iterator[int]:
    """A listener whose accept queue is full: a new connect is never answered."""
    with socket.create_server((LOOPBACK, port), backlog=0), contextlib.ExitStack() as held:
        while True:
            attempt = held.enter_context(socket.socket())
            attempt.settimeout(0.3)
            try:
                attempt.connect((LOOPBACK, port))
            except socket.timeout:
                break  # the queue is full: this is what a probe will meet
        yield port


@pytest.fixture
def dead_port(free_port) -> int:
    return free_port()  # nothing listens there


def test_diagnostics_probes_each_job_server_and_ends_within_5_s_when_all_blackhole(
        worker_factory, gearmand, free_port, dead_port):
    with silent_listener(free_port()) as silent, full_backlog_listener(free_port()) as full:
        servers = [gearmand.address, f"{LOOPBACK}:{dead_port}", f"{LOOPBACK}:{silent}"]
        worker = worker_factory(servers=servers, settings={
            "diagnostics": {"network_target": f"{LOOPBACK}:{full}", "probe_timeout": 3}})
        started = time.monotonic()
        reply = passed(worker.submit("DIAGNOSTICS", servers=[gearmand.address]))
        elapsed = time.monotonic() - started
    assert elapsed < PROMISED_SECONDS, elapsed
    assert reply["gearman"] == [
        {"host": LOOPBACK, "port": gearmand.port, "status": "PASS"},
        {"host": LOOPBACK, "port": dead_port, "status": "FAIL"},
        {"host": LOOPBACK, "port": silent, "status": "FAIL"},
    ]
    assert reply["network"] == "FAIL"
    assert reply["network_target"] == f"{LOOPBACK}:{full}"
    assert reply["release"].startswith("libra-worker ")
    device = reply["device"]
    assert device["state"] == "NEW" and device["haproxy_running"] is False
    assert device["haproxy_version"] and device["haproxy_version"][0].isdigit()
    assert device["state_dir_free_bytes"] > 0
    assert device["log_sink_running"] is False
    assert libra_marks_offline_device_failed(reply)


def test_diagnostics_of_a_serving_device(worker, gearmand, free_port):
    with backends(HTTPBackend("http-a")) as (http_a,):
        passed(worker.submit(update(lb("HTTP", free_port(), [http_a.node()]))))
        reply = passed(worker.submit("DIAGNOSTICS"))
    # By default the network probe connects to the first job server.
    assert reply["network"] == "PASS" and reply["network_target"] == gearmand.address
    assert reply["gearman"] == [{"host": LOOPBACK, "port": gearmand.port, "status": "PASS"}]
    device = reply["device"]
    assert device["state"] == "ACTIVE" and device["haproxy_running"] is True
    assert device["haproxy_master_pid"] == worker.haproxy.master_pid()
    assert device["log_sink_running"] is True and device["log_sink_pid"] == worker.logsink.pid()
    assert device["haproxy_dropped_logs"] == 0 and device["unreadable_access_lines"] == 0
    assert not libra_marks_offline_device_failed(reply)
