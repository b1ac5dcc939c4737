"""A bounded journal of jobs under state_dir, for operators (`libra-worker ctl jobs`).

Each job is a JSON line with its final state (COMPLETE, FAIL or TIMEOUT). A job that
could outlive the worker (a mutating job, or a read-only one on a reader thread) is
written a first time, RUNNING, when it starts: a worker killed mid-job leaves that entry
behind, which is what an operator needs to see. A job answered in place on the Gearman loop
(a ping bounded to 50 ms, a refused message) gets its final line only: a worker killed
within those milliseconds leaves no entry, and the job server gives the job out again.
When the file holds `max_entries` finished jobs it becomes `<name>.1` (replacing the older
one) and a new file starts, so between `max_entries` and twice that many jobs are kept,
and no job pays for a rewrite.

Bounded in bytes too, whatever the messages hold: an error is kept to its first
`MAX_ERROR_CHARS` characters, and a file that reaches `max_bytes` rotates early. Both
files are the worker's own (0600): errors may name the device's configuration.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from libra_worker.state import utc_now

LOG = logging.getLogger(__name__)

JOURNAL_NAME = "jobs.journal"
MAX_ERROR_CHARS = 1024
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
RUNNING, COMPLETE, FAIL, TIMEOUT = "RUNNING", "COMPLETE", "FAIL", "TIMEOUT"
# How a RUNNING line spells its state (json.dumps with sort_keys, as _append writes it).
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
        self._file: TextIO | None = None

    def ticket(self, handle: str, action: str) -> "JobTicket":
        """A job's entry, started now and not written yet (`JobTicket.running`, `finish`)."""
        record = JobRecord(handle=handle, action=action, state=RUNNING, started=utc_now())
        return JobTicket(self, record, time.monotonic())

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

    def _append(self, record: JobRecord) -> None:
        # vars(), not asdict(): every field is a plain value, and asdict deep-copies
        # them all, which was most of a DISCOVER's time in the worker.
        line = json.dumps(vars(record), sort_keys=True) + "\n"
        with self._lock:
            try:
                if self._file is None:
                    descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    self._file = os.fdopen(descriptor, "a", encoding="utf-8")
                self._file.write(line)
                self._file.flush()  # readable by `ctl jobs` at once; no fsync: not state
                self._bytes += len(line)
                if record.state != RUNNING:
                    self._finished += 1
                if self._finished >= self.max_entries or self._bytes >= self.max_bytes:
                    self._rotate()
            except OSError as exc:
                # The journal is for operators; a full disk must not fail the job itself.
                LOG.error("Cannot write the job journal %s: %s", self.path, exc)

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
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

    def __init__(self, journal: Journal, record: JobRecord, started: float) -> None:
        self.journal = journal
        self.record = record
        self.started = started

    def running(self) -> None:
        self.journal._append(self.record)

    def finish(self, state: str, error: str | None = None) -> None:
        self.journal._append(
            replace(
                self.record,
                state=state,
                finished=utc_now(),
                duration_ms=round((time.monotonic() - self.started) * 1000, 1),
                hpcs_error=_bounded(error),
            )
        )


def _bounded(error: str | None) -> str | None:
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return f"{error[:MAX_ERROR_CHARS]}… ({len(error)} characters)"
