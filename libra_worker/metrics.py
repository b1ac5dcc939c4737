"""METRICS: the bytes each load balancer sent to its clients, exact enough to bill.

The bytes are counted from HAProxy's access log, not from its stats counters. Every
request (HTTP) or connection (TCP) ends in one log line carrying the bytes sent to the
client, headers included (``%B``), and the log sink receives the lines of every HAProxy
process: the current workers, the old ones still finishing connections after a reload,
and the ones started after a crash. Stats counters, in contrast, live and die with each
process, so an old worker's last bytes after a reload would be lost between two samples.

Two halves, one on each side of the log socket:

* `TrafficCounter` runs in the log sink: it adds each access line's bytes to a running
  total per protocol and writes the totals to ``logs/traffic.json`` every second (and
  when the sink stops). The file has an ``epoch``, a random id made with the counter, and
  ``since``, when it was made (the first UPDATE that started the sink): a counter made
  again, after DELETE for instance, is never mistaken for the old one.
* `MetricsLedger` runs in the worker: a METRICS reply covers ``[utc_start, utc_end)``;
  its ``bytes_out`` is the counter now minus the counter at the previous reply. The end
  and the counter it reported are written atomically to ``metrics.json`` *before* the
  reply leaves, so a reply never counts a byte twice and the next period starts where
  this one ended. A reply lost on its way (a job server dying with it) takes its bytes
  with it: the gap shows as a ``utc_start`` later than the last ``utc_end`` the API
  server stored. Never billing a byte twice is the rule chosen over never losing one.
  One case is recovered: a worker that dies after writing the ledger but before its reply
  left. The job server then gives the same job (same handle and unique id) to the worker
  again, and the ledger, which keeps the job's identity and the period it reported,
  answers that period again instead of the next one. The first reply never reached the
  API server, so the period is billed once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

from libra_worker.fileutil import atomic_write

LOG = logging.getLogger(__name__)

TRAFFIC_FILE_NAME = "traffic.json"
LEDGER_FILE_NAME = "metrics.json"
LEDGER_LOCK_NAME = "metrics.lock"
PROTOCOLS = ("http", "tcp")
# Python's str(datetime) with the microseconds always present, as Libra's servers parse it.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

# After the accept date: frontend, backend/server, timers, then (HTTP) the status code
# and the bytes read from the server, or (TCP) the bytes. A '+' marks `option logasap`.
_BYTES_FIELD = {
    "http": re.compile(rb"\] lb-http~? \S+ \S+ -?\d+ \+?(\d+) "),
    "tcp": re.compile(rb"\] lb-tcp~? \S+ \S+ \+?(\d+) "),
}


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def format_time(moment: datetime) -> str:
    return moment.strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT)


def access_line_bytes(protocol: str, line: bytes) -> int | None:
    """The bytes sent to the client that one access line reports, or None if unreadable."""
    match = _BYTES_FIELD[protocol].search(line)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- the sink's half


@dataclass
class TrafficTotals:
    """What ``traffic.json`` holds."""

    epoch: str
    since: str
    bytes_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROTOCOLS, 0))
    unreadable_lines: int = 0

    @classmethod
    def read(cls, path: Path) -> "TrafficTotals | None":
        """The totals on disk; None when there is no counter (yet) or it is unreadable."""
        try:
            raw = json.loads(path.read_text("utf-8"))
            return cls(
                epoch=str(raw["epoch"]),
                since=format_time(parse_time(raw["since"])),
                bytes_out={protocol: int(raw["bytes_out"].get(protocol, 0))
                           for protocol in PROTOCOLS},
                unreadable_lines=int(raw.get("unreadable_lines", 0)),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            LOG.error("Ignoring unreadable traffic counter %s: %s", path, exc)
            return None

    def write(self, path: Path) -> None:
        document = {"epoch": self.epoch, "since": self.since, "bytes_out": self.bytes_out,
                    "unreadable_lines": self.unreadable_lines}
        atomic_write(path, json.dumps(document) + "\n")


class TrafficCounter:
    """Counts the bytes of the access lines the sink receives; kept in ``traffic.json``."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / TRAFFIC_FILE_NAME
        existing = TrafficTotals.read(self.path)
        if existing is None:
            existing = TrafficTotals(epoch=uuid.uuid4().hex, since=format_time(utc_now()))
            existing.write(self.path)  # `since` is now: when this load balancer began
        self.totals = existing
        self.dirty = False

    def count(self, protocol: str, line: bytes) -> None:
        sent = access_line_bytes(protocol, line)
        if sent is None:
            self.totals.unreadable_lines += 1
        else:
            self.totals.bytes_out[protocol] += sent
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self.totals.write(self.path)
            self.dirty = False


# --------------------------------------------------------------------------- the worker's half


@dataclass(frozen=True)
class MetricsPeriod:
    """One METRICS reply: what each protocol sent during [utc_start, utc_end)."""

    utc_start: str
    utc_end: str
    bytes_out: tuple[tuple[str, int], ...]  # (lower-case protocol, bytes), http first


@dataclass(frozen=True)
class _LedgerEntry:
    epoch: str | None
    utc_end: datetime
    reported: Mapping[str, int]
    job: str | None = None  # the job that reported this period, when it had an identity
    period: MetricsPeriod | None = None


class MetricsLedger:
    """The periods already reported, in ``metrics.json``; one report at a time.

    Reports are serialized by a thread lock and a file lock: two METRICS, from two job
    threads or two processes, must never both report the same bytes.
    """

    def __init__(self, state_dir: Path, log_dir: Path) -> None:
        self.path = state_dir / LEDGER_FILE_NAME
        self.lock_path = state_dir / LEDGER_LOCK_NAME
        self.traffic_path = log_dir / TRAFFIC_FILE_NAME
        self._lock = threading.Lock()

    def report(self, configured: tuple[str, ...], job: str | None = None) -> MetricsPeriod:
        """Close the current period and return it.

        Args:
            configured: the lower-case protocols of the configured load balancers; each
                is listed even with 0 bytes. A protocol no longer configured is listed
                while it still has bytes not yet reported.
            job: the job's identity (job server handle and unique id); the same job asked
                again gets the same period (its first reply was lost with the worker).
        """
        with self._exclusive():
            traffic = TrafficTotals.read(self.traffic_path)
            previous = self._read()
            if job and previous is not None and previous.job == job and previous.period:
                LOG.warning("METRICS job %s again (its reply was lost): the same period", job)
                return previous.period
            now = utc_now()
            starts = [moment for moment in (
                previous.utc_end if previous else None,
                parse_time(traffic.since) if traffic else None,
            ) if moment is not None]
            start = max(starts) if starts else now
            end = max(now, start)  # a clock stepped back gives an empty period, never a negative one
            counted = dict(traffic.bytes_out) if traffic else dict.fromkeys(PROTOCOLS, 0)
            same_counter = previous is not None and traffic is not None and previous.epoch == traffic.epoch
            baseline = previous.reported if same_counter else dict.fromkeys(PROTOCOLS, 0)
            sent = {protocol: counted[protocol] - baseline.get(protocol, 0) for protocol in PROTOCOLS}
            if any(value < 0 for value in sent.values()):
                LOG.error("The traffic counter went backwards (%s after %s); reporting from 0",
                          counted, dict(baseline))
                sent = {protocol: max(value, 0) for protocol, value in sent.items()}
            listed = tuple((protocol, sent[protocol]) for protocol in PROTOCOLS
                           if protocol in configured or sent[protocol] > 0)
            period = MetricsPeriod(format_time(start), format_time(end), listed)
            self._write(_LedgerEntry(traffic.epoch if traffic else None, end, counted, job, period))
        return period

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)

    def _read(self) -> _LedgerEntry | None:
        try:
            raw = json.loads(self.path.read_text("utf-8"))
            period = raw.get("period")
            return _LedgerEntry(
                epoch=raw.get("epoch"),
                utc_end=parse_time(raw["utc_end"]),
                reported={protocol: int(raw["reported"].get(protocol, 0)) for protocol in PROTOCOLS},
                job=raw.get("job"),
                period=MetricsPeriod(
                    format_time(parse_time(period["utc_start"])),
                    format_time(parse_time(period["utc_end"])),
                    tuple((str(protocol), int(sent)) for protocol, sent in period["bytes_out"]),
                ) if period else None,
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only a hand edit can do this (the file is replaced atomically). Starting over
            # from the counter's beginning could bill old bytes again, so start from now.
            LOG.error("Unreadable METRICS ledger %s (%s): the next period starts now", self.path, exc)
            traffic = TrafficTotals.read(self.traffic_path)
            return _LedgerEntry(traffic.epoch if traffic else None, utc_now(),
                                dict(traffic.bytes_out) if traffic else {})

    def _write(self, entry: _LedgerEntry) -> None:
        document = {"epoch": entry.epoch, "utc_end": format_time(entry.utc_end),
                    "reported": dict(entry.reported), "job": entry.job,
                    "period": {"utc_start": entry.period.utc_start, "utc_end": entry.period.utc_end,
                               "bytes_out": [list(item) for item in entry.period.bytes_out]}
                    if entry.period else None}
        atomic_write(self.path, json.dumps(document) + "\n")
