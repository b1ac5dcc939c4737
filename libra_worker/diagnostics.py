"""DIAGNOSTICS: can this device work as a load balancer? Answered within 5 s, always.

The reply keeps the shape Libra's admin server reads when it checks an OFFLINE device:
``network`` (PASS/FAIL: a TCP connect to ``[diagnostics] network_target``, by default the
first job server) and ``gearman`` (one entry per configured job server, PASS only when it
answered a Gearman ECHO_REQ with the same bytes), plus ``release``. The admin server fails
the device when ``network`` is FAIL or more than a third of the job servers are.

Beside them, for the operator: HAProxy's version and whether it runs, the free space in
state_dir, and the log sink's state (`DeviceHealth`).

Every probe runs in its own daemon thread with its own timeout, all at once, and the
reply is built when they are done or when the deadline passes, whichever comes first: a
probe still waiting (a blackholed address, a name lookup that hangs) counts as FAIL and is
left to end on its own timeout.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

from libra_worker.config import DiagnosticsSettings
from libra_worker.drivers.base import DeviceHealth
from libra_worker.messages import FAIL, PASS

LOG = logging.getLogger(__name__)

# Gearman's binary protocol: magic, packet type, payload size, payload.
_REQUEST_MAGIC = b"\0REQ"
_RESPONSE_MAGIC = b"\0RES"
_ECHO_REQ = 16
_ECHO_RES = 17
_HEADER = struct.Struct(">4sII")
_ECHO_PAYLOAD = b"libra-worker diagnostics"
# Building the reply after the probes' deadline takes a moment; 5 s is the promise.
_REPLY_MARGIN = 0.5


def gearman_echo(host: str, port: int, timeout: float) -> bool:
    """True when the job server answers ECHO_REQ with ECHO_RES carrying the same bytes."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(_HEADER.pack(_REQUEST_MAGIC, _ECHO_REQ, len(_ECHO_PAYLOAD))
                               + _ECHO_PAYLOAD)
            expected = _HEADER.pack(_RESPONSE_MAGIC, _ECHO_RES, len(_ECHO_PAYLOAD)) + _ECHO_PAYLOAD
            received = b""
            while len(received) < len(expected):
                connection.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = connection.recv(len(expected) - len(received))
                if not chunk:
                    return False
                received += chunk
            return received == expected
    except OSError as exc:
        LOG.info("DIAGNOSTICS: job server %s port %d failed the echo: %s", host, port, exc)
        return False


def tcp_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        LOG.info("DIAGNOSTICS: cannot connect to %s port %d: %s", host, port, exc)
        return False


class Diagnostics:
    """Runs the probes for one DIAGNOSTICS job."""

    def __init__(self, servers: tuple[tuple[str, int], ...],
                 settings: DiagnosticsSettings | None = None) -> None:
        self.servers = servers
        self.settings = settings or DiagnosticsSettings()
        self.network_target = self.settings.network_target or (servers[0] if servers else None)

    def run(self, health: Callable[[], DeviceHealth]) -> dict[str, Any]:
        """The reply fields; each probe FAILs on its own, the whole never raises for one."""
        timeout = self.settings.probe_timeout
        probes: dict[str, Callable[[], Any]] = {
            f"gearman {index}": lambda host=host, port=port: gearman_echo(host, port, timeout)
            for index, (host, port) in enumerate(self.servers)
        }
        if self.network_target is not None:
            host, port = self.network_target
            probes["network"] = lambda: tcp_connect(host, port, timeout)
        probes["device"] = health
        results = _run_concurrently(probes, deadline=time.monotonic() + timeout + _REPLY_MARGIN)
        device = results.get("device")
        return {
            "network": PASS if results.get("network") else FAIL,
            "gearman": [
                {"host": host, "port": port,
                 "status": PASS if results.get(f"gearman {index}") else FAIL}
                for index, (host, port) in enumerate(self.servers)
            ],
            "network_target": _address(self.network_target),
            "device": asdict(device) if isinstance(device, DeviceHealth) else None,
        }

    def failed_fields(self) -> dict[str, Any]:
        """The keys Libra's admin server reads, for a DIAGNOSTICS that failed as a whole."""
        return {
            "network": FAIL,
            "gearman": [{"host": host, "port": port, "status": FAIL} for host, port in self.servers],
        }


def _address(target: tuple[str, int] | None) -> str | None:
    if target is None:
        return None
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _run_concurrently(probes: dict[str, Callable[[], Any]], deadline: float) -> dict[str, Any]:
    """Each probe's result, or no entry for one that raised or was still running at the deadline."""
    results: dict[str, Any] = {}

    def run(name: str, probe: Callable[[], Any]) -> None:
        try:
            results[name] = probe()
        except Exception:  # noqa: BLE001 - one failed probe is a FAIL entry, not a failed job
            LOG.exception("DIAGNOSTICS probe %s failed", name)

    threads = [threading.Thread(target=run, args=item, name=f"diagnostics {item[0]}", daemon=True)
               for item in probes.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    return dict(results)
