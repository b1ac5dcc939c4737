"""Node-only UPDATEs through HAProxy's Runtime API, and the changes that still reload.

The real worker runs against a real gearmand and HAProxy (the fixtures in conftest.py).
Whether an UPDATE reloaded is read from HAProxy itself: the master CLI's `show proc`
names the current worker, and a reload replaces it. Each runtime change runs under a
traffic loop of back-to-back requests through the load balancer, which must see no
failure; afterwards the traffic must reach exactly the new node set. What the server
slots add (connection reuse, cookies, backup slots, running out, restarts) is in
test_server_slots.py.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any, Callable

from libra_worker.drivers.haproxy.runtime import read_running_servers
from libra_worker.drivers.haproxy.sockets import send_command
from tests.integration.support import (
    TrafficLoop,
    Worker,
    http_monitor,
    lb,
    node_statuses,
    traffic,
    update,
    wait_until,
)

RUNTIME_LINE = "UPDATE applied at runtime"
RELOAD_LINE = "UPDATE reloaded HAProxy"
# Requests the loop must complete after the change before it stops.
REQUESTS_AFTER = 20


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


def current_workers(worker: Worker) -> tuple[int, ...]:
    workers = worker.haproxy.process_table().worker_pids
    assert len(workers) == 1, workers
    return workers


def stats_command(worker: Worker, command: str) -> str:
    return send_command(worker.state_dir / "haproxy-stats.sock", command)


def served_servers(worker: Worker) -> set[tuple[Any, ...]]:
    """What HAProxy runs, per server, in the terms an UPDATE sets."""
    return {
        (s.backend, s.name, s.address, s.port, s.weight, s.enabled, s.backup, s.checked)
        for s in read_running_servers(worker.state_dir / "haproxy-stats.sock", time.monotonic() + 5)
    }


def submit_under_traffic(worker: Worker, port: int, message: dict[str, Any]) -> TrafficLoop:
    """Submit `message` while requests run back to back; the finished loop."""
    with TrafficLoop(url(port)) as loop:
        reply = worker.submit(message)
        assert reply["hpcs_response"] == "PASS", reply
        after = loop.total
        wait_until(lambda: loop.total >= after + REQUESTS_AFTER, 20,
                   f"{REQUESTS_AFTER} requests after the UPDATE")
    return loop


def assert_applied_at_runtime(worker: Worker, workers_before: tuple[int, ...],
                              runtime_lines: int) -> None:
    assert current_workers(worker) == workers_before, "HAProxy was reloaded"
    log = worker.log_text()
    assert log.count(RUNTIME_LINE) == runtime_lines + 1, log[-3000:]


def assert_reloaded(worker: Worker, workers_before: tuple[int, ...], reason: str) -> None:
    assert set(current_workers(worker)).isdisjoint(workers_before), "HAProxy was not reloaded"
    assert f"{RELOAD_LINE}: {reason}" in worker.log_text(), worker.log_text()[-3000:]


def start_lb(worker: Worker, port: int, nodes: list[dict[str, Any]], **extra: Any) -> tuple[int, ...]:
    reply = worker.submit(update(lb("HTTP", port, nodes, **extra)))
    assert reply["hpcs_response"] == "PASS", reply
    return current_workers(worker)


# ---------------------------------------------------------------------- applied at runtime


def test_adding_nodes_under_traffic_needs_no_reload(worker, http_backend, free_port):
    a, b, c, d = (http_backend(name) for name in ("add-a", "add-b", "add-c", "add-d"))
    port = free_port()
    workers = start_lb(worker, port, [a.node(), b.node()])

    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [
        a.node(), b.node(), c.node(), d.node(condition="DISABLED")])))

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    assert set(traffic(url(port), 30)[0]) == {"add-a", "add-b", "add-c"}
    assert d.paths == []
    assert sorted(node_statuses(worker.submit("STATS"))) == ["add-a", "add-b", "add-c", "add-d"]
    # New nodes fill the first spare slots, and the file says so for the next start.
    config = worker.haproxy_config()
    assert f"server slot:1 127.0.0.1:{c.port} weight 1 check inter 30s fall 2 rise 2\n" in config
    assert f"server slot:2 127.0.0.1:{d.port} weight 1 check inter 30s fall 2 rise 2 disabled\n" in config
    assert {(s[1], s[3], s[5]) for s in served_servers(worker) if s[1] in ("slot:1", "slot:2")} == {
        ("slot:1", c.port, True), ("slot:2", d.port, False)}


def test_haproxy_killed_after_an_unchecked_runtime_update_restarts_serving_it(
        worker, http_backend, free_port):
    """A node-only UPDATE writes the live file without a synchronous `haproxy -c`. HAProxy
    killed with SIGKILL right after its PASS comes back (the reconciler) from that file,
    which the real `haproxy -c` accepts, serving exactly that UPDATE's nodes."""
    a, b, c = (http_backend(name) for name in ("k9rt-a", "k9rt-b", "k9rt-c"))
    port = free_port()
    workers = start_lb(worker, port, [a.node(), b.node()])

    reply = worker.submit(update(lb("HTTP", port, [b.node(weight=3), c.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    assert_applied_at_runtime(worker, workers, 0)
    worker.haproxy.check(worker.state_dir / "haproxy.cfg")
    pids = worker.haproxy.our_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: worker.haproxy.master_pid() not in (None, *pids), 10,
               "the reconciler to restart HAProxy")
    wait_until(lambda: set(traffic(url(port), 20)[0]) == {"k9rt-b", "k9rt-c"}, 10,
               "the restarted HAProxy to serve the UPDATE's nodes")
    # k9rt-c fills a slot; k9rt-a's server stays, retired in maintenance.
    assert {(s[1], s[4]) for s in served_servers(worker) if s[5]} == {("k9rt-b", 3), ("slot:1", 1)}


def test_removing_nodes_under_traffic_needs_no_reload(worker, http_backend, free_port):
    a, b, c = (http_backend(name) for name in ("rm-a", "rm-b", "rm-c"))
    port = free_port()
    workers = start_lb(worker, port, [a.node(), b.node(), c.node()])

    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [a.node()])))

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    served_by_removed = len(b.paths) + len(c.paths)
    assert traffic(url(port), 10) == ({"rm-a": 10}, 0)
    assert len(b.paths) + len(c.paths) == served_by_removed
    assert list(node_statuses(worker.submit("STATS"))) == ["rm-a"]
    # Retired: in maintenance until the next reload, its line a placeholder in the file.
    assert ("server rm-b 127.0.0.1:1 weight 1 check inter 30s fall 2 rise 2 disabled\n"
            in worker.haproxy_config())
    assert {(s[1], s[5]) for s in served_servers(worker) if s[1].startswith("rm-")} == {
        ("rm-a", True), ("rm-b", False), ("rm-c", False)}


def test_replacing_every_node_under_traffic_needs_no_reload(worker, http_backend, free_port):
    old_a, old_b, new_c, new_d = (http_backend(name) for name in ("old-a", "old-b", "new-c", "new-d"))
    port = free_port()
    workers = start_lb(worker, port, [old_a.node(), old_b.node()])

    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [new_c.node(), new_d.node()])))

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    assert set(traffic(url(port), 10)[0]) == {"new-c", "new-d"}


def test_re_weighting_under_traffic_needs_no_reload(worker, http_backend, free_port):
    heavy, light = http_backend("heavy"), http_backend("light")
    port = free_port()
    workers = start_lb(worker, port, [heavy.node(), light.node()])
    even, failures = traffic(url(port), 40)
    assert failures == 0 and abs(even["heavy"] - even["light"]) <= 2, even

    reweighted = update(lb("HTTP", port, [heavy.node(weight=3), light.node()]))

    loop = submit_under_traffic(worker, port, reweighted)

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    skewed, failures = traffic(url(port), 200)
    assert failures == 0
    assert 2.0 <= skewed["heavy"] / skewed["light"] <= 4.5, skewed
    assert f"server heavy 127.0.0.1:{heavy.port} weight 3 " in worker.haproxy_config()


def test_disabling_then_enabling_a_node_under_traffic_needs_no_reload(worker, http_backend, free_port):
    a, b = http_backend("dis-a"), http_backend("dis-b")
    port = free_port()
    workers = start_lb(worker, port, [a.node(), b.node()])

    disabled = update(lb("HTTP", port, [a.node(), b.node(condition="DISABLED")]))

    loop = submit_under_traffic(worker, port, disabled)

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    assert traffic(url(port), 10) == ({"dis-a": 10}, 0)
    assert sorted(node_statuses(worker.submit("STATS"))) == ["dis-a", "dis-b"]

    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [a.node(), b.node()])))

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 1)
    assert set(traffic(url(port), 10)[0]) == {"dis-a", "dis-b"}


def test_tcp_node_changes_need_no_reload(worker, tcp_backend, free_port):
    t1, t2 = tcp_backend("tcp-1"), tcp_backend("tcp-2")
    port = free_port()
    reply = worker.submit(update(lb("TCP", port, [t1.node()])))
    assert reply["hpcs_response"] == "PASS", reply
    workers = current_workers(worker)

    with TrafficLoop(f"tcp://127.0.0.1:{port}/ping") as loop:
        assert worker.submit(update(lb("TCP", port, [t2.node()])))["hpcs_response"] == "PASS"
        after = loop.total
        wait_until(lambda: loop.total >= after + REQUESTS_AFTER, 20, "requests after the UPDATE")

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    assert traffic(f"tcp://127.0.0.1:{port}/ping", 5) == ({"tcp-2": 5}, 0)


def test_a_reload_of_the_rewritten_file_serves_what_the_runtime_changes_built(
        worker, http_backend, free_port):
    a, b, c, d = (http_backend(name) for name in ("same-a", "same-b", "same-c", "same-d"))
    port = free_port()
    workers = start_lb(worker, port, [a.node(), b.node(weight=2), c.node()],
                      monitor=http_monitor("/health", delay=1, timeout=1, attempts=2))
    reply = worker.submit(update(lb("HTTP", port, [
        a.node(weight=5), c.node(condition="DISABLED"), d.node(weight=4, backup=True)],
        monitor=http_monitor("/health", delay=1, timeout=1, attempts=2))))
    assert reply["hpcs_response"] == "PASS", reply
    assert_applied_at_runtime(worker, workers, 0)
    # The servers that serve nodes; b's retired one and the empty slots are in
    # maintenance, still at their last address until the reload puts the placeholder.
    serving = {"same-a", "same-c", "slot:9"}
    built_at_runtime = {s for s in served_servers(worker) if s[1] in serving}

    worker.haproxy.reload()  # what a restart would do: only the file counts

    assert set(current_workers(worker)).isdisjoint(workers)
    assert {s for s in served_servers(worker) if s[1] in serving} == built_at_runtime
    assert {(s[1], s[4], s[5], s[6]) for s in built_at_runtime} == {
        ("same-a", 5, True, False), ("same-c", 1, False, False), ("slot:9", 4, True, True)}
    assert sorted(node_statuses(worker.submit("STATS"))) == ["same-a", "same-c", "same-d"]


# ---------------------------------------------------------------------- what still reloads


def reload_case(http_backend: Callable[[str], Any], free_port: Callable[[], int],
                tag: str) -> tuple[int, Any, Any]:
    """A port for the load balancer and two HTTP nodes named <tag>-a and <tag>-b."""
    return free_port(), http_backend(f"{tag}-a"), http_backend(f"{tag}-b")


def test_a_port_change_reloads(worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "port")
    workers = start_lb(worker, port, [a.node()])
    new_port = free_port()

    assert worker.submit(update(lb("HTTP", new_port, [a.node(), b.node()])))["hpcs_response"] == "PASS"

    assert_reloaded(worker, workers, "the change is more than nodes")
    assert set(traffic(url(new_port), 10)[0]) == {"port-a", "port-b"}


def test_an_algorithm_change_reloads(worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "algo")
    workers = start_lb(worker, port, [a.node(), b.node()])

    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [a.node(), b.node()],
                                                        algorithm="LEAST_CONNECTIONS")))

    assert loop.errors == []
    assert_reloaded(worker, workers, "the change is more than nodes")
    assert "balance leastconn" in worker.haproxy_config()


def test_a_monitor_change_reloads(worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "mon")
    workers = start_lb(worker, port, [a.node()])

    reply = worker.submit(update(lb("HTTP", port, [a.node(), b.node()],
                                    monitor=http_monitor("/health"))))

    assert reply["hpcs_response"] == "PASS", reply
    assert_reloaded(worker, workers, "the change is more than nodes")
    wait_until(lambda: b.health_checks > 0, 15, "the new HTTP monitor to check a node")


def test_a_backup_flag_change_moves_the_node_to_a_backup_slot_without_reload(
        worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "bck")
    workers = start_lb(worker, port, [a.node(), b.node()])

    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [a.node(), b.node(backup=True)])))

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    assert traffic(url(port), 10) == ({"bck-a": 10}, 0)
    # The first backup slot (after 8 normal spares) serves it; its old server is retired.
    assert {(s[1], s[5], s[6]) for s in served_servers(worker) if s[1] in ("bck-b", "slot:9")} == {
        ("bck-b", False, False), ("slot:9", True, True)}
    assert sorted(node_statuses(worker.submit("STATS"))) == ["bck-a", "bck-b"]


def test_an_address_change_moves_the_node_to_a_slot_without_reload(
        worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "addr")
    elsewhere = http_backend("addr-b-moved")
    workers = start_lb(worker, port, [a.node(), b.node()])

    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [
        a.node(), b.node(port=elsewhere.port)])))

    assert loop.errors == []
    assert_applied_at_runtime(worker, workers, 0)
    served_at_old = len(b.paths)
    assert set(traffic(url(port), 20)[0]) == {"addr-a", "addr-b-moved"}
    assert len(b.paths) == served_at_old
    assert sorted(node_statuses(worker.submit("STATS"))) == ["addr-a", "addr-b"]


def test_a_verification_mismatch_reloads_and_the_reload_repairs_it(worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "drift")
    workers = start_lb(worker, port, [a.node(), b.node()])
    # Someone changed the running HAProxy behind the worker's back, on a server the UPDATE
    # touches (only those are verified: the cost follows the change, not the backend).
    assert stats_command(worker, "set server lb-http/drift-b state maint").strip() == ""

    reply = worker.submit(update(lb("HTTP", port, [a.node(), b.node(weight=2)])))

    assert reply["hpcs_response"] == "PASS", reply
    assert_reloaded(worker, workers, "the runtime change failed: the running servers differ "
                                     "from the UPDATE: lb-http/drift-b is in maintenance")
    assert {(s[1], s[4], s[5]) for s in served_servers(worker) if not s[1].startswith("slot:")} == {
        ("drift-a", 1, True), ("drift-b", 2, True)}


def test_a_refused_runtime_command_reloads(worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "gone")
    workers = start_lb(worker, port, [a.node(), b.node()])
    # A server deleted by hand: the planned `set server` then finds no such server.
    assert stats_command(worker, "set server lb-http/gone-b state maint").strip() == ""
    wait_until(lambda: stats_command(worker, "del server lb-http/gone-b").strip() == "Server deleted.",
               10, "the hand-made deletion")

    reply = worker.submit(update(lb("HTTP", port, [a.node(), b.node(weight=2)])))

    assert reply["hpcs_response"] == "PASS", reply
    assert_reloaded(worker, workers, "the runtime change failed: HAProxy answered 'No such server.'")
    assert set(traffic(url(port), 10)[0]) == {"gone-a", "gone-b"}


def test_the_first_update_and_an_update_while_suspended_do_not_use_the_runtime_api(
        worker, http_backend, free_port):
    port, a, b = reload_case(http_backend, free_port, "sus")
    start_lb(worker, port, [a.node()])
    assert worker.submit("SUSPEND")["hpcs_response"] == "PASS"

    assert worker.submit(update(lb("HTTP", port, [a.node(), b.node()])))["hpcs_response"] == "PASS"
    assert worker.submit("ENABLE")["hpcs_response"] == "PASS"

    assert RUNTIME_LINE not in worker.log_text()
    assert set(traffic(url(port), 10)[0]) == {"sus-a", "sus-b"}


def test_a_removed_server_with_open_connections_is_retired_without_cutting_them(
        worker, tcp_backend, free_port):
    """A connection held on a removed node neither blocks the UPDATE nor is cut by it.

    Each held TCP connection keeps its node's server busy (the backends wait up to 5 s for
    a line), as keep-alive clients do for HTTP. The UPDATE must still be applied at
    runtime; the removed server is retired in maintenance, answers on its open connection,
    takes no new one, is absent from STATS, and stays retired (never deleted: it is a
    line of the file) once its connection ended.
    """
    a, b = tcp_backend("held-a"), tcp_backend("held-b")
    port = free_port()
    reply = worker.submit(update(lb("TCP", port, [a.node(), b.node()])))
    assert reply["hpcs_response"] == "PASS", reply
    workers = current_workers(worker)
    held = _clients(port, 2)
    try:
        # Round robin over two servers: one held connection sits on each.
        wait_until(lambda: _server_has_sessions(worker, "held-b"), 5, "a session on held-b")

        reply = worker.submit(update(lb("TCP", port, [a.node()])))

        assert reply["hpcs_response"] == "PASS", reply
        assert_applied_at_runtime(worker, workers, 0)
        assert list(node_statuses(worker.submit("STATS"))) == ["held-a"]
        assert _server_state(worker, "held-b") is not None, "deleted while still connected"
        for connection in held:
            connection.sendall(b"still there?\n")
        assert sorted(connection.recv(64).decode() for connection in held) == ["held-a", "held-b"]
    finally:
        for connection in held:
            connection.close()
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as fresh:
            fresh.sendall(b"new\n")
            assert fresh.recv(64) == b"held-a"
    wait_until(lambda: not _server_has_sessions(worker, "held-b"), 15,
               "the retired server's connection to end")
    assert _server_state(worker, "held-b").split()[6] != "0", "the retired server left maintenance"
    assert list(node_statuses(worker.submit("STATS"))) == ["held-a"]
    assert current_workers(worker) == workers


def test_a_node_back_while_its_server_is_retired_is_revived_at_runtime(
        worker, tcp_backend, free_port):
    a, b = tcp_backend("back-a"), tcp_backend("back-b")
    port = free_port()
    assert worker.submit(update(lb("TCP", port, [a.node(), b.node()])))["hpcs_response"] == "PASS"
    workers = current_workers(worker)
    held = _clients(port, 2)
    try:
        wait_until(lambda: _server_has_sessions(worker, "back-b"), 5, "a session on back-b")
        assert worker.submit(update(lb("TCP", port, [a.node()])))["hpcs_response"] == "PASS"
        assert _server_state(worker, "back-b") is not None  # retired, still connected

        reply = worker.submit(update(lb("TCP", port, [a.node(), b.node(weight=3)])))

        assert reply["hpcs_response"] == "PASS", reply
        assert_applied_at_runtime(worker, workers, 1)
        answers = set()
        for fresh in _clients(port, 8, first=10):
            with fresh:
                fresh.sendall(b"new\n")
                answers.add(fresh.recv(64).decode())
        assert answers == {"back-a", "back-b"}
        assert sorted(node_statuses(worker.submit("STATS"))) == ["back-a", "back-b"]
        # Its own server again (still connected to the same address), not a slot.
        assert {(s[1], s[4], s[5]) for s in served_servers(worker) if s[5]} == {
            ("back-a", 1, True), ("back-b", 3, True)}
    finally:
        for connection in held:
            connection.close()
    assert current_workers(worker) == workers


def _clients(port: int, count: int, first: int = 2) -> list[socket.socket]:
    """Connections from `count` client addresses (127.0.0.<first>, ...): the TCP load
    balancer keeps each client address on one node (Libra's source stickiness), so only
    different clients are balanced."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5,
                                     source_address=(f"127.0.0.{first + n}", 0))
            for n in range(count)]


def _server_state(worker: Worker, name: str) -> str | None:
    for line in stats_command(worker, "show servers state lb-tcp").splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == name:
            return line
    return None


def _server_has_sessions(worker: Worker, name: str) -> bool:
    for line in stats_command(worker, "show stat").splitlines():
        fields = line.split(",")
        if fields[:2] == ["lb-tcp", name]:
            return int(fields[4] or 0) > 0  # scur
    return False
