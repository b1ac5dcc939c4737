"""libra-client: send a message to one worker, or to many at once, and print the replies.

One worker: the JSON reply is printed as it came. Many (several function names, a
``--workers-file``, or ``--json``): the same message goes to all of them at once, as
Libra's admin server pings its fleet (pygearman's ``submit_multiple_jobs``), and one line
per device says PASS, FAIL or TIMEOUT with the milliseconds and the error; a summary goes
to stderr.

Before sending, the job servers' admin ``status`` command tells whether any worker is
registered for each function: a function nobody serves is reported at once instead of
after the timeout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, Sequence

import gearman
from gearman.client_handler import GearmanClientCommandHandler
from gearman.constants import JOB_COMPLETE, JOB_FAILED, JOB_UNKNOWN
from gearman.job import GearmanJob, GearmanJobRequest

from libra_worker import __version__
from libra_worker.config import ConfigError, GearmanSettings, load, parse_servers
from libra_worker.jobserver import JobServerConnection, connections, describe_error, open_socket
from libra_worker.messages import Action
from libra_worker.tls import check_tls_files, client_context

# Not shorter than any action's job timeout on the worker ([timeouts] default is 120 s):
# a client that gives up first reports TIMEOUT for a job the worker still completes.
DEFAULT_TIMEOUT = 130.0
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_NO_REPLY, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_CODES = f"""exit status:
  {EXIT_PASS}  every reply says PASS
  {EXIT_FAIL}  a reply says FAIL (or is not a JSON reply)
  {EXIT_USAGE}  usage error: bad option, unknown action name, unreadable file
  {EXIT_NO_REPLY}  no reply in time (or no worker is registered for the function)
  {EXIT_UNREACHABLE}  no job server reachable"""
PASS, FAIL, TIMEOUT = "PASS", "FAIL", "TIMEOUT"
# The admin protocol's answer ends with a line holding a single dot.
_STATUS_END = b"\n.\n"
_BARE_WORD = re.compile(r"^[A-Za-z_]+$")


class TransportError(Exception):
    """No usable reply came back from the worker."""

    exit_code = EXIT_NO_REPLY


class Unreachable(TransportError):
    """No job server could be reached."""

    exit_code = EXIT_UNREACHABLE


class BadReply(TransportError):
    """The worker answered something that is not a JSON reply."""

    exit_code = EXIT_FAIL


class UsageError(Exception):
    """The command line asks for something that cannot be sent."""


@dataclass(frozen=True)
class TLSFiles:
    """The client's side of mutual TLS: the CA that signed the job servers' certificates,
    and the certificate and key this client presents (the worker's will do)."""

    ca: Path
    cert: Path
    key: Path
    verify_hostname: bool = True


@dataclass
class Result:
    """One device's answer in a fan-out."""

    worker: str
    outcome: str  # PASS, FAIL or TIMEOUT
    ms: float
    error: str | None = None
    reply: dict[str, Any] | None = field(default=None, repr=False)

    def line(self) -> str:
        return f"{self.worker} {self.outcome} {self.ms:.0f}" + (f" {self.error}" if self.error else "")


def job_server_settings(servers: str, function: str, tls: TLSFiles | None) -> GearmanSettings:
    """The worker's [gearman] settings type, so that both sides connect the same way."""
    settings = GearmanSettings(servers=parse_servers(servers), function=function)
    if tls is not None:
        settings = replace(settings, ssl_ca=tls.ca, ssl_cert=tls.cert, ssl_key=tls.key,
                           ssl_verify_hostname=tls.verify_hostname)
        check_tls_files(settings)
    return settings


class _TimedCommandHandler(GearmanClientCommandHandler):
    """Stamps when each reply arrived, for per-device milliseconds."""

    def recv_work_complete(self, job_handle: bytes, data: bytes) -> bool:
        self.handle_to_request_map[job_handle].answered_at = time.monotonic()
        return super().recv_work_complete(job_handle, data)


class _Client(gearman.GearmanClient):
    command_handler_class = _TimedCommandHandler


def registered_workers(settings: GearmanSettings, functions: Sequence[str],
                       timeout: float) -> dict[str, int] | None:
    """How many workers each function has, summed over the job servers that answered
    the admin `status` command; None when none answered (none reachable).

    Raises Unreachable naming why when no job server accepts the connection.
    """
    context = client_context(settings)
    counts: dict[str, int] = dict.fromkeys(functions, 0)
    answered, reasons = False, []
    probe = replace(settings, connect_timeout=min(settings.connect_timeout, timeout))
    for host, port in settings.servers:
        try:
            table = _admin_status(host, port, probe, context)
        except OSError as exc:
            reasons.append(describe_error(exc, probe))
            continue
        answered = True
        for function in functions:
            counts[function] += table.get(function, 0)
    if not answered:
        raise Unreachable(f"cannot reach a job server at {_addresses(settings)}: "
                          f"{'; '.join(dict.fromkeys(reasons))}.")
    return counts


def _admin_status(host: str, port: int, settings: GearmanSettings, context: Any) -> dict[str, int]:
    """gearmand's `status`: function -> available workers."""
    with open_socket(host, port, settings, context) as connection:
        connection.settimeout(settings.connect_timeout)
        connection.sendall(b"status\n")
        received = b""
        while not (received.endswith(_STATUS_END) or received == b".\n"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    return parse_status(received.decode("utf-8", "replace"))


def parse_status(text: str) -> dict[str, int]:
    """Lines of `function TAB total TAB running TAB available_workers`, then a dot."""
    table = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and fields[3].isdigit():
            table[fields[0]] = int(fields[3])
    return table


def submit(servers: str, function: str, message: str, timeout: float,
           tls: TLSFiles | None = None, require_worker: bool = False) -> dict[str, Any]:
    """Send `message` to `function` and wait for its reply, at most `timeout` seconds."""
    [result] = submit_many(servers, [function], message, timeout, tls, require_worker)
    if result.reply is None:
        if result.outcome == FAIL:
            raise BadReply(result.error)
        raise TransportError(result.error)
    return result.reply


def submit_many(servers: str, functions: Sequence[str], message: str, timeout: float,
                tls: TLSFiles | None = None, require_worker: bool = False) -> list[Result]:
    """Send `message` to every function at once; one Result each, in the same order.

    With `require_worker` (the command line's way), a function no worker is registered
    for gets TIMEOUT at once. Without it the job waits in the job server for a worker
    that comes (back) within `timeout`, which is what a program resending after a
    worker restart wants.
    """
    settings = job_server_settings(servers, functions[0], tls)
    started = time.monotonic()
    available = registered_workers(settings, functions, timeout) if require_worker else None
    results: dict[str, Result] = {
        function: Result(function, TIMEOUT, 0.0, "no worker is registered for this function "
                         "at the job servers (gearmand status)")
        for function in functions if available is not None and available[function] == 0}
    to_send = [function for function in functions if function not in results]
    if to_send:
        results.update(_submit_jobs(settings, to_send, message, timeout, started))
    return [results[function] for function in functions]


def _submit_jobs(settings: GearmanSettings, functions: list[str], message: str,
                 timeout: float, started: float) -> dict[str, Result]:
    job_client = _Client([])
    job_client.connection_list = connections(settings, JobServerConnection)
    payload = message.encode("utf-8")
    requests = [GearmanJobRequest(GearmanJob(None, None, function.encode("utf-8"),
                                             uuid.uuid4().hex, payload))
                for function in functions]
    try:
        _sweep(job_client, requests, len(settings.servers), timeout, started)
    except gearman.errors.GearmanError as exc:
        if all(request.job.handle is None for request in requests):
            reasons = [c.last_error for c in job_client.connection_list if c.last_error] or [str(exc)]
            raise Unreachable(f"cannot reach a job server at {_addresses(settings)}: "
                              f"{'; '.join(dict.fromkeys(reasons))}.") from None
    finally:
        job_client.shutdown()
    return {function: _result(function, request, timeout, started)
            for function, request in zip(functions, requests)}


def _sweep(job_client: _Client, requests: list[GearmanJobRequest], servers: int,
           timeout: float, started: float) -> None:
    """Submit every job and wait for the replies; a job server lost mid-sweep costs only
    the jobs it had created.

    A job whose connection broke before JOB_CREATED is no job yet: it goes to the next job
    server (even if the one that broke still accepts connections), each server tried at
    most once per job. A job that was created is lost with its server (the worker may
    still run it) and is not sent again. Each pass lets pygearman send a job once
    (max_attempts: a job it would send again ends the pass instead), because within a
    pass it polls only the connections that were open when the pass began: a job moved
    to a server connected later would wait there unread until the timeout. Raises
    GearmanError when nothing more can be sent.
    """
    pending = list(requests)
    while True:
        try:
            job_client.submit_multiple_requests(
                pending, poll_timeout=max(timeout - (time.monotonic() - started), 0.001))
            return
        except gearman.errors.ExceededConnectionAttempts:
            unsent = [r for r in pending if r.state == JOB_UNKNOWN and r.job.handle is None]
            pending = [r for r in pending if r.state != JOB_UNKNOWN or r in unsent]
            for request in unsent:
                if request.connection_attempts >= servers:
                    pending.remove(request)  # every job server broke the connection first
                    continue
                request.max_connection_attempts = request.connection_attempts + 1
                # Next time the job server after the one that broke, even if that one
                # still accepts connections.
                rotation = job_client.request_to_rotating_connection_queue.get(request)
                if rotation and request.job.connection in rotation:
                    rotation.rotate(-rotation.index(request.job.connection) - 1)
            if not pending or time.monotonic() - started >= timeout:
                raise


def _result(function: str, request: Any, timeout: float, started: float) -> Result:
    ms = (getattr(request, "answered_at", time.monotonic()) - started) * 1000
    if request.state != JOB_COMPLETE or request.result is None:
        why = ("the job failed without a reply" if request.state == JOB_FAILED
               else "its job server was lost before the reply" if request.state == JOB_UNKNOWN
               else f"no reply within {timeout:g} s")
        return Result(function, TIMEOUT, ms, why)
    try:
        answer = json.loads(request.result)
    except ValueError:
        return Result(function, FAIL, ms, f"the reply is not JSON: {request.result[:60]!r}")
    if not isinstance(answer, dict):
        return Result(function, FAIL, ms, "the reply is not a JSON object")
    if answer.get("hpcs_response") == "PASS":
        return Result(function, PASS, ms, reply=answer)
    return Result(function, FAIL, ms, str(answer.get("hpcs_error") or "no hpcs_response PASS"),
                  reply=answer)


def read_message(argument: str) -> str:
    """The message: '-' for stdin, '@FILE', a bare action name, or the JSON itself.

    A bare word that is not an action (a typo such as FROB) is refused here, before
    anything is sent; JSON is sent as it is, whatever it holds.
    """
    if argument == "-":
        return sys.stdin.read()
    if argument.startswith("@"):
        with open(argument[1:], encoding="utf-8") as handle:
            return handle.read()
    if argument.upper() in Action.__members__:
        return json.dumps({"hpcs_action": argument.upper()})
    if _BARE_WORD.match(argument):
        raise UsageError(f"{argument[:20]!r} is not an action; use one of "
                         f"{', '.join(Action.__members__)}, or give the message as JSON.")
    return argument


def read_workers(path: Path) -> list[str]:
    """Function names, one per line; blank lines and #comments are skipped."""
    with open(path, encoding="utf-8") as handle:
        names = [line.split("#", 1)[0].strip() for line in handle]
    return [name for name in names if name]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every other error of this command (argparse prints the usage too).
        self.exit(EXIT_USAGE, f"libra-client: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="libra-client",
        description="Send a message to one libra-worker, or the same message to many at "
                    "once, and print the replies.",
        epilog="With --config, the job servers and TLS files come from that worker "
               "configuration's [gearman] section; explicit options win.\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"libra-client {__version__}")
    parser.add_argument("--config", type=Path,
                        help="a libra-worker INI file to take [gearman] servers and ssl_* from")
    parser.add_argument("--servers",
                        help="comma-separated job servers, host:port (default 127.0.0.1:4730)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for the replies (default %(default)g: no shorter "
                             "than the worker's longest [timeouts] entry)")
    parser.add_argument("--workers-file", type=Path,
                        help="more worker function names, one per line (fan-out)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list of {worker, outcome, ms, error, reply}")
    parser.add_argument("--ssl-ca", type=Path, help="TLS: CA file the job servers' certificates chain to")
    parser.add_argument("--ssl-cert", type=Path, help="TLS: this client's certificate (PEM)")
    parser.add_argument("--ssl-key", type=Path, help="TLS: this client's private key (PEM)")
    parser.add_argument("--ssl-no-verify-hostname", action="store_true",
                        help="TLS: do not check the job server's name (IP-only job servers)")
    parser.add_argument("workers", nargs="*", metavar="worker",
                        help="the workers' Gearman function names")
    parser.add_argument("message", help="JSON text, @FILE, - for stdin, or an action name such as DISCOVER")
    args = parser.parse_args(argv)
    try:
        workers = args.workers + (read_workers(args.workers_file) if args.workers_file else [])
        if not workers:
            raise UsageError("name at least one worker (or --workers-file).")
        message = read_message(args.message)
        servers, tls = _connection_options(args)
        job_server_settings(servers, workers[0], tls)  # bad servers or TLS files: usage errors
    except (UsageError, ConfigError, OSError) as exc:
        print(f"libra-client: {_sentence(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if len(workers) == 1 and not args.json and not args.workers_file:
        return _one(servers, workers[0], message, args.timeout, tls)
    return _fan_out(servers, workers, message, args.timeout, tls, args.json)


def _one(servers: str, worker: str, message: str, timeout: float, tls: TLSFiles | None) -> int:
    try:
        answer = submit(servers, worker, message, timeout, tls, require_worker=True)
    except Unreachable as exc:
        print(f"libra-client: {exc}", file=sys.stderr)
        return exc.exit_code
    except TransportError as exc:
        print(f"libra-client: {worker}: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(answer, indent=2))
    return EXIT_PASS if answer.get("hpcs_response") == "PASS" else EXIT_FAIL


def _fan_out(servers: str, workers: list[str], message: str, timeout: float,
             tls: TLSFiles | None, as_json: bool) -> int:
    started = time.monotonic()
    try:
        results = submit_many(servers, workers, message, timeout, tls, require_worker=True)
    except TransportError as exc:
        print(f"libra-client: {exc}", file=sys.stderr)
        return exc.exit_code
    if as_json:
        print(json.dumps([asdict(result) for result in results], indent=1))
    else:
        for result in results:
            print(result.line())
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in (PASS, FAIL, TIMEOUT)}
    print(f"libra-client: {len(results)} workers in {(time.monotonic() - started) * 1000:.0f} ms: "
          + ", ".join(f"{count} {outcome}" for outcome, count in counts.items()), file=sys.stderr)
    if counts[FAIL]:
        return EXIT_FAIL
    return EXIT_NO_REPLY if counts[TIMEOUT] else EXIT_PASS


def _addresses(settings: GearmanSettings) -> str:
    return ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                     for host, port in settings.servers)


def _sentence(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)


def _connection_options(args: argparse.Namespace) -> tuple[str, TLSFiles | None]:
    """Job servers and TLS files from the command line, else from the worker's config."""
    configured = load(args.config).gearman if args.config else None
    servers = args.servers or (
        ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in configured.servers)
        if configured else "127.0.0.1:4730")
    files = [args.ssl_ca, args.ssl_cert, args.ssl_key]
    if any(files) and not all(files):
        raise ConfigError("--ssl-ca, --ssl-cert and --ssl-key go together.")
    if all(files):
        return servers, TLSFiles(*files, verify_hostname=not args.ssl_no_verify_hostname)
    if configured is not None and configured.tls:
        return servers, TLSFiles(configured.ssl_ca, configured.ssl_cert, configured.ssl_key,
                                 configured.ssl_verify_hostname)
    return servers, None


if __name__ == "__main__":
    sys.exit(main())
