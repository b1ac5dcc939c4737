"""Unit tests for libra_worker.messages: the message contract, rule by rule.

Each rejection test asserts the error names the offending field by its path
(``loadbalancers[0].nodes[1].port``), since that sentence is what the API server shows.
"""

from __future__ import annotations

import copy
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libra_worker import messages
from libra_worker.errors import InvalidMessage
from libra_worker.messages import (
    DEFAULT_MONITOR,
    Action,
    Algorithm,
    Device,
    LoadBalancer,
    Monitor,
    MonitorType,
    Node,
    Options,
    Protocol,
    bad_request,
    decode,
    derived_node_id,
    device_document,
    parse,
    parse_device,
    reply,
)

TOKEN = "SECRET_tk_5f2b9c0e7a"


def node(address="10.0.0.1", port="80", **extra):
    return {"address": address, "port": port, **extra}


def lb(protocol="HTTP", nodes=None, **extra):
    return {"protocol": protocol, "nodes": [node()] if nodes is None else nodes, **extra}


def update(*loadbalancers, **extra):
    return {"hpcs_action": "UPDATE", "loadbalancers": list(loadbalancers) or [lb()], **extra}


def device_of(document) -> Device:
    message = parse(document)
    assert message.action is Action.UPDATE
    return message.device


def only_lb(document) -> LoadBalancer:
    (result,) = device_of(document).loadbalancers
    return result


def rejected(document) -> str:
    with pytest.raises(InvalidMessage) as caught:
        parse(document)
    return str(caught.value)


def archive(**changes):
    document = {
        "hpcs_action": "ARCHIVE",
        "hpcs_object_store_basepath": "lbaaslogs",
        "hpcs_object_store_endpoint": "https://example.com/v1/100",
        "hpcs_object_store_token": TOKEN,
        "hpcs_object_store_type": "swift",
        "loadbalancers": [{"id": "15", "name": "lb #1", "protocol": "HTTP"}],
    }
    for key, value in changes.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return document


# ---------------------------------------------------------------------- the spec's example


def test_spec_update_example():
    spec = {
        "hpcs_action": "UPDATE",
        "loadbalancers": [
            {
                "name": "a-new-loadbalancer",
                "protocol": "http",
                "nodes": [{"address": "10.0.0.1", "port": "80", "weight": "1"}],
            }
        ],
    }
    message = parse(spec)
    assert message.original is spec
    assert message.device == Device(
        (
            LoadBalancer(
                protocol=Protocol.HTTP,
                port=80,
                nodes=(Node(id="10.0.0.1_80", address="10.0.0.1", port=80, weight=1),),
                name="a-new-loadbalancer",
            ),
        )
    )
    assert message.device.loadbalancers[0].monitor == DEFAULT_MONITOR
    assert message.device.loadbalancers[0].options == Options()


@pytest.mark.parametrize("action", ["SUSPEND", "ENABLE", "DELETE", "DISCOVER", "STATS"])
def test_simple_actions_need_only_the_action(action):
    message = parse({"hpcs_action": action})
    assert message.action is Action(action)
    assert message.device is None and message.archive is None


def test_simple_actions_ignore_a_bad_loadbalancers_field():
    assert parse({"hpcs_action": "SUSPEND", "loadbalancers": "junk"}).action is Action.SUSPEND


# ---------------------------------------------------------------------- case and extras


@pytest.mark.parametrize("key", ["loadbalancers", "loadBalancers", "LOADBALANCERS", "LoadBalancers"])
def test_field_names_are_case_insensitive(key):
    document = {"HPCS_Action": "update", key: [{"PROTOCOL": "http", "Nodes": [{"ADDRESS": "10.0.0.1", "Port": "81"}]}]}
    result = only_lb(document)
    assert result.protocol is Protocol.HTTP
    assert result.nodes[0].address == "10.0.0.1" and result.nodes[0].port == 81


@pytest.mark.parametrize("action", ["update", "UPDATE", "Update", " update "])
def test_action_value_is_case_insensitive(action):
    assert parse({"hpcs_action": action, "loadbalancers": [lb()]}).action is Action.UPDATE


@pytest.mark.parametrize("protocol, expected", [("http", Protocol.HTTP), ("HTTP", Protocol.HTTP),
                                                ("Http", Protocol.HTTP), ("tcp", Protocol.TCP)])
def test_protocol_value_is_case_insensitive(protocol, expected):
    assert only_lb(update(lb(protocol, port="81"))).protocol is expected


@pytest.mark.parametrize("value, expected", [
    ("round_robin", Algorithm.ROUND_ROBIN),
    ("ROUND_ROBIN", Algorithm.ROUND_ROBIN),
    ("least_connections", Algorithm.LEAST_CONNECTIONS),
    ("Least_Connections", Algorithm.LEAST_CONNECTIONS),
])
def test_algorithms(value, expected):
    assert only_lb(update(lb(algorithm=value))).algorithm is expected


def test_algorithm_defaults_to_round_robin():
    assert only_lb(update(lb())).algorithm is Algorithm.ROUND_ROBIN


@pytest.mark.parametrize("value", ["random", "round-robin", "source", ""])
def test_unknown_algorithm_rejected(value):
    error = rejected(update(lb(algorithm=value)))
    assert "loadbalancers[0].algorithm" in error
    if value:
        assert "ROUND_ROBIN" in error and "LEAST_CONNECTIONS" in error


def test_monitor_type_is_case_insensitive():
    monitor = {"type": "http", "delay": 5, "timeout": 5, "attempts": 2}
    assert only_lb(update(lb(monitor=monitor))).monitor.type is MonitorType.HTTP


def test_extra_fields_are_ignored():
    document = update(
        lb(
            nodes=[node(status="ONLINE", extra={"x": [1, 2]})],
            virtualIps=[{"address": "192.0.2.1"}],
            created="2013-01-01",
        ),
        tenant_id="t1",
        UNKNOWN=None,
    )
    assert only_lb(document) == only_lb(update(lb()))


# ---------------------------------------------------------------------- numbers and booleans


@pytest.mark.parametrize("value", ["81", 81, 81.0, " 81 ", "+81"])
def test_numbers_may_be_strings(value):
    assert only_lb(update(lb(port=value))).port == 81


@pytest.mark.parametrize("value", ["81.5", 81.5, "eighty", "", True, [81], {"n": 81}, "8 1", "0x51"])
def test_non_integers_rejected(value):
    error = rejected(update(lb(port=value)))
    assert "loadbalancers[0].port" in error


def test_numeric_strings_everywhere():
    document = update(
        lb(
            nodes=[node(port="8080", weight="7")],
            monitor={"type": "CONNECT", "delay": "10", "timeout": "5", "attempts": "3"},
            options={"client_timeout": "1000", "server_timeout": "2000",
                     "connect_timeout": "3000", "connect_retries": "0"},
        )
    )
    result = only_lb(document)
    assert result.nodes[0].port == 8080 and result.nodes[0].weight == 7
    assert result.monitor == Monitor(MonitorType.CONNECT, 10, 5, 3, "/")
    assert result.options == Options(1000, 2000, 3000, 0)


@pytest.mark.parametrize("value, expected", [
    ("TRUE", True), ("FALSE", False), ("true", True), ("False", False), (True, True), (False, False),
])
def test_booleans(value, expected):
    assert only_lb(update(lb(nodes=[node(backup=value)]))).nodes[0].backup is expected


@pytest.mark.parametrize("value", ["yes", "1", 1, 0, "", None, "T"])
def test_bad_booleans_rejected(value):
    error = rejected(update(lb(nodes=[node(backup=value)])))
    assert "loadbalancers[0].nodes[0].backup" in error


@pytest.mark.parametrize("value, enabled", [("ENABLED", True), ("disabled", False), ("Disabled", False)])
def test_node_condition(value, enabled):
    assert only_lb(update(lb(nodes=[node(condition=value)]))).nodes[0].enabled is enabled


def test_bad_node_condition_rejected():
    assert "loadbalancers[0].nodes[0].condition" in rejected(update(lb(nodes=[node(condition="DRAINING")])))


# ---------------------------------------------------------------------- ports


def test_http_port_defaults_to_80():
    assert only_lb(update(lb("HTTP"))).port == 80


def test_tcp_needs_a_port():
    error = rejected(update(lb("TCP")))
    assert error == "Required field 'loadbalancers[0].port' is missing."


def test_tcp_with_port():
    assert only_lb(update(lb("TCP", port="3306"))).port == 3306


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_accepted(port):
    assert only_lb(update(lb(port=port, nodes=[node(port=port)]))).nodes[0].port == port


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_lb_port_out_of_range(port):
    error = rejected(update(lb(port=port)))
    assert "loadbalancers[0].port" in error and "between 1 and 65535" in error


@pytest.mark.parametrize("port", [0, 65536])
def test_node_port_out_of_range(port):
    error = rejected(update(lb(nodes=[node(), node("10.0.0.2", port)])))
    assert "loadbalancers[0].nodes[1].port" in error


def test_node_port_required():
    error = rejected(update(lb(nodes=[{"address": "10.0.0.1"}])))
    assert error == "Required field 'loadbalancers[0].nodes[0].port' is missing."


# ---------------------------------------------------------------------- addresses


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1", "10.0.0.1"),
    (" 10.0.0.1 ", "10.0.0.1"),
    ("::1", "::1"),
    ("2001:DB8:0:0:0:0:0:0001", "2001:db8::1"),
    ("2001:db8::ABCD", "2001:db8::abcd"),
])
def test_addresses_accepted_and_normalised(address, expected):
    assert only_lb(update(lb(nodes=[node(address)]))).nodes[0].address == expected


@pytest.mark.parametrize("address", [
    "example.com", "localhost", "10.0.0", "10.0.0.256", "010.0.0.1", "10.0.0.1:80",
    "[::1]", "2001:db8::1::2", "", 167772161,
])
def test_non_ip_addresses_rejected(address):
    error = rejected(update(lb(nodes=[node(address)])))
    assert "loadbalancers[0].nodes[0].address" in error


def test_address_required():
    error = rejected(update(lb(nodes=[{"port": 80}])))
    assert error == "Required field 'loadbalancers[0].nodes[0].address' is missing."


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "224.0.0.1", "ff02::1"])
def test_addresses_that_are_not_one_host_rejected(address):
    with pytest.raises(InvalidMessage, match="not the address of a single host"):
        parse(update(lb(nodes=[node(address)])))


def test_a_field_given_twice_in_different_casings_is_refused():
    with pytest.raises(InvalidMessage, match="'hpcs_action' is given twice"):
        parse({"hpcs_action": "STATS", "HPCS_ACTION": "DELETE"})


@pytest.mark.parametrize("address", [
    "fe80::1%eth0", "fe80::1%eth0\n    server evil 10.0.0.9:80", "fe80::1%a b", "fe80::1%",
])
def test_ipv6_zone_ids_rejected(address):
    # ipaddress accepts any text after '%' as a zone; none may reach a server line.
    assert "loadbalancers[0].nodes[0].address" in rejected(update(lb(nodes=[node(address)])))


# ---------------------------------------------------------------------- weights


@pytest.mark.parametrize("weight", [1, "128", 256])
def test_weights_accepted(weight):
    assert only_lb(update(lb(nodes=[node(weight=weight)]))).nodes[0].weight == int(weight)


@pytest.mark.parametrize("weight", [0, 257, -5])
def test_weights_out_of_range(weight):
    error = rejected(update(lb(nodes=[node(weight=weight)])))
    assert "loadbalancers[0].nodes[0].weight" in error and "between 1 and 256" in error


def test_weight_defaults_to_1():
    assert only_lb(update(lb())).nodes[0].weight == 1


# ---------------------------------------------------------------------- monitors

MONITOR = {"type": "HTTP", "delay": "10", "timeout": "5", "attempts": "3", "path": "/healthz"}


def test_monitor_parsed():
    result = only_lb(update(lb(monitor=MONITOR))).monitor
    assert result == Monitor(MonitorType.HTTP, 10, 5, 3, "/healthz")


@pytest.mark.parametrize("missing", ["type", "delay", "timeout", "attempts"])
def test_monitor_required_fields(missing):
    monitor = {key: value for key, value in MONITOR.items() if key != missing}
    error = rejected(update(lb(monitor=monitor)))
    assert error == f"Required field 'loadbalancers[0].monitor.{missing}' is missing."


def test_monitor_timeout_greater_than_delay_rejected():
    error = rejected(update(lb(monitor={**MONITOR, "delay": 5, "timeout": 6})))
    assert "loadbalancers[0].monitor.timeout (6)" in error
    assert "loadbalancers[0].monitor.delay (5)" in error


def test_monitor_timeout_equal_to_delay_accepted():
    assert only_lb(update(lb(monitor={**MONITOR, "delay": 5, "timeout": 5}))).monitor.timeout == 5


def test_monitor_must_be_an_object():
    assert rejected(update(lb(monitor="HTTP"))) == "loadbalancers[0].monitor must be a JSON object."


def test_monitor_unknown_type_rejected():
    error = rejected(update(lb(monitor={**MONITOR, "type": "PING"})))
    assert "loadbalancers[0].monitor.type" in error and "CONNECT" in error


@pytest.mark.parametrize("field, value", [
    ("delay", 0), ("attempts", 11), ("attempts", 0), ("delay", messages.MAX_MONITOR_SECONDS + 1),
])
def test_monitor_numbers_bounded(field, value):
    monitor = {**MONITOR, field: value, "timeout": 1}
    assert f"loadbalancers[0].monitor.{field}" in rejected(update(lb(monitor=monitor)))


@pytest.mark.parametrize("path", [
    "/", "/healthz", "/a/b-c_d.e~f", "/status;v=1", "/%20", "/a:b@c",
    # What Libra's API passes on: query strings and RFC 3986's reserved characters.
    "/health?full=1&fmt=text", "/a'b", "/a#b", "/a$b", "/[x]", "/x?a=$HOME&b='c'#f",
    "/" + "a" * (messages.MAX_PATH_LENGTH - 1),
])
def test_monitor_paths_kept_as_sent(path):
    assert only_lb(update(lb(monitor={**MONITOR, "path": path}))).monitor.path == path


def test_monitor_timeout_zero_accepted_negative_rejected():
    assert only_lb(update(lb(monitor={**MONITOR, "timeout": 0}))).monitor.timeout == 0
    assert "loadbalancers[0].monitor.timeout" in rejected(update(lb(monitor={**MONITOR, "timeout": -1})))


@pytest.mark.parametrize("path, encoded", [
    ("/a b", "/a%20b"), ('/a"b', "/a%22b"), ("/a\\b", "/a%5Cb"), ("/é", "/%C3%A9"),
    ("/a<b>{c}|^`", "/a%3Cb%3E%7Bc%7D%7C%5E%60"),
    # Already encoded by a newer Libra API: left alone, never encoded twice.
    ("/a%20b", "/a%20b"),
])
def test_monitor_path_percent_encoded_as_libra_api_does(path, encoded):
    assert only_lb(update(lb(monitor={**MONITOR, "path": path}))).monitor.path == encoded


def test_monitor_path_defaults_to_root():
    monitor = {key: value for key, value in MONITOR.items() if key != "path"}
    assert only_lb(update(lb(monitor=monitor))).monitor.path == "/"


@pytest.mark.parametrize("path, reason", [
    ("/a\nb", "control characters"), ("/a\rb", "control characters"),
    ("/a\tb", "control characters"), ("/a\x00", "control characters"),
    ("health", "start with '/'"), ("http://x/", "start with '/'"),
    ("/" + "a" * messages.MAX_PATH_LENGTH, "at most 2000"),
    ("/" + "é" * 1999, "once percent-encoded"),
])
def test_monitor_unusable_paths_rejected(path, reason):
    error = rejected(update(lb(monitor={**MONITOR, "path": path})))
    assert error.startswith("loadbalancers[0].monitor.path ") and reason in error


# ---------------------------------------------------------------------- ids and names


@pytest.mark.parametrize("value", ["15", 15, "lb-1.a_B", "x" * 64])
def test_ids_accepted(value):
    assert only_lb(update(lb(id=value))).id == str(value)


@pytest.mark.parametrize("value", [
    "a\nb", "a b", 'a"b', "a'b", "a#b", "a:b", "a/b", "a$b", "a\\b", "a\tb", "x" * 65, "é", "a\x00b",
])
@pytest.mark.parametrize("where", ["lb", "node"])
def test_unsafe_ids_rejected(value, where):
    if where == "lb":
        document, path = update(lb(id=value)), "loadbalancers[0].id"
    else:
        document, path = update(lb(nodes=[node(id=value)])), "loadbalancers[0].nodes[0].id"
    assert rejected(document).startswith(path)


def test_names_are_free_text_without_control_characters():
    # The spec's own example names a load balancer "lb #1"; names never reach the config.
    assert only_lb(update(lb(name="lb #1"))).name == "lb #1"


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "a\x7fb", "x" * 129])
def test_unsafe_names_rejected(value):
    assert rejected(update(lb(name=value))).startswith("loadbalancers[0].name")


# ---------------------------------------------------------------------- load balancers


def test_http_and_tcp_together():
    device = device_of(update(lb("HTTP"), lb("TCP", port=443)))
    assert [x.protocol for x in device.loadbalancers] == [Protocol.HTTP, Protocol.TCP]
    assert [x.port for x in device.loadbalancers] == [80, 443]


def test_more_than_two_load_balancers_rejected():
    error = rejected(update(lb("HTTP"), lb("TCP", port=443), lb("TCP", port=444)))
    assert error == "At most 2 load balancers may be defined, got 3."


@pytest.mark.parametrize("first, second", [
    ("HTTP", "http"), ("TCP", "tcp"), ("GALERA", "galera"), ("TCP", "GALERA"), ("galera", "TCP"),
])
def test_two_of_the_same_protocol_rejected(first, second):
    # As in Libra: a device has one HTTP and one TCP-mode (TCP or GALERA) load balancer.
    primary = [node(), node("10.0.0.2", backup="TRUE")]
    error = rejected(update(lb(first, primary, port=81), lb(second, primary, port=82)))
    assert "different protocols" in error and "GALERA" in error


def test_galera_beside_http_with_one_primary_and_backups():
    nodes = [node("10.0.0.1"), node("10.0.0.2", backup="TRUE"), node("10.0.0.3", backup=True)]
    device = device_of(update(lb("HTTP"), lb("Galera", nodes, port=3306)))
    galera = device.loadbalancers[1]
    assert galera.protocol is Protocol.GALERA and galera.protocol.mode == "tcp"
    assert [n.backup for n in galera.nodes] == [False, True, True]
    assert device_of({"hpcs_action": "UPDATE", **device_document(device)}) == device


@pytest.mark.parametrize("backups", [[True, True], [False, False], [False, False, True], []])
def test_galera_needs_exactly_one_primary(backups):
    nodes = [node(f"10.0.0.{i + 1}", backup=backup) for i, backup in enumerate(backups)]
    error = rejected(update(lb("HTTP"), lb("GALERA", nodes, port=3306)))
    primaries = backups.count(False)
    assert error == (f"loadbalancers[1].nodes: Galera load balancer must have exactly one "
                     f"primary node (the others backup), got {primaries}.")
    assert len(error) <= messages.MAX_ERROR_LENGTH


def test_a_disabled_galera_primary_is_still_its_primary():
    # Libra's API counts primaries whatever their condition.
    nodes = [node("10.0.0.1", condition="DISABLED"), node("10.0.0.2")]
    assert "exactly one primary" in rejected(update(lb("GALERA", nodes, port=3306)))
    nodes = [node("10.0.0.1", condition="DISABLED"), node("10.0.0.2", backup=True)]
    assert device_of(update(lb("GALERA", nodes, port=3306))).loadbalancers[0].nodes[0].enabled is False


def test_same_port_twice_rejected():
    error = rejected(update(lb("HTTP"), lb("TCP", port="80")))
    assert "different ports" in error


def test_loadbalancers_required_and_not_empty():
    assert rejected({"hpcs_action": "UPDATE"}) == "Required field 'loadbalancers' is missing."
    assert "at least one" in rejected({"hpcs_action": "UPDATE", "loadbalancers": []})
    assert rejected({"hpcs_action": "UPDATE", "loadbalancers": {}}) == "loadbalancers must be a JSON list."
    assert rejected(update("lb")) == "loadbalancers[0] must be a JSON object."


def test_protocol_required_and_known():
    assert rejected(update({"nodes": []})) == "Required field 'loadbalancers[0].protocol' is missing."
    error = rejected(update(lb("UDP")))
    assert "loadbalancers[0].protocol" in error and "'UDP'" in error


def test_nodes_required():
    error = rejected(update({"protocol": "HTTP"}))
    assert error == "Required field 'loadbalancers[0].nodes' is missing."


def test_empty_node_list_is_valid():
    assert only_lb(update(lb(nodes=[]))).nodes == ()


def test_duplicate_node_ids_rejected():
    error = rejected(update(lb(nodes=[node(id="a"), node("10.0.0.2", id="a")])))
    assert "loadbalancers[0].nodes" in error and "same id (a)" in error


def test_duplicate_explicit_and_derived_id_rejected():
    error = rejected(update(lb(nodes=[node("10.0.0.1", 80, id="10.0.0.2_81"), node("10.0.0.2", 81)])))
    assert "same id (10.0.0.2_81)" in error


@pytest.mark.parametrize("first, second", [("10.0.0.1", "10.0.0.1"), ("::1", "0:0::0001"),
                                           ("2001:DB8::1", "2001:db8::1")])
def test_duplicate_address_and_port_rejected(first, second):
    error = rejected(update(lb(nodes=[node(first, "80", id="a"), node(second, 80, id="b")])))
    assert "loadbalancers[0].nodes" in error and "same address" in error


def test_same_address_other_port_accepted():
    assert len(only_lb(update(lb(nodes=[node(port=80), node(port=81)]))).nodes) == 2


def test_error_path_points_at_second_lb_and_node():
    document = update(lb("HTTP"), lb("TCP", port=81, nodes=[node(), node("host.example")]))
    assert "loadbalancers[1].nodes[1].address" in rejected(document)


# ---------------------------------------------------------------------- derived node ids


@pytest.mark.parametrize("address, port, expected", [
    ("10.0.0.1", 80, "10.0.0.1_80"),
    ("2001:db8::1", 443, "2001_db8__1_443"),
    ("2001:DB8:0::0001", "443", "2001_db8__1_443"),
])
def test_derived_node_ids_are_stable(address, port, expected):
    first = only_lb(update(lb(nodes=[node(address, port)]))).nodes[0]
    again = only_lb(update(lb(nodes=[node(address, port)]))).nodes[0]
    assert first.id == again.id == expected


def test_derived_node_id_is_a_valid_identifier():
    derived = derived_node_id("1111:2222:3333:4444:5555:6666:7777:8888", 65535)
    assert messages._ID_PATTERN.match(derived)


def test_explicit_node_id_kept():
    assert only_lb(update(lb(nodes=[node(id=42)]))).nodes[0].id == "42"


# ---------------------------------------------------------------------- options


def test_options_defaults_and_bounds():
    assert only_lb(update(lb(options={}))).options == Options()
    assert "loadbalancers[0].options.connect_retries" in rejected(update(lb(options={"connect_retries": 257})))
    assert "loadbalancers[0].options.client_timeout" in rejected(update(lb(options={"client_timeout": -1})))


def test_options_libra_ranges_accepted():
    # Libra's API: timeouts 0-1,000,000 ms with 0 meaning "no timeout", retries up to 256.
    for timeout in (0, 1, 1_000_000):
        options = {"client_timeout": timeout, "server_timeout": timeout,
                   "connect_timeout": timeout, "connect_retries": 256}
        assert only_lb(update(lb(options=options))).options == Options(timeout, timeout, timeout, 256)
    assert rejected(update(lb(options=[]))) == "loadbalancers[0].options must be a JSON object."


# ---------------------------------------------------------------------- decoding and action


@pytest.mark.parametrize("payload", [b"", b"{", b"not json", "{'a': 1}", b"\xff\xfe{}", b'{"a": 1'])
def test_non_json_rejected(payload):
    with pytest.raises(InvalidMessage) as caught:
        decode(payload)
    assert str(caught.value).startswith("The message is not valid JSON")


@pytest.mark.parametrize("payload", ["[]", '[{"hpcs_action": "DISCOVER"}]', '"DISCOVER"', "42", "null"])
def test_non_object_rejected(payload):
    with pytest.raises(InvalidMessage, match="must be a JSON object"):
        decode(payload)


def test_decode_accepts_bytes_and_text():
    assert decode(b'{"hpcs_action": "STATS"}') == decode('{"hpcs_action": "STATS"}') == {"hpcs_action": "STATS"}
    assert decode('{"name": "caf\u00e9"}'.encode()) == {"name": "café"}


def test_missing_action_rejected():
    assert rejected({"loadbalancers": [lb()]}) == "Required field 'hpcs_action' is missing."
    assert rejected({"hpcs_action": ""}) == "hpcs_action must not be empty."


@pytest.mark.parametrize("action", ["FROB", "update!", "5"])
def test_unknown_action_rejected(action):
    error = rejected({"hpcs_action": action})
    assert error.startswith(f"hpcs_action {action!r} is not supported")
    assert "UPDATE" in error and "STATS" in error


@pytest.mark.parametrize("action", [["UPDATE"], {"a": 1}, True, 1.5])
def test_action_of_wrong_type_rejected(action):
    assert rejected({"hpcs_action": action}).startswith("hpcs_action must be a string")


# ---------------------------------------------------------------------- ARCHIVE


def test_archive_spec_example():
    request = parse(archive()).archive
    assert request == messages.ArchiveRequest(
        protocol=Protocol.HTTP, lb_id="15", basepath="lbaaslogs",
        endpoint="https://example.com/v1/100", token=TOKEN,
    )


def test_archive_keys_and_values_case_insensitive():
    document = {key.upper(): value for key, value in archive(hpcs_object_store_type="SWIFT").items()}
    document["LOADBALANCERS"] = [{"ID": "15", "PROTOCOL": "tcp"}]
    request = parse(document).archive
    assert request.protocol is Protocol.TCP and request.lb_id == "15"


@pytest.mark.parametrize("field", [
    "hpcs_object_store_type", "hpcs_object_store_basepath",
    "hpcs_object_store_endpoint", "hpcs_object_store_token", "loadbalancers",
])
def test_archive_required_fields(field):
    error = rejected(archive(**{field: None}))
    assert error == f"Required field '{field}' is missing."


def test_archive_lb_id_and_protocol_required():
    assert rejected(archive(loadbalancers=[{"protocol": "HTTP"}])) == "Required field 'loadbalancers[0].id' is missing."
    assert rejected(archive(loadbalancers=[{"id": "15"}])) == "Required field 'loadbalancers[0].protocol' is missing."
    assert "loadbalancers" in rejected(archive(loadbalancers=[]))


@pytest.mark.parametrize("store", ["s3", "ftp", "SWIFTS"])
def test_archive_store_type_other_than_swift_rejected(store):
    error = rejected(archive(hpcs_object_store_type=store))
    assert repr(store) in error and "supported types: swift" in error


@pytest.mark.parametrize("field, value", [
    ("hpcs_object_store_basepath", "a/b"),
    ("hpcs_object_store_basepath", "a\nb"),
    ("hpcs_object_store_endpoint", "ftp://example.com/v1"),
    ("hpcs_object_store_endpoint", "https://exa mple.com"),
])
def test_archive_bad_values_rejected(field, value):
    assert field in rejected(archive(**{field: value}))


BAD_TOKENS = [
    [TOKEN], {"token": TOKEN}, {TOKEN: 1}, True, 1.5, TOKEN + "\r\nX", "a\x00" + TOKEN, "", "   ",
]


@pytest.mark.parametrize("token", BAD_TOKENS)
def test_token_never_in_error_message(token):
    error = rejected(archive(hpcs_object_store_token=token))
    assert "hpcs_object_store_token" in error
    assert TOKEN not in error


@pytest.mark.parametrize("change", [
    {"hpcs_object_store_type": "s3"},
    {"hpcs_object_store_endpoint": "nope"},
    {"hpcs_object_store_basepath": "a/b"},
    {"loadbalancers": [{"id": "a b", "protocol": "HTTP"}]},
    {"loadbalancers": [{"id": "15", "protocol": "UDP"}]},
])
def test_token_never_in_other_archive_errors(change):
    assert TOKEN not in rejected(archive(**change))


# ---------------------------------------------------------------------- replies


def test_pass_reply_keeps_original_keys_and_casing():
    original = {"HPCS_Action": "update", "LoadBalancers": [{"Protocol": "http"}], "Extra": 1}
    snapshot = copy.deepcopy(original)
    answer = reply(original)
    assert answer == {**snapshot, "hpcs_response": "PASS"}
    assert list(answer)[:3] == ["HPCS_Action", "LoadBalancers", "Extra"]
    assert "hpcs_error" not in answer
    assert original == snapshot  # not mutated


def test_fail_reply_has_error():
    answer = reply({"hpcs_action": "STATS"}, "HAProxy is not running.")
    assert answer == {"hpcs_action": "STATS", "hpcs_response": "FAIL", "hpcs_error": "HAProxy is not running."}


def test_reply_extra_fields():
    answer = reply({"hpcs_action": "DISCOVER"}, version="1.0")
    assert answer == {"hpcs_action": "DISCOVER", "version": "1.0", "hpcs_response": "PASS"}


def test_sender_provided_outcome_replaced():
    original = {"hpcs_action": "DISCOVER", "HPCS_RESPONSE": "FAIL", "hpcs_response": "FAIL",
                "Hpcs_Error": "stale", "badRequest": {"x": 1}, "VERSION": "0.1"}
    answer = reply(original, version="1.0")
    assert answer == {"hpcs_action": "DISCOVER", "version": "1.0", "hpcs_response": "PASS"}


def test_bad_request_shape():
    original = {"hpcs_action": "UPDATE", "hpcs_response": "PASS"}
    answer = bad_request(original, "loadbalancers[0].port must be between 1 and 65535, got 0.")
    assert answer == {
        "hpcs_action": "UPDATE",
        "hpcs_response": "FAIL",
        "hpcs_error": "loadbalancers[0].port must be between 1 and 65535, got 0.",
        "badRequest": {
            "code": "400",
            "message": "Validation fault",
            "details": "The object is not valid",
            "validationErrors": {"message": "loadbalancers[0].port must be between 1 and 65535, got 0."},
        },
    }


def test_reply_is_json_serialisable():
    document = decode(json.dumps(update(lb())))
    assert json.loads(json.dumps(reply(document)))["hpcs_response"] == "PASS"


# ---------------------------------------------------------------------- device_document


def test_device_document_round_trip_example():
    device = device_of(update(
        lb("HTTP", id="7", name="web", algorithm="least_connections",
           monitor=MONITOR, options={"connect_retries": 1},
           nodes=[node(id="a", weight=3, backup="TRUE"), node("::1", 81, condition="DISABLED")]),
        lb("TCP", port=443, nodes=[]),
    ))
    assert parse_device(device_document(device)) == device
    assert json.loads(json.dumps(device_document(device))) == device_document(device)


_ID_ALPHABET = string.ascii_letters + string.digits + "_.-"
_PATH_ALPHABET = string.ascii_letters + string.digits + "-._~!&*+,;=:@%/()?#$'[]"

identifiers = st.text(_ID_ALPHABET, min_size=1, max_size=64)
addresses = st.ip_addresses().filter(
    lambda address: not (address.is_unspecified or address.is_multicast)).map(str)
ports = st.integers(1, 65535)


@st.composite
def monitors(draw):
    delay = draw(st.integers(1, messages.MAX_MONITOR_SECONDS))
    return Monitor(
        type=draw(st.sampled_from(MonitorType)),
        delay=delay,
        timeout=draw(st.integers(0, delay)),
        attempts=draw(st.integers(1, 10)),
        path="/" + draw(st.text(_PATH_ALPHABET, max_size=messages.MAX_PATH_LENGTH - 1)),
    )


nodes_strategy = st.builds(
    Node,
    id=identifiers,
    address=addresses,
    port=ports,
    weight=st.integers(1, 256),
    backup=st.booleans(),
    enabled=st.booleans(),
)
options_strategy = st.builds(
    Options,
    client_timeout_ms=st.integers(0, messages.MAX_TIMEOUT_MS),
    server_timeout_ms=st.integers(0, messages.MAX_TIMEOUT_MS),
    connect_timeout_ms=st.integers(0, messages.MAX_TIMEOUT_MS),
    connect_retries=st.integers(0, messages.MAX_RETRIES),
)
names = st.none() | st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), max_size=128
).map(str.strip)


@st.composite
def devices(draw):
    protocols = draw(st.sampled_from([[Protocol.HTTP], [Protocol.TCP],
                                      [Protocol.HTTP, Protocol.TCP], [Protocol.TCP, Protocol.HTTP]]))
    lb_ports = draw(st.lists(ports, min_size=len(protocols), max_size=len(protocols), unique=True))
    loadbalancers = []
    for protocol, port in zip(protocols, lb_ports):
        lb_nodes = draw(st.lists(nodes_strategy, max_size=5, unique_by=(
            lambda n: n.id, lambda n: (n.address, n.port))))
        loadbalancers.append(LoadBalancer(
            protocol=protocol, port=port, nodes=tuple(lb_nodes),
            algorithm=draw(st.sampled_from(Algorithm)), monitor=draw(monitors()),
            options=draw(options_strategy), id=draw(st.none() | identifiers), name=draw(names),
        ))
    return Device(tuple(loadbalancers))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devices())
def test_device_document_round_trips_through_parse(device):
    document = device_document(device)
    assert parse_device(document) == device
    # And through the wire: JSON text, any key casing, as an UPDATE message.
    wire = json.dumps({"HPCS_ACTION": "update", **document})
    assert parse(decode(wire)).device == device


# ---------------------------------------------------------------------- Libra's API server


def test_an_update_as_libras_api_server_builds_it():
    # Integer ids from its BIGINT columns, backup as "TRUE"/"FALSE", the default CONNECT
    # monitor without a path, one timeout for all three options.
    document = {"hpcs_action": "UPDATE", "loadBalancers": [{
        "name": "n" * 128, "protocol": "HTTP", "algorithm": "ROUND_ROBIN", "port": 65535,
        "nodes": [
            {"id": 2**63 - 1, "port": 1, "address": "10.0.0.1", "weight": 256,
             "condition": "ENABLED", "backup": "FALSE"},
            {"id": 1, "port": 65535, "address": "10.0.0.2", "weight": 1,
             "condition": "ENABLED", "backup": "TRUE"},
        ],
        "monitor": {"type": "CONNECT", "delay": 30, "timeout": 30, "attempts": 2},
        "options": {"client_timeout": 0, "server_timeout": 0, "connect_timeout": 0,
                    "connect_retries": 256},
    }]}
    result = only_lb(document)
    assert [(n.id, n.weight, n.backup, n.enabled) for n in result.nodes] == [
        (str(2**63 - 1), 256, False, True), ("1", 1, True, True)]
    assert int(result.nodes[0].id) == 2**63 - 1  # what its ping processing does with STATS ids
    assert result.monitor == messages.DEFAULT_MONITOR
    assert result.options == Options(0, 0, 0, 256)


def test_an_archive_as_libras_api_server_builds_it():
    # Its API's objectStoreType enum is "Swift"; the id is str() of its integer column.
    message = parse({
        "hpcs_action": "ARCHIVE", "hpcs_object_store_basepath": "lbaaslogs",
        "hpcs_object_store_endpoint": "https://swift.example.com/v1/AUTH_1",
        "hpcs_object_store_token": "token", "hpcs_object_store_type": "Swift",
        "loadBalancers": [{"id": str(2**63 - 1), "name": "lb #1", "protocol": "HTTP"}],
    })
    assert (message.archive.lb_id, message.archive.protocol) == (str(2**63 - 1), Protocol.HTTP)
