"""The few exceptions the worker raises; the controller turns each into a FAIL reply."""


class WorkerError(Exception):
    """Base class: its message is the human sentence that becomes ``hpcs_error``.

    `reply_fields` are added to the FAIL reply beside it (e.g. STATS's ``status``);
    `detail` is the whole story when the sentence summarises it (HAProxy's own message),
    for the log, the journal and ``hpcs_error_detail``.
    """

    def __init__(self, message: str, *, detail: str | None = None, **reply_fields: object) -> None:
        super().__init__(message)
        self.detail = detail
        self.reply_fields = reply_fields


class InvalidMessage(WorkerError):
    """The message is malformed or fails validation; nothing was touched."""


class ConfigCheckFailed(WorkerError):
    """``haproxy -c`` rejected the rendered configuration."""


class ReloadFailed(WorkerError):
    """HAProxy could not be started, reloaded or stopped."""


class StatsUnavailable(WorkerError):
    """HAProxy is not running or its stats socket does not answer."""


class ArchiveFailed(WorkerError):
    """The logs could not be shipped to the object store."""


class ActionTimeout(WorkerError):
    """An action took longer than its configured timeout."""


QUOTE_LIMIT = 40


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A value the worker did not create, as it may appear in a sentence: quoted, and cut
    to a short prefix with its full length when longer, so that a hostile 20 MB field
    never reaches a reply, the journal or the log whole."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"
