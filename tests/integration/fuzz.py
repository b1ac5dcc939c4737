"""Hostile messages at volume: hypothesis strategies and the campaign that sends them.

Used by tests/integration/test_fuzz.py (a short profile in CI) and bench/fuzz.py (10,000
messages). Every payload is bytes, as it travels through gearmand. Most are hostile: wrong
types in every field, NaN/Infinity and numbers beyond a double or 64 bits, control
characters, HAProxy directives injected into every string, deep nesting, 20,000-node
lists, multi-megabyte payloads, invalid UTF-8, duplicate keys; the rest are valid UPDATEs
over the campaign's loopback backends, so the load balancer really changes as it goes.

Nothing generated can send a packet off the machine: node addresses that validate are
127.0.0.1, and the worker's ARCHIVE allow-list ([archive] allowed_endpoints) names one
loopback URL prefix that no generated endpoint uses, so no ARCHIVE connects anywhere.
"""

from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.support import LOOPBACK, HTTPBackend, TCPBackend, Worker, strict_json

# Every injected string carries it: a rendered config holding it would prove an injection.
MARKER = "fuzzevil"
# The only endpoint ARCHIVE may use in a campaign; never generated (see module doc).
ALLOWED_ARCHIVE_ENDPOINT = f"https://{LOOPBACK}:1/fuzz-only-this-prefix"
WORKER_SETTINGS = {"archive": {"allowed_endpoints": ALLOWED_ARCHIVE_ENDPOINT,
                               "allow_plain_http": "false"}}

# Addresses in them are loopback: had one got through, HAProxy's checks stay on this host.
INJECTIONS = (
    f"x\n    server {MARKER} 127.9.9.9:80",
    f"80\nlisten {MARKER}\n    bind :8080",
    f"/health\r\n    http-request redirect location http://{MARKER}/",
    f"a b\n{MARKER} 1",
    f"n1 {MARKER} check",
    f"\x00{MARKER}",
    f"{{{{ {MARKER} }}}}{{% if 1 %}}",
    f"/${{{MARKER}}}",
    f"/p#{MARKER}",
    f"127.0.0.1\n    server {MARKER} 127.0.0.1:80",
    f"127.0.0.1%eth0 {MARKER}",
    f"ROUND_ROBIN\n    balance {MARKER}",
    f"HTTP\n    mode {MARKER}",
)
CONTROL_CHARACTERS = "\x00\x01\x07\x08\x0b\x1b\x7f\u0085\u2028\u2029\ufeff"
RAW_TOKENS = ("NaN", "Infinity", "-Infinity", "1e309", "-1e400", "123e99999",
              "99999999999999999999999", "-9223372036854775809", "1" * 400)
# Non-ASCII look-alikes of names and values the worker knows.
LOOKALIKES = ("\u017ftats", "UPDATE\u200b", "HTTP\u0345", "\uff18\uff10", "\u212aey",
              "ROUND_ROBIN\u0307", "di\u017fabled", "tru\u0435")

FIELDS = {
    "message": ("hpcs_action", "loadBalancers"),
    "lb": ("protocol", "port", "algorithm", "id", "name", "nodes", "monitor", "options"),
    "node": ("address", "port", "id", "weight", "backup", "condition"),
    "monitor": ("type", "delay", "timeout", "attempts", "path"),
    "options": ("client_timeout", "server_timeout", "connect_timeout", "connect_retries"),
}


@dataclass(frozen=True)
class Pool:
    """The loopback backends and LB ports of one campaign."""

    http_nodes: tuple[HTTPBackend, ...]
    tcp_nodes: tuple[TCPBackend, ...]
    http_port: int
    tcp_port: int


@dataclass(frozen=True)
class Case:
    kind: str
    payload: bytes
    expect: str | None  # "PASS", "FAIL", or None when either is acceptable


# --------------------------------------------------------------------------- strategies


def _raw(document: Any, raw: dict[str, str]) -> bytes:
    """JSON text with placeholders replaced by raw tokens (NaN, 1e309, ...)."""
    text = json.dumps(document)
    for placeholder, token in raw.items():
        text = text.replace(json.dumps(placeholder), token)
    return text.encode("utf-8")


def valid_update(draw: Callable[..., Any], pool: Pool) -> dict[str, Any]:
    chosen = draw(st.lists(st.sampled_from(range(len(pool.http_nodes))), min_size=1, unique=True))
    nodes = []
    for index in chosen:
        node = pool.http_nodes[index].node()
        if draw(st.booleans()):
            node["weight"] = draw(st.integers(1, 256))
        if draw(st.integers(0, 5)) == 0:
            node["condition"] = "DISABLED"
        nodes.append(node)
    balancer: dict[str, Any] = {
        "id": "fuzz-http", "name": draw(st.sampled_from(["web", "lb #1", "fuzz"])),
        "protocol": draw(st.sampled_from(["HTTP", "http", "Http"])), "port": pool.http_port,
        "algorithm": draw(st.sampled_from(["ROUND_ROBIN", "LEAST_CONNECTIONS", "round_robin"])),
        "nodes": nodes,
    }
    if draw(st.booleans()):
        balancer["monitor"] = {"type": "HTTP", "delay": 2, "timeout": 1, "attempts": 2,
                               "path": "/health"}
    loadbalancers = [balancer]
    if draw(st.booleans()):
        loadbalancers.append({"protocol": "TCP", "port": pool.tcp_port,
                              "nodes": [backend.node() for backend in pool.tcp_nodes]})
    return {"hpcs_action": "UPDATE", "loadBalancers": loadbalancers}


def hostile_value(draw: Callable[..., Any], raw: dict[str, str]) -> Any:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.sampled_from(INJECTIONS))
    if choice == 1:
        prefix = draw(st.text(max_size=8))
        return prefix + draw(st.sampled_from(CONTROL_CHARACTERS)) + MARKER
    if choice == 2:
        placeholder = f"__raw_{len(raw)}__"
        raw[placeholder] = draw(st.sampled_from(RAW_TOKENS))
        return placeholder
    if choice == 3:
        return draw(st.sampled_from(LOOKALIKES))
    if choice == 4:
        return draw(st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                              st.integers(-2**63, 2**63 - 1)))
    if choice == 5:
        return draw(st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=4))
    if choice == 6:
        return {draw(st.sampled_from(FIELDS["node"])): draw(st.sampled_from(INJECTIONS))}
    if choice == 7:
        return draw(st.text(max_size=30)) + " " + MARKER
    if choice == 8:
        return "x" * draw(st.sampled_from([65, 129, 257, 4097, 100_000])) + MARKER
    return draw(st.sampled_from(["", " ", "0", "-1", "65536", "1.5", "0x50", "1_000", "+80"]))


def mutated_update(draw: Callable[..., Any], pool: Pool) -> Case:
    """A valid UPDATE with one field (or one key's casing) made hostile."""
    document = valid_update(draw, pool)
    raw: dict[str, str] = {}
    balancer = document["loadBalancers"][0]
    targets = {
        "message": document,
        "lb": balancer,
        "node": balancer["nodes"][0],
        "monitor": balancer.setdefault("monitor", {"type": "CONNECT", "delay": 5, "timeout": 2,
                                                    "attempts": 2}),
        "options": balancer.setdefault("options", {}),
    }
    where = draw(st.sampled_from(sorted(FIELDS)))
    name = draw(st.sampled_from(FIELDS[where]))
    if draw(st.integers(0, 9)) == 0:
        # The same field again in another casing: refused, never a guess.
        targets[where][name.upper()] = hostile_value(draw, raw)
        targets[where].setdefault(name, "x")
    else:
        targets[where][name] = hostile_value(draw, raw)
    return Case(f"mutated {where}.{name}", _raw(document, raw), None)


def twenty_thousand_nodes(pool: Pool, hostile_index: int, hostile_address: str) -> Case:
    """20,000 nodes, one of them hostile: refused whole, nothing reaches HAProxy."""
    nodes = [{"address": LOOPBACK, "port": 1 + index} for index in range(20_000)]
    nodes[hostile_index]["address"] = hostile_address
    document = {"hpcs_action": "UPDATE",
                "loadBalancers": [{"protocol": "HTTP", "port": pool.http_port, "nodes": nodes}]}
    return Case("20,000 nodes", json.dumps(document).encode(), "FAIL")


def padded(action: str, megabytes: int) -> Case:
    """A message carrying an extra field of `megabytes` MiB; above 8 MiB it is refused."""
    payload = (f'{{"hpcs_action": "{action}", "pad": "'.encode()
               + b"p" * (megabytes * 1024 * 1024) + b'"}')
    passes = megabytes <= 8 and action != "UPDATE"
    return Case(f"{megabytes} MB", payload, "PASS" if passes else "FAIL")


def warm_up(pool: Pool) -> list[Case]:
    """One message of each large shape. The first 20,000-node list grows Python's object
    arenas by about 10 MB, which later ones reuse (measured: flat after the fourth); the
    RSS bound is about growth over the campaign, so it is taken after these."""
    return [twenty_thousand_nodes(pool, 19_999, INJECTIONS[0]) for _ in range(4)] + [
        padded("DISCOVER", 7), padded("DISCOVER", 9)]


@st.composite
def cases(draw: Callable[..., Any], pool: Pool) -> Case:
    kind = draw(st.integers(0, 99))
    if kind < 12:
        return Case("valid UPDATE", json.dumps(valid_update(draw, pool)).encode(), "PASS")
    if kind < 55:
        return mutated_update(draw, pool)
    if kind < 60:
        depth = draw(st.sampled_from([33, 100, 500, 999, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        nested = opener * depth + "1" + closer * depth
        return Case(f"nesting {depth}", b'{"hpcs_action": "STATS", "x": ' + nested.encode() + b"}",
                    "FAIL")
    if kind < 65:
        token = draw(st.sampled_from(RAW_TOKENS))
        action = draw(st.sampled_from(["DISCOVER", "STATS"]))
        return Case(f"raw number {token[:12]}",
                    f'{{"hpcs_action": "{action}", "x": [{token}]}}'.encode(), "FAIL")
    if kind < 70:
        first, second = draw(st.sampled_from([("STATS", "DELETE"), ("DISCOVER", "SUSPEND"),
                                              ("STATS", "STATS")]))
        key = draw(st.sampled_from(["hpcs_action", "HPCS_ACTION", "Hpcs_Action"]))
        return Case("duplicate key",
                    f'{{"hpcs_action": "{first}", "{key}": "{second}"}}'.encode(), "FAIL")
    if kind < 75:
        valid = json.dumps(valid_update(draw, pool)).encode()
        cut = draw(st.integers(1, len(valid) - 1))
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                     b"\xc0\xaf", b"\x80"]))
        return Case("invalid UTF-8", valid[:cut] + junk + valid[cut:], "FAIL")
    if kind < 78:
        return twenty_thousand_nodes(pool, draw(st.integers(0, 19_999)),
                                     draw(st.sampled_from(INJECTIONS)))
    if kind < 81:
        return padded(draw(st.sampled_from(["DISCOVER", "STATS", "UPDATE"])),
                      draw(st.sampled_from([1, 3, 7, 9, 12])))
    if kind < 88:
        document = {
            "hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
            "hpcs_object_store_basepath": "c",
            "hpcs_object_store_endpoint": draw(st.sampled_from([
                f"https://{LOOPBACK}:1/v1/AUTH_x", f"http://{LOOPBACK}:1/fuzz-only-this-prefix",
                f"https://{LOOPBACK}:1/fuzz-only-this-prefix-not", "https://user:pw@127.0.0.2:1/x",
                f"https://{LOOPBACK}:1/v1\n{MARKER}", "ftp://127.0.0.1/x", "javascript:alert(1)"])),
            "hpcs_object_store_token": draw(st.sampled_from(["tk", "tk\n" + MARKER, ""])),
            "loadBalancers": [{"id": "fuzz-http", "protocol": "HTTP"}],
        }
        return Case("ARCHIVE elsewhere", json.dumps(document).encode(), "FAIL")
    if kind < 94:
        return Case("random bytes", draw(st.binary(max_size=300)), "FAIL")
    action = draw(st.sampled_from(["DISCOVER", "STATS", "discover"] + list(LOOKALIKES[:2])))
    return Case("other action", json.dumps({"hpcs_action": action, "x": draw(st.text(max_size=40))}).encode(),
                None)


# --------------------------------------------------------------------------- the campaign


@dataclass
class Report:
    sent: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0
    largest_payload: int = 0

    def summary(self) -> str:
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.outcomes.items()))
        return (f"{self.sent} messages in {self.seconds:.1f} s (largest "
                f"{self.largest_payload / 1e6:.1f} MB); {kinds}")


def send_case(worker: Worker, case: Case, report: Report) -> None:
    """One job, and the checks every reply must pass."""
    raw = worker.submit_raw(case.payload, timeout=120)  # WORK_COMPLETE, asserted there
    reply = strict_json(raw)
    where = (f"{case.kind}: {case.payload[:120]!r} -> {raw[:200]!r}, error "
             f"{reply.get('hpcs_error') if isinstance(reply, dict) else None!r}")
    assert isinstance(reply, dict) and reply.get("hpcs_response") in ("PASS", "FAIL"), where
    if reply["hpcs_response"] == "FAIL":
        error = reply.get("hpcs_error")
        assert isinstance(error, str) and 0 < len(error) < 600, where
        assert "internal error" not in error, where
    if case.expect is not None:
        assert reply["hpcs_response"] == case.expect, where
    report.sent += 1
    report.outcomes[f"{case.kind} {reply['hpcs_response']}"] += 1
    report.largest_payload = max(report.largest_payload, len(case.payload))


def run_campaign(worker: Worker, pool: Pool, messages: int) -> Report:
    """Send `messages` generated cases through gearmand; every reply is checked as it comes."""
    report = Report()
    started = time.monotonic()

    @settings(max_examples=messages, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases(pool))
    def send(case: Case) -> None:
        send_case(worker, case, report)

    send()
    report.seconds = time.monotonic() - started
    return report


def injected_lines(state_dir: Path) -> list[str]:
    """Lines of any rendered configuration that carry the marker or a non-loopback server."""
    found = []
    for name in ("haproxy.cfg", "haproxy.cfg.new", "haproxy.cfg.failed"):
        path = state_dir / name
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if MARKER in line or (words[:1] == ["server"] and not words[2].startswith(f"{LOOPBACK}:")):
                found.append(f"{name}: {line}")
    return found


def messages_from_environment(default: int) -> int:
    return int(os.environ.get("LIBRA_FUZZ_MESSAGES", default))
