"""Can HAProxy listen on an address and port of this host, and if not, why not.

The probe binds a socket the way HAProxy does (SO_REUSEADDR, so connections HAProxy
left in TIME_WAIT do not count) and turns the kernel's refusal into a sentence an operator can
act on: a privileged port, an address this host does not have, or a port another
process listens on (named, when /proc lets us see it).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Collection

from libra_worker.config import ConfigError

_TCP_LISTEN = "0A"
_MAX_HOLDERS_NAMED = 3


def bind_problem(address: str, port: int) -> str | None:
    """None when `address`:`port` can be listened on now; otherwise why not, as a sentence
    without its final full stop (port 0 probes only the address)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port))
    except OSError as exc:
        return _explain(exc, address, port)
    return None


def check_bind_address(address: str) -> None:
    """At start-up: raise ConfigError naming `[haproxy] bind_address` unless this host can
    listen on it."""
    problem = bind_problem(address, 0)
    if problem:
        raise ConfigError(f"[haproxy] bind_address: {problem}.")


def check_peers_address(address: str, port: int, haproxy_pids: Collection[int]) -> None:
    """At start-up: raise ConfigError naming `[haproxy] peers_address` unless HAProxy can
    listen there, or this worker's own HAProxy (`haproxy_pids`) already does.

    Only HAProxy's next process connects there, at a reload; another program (or another
    worker's HAProxy) on it would make every reload of a TCP load balancer fail.
    """
    problem = bind_problem(address, port)
    if problem is None:
        return
    holders = [pid for pid, _ in listeners(address, port)]
    if holders and set(holders) <= set(haproxy_pids):
        return
    raise ConfigError(f"[haproxy] peers_address: {problem}.")


def _explain(exc: OSError, address: str, port: int) -> str:
    if exc.errno == errno.EACCES:
        return (f"Port {port} needs CAP_NET_BIND_SERVICE or root (ports below "
                f"{_first_unprivileged_port()} are privileged)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{address} is not an address of this host"
    if exc.errno == errno.EADDRINUSE:
        holders = listeners(address, port)
        by = ", ".join(f"pid {pid} ({name})" for pid, name in holders[:_MAX_HOLDERS_NAMED])
        return f"Port {port} on {address} is already in use by {by or 'another program'}"
    return f"Cannot listen on {address} port {port}: {exc.strerror}"


def listeners(address: str, port: int) -> list[tuple[int, str]]:
    """(pid, command name) of the processes listening on `port` where `address` overlaps.

    Best effort: another user's processes are only visible to root.
    """
    inodes = _listening_inodes(ipaddress.ip_address(address), port)
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd.path) in wanted for fd in os.scandir(f"{entry.path}/fd")):
                found.append((int(entry.name), Path(entry.path, "comm").read_text().strip()))
        except OSError:  # gone, or not ours to look at
            continue
    return sorted(found)


def _listening_inodes(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_address, local_port = fields[1].split(":")
            if (fields[3] == _TCP_LISTEN and int(local_port, 16) == port
                    and _overlap(_decode(local_address), address)):
                inodes.add(fields[9])
    return inodes


def _decode(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6} print an address as 32-bit words, each in host byte order."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[start:start + 4][::-1] for start in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _overlap(held: ipaddress.IPv4Address | ipaddress.IPv6Address,
             wanted: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(held, ipaddress.IPv6Address) and held.ipv4_mapped is not None:
        held = held.ipv4_mapped
    return held == wanted or held.is_unspecified or wanted.is_unspecified


def _first_unprivileged_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024
