"""The in-place bound: blocking calls on the Gearman loop's behalf end within it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from libra_worker import budget
from libra_worker.drivers.haproxy.process import HAProxyProcess
from libra_worker.drivers.haproxy.sockets import send_command


def listening(path: Path, backlog: int = 8) -> socket.socket:
    """A unix stream socket listening at `path`, that accepts nothing by itself."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(backlog)
    return listener


@pytest.fixture
def stalled_socket(tmp_path: Path):
    """A unix socket that accepts (the kernel does) and never answers."""
    path = tmp_path / "stalled.sock"
    listener = listening(path)
    try:
        yield path
    finally:
        listener.close()


def test_outside_the_bound_a_call_keeps_its_own_timeout():
    assert budget.io_timeout(5.0) == (5.0, False)


def test_inside_the_bound_a_longer_timeout_is_cut_and_a_shorter_one_kept():
    with budget.limited(1.0):
        cut_to, cut = budget.io_timeout(5.0)
        assert cut and 0 < cut_to <= 1.0
        assert budget.io_timeout(0.001) == (0.001, False)


def test_a_spent_bound_refuses_any_further_wait():
    with budget.limited(0.0):
        with pytest.raises(budget.OverBudget):
            budget.io_timeout(5.0)
        with pytest.raises(budget.OverBudget):
            budget.sleep(0.001)


def test_the_bound_is_the_calling_threads_alone():
    seen = []
    with budget.limited(0.0):
        reader = threading.Thread(target=lambda: seen.append(budget.io_timeout(5.0)))
        reader.start()
        reader.join()
    assert seen == [(5.0, False)]


def test_a_stalled_socket_is_over_budget_in_place_and_a_timeout_elsewhere(stalled_socket):
    with budget.limited(0.05):
        with pytest.raises(budget.OverBudget, match="stalled.sock did not answer 'show info'"):
            send_command(stalled_socket, "show info", timeout=5.0)
    with pytest.raises(TimeoutError):  # an OSError: the callers' own handling applies
        send_command(stalled_socket, "show info", timeout=0.05)


@pytest.fixture
def trickling_socket(tmp_path: Path):
    """A unix socket that answers a byte every 20 ms for 3 s: each read gets data in time,
    the whole answer does not."""
    path = tmp_path / "trickling.sock"
    listener = listening(path)
    listener.settimeout(5)  # a client that never connects fails the test, not hangs it
    stop = threading.Event()

    def trickle() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            for _ in range(150):
                if stop.wait(0.02):
                    return
                try:
                    connection.sendall(b".")
                except OSError:
                    return  # the reader gave up

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        yield path
    finally:
        stop.set()
        sender.join()
        listener.close()


def test_the_timeout_bounds_the_whole_answer_not_each_read(trickling_socket):
    with pytest.raises(TimeoutError):
        send_command(trickling_socket, "show stat", timeout=0.2)


def test_a_socket_whose_backlog_is_full_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "full.sock"
    listener = listening(path, backlog=0)  # never accepts: the queue fills
    waiting = []
    try:
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        # Refused at once (the kernel's EAGAIN): an error the callers handle, and in place
        # no wait at all.
        with pytest.raises(BlockingIOError):
            send_command(path, "show info", timeout=5.0)
        with budget.limited(0.05):
            with pytest.raises(BlockingIOError):
                send_command(path, "show info", timeout=5.0)
    finally:
        for client in waiting:
            client.close()
        listener.close()


def test_a_missing_haproxy_is_looked_at_again_only_off_the_loop(tmp_path):
    process = HAProxyProcess("haproxy", tmp_path / "haproxy.cfg", tmp_path / "haproxy.pid",
                             tmp_path / "master.sock")
    with budget.limited(0.03):  # room for the first pause (10 ms), not the second (50 ms)
        with pytest.raises(budget.OverBudget):
            process.is_running_beside_reload()
    assert not process.is_running_beside_reload()
