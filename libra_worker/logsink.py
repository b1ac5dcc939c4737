"""HAProxy access-log sink: a small detached process plus the API to drive it.

HAProxy sends one RFC 3164 datagram per request/connection to a unix datagram
socket (``<state_dir>/logs/haproxy.sock``).  The sink process owns that socket,
so it keeps collecting while the worker daemon restarts, and HAProxy reloads
never notice it.  Each access line is appended to ``http.log`` or ``tcp.log``
depending on its frontend (``lb-http`` / ``lb-tcp``); HAProxy's other messages
(proxy started/stopped, servers going UP or DOWN, alerts) go to ``haproxy-events.log``,
a small rotating file that ``libra-worker ctl logs`` shows.

Files in ``<state_dir>/logs`` (see :class:`LogStore`):

``<proto>.log``
    Active file, appended to by the sink only.
``<proto>.pending-<ns>.log``
    Lines handed to the archiver (``LogStore.rotate``); deleted by the archiver
    only after a successful upload.  ``<ns>`` (nanoseconds since the epoch, unique,
    increasing) is when they were set aside, and names the object they are shipped as.
``<proto>.dropped``
    Cumulative number of lines dropped because the cap was reached, written by
    the sink; ``<proto>.dropped.reported`` is the total the archiver has
    already reported.
``logsink.identity``
    The code the running sink was started from (:func:`code_identity`).

Upgrades: the sink outlives the worker, so after an upgrade it still runs the old
code.  A worker whose code differs starts a new sink that takes the socket over
(``--take-over``, :class:`_Claim`): it binds a fresh socket and renames it over the
socket path.  HAProxy addresses every log datagram to the path (``sendmsg`` with
the address, never a connected socket), so from that instant its lines reach the
new sink; the old one is stopped only once it has consumed every datagram queued
before the rename, so no line is lost.

Each protocol's stored lines (active + pending) are capped at ``max_bytes``;
lines beyond the cap are counted, never silently lost.

Hand-over with the archiver: the sink writes each line while holding ``flock``
on the active file and checks, under that lock, that the path still names the
file it holds; the archiver renames the active file under the same lock.  So no
line can land in a file after it became pending.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import logging.handlers
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from libra_worker import __version__
from libra_worker.errors import WorkerError
from libra_worker.fileutil import atomic_write
from libra_worker.metrics import TrafficCounter

LOG = logging.getLogger(__name__)

PROTOCOL_BY_FRONTEND = {"lb-http": "http", "lb-tcp": "tcp"}
PROTOCOLS = tuple(PROTOCOL_BY_FRONTEND.values())
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
LOG_DIR_NAME = "logs"
SOCKET_NAME = "haproxy.sock"
# Where a taking-over sink binds before renaming over SOCKET_NAME; no longer than it,
# so the path-length check of SOCKET_NAME covers both.
NEXT_SOCKET_NAME = "haproxy.next"
IDENTITY_NAME = "logsink.identity"
COUNTER_LOCK_NAME = "counters.lock"
PIDFILE_NAME = "logsink.pid"
LOCKFILE_NAME = "logsink.lock"
SINK_LOG_NAME = "logsink.log"
SINK_STDERR_NAME = "logsink.stderr"
EVENTS_LOG_NAME = "haproxy-events.log"
EVENTS_LOG_MAX_BYTES = 1024 * 1024
MAX_DATAGRAM = 65536
MAX_SOCKET_PATH = 107  # sizeof(sun_path) - 1
COUNTER_FLUSH_INTERVAL = 1.0
STOP_POLL_INTERVAL = 0.1
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# After the rename, a sendmsg() that resolved the old path just before it may still be
# queueing its datagram; the marker that proves the old queue empty goes after those.
HANDOVER_SETTLE = 0.2
HANDOVER_TIMEOUT = 10.0

# "<134>Nov 25 20:40:00 haproxy[123]: 127.0.0.1:5555 [25/Nov/2026:...] lb-http ..."
# The frontend of an access line follows the client address and accept date;
# a trailing "~" marks an SSL frontend.
_ACCESS_LINE = re.compile(
    rb"^(?:<\d{1,3}>)?(?P<text>.*?: \S+ \[[^\]]+\] (?P<frontend>[^ ~]+)~? .*)$",
    re.DOTALL)


def parse_datagram(datagram: bytes) -> tuple[str, bytes] | None:
    """Return ``(protocol, line)`` for an access-log datagram, else None.

    The line is the message without its ``<PRI>`` prefix, newline-terminated.
    """
    match = _ACCESS_LINE.match(datagram.rstrip(b"\r\n\0"))
    if match is None:
        return None
    protocol = PROTOCOL_BY_FRONTEND.get(match["frontend"].decode("ascii", "replace"))
    if protocol is None:
        return None
    return protocol, match["text"] + b"\n"


def pending_stamp(pending: Path) -> int:
    """When a pending file's lines were set aside, in nanoseconds since the epoch."""
    return int(pending.name.rsplit("-", 1)[1].removesuffix(".log"))


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@dataclass(frozen=True)
class LogStore:
    """The log files of one state dir, shared by the sink and the archiver."""

    directory: Path

    def active_path(self, protocol: str) -> Path:
        return self.directory / f"{protocol}.log"

    def pending_paths(self, protocol: str) -> list[Path]:
        """Pending files, oldest first (their names sort chronologically)."""
        return sorted(self.directory.glob(f"{protocol}.pending-*.log"))

    def stored_bytes(self, protocol: str) -> int:
        """Bytes of lines kept on disk for ``protocol`` (active + pending)."""
        total = 0
        for path in [self.active_path(protocol), *self.pending_paths(protocol)]:
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def rotate(self, protocol: str) -> Path | None:
        """Move the active file aside as a new pending file.

        Holds the sink's write lock while renaming, so the sink finishes its
        current line first and writes every later line to a fresh active file.

        Returns:
            The new pending path, or None if there was nothing to rotate.
        """
        active = self.active_path(protocol)
        try:
            fd = os.open(active, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size == 0:
                return None
            pending = self._new_pending_path(protocol)
            os.rename(active, pending)
            return pending
        finally:
            os.close(fd)

    def discard_lines(self) -> None:
        """Delete every stored line while a sink may be writing (DELETE under systemd):
        rotated aside under the sink's lock first, so no line lands in a deleted file."""
        for protocol in PROTOCOLS:
            self.rotate(protocol)
            for path in self.pending_paths(protocol):
                path.unlink(missing_ok=True)

    def restamp(self, protocol: str, pending: Path) -> Path:
        """Give a pending file a fresh stamp (the archiver's object name for it is taken)."""
        fresh = self._new_pending_path(protocol)
        os.rename(pending, fresh)
        return fresh

    def _new_pending_path(self, protocol: str) -> Path:
        """A stamp of now, or just after the newest pending file's if the clock was set back:
        stamps never repeat among the pending files and keep their order."""
        stamp = time.time_ns()
        existing = self.pending_paths(protocol)
        if existing:
            stamp = max(stamp, pending_stamp(existing[-1]) + 1)
        return self.directory / f"{protocol}.pending-{stamp:020d}.log"

    def dropped_path(self, protocol: str) -> Path:
        return self.directory / f"{protocol}.dropped"

    def dropped_total(self, protocol: str) -> int:
        """Lines dropped at the cap since the logs were created (sink-owned)."""
        return _read_int(self.dropped_path(protocol))

    def dropped_unreported(self, protocol: str) -> tuple[int, int]:
        """Return ``(total, not yet reported)`` dropped-line counts."""
        total = self.dropped_total(protocol)
        reported = _read_int(self.directory / f"{protocol}.dropped.reported")
        # A total below what was reported means the counter was reset.
        return total, total - reported if total >= reported else total

    def mark_dropped_reported(self, protocol: str, total: int) -> None:
        atomic_write(self.directory / f"{protocol}.dropped.reported",
                         b"%d\n" % total)


class ProtocolWriter:
    """Appends one protocol's lines under the cap; counts what it must drop."""

    def __init__(self, store: LogStore, protocol: str, max_bytes: int) -> None:
        self.store = store
        self.protocol = protocol
        self.max_bytes = max_bytes
        self.path = store.active_path(protocol)
        self.stored = store.stored_bytes(protocol)
        self.dropped = store.dropped_total(protocol)
        self.unflushed_drops = 0
        self.dropping = False
        self._fd: int | None = None

    def write(self, line: bytes) -> None:
        """Append ``line``, or count it as dropped if it would pass the cap."""
        if self.stored + len(line) > self.max_bytes:
            # The archiver may have deleted pending files since the last look.
            self.stored = self.store.stored_bytes(self.protocol)
        if self.stored + len(line) > self.max_bytes:
            self._drop("size cap of %d bytes reached" % self.max_bytes)
            return
        try:
            self._append(line)
        except OSError as error:
            self._drop(f"write failed: {error}")
            return
        self.stored += len(line)
        self.dropping = False

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self.unflushed_drops += 1
        if not self.dropping:
            LOG.warning("dropping %s log lines: %s", self.protocol, reason)
            self.dropping = True

    def _append(self, line: bytes) -> None:
        while True:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                   0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if self._holds_active_file():
                    os.write(self._fd, line)
                    return
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.close()

    def _holds_active_file(self) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (held.st_ino, held.st_dev) == (on_disk.st_ino, on_disk.st_dev)

    def flush_counter(self) -> None:
        """Add the drops not yet on disk to the on-disk total.

        Added, not overwritten: during a hand-over two sinks count drops at once.
        """
        if not self.unflushed_drops:
            return
        with _locked(self.store.directory / COUNTER_LOCK_NAME):
            self.dropped = self.store.dropped_total(self.protocol) + self.unflushed_drops
            atomic_write(self.store.dropped_path(self.protocol), b"%d\n" % self.dropped)
        self.unflushed_drops = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SinkServer:
    """The sink's receive loop over a bound unix datagram socket."""

    def __init__(self, store: LogStore, max_bytes: int) -> None:
        self.writers = {protocol: ProtocolWriter(store, protocol, max_bytes)
                        for protocol in PROTOCOLS}
        self.events = _events_logger(store.directory)
        # Counted before the size cap: billing must not depend on what is kept for ARCHIVE.
        self.traffic = TrafficCounter(store.directory)
        self.stopping = False

    def handle_datagram(self, datagram: bytes) -> None:
        parsed = parse_datagram(datagram)
        if parsed is None:
            self.events.info(_PRIORITY.sub(b"", datagram.rstrip(b"\r\n\0")).decode("utf-8", "replace"))
            return
        protocol, line = parsed
        self.traffic.count(protocol, line)
        self.writers[protocol].write(line)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush_counter()
        self.traffic.flush()

    def serve(self, sock: socket.socket) -> None:
        """Receive until :attr:`stopping` is set, then what is queued; flush counters
        every second."""
        # Short timeout: a stop request is noticed at the next wake-up.
        sock.settimeout(STOP_POLL_INTERVAL)
        last_flush = time.monotonic()
        try:
            while not self.stopping:
                with contextlib.suppress(socket.timeout):
                    self.handle_datagram(sock.recv(MAX_DATAGRAM))
                if time.monotonic() - last_flush >= COUNTER_FLUSH_INTERVAL:
                    self.flush()
                    last_flush = time.monotonic()
            # Lines HAProxy sent before the stop are not lost with the socket.
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    self.handle_datagram(sock.recv(MAX_DATAGRAM))
        finally:
            self.flush()
            for writer in self.writers.values():
                writer.close()
            for handler in self.events.handlers:
                handler.close()


_PRIORITY = re.compile(rb"^<\d{1,3}>")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@functools.cache
def code_identity() -> str:
    """The code a sink started from this package runs: release, Python and sources.

    A digest of every module, not just the version: a re-installed build of the same
    version is new code too.
    """
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return (f"libra-worker {__version__}, Python {sys.version.split()[0]}, "
            f"sources {digest.hexdigest()[:16]}")


def _events_logger(log_dir: Path) -> logging.Logger:
    """HAProxy's own messages, kept apart from the access logs and bounded in size."""
    # A logger of this sink's own, outside logging's registry: one per log directory.
    events = logging.Logger("haproxy-events", logging.INFO)
    handler = logging.handlers.RotatingFileHandler(
        log_dir / EVENTS_LOG_NAME, maxBytes=EVENTS_LOG_MAX_BYTES, backupCount=1)
    handler.setFormatter(logging.Formatter("%(message)s"))
    events.addHandler(handler)
    return events


def bind_socket(path: Path) -> socket.socket:
    """Bind a fresh datagram socket at ``path`` (owner-only, 0600)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # A deep receive buffer absorbs bursts while we write; the kernel caps it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    old_umask = os.umask(0o077)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)  # the umask leaves the (meaningless) x bit on a socket
    return sock


def try_lock(path: Path) -> int | None:
    """Take the sink's singleton lock; return its fd, or None if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return None
        raise
    return fd


class LogSink:
    """Control API for the sink process of one state dir.

    Liveness is the sink's ``flock`` on ``logsink.lock``: unlike a pid it cannot
    be fooled by pid reuse or a zombie.  The pidfile is only used to signal it.
    """

    def __init__(self, state_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.state_dir = Path(state_dir)
        self.max_bytes = max_bytes

    @property
    def log_dir(self) -> Path:
        return self.state_dir / LOG_DIR_NAME

    @property
    def socket_path(self) -> Path:
        """Where HAProxy must send its logs (``log <socket_path> local0``)."""
        return self.log_dir / SOCKET_NAME

    @property
    def pidfile(self) -> Path:
        return self.log_dir / PIDFILE_NAME

    @property
    def identity_file(self) -> Path:
        return self.log_dir / IDENTITY_NAME

    @property
    def store(self) -> LogStore:
        return LogStore(self.log_dir)

    def running_identity(self) -> str | None:
        """The code the running sink was started from; None for a sink of release 1.0."""
        with contextlib.suppress(FileNotFoundError):
            return self.identity_file.read_text().strip()
        return None

    def is_running(self) -> bool:
        if not self.log_dir.is_dir():
            return False
        fd = try_lock(self.log_dir / LOCKFILE_NAME)
        if fd is None:
            return True
        os.close(fd)
        return False

    def pid(self) -> int | None:
        """The running sink's pid, or None."""
        if not self.is_running():
            return None
        return _read_int(self.pidfile) or None

    def ensure_running(self, timeout: float = START_TIMEOUT) -> None:
        """Adopt the running sink, or start a detached one and wait for its socket.

        A running sink started from other code (an upgrade) is replaced by one running
        this code, without losing a line (see :class:`_Claim` and ``--take-over``).

        Raises:
            WorkerError: the sink did not come up within ``timeout`` seconds.
        """
        if self.is_running() and self.socket_path.exists():
            if self.running_identity() != code_identity():
                self._hand_over(timeout)
            return
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise WorkerError(f"The log socket path {self.socket_path} is too long "
                              f"for a unix socket (max {MAX_SOCKET_PATH} bytes).")
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        self._launch(timeout)
        # The sink writes its pidfile only after binding the socket.
        self._wait_until(lambda: self.pidfile.exists() and self.is_running(), timeout)

    def _hand_over(self, timeout: float) -> None:
        previous = self.pid()
        LOG.info("The HAProxy log sink (pid %s) runs %s; a sink on %s takes its socket over",
                 previous, self.running_identity() or "release 1.0 (no identity)", code_identity())
        self._launch(timeout, take_over=True)
        self._wait_until(lambda: self.running_identity() == code_identity()
                         and self.pid() not in (None, previous), timeout + HANDOVER_TIMEOUT)

    def _wait_until(self, started: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if started():
                return
            time.sleep(0.05)
        raise WorkerError(
            f"The HAProxy log sink did not start within {timeout:g} s; "
            f"see {self.log_dir / SINK_LOG_NAME} and {self.log_dir / SINK_STDERR_NAME}.")

    def _launch(self, timeout: float, take_over: bool = False) -> None:
        argv = [sys.executable, "-m", "libra_worker.logsink",
                "--state-dir", str(self.state_dir),
                "--max-bytes", str(self.max_bytes), "--detach"]
        if take_over:
            argv.append("--take-over")
        # Lets a source checkout run the module as well as an installed package.
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [package_root, env.get("PYTHONPATH")]))
        stderr_fd = os.open(self.log_dir / SINK_STDERR_NAME,
                            os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(stderr_fd, "ab") as stderr:
            # Returns once the launcher has forked the daemon off and exited.
            try:
                subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=stderr, env=env, check=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                # A machine too busy to start Python in time (a whole fleet starting at once).
                raise WorkerError(f"The HAProxy log sink did not start within {timeout:g} s "
                                  "(the machine may be overloaded); try again.") from None
            except subprocess.CalledProcessError as exc:
                raise WorkerError(f"The HAProxy log sink failed to start (exit {exc.returncode}); "
                                  f"see {self.log_dir / SINK_STDERR_NAME}.") from None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the sink by pid (SIGTERM, then SIGKILL); no-op if not running."""
        pid = self.pid()
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.is_running():
                    return
                time.sleep(0.05)
        raise WorkerError(f"The HAProxy log sink (pid {pid}) did not stop.")

    def remove_logs(self) -> None:
        """Stop the sink and delete every log, pending file and counter (DELETE)."""
        self.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)


def _detach(stderr_path: Path) -> None:
    """Double-fork into a session of our own, so the worker never reaps us."""
    import daemon  # python-daemon; only the sink process needs it

    # Not closed on purpose: the daemon writes crash output here until it exits.
    stderr = open(stderr_path, "ab")
    context = daemon.DaemonContext(
        detach_process=True, umask=0o077, working_directory="/",
        stderr=stderr, files_preserve=[stderr], signal_map={})
    context.open()


def _configure_logging(log_dir: Path) -> None:
    handler = logging.handlers.RotatingFileHandler(
        log_dir / SINK_LOG_NAME, maxBytes=1024 * 1024, backupCount=1)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s logsink[%(process)d] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


class _Claim:
    """What one sink process holds in its log dir: the lock, the socket, the pidfile."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.socket_path = log_dir / SOCKET_NAME
        self.lock_fd: int | None = None
        self.socket_inode: int | None = None

    def bind(self) -> socket.socket:
        sock = bind_socket(self.socket_path)
        self.socket_inode = self.socket_path.stat().st_ino
        return sock

    def take_over(self) -> tuple[socket.socket, socket.socket | None]:
        """Bind a fresh socket and rename it over the socket path (atomic for HAProxy).

        Returns:
            The new socket, and one connected to the previous sink's socket (None when
            nothing listens there), through which its queue can still be reached.
        """
        next_path = self.log_dir / NEXT_SOCKET_NAME
        sock = bind_socket(next_path)
        self.socket_inode = next_path.stat().st_ino
        previous: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            previous.connect(str(self.socket_path))
        except OSError:
            previous.close()
            previous = None
        os.rename(next_path, self.socket_path)
        return sock, previous

    def retire_previous(self, previous: socket.socket | None) -> None:
        """Stop the sink we took over from once it has consumed its queue, then lock.

        A marker datagram sent behind the queued lines is consumed last; the kernel
        charges every queued datagram to its sender until the receiver reads it, so
        once our send queue is empty, so is the previous sink's.
        """
        pid = _read_int(self.log_dir / PIDFILE_NAME)
        # Release 1.0 sinks (no identity file) unlink the socket path when they stop, which
        # is ours now: they are killed instead, with nothing left to write.
        knows_handover = (self.log_dir / IDENTITY_NAME).exists()
        if previous is not None:
            with previous:
                time.sleep(HANDOVER_SETTLE)
                previous.settimeout(HANDOVER_TIMEOUT)
                previous.send(b"libra-worker log sink: handing over to pid %d" % os.getpid())
                deadline = time.monotonic() + HANDOVER_TIMEOUT
                while _queued_bytes(previous) and time.monotonic() < deadline:
                    time.sleep(0.01)
                if _queued_bytes(previous):
                    LOG.error("the previous sink (pid %d) did not read its queue within %g s; "
                              "the lines still queued there are lost", pid, HANDOVER_TIMEOUT)
        lock_path = self.log_dir / LOCKFILE_NAME
        for sig in (signal.SIGTERM if knows_handover else signal.SIGKILL, signal.SIGKILL):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.lock_fd is None and time.monotonic() < deadline:
                self.lock_fd = try_lock(lock_path)
                time.sleep(0.02)
            if self.lock_fd is not None:
                LOG.info("took the log socket over from pid %d", pid)
                return
        raise WorkerError(f"the previous log sink (pid {pid}) does not release {lock_path}")

    def announce(self) -> None:
        """Say which code serves, then who: the worker waits for the pidfile."""
        atomic_write(self.log_dir / IDENTITY_NAME, code_identity().encode() + b"\n")
        atomic_write(self.log_dir / PIDFILE_NAME, b"%d\n" % os.getpid())

    def release(self) -> None:
        """Remove what is still ours: a successor may have taken the socket over."""
        with contextlib.suppress(FileNotFoundError):
            if self.socket_path.stat().st_ino == self.socket_inode:
                self.socket_path.unlink()
        pidfile = self.log_dir / PIDFILE_NAME
        if _read_int(pidfile) == os.getpid():
            pidfile.unlink(missing_ok=True)
        if self.lock_fd is not None:
            # Under the lock, so a successor writes its identity only after this.
            (self.log_dir / IDENTITY_NAME).unlink(missing_ok=True)
            os.close(self.lock_fd)


def _queued_bytes(sock: socket.socket) -> int:
    """Bytes this socket has sent that the receiver has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def run_sink(state_dir: Path, max_bytes: int, take_over: bool = False,
             listening: socket.socket | None = None) -> int:
    """Run the sink in this process until SIGTERM/SIGINT; 0 if already running.

    With ``take_over``, a running sink's socket is taken over and that sink stopped.
    ``listening`` is a socket bound to the socket path by someone else (systemd's
    libra-logsink.socket): the path stays theirs, and datagrams queue in it while no
    sink runs (a restart, an upgrade).
    """
    log_dir = Path(state_dir) / LOG_DIR_NAME
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    claim = _Claim(log_dir)
    claim.lock_fd = try_lock(log_dir / LOCKFILE_NAME)
    if claim.lock_fd is None and listening is not None:
        LOG.error("another sink (pid %s) already serves %s; stop it first",
                  _read_int(log_dir / PIDFILE_NAME) or "unknown", log_dir)
        return 1
    if claim.lock_fd is None and not take_over:
        LOG.info("another sink already serves %s", log_dir)
        return 0
    server = SinkServer(LogStore(log_dir), max_bytes)

    def request_stop(signum: int, _frame: object) -> None:
        server.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if listening is not None:
        sock = listening
        claim.announce()
    elif claim.lock_fd is None:
        sock, previous = claim.take_over()

        def retire_then_announce() -> None:
            try:
                claim.retire_previous(previous)
                claim.announce()
            except Exception:  # the thread's end: a stuck hand-over must be seen, and stop
                LOG.exception("taking the log socket over failed")
                server.stopping = True

        # We serve from the instant of the rename: the new socket's queue is short.
        threading.Thread(target=retire_then_announce, name="handover", daemon=True).start()
    else:
        sock = claim.bind()
        claim.announce()
    try:
        LOG.info("collecting HAProxy logs on %s (cap %d bytes per protocol)",
                 claim.socket_path, max_bytes)
        server.serve(sock)
    finally:
        sock.close()
        claim.release()
        LOG.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="cap on stored bytes per protocol (active + pending)")
    parser.add_argument("--detach", action="store_true",
                        help="fork into the background first")
    parser.add_argument("--take-over", action="store_true",
                        help="replace the running sink without losing a line (upgrades)")
    args = parser.parse_args(argv)
    if args.max_bytes <= 0:
        parser.error("--max-bytes must be positive")
    log_dir = args.state_dir.resolve() / LOG_DIR_NAME
    if args.detach:
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _detach(log_dir / SINK_STDERR_NAME)
        _configure_logging(log_dir)
    else:
        logging.basicConfig(level=logging.INFO)
    return run_sink(args.state_dir.resolve(), args.max_bytes, args.take_over)


if __name__ == "__main__":
    sys.exit(main())
