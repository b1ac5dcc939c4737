"""Unit tests for libra_worker.drivers.haproxy.slots: the layout a reload renders, its
spares, its JSON form in state.json, and how a saved layout is checked against its device.

The planner that fills and empties slots is tested in test_runtime.py; that HAProxy
accepts the lines and serves a slot-filled node as a file server, with real traffic, in
tests/integration/test_server_slots.py and test_server_lines.py.
"""

from __future__ import annotations

import json

import pytest

from libra_worker.drivers.haproxy import render, slots
from libra_worker.drivers.haproxy.slots import Slot, fresh, from_document, to_document
from libra_worker.messages import Device, LoadBalancer, Node, Protocol


def node(id: str, port: int = 8000, **fields: object) -> Node:
    return Node(id=id, address="10.0.0.1", port=port, **fields)  # type: ignore[arg-type]


def lb(*nodes: Node, protocol: Protocol = Protocol.HTTP) -> LoadBalancer:
    return LoadBalancer(protocol=protocol, port=80, nodes=tuple(nodes))


def device(*loadbalancers: LoadBalancer) -> Device:
    return Device(tuple(loadbalancers))


GALERA = device(lb(node("p", 3306), node("b1", 3307, backup=True), node("b2", 3308, backup=True),
                   protocol=Protocol.GALERA))


def test_a_fresh_layout_serves_each_node_under_its_id_then_spares_of_each_kind():
    layout = fresh(GALERA, spares=3)

    assert layout == ((Slot("p", False, "p"), Slot("b1", True, "b1"), Slot("b2", True, "b2"),
                       Slot("slot:1", False), Slot("slot:2", False), Slot("slot:3", False),
                       Slot("slot:4", True), Slot("slot:5", True)),)
    assert [slot.spare for slot in layout[0]] == [False] * 3 + [True] * 5


@pytest.mark.parametrize("count, normal, backup", [
    (0, 8, 2), (80, 8, 2), (81, 9, 2), (1_000, 100, 2), (10_000, 1_000, 2)])
def test_spares_grow_in_steps_with_the_nodes_of_their_kind(count, normal, backup):
    nodes = [node(f"n{i}", 1 + i) for i in range(count)]

    layout = fresh(device(lb(*nodes)), spares=8)[0]

    assert sum(slot.spare and not slot.backup for slot in layout) == normal
    assert sum(slot.spare and slot.backup for slot in layout) == backup


def test_many_backups_get_backup_spares_in_proportion():
    backups = [node(f"b{i}", 1 + i, backup=True) for i in range(45)]

    layout = fresh(device(lb(node("p", 9), *backups)), spares=8)[0]

    assert sum(slot.spare and slot.backup for slot in layout) == 5


def test_empty_slots_render_as_loopback_placeholders_in_maintenance():
    check = render.health_check(lb())
    text = render.server_options(slots.placeholder(Slot("slot:4", True)), check)
    servers = slots.servers(lb(node("a")), (Slot("a", False, "a"), Slot("slot:1", False)))

    assert text == "weight 1 check inter 30s fall 2 rise 2 backup disabled"
    assert servers == [("a", node("a")),
                       ("slot:1", Node("slot:1", "127.0.0.1", 1, backup=False, enabled=False))]


def test_the_json_form_round_trips_and_names_a_node_under_its_id_by_the_id_alone():
    layout = ((Slot("p", False, None), Slot("b1", True, "b1"), Slot("slot:1", False, "p"),
               Slot("slot:2", True, "b2"), Slot("slot:3", True)),)

    document = json.loads(json.dumps(to_document(layout)))

    assert document == [[["p", False, None], "b1", ["slot:1", False, "p"],
                         ["slot:2", True, "b2"], ["slot:3", True, None]]]
    assert from_document(document, GALERA) == layout


def test_a_state_file_without_layout_has_none_to_read():
    assert from_document(None, GALERA) is None


@pytest.mark.parametrize("document", [
    pytest.param([], id="no load balancer"),
    pytest.param([["p", "b1"]], id="a node missing"),
    pytest.param([["p", "b1", "b2", ["slot:1", True, "p"]]], id="a node twice"),
    pytest.param([["p", "b1", ["slot:1", False, "b2"]]], id="a backup in a normal slot"),
    pytest.param([["p", "b1", "b2", ["slot:1", False, None], ["slot:1", True, None]]],
                 id="a name twice"),
    pytest.param([["p", "b1", "b2", ["slot:x", False, None]]], id="a bad spare name"),
    pytest.param([["p", "b1", "b2", ["a b", False, None]]], id="a bad server name"),
    pytest.param([["p", "b1", "b2", ["slot:1", "no", None]]], id="a kind not a boolean"),
    pytest.param([["p", "b1", "b2", "ghost"]], id="an unknown node"),
    pytest.param({"lb-tcp": []}, id="not a list"),
])
def test_a_layout_that_does_not_fit_its_device_is_not_read(document):
    assert from_document(document, GALERA) is None


def test_a_layout_is_read_for_each_load_balancer_in_order():
    both = device(lb(node("a")), lb(node("t"), protocol=Protocol.TCP))
    layout = fresh(both, spares=1)

    assert from_document(to_document(layout), both) == layout
    assert from_document(list(reversed(to_document(layout))), both) is None
