"""LBaaSController: turn one job payload into one reply, whatever the payload holds.

This is the single boundary where failures become FAIL replies: a validation error gets
Libra's `badRequest` shape, a driver error its own sentence, and anything unexpected a
generic sentence (with the traceback in the worker's log). Nothing raises out of `handle`;
`execute` lets only `budget.OverBudget` through (a job run in place that must move).
Every FAIL goes through `messages.reply`, which keeps ``hpcs_error`` within what Libra
stores and puts the whole story in ``hpcs_error_detail``; the log gets the whole story.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from libra_worker import __version__
from libra_worker.budget import OverBudget
from libra_worker.diagnostics import Diagnostics
from libra_worker.drivers.base import LoadBalancerDriver
from libra_worker.errors import InvalidMessage, WorkerError
from libra_worker.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Action,
    Message,
    Oversized,
    bad_request,
    decode,
    parse,
    reply,
    sniff_action,
)
from libra_worker.metrics import format_time, utc_now

LOG = logging.getLogger(__name__)

RELEASE = "libra-worker " + __version__


# Payloads of this many bytes or more are decoded and validated with the collector paused.
_PAUSE_COLLECTOR_FROM = 4096


@contextlib.contextmanager
def without_cycle_collection() -> Iterator[None]:
    """Python's cycle collector paused while a message is decoded and validated.

    That makes a few dicts and objects per node and no reference cycle: the collector,
    started every 700 allocations, only walked them again and again (measured: 35 of 98
    ms of decoding and validating 10,000 nodes; the driver's rendering and state document
    gained nothing, so they are left alone). Reference counting still frees everything;
    cycles made meanwhile anywhere in the process are collected once it runs again.
    Left alone if something else has paused it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(frozen=True)
class Outcome:
    """A job's reply, and the error behind it if it failed."""

    reply: dict[str, Any]
    error: Exception | None = None


class LBaaSController:
    def __init__(self, driver: LoadBalancerDriver, diagnostics: Diagnostics | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.driver = driver
        self.diagnostics = diagnostics or Diagnostics(servers=())
        self.max_message_bytes = max_message_bytes
        # Each action: (message, job identity) -> the reply's extra keys. Only METRICS uses
        # the identity: the same job asked again gets the same period.
        self._actions: dict[Action, Callable[[Message, str | None], dict[str, Any]]] = {
            Action.UPDATE: self._update,
            Action.SUSPEND: self._suspend,
            Action.ENABLE: self._enable,
            Action.DELETE: self._delete,
            Action.DISCOVER: self._discover,
            Action.ARCHIVE: self._archive,
            Action.STATS: self._stats,
            Action.METRICS: self._metrics,
            Action.DIAGNOSTICS: self._diagnostics,
        }

    def handle(self, payload: bytes | str) -> dict[str, Any]:
        """Validate and execute one job; always a reply, never an exception."""
        prepared = self.prepare(payload)
        if isinstance(prepared, Message):
            return self.execute(prepared).reply
        return prepared

    def prepare(self, payload: bytes | str | Oversized) -> Message | dict[str, Any]:
        """The validated message, or the FAIL reply saying why it is not valid."""
        # A ping's few objects never start the collector: pausing it would only cost the
        # ping (2 of the 8 us its validation takes, measured).
        large = not isinstance(payload, Oversized) and len(payload) >= _PAUSE_COLLECTOR_FROM
        with without_cycle_collection() if large else contextlib.nullcontext():
            return self._validated(payload)

    def _validated(self, payload: bytes | str | Oversized) -> Message | dict[str, Any]:
        try:
            document = decode(payload, self.max_message_bytes)
        except InvalidMessage as exc:
            LOG.info("Rejected payload: %s", exc)
            return bad_request({}, str(exc), **self._failure_fields(sniff_action(payload)))
        try:
            return parse(document, payload if isinstance(payload, bytes) else None)
        except InvalidMessage as exc:
            LOG.info("Rejected message: %s", exc)
            action = next((value for key, value in document.items()
                           if key.lower() == "hpcs_action" and isinstance(value, str)), "")
            return bad_request(document, str(exc), **self._failure_fields(action.upper()))

    def execute(self, message: Message, job: str | None = None) -> Outcome:
        """Run a validated message; `job` identifies the Gearman job (handle and unique id)."""
        document = message.original
        try:
            extra = self._actions[message.action](message, job)
        except OverBudget:
            raise  # not an answer: the job runs again on a reader thread (budget.py)
        except WorkerError as exc:
            LOG.warning("%s failed: %s", message.action.value, exc.detail or exc)
            return self.failed(message, exc)
        except OSError as exc:
            # A full or read-only state_dir, mostly: the sentence names the directory (a
            # temporary file's name would push the outcome out of what Libra stores), the
            # detail the file.
            LOG.error("%s failed: %s", message.action.value, exc)
            outcome = "the running load balancer was left unchanged."
            cause = f"{message.action.value} failed: {exc.strerror or exc}"
            fields = self._failure_fields(message.action.value)
            if not exc.filename:
                return Outcome(reply(document, f"{cause}; {outcome}", **fields), exc)
            sentence = f"{cause} in {os.path.dirname(exc.filename)}; {outcome}"
            detail = f"{cause} ({exc.filename}); {outcome}"
            return Outcome(reply(document, sentence, detail=detail, **fields), exc)
        except Exception as exc:  # noqa: BLE001 - the one catch-all: every job gets a reply
            LOG.exception("%s failed unexpectedly", message.action.value)
            sentence = (f"The worker hit an internal error during {message.action.value}; "
                        "see the worker's log for details.")
            return Outcome(reply(document, sentence, **self._failure_fields(message.action.value)), exc)
        LOG.debug("%s passed", message.action.value)
        return Outcome(reply(document, payload=message.payload, **extra))

    def failed(self, message: Message, error: WorkerError) -> Outcome:
        """The FAIL reply of `message` for `error`."""
        fields = {**self._failure_fields(message.action.value), **error.reply_fields}
        return Outcome(reply(message.original, str(error), detail=error.detail, **fields), error)

    def _failure_fields(self, action: str) -> dict[str, Any]:
        """The keys Libra's servers read from these replies without checking for FAIL.

        Safe values: an empty METRICS period (no bytes, nothing covered) and DIAGNOSTICS
        probes that all failed.
        """
        if action == Action.METRICS.value:
            now = format_time(utc_now())
            return {"utc_start": now, "utc_end": now, "loadBalancers": []}
        if action == Action.DIAGNOSTICS.value:
            return self.diagnostics.failed_fields()
        return {}

    # ------------------------------------------------------------------ actions

    def _update(self, message: Message, _job: str | None) -> dict[str, Any]:
        assert message.device is not None
        self.driver.update(message.device)
        return {}

    def _suspend(self, message: Message, _job: str | None) -> dict[str, Any]:
        self.driver.suspend()
        return {}

    def _enable(self, message: Message, _job: str | None) -> dict[str, Any]:
        self.driver.enable()
        return {}

    def _delete(self, message: Message, _job: str | None) -> dict[str, Any]:
        self.driver.delete()
        return {}

    def _discover(self, message: Message, _job: str | None) -> dict[str, Any]:
        return {"version": __version__, "release": RELEASE}

    def _archive(self, message: Message, job: str | None) -> dict[str, Any]:
        assert message.archive is not None
        result = self.driver.archive(message.archive, job)
        return {"archive": result}

    def _stats(self, message: Message, _job: str | None) -> dict[str, Any]:
        stats = self.driver.stats()
        return {
            "status": stats.state,
            "since": stats.since,
            "restarts": stats.restarts,
            "last_error": stats.last_error,
            "nodes": [
                {"id": node.id, "status": node.status, "protocol": node.protocol}
                for node in stats.nodes
            ],
        }

    def _metrics(self, message: Message, job: str | None) -> dict[str, Any]:
        period = self.driver.metrics(job)
        return {
            "utc_start": period.utc_start,
            "utc_end": period.utc_end,
            # Libra's admin server matches `protocol` in lower case.
            "loadBalancers": [{"protocol": protocol, "bytes_out": sent}
                              for protocol, sent in period.bytes_out],
        }

    def _diagnostics(self, message: Message, _job: str | None) -> dict[str, Any]:
        return {"release": RELEASE, **self.diagnostics.run(self.driver.health)}
