"""Two lanes for jobs, so that a read-only job never waits behind a mutating one.

The Gearman loop (`libra_worker.transport`, on its own thread) hands every job it grabs
to `JobLanes.take` and never waits for one:

* **Read-only** jobs (DISCOVER, STATS, METRICS, DIAGNOSTICS) and refused messages run at
  once on a few reader threads. An API server's ping is answered while an ARCHIVE waits
  on a silent Swift or an UPDATE of 10,000 nodes is rendered and checked.
* **Mutating** jobs (UPDATE, SUSPEND, ENABLE, DELETE, ARCHIVE) wait in one FIFO queue, in
  the order they were grabbed from all job servers together, and `run_mutating` executes
  them one at a time on the thread that calls it: the main thread, where the alarm that
  enforces their timeouts works.

Answers come back through `answers()`, which the Gearman loop calls after each poll (it
alone may write to its connections); `wakeup_fd` becomes readable when one is waiting,
so the loop's poll returns at once. A read-only job still running at its deadline is
answered FAIL then (`JobRunner.expire`); `next_deadline` lets the poll wake for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from libra_worker.jobs import Answer, Job, JobRunner
from libra_worker.messages import Oversized

LOG = logging.getLogger(__name__)

# Read-only jobs are short and rare (a ping per minute per API server); a few threads
# keep a slow one (DIAGNOSTICS waits up to 5 s on blackholed targets) from holding
# back the others.
READERS = 4
# How often the mutating lane checks whether it should stop when no job comes.
_IDLE_CHECK = 0.2


@dataclass
class InHand:
    """A grabbed job; `token` is the Gearman loop's own reference to answer it."""

    token: Any
    job: Job
    grabbed: float


class JobLanes:
    def __init__(self, runner: JobRunner, readers: int = READERS,
                 around_mutating: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> None:
        self.runner = runner
        # Entered around each mutating job: systemd's watchdog counts it as progress.
        self.around_mutating = around_mutating
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="read-only-job")
        self._mutating: queue.SimpleQueue[InHand] = queue.SimpleQueue()
        self._answered: queue.SimpleQueue[tuple[InHand, Answer]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_hand: dict[int, InHand] = {}
        self._reading: dict[int, InHand] = {}
        self._mutating_since: float | None = None
        self._mutating_timeout = 0.0
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # ------------------------------------------------------------------ the Gearman loop's side

    def take(self, token: Any, handle: str, payload: bytes | Oversized, unique: str = "") -> InHand:
        """Accept a grabbed job and put it in its lane; returns at once."""
        item = InHand(token, self.runner.accept(handle, payload, unique), time.monotonic())
        with self._lock:
            self._in_hand[id(item)] = item
        if item.job.refusal is not None:
            self._answer(item, item.job.refusal)
        elif item.job.read_only:
            with self._lock:
                self._reading[id(item)] = item
            self._readers.submit(self._read, item)
        else:
            self._mutating.put(item)
        return item

    def answers(self) -> list[tuple[InHand, Answer]]:
        """The answers ready to send, each job's once, timeouts of late readers included."""
        try:
            os.eventfd_read(self.wakeup_fd)
        except BlockingIOError:
            pass
        now = time.monotonic()
        with self._lock:
            late = [item for item in self._reading.values() if item.job.deadline <= now]
        for item in late:
            answer = self.runner.expire(item.job)
            if answer is not None:
                self._answer(item, answer)
        ready = []
        while True:
            try:
                ready.append(self._answered.get_nowait())
            except queue.Empty:
                return ready

    def next_deadline(self) -> float | None:
        """When the earliest running read-only job must be answered (monotonic)."""
        with self._lock:
            return min((item.job.deadline for item in self._reading.values()), default=None)

    def busy(self) -> bool:
        """Whether any job grabbed is not answered yet."""
        with self._lock:
            return bool(self._in_hand)

    def on_time(self, grace: float) -> bool:
        """False only when the mutating job in hand has overrun its timeout by `grace`:
        the alarm should have ended it, so the lane is stuck."""
        since = self._mutating_since
        return since is None or time.monotonic() - since <= self._mutating_timeout + grace

    def wake(self) -> None:
        """Make `wakeup_fd` readable: the Gearman loop polls it."""
        os.eventfd_write(self.wakeup_fd, 1)

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        os.close(self.wakeup_fd)

    # ------------------------------------------------------------------ the main thread's side

    def run_mutating(self, stop: Callable[[], bool], still_held: Callable[[Any], bool]) -> None:
        """Execute mutating jobs in grab order until `stop()`, on the calling thread.

        A job whose job-server connection was lost before it started is skipped: the job
        server gives it out again, and running it here too would run it twice.
        """
        while True:
            try:
                item = self._mutating.get(timeout=_IDLE_CHECK)
            except queue.Empty:
                if stop():
                    return
                continue
            if not still_held(item.token):
                LOG.warning("Job %s %s skipped: its job server connection was lost while it "
                            "waited; the job server gives it out again", item.job.handle,
                            item.job.action)
                self._forget(item)
                continue
            self._mutating_timeout = item.job.timeout
            self._mutating_since = time.monotonic()
            try:
                with self.around_mutating():
                    self._execute(item, alarm=True)
            finally:
                self._mutating_since = None

    # ------------------------------------------------------------------ internals

    def _read(self, item: InHand) -> None:
        self._execute(item, alarm=False)
        with self._lock:
            self._reading.pop(id(item), None)

    def _execute(self, item: InHand, alarm: bool) -> None:
        try:
            answer = self.runner.execute(item.job, alarm=alarm)
        except Exception as exc:  # noqa: BLE001 - the controller catches; this is the last net
            LOG.exception("Job %s %s: the runner raised", item.job.handle, item.job.action)
            answer = self.runner.crashed(item.job, exc)
        if answer is None:
            self._forget(item)
        else:
            self._answer(item, answer)

    def _answer(self, item: InHand, answer: Answer) -> None:
        # Queued before it stops counting as in hand: a stopping loop that sees no job in
        # hand must find every answer already waiting to be written.
        self._answered.put((item, answer))
        self.wake()
        self._forget(item)

    def _forget(self, item: InHand) -> None:
        with self._lock:
            self._in_hand.pop(id(item), None)
            self._reading.pop(id(item), None)
