"""JobLanes: read-only jobs beside a blocked mutating one, FIFO order, one answer per job."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from libra_worker.controller import LBaaSController
from libra_worker.errors import StatsUnavailable
from libra_worker.jobs import JobRunner
from libra_worker.journal import Journal
from libra_worker.lanes import JobLanes
from libra_worker.messages import Action


class GatedDriver:
    """SUSPEND waits for `release`; every mutating call is recorded in order."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []
        self.stats_seconds = 0.0

    def suspend(self) -> None:
        self.calls.append("SUSPEND")
        assert self.release.wait(10)

    def enable(self) -> None:
        self.calls.append("ENABLE")

    def delete(self) -> None:
        self.calls.append("DELETE")

    def stats(self) -> Any:
        time.sleep(self.stats_seconds)
        raise StatsUnavailable("No load balancer is configured yet.", status="NEW")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[JobLanes, GatedDriver, threading.Event]]:
    driver = GatedDriver()
    runner = JobRunner(LBaaSController(driver), Journal(tmp_path / "jobs.journal"),
                       {Action.STATS: 0.3})
    lanes = JobLanes(runner)
    stop = threading.Event()
    try:
        yield lanes, driver, stop
    finally:
        driver.release.set()
        stop.set()
        lanes.close()


def collect(lanes: JobLanes, count: int, within: float = 5.0) -> list[tuple[Any, str, str]]:
    """Poll `answers()` as the Gearman loop does until `count` answers came."""
    answers: list[tuple[Any, str, str]] = []
    deadline = time.monotonic() + within
    while len(answers) < count and time.monotonic() < deadline:
        for item, answer in lanes.answers():
            answers.append((item.token, answer.action, answer.reply["hpcs_response"]))
        time.sleep(0.01)
    return answers


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
    lanes.take("suspend", "H:1", b'{"hpcs_action": "SUSPEND"}')
    lanes.take("enable", "H:2", b'{"hpcs_action": "ENABLE"}')
    lanes.take("discover", "H:3", b'{"hpcs_action": "DISCOVER"}')
    lanes.take("stats", "H:4", b'{"hpcs_action": "STATS"}')
    lanes.take("invalid", "H:5", b"not json")

    first = collect(lanes, 3)
    assert sorted(first) == [("discover", "DISCOVER", "PASS"), ("invalid", "INVALID", "FAIL"),
                             ("stats", "STATS", "FAIL")]
    assert driver.calls == ["SUSPEND"] and lanes.busy()

    driver.release.set()
    assert collect(lanes, 2) == [("suspend", "SUSPEND", "PASS"), ("enable", "ENABLE", "PASS")]
    assert driver.calls == ["SUSPEND", "ENABLE"] and not lanes.busy()


def test_a_read_only_job_past_its_timeout_is_answered_once(setup):
    lanes, driver, _stop = setup
    driver.stats_seconds = 1.0
    lanes.take("stats", "H:1", b'{"hpcs_action": "STATS"}')
    deadline = lanes.next_deadline()
    assert deadline is not None

    answers = collect(lanes, 1)
    assert answers == [("stats", "STATS", "FAIL")]
    time.sleep(1.2)  # the reader finishes late: its answer must not be sent again
    assert collect(lanes, 1, within=0.2) == [] and not lanes.busy()
    states = [record.state for record in lanes.runner.journal.recent(5)]
    assert states == ["TIMEOUT"]


def test_a_mutating_job_whose_connection_was_lost_is_skipped(setup, monkeypatch):
    lanes, driver, stop = setup
    run_mutating_in_background(lanes, stop, monkeypatch, still_held=lambda token: token != "lost")
    lanes.take("lost", "H:1", b'{"hpcs_action": "DELETE"}')
    lanes.take("kept", "H:2", b'{"hpcs_action": "ENABLE"}')

    assert collect(lanes, 1) == [("kept", "ENABLE", "PASS")]
    assert driver.calls == ["ENABLE"] and not lanes.busy()
