"""Run one job: validate, execute under its action's timeout, journal it, mask the token.

Like a job runner's worker loop, a job that outlives its timeout is abandoned: the reply
is FAIL naming the timeout, the journal says TIMEOUT, and the worker takes the next job.
The abandoned thread still ends on its own, because every HAProxy command and Swift
upload below it has a timeout of its own; until it does, it keeps the driver's lock, so a
following job that needs the driver waits for it.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from libra_worker import journal
from libra_worker.controller import LBaaSController
from libra_worker.journal import Journal
from libra_worker.messages import Action, Message, reply

TOKEN_FIELD = "hpcs_object_store_token"
DEFAULT_TIMEOUT = 120.0


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

    def run(self, handle: str, payload: bytes) -> dict[str, Any]:
        prepared = self.controller.prepare(payload)
        if not isinstance(prepared, Message):
            self.journal.started(handle, "INVALID").finish(journal.FAIL, prepared["hpcs_error"])
            return prepared
        ticket = self.journal.started(handle, prepared.action.value)
        timeout = self.timeouts.get(prepared.action, self.default_timeout)
        answer = _call_with_timeout(lambda: self.controller.execute(prepared), timeout)
        if answer is _UNFINISHED:
            error = (
                f"{prepared.action.value} did not finish within its {timeout:g} s timeout; "
                "the worker stopped waiting, and the change may still take effect."
            )
            ticket.finish(journal.TIMEOUT, error)
            return reply(prepared.original, error)
        error = answer.get("hpcs_error")
        ticket.finish(journal.FAIL if error else journal.COMPLETE, _masked(error, prepared))
        return answer


_UNFINISHED: dict[str, Any] = {}


def _call_with_timeout(call: Any, timeout: float) -> dict[str, Any]:
    """`call()`'s result, or _UNFINISHED if it has not returned within `timeout` seconds."""
    result: list[dict[str, Any]] = []
    thread = threading.Thread(target=lambda: result.append(call()), name="job", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _UNFINISHED
    # execute() catches every Exception; only a BaseException could leave no result.
    return result[0] if result else {"hpcs_response": "FAIL", "hpcs_error": "The job was interrupted."}


def _masked(error: str | None, message: Message) -> str | None:
    token = message.archive.token if message.archive else None
    if error and token:
        return error.replace(token, "***")
    return error
