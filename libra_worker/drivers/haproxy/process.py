"""Process control for one HAProxy in master-worker mode, owned through its pidfile.

HAProxy daemonizes itself (`-W -D`), so it outlives the worker: a restarted worker adopts
it by its pidfile instead of restarting it. Reloads go through the master CLI; the master
re-executes, starts new workers on the new file and lets the old ones finish their
connections, so no request is dropped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from libra_worker import budget
from libra_worker.drivers.haproxy.sockets import is_permanent, send_command, send_command_retrying
from libra_worker.errors import ActionTimeout, ConfigCheckFailed, ReloadFailed

LOG = logging.getLogger(__name__)
# Pauses between looks at a master that may be re-executing (see is_running_beside_reload).
_RELOAD_GLITCH_PAUSES = (0.01, 0.05)

# Where `haproxy -c` reads a configuration it is given on a pipe (ConfigChecker).
_STDIN = "/dev/stdin"
_POLL_INTERVAL = 0.002  # a reload settles in ~20 ms; polling every 10 ms added 5 ms on average
# `show proc` lines: "<pid> master <reloads> [failed: <n>] ..." and "<pid> worker <reloads> ..."
_MASTER_LINE = re.compile(r"^(\d+)\s+master\s+\d+\s+\[failed:\s*(\d+)\]", re.MULTILINE)


class ReloadUnsettled(Exception):
    """One reload attempt did not show a new worker in time; another attempt may."""


def find_binary(name: str = "haproxy") -> str:
    """HAProxy lives in sbin, which an unprivileged user's PATH often lacks."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    found = shutil.which(name, path=search)
    if found is None:
        raise ReloadFailed(f"The HAProxy binary {name!r} was not found.")
    return found


@dataclass(frozen=True)
class ProcessTable:
    """What the master CLI's `show proc` says about the master and its current worker."""

    master_pid: int
    failed_reloads: int
    worker_pids: tuple[int, ...]

    @classmethod
    def parse(cls, answer: str) -> "ProcessTable":
        master = _MASTER_LINE.search(answer)
        if master is None:
            raise ReloadFailed(f"Unexpected answer from HAProxy's master: {answer[:200]!r}.")
        current = answer.split("# workers", 1)[-1].split("#", 1)[0]
        workers = tuple(
            int(line.split()[0]) for line in current.splitlines() if " worker " in f" {line} "
        )
        return cls(int(master.group(1)), int(master.group(2)), workers)


def process_alive(pid: int) -> bool:
    """True for a live process; a zombie is dead (init may be slow to reap our master).

    A killed multi-threaded process (HAProxy's workers run a thread per CPU) shows its
    leader as a zombie while its other threads are still exiting, and they still hold
    its sockets: it is dead only once every thread is.
    """
    if _task_state(f"/proc/{pid}/stat") not in (None, "Z"):
        return True
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_task_state(f"/proc/{pid}/task/{tid}/stat") not in (None, "Z")
               for tid in threads if tid != str(pid))


def _task_state(stat_path: str) -> str | None:
    """The state letter of a process or thread, None if it is gone."""
    fields = _stat_fields(stat_path)
    return None if fields is None else fields[0].decode("ascii")


def _live_since(pid: int) -> int | None:
    """When a process that is neither gone nor a zombie started (clock ticks since boot);
    with its pid, it names the process: a reused pid starts later."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return None if fields is None or fields[0] == b"Z" else int(fields[19])


def _stat_fields(stat_path: str) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None if gone."""
    stat = _read_small(stat_path)
    return None if stat is None else stat.rsplit(b")", 1)[-1].split()


def process_cmdline(pid: int) -> list[str]:
    cmdline = _read_small(f"/proc/{pid}/cmdline")
    return [] if cmdline is None else cmdline.decode("utf-8", "replace").split("\0")


def _read_small(path: str) -> bytes | None:
    """A small file's bytes, None if it cannot be read. Every STATS looks at three such
    files (pid file, cmdline, stat): plain system calls take a third of the time of
    pathlib's buffered reads."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(descriptor, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return b"".join(chunks)


@dataclass
class HAProxyProcess:
    binary: str
    config_file: Path
    pid_file: Path
    master_socket: Path
    command_timeout: float = 30.0
    stop_grace: float = 5.0
    reload_attempts: int = 3
    reload_retry_wait: float = 1.0
    # (pid, start time) of the last master `master_pid` proved ours by its command line.
    _proven_master: tuple[int, int] | None = field(default=None, init=False, repr=False,
                                                    compare=False)
    # The `haproxy -c` started ahead for the next check (`stand_by`), and the identity of
    # the binary file it was started from.
    _standby: tuple[subprocess.Popen[str], tuple[int, ...] | None] | None = field(
        default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ queries

    def our_pids(self) -> list[int]:
        """Every live HAProxy process started with our pidfile: the master and its workers.

        Matching on the pidfile argument, not the name, leaves any other HAProxy alone.
        """
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_ours(int(entry.name)):
                pids.append(int(entry.name))
        return sorted(pids)

    def _is_ours(self, pid: int) -> bool:
        arguments = process_cmdline(pid)
        return (
            any("haproxy" in os.path.basename(arg) for arg in arguments[:1])
            and str(self.pid_file) in arguments
            and process_alive(pid)
        )

    def master_pid(self) -> int | None:
        try:
            pid = int((_read_small(str(self.pid_file)) or b"").split()[0])
        except (ValueError, IndexError):
            return None
        # Every STATS asks: a master already proven ours is known by its pid and start
        # time, one file read instead of three.
        started = _live_since(pid)
        if started is not None and self._proven_master == (pid, started):
            return pid
        if not self._is_ours(pid):
            return None
        self._proven_master = (pid, started) if started is not None else None
        return pid

    def is_running(self) -> bool:
        return self.master_pid() is not None

    def is_running_beside_reload(self) -> bool:
        """`is_running` for a read-only job, which may run while a reload happens: the
        master re-executes itself and rewrites its pid file, and for a few milliseconds
        neither says it runs. Looked at again before saying it does not."""
        for pause in _RELOAD_GLITCH_PAUSES:
            if self.is_running():
                return True
            budget.sleep(pause)  # on the Gearman loop, a bounded wait (libra_worker.lanes)
        return self.is_running()

    def version(self) -> str | None:
        """HAProxy's version (`haproxy -v`), or None if the binary could not say."""
        try:
            result = self._run([self.binary, "-v"], "haproxy -v")
        except (OSError, ActionTimeout):
            return None
        match = re.search(r"version (\S+)", result.stdout)
        return match.group(1) if match else None

    def process_table(self) -> ProcessTable:
        if not self.is_running_beside_reload():
            # Killed, not re-executing: its socket refuses connections, no retry can cure
            # that, and the device lock held meanwhile keeps the reconciler from starting
            # HAProxy again (the soak saw a 120 s outage from a kill during an UPDATE).
            raise ReloadFailed("HAProxy's master process is not running.")
        deadline = time.monotonic() + self.command_timeout
        return ProcessTable.parse(self._ask_master("show proc", deadline, self.master_pid()))

    def _ask_master(self, command: str, deadline: float, master: int | None) -> str:
        """A master CLI command, retried while the master re-executes, not once it is gone.

        Liveness is the pid's, not the pidfile's: a re-executing master rewrites its pidfile.
        """
        try:
            return send_command_retrying(
                self.master_socket, command, deadline,
                alive=lambda: master is None or process_alive(master),
            )
        except OSError:
            if master is not None and not process_alive(master):
                raise ReloadFailed(f"HAProxy's master process ({master}) has exited.") from None
            raise

    # ------------------------------------------------------------------ actions

    def check(self, config_file: Path) -> None:
        """Prove a configuration file with `haproxy -c`; HAProxy's own words on failure."""
        with self.checker(config_file) as checker:
            checker.check(config_file.read_text("utf-8"))

    @contextlib.contextmanager
    def checker(self, config_file: Path) -> Iterator["ConfigChecker"]:
        """A `haproxy -c` for a text to come (see ConfigChecker): the one `stand_by`
        started, if it still waits and the binary on disk is still the one it runs, else
        one started now. Stopped when the block ends if it is still running.
        `config_file` is where that text is written, and what HAProxy's words name."""
        process = self._standing_by() or self._spawn_checker()
        try:
            yield ConfigChecker(self, process, config_file)
        finally:
            if process.returncode is None:
                _kill_group(process)

    def stand_by(self) -> None:
        """Start the `haproxy -c` the next `checker` takes, unless one waits already: its
        start-up then costs the next check nothing. It waits on an open pipe, and ends
        (on an empty configuration) if the worker ends without using it."""
        if self._standby is not None:
            return
        try:
            self._standby = (self._spawn_checker(), _file_identity(self.binary))
        except OSError as exc:  # the next check starts its own, and says what is wrong
            LOG.warning("Could not start haproxy -c ahead of the next check: %s", exc)

    def _standing_by(self) -> subprocess.Popen[str] | None:
        if self._standby is None:
            return None
        (process, binary), self._standby = self._standby, None
        if process.poll() is None and binary is not None and binary == _file_identity(self.binary):
            return process
        _kill_group(process)  # it died, or HAProxy was upgraded since: a check by the old one
        return None

    def _spawn_checker(self) -> subprocess.Popen[str]:
        return self._spawn([self.binary, "-c", "-f", _STDIN], stdin=subprocess.PIPE)

    def start(self) -> None:
        """Start the master; it returns once the workers are listening, or fails."""
        self._kill_strays()
        command = [
            self.binary, "-W", "-D",
            "-p", str(self.pid_file),
            "-S", f"{self.master_socket},mode,600",
            "-f", str(self.config_file),
        ]
        self.pid_file.unlink(missing_ok=True)
        result = self._run(command, "HAProxy start")
        if result.returncode != 0:
            output = result.stderr + result.stdout
            raise ReloadFailed("HAProxy failed to start: " + _first_alert(output),
                               detail="HAProxy failed to start: " + _alerts(output))
        # The daemonized master writes its pidfile a moment after the command returns, and
        # handles signals (a SUSPEND's soft stop) only once its CLI lists a worker.
        self._wait_for_worker("HAProxy started but")
        LOG.info("HAProxy started, master pid %s", self.master_pid())

    def wait_for_master(self) -> None:
        """For an HAProxy that its own unit (re)starts: wait until it serves, or fail."""
        self._wait_for_worker("HAProxy is not running (libra-haproxy.service restarts it), and")

    def _wait_for_worker(self, failure: str) -> None:
        """Until the master runs and its CLI lists a worker, within `command_timeout`."""
        deadline = time.monotonic() + self.command_timeout
        while not self.is_running():
            if time.monotonic() >= deadline:
                raise ReloadFailed(f"{failure} its master process is not running "
                                   f"after {self.command_timeout:g} s.")
            time.sleep(_POLL_INTERVAL)
        try:
            while not self.process_table().worker_pids:
                if time.monotonic() >= deadline:
                    raise ReloadFailed(f"{failure} its master lists no worker.")
                time.sleep(_POLL_INTERVAL)
        except OSError as exc:
            raise ReloadFailed(f"{failure} its master does not answer: {exc}.") from None

    def reload(self) -> None:
        """Reload through the master, and prove that a new worker took over.

        The master CLI's `reload` answers nothing in HAProxy 2.6, so success is read from
        `show proc`: a new current worker means success; the same worker with the failed
        count raised means the new configuration did not start (the old worker serves on).
        """
        # The master re-executes its binary to reload; measured with HAProxy 2.6, a master
        # that cannot exits, workers and all. Better to refuse than to stop the LB.
        if not os.access(self.binary, os.X_OK):
            raise ReloadFailed(
                f"The HAProxy binary {self.binary} is missing or not executable, so HAProxy's "
                "master could not re-execute it; the reload was not attempted."
            )
        for attempt in range(1, self.reload_attempts + 1):
            try:
                return self._reload_once()
            except OSError as exc:
                if is_permanent(exc):
                    raise ReloadFailed(
                        f"HAProxy's master CLI {self.master_socket} cannot be used: "
                        f"{exc.strerror}; retrying cannot help."
                    ) from None
                error: Exception = exc
            except ReloadUnsettled as exc:
                error = exc
            # The master CLI did not answer or the reload did not settle: transient.
            # HAProxy's own verdict on the configuration (ReloadFailed) is not retried, and
            # the job's own timeout (ActionTimeout) ends the job: it is never caught here.
            if attempt == self.reload_attempts:
                raise ReloadFailed(
                    f"HAProxy's master did not complete the reload after {attempt} "
                    f"attempts: {error}"
                ) from None
            LOG.warning("Reload attempt %d failed (%s); retrying in %g s",
                        attempt, error, self.reload_retry_wait)
            time.sleep(self.reload_retry_wait)

    def request_reload(self, timeout: float = 1.0) -> None:
        """Ask the master for a reload once, without waiting for it: for a job whose time
        is up, which must not spend more of it."""
        send_command(self.master_socket, "reload", timeout)

    def _reload_once(self) -> None:
        before = self.process_table()
        deadline = time.monotonic() + self.command_timeout
        self._ask_master("reload", deadline, before.master_pid)
        while time.monotonic() < deadline:
            after = ProcessTable.parse(self._ask_master("show proc", deadline, before.master_pid))
            if after.worker_pids and set(after.worker_pids).isdisjoint(before.worker_pids):
                LOG.info("HAProxy reloaded, worker pids %s", list(after.worker_pids))
                return
            if after.failed_reloads > before.failed_reloads:
                raise ReloadFailed(
                    "HAProxy could not load the new configuration (for example a port is "
                    "already in use); the previous configuration is still serving."
                )
            time.sleep(_POLL_INTERVAL)
        raise ReloadUnsettled(f"HAProxy did not finish reloading within {self.command_timeout:g} s.")

    def stop(self) -> None:
        """Soft stop (listeners close at once, connections finish), then force."""
        master = self.master_pid()
        if master is not None:
            _signal(master, signal.SIGUSR1)
            if not _wait_until_gone([master], self.stop_grace):
                LOG.warning("HAProxy did not stop within %g s; terminating it", self.stop_grace)
                _signal(master, signal.SIGTERM)
                _wait_until_gone([master], self.stop_grace)
        self._kill_strays()
        for leftover in (self.pid_file, self.master_socket):
            leftover.unlink(missing_ok=True)

    def _kill_strays(self) -> None:
        """Workers orphaned by a killed master still hold the ports: end them by pid."""
        strays = self.our_pids()
        for pid in strays:
            LOG.warning("Killing leftover HAProxy process %d", pid)
            _signal(pid, signal.SIGKILL)
        if strays and not _wait_until_gone(strays, self.stop_grace):
            raise ReloadFailed(f"HAProxy processes {strays} would not exit.")

    def _run(self, command: list[str], what: str) -> subprocess.CompletedProcess[str]:
        return self._finish(self._spawn(command), what)

    def _spawn(self, command: list[str], stdin: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
        return subprocess.Popen(
            command,
            # Measured: a master started with the /dev/null that python-daemon leaves on
            # fd 0 dies of SIGSEGV right after forking; a /dev/null of its own is fine.
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group; a Ctrl-C aimed at the worker stays ours
            # HAProxy returns to its start directory after reading its config, and fails in
            # one the service user cannot enter (root's home, when root ran ctl or the worker).
            cwd=self.config_file.parent,
        )

    def _finish(self, process: subprocess.Popen[str], what: str, text: str | None = None,
                meanwhile: Callable[[], object] | None = None) -> subprocess.CompletedProcess[str]:
        """Give `process` `text` on stdin and wait for it within `command_timeout`,
        calling `meanwhile` as it works; on timeout or any interruption (a job's own
        timeout, `meanwhile` raising), kill its whole process group: a wrapper's children
        too."""
        try:
            if meanwhile is None:
                stdout, stderr = process.communicate(text, timeout=self.command_timeout)
            else:
                stdout, stderr = _communicating(process, text, self.command_timeout, meanwhile)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise ActionTimeout(f"{what} did not finish within {self.command_timeout:g} s.") from None
        except BaseException:
            _kill_group(process)
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


class ConfigChecker:
    """`haproxy -c` started before the text it checks exists, reading it from a pipe:
    HAProxy's own start-up (measured: 9 of the 13 ms that checking a one-server file
    takes, 8 of 28 ms at 1,000 servers) is over, or runs while the worker renders the
    text, by the time the text comes."""

    def __init__(self, owner: HAProxyProcess, process: subprocess.Popen[str],
                 config_file: Path) -> None:
        self.owner = owner
        self.process = process
        self.config_file = config_file

    def check(self, text: str, meanwhile: Callable[[], object] | None = None) -> None:
        """Prove `text`, the content of `config_file`; HAProxy's own words on failure.
        `meanwhile` runs while HAProxy checks (if it raises, the check is stopped)."""
        result = self.owner._finish(self.process, "haproxy -c", text, meanwhile)
        if result.returncode != 0:
            # The same text as the file: HAProxy's words name the file an operator can open.
            output = (result.stderr + result.stdout).replace(_STDIN, str(self.config_file))
            raise ConfigCheckFailed(
                "HAProxy rejected the configuration: " + _first_alert(output),
                detail="HAProxy rejected the configuration: " + _alerts(output),
            )


def _communicating(process: subprocess.Popen[str], text: str | None, timeout: float,
                   meanwhile: Callable[[], object]) -> tuple[str, str]:
    """`process.communicate(text, timeout)` on another thread while `meanwhile` runs on
    this one. (Writing the text first and then calling `meanwhile` could deadlock: a
    process that fills its stderr pipe before reading all of its input waits for a reader
    that waits for it.)"""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        talking = pool.submit(process.communicate, text, timeout)
        try:
            meanwhile()
            return talking.result()
        except BaseException:  # `meanwhile` failed, or the job's time ran out meanwhile
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # `talking` ends with it
            raise


def _file_identity(path: str) -> tuple[int, ...] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _kill_group(process: subprocess.Popen[str]) -> None:
    # A daemonized HAProxy master has left this group (setsid); only our children remain.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def _alerts(output: str) -> str:
    """HAProxy's ALERT lines, without its pid prefixes: the part a human can act on."""
    lines = [re.sub(r"^\[(ALERT|WARNING)\]\s+\(\d+\)\s*:\s*", "", line) for line in output.splitlines()]
    alerts = [line.strip() for line in lines if line.strip() and not line.startswith("[NOTICE]")]
    return " ".join(alerts) or "no error message was given."


# "config : parsing [/var/lib/libra-worker/haproxy.cfg.new:31] : " says which line; the
# directory would push the keyword out of the short sentence Libra stores.
_ALERT_LOCATION = re.compile(r"^(?:config\s*:\s*)?(?:parsing\s*)?\[[^\]]*?:(\d+)\]\s*:\s*")


def _first_alert(output: str) -> str:
    """HAProxy's first complaint, led by its line number and keyword; `_alerts` has all."""
    alerts = [line for line in output.splitlines() if line.startswith("[ALERT]")]
    first = _alerts(alerts[0]) if alerts else _alerts(output)
    return _ALERT_LOCATION.sub(lambda match: f"line {match.group(1)}: ", first)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_until_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True
