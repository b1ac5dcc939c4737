"""Unit tests for libra_worker.netcheck, with real sockets on loopback.

Binding 192.0.2.1 (TEST-NET-1, not an address of this host) is refused by the kernel
locally; no packet leaves. The privileged-port case runs the probe as `nobody` through
`setpriv` (so as root), from an installed copy nobody can read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from libra_worker.config import ConfigError
from libra_worker.netcheck import bind_problem, check_bind_address, check_peers_address, listeners
from tests.integration.support import AS_NOBODY, free_privileged_port

NOT_HERE = "192.0.2.1"


def listening(address: str, reuse_address: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
    holder.bind((address, 0))
    holder.listen(1)
    return holder


def unused_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def test_a_free_port_has_no_problem():
    assert bind_problem("127.0.0.1", unused_port()) is None


@pytest.mark.parametrize("held_on, probed", [
    ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "0.0.0.0"), ("::1", "::1"),
])
def test_a_port_in_use_names_the_process_listening_on_it(held_on, probed):
    with listening(held_on) as holder:
        port = holder.getsockname()[1]
        problem = bind_problem(probed, port)
        me = Path("/proc/self/comm").read_text().strip()
        assert problem == f"Port {port} on {probed} is already in use by pid {os.getpid()} ({me})"
        assert listeners(probed, port) == [(os.getpid(), me)]


def test_listeners_ignore_other_ports_and_addresses():
    with listening("127.0.0.1") as holder:
        port = holder.getsockname()[1]
        assert listeners("127.0.0.1", port + 1 if port < 65535 else port - 1) == []
        assert listeners("127.0.0.2", port) == []


def test_a_port_left_in_time_wait_by_haproxy_counts_as_free():
    """HAProxy binds with SO_REUSEADDR, and so its connections left in TIME_WAIT (after a
    SUSPEND, a port move) do not block the next bind: Linux lets two sockets that both set
    SO_REUSEADDR share a port unless one listens."""
    with listening("127.0.0.1", reuse_address=True) as holder:
        port = holder.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = holder.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
    wait_for_time_wait(port)
    assert bind_problem("127.0.0.1", port) is None


def wait_for_time_wait(port: int) -> None:
    """Loopback delivers the last FIN asynchronously; wait for TIME_WAIT (state 06)."""
    local = f":{port:04X} "
    for _ in range(200):
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
        states = {row.split()[3] for row in rows if local in row.split(None, 2)[1] + " "}
        if states == {"06"}:
            return
        time.sleep(0.01)
    raise AssertionError(f"port {port} never reached TIME_WAIT only: {states}")


def test_an_address_of_another_host_is_named():
    assert bind_problem(NOT_HERE, unused_port()) == f"{NOT_HERE} is not an address of this host"


def test_bind_address_is_checked_at_start_up():
    for address in ("127.0.0.1", "0.0.0.0", "::1", "::"):
        check_bind_address(address)
    with pytest.raises(ConfigError) as refused:
        check_bind_address(NOT_HERE)
    assert str(refused.value) == f"[haproxy] bind_address: {NOT_HERE} is not an address of this host."


def test_a_privileged_port_says_it_needs_the_capability(nobody_python):
    first_unprivileged = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    port = free_privileged_port()
    if port is None:
        pytest.skip("no free port below 1024 on 127.0.0.1")
    if port >= first_unprivileged:
        pytest.skip(f"ip_unprivileged_port_start is {first_unprivileged}: port {port} is not privileged here")
    probe = f"from libra_worker.netcheck import bind_problem; print(bind_problem('127.0.0.1', {port}))"
    result = subprocess.run([*AS_NOBODY, nobody_python, "-c", probe], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"Port {port} needs CAP_NET_BIND_SERVICE or root (ports below {first_unprivileged} are privileged)")


def test_peers_address_is_checked_at_start_up():
    check_peers_address("127.0.0.1", unused_port(), haproxy_pids=[])
    with listening("127.0.0.1") as holder:
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            check_peers_address("127.0.0.1", port, haproxy_pids=[os.getpid() + 1])
        assert str(caught.value).startswith(f"[haproxy] peers_address: Port {port} on 127.0.0.1 "
                                            f"is already in use by pid {os.getpid()}")
        # This worker's own HAProxy, adopted at a restart, holds it: nothing to refuse.
        check_peers_address("127.0.0.1", port, haproxy_pids=[os.getpid()])
