"""Libra's API and admin servers, as far as they talk to a worker: the compat suite's peer.

Written here from what the public code of stackforge/libra does (read for facts, not
copied), so that the tests drive real workers the way deployed servers do:

* The API server (``libra/common/api/gearman_client.py``) builds an UPDATE from its
  database rows: integer node ids, ``condition`` always ``ENABLED`` (disabled nodes are
  left out), ``backup`` as ``"TRUE"``/``"FALSE"``, a CONNECT 30/30/2 monitor when the load
  balancer has none (CONNECT monitors carry no ``path``), and an ``options`` block only
  when the load balancer has a timeout or retries, with the one timeout for all three.
  It reads a reply in this order: ``badRequest`` first (its
  ``validationErrors.message``), then ``hpcs_response == "FAIL"`` (``hpcs_error``), and
  stores that sentence in ``LoadBalancer.errmsg``, a VARCHAR(128)
  (``libra/common/api/lbaas.py``).
* The admin server (``libra/admin_api/stats/stats_gearman.py``) sweeps its devices with
  pygearman's ``submit_multiple_jobs`` (JSON in, JSON out), waits 5 s, sends again to the
  ones that timed out and waits 30 s; ``ping_sched.py`` looks every node a STATS reply
  names up with ``int(node['id'])``; ``stats_sched.py`` matches METRICS entries by the
  lower-case protocol; ``offline_check`` reads ``network`` and ``gearman`` of every
  DIAGNOSTICS reply without looking at ``hpcs_response``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import gearman
from gearman.connection_manager import DataEncoder
from gearman.constants import JOB_UNKNOWN

# stats_poll_timeout and stats_poll_timeout_retry, Libra's admin server defaults.
POLL_TIMEOUT = 5.0
POLL_TIMEOUT_RETRY = 30.0
# LoadBalancer.errmsg is VARCHAR(128).
ERRMSG_LENGTH = 128


# --------------------------------------------------------------------------- the database rows


@dataclass
class LibraNode:
    id: int
    address: str
    port: int
    weight: int = 1
    backup: bool = False
    enabled: bool = True


@dataclass
class LibraMonitor:
    type: str = "CONNECT"
    delay: int = 30
    timeout: int = 30
    attempts: int = 2
    path: str | None = None


@dataclass
class LibraLoadBalancer:
    name: str
    protocol: str
    port: int
    nodes: list[LibraNode]
    algorithm: str = "ROUND_ROBIN"
    # The API's defaults for a new load balancer; 0 and 0 means a row from before options.
    timeout: int = 30000
    retries: int = 3
    # None: the API server adds its default monitor, as it does for a load balancer without.
    monitor: LibraMonitor | None = None
    errmsg: str | None = field(default=None)

    def store_error(self, message: str) -> None:
        """What `_set_error` does; MySQL in strict mode refuses a value longer than the column."""
        assert len(message) <= ERRMSG_LENGTH, f"errmsg VARCHAR(128) refuses {len(message)} characters"
        self.errmsg = message


# --------------------------------------------------------------------------- messages


def update_message(*loadbalancers: LibraLoadBalancer) -> dict[str, Any]:
    """The UPDATE the API server builds for a device from its rows."""
    return {"hpcs_action": "UPDATE", "loadBalancers": [_lb_entry(lb) for lb in loadbalancers]}


def _lb_entry(lb: LibraLoadBalancer) -> dict[str, Any]:
    monitor = lb.monitor or LibraMonitor()
    entry: dict[str, Any] = {
        "name": lb.name,
        "protocol": lb.protocol,
        "algorithm": lb.algorithm,
        "port": lb.port,
        "nodes": [
            {"id": node.id, "port": node.port, "address": node.address, "weight": node.weight,
             "condition": "ENABLED", "backup": "TRUE" if node.backup else "FALSE"}
            for node in lb.nodes if node.enabled
        ],
        "monitor": {"type": monitor.type, "delay": monitor.delay, "timeout": monitor.timeout,
                    "attempts": monitor.attempts},
    }
    if monitor.path is not None:
        entry["monitor"]["path"] = monitor.path
    if lb.timeout or lb.retries:
        entry["options"] = {"client_timeout": lb.timeout, "server_timeout": lb.timeout,
                            "connect_timeout": lb.timeout, "connect_retries": lb.retries}
    return entry


def keep_message(remaining: LibraLoadBalancer) -> dict[str, Any]:
    """The UPDATE the API server sends when one of a device's two load balancers is deleted:
    the other one alone, its enabled nodes without ``backup``, no monitor, no options."""
    return {"hpcs_action": "UPDATE", "loadBalancers": [{
        "name": remaining.name, "protocol": remaining.protocol,
        "algorithm": remaining.algorithm, "port": remaining.port,
        "nodes": [{"id": node.id, "port": node.port, "address": node.address,
                   "weight": node.weight, "condition": "ENABLED"}
                  for node in remaining.nodes if node.enabled],
    }]}


def read_reply(result: dict[str, Any]) -> tuple[bool, Any]:
    """The API server's reading of a reply: (success, the reply or the error it stores)."""
    if "badRequest" in result:
        return False, result["badRequest"]["validationErrors"]["message"]
    if result["hpcs_response"] == "FAIL":
        return False, result.get("hpcs_error", "Load Balancer error")
    return True, result


# --------------------------------------------------------------------------- gearman


class JSONDataEncoder(DataEncoder):
    @classmethod
    def encode(cls, encodable_object: Any) -> bytes:
        return json.dumps(encodable_object).encode("utf-8")

    @classmethod
    def decode(cls, decodable_string: bytes) -> Any:
        return json.loads(decodable_string)


class JSONGearmanClient(gearman.GearmanClient):
    """Job data and results as JSON objects, the way Libra's servers submit their jobs."""

    data_encoder = JSONDataEncoder


@dataclass
class Sweep:
    """What one admin-server sweep found, device by device."""

    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)


class LibraServers:
    """The API and admin servers' side of the job server: one JSON client for both."""

    def __init__(self, servers: list[str]) -> None:
        self.client = JSONGearmanClient(servers)

    def close(self) -> None:
        self.client.shutdown()

    # ------------------------------------------------------------------ API server

    def send(self, device: str, message: dict[str, Any], timeout: float = 60.0) -> tuple[bool, Any]:
        request = self.client.submit_job(device.encode(), message, poll_timeout=timeout)
        assert request.complete and not request.timed_out, f"{device}: no reply ({request.state})"
        return read_reply(request.result)

    def send_update(self, device: str, *loadbalancers: LibraLoadBalancer) -> tuple[bool, Any]:
        """UPDATE a device; on failure every load balancer on it stores the error."""
        success, answer = self.send(device, update_message(*loadbalancers))
        if not success:
            for lb in loadbalancers:
                lb.store_error(answer)
        return success, answer

    # ------------------------------------------------------------------ admin server

    def sweep(self, devices: list[str], action: str) -> Sweep:
        """Send `action` to every device, wait 5 s; again to the silent ones, wait 30 s.

        A device still silent after the second wait is failed; a job server failure is
        ignored, as the admin server does.
        """
        found = Sweep()
        silent = self._round(devices, action, POLL_TIMEOUT, found)
        if silent:
            found.retried = silent
            found.failed += self._round(silent, action, POLL_TIMEOUT_RETRY, found)
        return found

    def _round(self, devices: list[str], action: str, timeout: float, found: Sweep) -> list[str]:
        jobs = [{"task": device.encode(), "data": {"hpcs_action": action}} for device in devices]
        requests = self.client.submit_multiple_jobs(
            jobs, background=False, wait_until_complete=True, poll_timeout=timeout)
        silent = []
        for request in requests:
            device = request.job.task.decode()
            if request.state == JOB_UNKNOWN:
                continue
            if request.timed_out:
                silent.append(device)
                continue
            found.replies[device] = request.result
        return silent

    def send_pings(self, devices: list[str]) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
        """The STATS sweep: (failed devices, node entries of each device that passed)."""
        sweep = self.sweep(devices, "STATS")
        failed, node_status = list(sweep.failed), {}
        for device, result in sweep.replies.items():
            if result["hpcs_response"] == "FAIL":
                if result.get("status") == "DELETED":
                    continue
                assert result["hpcs_error"]  # logged as the reason of the failure
                failed.append(device)
            elif "nodes" in result:
                node_status[device] = result["nodes"]
        return failed, node_status

    def get_stats(self, devices: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """The METRICS sweep: (failed devices, the reply of each device that passed)."""
        sweep = self.sweep(devices, "METRICS")
        failed, results = list(sweep.failed), {}
        for device, result in sweep.replies.items():
            if result["hpcs_response"] == "FAIL":
                failed.append(device)
            else:
                results[device] = result
        return failed, results

    def offline_check(self, devices: list[str]) -> list[str]:
        """The DIAGNOSTICS check of OFFLINE devices: those to mark failed.

        One 5 s round, no retry: a silent device is failed. It reads ``network`` and
        ``gearman`` whatever ``hpcs_response`` says, and fails a device when more than a
        third of its job servers FAIL (Python 2's integer division: with two job
        servers, one failure is enough).
        """
        found = Sweep()
        failed = self._round(devices, "DIAGNOSTICS", POLL_TIMEOUT, found)
        for device, result in found.replies.items():
            if result["network"] == "FAIL":
                failed.append(device)
                continue
            failures = [entry for entry in result["gearman"] if entry["status"] == "FAIL"]
            assert all(entry["host"] for entry in failures)  # logged by host
            if len(failures) > len(result["gearman"]) // 3:
                failed.append(device)
        return failed

    def get_discover(self, device: str) -> dict[str, Any] | None:
        request = self.client.submit_job(device.encode(), {"hpcs_action": "DISCOVER"},
                                         background=False, wait_until_complete=True,
                                         poll_timeout=10)
        if request.state == JOB_UNKNOWN or request.timed_out:
            return None
        return None if request.result["hpcs_response"] == "FAIL" else request.result


def bytes_out(result: dict[str, Any], lb: LibraLoadBalancer) -> int:
    """stats_sched's billing read of a METRICS reply: the entry of the load balancer's
    protocol in lower case (GALERA and TCP are both "tcp" at the worker); -1 if none."""
    protocol = "http" if lb.protocol.lower() == "http" else "tcp"
    found = -1
    for entry in result["loadBalancers"]:
        if entry["protocol"] == protocol:
            found = entry["bytes_out"]
    return found


def update_node_statuses(node_status: dict[str, list[dict[str, Any]]],
                         nodes: dict[int, str]) -> dict[int, str]:
    """ping_sched's node processing: each entry is looked up by ``int(node['id'])``.

    `nodes` maps the database's node ids to their status (ONLINE/ERROR); the result is
    the table after the ping: DOWN turns an ONLINE node ERROR, UP an ERROR node ONLINE.
    """
    table = dict(nodes)
    for entries in node_status.values():
        for entry in entries:
            node_id = int(entry["id"])
            assert node_id in table, f"the database has no node {node_id}"
            if entry["status"] == "DOWN" and table[node_id] == "ONLINE":
                table[node_id] = "ERROR"
            elif entry["status"] == "UP" and table[node_id] == "ERROR":
                table[node_id] = "ONLINE"
    return table
