"""What Libra's tenants kept from its worker: GALERA, HTTP cookies and TCP source stickiness.

Libra's API server sends the UPDATEs (`libra_servers.py`), real clients connect through
the real HAProxy to real backends on 127.0.0.1, and each test asserts what a tenant would
see: a Galera cluster's writes on its one primary, a browser kept on its node by the
SERVERID cookie, a TCP client address kept on its node, across node-only UPDATEs,
reloads and worker restarts. TCP clients use their own loopback source addresses
(127.0.0.2, 127.0.0.3...) so that each is a different client to HAProxy.
"""

from __future__ import annotations

import http.client
import re
import socket
import time

from libra_worker.drivers.haproxy.sockets import send_command
from tests.integration.libra_servers import (
    ERRMSG_LENGTH,
    LibraLoadBalancer,
    LibraMonitor,
    LibraNode,
    bytes_out,
    update_node_statuses,
)
from tests.integration.support import LOOPBACK, node_statuses, traffic, wait_until
from tests.integration.test_faults import reboot

# Checked every second, DOWN at the first failure: failovers show within a few seconds.
QUICK = LibraMonitor("CONNECT", delay=1, timeout=1, attempts=1)
# HAProxy's dynamic cookie: a 64-bit hash of the device's key and the node's address:port.
COOKIE = re.compile(r"SERVERID=[0-9a-f]{16}")


def libra_node(node_id: int, backend, **extra) -> LibraNode:
    return LibraNode(id=node_id, address=LOOPBACK, port=backend.port, **extra)


def tcp_from(source: str, port: int) -> str:
    """One TCP connection from `source` (a loopback address); the node that answered."""
    with socket.create_connection((LOOPBACK, port), timeout=5,
                                  source_address=(source, 0)) as conn:
        conn.sendall(b"hello\n")
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def http_get(port: int, cookie: str | None = None) -> tuple[str, str | None]:
    """One request, with the cookie a browser would send; (the node, the cookie set)."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    headers = {"Connection": "close", **({"Cookie": cookie} if cookie else {})}
    try:
        connection.request("GET", "/", headers=headers)
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, (response.status, body)
        set_cookie = response.getheader("Set-Cookie")
    finally:
        connection.close()
    return body, set_cookie.split(";")[0] if set_cookie else None


def stats_command(worker, command: str) -> str:
    return send_command(worker.state_dir / "haproxy-stats.sock", command, 5)


def stick_entries(worker) -> int:
    """How many client addresses the running HAProxy's TCP table holds."""
    return int(stats_command(worker, "show table lb-tcp").splitlines()[0].rsplit("used:", 1)[1])


def peers_resynced(worker) -> bool:
    """Whether HAProxy's initial resync is over (PEERS_F_RESYNC_REMOTE, 0x2, in 2.6's
    `show peers`): a process learns the table from the one it replaces, or after 5 s
    knows there is none. Only then does it hand its table over at the next reload.
    """
    section = stats_command(worker, "show peers").splitlines()[0]
    return bool(int(section.split(" flags=", 1)[1].split()[0], 16) & 0x2)


def haproxy_workers(worker) -> tuple[int, ...]:
    return worker.haproxy.process_table().worker_pids


def reload_with_new_timeout(libra, worker, *loadbalancers: LibraLoadBalancer) -> None:
    """An UPDATE that changes more than nodes: HAProxy reloads (a new worker process)."""
    before = haproxy_workers(worker)
    for lb in loadbalancers:
        lb.timeout -= 1000
    success, answer = libra.send_update(worker.function, *loadbalancers)
    assert success, answer
    assert set(haproxy_workers(worker)).isdisjoint(before), "HAProxy did not reload"


# --------------------------------------------------------------------------- GALERA


def test_galera_writes_go_to_the_primary_then_one_backup_then_back(worker, libra, http_backend,
                                                                    tcp_backend, free_port):
    primary, first, second = tcp_backend("primary"), tcp_backend("backup-1"), tcp_backend("backup-2")
    web = http_backend("web")
    http_lb = LibraLoadBalancer("web", "HTTP", free_port(), [libra_node(1, web)])
    galera = LibraLoadBalancer("db", "GALERA", free_port(), [
        libra_node(31, primary), libra_node(32, first, backup=True),
        libra_node(33, second, backup=True)], monitor=QUICK)
    url = f"tcp://{LOOPBACK}:{galera.port}"

    success, answer = libra.send_update(worker.function, http_lb, galera)

    assert success, answer
    assert [lb["protocol"] for lb in answer["loadBalancers"]] == ["HTTP", "GALERA"]
    assert traffic(url, 6) == ({"primary": 6}, 0)

    primary.stop()
    wait_until(lambda: node_statuses(worker.submit("STATS"))["31"] == "DOWN", 15,
               "the primary to be DOWN")
    # HAProxy's first backup takes every connection; the second stays idle.
    assert traffic(url, 8) == ({"backup-1": 8}, 0)

    primary.start()  # the same port again
    wait_until(lambda: node_statuses(worker.submit("STATS"))["31"] == "UP", 15,
               "the primary to be UP again")
    assert traffic(url, 6) == ({"primary": 6}, 0)

    # The admin server's ping reads every node of the GALERA load balancer.
    failed, node_status = libra.send_pings([worker.function])
    assert failed == []
    assert {entry["id"]: entry["protocol"] for entry in node_status[worker.function]} == {
        "1": "HTTP", "31": "GALERA", "32": "GALERA", "33": "GALERA"}
    assert update_node_statuses(node_status, {1: "ONLINE", 31: "ERROR", 32: "ONLINE",
                                              33: "ONLINE"}) == {
        1: "ONLINE", 31: "ONLINE", 32: "ONLINE", 33: "ONLINE"}


def test_galera_bytes_are_billed_as_tcp(worker, libra, tcp_backend, free_port):
    primary, spare = tcp_backend("primary"), tcp_backend("spare")
    galera = LibraLoadBalancer("db", "GALERA", free_port(),
                               [libra_node(1, primary), libra_node(2, spare, backup=True)])
    assert libra.send_update(worker.function, galera)[0]
    assert traffic(f"tcp://{LOOPBACK}:{galera.port}", 5) == ({"primary": 5}, 0)

    def billed() -> int:
        failed, results = libra.get_stats([worker.function])
        assert failed == []
        return max(bytes_out(results[worker.function], galera), 0)

    # stats_sched reads a GALERA load balancer's bytes under "tcp"; the sink publishes
    # its counts every second, so they reach billing within a few sweeps.
    total = 0
    for _ in range(30):
        total += billed()
        if total:
            break
        time.sleep(0.5)
    assert total >= len("primary") * 5


def test_galera_refusals_name_the_rule_and_fit_errmsg(worker, libra, tcp_backend, free_port):
    a, b = tcp_backend("a"), tcp_backend("b")
    two_primaries = LibraLoadBalancer("db", "GALERA", free_port(),
                                      [libra_node(1, a), libra_node(2, b)])
    no_primary = LibraLoadBalancer("db", "GALERA", free_port(),
                                   [libra_node(1, a, backup=True), libra_node(2, b, backup=True)])
    for galera in (two_primaries, no_primary):
        success, stored = libra.send_update(worker.function, galera)

        assert not success and galera.errmsg == stored
        assert "Galera load balancer must have exactly one primary node" in stored
        assert len(stored) <= ERRMSG_LENGTH

    # One TCP-mode load balancer per device, as in Libra.
    tcp_lb = LibraLoadBalancer("raw", "TCP", free_port(), [libra_node(3, a)])
    galera = LibraLoadBalancer("db", "GALERA", free_port(), [libra_node(4, b)])
    success, stored = libra.send_update(worker.function, tcp_lb, galera)
    assert not success and "one HTTP and one TCP or GALERA" in stored
    assert len(stored) <= ERRMSG_LENGTH


# --------------------------------------------------------------------------- HTTP cookies


def test_the_cookie_keeps_a_browser_on_its_node(worker, libra, http_backend, free_port):
    web_a, web_b, web_c = http_backend("web-a"), http_backend("web-b"), http_backend("web-c")
    lb = LibraLoadBalancer("web", "HTTP", free_port(), [libra_node(101, web_a),
                                                        libra_node(102, web_b)])
    assert libra.send_update(worker.function, lb)[0]

    # Without the cookie a client is balanced, and told which node served it: one value
    # per node, derived from the device's key and the node's address and port.
    cookies = cookies_by_node(lb.port, 6)
    assert set(cookies) == {"web-a", "web-b"} and len(set(cookies.values())) == 2

    def stays(node: str) -> None:
        # With its cookie the browser stays; the cookie is not set again (`indirect`).
        assert [http_get(lb.port, cookies[node]) for _ in range(4)] == [(node, None)] * 4

    stays("web-b")
    # A browser still holding the cookie Libra's worker gave (id-<node id>) is balanced
    # once, given this worker's cookie of the node it reached, and stays from then on.
    node, given = http_get(lb.port, "SERVERID=id-102")
    assert given == cookies[node]
    stays(node)

    # A node-only UPDATE: web-c joins at runtime in a spare server slot, without a reload,
    # with its own cookie from its first answer on (derived at `set server ... addr`).
    lb.nodes.append(libra_node(103, web_c))
    before = haproxy_workers(worker)
    assert libra.send_update(worker.function, lb)[0]
    assert haproxy_workers(worker) == before
    added = cookies_by_node(lb.port, 9)
    assert added == {**cookies, "web-c": added["web-c"]} and len(set(added.values())) == 3
    cookies = added
    stays("web-c")
    stays("web-b")

    # A reload, then a reboot (everything killed, started again): the same node has the
    # same cookie, web-c's included, now a line of the file. The key is read back from
    # state_dir, never made again.
    reload_with_new_timeout(libra, worker, lb)
    assert cookies_by_node(lb.port, 9) == cookies
    stays("web-c")
    reboot(worker)
    worker.start()
    assert cookies_by_node(lb.port, 9) == cookies
    stays("web-c")
    stays("web-b")

    # Node-only again, at runtime: a weight change and web-c removed.
    lb.nodes[0].weight = 5
    del lb.nodes[2]
    before = haproxy_workers(worker)
    assert libra.send_update(worker.function, lb)[0]
    assert haproxy_workers(worker) == before
    stays("web-b")
    # The cookie of a node that left balances the client again, and gives it a new one.
    node, given = http_get(lb.port, cookies["web-c"])
    assert node in ("web-a", "web-b") and given == cookies[node]


def cookies_by_node(port: int, requests: int) -> dict[str, str]:
    """Cookie-less requests: the cookie each node's answers set (always the same one)."""
    cookies: dict[str, str] = {}
    for _ in range(requests):
        node, cookie = http_get(port)
        assert cookie is not None and COOKIE.fullmatch(cookie), (node, cookie)
        assert cookies.setdefault(node, cookie) == cookie, (node, cookie, cookies)
    return cookies


# --------------------------------------------------------------------------- TCP sources


def test_a_tcp_client_stays_on_its_node_across_reloads_and_restarts(worker, libra, tcp_backend,
                                                                     free_port):
    nodes = [tcp_backend(f"raw-{n}") for n in (1, 2, 3)]
    extra = tcp_backend("raw-4")
    lb = LibraLoadBalancer("raw", "TCP", free_port(),
                           [libra_node(n + 1, backend) for n, backend in enumerate(nodes)])
    assert libra.send_update(worker.function, lb)[0]

    # 127.0.0.9 takes the first node, so the clients' nodes are not the ones a fresh
    # process, without the table, would give them first.
    tcp_from("127.0.0.9", lb.port)
    clients = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    placed = {client: tcp_from(client, lb.port) for client in clients}
    assert sorted(placed.values()) == ["raw-1", "raw-2", "raw-3"]  # balanced, one each
    assert placed["127.0.0.2"] != "raw-1"

    def each_client_stays() -> None:
        for client, node in placed.items():
            assert [tcp_from(client, lb.port) for _ in range(3)] == [node] * 3, client

    known = len(placed) + 1
    # A cold-started HAProxy waits 5 s for a table to learn before it has one to teach.
    wait_until(lambda: peers_resynced(worker), 10, "HAProxy's initial resync")

    def reload_and_hand_over() -> None:
        reload_with_new_timeout(libra, worker, lb)
        # The old process pushes its table to the new one through the peers listener as
        # it stops: a fraction of a second, during which a new client may be placed
        # afresh. Without the peers section the table would stay empty.
        wait_until(lambda: stick_entries(worker) >= known, 5, "the table's hand-over")
        assert peers_resynced(worker)  # so the next reload hands it over at once too

    each_client_stays()
    lb.nodes.append(libra_node(4, extra))  # a node-only UPDATE, at runtime
    assert libra.send_update(worker.function, lb)[0]
    each_client_stays()
    reload_and_hand_over()
    each_client_stays()
    haproxy = haproxy_workers(worker)
    worker.restart()  # the restarted worker adopts HAProxy, peers listener and all
    assert haproxy_workers(worker) == haproxy
    each_client_stays()
    reload_and_hand_over()
    each_client_stays()


def test_persistence_turned_off_balances_every_client(worker_factory, libra, http_backend,
                                                      tcp_backend, free_port):
    worker = worker_factory(settings={"haproxy": {"http_cookie_persistence": "false",
                                                  "tcp_source_persistence": "false"}})
    web_a, web_b = http_backend("web-a"), http_backend("web-b")
    raw_a, raw_b = tcp_backend("raw-a"), tcp_backend("raw-b")
    http_lb = LibraLoadBalancer("web", "HTTP", free_port(), [libra_node(1, web_a),
                                                             libra_node(2, web_b)])
    tcp_lb = LibraLoadBalancer("raw", "TCP", free_port(), [libra_node(3, raw_a),
                                                           libra_node(4, raw_b)])
    assert libra.send_update(worker.function, http_lb, tcp_lb)[0]

    assert {http_get(http_lb.port, "SERVERID=id-2") for _ in range(4)} == {
        ("web-a", None), ("web-b", None)}
    assert {tcp_from("127.0.0.2", tcp_lb.port) for _ in range(4)} == {"raw-a", "raw-b"}
    config = worker.haproxy_config()
    assert "peers " not in config and "stick" not in config and "cookie" not in config


def test_a_taken_peers_address_stops_the_worker_at_start_up(worker_factory):
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        worker = worker_factory(start=False,
                                settings={"haproxy": {"peers_address": f"{LOOPBACK}:{port}"}})
        worker.spawn()

        assert worker.wait() != 0
    problems = [line for line in worker.output().splitlines() if "peers_address" in line]
    assert problems and f"[haproxy] peers_address: Port {port} on {LOOPBACK} is already in use" \
        in problems[0]


def test_an_update_never_collides_with_the_peers_listener(worker, libra, tcp_backend, free_port):
    raw = tcp_backend("raw")
    on_peers_port = LibraLoadBalancer("raw", "TCP", worker.peers_port, [libra_node(1, raw)])

    success, stored = libra.send_update(worker.function, on_peers_port)

    assert not success
    assert stored.startswith(f"Port {worker.peers_port} is taken by [haproxy] peers_address")
    with socket.socket() as holder:  # another program took the port since start-up
        holder.bind((LOOPBACK, worker.peers_port))
        holder.listen()
        tcp_lb = LibraLoadBalancer("raw", "TCP", free_port(), [libra_node(1, raw)])

        success, stored = libra.send_update(worker.function, tcp_lb)

    assert not success and len(stored) <= ERRMSG_LENGTH
    assert stored.startswith(f"[haproxy] peers_address: Port {worker.peers_port} on {LOOPBACK} "
                             "is already in use")
    assert libra.send_update(worker.function, tcp_lb)[0]  # free again
    assert traffic(f"tcp://{LOOPBACK}:{tcp_lb.port}", 2) == ({"raw": 2}, 0)
