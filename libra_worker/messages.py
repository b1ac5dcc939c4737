"""The message protocol: parse and validate a job's JSON into typed objects, build replies.

This is the only module that reads raw JSON. Everything past it (controller, drivers,
templates) works on the frozen dataclasses defined here, so a value that reaches the
HAProxy configuration has been checked against a whitelist first.

The spec's common rules live here too: field names and enumerated values are
case-insensitive, extra fields are ignored, numbers may arrive as strings, and every
reply is the original message plus ``hpcs_response`` (and ``hpcs_error`` on FAIL).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import logging
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import quote

from libra_worker.errors import InvalidMessage, quoted

LOG = logging.getLogger(__name__)

MAX_LOAD_BALANCERS = 2
MAX_WEIGHT = 256
# Libra's API takes option timeouts of 0-1,000,000 ms, 0 meaning "no timeout"; a day is
# kept as the ceiling for senders that always allowed more.
MAX_TIMEOUT_MS = 24 * 3600 * 1000
# The largest delay HAProxy can time (2**31 - 1 ms): Libra's API bounds monitor delays
# only by its integer column, but HAProxy refuses `inter 0` and anything longer.
MAX_MONITOR_SECONDS = (2**31 - 1) // 1000
MAX_RETRIES = 256
# Libra's monitors.path column is VARCHAR(2000).
MAX_PATH_LENGTH = 2000
# Libra's API percent-encodes a monitor path with urllib's quote() and keeps these as
# they are (RFC 3986's reserved characters and '%'); the worker does the same, so a path
# from an older API that passed it raw (blanks, quotes, backslashes, non-ASCII) means
# what a newer one would have sent, and the health check's request line is valid HTTP.
# '@' is kept too: it is a URI path character, and this worker always passed it as is.
LIBRA_PATH_SAFE = "/~+*,;:!$'[]()?&=#%@"
# Percent-encoding at most triples an ASCII path; a longer result can only come from
# non-ASCII text and would not fit in HAProxy's check request buffer.
MAX_ENCODED_PATH_LENGTH = 3 * MAX_PATH_LENGTH

# Identifiers become HAProxy server names; this is the set HAProxy accepts in names,
# less ':' so an id can never be confused with an address.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Field names, enumerated values and numbers are ASCII: str.lower() would make the
# Kelvin sign a 'k' and str.upper() 'ſtats' STATS, and int() reads full-width digits.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_WHOLE_NUMBER = re.compile(r"[ \t]*[+-]?[0-9]{1,12}[ \t]*")

# Refused before decoding: decoding, validating and echoing a message takes 6-8 times its
# size in memory (bench/fuzz.py). The default holds the largest UPDATE supported (two load
# balancers of 10,000 nodes with 64-character ids and IPv6 addresses, pretty-printed:
# 5.6 MB) with room to spare.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Arrays and objects inside one another; a valid message uses four levels
# (message, loadBalancers, a load balancer, its monitor), extra fields may use more.
MAX_DEPTH = 32
# Integers must fit in 64 bits, as every JSON parser an API server may use can read them.
_MAX_INTEGER_DIGITS = 19
_MAX_INTEGER = 2**63 - 1


class Action(enum.Enum):
    UPDATE = "UPDATE"
    SUSPEND = "SUSPEND"
    ENABLE = "ENABLE"
    DELETE = "DELETE"
    DISCOVER = "DISCOVER"
    ARCHIVE = "ARCHIVE"
    STATS = "STATS"
    METRICS = "METRICS"
    DIAGNOSTICS = "DIAGNOSTICS"


class Protocol(enum.Enum):
    HTTP = "HTTP"
    TCP = "TCP"
    # Libra's database load balancer: TCP to one primary node (a Galera cluster's write
    # node), to a backup only while the primary is down.
    GALERA = "GALERA"

    @property
    def mode(self) -> str:
        """HAProxy's mode, "http" or "tcp": also the name access logs and billing know the
        load balancer by (Libra's billing reads a GALERA one's bytes under "tcp")."""
        return "http" if self is Protocol.HTTP else "tcp"


class Algorithm(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_CONNECTIONS = "LEAST_CONNECTIONS"


class MonitorType(enum.Enum):
    CONNECT = "CONNECT"
    HTTP = "HTTP"


@dataclass(frozen=True)
class Node:
    id: str
    address: str
    port: int
    weight: int = 1
    backup: bool = False
    enabled: bool = True


@dataclass(frozen=True)
class Monitor:
    type: MonitorType
    delay: int
    timeout: int
    attempts: int
    path: str = "/"


# When a message names no monitor the nodes are still health-checked, so that STATS can
# report each node UP or DOWN and a dead node stops receiving traffic.
DEFAULT_MONITOR = Monitor(type=MonitorType.CONNECT, delay=30, timeout=30, attempts=2)


@dataclass(frozen=True)
class Options:
    """Timeouts in milliseconds, 0 meaning "no timeout" as in Libra's API."""

    client_timeout_ms: int = 30000
    server_timeout_ms: int = 30000
    connect_timeout_ms: int = 30000
    connect_retries: int = 3


@dataclass(frozen=True)
class LoadBalancer:
    protocol: Protocol
    port: int
    nodes: tuple[Node, ...]
    algorithm: Algorithm = Algorithm.ROUND_ROBIN
    monitor: Monitor = DEFAULT_MONITOR
    options: Options = field(default_factory=Options)
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Device:
    """Everything one UPDATE declares: at most one HTTP and one TCP (or GALERA) load
    balancer."""

    loadbalancers: tuple[LoadBalancer, ...]


@dataclass(frozen=True)
class ArchiveRequest:
    protocol: Protocol
    lb_id: str
    basepath: str
    endpoint: str
    token: str


@dataclass(frozen=True)
class Message:
    """A parsed job: the action, its typed payload (if any), and what came on the wire."""

    action: Action
    original: dict[str, Any]
    device: Device | None = None
    archive: ArchiveRequest | None = None
    # The bytes `original` was decoded from, when it came as bytes: a PASS reply that only
    # adds the outcome is those bytes with it (see `reply`).
    payload: bytes | None = None


# --------------------------------------------------------------------------- parsing


class _Refused(ValueError):
    """Raised by the JSON decoder's hooks; its text is the whole sentence for the reply."""



_ACTION_FIELD = re.compile(rb'"hpcs_action"\s*:\s*"([A-Za-z]{1,20})"', re.IGNORECASE)
# How much of a payload that cannot be decoded is searched for the action it names.
SNIFF_BYTES = 4096


@dataclass(frozen=True)
class Oversized:
    """A job payload too large to hold: the job-server connection drained it as it came
    (see `libra_worker.jobserver`), keeping its size and first `SNIFF_BYTES` only."""

    size: int
    head: bytes


def sniff_action(payload: bytes | str | Oversized) -> str:
    """The action a payload that cannot be decoded seems to name ("" if none): only to
    give its FAIL reply the keys that action's readers expect, never to run anything."""
    head = payload.head if isinstance(payload, Oversized) else payload[:SNIFF_BYTES]
    found = _ACTION_FIELD.search(head.encode("utf-8", "replace") if isinstance(head, str) else head)
    return found.group(1).decode("ascii").upper() if found else ""


def decode(payload: bytes | str | Oversized,
           max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode a job payload into the JSON object it must be.

    Strict where Python's json module is lenient: NaN, Infinity, numbers that overflow a
    double or 64-bit integer, and a field given twice (in any casing) are refused, so a
    reply can never carry a token that other JSON parsers reject, nor act on a guess.
    """
    if isinstance(payload, Oversized):
        size = payload.size
    else:
        size = len(payload) if isinstance(payload, bytes) else len(payload.encode("utf-8", "replace"))
    if size > max_bytes or isinstance(payload, Oversized):
        raise InvalidMessage(
            f"The message is {size} bytes long, more than the {max_bytes} bytes this worker "
            "accepts ([worker] max_message_bytes)."
        )
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        document = _decoder_for(payload).decode(text)
    except _Refused as exc:
        raise InvalidMessage(str(exc)) from None
    except RecursionError:
        raise InvalidMessage(
            "The message is not valid JSON: its arrays and objects are nested too deeply "
            "to decode."
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessage(f"The message is not valid JSON: {exc}.") from None
    if not isinstance(document, dict):
        raise InvalidMessage("The message must be a JSON object.")
    return document


def _fields_given_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    # Called for every object of the message (each node's): passes in C decide the usual
    # cases. Distinct names that are all their own lower-cased form (see `_lower_keys`)
    # cannot clash; nor can names that differ only in ASCII case, which lower() alike. The
    # loop below names the culprit.
    if len(fields) == len(pairs) and all(map(str.islower, fields)):
        return fields
    if len(set(map(str.lower, fields))) == len(pairs):
        return fields
    fields = {}
    names: dict[str, str] = {}
    for key, value in pairs:
        name = key.translate(_ASCII_LOWER)
        if name in names:
            also = "" if names[name] == key else f" (also as {quoted(names[name])})"
            raise _Refused(
                f"The field {quoted(key)} is given twice{also}; which value was meant is a "
                "guess, so the message is refused (and not echoed)."
            )
        names[name] = key
        fields[key] = value
    return fields


def _non_finite(token: str) -> float:
    raise _Refused(f"The message is not valid JSON: {token} is not a JSON number.")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _Refused(
            f"The message is not valid JSON: the number {quoted(text)} is out of range."
        )
    return number


def _bounded_int(text: str) -> int:
    if len(text) < _MAX_INTEGER_DIGITS:
        return int(text)  # at most 18 digits: within 64 bits whatever they are
    # Long digit strings are refused unread: int() of 20 MB of digits takes seconds.
    number = int(text) if len(text.lstrip("-")) <= _MAX_INTEGER_DIGITS else None
    if number is None or not -_MAX_INTEGER - 1 <= number <= _MAX_INTEGER:
        raise _Refused(
            f"The message is not valid JSON: the number {quoted(text)} is out of range "
            "(integers must fit in 64 bits)."
        )
    return number


# Made once: `json.loads` with hooks builds a decoder per call (measured: 1.4 of the
# 3.1 us a ping's decoding took).
_DECODER = json.JSONDecoder(
    object_pairs_hook=_fields_given_once,
    parse_constant=_non_finite,
    parse_float=_finite_float,
    parse_int=_bounded_int,
)
# The same, reading integers in C: for a payload in which no integer can leave 64 bits.
_SHORT_INTEGERS_DECODER = json.JSONDecoder(
    object_pairs_hook=_fields_given_once,
    parse_constant=_non_finite,
    parse_float=_finite_float,
)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * _MAX_INTEGER_DIGITS


def _decoder_for(payload: bytes | str) -> json.JSONDecoder:
    """An integer outside 64 bits has 19 digits or more in a row; a payload with no such
    run anywhere (strings included) needs no Python call per integer to refuse one. (A
    1,000-node UPDATE has 2,000 integers; the scan costs a tenth of calling for them.)"""
    if isinstance(payload, bytes) and payload.translate(_DIGITS_AS_ZERO).find(_LONG_DIGIT_RUN) < 0:
        return _SHORT_INTEGERS_DECODER
    return _DECODER


def too_deep_fields(document: Mapping[str, Any]) -> list[str]:
    """The top-level fields whose values nest arrays and objects beyond `MAX_DEPTH`.

    Iterative, so that depth itself cannot exhaust the interpreter's stack.
    """
    deep = []
    for key, value in document.items():
        # Level by level (the message itself is level 1): one list of the containers at
        # each level, so a 10,000-node list costs one comprehension, not 10,000 pushes.
        level, containers = 2, [value] if isinstance(value, (dict, list)) else []
        while containers:
            if level > MAX_DEPTH:
                deep.append(key)
                break
            containers = [child
                          for item in containers
                          for child in (item.values() if isinstance(item, dict) else item)
                          if isinstance(child, (dict, list))]
            level += 1
    return deep


def parse(document: dict[str, Any], payload: bytes | None = None) -> Message:
    """Validate a decoded message whole, before anything is touched; `payload`: the bytes
    `document` was decoded from, if it came as bytes."""
    deep = too_deep_fields(document)
    if deep:
        names = ", ".join(quoted(name) for name in deep[:3])
        raise InvalidMessage(
            f"The message nests arrays or objects more than {MAX_DEPTH} levels deep (in "
            f"{names}); the reply does not echo such fields."
        )
    fields = _lower_keys(document)
    action = _enum(Action, fields.get("hpcs_action"), "hpcs_action", required=True)
    if action is Action.UPDATE:
        return Message(action, document, device=parse_device(fields), payload=payload)
    if action is Action.ARCHIVE:
        return Message(action, document, archive=_parse_archive(fields), payload=payload)
    return Message(action, document, payload=payload)


def parse_device(fields: Mapping[str, Any]) -> Device:
    """Validate an UPDATE's load balancers (keys already lower-cased)."""
    entries = _list(fields.get("loadbalancers"), "loadbalancers", required=True)
    if not entries:
        raise InvalidMessage("'loadbalancers' must define at least one load balancer.")
    if len(entries) > MAX_LOAD_BALANCERS:
        raise InvalidMessage(
            f"At most {MAX_LOAD_BALANCERS} load balancers may be defined, got {len(entries)}."
        )
    parsed: dict[_NodeKey, Node] = {}
    loadbalancers = tuple(
        _parse_loadbalancer(_object(entry, f"loadbalancers[{i}]"), f"loadbalancers[{i}]",
                            parsed)
        for i, entry in enumerate(entries)
    )
    # As in Libra: one HTTP and one TCP-mode (TCP or GALERA) load balancer per device.
    modes = [lb.protocol.mode for lb in loadbalancers]
    if len(set(modes)) != len(modes):
        raise InvalidMessage(
            "Two load balancers must use different protocols (one HTTP and one TCP or GALERA)."
        )
    ports = [lb.port for lb in loadbalancers]
    if len(set(ports)) != len(ports):
        raise InvalidMessage("The HTTP and TCP load balancers must listen on different ports.")
    global _last_nodes
    _last_nodes = parsed
    return Device(loadbalancers)


# A node entry's field names, their values and the values' types, in one flat tuple (3n
# items for n fields, so never ambiguous): all `_parse_node` reads. Flat, it is one
# object per node for the allocator and the cycle collector to handle, not seven.
_NodeKey = tuple[Any, ...]
# The nodes of the last device parsed whole, by their key. An UPDATE repeats the nodes of
# the one before but a few, and checking each node again cost more than all the rest of a
# large message. The same names, with values of the same types that compare equal (so
# never 1 for true), make the same Node; anything else is checked. One device's worth,
# replaced by the next.
_last_nodes: dict[_NodeKey, Node] = {}


def _parse_loadbalancer(fields: Mapping[str, Any], where: str,
                        parsed: dict[_NodeKey, Node]) -> LoadBalancer:
    protocol = _enum(Protocol, fields.get("protocol"), f"{where}.protocol", required=True)
    default_port = 80 if protocol is Protocol.HTTP else None
    port = _int(fields.get("port", default_port), f"{where}.port", 1, 65535, required=True)
    nodes = _nodes(_list(fields.get("nodes"), f"{where}.nodes", required=True),
                   f"{where}.nodes", parsed)
    _reject_duplicates([node.id for node in nodes], f"{where}.nodes", "id")
    _reject_duplicates([(node.address, node.port) for node in nodes], f"{where}.nodes",
                       "address", shown=lambda key: f"{key[0]} port {key[1]}")
    if protocol is Protocol.GALERA:
        _check_one_primary(nodes, f"{where}.nodes")
    return LoadBalancer(
        protocol=protocol,
        port=port,
        nodes=nodes,
        algorithm=_enum(Algorithm, fields.get("algorithm"), f"{where}.algorithm")
        or Algorithm.ROUND_ROBIN,
        monitor=_parse_monitor(fields.get("monitor"), f"{where}.monitor"),
        options=_parse_options(fields.get("options"), f"{where}.options"),
        id=_identifier(fields.get("id"), f"{where}.id"),
        name=_name(fields.get("name"), f"{where}.name"),
    )


def _nodes(entries: list[Any], where: str, parsed: dict[_NodeKey, Node]) -> tuple[Node, ...]:
    """Each entry's node: the last device's node for an entry given exactly as then, any
    other entry checked; all kept in `parsed` for the next device.

    The key is the entry as it came, names in their own casing: a node the full check
    accepted from those very fields is what it would accept again. Keys are made and
    looked up for the whole list at once, which costs a fifth of doing it node by node.
    """
    try:
        # keys() first: an entry that is no object fails here before anything of it is
        # copied (unpacking an 8 MB string first made a tuple of its characters).
        keys = [(*entry.keys(), *entry.values(), *map(type, entry.values())) for entry in entries]
        nodes: list[Node | None] = list(map(_last_nodes.get, keys))
    except (AttributeError, TypeError):
        # An entry that is not an object, or that holds a list or an object (an ignored
        # field, so unhashable): each entry is checked on its own, and says which it is.
        return tuple(_parse_node(_object(entry, f"{where}[{i}]"), f"{where}[{i}]")
                     for i, entry in enumerate(entries))
    for i, node in enumerate(nodes):
        if node is None:
            nodes[i] = _parse_node(_object(entries[i], f"{where}[{i}]"), f"{where}[{i}]")
    parsed.update(zip(keys, nodes))
    return tuple(nodes)  # type: ignore[arg-type]  # every None was replaced above


def _parse_node(fields: Mapping[str, Any], where: str) -> Node:
    address = _address(fields.get("address"), f"{where}.address")
    port = _int(fields.get("port"), f"{where}.port", 1, 65535, required=True)
    condition = _text(fields.get("condition"), f"{where}.condition")
    if condition is not None:
        condition = condition.translate(_ASCII_UPPER)
    if condition is not None and condition not in ("ENABLED", "DISABLED"):
        raise InvalidMessage(
            f"{where}.condition must be ENABLED or DISABLED, got {quoted(condition)}."
        )
    return Node(
        # A stable name when the API gives none, so STATS and reloads keep matching it.
        id=_identifier(fields.get("id"), f"{where}.id") or derived_node_id(address, port),
        address=address,
        port=port,
        weight=_int(fields.get("weight", 1), f"{where}.weight", 1, MAX_WEIGHT),
        backup=_bool(fields.get("backup", False), f"{where}.backup"),
        enabled=condition is None or condition == "ENABLED",
    )


def _check_one_primary(nodes: tuple[Node, ...], where: str) -> None:
    """Libra's API rule for GALERA: every write goes to the one primary node.

    Counted as Libra's API counts, whatever the nodes' condition: a DISABLED primary is
    still the primary, and the backups are never balanced as equals.
    """
    primaries = sum(not node.backup for node in nodes)
    if primaries != 1:
        raise InvalidMessage(
            f"{where}: Galera load balancer must have exactly one primary node (the "
            f"others backup), got {primaries}."
        )


def derived_node_id(address: str, port: int) -> str:
    """The server name used for a node that came without an id."""
    return f"{address.replace(':', '_')}_{port}"


def _parse_monitor(value: Any, where: str) -> Monitor:
    if value is None:
        return DEFAULT_MONITOR
    fields = _object(value, where)
    monitor_type = _enum(MonitorType, fields.get("type"), f"{where}.type", required=True)
    delay = _int(fields.get("delay"), f"{where}.delay", 1, MAX_MONITOR_SECONDS, required=True)
    # 0 is Libra's "no timeout of its own": the check is then bounded by the delay.
    timeout = _int(
        fields.get("timeout"), f"{where}.timeout", 0, MAX_MONITOR_SECONDS, required=True
    )
    attempts = _int(fields.get("attempts"), f"{where}.attempts", 1, 10, required=True)
    if timeout > delay:
        raise InvalidMessage(
            f"{where}.timeout ({timeout}) must not be greater than {where}.delay ({delay})."
        )
    path = _monitor_path(_text(fields.get("path"), f"{where}.path") or "/", f"{where}.path")
    return Monitor(monitor_type, delay, timeout, attempts, path)


def _monitor_path(path: str, where: str) -> str:
    """The path percent-encoded as Libra's API does; the template quotes it for HAProxy."""
    if not path.startswith("/"):
        raise InvalidMessage(f"{where} must start with '/'.")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidMessage(
            f"{where} has {len(path)} characters; at most {MAX_PATH_LENGTH} are allowed."
        )
    if _CONTROL_CHARS.search(path):
        raise InvalidMessage(f"{where} must not contain control characters.")
    encoded = quote(path, safe=LIBRA_PATH_SAFE)
    if len(encoded) > MAX_ENCODED_PATH_LENGTH:
        raise InvalidMessage(
            f"{where} is {len(encoded)} characters long once percent-encoded; "
            f"at most {MAX_ENCODED_PATH_LENGTH} are allowed."
        )
    return encoded


def _parse_options(value: Any, where: str) -> Options:
    if value is None:
        return Options()
    fields = _object(value, where)
    defaults = Options()
    return Options(
        client_timeout_ms=_int(
            fields.get("client_timeout", defaults.client_timeout_ms),
            f"{where}.client_timeout", 0, MAX_TIMEOUT_MS,
        ),
        server_timeout_ms=_int(
            fields.get("server_timeout", defaults.server_timeout_ms),
            f"{where}.server_timeout", 0, MAX_TIMEOUT_MS,
        ),
        connect_timeout_ms=_int(
            fields.get("connect_timeout", defaults.connect_timeout_ms),
            f"{where}.connect_timeout", 0, MAX_TIMEOUT_MS,
        ),
        connect_retries=_int(
            fields.get("connect_retries", defaults.connect_retries),
            f"{where}.connect_retries", 0, MAX_RETRIES,
        ),
    )


def _parse_archive(fields: Mapping[str, Any]) -> ArchiveRequest:
    store_type = _text(fields.get("hpcs_object_store_type"), "hpcs_object_store_type", True)
    if store_type.translate(_ASCII_LOWER) != "swift":
        raise InvalidMessage(
            f"hpcs_object_store_type {quoted(store_type)} is not supported; supported types: swift."
        )
    basepath = _text(fields.get("hpcs_object_store_basepath"), "hpcs_object_store_basepath", True)
    if "/" in basepath or _CONTROL_CHARS.search(basepath) or len(basepath) > 256:
        raise InvalidMessage(
            "hpcs_object_store_basepath must be a Swift container name "
            "(no '/', no control characters, at most 256 characters)."
        )
    endpoint = _text(fields.get("hpcs_object_store_endpoint"), "hpcs_object_store_endpoint", True)
    if not re.match(r"^https?://[^\s]+$", endpoint):
        raise InvalidMessage("hpcs_object_store_endpoint must be an http(s) storage URL.")
    token = _text(fields.get("hpcs_object_store_token"), "hpcs_object_store_token", True)
    if _CONTROL_CHARS.search(token):
        raise InvalidMessage("hpcs_object_store_token must not contain control characters.")
    entries = _list(fields.get("loadbalancers"), "loadbalancers", required=True)
    if not entries:
        raise InvalidMessage("'loadbalancers' must name the load balancer to archive.")
    first = _object(entries[0], "loadbalancers[0]")
    lb_id = _identifier(first.get("id"), "loadbalancers[0].id")
    if lb_id is None:
        raise InvalidMessage("Required field 'loadbalancers[0].id' is missing.")
    return ArchiveRequest(
        protocol=_enum(Protocol, first.get("protocol"), "loadbalancers[0].protocol", True),
        lb_id=lb_id,
        basepath=basepath,
        endpoint=endpoint,
        token=token,
    )


# --------------------------------------------------------------------------- field helpers


def _lower_keys(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """One object with its keys lower-cased, so field names are case-insensitive.

    Two keys that differ only in case are refused: which one was meant is a guess, and
    for hpcs_action a wrong guess could DELETE instead of STATS. One level only: each
    object is lowered where it is read (`_object`), and an ignored one not at all
    (`decode` refuses such keys in every object of a payload anyway)."""
    # Called for every node, whose names are mostly lower-case already: a name with a
    # cased character and no capital one is its own lower-cased form. (JSON's names are
    # always text.)
    if all(map(str.islower, value)):
        return value
    lowered = {key.translate(_ASCII_LOWER): item for key, item in value.items()}
    if len(lowered) < len(value):
        seen: set[str] = set()
        for key in value:
            name = key.translate(_ASCII_LOWER)
            if name in seen:
                raise InvalidMessage(
                    f"The field {quoted(name)} is given twice, in different casings."
                )
            seen.add(name)
    return lowered


def _missing(where: str) -> InvalidMessage:
    return InvalidMessage(f"Required field '{where}' is missing.")


def _object(value: Any, where: str) -> Mapping[str, Any]:
    """The object's fields, names lower-cased."""
    if not isinstance(value, dict):
        raise InvalidMessage(f"{where} must be a JSON object.")
    return _lower_keys(value)


def _list(value: Any, where: str, required: bool = False) -> list[Any]:
    if value is None:
        if required:
            raise _missing(where)
        return []
    if not isinstance(value, list):
        raise InvalidMessage(f"{where} must be a JSON list.")
    return value


def _text(value: Any, where: str, required: bool = False) -> Any:
    if value is None:
        if required:
            raise _missing(where)
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        # Name the type, not the value: this field may be the object store token.
        raise InvalidMessage(f"{where} must be a string, got {_json_type(value)}.")
    text = str(value).strip()
    if required and not text:
        raise InvalidMessage(f"{where} must not be empty.")
    return text


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", float: "a number"}.get(type(value), "null")


def _enum(kind: type[enum.Enum], value: Any, where: str, required: bool = False) -> Any:
    text = _text(value, where, required)
    if text is None:
        return None
    try:
        return kind(text.translate(_ASCII_UPPER))
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise InvalidMessage(
            f"{where} {quoted(text)} is not supported; use one of: {choices}."
        ) from None


def _int(value: Any, where: str, low: int, high: int, required: bool = False) -> int:
    if value is None:
        if required:
            raise _missing(where)
        raise InvalidMessage(f"{where} must be a whole number, got null.")
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value):
        number = int(value)
    if number is None:
        raise InvalidMessage(f"{where} must be a whole number, got {_shown(value)}.")
    if not low <= number <= high:
        raise InvalidMessage(f"{where} must be between {low} and {high}, got {number}.")
    return number


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().translate(_ASCII_UPPER) in ("TRUE", "FALSE"):
        return value.strip().translate(_ASCII_UPPER) == "TRUE"
    raise InvalidMessage(f"{where} must be true or false, got {_shown(value)}.")


def _shown(value: Any) -> str:
    """A wrong value for a sentence: containers by their type, anything else as a prefix."""
    if isinstance(value, (dict, list)):
        return _json_type(value)
    return quoted(value if isinstance(value, str) else json.dumps(value))


def _address(value: Any, where: str) -> str:
    text = _text(value, where, required=True)
    try:
        return _host_address(text)
    except ValueError as exc:
        raise InvalidMessage(f"{where} {quoted(text)} {exc}") from None


# The same node addresses come back in every UPDATE of a pool; checking 10,000 of them was
# most of the time spent validating a large UPDATE. Invalid text raises and is not cached.
@functools.lru_cache(maxsize=65536)
def _host_address(text: str) -> str:
    """The address of one host in its normal form; ValueError saying why `text` is not."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IPv4 or IPv6 address.") from None
    # ipaddress accepts any text after '%' as an IPv6 zone; none belongs in a server line.
    if getattr(address, "scope_id", None) is not None:
        raise ValueError("must not carry an IPv6 zone ('%...').")
    if address.is_unspecified or address.is_multicast:
        raise ValueError("is not the address of a single host.")
    return str(address)


def _identifier(value: Any, where: str) -> str | None:
    text = _text(value, where)
    if text is None:
        return None
    if not _ID_PATTERN.match(text):
        raise InvalidMessage(
            f"{where} {quoted(text)} may only contain letters, digits, '-', '_' and '.' "
            "(at most 64 characters)."
        )
    return text


def _name(value: Any, where: str) -> str | None:
    text = _text(value, where)
    if text is not None and (_CONTROL_CHARS.search(text) or len(text) > 128):
        raise InvalidMessage(
            f"{where} must be at most 128 characters without control characters."
        )
    return text


def _reject_duplicates(values: list[Any], where: str, what: str,
                       shown: Callable[[Any], str] = str) -> None:
    if len(set(values)) == len(values):
        return
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise InvalidMessage(f"{where} has two nodes with the same {what} ({shown(value)}).")
        seen.add(value)


# --------------------------------------------------------------------------- replies

PASS = "PASS"
FAIL = "FAIL"
# Libra's API servers store hpcs_error in LoadBalancer.errmsg, a VARCHAR(128).
MAX_ERROR_LENGTH = 128
_ELLIPSIS = "..."
_REPLY_FIELDS = ("hpcs_response", "hpcs_error", "hpcs_error_detail", "badrequest")


def short_error(sentence: str) -> str:
    """The sentence cut to what Libra can store; sentences name the cause and field first."""
    if len(sentence) <= MAX_ERROR_LENGTH:
        return sentence
    return sentence[: MAX_ERROR_LENGTH - len(_ELLIPSIS)].rstrip() + _ELLIPSIS


class EchoedReply(dict):  # type: ignore[type-arg]
    """A PASS reply that adds nothing but the outcome, with its JSON: the message's own
    bytes with ``"hpcs_response": "PASS"`` added before the closing brace. Encoding the
    echo of a 1,000-node UPDATE again cost about 1 ms; these bytes are the message as
    received, which is what the echo means."""

    def __init__(self, fields: dict[str, Any], encoded: bytes) -> None:
        super().__init__(fields)
        self.encoded = encoded


def reply(
    original: Mapping[str, Any],
    error: str | None = None,
    *,
    detail: str | None = None,
    payload: bytes | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The original message, as received, plus the outcome.

    This is the one place an error becomes reply fields: ``hpcs_error`` at most
    MAX_ERROR_LENGTH characters, and, when there is more to say (the sentence was cut, or
    `detail` carries HAProxy's whole message), ``hpcs_error_detail``, which Libra ignores.
    Any reply field the sender already put in the message (in whatever casing) is
    replaced, so the reply never carries two contradictory outcomes. `payload`: the bytes
    `original` was decoded from, for an EchoedReply when that is all there is to say.
    """
    added = {key.translate(_ASCII_LOWER) for key in extra} | set(_REPLY_FIELDS)
    answer = {key: value for key, value in original.items()
              if key.translate(_ASCII_LOWER) not in added}
    if payload is not None and not error and not extra and len(answer) == len(original):
        echoed = _with_outcome(payload)
        if echoed is not None:
            return EchoedReply({**answer, "hpcs_response": PASS}, echoed)
    answer.update(extra)
    answer["hpcs_response"] = FAIL if error else PASS
    if error:
        answer["hpcs_error"] = short_error(error)
        full = detail or error
        if full != answer["hpcs_error"]:
            answer["hpcs_error_detail"] = full
    return answer


def _with_outcome(payload: bytes) -> bytes | None:
    """`payload`, a JSON object, with a PASS outcome as its last field; None if it does
    not end as one (it always does once decoded; this only declines, never guesses)."""
    body = payload.rstrip(b" \t\r\n")
    if not body.endswith(b"}"):
        return None
    fields = body[:-1].rstrip(b" \t\r\n")
    return fields + (b"" if fields.endswith(b"{") else b",") + b' "hpcs_response": "PASS"}'


def error_detail(answer: Mapping[str, Any]) -> str | None:
    """The whole error of a reply: its detail if it has one, else ``hpcs_error``."""
    return answer.get("hpcs_error_detail") or answer.get("hpcs_error")


def bad_request(original: Mapping[str, Any], error: str, **extra: Any) -> dict[str, Any]:
    """A FAIL reply for a validation error, in the shape deployed Libra API servers read first.

    Fields nested beyond `MAX_DEPTH` are left out of the echo (the sentence says so);
    `extra` are more reply fields (e.g. the keys Libra reads from a METRICS reply).
    """
    deep = set(too_deep_fields(original))
    return reply(
        {key: value for key, value in original.items() if key not in deep},
        error,
        **extra,
        badRequest={
            "code": "400",
            "message": "Validation fault",
            "details": "The object is not valid",
            # Libra stores this one in errmsg when it is present, before hpcs_error.
            "validationErrors": {"message": short_error(error)},
        },
    )


def encode_reply(answer: Mapping[str, Any]) -> bytes:
    """The reply as JSON bytes; strict JSON always, whatever a handler put in it."""
    if isinstance(answer, EchoedReply):
        return answer.encoded
    try:
        # A decoded message is a tree; a cycle from a handler would end in RecursionError.
        return json.dumps(answer, allow_nan=False, check_circular=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        # Unreachable for a decoded message; the guard that no reply is ever invalid JSON.
        LOG.error("A reply could not be encoded as strict JSON: %s", exc)
        return json.dumps({
            "hpcs_response": FAIL,
            "hpcs_error": "The worker could not encode its reply as JSON; see its log.",
        }).encode("utf-8")


def device_document(device: Device) -> dict[str, Any]:
    """A Device written back in message form; `parse_device` reads it back unchanged.

    The desired-state file stores this, so a restored definition passes the same
    validation as one that came over the wire.
    """
    return {
        "loadbalancers": [
            {
                "protocol": lb.protocol.value,
                "port": lb.port,
                "algorithm": lb.algorithm.value,
                "id": lb.id,
                "name": lb.name,
                "monitor": {
                    "type": lb.monitor.type.value,
                    "delay": lb.monitor.delay,
                    "timeout": lb.monitor.timeout,
                    "attempts": lb.monitor.attempts,
                    "path": lb.monitor.path,
                },
                "options": {
                    "client_timeout": lb.options.client_timeout_ms,
                    "server_timeout": lb.options.server_timeout_ms,
                    "connect_timeout": lb.options.connect_timeout_ms,
                    "connect_retries": lb.options.connect_retries,
                },
                "nodes": [
                    {
                        "id": node.id,
                        "address": node.address,
                        "port": node.port,
                        "weight": node.weight,
                        "backup": node.backup,
                        "condition": "ENABLED" if node.enabled else "DISABLED",
                    }
                    for node in lb.nodes
                ],
            }
            for lb in device.loadbalancers
        ]
    }
