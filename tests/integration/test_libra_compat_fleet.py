"""Libra's admin server reading METRICS and DIAGNOSTICS replies of real workers.

What the admin server reads, whatever ``hpcs_response`` says (a missing key is a KeyError
that aborts its whole sweep): METRICS ``loadBalancers`` (entries matched by lower-case
``protocol``, their ``bytes_out``), ``utc_start`` and ``utc_end`` (stored as the billing
period); DIAGNOSTICS ``network`` and ``gearman`` (entries with ``host`` and ``status``).
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.integration.libra_servers import (
    LibraLoadBalancer,
    LibraNode,
    bytes_out,
)
from tests.integration.support import LOOPBACK, traffic

METRICS_KEYS = {"loadBalancers", "utc_start", "utc_end"}
DIAGNOSTICS_KEYS = {"network", "gearman"}


def _period(result: dict) -> tuple[datetime, datetime]:
    # Python's str(datetime): "YYYY-MM-DD HH:MM:SS[.ffffff]", in UTC.
    return datetime.fromisoformat(result["utc_start"]), datetime.fromisoformat(result["utc_end"])


def _configured(libra, device, http_backend, tcp_backend, free_port):
    web, raw = http_backend("web"), tcp_backend("raw")
    loadbalancers = (
        LibraLoadBalancer("web", "HTTP", free_port(), [LibraNode(1, LOOPBACK, web.port)]),
        LibraLoadBalancer("raw", "TCP", free_port(), [LibraNode(2, LOOPBACK, raw.port)]),
    )
    assert libra.send_update(device.function, *loadbalancers)[0]
    return loadbalancers


def test_metrics_as_billing_reads_them(worker, libra, http_backend, tcp_backend, free_port):
    http_lb, tcp_lb = _configured(libra, worker, http_backend, tcp_backend, free_port)
    assert traffic(f"http://127.0.0.1:{http_lb.port}/", 5) == ({"web": 5}, 0)
    assert traffic(f"tcp://127.0.0.1:{tcp_lb.port}", 5) == ({"raw": 5}, 0)

    # The log sink counts access lines and publishes its totals every second: the bytes
    # reach billing within a few sweeps, each period starting where the previous one ended.
    billed = {"HTTP": 0, "TCP": 0}
    end = None
    for _ in range(20):
        failed, results = libra.get_stats([worker.function])
        assert failed == []
        result = results[worker.function]
        start, next_end = _period(result)
        assert start <= next_end
        assert end is None or start == end  # periods follow each other, never overlap
        end = next_end
        billed["HTTP"] += bytes_out(result, http_lb)
        billed["TCP"] += bytes_out(result, tcp_lb)
        if billed["HTTP"] and billed["TCP"]:
            break
        time.sleep(0.5)
    assert billed["HTTP"] > 0 and billed["TCP"] > 0


@pytest.mark.parametrize("history", ["never configured", "deleted"])
def test_metrics_fail_still_carries_what_billing_reads(worker, libra, http_backend, tcp_backend,
                                                       free_port, history):
    if history == "deleted":
        _configured(libra, worker, http_backend, tcp_backend, free_port)
        assert libra.send(worker.function, {"hpcs_action": "DELETE"})[0]

    reply = libra.sweep([worker.function], "METRICS").replies[worker.function]

    assert METRICS_KEYS <= set(reply), reply
    assert isinstance(reply["loadBalancers"], list)
    if reply["hpcs_response"] == "FAIL":
        assert reply["hpcs_error"] and len(reply["hpcs_error"]) <= 128
    if history == "deleted":
        assert (reply["hpcs_response"], reply["status"]) == ("FAIL", "DELETED")
    failed, _ = libra.get_stats([worker.function])
    assert (worker.function in failed) == (reply["hpcs_response"] == "FAIL")


def test_offline_check_reads_every_diagnostics_reply(worker_factory, gearmand, libra, free_port):
    both_live = worker_factory()
    one_dead = worker_factory(servers=[gearmand.address, f"{LOOPBACK}:{free_port()}"])

    replies = libra.sweep([both_live.function, one_dead.function], "DIAGNOSTICS").replies
    failed = libra.offline_check([both_live.function, one_dead.function])

    for reply in replies.values():
        assert DIAGNOSTICS_KEYS <= set(reply), reply
        assert reply["network"] in ("PASS", "FAIL")
    statuses = {entry["port"]: entry["status"] for entry in replies[one_dead.function]["gearman"]}
    assert statuses[gearmand.port] == "PASS" and list(statuses.values()).count("FAIL") == 1
    # One of two job servers down is more than a third: the admin server fails the device.
    assert one_dead.function in failed
    assert [entry["status"] for entry in replies[both_live.function]["gearman"]] == ["PASS"]


@pytest.mark.parametrize("state", ["NEW", "SUSPENDED", "DELETED"])
def test_diagnostics_carries_network_and_gearman_in_every_state(worker, libra, http_backend,
                                                                tcp_backend, free_port, state):
    if state != "NEW":
        _configured(libra, worker, http_backend, tcp_backend, free_port)
        action = "SUSPEND" if state == "SUSPENDED" else "DELETE"
        assert libra.send(worker.function, {"hpcs_action": action})[0]

    reply = libra.sweep([worker.function], "DIAGNOSTICS").replies[worker.function]

    assert DIAGNOSTICS_KEYS <= set(reply), reply
    assert reply["network"] in ("PASS", "FAIL")
    assert [entry["status"] for entry in reply["gearman"]] == ["PASS"]
    if reply["hpcs_response"] == "FAIL":
        assert reply["hpcs_error"] and len(reply["hpcs_error"]) <= 128
