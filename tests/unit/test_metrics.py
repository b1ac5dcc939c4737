"""Unit tests for libra_worker.metrics: counting access lines and closing billing periods."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from libra_worker import metrics
from libra_worker.logsink import LogStore, SinkServer
from libra_worker.metrics import (
    MetricsLedger,
    TrafficCounter,
    TrafficTotals,
    access_line_bytes,
    format_time,
    parse_time,
)

HTTP_LINE = (b"Nov 25 20:40:00 haproxy[123]: 127.0.0.1:5555 [25/Nov/2026:20:40:00.123] "
             b"lb-http lb-http/node-1 0/0/0/1/1 %d %d - - ---- 1/1/0/0/0 0/0 "
             b'"GET /a%%20b HTTP/1.1"\n')
TCP_LINE = (b"Nov 25 20:40:00 haproxy[123]: 127.0.0.1:5556 [25/Nov/2026:20:40:00.456] "
            b"lb-tcp lb-tcp/node-1 1/0/2 %d -- 1/1/0/0/0 0/0\n")


@pytest.mark.parametrize("protocol, line, expected", [
    ("http", HTTP_LINE % (200, 24181), 24181),
    ("http", HTTP_LINE % (-1, 0), 0),  # a request aborted before any answer
    ("http", HTTP_LINE.replace(b"lb-http ", b"lb-http~ ", 1) % (503, 217), 217),
    ("http", HTTP_LINE.replace(b" 200 ", b" 200 +", 1) % (200, 31), 31),  # logasap
    ("tcp", TCP_LINE % 2289, 2289),
    ("http", b"Nov 25 20:40:00 haproxy[1]: garbage\n", None),
    ("tcp", HTTP_LINE % (200, 5), None),  # another frontend's line
])
def test_access_line_bytes(protocol, line, expected):
    assert access_line_bytes(protocol, line) == expected


def test_time_format_is_pythons_str_with_microseconds_always():
    moment = datetime(2026, 11, 26, 7, 0, 0)
    assert format_time(moment) == "2026-11-26 07:00:00.000000"
    assert format_time(moment.replace(microsecond=5)) == str(moment.replace(microsecond=5))
    assert parse_time(format_time(moment)) == moment


# ---------------------------------------------------------------------- the sink's counter


def test_the_sink_counts_every_access_line_even_beyond_the_log_cap(tmp_path):
    store = LogStore(tmp_path)
    server = SinkServer(store, max_bytes=1)  # nothing is kept for ARCHIVE
    server.handle_datagram(b"<134>" + HTTP_LINE % (200, 1000))
    server.handle_datagram(b"<134>" + TCP_LINE % 70)
    server.handle_datagram(b"<134>" + HTTP_LINE % (404, 24))
    server.handle_datagram(b"<133>Nov 25 20:40:00 haproxy[1]: Proxy lb-http started.")
    server.flush()
    totals = TrafficTotals.read(tmp_path / metrics.TRAFFIC_FILE_NAME)
    assert totals.bytes_out == {"http": 1024, "tcp": 70}
    assert totals.unreadable_lines == 0
    assert store.dropped_total("http") == 2


def test_a_restarted_sink_continues_the_same_counter(tmp_path):
    first = TrafficCounter(tmp_path)
    first.count("tcp", TCP_LINE % 10)
    first.flush()
    again = TrafficCounter(tmp_path)
    assert (again.totals.epoch, again.totals.since) == (first.totals.epoch, first.totals.since)
    again.count("tcp", TCP_LINE % 5)
    again.count("http", b"Nov 25 20:40:00 haproxy[1]: 1.2.3.4:5 [x] lb-http cut")
    again.flush()
    totals = TrafficTotals.read(tmp_path / metrics.TRAFFIC_FILE_NAME)
    assert totals.bytes_out == {"http": 0, "tcp": 15}
    assert totals.unreadable_lines == 1


# ---------------------------------------------------------------------- the ledger


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock(datetime(2026, 11, 26, 7, 0, 0))
    monkeypatch.setattr(metrics, "utc_now", fake)
    return fake


@pytest.fixture
def log_dir(tmp_path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


def send(counter: TrafficCounter, http: int = 0, tcp: int = 0) -> None:
    if http:
        counter.count("http", HTTP_LINE % (200, http))
    if tcp:
        counter.count("tcp", TCP_LINE % tcp)
    counter.flush()


def test_periods_follow_each_other_and_bill_each_byte_once(tmp_path, log_dir, clock):
    counter = TrafficCounter(log_dir)  # the load balancer is configured at 07:00:00
    ledger = MetricsLedger(tmp_path, log_dir)
    clock.now += timedelta(seconds=30)
    send(counter, http=100, tcp=7)
    first = ledger.report(("http", "tcp"))
    assert (first.utc_start, first.utc_end) == ("2026-11-26 07:00:00.000000",
                                                "2026-11-26 07:00:30.000000")
    assert first.bytes_out == (("http", 100), ("tcp", 7))
    clock.now += timedelta(seconds=60)
    send(counter, http=50)
    # A new ledger object: a restarted worker reads the same file.
    second = MetricsLedger(tmp_path, log_dir).report(("http", "tcp"))
    assert (second.utc_start, second.utc_end) == (first.utc_end, "2026-11-26 07:01:30.000000")
    assert second.bytes_out == (("http", 50), ("tcp", 0))


def test_only_configured_protocols_or_ones_with_unbilled_bytes_are_listed(tmp_path, log_dir, clock):
    counter = TrafficCounter(log_dir)
    ledger = MetricsLedger(tmp_path, log_dir)
    send(counter, tcp=9)
    # The TCP load balancer was removed after sending 9 bytes: they are still billed once.
    assert ledger.report(("http",)).bytes_out == (("http", 0), ("tcp", 9))
    assert ledger.report(("http",)).bytes_out == (("http", 0),)


def test_a_clock_stepped_back_gives_an_empty_period_never_a_backwards_one(tmp_path, log_dir, clock):
    counter = TrafficCounter(log_dir)
    ledger = MetricsLedger(tmp_path, log_dir)
    clock.now += timedelta(minutes=5)
    first = ledger.report(("http",))
    clock.now -= timedelta(minutes=10)
    send(counter, http=3)
    second = ledger.report(("http",))
    assert second.utc_start == second.utc_end == first.utc_end
    assert second.bytes_out == (("http", 3),)


def test_a_counter_made_again_after_delete_starts_a_later_period_from_zero(tmp_path, log_dir, clock):
    counter = TrafficCounter(log_dir)
    ledger = MetricsLedger(tmp_path, log_dir)
    send(counter, http=500)
    clock.now += timedelta(seconds=10)
    ledger.report(("http",))
    (log_dir / metrics.TRAFFIC_FILE_NAME).unlink()  # DELETE removed the logs
    clock.now += timedelta(seconds=10)
    fresh = TrafficCounter(log_dir)
    assert fresh.totals.epoch != counter.totals.epoch
    send(fresh, http=20)
    clock.now += timedelta(seconds=10)
    period = ledger.report(("http",))
    assert period.utc_start == "2026-11-26 07:00:20.000000"  # when it was built again
    assert period.bytes_out == (("http", 20),)


def test_no_counter_yet_reports_an_empty_period(tmp_path, log_dir, clock):
    period = MetricsLedger(tmp_path, log_dir).report(("http",))
    assert period.utc_start == period.utc_end
    assert period.bytes_out == (("http", 0),)


def test_an_unreadable_ledger_starts_from_now_without_billing_old_bytes(tmp_path, log_dir, clock):
    counter = TrafficCounter(log_dir)
    send(counter, http=1000)
    (tmp_path / metrics.LEDGER_FILE_NAME).write_text("{not json")
    clock.now += timedelta(seconds=5)
    period = MetricsLedger(tmp_path, log_dir).report(("http",))
    assert period.bytes_out == (("http", 0),)
    assert json.loads((tmp_path / metrics.LEDGER_FILE_NAME).read_text())["reported"]["http"] == 1000


def test_concurrent_reports_never_bill_the_same_bytes_twice(tmp_path, log_dir):
    counter = TrafficCounter(log_dir)
    ledgers = [MetricsLedger(tmp_path, log_dir) for _ in range(2)]  # two processes' worth
    periods = []
    lock = threading.Lock()

    def report(ledger: MetricsLedger) -> None:
        for _ in range(25):
            period = ledger.report(("http",))
            with lock:
                periods.append(period)

    threads = [threading.Thread(target=report, args=(ledger,)) for ledger in ledgers]
    for thread in threads:
        thread.start()
    for _ in range(50):
        send(counter, http=1)
    for thread in threads:
        thread.join()
    periods.append(ledgers[0].report(("http",)))
    assert sum(sent for period in periods for _, sent in period.bytes_out) == 50
    ordered = sorted(periods, key=lambda period: (period.utc_start, period.utc_end))
    for earlier, later in zip(ordered, ordered[1:]):
        assert earlier.utc_end <= later.utc_start


def test_the_same_job_asked_again_gets_the_same_period(tmp_path, log_dir, clock):
    # The worker died after writing the ledger, before its reply left: the job server
    # gives the same job (handle and unique id) out again.
    counter = TrafficCounter(log_dir)
    clock.now += timedelta(seconds=30)
    send(counter, http=100)
    first = MetricsLedger(tmp_path, log_dir).report(("http",), job="H:gm:7 c0ffee")
    clock.now += timedelta(seconds=30)
    send(counter, http=40)
    again = MetricsLedger(tmp_path, log_dir).report(("http",), job="H:gm:7 c0ffee")
    assert again == first

    following = MetricsLedger(tmp_path, log_dir).report(("http",), job="H:gm:8 beef")
    assert following.utc_start == first.utc_end and following.bytes_out == (("http", 40),)
    # Without an identity nothing is repeated: a bare handle can come back after a restart.
    clock.now += timedelta(seconds=30)
    assert MetricsLedger(tmp_path, log_dir).report(("http",)).utc_start == following.utc_end
    assert MetricsLedger(tmp_path, log_dir).report(("http",)).bytes_out == (("http", 0),)
