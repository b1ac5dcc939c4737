"""libra-client: submit one message to a worker through the job server(s), print the reply.

Exit status: 0 when the reply says PASS, 1 when it says FAIL, 2 when no reply came
(job server unreachable, timeout, or an answer that is not a JSON reply).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import gearman

from libra_worker.config import ConfigError, parse_servers
from libra_worker.messages import Action

EXIT_PASS, EXIT_FAIL, EXIT_TRANSPORT = 0, 1, 2


class TransportError(Exception):
    """No reply came back from the worker."""


def submit(servers: str, function: str, message: str, timeout: float) -> dict[str, Any]:
    """Send `message` to `function` and wait for its reply, at most `timeout` seconds."""
    hosts = [f"{host}:{port}" for host, port in parse_servers(servers)]
    client = gearman.GearmanClient(hosts)
    try:
        request = client.submit_job(
            function.encode("utf-8"), message.encode("utf-8"), poll_timeout=timeout
        )
    except gearman.errors.GearmanError as exc:
        raise TransportError(f"cannot reach a job server at {servers}: {exc}") from None
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
    )
    parser.add_argument("--servers", default="127.0.0.1:4730",
                        help="comma-separated job servers, host:port (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the reply (default %(default)s)")
    parser.add_argument("worker", help="the worker's Gearman function name")
    parser.add_argument("message", help="JSON text, @FILE, - for stdin, or an action name such as DISCOVER")
    args = parser.parse_args(argv)
    try:
        answer = submit(args.servers, args.worker, read_message(args.message), args.timeout)
    except (TransportError, ConfigError, OSError) as exc:
        print(f"libra-client: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT
    print(json.dumps(answer, indent=2))
    return EXIT_PASS if answer.get("hpcs_response") == "PASS" else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
