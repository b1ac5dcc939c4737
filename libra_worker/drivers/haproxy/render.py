"""Render the HAProxy configuration from validated objects.

`build_context` is the one place that turns a `Device` into template values: HAProxy
keywords, option strings and names are all decided here, so the Jinja2 template is only
loops and output, and every key it reads is always present (StrictUndefined).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from libra_worker import __version__
from libra_worker.drivers.haproxy import slots as server_slots
from libra_worker.messages import Algorithm, Device, LoadBalancer, MonitorType, Node, Protocol

TEMPLATE_NAME = "haproxy.cfg.j2"

_BALANCE = {Algorithm.ROUND_ROBIN: "roundrobin", Algorithm.LEAST_CONNECTIONS: "leastconn"}
_FRONTEND_OPTIONS = {
    # idle-close-on-response lets an old worker close idle keep-alive connections after
    # answering, instead of cutting them, which is what makes reloads lose no request.
    "http": ("option httplog", "option forwardfor", "option idle-close-on-response"),
    "tcp": ("option tcplog",),
}
# The log sink tells protocols apart by these names, and STATS finds nodes by them. A
# GALERA load balancer is the device's TCP one, as in Libra: its bytes are billed as tcp.
PROXY_NAMES = {protocol: f"lb-{protocol.mode}" for protocol in Protocol}
# Libra's worker's session persistence: the HTTP cookie's name and its `insert indirect`,
# and the TCP source table of 200k client addresses (about 50 bytes each) kept 30 minutes.
COOKIE_NAME = "SERVERID"
# The device's secret from which HAProxy derives each HTTP node's cookie value (a hash of
# it and the node's address and port): 32 random bytes, in hex, so it is one word in the
# file. See cookie_key.py.
COOKIE_KEY = re.compile(r"[0-9a-f]{64}")
_STICK_TABLE = "size 200k expire 30m"
# The peers section that hands the TCP stick table to the next HAProxy process at a
# reload: HAProxy learns a table only from a peer, the old process being the local one.
PEERS_SECTION = "lb-peers"
LOCAL_PEER = "local"
# HAProxy's largest timer (2**31 - 1 ms, about 24.8 days). A timeout of 0 ("no timeout"
# in Libra's API) is rendered as this: HAProxy would read 0 as infinite too, but warns on
# every check and start that sessions may then pile up; 24.8 days is no timeout for any
# real connection and still lets an abandoned one go in the end.
MAX_HAPROXY_TIMEOUT_MS = 2**31 - 1


@dataclass(frozen=True)
class Persistence:
    """Which load balancers keep a client on one node ([haproxy] settings).

    `peer` is the loopback address HAProxy listens on, while a TCP load balancer keeps
    client addresses, to hand its table to the process that replaces it at a reload.
    `cookie_key` is the device's dynamic-cookie key (COOKIE_KEY), needed with `http_cookie`.
    """

    http_cookie: bool
    tcp_source: bool
    peer: tuple[str, int] | None = None
    cookie_key: str | None = None

    def __post_init__(self) -> None:
        if self.tcp_source and self.peer is None:
            raise ValueError("TCP source persistence needs the peers address")
        # Checked here, so nothing but hex ever reaches the file.
        if self.http_cookie and not COOKIE_KEY.fullmatch(self.cookie_key or ""):
            raise ValueError("HTTP cookie persistence needs a cookie key of 64 hex digits")

    def uses_cookie(self, lb: LoadBalancer) -> bool:
        return self.http_cookie and lb.protocol is Protocol.HTTP

    def sticks_source(self, lb: LoadBalancer) -> bool:
        # Never GALERA: it must go back to its primary as soon as that is up again.
        return self.tcp_source and lb.protocol is Protocol.TCP


# Libra's worker served none: for tests and tools that render without the settings.
NO_PERSISTENCE = Persistence(http_cookie=False, tcp_source=False)


@dataclass(frozen=True)
class RuntimePaths:
    """Where the rendered configuration points HAProxy's sockets."""

    stats_socket: Path
    log_socket: Path


def host_port(address: str, port: int) -> str:
    """HAProxy's address syntax: the last colon separates the port, IPv6 included."""
    return f"{address}:{port}"


def bind_address(address: str, port: int) -> str:
    if ipaddress.ip_address(address).version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def config_word(text: str) -> str:
    """`text` as one HAProxy configuration word, read back byte for byte.

    Strong quoting (section 2.2 of HAProxy's configuration manual): inside single quotes
    nothing is interpreted, not blanks, '#', '$', '"' nor '\\'. A single quote itself
    closes the quotes, is written escaped, and opens them again; HAProxy joins the pieces
    into one word, as a shell does.
    """
    return "'" + text.replace("'", "'\\''") + "'"


def haproxy_timeout_ms(milliseconds: int) -> int:
    """Libra's 0, "no timeout", as the largest timeout HAProxy takes."""
    return milliseconds or MAX_HAPROXY_TIMEOUT_MS


def health_check(lb: LoadBalancer) -> str:
    """The health-check words of each of `lb`'s server lines."""
    return f"check inter {lb.monitor.delay}s fall {lb.monitor.attempts} rise 2"


def server_options(node: Node, check: str) -> str:
    """What follows a server's address; `check` is its load balancer's `health_check`.
    (Built by concatenation: this runs for every server line of every reload.)"""
    options = f"weight {node.weight} {check}"
    if node.backup:
        options += " backup"
    if not node.enabled:
        # Keeps the node configured (and visible to STATS) while it takes no traffic.
        options += " disabled"
    return options


def backend_options(lb: LoadBalancer, persistence: Persistence,
                    listen_address: str) -> tuple[str, ...]:
    lines: list[str] = []
    if persistence.uses_cookie(lb):
        # Inserted when a client has none (it is balanced), removed before the node sees it
        # (Libra's `insert indirect`). `nocache`: a cacheable response that gets the cookie
        # is marked private, so a shared cache never hands one node's cookie to everyone
        # behind it. `dynamic`: each server's value is derived from the key and its
        # address:port, so a node keeps it across reloads and in a slot it fills at
        # runtime (HAProxy 2.6.12 derives it again at `set server ... addr`, measured).
        lines += [f"cookie {COOKIE_NAME} insert indirect nocache dynamic",
                  f"dynamic-cookie-key {persistence.cookie_key}"]
    if persistence.sticks_source(lb):
        # An "ip" table stores IPv4 addresses only; clients of an IPv6 listener need "ipv6".
        key = "ipv6" if ipaddress.ip_address(listen_address).version == 6 else "ip"
        lines += [f"stick-table type {key} {_STICK_TABLE} peers {PEERS_SECTION}",
                  "stick store-request src", "stick match src"]
    if lb.monitor.type is MonitorType.HTTP:
        lines.append(f"option httpchk GET {config_word(lb.monitor.path)}")
    return tuple(lines)


def transform_loadbalancer(lb: LoadBalancer, listen_address: str, persistence: Persistence,
                           slots: tuple[server_slots.Slot, ...]) -> dict[str, Any]:
    check = health_check(lb)
    return {
        "name": PROXY_NAMES[lb.protocol],
        "mode": lb.protocol.mode,
        "bind": bind_address(listen_address, lb.port),
        "frontend_options": _FRONTEND_OPTIONS[lb.protocol.mode],
        "backend_options": backend_options(lb, persistence, listen_address),
        "balance": _BALANCE[lb.algorithm],
        "client_timeout_ms": haproxy_timeout_ms(lb.options.client_timeout_ms),
        "server_timeout_ms": haproxy_timeout_ms(lb.options.server_timeout_ms),
        "connect_timeout_ms": haproxy_timeout_ms(lb.options.connect_timeout_ms),
        "check_timeout_s": lb.monitor.timeout,
        "retries": lb.options.connect_retries,
        "servers": [
            {
                "name": name,
                "address": host_port(node.address, node.port),
                "options": server_options(node, check),
            }
            for name, node in server_slots.servers(lb, slots)
        ],
    }


def transform_peers(device: Device, persistence: Persistence) -> list[dict[str, str]]:
    """The peers section, only while a load balancer keeps a stick table: otherwise
    HAProxy would hold the peers port for nothing."""
    if not any(persistence.sticks_source(lb) for lb in device.loadbalancers):
        return []
    # sticks_source implies tcp_source, which the dataclass only allows with a peer.
    return [{"name": PEERS_SECTION, "peer": LOCAL_PEER,
             "address": bind_address(*persistence.peer)}]


def build_context(
    device: Device, *, listen_address: str, paths: RuntimePaths, maxconn: int,
    persistence: Persistence, layout: server_slots.Layout | None = None,
) -> dict[str, Any]:
    """`layout`: which server line serves which node, and the spares (slots.py); by
    default what a reload of `device` renders."""
    peers = transform_peers(device, persistence)
    if layout is None:
        layout = server_slots.fresh(device)
    return {
        "version": __version__,
        "maxconn": maxconn,
        "stats_socket": str(paths.stats_socket),
        "log_socket": str(paths.log_socket),
        # The local peer is named here, not by the host name HAProxy would use by default.
        "global_options": (f"localpeer {LOCAL_PEER}",) if peers else (),
        "peers": peers,
        "loadbalancers": [transform_loadbalancer(lb, listen_address, persistence, slots)
                          for lb, slots in zip(device.loadbalancers, layout)],
    }


def template_environment(template_dir: Path | None = None) -> jinja2.Environment:
    """An operator's template directory first, then the templates shipped with the package.

    An installed package carries them in ``libra_worker/templates``; a source checkout
    has them in ``templates/`` beside the package.
    """
    package = Path(__file__).resolve().parents[2]
    search_path = [package / "templates", package.parent / "templates"]
    if template_dir is not None:
        search_path.insert(0, template_dir)
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(path) for path in search_path]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # a config file, not HTML: values are validated; config_word quotes
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(environment: jinja2.Environment, context: dict[str, Any]) -> str:
    return environment.get_template(TEMPLATE_NAME).render(context)
