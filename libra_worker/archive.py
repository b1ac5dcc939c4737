"""ARCHIVE: ship one protocol's HAProxy access logs to OpenStack Swift.

Flow of :func:`archive_logs`:

1. Rotate the active log aside as a pending file (see ``logsink.LogStore``).  Its
   stamp, the moment its lines were set aside, decides the name of the object they
   become, once: ``<container>/<lb_id>/haproxy-<UTC YYYYmmdd-HHMMSS>-<ns>.log.gz``.
2. Ship every pending file of the protocol, oldest first, as one object each: gzip
   it in chunks into an unnamed temp file inside the log dir, hashing the
   compressed bytes (and the lines) as they are written, so memory stays flat
   whatever the log size; the gzip header carries no time nor file name, so the
   same lines always give the same bytes.
3. PUT it under its name with the MD5 as etag, ``If-None-Match: *`` and the MD5 of
   the lines as metadata, creating the container on 404.  A fresh swiftclient
   ``Connection`` per attempt, no swiftclient retries: our own bounded retry loop
   handles unreachable endpoints and 5xx answers.  An object already under that
   name holding the same lines (412, then a HEAD) is an earlier attempt whose
   answer was lost: the lines count as shipped, and are never shipped twice.
4. Only after Swift confirmed every object, delete the shipped pending files.  On
   a failure the files not shipped stay, under the same names, for the next
   attempt (a re-delivered job, the next ARCHIVE).

A job the job server hands out again after its worker died (same handle and unique
id) is answered what it answered before, if it is the last ARCHIVE of its protocol
that succeeded: its reply was lost with the worker.

The token is never logged nor put in an error message: swiftclient's own debug
log is filtered while we talk to Swift.

Before any of it, :class:`EndpointPolicy` decides whether the message's endpoint is one
the operator allows (``[archive] allowed_endpoints``, ``allow_plain_http``): whoever can
submit a job must not be able to make the device upload tenant logs anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import SplitResult, urlsplit

import requests
import swiftclient.client
from swiftclient.exceptions import ClientException

from libra_worker.errors import ArchiveFailed, quoted
from libra_worker.fileutil import atomic_write
from libra_worker.logsink import LOG_DIR_NAME, LogStore, pending_stamp

LOG = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
MAX_ATTEMPTS = 3
FIRST_BACKOFF = 0.5
DEADLINE_MARGIN = 0.25
REDACTED = "<token>"
# An object's metadata: the MD5 of its lines, and of the gzip bytes its writer sent.
# An object already there whose etag is the latter holds the lines intact, even if
# another zlib (after an upgrade) compressed them otherwise than this one does.
LINES_MD5_HEADER = "X-Object-Meta-Lines-Md5"
GZIP_MD5_HEADER = "X-Object-Meta-Gzip-Md5"

# swiftclient logs request headers at debug level, revealing the first 16
# characters of X-Auth-Token by default; reveal none of it.
swiftclient.client.logger_settings["reveal_sensitive_prefix"] = 0


_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class EndpointPolicy:
    """Where ARCHIVE may upload.

    `allowed` holds host names (any URL on that host) and URL prefixes (same scheme, host
    and port, and a path at or below the prefix's, cut at a '/'); empty allows any host.
    Plain http is refused unless `allow_plain_http`, whatever `allowed` says.
    """

    allowed: tuple[str, ...] = ()
    allow_plain_http: bool = False

    def check(self, endpoint: str) -> None:
        """Raise ArchiveFailed, naming the setting, for an endpoint that is not allowed."""
        try:
            url = urlsplit(endpoint)
            url.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ArchiveFailed(
                f"The object store endpoint {quoted(endpoint)} is not a valid URL."
            ) from None
        if url.scheme == "http" and not self.allow_plain_http:
            raise ArchiveFailed(
                "hpcs_object_store_endpoint: plain http refused by [archive] allow_plain_http "
                "= false; nothing was uploaded.",
                detail="The object store endpoint uses plain http, which would send the token "
                "and the logs in clear; this worker uploads over https only ([archive] "
                "allow_plain_http = false). Nothing was uploaded.",
            )
        if url.scheme not in _DEFAULT_PORTS or not url.hostname:
            raise ArchiveFailed("The object store endpoint must be an http(s) URL.")
        if self.allowed and not any(_matches(url, entry) for entry in self.allowed):
            shown = _without_credentials(url)
            raise ArchiveFailed(
                "hpcs_object_store_endpoint: not in [archive] allowed_endpoints; nothing was "
                "uploaded.",
                detail=f"The object store endpoint {quoted(shown)} is not in [archive] "
                "allowed_endpoints of this worker; nothing was uploaded.",
            )


def _matches(url: SplitResult, entry: str) -> bool:
    if "://" not in entry:
        return url.hostname == entry.lower().strip("[]")
    prefix = urlsplit(entry)
    if (url.scheme, url.hostname) != (prefix.scheme, prefix.hostname):
        return False
    if (url.port or _DEFAULT_PORTS[url.scheme]) != (prefix.port or _DEFAULT_PORTS[prefix.scheme]):
        return False
    base = prefix.path.rstrip("/")
    return url.path == base or url.path.startswith(base + "/")


def _without_credentials(url: SplitResult) -> str:
    """The endpoint for a sentence: user:password@ in a URL is nobody else's business."""
    return url._replace(netloc=url.netloc.rpartition("@")[2], query="", fragment="").geturl()


@dataclass(frozen=True)
class SwiftTarget:
    """Where and how to upload: parsed from the ARCHIVE message."""

    endpoint: str
    token: str
    container: str
    prefix: str

    @classmethod
    def from_basepath(cls, basepath: str, lb_id: str, endpoint: str,
                      token: str) -> "SwiftTarget":
        """``basepath`` is a container, optionally followed by ``/sub/path``."""
        container, _, sub_path = basepath.strip("/").partition("/")
        if not container:
            raise ArchiveFailed("The object store base path is empty.")
        if not lb_id or "/" in lb_id:
            raise ArchiveFailed(f"Invalid load balancer id {lb_id!r} for ARCHIVE.")
        if not endpoint.startswith(("http://", "https://")):
            raise ArchiveFailed("The object store endpoint must be an http(s) URL.")
        if not token:
            raise ArchiveFailed("The object store token is empty.")
        prefix = "/".join(filter(None, [sub_path.strip("/"), lb_id]))
        return cls(endpoint.rstrip("/"), token, container, prefix)

    def object_name(self, stamp: int) -> str:
        """The name of the lines set aside at ``stamp`` (ns since the epoch): it sorts
        by time, and two pending files never share it."""
        seconds, nanoseconds = divmod(stamp, 1_000_000_000)
        when = datetime.fromtimestamp(seconds, timezone.utc)
        return f"{self.prefix}/haproxy-{when:%Y%m%d-%H%M%S}-{nanoseconds:09d}.log.gz"


@dataclass(frozen=True)
class Spool:
    """The compressed logs, ready to upload."""

    file: BinaryIO
    md5: str
    size: int
    lines: int
    raw_bytes: int
    lines_md5: str


@dataclass(frozen=True)
class Shipped:
    """One pending file, now an object in the store."""

    pending: Path
    name: str
    lines: int
    raw_bytes: int
    compressed_bytes: int


class _HashingWriter:
    """File-like sink for GzipFile that hashes what it passes through."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.md5.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


class _RedactToken(logging.Filter):
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = message.replace(self.token, REDACTED), None
        return True


@contextlib.contextmanager
def _token_redacted(token: str) -> Iterator[None]:
    """Strip the token from swiftclient's log records while we use it."""
    swift_logger = logging.getLogger("swiftclient")
    redactor = _RedactToken(token)
    swift_logger.addFilter(redactor)
    try:
        yield
    finally:
        swift_logger.removeFilter(redactor)


def _mask(text: str, token: str) -> str:
    return text.replace(token, REDACTED) if token else text


def archive_logs(log_dir: Path | str, *, protocol: str, lb_id: str, basepath: str,
                 endpoint: str, token: str, timeout: float = 15.0,
                 job: str | None = None) -> dict:
    """Ship the not yet archived access-log lines of ``protocol`` to Swift.

    Args:
        log_dir: the log directory (``LogSink.log_dir``) or the state dir that
            contains it.
        protocol: ``"HTTP"`` or ``"TCP"`` (any case).
        lb_id: load balancer id; first path element of the object name.
        basepath: the Swift container (``hpcs_object_store_basepath``).
        endpoint: Swift storage URL, e.g. ``https://host/v1/AUTH_x``.
        token: Swift auth token; never logged nor echoed in errors.
        timeout: seconds allowed for connecting / waiting on Swift, and the
            budget for retries; with Swift unreachable the call fails within it.
            A slow upload that keeps making progress is not cut off.
        job: the job's identity (job server handle and unique id); the same job
            handed out again gets the same answer (its first reply was lost).

    Returns:
        ``{"object": "<container>/<newest name>", "objects": [every name], "lines": n,
        "bytes": uncompressed, "compressed_bytes": m, "dropped": k}`` where
        ``objects`` has one object per pending file (more than one after failed
        ARCHIVEs) and ``dropped`` counts lines lost at the size cap since the
        previous successful archive.

    Raises:
        ArchiveFailed: with a sentence for the reply; the lines of the objects not
            confirmed are kept.
    """
    if timeout <= 0:
        raise ArchiveFailed("The archive timeout must be positive.")
    store = LogStore(_resolve_log_dir(Path(log_dir)))
    proto = protocol.strip().lower()
    if proto not in ("http", "tcp"):
        raise ArchiveFailed(f"Cannot archive logs of protocol {protocol!r}.")
    target = SwiftTarget.from_basepath(basepath, lb_id, endpoint, token)
    with _archive_lock(store, proto):
        answered = _answered_before(store, proto, job)
        if answered is not None:
            LOG.warning("ARCHIVE job %s again (its reply was lost): the same answer", job)
            return answered
        store.rotate(proto)
        pending = store.pending_paths(proto)
        total_dropped, dropped = store.dropped_unreported(proto)
        if not pending:
            raise ArchiveFailed(_nothing_to_archive(proto, dropped))
        deadline = time.monotonic() + timeout
        shipped: list[Shipped] = []
        try:
            with _token_redacted(token):
                for path in pending:
                    shipped.append(_ship(store, proto, path, target, deadline))
        finally:
            if len(shipped) < len(pending):
                _retire(shipped)
        result = _result(target, shipped, dropped)
        # Remembered before the files go: a job re-run after a crash in between
        # answers the same, and never ships anything twice.
        _remember(store, proto, job, result)
        _retire(shipped)
        store.mark_dropped_reported(proto, total_dropped)
    if dropped:
        LOG.warning("%d %s log lines were dropped at the size cap before this archive",
                    dropped, proto.upper())
    LOG.info("archived %d %s log lines to %s", result["lines"], proto.upper(),
             ", ".join(result["objects"]))
    return result


def _ship(store: LogStore, proto: str, pending: Path, target: SwiftTarget,
          deadline: float) -> Shipped:
    """Upload one pending file under the name its stamp gives it."""
    with tempfile.TemporaryFile(dir=store.directory, prefix=".archive-") as temp:
        spool = _compress(pending, temp)
        try:
            name = _upload(spool, target, target.object_name(pending_stamp(pending)), deadline)
        except _NameTaken:
            # Other lines hold that name (a clock set back to an earlier rotation's
            # moment): these were never shipped under it, so a fresh stamp is safe.
            pending = store.restamp(proto, pending)
            name = _upload(spool, target, target.object_name(pending_stamp(pending)), deadline)
    return Shipped(pending, name, spool.lines, spool.raw_bytes, spool.size)


def _result(target: SwiftTarget, shipped: list[Shipped], dropped: int) -> dict:
    objects = [f"{target.container}/{item.name}" for item in shipped]
    return {"object": objects[-1], "objects": objects,
            "lines": sum(item.lines for item in shipped),
            "bytes": sum(item.raw_bytes for item in shipped),
            "compressed_bytes": sum(item.compressed_bytes for item in shipped),
            "dropped": dropped}


def _answered_path(store: LogStore, proto: str) -> Path:
    return store.directory / f"{proto}.archive.answered"


def _answered_before(store: LogStore, proto: str, job: str | None) -> dict | None:
    """The result of the last successful ARCHIVE of ``proto`` if it was this job."""
    if job is None:
        return None
    try:
        answered = json.loads(_answered_path(store, proto).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as error:  # only a hand edit: the file is replaced atomically
        LOG.error("Unreadable %s (%s): ignored", _answered_path(store, proto), error)
        return None
    return answered["result"] if answered.get("job") == job else None


def _remember(store: LogStore, proto: str, job: str | None, result: dict) -> None:
    atomic_write(_answered_path(store, proto),
                 json.dumps({"job": job, "result": result}) + "\n")


def _resolve_log_dir(path: Path) -> Path:
    return path / LOG_DIR_NAME if (path / LOG_DIR_NAME).is_dir() else path


def _nothing_to_archive(proto: str, dropped: int) -> str:
    message = f"There are no new {proto.upper()} log lines to archive."
    if dropped:
        message += f" {dropped} lines were dropped at the log size cap."
    return message


@contextlib.contextmanager
def _archive_lock(store: LogStore, proto: str) -> Iterator[None]:
    """One archive per protocol at a time, across threads and processes."""
    if not store.directory.is_dir():
        raise ArchiveFailed(_nothing_to_archive(proto, 0))
    fd = os.open(store.directory / f"{proto}.archive.lock", os.O_RDWR | os.O_CREAT,
                 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveFailed(
                f"Another archive of the {proto.upper()} logs is in progress.") from None
        yield
    finally:
        os.close(fd)


def _compress(path: Path, temp: BinaryIO) -> Spool:
    """Gzip ``path`` into ``temp`` in fixed-size chunks."""
    writer = _HashingWriter(temp)
    lines_md5 = hashlib.md5(usedforsecurity=False)
    lines = raw_bytes = 0
    # mtime=0 and no file name: the archive depends on the lines only, so a retry
    # uploads the same bytes, with the same etag.
    with gzip.GzipFile(fileobj=writer, mode="wb", filename="", mtime=0) as archive:
        with open(path, "rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                archive.write(chunk)
                lines_md5.update(chunk)
                lines += chunk.count(b"\n")
                raw_bytes += len(chunk)
    temp.flush()
    return Spool(temp, writer.md5.hexdigest(), writer.size, lines, raw_bytes,
                 lines_md5.hexdigest())


def _retire(shipped: list[Shipped]) -> None:
    for item in shipped:
        with contextlib.suppress(FileNotFoundError):
            item.pending.unlink()


class _Retryable(Exception):
    """A failure worth another attempt; carries the sentence for the reply."""


class _NameTaken(ArchiveFailed):
    """An object of that name holds other lines (HTTP 412): never overwritten."""


def _upload(spool: Spool, target: SwiftTarget, name: str, deadline: float) -> str:
    """PUT the spool as ``name``, retrying transient failures until ``deadline``."""
    backoff = FIRST_BACKOFF
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            # The margin lets a hung attempt time out before the deadline.
            attempt_timeout = max(deadline - time.monotonic() - DEADLINE_MARGIN, 0.1)
            _upload_once(spool, target, name, attempt_timeout)
            return name
        except _Retryable as failure:
            reason = str(failure)
        if attempt == MAX_ATTEMPTS or time.monotonic() + backoff >= deadline:
            break
        LOG.info("archive upload attempt %d failed (%s); retrying", attempt, reason)
        time.sleep(backoff)
        backoff *= 2
    raise ArchiveFailed(f"{reason} Gave up after {attempt} attempt(s); "
                        "the logs are kept for the next ARCHIVE.")


def _upload_once(spool: Spool, target: SwiftTarget, name: str, timeout: float) -> None:
    connection = swiftclient.client.Connection(
        preauthurl=target.endpoint, preauthtoken=target.token, retries=0,
        timeout=timeout)
    try:
        _put_archive(connection, spool, target, name)
    except ClientException as error:
        raise _client_error(error, target) from None
    except requests.exceptions.RequestException as error:
        raise _Retryable(
            f"Could not reach the object store at {target.endpoint} "
            f"({type(error).__name__}).") from None
    finally:
        connection.close()


def _put_archive(connection: swiftclient.client.Connection, spool: Spool,
                 target: SwiftTarget, name: str) -> None:
    status = _put_object(connection, spool, target, name)
    if status == 404:
        connection.put_container(target.container)
        status = _put_object(connection, spool, target, name)
    if status == 404:
        raise ArchiveFailed(f"The object store has no container "
                            f"{target.endpoint}/{target.container} (HTTP 404).")
    # 412: an object of that name exists; never overwritten.  Holding these very
    # lines, it is an earlier attempt whose answer never came back: shipped.
    if status == 412 and not _holds(connection.head_object(target.container, name), spool):
        raise _NameTaken(f"The object store already holds other lines as {name} "
                         "(HTTP 412).")


def _holds(headers: dict, spool: Spool) -> bool:
    """Whether an object's headers show the spool's bytes, or its lines intact."""
    etag = headers.get("etag", "").strip('"')
    return etag == spool.md5 or (headers.get(LINES_MD5_HEADER.lower()) == spool.lines_md5
                                 and headers.get(GZIP_MD5_HEADER.lower()) == etag)


def _put_object(connection: swiftclient.client.Connection, spool: Spool,
                target: SwiftTarget, name: str) -> int:
    """PUT the spool; return the HTTP status (404/412 are left to the caller)."""
    spool.file.seek(0)
    response: dict = {}
    try:
        etag = connection.put_object(
            target.container, name, spool.file, content_length=spool.size,
            etag=spool.md5, content_type="application/gzip",
            headers={"If-None-Match": "*", LINES_MD5_HEADER: spool.lines_md5,
                     GZIP_MD5_HEADER: spool.md5},
            response_dict=response)
    except ClientException as error:
        if error.http_status in (404, 412):
            return error.http_status
        raise
    if (etag or "").strip('"') != spool.md5:
        # Not retried: the name is taken now, by bytes that are not these.
        raise ArchiveFailed(f"The object store returned etag {quoted(etag)} for the "
                            f"archive instead of its MD5 {spool.md5}; the logs are kept "
                            "for the next ARCHIVE.")
    return int(response.get("status", 201))


def _client_error(error: ClientException, target: SwiftTarget) -> Exception:
    """Turn a swiftclient error into ArchiveFailed, or _Retryable for 5xx."""
    status = error.http_status
    where = f"{target.endpoint}/{target.container}"
    if status == 401:
        return ArchiveFailed("The object store rejected the authorization token "
                             "(HTTP 401): it is wrong or has expired.")
    if status == 403:
        return ArchiveFailed(f"The token is not authorized to write to {where} "
                             "(HTTP 403).")
    if status == 422:
        return _Retryable("The object store reported an etag (MD5) mismatch for "
                          "the uploaded archive (HTTP 422).")
    if status is not None and status >= 500:
        return _Retryable(f"The object store at {target.endpoint} answered "
                          f"HTTP {status} {error.http_reason or ''}".rstrip() + ".")
    detail = _mask(str(error.msg or error), target.token)
    if status is None:
        return ArchiveFailed(f"The archive upload to {where} failed: {detail}.")
    return ArchiveFailed(f"The object store refused the archive upload to {where} "
                         f"(HTTP {status}): {detail}.")
