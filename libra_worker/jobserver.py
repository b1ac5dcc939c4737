"""One connection to one job server: TLS, TCP keepalive, connecting without blocking the others.

`JobServerConnection` replaces pygearman's `GearmanConnection` for the worker and for
libra-client. It changes seven things:

* **TLS reads and writes never spin.** pygearman retries `recv`/`send` in a loop while
  OpenSSL says SSL_ERROR_WANT_READ/WANT_WRITE. With TLS 1.3 the server sends session tickets
  after the handshake: the socket is readable, OpenSSL consumes the ticket and has no
  application data, so `recv` raises WANT_READ and pygearman loops at 100% CPU until the
  job server next says something (for a sleeping worker: the next job). Here WANT_* means
  "nothing to hand over yet"; the poll loop comes back when the socket is ready. The
  upstream fix would be the same change in `GearmanConnection.read_data_from_socket` and
  `send_data_to_socket` (return instead of `continue`).
* **Keepalive**: every socket gets SO_KEEPALIVE with `keepidle/keepintvl/keepcnt`, and
  TCP_USER_TIMEOUT of the same total, so a job server that vanished without closing the
  connection (power loss, partition) is noticed whether the link was idle or had unacked
  data; the poll loop then sees the error and the worker reconnects.
* **Connect timeout, any address family**: `socket.create_connection` with
  `connect_timeout` (pygearman connects IPv4 only and with no timeout, so one unreachable
  server could block the worker for minutes).
* **Answers are timed**: the time a question (ECHO_REQ, GRAB_JOB) went unanswered is
  tracked, so the worker can drop a job server that is frozen (its TCP stack still
  answers, keepalive cannot see it).
* **A refused certificate is named** even when TLS 1.3 loses the alert that says so: a
  TLS 1.3 session the job server ends before its first answer (see `_lost`).
* **The payload limit holds while reading.** pygearman holds a packet whole before it
  parses it, and copies it several times over (a 1 GB job took the worker to 3.1 GB).
  Given `max_job_bytes` (the worker's `[worker] max_message_bytes`), a job whose packet
  announces more is drained from the socket in chunks as it arrives, and handed on as an
  `Oversized` payload (its size and first bytes), which the worker refuses as it refuses
  any payload over the limit.
* **Packets cost less.** Reads take up to 64 KiB (pygearman: 4 KiB, a poll each), each
  packet is parsed once where it lies in a bytearray (pygearman copies what follows it,
  and converts it back to bytes), and packed without building a format string and two
  sets for it. Both were a fifth of a ping's Python in the worker; what they produce is
  pygearman's, and anything unusual still goes through pygearman's own code.

`BackgroundJobServerConnection` (the worker's) connects in a thread, so a job server that
does not answer SYNs never stalls jobs from the others.
"""

from __future__ import annotations

import errno
import functools
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable, NoReturn

from gearman.connection import GearmanConnection
from gearman.errors import ConnectionError as GearmanConnectionError
from gearman.errors import ProtocolError
from gearman.protocol import (
    COMMAND_HEADER_SIZE,
    GEARMAN_COMMAND_ECHO_REQ,
    GEARMAN_COMMAND_GRAB_JOB,
    GEARMAN_COMMAND_GRAB_JOB_UNIQ,
    GEARMAN_COMMAND_JOB_ASSIGN,
    GEARMAN_COMMAND_JOB_ASSIGN_UNIQ,
    GEARMAN_COMMAND_TEXT_COMMAND,
    GEARMAN_PARAMS_FOR_COMMAND,
    MAGIC_REQ_STRING,
    MAGIC_RES_STRING,
)

from libra_worker.config import GearmanSettings
from libra_worker.messages import SNIFF_BYTES, Oversized
from libra_worker.tls import client_context, describe_closed_after_handshake, describe_tls_error

_QUESTIONS = frozenset({GEARMAN_COMMAND_ECHO_REQ, GEARMAN_COMMAND_GRAB_JOB, GEARMAN_COMMAND_GRAB_JOB_UNIQ})
_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)
_HEADER = struct.Struct("!4sII")  # a Gearman packet's magic, type and length
# Room for what precedes a job's data in its packet: handle, function name, unique id
# (gearmand allows 64 bytes for a unique id; the handle and our function name are short).
_JOB_PREFIX_ROOM = 4096
_DRAIN_CHUNK = 256 * 1024
# What one read takes from the socket (pygearman: 4 KiB, so a 100 KB UPDATE took 25 polls).
_READ_CHUNK = 64 * 1024


def describe_error(error: BaseException, settings: GearmanSettings) -> str:
    """One readable line for why a job-server connection failed."""
    if isinstance(error, ssl.SSLError):
        return describe_tls_error(error, settings)
    if isinstance(error, TimeoutError) and error.errno is None:  # the socket's own timeout
        return f"no answer within {settings.connect_timeout:g} s (connect_timeout)"
    if isinstance(error, OSError) and error.errno == errno.ETIMEDOUT:
        return "connection timed out (keepalive probes or sent data went unanswered)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def open_socket(host: str, port: int, settings: GearmanSettings,
                context: ssl.SSLContext | None) -> socket.socket:
    """A connected (and, with TLS, handshaken) socket with keepalive; raises OSError."""
    connection = socket.create_connection((host, port), timeout=settings.connect_timeout)
    try:
        if settings.keepalive:
            set_keepalive(connection, settings)
        if context is not None:
            connection = context.wrap_socket(connection, server_hostname=host)
    except BaseException:
        connection.close()
        raise
    return connection


def set_keepalive(connection: socket.socket, settings: GearmanSettings) -> None:
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, settings.keepidle)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, settings.keepintvl)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepcnt)
    # Keepalive only probes an idle connection; unacked data would otherwise be retried for
    # ~15 minutes (tcp_retries2). One limit for both.
    dead_after = settings.keepidle + settings.keepintvl * settings.keepcnt
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, dead_after * 1000)


class JobServerConnection(GearmanConnection):
    """A pygearman connection with TLS that does not spin, keepalive and timed answers."""

    def __init__(self, host: str, port: int, settings: GearmanSettings,
                 context: ssl.SSLContext | None, max_job_bytes: int | None = None) -> None:
        self.settings = settings
        self.context = context
        self.max_job_bytes = max_job_bytes
        self.last_error: str | None = None
        self.question_since: float | None = None
        self.answered = False  # anything received on this connection yet
        self.tls_version: str | None = None
        super().__init__(host=host, port=port)
        self.use_ssl = context is not None

    @property
    def address(self) -> str:
        host = f"[{self.gearman_host}]" if ":" in self.gearman_host else self.gearman_host
        return f"{host}:{self.gearman_port}"

    def _reset_connection(self) -> None:
        super()._reset_connection()
        self._incoming_buffer = bytearray()  # pygearman's array is copied per packet parsed
        self.question_since = None
        self.answered = False
        self._draining: _Drain | None = None

    def _create_client_socket(self) -> None:
        try:
            connection = open_socket(self.gearman_host, self.gearman_port, self.settings, self.context)
        except OSError as exc:
            self.throw_exception(exception=exc)
        self.set_socket(connection)

    def set_socket(self, current_socket: socket.socket) -> None:
        super().set_socket(current_socket)
        # Kept: a session torn down by an EOF no longer tells its version.
        self.tls_version = (current_socket.version() if isinstance(current_socket, ssl.SSLSocket)
                            else None)

    def adopt(self, connection: socket.socket) -> None:
        """Take a socket connected elsewhere (see BackgroundJobServerConnection)."""
        self._reset_connection()
        self.set_socket(connection)
        self.connected = True
        self._is_client_side = True
        self._is_server_side = False

    def read_data_from_socket(self, bytes_to_read: int = _READ_CHUNK) -> int:
        if not self.connected:
            raise_connection_error(self.address, "disconnected")  # last_error keeps why
        if self._draining is not None:
            bytes_to_read = _DRAIN_CHUNK
        try:
            received = self.gearman_socket.recv(bytes_to_read)
            if self.use_ssl:
                # Decrypted bytes left in OpenSSL's buffer do not wake the poll loop again.
                while pending := self.gearman_socket.pending():
                    received += self.gearman_socket.recv(pending)
        except _WOULD_BLOCK:
            return len(self._incoming_buffer)  # a TLS record with no data for us (a ticket)
        except OSError as exc:
            self._lost(exc)
        if not received:
            self._lost(None)
        self.answered = True
        self.question_since = None
        if self._draining is not None:
            received = self._draining.consume(received)
            if self._draining.remaining == 0:
                drained, self._draining = self._draining, None
                command = drained.command()
                if command is None:
                    self.throw_exception(message=f"a {drained.length}-byte job packet without "
                                                 f"the fields that precede its data")
                self._incoming_commands.append(command)
        self._incoming_buffer += received
        return len(self._incoming_buffer)

    def read_commands_from_buffer(self) -> int:
        """The whole packets read so far, as pygearman parses them (binary, each argument
        bytes), onto the command queue: each parsed once where it lies in the buffer
        (pygearman copies the rest of the buffer after each packet, and each packet back
        to bytes)."""
        buffer = self._incoming_buffer
        magic = MAGIC_RES_STRING if self._is_client_side else MAGIC_REQ_STRING
        offset = commands = 0
        while len(buffer) - offset >= COMMAND_HEADER_SIZE:
            packet_magic, command, length = _HEADER.unpack_from(buffer, offset)
            if packet_magic != magic:
                raise ProtocolError("Malformed Magic")
            names = GEARMAN_PARAMS_FOR_COMMAND.get(command)
            if names is None or command == GEARMAN_COMMAND_TEXT_COMMAND:
                raise ProtocolError(f"Received unknown binary command: {command}")
            end = offset + COMMAND_HEADER_SIZE + length
            if len(buffer) < end:
                break
            body = bytes(buffer[offset + COMMAND_HEADER_SIZE:end])
            values = body.split(b"\0", len(names) - 1) if names else ([body] if body else [])
            if len(values) != len(names):
                raise ProtocolError(f"Received {len(values)} argument(s), expecting "
                                    f"{len(names)} argument(s): {command}")
            self._incoming_commands.append((command, dict(zip(names, values))))
            commands += 1
            offset = end
        del buffer[:offset]
        # What is left is the start of a packet still incomplete: drain it if it is too large.
        if self.max_job_bytes is not None and self._draining is None:
            self._draining = self._oversized_job_ahead(self.max_job_bytes)
        return commands

    def _oversized_job_ahead(self, max_job_bytes: int) -> "_Drain | None":
        """A drain for the packet the buffer starts with if it announces more than a job
        within `max_job_bytes` needs (its bytes so far moved into the drain); else None."""
        if len(self._incoming_buffer) < COMMAND_HEADER_SIZE:
            return None
        _magic, command, length = _HEADER.unpack_from(self._incoming_buffer)
        if length <= max_job_bytes + _JOB_PREFIX_ROOM:
            return None
        if command not in (GEARMAN_COMMAND_JOB_ASSIGN, GEARMAN_COMMAND_JOB_ASSIGN_UNIQ):
            self.throw_exception(message=f"the job server announced a {length}-byte packet of "
                                         f"type {command}, more than any answer to a worker")
        drain = _Drain(command, length)
        drain.consume(bytes(self._incoming_buffer[COMMAND_HEADER_SIZE:]))
        self._incoming_buffer = bytearray()
        return drain

    def send_data_to_socket(self) -> int:
        if not self.connected:
            raise_connection_error(self.address, "disconnected")  # last_error keeps why
        if not self._outgoing_buffer:
            return 0
        try:
            sent = self.gearman_socket.send(self._outgoing_buffer)
        except _WOULD_BLOCK:
            return len(self._outgoing_buffer)  # the poll loop retries when writable
        except OSError as exc:
            self._lost(exc)
        self._outgoing_buffer = self._outgoing_buffer[sent:]
        return len(self._outgoing_buffer)

    def _pack_command(self, cmd_type: int, cmd_args: dict[str, Any]) -> bytes:
        """A packet as pygearman packs it, without the format string and sets it builds
        for each; any argument that is not bytes, or not named as the protocol names it,
        is left to pygearman's own (which converts text and raises its errors)."""
        names = GEARMAN_PARAMS_FOR_COMMAND.get(cmd_type)
        if names is None or cmd_type == GEARMAN_COMMAND_TEXT_COMMAND or len(cmd_args) != len(names):
            return super()._pack_command(cmd_type, cmd_args)
        if not names and not self._is_server_side:  # GRAB_JOB_UNIQ, PRE_SLEEP: one each job
            return _bare_request(cmd_type)
        values = [cmd_args.get(name) for name in names]
        if (not all(isinstance(value, bytes) for value in values)
                or any(b"\0" in value for value in values[:-1])):
            return super()._pack_command(cmd_type, cmd_args)
        payload = b"\0".join(values)
        magic = MAGIC_RES_STRING if self._is_server_side else MAGIC_REQ_STRING
        return _HEADER.pack(magic, cmd_type, len(payload)) + payload

    def send_command(self, cmd_type: int, cmd_args: dict[str, Any]) -> None:
        if cmd_type in _QUESTIONS and self.question_since is None:
            self.question_since = time.monotonic()
        super().send_command(cmd_type, cmd_args)

    def overdue(self, limit: float) -> bool:
        """Whether a question has waited more than `limit` seconds with nothing received.

        An answer already waiting in the socket counts: the worker may have been busy with
        a job of another server while it arrived. The socket is looked at only past the
        limit: the loop asks after every poll.
        """
        return (self.question_since is not None
                and time.monotonic() - self.question_since > limit
                and not self._answer_waiting())

    def _answer_waiting(self) -> bool:
        if self.use_ssl and self.gearman_socket.pending():
            return True
        readable, _, _ = select.select([self.gearman_socket], [], [], 0)
        return bool(readable)

    def _lost(self, error: OSError | None) -> NoReturn:
        """The connection ended (`error` None: closed by the job server).

        With TLS 1.3 our side of the handshake completes before the job server has looked
        at our certificate; a terminator that refuses it then sends an alert and closes,
        and the alert can be lost in the teardown (we read an EOF or a reset instead). An
        end before any answer, on such a session, is that refusal until proven otherwise.
        """
        alert = isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLEOFError)
        if self.tls_version == "TLSv1.3" and not self.answered and not alert:
            self.throw_exception(message=describe_closed_after_handshake(self.settings))
        if error is None:
            self.throw_exception(message="the job server closed the connection")
        self.throw_exception(exception=error)

    def throw_exception(self, message: str | None = None, exception: BaseException | None = None) -> NoReturn:
        self.last_error = describe_error(exception, self.settings) if exception else message
        self.connected = False
        raise_connection_error(self.address, self.last_error)


class _Drain:
    """A job packet too large to hold, consumed as it arrives: of its body only the first
    bytes are kept, enough for the handle, function, unique id and `SNIFF_BYTES` of data."""

    def __init__(self, command: int, length: int) -> None:
        self.command_type = command
        self.length = length
        self.remaining = length
        self.kept = bytearray()

    def consume(self, data: bytes) -> bytes:
        """Take what belongs to the packet; the bytes that follow it."""
        taken = min(len(data), self.remaining)
        room = _JOB_PREFIX_ROOM + SNIFF_BYTES - len(self.kept)
        if room > 0:
            self.kept += data[:min(taken, room)]
        self.remaining -= taken
        return data[taken:]

    def command(self) -> tuple[int, dict[str, Any]] | None:
        """The whole packet's command, its data an `Oversized` payload; None when the kept
        bytes do not hold the fields that precede the data."""
        names = GEARMAN_PARAMS_FOR_COMMAND[self.command_type]
        *prefix, head = bytes(self.kept).split(b"\0", len(names) - 1)
        if len(prefix) != len(names) - 1:
            return None
        size = self.length - sum(len(field) + 1 for field in prefix)
        return self.command_type, {**dict(zip(names, prefix)),
                                   "data": Oversized(size, head[:SNIFF_BYTES])}


@functools.lru_cache(maxsize=None)
def _bare_request(cmd_type: int) -> bytes:
    """The whole packet of a request without arguments."""
    return _HEADER.pack(MAGIC_REQ_STRING, cmd_type, 0)


def raise_connection_error(address: str, reason: str | None) -> NoReturn:
    raise GearmanConnectionError(f"{address}: {reason}")


class BackgroundJobServerConnection(JobServerConnection):
    """Connects (TCP, then the TLS handshake) in a thread; `connect` adopts a finished one.

    `connect` never blocks: it starts an attempt if none runs and the cool-down has passed,
    adopts the socket of an attempt that succeeded, and otherwise raises ConnectionError
    (pygearman's worker then serves the other servers). `progress` is set whenever an
    attempt ends, so the worker can wake up at once instead of polling.
    """

    def __init__(self, host: str, port: int, settings: GearmanSettings,
                 context: ssl.SSLContext | None, progress: threading.Event,
                 max_job_bytes: int | None = None) -> None:
        self.progress = progress
        self._attempt: threading.Thread | None = None
        self._result: socket.socket | BaseException | None = None
        self._next_attempt = 0.0
        super().__init__(host, port, settings, context, max_job_bytes)

    def connect(self) -> None:
        if self.connected:
            return
        result = self._result
        if result is not None:  # the attempt has ended: nothing else writes _result now
            self._result = None
        if isinstance(result, socket.socket):
            self.adopt(result)
            return
        if isinstance(result, BaseException):
            self.throw_exception(exception=result)
        if self._attempt is None or not self._attempt.is_alive():
            if time.monotonic() >= self._next_attempt:
                self._next_attempt = time.monotonic() + self.connect_cooldown_seconds
                self._attempt = threading.Thread(target=self._connect_in_background,
                                                 name=f"connect-{self.address}", daemon=True)
                self._attempt.start()
        raise_connection_error(self.address, "connecting")

    def _connect_in_background(self) -> None:
        try:
            self._result = open_socket(self.gearman_host, self.gearman_port, self.settings,
                                       self.context)
        except OSError as exc:
            self._result = exc
        finally:
            self.progress.set()

    def close(self) -> None:
        super().close()
        leftover, self._result = self._result, None
        if isinstance(leftover, socket.socket):
            leftover.close()


def connections(settings: GearmanSettings, make: Callable[..., JobServerConnection],
                **extra: Any) -> list[JobServerConnection]:
    """One connection per configured job server, sharing one TLS context."""
    context = client_context(settings)
    return [make(host, port, settings, context, **extra) for host, port in settings.servers]
