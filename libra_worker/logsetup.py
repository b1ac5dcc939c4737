"""Where the worker's own log lines go, in what form, and how they are re-opened.

Destinations, first match wins:

* ``[worker] logging_config``: a ``logging.config.fileConfig`` file, the operator's choice.
* ``[worker] log_file``: that file, re-opened when logrotate moves it (and on SIGHUP).
* run by systemd (``JOURNAL_STREAM`` names our stderr): stderr, one ``<N>``-prefixed line
  per record line and no timestamp, because journald adds its own and reads the priority.
* ``--foreground``: stderr.
* daemonized: ``state_dir/worker.log``, rotated by size (`DEFAULT_LOG_MAX_BYTES`, with
  `DEFAULT_LOG_BACKUPS` old files): it lives in ``state_dir``, which no logrotate file
  knows about, so nothing else would ever cap it.

Timestamps are UTC with the zone shown (``2026-11-26T07:10:50.123Z``). One record is capped
at `MAX_RECORD_CHARS` characters, traceback included: a hostile message must not be able
to write megabytes into one line.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import logging.handlers
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping, TextIO

from libra_worker.config import WorkerSettings
from libra_worker.errors import ActionTimeout

MAX_RECORD_CHARS = 8192
DEFAULT_LOG_NAME = "worker.log"
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_BACKUPS = 4
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# syslog priorities (sd-daemon.h), which journald reads from a "<N>" line prefix.
_JOURNAL_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                       (logging.INFO, 6))
_DEBUG_PRIORITY = 7


class LoggingSetupError(Exception):
    """The logging settings cannot be applied; the message names the config key."""


class RecordCap(logging.Filter):
    """Cut one record's message and traceback to `limit` characters in all."""

    def __init__(self, limit: int = MAX_RECORD_CHARS) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        traceback = record.exc_text or ""
        if len(message) + len(traceback) > self.limit:
            message = _cut(message, self.limit)
            traceback = _cut(traceback, max(self.limit - len(message), 0))
            record.msg, record.args = message, None
            record.exc_text = traceback or None
        return True


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f" ... [{len(text) - limit} characters cut]"
    return text[: max(limit - len(marker), 0)] + marker


class UTCFormatter(logging.Formatter):
    """ISO 8601 timestamps in UTC, milliseconds, and a `Z`; usable from fileConfig files."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime(datefmt or "%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`, the prefix repeated on every line of a traceback."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def journal_priority(level: int) -> int:
    for threshold, priority in _JOURNAL_PRIORITIES:
        if level >= threshold:
            return priority
    return _DEBUG_PRIORITY


def stderr_is_journal(environ: Mapping[str, str] = os.environ, stream: TextIO | None = None) -> bool:
    """True when systemd connected our stderr to journald (JOURNAL_STREAM is its dev:inode)."""
    expected = environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def check_level(level: str) -> None:
    if level not in LEVEL_NAMES:
        raise LoggingSetupError(
            f"[worker] log_level {level[:20]!r} is not one of {', '.join(LEVEL_NAMES)}.")


def configure(settings: WorkerSettings, foreground: bool) -> None:
    """Install the worker's log handlers (replacing any); see the module docstring."""
    if settings.logging_config is not None:
        _apply_file(settings.logging_config)
    else:
        check_level(settings.log_level)
        handler = _handler(settings, foreground)
        if not isinstance(handler.formatter, JournalFormatter):
            handler.setFormatter(UTCFormatter(PLAIN_FORMAT))
        root = logging.getLogger()
        for old in root.handlers:
            old.close()
        root.handlers[:] = [handler]
        root.setLevel(settings.log_level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(item, RecordCap) for item in handler.filters):
            handler.addFilter(RecordCap())
        _let_alarms_through(handler)


def _let_alarms_through(handler: logging.Handler) -> None:
    """A job's alarm (`ActionTimeout`, raised wherever the job is: jobs.JobTimeout) that
    lands while `handler` writes a record ends the job, as anywhere else. `Handler.emit`
    gives every Exception to `handleError`, which printed it as a logging error, and the job
    ran on with no limit (measured: 819 of 2,000 alarms landing in log calls, with a slow
    log stream)."""
    if "handleError" in vars(handler):  # already let through (a re-configuration)
        return
    report = handler.handleError

    def handle_error(record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ActionTimeout):
            raise error
        report(record)

    handler.handleError = handle_error  # type: ignore[method-assign]


def _handler(settings: WorkerSettings, foreground: bool) -> logging.Handler:
    handler: logging.Handler
    try:
        if settings.log_file is not None:
            return logging.handlers.WatchedFileHandler(settings.log_file)
        if stderr_is_journal():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JournalFormatter())
            return handler
        if foreground:
            return logging.StreamHandler(sys.stderr)
        return logging.handlers.RotatingFileHandler(
            settings.state_dir / DEFAULT_LOG_NAME,
            maxBytes=DEFAULT_LOG_MAX_BYTES, backupCount=DEFAULT_LOG_BACKUPS)
    except OSError as exc:
        key = "log_file" if settings.log_file is not None else "state_dir"
        raise LoggingSetupError(
            f"[worker] {key}: cannot open the log file {exc.filename}: {exc.strerror}.") from None


def _apply_file(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise LoggingSetupError(f"[worker] logging_config {path} cannot be read.")
    try:
        logging.config.fileConfig(path, disable_existing_loggers=False)
    except OSError as exc:
        raise LoggingSetupError(
            f"[worker] logging_config {path}: cannot open {exc.filename}: {exc.strerror}."
        ) from None
    except Exception as exc:  # noqa: BLE001 - fileConfig raises anything from KeyError up
        raise LoggingSetupError(
            f"[worker] logging_config {path} is not a usable logging configuration: "
            f"{type(exc).__name__}: {str(exc)[:200]}") from None


class LogReopener(threading.Thread):
    """Re-reads the logging settings and re-opens the files when `request()` is called.

    `request()` is safe from a signal handler: the work happens on this thread, never
    inside a handler that may have interrupted a log call holding a handler's lock.
    """

    def __init__(self, settings: WorkerSettings, foreground: bool) -> None:
        super().__init__(name="log-reopener", daemon=True)
        self.settings = settings
        self.foreground = foreground
        self._requested = threading.Event()

    def request(self) -> None:
        self._requested.set()

    def run(self) -> None:
        log = logging.getLogger(__name__)
        while True:
            self._requested.wait()
            self._requested.clear()
            try:
                configure(self.settings, self.foreground)
            except LoggingSetupError as exc:
                # fileConfig may have removed the old handlers already: log somewhere.
                with contextlib.suppress(LoggingSetupError):
                    configure(replace(self.settings, logging_config=None), self.foreground)
                log.error("SIGHUP: %s Logging as log_file/log_level say instead.", exc)
                continue
            log.info("SIGHUP: log files re-opened, logging configuration re-read")
