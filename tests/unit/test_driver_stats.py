"""HAProxyDriver.stats against a stand-in stats socket: each node's status from HAProxy's
answer, and HAProxy's master looked for only when that socket does not answer."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from libra_worker import config
from libra_worker.drivers.haproxy import render
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.errors import StatsUnavailable
from libra_worker.messages import Protocol
from libra_worker.state import DesiredState, Lifecycle
from tests.unit.stand_ins import FakeStatsSocket

LOADBALANCER = {"protocol": "HTTP", "port": 8080, "nodes": [
    {"id": "n-up", "address": "127.0.0.1", "port": 9001},
    {"id": "n-down", "address": "127.0.0.1", "port": 9002},
]}


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[HAProxyDriver, list[str]]:
    """A driver whose state is one ACTIVE HTTP load balancer, and the record of its looks for
    HAProxy's master (none runs: each look says so)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    ini = tmp_path / "worker.ini"
    ini.write_text(f"[gearman]\nservers = 127.0.0.1:4730\n[worker]\nstate_dir = {state_dir}\n")
    driver = HAProxyDriver(config.load(ini).haproxy)
    driver.store.save(DesiredState(Lifecycle.ACTIVE, loadbalancers=[LOADBALANCER]))
    looks: list[str] = []
    monkeypatch.setattr(driver.process, "is_running_beside_reload",
                        lambda: looks.append("master") or False)
    return driver, looks


@pytest.fixture
def haproxy_answering(driver: tuple[HAProxyDriver, list[str]]) -> Iterator[None]:
    """The stats socket lists the first node's server UP, the second's DOWN."""
    haproxy_driver, _ = driver
    _, _, layout = haproxy_driver._parsed_state()
    assert layout is not None
    backend = render.PROXY_NAMES[Protocol.HTTP]
    names = {slot.node: slot.name for slot in layout[0] if slot.node is not None}
    answer = (f"# pxname,svname,qcur,status,weight,\n"
              f"{backend},{names['n-up']},0,UP,1,\n"
              f"{backend},{names['n-down']},0,DOWN,1,\n\n")
    server = FakeStatsSocket(answer, haproxy_driver.files.stats_socket)
    try:
        yield
    finally:
        server.close()


def test_stats_reports_each_node_from_haproxys_answer_without_looking_for_the_master(
        driver, haproxy_answering):
    haproxy_driver, looks = driver
    stats = haproxy_driver.stats()
    assert stats.state == "ACTIVE"
    assert [(node.id, node.status, node.protocol) for node in stats.nodes] == [
        ("n-up", "UP", "HTTP"), ("n-down", "DOWN", "HTTP")]
    # The socket answered: HAProxy runs, whatever its pidfile says (here: nothing).
    assert looks == []


def test_stats_says_haproxy_is_not_running_when_its_socket_refuses_and_no_master_runs(driver):
    haproxy_driver, looks = driver
    with pytest.raises(StatsUnavailable) as failure:
        haproxy_driver.stats()
    assert str(failure.value) == "HAProxy is not running (the load balancer is ACTIVE)."
    assert failure.value.reply_fields == {"status": "ACTIVE"}
    assert looks == ["master"]


def test_stats_gives_the_sockets_own_error_when_the_master_runs(driver, monkeypatch):
    haproxy_driver, _ = driver
    monkeypatch.setattr(haproxy_driver.process, "is_running_beside_reload", lambda: True)
    with pytest.raises(StatsUnavailable, match="HAProxy's stats socket does not answer"):
        haproxy_driver.stats()
