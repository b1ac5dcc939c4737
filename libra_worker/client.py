"""libra-client: submit one message to a worker through the job server(s), print the reply.

Exit status: 0 when the reply says PASS, 1 when it says FAIL, 2 when no reply came
(job server unreachable, timeout, or an answer that is not a JSON reply).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gearman

from libra_worker.config import ConfigError, GearmanSettings, load, parse_servers
from libra_worker.jobserver import JobServerConnection, connections
from libra_worker.messages import Action
from libra_worker.tls import check_tls_files

EXIT_PASS, EXIT_FAIL, EXIT_TRANSPORT = 0, 1, 2


class TransportError(Exception):
    """No reply came back from the worker."""


@dataclass(frozen=True)
class TLSFiles:
    """The client's side of mutual TLS: the CA that signed the job servers' certificates,
    and the certificate and key this client presents (the worker's will do)."""

    ca: Path
    cert: Path
    key: Path
    verify_hostname: bool = True


def job_server_settings(servers: str, function: str, tls: TLSFiles | None) -> GearmanSettings:
    """The worker's [gearman] settings type, so that both sides connect the same way."""
    settings = GearmanSettings(servers=parse_servers(servers), function=function)
    if tls is not None:
        settings = replace(settings, ssl_ca=tls.ca, ssl_cert=tls.cert, ssl_key=tls.key,
                           ssl_verify_hostname=tls.verify_hostname)
        check_tls_files(settings)
    return settings


def submit(servers: str, function: str, message: str, timeout: float,
           tls: TLSFiles | None = None) -> dict[str, Any]:
    """Send `message` to `function` and wait for its reply, at most `timeout` seconds."""
    settings = job_server_settings(servers, function, tls)
    client = gearman.GearmanClient([])
    client.connection_list = connections(settings, JobServerConnection)
    try:
        request = client.submit_job(
            function.encode("utf-8"), message.encode("utf-8"), poll_timeout=timeout
        )
    except gearman.errors.GearmanError as exc:
        reasons = [c.last_error for c in client.connection_list if c.last_error] or [str(exc)]
        raise TransportError(f"cannot reach a job server at {servers}: {'; '.join(reasons)}") from None
    finally:
        client.shutdown()
    if request.timed_out:
        raise TransportError(f"no reply from worker {function!r} within {timeout:g} s")
    if not request.complete or request.result is None:
        raise TransportError(f"the job ended without a reply (state {request.state})")
    try:
        answer = json.loads(request.result)
    except ValueError:
        raise TransportError(f"the reply is not JSON: {request.result[:200]!r}") from None
    if not isinstance(answer, dict):
        raise TransportError("the reply is not a JSON object")
    return answer


def read_message(argument: str) -> str:
    """The message: '-' for stdin, '@FILE', a bare action name, or the JSON itself."""
    if argument == "-":
        return sys.stdin.read()
    if argument.startswith("@"):
        with open(argument[1:], encoding="utf-8") as handle:
            return handle.read()
    if argument.upper() in Action.__members__:
        return json.dumps({"hpcs_action": argument.upper()})
    return argument


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="libra-client",
        description="Send one message to a libra-worker and print its JSON reply.",
        epilog="With --config, the job servers and TLS files come from that worker "
               "configuration's [gearman] section; explicit options win.",
    )
    parser.add_argument("--config", type=Path,
                        help="a libra-worker INI file to take [gearman] servers and ssl_* from")
    parser.add_argument("--servers",
                        help="comma-separated job servers, host:port (default 127.0.0.1:4730)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the reply (default %(default)s)")
    parser.add_argument("--ssl-ca", type=Path, help="TLS: CA file the job servers' certificates chain to")
    parser.add_argument("--ssl-cert", type=Path, help="TLS: this client's certificate (PEM)")
    parser.add_argument("--ssl-key", type=Path, help="TLS: this client's private key (PEM)")
    parser.add_argument("--ssl-no-verify-hostname", action="store_true",
                        help="TLS: do not check the job server's name (IP-only job servers)")
    parser.add_argument("worker", help="the worker's Gearman function name")
    parser.add_argument("message", help="JSON text, @FILE, - for stdin, or an action name such as DISCOVER")
    args = parser.parse_args(argv)
    try:
        servers, tls = _connection_options(args)
        answer = submit(servers, args.worker, read_message(args.message), args.timeout, tls)
    except (TransportError, ConfigError, OSError) as exc:
        print(f"libra-client: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT
    print(json.dumps(answer, indent=2))
    return EXIT_PASS if answer.get("hpcs_response") == "PASS" else EXIT_FAIL


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
