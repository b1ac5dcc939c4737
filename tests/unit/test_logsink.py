"""Unit tests for libra_worker.logsink: parsing, cap, hand-over, process control."""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from libra_worker import __version__, logsink
from libra_worker.drivers.haproxy.process import process_alive
from libra_worker.errors import WorkerError
from libra_worker.logsink import (LogSink, LogStore, ProtocolWriter, SinkServer,
                                  parse_datagram)

HTTP_LINE = (b'Nov 25 20:40:00 haproxy[123]: 127.0.0.1:5555 [25/Nov/2026:20:40:00.123] '
             b'lb-http lb-http/node-1 0/0/0/1/1 200 10 - - ---- 1/1/0/0/0 0/0 '
             b'"GET /%d HTTP/1.1"')
TCP_LINE = (b'Nov 25 20:40:00 haproxy[123]: 127.0.0.1:5556 [25/Nov/2026:20:40:00.456] '
            b'lb-tcp b-tcp/node-1 1/0/2 2289 -- 1/1/0/0/0 0/0')


def http_datagram(number: int) -> bytes:
    return b"<134>" + HTTP_LINE % number + b"\n"


@pytest.fixture
def store(tmp_path: Path) -> LogStore:
    return LogStore(tmp_path)


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class TestParseDatagram:
    def test_http_line_loses_only_the_priority(self) -> None:
        assert parse_datagram(http_datagram(7)) == ("http", HTTP_LINE % 7 + b"\n")

    def test_tcp_line(self) -> None:
        assert parse_datagram(b"<134>" + TCP_LINE) == ("tcp", TCP_LINE + b"\n")

    def test_ssl_frontend_marker_and_hostname_header(self) -> None:
        datagram = (b"<134>Nov 25 20:40:00 localhost haproxy[1]: 10.0.0.1:1 "
                    b"[25/Nov/2026:20:40:00.1] lb-http~ lb-http/n 0/0/0/1/1 200")
        assert parse_datagram(datagram)[0] == "http"

    @pytest.mark.parametrize("datagram", [
        b"<132>Nov 25 20:32:08 haproxy[1]: Proxy lb-http stopped (FE: 2, BE: 0).\n",
        b"<134>Nov 25 20:40:00 haproxy[1]: 127.0.0.1:5 [25/Nov/2026:20:40:00.1] "
        b"other-fe be/srv 0/0/0/1/1 200",
        b"",
    ])
    def test_ignores_everything_but_our_access_lines(self, datagram: bytes) -> None:
        assert parse_datagram(datagram) is None

    def test_strips_trailing_nul(self) -> None:
        assert parse_datagram(b"<134>" + TCP_LINE + b"\n\0")[1] == TCP_LINE + b"\n"


class TestProtocolWriter:
    def test_splits_by_frontend(self, store: LogStore) -> None:
        server = SinkServer(store, max_bytes=10_000)
        server.handle_datagram(http_datagram(1))
        server.handle_datagram(b"<134>" + TCP_LINE)
        server.handle_datagram(http_datagram(2))
        assert store.active_path("http").read_bytes() == (
            HTTP_LINE % 1 + b"\n" + HTTP_LINE % 2 + b"\n")
        assert store.active_path("tcp").read_bytes() == TCP_LINE + b"\n"

    def test_cap_counts_dropped_lines(self, store: LogStore) -> None:
        line_size = len(HTTP_LINE % 0) + 1
        writer = ProtocolWriter(store, "http", max_bytes=3 * line_size)
        for number in range(5):
            writer.write(HTTP_LINE % number + b"\n")
        writer.flush_counter()
        assert store.active_path("http").read_bytes().count(b"\n") == 3
        assert store.dropped_total("http") == 2
        assert store.dropped_unreported("http") == (2, 2)

    def test_cap_includes_pending_files_and_frees_after_retire(
            self, store: LogStore) -> None:
        line = HTTP_LINE % 0 + b"\n"
        writer = ProtocolWriter(store, "http", max_bytes=2 * len(line))
        writer.write(line)
        pending = store.rotate("http")
        writer.write(line)
        writer.write(line)
        assert writer.dropped == 1
        pending.unlink()
        writer.write(line)
        assert writer.dropped == 1
        assert store.active_path("http").read_bytes() == line * 2

    def test_counter_survives_restart(self, store: LogStore) -> None:
        writer = ProtocolWriter(store, "tcp", max_bytes=1)
        writer.write(TCP_LINE + b"\n")
        writer.flush_counter()
        assert ProtocolWriter(store, "tcp", max_bytes=1).dropped == 1

    def test_no_line_reaches_a_file_after_it_became_pending(
            self, store: LogStore) -> None:
        writer = ProtocolWriter(store, "http", max_bytes=10_000)
        writer.write(b"old\n")
        pending = store.rotate("http")
        writer.write(b"new\n")
        assert pending.read_bytes() == b"old\n"
        assert store.active_path("http").read_bytes() == b"new\n"
        writer.close()


class TestLogStore:
    def test_rotate_without_lines_is_a_no_op(self, store: LogStore) -> None:
        assert store.rotate("http") is None
        store.active_path("http").touch()
        assert store.rotate("http") is None
        assert store.pending_paths("http") == []

    def test_pending_files_sort_oldest_first(self, store: LogStore) -> None:
        rotated = []
        for text in (b"a\n", b"b\n", b"c\n"):
            store.active_path("tcp").write_bytes(text)
            rotated.append(store.rotate("tcp"))
        assert store.pending_paths("tcp") == rotated
        assert store.stored_bytes("tcp") == 6

    def test_stamps_never_repeat_nor_go_back_with_the_clock(
            self, store: LogStore, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = iter([2_000, 2_000, 1_000])  # a second rotation in the same ns, then set back
        monkeypatch.setattr(logsink.time, "time_ns", lambda: next(clock))
        stamps = []
        for text in (b"a\n", b"b\n", b"c\n"):
            store.active_path("http").write_bytes(text)
            stamps.append(logsink.pending_stamp(store.rotate("http")))
        assert stamps == [2_000, 2_001, 2_002]
        assert [path.read_bytes() for path in store.pending_paths("http")] == [
            b"a\n", b"b\n", b"c\n"]

    def test_restamp_moves_a_pending_file_after_the_others(
            self, store: LogStore) -> None:
        for text in (b"a\n", b"b\n"):
            store.active_path("http").write_bytes(text)
            store.rotate("http")
        oldest, newest = store.pending_paths("http")
        moved = store.restamp("http", oldest)
        assert logsink.pending_stamp(moved) > logsink.pending_stamp(newest)
        assert store.pending_paths("http") == [newest, moved]
        assert moved.read_bytes() == b"a\n"

    def test_reported_counter_only_reports_the_difference(
            self, store: LogStore) -> None:
        store.dropped_path("http").write_text("5\n")
        store.mark_dropped_reported("http", 3)
        assert store.dropped_unreported("http") == (5, 2)
        assert not list(store.directory.glob(".*.tmp"))


@pytest.fixture
def sink(tmp_path: Path):
    sink = LogSink(tmp_path / "state", max_bytes=4096)
    yield sink
    sink.stop()


def send(sink: LogSink, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        for datagram in datagrams:
            client.sendto(datagram, str(sink.socket_path))


class TestLogSinkProcess:
    def test_starts_detached_collects_and_stops(self, sink: LogSink) -> None:
        sink.ensure_running()
        pid = sink.pid()
        assert pid and pid != os.getpid()
        assert os.getsid(pid) != os.getsid(0)
        send(sink, http_datagram(1), b"<134>" + TCP_LINE)
        wait_for(lambda: sink.store.stored_bytes("tcp") > 0)
        sink.stop()
        assert not sink.is_running()
        assert not sink.pidfile.exists() and not sink.socket_path.exists()
        assert sink.store.active_path("http").read_bytes() == HTTP_LINE % 1 + b"\n"

    def test_a_launch_that_does_not_finish_in_time_is_a_worker_error(self, sink: LogSink) -> None:
        # No Python starts within a millisecond: the launcher is killed, the job says why.
        with pytest.raises(WorkerError, match="did not start within 0.001 s"):
            sink.ensure_running(timeout=0.001)

    def test_adopts_a_running_sink(self, sink: LogSink) -> None:
        sink.ensure_running()
        pid = sink.pid()
        other = LogSink(sink.state_dir, max_bytes=4096)
        other.ensure_running()
        assert other.pid() == pid

    def test_second_process_exits_without_stealing_the_socket(
            self, sink: LogSink) -> None:
        sink.ensure_running()
        inode = sink.socket_path.stat().st_ino
        assert logsink.main(["--state-dir", str(sink.state_dir)]) == 0
        assert sink.socket_path.stat().st_ino == inode

    def test_restart_replaces_stale_pidfile_and_socket(self, sink: LogSink) -> None:
        sink.log_dir.mkdir(parents=True)
        sink.pidfile.write_text("1\n")
        sink.socket_path.write_text("stale")
        sink.ensure_running()
        assert sink.pid() != 1
        send(sink, http_datagram(3))
        wait_for(lambda: sink.store.stored_bytes("http") > 0)

    def test_dropped_count_is_flushed_while_running(self, sink: LogSink) -> None:
        sink.ensure_running()
        active = sink.store.active_path("http")
        send(sink, *(http_datagram(n) for n in range(40)))

        def all_accounted_for() -> bool:
            stored = active.read_bytes().count(b"\n") if active.exists() else 0
            return stored + sink.store.dropped_total("http") == 40

        wait_for(all_accounted_for)
        assert sink.store.dropped_total("http") > 0
        assert sink.store.stored_bytes("http") <= 4096

    def test_remove_logs_stops_and_deletes(self, sink: LogSink) -> None:
        sink.ensure_running()
        send(sink, http_datagram(1))
        wait_for(lambda: sink.store.stored_bytes("http") > 0)
        sink.remove_logs()
        assert not sink.is_running()
        assert not sink.log_dir.exists()

    def test_rejects_a_non_positive_cap(self, tmp_path: Path) -> None:
        with pytest.raises(SystemExit):
            logsink.main(["--state-dir", str(tmp_path), "--max-bytes", "0"])


class Sender:
    """Sends numbered access lines to the sink's socket path, one sendto() each, as
    HAProxy does, until stopped; blocking, so every line sent is queued somewhere."""

    def __init__(self, sink: LogSink) -> None:
        self.sink = sink
        self.sent = 0
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            while not self.stopping:
                client.sendto(http_datagram(self.sent), str(self.sink.socket_path))
                self.sent += 1
                time.sleep(0.001)

    def __enter__(self) -> "Sender":
        self.thread.start()
        wait_for(lambda: self.sent > 50)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        self.thread.join()


def stored_numbers(sink: LogSink) -> list[int]:
    """The numbers of the stored lines, in file order."""
    text = sink.store.active_path("http").read_bytes()
    return [int(number) for number in re.findall(rb'"GET /(-?\d+) ', text)]


class TestUpgradeHandOver:
    """A sink started from other code is replaced by one on this code, losing no line."""

    @pytest.mark.parametrize("previous", ["older release", "sink without identity"])
    def test_replaces_the_sink_of_other_code_without_losing_a_line(
            self, sink: LogSink, previous: str) -> None:
        sink = LogSink(sink.state_dir, max_bytes=10_000_000)
        sink.ensure_running()
        old_pid = sink.pid()
        if previous == "older release":
            sink.identity_file.write_text("libra-worker 1.0.9, Python 3.11.2, sources 0\n")
        else:
            sink.identity_file.unlink()
        with Sender(sink) as sender:
            sink.ensure_running()
            new_pid = sink.pid()
            count_at_handover = sender.sent
            wait_for(lambda: sender.sent > count_at_handover + 100)
        assert new_pid not in (None, old_pid)
        assert sink.running_identity() == logsink.code_identity()
        wait_for(lambda: not process_alive(old_pid))
        wait_for(lambda: len(stored_numbers(sink)) >= sender.sent)
        assert sorted(stored_numbers(sink)) == list(range(sender.sent))
        # The socket path still leads to the new sink after the old one is gone.
        send(sink, http_datagram(-1))
        wait_for(lambda: len(stored_numbers(sink)) == sender.sent + 1)
        events = (sink.log_dir / logsink.EVENTS_LOG_NAME).read_text()
        assert f"handing over to pid {new_pid}" in events

    def test_a_sink_of_the_same_code_is_adopted(self, sink: LogSink) -> None:
        sink.ensure_running()
        pid = sink.pid()
        assert sink.running_identity() == logsink.code_identity()
        sink.ensure_running()
        assert sink.pid() == pid

    def test_identity_names_release_python_and_sources(self) -> None:
        identity = logsink.code_identity()
        assert identity.startswith(f"libra-worker {__version__}, Python {sys.version.split()[0]}")
        assert identity.split("sources ")[1].isalnum()


def test_a_stopping_sink_writes_the_lines_still_queued(store: LogStore) -> None:
    server = SinkServer(store, max_bytes=10_000)
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with receiver, sender:
        for number in range(5):
            sender.send(http_datagram(number))
        server.stopping = True  # asked to stop before it read any of them
        server.serve(receiver)
    assert store.active_path("http").read_bytes().count(b"\n") == 5
