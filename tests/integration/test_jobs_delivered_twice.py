"""Every action, delivered twice: the worker ran the job, then died (kill -9) before
gearmand heard its answer, so gearmand handed the same job (same handle and unique id) to
the worker started again. An `AnswerCatcher` between the worker and gearmand keeps the
first answer from gearmand; each test checks the second delivery's answer and that the
device is in the state the job asked for, as if it had run once.

Covered elsewhere, not repeated here: ARCHIVE (test_worker_archive.py: killed mid-upload,
answered then handed over again), an UPDATE killed part-way and re-run
(test_faults.py::test_worker_killed_at_points_of_an_update_leaves_old_or_new_never_a_mix).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Iterator

import pytest

from tests.integration.support import (
    LOOPBACK,
    AnswerCatcher,
    Worker,
    connection_refused,
    lb,
    request_once,
    update,
)


def passed(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("hpcs_response") == "PASS", reply
    return reply


class Device:
    """A worker serving one HTTP load balancer, its answers to gearmand through a catcher."""

    def __init__(self, worker: Worker, catcher: AnswerCatcher, gearmand: str, port: int,
                 nodes: list[Any]) -> None:
        self.worker = worker
        self.catcher = catcher
        self.gearmand = gearmand
        self.port = port
        self.nodes = nodes

    def submit(self, message: str | dict[str, Any]) -> dict[str, Any]:
        return self.worker.submit(message, servers=[self.gearmand])

    def state(self) -> dict[str, Any]:
        return json.loads((self.worker.state_dir / "state.json").read_text())

    def served_by(self) -> set[str]:
        return {request_once(f"http://{LOOPBACK}:{self.port}/") for _ in range(4)}

    def delivered_twice(self, message: str | dict[str, Any],
                        after_first_run: Callable[[], Any] = lambda: None) -> tuple[dict[str, Any], Any]:
        """Run `message`, catch its answer, kill -9 the worker, start it again; the answer
        of the second delivery, and what `after_first_run` saw before the kill."""
        self.catcher.arm()
        outcome: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda: outcome.append(self.submit(message)), daemon=True)
        thread.start()
        assert self.catcher.caught.wait(30), "the job was never answered"
        seen = after_first_run()
        self.worker.kill()
        assert not outcome, "gearmand heard the first answer"
        self.worker.start()
        thread.join(40)
        assert outcome, "the job was not delivered again\n" + self.worker.log_text()[-6000:]
        return outcome[0], seen


@pytest.fixture
def device(worker_factory, gearmand, http_backend, free_port) -> Iterator[Device]:
    catcher = AnswerCatcher(gearmand.address)
    try:
        worker = worker_factory(servers=[catcher.address])
        nodes = [http_backend("twice-a"), http_backend("twice-b")]
        port = free_port()
        setup = Device(worker, catcher, gearmand.address, port, nodes)
        passed(setup.submit(update(lb("HTTP", port, [nodes[0].node()]))))
        yield setup
    finally:
        catcher.close()


def test_update_converges_on_the_same_configuration(device):
    message = update(lb("HTTP", device.port, [device.nodes[1].node()]))
    reply, config = device.delivered_twice(message, device.worker.haproxy_config)
    passed(reply)
    assert device.worker.haproxy_config() == config
    assert [node["id"] for node in device.state()["loadbalancers"][0]["nodes"]] == ["twice-b"]
    assert device.served_by() == {"twice-b"}


def test_suspend_stays_suspended(device):
    reply, _ = device.delivered_twice("SUSPEND")
    passed(reply)
    assert device.state()["lifecycle"] == "SUSPENDED"
    assert connection_refused(device.port) and device.worker.haproxy.our_pids() == []


def test_enable_stays_enabled(device):
    passed(device.submit("SUSPEND"))
    reply, _ = device.delivered_twice("ENABLE")
    passed(reply)
    assert device.state()["lifecycle"] == "ACTIVE"
    assert device.served_by() == {"twice-a"}


def test_delete_stays_deleted(device):
    reply, _ = device.delivered_twice("DELETE")
    passed(reply)
    assert device.state()["lifecycle"] == "DELETED"
    assert connection_refused(device.port)
    assert not (device.worker.state_dir / "logs").exists()


def test_metrics_answers_the_same_period(device):
    request_once(f"http://{LOOPBACK}:{device.port}/")
    ledger = device.worker.state_dir / "metrics.json"
    reply, first = device.delivered_twice("METRICS", lambda: json.loads(ledger.read_text()))
    passed(reply)
    assert (reply["utc_start"], reply["utc_end"]) == (
        first["period"]["utc_start"], first["period"]["utc_end"])
    assert [[item["protocol"], item["bytes_out"]] for item in reply["loadBalancers"]] == \
        first["period"]["bytes_out"]
    assert passed(device.submit("METRICS"))["utc_start"] == reply["utc_end"]


@pytest.mark.parametrize("action", ["STATS", "DISCOVER", "DIAGNOSTICS"])
def test_read_only_jobs_just_answer(device, action):
    state = device.state()
    reply, _ = device.delivered_twice(action)
    passed(reply)
    assert device.state() == state
    assert device.served_by() == {"twice-a"}
