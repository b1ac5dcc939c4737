"""The Gearman side: job servers that restart or are down, and the libra-client CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from libra_worker import client
from tests.integration.support import (
    REPO_ROOT,
    Gearmand,
    Worker,
    free_port,
    gearmand_server,
    lb,
    traffic,
    update,
)

RECOVERY_TIMEOUT = 20.0


def discover_until_pass(worker: Worker, servers: list[str] | None = None,
                        timeout: float = RECOVERY_TIMEOUT) -> dict:
    """DISCOVER every few hundred ms until the worker answers; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            reply = worker.submit("DISCOVER", timeout=2, servers=servers)
            if reply.get("hpcs_response") == "PASS":
                return reply
            last = reply
        except client.TransportError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no DISCOVER answer within {timeout:g} s; last: {last}\n{worker.output()}")


def test_worker_serves_again_after_gearmand_restarts(worker_factory, http_backend, free_port):
    with gearmand_server() as server:
        worker = worker_factory(servers=[server.address])
        node = http_backend("through-restart")
        port = free_port()
        assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"

        server.stop()
        with pytest.raises(client.TransportError):
            worker.submit("DISCOVER", timeout=2)
        # The load balancer does not depend on the job server.
        assert traffic(f"http://127.0.0.1:{port}/", 3) == ({"through-restart": 3}, 0)
        time.sleep(1.5)  # let the worker notice and enter its reconnect loop
        server.start()

        reply = discover_until_pass(worker)
        assert reply["version"]
        assert worker.is_running()
        assert worker.submit("STATS")["nodes"] == [
            {"id": "through-restart", "status": "UP", "protocol": "HTTP"}]


def test_worker_started_before_its_job_server_comes_up(worker_factory):
    port = free_port()
    worker = worker_factory(start=False, servers=[f"127.0.0.1:{port}"])
    worker.spawn()
    time.sleep(1.0)
    assert worker.is_running(), worker.output()
    with gearmand_server(port):
        assert discover_until_pass(worker)["hpcs_response"] == "PASS"


def test_two_job_servers_one_down_jobs_through_the_live_one_are_served(worker_factory, gearmand,
                                                                        http_backend, free_port):
    dead_port = free_port()  # nothing listens here yet
    dead = f"127.0.0.1:{dead_port}"
    worker = worker_factory(servers=[dead, gearmand.address])
    node = http_backend("via-live")
    lb_port = free_port()

    reply = worker.submit(update(lb("HTTP", lb_port, [node.node()])), servers=[gearmand.address])

    assert reply["hpcs_response"] == "PASS", reply
    assert traffic(f"http://127.0.0.1:{lb_port}/", 3) == ({"via-live": 3}, 0)
    assert worker.submit("STATS", servers=[gearmand.address])["hpcs_response"] == "PASS"

    # When the second server comes up, the worker picks it up too.
    with gearmand_server(dead_port) as second:
        assert discover_until_pass(worker, servers=[second.address])["hpcs_response"] == "PASS"
        assert worker.submit("STATS", servers=[second.address])["nodes"] == [
            {"id": "via-live", "status": "UP", "protocol": "HTTP"}]
        assert worker.submit("DISCOVER", servers=[gearmand.address])["hpcs_response"] == "PASS"


def run_client(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "libra_worker.client", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


def test_client_cli_exit_codes(worker, gearmand: Gearmand, tmp_path):
    servers = gearmand.address

    passed = run_client("--servers", servers, "--timeout", "20", worker.function, "DISCOVER")
    assert passed.returncode == 0, passed.stderr
    assert json.loads(passed.stdout)["hpcs_response"] == "PASS"
    assert json.loads(passed.stdout)["version"]

    failed = run_client("--servers", servers, "--timeout", "20", worker.function, "stats")
    assert failed.returncode == 1, failed.stderr
    answer = json.loads(failed.stdout)
    assert (answer["hpcs_response"], answer["status"]) == ("FAIL", "NEW")

    invalid = run_client("--servers", servers, worker.function, "-", stdin="not json")
    assert invalid.returncode == 1, invalid.stderr
    assert "badRequest" in json.loads(invalid.stdout)

    message = tmp_path / "message.json"
    message.write_text(json.dumps({"hpcs_action": "discover"}))
    from_file = run_client("--servers", servers, worker.function, f"@{message}")
    assert from_file.returncode == 0, from_file.stderr

    unreachable = run_client("--servers", f"127.0.0.1:{free_port()}", "--timeout", "5",
                             worker.function, "DISCOVER")
    assert unreachable.returncode == 4
    assert unreachable.stderr.startswith("libra-client: cannot reach a job server")
    assert unreachable.stdout == "" and unreachable.stderr.count("\n") == 1

    # Said at once, not after the 60 s timeout.
    nobody = run_client("--servers", servers, "--timeout", "60", worker.function + "-nobody",
                        "DISCOVER", timeout=20)
    assert nobody.returncode == 3
    assert "no worker is registered" in nobody.stderr and nobody.stderr.count("\n") == 1

    typo = run_client("--servers", servers, worker.function, "FROB")
    assert typo.returncode == 2 and typo.stderr.count("\n") == 1
    assert "'FROB' is not an action" in typo.stderr

    bad_servers = run_client("--servers", "127.0.0.1:notaport", worker.function, "DISCOVER")
    assert bad_servers.returncode == 2


def test_client_fan_out_to_many_workers(worker_factory, gearmand: Gearmand, tmp_path):
    first, second = worker_factory(), worker_factory()
    nobody = first.function + "-nobody"
    servers = gearmand.address

    lines = run_client("--servers", servers, "--timeout", "30", first.function, second.function,
                       "DISCOVER")
    assert lines.returncode == 0, lines.stderr
    rows = [line.split(" ", 3) for line in lines.stdout.splitlines()]
    assert [(row[0], row[1]) for row in rows] == [(first.function, "PASS"), (second.function, "PASS")]
    assert all(float(row[2]) >= 0 for row in rows)
    assert lines.stderr.startswith("libra-client: 2 workers in ")
    assert lines.stderr.endswith(": 2 PASS, 0 FAIL, 0 TIMEOUT\n")

    names = tmp_path / "fleet"
    names.write_text(f"{first.function}\n{nobody}\n{second.function}\n")
    as_json = run_client("--servers", servers, "--timeout", "30", "--json", "--workers-file",
                         str(names), "STATS")
    assert as_json.returncode == 1, as_json.stderr  # a FAIL (STATS of an unconfigured device)
    results = json.loads(as_json.stdout)
    assert [(r["worker"], r["outcome"]) for r in results] == [
        (first.function, "FAIL"), (nobody, "TIMEOUT"), (second.function, "FAIL")]
    assert results[0]["reply"]["status"] == "NEW" and results[0]["error"]
    assert "no worker is registered" in results[1]["error"] and results[1]["reply"] is None

    silent = run_client("--servers", servers, "--timeout", "30", first.function, nobody, "DISCOVER")
    assert silent.returncode == 3, silent.stderr
    assert silent.stdout.splitlines()[1].startswith(f"{nobody} TIMEOUT 0 no worker is registered")
