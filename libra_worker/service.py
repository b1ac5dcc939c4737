"""Running as a service: start-up checks, privileges, the pidfile, daemonizing, signals.

Start-up tells the truth: `libra-worker` without ``--foreground`` returns only once the
daemon serves, or exits non-zero with one line on stderr naming the cause and the config
key. Checks that do not depend on the service user run in the starting process; the
daemon does the rest (directories, privileges, pidfile, logging, HAProxy binary) and
reports ``ready`` or its first fatal error back through a pipe the starting process waits
on. ``--foreground`` runs the same steps in-process and prints the same lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import pwd
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Callable, Protocol

import daemon

from libra_worker import logsetup
from libra_worker.config import Config, ConfigError, HAProxySettings, WorkerSettings
from libra_worker.drivers.haproxy.driver import StateDirLayout
from libra_worker.drivers.haproxy.process import HAProxyProcess, find_binary
from libra_worker.errors import WorkerError
from libra_worker.netcheck import check_bind_address, check_peers_address
from libra_worker.tls import check_tls_files

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_RUNNING = 3
EXIT_STATUS_HELP = (
    "exit status: 0 stopped cleanly (or, without --foreground, the daemon serves); "
    "1 runtime failure; 2 usage or configuration error; 3 another worker already runs "
    "on this pid_file."
)
_READY = "ready"


class StartupError(Exception):
    """The worker cannot start; the message is one line naming the config key."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- who we run as


@dataclass(frozen=True)
class Identity:
    """The user and group the worker runs as; `name` for messages, `groups` the user's
    supplementary groups (e.g. one that may read TLS keys)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def is_current(self) -> bool:
        return (self.uid, self.gid) == (os.geteuid(), os.getegid())


def resolve_identity(settings: WorkerSettings, euid: int | None = None) -> Identity:
    """`[worker] user/group` as ids; refused if unknown or if only root could switch."""
    euid = os.geteuid() if euid is None else euid
    if settings.user:
        try:
            entry = pwd.getpwnam(settings.user)
        except KeyError:
            raise StartupError(f"[worker] user {settings.user[:40]!r} does not exist on this host.") from None
        name, uid, gid = entry.pw_name, entry.pw_uid, entry.pw_gid
    else:
        name, uid, gid = _user_name(euid), euid, os.getegid()
    if settings.group:
        try:
            gid = grp.getgrnam(settings.group).gr_gid
        except KeyError:
            raise StartupError(f"[worker] group {settings.group[:40]!r} does not exist on this host.") from None
    groups = tuple(os.getgrouplist(name, gid)) if settings.user else ()
    identity = Identity(name, uid, gid, groups)
    if euid != 0 and (uid, gid) != (euid, os.getegid()):
        key = "user" if uid != euid else "group"
        raise StartupError(
            f"[worker] {key} asks to run as {name} (uid {uid}, gid {gid}), but libra-worker "
            f"was started as {_user_name(euid)} (uid {euid}, gid {os.getegid()}) and only root "
            f"can switch; start it as root or as that user, or remove the option.")
    return identity


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def prepare_directories(settings: WorkerSettings, identity: Identity) -> None:
    """Create state_dir and the pid and log files' directories when missing; when root
    starts a worker for another user, hand what it creates (and the log file) to that user."""
    hand_over = os.geteuid() == 0 and not identity.is_current
    for key, directory in _directories(settings):
        created = _make_directory(key, directory)
        if hand_over:
            for path in created:
                os.chown(path, identity.uid, identity.gid)
    if hand_over:
        if settings.log_file is not None and settings.logging_config is None:
            _open_log_file_for(settings.log_file, identity)
        with contextlib.suppress(FileNotFoundError):  # left by a worker that ran as root
            os.chown(settings.pid_file, identity.uid, identity.gid, follow_symlinks=False)


def _directories(settings: WorkerSettings) -> list[tuple[str, Path]]:
    directories = [("state_dir", settings.state_dir), ("pid_file", settings.pid_file.parent)]
    if settings.log_file is not None and settings.logging_config is None:
        directories.append(("log_file", settings.log_file.parent))
    return directories


def _make_directory(key: str, directory: Path) -> list[Path]:
    """mkdir -p with mode 0750; the directories it created, outermost first."""
    missing = [path for path in (directory, *directory.parents) if not path.exists()][::-1]
    try:
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"[worker] {key}: cannot create {directory}: {exc.strerror}.") from None
    if not directory.is_dir():
        raise StartupError(f"[worker] {key}: {directory} is not a directory.")
    return missing


def _open_log_file_for(path: Path, identity: Identity) -> None:
    try:
        # Never through a symlink: the directory may belong to the service user.
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            os.fchown(descriptor, identity.uid, identity.gid)
        finally:
            os.close(descriptor)
    except OSError as exc:
        raise StartupError(f"[worker] log_file {path}: {exc.strerror}.") from None


def drop_privileges(identity: Identity) -> None:
    """Become `identity` for good (supplementary groups first, then gid, uid)."""
    if identity.is_current:
        return
    os.setgroups(list(identity.groups))
    os.setgid(identity.gid)
    os.setuid(identity.uid)


def check_access(config: Config, identity: Identity) -> None:
    """As the service user: can it write what it must, and run HAProxy?"""
    for key, directory in _directories(config.worker):
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise StartupError(f"[worker] {key}: user {identity.name} cannot write to "
                               f"{directory} ({exc.strerror}).") from None
    try:
        binary = find_binary(config.haproxy.binary)
    except WorkerError:
        raise StartupError(
            f"[haproxy] binary {config.haproxy.binary[:80]!r} was not found (PATH, /usr/sbin) "
            f"or user {identity.name} cannot run it; install haproxy or set the path."
        ) from None
    try:
        check_bind_address(config.haproxy.bind_address)
        if config.haproxy.tcp_source_persistence:
            check_peers_address(*config.haproxy.peers_address,
                                _running_haproxy(config.haproxy, binary))
        check_tls_files(config.gearman)  # as the service user: can it read the key?
    except ConfigError as exc:
        raise StartupError(str(exc)) from None


def _running_haproxy(settings: HAProxySettings, binary: str) -> list[int]:
    """The pids of the HAProxy a previous run of this worker left serving (it is adopted)."""
    files = StateDirLayout(settings.state_dir)
    return HAProxyProcess(binary, files.config, files.pid_file, files.master_socket).our_pids()


def check_job_servers(config: Config) -> None:
    """A host name that cannot resolve is a typo; a temporary DNS failure is retried later."""
    for host, _port in config.gearman.servers:
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:
                raise StartupError(f"[gearman] servers: the host {host[:60]!r} is unknown.") from None


# --------------------------------------------------------------------------- the pidfile


class PidFile:
    """The worker's pidfile, held with flock: a killed worker's lock goes with it, so a
    leftover file is never mistaken for a running worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid of the worker that holds the lock now, or None."""
        try:
            descriptor = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(descriptor) or -1
        finally:
            os.close(descriptor)
        return None

    def acquire(self) -> None:
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StartupError(f"[worker] pid_file {self.path}: {exc.strerror}.") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _read_pid(descriptor)
            os.close(descriptor)
            raise already_running(self.path, pid) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._fd = descriptor

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _read_pid(descriptor: int) -> int | None:
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def already_running(path: Path, pid: int | None) -> StartupError:
    holder = f"pid {pid}" if pid and pid > 0 else "another process"
    return StartupError(
        f"[worker] pid_file {path} is held by a running worker ({holder}); "
        f"one worker per pid_file and state_dir.", EXIT_RUNNING)


# --------------------------------------------------------------------------- reporting start-up


class StartupReport(Protocol):
    def ready(self) -> None: ...
    def failed(self, error: StartupError) -> None: ...


class ConsoleReport:
    """--foreground: errors go to stderr as they happen."""

    def ready(self) -> None:
        pass

    def failed(self, error: StartupError) -> None:
        print_error(error)


class PipeReport:
    """The daemon's side of the start-up pipe: one message, then closed."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor: int | None = descriptor

    def ready(self) -> None:
        self._send(_READY)

    def failed(self, error: StartupError) -> None:
        self._send(f"{error.exit_code} {error}")

    def _send(self, message: str) -> None:
        if self.descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.descriptor, message.encode("utf-8", "replace"))
        os.close(self.descriptor)
        self.descriptor = None


def print_error(error: StartupError | str) -> None:
    print(f"libra-worker: {error}", file=sys.stderr)


def daemonize(config: Config, serve: Callable[[StartupReport], int]) -> int:
    """Fork the daemon (python-daemon: its own session, no terminal, state_dir as working
    directory) and wait until it reports ready or fails; the exit status for the caller."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process; tests see its effects
        os.close(reader)
        report = PipeReport(writer)
        code = EXIT_FAILURE
        try:
            daemon.DaemonContext(
                detach_process=True,
                # state_dir may not exist yet: the daemon creates it, then moves there.
                working_directory="/",
                umask=config.worker.umask,
                files_preserve=[writer],
                # Our own handlers are installed in run(); python-daemon's would exit at once.
                signal_map={signal.SIGTERM: None, signal.SIGINT: None, signal.SIGHUP: None},
            ).open()
            code = serve(report)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the waiting parent says it
            report.failed(StartupError(f"the daemon failed: {type(exc).__name__}: {exc}", EXIT_FAILURE))
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace")
    os.waitpid(child, 0)  # the first fork's parent exits at once; the daemon is its grandchild
    if message == _READY:
        return EXIT_OK
    code, _, text = message.partition(" ")
    if not code.isdigit():
        print_error(f"the daemon exited during start-up; see its log "
                    f"({config.worker.log_file or config.worker.state_dir / logsetup.DEFAULT_LOG_NAME}).")
        return EXIT_FAILURE
    print_error(text)
    return int(code)


# --------------------------------------------------------------------------- threads, signals


def log_thread_failures() -> None:
    """An exception that ends a thread (a timer, a probe, a connection attempt) goes to the
    worker's log: a daemon's stderr is /dev/null."""

    def report(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "a thread"
        logging.getLogger("libra_worker").error(
            "%s stopped on an unexpected error", name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = report


def install_signal_handlers(stopping: threading.Event, on_stop: Callable[[str], None],
                            on_hangup: Callable[[], None]) -> None:
    """SIGTERM/SIGINT: warm stop (finish the job in hand), a second one exits at once;
    SIGHUP: `on_hangup` (re-open the logs), never the default action, which kills."""

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            on_stop(f"Second {name}: exiting now")
            os._exit(EXIT_FAILURE)
        stopping.set()
        on_stop(f"{name}: finishing the job in hand, then exiting")

    def hang_up(_signum: int, _frame: FrameType | None) -> None:
        on_hangup()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, hang_up)
