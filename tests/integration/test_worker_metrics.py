"""METRICS against real gearmand, HAProxy, log sink and backends, with real traffic.

The proof the billing needs: a client downloads answers of known size through both load
balancers while UPDATEs change nodes at runtime and force reloads, the device is
suspended and enabled, and the worker restarts; METRICS is polled at random moments all
along. The bytes of all replies together equal the bytes the client received, headers
included, within 0.1%, and the periods follow each other without gap or overlap. The HTTP
client keeps the persistence cookie it is given and sends it back, as a browser does: the
Set-Cookie header HAProxy inserts when a session starts is not billed (its own test).
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
from datetime import datetime
from typing import Any

import pytest

from libra_worker import metrics
from tests.integration.test_faults import reboot
from tests.integration.support import (
    LOOPBACK,
    HTTPBackend,
    TCPBackend,
    Worker,
    backends,
    lb,
    update,
    wait_until,
)

TIME_TEXT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
TOLERANCE = 0.001
FLUSH_INTERVAL = 1.0  # the log sink writes its counts this often


def passed(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["hpcs_response"] == "PASS", answer
    return answer


class Downloads:
    """Requests back to back on fresh connections, counting every byte received.

    `received` counts all bytes (HTTP headers included); `complete` only those of
    answers that arrived whole, so `received - complete` is what was cut in flight;
    `largest` is the size of the largest whole answer. Over
    HTTP it is a browser: it keeps the SERVERID cookie it is given and sends it back, so
    HAProxy inserts one only when a session starts or its node has left.
    """

    def __init__(self, protocol: str, port: int) -> None:
        self.protocol = protocol
        self.port = port
        self.received = 0
        self.complete = 0
        self.largest = 0
        self.timeline: list[tuple[float, int]] = []  # (monotonic time, bytes received so far)
        self.answers = 0
        self.failures = 0
        self.cookie: bytes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"downloads-{protocol}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            data = b""
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=10) as connection:
                    connection.sendall(self._request())
                    while chunk := connection.recv(65536):
                        data += chunk
            except OSError:
                self.failures += 1
                time.sleep(0.01)  # refused while suspended or restarting
            self.received += len(data)
            self.timeline.append((time.monotonic(), self.received))
            if data and self._is_whole(data):
                self.complete += len(data)
                self.largest = max(self.largest, len(data))
                self.answers += 1
                self._keep_cookie(data)

    def _request(self) -> bytes:
        if self.protocol == "tcp":
            return b"hello\n"
        cookie = b"Cookie: " + self.cookie + b"\r\n" if self.cookie else b""
        return b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n" + cookie + b"\r\n"

    def _keep_cookie(self, answer: bytes) -> None:
        given = set_cookie(answer)
        if given is not None:  # an empty value: HAProxy tells the browser to drop it
            self.cookie = given if not given.endswith(b"=") else None

    def received_between(self, start: float, end: float) -> int:
        before = [total for moment, total in self.timeline if moment < start]
        until = [total for moment, total in self.timeline if moment <= end]
        return (until[-1] if until else 0) - (before[-1] if before else 0)

    def _is_whole(self, data: bytes) -> bool:
        if self.protocol == "tcp":
            return data.rstrip(b".").startswith(b"tcp-") and len(data) == len(b"tcp-a") + PADDING
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        return re.match(rb"HTTP/1\.[01] 200 ", head) is not None and length is not None and len(body) == int(length[1])

    def __enter__(self) -> "Downloads":
        self._thread.start()
        wait_until(lambda: self.answers > 0, 10, f"the first {self.protocol} download")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def set_cookie(answer: bytes) -> bytes | None:
    """The "name=value" of an HTTP answer's Set-Cookie header, if it has one."""
    head = answer.partition(b"\r\n\r\n")[0]
    found = re.search(rb"(?im)^set-cookie: *([^;\r\n]*)", head)
    return found[1] if found else None


class MetricsPoller:
    """METRICS at random moments, every reply kept."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.replies: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-poller", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(random.uniform(0.05, 0.6)):
            self.replies.append(self.worker.submit("METRICS", timeout=60))

    def __enter__(self) -> "MetricsPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


PADDING = 24_000  # answers of about 24 KB: 0.1% of the total is many whole answers


def billed(replies: list[dict[str, Any]], protocol: str) -> int:
    return sum(entry["bytes_out"] for reply in replies for entry in reply["loadBalancers"]
               if entry["protocol"] == protocol)


def assert_periods_follow_each_other(replies: list[dict[str, Any]]) -> None:
    for reply in replies:
        passed(reply)
        assert TIME_TEXT.match(reply["utc_start"]) and TIME_TEXT.match(reply["utc_end"]), reply
        assert reply["utc_start"] <= reply["utc_end"], reply
        assert {entry["protocol"] for entry in reply["loadBalancers"]} <= {"http", "tcp"}, reply
    for earlier, later in zip(replies, replies[1:]):
        assert later["utc_start"] == earlier["utc_end"], (earlier, later)


def wait_for_counts_written(worker: Worker) -> None:
    """Traffic has stopped: every count that reached the sink is written once its file
    has not changed for two flush intervals."""
    counter = worker.state_dir / "logs" / metrics.TRAFFIC_FILE_NAME
    wait_until(lambda: time.time() - counter.stat().st_mtime > 2 * FLUSH_INTERVAL, 15,
               "the sink's last write")


@pytest.fixture
def two_lbs(worker_factory, free_port):
    """A worker serving HTTP and TCP load balancers, and four padded backends."""
    items = (HTTPBackend("http-a", padding=PADDING), HTTPBackend("http-b", padding=PADDING),
             TCPBackend("tcp-a", padding=PADDING), TCPBackend("tcp-b", padding=PADDING))
    with backends(*items) as (http_a, http_b, tcp_a, tcp_b):
        worker = worker_factory()
        ports = {"http": free_port(), "tcp": free_port()}

        def device(http_nodes: list[Any], tcp_nodes: list[Any], **http_extra: Any) -> dict[str, Any]:
            return update(lb("HTTP", ports["http"], [node.node() for node in http_nodes], **http_extra),
                          lb("TCP", ports["tcp"], [node.node() for node in tcp_nodes]))

        passed(worker.submit(device([http_a], [tcp_a])))
        yield worker, ports, device, (http_a, http_b, tcp_a, tcp_b)


def test_every_byte_is_billed_once_across_changes_reloads_suspend_and_a_worker_restart(two_lbs):
    worker, ports, device, (http_a, http_b, tcp_a, tcp_b) = two_lbs
    first = passed(worker.submit("METRICS"))
    replies = [first]
    with Downloads("http", ports["http"]) as http, Downloads("tcp", ports["tcp"]) as tcp, \
            MetricsPoller(worker) as poller:
        steps = [
            device([http_a, http_b], [tcp_a, tcp_b]),  # nodes added at runtime
            device([http_b], [tcp_b]),  # nodes removed at runtime
            device([http_b], [tcp_b], algorithm="LEAST_CONNECTIONS"),  # a reload
            "restart",
            {"hpcs_action": "SUSPEND"},
            {"hpcs_action": "ENABLE"},
            device([http_a, http_b], [tcp_a]),  # a reload again (algorithm back)
        ]
        for step in steps:
            time.sleep(random.uniform(0.5, 1.0))
            if step == "restart":
                worker.restart()
            else:
                passed(worker.submit(step))
        time.sleep(1)
    replies += poller.replies
    clients = {"http": http, "tcp": tcp}
    wait_for_counts_written(worker)
    replies.append(passed(worker.submit("METRICS")))

    assert_periods_follow_each_other(replies)
    for protocol, client in clients.items():
        assert client.answers > 50, (protocol, client.answers)
        assert abs(billed(replies, protocol) - client.received) <= TOLERANCE * client.received, (
            protocol, billed(replies, protocol), client.received)
    # Nothing is billed again later.
    time.sleep(2 * FLUSH_INTERVAL)
    last = passed(worker.submit("METRICS"))
    assert [entry["bytes_out"] for entry in last["loadBalancers"]] == [0, 0], last
    assert last["utc_start"] == replies[-1]["utc_end"]


def test_a_killed_haproxy_loses_at_most_the_answers_in_flight(two_lbs):
    worker, ports, _device, _backends = two_lbs
    replies = [passed(worker.submit("METRICS"))]
    with Downloads("http", ports["http"]) as http, Downloads("tcp", ports["tcp"]) as tcp:
        time.sleep(1)
        worker.kill_haproxy()
        # The reconciler starts it again; the downloads resume.
        answers = http.answers
        wait_until(lambda: http.answers > answers + 20, 15, "downloads after the restart")
        time.sleep(0.5)
    clients = {"http": http, "tcp": tcp}
    wait_for_counts_written(worker)
    replies.append(passed(worker.submit("METRICS")))
    assert_periods_follow_each_other(replies)
    for protocol, client in clients.items():
        sent = billed(replies, protocol)
        # Every whole answer is billed, but for the one whose session was ending at the
        # kill: HAProxy logs a session when both sides have closed, after the client has
        # read the whole answer. What was cut in flight may not be billed, and nothing more.
        whole_and_logged = client.complete - client.largest
        assert whole_and_logged * (1 - TOLERANCE) <= sent <= client.received * (1 + TOLERANCE), (
            protocol, sent, client.complete, client.received)


def test_a_killed_log_sink_loses_at_most_its_last_second_and_its_downtime(two_lbs):
    worker, ports, _device, _backends = two_lbs
    replies = [passed(worker.submit("METRICS"))]
    with Downloads("http", ports["http"]) as http:
        time.sleep(1)
        killed_at = time.monotonic()
        old_pid = worker.logsink.pid()
        os.kill(old_pid, signal.SIGKILL)
        # The reconciler starts it again.
        wait_until(lambda: worker.logsink.pid() not in (None, old_pid), 15, "a new log sink")
        back_at = time.monotonic()
        time.sleep(1)
    wait_for_counts_written(worker)
    replies.append(passed(worker.submit("METRICS")))
    assert_periods_follow_each_other(replies)
    lost = http.received - billed(replies, "http")
    # The counts not yet flushed (one flush interval) and what came while it was down.
    bound = http.received_between(killed_at - FLUSH_INTERVAL, back_at + 0.2)
    assert 0 <= lost <= bound, (lost, bound, back_at - killed_at)
    assert billed(replies, "http") >= http.received_between(back_at + 0.2, time.monotonic()) > 0


def test_billing_continues_across_a_reboot(two_lbs):
    worker, ports, _device, _backends = two_lbs
    replies = [passed(worker.submit("METRICS"))]
    with Downloads("tcp", ports["tcp"]) as tcp:
        time.sleep(1)
        replies.append(passed(worker.submit("METRICS")))
    # A reboot's SIGTERM lets the sink write its counts; kill -9 needs them written first.
    counter = worker.state_dir / "logs" / metrics.TRAFFIC_FILE_NAME
    wait_until(lambda: metrics.TrafficTotals.read(counter).bytes_out["tcp"] == tcp.received,
               15, "the sink to write its counts")
    reboot(worker)
    worker.start()
    with Downloads("tcp", ports["tcp"]) as after:
        time.sleep(1)

    def all_billed() -> bool:
        replies.append(passed(worker.submit("METRICS")))
        return billed(replies, "tcp") >= tcp.received + after.received
    wait_until(all_billed, 15, "every byte to be billed", interval=0.3)
    assert_periods_follow_each_other(replies)
    assert billed(replies, "tcp") == tcp.received + after.received


def test_metrics_through_the_lifecycle(worker_factory, free_port):
    worker = worker_factory()
    new = worker.submit("METRICS")
    assert (new["hpcs_response"], new["status"], new["loadBalancers"]) == ("FAIL", "NEW", []), new
    assert TIME_TEXT.match(new["utc_start"]) and new["utc_start"] == new["utc_end"]
    # As in Libra: SUSPEND of a device never configured passes (nothing listens); ENABLE does not.
    passed(worker.submit("SUSPEND"))
    assert worker.submit("STATS")["status"] == "NEW"
    assert worker.submit("ENABLE")["hpcs_response"] == "FAIL"

    with backends(HTTPBackend("http-a")) as (http_a,):
        before = datetime.utcnow()
        passed(worker.submit(update(lb("HTTP", free_port(), [http_a.node()]))))
        first = passed(worker.submit("METRICS"))
        # The first period starts when the load balancer was configured.
        start = datetime.strptime(first["utc_start"], "%Y-%m-%d %H:%M:%S.%f")
        assert before <= start <= datetime.strptime(first["utc_end"], "%Y-%m-%d %H:%M:%S.%f")
        assert first["loadBalancers"] == [{"protocol": "http", "bytes_out": 0}]
        passed(worker.submit("SUSPEND"))
        suspended = passed(worker.submit("METRICS"))
        assert suspended["utc_start"] == first["utc_end"]

        passed(worker.submit("DELETE"))
        deleted = worker.submit("METRICS")
        assert (deleted["hpcs_response"], deleted["status"]) == ("FAIL", "DELETED"), deleted
        assert deleted["loadBalancers"] == [] and deleted["utc_start"] == deleted["utc_end"]
        passed(worker.submit("SUSPEND"))
        assert worker.submit("STATS")["status"] == "DELETED"

        # Built again: the new counter's period starts after everything billed before.
        passed(worker.submit(update(lb("HTTP", free_port(), [http_a.node()]))))
        again = passed(worker.submit("METRICS"))
        assert again["utc_start"] > suspended["utc_end"]



def test_the_cookie_haproxy_inserts_is_not_billed(worker_factory, free_port):
    """What METRICS bills is what the node answered: HAProxy's count leaves out the
    Set-Cookie header it adds to a cookie-less client's answer, once per session."""
    worker = worker_factory()
    with backends(HTTPBackend("http-a", padding=1000)) as (http_a,):
        port = free_port()
        passed(worker.submit(update(lb("HTTP", port, [http_a.node()]))))
        passed(worker.submit("METRICS"))

        def get(cookie: bytes | None) -> bytes:
            with socket.create_connection((LOOPBACK, port), timeout=10) as connection:
                connection.sendall(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n" +
                                   (b"Cookie: " + cookie + b"\r\n" if cookie else b"") + b"\r\n")
                data = b""
                while chunk := connection.recv(65536):
                    data += chunk
            return data

        def billed_for_it() -> int:
            replies: list[dict[str, Any]] = []

            def arrived() -> bool:
                replies.append(passed(worker.submit("METRICS")))
                return billed(replies, "http") > 0
            wait_until(arrived, 15, "the answer to be billed", interval=0.3)
            return billed(replies, "http")

        session_start = get(None)
        cookie = set_cookie(session_start)
        first = billed_for_it()
        in_session = get(cookie)
        second = billed_for_it()

    assert cookie is not None and re.fullmatch(rb"SERVERID=[0-9a-f]{16}", cookie), session_start
    inserted = b"set-cookie: " + cookie + b"; path=/\r\n"
    assert inserted in session_start and set_cookie(in_session) is None
    # The same answer billed the same; the client received the header's bytes on top.
    assert first == second
    assert len(session_start) - len(in_session) == len(inserted) == 47
