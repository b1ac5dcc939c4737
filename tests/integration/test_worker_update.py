"""UPDATE, SUSPEND, ENABLE, DELETE, STATS and DISCOVER through the real gearmand.

Every test asserts what real clients observe: which backend answered, whether the port
accepts connections, and what STATS reports from HAProxy's own stats socket.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.integration.support import (
    TrafficLoop,
    connection_refused,
    free_privileged_port,
    http_monitor,
    lb,
    node_statuses,
    start_as_nobody,
    traffic,
    update,
    wait_until,
)


def url(port: int, path: str = "/") -> str:
    return f"http://127.0.0.1:{port}{path}"


def waiting_checks(root: int) -> set[int]:
    """The `haproxy -c -f /dev/stdin` processes below `root`: between jobs, the one the
    worker keeps waiting for its next check."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            # The parent pid is the 4th field, after the name in parentheses.
            parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    below, found = {root}, True
    while found:
        found = {pid for pid, parent in parents.items() if parent in below} - below
        below |= found
    checks = set()
    for pid in below - {root}:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command[1:5] == [b"-c", b"-f", b"/dev/stdin", b""]:
            checks.add(pid)
    return checks


def test_round_robin_spreads_requests_over_every_node(worker, http_backend, free_port):
    nodes = [http_backend(name) for name in ("rr-a", "rr-b", "rr-c")]
    port = free_port()

    reply = worker.submit(update(lb("HTTP", port, [node.node() for node in nodes])))

    assert reply["hpcs_response"] == "PASS", reply
    answered, failures = traffic(url(port), 30)
    assert failures == 0
    assert set(answered) == {"rr-a", "rr-b", "rr-c"}
    # Round robin with equal weights: each node gets its third, give or take one.
    assert all(9 <= count <= 11 for count in answered.values()), answered
    assert sorted(node_statuses(worker.submit("STATS"))) == ["rr-a", "rr-b", "rr-c"]


def test_second_update_replaces_the_node_set(worker, http_backend, free_port):
    old, new = http_backend("old-node"), http_backend("new-node")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [old.node()])))["hpcs_response"] == "PASS"
    assert traffic(url(port), 5) == ({"old-node": 5}, 0)
    pid_before = worker.haproxy.master_pid()

    reply = worker.submit(update(lb("HTTP", port, [new.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    served_by_old = len(old.paths)
    answered, failures = traffic(url(port), 20)
    assert (answered, failures) == ({"new-node": 20}, 0)
    assert len(old.paths) == served_by_old
    assert list(node_statuses(worker.submit("STATS"))) == ["new-node"]
    # A reload of the running master, not a restart.
    assert worker.haproxy.master_pid() == pid_before


def test_every_checked_update_leaves_one_haproxy_check_waiting_for_the_next(
        worker, http_backend, free_port):
    node = http_backend("checked")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    first = waiting_checks(worker.process.pid)
    assert len(first) == 1

    # A change that reloads takes the waiting check, and starts the next one meanwhile.
    reply = worker.submit(update(lb("HTTP", port, [node.node()], algorithm="LEAST_CONNECTIONS")))

    assert reply["hpcs_response"] == "PASS", reply
    second = waiting_checks(worker.process.pid)
    assert len(second) == 1 and second.isdisjoint(first)
    assert traffic(url(port), 3) == ({"checked": 3}, 0)


def test_update_can_move_the_load_balancer_to_another_port(worker, http_backend, free_port):
    node = http_backend("mover")
    first, second = free_port(), free_port()
    assert worker.submit(update(lb("HTTP", first, [node.node()])))["hpcs_response"] == "PASS"

    reply = worker.submit(update(lb("HTTP", second, [node.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(url(second), 3) == ({"mover": 3}, 0)
    wait_until(lambda: connection_refused(first), 10, f"old port {first} to close")


def test_a_privileged_port_without_the_capability_is_refused_with_the_real_cause(
        worker_factory, http_backend, free_port, nobody_python):
    """An unprivileged worker (no CAP_NET_BIND_SERVICE) asked for a port below 1024: the
    reply says so, instead of "in use", and the running load balancer keeps serving."""
    privileged = free_privileged_port()
    first_unprivileged = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if privileged is None or privileged >= first_unprivileged:
        pytest.skip(f"no free privileged port below {first_unprivileged} on 127.0.0.1")
    worker = start_as_nobody(worker_factory, nobody_python)
    node = http_backend("low-port")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"

    reply = worker.submit(update(lb("HTTP", privileged, [node.node()])))

    assert reply["hpcs_response"] == "FAIL", reply
    assert reply["hpcs_error"] == (
        f"Port {privileged} needs CAP_NET_BIND_SERVICE or root (ports below {first_unprivileged} "
        "are privileged); the load balancer was left unchanged.")
    assert traffic(url(port), 3) == ({"low-port": 3}, 0)
    assert connection_refused(privileged)


def test_weights_skew_traffic(worker, http_backend, free_port):
    heavy, light = http_backend("heavy"), http_backend("light")
    port = free_port()
    reply = worker.submit(update(lb("HTTP", port, [heavy.node(weight=3), light.node(weight="1")])))
    assert reply["hpcs_response"] == "PASS", reply

    answered, failures = traffic(url(port), 200)

    assert failures == 0
    assert answered["heavy"] + answered["light"] == 200
    assert 2.0 <= answered["heavy"] / answered["light"] <= 4.5, answered


def test_least_connections_renders_and_serves(worker, http_backend, free_port):
    first, second = http_backend("lc-a"), http_backend("lc-b")
    port = free_port()

    reply = worker.submit(update(lb("HTTP", port, [first.node(), second.node()],
                                    algorithm="LEAST_CONNECTIONS")))

    assert reply["hpcs_response"] == "PASS", reply
    assert "balance leastconn" in worker.haproxy_config()
    answered, failures = traffic(url(port), 20)
    assert failures == 0
    # Sequential requests leave both nodes idle, so leastconn rotates between them.
    assert set(answered) == {"lc-a", "lc-b"}, answered


def test_backup_node_takes_over_only_while_the_primary_fails_its_monitor(worker, http_backend, free_port):
    primary, backup = http_backend("primary"), http_backend("backup")
    port = free_port()
    reply = worker.submit(update(lb("HTTP", port, [primary.node(), backup.node(backup=True)],
                                    monitor=http_monitor("/health", delay=1, timeout=1, attempts=2))))
    assert reply["hpcs_response"] == "PASS", reply
    assert "option httpchk GET '/health'" in worker.haproxy_config()
    wait_until(lambda: primary.health_checks > 0, 15, "the first HTTP health check of the primary")
    assert traffic(url(port), 10) == ({"primary": 10}, 0)
    assert node_statuses(worker.submit("STATS")) == {"primary": "UP", "backup": "UP"}

    primary.health_status = 500
    wait_until(lambda: node_statuses(worker.submit("STATS"))["primary"] == "DOWN", 15,
               "STATS to show the primary DOWN")
    assert traffic(url(port), 10) == ({"backup": 10}, 0)

    primary.health_status = 200
    wait_until(lambda: node_statuses(worker.submit("STATS"))["primary"] == "UP", 15,
               "STATS to show the primary UP again")
    assert traffic(url(port), 10) == ({"primary": 10}, 0)


def test_disabled_node_gets_no_traffic_but_appears_in_stats(worker, http_backend, free_port):
    active, disabled = http_backend("active"), http_backend("disabled")
    port = free_port()

    reply = worker.submit(update(lb("HTTP", port, [active.node(), disabled.node(condition="DISABLED")])))

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(url(port), 12) == ({"active": 12}, 0)
    assert disabled.paths == []
    statuses = node_statuses(worker.submit("STATS"))
    assert statuses == {"active": "UP", "disabled": "DOWN"}


def test_tcp_load_balancer_carries_traffic(worker, tcp_backend, free_port):
    first, second = tcp_backend("tcp-a"), tcp_backend("tcp-b")
    port = free_port()

    reply = worker.submit(update(lb("TCP", port, [first.node(), second.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    # One client address stays on one node (Libra's source stickiness), the next client
    # is balanced to the other.
    answered, failures = traffic(f"tcp://127.0.0.1:{port}/ping", 5)
    assert failures == 0 and len(answered) == 1 and sum(answered.values()) == 5
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=("127.0.0.2", 0)) as other:
        other.sendall(b"other\n")
        assert other.recv(100).decode() not in answered
    assert sorted(first.lines + second.lines) == ["other"] + ["ping"] * 5
    assert "mode tcp" in worker.haproxy_config()


def test_http_and_tcp_in_one_update(worker, http_backend, tcp_backend, free_port):
    web, raw = http_backend("web-1"), tcp_backend("raw-1")
    http_port, tcp_port = free_port(), free_port()

    reply = worker.submit(update(lb("HTTP", http_port, [web.node()]), lb("TCP", tcp_port, [raw.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(url(http_port), 5) == ({"web-1": 5}, 0)
    assert traffic(f"tcp://127.0.0.1:{tcp_port}", 5) == ({"raw-1": 5}, 0)
    assert node_statuses(worker.submit("STATS")) == {"web-1": "UP", "raw-1": "UP"}


def test_field_names_and_values_are_case_insensitive_and_the_reply_echoes_the_message(
        worker, http_backend, free_port):
    node = http_backend("cased")
    port = free_port()
    message = {
        "HPCS_Action": "update",
        "LOADBALANCERS": [{
            "Protocol": "Http",
            "PORT": str(port),
            "Algorithm": "Round_Robin",
            "Nodes": [{"ID": "cased", "Address": "127.0.0.1", "Port": node.port,
                       "Weight": "2", "Condition": "enabled"}],
            "Monitor": {"Type": "http", "Delay": "2", "Timeout": 1, "Attempts": 1, "PATH": "/health"},
        }],
        "Extraneous_Field": {"kept": True},
    }

    reply = worker.submit(message)

    assert reply == {**message, "hpcs_response": "PASS"}
    assert list(reply)[:3] == ["HPCS_Action", "LOADBALANCERS", "Extraneous_Field"]
    assert traffic(url(port), 4) == ({"cased": 4}, 0)
    config = worker.haproxy_config()
    assert "balance roundrobin" in config and "weight 2" in config
    assert "option httpchk GET '/health'" in config
    assert worker.submit({"hpcs_action": "sTaTs"})["hpcs_response"] == "PASS"


def test_suspend_and_enable_are_idempotent(worker, http_backend, free_port):
    node = http_backend("sleeper")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert traffic(url(port), 3) == ({"sleeper": 3}, 0)

    for _ in range(2):
        reply = worker.submit("SUSPEND")
        assert reply == {"hpcs_action": "SUSPEND", "hpcs_response": "PASS"}
        assert connection_refused(port)
        assert worker.haproxy.our_pids() == []
    stats = worker.submit("STATS")
    assert stats["hpcs_response"] == "FAIL" and stats["status"] == "SUSPENDED", stats

    for _ in range(2):
        reply = worker.submit("ENABLE")
        assert reply == {"hpcs_action": "ENABLE", "hpcs_response": "PASS"}
        assert traffic(url(port), 3) == ({"sleeper": 3}, 0)
    assert node_statuses(worker.submit("STATS")) == {"sleeper": "UP"}


def test_update_while_suspended_stays_suspended_until_enable(worker, http_backend, free_port):
    before, after = http_backend("before"), http_backend("after")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [before.node()])))["hpcs_response"] == "PASS"
    assert worker.submit("SUSPEND")["hpcs_response"] == "PASS"

    reply = worker.submit(update(lb("HTTP", port, [after.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    assert connection_refused(port)
    assert worker.submit("ENABLE")["hpcs_response"] == "PASS"
    assert traffic(url(port), 4) == ({"after": 4}, 0)


def test_delete_stops_serving_and_a_later_update_builds_the_lb_again(worker, http_backend, free_port):
    node = http_backend("phoenix")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert traffic(url(port), 2) == ({"phoenix": 2}, 0)

    for _ in range(2):
        assert worker.submit("DELETE") == {"hpcs_action": "DELETE", "hpcs_response": "PASS"}
        assert connection_refused(port)
        assert worker.haproxy.our_pids() == []
    stats = worker.submit("STATS")
    assert stats["hpcs_response"] == "FAIL" and stats["status"] == "DELETED", stats
    assert stats["hpcs_error"]
    # As in Libra: SUSPEND passes (nothing listens, which is what it asks); ENABLE cannot.
    assert worker.submit("SUSPEND") == {"hpcs_action": "SUSPEND", "hpcs_response": "PASS"}
    assert worker.submit("STATS")["status"] == "DELETED"
    refused = worker.submit("ENABLE")
    assert refused["hpcs_response"] == "FAIL" and "deleted" in refused["hpcs_error"], refused
    assert not (worker.state_dir / "haproxy.cfg").exists()

    reply = worker.submit(update(lb("HTTP", port, [node.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(url(port), 3) == ({"phoenix": 3}, 0)
    assert node_statuses(worker.submit("STATS")) == {"phoenix": "UP"}


def test_discover_returns_version_and_release(worker):
    from libra_worker import __version__

    reply = worker.submit({"hpcs_action": "DISCOVER", "extra": 1})

    assert reply["hpcs_response"] == "PASS"
    assert reply["version"] == __version__
    assert __version__ in reply["release"]
    assert reply["extra"] == 1 and reply["hpcs_action"] == "DISCOVER"


def test_stats_before_any_update_fails_with_status_new(worker):
    reply = worker.submit("STATS")

    assert reply["hpcs_response"] == "FAIL"
    assert reply["status"] == "NEW" and reply["hpcs_error"]


def test_updates_under_load_drop_no_request(worker, http_backend, tcp_backend, free_port):
    webs = [http_backend("load-a"), http_backend("load-b")]
    raws = [tcp_backend("load-t1"), tcp_backend("load-t2")]
    http_port, tcp_port = free_port(), free_port()

    def device(index: int) -> dict:
        return update(lb("HTTP", http_port, [webs[index].node()]), lb("TCP", tcp_port, [raws[index].node()]))

    assert worker.submit(device(0))["hpcs_response"] == "PASS"
    with TrafficLoop(url(http_port)) as web_loop, TrafficLoop(f"tcp://127.0.0.1:{tcp_port}/x") as raw_loop:
        for index in (1, 0, 1):
            reply = worker.submit(device(index))
            assert reply["hpcs_response"] == "PASS", reply
            done = web_loop.total, raw_loop.total
            wait_until(lambda: web_loop.total > done[0] + 3 and raw_loop.total > done[1] + 3, 10,
                       "traffic after the reload")

    assert web_loop.errors == [] and raw_loop.errors == []
    assert set(web_loop.answered) == {"load-a", "load-b"}
    assert set(raw_loop.answered) == {"load-t1", "load-t2"}
    assert traffic(url(http_port), 3) == ({"load-b": 3}, 0)


def test_http_and_tcp_can_swap_ports(worker, http_backend, tcp_backend, free_port):
    web, raw = http_backend("swap-web"), tcp_backend("swap-raw")
    first, second = free_port(), free_port()
    assert worker.submit(update(lb("HTTP", first, [web.node()]),
                                lb("TCP", second, [raw.node()])))["hpcs_response"] == "PASS"

    reply = worker.submit(update(lb("HTTP", second, [web.node()]), lb("TCP", first, [raw.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(url(second), 3) == ({"swap-web": 3}, 0)
    assert traffic(f"tcp://127.0.0.1:{first}", 3) == ({"swap-raw": 3}, 0)


def test_protocol_change_on_the_same_port(worker, http_backend, tcp_backend, free_port):
    web, raw = http_backend("was-http"), tcp_backend("now-tcp")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [web.node()])))["hpcs_response"] == "PASS"

    reply = worker.submit(update(lb("TCP", port, [raw.node()])))

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(f"tcp://127.0.0.1:{port}", 3) == ({"now-tcp": 3}, 0)
    assert list(node_statuses(worker.submit("STATS"))) == ["now-tcp"]


def test_dropping_the_tcp_lb_closes_its_port(worker, http_backend, tcp_backend, free_port):
    web, raw = http_backend("stays"), tcp_backend("leaves")
    http_port, tcp_port = free_port(), free_port()
    assert worker.submit(update(lb("HTTP", http_port, [web.node()]),
                                lb("TCP", tcp_port, [raw.node()])))["hpcs_response"] == "PASS"

    assert worker.submit(update(lb("HTTP", http_port, [web.node()])))["hpcs_response"] == "PASS"

    wait_until(lambda: connection_refused(tcp_port), 10, f"TCP port {tcp_port} to close")
    assert traffic(url(http_port), 3) == ({"stays": 3}, 0)
    assert node_statuses(worker.submit("STATS")) == {"stays": "UP"}


def test_connect_monitor_takes_a_dead_tcp_node_out(worker, tcp_backend, free_port):
    alive, doomed = tcp_backend("alive"), tcp_backend("doomed")
    port = free_port()
    monitor = {"type": "CONNECT", "delay": 1, "timeout": 1, "attempts": 1}
    reply = worker.submit(update(lb("TCP", port, [alive.node(), doomed.node()], monitor=monitor)))
    assert reply["hpcs_response"] == "PASS", reply
    assert "check inter 1s fall 1" in worker.haproxy_config()

    doomed.stop()

    wait_until(lambda: node_statuses(worker.submit("STATS"))["doomed"] == "DOWN", 15,
               "STATS to show the stopped node DOWN")
    assert node_statuses(worker.submit("STATS"))["alive"] == "UP"
    assert traffic(f"tcp://127.0.0.1:{port}", 6) == ({"alive": 6}, 0)


def test_first_update_on_a_busy_port_starts_nothing(worker, http_backend, free_port):
    node = http_backend("never")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen(1)
        busy = holder.getsockname()[1]

        reply = worker.submit(update(lb("HTTP", busy, [node.node()])))

        assert reply["hpcs_response"] == "FAIL", reply
        assert str(busy) in reply["hpcs_error"]
        assert worker.haproxy.our_pids() == []
        assert worker.submit("STATS")["status"] == "NEW"

    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert traffic(url(port), 2) == ({"never": 2}, 0)


def test_same_update_twice_passes_and_serves(worker, http_backend, free_port):
    node = http_backend("twice")
    port = free_port()
    message = update(lb("HTTP", port, [node.node()]))

    assert worker.submit(message)["hpcs_response"] == "PASS"
    assert worker.submit(message)["hpcs_response"] == "PASS"

    assert traffic(url(port), 3) == ({"twice": 3}, 0)
