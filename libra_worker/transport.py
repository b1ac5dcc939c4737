"""The Gearman side: serve every configured job server, reconnecting by itself.

`JobServerWorker` always answers with WORK_COMPLETE carrying the JSON reply, FAIL
included: API servers read the reply, and the gearman command-line client waits forever
on a WORK_EXCEPTION. `serve` wraps pygearman's work loop, which gives up when no job
server is reachable, in a loop that reconnects with backoff until a stop is requested.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import gearman
from gearman.errors import GearmanError

from libra_worker.config import GearmanSettings
from libra_worker.messages import encode_reply

LOG = logging.getLogger(__name__)

# (job handle, payload) -> reply
Handler = Callable[[str, bytes], dict[str, Any]]
_INITIAL_RECONNECT_DELAY = 0.2


def internal_error_reply() -> dict[str, Any]:
    return {
        "hpcs_response": "FAIL",
        "hpcs_error": "The worker hit an internal error; see the worker's log for details.",
    }


class JobServerWorker(gearman.GearmanWorker):
    def __init__(self, settings: GearmanSettings, handler: Handler, stopping: threading.Event) -> None:
        super().__init__([f"{host}:{port}" for host, port in settings.servers])
        self.settings = settings
        self.handler = handler
        self.stopping = stopping
        self.jobs_done = 0
        # pygearman crashes on the first job if the task name is text.
        self.register_task(settings.function.encode("utf-8"), self._execute)

    def _execute(self, _worker: gearman.GearmanWorker, job: Any) -> bytes:
        started = time.monotonic()
        try:
            answer = self.handler(_text(job.handle), job.data)
        except Exception:  # noqa: BLE001 - the controller already catches; this is the last net
            LOG.exception("Job %s: the handler raised", _text(job.handle))
            answer = internal_error_reply()
        self.jobs_done += 1
        LOG.info(
            "Job %s answered %s in %.1f ms",
            _text(job.handle), answer.get("hpcs_response"), (time.monotonic() - started) * 1000,
        )
        return encode_reply(answer)

    def on_job_execute(self, current_job: Any) -> bool:
        # pygearman turns a raising callback into WORK_FAIL; ours never raises.
        return self.on_job_complete(current_job, self._execute(self, current_job))

    def after_poll(self, any_activity: bool) -> bool:
        return not self.stopping.is_set()


def serve(settings: GearmanSettings, handler: Handler, stopping: threading.Event) -> None:
    """Serve jobs until `stopping` is set; a job in hand is finished and answered first."""
    worker = JobServerWorker(settings, handler, stopping)
    delay = _INITIAL_RECONNECT_DELAY
    LOG.info("Serving function %r on %s", settings.function, _describe(settings))
    try:
        while not stopping.is_set():
            try:
                # Returns every poll_timeout so that job servers that were down are retried.
                worker.work(poll_timeout=settings.poll_timeout)
            except (GearmanError, OSError) as exc:
                LOG.warning("No job server reachable (%s); retrying in %.1f s", exc, delay)
                stopping.wait(delay)
                delay = min(delay * 2, settings.reconnect_delay_max)
    finally:
        worker.shutdown()
        LOG.info("Stopped serving after %d jobs", worker.jobs_done)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _describe(settings: GearmanSettings) -> str:
    return ", ".join(f"{host}:{port}" for host, port in settings.servers)
