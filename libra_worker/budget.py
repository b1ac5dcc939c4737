"""A bound on how long a job run in place on the Gearman loop may wait for I/O.

The Gearman loop runs cheap read-only jobs itself (`libra_worker.lanes`), so a ping pays
no thread hand-off; while it does, every other job server and job waits. Blocking calls
made on the loop's behalf (HAProxy's stats socket, `sockets.send_command`) take their
timeout from `io_timeout`: inside `limited(seconds)` never more than what is left of those
seconds, and once that runs out they raise `OverBudget` instead of a timeout error. The
lanes then hand the job to a reader thread, where it runs again with its own timeouts:
read-only jobs change nothing, so running one twice is harmless.

The bound is per thread (a context variable): reader threads and the main thread never
see the loop's.
"""

from __future__ import annotations

import contextvars
import time

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("io_deadline", default=None)


class OverBudget(Exception):
    """A call would wait longer than the job running in place may. Not an OSError nor a
    WorkerError on purpose: nothing on the way turns it into a reply."""


class limited:  # noqa: N801 - it was a function; a class costs a third as much per ping
    """Blocking I/O in this thread within the block ends within `seconds` of entering it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._token: contextvars.Token[float | None] | None = None

    def __enter__(self) -> None:
        self._token = _deadline.set(time.monotonic() + self.seconds)

    def __exit__(self, *_exc: object) -> None:
        assert self._token is not None
        _deadline.reset(self._token)


def io_timeout(timeout: float) -> tuple[float, bool]:
    """The timeout for one blocking call that would take `timeout`, and whether the bound
    of `limited` cut it (a timeout of that call is then `OverBudget`).

    Raises:
        OverBudget: the bound has already run out.
    """
    deadline = _deadline.get()
    if deadline is None:
        return timeout, False
    left = deadline - time.monotonic()
    if left <= 0:
        raise OverBudget("the time allowed in place ran out")
    return (left, True) if left < timeout else (timeout, False)


def sleep(seconds: float) -> None:
    """`time.sleep`, or `OverBudget` at once if the bound of `limited` ends first."""
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() + seconds > deadline:
        raise OverBudget(f"a pause of {seconds * 1000:g} ms would pass the time allowed in place")
    time.sleep(seconds)
