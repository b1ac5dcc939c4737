"""systemd's notify protocol (Type=notify, WatchdogSec=), the progress it reports, and the
sockets a .socket unit passes.

The protocol is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket named by
``NOTIFY_SOCKET`` (``@name`` is in the abstract namespace). The worker sends ``READY=1``
once its job loop runs, ``STATUS=`` lines when what it does changes, ``STOPPING=1`` on
the way out, and, when ``WATCHDOG_USEC`` is set, ``WATCHDOG=1`` every half of it, but only
while both its loops make progress: the job loop polls (or runs a job still within the
longest job timeout) and the reconciler finishes rounds (or waits for such a job). A hung
worker therefore stops pinging and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, MutableMapping

LOG = logging.getLogger(__name__)

_SEND_TIMEOUT = 1.0
# Without a watchdog, STATUS is refreshed this often.
_STATUS_INTERVAL = 5.0


class Notifier:
    """Sends notifications to systemd; does nothing when not started by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._failed = False
        # Re-entrant: the SIGTERM handler may send STOPPING=1 while this thread is sending.
        self._lock = threading.RLock()

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> "Notifier":
        """Take NOTIFY_SOCKET out of the environment: HAProxy (which speaks the protocol
        itself) and the log sink must not notify systemd as if they were the worker."""
        return cls(environ.pop("NOTIFY_SOCKET", None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        payload = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(_SEND_TIMEOUT)
                    sock.sendto(payload, target)
            except OSError as exc:
                if not self._failed:  # one line, not one per ping
                    LOG.warning("Cannot notify systemd on %s: %s", self.address, exc)
                self._failed = True
                return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


# sd_listen_fds(3): the first socket systemd passes is descriptor 3.
_LISTEN_FDS_START = 3


def listened_socket(environ: MutableMapping[str, str] = os.environ) -> socket.socket | None:
    """The socket a .socket unit passed to this process (LISTEN_PID/LISTEN_FDS), or None.

    The variables are taken out of the environment, as sd_listen_fds does: a child must
    not believe the socket is its own.
    """
    meant_for_us = environ.get("LISTEN_PID") == str(os.getpid())
    count = environ.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not meant_for_us or not count.isdigit() or int(count) < 1:
        return None
    return socket.socket(fileno=_LISTEN_FDS_START)


def watchdog_interval(environ: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds of systemd's watchdog timeout, or None; the variables are taken out of the
    environment so that no child process believes the watchdog is its own."""
    usec = environ.pop("WATCHDOG_USEC", "")
    pid = environ.pop("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


class Progress:
    """When each loop last made progress, and whether one of them is stalled.

    Args:
        limit: seconds without progress after which a loop counts as stalled.
        reconcile_interval: the reconciler's pause between rounds, added to its limit.
        job_limit: how long a job in hand counts as progress (the longest job timeout).
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(self, limit: float, reconcile_interval: float, job_limit: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.reconcile_interval = reconcile_interval
        self.job_limit = job_limit
        self.clock = clock
        now = clock()
        self.polled_at = now
        self.reconciled_at = now
        self.job_started_at: float | None = None
        self.reconciler_stopped = False
        self.loop_started = False

    def polled(self) -> None:
        self.polled_at = self.clock()
        self.loop_started = True

    def reconciled(self) -> None:
        self.reconciled_at = self.clock()

    @contextmanager
    def job(self) -> Iterator[None]:
        self.job_started_at = self.clock()
        try:
            yield
        finally:
            self.job_started_at = None

    def stalled(self) -> str | None:
        """None while both loops make progress, else a sentence saying which does not."""
        now = self.clock()
        started = self.job_started_at
        if started is not None and now - started > self.job_limit:
            return f"a job has been running for {now - started:.0f} s, past every job timeout"
        # The Gearman loop polls beside running jobs (it stops heartbeating when a job
        # overruns its own timeout); only before its first poll is a job in hand (restoring
        # the desired state) its progress.
        loop_excused = started is not None and not self.loop_started
        if not loop_excused and now - self.polled_at > self.limit:
            return f"the job loop has made no progress for {now - self.polled_at:.0f} s"
        idle = now - self.reconciled_at
        # A job in hand holds the driver lock the reconciler waits for.
        if (started is None and not self.reconciler_stopped
                and idle > self.limit + self.reconcile_interval):
            return f"the reconciler has made no progress for {idle:.0f} s"
        return None


class ServiceMonitor(threading.Thread):
    """Pings the watchdog while `progress` is healthy and keeps STATUS up to date."""

    def __init__(self, notifier: Notifier, progress: Progress, describe: Callable[[], str],
                 watchdog: float | None, stopping: threading.Event) -> None:
        super().__init__(name="service-monitor", daemon=True)
        self.notifier = notifier
        self.progress = progress
        self.describe = describe
        self.watchdog = watchdog
        self.stopping = stopping
        self._last_status = ""
        self._was_stalled = False

    def run(self) -> None:
        interval = self.watchdog / 2 if self.watchdog else _STATUS_INTERVAL
        while not self.stopping.wait(interval):
            self.tick()

    def tick(self) -> None:
        stalled = self.progress.stalled()
        if stalled is None:
            if self.watchdog:
                self.notifier.watchdog()
            status = self._describe()
        else:
            status = f"not pinging the watchdog: {stalled}"
            if not self._was_stalled:
                LOG.error("Not pinging systemd's watchdog: %s", stalled)
        self._was_stalled = stalled is not None
        if status != self._last_status:
            self.notifier.status(status)
            self._last_status = status

    def _describe(self) -> str:
        try:
            return self.describe()
        except Exception as exc:  # noqa: BLE001 - a status line must never stop the pings
            return f"status unavailable: {exc}"
