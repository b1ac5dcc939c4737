"""A bounded journal of jobs under state_dir, for operators (`libra-worker ctl jobs`).

Each job is a JSON line with its final state (COMPLETE, FAIL or TIMEOUT). A job that
could outlive the worker (a mutating job, or a read-only one on a reader thread) is
written a first time, RUNNING, when it starts: a worker killed mid-job leaves that entry
behind, which is what an operator needs to see. A job answered in place on the Gearman loop
(a ping bounded to 50 ms, a refused message) gets its final line only, written just after
its answer (`Journal.deferred`): a worker killed in those milliseconds leaves no entry
(and the job server gives out again a job that was not answered yet).
When the file holds `max_entries` finished jobs it becomes `<name>.1` (replacing the older
one) and a new file starts, so between `max_entries` and twice that many jobs are kept,
and no job pays for a rewrite.

Bounded in bytes too, whatever the messages hold: an error is kept to its first
`MAX_ERROR_CHARS` characters, and a file that reaches `max_bytes` rotates early. Both
files are the worker's own (0600): errors may name the device's configuration.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

LOG = logging.getLogger(__name__)

JOURNAL_NAME = "jobs.journal"
MAX_ERROR_CHARS = 1024
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
RUNNING, COMPLETE, FAIL, TIMEOUT = "RUNNING", "COMPLETE", "FAIL", "TIMEOUT"
# Set by `Journal.deferred` in the thread that defers (a context variable: per thread).
_DEFERRING: contextvars.ContextVar[bool] = contextvars.ContextVar("journal_deferring",
                                                                   default=False)
# How a RUNNING line spells its state (json.dumps's default separators, as `_line` writes).
_RUNNING_FIELD = b'"state": "RUNNING"'


@dataclass(frozen=True)
class JobRecord:
    handle: str
    action: str
    state: str
    started: str
    finished: str | None = None
    duration_ms: float | None = None
    hpcs_error: str | None = None


class Journal:
    def __init__(self, path: Path, max_entries: int = 1000,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._finished = self._count_finished()
        self._bytes = self._size()
        self._descriptor: int | None = None
        self._deferred: list[dict[str, Any]] = []  # only the thread that defers adds to it

    def ticket(self, handle: str, action: str) -> "JobTicket":
        """A job's entry, started now and not written yet (`JobTicket.running`, `finish`)."""
        return JobTicket(self, handle, action)

    def started(self, handle: str, action: str) -> "JobTicket":
        """A job's entry, written RUNNING now."""
        ticket = self.ticket(handle, action)
        ticket.running()
        return ticket

    def recent(self, count: int) -> list[JobRecord]:
        """The newest `count` jobs, oldest first, each in its latest state."""
        latest: dict[str, JobRecord] = {}
        for record in self._read():
            latest.pop(record.handle, None)  # re-insert so order follows the last update
            latest[record.handle] = record
        return list(latest.values())[-count:]

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Final lines this thread writes within the block wait for `write_deferred`: the
        Gearman loop writes those of the jobs it answered in place after the answers, not
        between a job and its answer. RUNNING lines are never deferred (a reader's final
        line must not come first)."""
        token = _DEFERRING.set(True)
        try:
            yield
        finally:
            _DEFERRING.reset(token)

    def write_deferred(self) -> None:
        if self._deferred:
            entries, self._deferred = self._deferred, []
            self._write(b"".join(map(_line, entries)), finished=len(entries))

    def _append(self, fields: dict[str, Any]) -> None:
        """Write one line: `fields` are JobRecord's, in the sorted order of their names
        (the order `recent` and `_RUNNING_FIELD` expect)."""
        if fields["state"] == RUNNING:
            self._write(_line(fields), finished=0)
        elif _DEFERRING.get():
            self._deferred.append(fields)
        else:
            self._write(_line(fields), finished=1)

    def _write(self, lines: bytes, finished: int) -> None:
        with self._lock:
            try:
                if self._descriptor is None:
                    self._descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                               0o600)
                # Unbuffered: readable by `ctl jobs` at once. No fsync: not state.
                written = 0
                while written < len(lines):
                    written += os.write(self._descriptor, lines[written:])
                self._bytes += len(lines)
                self._finished += finished
                if self._finished >= self.max_entries or self._bytes >= self.max_bytes:
                    self._rotate()
            except OSError as exc:
                # The journal is for operators; a full disk must not fail the job itself.
                LOG.error("Cannot write the job journal %s: %s", self.path, exc)

    def _rotate(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        os.replace(self.path, self._older)
        self._finished = 0
        self._bytes = 0

    @property
    def _older(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def _read(self) -> list[JobRecord]:
        records = []
        for path in (self._older, self.path):
            try:
                text = path.read_text("utf-8")
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                try:
                    records.append(JobRecord(**json.loads(line)))
                except (ValueError, TypeError):
                    continue  # a line torn by a crash mid-write
        return records

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _count_finished(self) -> int:
        try:
            with open(self.path, "rb") as handle:
                return sum(1 for line in handle if _RUNNING_FIELD not in line)
        except FileNotFoundError:
            return 0


class JobTicket:
    """One job's entry: `running` records that it started, `finish` its outcome."""

    def __init__(self, journal: Journal, handle: str, action: str) -> None:
        self.journal = journal
        self.handle = handle
        self.action = action
        self.started = _STAMPS.now()
        self._since = time.monotonic()

    def running(self) -> None:
        self.journal._append({"action": self.action, "duration_ms": None, "finished": None,
                              "handle": self.handle, "hpcs_error": None,
                              "started": self.started, "state": RUNNING})

    def finish(self, state: str, error: str | None = None) -> None:
        duration_ms = round((time.monotonic() - self._since) * 1000, 1)
        self.journal._append({"action": self.action, "duration_ms": duration_ms,
                              "finished": _STAMPS.now(), "handle": self.handle,
                              "hpcs_error": _bounded(error), "started": self.started,
                              "state": state})


class _Stamps:
    """UTC times to the second, as `state.utc_now` writes them, each second formatted once:
    pings come many a second, and formatting was a tenth of a DISCOVER's time in the worker."""

    def __init__(self) -> None:
        self._last: tuple[int, str] = (-1, "")

    def now(self) -> str:
        second = int(time.time())
        last = self._last  # one read: another thread may replace it meanwhile
        if last[0] != second:
            last = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
            self._last = last
        return last[1]


_STAMPS = _Stamps()


def _line(fields: dict[str, Any]) -> bytes:
    return (json.dumps(fields) + "\n").encode("utf-8")


def _bounded(error: str | None) -> str | None:
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return f"{error[:MAX_ERROR_CHARS]}… ({len(error)} characters)"
