"""The worker as a system service: start-up that tells the truth, privileges, signals, systemd.

The real worker process (daemonized, or --foreground), real gearmand, real HAProxy. Every
start-up failure the operator can meet ends in one line on stderr naming the config key
and an exit status (2 configuration, 3 already running), in both modes. Started as root
(CI runs as root) with `user = nobody`, the worker prepares its directories, drops its
privileges and serves. systemd's notify protocol is tested against a real datagram socket
the test binds, as systemd would; the watchdog fault is a real hang (a stand-in HAProxy
whose start never returns), not a mock.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from libra_worker.drivers.haproxy.process import process_alive
from tests.integration.support import (
    AS_NOBODY,
    REPO_ROOT,
    STOP_TIMEOUT,
    free_port,
    lb,
    traffic,
    update,
    wait_until,
)
from tests.integration.test_faults import FaultWorker, FaultWorkers, StandInHAProxy, kill_pids, passed, url

NOBODY = pwd.getpwnam("nobody")
CLI_TIMEOUT = 60


class ServiceWorker(FaultWorker):
    """A `FaultWorker` that can also be started as a daemon, as an operator would."""

    def run_cli(self, *arguments: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, self.python, "-m", "libra_worker.cli", "--config", str(self.config_path),
             *arguments],
            capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=self.cwd,
            env=self.environment(), stdin=subprocess.DEVNULL)

    @property
    def pid_file(self) -> Path:
        configured = self.settings.get("worker", {}).get("pid_file")
        return Path(configured) if configured else self.state_dir / "worker.pid"

    def daemon_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if process_alive(pid) else None

    def stop_daemon(self) -> None:
        pid = self.daemon_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not process_alive(pid), STOP_TIMEOUT, f"the daemon {pid} to exit")

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_daemon()
        super().cleanup()


class ServiceWorkers(FaultWorkers):
    worker_class = ServiceWorker

    def make(self, **settings: dict[str, Any]) -> ServiceWorker:
        """An unstarted worker on a root that user nobody may enter (mkdtemp makes 0700)."""
        root = self.new_root()
        root.chmod(0o755)
        worker = self(start=False, root=root, settings=settings)
        assert isinstance(worker, ServiceWorker)
        return worker


@pytest.fixture
def service_workers(gearmand) -> Iterator[ServiceWorkers]:
    factory = ServiceWorkers([gearmand.address])
    try:
        yield factory
    finally:
        factory.cleanup()


def start_in(mode: str, worker: ServiceWorker) -> subprocess.CompletedProcess[str]:
    return worker.run_cli() if mode == "daemon" else worker.run_cli("--foreground")


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """Exit status `code`, and exactly one line on stderr naming each fragment."""
    line = result.stderr.strip()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(line.splitlines()) == 1 and line.startswith("libra-worker: "), result.stderr
    assert "Traceback" not in result.stderr and "Error:" not in line, result.stderr
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def owner(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_uid, status.st_gid


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective
    raise AssertionError(f"no Uid line for {pid}")


MODES = ["daemon", "foreground"]


# --------------------------------------------------------------------------- start-up


def test_daemon_returns_once_serving_survives_sighup_and_stops_on_sigterm(service_workers):
    worker = service_workers.make(worker={"log_file": None})
    result = worker.run_cli()
    assert (result.returncode, result.stderr) == (0, "")
    pid = worker.daemon_pid()
    assert pid is not None, "exit 0 but no live pid in the pidfile"
    # No polling: when the command has returned, the worker answers.
    assert passed(worker.submit("DISCOVER", timeout=10))["version"]

    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: "SIGHUP: log files re-opened" in (worker.state_dir / "worker.log").read_text(),
               10, "the daemon to log the SIGHUP in state_dir/worker.log")
    assert process_alive(pid) and passed(worker.submit("DISCOVER", timeout=10))

    worker.stop_daemon()
    assert not worker.pid_file.exists()
    log = (worker.state_dir / "worker.log").read_text()
    assert "libra-worker stopped; HAProxy keeps serving" in log
    assert log.split(" ", 1)[0].endswith("Z"), log[:80]  # UTC timestamps, zone shown


@pytest.mark.parametrize("mode", MODES)
def test_an_unknown_log_level_is_one_line(service_workers, mode):
    worker = service_workers.make(worker={"log_level": "VERBOSE"})
    assert_refused(start_in(mode, worker), 2, "[worker] log_level", "VERBOSE")


@pytest.mark.parametrize("mode", MODES)
def test_a_logging_config_that_logs_to_a_missing_directory_is_one_line(service_workers, mode):
    worker = service_workers.make()
    missing = worker.root / "var-log-libra-worker" / "worker.log"
    logging_config = worker.root / "logging.conf"
    shipped = (REPO_ROOT / "etc" / "logging.conf").read_text()
    logging_config.write_text(shipped.replace("/var/log/libra-worker/worker.log", str(missing)))
    worker.settings["worker"] = {"logging_config": str(logging_config)}
    worker.write_config()
    assert_refused(start_in(mode, worker), 2, "[worker] logging_config", str(missing),
                   "No such file or directory")
    assert worker.daemon_pid() is None


def test_pid_file_and_log_file_in_missing_directories_are_created(service_workers):
    worker = service_workers.make()
    pid_file = worker.root / "run" / "libra-worker" / "worker.pid"
    log_file = worker.root / "log" / "libra-worker" / "worker.log"
    worker.settings["worker"] = {"pid_file": str(pid_file), "log_file": str(log_file)}
    worker.write_config()
    result = worker.run_cli()
    assert (result.returncode, result.stderr) == (0, "")
    assert worker.daemon_pid() == int(pid_file.read_text())
    assert passed(worker.submit("DISCOVER", timeout=10))
    assert "Ready: serving function" in log_file.read_text()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["pid_file", "log_file", "state_dir"])
def test_a_file_whose_directory_cannot_exist_is_one_line(service_workers, mode, key):
    worker = service_workers.make()
    regular_file = worker.root / "a-file"
    regular_file.write_text("not a directory\n")
    worker.settings["worker"] = {key: str(regular_file / "sub" / "x")}
    worker.write_config()
    assert_refused(start_in(mode, worker), 2, f"[worker] {key}", str(regular_file))


@pytest.mark.parametrize("mode", MODES)
def test_a_state_dir_the_service_user_cannot_write_is_one_line(service_workers, mode):
    if os.geteuid() != 0:
        pytest.skip("needs root: starts the worker with user = nobody")
    worker = service_workers.make(worker={"user": "nobody"})
    worker.state_dir.mkdir(mode=0o755)  # root's, existing: not handed over
    assert_refused(start_in(mode, worker), 2, "[worker] state_dir", str(worker.state_dir),
                   "user nobody", "Permission denied")


def test_a_second_instance_exits_3_naming_the_running_one(service_workers):
    worker = service_workers.make()
    assert worker.run_cli().returncode == 0
    pid = worker.daemon_pid()
    for mode in MODES:
        assert_refused(start_in(mode, worker), 3, "[worker] pid_file", f"pid {pid}")
    assert worker.daemon_pid() == pid and passed(worker.submit("DISCOVER", timeout=10))


def test_a_pidfile_left_by_a_killed_worker_does_not_block_the_next(service_workers):
    worker = service_workers.make()
    assert worker.run_cli().returncode == 0
    pid = worker.daemon_pid()
    kill_pids([pid])
    assert worker.pid_file.exists()
    assert worker.run_cli().returncode == 0
    assert worker.daemon_pid() not in (None, pid)


@pytest.mark.parametrize("mode", MODES)
def test_no_haproxy_binary_is_one_line(service_workers, mode):
    worker = service_workers.make(haproxy={"binary": "/nonexistent/haproxy"})
    assert_refused(start_in(mode, worker), 2, "[haproxy] binary", "/nonexistent/haproxy")


@pytest.mark.parametrize("mode", MODES)
def test_an_unknown_user_is_one_line(service_workers, mode):
    worker = service_workers.make(worker={"user": "no-such-user-lw"})
    line = assert_refused(start_in(mode, worker), 2, "[worker] user", "no-such-user-lw")
    assert "KeyError" not in line


def test_a_user_only_root_could_switch_to_is_refused_when_not_root(service_workers, nobody_python):
    worker = service_workers.make(worker={"user": "daemon"})
    worker.python = nobody_python
    result = worker.run_cli("--foreground", prefix=AS_NOBODY)
    assert_refused(result, 2, "[worker] user", "daemon", "only root can switch")
    assert not worker.state_dir.exists()


@pytest.mark.parametrize("mode", MODES)
def test_root_prepares_a_new_state_dir_for_user_nobody_drops_privileges_and_serves(
        service_workers, http_backend, nobody_python, mode):
    worker = service_workers.make(worker={"user": "nobody"})
    # Dropped to nobody, the worker runs Python again (the log sink): one nobody may run.
    worker.python = nobody_python
    # Started from a directory nobody cannot enter (root's home), as an operator may.
    worker.cwd = worker.root / "operators-home"
    worker.cwd.mkdir(mode=0o700)
    log_file = worker.root / "log" / "worker.log"
    worker.settings["worker"]["log_file"] = str(log_file)
    worker.write_config()
    if mode == "daemon":
        result = worker.run_cli()
        assert (result.returncode, result.stderr) == (0, "")
        pid = worker.daemon_pid()
    else:
        worker.start()
        pid = worker.process.pid
        wait_until(worker.pid_file.exists, 10, "the pidfile")
    assert passed(worker.submit("DISCOVER", timeout=10))
    assert process_uid(pid) == NOBODY.pw_uid

    nobody = (NOBODY.pw_uid, NOBODY.pw_gid)
    assert owner(worker.state_dir) == nobody and worker.state_dir.stat().st_mode & 0o777 == 0o750
    assert owner(worker.pid_file) == nobody and owner(log_file) == nobody
    assert owner(log_file.parent) == nobody

    # The dropped worker really works: HAProxy and the log sink start as nobody too.
    node = http_backend("as-nobody")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [node.node()]))))
    assert traffic(url(port), 3) == ({"as-nobody": 3}, 0)
    assert process_uid(worker.haproxy.master_pid()) == NOBODY.pw_uid
    assert process_uid(worker.logsink.pid()) == NOBODY.pw_uid
    assert owner(worker.state_dir / "haproxy.cfg") == nobody

    if mode == "daemon":
        worker.stop_daemon()
    else:
        assert worker.stop() == 0
    assert not worker.pid_file.exists()


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_reopens_a_rotated_log_file_and_never_kills(service_workers):
    worker = service_workers.make()
    worker.start()
    rotated = worker.log_file.with_name("worker.log.1")
    worker.log_file.rename(rotated)
    worker.process.send_signal(signal.SIGHUP)
    wait_until(lambda: worker.log_file.exists() and "SIGHUP" in worker.log_text(), 10,
               "a new log file after SIGHUP")
    assert worker.is_running() and passed(worker.submit("DISCOVER", timeout=10))
    worker.submit("STATS", timeout=10)  # FAIL (no LB): a line at INFO, as no passed ping has
    wait_until(lambda: "STATS answered FAIL" in worker.log_text(), 10,
               "the job line in the new file")
    assert "Ready: serving function" in rotated.read_text()
    assert "Ready: serving function" not in worker.log_text()
    assert worker.stop() == 0


def test_sighup_rereads_the_logging_config(service_workers):
    worker = service_workers.make()
    first, second = worker.root / "first.log", worker.root / "second.log"
    logging_config = worker.root / "logging.conf"
    shipped = (REPO_ROOT / "etc" / "logging.conf").read_text()
    logging_config.write_text(shipped.replace("/var/log/libra-worker/worker.log", str(first)))
    worker.settings["worker"] = {"logging_config": str(logging_config), "log_file": None}
    worker.write_config()
    worker.start()
    assert "Ready: serving function" in first.read_text()

    logging_config.write_text(shipped.replace("/var/log/libra-worker/worker.log", str(second)))
    before = first.read_text()
    worker.process.send_signal(signal.SIGHUP)
    wait_until(lambda: second.exists() and "SIGHUP" in second.read_text(), 10, "second.log")
    worker.submit("STATS", timeout=10)  # FAIL (no LB): a line at INFO, as no passed ping has
    wait_until(lambda: "STATS answered FAIL" in second.read_text(), 10, "the job line in second.log")
    assert first.read_text() == before
    assert worker.stop() == 0


def test_a_broken_logging_config_on_sighup_falls_back_and_says_why(service_workers):
    worker = service_workers.make()
    logging_config = worker.root / "logging.conf"
    shipped = (REPO_ROOT / "etc" / "logging.conf").read_text()
    logging_config.write_text(shipped.replace("/var/log/libra-worker/worker.log", str(worker.root / "a.log")))
    worker.settings["worker"] = {"logging_config": str(logging_config)}  # log_file stays set
    worker.write_config()
    worker.start()
    logging_config.write_text("[loggers]\nkeys = root\n")
    worker.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "is not a usable logging configuration" in worker.log_text(), 10,
               "the fallback to log_file saying why")
    assert "SIGHUP: [worker] logging_config" in worker.log_text()
    assert worker.is_running() and passed(worker.submit("DISCOVER", timeout=10))
    assert worker.stop() == 0


# --------------------------------------------------------------------------- systemd


class NotifySocket:
    """What systemd listens on: a datagram socket; every message received, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str, since: float = 0.0) -> list[str]:
        return [line for at, line in list(self.messages) if line.startswith(prefix) and at >= since]

    def pings(self, since: float, until: float | None = None) -> list[float]:
        return [at for at, line in list(self.messages)
                if line == "WATCHDOG=1" and at >= since and (until is None or at <= until)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify_socket(service_workers) -> Iterator[NotifySocket]:
    listener = NotifySocket(service_workers.new_root() / "notify")
    try:
        yield listener
    finally:
        listener.close()


WATCHDOG_USEC = "1000000"  # 1 s: the worker pings every 0.5 s


def test_notify_ready_status_watchdog_and_stopping(service_workers, notify_socket, http_backend):
    worker = service_workers.make()
    worker.env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": WATCHDOG_USEC}
    worker.spawn()
    wait_until(lambda: notify_socket.lines("READY=1"), 20, "READY=1")
    # READY means serving: the first DISCOVER is answered, no retrying.
    assert passed(worker.submit("DISCOVER", timeout=10))
    status = notify_socket.lines("STATUS=")
    assert any(f"serving function {worker.function!r}" in line and "LB NEW" in line for line in status), status

    node = http_backend("notified")
    passed(worker.submit(update(lb("HTTP", free_port(), [node.node()]))))
    wait_until(lambda: any("LB ACTIVE" in line for line in notify_socket.lines("STATUS=")), 10,
               "STATUS saying LB ACTIVE")
    started = time.monotonic()
    wait_until(lambda: len(notify_socket.pings(started)) >= 4, 10, "four watchdog pings")
    for pid in worker.haproxy.our_pids() + [worker.logsink.pid()]:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(item.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for item in environment), pid

    worker.terminate()
    assert worker.wait() == 0
    assert notify_socket.lines("STOPPING=1")


def test_watchdog_pings_through_a_job_within_its_timeout_and_stop_while_the_reconciler_hangs(
        service_workers, notify_socket, http_backend):
    stand_in = StandInHAProxy(service_workers.new_root())
    service_workers.cleanups.append(stand_in.kill_leftovers)
    # Rounds 0.2 s apart: the reconciler counts as hung 1.2 s after its last round.
    worker = service_workers.make(haproxy={"binary": str(stand_in.path)}, timeouts={"update": "4"},
                                  worker={"reconcile_interval": "0.2"})
    worker.env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": WATCHDOG_USEC}
    worker.start()
    node = http_backend("watched")
    port = free_port()
    passed(worker.submit(update(lb("HTTP", port, [node.node()]))))

    # A job that hangs (`haproxy -c` never returns) but is still within its 4 s timeout: a
    # full change (node-only ones are applied at runtime, with no `haproxy -c`).
    stand_in.mode("hang")
    started = time.monotonic()
    reply = worker.submit(update(lb("HTTP", port, [node.node()], algorithm="LEAST_CONNECTIONS")),
                          timeout=20)
    finished = time.monotonic()
    assert reply["hpcs_response"] == "FAIL" and "timeout" in reply["hpcs_error"], reply
    pings = notify_socket.pings(started, finished)
    assert finished - started >= 4 and len(pings) >= 6, (finished - started, pings)

    # The reconciler hangs: HAProxy died and its restart never returns (command_timeout 15 s).
    stand_in.mode("hang-start")
    checks = len(stand_in.check_pids())
    worker.kill_haproxy()
    wait_until(lambda: len(stand_in.check_pids()) > checks, 10, "the reconciler's hung start")
    hung_at = time.monotonic()
    time.sleep(4)
    late_pings = notify_socket.pings(hung_at + 2)  # 1.2 s limit, plus a 0.5 s tick of slack
    assert late_pings == [], f"pinged {len(late_pings)} times while the reconciler hung"
    assert any("the reconciler has made no progress" in line
               for line in notify_socket.lines("STATUS=", hung_at)), notify_socket.lines("STATUS=")
    assert "Not pinging systemd's watchdog: the reconciler" in worker.log_text()

    # The hang ends (the hung start is killed): the next rounds repair, the pings resume.
    stand_in.mode(None)
    stand_in.kill_leftovers()
    resumed = time.monotonic()
    wait_until(lambda: len(notify_socket.pings(resumed)) >= 2, 10, "the pings to resume")
    wait_until(lambda: traffic(url(port), 2) == ({"watched": 2}, 0), 10, "HAProxy serving again")
    assert worker.stop() == 0


def test_logs_go_to_journald_in_its_form_when_systemd_connects_stderr(service_workers):
    worker = service_workers.make(worker={"log_file": None})
    worker.output_file.touch()
    status = worker.output_file.stat()
    worker.env = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
    worker.start()
    assert worker.stop() == 0
    lines = worker.output_file.read_text().splitlines()
    assert "<6>libra_worker: libra-worker stopped; HAProxy keeps serving" in lines, lines
    assert all(line.startswith(("<6>", "<4>", "<3>")) for line in lines), lines


def test_foreground_logs_to_stderr_with_utc_timestamps_without_journald(service_workers):
    worker = service_workers.make(worker={"log_file": None})
    worker.env = {"JOURNAL_STREAM": "0:0"}  # someone else's journal stream: not ours
    worker.start()
    assert worker.stop() == 0
    last = worker.output_file.read_text().splitlines()[-1]
    stamp, level, rest = last.split(" ", 2)
    assert stamp.endswith("Z") and time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"), last
    assert (level, rest) == ("INFO", "libra_worker: libra-worker stopped; HAProxy keeps serving")


def test_a_job_server_that_is_down_is_no_reason_for_the_watchdog_to_restart(service_workers, notify_socket):
    """Restarting would not bring the job server back: the loop retries, and pings."""
    worker = service_workers.make()
    worker.servers = [f"127.0.0.1:{free_port()}"]  # nothing listens there
    worker.write_config()
    worker.env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "3000000"}
    worker.spawn()
    wait_until(lambda: notify_socket.lines("READY=1"), 20, "READY=1")
    started = time.monotonic()
    time.sleep(7)  # two watchdog timeouts (3 s) and then some
    pings = [started, *notify_socket.pings(started), time.monotonic()]
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert len(pings) >= 5 and max(gaps) < 3, notify_socket.messages
    assert f"Job server {worker.servers[0]} unreachable" in worker.log_text()
    worker.terminate()
    assert worker.wait() == 0
