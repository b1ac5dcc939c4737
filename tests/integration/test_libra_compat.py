"""Libra's API and admin servers against real workers, through the real gearmand.

`tests/integration/libra_servers.py` plays the servers as Libra's code does (message
shapes, the order replies are read in, the sweeps, the errmsg column); every test here
sends what they send and asserts what they would conclude, and what a real client and a
real backend see. METRICS and DIAGNOSTICS are in `test_libra_compat_fleet.py`.
"""

from __future__ import annotations

import socket
from urllib.parse import quote

from tests.integration.libra_servers import (
    ERRMSG_LENGTH,
    LibraLoadBalancer,
    LibraMonitor,
    LibraNode,
    keep_message,
    update_node_statuses,
)
from tests.integration.support import (
    LOOPBACK,
    HTTPBackend,
    connection_refused,
    node_statuses,
    traffic,
    wait_until,
)

# HAProxy's largest timer: what a timeout of 0 ("no timeout" in Libra's API) renders as.
NO_TIMEOUT_MS = 2**31 - 1
# What Libra's API keeps of a monitor path (urllib's quote() with this safe set); the rest
# it percent-encodes before storing and sending the path.
LIBRA_API_SAFE = "/~+*,;:!$'[]()?&=#%"


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


def libra_node(node_id: int, backend: HTTPBackend | None = None, *, port: int | None = None,
               **extra) -> LibraNode:
    return LibraNode(id=node_id, address=LOOPBACK, port=backend.port if backend else port, **extra)


# --------------------------------------------------------------------------- UPDATE


def test_update_as_the_api_server_builds_it(worker, libra, http_backend, tcp_backend, free_port):
    web_a, web_b, spare = http_backend("web-a"), http_backend("web-b"), http_backend("spare")
    raw = tcp_backend("raw")
    http_lb = LibraLoadBalancer("web", "HTTP", free_port(), [
        libra_node(101, web_a), libra_node(102, web_b), libra_node(103, spare, backup=True),
        libra_node(104, port=free_port(), enabled=False)])
    tcp_lb = LibraLoadBalancer("raw", "TCP", free_port(), [libra_node(201, raw)],
                               algorithm="LEAST_CONNECTIONS")

    success, answer = libra.send_update(worker.function, http_lb, tcp_lb)

    assert success, answer
    assert answer["hpcs_response"] == "PASS" and http_lb.errmsg is None
    answered, failures = traffic(url(http_lb.port), 20)
    assert (set(answered), failures) == ({"web-a", "web-b"}, 0)
    assert traffic(f"tcp://127.0.0.1:{tcp_lb.port}", 3) == ({"raw": 3}, 0)
    config = worker.haproxy_config()
    # The default monitor and options the API server sends, as HAProxy runs them, and
    # Libra's SERVERID cookie (each node's value derived from the device's key).
    assert f"server 101 127.0.0.1:{web_a.port} weight 1 check inter 30s fall 2 rise 2\n" in config
    assert f"server 103 127.0.0.1:{spare.port} weight 1 check inter 30s fall 2 rise 2 backup\n" in config
    assert "    cookie SERVERID insert indirect nocache dynamic\n" in config
    assert "server 104 " not in config
    assert config.count("timeout client 30000\n") == 2 and config.count("retries 3\n") == 2
    assert set(node_statuses(worker.submit("STATS"))) == {"101", "102", "103", "201"}


def test_libra_ranges_mean_what_they_meant(worker, libra, http_backend, free_port):
    web = http_backend("web")
    lb = LibraLoadBalancer(
        "unbounded", "HTTP", free_port(), [libra_node(7, web)], timeout=0, retries=256,
        monitor=LibraMonitor("HTTP", delay=1, timeout=0, attempts=10, path="/health?full=1&fmt=text"))

    success, answer = libra.send_update(worker.function, lb)

    assert success, answer
    config = worker.haproxy_config()
    for keyword in ("client", "server", "connect"):
        assert f"timeout {keyword} {NO_TIMEOUT_MS}\n" in config
    assert "retries 256\n" in config and "timeout check 0s\n" in config
    assert traffic(url(lb.port), 5) == ({"web": 5}, 0)
    wait_until(lambda: web.request_lines, 10, "a health check")
    assert web.request_lines[0] == b"GET /health?full=1&fmt=text HTTP/1.0\r\n"


def _paths_libra_sends() -> list[tuple[str, bytes]]:
    """(path in the UPDATE, the exact path HAProxy's health check must request)."""
    raw = [f"/a{char}b" for char in "?&=$'[]#%;:@!*(),~+-._"]
    raw += ["/health?full=1&fmt=text&who=$USER&q='a'&r=[1]#top",
            "/" + ("a'#$?&=[]%;" * 200)[:1999]]
    # A newer API stores and sends the path as quote() left it: the worker keeps it as is.
    stored = [quote(path, safe=LIBRA_API_SAFE) for path in raw]
    cases = [(path, path.encode()) for path in stored]
    # An older API passed the path raw: the worker encodes it as a newer one would have.
    cases += [("/a b", b"/a%20b"), ('/a"b', b"/a%22b"), ("/a\\b", b"/a%5Cb"),
              ("/a b'c\"d\\e#f$g", b"/a%20b'c%22d%5Ce#f$g")]
    # About the longest request line a path can become: 2,000 characters, nearly all
    # encoded to three.
    longest = "/" + " " * 1998 + "x"
    cases.append((longest, longest.replace(" ", "%20").encode()))
    return cases


def test_health_check_requests_exactly_the_path_libra_sends(worker, libra, http_backend, free_port):
    cases = _paths_libra_sends()
    # Two load balancers per UPDATE (HTTP and TCP, both with an HTTP monitor), each
    # checking its own fresh backend, so a line can only come from that path.
    for first, second in zip(cases[::2], cases[1::2] + [cases[0]]):
        checked = []
        loadbalancers = []
        for protocol, (path, expected) in (("HTTP", first), ("TCP", second)):
            backend = http_backend(f"check-{protocol}")
            checked.append((backend, expected))
            loadbalancers.append(LibraLoadBalancer(
                protocol.lower(), protocol, free_port(), [libra_node(1, backend)],
                monitor=LibraMonitor("HTTP", delay=1, timeout=1, attempts=2, path=path)))

        success, answer = libra.send_update(worker.function, *loadbalancers)

        assert success, answer
        for backend, expected in checked:
            wait_until(lambda backend=backend: backend.request_lines, 10,
                       f"a health check of {expected[:40]!r}")
            assert set(backend.request_lines) == {b"GET " + expected + b" HTTP/1.0\r\n"}


# --------------------------------------------------------------------------- errors


def test_refusals_fit_the_errmsg_column_and_lead_with_the_cause(worker, libra, http_backend,
                                                                 free_port):
    web = http_backend("web")
    # Libra's API adds a node as a primary unless told it is a backup: a GALERA load
    # balancer can reach a device with two.
    galera = LibraLoadBalancer("db", "GALERA", free_port(),
                               [libra_node(1, web), libra_node(2, port=free_port())])

    success, stored = libra.send_update(worker.function, galera)

    assert not success
    assert galera.errmsg == stored  # read from badRequest, as the API server reads it first
    assert stored.startswith("loadbalancers[0].nodes: Galera load balancer"), stored
    assert "exactly one primary" in stored and len(stored) <= ERRMSG_LENGTH

    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        taken = LibraLoadBalancer("web", "HTTP", holder.getsockname()[1], [libra_node(1, web)])
        success, stored = libra.send_update(worker.function, taken)

    assert not success
    assert taken.errmsg == stored and stored.startswith(f"Port {taken.port}")
    assert len(stored) <= ERRMSG_LENGTH


# --------------------------------------------------------------------------- DELETE


def test_deleting_one_then_the_last_load_balancer(worker, libra, http_backend, tcp_backend,
                                                  free_port):
    web, raw = http_backend("web"), tcp_backend("raw")
    http_lb = LibraLoadBalancer("web", "HTTP", free_port(), [libra_node(1, web)])
    tcp_lb = LibraLoadBalancer("raw", "TCP", free_port(), [libra_node(2, raw)])
    assert libra.send_update(worker.function, http_lb, tcp_lb)[0]

    success, answer = libra.send(worker.function, keep_message(http_lb))

    assert success, answer
    assert connection_refused(tcp_lb.port)
    assert traffic(url(http_lb.port), 3) == ({"web": 3}, 0)

    success, answer = libra.send(worker.function, {"hpcs_action": "DELETE"})

    assert success, answer
    assert connection_refused(http_lb.port)
    # The admin server's ping skips a device that answers FAIL with status DELETED.
    assert libra.send_pings([worker.function]) == ([], {})


# --------------------------------------------------------------------------- the admin server


def test_ping_sweep_as_the_admin_server_runs_it(worker_factory, libra, http_backend, free_port):
    live, deleted, suspended = worker_factory(), worker_factory(), worker_factory()
    web = http_backend("web")
    quick = LibraMonitor("CONNECT", delay=1, timeout=1, attempts=1)
    nothing_listens = free_port()
    monitored = LibraLoadBalancer("web", "HTTP", free_port(),
                                  [libra_node(11, web), libra_node(12, port=nothing_listens)],
                                  monitor=quick)
    assert libra.send_update(live.function, monitored)[0]
    for device in (deleted, suspended):
        assert libra.send_update(device.function, LibraLoadBalancer(
            "web", "HTTP", free_port(), [libra_node(21, web)]))[0]
    assert libra.send(deleted.function, {"hpcs_action": "DELETE"})[0]
    assert libra.send(suspended.function, {"hpcs_action": "SUSPEND"})[0]
    wait_until(lambda: node_statuses(live.submit("STATS")) == {"11": "UP", "12": "DOWN"}, 15,
               "node 12 to be DOWN")
    # A device no worker serves: silent in the 5 s round and in the 30 s retry.
    silent = f"{live.function}-gone"

    failed, node_status = libra.send_pings(
        [live.function, deleted.function, suspended.function, silent])

    assert sorted(failed) == sorted([suspended.function, silent])
    assert list(node_status) == [live.function]
    assert update_node_statuses(node_status, {11: "ONLINE", 12: "ONLINE"}) == {
        11: "ONLINE", 12: "ERROR"}
    discovered = libra.get_discover(live.function)
    assert discovered is not None and discovered["version"]


def test_every_live_device_answers_the_first_ping_round(worker_factory, libra, http_backend,
                                                        free_port):
    web = http_backend("web")
    devices = [worker_factory() for _ in range(3)]
    for number, device in enumerate(devices):
        assert libra.send_update(device.function, LibraLoadBalancer(
            "web", "HTTP", free_port(), [libra_node(number + 1, web)]))[0]

    sweep = libra.sweep([device.function for device in devices], "STATS")

    assert (sweep.retried, sweep.failed) == ([], [])
    assert all(reply["hpcs_response"] == "PASS" for reply in sweep.replies.values())
