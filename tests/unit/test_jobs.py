"""JobRunner: timeouts (a real SIGALRM), the journal entry of each outcome, token masking."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from libra_worker.controller import LBaaSController
from libra_worker.errors import ActionTimeout, WorkerError
from libra_worker import jobs as jobs_module
from libra_worker.jobs import Answer, JobRunner, JobTimeout
from libra_worker.journal import Journal
from libra_worker.messages import Action


class SlowDriver:
    """Only what these tests call: STATS sleeps, ARCHIVE fails naming the token."""

    def __init__(self, stats_seconds: float = 0.0) -> None:
        self.stats_seconds = stats_seconds
        self.finished_stats = 0

    def stats(self) -> Any:
        time.sleep(self.stats_seconds)
        self.finished_stats += 1
        raise WorkerError("HAProxy is not running.")

    def archive(self, request: Any, job: str | None = None) -> dict[str, Any]:
        raise WorkerError(f"Swift refused token {request.token}.")


ARCHIVE = {
    "hpcs_action": "ARCHIVE",
    "hpcs_object_store_type": "swift",
    "hpcs_object_store_basepath": "logs",
    "hpcs_object_store_endpoint": "http://127.0.0.1:1/v1/AUTH_x",
    "hpcs_object_store_token": "SECRET-TOKEN-1234",
    "loadbalancers": [{"id": "15", "protocol": "HTTP"}],
}


def runner(tmp_path: Path, driver: Any, **timeouts: float) -> JobRunner:
    return JobRunner(
        LBaaSController(driver),
        Journal(tmp_path / "jobs.journal"),
        {Action[name.upper()]: seconds for name, seconds in timeouts.items()},
    )


def run(jobs: JobRunner, handle: str, payload: bytes) -> Answer:
    """What the mutating lane does with a job: accept, then execute under the alarm."""
    job = jobs.accept(handle, payload)
    answer = job.refusal or jobs.execute(job, alarm=True)
    assert answer is not None  # nothing else could claim the job
    return answer


def test_a_job_past_its_timeout_is_answered_fail_and_journaled_timeout(tmp_path):
    driver = SlowDriver(stats_seconds=5)
    jobs = runner(tmp_path, driver, stats=0.2)

    started = time.monotonic()
    answer = run(jobs, "H:1", b'{"hpcs_action": "STATS"}')
    reply = answer.reply

    assert time.monotonic() - started < 4  # interrupted, not waited out
    assert answer.action == "STATS"
    assert reply["hpcs_response"] == "FAIL"
    assert reply["hpcs_error"] == "STATS did not finish within its 0.2 s timeout."
    assert driver.finished_stats == 0  # nothing of it kept running
    [record] = Journal(tmp_path / "jobs.journal").recent(5)
    assert (record.action, record.state, record.hpcs_error) == (
        "STATS", "TIMEOUT", "STATS did not finish within its 0.2 s timeout.")


def test_the_alarm_is_disarmed_after_a_job(tmp_path):
    jobs = runner(tmp_path, SlowDriver(), stats=0.2)
    run(jobs, "H:1", b'{"hpcs_action": "STATS"}')

    time.sleep(0.4)  # an armed alarm would fire here and raise out of the test


def test_each_outcome_is_journaled(tmp_path):
    jobs = runner(tmp_path, SlowDriver())
    run(jobs, "H:1", b'{"hpcs_action": "DISCOVER"}')
    run(jobs, "H:2", b'{"hpcs_action": "STATS"}')
    assert run(jobs, "H:3", b"not json").action == "INVALID"

    records = Journal(tmp_path / "jobs.journal").recent(10)
    assert [(r.handle, r.action, r.state) for r in records] == [
        ("H:1", "DISCOVER", "COMPLETE"), ("H:2", "STATS", "FAIL"), ("H:3", "INVALID", "FAIL")]
    assert records[1].hpcs_error == "HAProxy is not running."
    assert all(r.finished and r.duration_ms is not None for r in records)


def test_the_token_is_masked_in_the_journal_but_echoed_in_the_reply(tmp_path):
    reply = run(runner(tmp_path, SlowDriver()), "H:1", json.dumps(ARCHIVE).encode()).reply

    assert reply["hpcs_object_store_token"] == "SECRET-TOKEN-1234"
    journal_text = (tmp_path / "jobs.journal").read_text()
    assert "SECRET-TOKEN-1234" not in journal_text
    assert "Swift refused token ***." in journal_text


def test_job_timeout_never_swallows_the_jobs_own_error():
    with pytest.raises(KeyError):
        with JobTimeout(5, "UPDATE"):
            raise KeyError("mine")


def test_job_timeout_raises_action_timeout_in_the_job():
    with pytest.raises(ActionTimeout, match="UPDATE did not finish within its 0.05 s timeout"):
        with JobTimeout(0.05, "UPDATE"):
            time.sleep(2)


def test_the_journal_keeps_the_whole_error_the_reply_cuts_for_libra(tmp_path):
    sentence = "HAProxy is not running: " + " ".join(["the stats socket said no."] * 10)

    class LongWinded(SlowDriver):
        def stats(self) -> Any:
            raise WorkerError(sentence)

    reply = run(runner(tmp_path, LongWinded()), "H:1", b'{"hpcs_action": "STATS"}').reply
    assert len(reply["hpcs_error"]) <= 128 and reply["hpcs_error_detail"] == sentence
    [record] = Journal(tmp_path / "jobs.journal").recent(5)
    assert record.hpcs_error == sentence


def test_the_job_after_a_large_payload_gives_the_freed_heap_back(tmp_path, monkeypatch):
    trims = []
    monkeypatch.setattr(jobs_module, "release_freed_heap", lambda: trims.append(1))
    jobs = runner(tmp_path, SlowDriver())
    large = b'{"hpcs_action": "DISCOVER", "pad": "' + b"p" * jobs_module.LARGE_PAYLOAD_BYTES + b'"}'

    run(jobs, "H:1", b'{"hpcs_action": "DISCOVER"}')
    run(jobs, "H:2", large)
    assert trims == []  # its own reply still holds the memory
    run(jobs, "H:3", b'{"hpcs_action": "DISCOVER"}')
    assert trims == [1]
    run(jobs, "H:4", b'{"hpcs_action": "DISCOVER"}')
    assert trims == [1]


def test_a_job_that_raises_past_the_controller_still_answers_its_message(tmp_path):
    """The last net: the original message with a FAIL, once, and a journal entry."""
    jobs = runner(tmp_path, SlowDriver())
    job = jobs.accept("H:9", b'{"hpcs_action": "METRICS", "x": 1}')
    answer = jobs.crashed(job, RuntimeError("a bug"))
    assert answer.reply["hpcs_action"] == "METRICS" and answer.reply["x"] == 1
    assert answer.reply["hpcs_response"] == "FAIL" and "internal error" in answer.reply["hpcs_error"]
    assert answer.reply["loadBalancers"] == []  # the keys Libra's billing reads
    assert jobs.crashed(job, RuntimeError("again")) is None  # answered once
    [record] = Journal(tmp_path / "jobs.journal").recent(5)
    assert record.state == "FAIL"
