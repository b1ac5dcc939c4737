"""LBaaSController: turn one job payload into one reply, whatever the payload holds.

This is the single boundary where failures become FAIL replies: a validation error gets
Libra's `badRequest` shape, a driver error its own sentence, and anything unexpected a
generic sentence (with the traceback in the worker's log). Nothing raises out of `handle`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from libra_worker import __version__
from libra_worker.drivers.base import LoadBalancerDriver
from libra_worker.errors import InvalidMessage, WorkerError
from libra_worker.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Action,
    Message,
    bad_request,
    decode,
    parse,
    reply,
)

LOG = logging.getLogger(__name__)

RELEASE = "libra-worker " + __version__


@dataclass(frozen=True)
class Outcome:
    """A job's reply, and the error behind it if it failed."""

    reply: dict[str, Any]
    error: Exception | None = None


class LBaaSController:
    def __init__(self, driver: LoadBalancerDriver,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.driver = driver
        self.max_message_bytes = max_message_bytes
        self._actions: dict[Action, Callable[[Message], dict[str, Any]]] = {
            Action.UPDATE: self._update,
            Action.SUSPEND: self._suspend,
            Action.ENABLE: self._enable,
            Action.DELETE: self._delete,
            Action.DISCOVER: self._discover,
            Action.ARCHIVE: self._archive,
            Action.STATS: self._stats,
        }

    def handle(self, payload: bytes | str) -> dict[str, Any]:
        """Validate and execute one job; always a reply, never an exception."""
        prepared = self.prepare(payload)
        if isinstance(prepared, Message):
            return self.execute(prepared).reply
        return prepared

    def prepare(self, payload: bytes | str) -> Message | dict[str, Any]:
        """The validated message, or the FAIL reply saying why it is not valid."""
        try:
            document = decode(payload, self.max_message_bytes)
        except InvalidMessage as exc:
            return bad_request({}, str(exc))
        try:
            return parse(document)
        except InvalidMessage as exc:
            LOG.info("Rejected message: %s", exc)
            return bad_request(document, str(exc))

    def execute(self, message: Message) -> Outcome:
        document = message.original
        try:
            extra = self._actions[message.action](message)
        except WorkerError as exc:
            LOG.warning("%s failed: %s", message.action.value, exc)
            return Outcome(reply(document, str(exc), **exc.reply_fields), exc)
        except OSError as exc:
            # A full or read-only state_dir, mostly: the sentence must say which file.
            LOG.error("%s failed: %s", message.action.value, exc)
            where = f" ({exc.filename})" if exc.filename else ""
            sentence = (f"{message.action.value} failed: {exc.strerror or exc}{where}; "
                        "the running load balancer was left unchanged.")
            return Outcome(reply(document, sentence), exc)
        except Exception as exc:  # noqa: BLE001 - the one catch-all: every job gets a reply
            LOG.exception("%s failed unexpectedly", message.action.value)
            sentence = (f"The worker hit an internal error during {message.action.value}; "
                        "see the worker's log for details.")
            return Outcome(reply(document, sentence), exc)
        LOG.debug("%s passed", message.action.value)
        return Outcome(reply(document, **extra))

    # ------------------------------------------------------------------ actions

    def _update(self, message: Message) -> dict[str, Any]:
        assert message.device is not None
        self.driver.update(message.device)
        return {}

    def _suspend(self, message: Message) -> dict[str, Any]:
        self.driver.suspend()
        return {}

    def _enable(self, message: Message) -> dict[str, Any]:
        self.driver.enable()
        return {}

    def _delete(self, message: Message) -> dict[str, Any]:
        self.driver.delete()
        return {}

    def _discover(self, message: Message) -> dict[str, Any]:
        return {"version": __version__, "release": RELEASE}

    def _archive(self, message: Message) -> dict[str, Any]:
        assert message.archive is not None
        result = self.driver.archive(message.archive)
        return {"archive": result}

    def _stats(self, message: Message) -> dict[str, Any]:
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
