"""A node repeated from the last UPDATE is taken as it was parsed then (messages'
`_last_nodes`): these prove it is only ever the Node a full check would give."""

from __future__ import annotations

import pytest

from libra_worker import messages
from libra_worker.errors import InvalidMessage
from libra_worker.messages import Node, decode, parse


def update(*nodes: dict) -> dict:
    return {"hpcs_action": "UPDATE",
            "loadbalancers": [{"protocol": "HTTP", "port": 80, "nodes": list(nodes)}]}


def nodes_of(document: dict) -> tuple[Node, ...]:
    return parse(document).device.loadbalancers[0].nodes


VALID = {"id": "n1", "address": "10.0.0.1", "port": 80, "weight": 1, "backup": False}


@pytest.mark.parametrize("field, value", [
    ("backup", 0),      # equal to False (and of the same hash), not a boolean
    ("weight", True),   # equal to 1, a boolean
    ("port", "80x"),
])
def test_a_value_equal_to_a_valid_one_but_of_another_type_is_still_refused(field, value):
    nodes_of(update(VALID))
    with pytest.raises(InvalidMessage, match=rf"loadbalancers\[0\]\.nodes\[0\]\.{field}"):
        parse(update({**VALID, field: value}))


def test_a_repeated_node_is_the_node_a_full_check_gives(monkeypatch):
    monkeypatch.setattr(messages, "_last_nodes", {})
    first = nodes_of(update(VALID, {"address": "10.0.0.2", "port": "81"}))
    again = nodes_of(update(VALID, {"address": "10.0.0.2", "port": "81"}))
    assert again == first and again[0] is first[0]  # the second one was not checked again
    # Floats that are whole numbers are accepted, and make the same node.
    assert nodes_of(update({**VALID, "port": 80.0}))[0] == first[0]


def test_each_load_balancer_and_position_is_checked_by_its_own_path():
    nodes_of(update(VALID))
    both = {"hpcs_action": "UPDATE", "loadbalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": [VALID]},
        {"protocol": "TCP", "port": 81, "nodes": [VALID, {**VALID, "id": "bad id"}]},
    ]}
    with pytest.raises(InvalidMessage, match=r"loadbalancers\[1\]\.nodes\[1\]\.id"):
        parse(both)


def test_nodes_with_object_values_are_checked_every_time():
    document = decode(b'{"hpcs_action": "UPDATE", "loadbalancers": [{"protocol": "HTTP", '
                      b'"nodes": [{"address": "10.0.0.1", "port": 80, "meta": {"a": [1]}}]}]}')
    assert nodes_of(document) == nodes_of(document)
    with pytest.raises(InvalidMessage, match="must be a JSON object"):
        parse(update("not a node"))


def test_names_in_other_casings_make_the_same_node_and_are_remembered_as_given(monkeypatch):
    monkeypatch.setattr(messages, "_last_nodes", {})
    cased = {"ID": "n1", "Address": "10.0.0.1", "PORT": 80, "weight": 1, "Backup": False}
    assert nodes_of(update(cased)) == nodes_of(update(VALID))  # the same, whatever the casing
    again = nodes_of(update(cased))
    assert nodes_of(update(cased))[0] is again[0]  # taken from the last UPDATE as given


def test_one_node_with_an_object_value_does_not_stop_the_others_being_checked():
    document = update(VALID, {"address": "10.0.0.2", "port": 81, "meta": {"rack": 4}},
                      {**VALID, "id": "bad id", "address": "10.0.0.3"})
    with pytest.raises(InvalidMessage, match=r"loadbalancers\[0\]\.nodes\[2\]\.id"):
        parse(document)


def test_the_same_values_under_other_names_make_another_node():
    first = nodes_of(update({"address": "10.0.0.1", "port": 80, "weight": 2}))[0]
    swapped = nodes_of(update({"address": "10.0.0.1", "weight": 80, "port": 2}))[0]
    assert (first.port, first.weight) == (80, 2)
    assert (swapped.port, swapped.weight) == (2, 80)


class Unrolled(str):
    """A node entry that is no object, and says so if anything copies it item by item."""

    def __iter__(self):
        raise AssertionError("the entry was unpacked before being found not to be an object")


def test_an_entry_that_is_no_object_is_refused_before_anything_of_it_is_copied():
    # An 8 MB string in place of a node must not become a tuple of 8 million characters.
    with pytest.raises(InvalidMessage, match=r"nodes\[0\] must be a JSON object"):
        parse(update(Unrolled("x" * 1000)))
