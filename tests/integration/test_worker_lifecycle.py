"""The worker process's life: restarts, signals, and putting the desired state back.

HAProxy is a daemon of its own: it keeps serving while the worker restarts, a restarted
worker adopts it through its pidfile, and a worker that finds it gone (or running when it
should not be) restores the state recorded by the last accepted message.
"""

from __future__ import annotations

import os
import signal
import threading


from libra_worker.drivers.haproxy.process import process_alive
from tests.integration.support import (
    TrafficLoop,
    connection_refused,
    lb,
    node_statuses,
    traffic,
    update,
    wait_until,
)


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


def test_worker_restart_keeps_haproxy_serving_without_a_gap(worker, http_backend, free_port):
    first, second = http_backend("steady-a"), http_backend("steady-b")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [first.node(), second.node()])))["hpcs_response"] == "PASS"
    master = worker.haproxy.master_pid()
    state_before = (worker.state_dir / "state.json").read_text()
    stats_before = worker.submit("STATS")

    with TrafficLoop(url(port)) as loop:
        assert worker.stop() == 0
        assert worker.haproxy.master_pid() == master
        served_while_down = loop.total
        wait_until(lambda: loop.total > served_while_down + 5, 10, "traffic while the worker is down")
        worker.start()
        after_restart = loop.total
        wait_until(lambda: loop.total > after_restart + 5, 10, "traffic after the restart")

    assert loop.errors == []
    assert set(loop.answered) == {"steady-a", "steady-b"}
    assert worker.haproxy.master_pid() == master, "HAProxy was restarted instead of adopted"
    assert (worker.state_dir / "state.json").read_text() == state_before
    stats_after = worker.submit("STATS")
    assert stats_after["nodes"] == stats_before["nodes"]
    assert (stats_after["status"], stats_after["since"]) == ("ACTIVE", stats_before["since"])

    # The next UPDATE changes the adopted HAProxy in place (runtime API or reload).
    assert worker.submit(update(lb("HTTP", port, [second.node()])))["hpcs_response"] == "PASS"
    assert traffic(url(port), 4) == ({"steady-b": 4}, 0)
    assert worker.haproxy.master_pid() == master


def test_sigterm_during_a_job_still_answers_it_then_exits_cleanly(worker, gearmand, http_backend, free_port):
    node = http_backend("late")
    port = free_port()
    replies: list[dict] = []
    # The first UPDATE of a fresh worker is its slowest job: log sink, haproxy -c, start.
    submitter = threading.Thread(
        target=lambda: replies.append(worker.submit(update(lb("HTTP", port, [node.node()])), timeout=30)))
    submitter.start()
    # gearmand counts the job as running once it has handed it to the worker.
    wait_until(lambda: gearmand.function_status(worker.function)[1] == 1, 10,
               "gearmand to hand the UPDATE to the worker", interval=0.002)
    assert not replies, "the job finished before the signal could be sent mid-job"

    worker.terminate()

    submitter.join(timeout=40)
    assert replies and replies[0]["hpcs_response"] == "PASS", replies
    assert worker.wait() == 0
    assert traffic(url(port), 3) == ({"late": 3}, 0)
    assert gearmand.function_status(worker.function)[2] == 0


def test_worker_restores_an_active_lb_when_haproxy_is_gone_at_start(worker, http_backend, free_port):
    node = http_backend("revived")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert worker.stop() == 0
    killed = worker.kill_haproxy()
    assert worker.haproxy.master_pid() not in killed
    assert connection_refused(port)

    worker.start()

    assert traffic(url(port), 4) == ({"revived": 4}, 0)
    assert worker.haproxy.master_pid() not in (None, *killed)
    assert node_statuses(worker.submit("STATS")) == {"revived": "UP"}


def test_worker_keeps_a_suspended_lb_stopped_at_start(worker, http_backend, free_port):
    node = http_backend("dormant")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert worker.submit("SUSPEND")["hpcs_response"] == "PASS"
    assert worker.stop() == 0
    # A stray HAProxy on the kept configuration (e.g. started by hand) while the worker is down.
    worker.haproxy.start()
    assert traffic(url(port), 1) == ({"dormant": 1}, 0)

    worker.start()

    wait_until(lambda: connection_refused(port), 10, "the stray HAProxy to be stopped")
    assert worker.haproxy.our_pids() == []
    stats = worker.submit("STATS")
    assert (stats["hpcs_response"], stats["status"]) == ("FAIL", "SUSPENDED"), stats
    assert worker.submit("ENABLE")["hpcs_response"] == "PASS"
    assert traffic(url(port), 2) == ({"dormant": 2}, 0)


def test_suspended_lb_stays_stopped_across_a_plain_restart(worker, http_backend, free_port):
    node = http_backend("resting")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert worker.submit("SUSPEND")["hpcs_response"] == "PASS"

    worker.restart()

    assert connection_refused(port)
    assert worker.haproxy.our_pids() == []
    assert worker.submit("STATS")["status"] == "SUSPENDED"


def test_deleted_lb_stays_deleted_across_a_restart(worker, http_backend, free_port):
    node = http_backend("gone")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert worker.submit("DELETE")["hpcs_response"] == "PASS"

    worker.restart()

    assert connection_refused(port)
    assert worker.submit("STATS")["status"] == "DELETED"


def test_worker_killed_with_sigkill_comes_back_to_the_same_state(worker, http_backend, free_port):
    node = http_backend("survivor")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    master = worker.haproxy.master_pid()

    with TrafficLoop(url(port)) as loop:
        worker.kill()
        worker.start()
        done = loop.total
        wait_until(lambda: loop.total > done + 3, 10, "traffic after the restart")

    assert loop.errors == []
    assert worker.haproxy.master_pid() == master
    assert node_statuses(worker.submit("STATS")) == {"survivor": "UP"}



def test_a_job_sent_while_the_worker_is_down_is_answered_after_it_restarts(worker, http_backend, free_port):
    node = http_backend("queued")
    port = free_port()
    assert worker.stop() == 0
    replies: list[dict] = []
    submitter = threading.Thread(
        target=lambda: replies.append(worker.submit(update(lb("HTTP", port, [node.node()])), timeout=30)))
    submitter.start()

    worker.start()

    submitter.join(timeout=40)
    assert replies and replies[0]["hpcs_response"] == "PASS", replies
    assert traffic(url(port), 2) == ({"queued": 2}, 0)


def test_running_worker_restarts_a_haproxy_that_died(worker, http_backend, free_port):
    node = http_backend("phoenix")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"

    killed = worker.kill_haproxy()

    wait_until(lambda: traffic(url(port), 1) == ({"phoenix": 1}, 0), 15,
               "the worker to bring HAProxy back")
    assert worker.haproxy.master_pid() not in (None, *killed)
    assert node_statuses(worker.submit("STATS")) == {"phoenix": "UP"}
    assert worker.is_running()


def test_haproxy_is_ready_for_a_soft_stop_when_start_returns(worker, http_backend, free_port):
    node = http_backend("fresh")
    port = free_port()
    assert worker.submit(update(lb("HTTP", port, [node.node()])))["hpcs_response"] == "PASS"
    assert worker.submit("SUSPEND")["hpcs_response"] == "PASS"
    assert worker.stop() == 0  # its reconciler must not stop HAProxy for us
    haproxy = worker.haproxy

    # The window is a few ms on an idle machine; a loaded one can hide it once or twice,
    # hardly five times in a row.
    for attempt in range(5):
        haproxy.start()
        master = haproxy.master_pid()
        os.kill(master, signal.SIGUSR1)  # what stop() sends first

        # An idle HAProxy soft-stops in well under a second; a lost signal leaves it running.
        wait_until(lambda: not process_alive(master), 2,
                   f"the master to soft-stop on SIGUSR1 (start number {attempt + 1})")
        haproxy.stop()  # removes the pidfile and master socket for the next start
        assert connection_refused(port)
