"""The Gearman side: serve every configured job server, reconnecting by itself.

`JobServerWorker` always answers with WORK_COMPLETE carrying the JSON reply, FAIL
included: API servers read the reply, and the gearman command-line client waits forever
on a WORK_EXCEPTION. `serve` wraps pygearman's work loop, which gives up when no job
server is reachable, in a loop that reconnects until a stop is requested.

Each job server's connection (`libra_worker.jobserver`) is made in the background, with
TLS and keepalive as configured. A connection counts as up once the job server answered
the ECHO_REQ sent right after registering (with TLS 1.3 that is also when a terminator
that refused our certificate says so). `JobServerHealth` logs the changes (one line when a
server is lost, rate-limited reminders while it stays down, one line when it is back) and
publishes them in `[gearman] status_file` for `libra-worker ctl status`.

The Gearman loop runs on its own thread and hands each job to `libra_worker.lanes`; it
runs only the cheap read-only ones itself (pings: DISCOVER, STATS, within a bound) and
writes every answer back (pygearman's connections are not thread-safe, so only this
thread touches them). The main thread runs the mutating jobs. On a stop request the loop
grabs nothing more, and ends once every job in hand is answered and the answers are written.

Per ping, the loop polls twice and writes to the job server twice (the raw-socket worker
of bench/round_trip.py: three of each). What a read brought in is answered in the same turn
(WORK_COMPLETE and PRE_SLEEP in one write, no second poll to find the socket writable),
and each connection is registered with the poller once, then modified only when what it
waits for changes. pygearman unregisters and
registers every connection around each poll; the overrides below change that without a
fork of the library, as `libra_worker.jobserver` does for TLS.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import gearman
import gearman.io
from gearman.connection_manager import NoopEncoder
from gearman.errors import GearmanError
from gearman.protocol import GEARMAN_COMMAND_ECHO_REQ, GEARMAN_COMMAND_TO_NAME
from gearman.worker_handler import GearmanWorkerCommandHandler

from libra_worker.config import GearmanSettings
from libra_worker.fileutil import atomic_write
from libra_worker.jobs import Answer, JobRunner
from libra_worker.jobserver import BackgroundJobServerConnection, JobServerConnection, connections
from libra_worker.messages import Oversized, encode_reply
from libra_worker.lanes import IN_PLACE, InHand, JobLanes

LOG = logging.getLogger(__name__)

_INITIAL_RECONNECT_DELAY = 0.2
# The alarm ends a mutating job at its timeout; a job this much past it means the lane is
# stuck, and the watchdog pings stop so that systemd restarts the worker.
_STUCK_GRACE = 10.0
# While a job server stays down, remind the log this often (not at every attempt).
DOWN_REMINDER_INTERVAL = 60.0
_REGISTERED_PROBE = b"libra-worker registered"
# How often the passed pings are counted in one INFO line (`PingSummary`).
PING_SUMMARY_INTERVAL = 60.0
_PINGS = frozenset(action.value for action in IN_PLACE)  # the jobs the lanes run in place
_JOB_LINE = "Job %s %s answered %s in %.1f ms"
# Each command's handler method, named as pygearman's recv_command names it.
_RECEIVERS = {command: name.lower().replace("gearman_command_", "recv_")
              for command, name in GEARMAN_COMMAND_TO_NAME.items()}

UP, DOWN, CONNECTING = "up", "down", "connecting"


@dataclass
class ServerState:
    state: str
    since: str
    error: str | None = None


class JobServerHealth:
    """Each job server's connection state: logged on change, written to the status file."""

    def __init__(self, addresses: list[str], status_file: Path | None) -> None:
        self.status_file = status_file
        now = _utc_now()
        self.servers = {address: ServerState(CONNECTING, now) for address in addresses}
        self._down_since: dict[str, float] = {}
        self._last_reminder: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._publish()

    def up(self, address: str) -> None:
        if self.servers[address].state == UP:
            return
        down_since = self._down_since.pop(address, None)
        if down_since is None:
            LOG.info("Registered at job server %s", address)
        else:
            LOG.info("Job server %s is back after %.1f s down (%d failed attempts)", address,
                     time.monotonic() - down_since, self._failures.get(address, 0))
        self._failures.pop(address, None)
        self._last_reminder.pop(address, None)
        self.servers[address] = ServerState(UP, _utc_now())
        self._publish()

    def down(self, address: str, reason: str | None) -> None:
        previous = self.servers[address]
        # A later attempt that ends without a reason (a TLS 1.3 refusal's alert can be lost
        # in the teardown) must not hide the reason an earlier attempt gave.
        reason = reason or (previous.error if previous.state == DOWN else None) or "connection lost"
        now = time.monotonic()
        self._failures[address] = self._failures.get(address, 0) + 1
        if previous.state != DOWN:
            self._down_since[address] = now
            self._last_reminder[address] = now
            what = "lost" if previous.state == UP else "unreachable"
            LOG.warning("Job server %s %s: %s; retrying", address, what, reason)
        elif now - self._last_reminder[address] >= DOWN_REMINDER_INTERVAL:
            self._last_reminder[address] = now
            LOG.warning("Job server %s still down after %.0f s (%d failed attempts): %s", address,
                        now - self._down_since[address], self._failures[address], reason)
        if previous.state != DOWN or previous.error != reason:
            self.servers[address] = ServerState(DOWN, previous.since if previous.state == DOWN
                                                else _utc_now(), reason)
            self._publish()

    def _publish(self) -> None:
        if self.status_file is None:
            return
        document = {"updated": _utc_now(),
                    "servers": {address: asdict(state) for address, state in self.servers.items()}}
        try:
            atomic_write(self.status_file, json.dumps(document, indent=1) + "\n", mode=0o640)
        except OSError as exc:
            LOG.warning("Cannot write %s: %s", self.status_file, exc.strerror)


class PingSummary:
    """The pings (DISCOVER, STATS) answered PASS since the last summary line.

    Every API server pings every worker it knows, every few seconds: hundreds of them
    would make one log line per ping most of the log, and part of each ping's cost.
    A passed ping is logged at DEBUG only, and counted here in one INFO line per
    `interval`; every ping is still in the job journal (`libra-worker ctl jobs`), and a
    ping that fails gets its own INFO line, as every other job does.
    """

    def __init__(self, interval: float = PING_SUMMARY_INTERVAL) -> None:
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._slowest_ms = 0.0
        self._since = time.monotonic()

    def add(self, action: str, ms: float) -> None:
        self._counts[action] = self._counts.get(action, 0) + 1
        self._slowest_ms = max(self._slowest_ms, ms)

    def log_if_due(self, now: float) -> None:
        if now - self._since >= self.interval:
            self.log(now)

    def log(self, now: float) -> None:
        """The summary line (none when no ping passed); a new period starts."""
        if self._counts:
            counts = ", ".join(f"{action} {count}" for action, count in sorted(self._counts.items()))
            LOG.info("Pings passed in the last %.0f s: %s; the slowest took %.1f ms",
                     now - self._since, counts, self._slowest_ms)
        self._counts.clear()
        self._slowest_ms = 0.0
        self._since = now


class _CommandHandler(GearmanWorkerCommandHandler):
    def recv_command(self, cmd_type: int, **cmd_args: Any) -> bool:
        # pygearman builds the receiver's name from the command's for every packet.
        receiver = getattr(self, _RECEIVERS.get(cmd_type, ""), None)
        if receiver is None:
            return super().recv_command(cmd_type, **cmd_args)  # raises its own errors
        return receiver(**cmd_args)

    def recv_echo_res(self, data: bytes) -> bool:
        self.connection_manager.on_echo(self)
        return True

    def recv_noop(self) -> bool:
        # Stopping: jobs are waiting, but they are for another worker now.
        if self.connection_manager.stopping.is_set():
            return True
        return super().recv_noop()


class _PayloadEncoder(NoopEncoder):
    """Bytes as they are; and the payload a connection drained as too large (`Oversized`)."""

    @classmethod
    def decode(cls, decodable_string: Any) -> Any:
        if isinstance(decodable_string, Oversized):
            return decodable_string
        return super().decode(decodable_string)


class JobServerWorker(gearman.GearmanWorker):
    command_handler_class = _CommandHandler
    data_encoder = _PayloadEncoder

    def __init__(self, settings: GearmanSettings, lanes: JobLanes, stopping: threading.Event,
                 heartbeat: Callable[[], None] = lambda: None) -> None:
        super().__init__([])
        self.settings = settings
        self.lanes = lanes
        self.stopping = stopping
        self.heartbeat = heartbeat
        self.jobs_done = 0
        self.abandoned = False  # the mutating lane died: do not wait for its jobs
        # Set when a background connection attempt ends, so that serve() wakes at once.
        self.progress = threading.Event()
        # The payload limit holds while a job is read, not only once it is whole.
        self.connection_list = connections(settings, BackgroundJobServerConnection,
                                           progress=self.progress,
                                           max_job_bytes=lanes.runner.controller.max_message_bytes)
        self.health = JobServerHealth([c.address for c in self.connection_list], settings.status_file)
        # The poller of the current work() round, and what each descriptor is registered
        # for in it (the socket object too: a descriptor number can be reused).
        self._poller: Any = None
        self._registered: dict[int, tuple[Any, int]] = {}
        self._woken = False  # the last poll returned for the lanes' wakeup
        self._answered: list[tuple[str, str, Any, float]] = []  # to log: see _send
        self.pings = PingSummary()
        # pygearman crashes on the first job if the task name is text.
        self.register_task(settings.function.encode("utf-8"), self._not_called)

    @staticmethod
    def _not_called(_worker: gearman.GearmanWorker, _job: Any) -> bytes:
        raise AssertionError("jobs go to the lanes (on_job_execute)")

    def on_job_execute(self, current_job: Any) -> bool:
        # The handler of this connection now: after a reconnect, the job is not ours to answer.
        session = self.connection_to_handler_map[current_job.connection]
        item, answer = self.lanes.take((current_job, session), _text(current_job.handle),
                                       current_job.data, _text(current_job.unique or ""))
        if answer is not None:
            self._send(item, answer)  # written with the PRE_SLEEP that follows (handle_read)
        return True

    def still_held(self, token: tuple[Any, Any]) -> bool:
        """Whether the connection a job came on is still the one it was grabbed on."""
        current_job, session = token
        return (current_job.connection.connected
                and self.connection_to_handler_map.get(current_job.connection) is session)

    def send_answers(self, woken: bool) -> None:
        for item, answer in self.lanes.answers(woken):
            self._send(item, answer)

    def _send(self, item: InHand, answer: Answer) -> None:
        current_job, session = item.token
        self.jobs_done += 1
        if not self.still_held(item.token):
            # gearmand hands out again only what it still holds: a restarted one without a
            # persistent queue has forgotten the job, and its client hears nothing.
            LOG.warning("Job %s: the connection to %s was lost before its answer; a job "
                        "server that kept the job gives it out again", item.job.handle,
                        current_job.connection.address)
            return
        # Logged after the poll round's writes (after_poll): not between a ping and its answer.
        self._answered.append((item.job.handle, answer.action, answer.reply.get("hpcs_response"),
                               (time.monotonic() - item.grabbed) * 1000))
        # Queued on the connection; the poll loop writes it (no nested poll as in
        # pygearman's send_job_complete).
        session.send_job_complete(current_job, encode_reply(answer.reply))

    def _register_connections_with_poller(self, connections: set[Any], poller: Any) -> None:
        # pygearman's own makes two epoll_ctl calls per connection before every poll.
        if poller is not self._poller:  # a new work() round: pygearman made a new poller
            self._poller, self._registered = poller, {}
            poller.register(self.lanes.wakeup_fd, gearman.io.READ)
        for connection in connections:
            gearman_socket = connection.gearman_socket
            if not gearman_socket:
                continue
            events = gearman.io.READ if connection.readable() else 0
            if connection.writable():
                events |= gearman.io.WRITE
            fileno = gearman_socket.fileno()
            known = self._registered.get(fileno)
            if known is None or known[0] is not gearman_socket:
                # A closed socket left the poller with its descriptor; a new one may reuse it.
                try:
                    poller.register(fileno, events)
                except FileExistsError:
                    poller.modify(fileno, events)
            elif known[1] != events:
                poller.modify(fileno, events)
            self._registered[fileno] = (gearman_socket, events)

    def poll_connections_once(self, poller: Any, connection_map: dict[int, Any],
                              timeout: float | None = None) -> Any:
        deadline = self.lanes.next_deadline()
        if deadline is not None:
            until_deadline = max(deadline - time.monotonic(), 0.001)  # 0 would mean forever
            timeout = until_deadline if not timeout or timeout < 0 else min(timeout, until_deadline)
        readable, writable, errors = set(), set(), set()
        self._woken = False
        for fileno, events in poller.poll(timeout=timeout or -1):
            connection = connection_map.get(fileno)
            if connection is None:
                # The lanes' wakeup: an answer waits (after_poll sends it).
                self._woken = self._woken or fileno == self.lanes.wakeup_fd
                continue
            if events & gearman.io.READ:
                readable.add(connection)
            if events & gearman.io.WRITE:
                writable.add(connection)
            if events & gearman.io.ERROR:
                errors.add(connection)
        return readable, writable, errors

    def handle_read(self, current_connection: JobServerConnection) -> None:
        super().handle_read(current_connection)
        # Answer what came in now (a GRAB_JOB for a NOOP; WORK_COMPLETE and PRE_SLEEP for a
        # job run in place), not after another poll finds the socket writable.
        if current_connection.writable():
            self.handle_write(current_connection)

    def finished(self) -> bool:
        """Stopping, every job in hand answered and every answer written (or nobody
        left to run the mutating jobs in hand)."""
        if self.abandoned:
            return True
        return (self.stopping.is_set() and not self.lanes.busy()
                and not any(c.connected and c.writable() for c in self.connection_list))

    def establish_connection(self, current_connection: JobServerConnection) -> JobServerConnection:
        if current_connection.connected:
            return current_connection
        try:
            super().establish_connection(current_connection)
        except GearmanError:
            if current_connection.last_error is not None:
                self.health.down(current_connection.address, current_connection.last_error)
                current_connection.last_error = None
            raise
        # Registered (CAN_DO, PRE_SLEEP queued); the answer to this proves the server is there.
        self.connection_to_handler_map[current_connection].send_command(
            GEARMAN_COMMAND_ECHO_REQ, data=_REGISTERED_PROBE)
        return current_connection

    def on_echo(self, command_handler: _CommandHandler) -> None:
        self.health.up(self.handler_to_connection_map[command_handler].address)

    def handle_error(self, current_connection: JobServerConnection) -> None:
        # A read error and a hang-up in the same poll come here twice; the first said why.
        if current_connection.connected or current_connection.last_error is not None:
            self.health.down(current_connection.address, current_connection.last_error)
        current_connection.last_error = None
        super().handle_error(current_connection)

    def after_poll(self, any_activity: bool) -> bool:
        self.send_answers(self._woken)
        self._woken = False
        self.lanes.write_journal()
        for handle, action, response, ms in self._answered:
            if response == "PASS" and action in _PINGS:
                self.pings.add(action, ms)
                LOG.debug(_JOB_LINE, handle, action, response, ms)
            else:
                LOG.info(_JOB_LINE, handle, action, response, ms)
        self._answered.clear()
        self.pings.log_if_due(time.monotonic())
        for connection in self.connection_list:
            if connection.connected and connection.overdue(self.settings.answer_timeout):
                connection.last_error = (f"no answer within {self.settings.answer_timeout:g} s "
                                         f"(answer_timeout); is the job server frozen?")
                self.handle_error(connection)
        self.beat()
        return not self.finished()

    def beat(self) -> None:
        """Proof for systemd's watchdog that this loop runs and the mutating lane is not
        stuck: a job within its timeout (plus a grace) counts as progress."""
        if self.lanes.on_time(_STUCK_GRACE):
            self.heartbeat()


def serve(settings: GearmanSettings, runner: JobRunner, stopping: threading.Event,
          heartbeat: Callable[[], None] = lambda: None,
          around_mutating: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> None:
    """Serve jobs until `stopping` is set; the jobs in hand are finished and answered first.

    The Gearman loop runs on a thread of its own; the calling (main) thread runs the
    mutating jobs, so that their timeout alarm works. For systemd's watchdog, `heartbeat`
    is called after every poll of the job servers while the jobs are on time, and each
    mutating job runs inside `around_mutating()`.
    """
    lanes = JobLanes(runner, around_mutating=around_mutating)
    worker = JobServerWorker(settings, lanes, stopping, heartbeat)
    LOG.info("Serving function %r on %s%s", settings.function,
             ", ".join(worker.health.servers), " (TLS)" if settings.tls else "")
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            _serve_connections(worker, settings)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            failure.append(exc)
            stopping.set()

    gearman_loop = threading.Thread(target=loop, name="gearman")
    gearman_loop.start()

    def loop_ended() -> bool:
        if stopping.is_set():
            lanes.wake()  # the loop may be asleep in its poll: let it see the stop now
        return not gearman_loop.is_alive()

    try:
        lanes.run_mutating(stop=loop_ended, still_held=worker.still_held)
    except BaseException:
        worker.abandoned = True  # the job server gives the jobs in hand out again
        raise
    finally:
        stopping.set()
        gearman_loop.join()
        lanes.write_journal()  # a loop that ended on an error wrote no line after its last job
        lanes.close()
        worker.pings.log(time.monotonic())
        LOG.info("Stopped serving after %d jobs", worker.jobs_done)
    if failure:
        raise failure[0]


def _serve_connections(worker: JobServerWorker, settings: GearmanSettings) -> None:
    delay = _INITIAL_RECONNECT_DELAY
    # Deadlines (answer_timeout) are checked after each poll, so poll at least that often.
    poll_timeout = min(settings.poll_timeout, settings.answer_timeout)
    try:
        while not worker.finished():
            worker.progress.clear()
            try:
                worker.work(poll_timeout=poll_timeout)
                delay = _INITIAL_RECONNECT_DELAY
            except (GearmanError, OSError):
                if worker.stopping.is_set():
                    return  # no job server to answer to: the jobs in hand are given out again
                # No job server connected: wait for a background attempt to end. A
                # restart would not bring a job server back: the loop still counts as alive.
                worker.beat()
                if not _wait_for_either(worker.progress, worker.stopping, delay):
                    delay = min(delay * 2, settings.reconnect_delay_max)
    finally:
        worker.shutdown()


def job_server_summary(status_file: Path | None) -> str:
    """One line for `ctl status`: each job server's state as the worker last published it."""
    try:
        servers = json.loads(status_file.read_text())["servers"] if status_file else {}
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown (no status published yet)"
    return "; ".join(
        f"{address} {state.get('state')} since {state.get('since')}"
        + (f" ({state['error']})" if state.get("error") else "")
        for address, state in servers.items()
    ) or "-"


def _wait_for_either(first: threading.Event, second: threading.Event, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if first.wait(min(remaining, 0.1)) or second.is_set():
            return True
    return False


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
