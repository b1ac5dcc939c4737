"""ARCHIVE end to end: client -> gearmand -> worker -> HAProxy logs -> real Swift.

Real traffic goes through the HTTP and TCP load balancers the worker built; the ARCHIVE
message (as the spec shows it, with loadBalancers[0] id and protocol) ships the access
lines, and the test downloads the object with swiftclient and reads the lines back.
Swift starts once for the module (tests/swift_server.py).
"""

from __future__ import annotations

import collections
import gzip
import threading
import uuid
from typing import Any, Iterator

import pytest
import swiftclient.client

from tests import swift_server
from tests.integration.support import (
    LOOPBACK,
    AnswerCatcher,
    HTTPBackend,
    TCPBackend,
    Worker,
    lb,
    request_once,
    update,
    wait_until,
)
from tests.swift_server import SwiftFront, SwiftServer, container_lines

CONTAINER = "lbaaslogs"


class Archived:
    """A worker serving an HTTP and a TCP load balancer, with helpers to make and read logs."""

    def __init__(self, worker: Worker, swift: SwiftServer, web: HTTPBackend, raw: TCPBackend,
                 http_port: int, tcp_port: int) -> None:
        self.worker = worker
        self.swift = swift
        self.web = web
        self.raw = raw
        self.http_port = http_port
        self.tcp_port = tcp_port
        self.lb_id = {"HTTP": "http-" + uuid.uuid4().hex[:8], "TCP": "tcp-" + uuid.uuid4().hex[:8]}

    def http_requests(self, *paths: str) -> None:
        for path in paths:
            assert request_once(f"http://{LOOPBACK}:{self.http_port}{path}") == self.web.name

    def tcp_connections(self, *tags: str) -> None:
        for tag in tags:
            assert request_once(f"tcp://{LOOPBACK}:{self.tcp_port}/{tag}") == self.raw.name

    def active_lines(self, protocol: str) -> list[bytes]:
        path = self.worker.state_dir / "logs" / f"{protocol.lower()}.log"
        return path.read_bytes().splitlines() if path.exists() else []

    def wait_for_lines(self, protocol: str, count: int) -> None:
        """HAProxy logs after the response; wait until the sink wrote every line."""
        wait_until(lambda: len(self.active_lines(protocol)) >= count, 10,
                   f"{count} {protocol} log lines")

    def message(self, protocol: str, token: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
        return {
            "hpcs_action": "ARCHIVE",
            "hpcs_object_store_basepath": CONTAINER,
            "hpcs_object_store_endpoint": endpoint or self.swift.endpoint,
            "hpcs_object_store_token": token or self.swift.token,
            "hpcs_object_store_type": "swift",
            # Values are case-insensitive too: "Http", "Tcp".
            "loadBalancers": [{"id": self.lb_id[protocol], "name": "lb #1",
                               "protocol": protocol.capitalize()}],
        }

    def archive(self, protocol: str, **options: Any) -> dict[str, Any]:
        # Also the bound on how long a failing ARCHIVE may take to answer.
        return self.worker.submit(self.message(protocol, **options), timeout=15)

    def download(self, reply: dict[str, Any]) -> list[bytes]:
        assert reply["hpcs_response"] == "PASS", reply
        container, name = reply["archive"]["object"].split("/", 1)
        assert container == CONTAINER
        connection = swiftclient.client.Connection(
            preauthurl=self.swift.endpoint, preauthtoken=self.swift.token, retries=0, timeout=10)
        try:
            _headers, body = connection.get_object(container, name)
        finally:
            connection.close()
        return gzip.decompress(body).splitlines()


@pytest.fixture
def archived(worker_factory, swift, http_backend, tcp_backend, free_port) -> Archived:
    worker = worker_factory(log_level="DEBUG")
    web, raw = http_backend("web-node"), tcp_backend("raw-node")
    http_port, tcp_port = free_port(), free_port()
    setup = Archived(worker, swift, web, raw, http_port, tcp_port)
    reply = worker.submit(update(
        lb("HTTP", http_port, [web.node()], id=setup.lb_id["HTTP"]),
        lb("TCP", tcp_port, [raw.node()], id=setup.lb_id["TCP"]),
    ))
    assert reply["hpcs_response"] == "PASS", reply
    return setup


def requested_paths(lines: list[bytes]) -> list[str]:
    assert all(b'"GET ' in line for line in lines), lines
    return [line.split(b'"GET ')[1].split(b" ")[0].decode() for line in lines]


def shipped_paths(archived: Archived) -> collections.Counter[str]:
    """How many times each requested path is in the store, across every object."""
    objects = container_lines(archived.swift, CONTAINER, archived.lb_id["HTTP"] + "/")
    return collections.Counter(path for lines in objects.values() for path in requested_paths(lines))


def test_archive_ships_each_protocols_lines_and_then_only_new_ones(archived):
    paths = [f"/arch-{number}" for number in range(3)]
    archived.http_requests(*paths)
    archived.tcp_connections("tcp-0", "tcp-1")
    archived.wait_for_lines("HTTP", 3)
    archived.wait_for_lines("TCP", 2)

    http_reply = archived.archive("HTTP")

    assert http_reply["hpcs_response"] == "PASS", http_reply
    assert http_reply["loadBalancers"] == archived.message("HTTP")["loadBalancers"]
    assert http_reply["archive"]["object"].startswith(f"{CONTAINER}/{archived.lb_id['HTTP']}/")
    http_lines = archived.download(http_reply)
    assert requested_paths(http_lines) == paths
    assert all(b" lb-http lb-http/web-node " in line for line in http_lines), http_lines
    assert http_reply["archive"]["lines"] == 3

    tcp_reply = archived.archive("TCP")
    tcp_lines = archived.download(tcp_reply)
    assert len(tcp_lines) == 2 and tcp_reply["archive"]["lines"] == 2
    assert all(b" lb-tcp lb-tcp/raw-node " in line for line in tcp_lines), tcp_lines
    assert not any(b'"GET ' in line for line in tcp_lines)
    assert tcp_reply["archive"]["object"].startswith(f"{CONTAINER}/{archived.lb_id['TCP']}/")

    archived.http_requests("/arch-later")
    archived.wait_for_lines("HTTP", 1)
    later = archived.archive("HTTP")
    assert later["archive"]["object"] != http_reply["archive"]["object"]
    assert requested_paths(archived.download(later)) == ["/arch-later"]

    nothing = archived.archive("TCP")
    assert nothing["hpcs_response"] == "FAIL" and "no new TCP" in nothing["hpcs_error"], nothing


def test_archive_with_a_wrong_token_fails_without_revealing_it(archived):
    archived.http_requests("/secret-before")
    archived.wait_for_lines("HTTP", 1)
    wrong_token = "AUTH_tk" + uuid.uuid4().hex

    reply = archived.archive("HTTP", token=wrong_token)

    assert reply["hpcs_response"] == "FAIL", reply
    assert "token" in reply["hpcs_error"].lower() or "401" in reply["hpcs_error"], reply
    assert wrong_token not in reply["hpcs_error"]
    assert archived.swift.token not in reply["hpcs_error"]
    # Nothing was lost: the next good ARCHIVE ships the line.
    shipped = archived.download(archived.archive("HTTP"))
    assert requested_paths(shipped) == ["/secret-before"]
    log = archived.worker.log_text()
    assert log.strip(), "the worker wrote no log at all"
    assert wrong_token not in log
    assert archived.swift.token not in log
    assert archived.swift.token[:16] not in log
    # Nor in any file the worker keeps (journal, state, HAProxy and sink logs).
    for path in archived.worker.root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert wrong_token.encode() not in content, path
            assert archived.swift.token.encode() not in content, path


def test_archive_fails_within_the_deadline_when_swift_is_down(archived):
    archived.http_requests("/during-outage")
    archived.wait_for_lines("HTTP", 1)
    archived.swift.stop_proxy()
    try:
        reply = archived.archive("HTTP")  # TransportError if no answer within 15 s
    finally:
        archived.swift.start_proxy()

    assert reply["hpcs_response"] == "FAIL", reply
    assert reply["hpcs_error"] and archived.swift.token not in reply["hpcs_error"]
    # The lines were kept for the next ARCHIVE.
    archived.http_requests("/after-outage")
    archived.wait_for_lines("HTTP", 1)
    assert archived.archive("HTTP")["hpcs_response"] == "PASS"
    assert shipped_paths(archived) == collections.Counter(["/during-outage", "/after-outage"])


def test_archive_with_an_unsupported_store_type_is_a_bad_request(archived):
    message = {**archived.message("HTTP"), "hpcs_object_store_type": "s3"}

    reply = archived.worker.submit(message)

    assert reply["hpcs_response"] == "FAIL" and "badRequest" in reply, reply
    assert "s3" in reply["hpcs_error"]


def test_delete_removes_the_logs(archived):
    archived.http_requests("/doomed")
    archived.wait_for_lines("HTTP", 1)
    logs = archived.worker.state_dir / "logs"
    assert logs.is_dir() and archived.worker.logsink.is_running()

    assert archived.worker.submit("DELETE")["hpcs_response"] == "PASS"

    assert not logs.exists()
    assert archived.worker.logsink.pid() is None
    reply = archived.archive("HTTP")
    assert reply["hpcs_response"] == "FAIL" and "no new HTTP" in reply["hpcs_error"], reply


def test_logs_are_collected_again_after_delete_and_a_new_update(archived):
    archived.http_requests("/before-delete")
    archived.wait_for_lines("HTTP", 1)
    assert archived.worker.submit("DELETE")["hpcs_response"] == "PASS"

    reply = archived.worker.submit(update(
        lb("HTTP", archived.http_port, [archived.web.node()], id=archived.lb_id["HTTP"])))
    assert reply["hpcs_response"] == "PASS", reply
    archived.http_requests("/reborn")
    archived.wait_for_lines("HTTP", 1)

    assert requested_paths(archived.download(archived.archive("HTTP"))) == ["/reborn"]


# --------------------------------------------------------------------------- exactly once


@pytest.fixture
def front(swift) -> Iterator[SwiftFront]:
    """The test Swift behind a front that misbehaves on cue; the container exists, so
    the first PUT of an object is the one that stores it."""
    connection = swiftclient.client.Connection(
        preauthurl=swift.endpoint, preauthtoken=swift.token, retries=0, timeout=10)
    try:
        connection.put_container(CONTAINER)
    finally:
        connection.close()
    store = SwiftFront(swift)
    yield store
    store.close()


def archive_in_hand(archived: Archived, front: SwiftFront) -> tuple[threading.Thread, list[Any]]:
    """An ARCHIVE submitted in a thread (the client waits while the worker dies)."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(archived.worker.submit(
        archived.message("HTTP", endpoint=front.endpoint), timeout=90)), daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("step", [swift_server.HOLD_ANSWER, swift_server.HOLD_REQUEST])
def test_a_worker_killed_mid_archive_ships_every_line_once_after_the_job_is_handed_over(
        archived, front, step):
    """kill -9 while the store holds its 201 for an object it kept (HOLD_ANSWER), or
    before the store saw the upload (HOLD_REQUEST); traffic goes on meanwhile; the new
    worker gets the same ARCHIVE from gearmand, with more lines waiting."""
    before = [f"/before-{number}" for number in range(10)]
    archived.http_requests(*before)
    archived.wait_for_lines("HTTP", 10)
    front.plan = [step]
    thread, outcome = archive_in_hand(archived, front)
    _step, first_object, status = front.wait_for(step)
    assert status == (201 if step == swift_server.HOLD_ANSWER else None)
    archived.worker.kill()
    front.release()
    assert not outcome, "the ARCHIVE was answered before the kill"
    during = [f"/during-{number}" for number in range(5)]
    archived.http_requests(*during)
    archived.wait_for_lines("HTTP", 5)

    archived.worker.start()
    thread.join(60)

    assert outcome and outcome[0]["hpcs_response"] == "PASS", outcome
    result = outcome[0]["archive"]
    assert len(result["objects"]) == 2 and result["lines"] == 15, result
    assert shipped_paths(archived) == collections.Counter(before + during)
    assert first_object.endswith("/" + result["objects"][0]), (first_object, result)


@pytest.mark.parametrize("step", [swift_server.FAIL_AFTER_BODY, swift_server.FAIL_AFTER_STORING])
def test_a_store_failing_the_put_after_reading_it_loses_and_repeats_no_line(archived, front, step):
    before = [f"/before-{number}" for number in range(6)]
    archived.http_requests(*before)
    archived.wait_for_lines("HTTP", 6)
    front.plan = [step] * 3  # every attempt of this ARCHIVE

    failed = archived.archive("HTTP", endpoint=front.endpoint)

    assert failed["hpcs_response"] == "FAIL" and "503" in failed["hpcs_error"], failed
    assert [event[::2] for event in front.events] == [
        (step, 201 if step == swift_server.FAIL_AFTER_STORING else None),
        *[(step, 412 if step == swift_server.FAIL_AFTER_STORING else None)] * 2]
    after = ["/after-0", "/after-1"]
    archived.http_requests(*after)
    archived.wait_for_lines("HTTP", 2)
    passed = archived.archive("HTTP", endpoint=front.endpoint)
    assert passed["hpcs_response"] == "PASS", passed
    assert passed["archive"]["lines"] == 8 and len(passed["archive"]["objects"]) == 2
    assert shipped_paths(archived) == collections.Counter(before + after)


def test_an_archive_answered_then_handed_over_again_answers_the_same(archived, gearmand):
    """The worker shipped and retired the lines, then died before gearmand heard the
    answer: the job handed over again answers what the first run did, ships nothing."""
    catcher = AnswerCatcher(gearmand.address)
    try:
        worker = archived.worker
        worker.stop()
        worker.servers = [catcher.address]
        worker.write_config()
        worker.start()
        archived.http_requests("/once-0", "/once-1")
        archived.wait_for_lines("HTTP", 2)
        catcher.arm()
        outcome: list[Any] = []
        thread = threading.Thread(target=lambda: outcome.append(worker.submit(
            archived.message("HTTP"), timeout=90, servers=[gearmand.address])), daemon=True)
        thread.start()
        assert catcher.caught.wait(30), "the ARCHIVE never answered"
        worker.kill()
        archived.http_requests("/later")
        archived.wait_for_lines("HTTP", 1)
        worker.start()
        thread.join(60)
    finally:
        catcher.close()

    assert outcome and outcome[0]["hpcs_response"] == "PASS", outcome
    assert outcome[0]["archive"]["lines"] == 2
    assert shipped_paths(archived) == collections.Counter(["/once-0", "/once-1"])
    later = archived.archive("HTTP")
    assert later["archive"]["lines"] == 1
    assert shipped_paths(archived) == collections.Counter(["/once-0", "/once-1", "/later"])
