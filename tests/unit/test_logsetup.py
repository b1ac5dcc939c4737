"""Unit tests for libra_worker.logsetup: formats, the record cap, destinations, SIGHUP."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from libra_worker import logsetup
from libra_worker.config import WorkerSettings
from libra_worker.errors import ActionTimeout
from libra_worker.logsetup import (
    MAX_RECORD_CHARS,
    JournalFormatter,
    LoggingSetupError,
    RecordCap,
    UTCFormatter,
)


def record(message: str, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("libra_worker.test", level, __file__, 1, "%s", (message,), exc_info)


def settings(tmp_path: Path, **changes) -> WorkerSettings:
    values = dict(state_dir=tmp_path, pid_file=tmp_path / "worker.pid", log_file=None,
                  log_level="INFO", logging_config=None, user=None, group=None, umask=0o022)
    values.update(changes)
    return WorkerSettings(**values)


def _all_loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                   if isinstance(logger, logging.Logger))]


@pytest.fixture(autouse=True)
def restore_loggers():
    """Every logger as it was: a logging config sets named ones too (the shipped one puts
    swiftclient at WARNING), which later tests in the same process would otherwise see."""
    saved = {logger: (logger.handlers[:], logger.level, logger.propagate, logger.disabled)
             for logger in _all_loggers()}
    yield
    for logger in _all_loggers():
        handlers, level, propagate, disabled = saved.get(logger, ([], logging.NOTSET, True, False))
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


def test_utc_timestamps_show_the_zone():
    item = record("hello")
    item.created, item.msecs = 0.0, 7
    assert UTCFormatter(logsetup.PLAIN_FORMAT).format(item) == (
        "1970-01-01T00:00:00.007Z INFO libra_worker.test: hello")


@pytest.mark.parametrize("level, prefix", [
    (logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"),
    (logging.ERROR, "<3>"), (logging.CRITICAL, "<2>"),
])
def test_journal_lines_carry_the_syslog_priority_and_no_timestamp(level, prefix):
    assert JournalFormatter().format(record("hello", level)) == f"{prefix}libra_worker.test: hello"


def test_every_line_of_a_traceback_gets_the_prefix():
    try:
        raise ValueError("boom")
    except ValueError:
        item = record("failed", logging.ERROR, sys.exc_info())
    lines = JournalFormatter().format(item).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)


def test_a_huge_message_is_cut_to_the_cap_and_says_so():
    item = record("x" * 5_000_000)
    RecordCap().filter(item)
    message = item.getMessage()
    assert len(message) <= MAX_RECORD_CHARS
    assert message.endswith(f"[{5_000_000 - MAX_RECORD_CHARS} characters cut]")


def test_a_huge_exception_message_is_cut_too():
    try:
        raise ValueError("y" * 1_000_000)
    except ValueError:
        item = record("failed", logging.ERROR, sys.exc_info())
    RecordCap().filter(item)
    assert len(UTCFormatter().format(item)) <= MAX_RECORD_CHARS + 100  # the timestamp etc.


def test_short_records_are_untouched():
    item = record("short")
    RecordCap().filter(item)
    assert (item.msg, item.args) == ("%s", ("short",))


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path):
    stream_file = tmp_path / "stderr"
    with open(stream_file, "w") as stream:
        status = stream_file.stat()
        assert logsetup.stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}, stream)
        assert not logsetup.stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:1"}, stream)
        assert not logsetup.stderr_is_journal({}, stream)


def test_an_unknown_level_names_the_key():
    with pytest.raises(LoggingSetupError, match=r"\[worker\] log_level 'VERBOSE' is not one of"):
        logsetup.check_level("VERBOSE")


def test_the_daemon_log_in_state_dir_is_capped_by_size(tmp_path):
    logsetup.configure(settings(tmp_path), foreground=False)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == logsetup.DEFAULT_LOG_MAX_BYTES
    assert handler.backupCount == logsetup.DEFAULT_LOG_BACKUPS
    assert any(isinstance(item, RecordCap) for item in handler.filters)


def test_a_log_file_is_watched_for_logrotate(tmp_path):
    logsetup.configure(settings(tmp_path, log_file=tmp_path / "w.log"), foreground=True)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.handlers.WatchedFileHandler)


def test_a_logging_config_that_cannot_open_its_file_names_the_key_and_the_file(tmp_path):
    shipped = (Path(__file__).resolve().parents[2] / "etc" / "logging.conf").read_text()
    config = tmp_path / "logging.conf"
    config.write_text(shipped.replace("/var/log/libra-worker/worker.log", str(tmp_path / "no" / "w.log")))
    with pytest.raises(LoggingSetupError) as error:
        logsetup.configure(settings(tmp_path, logging_config=config), foreground=True)
    assert str(error.value) == (f"[worker] logging_config {config}: cannot open "
                                f"{tmp_path / 'no' / 'w.log'}: No such file or directory.")


def test_a_logging_config_that_is_not_one_names_the_key(tmp_path):
    config = tmp_path / "logging.conf"
    config.write_text("[loggers]\nkeys = root\n")
    with pytest.raises(LoggingSetupError, match=r"\[worker\] logging_config .* is not a usable"):
        logsetup.configure(settings(tmp_path, logging_config=config), foreground=True)


def test_the_shipped_logging_config_logs_utc_and_caps_records(tmp_path):
    shipped = (Path(__file__).resolve().parents[2] / "etc" / "logging.conf").read_text()
    config = tmp_path / "logging.conf"
    config.write_text(shipped.replace("/var/log/libra-worker/worker.log", str(tmp_path / "w.log")))
    logsetup.configure(settings(tmp_path, logging_config=config), foreground=True)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler.formatter, UTCFormatter)
    assert any(isinstance(item, RecordCap) for item in handler.filters)


class AlarmInWrite:
    """A log stream the job's alarm interrupts once, as a slow journald would let it."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.written: list[str] = []

    def write(self, text: str) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self.written.append(text)

    def flush(self) -> None:
        pass


def test_a_job_alarm_landing_in_a_log_write_ends_the_job(tmp_path, monkeypatch):
    stream = AlarmInWrite(ActionTimeout("UPDATE did not finish within its 1 s timeout."))
    monkeypatch.setattr(sys, "stderr", stream)
    logsetup.configure(settings(tmp_path), foreground=True)
    logsetup.configure(settings(tmp_path), foreground=True)  # again, as a SIGHUP does

    with pytest.raises(ActionTimeout):
        logging.getLogger("libra_worker.test").warning("reloading")
    logging.getLogger("libra_worker.test").warning("the next line")
    assert stream.written and "the next line" in stream.written[-1]


def test_any_other_error_in_a_log_write_is_still_only_reported(tmp_path, monkeypatch):
    stream = AlarmInWrite(OSError(5, "Input/output error"))
    monkeypatch.setattr(sys, "stderr", stream)
    logsetup.configure(settings(tmp_path), foreground=True)

    logging.getLogger("libra_worker.test").warning("lost")  # does not raise
    logging.getLogger("libra_worker.test").warning("kept")
    assert "kept" in stream.written[-1]
