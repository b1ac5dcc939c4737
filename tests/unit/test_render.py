"""Golden-file tests for libra_worker.drivers.haproxy.render and templates/haproxy.cfg.j2.

Each case renders a small Device built by the factories below and compares the WHOLE
configuration with tests/unit/golden/<case>.cfg; any difference fails. After an
intended template change, regenerate the files and review the diff:

    UPDATE_GOLDEN=1 python -m pytest tests/unit/test_render.py

Every golden is also given to the real `haproxy -c -q -f`, so a golden that HAProxy
would refuse cannot be accepted by review alone.
"""

from __future__ import annotations

import os
import shlex
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from libra_worker.drivers.haproxy import render
from libra_worker.drivers.haproxy.process import find_binary
from libra_worker.errors import InvalidMessage
from libra_worker.messages import (
    Algorithm,
    Device,
    LoadBalancer,
    Monitor,
    MonitorType,
    Node,
    Options,
    Protocol,
    parse,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"
# Fixed, so the goldens do not change with the package version or the machine.
TEST_VERSION = "0.0.0-test"
PATHS = render.RuntimePaths(
    stats_socket=Path("/run/libra-worker/haproxy-stats.sock"),
    log_socket=Path("/run/libra-worker/haproxy-log.sock"),
)
MAXCONN = 4096
# The worker's defaults: Libra's cookie and source persistence, the default peers address,
# and a fixed cookie key (a device's own is random: cookie_key.py).
COOKIE_KEY = "0123456789abcdef" * 4
PERSISTENCE = render.Persistence(http_cookie=True, tcp_source=True, peer=("127.0.0.1", 7441),
                                 cookie_key=COOKIE_KEY)


# ---------------------------------------------------------------------- fixture factories


def make_node(
    address: str = "127.0.0.2",
    port: int = 8080,
    *,
    id: str | None = None,
    weight: int = 1,
    backup: bool = False,
    enabled: bool = True,
) -> Node:
    return Node(
        id=id or f"node-{address.replace(':', '_')}-{port}",
        address=address,
        port=port,
        weight=weight,
        backup=backup,
        enabled=enabled,
    )


def make_lb(
    protocol: Protocol = Protocol.HTTP,
    port: int | None = None,
    nodes: tuple[Node, ...] | None = None,
    **changes,
) -> LoadBalancer:
    if port is None:
        port = 80 if protocol is Protocol.HTTP else 3306
    if nodes is None:
        nodes = (make_node(),)
    return LoadBalancer(protocol=protocol, port=port, nodes=nodes, **changes)


def make_device(*loadbalancers: LoadBalancer) -> Device:
    return Device(loadbalancers=tuple(loadbalancers) or (make_lb(),))


@pytest.fixture
def rendered(monkeypatch):
    """Render a Device (listening on `listen_address`) into configuration text."""
    monkeypatch.setattr(render, "__version__", TEST_VERSION)
    environment = render.template_environment()

    def _render(device: Device, listen_address: str = "127.0.0.1",
                persistence: render.Persistence = PERSISTENCE) -> str:
        context = render.build_context(
            device, listen_address=listen_address, paths=PATHS, maxconn=MAXCONN,
            persistence=persistence,
        )
        return render.render(environment, context)

    return _render


def haproxy_check(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config_file = tmp_path / "haproxy.cfg"
    config_file.write_text(config_text)
    return subprocess.run(
        [find_binary(), "-c", "-q", "-f", str(config_file)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def assert_matches_golden(name: str, text: str) -> None:
    golden = GOLDEN_DIR / f"{name}.cfg"
    if UPDATE_GOLDEN:
        golden.write_text(text)
    assert golden.exists(), f"{golden} is missing; run with UPDATE_GOLDEN=1 to create it"
    expected = golden.read_text()
    assert text == expected, f"rendered config differs from {golden.name}"


# ---------------------------------------------------------------------- the golden cases

CASES = {
    # The spec's UPDATE example (one HTTP load balancer, node 10.0.0.1:80, weight 1).
    "http_only": lambda: make_device(
        make_lb(Protocol.HTTP, 80, (make_node("10.0.0.1", 80, id="10.0.0.1_80"),))
    ),
    "tcp_only": lambda: make_device(
        make_lb(
            Protocol.TCP,
            3306,
            (make_node("127.0.0.2", 3306, id="db1"), make_node("127.0.0.3", 3306, id="db2")),
        )
    ),
    "http_and_tcp_leastconn": lambda: make_device(
        make_lb(
            Protocol.HTTP,
            8080,
            (make_node("127.0.0.2", 80, id="web1"), make_node("127.0.0.3", 80, id="web2")),
            algorithm=Algorithm.LEAST_CONNECTIONS,
        ),
        make_lb(
            Protocol.TCP,
            8443,
            (make_node("127.0.0.2", 443, id="tls1"),),
            algorithm=Algorithm.LEAST_CONNECTIONS,
        ),
    ),
    "http_monitor_path": lambda: make_device(
        make_lb(
            Protocol.HTTP,
            80,
            (make_node("127.0.0.2", 80, id="web1"),),
            monitor=Monitor(MonitorType.HTTP, delay=10, timeout=5, attempts=3, path="/health/check"),
        )
    ),
    "backup_and_disabled_nodes": lambda: make_device(
        make_lb(
            Protocol.HTTP,
            80,
            (
                make_node("127.0.0.2", 80, id="primary", weight=10),
                make_node("127.0.0.3", 80, id="spare", backup=True),
                make_node("127.0.0.4", 80, id="maintenance", enabled=False),
                make_node("127.0.0.5", 80, id="spare-off", backup=True, enabled=False),
            ),
        )
    ),
    "ipv6": lambda: make_device(
        make_lb(
            Protocol.TCP,
            5432,
            (make_node("::1", 5432, id="v6"), make_node("127.0.0.2", 5432, id="v4")),
        )
    ),
    "options_and_timeouts": lambda: make_device(
        make_lb(
            Protocol.HTTP,
            80,
            (make_node("127.0.0.2", 80, id="web1", weight=256),),
            options=Options(
                client_timeout_ms=1000,
                server_timeout_ms=2000,
                connect_timeout_ms=3000,
                connect_retries=0,
            ),
            monitor=Monitor(MonitorType.CONNECT, delay=7, timeout=4, attempts=5),
        )
    ),
    "empty_node_list": lambda: make_device(make_lb(Protocol.HTTP, 80, ())),
    # Libra's database load balancer: the one primary, then the first backup that is up;
    # TCP mode and the TCP frontend's name, without a stick table.
    "galera_beside_http": lambda: make_device(
        make_lb(Protocol.HTTP, 80, (make_node("127.0.0.2", 80, id="web1"),)),
        make_lb(
            Protocol.GALERA,
            3306,
            (
                make_node("127.0.0.2", 3306, id="db-primary"),
                make_node("127.0.0.3", 3306, id="db-backup1", backup=True),
                make_node("127.0.0.4", 3306, id="db-backup2", backup=True),
            ),
        ),
    ),
    # [haproxy] http_cookie_persistence and tcp_source_persistence both off.
    "persistence_off": lambda: make_device(
        make_lb(Protocol.HTTP, 80, (make_node("127.0.0.2", 80, id="web1"),)),
        make_lb(Protocol.TCP, 443, (make_node("127.0.0.2", 443, id="tls1"),)),
    ),
    # Libra's API: timeouts of 0 ("no timeout"), 256 retries, a check timeout of 0 and a
    # health-check path with a query string and the characters HAProxy's parser treats
    # specially.
    "libra_zero_timeouts_and_query_path": lambda: make_device(
        make_lb(
            Protocol.HTTP,
            80,
            (make_node("127.0.0.2", 80, id="12"),),
            options=Options(
                client_timeout_ms=0, server_timeout_ms=0, connect_timeout_ms=0, connect_retries=256
            ),
            monitor=Monitor(
                MonitorType.HTTP, delay=30, timeout=0, attempts=2,
                path="/health?full=1&fmt=text&u=$USER&q='a%20b'&r=[1]#top",
            ),
        )
    ),
}
LISTEN_ADDRESS = {"ipv6": "::1"}
PERSISTENCE_OF = {"persistence_off": render.NO_PERSISTENCE}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_config_matches_golden(case, rendered):
    text = rendered(CASES[case](), LISTEN_ADDRESS.get(case, "127.0.0.1"),
                    PERSISTENCE_OF.get(case, PERSISTENCE))
    assert_matches_golden(case, text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_haproxy_accepts_golden(case, tmp_path):
    result = haproxy_check((GOLDEN_DIR / f"{case}.cfg").read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_check_can_fail(tmp_path):
    # Proves the check above is a real one: a broken golden would be caught.
    text = (GOLDEN_DIR / "http_only.cfg").read_text().replace("balance roundrobin", "balance bogus")
    assert haproxy_check(text, tmp_path).returncode != 0


def test_goldens_have_no_unexpected_files():
    assert sorted(path.stem for path in GOLDEN_DIR.glob("*.cfg")) == sorted(CASES)


# ---------------------------------------------------------------------- build_context units


def test_bind_address_brackets_ipv6_only():
    assert render.bind_address("::1", 80) == "[::1]:80"
    assert render.bind_address("0.0.0.0", 443) == "0.0.0.0:443"
    assert render.host_port("2001:db8::1", 8080) == "2001:db8::1:8080"


def test_server_options_words():
    lb = make_lb(monitor=Monitor(MonitorType.CONNECT, delay=9, timeout=3, attempts=4))
    node = make_node(weight=7, backup=True, enabled=False)
    assert (render.server_options(node, render.health_check(lb))
            == "weight 7 check inter 9s fall 4 rise 2 backup disabled")


def test_http_monitor_becomes_httpchk_and_connect_monitor_does_not():
    http = make_lb(monitor=Monitor(MonitorType.HTTP, 5, 5, 2, "/ping"))
    options = render.backend_options(http, render.NO_PERSISTENCE, "127.0.0.1")
    assert options == ("option httpchk GET '/ping'",)
    assert render.backend_options(make_lb(), render.NO_PERSISTENCE, "127.0.0.1") == ()


def test_persistence_is_libras_per_protocol_and_never_galeras():
    http, tcp = make_lb(Protocol.HTTP), make_lb(Protocol.TCP)
    galera = make_lb(Protocol.GALERA, nodes=(make_node(id="7"),))
    assert render.backend_options(http, PERSISTENCE, "0.0.0.0") == (
        "cookie SERVERID insert indirect nocache dynamic", f"dynamic-cookie-key {COOKIE_KEY}")
    assert render.backend_options(tcp, PERSISTENCE, "0.0.0.0") == (
        "stick-table type ip size 200k expire 30m peers lb-peers",
        "stick store-request src", "stick match src")
    # An "ip" table would store no IPv6 client.
    assert render.backend_options(tcp, PERSISTENCE, "::")[0].startswith("stick-table type ipv6 ")
    assert render.backend_options(galera, PERSISTENCE, "0.0.0.0") == ()
    only_http = render.Persistence(http_cookie=True, tcp_source=False, cookie_key=COOKIE_KEY)
    assert render.backend_options(tcp, only_http, "0.0.0.0") == ()


def test_the_cookie_key_reaches_the_file_only_as_64_hex_digits():
    for key in (None, "", COOKIE_KEY[:-1], COOKIE_KEY.upper(), COOKIE_KEY[:-1] + "\n",
                COOKIE_KEY[:-2] + " x"):
        with pytest.raises(ValueError):
            render.Persistence(http_cookie=True, tcp_source=False, cookie_key=key)
    # Without cookies no key is needed.
    assert render.Persistence(http_cookie=False, tcp_source=False).cookie_key is None


def test_peers_section_only_while_a_table_needs_it():
    def peers(persistence, *loadbalancers):
        return render.build_context(make_device(*loadbalancers), listen_address="127.0.0.1",
                                    paths=PATHS, maxconn=10, persistence=persistence)
    tcp = make_lb(Protocol.TCP, 81)
    galera = make_lb(Protocol.GALERA, 81)
    with_table = peers(PERSISTENCE, make_lb(Protocol.HTTP, 80), tcp)
    assert with_table["global_options"] == ("localpeer local",)
    assert with_table["peers"] == [{"name": "lb-peers", "peer": "local",
                                    "address": "127.0.0.1:7441"}]
    ipv6 = render.Persistence(http_cookie=False, tcp_source=True, peer=("::1", 7441))
    assert peers(ipv6, tcp)["peers"][0]["address"] == "[::1]:7441"
    for context in (peers(PERSISTENCE, make_lb(Protocol.HTTP, 80), galera),
                    peers(render.NO_PERSISTENCE, tcp)):
        assert (context["global_options"], context["peers"]) == ((), [])
    with pytest.raises(ValueError):
        render.Persistence(http_cookie=False, tcp_source=True)


def test_context_names_proxies_by_protocol():
    device = make_device(make_lb(Protocol.HTTP, 80), make_lb(Protocol.TCP, 81))
    context = render.build_context(device, listen_address="127.0.0.1", paths=PATHS, maxconn=10,
                                   persistence=PERSISTENCE)
    assert [lb["name"] for lb in context["loadbalancers"]] == ["lb-http", "lb-tcp"]
    assert [lb["mode"] for lb in context["loadbalancers"]] == ["http", "tcp"]
    assert context["maxconn"] == 10
    assert context["stats_socket"] == str(PATHS.stats_socket)
    galera = render.build_context(make_device(make_lb(Protocol.GALERA, 81)),
                                  listen_address="127.0.0.1", paths=PATHS, maxconn=10,
                                  persistence=PERSISTENCE)["loadbalancers"][0]
    # The TCP frontend's name: the log sink bills its bytes as tcp, as Libra's billing reads.
    assert (galera["name"], galera["mode"]) == ("lb-tcp", "tcp")


# ---------------------------------------------------------------------- injection

MALICIOUS = [
    "x\n    server evil 127.0.0.9:80",
    "x\r\nserver evil 127.0.0.9:80",
    "x server evil 127.0.0.9:80",
    'x" evil',
    "x' evil",
    "x#evil",
    "x\\nserver evil",
    "x$HOME",
    "x\tevil",
    "x\x00evil",
    "x\x0bevil",
    "x\u2028evil",
    "x\x85evil",
]


def _message(field: str, value: str) -> dict:
    node = {"id": "n1", "address": "127.0.0.2", "port": "80"}
    lb = {
        "id": "lb1",
        "name": "my lb",
        "protocol": "HTTP",
        "port": "80",
        "monitor": {"type": "HTTP", "delay": 5, "timeout": 5, "attempts": 2, "path": "/ok"},
        "nodes": [node],
    }
    if field == "node.id":
        node["id"] = value
    elif field == "node.address":
        node["address"] = value
    elif field == "lb.id":
        lb["id"] = value
    elif field == "lb.name":
        lb["name"] = value
    elif field == "monitor.path":
        lb["monitor"]["path"] = "/" + value
    return {"hpcs_action": "UPDATE", "loadbalancers": [lb]}


FIELDS = ["node.id", "node.address", "lb.id", "lb.name", "monitor.path"]
def _injection_cases():
    for field in FIELDS:
        for value in MALICIOUS:
            yield pytest.param(field, value, id=f"{field}-{value!r}")
    yield pytest.param("node.address", "fe80::1%eth0 evil", id="scoped-ipv6-space")
    yield pytest.param("node.address", "fe80::1%x\n    server evil 127.0.0.9:80", id="scoped-ipv6-newline")


@pytest.mark.parametrize("field, value", list(_injection_cases()))
def test_malicious_strings_never_add_config_lines(field, value, rendered):
    baseline = rendered(parse(_message("node.id", "n1")).device)
    try:
        message = parse(_message(field, value))
    except InvalidMessage:
        return  # rejected before anything is rendered: the safe outcome
    text = rendered(message.device)
    assert len(text.splitlines()) == len(baseline.splitlines())
    if field == "monitor.path":
        # Accepted as Libra's API would pass it on: encoded, and one quoted word.
        (check,) = [line for line in text.splitlines() if "httpchk" in line]
        assert "evil" not in text.replace(check, "")
        assert shlex.split(check) == ["option", "httpchk", "GET", message.device.loadbalancers[0].monitor.path]
    else:
        assert "evil" not in text


def test_injection_baseline_is_sane(rendered):
    # The baseline message must itself render, with exactly one node's server line (the
    # others are the spare slots: in maintenance, at the placeholder).
    text = rendered(parse(_message("node.id", "n1")).device)
    servers = [line.strip() for line in text.splitlines() if line.strip().startswith("server ")]
    assert [line for line in servers if not line.startswith("server slot:")] == [
        "server n1 127.0.0.2:80 weight 1 check inter 5s fall 2 rise 2"
    ]
    assert all(line.startswith("server slot:") and " 127.0.0.1:1 " in line
               and line.endswith(" disabled") for line in servers[1:])
    assert "option httpchk GET '/ok'" in text


def test_name_with_spaces_is_accepted_but_never_rendered(rendered):
    # The spec's ARCHIVE example names a load balancer "lb #1": names are free text,
    # so they must never reach the configuration.
    message = parse(_message("lb.name", "lb #1"))
    assert message.device.loadbalancers[0].name == "lb #1"
    assert "lb #1" not in rendered(message.device)


# ---------------------------------------------------------------------- quoting for HAProxy


def test_zero_timeouts_render_as_haproxys_largest_timer(rendered):
    text = rendered(CASES["libra_zero_timeouts_and_query_path"]())
    for keyword in ("client", "server", "connect"):
        assert f"timeout {keyword} {render.MAX_HAPROXY_TIMEOUT_MS}\n" in text


def _haproxy_warnings(config_text: str, tmp_path: Path) -> list[str]:
    # Without -q: `haproxy -c -q` hides warnings.
    config_file = tmp_path / "haproxy.cfg"
    config_file.write_text(config_text)
    result = subprocess.run([find_binary(), "-c", "-f", str(config_file)],
                            capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in (result.stdout + result.stderr).splitlines() if "[WARNING]" in line]


def test_zero_timeouts_render_without_haproxys_missing_timeout_warning(tmp_path):
    text = (GOLDEN_DIR / "libra_zero_timeouts_and_query_path.cfg").read_text()
    assert _haproxy_warnings(text, tmp_path) == []
    # What a literal 0 would have cost: HAProxy takes it as infinite, and warns.
    literal = text.replace(f"timeout client {render.MAX_HAPROXY_TIMEOUT_MS}", "timeout client 0")
    assert any("missing timeouts" in line for line in _haproxy_warnings(literal, tmp_path))


@pytest.mark.parametrize("text", ["/plain", "/a'b", "''", "/#$\"\\ x", "'/'\\''"])
def test_config_word_reads_back_as_one_word(text):
    assert shlex.split(render.config_word(text)) == [text]


# Everything a sender may put in a path: printable ASCII (blanks, quotes, backslash, '#',
# '$' included), a few non-ASCII letters, and already percent-encoded sequences.
_ANY_PATH_CHARACTER = st.sampled_from(string.printable.strip() + " éü€") | st.just("%2F")
_paths = st.lists(_ANY_PATH_CHARACTER, max_size=60).map(lambda chars: "/" + "".join(chars))


def _device_with_paths(http_path: str, tcp_path: str):
    monitor = {"type": "HTTP", "delay": 5, "timeout": 5, "attempts": 2}
    message = {"hpcs_action": "UPDATE", "loadBalancers": [
        {"protocol": "HTTP", "port": 80, "monitor": {**monitor, "path": http_path},
         "nodes": [{"id": 1, "address": "127.0.0.2", "port": 80}]},
        {"protocol": "TCP", "port": 81, "monitor": {**monitor, "path": tcp_path},
         "nodes": [{"id": 2, "address": "127.0.0.3", "port": 81}]},
    ]}
    return parse(message).device


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(http_path=_paths, tcp_path=_paths)
# The longest paths: 2,000 characters, nearly all encoded to three, or all quotes.
@example(http_path="/" + " " * 1998 + "x", tcp_path="/" + "'" * 1999)
def test_any_path_is_accepted_quoted_and_passes_haproxy_check(http_path, tcp_path, rendered, tmp_path):
    device = _device_with_paths(http_path, tcp_path)
    text = rendered(device)
    checks = [shlex.split(line) for line in text.splitlines() if "httpchk" in line]
    assert checks == [["option", "httpchk", "GET", lb.monitor.path] for lb in device.loadbalancers]
    baseline = rendered(_device_with_paths("/", "/"))
    assert len(text.splitlines()) == len(baseline.splitlines())
    result = haproxy_check(text, tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
