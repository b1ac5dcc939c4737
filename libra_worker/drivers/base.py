"""The interface between the controller and a load-balancer implementation."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from libra_worker.messages import ArchiveRequest, Device
from libra_worker.metrics import MetricsPeriod


@dataclass(frozen=True)
class NodeStatus:
    id: str
    status: str  # "UP" or "DOWN", from the node's health checks
    protocol: str  # of its load balancer: one node id may serve both


@dataclass(frozen=True)
class DeviceStats:
    state: str
    since: str
    nodes: tuple[NodeStatus, ...]
    restarts: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class DeviceHealth:
    """What DIAGNOSTICS reports about the device itself, beside its network probes."""

    state: str
    haproxy_version: str | None  # None when `haproxy -v` could not be run
    haproxy_running: bool
    haproxy_master_pid: int | None
    haproxy_dropped_logs: int | None  # log lines the running HAProxy could not send
    state_dir_free_bytes: int | None
    log_sink_running: bool
    log_sink_pid: int | None
    unreadable_access_lines: int  # access lines whose bytes could not be counted


class LoadBalancerDriver(abc.ABC):
    """Every method either does all it says or raises a `WorkerError` saying why not."""

    @abc.abstractmethod
    def restore(self) -> None:
        """Put the device back into its persisted desired state (worker start-up)."""

    @abc.abstractmethod
    def update(self, device: Device) -> None:
        """Make the device serve exactly `device`, without dropping traffic."""

    @abc.abstractmethod
    def suspend(self) -> None:
        """Stop accepting connections, keeping the configuration."""

    @abc.abstractmethod
    def enable(self) -> None:
        """Serve the kept configuration again."""

    @abc.abstractmethod
    def delete(self) -> None:
        """Stop serving for good and remove the configuration and logs."""

    @abc.abstractmethod
    def stats(self) -> DeviceStats:
        """Prove the load balancer runs, and report each node's health."""

    @abc.abstractmethod
    def archive(self, request: ArchiveRequest, job: str | None = None) -> dict[str, Any]:
        """Ship the load balancer's logs to an object store; returns extra reply fields.

        The same `job` (a Gearman job's identity) asked again gets the same answer, and
        no line is ever shipped twice."""

    @abc.abstractmethod
    def metrics(self, job: str | None = None) -> MetricsPeriod:
        """Close the current billing period: bytes sent per load balancer since the last.

        The same `job` (a Gearman job's identity) asked again gets the same period."""

    @abc.abstractmethod
    def health(self) -> DeviceHealth:
        """The device's own state for DIAGNOSTICS; never raises for a stopped HAProxy."""
