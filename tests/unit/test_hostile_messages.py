"""Hostile payloads through the decode/parse path: each one is an ordinary FAIL sentence.

What the 13,000-message fuzz run of issue 9 found: non-finite numbers echoed as invalid
JSON, whole hostile values copied into errors, no size limit, RecursionError on deep
nesting, exact duplicate keys acting on the last one, and non-ASCII look-alikes folded
into names, values and numbers. Each test pins one of those edges.
"""

from __future__ import annotations

import json

import pytest

from libra_worker.controller import LBaaSController
from libra_worker.errors import InvalidMessage, quoted
from libra_worker.messages import (
    MAX_DEPTH,
    SNIFF_BYTES,
    Action,
    Oversized,
    bad_request,
    decode,
    encode_reply,
    parse,
)


def decode_error(payload: bytes | str, **options) -> str:
    with pytest.raises(InvalidMessage) as caught:
        decode(payload, **options)
    return str(caught.value)


def parse_error(document) -> str:
    with pytest.raises(InvalidMessage) as caught:
        parse(document)
    return str(caught.value)


def update_with_node(**fields):
    node = {"address": "10.0.0.1", "port": 80, **fields}
    return {"hpcs_action": "UPDATE", "loadbalancers": [{"protocol": "HTTP", "nodes": [node]}]}


class NoDriver:
    """Any call is a failure: hostile input must never reach the driver."""

    def __getattr__(self, name):
        raise AssertionError(f"the driver was called ({name}) for a refused message")


def strict_reply(payload: bytes | str, **options) -> dict:
    """The controller's reply, through the same encoder the transport uses, read strictly."""
    answer = LBaaSController(NoDriver(), **options).handle(payload)

    def refuse(token):
        raise AssertionError(f"the reply holds the non-JSON token {token}")

    return json.loads(encode_reply(answer), parse_constant=refuse)


# ---------------------------------------------------------------------- numbers


@pytest.mark.parametrize("payload", [
    '{"hpcs_action": "DISCOVER", "x": 1e309}',
    '{"hpcs_action": "DISCOVER", "x": -1e309}',
    '{"hpcs_action": "DISCOVER", "x": NaN}',
    '{"hpcs_action": "DISCOVER", "x": Infinity}',
    '{"hpcs_action": "DISCOVER", "x": [-Infinity]}',
    '{"hpcs_action": "DISCOVER", "x": 9223372036854775808}',
    '{"hpcs_action": "DISCOVER", "x": -9223372036854775809}',
    '{"hpcs_action": "DISCOVER", "x": ' + "9" * 5000 + "}",
])
@pytest.mark.parametrize("encoded", [False, True], ids=["str", "bytes"])
def test_non_finite_and_overflowing_numbers_are_not_valid_json(payload, encoded):
    # Bytes, as jobs come, take the decoder that reads integers in C when no run of 19
    # digits could hold one outside 64 bits; both ways refuse the same.
    reply = strict_reply(payload.encode() if encoded else payload)

    assert reply["hpcs_response"] == "FAIL"
    assert "not valid JSON" in reply["hpcs_error"]
    assert len(reply["hpcs_error"]) < 200
    assert "x" not in reply  # nothing of a refused document is echoed


@pytest.mark.parametrize("encoded", [False, True], ids=["str", "bytes"])
def test_the_largest_64_bit_integers_and_ordinary_floats_are_accepted(encoded):
    payload = '{"a": 9223372036854775807, "b": -9223372036854775808, "c": 1.5e308}'
    document = decode(payload.encode() if encoded else payload)
    assert document == {"a": 2**63 - 1, "b": -(2**63), "c": 1.5e308}


@pytest.mark.parametrize("payload", [
    b'{"a": 999999999999999999, "b": -999999999999999999, "c": [0, -0, 7]}',
    # A run of 19 digits in a string sends the whole payload the careful way.
    b'{"a": 999999999999999999, "id": "12345678901234567890", "c": [0, -0, 7]}',
    b'{"a": 999999999999999999, "c": 1.2345678901234567890e5}',
])
def test_integers_read_the_same_whichever_way_the_payload_is_decoded(payload):
    assert decode(payload) == json.loads(payload)
    assert all(type(value) is type(json.loads(payload)[key])
               for key, value in decode(payload).items())


def test_no_reply_ever_holds_a_non_json_token():
    # The last guard: even a handler that put NaN in a reply yields strict JSON.
    encoded = encode_reply({"hpcs_action": "STATS", "x": float("nan")})
    reply = json.loads(encoded, parse_constant=lambda token: pytest.fail(token))
    assert reply["hpcs_response"] == "FAIL"


@pytest.mark.parametrize("number", ["\uff18\uff10", "8\u0660", "\u0668\u0660"])
def test_numbers_are_ascii_digits_only(number):
    error = parse_error(update_with_node(port=number))
    assert "loadbalancers[0].nodes[0].port must be a whole number" in error


# ---------------------------------------------------------------------- names and values


@pytest.mark.parametrize("action", ["\u017ftats", "\u017fTATS", "di\u017fcover"])
def test_enumerated_values_are_ascii_only(action):
    # 'ſ'.upper() == 'S': a non-ASCII look-alike must not become STATS.
    assert "hpcs_action" in parse_error({"hpcs_action": action})


def test_field_names_are_ascii_only():
    # The Kelvin sign lower-cases to 'k': this is an unknown (ignored) field, not 'lock'.
    kelvin = "\u212a"
    message = parse({"hpcs_action": "STATS", f"hpcs_action{kelvin}": "DELETE"})
    assert message.action is Action.STATS
    assert "protocol" in parse_error({
        "hpcs_action": "UPDATE", "loadbalancers": [{"PROTOCOL\u212a": "HTTP", "nodes": []}]})


@pytest.mark.parametrize("value", ["di\u017fabled", "DI\u017fABLED"])
def test_condition_is_ascii_only(value):
    assert "condition must be ENABLED or DISABLED" in parse_error(update_with_node(condition=value))


def test_booleans_are_ascii_only():
    assert "backup must be true or false" in parse_error(update_with_node(backup="fal\u017fe"))


# ---------------------------------------------------------------------- duplicates


@pytest.mark.parametrize("payload", [
    '{"hpcs_action": "STATS", "hpcs_action": "DELETE"}',
    '{"hpcs_action": "STATS", "HPCS_Action": "DELETE"}',
    '{"hpcs_action": "UPDATE", "loadbalancers": [{"protocol": "HTTP", "port": 80,'
    ' "port": 81, "nodes": []}]}',
])
def test_a_field_given_twice_is_refused_in_any_casing(payload):
    reply = strict_reply(payload)

    assert reply["hpcs_response"] == "FAIL" and "given twice" in reply["hpcs_error"], reply
    assert reply["badRequest"]["validationErrors"]["message"] == reply["hpcs_error"]


# ---------------------------------------------------------------------- quoting


@pytest.mark.parametrize("field", ["address", "id", "condition"])
def test_a_hostile_value_is_quoted_by_a_short_prefix_only(field):
    hostile = ("9" if field == "address" else "x") * 5_000_000  # under the size limit
    reply = strict_reply(json.dumps(update_with_node(**{field: hostile})))

    assert reply["hpcs_response"] == "FAIL"
    assert len(reply["hpcs_error"]) <= 128  # what Libra stores
    # The whole sentence (cut for Libra or not) quotes a prefix and the length only.
    whole = reply.get("hpcs_error_detail", reply["hpcs_error"])
    assert len(whole) < 250, whole[:300]
    assert "(5000000 characters)" in whole
    assert reply["badRequest"]["validationErrors"]["message"] == reply["hpcs_error"]


@pytest.mark.parametrize("value", [["1"] * 100_000, {"a": "b" * 1_000_000}, "z" * 1_000_000])
def test_a_wrong_type_is_named_not_copied(value):
    error = parse_error(update_with_node(port=value))
    assert len(error) < 200, error[:300]


def test_quoted_keeps_short_values_whole_and_cuts_long_ones():
    assert quoted("abc") == "'abc'"
    assert quoted("a" * 41) == "'" + "a" * 40 + "'… (41 characters)"


def test_the_rejected_message_is_logged_bounded(caplog):
    caplog.set_level("INFO")
    strict_reply(json.dumps(update_with_node(address="7" * 1_000_000)))
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 300


# ---------------------------------------------------------------------- size


def test_a_payload_above_the_limit_is_refused_before_decoding():
    payload = b'{"hpcs_action": "DISCOVER", "pad": "' + b"p" * 2000 + b'"}'
    error = decode_error(payload, max_bytes=1000)
    assert "1000 bytes" in error and "[worker] max_message_bytes" in error
    # Not even valid JSON is looked at: the size is the first check.
    assert "max_message_bytes" in decode_error(b"\xff" * 1001, max_bytes=1000)


def test_the_controller_applies_its_limit():
    reply = strict_reply(b'{"hpcs_action": "DISCOVER"}' + b" " * 100, max_message_bytes=64)
    assert reply["hpcs_response"] == "FAIL" and "64 bytes" in reply["hpcs_error"]


def test_a_payload_drained_as_oversized_gets_the_same_reply_as_one_held_whole():
    """The job-server connection drains a payload over the limit and keeps its head only;
    the reply is the one a held payload of that size gets: size, limit, the action's keys."""
    payload = b'{"hpcs_action": "UPDATE", "pad": "' + b"p" * 3000 + b'"}'
    drained = Oversized(len(payload), payload[:SNIFF_BYTES])
    assert strict_reply(drained, max_message_bytes=1024) == strict_reply(payload, max_message_bytes=1024)


def test_the_largest_supported_update_fits_the_default_limit():
    node = {"id": "n" * 64, "address": "fd00:1234:5678:9abc:def0:1234:5678:9abc",
            "port": 65535, "weight": 256, "backup": False, "condition": "DISABLED"}
    nodes = [dict(node, id=f"{index:064d}") for index in range(10_000)]
    message = {"hpcs_action": "UPDATE", "loadBalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": nodes},
        {"protocol": "TCP", "port": 443, "nodes": nodes}]}
    payload = json.dumps(message, indent=2).encode()

    assert decode(payload)["hpcs_action"] == "UPDATE"


# ---------------------------------------------------------------------- nesting


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("levels", [MAX_DEPTH, 500, 900])
def test_deep_nesting_is_an_ordinary_validation_failure_that_echoes_what_it_can(levels):
    payload = '{"hpcs_action": "STATS", "x": ' + nested(levels) + ', "note": "kept"}'
    reply = strict_reply(payload)

    assert reply["hpcs_response"] == "FAIL", reply
    assert f"more than {MAX_DEPTH} levels" in reply["hpcs_error"]
    assert "'x'" in reply["hpcs_error"] and "does not echo" in reply["hpcs_error"]
    assert reply["hpcs_action"] == "STATS" and reply["note"] == "kept" and "x" not in reply
    assert "badRequest" in reply


def test_nesting_the_decoder_cannot_follow_is_not_valid_json():
    reply = strict_reply('{"hpcs_action": "STATS", "x": ' + nested(100_000) + "}")

    assert reply["hpcs_response"] == "FAIL"
    assert "not valid JSON" in reply["hpcs_error"] and "nested too deeply" in reply["hpcs_error"]


def test_nesting_within_the_limit_is_echoed():
    payload = '{"hpcs_action": "DISCOVER", "x": ' + nested(MAX_DEPTH - 1) + "}"
    message = parse(decode(payload))
    assert message.action is Action.DISCOVER
    assert bad_request(message.original, "e")["x"] == json.loads(nested(MAX_DEPTH - 1))
