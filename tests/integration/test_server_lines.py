"""The proof behind the node-only fast path: every server line the validator lets through
and the shipped template renders is accepted by the real `haproxy -c`.

A node-only UPDATE is written to the live file without a synchronous `haproxy -c` (see
libra_worker/drivers/haproxy/driver.py): the file differs from the checked one in server
lines only, and HAProxy must be able to start from it after any restart. So hypothesis
generates node sets across the whole range `messages.parse_device` accepts (ids, IPv4 and
IPv6 addresses, ports, weights, backup, condition, omitted ids, monitor delays and
attempts, which go into the server line; HTTP backends with their dynamic persistence
cookie, GALERA load balancers one primary and backups) and each rendered file is checked by the
HAProxy binary the worker runs. Each example carries many nodes, so a few dozen checks
cover thousands of server lines.

The lines are rendered over server slots (drivers/haproxy/slots.py) as node-only UPDATEs
leave them: some nodes served by spare slots (`slot:<n>`, normal and backup), their own
servers retired as placeholders, and the remaining spares as placeholders too, all in
one file; the layout is also read back from its JSON form, as a restart does.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libra_worker.drivers.haproxy import render, slots
from libra_worker.drivers.haproxy.process import HAProxyProcess, find_binary
from libra_worker.messages import MAX_MONITOR_SECONDS, MAX_WEIGHT, parse_device

NODES_PER_LB = 150
# The worker's defaults: every HTTP backend derives its servers' cookies from the key
# (`haproxy -c` binds no port, so the peers address is never listened on here).
PERSISTENCE = render.Persistence(http_cookie=True, tcp_source=True, peer=("127.0.0.1", 7441),
                                 cookie_key="5e" * 32)

node_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
addresses = st.ip_addresses().filter(
    lambda address: not (address.is_unspecified or address.is_multicast)).map(str)


@st.composite
def nodes(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, NODES_PER_LB))
    ids = draw(st.lists(node_ids, min_size=count, max_size=count, unique=True))
    endpoints = draw(st.lists(st.tuples(addresses, st.integers(1, 65535)),
                              min_size=count, max_size=count,
                              unique_by=lambda pair: (ipaddress.ip_address(pair[0]), pair[1])))
    result = []
    for node_id, (address, port) in zip(ids, endpoints):
        node: dict[str, Any] = {"address": address, "port": port}
        if draw(st.booleans()):  # else the worker derives the name from address and port
            node["id"] = node_id
        if draw(st.booleans()):
            node["weight"] = draw(st.integers(1, MAX_WEIGHT))
        if draw(st.booleans()):
            node["backup"] = draw(st.booleans())
        if draw(st.booleans()):
            node["condition"] = draw(st.sampled_from(["ENABLED", "DISABLED", "enabled", "disabled"]))
        result.append(node)
    return result


@st.composite
def monitors(draw: st.DrawFn) -> dict[str, Any]:
    delay = draw(st.integers(1, MAX_MONITOR_SECONDS))
    return {"type": draw(st.sampled_from(["CONNECT", "HTTP"])), "delay": delay,
            "timeout": draw(st.integers(1, delay)), "attempts": draw(st.integers(1, 10))}


def one_primary(generated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A GALERA load balancer's nodes: the first is its one primary, the others backups."""
    return [{**node, "backup": index > 0} for index, node in enumerate(generated)]


@st.composite
def devices(draw: st.DrawFn) -> dict[str, Any]:
    protocols = draw(st.sampled_from([["HTTP"], ["TCP"], ["GALERA"], ["HTTP", "TCP"],
                                      ["HTTP", "GALERA"]]))
    loadbalancers = []
    for i, protocol in enumerate(protocols):
        if protocol == "GALERA":
            generated = one_primary(draw(nodes().filter(bool)))
        else:
            generated = draw(nodes())
        loadbalancers.append({"protocol": protocol, "port": 20000 + i,
                              "monitor": draw(monitors()), "nodes": generated})
    return {"loadbalancers": loadbalancers}


@st.composite
def layouts(draw: st.DrawFn, device: Any) -> slots.Layout:
    """A layout node-only UPDATEs could have left: each node either under its own id or
    moved into a spare of its kind (its own line then a retired placeholder)."""
    layout = []
    for lb_slots, lb in zip(slots.fresh(device), device.loadbalancers):
        entries = list(lb_slots)
        next_spare = len(entries) - len(lb.nodes) + 1
        for node in lb.nodes:
            if not draw(st.booleans()):
                continue
            own = next(i for i, slot in enumerate(entries) if slot.node == node.id)
            entries[own] = slots.Slot(node.id, node.backup)
            free = [i for i, slot in enumerate(entries)
                    if slot.spare and slot.node is None and slot.backup == node.backup]
            if free:
                entries[free[0]] = slots.Slot(entries[free[0]].name, node.backup, node.id)
            else:
                entries.append(slots.Slot(f"slot:{next_spare}", node.backup, node.id))
                next_spare += 1
        layout.append(tuple(entries))
    return tuple(layout)


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> tuple[HAProxyProcess, Path]:
    root = tmp_path_factory.mktemp("server-lines")
    process = HAProxyProcess(binary=find_binary(), config_file=root / "haproxy.cfg",
                             pid_file=root / "haproxy.pid", master_socket=root / "master.sock")
    return process, root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(document=devices(), data=st.data())
def test_every_valid_node_set_renders_a_file_haproxy_accepts(checker, document, data):
    process, root = checker
    device = parse_device(document)  # the generator stays inside what the validator accepts
    layout = data.draw(layouts(device))
    assert slots.from_document(slots.to_document(layout), device) == layout
    context = render.build_context(
        device, listen_address="127.0.0.1", maxconn=1024,
        paths=render.RuntimePaths(root / "stats.sock", root / "log.sock"),
        persistence=PERSISTENCE, layout=layout)
    config = root / "haproxy.cfg"
    config.write_text(render.render(render.template_environment(), context))

    process.check(config)  # raises ConfigCheckFailed with HAProxy's own words
