"""The installed service under a real systemd, driven as an operator drives it.

One machine for the module (tests/system/sandbox.py): installed with
scripts/install-service.sh exactly as README says, `systemctl enable --now libra.target`,
a gearmand, two HTTP nodes and a Swift on its loopback, jobs sent with the installed
`libra-client`. Every test leaves it ACTIVE, serving the load balancer on port 80, so the
tests may run in any order but share one boot (and one install: about a minute).

What is proven (issue 15): the first UPDATE passes and every action passes; every process
runs as `libra` with no capability but CAP_NET_BIND_SERVICE; the worker's lines reach the
journal; zero failed requests through reloads, restarts, an upgrade, kill -9 and a
watchdog kill of the worker, after each of which the next UPDATE passes; METRICS stays
exact across a restart; HAProxy and the sink killed are restored by their units; a bad
config fails the unit at once while the load balancer serves on; a reboot serves the last
PASSed configuration before any job server is up; `systemctl stop libra.target` stops all.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.support import wait_until
from tests.system.sandbox import Helper, Sandbox
from tests.system.support import CHECKOUT, install_service, require_sandbox

FUNCTION = "lb-sandbox"
CONFIG = "/etc/libra-worker/libra-worker.conf"
CLIENT = "/opt/libra-worker/bin/libra-client"
STATE_DIR = "/var/lib/libra-worker"
UNITS = ("libra-worker.service", "libra-haproxy.service", "libra-logsink.socket",
         "libra-logsink.service")
SERVICES = ("libra-worker.service", "libra-haproxy.service", "libra-logsink.service")
NODE_PORTS = {"node-a": 21080, "node-b": 21081}
LB_PORT = 80
TCP_LB_PORT = 3306
CAP_NET_BIND_SERVICE = 1 << 10
# Unclean designs systemd complains about (KillMode=process and the like).
UNCLEAN = ("left-over process", "remains running after unit stopped")
METRICS_TOLERANCE = 0.001


class Machine:
    """The sandbox with the service installed, and the helpers running inside it."""

    def __init__(self, sandbox: Sandbox, wheelhouse: Path, output_dir: Path) -> None:
        self.sandbox = sandbox
        self.wheelhouse = wheelhouse
        self.output_dir = output_dir
        self.helpers: dict[str, Helper] = {}
        self.swift: dict[str, str] = {}
        self.install_output = ""

    # -- helpers inside --------------------------------------------------------------

    def start_helper(self, name: str, *arguments: str) -> dict[str, Any]:
        """`python -m tests.system.inside ARGS` inside, as root; its ready line."""
        output = self.output_dir / f"{name}.out"
        with open(output, "w") as handle:
            self.helpers[name] = self.sandbox.popen(
                [sys.executable, "-m", "tests.system.inside", *arguments], cwd=str(CHECKOUT),
                stdout=handle, stderr=handle)
        return wait_until(lambda: _json_lines(output)[:1], 90, f"{name} to be ready")[0]

    def stop_helper(self, name: str) -> list[dict[str, Any]]:
        self.helpers.pop(name).stop()
        return _json_lines(self.output_dir / f"{name}.out")

    def start_job_server_and_nodes(self) -> None:
        self.helpers["gearmand"] = self.sandbox.popen(
            ["/usr/sbin/gearmand", "--listen", "127.0.0.1", "--port", "4730", "--threads", "1",
             "--log-file", "stderr"])
        for name, port in NODE_PORTS.items():
            self.start_helper(name, "backend", name, str(port))

    # -- the operator's commands -------------------------------------------------------

    def client(self, message: dict[str, Any] | str, timeout: float = 60) -> dict[str, Any]:
        text = message if isinstance(message, str) else json.dumps(message)
        result = self.sandbox.run([CLIENT, "--servers", "127.0.0.1:4730", "--timeout",
                                   str(timeout), FUNCTION, text], check=False,
                                  timeout=timeout + 30)
        assert result.stdout.strip(), result.stderr
        return json.loads(result.stdout)

    def passes(self, message: dict[str, Any] | str) -> dict[str, Any]:
        reply = self.client(message)
        assert reply["hpcs_response"] == "PASS", reply
        return reply

    def update(self, monitor: dict[str, Any] | None = None, **weights: int) -> dict[str, Any]:
        nodes = [{"id": name, "address": "127.0.0.1", "port": NODE_PORTS[name],
                  "weight": weight} for name, weight in (weights or {"node-a": 1}).items()]
        balancer = {"protocol": "HTTP", "port": LB_PORT, "nodes": nodes}
        if monitor:
            balancer["monitor"] = monitor
        # Beside it a TCP load balancer, as Libra's devices have: its source stickiness
        # brings HAProxy's peers listener, which a restarting worker finds held by the
        # HAProxy of libra-haproxy.service (and must accept as its own).
        tcp = {"protocol": "TCP", "port": TCP_LB_PORT, "nodes": nodes}
        return self.passes({"hpcs_action": "UPDATE", "loadBalancers": [balancer, tcp]})

    def main_pid(self, unit: str) -> int:
        return int(self.sandbox.systemctl("show", "-p", "MainPID", "--value", unit).stdout)

    def active(self, unit: str) -> str:
        return self.sandbox.systemctl("is-active", unit, check=False).stdout.strip()

    def wait_active(self, *units: str, timeout: float = 60) -> None:
        for unit in units or SERVICES:
            wait_until(lambda: self.active(unit) == "active", timeout, f"{unit} to be active")

    def wait_serving(self) -> None:
        """The worker answers jobs (it registered at gearmand again)."""
        wait_until(lambda: self.client("DISCOVER", timeout=5)["hpcs_response"] == "PASS", 60,
                   "the worker to answer DISCOVER")

    def configure(self, text: str) -> None:
        self.sandbox.write_file(CONFIG, text, 0o640)
        self.sandbox.run(["chgrp", "libra", CONFIG])

    @contextlib.contextmanager
    def traffic(self, interval: float = 0.005) -> Iterator[dict[str, Any]]:
        """A request through the LB every `interval` s while the block runs; the summary
        (answered, failures, received bytes) is filled in when it ends."""
        summary: dict[str, Any] = {}
        self.start_helper("traffic", "traffic", str(LB_PORT), str(interval))
        try:
            yield summary
        finally:
            summary.update(self.stop_helper("traffic")[-1])

    def counts_written(self) -> None:
        """Traffic has stopped: the sink writes its counts every second, so once their file
        is two seconds old every line that reached it is counted."""
        counts = self.sandbox.path(f"{STATE_DIR}/logs/traffic.json")
        wait_until(lambda: time.time() - counts.stat().st_mtime > 2.0, 15, "the sink's last write")

    def wait_for_lb(self) -> str:
        """Until port 80 answers 200 (20 s at most); how long it took, or why not."""
        result = self.sandbox.run([sys.executable, "-c", WAIT_SERVING, str(LB_PORT)],
                                  cwd=str(CHECKOUT), timeout=30, check=False)
        status = self.sandbox.run(["/opt/libra-worker/bin/libra-worker", "ctl", "--config",
                                   CONFIG, "status"], check=False)
        assert result.returncode == 0, (result.stderr, status.stdout, status.stderr,
                                        self.sandbox.journal("libra-haproxy.service")[-3000:])
        return result.stdout

    def journal_is_clean(self) -> None:
        text = self.sandbox.journal()
        for phrase in UNCLEAN:
            assert phrase not in text, [line for line in text.splitlines() if phrase in line]


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            document = json.loads(line)
            if isinstance(document, dict):
                lines.append(document)
    return lines


def _status(sandbox: Sandbox, pid: int) -> dict[str, str]:
    """/proc/PID/status read inside: PID is in the machine's PID namespace."""
    text = sandbox.run(["cat", f"/proc/{pid}/status"]).stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.fixture(scope="module")
def machine(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    require_sandbox()
    with Sandbox("lw-service", shared=[CHECKOUT]) as sandbox:
        sandbox.boot()
        started = Machine(sandbox, wheelhouse, tmp_path_factory.mktemp("machine"))
        started.install_output = install_service(sandbox, CHECKOUT, wheelhouse)
        text = sandbox.read_file(CONFIG)
        text = text.replace("# function = lb-node-17", f"function = {FUNCTION}")
        text = text.replace("allow_plain_http = false", "allow_plain_http = true")
        started.configure(text)
        started.start_job_server_and_nodes()
        started.swift = started.start_helper("swift", "swift")
        sandbox.systemctl("enable", "--now", "libra.target")
        started.wait_active()
        started.wait_serving()
        started.update()
        try:
            yield started
        finally:
            for name in list(started.helpers):
                started.helpers.pop(name).stop()


@pytest.fixture
def serving(machine: Machine) -> Machine:
    """The machine, its units active and the LB answering, as every test leaves it."""
    machine.wait_active()
    machine.wait_serving()
    return machine


# --------------------------------------------------------------------------- it serves


def test_the_installed_units_serve_as_the_service_user_with_one_capability(serving):
    sandbox = serving.sandbox
    with serving.traffic() as summary:
        time.sleep(0.5)
    assert summary["answered"] > 20 and summary["failures"] == [], summary
    libra_uid = sandbox.run(["id", "-u", "libra"]).stdout.strip()
    for unit in SERVICES:
        group = sandbox.systemctl("show", "-p", "ControlGroup", "--value", unit).stdout.strip()
        pids = [int(pid) for pid in sandbox.run(
            ["cat", f"/sys/fs/cgroup{group}/cgroup.procs"]).stdout.split()]
        assert pids, unit
        for pid in pids:
            status = _status(sandbox, pid)
            assert status["Uid"].split() == [libra_uid] * 4, (unit, pid, status["Uid"])
            allowed = 0 if unit == "libra-logsink.service" else CAP_NET_BIND_SERVICE
            for kind in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
                assert int(status[kind], 16) & ~allowed == 0, (unit, pid, kind, status[kind])
        exposure = sandbox.run(["systemd-analyze", "security", unit]).stdout
        figure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", exposure)[1])
        assert figure <= 2.0, (unit, figure)
    # HAProxy is libra-haproxy.service's, not the worker's: it is in that unit's cgroup.
    haproxy = serving.main_pid("libra-haproxy.service")
    assert "haproxy" in sandbox.run(["cat", f"/proc/{haproxy}/cmdline"]).stdout


def test_every_action_passes(serving):
    serving.update(**{"node-a": 1, "node-b": 1})
    for action in ("DISCOVER", "STATS", "METRICS", "DIAGNOSTICS", "SUSPEND", "ENABLE"):
        serving.passes(action)
    with serving.traffic() as summary:
        time.sleep(0.3)
    assert summary["failures"] == [] and summary["answered"] > 10
    stats = serving.passes("STATS")
    assert {node["id"] for node in stats["nodes"]} == {"node-a", "node-b"}, stats
    archived = serving.passes({
        "hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
        "hpcs_object_store_basepath": "lbaaslogs",
        "hpcs_object_store_endpoint": serving.swift["endpoint"],
        "hpcs_object_store_token": serving.swift["token"],
        "loadBalancers": [{"id": "15", "protocol": "HTTP"}]})
    assert archived["archive"]["object"].startswith("lbaaslogs/15/"), archived
    assert archived["archive"]["lines"] > 0, archived
    serving.passes("DELETE")
    stats = serving.client("STATS")
    assert (stats["hpcs_response"], stats["status"]) == ("FAIL", "DELETED")
    serving.update()  # built again on the same HAProxy
    with serving.traffic() as summary:
        time.sleep(0.3)
    assert summary["failures"] == []


def test_the_workers_lines_are_in_the_journal_one_per_job_but_passed_pings(serving):
    cursor = serving.sandbox.journal_cursor()
    serving.passes("DISCOVER")  # a passed ping: a DEBUG line, and this worker logs INFO
    serving.passes("DIAGNOSTICS")
    refused = serving.client('{"hpcs_action": "FROBNICATE"}')
    assert refused["hpcs_response"] == "FAIL"

    def job_lines() -> list[dict[str, Any]]:
        return [entry for entry in serving.sandbox.journal_entries("libra-worker.service", cursor)
                if " answered " in str(entry.get("MESSAGE"))]

    wait_until(lambda: len(job_lines()) >= 2, 10, "the jobs' lines")
    entries = job_lines()
    assert len(entries) == 2, entries
    assert all(entry["_SYSTEMD_UNIT"] == "libra-worker.service" for entry in entries)
    # journald's priorities, not a "<6>" text prefix: INFO is 6.
    assert {entry["PRIORITY"] for entry in entries} == {"6"}
    assert not any(str(entry["MESSAGE"]).startswith("<") for entry in entries)


# --------------------------------------------------------------------------- no traffic lost


def reload_worker(machine: Machine) -> None:
    machine.sandbox.systemctl("reload", "libra-worker")


def restart_worker(machine: Machine) -> None:
    machine.sandbox.systemctl("restart", "libra-worker")


def upgrade(machine: Machine) -> None:
    """README's upgrade: the installer again, then the restart it prints."""
    output = install_service(machine.sandbox, CHECKOUT, machine.wheelhouse)
    assert "systemctl restart libra-worker libra-logsink" in output
    machine.sandbox.systemctl("restart", "libra-worker", "libra-logsink")


def kill_worker(machine: Machine) -> None:
    pid = machine.main_pid("libra-worker.service")
    machine.sandbox.run(["kill", "-9", str(pid)])
    wait_until(lambda: machine.main_pid("libra-worker.service") not in (0, pid), 30,
               "systemd to restart the worker")


def watchdog_kill(machine: Machine) -> None:
    """A hung worker (SIGSTOP) is killed by systemd's watchdog and started again."""
    drop_in = "/etc/systemd/system/libra-worker.service.d/watchdog.conf"
    machine.sandbox.write_file(drop_in, "[Service]\nWatchdogSec=3\n")
    machine.sandbox.systemctl("daemon-reload")
    try:
        machine.sandbox.systemctl("restart", "libra-worker")
        machine.wait_active("libra-worker.service")
        cursor = machine.sandbox.journal_cursor()
        pid = machine.main_pid("libra-worker.service")
        machine.sandbox.run(["kill", "-STOP", str(pid)])
        wait_until(lambda: machine.main_pid("libra-worker.service") not in (0, pid), 60,
                   "the watchdog to kill the hung worker and systemd to start it again")
        assert "Watchdog timeout" in machine.sandbox.journal("libra-worker.service", cursor)
    finally:
        machine.sandbox.path(drop_in).unlink()
        machine.sandbox.systemctl("daemon-reload")
    machine.wait_active("libra-worker.service")
    machine.sandbox.systemctl("restart", "libra-worker")


@pytest.mark.parametrize("operation", [reload_worker, restart_worker, upgrade, kill_worker,
                                       watchdog_kill], ids=lambda operation: operation.__name__)
def test_no_request_fails_while_the_worker_goes_through(serving, operation):
    haproxy = serving.main_pid("libra-haproxy.service")
    with serving.traffic() as summary:
        operation(serving)
        serving.wait_active()
        serving.wait_serving()
        serving.update(**{"node-a": 2, "node-b": 1})
        serving.update()
    assert summary["failures"] == [], summary["failures"][:5]
    assert summary["answered"] > 50
    assert serving.main_pid("libra-haproxy.service") == haproxy
    serving.journal_is_clean()


def test_metrics_stays_exact_across_a_restart(serving):
    # Every count of earlier tests' traffic written, then the period before this test's
    # traffic closed.
    serving.counts_written()
    serving.passes("METRICS")
    with serving.traffic(interval=0.002) as summary:
        time.sleep(1)
        restart_worker(serving)
        serving.wait_serving()
        time.sleep(1)
    serving.counts_written()
    reply = serving.passes("METRICS")
    billed = sum(entry["bytes_out"] for entry in reply["loadBalancers"]
                 if entry["protocol"] == "http")
    assert summary["failures"] == []
    assert abs(billed - summary["received"]) <= METRICS_TOLERANCE * summary["received"], (
        billed, summary["received"])


# --------------------------------------------------------------------------- one supervisor


def test_haproxy_killed_serves_again_within_3_s(serving):
    sandbox = serving.sandbox
    master = serving.main_pid("libra-haproxy.service")
    stats_before = serving.passes("STATS")
    killed = time.monotonic()
    sandbox.run(["kill", "-9", str(master)])
    answer = serving.wait_for_lb()
    back_after = time.monotonic() - killed
    print(f"HAProxy killed: serving again {back_after:.2f} s later")
    assert back_after < 3.0, (back_after, answer)
    assert serving.main_pid("libra-haproxy.service") != master
    # The worker notices the new master and says so; it started nothing itself.
    stats = wait_until(lambda: (lambda reply: reply if reply.get("restarts", 0) > stats_before.get(
        "restarts", 0) else None)(serving.client("STATS")), 15, "STATS to count the restart")
    assert "libra-haproxy.service" in stats["last_error"]
    serving.update(**{"node-a": 1, "node-b": 3})
    serving.update()


def test_the_log_sink_killed_is_restored_and_lines_arrive_again(serving):
    sink = serving.main_pid("libra-logsink.service")
    serving.sandbox.run(["kill", "-9", str(sink)])
    wait_until(lambda: serving.main_pid("libra-logsink.service") not in (0, sink), 15,
               "systemd to restart the sink")
    log = f"{STATE_DIR}/logs/http.log"
    before = serving.sandbox.path(log).stat().st_size if serving.sandbox.path(log).exists() else 0
    with serving.traffic() as summary:
        time.sleep(0.3)
    assert summary["failures"] == []
    wait_until(lambda: serving.sandbox.path(log).exists()
               and serving.sandbox.path(log).stat().st_size > before, 10,
               "access lines from the new sink")


WAIT_SERVING = """
import sys, time, urllib.request
deadline = time.monotonic() + 20
start = time.monotonic()
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=1).status == 200:
            print(f"serving after {time.monotonic() - start:.2f} s")
            sys.exit(0)
    except OSError:
        time.sleep(0.02)
sys.exit("not serving after 20 s")
"""


# --------------------------------------------------------------------------- failures, reboot


def test_a_bad_config_fails_the_unit_at_once_and_the_lb_serves_on(serving):
    sandbox = serving.sandbox
    good = sandbox.read_file(CONFIG)
    cursor = sandbox.journal_cursor()
    with serving.traffic() as summary:
        serving.configure(good.replace("bind_address =", "bind-adress ="))
        sandbox.systemctl("restart", "libra-worker", check=False)
        wait_until(lambda: serving.active("libra-worker.service") == "failed", 15,
                   "the unit to be failed")
        time.sleep(3)  # past RestartSec: no restart loop
        assert serving.active("libra-worker.service") == "failed"
        restarts = sandbox.systemctl("show", "-p", "NRestarts", "--value",
                                     "libra-worker").stdout.strip()
        assert restarts == "0", restarts
    assert summary["failures"] == [] and summary["answered"] > 100
    journal = sandbox.journal("libra-worker.service", cursor)
    assert "[haproxy] bind-adress" in journal, journal[-2000:]
    serving.configure(good)
    sandbox.systemctl("restart", "libra-worker")
    serving.wait_active()
    serving.wait_serving()
    serving.update()


def test_a_reboot_serves_the_last_passed_config_before_any_job_server(serving):
    sandbox = serving.sandbox
    # The nodes are this machine's helpers: they come back after HAProxy, which marks
    # them DOWN at its first check, so the check runs every second here.
    serving.update(monitor={"type": "CONNECT", "delay": 1, "timeout": 1, "attempts": 1},
                   **{"node-b": 1})
    served = sandbox.read_file(f"{STATE_DIR}/haproxy.cfg")
    for name in list(serving.helpers):
        serving.helpers.pop(name).stop()
    sandbox.reboot()
    # No job server yet: HAProxy's unit alone brings the configuration back.
    serving.wait_active("libra-haproxy.service")
    assert sandbox.read_file(f"{STATE_DIR}/haproxy.cfg") == served
    serving.start_helper("node-b", "backend", "node-b", str(NODE_PORTS["node-b"]))
    serving.wait_for_lb()
    assert serving.active("libra-worker.service") == "active"  # waiting for job servers
    serving.stop_helper("node-b")
    serving.start_job_server_and_nodes()
    serving.swift = serving.start_helper("swift", "swift")
    serving.wait_serving()
    assert serving.passes("STATS")["status"] == "ACTIVE"
    serving.update()


def test_stopping_the_worker_keeps_serving_and_stopping_the_target_stops_everything(serving):
    sandbox = serving.sandbox
    with serving.traffic() as summary:
        sandbox.systemctl("stop", "libra-worker")
        time.sleep(0.5)
    assert summary["failures"] == [] and summary["answered"] > 50
    sandbox.systemctl("stop", "libra.target")
    for unit in UNITS:
        # `systemctl stop` returns with the target's job; the socket's ends a moment later.
        wait_until(lambda: serving.active(unit) in ("inactive", "failed"), 10, f"{unit} to stop")
    assert sandbox.run(["pgrep", "-u", "libra"], check=False).stdout == ""
    refused = sandbox.run([sys.executable, "-c",
                           f"import socket; socket.create_connection(('127.0.0.1', {LB_PORT}), 1)"],
                          check=False)
    assert "Connection refused" in refused.stderr
    serving.journal_is_clean()
    sandbox.systemctl("start", "libra.target")
    serving.wait_active()
    serving.wait_serving()
