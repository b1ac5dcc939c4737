"""Talk to HAProxy's unix command sockets (the stats socket and the master CLI)."""

from __future__ import annotations

import csv
import errno
import functools
import socket
import time
from pathlib import Path
from typing import Callable, NamedTuple

from libra_worker import budget
from libra_worker.errors import StatsUnavailable

_READ_CHUNK = 65536
# Errors that another try cannot cure: the same call fails the same way.
_PERMANENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.ENOTDIR, errno.ENAMETOOLONG,
    errno.ELOOP, errno.ENOTSOCK, errno.EPROTOTYPE, errno.EROFS,
})


def is_permanent(error: OSError) -> bool:
    """True for an error that retrying cannot cure (a socket, file or binary we may not use)."""
    return error.errno in _PERMANENT_ERRNOS


def send_command(path: Path, command: str, timeout: float = 5.0) -> str:
    """Send one command and return HAProxy's whole answer (see `Exchange`)."""
    return Exchange(path, command, timeout).answer()


class Exchange:
    """One command on a unix command socket: sent when made, its answer read by `answer()`;
    meanwhile the caller may do work of its own while HAProxy answers.

    With `half_close` the write side is shut down after the command: the master CLI only
    closes its end once the client has. The stats socket closes its end after answering
    one command whatever the client does (one system call and one wakeup of HAProxy fewer
    without it). Reading to EOF is then the end of the answer.

    `timeout` bounds the whole exchange; within `budget.limited` (a job run in place on the
    Gearman loop) so does what is left of that bound, and running out of it raises
    `budget.OverBudget`. An error while sending is raised by `answer()`.
    """

    def __init__(self, path: Path, command: str, timeout: float = 5.0,
                 half_close: bool = True) -> None:
        self.path = path
        self.command = command
        timeout, self._cut = budget.io_timeout(timeout)
        # One deadline for the whole exchange (a socket timeout applies to each call).
        self._deadline = time.monotonic() + timeout
        self._error: OSError | None = None
        self._socket: socket.socket | None = None
        try:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.settimeout(timeout)
            self._socket.connect(str(path))
            self._socket.sendall(command.encode("ascii") + b"\n")
            if half_close:
                self._socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._error = exc

    def answer(self) -> str:
        try:
            if self._error is not None:
                raise self._error
            assert self._socket is not None
            chunks = []
            while True:
                self._socket.settimeout(max(self._deadline - time.monotonic(), 0.001))
                if not (chunk := self._socket.recv(_READ_CHUNK)):
                    break
                chunks.append(chunk)
        except TimeoutError:
            if self._cut:
                raise budget.OverBudget(f"{self.path.name} did not answer {self.command!r} in "
                                        f"the time allowed in place") from None
            raise
        finally:
            self.close()
        return b"".join(chunks).decode("utf-8", "replace")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


def send_command_retrying(path: Path, command: str, deadline: float,
                          alive: Callable[[], bool] = lambda: True) -> str:
    """Like send_command, but ride out the moments a re-executing master refuses connections.

    Errors no retry can cure (permission denied, a path that is not a socket), and any
    error once `alive()` says the process behind the socket is gone, are raised at once.
    """
    while True:
        try:
            return send_command(path, command, timeout=max(0.1, deadline - time.monotonic()))
        except OSError as exc:
            if is_permanent(exc) or time.monotonic() >= deadline or not alive():
                raise
            time.sleep(0.002)  # a re-executing master is back within milliseconds


class ServerStatus(NamedTuple):  # made for every server of every STATS: a tuple is cheapest
    backend: str
    server: str
    status: str  # HAProxy's own words: UP, DOWN, MAINT, DRAIN, "UP 1/2", "no check"...

    @property
    def is_up(self) -> bool:
        # "UP 1/2" is a server still UP but failing checks; "DOWN 1/2" one recovering.
        return self.status == "UP" or self.status.startswith("UP ") or self.status == "no check"


class StatusQuery:
    """The health of every server not in maintenance, from `show stat` on the stats socket:
    asked when made, read by `statuses()` (STATS looks at the master and its layout while
    HAProxy answers).

    Only server rows are asked for (any proxy, type 4 = servers, any id), without those in
    maintenance (`no-maint`: the spare slots, retired and disabled nodes, which serve
    nothing), and only the three columns used are split out: STATS runs often, HAProxy's
    CSV row has ~100 columns, and each row costs HAProxy and us CPU (a backend with 2 nodes
    and its 10 spares: 4.3 KB of CSV, 1.9 KB without the spares).
    """

    def __init__(self, stats_socket: Path, timeout: float = 5.0) -> None:
        self._exchange = Exchange(stats_socket, "show stat -1 4 -1 no-maint", timeout,
                                  half_close=False)

    def statuses(self) -> list[ServerStatus]:
        try:
            answer = self._exchange.answer()
        except OSError as exc:
            raise StatsUnavailable(f"HAProxy's stats socket does not answer: {exc}.") from None
        header, _, body = answer.partition("\n")
        positions = _status_columns(header)
        if positions is None:
            raise StatsUnavailable(
                f"HAProxy's stats socket gave an unexpected answer: {answer[:200]!r}."
            )
        backend, server, status = positions
        # Quoted commas can only occur in free-text columns after `status`; names have none.
        last = max(positions)
        statuses = []
        for line in body.splitlines():
            values = line.split(",", last + 1)
            if len(values) > last and values[server] not in ("FRONTEND", "BACKEND"):
                statuses.append(ServerStatus(values[backend], values[server], values[status]))
        return statuses

    def close(self) -> None:
        """Done without the answer (closing after `statuses()` is harmless)."""
        self._exchange.close()


@functools.lru_cache(maxsize=4)
def _status_columns(header: str) -> tuple[int, int, int] | None:
    """Where `pxname`, `svname` and `status` are in a `show stat` header line (the same
    line every time for one HAProxy: kept, not split again for each STATS)."""
    columns = header[2:].split(",")
    if not header.startswith("# ") or not {"pxname", "svname", "status"} <= set(columns):
        return None
    return columns.index("pxname"), columns.index("svname"), columns.index("status")


def dropped_logs(stats_socket: Path, timeout: float = 2.0) -> int | None:
    """`DroppedLogs` from `show info`: log lines this HAProxy could not send; None if unknown."""
    try:
        answer = send_command(stats_socket, "show info", timeout)
    except OSError:
        return None
    for line in answer.splitlines():
        name, _, value = line.partition(":")
        if name == "DroppedLogs" and value.strip().isdigit():
            return int(value)
    return None


def parse_stat_csv(answer: str) -> list[dict[str, str]]:
    """The rows of a `show stat` answer, keyed by the names in its "# " header line.

    Raises:
        ValueError: the answer is not `show stat` CSV (an error message, for instance).
    """
    if not answer.startswith("# "):
        raise ValueError(f"unexpected answer to 'show stat': {answer[:200]!r}")
    return list(csv.DictReader(answer[2:].splitlines()))
