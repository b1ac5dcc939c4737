"""Read-only jobs are never blocked; mutating jobs keep their order (real gearmand, real worker).

The mutating job that stalls is an ARCHIVE whose Swift endpoint is a listening socket that
accepts the connection and never answers (`[archive] timeout` bounds it). While it waits,
DISCOVER, STATS, METRICS and DIAGNOSTICS are answered; an UPDATE and a SUSPEND sent
after it wait for it and run in the order they were sent; a SIGTERM then still answers
every job in hand before the worker exits. A STATS run in place on the Gearman loop
while HAProxy is frozen leaves it within its bound, and the DISCOVERs behind it are answered.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from libra_worker.journal import JOURNAL_NAME, Journal
from tests.integration.support import (
    LOOPBACK,
    SilentEndpoint,
    Worker,
    lb,
    request_once,
    update,
    wait_until,
)

ARCHIVE_STALL = 8.0  # [archive] timeout: how long the stalled ARCHIVE holds the mutating lane
READ_ONLY = ("DISCOVER", "STATS", "METRICS", "DIAGNOSTICS")


@pytest.fixture
def silent_endpoint() -> Iterator[SilentEndpoint]:
    endpoint = SilentEndpoint()
    yield endpoint
    endpoint.close()


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def archive_message(endpoint: str) -> dict[str, Any]:
    return {
        "hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
        "hpcs_object_store_basepath": "lbaaslogs", "hpcs_object_store_endpoint": endpoint,
        "hpcs_object_store_token": "stalled-token",
        "loadBalancers": [{"id": "lb-1", "protocol": "HTTP"}],
    }


def journal_actions(worker: Worker) -> list[tuple[str, str]]:
    """(action, state) of each job in the order they were last updated."""
    return [(record.action, record.state)
            for record in Journal(worker.state_dir / JOURNAL_NAME).recent(50)]


def stall_an_archive(worker: Worker, endpoint: SilentEndpoint,
                     port: int) -> tuple[threading.Thread, list[Any]]:
    """An ARCHIVE that has lines to ship and hangs on the silent endpoint."""
    request_once(f"http://{LOOPBACK}:{port}/logged")
    wait_until(lambda: (worker.state_dir / "logs" / "http.log").exists(), 10, "an access line")
    thread, outcome = in_thread(lambda: worker.submit(archive_message(endpoint.url), timeout=60))
    wait_until(lambda: endpoint.accepted, 10, "the ARCHIVE to connect to the silent endpoint")
    return thread, outcome


def test_read_only_jobs_are_answered_while_an_archive_stalls(worker_factory, http_backend,
                                                             free_port, silent_endpoint):
    worker = worker_factory(archive_timeout=ARCHIVE_STALL)
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [http_backend("lane-a").node()])))[
        "hpcs_response"] == "PASS"
    archive, archive_outcome = stall_an_archive(worker, silent_endpoint, port)
    stalled_at = time.monotonic()

    waits = {}
    for action in READ_ONLY * 3:
        started = time.monotonic()
        reply = worker.submit(action, timeout=ARCHIVE_STALL)
        waits[action] = max(waits.get(action, 0.0), time.monotonic() - started)
        assert reply["hpcs_response"] == "PASS", reply

    assert archive.is_alive() and not archive_outcome, "the ARCHIVE should still be stalled"
    assert time.monotonic() - stalled_at < ARCHIVE_STALL
    # Each far below the stall: none of them waited for the ARCHIVE (bench/fleet.py measures).
    assert max(waits.values()) < ARCHIVE_STALL / 2, waits
    archive.join(ARCHIVE_STALL + 20)
    assert archive_outcome and archive_outcome[0]["hpcs_response"] == "FAIL", archive_outcome


def test_a_stats_on_a_frozen_haproxy_holds_no_ping_behind_it(worker_factory, http_backend,
                                                             free_port):
    """STATS runs in place on the Gearman loop; a stats socket that accepts and never
    answers (HAProxy's processes stopped) holds the loop for its bound only, then the job
    runs on a reader thread and fails there, while DISCOVERs keep being answered."""
    worker = worker_factory()
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [http_backend("frozen").node()])))[
        "hpcs_response"] == "PASS"
    assert worker.submit("STATS")["hpcs_response"] == "PASS"
    # The master too: a reload it made meanwhile would put an unfrozen worker behind the
    # socket. A stopped master still counts as running (it is no zombie).
    frozen = worker.haproxy.our_pids()
    assert len(frozen) >= 2
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        stats, stats_outcome = in_thread(lambda: worker.submit("STATS", timeout=60))
        wait_until(lambda: "go to reader threads" in worker.log_text(), 10,
                   "the STATS to leave the Gearman loop")
        for _ in range(5):
            assert worker.submit("DISCOVER", timeout=10)["hpcs_response"] == "PASS"
        assert stats.is_alive() and not stats_outcome, "the STATS should still wait on HAProxy"
        stats.join(30)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert stats_outcome and stats_outcome[0]["hpcs_response"] == "FAIL", stats_outcome
    assert "stats socket does not answer" in stats_outcome[0]["hpcs_error"]
    # HAProxy back: STATS is answered again (by a reader, for the rest of the pause).
    assert worker.submit("STATS")["hpcs_response"] == "PASS"


def test_mutating_jobs_wait_in_order_and_a_sigterm_answers_every_job_in_hand(
        worker_factory, http_backend, free_port, silent_endpoint):
    worker = worker_factory(archive_timeout=ARCHIVE_STALL)
    port = free_port()
    first, second = http_backend("order-a"), http_backend("order-b")
    assert worker.submit(update(lb("HTTP", port, [first.node()])))["hpcs_response"] == "PASS"
    archive, archive_outcome = stall_an_archive(worker, silent_endpoint, port)

    updating, update_outcome = in_thread(
        lambda: worker.submit(update(lb("HTTP", port, [second.node()])), timeout=60))
    wait_until(lambda: ("UPDATE", "RUNNING") in journal_actions(worker), 10, "the UPDATE grabbed")
    suspending, suspend_outcome = in_thread(lambda: worker.submit("SUSPEND", timeout=60))
    wait_until(lambda: ("SUSPEND", "RUNNING") in journal_actions(worker), 10, "the SUSPEND grabbed")
    assert worker.submit("STATS", timeout=ARCHIVE_STALL)["status"] == "ACTIVE"  # not yet suspended
    worker.terminate()  # warm: every job in hand is still run and answered

    for thread in (archive, updating, suspending):
        thread.join(ARCHIVE_STALL + 30)
    assert archive_outcome[0]["hpcs_response"] == "FAIL", archive_outcome
    assert update_outcome[0]["hpcs_response"] == "PASS", update_outcome
    assert suspend_outcome[0]["hpcs_response"] == "PASS", suspend_outcome
    assert worker.wait() == 0
    finished = [action for action, state in journal_actions(worker)
                if state != "RUNNING" and action in ("ARCHIVE", "UPDATE", "SUSPEND")]
    assert finished[-3:] == ["ARCHIVE", "UPDATE", "SUSPEND"], journal_actions(worker)


def test_a_metrics_job_is_remembered_by_its_handle_and_unique_id(worker_factory, http_backend,
                                                                free_port):
    worker = worker_factory()
    assert worker.submit(update(lb("HTTP", free_port(), [http_backend("ledger").node()])))[
        "hpcs_response"] == "PASS"
    reply = worker.submit("METRICS")
    ledger = json.loads((worker.state_dir / "metrics.json").read_text())
    handle, unique = ledger["job"].split(" ")
    assert handle.startswith("H:") and unique  # what a re-run of the same job would carry
    assert (ledger["period"]["utc_start"], ledger["period"]["utc_end"]) == (
        reply["utc_start"], reply["utc_end"])
