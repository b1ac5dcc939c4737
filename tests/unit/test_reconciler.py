"""The reconciler's decisions, and its loop."""

from __future__ import annotations

import threading

import pytest

from libra_worker.reconciler import Reconciler, Repair, decide
from libra_worker.state import Lifecycle


@pytest.mark.parametrize(
    "lifecycle, running, has_config, repair",
    [
        (Lifecycle.ACTIVE, False, True, Repair.START),
        (Lifecycle.ACTIVE, True, True, Repair.NONE),
        (Lifecycle.ACTIVE, False, False, Repair.NONE),  # nothing to start with
        (Lifecycle.SUSPENDED, True, True, Repair.STOP),
        (Lifecycle.SUSPENDED, False, True, Repair.NONE),
        (Lifecycle.DELETED, True, False, Repair.STOP),
        (Lifecycle.DELETED, False, False, Repair.NONE),
        (Lifecycle.NEW, True, True, Repair.STOP),
        (Lifecycle.NEW, False, False, Repair.NONE),
    ],
)
def test_decide(lifecycle, running, has_config, repair):
    assert decide(lifecycle, running, has_config) is repair


def test_the_loop_repairs_until_stopped_and_survives_a_failed_round():
    calls = []
    stopping = threading.Event()

    def repair() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("one bad round")
        if len(calls) == 3:
            stopping.set()

    loop = Reconciler(repair, 0.01, stopping)
    loop.start()
    loop.join(5)

    assert not loop.is_alive()
    assert len(calls) == 3
