"""Keep the device in its desired state, whatever dies.

Every `interval` seconds the worker compares the desired state (state.json) with what
runs, and repairs the difference: a dead HAProxy of an ACTIVE load balancer is started
again with the last good configuration; one that runs while SUSPENDED or DELETED is
stopped. The same check runs once at start-up, which is how a rebooted device comes back.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Callable

from libra_worker.state import Lifecycle

LOG = logging.getLogger(__name__)


class Repair(enum.Enum):
    NONE = "none"
    START = "start"
    STOP = "stop"


def decide(lifecycle: Lifecycle, running: bool, has_config: bool) -> Repair:
    """What to do about HAProxy, given what is desired and what runs."""
    if lifecycle is Lifecycle.ACTIVE:
        return Repair.START if not running and has_config else Repair.NONE
    return Repair.STOP if running else Repair.NONE


class Reconciler(threading.Thread):
    """Calls `repair()` every `interval` seconds until `stopping` is set."""

    def __init__(self, repair: Callable[[], None], interval: float, stopping: threading.Event) -> None:
        super().__init__(name="reconciler", daemon=True)
        self.repair = repair
        self.interval = interval
        self.stopping = stopping

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.repair()
            except Exception:  # noqa: BLE001 - a failed round is logged; the next one retries
                LOG.exception("Reconciling the device failed")
