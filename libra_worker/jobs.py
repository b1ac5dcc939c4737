"""Run one job: validate, execute under its action's timeout, journal it, mask the token.

Like rq's death penalty, the timeout is an alarm (SIGALRM) around the job, which runs on
the worker's main thread: when it fires, `ActionTimeout` is raised wherever the job is.
The driver treats it as any other failure of a step (the previous configuration is put
back, subprocesses are killed by `subprocess.run`, locks and files are released on the
way out), the reply is FAIL naming the timeout, the journal says TIMEOUT, and the worker
takes the next job. Nothing of a timed-out job keeps running behind the reply.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Mapping

from libra_worker import journal
from libra_worker.controller import LBaaSController
from libra_worker.errors import ActionTimeout
from libra_worker.journal import Journal
from libra_worker.messages import Action, Message, error_detail

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


@dataclass(frozen=True)
class Answer:
    """A job's reply, and the action it ran (INVALID when the message was refused)."""

    action: str
    reply: dict[str, Any]


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
        raise ActionTimeout(f"{self.action} did not finish within its {self.seconds:g} s timeout.")


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

    def run(self, handle: str, payload: bytes) -> Answer:
        if self._heap_grown:
            release_freed_heap()
        self._heap_grown = len(payload) >= LARGE_PAYLOAD_BYTES
        prepared = self.controller.prepare(payload)
        if not isinstance(prepared, Message):
            self.journal.started(handle, INVALID).finish(journal.FAIL, error_detail(prepared))
            return Answer(INVALID, prepared)
        ticket = self.journal.started(handle, prepared.action.value)
        timeout = self.timeouts.get(prepared.action, self.default_timeout)
        with JobTimeout(timeout, prepared.action.value):
            outcome = self.controller.execute(prepared)
        if outcome.error is None:
            ticket.finish(journal.COMPLETE)
        else:
            state = journal.TIMEOUT if isinstance(outcome.error, ActionTimeout) else journal.FAIL
            ticket.finish(state, _masked(error_detail(outcome.reply), prepared))
        return Answer(prepared.action.value, outcome.reply)


def _masked(error: str, message: Message) -> str:
    token = message.archive.token if message.archive else None
    return error.replace(token, "***") if token else error
