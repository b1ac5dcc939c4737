"""Fault injection: what the device does when its parts die, hang or cannot write.

Real gearmand, real worker process, real HAProxy, real backends on 127.0.0.1 and real
traffic; every fault is injected by pid (kill -9 of HAProxy, the worker, the log sink,
gearmand), by a stand-in HAProxy binary whose `-c` hangs or is slow, or by mounting the
state dir on a tiny tmpfs (full) and a read-only bind mount of itself. Each test asserts
what the load balancer serves (which node answered each request) and what the worker's
state dir, STATS and `libra-worker ctl` say afterwards.

Faults already covered elsewhere, and not repeated here:
  test_worker_lifecycle.py: HAProxy killed -> restarted (no time bound); SIGTERM during
  the first UPDATE still answers it; SIGKILL of an idle worker keeps the HAProxy master;
  SUSPENDED/DELETED kept across a plain restart; a stray HAProxy stopped at start-up.
  test_worker_transport.py: gearmand stopped with SIGTERM and restarted; job server down
  at start; one of two job servers down.

Recovery bounds are the only timing assertions, with their slack stated where they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from libra_worker import client
from libra_worker.drivers.haproxy.process import process_alive
from tests.integration.support import (
    REPO_ROOT,
    STOP_TIMEOUT,
    Gearmand,
    TrafficLoop,
    Worker,
    connection_refused,
    environment_for,
    free_port,
    http_monitor,
    lb,
    request_once,
    start_as_nobody,
    traffic,
    update,
    wait_until,
)

HAPROXY = "/usr/sbin/haproxy"
UTC_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
# The worker reconciles every second ([worker] reconcile_interval default) and HAProxy
# starts in ~0.1 s here; 0.5 s slack covers scheduling delays on this shared 2-core box
# (other suites run at the same time), still well below a second reconcile round.
HAPROXY_RECOVERY_BOUND = 2.0
HAPROXY_RECOVERY_SLACK = 0.5
# The worker reconnects with backoff capped at reconnect_delay_max = 1 s (support.Worker);
# 1 s slack for a DISCOVER round trip through a freshly started gearmand on a busy box.
GEARMAN_RECOVERY_BOUND = 5.0
GEARMAN_RECOVERY_SLACK = 1.0


# --------------------------------------------------------------------------- helpers


def make_fault_dir() -> Path:
    """Short (unix sockets live inside) and recognisable: lwf-*."""
    return Path(tempfile.mkdtemp(prefix="lwf-"))


class FaultWorker(Worker):
    """`support.Worker` with helpers to change its settings and read its files."""

    def state(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "state.json").read_text())

    def set_timeout(self, action: str, seconds: float) -> None:
        """Rewrite `[timeouts] <action>` and restart the worker (SIGTERM, exit 0) on it.

        Set-up UPDATEs run with the default timeout: the first UPDATE of a fresh worker
        (log sink, `haproxy -c`, start) can take longer than a test's tiny timeout here.
        """
        self.settings.setdefault("timeouts", {})[action] = str(seconds)
        self.write_config()
        self.restart()

    def files(self) -> tuple[str, str]:
        """(haproxy.cfg, state.json) as they are on disk."""
        return self.haproxy_config(), (self.state_dir / "state.json").read_text()


class FaultWorkers:
    """Makes `FaultWorker`s on lwf-* temp dirs; stops everything by pid, then removes them."""

    worker_class = FaultWorker

    def __init__(self, servers: list[str]) -> None:
        self.servers = servers
        self.workers: list[FaultWorker] = []
        self.roots: list[Path] = []
        self.cleanups: list[Callable[[], None]] = []

    def __call__(self, *, start: bool = True, servers: list[str] | None = None,
                 root: Path | None = None, **options: Any) -> FaultWorker:
        if root is None:
            root = make_fault_dir()
            self.roots.append(root)
        worker = self.worker_class(root, servers or self.servers, **options)
        self.workers.append(worker)
        return worker.start() if start else worker

    def new_root(self) -> Path:
        root = make_fault_dir()
        self.roots.append(root)
        return root

    def with_stand_in(self, kind: type["StandInHAProxy"] | None = None,
                      **options: Any) -> tuple[FaultWorker, "StandInHAProxy"]:
        """A started worker whose `[haproxy] binary` is a StandInHAProxy (or `kind`) of its own."""
        root = self.new_root()
        stand_in = (kind or StandInHAProxy)(root / "bin")
        self.cleanups.append(stand_in.kill_leftovers)
        worker = self(root=root, settings={"haproxy": {"binary": str(stand_in.path)}}, **options)
        return worker, stand_in

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.cleanup()
        for action in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                action()
        for root in self.roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workers(gearmand: Gearmand) -> Iterator[FaultWorkers]:
    factory = FaultWorkers([gearmand.address])
    try:
        yield factory
    finally:
        factory.cleanup()


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


def passed(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("hpcs_response") == "PASS", reply
    return reply


def served_by(port: int, names: set[str], n: int = 6) -> None:
    """`n` requests, all answered, by exactly the nodes `names` (round robin)."""
    answered, failures = traffic(url(port), n)
    assert failures == 0, answered
    assert set(answered) == names, answered


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(process_alive(pid) for pid in pids), STOP_TIMEOUT,
               f"pids {pids} to die")


def outage_after(port: int, started: float, give_up: float = 15.0) -> tuple[float, str]:
    """Poll one request every 20 ms; (seconds from `started` to the first answer, its node)."""
    while True:
        try:
            name = request_once(url(port), timeout=0.5)
            return time.monotonic() - started, name
        except (OSError, http.client.HTTPException):
            if time.monotonic() - started > give_up:
                raise AssertionError(f"the LB did not answer within {give_up:g} s of the fault")
            time.sleep(0.02)


def run_ctl(worker: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [worker.python, "-m", "libra_worker.cli", "ctl", "--config", str(worker.config_path), *args],
        capture_output=True, text=True, timeout=60, cwd=worker.cwd, env=environment_for(worker.python),
    )


def ctl_ok(worker: Worker, *args: str, exit_code: int = 0) -> str:
    """stdout of a `ctl` command that must end with `exit_code` (status: 3 = not running)."""
    result = run_ctl(worker, *args)
    assert result.returncode == exit_code, (args, result.stdout, result.stderr)
    return result.stdout


def status_rows(output: str) -> dict[str, str]:
    """`ctl status` rows: name, two spaces or more, value."""
    rows = {}
    for line in output.split("\nrecent HAProxy messages:")[0].splitlines():
        name, _, value = line.partition("  ")
        rows[name.strip()] = value.strip()
    return rows


def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)


class StandInHAProxy:
    """A `[haproxy] binary` that runs the real HAProxy, except that `-c` can be made to
    hang (`exec sleep 30`) or be slow (1 s, then the real check), and a start (`-D`) to
    hang (`hang-start`), while a mode file says so. Each such check appends its pid to `check-pids` first and keeps that pid (exec),
    so it can be killed by pid. `hang-child` is a wrapper that waits for a `sleep 30`
    child of its own (pid in `child-pids`), as a shell wrapper around HAProxy would."""

    SCRIPT = """#!/bin/sh
dir=$(dirname "$0")
case " $* " in
  *" -c "*)
    exec %(python)s "$dir/check.py" %(haproxy)s "$@"
    ;;
  *" -D "*)
    if [ "$(cat "$dir/check-mode" 2>/dev/null)" = hang-start ]; then
      echo $$ >> "$dir/check-pids"
      exec sleep 30
    fi
    ;;
esac
exec %(haproxy)s "$@"
"""

    # Its `haproxy -c`: the worker may start one ahead of the text it checks (on a pipe),
    # so the mode is read when that text comes, as HAProxy would read it.
    CHECK = """import os, select, subprocess, sys, time
directory = os.path.dirname(os.path.abspath(__file__))
select.select([sys.stdin], [], [])
try:
    with open(os.path.join(directory, "check-mode")) as mode_file:
        mode = mode_file.read().strip()
except FileNotFoundError:
    mode = ""


def record(name, pid):
    with open(os.path.join(directory, name), "a") as pids:
        pids.write(f"{pid}\\n")


if mode == "hang":
    record("check-pids", os.getpid())
    os.execvp("sleep", ["sleep", "30"])
elif mode == "hang-child":
    record("check-pids", os.getpid())
    child = subprocess.Popen(["sleep", "30"])
    record("child-pids", child.pid)
    child.wait()
elif mode == "slow":
    record("check-pids", os.getpid())
    time.sleep(1)
os.execv(sys.argv[1], sys.argv[1:])
"""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.path = directory / "haproxy"  # `_is_ours` looks for "haproxy" in argv[0]
        self.path.write_text(self.SCRIPT % {"haproxy": shlex.quote(HAPROXY),
                                            "python": shlex.quote(sys.executable)})
        self.path.chmod(0o755)
        (directory / "check.py").write_text(self.CHECK)

    def mode(self, mode: str | None) -> None:
        target = self.directory / "check-mode"
        if mode is None:
            target.unlink(missing_ok=True)
        else:
            target.write_text(mode)

    def check_pids(self, name: str = "check-pids") -> list[int]:
        try:
            return [int(word) for word in (self.directory / name).read_text().split()]
        except FileNotFoundError:
            return []

    def kill_leftovers(self) -> None:
        pids = self.check_pids() + self.check_pids("child-pids")
        kill_pids([pid for pid in pids if process_alive(pid)])


class ReexecStandIn(StandInHAProxy):
    """A wrapper HAProxy's master re-executes on every reload (it keeps the wrapper's path
    as argv[0]). Its `-c` passes, then removes the wrapper (`vanish`) or its x bits
    (`unexecutable`): the binary is gone between the check and the reload."""

    SCRIPT = """#!/bin/bash
dir=$(dirname "$0")
case " $* " in
  *" -c "*)
    %(haproxy)s "$@"; status=$?
    mode=$(cat "$dir/check-mode" 2>/dev/null)
    if [ "$mode" = vanish ]; then rm -f "$0"; fi
    if [ "$mode" = unexecutable ]; then chmod 644 "$0"; fi
    exit $status
    ;;
esac
exec -a "$0" %(haproxy)s "$@"
"""


def run_in_thread(action: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start `action` in a thread; the list gets its result or the exception it raised."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(action())
        except Exception as exc:  # noqa: BLE001 - handed to the test to assert on
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def last_job(worker: Worker, action: str) -> tuple[str, str, str]:
    return [job for job in journal_states(worker) if job[0] == action][-1]


def journal_states(worker: Worker, count: int = 20) -> list[tuple[str, str, str]]:
    """(action, state, rest of the line) of the last `count` jobs, from `ctl jobs`."""
    rows = []
    for line in ctl_ok(worker, "jobs", "-n", str(count)).splitlines()[1:]:
        parts = line.split(None, 4)
        rows.append((parts[2], parts[1], parts[4] if len(parts) > 4 else ""))
    return rows


# --------------------------------------------------------------------------- 1. HAProxy killed


def test_haproxy_killed_with_sigkill_serves_again_within_two_seconds(workers, http_backend):
    """kill -9 of the master and every worker: the reconciler restarts it from the last
    good configuration within one interval, counts the restart and says when."""
    worker = workers()
    first, second = http_backend("k9-a"), http_backend("k9-b")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [first.node(), second.node()]))))
    before = passed(worker.submit("STATS"))
    assert (before["restarts"], before["last_error"]) == (0, None)
    config = worker.haproxy_config()

    pids = worker.haproxy.our_pids()
    assert len(pids) >= 2, f"expected a master and a worker, got {pids}"
    killed_at = time.monotonic()
    kill_pids(pids)
    outage, name = outage_after(port, killed_at)

    assert outage < HAPROXY_RECOVERY_BOUND + HAPROXY_RECOVERY_SLACK, f"outage {outage:.2f} s"
    assert name in {"k9-a", "k9-b"}
    served_by(port, {"k9-a", "k9-b"})
    assert worker.haproxy.master_pid() not in (None, *pids)
    assert worker.haproxy_config() == config
    after = wait_until(lambda: (s := worker.submit("STATS")).get("restarts") == 1 and s, 5,
                       "STATS to count the restart")
    assert after["status"] == "ACTIVE" and after["since"] == before["since"]
    assert re.fullmatch(r"HAProxy was not running at \S+; restarted it\.", after["last_error"]), after
    assert UTC_STAMP.search(after["last_error"])
    print(f"HAProxy kill -9 outage: {outage:.3f} s")


def test_a_killed_haproxy_stays_stopped_when_suspended_or_deleted(workers, http_backend):
    """An HAProxy that runs against the desired state (here: started by hand on the kept
    configuration) is stopped by the running worker, and a stopped one is never revived."""
    worker = workers()
    node = http_backend("sleepy")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [node.node()]))))
    saved = worker.root / "saved.cfg"
    shutil.copy(worker.state_dir / "haproxy.cfg", saved)
    passed(worker.submit("SUSPEND"))

    for lifecycle in ("SUSPENDED", "DELETED"):
        if lifecycle == "DELETED":
            passed(worker.submit("DELETE"))
            assert not (worker.state_dir / "haproxy.cfg").exists()
        marks = worker.log_text().count(f"Desired state {lifecycle} but HAProxy is running")
        stray = subprocess.run(
            [HAPROXY, "-W", "-D", "-p", str(worker.state_dir / "haproxy.pid"),
             "-S", f"{worker.state_dir / 'haproxy-master.sock'},mode,600", "-f", str(saved)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert stray.returncode == 0, stray.stderr
        started = time.monotonic()
        wait_until(lambda: worker.haproxy.our_pids() == [] and connection_refused(port),
                   HAPROXY_RECOVERY_BOUND + HAPROXY_RECOVERY_SLACK,
                   f"the worker to stop an HAProxy running while {lifecycle}")
        print(f"{lifecycle}: stray HAProxy stopped after {time.monotonic() - started:.3f} s")
        assert worker.log_text().count(f"Desired state {lifecycle} but HAProxy is running") > marks
        # Two more reconcile rounds: nothing brings it back.
        deadline = time.monotonic() + 2.2
        while time.monotonic() < deadline:
            assert worker.haproxy.our_pids() == [] and connection_refused(port), lifecycle
            time.sleep(0.1)
        stats = worker.submit("STATS")
        assert (stats["hpcs_response"], stats["status"]) == ("FAIL", lifecycle), stats
        assert worker.state()["lifecycle"] == lifecycle and worker.state()["restarts"] == 0


# --------------------------------------------------------------------------- 2. worker killed mid-UPDATE


KILL_DELAYS = (0.0, 0.02, 0.05, 0.1, 0.2, "after reply")


def test_worker_killed_at_points_of_an_update_leaves_old_or_new_never_a_mix(workers, http_backend):
    """SIGKILL of the worker at several delays into an UPDATE (node-only changes, applied
    at runtime, and node + monitor changes, applied by a reload): HAProxy keeps serving,
    the live file is always one of the two whole renderings, and once the worker is back
    gearmand re-runs the unanswered job, so the device ends on the new node set exactly."""
    worker = workers()
    a, b, c = http_backend("mix-a"), http_backend("mix-b"), http_backend("mix-c")
    port = free_port()
    pairs = {
        "runtime": (lb("HTTP", port, [a.node(), b.node()]), lb("HTTP", port, [b.node(), c.node()])),
        "reload": (lb("HTTP", port, [a.node(), b.node()]),
                   lb("HTTP", port, [b.node(), c.node()], monitor=http_monitor())),
    }
    sets = ({"mix-a", "mix-b"}, {"mix-b", "mix-c"})
    outcomes = []
    unanswered: list[tuple[str, Any]] = []  # killed before the reply: re-run by gearmand
    for kind, (old, new) in pairs.items():
        # The two renderings, captured after a clean UPDATE of each.
        passed(worker.submit(update(new)))
        rendered_new = worker.haproxy_config()
        passed(worker.submit(update(old)))
        rendered_old = worker.haproxy_config()
        assert rendered_old != rendered_new
        messages, renderings = (old, new), (rendered_old, rendered_new)
        current = 0  # index of what the device runs now
        with TrafficLoop(url(port)) as loop:
            for delay in KILL_DELAYS:
                target = 1 - current
                message = update(messages[target])
                if delay == "after reply":
                    passed(worker.submit(message))
                    thread, outcome = None, []
                else:
                    thread, outcome = run_in_thread(lambda m=message: worker.submit(m, timeout=30))
                    time.sleep(delay)
                worker.kill()
                if thread is not None and not outcome:
                    unanswered.append((kind, delay))
                assert worker.haproxy_config() in renderings, f"{kind} {delay}: a torn file"
                # Polled: a reload re-executes the master, which rewrites its pidfile.
                wait_until(worker.haproxy.is_running, 2, f"{kind} {delay}: HAProxy alive without the worker")
                worker.start()
                assert worker.haproxy_config() in renderings, f"{kind} {delay}"
                if thread is not None:
                    thread.join(timeout=40)
                    assert outcome, f"{kind} {delay}: no reply after the restart"
                    passed(outcome[0])  # answered before the kill, or re-run after it
                assert worker.haproxy_config() == renderings[target], f"{kind} {delay}"
                served_by(port, sets[target])
                assert worker.state()["lifecycle"] == "ACTIVE"
                assert [node["id"] for node in worker.state()["loadbalancers"][0]["nodes"]] == [
                    node["id"] for node in messages[target]["nodes"]]
                outcomes.append((kind, delay))
                current = target
        assert loop.errors == [], f"{kind}: requests failed while the worker was killed: {loop.errors[:5]}"
        assert set(loop.answered) <= {"mix-a", "mix-b", "mix-c"}
    assert len(outcomes) == 2 * len(KILL_DELAYS)
    assert unanswered, "no kill landed before the reply: the re-run path was not exercised"
    print(f"killed before the reply (then re-run): {unanswered}")


# --------------------------------------------------------------------------- 3. device rebooted


def reboot(worker: FaultWorker) -> list[int]:
    """kill -9 of the worker, every HAProxy process and the log sink; the pids killed."""
    sink_pidfile = worker.state_dir / "logs" / "logsink.pid"
    sink = [int(sink_pidfile.read_text().split()[0])] if sink_pidfile.exists() else []
    assert worker.process is not None
    pids = [worker.process.pid, *worker.haproxy.our_pids(), *sink]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.process.wait(timeout=STOP_TIMEOUT)
    wait_until(lambda: not any(process_alive(pid) for pid in pids), STOP_TIMEOUT, "everything to die")
    return pids


def test_device_reboot_comes_back_in_its_desired_state(workers, http_backend):
    worker = workers()
    first, second = http_backend("boot-a"), http_backend("boot-b")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [first.node(), second.node()]))))
    config, state = worker.files()
    sink_before = worker.logsink.pid()
    assert sink_before is not None

    killed = reboot(worker)
    assert connection_refused(port) and worker.logsink.pid() is None
    worker.start()

    served_by(port, {"boot-a", "boot-b"})
    assert worker.haproxy.master_pid() not in (None, *killed)
    assert worker.logsink.pid() not in (None, *killed)
    assert worker.haproxy_config() == config
    access_log = worker.state_dir / "logs" / "http.log"
    size = access_log.stat().st_size if access_log.exists() else 0
    served_by(port, {"boot-a", "boot-b"}, n=4)
    wait_until(lambda: access_log.exists() and access_log.stat().st_size > size, 5,
               "access logs collected again by the new log sink")
    stats = passed(worker.submit("STATS"))
    assert (stats["status"], stats["restarts"]) == ("ACTIVE", 1)
    assert json.loads(state)["since"] == stats["since"]

    passed(worker.submit("SUSPEND"))
    suspended_state = (worker.state_dir / "state.json").read_text()
    reboot(worker)
    worker.start()
    deadline = time.monotonic() + 2.5  # two reconcile rounds after the start-up check
    while time.monotonic() < deadline:
        assert connection_refused(port) and worker.haproxy.our_pids() == []
        time.sleep(0.1)
    assert (worker.state_dir / "state.json").read_text() == suspended_state
    assert worker.haproxy_config() == config, "the configuration is kept for ENABLE"
    passed(worker.submit("ENABLE"))
    served_by(port, {"boot-a", "boot-b"})


# --------------------------------------------------------------------------- 4. STATS after a repair


def test_stats_reports_status_since_restarts_and_last_error_after_a_repair(workers, http_backend):
    worker = workers()
    node = http_backend("shape")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [node.node()]))))
    fresh = passed(worker.submit("STATS"))
    kill_pids(worker.haproxy.our_pids())
    repaired = wait_until(lambda: (s := worker.submit("STATS")).get("restarts") == 1 and s, 10,
                          "a STATS reply counting one restart")

    for reply in (fresh, repaired):
        assert set(reply) == {"hpcs_action", "hpcs_response", "status", "since", "restarts",
                              "last_error", "nodes"}, reply
        assert reply["hpcs_response"] == "PASS" and reply["status"] == "ACTIVE"
        assert UTC_STAMP.fullmatch(reply["since"]), reply
        assert isinstance(reply["restarts"], int)
        assert reply["nodes"] == [{"id": "shape", "status": "UP", "protocol": "HTTP"}]
    assert (fresh["restarts"], fresh["last_error"]) == (0, None)
    assert repaired["since"] == fresh["since"], "a repair is not a change of lifecycle"
    assert isinstance(repaired["last_error"], str) and repaired["last_error"].endswith(".")
    assert UTC_STAMP.search(repaired["last_error"]), repaired

    # The counters survive the worker and stay on the FAIL reply's side too.
    passed(worker.submit("SUSPEND"))
    suspended = worker.submit("STATS")
    assert (suspended["hpcs_response"], suspended["status"]) == ("FAIL", "SUSPENDED"), suspended
    # Its stats socket refuses: STATS then looks for the master, and says none runs.
    assert suspended["hpcs_error"] == "HAProxy is not running (the load balancer is SUSPENDED).", suspended
    assert worker.state()["restarts"] == 1


# --------------------------------------------------------------------------- 5. ctl


def test_ctl_works_with_the_daemon_running_and_stopped(workers, http_backend):
    worker = workers()
    first, second = http_backend("ctl-a"), http_backend("ctl-b")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [first.node(), second.node()]))))
    passed(worker.submit("STATS"))
    assert worker.submit(update(lb("HTTP", port, [{"id": "x", "address": "999.0.0.1", "port": 1}])))[
        "hpcs_response"] == "FAIL"
    checksum = hashlib.sha256((worker.state_dir / "haproxy.cfg").read_bytes()).hexdigest()[:16]

    for daemon in ("running", "stopped"):
        if daemon == "stopped":
            assert worker.stop() == 0
        master = worker.haproxy.master_pid()
        workers_before = set(worker.haproxy.our_pids()) - {master}
        rows = status_rows(ctl_ok(worker, "status", exit_code=0 if daemon == "running" else 3))
        expected_daemon = f"running, pid {worker.process.pid}" if daemon == "running" else "not running"
        assert rows["worker daemon"] == expected_daemon, rows
        assert rows["desired state"].startswith("ACTIVE since ") and UTC_STAMP.search(rows["desired state"])
        assert rows["actual state"] == "HAProxy running"
        assert re.fullmatch(rf"pid {master}, up \d\d:\d\d:\d\d", rows["haproxy master"]), rows
        assert {int(p) for p in rows["haproxy workers"].split(", ")} == workers_before
        assert rows["config"].startswith(f"sha256 {checksum}"), rows

        with TrafficLoop(url(port)) as loop:
            out = ctl_ok(worker, "restart")
            total = loop.total
            wait_until(lambda: loop.total > total + 5, 10, "traffic after ctl restart")
        assert loop.errors == [], f"ctl restart dropped requests ({daemon}): {loop.errors[:5]}"
        assert set(loop.answered) == {"ctl-a", "ctl-b"}
        assert f"master pid {master}" in out
        assert worker.haproxy.master_pid() == master, "a hitless reload keeps the master"
        assert set(worker.haproxy.our_pids()) - {master} - workers_before, "no new worker generation"

        jobs = journal_states(worker, 10)
        assert [(action, state) for action, state, _ in jobs][-4:] == [
            ("DISCOVER", "COMPLETE"), ("UPDATE", "COMPLETE"), ("STATS", "COMPLETE"), ("INVALID", "FAIL")]
        assert "999.0.0.1" in jobs[-1][2] or "address" in jobs[-1][2].lower(), jobs[-1]
        assert len(journal_states(worker, 2)) == 2

        logs = ctl_ok(worker, "logs", "-n", "50")
        # HAProxy's own messages: the restart's old worker generation says it stopped.
        assert re.search(r"haproxy\[\d+\]: Proxy lb-http stopped \(cumulated conns", logs), logs
        assert "GET /" not in logs, "access lines belong to http.log, not to ctl logs"
        assert len(ctl_ok(worker, "logs", "-n", "3").splitlines()) == 3

    # Stopped daemon and no HAProxy: restart starts it; status says so before and after.
    kill_pids(worker.haproxy.our_pids())
    rows = status_rows(ctl_ok(worker, "status", exit_code=3))
    assert (rows["worker daemon"], rows["actual state"], rows["haproxy master"]) == (
        "not running", "HAProxy not running", "-")
    ctl_ok(worker, "restart")
    served_by(port, {"ctl-a", "ctl-b"})
    worker.start()  # adopts what ctl started
    assert passed(worker.submit("STATS"))["restarts"] == 0


def process_uids(pids: list[int]) -> set[int]:
    """Every uid (real, effective, saved, filesystem) the processes run with."""
    uids: set[int] = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                uids.update(int(uid) for uid in line.split()[1:])
    return uids


def test_ctl_as_root_acts_as_the_user_the_worker_runs_as(workers, http_backend, nobody_python):
    """Root's HAProxy would be one the worker can neither query nor stop."""
    worker = start_as_nobody(workers, nobody_python)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert os.geteuid() == 0 and worker.state_dir.stat().st_uid == nobody
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [http_backend("own-a").node(),
                                                  http_backend("own-b").node()]))))
    master = worker.haproxy.master_pid()
    generation = set(worker.haproxy.our_pids()) - {master}
    assert process_uids(worker.haproxy.our_pids()) == {nobody}

    # The worker running: a reload through the master it started.
    assert f"master pid {master}" in ctl_ok(worker, "restart")
    assert set(worker.haproxy.our_pids()) - {master} - generation, "no new worker generation"
    assert process_uids(worker.haproxy.our_pids()) == {nobody}
    passed(worker.submit("STATS"))

    # The worker stopped and HAProxy gone: ctl starts a new master, as nobody too.
    assert worker.stop() == 0
    kill_pids(worker.haproxy.our_pids())
    ctl_ok(worker, "restart")
    served_by(port, {"own-a", "own-b"})
    assert process_uids(worker.haproxy.our_pids()) == {nobody}
    assert [path for path in worker.state_dir.rglob("*") if path.lstat().st_uid != nobody] == []

    # The worker (nobody) manages what ctl started: it adopts it and can stop it.
    worker.start()
    assert passed(worker.submit("STATS"))["restarts"] == 0
    passed(worker.submit("SUSPEND"))
    assert worker.haproxy.our_pids() == [] and connection_refused(port)


def test_ctl_restart_refuses_while_suspended_or_deleted(workers, http_backend):
    worker = workers()
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [http_backend("kept").node()]))))
    for action, lifecycle in (("SUSPEND", "SUSPENDED"), ("DELETE", "DELETED")):
        passed(worker.submit(action))
        result = run_ctl(worker, "restart")
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr.startswith("libra-worker ctl: Cannot restart: ")
        assert result.stderr.count("\n") == 1
        assert lifecycle in result.stderr or "deleted" in result.stderr, result.stderr
        assert worker.haproxy.our_pids() == [] and connection_refused(port)
        assert worker.state()["lifecycle"] == lifecycle


# --------------------------------------------------------------------------- 6. journal + timeouts


def test_a_hung_update_times_out_is_journaled_and_leaves_the_old_config_serving(workers, http_backend):
    worker, stand_in = workers.with_stand_in()
    a, b, c = http_backend("to-a"), http_backend("to-b"), http_backend("to-c")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [a.node(), b.node()]))))
    worker.set_timeout("update", 0.5)
    old_config, old_state = worker.files()
    master = worker.haproxy.master_pid()

    stand_in.mode("hang")
    with TrafficLoop(url(port)) as loop:
        sent = time.monotonic()
        # More than a node change: only such an UPDATE runs `haproxy -c` before replying.
        reply = worker.submit(update(lb("HTTP", port, [b.node(), c.node()],
                                        algorithm="LEAST_CONNECTIONS")), timeout=20)
        answered_after = time.monotonic() - sent
        stats = worker.submit("STATS", timeout=10)
        discover = worker.submit("DISCOVER", timeout=10)
    assert reply["hpcs_response"] == "FAIL", reply
    assert "timeout" in reply["hpcs_error"] and "0.5 s" in reply["hpcs_error"], reply
    assert answered_after < 30, "the hung `haproxy -c` (sleep 30) was not interrupted"
    assert loop.errors == [] and set(loop.answered) == {"to-a", "to-b"}, (loop.errors[:5], loop.answered)
    assert worker.files() == (old_config, old_state)
    assert worker.haproxy.master_pid() == master
    served_by(port, {"to-a", "to-b"})
    assert passed(stats)["nodes"] == [{"id": "to-a", "status": "UP", "protocol": "HTTP"},
                                      {"id": "to-b", "status": "UP", "protocol": "HTTP"}]
    passed(discover)

    hung = stand_in.check_pids()
    assert len(hung) == 1
    wait_until(lambda: not process_alive(hung[0]), 5, f"the hung check (pid {hung[0]}) to be gone")

    jobs = journal_states(worker)
    action, state, detail = jobs[-3]
    assert (action, state) == ("UPDATE", "TIMEOUT"), jobs
    assert "timeout" in detail, detail
    assert [(x, y) for x, y, _ in jobs[-2:]] == [("STATS", "COMPLETE"), ("DISCOVER", "COMPLETE")]

    stand_in.mode(None)
    worker.set_timeout("update", 30)  # a normal UPDATE, not a race against 0.5 s on a busy box
    passed(worker.submit(update(lb("HTTP", port, [b.node(), c.node()])), timeout=40))
    served_by(port, {"to-b", "to-c"})
    assert journal_states(worker)[-1][:2] == ("UPDATE", "COMPLETE")


def test_node_only_updates_skip_the_check_only_with_the_shipped_template(workers, http_backend):
    """The proof behind an unchecked node-only UPDATE covers the shipped template only
    (test_server_lines.py): with an operator's own template every UPDATE is checked."""
    a, b = http_backend("tpl-a"), http_backend("tpl-b")
    for own_template in (False, True):
        root = workers.new_root()
        stand_in = StandInHAProxy(root / "bin")
        workers.cleanups.append(stand_in.kill_leftovers)
        haproxy = {"binary": str(stand_in.path)}
        if own_template:
            (root / "templates").mkdir()
            shutil.copy(REPO_ROOT / "templates" / "haproxy.cfg.j2", root / "templates")
            haproxy["template_dir"] = str(root / "templates")
        worker = workers(root=root, settings={"haproxy": haproxy})
        port = free_port()
        passed(worker.submit(update(lb("HTTP", port, [a.node()]))))
        stand_in.mode("slow")  # records every `haproxy -c`

        passed(worker.submit(update(lb("HTTP", port, [a.node(), b.node()]))))

        assert len(stand_in.check_pids()) == (1 if own_template else 0), own_template
        assert "UPDATE applied at runtime" in worker.log_text()
        served_by(port, {"tpl-a", "tpl-b"})
        stand_in.mode(None)


def test_a_timed_out_check_leaves_no_process_of_a_wrapper_binary(workers, http_backend):
    worker, stand_in = workers.with_stand_in()
    a, b = http_backend("wrap-a"), http_backend("wrap-b")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [a.node()]))))
    worker.set_timeout("update", 0.5)
    stand_in.mode("hang-child")
    reply = worker.submit(update(lb("HTTP", port, [b.node()], algorithm="LEAST_CONNECTIONS")),
                          timeout=20)
    assert reply["hpcs_response"] == "FAIL" and "timeout" in reply["hpcs_error"], reply
    served_by(port, {"wrap-a"})
    children = stand_in.check_pids("child-pids")
    assert len(children) == 1
    wait_until(lambda: not process_alive(children[0]), 3,
               f"the wrapper's `sleep 30` (pid {children[0]}) to be gone")


def test_a_job_timeout_during_a_reload_retry_ends_the_job_at_once(workers, http_backend):
    """The reload retry loop must not swallow the job's timeout: with the master CLI gone
    (its socket path removed), every reload attempt would wait `command_timeout` (15 s
    here) three times over; the job ends at its 2 s timeout instead, journaled TIMEOUT."""
    worker = workers()
    a, b = http_backend("tmo-a"), http_backend("tmo-b")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [a.node(), b.node()]))))
    worker.set_timeout("update", 2)
    old_config, old_state = worker.files()
    socket_path = worker.state_dir / "haproxy-master.sock"
    hidden = worker.state_dir / "hidden-master.sock"
    socket_path.rename(hidden)
    try:
        sent = time.monotonic()
        reply = worker.submit(update(lb("HTTP", port, [a.node(), b.node()],
                                        algorithm="LEAST_CONNECTIONS")), timeout=60)
        answered_after = time.monotonic() - sent
    finally:
        hidden.rename(socket_path)

    assert reply["hpcs_response"] == "FAIL", reply
    assert "2 s timeout" in reply["hpcs_error"], reply
    # 2 s timeout + a DISCOVER-sized round trip; one command_timeout (15 s) would be a swallow.
    assert answered_after < 10, answered_after
    assert last_job(worker, "UPDATE")[1] == "TIMEOUT"
    assert worker.files() == (old_config, old_state)
    served_by(port, {"tmo-a", "tmo-b"})
    passed(worker.submit("DISCOVER", timeout=10))


@pytest.mark.parametrize("fault", ["vanish", "unexecutable"])
def test_a_reload_that_cannot_succeed_fails_at_once_and_keeps_serving(workers, http_backend, fault):
    """A missing or unexecutable HAProxy binary: HAProxy's master would exit trying to
    re-execute it (measured), so the reload is refused at once, not retried, and the
    running HAProxy keeps serving the previous configuration."""
    worker, stand_in = workers.with_stand_in(ReexecStandIn)
    a, b = http_backend("bin-a"), http_backend("bin-b")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [a.node(), b.node()]))))
    old_config, old_state = worker.files()
    master = worker.haproxy.master_pid()

    stand_in.mode(fault)
    sent = time.monotonic()
    reply = worker.submit(update(lb("HTTP", port, [a.node(), b.node()],
                                    algorithm="LEAST_CONNECTIONS")), timeout=60)
    answered_after = time.monotonic() - sent

    assert reply["hpcs_response"] == "FAIL", reply
    assert "missing or not executable" in reply["hpcs_error"], reply
    assert str(stand_in.path) in reply["hpcs_error"]
    # One command_timeout is 15 s here; three retries of it were the fault.
    assert answered_after < 10, answered_after
    assert last_job(worker, "UPDATE")[1] == "FAIL"
    assert worker.files() == (old_config, old_state)
    assert worker.haproxy.master_pid() == master
    served_by(port, {"bin-a", "bin-b"})


# --------------------------------------------------------------------------- 7. job server loss


def discover_within(worker: Worker, bound: float) -> float:
    """Seconds until the worker answers DISCOVER again; fails after `bound`."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < bound:
        try:
            reply = worker.submit("DISCOVER", timeout=1)
            if reply.get("hpcs_response") == "PASS":
                return time.monotonic() - started
            last = reply
        except client.TransportError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"no DISCOVER answer within {bound:g} s; last: {last}\n{worker.output()}")


def test_gearmand_killed_idle_and_mid_job_and_a_re_run_update_is_harmless(workers, http_backend):
    server_root = workers.new_root()
    server = Gearmand(server_root)
    workers.cleanups.append(server.stop)
    server.start()
    worker, stand_in = workers.with_stand_in(servers=[server.address])
    a, b, c = http_backend("gm-a"), http_backend("gm-b"), http_backend("gm-c")
    port = free_port()
    old = lb("HTTP", port, [a.node(), b.node()])
    # More than a node change: only such an UPDATE runs `haproxy -c` before replying.
    new = lb("HTTP", port, [b.node(), c.node()], algorithm="LEAST_CONNECTIONS")
    passed(worker.submit(update(old)))
    worker.set_timeout("update", 2)

    with TrafficLoop(url(port)) as loop:
        # Idle: kill -9, restart on the same port.
        server.process.kill()
        server.process.wait(timeout=STOP_TIMEOUT)
        time.sleep(0.5)  # the worker notices and enters its reconnect loop
        server.start()
        idle = discover_within(worker, GEARMAN_RECOVERY_BOUND + GEARMAN_RECOVERY_SLACK)

        # Mid-job: the UPDATE's `haproxy -c` hangs until its 2 s timeout; gearmand dies
        # under it, taking the job and the client's connection with it.
        stand_in.mode("hang")
        thread, outcome = run_in_thread(lambda: worker.submit(update(new), timeout=20))
        wait_until(lambda: stand_in.check_pids(), 10, "the UPDATE to reach `haproxy -c`")
        server.process.kill()
        server.process.wait(timeout=STOP_TIMEOUT)
        server.start()
        mid_job = discover_within(worker, GEARMAN_RECOVERY_BOUND + GEARMAN_RECOVERY_SLACK)
        thread.join(timeout=30)
        assert outcome and isinstance(outcome[0], client.TransportError), outcome
        # DISCOVER does not wait for the UPDATE (read-only lane): its timeout comes later.
        wait_until(lambda: not process_alive(stand_in.check_pids()[0]), 5,
                   "the timed-out UPDATE's `haproxy -c` to be killed")
        wait_until(lambda: last_job(worker, "UPDATE")[1] == "TIMEOUT", 5,
                   "the UPDATE to be journaled TIMEOUT")
        served_by(port, {"gm-a", "gm-b"})

        # The worker dies mid-UPDATE instead: gearmand keeps the job and re-runs it when
        # the worker returns; then the same UPDATE once more is harmless.
        thread, outcome = run_in_thread(lambda: worker.submit(update(new), timeout=30))
        wait_until(lambda: len(stand_in.check_pids()) == 2, 10, "the UPDATE to reach `haproxy -c`")
        worker.kill()
        stand_in.kill_leftovers()  # the orphaned check of the killed worker
        stand_in.mode(None)
        worker.start()
        thread.join(timeout=40)
        assert outcome, "the re-run UPDATE was never answered"
        passed(outcome[0])
        rerun_config, rerun_state = worker.files()
        master = worker.haproxy.master_pid()
        passed(worker.submit(update(new)))
        assert worker.files()[0] == rerun_config
        assert json.loads(worker.files()[1])["loadbalancers"] == json.loads(rerun_state)["loadbalancers"]
        assert worker.haproxy.master_pid() == master
        with loop.paused():
            served_by(port, {"gm-b", "gm-c"})

    assert loop.errors == [], f"requests failed while gearmand or the worker died: {loop.errors[:5]}"
    print(f"DISCOVER again after gearmand kill -9: idle {idle:.2f} s, mid-job {mid_job:.2f} s")


# --------------------------------------------------------------------------- 8. unwritable state_dir


def mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tmpfs and a read-only bind mount")
    result = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.fail(f"mount {' '.join(args)} refused ({result.stderr.strip()}); this test needs "
                    "root with CAP_SYS_ADMIN (tmpfs and bind mounts)")


def umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def tmpfs_worker(workers) -> FaultWorker:
    """A worker whose state_dir is a 2 MiB tmpfs of its own."""
    root = workers.new_root()
    state_dir = root / "state"
    state_dir.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m,mode=0750", "tmpfs", str(state_dir))
    # Runs after every worker's cleanup, so nothing holds a file in it any more.
    workers.cleanups.append(lambda: umount(state_dir))
    return workers(root=root)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    with contextlib.suppress(OSError):
        with open(filler, "ab") as handle:  # the last partial page
            while True:
                handle.write(b"\0" * 512)
                handle.flush()
    return filler


def test_read_only_or_full_state_dir_fails_the_update_and_keeps_serving(tmpfs_worker, http_backend):
    worker = tmpfs_worker
    a, b, c = http_backend("rw-a"), http_backend("rw-b"), http_backend("rw-c")
    port = free_port()
    first, second = lb("HTTP", port, [a.node(), b.node()]), lb("HTTP", port, [b.node(), c.node()])
    passed(worker.submit(update(first)))

    def assert_refused(reply: dict[str, Any], problem: str, files: tuple[str, str], nodes: set[str]) -> None:
        assert reply["hpcs_response"] == "FAIL", reply
        assert problem in reply["hpcs_error"], reply
        assert "left unchanged" in reply["hpcs_error"], reply
        assert worker.files() == files
        assert json.loads(files[1])["lifecycle"] == "ACTIVE"
        check = haproxy_check(worker.state_dir / "haproxy.cfg")
        assert check.returncode == 0, check.stderr
        served_by(port, nodes)
        assert [p.name for p in worker.state_dir.iterdir() if p.name.endswith(".tmp")] == []

    # Read-only: a read-only bind mount of the state dir over itself. (root ignores
    # chmod; files the worker and log sink hold open keep writing through the old mount.)
    files = worker.files()
    mount("--bind", str(worker.state_dir), str(worker.state_dir))
    try:
        mount("-o", "remount,bind,ro", str(worker.state_dir))
        with TrafficLoop(url(port)) as loop:
            reply = worker.submit(update(second), timeout=20)
        assert_refused(reply, "Read-only file system", files, {"rw-a", "rw-b"})
        assert str(worker.state_dir) in reply["hpcs_error"], "the sentence names the file"
        assert loop.errors == [] and set(loop.answered) == {"rw-a", "rw-b"}
    finally:
        umount(worker.state_dir)
    passed(worker.submit(update(second)))
    served_by(port, {"rw-b", "rw-c"})

    # Full: the 2 MiB tmpfs filled up by another file.
    files = worker.files()
    filler = fill(worker.state_dir)
    try:
        with TrafficLoop(url(port)) as loop:
            reply = worker.submit(update(first), timeout=20)
        assert_refused(reply, "No space left on device", files, {"rw-b", "rw-c"})
        assert loop.errors == [] and set(loop.answered) == {"rw-b", "rw-c"}
    finally:
        filler.unlink()
    passed(worker.submit(update(first)))
    served_by(port, {"rw-a", "rw-b"})
    assert worker.is_running()


def test_full_state_dir_failure_names_the_file(tmpfs_worker, http_backend):
    worker = tmpfs_worker
    a, b = http_backend("full-a"), http_backend("full-b")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [a.node()]))))
    filler = fill(worker.state_dir)
    try:
        reply = worker.submit(update(lb("HTTP", port, [b.node()])), timeout=20)
    finally:
        filler.unlink()
    assert reply["hpcs_response"] == "FAIL", reply
    assert str(worker.state_dir) in reply["hpcs_error"], reply


# --------------------------------------------------------------------------- 9. SIGTERM / SIGKILL


def test_sigterm_drains_a_slow_update_and_a_second_sigterm_exits_at_once(workers, http_backend, gearmand):
    worker, stand_in = workers.with_stand_in()
    a, b, c = http_backend("drain-a"), http_backend("drain-b"), http_backend("drain-c")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [a.node(), b.node()]))))

    stand_in.mode("slow")  # `haproxy -c` takes 1 s: a known point in the middle of the job
    with TrafficLoop(url(port)) as loop:
        # More than node changes (the algorithm flips): only those run `haproxy -c`.
        thread, outcome = run_in_thread(lambda: worker.submit(update(lb(
            "HTTP", port, [b.node(), c.node()], algorithm="LEAST_CONNECTIONS")), timeout=30))
        wait_until(lambda: stand_in.check_pids(), 10, "the UPDATE to reach `haproxy -c`")
        worker.terminate()
        assert worker.wait() == 0
        thread.join(timeout=10)
        assert outcome and passed(outcome[0]), "the job in hand was not answered"
        with loop.paused():
            served_by(port, {"drain-b", "drain-c"})  # HAProxy keeps serving without the worker

        # Cold: a second SIGTERM ends the worker at once, job unanswered (exit 1).
        worker.start()
        thread, outcome = run_in_thread(lambda: worker.submit(update(lb(
            "HTTP", port, [a.node(), c.node()], algorithm="ROUND_ROBIN")), timeout=30))
        wait_until(lambda: len(stand_in.check_pids()) == 2, 10, "the second UPDATE to reach `haproxy -c`")
        worker.terminate()
        time.sleep(0.1)
        worker.terminate()
        assert worker.wait(timeout=5) == 1
        assert not outcome, "a cold stop must not answer the job"
        with loop.paused():
            served_by(port, {"drain-b", "drain-c"})
        stand_in.kill_leftovers()
        stand_in.mode(None)
        worker.start()  # gearmand re-runs the unanswered job
        thread.join(timeout=30)
        assert outcome and passed(outcome[0])
        served_by(port, {"drain-a", "drain-c"})
    assert loop.errors == [], loop.errors[:5]
    assert gearmand.function_status(worker.function)[:2] == (0, 0)


def test_sigkill_after_a_pass_loses_no_accepted_state(workers, http_backend):
    """After every PASS, kill -9 the worker and start it again: same config, same
    state.json, same lifecycle, same HAProxy (adopted, not restarted)."""
    worker = workers()
    a, b = http_backend("keep-a"), http_backend("keep-b")
    port = free_port()
    steps = [
        (update(lb("HTTP", port, [a.node()])), "ACTIVE", {"keep-a"}),
        (update(lb("HTTP", port, [a.node(), b.node()])), "ACTIVE", {"keep-a", "keep-b"}),
        ({"hpcs_action": "SUSPEND"}, "SUSPENDED", None),
        ({"hpcs_action": "ENABLE"}, "ACTIVE", {"keep-a", "keep-b"}),
        ({"hpcs_action": "DELETE"}, "DELETED", None),
    ]
    for message, lifecycle, nodes in steps:
        passed(worker.submit(message))
        state = (worker.state_dir / "state.json").read_text()
        config_path = worker.state_dir / "haproxy.cfg"
        config = config_path.read_text() if config_path.exists() else None
        master = worker.haproxy.master_pid()

        worker.kill()
        worker.start()

        assert (worker.state_dir / "state.json").read_text() == state, message
        assert json.loads(state)["lifecycle"] == lifecycle
        assert (config_path.read_text() if config_path.exists() else None) == config, message
        assert worker.haproxy.master_pid() == master, message
        if nodes is None:
            assert connection_refused(port)
        else:
            served_by(port, nodes)
        assert worker.submit("STATS").get("status") == lifecycle
