"""Run one job: validate, execute under its action's timeout, journal it, mask the token.

A job is accepted first (`JobRunner.accept`: validated, its journal entry opened), which
tells whether it is read-only (DISCOVER, STATS, METRICS, DIAGNOSTICS: they change
nothing, so they may run beside anything) or mutating; `libra_worker.lanes` runs each
kind in its own lane. A `Job` is answered exactly once: by its execution or by its
deadline, whichever claims it first.

Mutating jobs run on the worker's main thread under an alarm (SIGALRM), like rq's death
penalty: when it fires, `ActionTimeout` is raised wherever the job is. The driver treats
it as any other failure of a step (the previous configuration is put back, subprocesses
are killed by `subprocess.run`, locks and files are released on the way out), the reply
is FAIL naming the timeout, the journal says TIMEOUT, and the worker takes the next job.
Nothing of a timed-out mutating job keeps running behind the reply.

Read-only jobs run on reader threads, where no alarm can reach them: at their deadline
they are answered FAIL naming the timeout (`JobRunner.expire`) and whatever they still
do (bounded by their own I/O timeouts) changes nothing and is not answered again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Mapping

from libra_worker import journal
from libra_worker.controller import LBaaSController
from libra_worker.errors import ActionTimeout, WorkerError
from libra_worker.journal import Journal, JobTicket
from libra_worker.messages import Action, Message, Oversized, error_detail

LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
# A job whose payload is at least this large leaves the C heap grown (the payload, its
# decoding, the reply); the next job hands the freed part back to the system first.
LARGE_PAYLOAD_BYTES = 256 * 1024


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def release_freed_heap() -> None:
    """glibc's malloc_trim(0), where there is one: give free heap pages back to the system.

    Measured: without it, three 9 MB messages left the worker ~20 MB larger (freed by
    Python, kept by malloc) until some later allocation pattern trimmed the heap.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


INVALID = "INVALID"
# Jobs that change nothing: they may run while a mutating job runs, and beside each other.
READ_ONLY = frozenset({Action.DISCOVER, Action.STATS, Action.METRICS, Action.DIAGNOSTICS})


@dataclass(frozen=True)
class Answer:
    """A job's reply, and the action it ran (INVALID when the message was refused)."""

    action: str
    reply: dict[str, Any]


@dataclass
class Job:
    """One accepted job, from validation to its single answer."""

    handle: str
    message: Message | None  # None: refused, and `refusal` is its answer
    timeout: float
    # The job server's handle and the client's unique id: the same job given out again
    # (the worker died before answering) has the same identity. None without a unique id.
    identity: str | None = None
    ticket: JobTicket | None = None
    refusal: Answer | None = None
    accepted: float = field(default_factory=time.monotonic)
    _claim: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def read_only(self) -> bool:
        return self.message is None or self.message.action in READ_ONLY

    @property
    def action(self) -> str:
        return self.message.action.value if self.message else INVALID

    @property
    def deadline(self) -> float:
        return self.accepted + self.timeout

    def claim(self) -> bool:
        """True for the first caller only: the one that answers the job."""
        return self._claim.acquire(blocking=False)

    def journal_running(self) -> None:
        """Journal the job RUNNING: it may outlive the worker (see `libra_worker.journal`)."""
        if self.ticket is not None:
            self.ticket.running()


class JobTimeout:
    """Raise `ActionTimeout` in this (main) thread after `seconds`; always disarmed on exit."""

    def __init__(self, seconds: float, action: str) -> None:
        self.seconds = seconds
        self.action = action
        self._previous: Any = None

    def __enter__(self) -> "JobTimeout":
        self._previous = signal.signal(signal.SIGALRM, self._expired)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)
        return False  # never swallow what the job raised

    def _expired(self, _signum: int, _frame: FrameType | None) -> None:
        raise ActionTimeout(_timeout_sentence(self.action, self.seconds))


def _timeout_sentence(action: str, seconds: float) -> str:
    return f"{action} did not finish within its {seconds:g} s timeout."


class JobRunner:
    def __init__(
        self,
        controller: LBaaSController,
        job_journal: Journal,
        timeouts: Mapping[Action, float] | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.controller = controller
        self.journal = job_journal
        self.timeouts = dict(timeouts or {})
        self.default_timeout = default_timeout
        self._heap_grown = False

    def accept(self, handle: str, payload: bytes | Oversized, unique: str = "") -> Job:
        """Validate a job and open its journal entry; a refused one carries its answer
        already (and is journaled). The lanes write an accepted job RUNNING unless they
        answer it in place (`Job.journal_running`).

        `unique` is the client's unique id of the job (pygearman makes a random one):
        without it a handle alone could come back after the job server restarts.
        """
        if self._heap_grown:
            release_freed_heap()
        # An oversized payload was drained as it came: it was never held.
        self._heap_grown = isinstance(payload, bytes) and len(payload) >= LARGE_PAYLOAD_BYTES
        prepared = self.controller.prepare(payload)
        if not isinstance(prepared, Message):
            self.journal.ticket(handle, INVALID).finish(journal.FAIL, error_detail(prepared))
            job = Job(handle, None, 0.0, refusal=Answer(INVALID, prepared))
            job.claim()
            return job
        timeout = self.timeouts.get(prepared.action, self.default_timeout)
        return Job(handle, prepared, timeout, f"{handle} {unique}" if unique else None,
                   self.journal.ticket(handle, prepared.action.value))

    def execute(self, job: Job, alarm: bool) -> Answer | None:
        """Execute an accepted job; None when its deadline answered it first.

        `alarm` only on the main thread: it interrupts the job wherever it is at its
        timeout. Without it the job runs to its end and `expire` answers it in time.
        """
        assert job.message is not None and job.ticket is not None
        if alarm:
            with JobTimeout(job.timeout, job.action):
                outcome = self.controller.execute(job.message, job.identity)
        else:
            outcome = self.controller.execute(job.message, job.identity)
        if not job.claim():
            LOG.warning("Job %s %s finished %.1f s after its %g s timeout; it was answered "
                        "FAIL then", job.handle, job.action, time.monotonic() - job.deadline,
                        job.timeout)
            return None
        if outcome.error is None:
            job.ticket.finish(journal.COMPLETE)
        else:
            state = journal.TIMEOUT if isinstance(outcome.error, ActionTimeout) else journal.FAIL
            job.ticket.finish(state, _masked(error_detail(outcome.reply), job.message))
        return Answer(job.action, outcome.reply)

    def expire(self, job: Job) -> Answer | None:
        """The timeout answer of a job past its deadline; None if it was answered already."""
        if job.message is None or job.ticket is None or not job.claim():
            return None
        error = ActionTimeout(_timeout_sentence(job.action, job.timeout))
        reply = self.controller.failed(job.message, error).reply
        job.ticket.finish(journal.TIMEOUT, _masked(error_detail(reply), job.message))
        return Answer(job.action, reply)


    def crashed(self, job: Job, error: Exception) -> Answer | None:
        """The answer of a job whose execution raised past the controller (the alarm
        landing while its reply was built, or a bug): still the original message with a
        FAIL, journaled; None if it was answered already."""
        if not job.claim():
            return None
        if job.message is None or job.ticket is None:
            return Answer(job.action, {"hpcs_response": "FAIL", "hpcs_error": _INTERNAL_ERROR})
        timed_out = isinstance(error, ActionTimeout)
        failure = error if timed_out else WorkerError(_INTERNAL_ERROR)
        reply = self.controller.failed(job.message, failure).reply
        job.ticket.finish(journal.TIMEOUT if timed_out else journal.FAIL,
                          _masked(error_detail(reply), job.message))
        return Answer(job.action, reply)


_INTERNAL_ERROR = "The worker hit an internal error; see the worker's log for details."


def _masked(error: str, message: Message) -> str:
    token = message.archive.token if message.archive else None
    return error.replace(token, "***") if token else error
