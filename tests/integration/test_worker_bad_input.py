"""Bad input gets a FAIL reply, and the load balancer already serving is left untouched.

One worker serves the whole module with an HTTP load balancer over two nodes; every
bad message is sent through the real gearmand, then real traffic and STATS prove the
old load balancer still serves the old nodes and its configuration did not change.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import uuid
from typing import Any, Iterator

import pytest

from tests.integration.support import (
    Gearmand,
    HTTPBackend,
    TrafficLoop,
    Worker,
    WorkerFactory,
    backends,
    free_port,
    http_monitor,
    lb,
    node_statuses,
    rss_kib,
    strict_json,
    traffic,
    update,
)


class Serving:
    """The module's worker and the load balancer it must keep serving."""

    def __init__(self, worker: Worker, nodes: tuple[HTTPBackend, ...], port: int,
                 spare: HTTPBackend) -> None:
        self.worker = worker
        self.nodes = nodes
        self.port = port
        self.spare = spare  # a live node no accepted UPDATE ever names
        self.config = worker.haproxy_config()
        self.master_pid = worker.haproxy.master_pid()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def good_lb(self, **changes: Any) -> dict[str, Any]:
        return {**lb("HTTP", self.port, [node.node() for node in self.nodes]), **changes}

    def assert_untouched(self) -> None:
        answered, failures = traffic(self.url, 6)
        assert failures == 0
        assert answered == {"keep-a": 3, "keep-b": 3}
        assert node_statuses(self.worker.submit("STATS")) == {"keep-a": "UP", "keep-b": "UP"}
        assert self.worker.haproxy_config() == self.config
        assert self.worker.haproxy.master_pid() == self.master_pid
        assert self.spare.paths == []
        assert self.worker.is_running()


@pytest.fixture(scope="module")
def serving(gearmand: Gearmand) -> Iterator[Serving]:
    factory = WorkerFactory([gearmand.address])
    with backends(HTTPBackend("keep-a"), HTTPBackend("keep-b"), HTTPBackend("spare")) as started:
        try:
            worker = factory()
            port = free_port()
            nodes = started[:2]
            reply = worker.submit(update(lb("HTTP", port, [node.node() for node in nodes])))
            assert reply["hpcs_response"] == "PASS", reply
            yield Serving(worker, nodes, port, started[2])
        finally:
            factory.cleanup()


def assert_bad_request(reply: dict[str, Any], *words: str) -> None:
    assert reply["hpcs_response"] == "FAIL", reply
    assert isinstance(reply["hpcs_error"], str) and reply["hpcs_error"], reply
    assert reply["badRequest"]["code"] == "400", reply
    assert reply["badRequest"]["validationErrors"]["message"] == reply["hpcs_error"]
    for word in words:
        assert word.lower() in reply["hpcs_error"].lower(), reply["hpcs_error"]


def test_non_json_payload(serving):
    reply = serving.worker.submit("this is {not json")

    assert_bad_request(reply, "JSON")
    serving.assert_untouched()


def test_json_array_payload(serving):
    reply = serving.worker.submit(json.dumps([{"hpcs_action": "UPDATE"}]))

    assert_bad_request(reply, "object")
    serving.assert_untouched()


def test_payload_that_is_not_utf8(serving):
    reply = serving.worker.submit_bytes(b'{"hpcs_action": "\xff\xfe"}')

    assert_bad_request(reply, "JSON")
    serving.assert_untouched()


def test_empty_payload(serving):
    reply = serving.worker.submit_bytes(b"")

    assert_bad_request(reply, "JSON")
    serving.assert_untouched()


def test_missing_hpcs_action(serving):
    message = {"loadbalancers": [serving.good_lb()]}

    reply = serving.worker.submit(message)

    assert_bad_request(reply, "hpcs_action")
    assert reply["loadbalancers"] == message["loadbalancers"]
    serving.assert_untouched()


def test_unknown_action(serving):
    reply = serving.worker.submit({"hpcs_action": "REBOOT"})

    assert_bad_request(reply, "REBOOT")
    assert reply["hpcs_action"] == "REBOOT"
    serving.assert_untouched()


def _with_node(serving: Serving, **node_changes: Any) -> dict[str, Any]:
    nodes = [serving.nodes[0].node(), {**serving.spare.node(), **node_changes}]
    return update(serving.good_lb(nodes=nodes))


def _with_spare(serving: Serving, **lb_changes: Any) -> dict[str, Any]:
    """A message that, were it accepted, would send traffic to the spare node."""
    return update(serving.good_lb(nodes=[serving.spare.node()], **lb_changes))


BAD_UPDATES = {
    "unknown protocol": (lambda s: _with_spare(s, protocol="UDP"), "UDP"),
    "port zero": (lambda s: _with_spare(s, port=0), "port"),
    "port above 65535": (lambda s: _with_spare(s, port=65536), "port"),
    "port not a number": (lambda s: _with_spare(s, port="eighty"), "port"),
    "negative node port": (lambda s: _with_node(s, port=-1), "port"),
    "hostname as node address": (lambda s: _with_node(s, address="localhost"), "address"),
    "node address with a port": (lambda s: _with_node(s, address="127.0.0.1:80"), "address"),
    "IPv6 node address with a zone": (lambda s: _with_node(s, address="fe80::1%lo"), "zone"),
    "missing node address": (lambda s: update(s.good_lb(nodes=[{"port": s.spare.port}])), "address"),
    "weight 0": (lambda s: _with_node(s, weight=0), "weight"),
    "weight 257": (lambda s: _with_node(s, weight=257), "weight"),
    "unknown algorithm": (lambda s: _with_spare(s, algorithm="RANDOM"), "RANDOM"),
    "monitor timeout greater than delay": (
        lambda s: _with_spare(s, monitor=http_monitor(delay=2, timeout=3)), "timeout"),
    "monitor path without a leading slash": (
        lambda s: _with_spare(s, monitor=http_monitor(path="health")), "path"),
    "monitor path longer than Libra's 2000 characters": (
        lambda s: _with_spare(s, monitor=http_monitor(path="/" + "h" * 2000)), "path"),
    "monitor path with a newline": (
        lambda s: _with_spare(s, monitor=http_monitor(path="/health\n    server evil 127.0.0.1:1")),
        "path"),
    "node id with a newline (config injection)": (
        lambda s: _with_node(s, id="x\n    server evil 127.0.0.1:%d" % s.spare.port), "id"),
    "lb id with a newline (config injection)": (
        lambda s: _with_spare(s, id="lb\nlisten evil\n    bind 127.0.0.1:1"), "id"),
    "lb name with a newline": (lambda s: _with_spare(s, name="web\n    stats enable"), "name"),
    "no nodes list": (lambda s: update({"protocol": "HTTP", "port": s.port}), "nodes"),
    "loadbalancers not a list": (
        lambda s: {"hpcs_action": "UPDATE", "loadbalancers": s.good_lb()}, "list"),
    "no load balancers": (lambda s: update(), "at least one"),
    "three load balancers": (
        lambda s: update(s.good_lb(), _with_spare(s, protocol="TCP", port=free_port())["loadbalancers"][0],
                         _with_spare(s, port=free_port())["loadbalancers"][0]), "At most 2"),
    "two HTTP load balancers": (
        lambda s: update(s.good_lb(), _with_spare(s, port=free_port())["loadbalancers"][0]),
        "different protocols"),
    "HTTP and TCP on the same port": (
        lambda s: update(s.good_lb(), _with_spare(s, protocol="TCP")["loadbalancers"][0]),
        "different ports"),
    "duplicate node ids": (lambda s: _with_node(s, id="keep-a"), "same id"),
    "unknown node condition": (lambda s: _with_node(s, condition="SLEEPING"), "condition"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES), ids=list(BAD_UPDATES))
def test_invalid_update_is_refused_and_the_lb_keeps_serving(serving, case):
    build, word = BAD_UPDATES[case]
    message = build(serving)

    reply = serving.worker.submit(message)

    assert_bad_request(reply, word)
    # The reply echoes the message it refused, as sent.
    assert {key: reply[key] for key in message} == message
    serving.assert_untouched()
    assert "evil" not in serving.worker.haproxy_config()


def test_port_held_by_another_program_fails_with_no_gap_in_service(serving):
    # Another program listens on the port this UPDATE asks for.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen(1)
        busy = holder.getsockname()[1]
        with TrafficLoop(serving.url) as loop:
            moved = serving.worker.submit(_with_spare(serving, port=busy))
            added = serving.worker.submit(update(serving.good_lb(),
                                                 lb("TCP", busy, [serving.spare.node()])))
        for reply in (moved, added):
            assert reply["hpcs_response"] == "FAIL", reply
            assert f"Port {busy} on 127.0.0.1 is already in use by pid {os.getpid()} (" in reply[
                "hpcs_error"], reply
            assert "badRequest" not in reply
        assert loop.errors == []
        assert set(loop.answered) == {"keep-a", "keep-b"}, loop.answered
    finally:
        holder.close()
    serving.assert_untouched()


def test_a_reply_field_in_the_message_cannot_fake_the_outcome(serving):
    reply = serving.worker.submit({"hpcs_action": "BOGUS", "HPCS_RESPONSE": "PASS",
                                   "hpcs_error": None})

    assert_bad_request(reply)
    assert "HPCS_RESPONSE" not in reply
    serving.assert_untouched()


HOSTILE = {
    "an overflowing number": (b'{"hpcs_action": "DISCOVER", "x": 1e309}', "not valid JSON"),
    "a NaN token": (b'{"hpcs_action": "DISCOVER", "x": NaN}', "not valid JSON"),
    "an exact duplicate key": (b'{"hpcs_action": "STATS", "hpcs_action": "DELETE"}', "twice"),
    "500 levels of nesting": (
        b'{"hpcs_action": "STATS", "x": ' + b"[" * 500 + b"]" * 500 + b"}", "levels deep"),
    "a look-alike action": ('{"hpcs_action": "\u017ftats"}'.encode(), "hpcs_action"),
    "a 5 MB node address": (
        json.dumps({"hpcs_action": "UPDATE", "loadBalancers": [
            {"protocol": "HTTP", "nodes": [{"address": "9" * 5_000_000, "port": 80}]}]}).encode(),
        "(5000000 characters)"),
    "a payload above max_message_bytes": (
        b'{"hpcs_action": "DISCOVER", "pad": "' + b"p" * 9_000_000 + b'"}', "max_message_bytes"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_payloads_get_a_short_strict_json_fail(serving, case):
    payload, words = HOSTILE[case]
    log_before = serving.worker.log_file.stat().st_size
    journal = serving.worker.state_dir / "jobs.journal"
    journal_before = journal.stat().st_size

    raw = serving.worker.submit_raw(payload)

    reply = strict_json(raw)  # no NaN/Infinity token, whatever came in
    assert_bad_request(reply, words)
    assert len(reply["hpcs_error"]) < 300, reply["hpcs_error"][:400]
    # Neither the reply, nor the log, nor the journal holds the hostile value whole.
    assert len(raw) < max(len(payload), 2000) + 2000
    assert serving.worker.log_file.stat().st_size - log_before < 5000
    assert journal.stat().st_size - journal_before < 5000
    assert serving.worker.submit("STATS")["hpcs_response"] == "PASS"
    serving.assert_untouched()


def submit_streamed(address: str, function: str, head: bytes, size: int) -> bytes:
    """SUBMIT_JOB of a `size`-byte payload (`head`, then padding) written in 1 MiB chunks,
    so that this process never holds it; the data of the WORK_COMPLETE that answers it."""
    host, _, port = address.rpartition(":")
    prefix = function.encode() + b"\0" + uuid.uuid4().hex.encode() + b"\0"
    padding = memoryview(b"p" * 1024 * 1024)
    with socket.create_connection((host, int(port)), timeout=300) as connection:
        connection.sendall(b"\0REQ" + struct.pack(">II", 7, len(prefix) + size) + prefix + head)
        left = size - len(head)
        while left:
            connection.sendall(padding[:left])
            left -= min(left, len(padding))
        reader = connection.makefile("rb")
        while True:
            magic, kind, length = struct.unpack(">4sII", reader.read(12))
            body = reader.read(length)
            assert magic == b"\0RES" and len(body) == length, (magic, kind, body[:200])
            if kind == 13:  # WORK_COMPLETE: handle, then the reply
                return body.split(b"\0", 1)[1]
            assert kind == 8, (kind, body[:200])  # JOB_CREATED


def test_a_1_gib_job_is_refused_as_it_is_read_and_the_worker_stays_small(worker_factory,
                                                                         http_backend):
    """The limit holds while the job is read: the worker drains it from the socket in
    chunks instead of holding it (a 1 GB job once took it to 3.1 GB before the same FAIL)."""
    worker = worker_factory()
    idle_peak = rss_kib(worker.process.pid, "VmHWM")
    size = 1024 ** 3

    raw = submit_streamed(worker.servers[0], worker.function,
                          b'{"hpcs_action": "UPDATE", "loadBalancers": "', size)

    reply = strict_json(raw)
    assert_bad_request(reply)
    assert reply["hpcs_error"] == (f"The message is {size} bytes long, more than the 8388608 "
                                   f"bytes this worker accepts ([worker] max_message_bytes).")
    # The bound: what a worker that read up to the limit and no further could hold, plus
    # 4 MiB. Measured: 5 to 8 MiB above the idle peak (the allocator's share of the
    # 256 KiB reads), against 3.1 GB before; 1.1 to 1.7 s through gearmand on loopback.
    peak = rss_kib(worker.process.pid, "VmHWM")
    assert peak - idle_peak < (8 * 1024 * 1024 + 4 * 1024 * 1024) // 1024, (idle_peak, peak)
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [http_backend("after").node()])))["hpcs_response"] == "PASS"
    assert traffic(f"http://127.0.0.1:{port}/", 2) == ({"after": 2}, 0)


def test_worker_still_accepts_a_good_update_after_all_the_bad_ones(serving):
    reply = serving.worker.submit(update(serving.good_lb()))

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(serving.url, 4) == ({"keep-a": 2, "keep-b": 2}, 0)
