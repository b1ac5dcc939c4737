"""Lanes for jobs, so that a read-only job never waits behind a mutating one.

The Gearman loop (`libra_worker.transport`, on its own thread) hands every job it grabs
to `JobLanes.take` and never waits for a mutating one:

* **In place**: the cheap read-only jobs, DISCOVER and STATS (an API server's pings), and
  refused messages are answered by `take` itself, on the Gearman loop: no thread hand-off
  each way. The loop waits for them only within a bound: their waits (HAProxy's stats
  socket, the pauses of `is_running_beside_reload`) run under
  `budget.limited(IN_PLACE_BUDGET)`, and a job that would wait longer moves, with its
  action for `IN_PLACE_PAUSE` seconds, to the readers (it runs again there: it changes
  nothing). A stalled stats socket thus holds the loop once per pause, not per ping. CPU
  time cannot be cut short: a job that held the loop longer than the bound in all also
  sends its action to the readers for the pause (measured here: a STATS of 1,000 servers
  waits 4.5 ms for HAProxy's answer and parses it in 5.5 ms, so from about 5,000 servers
  STATS runs on a reader, 59 of each 60 s).
* **Read-only** jobs that may take long (METRICS reads the traffic ledger, DIAGNOSTICS
  waits up to 5 s on blackholed targets) run at once on a few reader threads. They are
  answered while an ARCHIVE waits on a silent Swift or an UPDATE of 10,000 nodes is
  rendered and checked.
* **Mutating** jobs (UPDATE, SUSPEND, ENABLE, DELETE, ARCHIVE) wait in one FIFO queue, in
  the order they were grabbed from all job servers together, and `run_mutating` executes
  them one at a time on the thread that calls it: the main thread, where the alarm that
  enforces their timeouts works.

Answers of the other lanes come back through `answers()`, which the Gearman loop calls
after each poll (it alone may write to its connections); `wakeup_fd` becomes readable when
one is waiting, so the loop's poll returns at once. A read-only job still running on a
reader at its deadline is answered FAIL then (`JobRunner.expire`); `next_deadline` lets the
poll wake for it.
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

from libra_worker import budget
from libra_worker.jobs import Answer, Job, JobRunner
from libra_worker.messages import Action, Oversized

LOG = logging.getLogger(__name__)

# Read-only jobs are short and rare (a ping per minute per API server); a few threads
# keep a slow one (DIAGNOSTICS waits up to 5 s on blackholed targets) from holding
# back the others.
READERS = 4
# How often the mutating lane checks whether it should stop when no job comes.
_IDLE_CHECK = 0.2
# Run on the Gearman loop: they read a few small files and HAProxy's stats socket.
IN_PLACE = frozenset({Action.DISCOVER, Action.STATS})
# How long a job in place may hold the Gearman loop: its waits (I/O, pauses) are cut
# there. A STATS of 1,000 servers takes 10 ms; one that needs more (a stalled stats
# socket, a dead master's pid file looked at again, many thousand servers) is a reader's job.
IN_PLACE_BUDGET = 0.05
# How long an action that ran out of its bound stays with the readers.
IN_PLACE_PAUSE = 60.0


@dataclass
class InHand:
    """A grabbed job; `token` is the Gearman loop's own reference to answer it."""

    token: Any
    job: Job
    grabbed: float


class JobLanes:
    def __init__(self, runner: JobRunner, readers: int = READERS,
                 around_mutating: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                 in_place_budget: float = IN_PLACE_BUDGET) -> None:
        self.runner = runner
        self.in_place_budget = in_place_budget
        # Per in-place action: until when (monotonic) it goes to the readers instead.
        self._in_place_paused: dict[Action, float] = {}
        # Entered around each mutating job: systemd's watchdog counts it as progress.
        self.around_mutating = around_mutating
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="read-only-job")
        # Not a SimpleQueue: the main thread waits on this one, and signal handlers run
        # there. CPython 3.11's SimpleQueue.get(timeout) waits forever once a handler
        # outlasts the timeout (measured: a SIGTERM while idle left the worker running).
        self._mutating: queue.Queue[InHand] = queue.Queue()
        self._answered: queue.SimpleQueue[tuple[InHand, Answer]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_hand: dict[int, InHand] = {}
        self._reading: dict[int, InHand] = {}
        self._mutating_since: float | None = None
        self._mutating_timeout = 0.0
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # ------------------------------------------------------------------ the Gearman loop's side

    def take(self, token: Any, handle: str, payload: bytes | Oversized,
             unique: str = "") -> tuple[InHand, Answer | None]:
        """Accept a grabbed job: its answer when it was answered here (refused, or run in
        place), else None and the job is in its lane. Waits for no other job."""
        grabbed = time.monotonic()
        # The final journal lines of jobs answered here are written after the answers
        # (`write_journal`).
        with self.runner.journal.deferred():
            job = self.runner.accept(handle, payload, unique)
            item = InHand(token, job, grabbed)
            if job.refusal is not None:
                return item, job.refusal
            if job.read_only and self._in_place(job):
                answer = self._run_in_place(item)
                if answer is not None:
                    return item, answer
        job.journal_running()
        with self._lock:
            self._in_hand[id(item)] = item
            if job.read_only:
                self._reading[id(item)] = item
        if job.read_only:
            self._readers.submit(self._read, item)
        else:
            self._mutating.put(item)
        return item, None

    def answers(self, woken: bool = True) -> list[tuple[InHand, Answer]]:
        """The answers ready to send, each job's once, timeouts of late readers included.

        `woken`: `wakeup_fd` was found readable, and is reset here. The queue is looked at
        either way; an answer queued after that look has its wakeup still pending.
        """
        if woken:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.wakeup_fd)
        late = []
        if self._reading:  # only this thread adds to it: empty means none to time out
            now = time.monotonic()
            with self._lock:
                late = [item for item in self._reading.values() if item.job.deadline <= now]
        for item in late:
            answer = self.runner.expire(item.job)
            if answer is not None:
                self._answer(item, answer)
        ready = []
        # Only this thread takes from the queue: what empty() says stays true for it.
        while not self._answered.empty():
            ready.append(self._answered.get_nowait())
        return ready

    def write_journal(self) -> None:
        """Write the journal lines of the jobs `take` answered (after their answers)."""
        self.runner.journal.write_deferred()

    def next_deadline(self) -> float | None:
        """When the earliest running read-only job must be answered (monotonic)."""
        if not self._reading:  # asked before every poll: mostly no reader runs
            return None
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
                            "waited; a job server that kept it gives it out again", item.job.handle,
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

    def _in_place(self, job: Job) -> bool:
        action = job.message.action if job.message else None
        return action in IN_PLACE and time.monotonic() >= self._in_place_paused.get(action, 0.0)

    def _run_in_place(self, item: InHand) -> Answer | None:
        """The answer of a read-only job run on this thread within the bound; None when
        it would wait longer (it goes to a reader then). Either way, a job that held the
        loop past the bound sends its action to the readers for `IN_PLACE_PAUSE`."""
        assert item.job.message is not None
        action = item.job.message.action
        started = time.monotonic()
        try:
            with budget.limited(self.in_place_budget):
                return self._outcome(item, alarm=False)
        except budget.OverBudget as exc:
            self._in_place_paused[action] = time.monotonic() + IN_PLACE_PAUSE
            LOG.warning("Job %s %s: %s (%g ms); it and the %s jobs of the next %g s go to "
                        "reader threads", item.job.handle, item.job.action, exc,
                        self.in_place_budget * 1000, item.job.action, IN_PLACE_PAUSE)
            return None
        finally:
            now = time.monotonic()
            # CPU the bound cannot interrupt: a STATS of thousands of servers parses them
            # all (or a busy machine kept this thread off its CPU). Not counted twice.
            if now - started > self.in_place_budget and self._in_place(item.job):
                self._in_place_paused[action] = now + IN_PLACE_PAUSE
                LOG.info("Job %s %s held the Gearman loop %.0f ms; the %s jobs of the next "
                         "%g s go to reader threads", item.job.handle, item.job.action,
                         (now - started) * 1000, item.job.action, IN_PLACE_PAUSE)

    def _read(self, item: InHand) -> None:
        self._execute(item, alarm=False)
        with self._lock:
            self._reading.pop(id(item), None)

    def _execute(self, item: InHand, alarm: bool) -> None:
        answer = self._outcome(item, alarm)
        if answer is None:
            self._forget(item)
        else:
            self._answer(item, answer)

    def _outcome(self, item: InHand, alarm: bool) -> Answer | None:
        try:
            return self.runner.execute(item.job, alarm=alarm)
        except budget.OverBudget:
            raise  # run in place: the job moves to a reader (_run_in_place)
        except Exception as exc:  # noqa: BLE001 - the controller catches; this is the last net
            LOG.exception("Job %s %s: the runner raised", item.job.handle, item.job.action)
            return self.runner.crashed(item.job, exc)

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
