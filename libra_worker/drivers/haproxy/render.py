"""Render the HAProxy configuration from validated objects.

`build_context` is the one place that turns a `Device` into template values: HAProxy
keywords, option strings and names are all decided here, so the Jinja2 template is only
loops and output, and every key it reads is always present (StrictUndefined).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from libra_worker import __version__
from libra_worker.messages import Algorithm, Device, LoadBalancer, MonitorType, Node, Protocol

TEMPLATE_NAME = "haproxy.cfg.j2"

_BALANCE = {Algorithm.ROUND_ROBIN: "roundrobin", Algorithm.LEAST_CONNECTIONS: "leastconn"}
_FRONTEND_OPTIONS = {
    # idle-close-on-response lets an old worker close idle keep-alive connections after
    # answering, instead of cutting them, which is what makes reloads lose no request.
    Protocol.HTTP: ("option httplog", "option forwardfor", "option idle-close-on-response"),
    Protocol.TCP: ("option tcplog",),
}
# The log sink tells protocols apart by these names, and STATS finds nodes by them.
PROXY_NAMES = {Protocol.HTTP: "lb-http", Protocol.TCP: "lb-tcp"}
# HAProxy's largest timer (2**31 - 1 ms, about 24.8 days). A timeout of 0 ("no timeout"
# in Libra's API) is rendered as this: HAProxy would read 0 as infinite too, but warns on
# every check and start that sessions may then pile up; 24.8 days is no timeout for any
# real connection and still lets an abandoned one go in the end.
MAX_HAPROXY_TIMEOUT_MS = 2**31 - 1


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


def server_options(node: Node, lb: LoadBalancer) -> str:
    monitor = lb.monitor
    words = [
        f"weight {node.weight}",
        f"check inter {monitor.delay}s fall {monitor.attempts} rise 2",
    ]
    if node.backup:
        words.append("backup")
    if not node.enabled:
        # Keeps the node configured (and visible to STATS) while it takes no traffic.
        words.append("disabled")
    return " ".join(words)


def backend_options(lb: LoadBalancer) -> tuple[str, ...]:
    if lb.monitor.type is MonitorType.HTTP:
        return (f"option httpchk GET {config_word(lb.monitor.path)}",)
    return ()


def transform_loadbalancer(lb: LoadBalancer, listen_address: str) -> dict[str, Any]:
    return {
        "name": PROXY_NAMES[lb.protocol],
        "mode": lb.protocol.value.lower(),
        "bind": bind_address(listen_address, lb.port),
        "frontend_options": _FRONTEND_OPTIONS[lb.protocol],
        "backend_options": backend_options(lb),
        "balance": _BALANCE[lb.algorithm],
        "client_timeout_ms": haproxy_timeout_ms(lb.options.client_timeout_ms),
        "server_timeout_ms": haproxy_timeout_ms(lb.options.server_timeout_ms),
        "connect_timeout_ms": haproxy_timeout_ms(lb.options.connect_timeout_ms),
        "check_timeout_s": lb.monitor.timeout,
        "retries": lb.options.connect_retries,
        "servers": [
            {
                "name": node.id,
                "address": host_port(node.address, node.port),
                "options": server_options(node, lb),
            }
            for node in lb.nodes
        ],
    }


def build_context(
    device: Device, *, listen_address: str, paths: RuntimePaths, maxconn: int
) -> dict[str, Any]:
    return {
        "version": __version__,
        "maxconn": maxconn,
        "stats_socket": str(paths.stats_socket),
        "log_socket": str(paths.log_socket),
        "loadbalancers": [transform_loadbalancer(lb, listen_address) for lb in device.loadbalancers],
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
