"""JobLanes: pings in place within a bound, read-only jobs beside a blocked mutating one,
FIFO order, one answer per job."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from libra_worker.controller import LBaaSController
from libra_worker.drivers.haproxy.sockets import StatusQuery
from libra_worker.errors import StatsUnavailable, WorkerError
from libra_worker.jobs import JobRunner
from libra_worker.journal import Journal
from libra_worker import lanes as lanes_module
from libra_worker.lanes import JobLanes
from libra_worker.messages import Action


class GatedDriver:
    """SUSPEND waits for `release`; every mutating call is recorded in order. STATS reads
    `stats_socket` when one is set; METRICS takes `metrics_seconds`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []
        self.metrics_seconds = 0.0
        self.stats_socket: Path | None = None
        self.stats_seconds = 0.0
        self.stats_threads: list[str] = []

    def suspend(self) -> None:
        self.calls.append("SUSPEND")
        assert self.release.wait(10)

    def enable(self) -> None:
        self.calls.append("ENABLE")

    def delete(self) -> None:
        self.calls.append("DELETE")

    def stats(self) -> Any:
        self.stats_threads.append(threading.current_thread().name)
        time.sleep(self.stats_seconds)  # as a parse of many servers would hold the thread
        if self.stats_socket is not None:
            StatusQuery(self.stats_socket, timeout=0.5).statuses()
        raise StatsUnavailable("No load balancer is configured yet.", status="NEW")

    def metrics(self, _job: str | None) -> Any:
        time.sleep(self.metrics_seconds)
        raise WorkerError("No load balancer is configured yet.", status="NEW")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[JobLanes, GatedDriver, threading.Event]]:
    driver = GatedDriver()
    runner = JobRunner(LBaaSController(driver), Journal(tmp_path / "jobs.journal"),
                       {Action.METRICS: 0.3})
    lanes = JobLanes(runner)
    stop = threading.Event()
    try:
        yield lanes, driver, stop
    finally:
        driver.release.set()
        stop.set()
        lanes.close()


def collect(lanes: JobLanes, count: int, within: float = 5.0) -> list[tuple[Any, str, str]]:
    """Poll `answers()` and write the journal as the Gearman loop does until `count`
    answers came."""
    answers: list[tuple[Any, str, str]] = []
    deadline = time.monotonic() + within
    while len(answers) < count and time.monotonic() < deadline:
        for item, answer in lanes.answers():
            answers.append((item.token, answer.action, answer.reply["hpcs_response"]))
        lanes.write_journal()
        time.sleep(0.01)
    return answers


def take(lanes: JobLanes, token: str, handle: str, payload: bytes) -> tuple[str, str] | None:
    """`lanes.take`: the action and outcome of an answer given at once, else None."""
    _item, answer = lanes.take(token, handle, payload)
    return None if answer is None else (answer.action, answer.reply["hpcs_response"])


def run_mutating_in_background(lanes: JobLanes, stop: threading.Event, monkeypatch: Any,
                               still_held: Any = lambda token: True) -> None:
    """The mutating lane on a test thread: the alarm only works on the main thread, and
    these jobs have no timeout to enforce."""
    execute = lanes.runner.execute
    monkeypatch.setattr(lanes.runner, "execute", lambda job, alarm: execute(job, alarm=False))
    threading.Thread(target=lanes.run_mutating, daemon=True,
                     kwargs={"stop": stop.is_set, "still_held": still_held}).start()


def test_read_only_jobs_are_answered_while_a_mutating_job_blocks(setup, monkeypatch):
    lanes, driver, stop = setup
    run_mutating_in_background(lanes, stop, monkeypatch)
    assert take(lanes, "suspend", "H:1", b'{"hpcs_action": "SUSPEND"}') is None
    assert take(lanes, "enable", "H:2", b'{"hpcs_action": "ENABLE"}') is None
    # Pings and refusals are answered in place, by `take` itself.
    assert take(lanes, "discover", "H:3", b'{"hpcs_action": "DISCOVER"}') == ("DISCOVER", "PASS")
    assert take(lanes, "stats", "H:4", b'{"hpcs_action": "STATS"}') == ("STATS", "FAIL")
    assert take(lanes, "invalid", "H:5", b"not json") == ("INVALID", "FAIL")
    # The others on a reader thread.
    assert take(lanes, "metrics", "H:6", b'{"hpcs_action": "METRICS"}') is None

    assert collect(lanes, 1) == [("metrics", "METRICS", "FAIL")]
    assert driver.calls == ["SUSPEND"] and lanes.busy()

    driver.release.set()
    assert collect(lanes, 2) == [("suspend", "SUSPEND", "PASS"), ("enable", "ENABLE", "PASS")]
    assert driver.calls == ["SUSPEND", "ENABLE"] and not lanes.busy()


def test_jobs_answered_in_place_have_one_journal_line_the_others_a_running_one_first(
        setup, monkeypatch, tmp_path):
    lanes, driver, stop = setup
    run_mutating_in_background(lanes, stop, monkeypatch)
    take(lanes, "discover", "H:1", b'{"hpcs_action": "DISCOVER"}')
    take(lanes, "invalid", "H:2", b"not json")
    take(lanes, "metrics", "H:3", b'{"hpcs_action": "METRICS"}')
    take(lanes, "suspend", "H:4", b'{"hpcs_action": "SUSPEND"}')
    lines = (tmp_path / "jobs.journal").read_text().splitlines()
    # The reader's and the mutating job's RUNNING lines are there before they end; the
    # lines of the jobs answered in place come once the loop wrote their answers.
    assert any('"H:3"' in line and '"RUNNING"' in line for line in lines)
    assert any('"H:4"' in line and '"RUNNING"' in line for line in lines)
    assert not any('"H:1"' in line or '"H:2"' in line for line in lines)

    driver.release.set()
    collect(lanes, 2)
    lines = (tmp_path / "jobs.journal").read_text().splitlines()
    states = {handle: [line.split('"state": "')[1].split('"')[0] for line in lines
                       if f'"{handle}"' in line] for handle in ("H:1", "H:2", "H:3", "H:4")}
    assert states == {"H:1": ["COMPLETE"], "H:2": ["FAIL"], "H:3": ["RUNNING", "FAIL"],
                      "H:4": ["RUNNING", "COMPLETE"]}


def test_a_read_only_job_past_its_timeout_is_answered_once(setup):
    lanes, driver, _stop = setup
    driver.metrics_seconds = 1.0
    assert take(lanes, "metrics", "H:1", b'{"hpcs_action": "METRICS"}') is None
    deadline = lanes.next_deadline()
    assert deadline is not None

    answers = collect(lanes, 1)
    assert answers == [("metrics", "METRICS", "FAIL")]
    time.sleep(1.2)  # the reader finishes late: its answer must not be sent again
    assert collect(lanes, 1, within=0.2) == [] and not lanes.busy()
    states = [record.state for record in lanes.runner.journal.recent(5)]
    assert states == ["TIMEOUT"]


def test_a_stats_whose_socket_stalls_moves_to_a_reader_and_stays_there_a_while(setup, tmp_path):
    lanes, driver, _stop = setup
    # A stats socket that accepts (the kernel does) and never answers: a frozen HAProxy.
    driver.stats_socket = tmp_path / "stats.sock"
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.bind(str(driver.stats_socket))
    stalled.listen(8)
    try:
        assert take(lanes, "stats-1", "H:1", b'{"hpcs_action": "STATS"}') is None
        # The loop is free again: pings of other kinds still run in place, STATS does not.
        assert take(lanes, "discover", "H:2", b'{"hpcs_action": "DISCOVER"}') == ("DISCOVER", "PASS")
        assert take(lanes, "stats-2", "H:3", b'{"hpcs_action": "STATS"}') is None

        answers = collect(lanes, 2)
        assert sorted(answers) == [("stats-1", "STATS", "FAIL"), ("stats-2", "STATS", "FAIL")]
        assert not lanes.busy()
    finally:
        stalled.close()
    # The first ran in place until its bound, then again on a reader; the second on a
    # reader only. Each was journaled and answered once, by the reader's own timeout.
    assert [name.startswith("read-only-job") for name in driver.stats_threads] == [False, True, True]
    records = lanes.runner.journal.recent(5)
    assert sorted((r.handle, r.state) for r in records) == [("H:1", "FAIL"), ("H:2", "COMPLETE"),
                                                             ("H:3", "FAIL")]
    assert all("stats socket does not answer" in r.hpcs_error for r in records if r.state == "FAIL")


def test_a_stats_that_held_the_loop_past_the_bound_sends_the_next_ones_to_a_reader(tmp_path):
    driver = GatedDriver()
    runner = JobRunner(LBaaSController(driver), Journal(tmp_path / "jobs.journal"))
    lanes = JobLanes(runner, in_place_budget=0.01)
    driver.stats_seconds = 0.05  # no wait the bound can cut: it is answered all the same
    try:
        assert take(lanes, "stats-1", "H:1", b'{"hpcs_action": "STATS"}') == ("STATS", "FAIL")
        driver.stats_seconds = 0.0
        assert take(lanes, "stats-2", "H:2", b'{"hpcs_action": "STATS"}') is None
        assert take(lanes, "discover", "H:3", b'{"hpcs_action": "DISCOVER"}') == ("DISCOVER", "PASS")
        assert collect(lanes, 1) == [("stats-2", "STATS", "FAIL")]
    finally:
        lanes.close()
    assert [name.startswith("read-only-job") for name in driver.stats_threads] == [False, True]


def test_a_mutating_job_whose_connection_was_lost_is_skipped(setup, monkeypatch):
    lanes, driver, stop = setup
    run_mutating_in_background(lanes, stop, monkeypatch, still_held=lambda token: token != "lost")
    assert take(lanes, "lost", "H:1", b'{"hpcs_action": "DELETE"}') is None
    assert take(lanes, "kept", "H:2", b'{"hpcs_action": "ENABLE"}') is None

    assert collect(lanes, 1) == [("kept", "ENABLE", "PASS")]
    assert driver.calls == ["ENABLE"] and not lanes.busy()


class Hung(Exception):
    pass


def test_a_signal_handler_that_outlasts_the_idle_wait_does_not_hide_the_stop(setup):
    """SIGTERM's handler runs on the main thread, where the mutating lane waits for jobs;
    one that ends after the wait's timeout must not leave that wait blocked for good."""
    lanes, _driver, stop = setup

    def slow_stop(_signum, _frame):
        time.sleep(3 * lanes_module._IDLE_CHECK)  # a log write on a loaded machine, say
        stop.set()

    def hung(_signum, _frame):
        raise Hung

    previous = signal.signal(signal.SIGUSR1, slow_stop), signal.signal(signal.SIGUSR2, hung)
    threading.Timer(lanes_module._IDLE_CHECK / 4, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    watchdog = threading.Timer(10, os.kill, (os.getpid(), signal.SIGUSR2))
    watchdog.start()
    try:
        lanes.run_mutating(stop=stop.is_set, still_held=lambda _token: True)
    except Hung:
        pytest.fail("the mutating lane never looked at stop() again after the signal")
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGUSR1, previous[0])
        signal.signal(signal.SIGUSR2, previous[1])
