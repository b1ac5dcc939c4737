"""Unit tests for libra_worker.drivers.haproxy.runtime: the node diff and the verification.

The diff is pure, so every kind of change is covered here without HAProxy. The parsing
tests use answers captured from HAProxy 2.6.12's stats socket. The executor's failure
paths (an unexpected answer, a server still connected) run against a tiny fake stats
socket; its success paths run against the real HAProxy in
tests/integration/test_runtime_changes.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Collection, Iterator

import pytest

from libra_worker.drivers.haproxy import runtime
from libra_worker.drivers.haproxy.slots import Layout, Slot, fresh
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
from tests.unit.stand_ins import FakeStatsSocket

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
MORE_THAN_NODES = "the change is more than nodes added, removed or changed"


# ---------------------------------------------------------------------- the diff: node changes


def plan(old: Device, new: Device, layout: Layout | None = None,
         busy: Collection[str] = ()) -> runtime.RuntimePlan | str:
    """`plan_node_changes` over `old`'s fresh layout (2 normal, 2 backup spares), with the
    servers named in `busy` still holding connections."""
    return plan_node_changes(old, new, fresh(old, spares=2) if layout is None else layout,
                             lambda backend, position, slot, node: slot.name not in busy)


def fill(server: str, address: str, port: int, weight: int = 1, ready: bool = True) -> list[str]:
    return ([f"set server {server} addr {address} port {port}", f"set server {server} weight {weight}",
             f"enable health {server}"] + ([f"set server {server} state ready"] if ready else []))


def test_a_new_node_fills_the_first_spare_address_weight_checks_then_ready():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003, weight=7)))

    result = plan(BASE, new)

    assert isinstance(result, runtime.RuntimePlan)
    assert texts(result) == fill("lb-http/slot:1", "127.0.0.2", 8003, weight=7)
    assert result.commands[0] == Command("set server lb-http/slot:1 addr 127.0.0.2 port 8003",
                                         runtime.ADDRESS_SET, ending=True)
    assert result.added == ("lb-http/slot:1",)
    assert result.desired == (DesiredServer("lb-http", "slot:1", "127.0.0.2", 8003, 7, False, True),)
    assert result.layout == ((Slot("a", False, "a"), Slot("b", False, "b"),
                              Slot("slot:1", False, "c"), Slot("slot:2", False),
                              Slot("slot:3", True), Slot("slot:4", True)),)


def test_a_new_backup_node_fills_a_backup_slot():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003, backup=True)))

    result = plan(BASE, new)

    assert texts(result) == fill("lb-http/slot:3", "127.0.0.2", 8003)
    assert result.desired[-1].backup is True


def test_a_new_disabled_node_fills_a_slot_that_stays_in_maintenance():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003, enabled=False)))

    result = plan(BASE, new)

    assert texts(result) == fill("lb-http/slot:1", "127.0.0.2", 8003, ready=False)
    assert result.desired[-1].enabled is False


def test_a_new_ipv6_node_is_given_its_address_and_port_apart():
    ipv6 = Node(id="v6", address="2001:db8::5", port=443)

    result = plan(BASE, device(http_lb(node("a", 8001), node("b", 8002, weight=2), ipv6)))

    assert texts(result)[0] == "set server lb-http/slot:1 addr 2001:db8::5 port 443"


def test_a_node_without_id_fills_a_slot_under_the_id_the_worker_gives_it():
    old = parse_device({"loadbalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": [{"address": "10.0.0.1", "port": 80}]}]})
    new = parse_device({"loadbalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": [{"address": "10.0.0.1", "port": 80},
                                                   {"address": "10.0.0.2", "port": 80}]}]})

    result = plan(old, new)

    assert result.added == ("lb-http/slot:1",)
    assert result.layout[0][1] == Slot("slot:1", False, "10.0.0.2_80")


def test_a_removed_node_goes_to_maintenance_and_keeps_its_server_retired():
    result = plan(BASE, device(http_lb(node("a", 8001))))

    assert texts(result) == ["set server lb-http/b state maint"]
    assert result.removals == ("lb-http/b",)
    assert result.desired == ()
    assert result.layout[0][:2] == (Slot("a", False, "a"), Slot("b", False, None))


def test_a_node_back_gets_its_own_retired_server_again():
    removed = plan(BASE, device(http_lb(node("a", 8001))))

    back = plan(device(http_lb(node("a", 8001))), BASE, removed.layout)

    assert texts(back) == fill("lb-http/b", "127.0.0.2", 8002, weight=2)
    assert back.layout == fresh(BASE, spares=2)


def test_a_node_back_whose_old_server_still_holds_connections_elsewhere_fills_a_spare():
    removed = plan(BASE, device(http_lb(node("a", 8001))))

    back = plan(device(http_lb(node("a", 8001))), BASE, removed.layout, busy={"b"})

    assert texts(back) == fill("lb-http/slot:1", "127.0.0.2", 8002, weight=2)


def test_a_retired_server_is_never_given_to_another_node():
    layout = ((Slot("a", False, "a"), Slot("b", False, None)),)

    result = plan(device(http_lb(node("a", 8001))),
                  device(http_lb(node("a", 8001), node("c", 8003))), layout)

    assert result == "lb-http has no free server slot left"


def test_a_spare_still_holding_connections_is_skipped():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003)))

    assert texts(plan(BASE, new, busy={"slot:1"}))[0].startswith("set server lb-http/slot:2 ")
    assert plan(BASE, new, busy={"slot:1", "slot:2"}) == "lb-http has no free server slot left"


def test_out_of_backup_slots_takes_a_reload_even_with_normal_ones_free():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=2),
                         *(node(f"k{i}", 9000 + i, backup=True) for i in range(3))))

    assert plan(BASE, new) == "lb-http has no free backup server slot left"


def test_a_weight_change_is_set_in_place():
    new = device(http_lb(node("a", 8001, weight=256), node("b", 8002, weight=2)))

    result = plan(BASE, new)

    assert texts(result) == ["set server lb-http/a weight 256"]
    assert result.changed == ("lb-http/a",)


def test_a_node_in_a_slot_is_changed_under_the_slot_name():
    grown = device(http_lb(node("a", 8001), node("b", 8002, weight=2), node("c", 8003)))
    first = plan(BASE, grown)
    changed = device(http_lb(node("a", 8001), node("b", 8002, weight=2),
                             node("c", 8003, weight=9, enabled=False)))

    result = plan(grown, changed, first.layout)

    assert texts(result) == ["set server lb-http/slot:1 weight 9",
                             "set server lb-http/slot:1 state maint"]
    assert result.desired == (DesiredServer("lb-http", "slot:1", "127.0.0.2", 8003, 9, False, False),)


def test_disabling_and_enabling_nodes_set_their_state():
    old = device(http_lb(node("a", 8001), node("b", 8002, enabled=False)))
    new = device(http_lb(node("a", 8001, enabled=False), node("b", 8002)))

    result = plan(old, new)

    assert texts(result) == ["set server lb-http/a state maint", "set server lb-http/b state ready"]
    assert result.removals == ()


def test_weight_and_condition_change_together():
    new = device(http_lb(node("a", 8001), node("b", 8002, weight=5, enabled=False)))

    assert texts(plan(BASE, new)) == ["set server lb-http/b weight 5",
                                      "set server lb-http/b state maint"]


def test_reordered_nodes_need_no_command():
    result = plan(BASE, device(http_lb(node("b", 8002, weight=2), node("a", 8001))))

    assert result.commands == ()
    assert result.layout == fresh(BASE, spares=2)


def test_an_identical_update_needs_no_command_and_touches_no_server(fake_socket):
    result = plan(BASE, BASE)
    fake = fake_socket({})

    assert (result.commands, result.removals, result.added, result.changed) == ((), (), (), ())
    assert result.desired == ()
    runtime.apply_plan(result, fake.path, timeout=2)
    assert fake.received == []


def test_removing_every_node_still_verifies_the_emptied_backend():
    result = plan(BASE, device(http_lb()))

    assert result.removals == ("lb-http/a", "lb-http/b")
    assert result.backends == ("lb-http",)


@pytest.mark.parametrize("changed, slot", [
    pytest.param(node("a", 8001, backup=True), "slot:3", id="backup flag"),
    pytest.param(node("a", 8009), "slot:1", id="port"),
    pytest.param(Node(id="a", address="127.0.0.3", port=8001), "slot:1", id="address"),
])
def test_a_node_whose_server_line_changes_moves_to_a_slot_capacity_first(changed, slot):
    result = plan(BASE, device(http_lb(changed, node("b", 8002, weight=2))))

    assert texts(result) == [*fill(f"lb-http/{slot}", changed.address, changed.port),
                             "set server lb-http/a state maint"]
    assert result.moved == (f"lb-http/{slot}",)
    assert result.removals == ("lb-http/a",)
    assert result.summary() == "0 node(s) added, 0 removed, 0 changed, 1 moved"
    placed = {entry.name: entry.node for entry in result.layout[0]}
    assert placed["a"] is None and placed[slot] == "a"


def test_a_slot_emptied_by_this_update_is_not_filled_by_it():
    layout = ((Slot("slot:1", False, "x"), Slot("slot:2", False)),)
    old = device(http_lb(node("x", 8001)))

    result = plan(old, device(http_lb(node("x", 8005), node("y", 8006))), layout)

    assert result == "lb-http has no free server slot left"


def test_capacity_is_added_before_any_is_taken_away():
    old = device(http_lb(node("a", 8001), node("b", 8002), node("c", 8003)))
    new = device(http_lb(node("b", 8002, weight=3), node("d", 8004), node("c", 8003, enabled=False)))

    result = plan(old, new)

    assert texts(result) == [
        *fill("lb-http/slot:1", "127.0.0.2", 8004),
        "set server lb-http/b weight 3",
        "set server lb-http/c state maint",
        "set server lb-http/a state maint",
    ]
    assert result.removals == ("lb-http/a",)
    assert result.summary() == "1 node(s) added, 1 removed, 2 changed, 0 moved"


def test_both_load_balancers_are_planned_each_on_its_backend():
    old = device(http_lb(node("a", 8001)), tcp_lb(node("t", 9001)))
    new = device(http_lb(node("a", 8001, weight=4)), tcp_lb(node("u", 9002)))

    result = plan(old, new)

    assert texts(result) == [
        "set server lb-http/a weight 4",
        *fill("lb-tcp/slot:1", "127.0.0.2", 9002),
        "set server lb-tcp/t state maint",
    ]
    assert result.removals == ("lb-tcp/t",)
    assert result.backends == ("lb-http", "lb-tcp")


def test_the_same_node_id_in_both_backends_is_two_servers():
    old = device(http_lb(node("n", 8001)), tcp_lb(node("n", 9001)))
    new = device(http_lb(node("n", 8001, weight=5)), tcp_lb())

    result = plan(old, new)

    assert result.removals == ("lb-tcp/n",)
    assert [(server.backend, server.name) for server in result.desired] == [("lb-http", "n")]


# ---------------------------------------------------------------------- the diff: reloads


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

    assert plan(BASE, new) == MORE_THAN_NODES
    # ... even when the nodes change too.
    assert plan(BASE, device(http_lb(*nodes[:1], **fields))) == MORE_THAN_NODES


def test_adding_or_removing_a_load_balancer_takes_a_reload():
    both = device(http_lb(node("a", 8001)), tcp_lb(node("t", 9001)))

    assert plan(BASE, both) == MORE_THAN_NODES
    assert plan(both, device(http_lb(node("a", 8001)))) == MORE_THAN_NODES


def test_swapping_the_order_of_the_load_balancers_takes_a_reload():
    http, tcp = http_lb(node("a", 8001)), tcp_lb(node("t", 9001))

    assert plan(device(http, tcp), device(tcp, http)) == MORE_THAN_NODES


# ---------------------------------------------------------------------- is a slot free?


def slot_row(name: str, addr: str = "127.0.0.2:8003", **held: int) -> dict[str, str]:
    row = {"svname": name, "addr": addr}
    row.update({column: str(held.get(column, 0)) for column in runtime.HELD})
    return row


@pytest.mark.parametrize("column", runtime.HELD)
def test_a_slot_holding_a_session_or_a_server_connection_is_not_free(column):
    spare = Slot("slot:1", False)
    c = node("c", 8009)  # not the address the slot last had

    assert runtime.slot_reusable(slot_row("slot:1"), spare, c)
    assert not runtime.slot_reusable(slot_row("slot:1", **{column: 1}), spare, c)


def test_a_server_still_connected_to_the_nodes_own_address_may_take_it_again():
    own, spare = Slot("c", False), Slot("slot:1", False)

    assert runtime.slot_reusable(slot_row("c", scur=3), own, node("c", 8003))
    assert runtime.slot_reusable(slot_row("slot:1", used_conn_cur=3), spare, node("c", 8003))
    assert not runtime.slot_reusable(slot_row("c", scur=3), own, node("c", 8004))
    assert not runtime.slot_reusable(slot_row("slot:1", scur=1), spare,
                                     Node(id="c", address="127.0.0.3", port=8003))
    assert runtime.slot_reusable(slot_row("c", "[::1]:443", scur=1), own,
                                 Node(id="c", address="::1", port=443))


def test_a_row_of_another_server_or_none_is_no_free_slot():
    assert not runtime.slot_reusable(slot_row("slot:2"), Slot("slot:1", False), node("c", 8003))
    assert not runtime.slot_reusable(None, Slot("slot:1", False), node("c", 8003))


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
    result = plan(BASE, device(http_lb(node("a", 8001), node("b", 8002, weight=2),
                                       node("c", 8003))))
    fake = fake_socket({result.commands[0].text: "'set server <srv> addr' : unknown\n\n"})

    with pytest.raises(RuntimeChangeFailed, match="unknown"):
        runtime.apply_plan(result, fake.path, timeout=2)
    assert fake.received == [result.commands[0].text]


def test_the_answers_of_set_server_addr_are_accepted_by_their_ending():
    command = Command("set server lb-http/slot:1 addr 127.0.0.2 port 8003", runtime.ADDRESS_SET,
                      ending=True)

    # HAProxy 2.6.12's own words, which say what changed.
    assert command.accepts("IP changed from '127.0.0.1' to '127.0.0.2', port changed from '1' "
                           "to '8003' by 'stats socket command'")
    assert command.accepts("no need to change the addr, port changed from '1' to '8003' by "
                           "'stats socket command'")
    assert not command.accepts("Invalid addr.")
    assert not Command("set server lb-http/a weight 2").accepts("No such server.")


def test_a_removed_server_in_maintenance_passes_verification(fake_socket):
    # The running state of SERVERS_STATE: a and c serve, b (removed) is in maintenance.
    def at(id: str, port: int, **fields: object) -> Node:
        return Node(id=id, address="127.0.0.1", port=port, **fields)  # type: ignore[arg-type]

    old = device(http_lb(at("a", 26188), at("b", 27246), at("c", 31947, weight=3)))
    result = plan(old, device(http_lb(at("a", 26188), at("c", 31947, weight=3))))
    fake = fake_socket({"set server lb-http/b state maint": "\n",
                        "show servers state lb-http": SERVERS_STATE,
                        "show stat 3 4 2": stat_of("b")})

    runtime.apply_plan(result, fake.path, timeout=2)
    assert fake.received == ["set server lb-http/b state maint",
                             "show servers state lb-http", "show stat 3 4 2"]


def test_a_retired_server_in_maintenance_is_no_mismatch_but_a_serving_one_is():
    retired = RunningServer("lb-http", "old", "127.0.0.1", 1, 1, 0x01, 6, False)
    serving = RunningServer("lb-http", "stray", "127.0.0.1", 2, 1, 0, 6, False)

    assert mismatches(desired_as_running(), running_checked() + [retired], ["lb-http"]) == []
    assert mismatches(desired_as_running(), running_checked() + [serving], ["lb-http"]) == [
        "lb-http/stray should not be running"]


def test_a_dead_stats_socket_fails_the_plan():
    result = plan(BASE, device(http_lb(node("a", 8001))))

    with pytest.raises(RuntimeChangeFailed, match="stats socket failed"):
        runtime.apply_plan(result, Path("/nonexistent/stats.sock"), timeout=1)


def test_a_verification_mismatch_fails_the_plan(fake_socket):
    old = device(http_lb(node("a", 26188), node("c", 31947)))
    result = plan(old, device(http_lb(node("a", 26188), node("c", 31947, weight=4))))
    fake = fake_socket({"set server lb-http/c weight 4": "\n",
                        "show servers state lb-http": SERVERS_STATE,
                        "show stat 3 4 3": stat_of("c")})

    with pytest.raises(RuntimeChangeFailed, match="the running servers differ") as failure:
        runtime.apply_plan(result, fake.path, timeout=2)
    assert "lb-http/c has weight 3, not 4" in str(failure.value)
    assert "lb-http/a" not in str(failure.value)  # not touched, not read


def test_a_server_the_plan_removed_that_still_serves_fails_the_plan(fake_socket):
    old = device(http_lb(node("a", 26188), node("c", 31947)))
    result = plan(old, device(http_lb(node("a", 26188))))
    fake = fake_socket({"set server lb-http/c state maint": "\n",
                        "show servers state lb-http": SERVERS_STATE,
                        "show stat 3 4 3": stat_of("c")})

    with pytest.raises(RuntimeChangeFailed, match="lb-http/c should not be running"):
        runtime.apply_plan(result, fake.path, timeout=2)


def test_many_touched_servers_read_the_backend_stat_at_once(fake_socket):
    many = [node(f"m{i}", 9000 + i) for i in range(runtime._STAT_BY_ID_MAX + 1)]
    grown = device(http_lb(*BASE.loadbalancers[0].nodes, *many))
    result = plan(BASE, grown, fresh(BASE, spares=len(many)))
    rows = "".join(f"3 lb-http {10 + i} {server.name} 127.0.0.2 2 0 1 1 0 15 3 3 6 0 0 0 - "
                   f"{server.port} - 0 0 - - 0\n" for i, server in enumerate(result.desired))
    stat = _STAT_HEADER + "".join(f"lb-http,{server.name},0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,0,x\n"
                                  for server in result.desired)
    answers = {command.text: command.expect + "\n" for command in result.commands}
    answers.update({"show servers state lb-http": "\n".join(SERVERS_STATE.split("\n")[:2]) + "\n" + rows,
                    "show stat 3 4 -1": stat})
    fake = fake_socket(answers)

    runtime.apply_plan(result, fake.path, timeout=5)
    assert fake.received[-2:] == ["show servers state lb-http", "show stat 3 4 -1"]


def test_the_whole_plan_is_bounded_by_its_timeout(fake_socket):
    result = plan(BASE, device(http_lb(node("a", 8001))))
    fake = fake_socket({"set server lb-http/b state maint": "\n"})

    with pytest.raises(RuntimeChangeFailed, match="time ran out"):
        runtime.apply_plan(result, fake.path, timeout=0)
    assert fake.received == []
