"""Unit tests for libra_worker.drivers.haproxy.runtime: the node diff and the verification.

The diff is pure, so every kind of change is covered here without HAProxy. The parsing
tests use answers captured from HAProxy 2.6.12's stats socket. The executor's failure
paths (an unexpected answer, a server still connected) run against a tiny fake stats
socket; its success paths run against the real HAProxy in
tests/integration/test_runtime_changes.py.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import pytest

from libra_worker.drivers.haproxy import render, runtime
from libra_worker.drivers.haproxy.runtime import (
    Command,
    DesiredServer,
    RunningServer,
    RuntimeChangeFailed,
    mismatches,
    parse_servers_state,
    plan_node_changes,
    running_servers,
)
from libra_worker.drivers.haproxy.sockets import parse_stat_csv
from libra_worker.messages import (
    Algorithm,
    Device,
    LoadBalancer,
    Monitor,
    MonitorType,
    Node,
    Options,
    Protocol,
    parse_device,
)

MONITOR = Monitor(MonitorType.CONNECT, delay=5, timeout=2, attempts=3)
CHECK = "check inter 5s fall 3 rise 2"


# ---------------------------------------------------------------------- factories


def node(id: str, port: int = 8000, **fields: object) -> Node:
    return Node(id=id, address="127.0.0.2", port=port, **fields)  # type: ignore[arg-type]


def http_lb(*nodes: Node, **fields: object) -> LoadBalancer:
    values: dict[str, object] = {"protocol": Protocol.HTTP, "port": 80, "nodes": tuple(nodes),
                                 "monitor": MONITOR}
    values.update(fields)
    return LoadBalancer(**values)  # type: ignore[arg-type]


def tcp_lb(*nodes: Node, **fields: object) -> LoadBalancer:
    return http_lb(*nodes, protocol=Protocol.TCP, port=3306, **fields)


def device(*loadbalancers: LoadBalancer) -> Device:
    return Device(tuple(loadbalancers))


def texts(plan: runtime.RuntimePlan) -> list[str]:
    return [command.text for command in plan.commands]


BASE = device(http_lb(node("a", 8001), node("b", 8002, weight=2)))


# ---------------------------------------------------------------------- the diff: node changes


COOKIES = render.Persistence(http_cookie=True, tcp_source=True, peer=("127.0.0.1", 7441),
                             cookie_key="ab" * 32)


def test_servers_added_to_a_cookie_backend_get_their_cookies_before_they_serve():
    added = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003),
                           node("d", 8004, enabled=False)))

    plan = plan_node_changes(BASE, added, persistence=COOKIES)

    assert plan is not None
    # HAProxy 2.6 computes no cookie on `add server`: once for both, then they serve.
    assert texts(plan) == [
        f"add server lb-http/c 127.0.0.2:8003 weight 1 {CHECK}",
        f"add server lb-http/d 127.0.0.2:8004 weight 1 {CHECK} disabled",
        "enable dynamic-cookie backend lb-http",
        "enable health lb-http/c",
        "enable server lb-http/c",
        "enable health lb-http/d",
    ]
    assert plan.added == ("lb-http/c", "lb-http/d")
    assert "enable dynamic-cookie backend lb-http" not in texts(plan_node_changes(BASE, added))


def test_a_cookie_backend_without_additions_needs_no_cookie_command():
    changed = device(http_lb(node("a", 8001, weight=5)))
    plan = plan_node_changes(BASE, changed, persistence=COOKIES)
    assert texts(plan) == ["set server lb-http/a weight 5", "set server lb-http/b state maint"]
    # A retired server keeps the cookie it was given: it comes back as it was.
    back = plan_node_changes(changed, BASE, {"lb-http/b": node("b", 8002, weight=2)},
                             persistence=COOKIES)
    assert texts(back) == ["set server lb-http/b state ready", "set server lb-http/a weight 1"]


def test_tcp_and_galera_backends_have_no_cookie_to_compute():
    for protocol in (Protocol.TCP, Protocol.GALERA):
        old = device(http_lb(node("a", 8001), protocol=protocol, port=3306))
        new = device(http_lb(node("a", 8001), node("b", 8002, backup=True), protocol=protocol,
                             port=3306))
        plan = plan_node_changes(old, new, persistence=COOKIES)
        assert plan.added == ("lb-tcp/b",)
        assert not any("dynamic-cookie" in text for text in texts(plan))


def test_an_identical_update_needs_no_command_and_touches_no_server():
    plan = plan_node_changes(BASE, BASE)

    assert plan is not None
    assert (plan.commands, plan.removals, plan.added, plan.changed) == ((), (), (), ())
    assert plan.backends == ("lb-http",)
    assert plan.desired == ()


def test_an_identical_update_sends_nothing_to_haproxy(fake_socket):
    fake = fake_socket({})

    assert runtime.apply_plan(plan_node_changes(BASE, BASE), fake.path, timeout=2) == ()
    assert fake.received == []


def test_only_the_changed_servers_are_expected():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=3), node("c", 8003)))

    plan = plan_node_changes(BASE, new)

    assert plan is not None
    assert plan.desired == (
        DesiredServer("lb-http", "c", "127.0.0.2", 8003, 1, False, True),
        DesiredServer("lb-http", "b", "127.0.0.2", 8002, 3, False, True),
    )


def test_a_new_node_is_added_checked_then_enabled_with_its_config_line_options():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003, weight=7)))

    plan = plan_node_changes(BASE, new)

    assert plan is not None
    assert plan.commands == (
        Command(f"add server lb-http/c 127.0.0.2:8003 weight 7 {CHECK}", runtime.ADDED),
        Command("enable health lb-http/c", ""),
        Command("enable server lb-http/c", ""),
    )
    assert plan.added == ("lb-http/c",)
    assert [server.name for server in plan.desired] == ["c"]


def test_a_new_backup_node_carries_the_backup_keyword():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003, backup=True)))

    plan = plan_node_changes(BASE, new)

    assert plan is not None
    assert texts(plan)[0] == f"add server lb-http/c 127.0.0.2:8003 weight 1 {CHECK} backup"
    assert plan.desired[-1].backup is True


def test_a_new_disabled_node_is_added_in_maintenance_with_checks_ready():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003, enabled=False)))

    plan = plan_node_changes(BASE, new)

    assert plan is not None
    assert texts(plan) == [
        f"add server lb-http/c 127.0.0.2:8003 weight 1 {CHECK} disabled",
        "enable health lb-http/c",
    ]
    assert plan.desired[-1].enabled is False


def test_a_new_ipv6_node_uses_haproxy_address_syntax():
    ipv6 = Node(id="v6", address="2001:db8::5", port=443)
    plan = plan_node_changes(BASE, device(http_lb(node("a", 8001), node("b", 8002, weight=2), ipv6)))

    assert plan is not None
    assert texts(plan)[0] == f"add server lb-http/v6 2001:db8::5:443 weight 1 {CHECK}"


def test_a_node_without_id_is_named_as_the_configuration_names_it():
    old = parse_device({"loadbalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": [{"address": "10.0.0.1", "port": 80}]}]})
    new = parse_device({"loadbalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": [{"address": "10.0.0.1", "port": 80},
                                                   {"address": "10.0.0.2", "port": 80}]}]})

    plan = plan_node_changes(old, new)

    assert plan is not None
    assert plan.added == ("lb-http/10.0.0.2_80",)


def test_a_removed_node_goes_to_maintenance_then_is_deleted():
    plan = plan_node_changes(BASE, device(http_lb(node("a", 8001))))

    assert plan is not None
    assert texts(plan) == ["set server lb-http/b state maint"]
    assert plan.removals == ("lb-http/b",)
    assert plan.desired == ()


def test_removing_every_node_still_verifies_the_emptied_backend():
    plan = plan_node_changes(BASE, device(http_lb()))

    assert plan is not None
    assert plan.removals == ("lb-http/a", "lb-http/b")
    assert plan.desired == ()
    assert plan.backends == ("lb-http",)


def test_a_weight_change_is_set_in_place():
    new = device(http_lb(node("a", 8001, weight=256), node("b", 8002, weight=2)))

    plan = plan_node_changes(BASE, new)

    assert plan is not None
    assert texts(plan) == ["set server lb-http/a weight 256"]
    assert plan.changed == ("lb-http/a",)


def test_disabling_and_enabling_nodes_set_their_state():
    old = device(http_lb(node("a", 8001), node("b", 8002, enabled=False)))
    new = device(http_lb(node("a", 8001, enabled=False), node("b", 8002)))

    plan = plan_node_changes(old, new)

    assert plan is not None
    assert texts(plan) == ["set server lb-http/a state maint", "set server lb-http/b state ready"]
    assert plan.removals == ()


def test_weight_and_condition_change_together():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=5, enabled=False)))

    plan = plan_node_changes(BASE, new)

    assert plan is not None
    assert texts(plan) == ["set server lb-http/b weight 5", "set server lb-http/b state maint"]


def test_reordered_nodes_need_no_command():
    plan = plan_node_changes(BASE, device(http_lb(node("b", 8002, weight=2), node("a", 8001))))

    assert plan is not None
    assert plan.commands == ()


def test_capacity_is_added_before_any_is_taken_away():
    old = device(http_lb(node("a", 8001), node("b", 8002), node("c", 8003)))
    new = device(http_lb(node("b", 8002, weight=3), node("d", 8004), node("c", 8003, enabled=False)))

    plan = plan_node_changes(old, new)

    assert plan is not None
    assert texts(plan) == [
        f"add server lb-http/d 127.0.0.2:8004 weight 1 {CHECK}",
        "enable health lb-http/d",
        "enable server lb-http/d",
        "set server lb-http/b weight 3",
        "set server lb-http/c state maint",
        "set server lb-http/a state maint",
    ]
    assert plan.removals == ("lb-http/a",)
    assert plan.summary() == "1 node(s) added, 1 removed, 2 changed"


def test_both_load_balancers_are_planned_each_on_its_backend():
    old = device(http_lb(node("a", 8001)), tcp_lb(node("t", 9001)))
    new = device(http_lb(node("a", 8001, weight=4)), tcp_lb(node("u", 9002)))

    plan = plan_node_changes(old, new)

    assert plan is not None
    assert texts(plan) == [
        "set server lb-http/a weight 4",
        f"add server lb-tcp/u 127.0.0.2:9002 weight 1 {CHECK}",
        "enable health lb-tcp/u",
        "enable server lb-tcp/u",
        "set server lb-tcp/t state maint",
    ]
    assert plan.removals == ("lb-tcp/t",)
    assert plan.backends == ("lb-http", "lb-tcp")


def test_the_same_node_id_in_both_backends_is_two_servers():
    old = device(http_lb(node("n", 8001)), tcp_lb(node("n", 9001)))
    new = device(http_lb(node("n", 8001, weight=5)), tcp_lb())

    plan = plan_node_changes(old, new)

    assert plan is not None
    assert plan.removals == ("lb-tcp/n",)
    assert [(server.backend, server.name) for server in plan.desired] == [("lb-http", "n")]


# ---------------------------------------------------------------------- the diff: reloads


@pytest.mark.parametrize("changed", [
    pytest.param(node("a", 8001, weight=1, backup=True), id="backup flag"),
    pytest.param(node("a", 8009), id="port"),
    pytest.param(Node(id="a", address="127.0.0.3", port=8001), id="address"),
])
def test_a_node_that_must_be_recreated_takes_a_reload(changed):
    assert plan_node_changes(BASE, device(http_lb(changed, node("b", 8002, weight=2)))) is None


@pytest.mark.parametrize("fields", [
    pytest.param({"port": 81}, id="port"),
    pytest.param({"protocol": Protocol.TCP}, id="protocol"),
    pytest.param({"algorithm": Algorithm.LEAST_CONNECTIONS}, id="algorithm"),
    pytest.param({"monitor": replace(MONITOR, type=MonitorType.HTTP)}, id="monitor type"),
    pytest.param({"monitor": replace(MONITOR, delay=6)}, id="monitor delay"),
    pytest.param({"monitor": replace(MONITOR, timeout=1)}, id="monitor timeout"),
    pytest.param({"monitor": replace(MONITOR, attempts=4)}, id="monitor attempts"),
    pytest.param({"monitor": replace(MONITOR, path="/health")}, id="monitor path"),
    pytest.param({"options": Options(client_timeout_ms=1000)}, id="client timeout"),
    pytest.param({"options": Options(server_timeout_ms=1000)}, id="server timeout"),
    pytest.param({"options": Options(connect_timeout_ms=1000)}, id="connect timeout"),
    pytest.param({"options": Options(connect_retries=0)}, id="connect retries"),
    pytest.param({"id": "lb-42"}, id="lb id"),
    pytest.param({"name": "shop"}, id="lb name"),
])
def test_any_load_balancer_level_difference_takes_a_reload(fields):
    nodes = BASE.loadbalancers[0].nodes
    new = device(http_lb(*nodes, **fields))

    assert plan_node_changes(BASE, new) is None
    # ... even when the nodes change too.
    assert plan_node_changes(BASE, device(http_lb(*nodes[:1], **fields))) is None


def test_adding_or_removing_a_load_balancer_takes_a_reload():
    both = device(http_lb(node("a", 8001)), tcp_lb(node("t", 9001)))

    assert plan_node_changes(BASE, both) is None
    assert plan_node_changes(both, device(http_lb(node("a", 8001)))) is None


def test_swapping_the_order_of_the_load_balancers_takes_a_reload():
    http, tcp = http_lb(node("a", 8001)), tcp_lb(node("t", 9001))

    assert plan_node_changes(device(http, tcp), device(tcp, http)) is None


# ---------------------------------------------------------------------- parsing the answers

# Captured from HAProxy 2.6.12: a config server UP, one `disabled` in the file, a dynamic
# one added `disabled` then enabled, and a dynamic IPv6 backup never enabled.
SERVERS_STATE = (
    "1\n"
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
    "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
    "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n"
    "3 lb-http 1 a 127.0.0.1 2 0 1 1 0 15 3 3 6 0 0 0 - 26188 - 0 0 - - 0\n"
    "3 lb-http 2 b 127.0.0.1 0 5 1 1 0 1 0 0 14 0 0 0 - 27246 - 0 0 - - 0\n"
    "3 lb-http 3 c 127.0.0.1 2 4 3 3 0 1 0 2 6 0 0 0 - 31947 - 0 0 - - 0\n"
    "3 lb-http 4 v6 ::1 0 1 1 1 0 1 0 0 2 0 0 0 - 8080 - 0 0 - - 0\n"
    "\n"
)
_STAT_HEADER = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,"
                "eresp,wretr,wredis,status,weight,act,bck,chkfail,addr\n")
SHOW_STAT = (
    _STAT_HEADER
    + "lb-http,FRONTEND,,,0,0,4096,0,0,0,0,0,0,,,,,OPEN,,,,,\n"
    + "lb-http,a,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,0,127.0.0.1:26188\n"
    + "lb-http,b,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,1,1,0,0,127.0.0.1:27246\n"
    + "lb-http,c,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,3,1,0,0,127.0.0.1:31947\n"
    + "lb-http,v6,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,1,0,1,,[::1]:8080\n"
    + "lb-http,BACKEND,0,0,0,0,410,0,0,0,0,0,,0,0,0,0,UP,4,2,0,,\n"
    + "\n"
)


def stat_of(name: str) -> str:
    """`show stat <be_id> 4 <srv_id>`: the header and that server's line."""
    return _STAT_HEADER + next(line + "\n" for line in SHOW_STAT.splitlines()
                               if line.startswith(f"lb-http,{name},"))


def running() -> list[RunningServer]:
    return running_servers(parse_servers_state(SERVERS_STATE), parse_stat_csv(SHOW_STAT))


def test_servers_state_and_stat_are_joined_per_server():
    servers = {server.name: server for server in running()}

    assert servers["a"] == RunningServer("lb-http", "a", "127.0.0.1", 26188, 1, 0, 6, False)
    assert (servers["a"].enabled, servers["a"].disabled, servers["a"].checked) == (True, False, True)
    # `disabled` in the file: forced and configured maintenance, checks enabled but paused.
    assert (servers["b"].enabled, servers["b"].disabled, servers["b"].checked) == (False, True, True)
    # The configured-maintenance bit (0x04) alone is a leftover, not maintenance.
    assert (servers["c"].weight, servers["c"].enabled, servers["c"].checked) == (3, True, True)
    # Added, but `enable health` never sent.
    assert (servers["v6"].backup, servers["v6"].disabled, servers["v6"].checked) == (True, True, False)


def test_servers_state_rows_can_be_limited_to_named_servers():
    rows = parse_servers_state(SERVERS_STATE, {"b", "v6", "gone"})

    assert [row["srv_name"] for row in rows] == ["b", "v6"]


@pytest.mark.parametrize("answer", [
    "Can't find backend.\n\n",
    "",
    "1\n",
    "2\n# be_id be_name\n3 lb-http\n",
    "1\n# be_id be_name srv_id\n3 lb-http\n",
])
def test_an_unexpected_servers_state_answer_is_refused(answer):
    with pytest.raises(ValueError):
        parse_servers_state(answer)


def test_an_unexpected_stat_answer_is_refused():
    with pytest.raises(ValueError):
        parse_stat_csv("Unknown command.\n")


def test_a_server_missing_from_show_stat_is_refused():
    stat = parse_stat_csv(_STAT_HEADER + "lb-http,a,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,0,x\n")
    with pytest.raises(ValueError, match="lb-http/b"):
        running_servers(parse_servers_state(SERVERS_STATE), stat)


def test_a_servers_state_row_without_a_needed_column_is_refused():
    rows = [{"be_name": "lb-http", "srv_name": "a"}]
    stat = parse_stat_csv(_STAT_HEADER + "lb-http,a,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,0,x\n")
    with pytest.raises(ValueError, match="lacks a field"):
        running_servers(rows, stat)


# ---------------------------------------------------------------------- verification


def desired_as_running() -> list[DesiredServer]:
    return [
        DesiredServer("lb-http", "a", "127.0.0.1", 26188, 1, False, True),
        DesiredServer("lb-http", "b", "127.0.0.1", 27246, 1, False, False),
        DesiredServer("lb-http", "c", "127.0.0.1", 31947, 3, False, True),
    ]


def running_checked() -> list[RunningServer]:
    return [server for server in running() if server.name != "v6"]


def test_matching_servers_have_no_mismatch():
    assert mismatches(desired_as_running(), running_checked(), ["lb-http"]) == []


def test_other_backends_are_not_compared():
    other = RunningServer("lb-tcp", "x", "127.0.0.1", 1, 1, 0, 6, False)

    assert mismatches(desired_as_running(), running_checked() + [other], ["lb-http"]) == []
    assert mismatches(desired_as_running(), running_checked() + [other], ["lb-http", "lb-tcp"]) == [
        "lb-tcp/x should not be running"]


def test_an_ipv6_address_matches_in_any_spelling():
    want = [DesiredServer("lb-http", "v6", "0:0:0:0:0:0:0:1", 8080, 1, True, False)]
    have = [replace(next(s for s in running() if s.name == "v6"), check_state=14)]

    assert mismatches(want, have, ["lb-http"]) == []


@pytest.mark.parametrize("desired_change, expected", [
    ({"weight": 2}, "lb-http/a has weight 1, not 2"),
    ({"port": 1}, "lb-http/a is at 127.0.0.1 port 26188, not 127.0.0.1 port 1"),
    ({"address": "127.0.0.9"}, "lb-http/a is at 127.0.0.1 port 26188, not 127.0.0.9 port 26188"),
    ({"backup": True}, "lb-http/a is not a backup server"),
    ({"enabled": False}, "lb-http/a should be in maintenance (admin state 0x0)"),
])
def test_each_difference_of_a_server_is_named(desired_change, expected):
    want = desired_as_running()
    want[0] = replace(want[0], **desired_change)

    assert mismatches(want, running_checked(), ["lb-http"]) == [expected]


@pytest.mark.parametrize("admin_state", [0x01, 0x08, 0x10, 0x20, 0x05])
def test_an_enabled_node_must_be_out_of_maintenance_and_drain(admin_state):
    have = running_checked()
    have[0] = replace(have[0], admin_state=admin_state)

    assert mismatches(desired_as_running(), have, ["lb-http"]) == [
        f"lb-http/a is in maintenance or draining (admin state {admin_state:#x})"]


@pytest.mark.parametrize("check_state", [0, 2, 4, 10])
def test_every_server_must_have_its_health_check_enabled(check_state):
    have = running_checked()
    have[1] = replace(have[1], check_state=check_state)

    assert mismatches(desired_as_running(), have, ["lb-http"]) == [
        f"lb-http/b has no health check (check state {check_state:#x})"]


def test_missing_and_extra_servers_are_named():
    want = desired_as_running()[:2] + [DesiredServer("lb-http", "d", "127.0.0.1", 1, 1, False, True)]

    assert mismatches(want, running_checked(), ["lb-http"]) == [
        "lb-http/c should not be running", "lb-http/d is not running"]


# ---------------------------------------------------------------------- executor failures


class FakeStatsSocket:
    """A unix socket answering each connection's one command from a canned table."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.received: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="lwrt-"))
        self.path = self.root / "stats.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while chunk := connection.recv(4096):
                    data += chunk
                command = data.decode().strip()
                self.received.append(command)
                connection.sendall(self.answers.get(command, "Unknown command.\n\n").encode())

    def close(self) -> None:
        self.listener.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def fake_socket() -> Iterator[Callable[[dict[str, str]], FakeStatsSocket]]:
    made: list[FakeStatsSocket] = []

    def make(answers: dict[str, str]) -> FakeStatsSocket:
        made.append(FakeStatsSocket(answers))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def test_an_unexpected_answer_stops_the_plan(fake_socket):
    plan = plan_node_changes(BASE, device(http_lb(node("a", 8001), node("b", 8002, weight=2),
                                                  node("c", 8003))))
    fake = fake_socket({plan.commands[0].text: "unknown keyword 'foo'\n\n"})

    with pytest.raises(RuntimeChangeFailed, match="unknown keyword 'foo'"):
        runtime.apply_plan(plan, fake.path, timeout=2)
    assert fake.received == [plan.commands[0].text]


def test_a_removed_server_still_connected_is_retired_not_failed(fake_socket):
    # The running state of SERVERS_STATE: a and c serve, b (removed) is in maintenance.
    def at(id: str, port: int, **fields: object) -> Node:
        return Node(id=id, address="127.0.0.1", port=port, **fields)  # type: ignore[arg-type]

    old = device(http_lb(at("a", 26188), at("b", 27246), at("c", 31947, weight=3)))
    plan = plan_node_changes(old, device(http_lb(at("a", 26188), at("c", 31947, weight=3))))
    fake = fake_socket({"set server lb-http/b state maint": "\n",
                        "del server lb-http/b": runtime.STILL_CONNECTED + "\n",
                        "show servers state lb-http": SERVERS_STATE,
                        "show stat 3 4 2": stat_of("b")})

    assert runtime.apply_plan(plan, fake.path, timeout=2) == ("lb-http/b",)
    assert fake.received == ["set server lb-http/b state maint", "del server lb-http/b",
                             "show servers state lb-http", "show stat 3 4 2"]


def test_retired_servers_are_deleted_once_they_let_go(fake_socket):
    fake = fake_socket({"del server lb-http/b": "Server deleted.\n",
                        "del server lb-http/c": runtime.STILL_CONNECTED + "\n",
                        "del server lb-http/d": "No such server.\n"})

    retired = runtime.delete_retired(["lb-http/b", "lb-http/c", "lb-http/d"], fake.path,
                                     time.monotonic() + 2)

    assert retired == ("lb-http/c",)


def test_a_retired_server_in_maintenance_is_no_mismatch_but_a_serving_one_is():
    retired = RunningServer("lb-http", "old", "127.0.0.1", 1, 1, 0x01, 6, False)
    serving = RunningServer("lb-http", "stray", "127.0.0.1", 2, 1, 0, 6, False)

    assert mismatches(desired_as_running(), running_checked() + [retired], ["lb-http"]) == []
    assert mismatches(desired_as_running(), running_checked() + [serving], ["lb-http"]) == [
        "lb-http/stray should not be running"]


def test_a_dead_stats_socket_fails_the_plan():
    plan = plan_node_changes(BASE, device(http_lb(node("a", 8001))))

    with pytest.raises(RuntimeChangeFailed, match="stats socket failed"):
        runtime.apply_plan(plan, Path("/nonexistent/stats.sock"), timeout=1)


def test_a_verification_mismatch_fails_the_plan(fake_socket):
    old = device(http_lb(node("a", 26188), node("c", 31947)))
    plan = plan_node_changes(old, device(http_lb(node("a", 26188), node("c", 31947, weight=4))))
    fake = fake_socket({"set server lb-http/c weight 4": "\n",
                        "show servers state lb-http": SERVERS_STATE,
                        "show stat 3 4 3": stat_of("c")})

    with pytest.raises(RuntimeChangeFailed, match="the running servers differ") as failure:
        runtime.apply_plan(plan, fake.path, timeout=2)
    assert "lb-http/c has weight 3, not 4" in str(failure.value)
    assert "lb-http/a" not in str(failure.value)  # not touched, not read


def test_a_server_the_plan_removed_that_still_serves_fails_the_plan(fake_socket):
    old = device(http_lb(node("a", 26188), node("c", 31947)))
    plan = plan_node_changes(old, device(http_lb(node("a", 26188))))
    fake = fake_socket({"set server lb-http/c state maint": "\n",
                        "del server lb-http/c": runtime.STILL_CONNECTED + "\n",
                        "show servers state lb-http": SERVERS_STATE,
                        "show stat 3 4 3": stat_of("c")})

    with pytest.raises(RuntimeChangeFailed, match="lb-http/c should not be running"):
        runtime.apply_plan(plan, fake.path, timeout=2)


def test_many_touched_servers_read_the_backend_stat_at_once(fake_socket):
    many = [node(f"m{i}", 9000 + i) for i in range(runtime._STAT_BY_ID_MAX + 1)]
    plan = plan_node_changes(BASE, device(http_lb(*BASE.loadbalancers[0].nodes, *many)))
    rows = "".join(f"3 lb-http {10 + i} {server.name} 127.0.0.2 2 0 1 1 0 15 3 3 6 0 0 0 - "
                   f"{server.port} - 0 0 - - 0\n" for i, server in enumerate(plan.desired))
    stat = _STAT_HEADER + "".join(f"lb-http,{server.name},0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,0,x\n"
                                  for server in plan.desired)
    answers = {command.text: command.expect + "\n" for command in plan.commands}
    answers.update({"show servers state lb-http": "\n".join(SERVERS_STATE.split("\n")[:2]) + "\n" + rows,
                    "show stat 3 4 -1": stat})
    fake = fake_socket(answers)

    assert runtime.apply_plan(plan, fake.path, timeout=5) == ()
    assert fake.received[-2:] == ["show servers state lb-http", "show stat 3 4 -1"]


def test_the_whole_plan_is_bounded_by_its_timeout(fake_socket):
    plan = plan_node_changes(BASE, device(http_lb(node("a", 8001))))
    fake = fake_socket({"set server lb-http/b state maint": "\n"})

    with pytest.raises(RuntimeChangeFailed, match="time ran out"):
        runtime.apply_plan(plan, fake.path, timeout=0)
    assert fake.received == []


def test_a_node_coming_back_under_a_retired_name_is_revived_not_added():
    retired = {"lb-http/c": node("c", 8003, weight=1)}
    plan = plan_node_changes(BASE, device(http_lb(node("a", 8001), node("b", 8002, weight=2),
                                                  node("c", 8003, weight=4))), retired)

    assert texts(plan) == ["set server lb-http/c weight 4", "set server lb-http/c state ready"]
    assert plan.added == ("lb-http/c",)


def test_a_disabled_node_coming_back_under_a_retired_name_stays_in_maintenance():
    retired = {"lb-http/c": node("c", 8003)}
    plan = plan_node_changes(BASE, device(http_lb(node("a", 8001), node("b", 8002, weight=2),
                                                  node("c", 8003, enabled=False))), retired)

    assert texts(plan) == []
    assert plan.added == ("lb-http/c",)


def test_a_retired_name_coming_back_elsewhere_takes_a_reload():
    retired = {"lb-http/c": node("c", 8003)}

    assert plan_node_changes(BASE, device(http_lb(node("a", 8001), node("b", 8002, weight=2),
                                                  node("c", 9999))), retired) is None
