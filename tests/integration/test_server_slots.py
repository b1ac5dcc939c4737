"""Server slots with the real worker, HAProxy and traffic on 127.0.0.1.

A node added by a node-only UPDATE fills a spare server line of the file instead of being
made with `add server`, so HAProxy treats it as a file server. Proven here against the
running HAProxy: it reuses server-side connections to a slot-filled node as it does to a
node read from the file; the persistence cookie a client gets from a slot-filled node is
the one the node has under its own name after the next reload; backup slots give a
GALERA-like load balancer its failover; a server in maintenance gets no health check;
running out of slots reloads once and renders new ones; a restarted worker (and a state
file of a release without slots) renders the live file byte for byte and does not
reload. Whether HAProxy reloaded is read from the master CLI's `show proc`.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from typing import Any, Iterator

import pytest

from libra_worker.drivers.haproxy.sockets import parse_stat_csv, send_command
from tests.integration.support import (
    TrafficLoop,
    Worker,
    free_port,
    http_monitor,
    lb,
    node_statuses,
    traffic,
    update,
    wait_until,
)
from tests.integration.test_runtime_changes import (
    RELOAD_LINE,
    RUNTIME_LINE,
    current_workers,
    start_lb,
    submit_under_traffic,
    url,
)

REQUESTS = 300


class _KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps the connection: what HAProxy can reuse

    def do_GET(self) -> None:  # the name http.server dispatches to
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class KeepAliveBackend:
    """An HTTP node on 127.0.0.1 that answers its name and keeps connections open
    (the shared test backends close each one, so HAProxy could reuse none)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _KeepAliveHandler)
        self.server.daemon_threads = True
        self.server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()

    def node(self, **extra: Any) -> dict[str, Any]:
        return {"id": self.name, "address": "127.0.0.1", "port": self.port, **extra}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def keepalive_backend() -> Iterator[Any]:
    made: list[KeepAliveBackend] = []

    def make(name: str) -> KeepAliveBackend:
        made.append(KeepAliveBackend(name))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def server_stats(worker: Worker, backend: str = "lb-http") -> dict[str, dict[str, str]]:
    answer = send_command(worker.state_dir / "haproxy-stats.sock", "show stat -1 4 -1")
    return {row["svname"]: row for row in parse_stat_csv(answer) if row["pxname"] == backend}


def keepalive_requests(port: int, count: int, cookie: str | None = None) -> tuple[list[str], set[str]]:
    """`count` requests on one client connection: who answered, and the cookies set."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    answered, cookies = [], set()
    try:
        for _ in range(count):
            connection.request("GET", "/", headers={"Cookie": f"SERVERID={cookie}"} if cookie else {})
            response = connection.getresponse()
            answered.append(response.read().decode())
            assert response.status == 200, answered[-1]
            if response.getheader("Set-Cookie"):
                cookies.add(response.getheader("Set-Cookie").split(";")[0].split("=", 1)[1])
    finally:
        connection.close()
    return answered, cookies


def runtime_lines(worker: Worker) -> int:
    return worker.log_text().count(RUNTIME_LINE)


# ---------------------------------------------------------------------- like a file server


def test_a_slot_filled_node_reuses_server_connections_as_a_file_node_does(
        worker, keepalive_backend, free_port):
    a, b = keepalive_backend("reuse-a"), keepalive_backend("reuse-b")
    port = free_port()
    workers = start_lb(worker, port, [a.node()])
    reply = worker.submit(update(lb("HTTP", port, [a.node(), b.node()])))
    assert reply["hpcs_response"] == "PASS", reply
    assert runtime_lines(worker) == 1

    answered, _ = keepalive_requests(port, REQUESTS)

    assert current_workers(worker) == workers
    assert set(answered) == {"reuse-a", "reuse-b"}
    stats = server_stats(worker)
    for server in ("reuse-a", "slot:1"):  # from the file, and filled at runtime
        sessions, connects = int(stats[server]["stot"]), int(stats[server]["connect"])
        assert sessions >= REQUESTS // 3, (server, stats[server])
        # Measured: 1-2 connections for ~150 sessions each; a server made with
        # `add server` on 2.6 opened one per request.
        assert connects <= sessions // 10, (server, sessions, connects)
        assert int(stats[server]["reuse"]) >= sessions - connects, stats[server]
    # The access log names the slot (the sink reads only the frontend's name from a line).
    access_log = worker.logsink.store.active_path("http")
    wait_until(lambda: access_log.exists() and " lb-http/slot:1 " in access_log.read_text(
        errors="replace"), 10, "an access line of the slot-filled server")


def test_cookie_persistence_to_a_slot_filled_node_holds_and_survives_the_next_reload(
        worker, keepalive_backend, free_port):
    a, b = keepalive_backend("ck-a"), keepalive_backend("ck-b")
    port = free_port()
    workers = start_lb(worker, port, [a.node()])
    assert worker.submit(update(lb("HTTP", port, [a.node(), b.node()])))["hpcs_response"] == "PASS"
    assert current_workers(worker) == workers
    cookie = server_stats(worker)["slot:1"]["cookie"]
    assert cookie and cookie != server_stats(worker)["ck-a"]["cookie"]

    # A new client balanced to the slot is told its cookie, and stays there with it.
    answered, cookies = keepalive_requests(port, 4)
    assert cookies == {server_stats(worker)[name]["cookie"] for name in ("ck-a", "slot:1")}
    assert keepalive_requests(port, 20, cookie)[0] == ["ck-b"] * 20

    # The next reload serves ck-b under its own name, with the same cookie.
    assert worker.submit(update(lb("HTTP", port, [a.node(), b.node()],
                                   algorithm="LEAST_CONNECTIONS")))["hpcs_response"] == "PASS"
    assert set(current_workers(worker)).isdisjoint(workers)
    assert f"server ck-b 127.0.0.1:{b.port} " in worker.haproxy_config()
    assert server_stats(worker)["ck-b"]["cookie"] == cookie
    assert keepalive_requests(port, 20, cookie)[0] == ["ck-b"] * 20


# ---------------------------------------------------------------------- kinds, checks


def test_a_backup_slot_gives_a_galera_load_balancer_its_failover(worker, tcp_backend, free_port):
    primary, old, new = (tcp_backend(name) for name in ("gal-p", "gal-k1", "gal-k2"))
    port = free_port()
    target = f"tcp://127.0.0.1:{port}/q"
    reply = worker.submit(update(lb("GALERA", port, [primary.node(), old.node(backup=True)])))
    assert reply["hpcs_response"] == "PASS", reply
    workers = current_workers(worker)

    # The backup is replaced: its new node fills a backup slot.
    reply = worker.submit(update(lb("GALERA", port, [primary.node(), new.node(backup=True)])))
    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(target, 6) == ({"gal-p": 6}, 0)
    assert server_stats(worker, "lb-tcp")["slot:9"]["bck"] == "1"

    # The primary out of service: the slot-filled backup takes over.
    with TrafficLoop(target) as loop:
        reply = worker.submit(update(lb("GALERA", port, [primary.node(condition="DISABLED"),
                                                          new.node(backup=True)])))
        assert reply["hpcs_response"] == "PASS", reply
        after = loop.total
        wait_until(lambda: loop.total >= after + 10, 20, "requests after the failover")
    assert loop.errors == []
    assert traffic(target, 6) == ({"gal-k2": 6}, 0)
    assert current_workers(worker) == workers
    assert runtime_lines(worker) == 2
    assert sorted(node_statuses(worker.submit("STATS"))) == ["gal-k2", "gal-p"]


def test_a_server_in_maintenance_gets_no_health_check(worker, http_backend, free_port):
    """What keeps the placeholders (and emptied slots) quiet: HAProxy 2.6 runs no check on
    a server in maintenance. Here the listener is the removed node itself, whose server
    stays at its address, in maintenance."""
    a, b = http_backend("quiet-a"), http_backend("quiet-b")
    port = free_port()
    monitor = http_monitor("/health", delay=1, timeout=1, attempts=2)
    start_lb(worker, port, [a.node(), b.node()], monitor=monitor)
    wait_until(lambda: b.health_checks > 0, 10, "a health check of quiet-b")

    assert worker.submit(update(lb("HTTP", port, [a.node()], monitor=monitor)))["hpcs_response"] == "PASS"
    assert server_stats(worker)["quiet-b"]["status"] == "MAINT"
    time.sleep(0.5)  # a check already under way may still land
    checks_b, checks_a = b.health_checks, a.health_checks
    time.sleep(3.5)

    assert b.health_checks == checks_b
    assert a.health_checks >= checks_a + 2


# ---------------------------------------------------------------------- running out, restarts


def test_running_out_of_slots_reloads_once_with_new_ones(worker_factory, http_backend, free_port):
    worker = worker_factory(start=False)
    # Also a configuration of an earlier release: consolidate_after starts, ignored.
    worker.config_path.write_text(worker.config_path.read_text().replace(
        "stop_grace = 3\n", "stop_grace = 3\nspare_servers = 1\nconsolidate_after = 0.1\n"))
    worker.start()
    assert "[haproxy] consolidate_after is obsolete and ignored" in worker.log_text()
    a, b, c, d = (http_backend(name) for name in ("out-a", "out-b", "out-c", "out-d"))
    port = free_port()
    workers = start_lb(worker, port, [a.node()])

    submit_under_traffic(worker, port, update(lb("HTTP", port, [a.node(), b.node()])))
    assert current_workers(worker) == workers  # the one spare
    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [a.node(), b.node(), c.node()])))

    assert loop.errors == []
    assert set(current_workers(worker)).isdisjoint(workers)
    assert f"{RELOAD_LINE}: lb-http has no free server slot left" in worker.log_text()
    config = worker.haproxy_config()
    assert f"server out-b 127.0.0.1:{b.port} " in config  # every node under its own id again
    assert "server slot:1 127.0.0.1:1 weight 1 check inter 30s fall 2 rise 2 disabled\n" in config
    workers = current_workers(worker)
    loop = submit_under_traffic(worker, port, update(lb("HTTP", port, [a.node(), b.node(), c.node(),
                                                                       d.node()])))
    assert loop.errors == []
    assert current_workers(worker) == workers
    assert set(traffic(url(port), 20)[0]) == {"out-a", "out-b", "out-c", "out-d"}


def test_a_restarted_worker_renders_the_live_file_byte_for_byte_and_does_not_reload(
        worker, http_backend, free_port):
    a, b, c = (http_backend(name) for name in ("rs-a", "rs-b", "rs-c"))
    port = free_port()
    workers = start_lb(worker, port, [a.node(), b.node()])
    assert worker.submit(update(lb("HTTP", port, [a.node(), c.node(weight=4)])))["hpcs_response"] == "PASS"
    live = worker.haproxy_config()
    assert "server slot:1 " in live and "server rs-b 127.0.0.1:1 " in live

    worker.restart()

    assert worker.haproxy_config() == live
    assert current_workers(worker) == workers
    assert "not the last accepted UPDATE's" not in worker.log_text()
    # The saved slots are the ones it plans with: rs-b comes back to its own server.
    assert worker.submit(update(lb("HTTP", port, [a.node(), b.node(), c.node(weight=4)])))[
        "hpcs_response"] == "PASS"
    assert current_workers(worker) == workers
    assert f"server rs-b 127.0.0.1:{b.port} " in worker.haproxy_config()
    assert sorted(node_statuses(worker.submit("STATS"))) == ["rs-a", "rs-b", "rs-c"]


def test_a_state_file_without_slots_loads_and_renders_what_a_reload_would(
        worker, http_backend, free_port):
    """A state.json of the release before slots has no layout: the worker derives the one
    a reload renders, which is what the live file of a reloaded UPDATE holds."""
    a, b = http_backend("old-a"), http_backend("old-b")
    port = free_port()
    workers = start_lb(worker, port, [a.node()])
    live = worker.haproxy_config()
    worker.stop()
    state_file = worker.state_dir / "state.json"
    state = json.loads(state_file.read_text())
    del state["layout"]
    state_file.write_text(json.dumps(state))

    worker.start()

    assert worker.haproxy_config() == live
    assert current_workers(worker) == workers
    assert worker.submit(update(lb("HTTP", port, [a.node(), b.node()])))["hpcs_response"] == "PASS"
    assert current_workers(worker) == workers
    assert "layout" in json.loads(state_file.read_text())
